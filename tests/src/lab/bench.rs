//! TCP throughput with iperf3: twill pod → pod across nodes, node → node on the underlay,
//! and a VXLAN link programmed by hand with `ip` between two extra underlay namespaces —
//! the same encapsulation twill programs, without twill's bridge, veth and rules.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;

use super::error::{Error, Result};
use super::process::{run_in, wait_for, Proc};
use super::{Lab, NODE_IF};

const IPERF_PORT: &str = "5201";

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
        let mut v = self.runs.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
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

/// Programs a point-to-point VXLAN like twill's (VNI, port 8472, nolearning, static
/// neighbour + FDB entry per peer) between two namespaces. Returns the two overlay IPs.
fn hand_vxlan(a: (&str, Ipv4Addr), b: (&str, Ipv4Addr), mtu: u32) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let ends = [
        (
            a.0,
            a.1,
            "02:74:77:00:00:01",
            Ipv4Addr::new(10, 99, 0, 1),
            b.1,
            "02:74:77:00:00:02",
            Ipv4Addr::new(10, 99, 0, 2),
        ),
        (
            b.0,
            b.1,
            "02:74:77:00:00:02",
            Ipv4Addr::new(10, 99, 0, 2),
            a.1,
            "02:74:77:00:00:01",
            Ipv4Addr::new(10, 99, 0, 1),
        ),
    ];
    for (ns, local, mac, ip, peer_ul, peer_mac, peer_ip) in ends {
        let local = local.to_string();
        let mtu = mtu.to_string();
        run_in(
            ns,
            &[
                "ip",
                "link",
                "add",
                "vx0",
                "address",
                mac,
                "mtu",
                &mtu,
                "type",
                "vxlan",
                "id",
                "77",
                "local",
                &local,
                "dev",
                NODE_IF,
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        run_in(
            ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "vx0"],
        )?;
        run_in(ns, &["ip", "link", "set", "vx0", "up"])?;
        run_in(
            ns,
            &[
                "ip",
                "neigh",
                "replace",
                &peer_ip.to_string(),
                "lladdr",
                peer_mac,
                "dev",
                "vx0",
                "nud",
                "permanent",
            ],
        )?;
        run_in(
            ns,
            &[
                "bridge",
                "fdb",
                "append",
                peer_mac,
                "dev",
                "vx0",
                "dst",
                &peer_ul.to_string(),
                "self",
                "permanent",
            ],
        )?;
    }
    Ok((ends[0].3, ends[1].3))
}

/// Runs the three paths `o.runs` times, interleaved so drift hits all alike.
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
    let mtu = twill_common::subnet_env::SubnetEnv::read(&lab.subnet_file(&nodes[0].name))
        .map(|e| e.mtu)
        .map_err(|e| Error::Lab(e.to_string()))?;
    let ha = lab.add_underlay_ns("vxa", 201)?;
    let hb = lab.add_underlay_ns("vxb", 202)?;
    let result = (|| {
        let (_, vb) = hand_vxlan(
            (&ha, Ipv4Addr::new(192, 168, 100, 201)),
            (&hb, Ipv4Addr::new(192, 168, 100, 202)),
            mtu,
        )?;
        let pb_ip = pb.ip.ok_or_else(|| Error::Lab("pod without IP".into()))?;
        let paths: Vec<(String, String, String, Ipv4Addr)> = vec![
            (
                format!("node->node underlay ({} -> {})", nodes[0].ip, nodes[1].ip),
                nodes[0].ns.clone(),
                nodes[1].ns.clone(),
                nodes[1].ip,
            ),
            (
                format!("hand-programmed VXLAN, MTU {mtu}"),
                ha.clone(),
                hb.clone(),
                vb,
            ),
            (
                format!(
                    "twill pod->pod ({}/{} -> {}/{})",
                    pa.node, pa.name, pb.node, pb.name
                ),
                pa.ns.clone(),
                pb.ns.clone(),
                pb_ip,
            ),
        ];
        let servers: Vec<Server> = paths
            .iter()
            .map(|(_, _, srv, _)| Server::start(lab, srv))
            .collect::<Result<_>>()?;
        let mut results: Vec<PathResult> = paths
            .iter()
            .map(|(l, ..)| PathResult {
                label: l.clone(),
                runs: vec![],
            })
            .collect();
        for round in 1..=o.runs {
            for (i, (label, client, _, ip)) in paths.iter().enumerate() {
                let g = iperf(client, *ip, o)?;
                let _ = writeln!(out, "run {round}/{}: {label}: {g:.2} Gbit/s", o.runs);
                results[i].runs.push(g);
            }
        }
        drop(servers);
        Ok(results)
    })();
    lab.del_extra_ns(&ha)?;
    lab.del_extra_ns(&hb)?;
    result
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
    if let [ul, vx, pod] = results {
        let pct = |a: f64, b: f64| 100.0 * a / b.max(1e-9);
        let _ = writeln!(
            s,
            "  ratios                                                median    best"
        );
        let _ = writeln!(
            s,
            "  twill pod->pod / hand VXLAN (target >= 95 %)          {:5.1} %  {:5.1} %",
            pct(pod.median(), vx.median()),
            pct(pod.best(), vx.best())
        );
        let _ = writeln!(
            s,
            "  twill pod->pod / underlay                             {:5.1} %  {:5.1} %",
            pct(pod.median(), ul.median()),
            pct(pod.best(), ul.best())
        );
        let _ = writeln!(
            s,
            "  hand VXLAN / underlay                                 {:5.1} %  {:5.1} %",
            pct(vx.median(), ul.median()),
            pct(vx.best(), ul.best())
        );
    }
    s
}
