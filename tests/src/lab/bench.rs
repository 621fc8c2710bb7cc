//! TCP throughput with iperf3, interleaved run by run on five paths:
//!
//! 1. node → node on the underlay;
//! 2. bare VXLAN node → node, between two namespaces programmed by hand with `ip`/`bridge`;
//! 3. **the baseline**: twill's per-node topology programmed by hand — pod netns, veth, bridge
//!    `cni0`, VTEP `twill.1` with a /32 address, and per peer the neighbour, FDB entry and
//!    onlink route twilld writes, same MTU — without any netfilter rules;
//! 4. the same hand topology plus the nftables table twilld installs (copied from the running
//!    twill nodes, subnets swapped), to show what masquerade (connection tracking) costs;
//! 5. twill pod → pod across the lab's two nodes.
//!
//! So `twill / hand topology` measures twill's overhead alone, not topology differences.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde_json::Value;
use twill_common::subnet_env::SubnetEnv;

use super::error::{Error, Result};
use super::process::{run_in, wait_for, Proc};
use super::{Lab, NODE_IF};

const IPERF_PORT: &str = "5201";
/// Names as twill uses them, inside the hand-made node namespaces.
const VTEP: &str = "twill.1";
const VNI: &str = "1";
const VXLAN_PORT: &str = "8472";
const BRIDGE: &str = "cni0";
const HOST_VETH: &str = "vethpod";
/// The hand-made nodes' pod network (disjoint from the lab's).
const HAND_NETWORK: &str = "10.99.0.0/16";

/// One measured path.
#[derive(Debug, Clone)]
pub struct PathResult {
    pub label: String,
    /// Gbit/s of every run, in run order.
    pub runs: Vec<f64>,
}

impl PathResult {
    /// Best run: interference from other load only ever lowers a run, so on a shared
    /// machine the best of several is the steadier figure.
    pub fn best(&self) -> f64 {
        self.runs.iter().copied().fold(0.0, f64::max)
    }

    pub fn median(&self) -> f64 {
        median(self.runs.clone())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median of the per-round ratios `a[i] / b[i]`: runs of one round ran back to back, so
/// they shared the machine's load and their ratio cancels most of it.
fn paired_ratio(a: &PathResult, b: &PathResult) -> f64 {
    median(
        a.runs
            .iter()
            .zip(&b.runs)
            .map(|(x, y)| x / y.max(1e-9))
            .collect(),
    )
}

/// Bench parameters.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub seconds: u32,
    pub runs: u32,
    pub streams: u32,
}

/// An iperf3 server inside a namespace, stopped by PID on drop.
struct Server(Proc);

impl Server {
    fn start(lab: &Lab, ns: &str) -> Result<Server> {
        let log = lab.state_dir().join(format!("iperf3-{ns}.log"));
        let p = Proc::spawn_in(ns, &["iperf3", "-s", "-p", IPERF_PORT], &[], &log)?;
        let server = Server(p);
        wait_for(&format!("iperf3 server in {ns}"), 10, || {
            run_in(
                ns,
                &["ss", "-Hltn", "sport", "=", &format!(":{IPERF_PORT}")],
            )
            .ok()
            .filter(|o| !o.trim().is_empty())
        })?;
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.0.stop(Duration::from_secs(3));
    }
}

fn iperf(client_ns: &str, server_ip: Ipv4Addr, o: &BenchOptions) -> Result<f64> {
    let out = run_in(
        client_ns,
        &[
            "iperf3",
            "-c",
            &server_ip.to_string(),
            "-p",
            IPERF_PORT,
            "-t",
            &o.seconds.to_string(),
            "-P",
            &o.streams.to_string(),
            "-J",
        ],
    )?;
    let v: Value = serde_json::from_str(&out)?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .map(|bps| bps / 1e9)
        .ok_or_else(|| {
            Error::Lab(format!(
                "iperf3 gave no sum_received: {}",
                v.get("error").unwrap_or(&Value::Null)
            ))
        })
}

/// One node of twill's topology, programmed by hand.
struct HandNode {
    /// Node namespace, on the underlay.
    ns: String,
    pod_ns: String,
    underlay: Ipv4Addr,
    /// Pod subnet 10.99.`idx`.0/24; VTEP address 10.99.`idx`.0/32 as twilld sets it.
    idx: u8,
    mac: String,
}

impl HandNode {
    fn subnet(&self) -> Ipv4Network {
        Ipv4Network::new(Ipv4Addr::new(10, 99, self.idx, 0), 24).expect("prefix 24 is valid")
    }
    fn vtep_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.idx, 0)
    }
    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.idx, 1)
    }
    fn pod_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.idx, 2)
    }
}

