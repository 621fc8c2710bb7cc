//! The conflist that twilld writes, driven through the reference libcni (`cniharness`: the code
//! path of containerd and CRI-O) — the whole chain twill → twill-bridge → twill-host-local →
//! twill-portmap on a node whose subnet comes from a real etcd.
#![cfg(feature = "root")]

use std::time::Duration;

use serde_json::Value;
use twill_tests::cni::{harness_run, host_veths, reservations};
use twill_tests::etcd::Etcd;
use twill_tests::netns::Netns;
use twill_tests::underlay::{wait_for, Node, NodeDirs, Twilld, Underlay};

const CONFIG: &str = r#"{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}"#;

struct Cluster {
    _etcd: Etcd,
    node: Node,
    dirs: NodeDirs,
    daemon: Twilld,
    _ul: Underlay,
}

/// One node running twilld. Its bin dir holds twill's plugins and, as on a kubeadm node,
/// Debian's reference portmap, which twilld must not chain (twill-portmap is).
fn cluster() -> Cluster {
    let ul = Underlay::new();
    let etcd = Etcd::start_in(ul.ns_name(), &ul.etcd_ip().to_string());
    etcd.etcdctl(&["put", "/coreos.com/network/config", CONFIG]);
    let node = ul.add_node();
    let dirs = NodeDirs::new();
    std::os::unix::fs::symlink(
        twill_tests::cni::reference("portmap"),
        dirs.cni_bin_dir().join("portmap"),
    )
    .expect("symlink portmap");
    let daemon = Twilld::start(node.name(), &dirs, &etcd.endpoint(), &["--iface=eth0"]);
    assert!(
        wait_for(|| dirs.conflist().exists(), Duration::from_secs(30)),
        "twilld wrote no conflist; log:\n{}",
        daemon.log()
    );
    Cluster {
        _etcd: etcd,
        node,
        dirs,
        daemon,
        _ul: ul,
    }
}

/// twill-portmap's nft table and the iptables nat table (the reference portmap's place).
fn nat_rules(node: &Node) -> (String, String) {
    let out = |argv: &[&str]| String::from_utf8_lossy(&node.ns.output(argv).stdout).into_owned();
    (
        out(&["nft", "list", "table", "inet", "twill-portmap"]),
        out(&["iptables-save", "-t", "nat"]),
    )
}

