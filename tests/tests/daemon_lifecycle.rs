//! twilld's life cycle against a real etcd: restarts keep the subnet, lost races retry,
//! the VTEP heals, reconcile removes drift, expiry removes peers, etcd outages and
//! compaction are survived without touching the data path.
#![cfg(feature = "root")]

use std::time::Duration;

use twill_tests::etcd::Etcd;
use twill_tests::underlay::{
    add_pod_bridge, has_vxlan_peer, lacks_vxlan_peer, ping_from, wait_for, Member, Node, NodeDirs,
    Twilld, Underlay, FLANNEL_PREFIX,
};

/// Nodes lease from 10.5.1.0–10.5.63.0: the subnets above are the tests' hand-written peers and
/// stray entries, which a node picking them at random would collide with.
const CONFIG: &str =
    r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.63.0","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(30);

fn setup(config: &str) -> (Underlay, Etcd) {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(config));
    (ul, etcd)
}

/// twilld with a 1 s reconcile pass, so healing shows quickly.
fn start(ul: &Underlay, etcd: &Etcd, extra: &[&str]) -> Member {
    Member::start(ul, etcd, &[&["--reconcile-interval=1"], extra].concat())
}

/// Two nodes ([`start`]ed with `extra_a` and `extra_b`), meshed.
fn meshed_pair(ul: &Underlay, etcd: &Etcd, extra_a: &[&str], extra_b: &[&str]) -> (Member, Member) {
    let a = [&["--reconcile-interval=1"], extra_a].concat();
    let b = [&["--reconcile-interval=1"], extra_b].concat();
    Member::meshed_pair(ul, etcd, &a, &b)
}

#[test]
fn restart_keeps_subnet_mac_and_data_path() {
    let (ul, etcd) = setup(CONFIG);
    let (mut a, b) = meshed_pair(&ul, &etcd, &[], &[]);
    let (subnet, mac, key) = (a.subnet(), a.mac(), a.lease_key());
    let ga = add_pod_bridge(&a.node.ns, subnet).to_string();
    let gb = add_pod_bridge(&b.node.ns, b.subnet()).to_string();
    assert!(ping_from(&a.node.ns, &ga, &gb));

    // SIGTERM: clean exit, nothing torn down.
    let status = a.daemon.terminate().expect("twilld exited");
    assert!(status.success(), "exit status {status}");
    assert!(a.dirs.conflist().exists(), "conflist must stay");
    assert!(etcd.get(&key).is_some(), "lease must stay");
    assert!(a.node.ns.has_link("twill.1"));
    assert!(b.sees(&a));
    assert!(
        ping_from(&a.node.ns, &ga, &gb),
        "data path must survive the daemon's exit"
    );

    // Restart: same subnet (by PublicIP), same VtepMAC.
    a.restart(&etcd, &["--reconcile-interval=1"]);
    assert!(
        wait_for(
            || a.daemon.log().matches("reusing this node's lease").count() >= 1,
            WAIT
        ),
        "{}",
        a.daemon.log()
    );
    assert_eq!(a.subnet(), subnet);
    assert_eq!(a.mac(), mac);
    assert!(wait_for(|| a.sees(&b) && b.sees(&a), WAIT));

    // Restart after the lease key was deleted: the subnet comes back from subnet.env.
    // An entry left behind while the daemon was down is removed at start.
    a.daemon.terminate();
    etcd.etcdctl(&["del", &key]);
    a.node.ns.exec(&[
        "ip",
        "route",
        "add",
        "10.5.251.0/24",
        "via",
        "10.5.251.0",
        "dev",
        "twill.1",
        "onlink",
    ]);
    assert!(wait_for(
        || lacks_vxlan_peer(&b.node.ns, "twill.1", &subnet.to_string(), &mac),
        WAIT
    ));
    a.restart(&etcd, &["--reconcile-interval=1"]);
    assert!(
        wait_for(|| etcd.get(&key).is_some(), WAIT),
        "{}",
        a.daemon.log()
    );
    assert_eq!(a.subnet(), subnet);
    assert!(wait_for(|| b.sees(&a), WAIT), "{:?}", b.vtep_state());
    assert!(wait_for(|| ping_from(&a.node.ns, &ga, &gb), WAIT));
    assert!(
        wait_for(|| !a.vtep_state().2.contains("10.5.251.0/24"), WAIT),
        "{:?}",
        a.vtep_state()
    );
}

