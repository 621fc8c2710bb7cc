//! Smoke test of the etcd and underlay harness the daemon tests build on.
#![cfg(feature = "root")]

use twill_tests::etcd::Etcd;
use twill_tests::underlay::Underlay;

#[test]
fn underlay_nodes_reach_each_other_and_etcd() {
    let ul = Underlay::new();
    let mut etcd = Etcd::start_in(ul.ns_name(), &ul.etcd_ip().to_string());
    let a = ul.add_node();
    let b = ul.add_node();
    a.ns.exec(&["ping", "-c1", "-W2", &b.ip.to_string()]);
    b.ns.exec(&["ping", "-c1", "-W2", &ul.etcd_ip().to_string()]);

    etcd.etcdctl(&["put", "/t/a", "1"]);
    etcd.etcdctl(&["put", "/t/b", "2"]);
    assert_eq!(etcd.get("/t/a").as_deref(), Some("1"));
    assert_eq!(
        etcd.get_prefix("/t/"),
        vec![("/t/a".into(), "1".into()), ("/t/b".into(), "2".into())]
    );
    let rev = etcd.compact();
    assert!(rev >= 3);

    let pid = etcd.pid().unwrap();
    etcd.stop();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!etcd
        .etcdctl_output(&["get", "/t/a", "--command-timeout=1s"])
        .status
        .success());
    etcd.start();
    assert_eq!(
        etcd.get("/t/b").as_deref(),
        Some("2"),
        "data dir survives a restart"
    );
}

#[test]
fn loopback_etcd() {
    let etcd = Etcd::start_loopback();
    etcd.etcdctl(&["put", "k", "v"]);
    assert_eq!(etcd.get("k").as_deref(), Some("v"));
    assert_eq!(etcd.key_lease("k"), 0);
}