#[test]
fn pod_lifecycle_through_libcni() {
    let c = cluster();
    let conf: Value =
        serde_json::from_slice(&std::fs::read(c.dirs.conflist()).expect("conflist")).expect("json");
    let types: Vec<&str> = conf["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    assert_eq!(types, ["twill", "twill-portmap"], "conflist: {conf}");
    let subnet = c.dirs.subnet().expect("subnet.env");

    let pod = Netns::new("lc");
    let cache = tempfile::tempdir().expect("cache dir");
    let cache_arg = cache.path().display().to_string();
    let bin = c.dirs.cni_bin_dir().display().to_string();
    let ports = r#"[{"hostPort":18080,"containerPort":80,"protocol":"tcp"}]"#;
    let args = ["-cache", cache_arg.as_str(), "-ports", ports];
    let conf_dir = c.dirs.cni_conf_dir();

    let add = harness_run(&c.node.ns, "add", &conf_dir, &bin, &pod, "libcni-1", &args).ok();
    let version = add["cniVersion"].as_str().unwrap_or_default().to_string();
    let advertised: Vec<&str> = conf["cniVersions"]
        .as_array()
        .expect("cniVersions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // The whole chain is twill's, so the advertised versions reach 1.1.0 (STATUS, GC).
    // libcni picks the highest advertised version it speaks: Debian's libcni (1.1.x, the one
    // cniharness is built from) predates spec 1.1.0 and stops at 1.0.0; a runtime with libcni
    // ≥ 1.2 gets 1.1.0 now that no plugin of the chain holds it back.
    assert_eq!(advertised.last(), Some(&"1.1.0"), "conflist: {conf}");
    assert!(
        ["1.0.0", "1.1.0"].contains(&version.as_str()),
        "result: {add}"
    );
    let addr = add["ips"][0]["address"].as_str().expect("pod address");
    let ip: std::net::Ipv4Addr = addr.split('/').next().unwrap_or("").parse().expect("ip");
    assert!(
        subnet.contains(ip),
        "{ip} outside the node's subnet {subnet}"
    );
    let sandbox = &add["interfaces"][add["ips"][0]["interface"].as_u64().unwrap_or(99) as usize];
    assert_eq!(sandbox["name"], "eth0", "result: {add}");
    assert_eq!(sandbox["sandbox"], format!("/var/run/netns/{}", pod.name()));

    // The node reaches the pod over cni0, and twill-portmap's DNAT for the host port is in
    // place, in nftables only.
    c.node
        .ns
        .exec(&["ping", "-c", "1", "-W", "2", &ip.to_string()]);
    let (nft, ipt) = nat_rules(&c.node);
    assert!(
        nft.contains(&format!("dport 18080 dnat ip to {ip}:80")),
        "no DNAT for the host port: {nft}"
    );
    assert!(
        !ipt.contains("18080"),
        "iptables rules for the host port: {ipt}"
    );
    let saved = c.dirs.cni_data_dir().join("twill").join("libcni-1");
    assert!(saved.is_file(), "the meta plugin saved no delegate config");

    // A healthy IPv4-only pod with a host port passes CHECK through the whole chain (Debian's
    // portmap failed it: it looked for its v4 chain in ip6tables too).
    let check = harness_run(
        &c.node.ns, "check", &conf_dir, &bin, &pod, "libcni-1", &args,
    );
    assert_eq!(check.status, 0, "CHECK failed: {}", check.stderr);
    let pod2 = Netns::new("lc");
    let plain = ["-cache", cache_arg.as_str()];
    harness_run(
        &c.node.ns, "add", &conf_dir, &bin, &pod2, "libcni-2", &plain,
    )
    .ok();
    let check = harness_run(
        &c.node.ns, "check", &conf_dir, &bin, &pod2, "libcni-2", &plain,
    );
    assert_eq!(check.status, 0, "CHECK failed: {}", check.stderr);

    for (p, id, a) in [
        (&pod, "libcni-1", &args[..]),
        (&pod2, "libcni-2", &plain[..]),
    ] {
        for round in 0..2 {
            let del = harness_run(&c.node.ns, "del", &conf_dir, &bin, p, id, a);
            assert_eq!(del.status, 0, "DEL #{round} of {id} failed: {}", del.stderr);
        }
    }
    assert!(!saved.exists(), "delegate config left behind");
    let networks = c.dirs.cni_data_dir().join("networks");
    assert_eq!(reservations(&networks, "twill"), Vec::<String>::new());
    assert!(
        wait_for(
            || host_veths(&c.node.ns).is_empty(),
            Duration::from_secs(10)
        ),
        "veths left: {:?}",
        host_veths(&c.node.ns)
    );
    let (nft, _) = nat_rules(&c.node);
    assert!(
        !nft.contains("18080"),
        "twill-portmap rule left behind: {nft}"
    );
    drop(c.daemon);
}

#[test]
fn parallel_pods_through_libcni_get_unique_addresses() {
    let c = cluster();
    let cache = tempfile::tempdir().expect("cache dir");
    let out = c.node.ns.output(&[
        "cniharness",
        "bench",
        "-confdir",
        &c.dirs.cni_conf_dir().display().to_string(),
        "-bin",
        &c.dirs.cni_bin_dir().display().to_string(),
        "-cache",
        &cache.path().display().to_string(),
        "-n",
        "24",
        "-parallel",
        "6",
        "-check",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        v["failures"],
        0,
        "{v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["unique_ips"], 24, "{v}");
    let networks = c.dirs.cni_data_dir().join("networks");
    assert_eq!(reservations(&networks, "twill"), Vec::<String>::new());
    assert!(
        wait_for(
            || host_veths(&c.node.ns).is_empty(),
            Duration::from_secs(10)
        ),
        "veths left"
    );
}