/// Node namespace on the underlay at 192.168.100.`idx+200`, with the devices and addresses
/// twilld and twill-bridge create: VTEP (nolearning, port 8472, MTU), bridge `cni0` with the
/// gateway, a veth into the pod namespace (hairpin on, like twill-bridge), the pod's routes.
fn hand_node(lab: &mut Lab, tag: &str, idx: u8, mtu: u32) -> Result<HandNode> {
    let ns = lab.add_underlay_ns(tag, 200 + idx)?;
    let pod_ns = lab.add_extra_ns(&format!("{tag}-pod"))?;
    let n = HandNode {
        ns,
        pod_ns,
        underlay: Ipv4Addr::new(192, 168, 100, 200 + idx),
        idx,
        mac: format!("02:74:77:00:00:{idx:02x}"),
    };
    let mtu = mtu.to_string();
    let (ns, pod) = (n.ns.as_str(), n.pod_ns.as_str());
    let gw = n.gateway().to_string();
    run_in(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    run_in(
        ns,
        &[
            "ip",
            "link",
            "add",
            VTEP,
            "address",
            &n.mac,
            "mtu",
            &mtu,
            "type",
            "vxlan",
            "id",
            VNI,
            "local",
            &n.underlay.to_string(),
            "dev",
            NODE_IF,
            "dstport",
            VXLAN_PORT,
            "nolearning",
        ],
    )?;
    run_in(
        ns,
        &[
            "ip",
            "addr",
            "add",
            &format!("{}/32", n.vtep_ip()),
            "dev",
            VTEP,
        ],
    )?;
    run_in(ns, &["ip", "link", "set", VTEP, "up"])?;
    run_in(
        ns,
        &["ip", "link", "add", BRIDGE, "mtu", &mtu, "type", "bridge"],
    )?;
    run_in(
        ns,
        &["ip", "addr", "add", &format!("{gw}/24"), "dev", BRIDGE],
    )?;
    run_in(ns, &["ip", "link", "set", BRIDGE, "up"])?;
    run_in(
        ns,
        &[
            "ip", "link", "add", HOST_VETH, "mtu", &mtu, "type", "veth", "peer", "name", NODE_IF,
            "mtu", &mtu, "netns", pod,
        ],
    )?;
    run_in(ns, &["ip", "link", "set", HOST_VETH, "master", BRIDGE])?;
    run_in(
        ns,
        &["bridge", "link", "set", "dev", HOST_VETH, "hairpin", "on"],
    )?;
    run_in(ns, &["ip", "link", "set", HOST_VETH, "up"])?;
    run_in(
        pod,
        &[
            "ip",
            "addr",
            "add",
            &format!("{}/24", n.pod_ip()),
            "dev",
            NODE_IF,
        ],
    )?;
    run_in(pod, &["ip", "link", "set", NODE_IF, "up"])?;
    run_in(pod, &["ip", "route", "add", "default", "via", &gw])?;
    run_in(
        pod,
        &[
            "ip",
            "route",
            "add",
            HAND_NETWORK,
            "via",
            &gw,
            "dev",
            NODE_IF,
        ],
    )?;
    Ok(n)
}

/// What twilld writes for a peer: neighbour (peer VTEP IP → MAC), FDB (MAC → underlay IP),
/// onlink route to the peer's subnet via its VTEP IP.
fn hand_peer(n: &HandNode, peer: &HandNode) -> Result<()> {
    let vtep = peer.vtep_ip().to_string();
    run_in(
        &n.ns,
        &[
            "ip",
            "neigh",
            "replace",
            &vtep,
            "lladdr",
            &peer.mac,
            "dev",
            VTEP,
            "nud",
            "permanent",
        ],
    )?;
    run_in(
        &n.ns,
        &[
            "bridge",
            "fdb",
            "append",
            &peer.mac,
            "dev",
            VTEP,
            "dst",
            &peer.underlay.to_string(),
            "self",
            "permanent",
        ],
    )?;
    run_in(
        &n.ns,
        &[
            "ip",
            "route",
            "add",
            &peer.subnet().to_string(),
            "via",
            &vtep,
            "dev",
            VTEP,
            "onlink",
        ],
    )?;
    Ok(())
}

/// twilld's nftables table as listed in `twill_ns`, with that node's subnet and network
/// swapped token by token for the hand node's. Copying the live listing (rather than a
/// rendering of our own) keeps the comparison honest when twilld's rules change.
fn copy_twill_rules(lab: &Lab, twill_ns: &str, env: &SubnetEnv, to: &HandNode) -> Result<()> {
    let (Some(network), Some(subnet)) = (env.network, env.subnet) else {
        return Err(Error::Lab(
            "subnet.env without FLANNEL_NETWORK/SUBNET".into(),
        ));
    };
    let listing = run_in(twill_ns, &["nft", "list", "table", "ip", "twill"])?;
    let (net_s, sub_s) = (network.to_string(), subnet.to_string());
    let hand_sub = to.subnet().to_string();
    let script: String = listing
        .lines()
        .map(|line| {
            let swapped: Vec<&str> = line
                .split(' ')
                .map(|tok| match tok {
                    t if t == net_s => HAND_NETWORK,
                    t if t == sub_s => hand_sub.as_str(),
                    t => t,
                })
                .collect();
            swapped.join(" ") + "\n"
        })
        .collect();
    if !script.contains(HAND_NETWORK) {
        return Err(Error::Lab(format!(
            "twilld's table in {twill_ns} does not mention {net_s}:\n{listing}"
        )));
    }
    let file = lab.state_dir().join(format!("nft-{}.nft", to.ns));
    std::fs::write(&file, &script).map_err(|e| Error::Lab(format!("{}: {e}", file.display())))?;
    run_in(&to.ns, &["nft", "-f", &file.display().to_string()])?;
    Ok(())
}

struct BenchPath {
    label: String,
    client: String,
    server: String,
    ip: Ipv4Addr,
}

/// Runs the five paths `o.runs` times, interleaved so drift hits all alike.
/// Needs a lab with at least two Ready nodes that each have a pod.
pub fn run(
    lab: &mut Lab,
    o: &BenchOptions,
    out: &mut dyn std::io::Write,
) -> Result<Vec<PathResult>> {
    let nodes: Vec<_> = lab.nodes().iter().take(2).cloned().collect();
    if nodes.len() < 2 {
        return Err(Error::Lab("bench needs two nodes".into()));
    }
    let pod_on = |n: &str| {
        lab.pods()
            .iter()
            .find(|p| p.node == n && p.ip.is_some())
            .cloned()
    };
    let (Some(pa), Some(pb)) = (pod_on(&nodes[0].name), pod_on(&nodes[1].name)) else {
        return Err(Error::Lab(
            "bench needs a pod on each of the first two nodes".into(),
        ));
    };
    let env = |n: &str| SubnetEnv::read(&lab.subnet_file(n)).map_err(|e| Error::Lab(e.to_string()));
    let (env_a, env_b) = (env(&nodes[0].name)?, env(&nodes[1].name)?);
    let mtu = env_a.mtu;
    let made_before: BTreeSet<String> = lab_extra(lab);
    let result = (|| -> Result<Vec<PathResult>> {
        // Hand pair without rules (10.99.1/2) and with twilld's table (10.99.3/4).
        let ha = hand_node(lab, "ha", 1, mtu)?;
        let hb = hand_node(lab, "hb", 2, mtu)?;
        let ma = hand_node(lab, "ma", 3, mtu)?;
        let mb = hand_node(lab, "mb", 4, mtu)?;
        for (x, y) in [(&ha, &hb), (&hb, &ha), (&ma, &mb), (&mb, &ma)] {
            hand_peer(x, y)?;
        }
        copy_twill_rules(lab, &nodes[0].ns, &env_a, &ma)?;
        copy_twill_rules(lab, &nodes[1].ns, &env_b, &mb)?;
        let pb_ip = pb.ip.ok_or_else(|| Error::Lab("pod without IP".into()))?;
        let masq = if env_a.ipmasq {
            "--ip-masq"
        } else {
            "no --ip-masq"
        };
        let paths = vec![
            BenchPath {
                label: format!("node->node underlay ({} -> {})", nodes[0].ip, nodes[1].ip),
                client: nodes[0].ns.clone(),
                server: nodes[1].ns.clone(),
                ip: nodes[1].ip,
            },
            BenchPath {
                label: format!("hand VXLAN node->node, bare (MTU {mtu})"),
                client: ha.ns.clone(),
                server: hb.ns.clone(),
                ip: hb.vtep_ip(),
            },
            BenchPath {
                label: "hand twill topology pod->pod, no rules".into(),
                client: ha.pod_ns.clone(),
                server: hb.pod_ns.clone(),
                ip: hb.pod_ip(),
            },
            BenchPath {
                label: "hand twill topology pod->pod + twilld's nft table".into(),
                client: ma.pod_ns.clone(),
                server: mb.pod_ns.clone(),
                ip: mb.pod_ip(),
            },
            BenchPath {
                label: format!(
                    "twill pod->pod ({}/{} -> {}/{}), {masq}",
                    pa.node, pa.name, pb.node, pb.name
                ),
                client: pa.ns.clone(),
                server: pb.ns.clone(),
                ip: pb_ip,
            },
        ];
        // Every path must be reachable before timing anything.
        for p in &paths {
            run_in(
                &p.client,
                &["ping", "-c", "1", "-W", "2", &p.ip.to_string()],
            )
            .map_err(|e| Error::Lab(format!("{}: no ping reply: {e}", p.label)))?;
        }
        let servers: Vec<Server> = paths
            .iter()
            .map(|p| p.server.clone())
            .collect::<BTreeSet<_>>()
            .iter()
            .map(|ns| Server::start(lab, ns))
            .collect::<Result<_>>()?;
        let mut results: Vec<PathResult> = paths
            .iter()
            .map(|p| PathResult {
                label: p.label.clone(),
                runs: vec![],
            })
            .collect();
        for round in 1..=o.runs {
            for (i, p) in paths.iter().enumerate() {
                let g = iperf(&p.client, p.ip, o)?;
                let _ = writeln!(out, "run {round}/{}: {}: {g:.2} Gbit/s", o.runs, p.label);
                results[i].runs.push(g);
            }
        }
        drop(servers);
        Ok(results)
    })();
    // Remove the hand-made namespaces whatever happened (the lab's `down` would too).
    let mut cleanup: Result<()> = Ok(());
    for ns in lab_extra(lab).difference(&made_before) {
        if let Err(e) = lab.del_extra_ns(ns) {
            cleanup = Err(e);
        }
    }
    let results = result?;
    cleanup.map(|()| results)
}

fn lab_extra(lab: &Lab) -> BTreeSet<String> {
    lab.extra_namespaces().iter().cloned().collect()
}

/// The report with medians and ratios.
pub fn report(results: &[PathResult], o: &BenchOptions) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "TCP throughput, iperf3 {} stream(s), {} s per run, {} interleaved runs (Gbit/s):",
        o.streams, o.seconds, o.runs
    );
    let _ = writeln!(s, "  {:<52} {:>7} {:>7}   runs", "path", "median", "best");
    for r in results {
        let runs: Vec<String> = r.runs.iter().map(|g| format!("{g:.2}")).collect();
        let _ = writeln!(
            s,
            "  {:<52} {:>7.2} {:>7.2}   [{}]",
            r.label,
            r.median(),
            r.best(),
            runs.join(", ")
        );
    }
    if let [ul, bare, hand, hand_nft, pod] = results {
        let pct = |a: f64, b: f64| 100.0 * a / b.max(1e-9);
        let _ = writeln!(
            s,
            "  {:<52} {:>7} {:>7} {:>9}",
            "ratios (of medians, of bests, median per round)", "median", "best", "per-round"
        );
        let lines: [(&str, &PathResult, &PathResult); 6] = [
            ("twill pod->pod / hand topology (target >= 95 %)", pod, hand),
            ("twill pod->pod / hand topology + nft table", pod, hand_nft),
            ("hand topology + nft table / hand topology", hand_nft, hand),
            ("hand topology / bare hand VXLAN", hand, bare),
            ("bare hand VXLAN / underlay", bare, ul),
            ("twill pod->pod / underlay", pod, ul),
        ];
        for (label, a, b) in lines {
            let _ = writeln!(
                s,
                "  {:<52} {:>6.1}% {:>6.1}% {:>8.1}%",
                label,
                pct(a.median(), b.median()),
                pct(a.best(), b.best()),
                100.0 * paired_ratio(a, b)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(runs: &[f64]) -> PathResult {
        PathResult {
            label: "p".into(),
            runs: runs.to_vec(),
        }
    }

    #[test]
    fn medians_and_paired_ratios() {
        assert_eq!(path(&[3.0, 1.0, 2.0]).median(), 2.0);
        assert_eq!(path(&[4.0, 1.0, 2.0, 3.0]).median(), 2.5);
        assert_eq!(path(&[]).median(), 0.0);
        // Round 2 was slowed for both paths alike: the paired ratio ignores it.
        let a = path(&[9.0, 4.5, 9.0]);
        let b = path(&[10.0, 5.0, 10.0]);
        assert!((paired_ratio(&a, &b) - 0.9).abs() < 1e-12);
    }

    #[test]
    fn report_has_every_path_and_ratio() {
        let r: Vec<PathResult> = [10.0, 8.0, 7.0, 6.5, 6.8]
            .iter()
            .map(|g| PathResult {
                label: format!("path {g}"),
                runs: vec![*g, *g],
            })
            .collect();
        let o = BenchOptions {
            seconds: 1,
            runs: 2,
            streams: 1,
        };
        let text = report(&r, &o);
        assert!(text.contains("path 6.8"));
        let target = text
            .lines()
            .find(|l| l.contains("target >= 95 %"))
            .expect("target line");
        assert!(target.contains("97.1%"), "{target}");
    }
}
