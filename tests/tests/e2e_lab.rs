//! End-to-end: twill-lab clusters (etcd + twilld per node namespace + pods through the CNI
//! chain twilld's conflist names). Needs root and `cargo build --workspace --bins`.
//! Each test builds its own lab under a temp state root, removed (with all its namespaces
//! and processes) when the test ends, pass or fail.
#![cfg(feature = "root")]

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use twill_lab::{self as lab, probe, Lab, LabOptions, NodeState};

/// Owns a lab for one test; `down` on drop, printing the twilld logs if the test failed.
struct Guard {
    lab: Option<Lab>,
    _root: tempfile::TempDir,
}

impl Guard {
    fn up(tag: &str, nodes: usize, pods: usize) -> Guard {
        let root = tempfile::Builder::new()
            .prefix("twill-e2e-lab")
            .tempdir()
            .unwrap();
        let mut o = LabOptions::new(&format!("e2e{}{tag}", std::process::id() % 100_000));
        o.root = root.path().to_path_buf();
        o.bin_src = twill_tests::bins::target_dir();
        let mut out = Vec::new();
        let res = lab::up(o.clone(), nodes, pods, &mut out);
        eprintln!("{}", String::from_utf8_lossy(&out));
        match res {
            Ok(lab) => Guard {
                lab: Some(lab),
                _root: root,
            },
            Err(e) => {
                if let Ok(Some(partial)) = Lab::open(&o.root, &o.name) {
                    dump_logs(&partial);
                    let _ = partial.down();
                }
                panic!("lab up failed: {e}");
            }
        }
    }

    fn lab(&mut self) -> &mut Lab {
        self.lab.as_mut().expect("lab")
    }
}

