//! twilld's backend variants and node-side duties: host-gw, vxlan DirectRouting, MTU,
//! `--ip-masq` rules, waiting for the network config, and withholding the CNI config while a
//! plugin is missing.
#![cfg(feature = "root")]

use std::time::Duration;

use twill_tests::etcd::Etcd;
use twill_tests::underlay::{
    add_pod_bridge, ping_from, vtep_state, wait_for, Member, NodeDirs, Underlay, FLANNEL_PREFIX,
};

const WAIT: Duration = Duration::from_secs(30);

/// twilld with a 1 s reconcile pass, so healing shows quickly.
fn start(ul: &Underlay, etcd: &Etcd, extra: &[&str]) -> Member {
    start_with(ul, etcd, NodeDirs::new(), extra)
}

fn start_with(ul: &Underlay, etcd: &Etcd, dirs: NodeDirs, extra: &[&str]) -> Member {
    Member::start_with(
        ul,
        etcd,
        dirs,
        &[&["--reconcile-interval=1"], extra].concat(),
    )
}

fn routes(m: &Member) -> String {
    m.node.ns.exec(&["ip", "-4", "route", "show"])
}

fn route_via(m: &Member, peer: &Member) -> bool {
    let want = format!("{} via {} dev eth0 proto 116", peer.subnet(), peer.node.ip);
    routes(m).lines().any(|l| l.starts_with(&want))
}

/// Two nodes ([`start`]ed without extra flags), both ready and each with its route to the other
/// via the peer's underlay address.
fn routed_pair(ul: &Underlay, etcd: &Etcd) -> (Member, Member) {
    let a = start(ul, etcd, &[]);
    let b = start(ul, etcd, &[]);
    a.wait_ready();
    b.wait_ready();
    assert!(
        wait_for(|| route_via(&a, &b) && route_via(&b, &a), WAIT),
        "{}\n{}",
        routes(&a),
        routes(&b)
    );
    (a, b)
}

#[test]
fn host_gw_routes_via_peer_ip_and_restores_deleted_routes() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(
        r#"{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}"#,
    ));
    let (a, b) = routed_pair(&ul, &etcd);
    assert!(!a.node.ns.has_link("twill.1"), "host-gw has no VTEP");
    assert!(a.env().contains("FLANNEL_MTU=1500\n"), "{}", a.env());
    let lease = etcd
        .get(&format!(
            "{FLANNEL_PREFIX}/subnets/{}-24",
            a.subnet().network()
        ))
        .unwrap();
    assert_eq!(
        lease,
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
            a.node.ip
        )
    );
    let ga = add_pod_bridge(&a.node.ns, a.subnet()).to_string();
    let gb = add_pod_bridge(&b.node.ns, b.subnet()).to_string();
    assert!(ping_from(&a.node.ns, &ga, &gb));
    // A deleted route comes back with the next reconcile pass.
    a.node
        .ns
        .exec(&["ip", "route", "del", &b.subnet().to_string()]);
    assert!(wait_for(|| route_via(&a, &b), WAIT), "{}", routes(&a));
    assert!(ping_from(&a.node.ns, &ga, &gb));
}

#[test]
fn removing_a_peer_never_deletes_a_route_twill_does_not_own() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(
        r#"{"Network":"10.16.0.0/16","Backend":{"Type":"host-gw"}}"#,
    ));
    // No reconcile pass during the test: only the lease event acts on the routes.
    let a = Member::start(&ul, &etcd, &["--reconcile-interval=3600"]);
    let mut b = start(&ul, &etcd, &[]);
    a.wait_ready();
    b.wait_ready();
    assert!(wait_for(|| route_via(&a, &b), WAIT), "{}", routes(&a));
    let bsub = b.subnet().to_string();
    // An operator's backup route to the same subnet, then twill's own route goes missing.
    let bip = b.node.ip.to_string();
    let ns = &a.node.ns;
    ns.exec(&[
        "ip", "route", "add", &bsub, "via", &bip, "dev", "eth0", "metric", "100",
    ]);
    ns.exec(&["ip", "route", "del", &bsub, "proto", "116"]);
    let has_backup = || {
        routes(&a).lines().any(|l| {
            l.starts_with(&format!("{bsub} via {bip} dev eth0")) && l.contains("metric 100")
        })
    };
    assert!(has_backup(), "{}", routes(&a));
    b.daemon.kill();
    etcd.etcdctl(&["del", &b.lease_key()]);
    assert!(
        wait_for(|| a.daemon.log().contains("peer lease removed"), WAIT),
        "{}",
        a.daemon.log()
    );
    // The removal is handled right after the log line; give it a moment to reach the kernel.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        has_backup(),
        "twilld deleted a route it does not own:\n{}",
        routes(&a)
    );
}

#[test]
fn direct_routing_uses_plain_routes_on_shared_l2() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(
        r#"{"network":"10.7.0.0/16","backend":{"type":"vxlan","directrouting":true}}"#,
    ));
    let (a, b) = routed_pair(&ul, &etcd);
    let (neigh, fdb, dev_routes) = vtep_state(&a.node.ns, "twill.1");
    assert!(
        neigh.trim().is_empty() && fdb.trim().is_empty() && dev_routes.trim().is_empty(),
        "no VXLAN entries for a same-L2 peer: {neigh:?} {fdb:?} {dev_routes:?}"
    );
    let ga = add_pod_bridge(&a.node.ns, a.subnet()).to_string();
    let gb = add_pod_bridge(&b.node.ns, b.subnet()).to_string();
    assert!(ping_from(&a.node.ns, &ga, &gb));
}