#[test]
fn racing_nodes_get_distinct_subnets_or_fail_cleanly() {
    // Four nodes whose previous subnet.env all name 10.5.1.0/24, started together: they race
    // for it, losers retry with another subnet.
    let (ul, etcd) =
        setup(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.4.0"}"#);
    let nodes: Vec<(Node, NodeDirs)> = (0..4)
        .map(|_| {
            let dirs = NodeDirs::new();
            let env = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
            std::fs::create_dir_all(dirs.subnet_file().parent().unwrap()).unwrap();
            std::fs::write(dirs.subnet_file(), env).unwrap();
            (ul.add_node(), dirs)
        })
        .collect();
    let daemons: Vec<Twilld> = nodes
        .iter()
        .map(|(n, d)| Twilld::start(n.name(), d, &etcd.endpoint(), &["--iface=eth0"]))
        .collect();
    let members: Vec<Member> = nodes
        .into_iter()
        .zip(daemons)
        .map(|((node, dirs), daemon)| Member { node, dirs, daemon })
        .collect();
    for m in &members {
        m.wait_ready();
    }
    let mut subnets: Vec<String> = members.iter().map(|m| m.subnet().to_string()).collect();
    subnets.sort();
    assert_eq!(
        subnets,
        ["10.5.1.0/24", "10.5.2.0/24", "10.5.3.0/24", "10.5.4.0/24"]
    );
    assert_eq!(
        etcd.get_prefix(&format!("{FLANNEL_PREFIX}/subnets/")).len(),
        4
    );

    // A fifth node finds the pool exhausted: a clear error and a non-zero exit.
    let n5 = ul.add_node();
    let d5 = NodeDirs::new();
    let mut t5 = Twilld::start(n5.name(), &d5, &etcd.endpoint(), &["--iface=eth0"]);
    let status = t5.wait_exit(WAIT).expect("the fifth daemon must exit");
    assert!(!status.success());
    assert!(t5.log().contains("out of subnets"), "{}", t5.log());
    assert!(!d5.conflist().exists(), "no CNI config without a subnet");
}

#[test]
fn vtep_deletion_heals_and_reconcile_removes_drift() {
    let (ul, etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(
        &ul,
        &etcd,
        &["--healthz-ip=127.0.0.1", "--healthz-port=18082"],
        &[],
    );
    let ga = add_pod_bridge(&a.node.ns, a.subnet()).to_string();
    let gb = add_pod_bridge(&b.node.ns, b.subnet()).to_string();
    let mac = a.mac();

    // `ip link del twill.1`: recreated with the same MAC and every peer re-programmed.
    a.node.ns.exec(&["ip", "link", "del", "twill.1"]);
    assert!(
        wait_for(|| a.node.ns.has_link("twill.1") && a.sees(&b), WAIT),
        "{:?}\n{}",
        a.vtep_state(),
        a.daemon.log()
    );
    assert_eq!(a.mac(), mac);
    let addr = a
        .node
        .ns
        .exec(&["ip", "-4", "addr", "show", "dev", "twill.1"]);
    assert!(
        addr.contains(&format!("{}/32", a.subnet().network())),
        "{addr}"
    );
    assert!(
        wait_for(|| ping_from(&a.node.ns, &ga, &gb), WAIT),
        "no traffic after the VTEP was recreated"
    );

    // Stale entries no lease explains are removed; a deleted peer route comes back.
    let ns = &a.node.ns;
    ns.exec(&[
        "ip",
        "neigh",
        "add",
        "10.5.250.0",
        "lladdr",
        "02:00:00:00:00:fa",
        "dev",
        "twill.1",
        "nud",
        "permanent",
    ]);
    ns.exec(&[
        "bridge",
        "fdb",
        "add",
        "02:00:00:00:00:fa",
        "dev",
        "twill.1",
        "dst",
        "192.168.100.250",
        "self",
        "permanent",
    ]);
    ns.exec(&[
        "ip",
        "route",
        "add",
        "10.5.250.0/24",
        "via",
        "10.5.250.0",
        "dev",
        "twill.1",
        "onlink",
    ]);
    ns.exec(&["ip", "route", "del", &b.subnet().to_string()]);
    assert!(
        wait_for(
            || lacks_vxlan_peer(ns, "twill.1", "10.5.250.0/24", "02:00:00:00:00:fa") && a.sees(&b),
            WAIT
        ),
        "{:?}",
        a.vtep_state()
    );
    let metrics = String::from_utf8_lossy(
        &ns.output(&["curl", "-s", "http://127.0.0.1:18082/metrics"])
            .stdout,
    )
    .into_owned();
    let corrections: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("twill_reconcile_corrections_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("corrections metric");
    assert!(corrections >= 4, "{metrics}");
}

#[test]
fn expired_lease_removes_peer_and_renewal_keeps_ours() {
    let (ul, etcd) = setup(CONFIG);
    let (a, mut b) = meshed_pair(&ul, &etcd, &["--lease-ttl=6"], &["--lease-ttl=6"]);
    let (bsub, bmac, bkey) = (b.subnet().to_string(), b.mac(), b.lease_key());
    // b dies without a word (SIGKILL): its lease expires and a drops the peer.
    b.daemon.kill();
    assert!(
        wait_for(|| etcd.get(&bkey).is_none(), WAIT),
        "b's lease never expired"
    );
    assert!(
        wait_for(
            || lacks_vxlan_peer(&a.node.ns, "twill.1", &bsub, &bmac),
            WAIT
        ),
        "{:?}",
        a.vtep_state()
    );
    // a kept renewing its own short lease all along.
    assert!(
        etcd.get(&a.lease_key()).is_some(),
        "a's lease must be renewed: {}",
        a.daemon.log()
    );
}

#[test]
fn etcd_outage_keeps_data_path_and_recovers() {
    let (ul, mut etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(
        &ul,
        &etcd,
        &["--healthz-ip=127.0.0.1", "--healthz-port=18083"],
        &[],
    );
    let ga = add_pod_bridge(&a.node.ns, a.subnet()).to_string();
    let gb = add_pod_bridge(&b.node.ns, b.subnet()).to_string();

    etcd.stop();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        ping_from(&a.node.ns, &ga, &gb),
        "data path must stay while etcd is away"
    );
    assert!(a.sees(&b) && b.sees(&a));
    assert!(a.dirs.conflist().exists());

    etcd.start();
    // A lease added after the outage reaches a (its watch came back).
    let key = format!("{FLANNEL_PREFIX}/subnets/10.5.222.0-24");
    etcd.etcdctl(&[
        "put",
        &key,
        r#"{"PublicIP":"192.168.100.222","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:de"}}"#,
    ]);
    assert!(
        wait_for(
            || has_vxlan_peer(
                &a.node.ns,
                "twill.1",
                "10.5.222.0/24",
                "02:00:00:00:00:de",
                "192.168.100.222"
            ),
            WAIT
        ),
        "{:?}\n{}",
        a.vtep_state(),
        a.daemon.log()
    );
    let metrics = String::from_utf8_lossy(
        &a.node
            .ns
            .output(&["curl", "-s", "http://127.0.0.1:18083/metrics"])
            .stdout,
    )
    .into_owned();
    assert!(
        !metrics.contains("twill_etcd_reconnects_total 0"),
        "{metrics}"
    );
    assert!(ping_from(&a.node.ns, &ga, &gb));
}

#[test]
fn compaction_and_missed_events_are_recovered_by_relisting() {
    let (ul, etcd) = setup(CONFIG);
    let (a, mut c) = meshed_pair(&ul, &etcd, &[], &[]);
    let (csub, cmac, ckey) = (c.subnet().to_string(), c.mac(), c.lease_key());
    c.daemon.terminate();

    // Cut a off etcd (its watch breaks), change leases behind its back and compact the history.
    a.node.ns.exec(&["nft", "add table ip cut"]);
    a.node.ns.exec(&[
        "nft",
        "add chain ip cut out { type filter hook output priority 0; }",
    ]);
    a.node.ns.exec(&[
        "nft",
        "add rule ip cut out ip daddr 192.168.100.254 tcp dport 2379 reject with tcp reset",
    ]);
    std::thread::sleep(Duration::from_secs(1));
    etcd.etcdctl(&["del", &ckey]);
    let key = format!("{FLANNEL_PREFIX}/subnets/10.5.223.0-24");
    etcd.etcdctl(&[
        "put",
        &key,
        r#"{"PublicIP":"192.168.100.223","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:df"}}"#,
    ]);
    for i in 0..20 {
        etcd.etcdctl(&["put", "/unrelated", &i.to_string()]);
    }
    etcd.compact();
    a.node.ns.exec(&["nft", "delete table ip cut"]);

    // a re-lists: the removal it missed is applied, the new lease programmed.
    assert!(
        wait_for(
            || lacks_vxlan_peer(&a.node.ns, "twill.1", &csub, &cmac)
                && has_vxlan_peer(
                    &a.node.ns,
                    "twill.1",
                    "10.5.223.0/24",
                    "02:00:00:00:00:df",
                    "192.168.100.223"
                ),
            WAIT
        ),
        "{:?}\n{}",
        a.vtep_state(),
        a.daemon.log()
    );
    // And it keeps following the watch afterwards, without a hot loop.
    etcd.etcdctl(&["del", &key]);
    assert!(wait_for(
        || lacks_vxlan_peer(&a.node.ns, "twill.1", "10.5.223.0/24", "02:00:00:00:00:df"),
        WAIT
    ));
    std::thread::sleep(Duration::from_secs(2));
    let lines = a.daemon.log().lines().count();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        a.daemon.log().lines().count() <= lines + 2,
        "log keeps growing:\n{}",
        a.daemon.log()
    );
}

#[test]
fn deleted_own_lease_is_reacquired_with_the_same_subnet() {
    let (ul, etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(&ul, &etcd, &[], &[]);
    let (subnet, key) = (a.subnet(), a.lease_key());
    let rev_before = etcd.revision();
    etcd.etcdctl(&["del", &key]);
    // twill's choice (flanneld exits here): take the lease again, preferring the same subnet,
    // so running pods keep their addresses.
    assert!(
        wait_for(
            || etcd.get(&key).is_some() && etcd.revision() > rev_before + 1,
            WAIT
        ),
        "{}",
        a.daemon.log()
    );
    assert_eq!(a.subnet(), subnet);
    assert_ne!(etcd.key_lease(&key), 0);
    assert!(wait_for(|| b.sees(&a), WAIT), "{:?}", b.vtep_state());
    assert!(a.daemon.log().contains("lease was deleted; re-acquiring"));
}

#[test]
fn reservations_are_kept_for_their_node() {
    let (ul, etcd) =
        setup(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0"}"#);
    // A reservation (a key without an etcd lease) for the second node, 192.168.100.2.
    let rkey = format!("{FLANNEL_PREFIX}/subnets/10.5.1.0-24");
    etcd.etcdctl(&[
        "put",
        &rkey,
        r#"{"PublicIP":"192.168.100.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}}"#,
    ]);
    let a = start(&ul, &etcd, &[]);
    a.wait_ready();
    assert_eq!(a.node.ip.to_string(), "192.168.100.1");
    assert_eq!(
        a.subnet().to_string(),
        "10.5.2.0/24",
        "nobody else takes a reservation"
    );
    let b = start(&ul, &etcd, &[]);
    b.wait_ready();
    assert_eq!(
        b.subnet().to_string(),
        "10.5.1.0/24",
        "the reserved node uses it"
    );
    assert_eq!(etcd.key_lease(&rkey), 0, "it stays a reservation");
    let v: serde_json::Value = serde_json::from_str(&etcd.get(&rkey).unwrap()).unwrap();
    assert_eq!(
        v["BackendData"]["VtepMAC"],
        b.mac(),
        "with the node's real VtepMAC"
    );
    assert!(wait_for(|| a.sees(&b) && b.sees(&a), WAIT));
}