fn dump_logs(lab: &Lab) {
    for n in lab.nodes() {
        let log = std::fs::read_to_string(lab.daemon_log(&n.name)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("--- twilld log of {} (last lines) ---", n.name);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take() {
            if std::thread::panicking() {
                dump_logs(&lab);
            }
            let nss: Vec<String> = lab
                .nodes()
                .iter()
                .map(|n| n.ns.clone())
                .chain(lab.pods().iter().map(|p| p.ns.clone()))
                .collect();
            let res = lab.down();
            if !std::thread::panicking() {
                res.expect("lab down");
                for ns in nss {
                    assert!(
                        !Path::new("/run/netns").join(&ns).exists(),
                        "{ns} left behind"
                    );
                }
            }
        }
    }
}

fn assert_all_reachable(lab: &Lab) {
    let m = lab.matrix().expect("probe");
    let table = lab.matrix_table(&m);
    let bad = m.iter().flatten().flatten().filter(|r| !r.ok()).count();
    assert_eq!(bad, 0, "unreachable pod pairs:\n{table}");
    let n = lab.pods().len();
    assert_eq!(m.iter().flatten().flatten().count(), n * (n - 1));
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn in_ns(ns: &str, argv: &[&str]) -> String {
    twill_tests::sh::run_in(ns, argv)
}

/// Does `node_ns` still carry overlay state for a peer (route to its subnet, neighbour for its
/// VTEP address, FDB entry towards its underlay IP)?
fn has_peer_state(
    node_ns: &str,
    subnet: &ipnetwork::Ipv4Network,
    peer_ip: Ipv4Addr,
) -> Vec<&'static str> {
    let mut found = Vec::new();
    if !in_ns(node_ns, &["ip", "route", "show", &subnet.to_string()])
        .trim()
        .is_empty()
    {
        found.push("route");
    }
    let vtep = subnet.network().to_string();
    if in_ns(node_ns, &["ip", "neigh", "show", "to", &vtep])
        .lines()
        .any(|l| l.starts_with(&format!("{vtep} ")))
    {
        found.push("neigh");
    }
    if in_ns(node_ns, &["bridge", "fdb", "show"]).contains(&format!("dst {peer_ip} ")) {
        found.push("fdb");
    }
    found
}

#[test]
fn cluster_lifecycle_pods_join_restart_leave() {
    let mut g = Guard::up("a", 3, 3);
    let lab = g.lab();

    // 3 nodes Ready with distinct subnets; 9 pods with unique IPs inside their node's subnet.
    let mut subnets = Vec::new();
    for n in lab.nodes() {
        assert_eq!(lab.node_state(&n.name), NodeState::Ready);
        subnets.push(lab.subnet(&n.name).expect("subnet.env"));
    }
    subnets.sort_by_key(|s| s.network());
    subnets.dedup();
    assert_eq!(subnets.len(), 3, "subnets must differ: {subnets:?}");
    let mut ips: Vec<Ipv4Addr> = Vec::new();
    for p in lab.pods() {
        let ip = p.ip.expect("pod IP");
        assert!(
            lab.subnet(&p.node).unwrap().contains(ip),
            "{ip} outside {}'s subnet",
            p.node
        );
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 9);
    assert_all_reachable(lab);

    // A pod removed with DEL leaves no veth, reservation, delegate file, cache or rule behind.
    let gone = lab.pod("node1", "pod3").unwrap();
    let gone_ip = gone.ip.unwrap().to_string();
    let node1_ns = lab.node("node1").unwrap().ns.clone();
    // Pod veths on the node: every veth but the underlay's eth0.
    let veths = |ns: &str| {
        in_ns(ns, &["ip", "-o", "link", "show", "type", "veth"])
            .lines()
            .filter(|l| !l.contains(" eth0@"))
            .count()
    };
    assert_eq!(veths(&node1_ns), 3);
    let delegate_file = lab.data_dir("node1").join("twill").join(&gone.container_id);
    let reservation = lab
        .data_dir("node1")
        .join("networks")
        .join("twill")
        .join(&gone_ip);
    assert!(delegate_file.exists() && reservation.exists());
    lab.del_pod("node1", "pod3").expect("DEL");
    assert_eq!(veths(&node1_ns), 2, "host veth of the deleted pod removed");
    assert!(!delegate_file.exists(), "delegate file removed");
    assert!(!reservation.exists(), "IP reservation released");
    let rules = format!(
        "{}{}",
        in_ns(&node1_ns, &["iptables-save"]),
        in_ns(&node1_ns, &["nft", "list", "ruleset"])
    );
    assert!(
        !rules.contains(&gone.container_id)
            && !rules.contains(&format!("{gone_ip}/32"))
            && !rules.contains(&format!("{gone_ip} ")),
        "rules mention the deleted pod:\n{rules}"
    );
    assert!(!Path::new("/run/netns").join(&gone.ns).exists());

    // A fourth node joins: Ready, reachable, and the others are not touched.
    let before: Vec<(String, Option<i32>, Option<ipnetwork::Ipv4Network>)> = lab
        .nodes()
        .iter()
        .map(|n| (n.name.clone(), lab.daemon_pid(&n.name), lab.subnet(&n.name)))
        .collect();
    let n4 = lab.add_node().expect("add node4");
    lab.wait_ready(&n4, 60).expect("node4 Ready");
    lab.add_pod(&n4).expect("pod on node4");
    for (name, pid, subnet) in &before {
        assert_eq!(&lab.daemon_pid(name), pid, "{name}'s twilld was restarted");
        assert_eq!(&lab.subnet(name), subnet);
    }
    assert_all_reachable(lab);

    // Restarting every daemon keeps every subnet and existing pod traffic.
    let subnets: Vec<_> = lab.nodes().iter().map(|n| lab.subnet(&n.name)).collect();
    let pids: Vec<_> = lab
        .nodes()
        .iter()
        .map(|n| lab.daemon_pid(&n.name))
        .collect();
    lab.restart_daemons(60).expect("restart all twilld");
    for (n, old) in lab.nodes().iter().zip(&pids) {
        assert_ne!(&lab.daemon_pid(&n.name), old, "{} not restarted", n.name);
    }
    let after: Vec<_> = lab.nodes().iter().map(|n| lab.subnet(&n.name)).collect();
    assert_eq!(subnets, after, "subnets changed across a restart");
    assert_all_reachable(lab);

    // node2 leaves (daemon stopped, lease deleted): it vanishes from the others' tables.
    let leaving = lab.node("node2").unwrap().clone();
    let leaving_subnet = lab.subnet("node2").unwrap();
    for n in lab.nodes().iter().filter(|n| n.name != "node2") {
        assert_eq!(
            has_peer_state(&n.ns, &leaving_subnet, leaving.ip),
            ["route", "neigh", "fdb"],
            "{} should know node2 before it leaves",
            n.name
        );
    }
    lab.remove_node("node2").expect("node2 leaves");
    let leases = lab.lease_keys().unwrap();
    assert_eq!(leases.len(), 3, "{leases:?}");
    let others: Vec<String> = lab.nodes().iter().map(|n| n.ns.clone()).collect();
    for ns in &others {
        wait_until(&format!("{ns} to forget node2"), 30, || {
            has_peer_state(ns, &leaving_subnet, leaving.ip).is_empty()
        });
    }
    assert_all_reachable(lab);
}

#[test]
fn etcd_outage_keeps_pod_traffic() {
    let mut g = Guard::up("b", 2, 1);
    let lab = g.lab();
    assert_all_reachable(lab);
    let (a, b) = (lab.pods()[0].clone(), lab.pods()[1].clone());
    assert_ne!(a.node, b.node);
    let server = probe::EchoServer::start(&b.ns).expect("echo server");
    let pids: Vec<Option<i32>> = lab
        .nodes()
        .iter()
        .map(|n| lab.daemon_pid(&n.name))
        .collect();

    lab.stop_etcd().expect("stop etcd");
    let t0 = Instant::now();
    let mut probes = 0;
    // The one required wait: 30 s without etcd, probing all along.
    while t0.elapsed() < Duration::from_secs(30) {
        let ip = b.ip.unwrap();
        assert!(
            probe::ping(&a.ns, ip, 3),
            "ping lost {:?} into the outage",
            t0.elapsed()
        );
        assert!(
            probe::tcp_exchange(&a.ns, ip, Duration::from_secs(2)),
            "TCP lost {:?} into the outage",
            t0.elapsed()
        );
        probes += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(probes >= 10);
    let pids_now: Vec<Option<i32>> = lab
        .nodes()
        .iter()
        .map(|n| lab.daemon_pid(&n.name))
        .collect();
    assert_eq!(pids, pids_now, "a twilld died while etcd was down");
    drop(server);

    lab.start_etcd().expect("etcd back");
    for n in lab.nodes().to_vec() {
        assert_eq!(lab.node_state(&n.name), NodeState::Ready);
    }
    // The cluster keeps working afterwards: a new pod on node1 reaches the others.
    lab.add_pod("node1").expect("pod after the outage");
    assert_all_reachable(lab);
}

fn root_ns_view() -> (String, String) {
    let names = |out: String| {
        let mut v: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
            .collect();
        v.sort();
        v.join(" ")
    };
    (
        names(twill_tests::sh::run(&["ip", "-o", "link", "show"])),
        twill_tests::sh::run(&["ip", "-4", "route", "show"]),
    )
}

#[test]
fn cli_up_status_down_twice_touches_only_its_namespaces() {
    let root = tempfile::Builder::new()
        .prefix("twill-e2e-cli")
        .tempdir()
        .unwrap();
    let name = format!("e2e{}c", std::process::id() % 100_000);
    let lab_bin = twill_tests::bins::bin("twill-lab");
    let target = twill_tests::bins::target_dir();
    let common = [
        "--name",
        &name,
        "--root",
        root.path().to_str().unwrap(),
        "--bin-dir",
        target.to_str().unwrap(),
    ];
    let cli = |verb: &[&str]| {
        let mut argv = vec![lab_bin.to_str().unwrap()];
        argv.extend_from_slice(&common);
        argv.extend_from_slice(verb);
        let out = twill_tests::sh::output(&argv);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.success(),
            text,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let before = root_ns_view();

    let (ok, up, err) = cli(&["up", "--nodes", "2", "--pods", "2"]);
    let lab = Lab::open(root.path(), &name).unwrap();
    if !ok {
        if let Some(l) = lab {
            dump_logs(&l);
            let _ = l.down();
        }
        panic!("twill-lab up failed:\n{up}\n{err}");
    }
    let lab = lab.expect("state written");
    assert!(up.contains("12/12 pairs ok"), "{up}");
    assert!(up.contains("node2: NotReady -> Ready"), "{up}");
    assert_eq!(lab.nodes().len(), 2);
    assert_eq!(lab.pods().len(), 4);
    assert_eq!(root_ns_view(), before, "the lab changed the root namespace");

    let (ok, status, _) = cli(&["status"]);
    assert!(
        ok && status.contains(&lab.pods_table()) && status.contains("12/12 pairs ok"),
        "{status}"
    );

    let daemons: Vec<_> = lab
        .nodes()
        .iter()
        .filter_map(|n| n.daemon.clone())
        .collect();
    assert_eq!(daemons.len(), 2);
    let namespaces: Vec<String> = lab
        .nodes()
        .iter()
        .map(|n| n.ns.clone())
        .chain(lab.pods().iter().map(|p| p.ns.clone()))
        .chain([lab.underlay_ns().to_string()])
        .collect();
    let state_dir = lab.state_dir();

    let (ok, down, _) = cli(&["down"]);
    assert!(ok, "{down}");
    for d in &daemons {
        assert!(!d.alive(), "twilld {} still running after down", d.pid);
    }
    for ns in &namespaces {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "{ns} left behind"
        );
    }
    assert!(!state_dir.exists(), "state dir left behind");
    let (ok, again, _) = cli(&["down"]);
    assert!(ok && again.contains("nothing to remove"), "{again}");
    let (ok, _, err) = cli(&["status"]);
    assert!(!ok && err.contains("no lab"), "{err}");
    assert_eq!(root_ns_view(), before);
}