#[test]
fn mtu_follows_underlay_or_config() {
    let ul = Underlay::with_mtu(9000);
    let etcd = ul.start_etcd(Some(r#"{"Network":"10.8.0.0/16"}"#));
    let a = start(&ul, &etcd, &[]);
    a.wait_ready();
    assert!(a.env().contains("FLANNEL_MTU=8950\n"), "{}", a.env());
    let link = a.node.ns.exec(&["ip", "link", "show", "twill.1"]);
    assert!(link.contains("mtu 8950"), "{link}");

    let ul2 = Underlay::new();
    let etcd2 = ul2.start_etcd(Some(
        r#"{"Network":"10.8.0.0/16","Backend":{"Type":"vxlan","MTU":1400,"VNI":4,"Port":4789}}"#,
    ));
    let b = start(&ul2, &etcd2, &[]);
    b.wait_ready();
    assert!(b.env().contains("FLANNEL_MTU=1350\n"), "{}", b.env());
    let link = b.node.ns.exec(&["ip", "-d", "link", "show", "twill.4"]);
    assert!(
        link.contains("mtu 1350") && link.contains("vxlan id 4") && link.contains("dstport 4789"),
        "{link}"
    );
}

#[test]
fn ip_masq_rules_masquerade_and_are_restored() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(r#"{"Network":"10.9.0.0/16"}"#));
    let a = start(&ul, &etcd, &["--ip-masq"]);
    a.wait_ready();
    assert!(a.env().contains("FLANNEL_IPMASQ=true\n"), "{}", a.env());
    let sn = a.subnet();
    let table = a.node.ns.exec(&["nft", "list", "table", "ip", "twill"]);
    for want in [
        "type nat hook postrouting priority srcnat".to_string(),
        format!("ip saddr {sn} ip daddr 10.9.0.0/16 return"),
        "ip daddr != 224.0.0.0/4 masquerade fully-random".to_string(),
    ] {
        assert!(table.contains(&want), "{want:?} missing in\n{table}");
    }
    // No forward chain: nothing drops here, and an accept could not beat another table's drop.
    assert!(!table.contains("hook forward"), "{table}");
    assert_eq!(
        a.node
            .ns
            .exec(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .trim(),
        "1"
    );
    // A pod address reaches a host outside the pod network only thanks to the masquerade:
    // the underlay has no route back to 10.9.0.0/16.
    let pod = add_pod_bridge(&a.node.ns, sn).to_string();
    assert!(
        ping_from(&a.node.ns, &pod, &ul.etcd_ip().to_string()),
        "masqueraded ping failed"
    );
    // Removed rules are put back.
    a.node.ns.exec(&["nft", "delete", "table", "ip", "twill"]);
    assert!(
        !ping_from(&a.node.ns, &pod, &ul.etcd_ip().to_string()),
        "no masquerade, no reply"
    );
    assert!(
        wait_for(
            || a.node
                .ns
                .output(&["nft", "list", "table", "ip", "twill"])
                .status
                .success(),
            WAIT
        ),
        "{}",
        a.daemon.log()
    );
    assert!(wait_for(
        || ping_from(&a.node.ns, &pod, &ul.etcd_ip().to_string()),
        WAIT
    ));
}

#[test]
fn waits_for_config_and_withholds_cni_config_until_plugins_exist() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(None);
    let dirs = NodeDirs::new();
    std::fs::remove_file(dirs.cni_bin_dir().join("twill-bridge")).unwrap();
    // twill-portmap (linked by NodeDirs) is chained; the node's reference portmap is not.
    std::os::unix::fs::symlink("/usr/lib/cni/portmap", dirs.cni_bin_dir().join("portmap")).unwrap();
    let a = start_with(&ul, &etcd, dirs, &[]);
    assert!(
        wait_for(|| a.daemon.log().contains("network config not found"), WAIT),
        "{}",
        a.daemon.log()
    );
    etcd.etcdctl(&[
        "put",
        &format!("{FLANNEL_PREFIX}/config"),
        r#"{"Network":"10.10.0.0/29"}"#,
    ]);
    assert!(
        wait_for(|| a.daemon.log().contains("too small"), WAIT),
        "{}",
        a.daemon.log()
    );
    assert!(!a.dirs.subnet_file().exists());
    etcd.etcdctl(&[
        "put",
        &format!("{FLANNEL_PREFIX}/config"),
        r#"{"Network":"10.10.0.0/16"}"#,
    ]);
    assert!(
        wait_for(|| a.dirs.subnet().is_some(), WAIT),
        "{}",
        a.daemon.log()
    );
    assert!(
        wait_for(
            || a.daemon.log().contains("NOT writing the CNI config"),
            WAIT
        ),
        "{}",
        a.daemon.log()
    );
    assert!(
        !a.dirs.conflist().exists(),
        "no conflist while twill-bridge is missing"
    );
    a.dirs.stand_in("twill-bridge");
    a.wait_ready();
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.dirs.conflist()).unwrap()).unwrap();
    assert_eq!(conf["plugins"][1]["type"], "twill-portmap", "{conf}");
    assert_eq!(conf["plugins"].as_array().map(Vec::len), Some(2), "{conf}");
    assert_eq!(conf["plugins"][1]["capabilities"]["portMappings"], true);
}
