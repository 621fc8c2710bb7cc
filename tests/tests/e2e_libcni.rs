//! The conflist that twilld writes, driven through the reference libcni (`cniharness`: the code
//! path of containerd and CRI-O) — the whole chain twill → twill-bridge → twill-host-local →
//! portmap on a node whose subnet comes from a real etcd.

use std::time::Duration;

use serde_json::Value;
use twill_tests::cni::{eventually, harness_run, host_veths, reservations};
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

/// One node running twilld, with Debian's portmap in its bin dir so it gets chained.
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

fn nat_rules(node: &Node) -> String {
    String::from_utf8_lossy(&node.ns.output(&["iptables-save", "-t", "nat"]).stdout).into_owned()
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
    assert_eq!(types, ["twill", "portmap"], "conflist: {conf}");
    let subnet = c.dirs.subnet().expect("subnet.env");

    let pod = Netns::new("lc");
    let cache = tempfile::tempdir().expect("cache dir");
    let cache_arg = cache.path().display().to_string();
    let bin = c.dirs.cni_bin_dir().display().to_string();
    let ports = r#"[{"hostPort":18080,"containerPort":80,"protocol":"tcp"}]"#;
    let args = ["-cache", cache_arg.as_str(), "-ports", ports];
    let conf_dir = c.dirs.cni_conf_dir();

    let add = harness_run(&c.node.ns, "add", &conf_dir, &bin, &pod, "libcni-1", &args).ok();
    // libcni picks the highest version of cniVersion ∪ cniVersions that every plugin speaks.
    let version = add["cniVersion"].as_str().unwrap_or_default().to_string();
    let advertised: Vec<&str> = conf["cniVersions"]
        .as_array()
        .expect("cniVersions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(Some(&version.as_str()), advertised.last(), "result: {add}");
    let addr = add["ips"][0]["address"].as_str().expect("pod address");
    let ip: std::net::Ipv4Addr = addr.split('/').next().unwrap_or("").parse().expect("ip");
    assert!(
        subnet.contains(ip),
        "{ip} outside the node's subnet {subnet}"
    );
    let sandbox = &add["interfaces"][add["ips"][0]["interface"].as_u64().unwrap_or(99) as usize];
    assert_eq!(sandbox["name"], "eth0", "result: {add}");
    assert_eq!(sandbox["sandbox"], format!("/var/run/netns/{}", pod.name()));

    // The node reaches the pod over cni0, and portmap's DNAT for the host port is in place.
    c.node
        .ns
        .exec(&["ping", "-c", "1", "-W", "2", &ip.to_string()]);
    assert!(
        nat_rules(&c.node).contains("18080"),
        "no DNAT for the host port"
    );
    let saved = c.dirs.cni_data_dir().join("twill").join("libcni-1");
    assert!(saved.is_file(), "the meta plugin saved no delegate config");

    // A healthy pod passes CHECK through the whole chain (without portmap, whose Debian build
    // fails CHECK on hosts without IPv6 NAT, whatever the plugin before it).
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
        eventually(10, || host_veths(&c.node.ns).is_empty()),
        "veths left: {:?}",
        host_veths(&c.node.ns)
    );
    assert!(
        !nat_rules(&c.node).contains("18080"),
        "portmap rule left behind"
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
        eventually(10, || host_veths(&c.node.ns).is_empty()),
        "veths left"
    );
}
