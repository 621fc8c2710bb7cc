//! twilld against what etcd, files and other writers may hold (issue 9), plus honest readiness
//! across reboots and shadowing CNI configs (issue 10, items 3 and 6). Each test plants the bad
//! input into a real etcd or a node's files and asserts what a user relies on: pods on two
//! nodes keep reaching each other, etcd stays reachable, a new node turns Ready, the rejection
//! shows in `/metrics`, the files come back.
#![cfg(feature = "root")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use twill_tests::etcd::Etcd;
use twill_tests::underlay::{
    add_pod_bridge, has_vxlan_peer, metric, ping_from, wait_for, Member, NodeDirs, Underlay,
    FLANNEL_PREFIX, VTEP,
};

/// Nodes lease from 10.5.1.0–10.5.63.0: the subnets above are the tests' planted leases, which
/// a node picking a subnet at random would collide with.
const CONFIG: &str =
    r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.63.0","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str =
    r#"{"Network":"10.6.0.0/16","SubnetMax":"10.6.63.0","Backend":{"Type":"host-gw"}}"#;
const WAIT: Duration = Duration::from_secs(30);
/// Several 1 s reconcile passes: long enough for a wrong route to have been installed.
const PASSES: Duration = Duration::from_secs(3);
/// Health server port; every node has its own namespace, so they all use the same one.
const PORT: u16 = 19190;
const REASONS: [&str; 6] = [
    "outside_network",
    "overlaps_node_subnet",
    "overlaps_lease",
    "overlaps_host",
    "bad_vtep_mac",
    "bad_public_ip",
];

fn setup(config: &str) -> (Underlay, Etcd) {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(config));
    (ul, etcd)
}

fn args(extra: &[&'static str]) -> Vec<&'static str> {
    [&["--reconcile-interval=1", "--healthz-port=19190"], extra].concat()
}

/// twilld with a 1 s reconcile pass and its health server on [`PORT`].
fn start(ul: &Underlay, etcd: &Etcd) -> Member {
    Member::start(ul, etcd, &args(&[]))
}

fn start_with(ul: &Underlay, etcd: &Etcd, dirs: NodeDirs) -> Member {
    Member::start_with(ul, etcd, dirs, &args(&[]))
}

/// Two [`start`]ed vxlan nodes, meshed.
fn meshed_pair(ul: &Underlay, etcd: &Etcd) -> (Member, Member) {
    Member::meshed_pair(ul, etcd, &args(&[]), &args(&[]))
}

fn key(name: &str) -> String {
    format!("{FLANNEL_PREFIX}/subnets/{name}")
}

fn vxlan_lease(public_ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn put(etcd: &Etcd, name: &str, value: &str) {
    etcd.etcdctl(&["put", &key(name), value]);
}

fn del(etcd: &Etcd, name: &str) {
    etcd.etcdctl(&["del", &key(name)]);
}

/// A stand-in pod on each node: the first address of its subnet on a bridge.
fn pods(a: &Member, b: &Member) -> (String, String) {
    (
        add_pod_bridge(&a.node.ns, a.subnet()).to_string(),
        add_pod_bridge(&b.node.ns, b.subnet()).to_string(),
    )
}

/// Pods reach each other both ways (a few tries each: the first packet may wait for ARP).
fn reach(a: &Member, ga: &str, b: &Member, gb: &str) -> bool {
    let once = |m: &Member, s: &str, d: &str| (0..3).any(|_| ping_from(&m.node.ns, s, d));
    once(a, ga, gb) && once(b, gb, ga)
}

/// `twill_leases_rejected{reason="<reason>"}` on `m` (0 when absent).
fn rejected(m: &Member, reason: &str) -> u64 {
    let text = m.metrics(PORT);
    metric(
        &text,
        &format!("twill_leases_rejected{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0) as u64
}

/// Sum of `twill_leases_rejected` over `reasons`.
fn rejected_for(m: &Member, reasons: &[&str]) -> u64 {
    let text = m.metrics(PORT);
    reasons
        .iter()
        .map(|r| {
            metric(&text, &format!("twill_leases_rejected{{reason=\"{r}\"}}")).unwrap_or(0.0) as u64
        })
        .sum()
}

/// Gives a node time to act on planted leases: until it counts `n` rejections (or 10 s, not
/// asserted here: the outcome assertions that follow say what went wrong), then a few passes.
fn settle(m: &Member, n: u64) {
    wait_for(|| rejected_for(m, &REASONS) >= n, Duration::from_secs(10));
    std::thread::sleep(PASSES);
}

fn routes(m: &Member) -> String {
    m.node.ns.exec(&["ip", "-4", "route", "show"])
}

/// The node's connected underlay route is there, exactly as the kernel made it.
fn underlay_route_intact(m: &Member) -> bool {
    let out = m
        .node
        .ns
        .exec(&["ip", "-4", "route", "show", "192.168.100.0/24"]);
    let lines: Vec<&str> = out.lines().collect();
    lines.len() == 1
        && lines[0]
            .starts_with("192.168.100.0/24 dev eth0 proto kernel scope link src 192.168.100.")
}

/// Whether `m`'s VTEP has any route, neighbour or FDB entry mentioning `needle`.
fn vtep_mentions(m: &Member, needle: &str) -> bool {
    let (neigh, fdb, routes) = m.vtep_state();
    neigh.contains(needle) || fdb.contains(needle) || routes.contains(needle)
}

fn readyz(m: &Member) -> (u16, String) {
    m.http_get(PORT, "/readyz")
}

fn lease_json(etcd: &Etcd, k: &str) -> Value {
    serde_json::from_str(&etcd.get(k).unwrap_or_default()).unwrap_or(Value::Null)
}

/// WARN lines of the daemon's log mentioning any of `needles`.
fn warn_lines(m: &Member, needles: &[&str]) -> usize {
    m.daemon
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && needles.iter().any(|n| l.contains(n)))
        .count()
}

#[test]
fn lease_for_the_underlay_is_rejected_and_the_underlay_stays() {
    let (ul, etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(&ul, &etcd);
    let (ga, gb) = pods(&a, &b);

    // The nodes' own underlay /24, and a lease covering the whole Network.
    put(
        &etcd,
        "192.168.100.0-24",
        &vxlan_lease("192.168.100.77", "02:aa:bb:cc:dd:ee"),
    );
    put(
        &etcd,
        "10.0.0.0-8",
        &vxlan_lease("192.168.100.78", "02:aa:bb:cc:dd:ef"),
    );
    settle(&a, 2);
    settle(&b, 2);
    for m in [&a, &b] {
        assert!(
            underlay_route_intact(m),
            "{}: the connected route was replaced:\n{}",
            m.node.name(),
            routes(m)
        );
        assert!(m.reaches_etcd(&etcd), "{}: etcd unreachable", m.node.name());
        for planted in ["192.168.100.0/24", "10.0.0.0/8", "02:aa:bb:cc:dd:e"] {
            assert!(
                !vtep_mentions(m, planted),
                "{}: {planted} was programmed: {:?}",
                m.node.name(),
                m.vtep_state()
            );
        }
    }
    assert!(reach(&a, &ga, &b, &gb), "pods lost each other");
    for m in [&a, &b] {
        let text = m.metrics(PORT);
        assert!(
            rejected_for(m, &["outside_network", "overlaps_host"]) >= 1,
            "{}: no rejection of the underlay lease:\n{text}",
            m.node.name()
        );
        assert!(
            rejected_for(m, &REASONS) >= 2,
            "{}: both planted leases must be rejected:\n{text}",
            m.node.name()
        );
        // Logged once at warn, not on every pass.
        let warned = warn_lines(m, &["192.168.100.0-24", "192.168.100.0/24"]);
        assert_eq!(warned, 1, "{}:\n{}", m.node.name(), m.daemon.log());
    }

    // Deleting the leases leaves the underlay as it was, and the gauges drop back.
    del(&etcd, "192.168.100.0-24");
    del(&etcd, "10.0.0.0-8");
    for m in [&a, &b] {
        assert!(
            wait_for(|| rejected_for(m, &REASONS) == 0, WAIT),
            "{}",
            m.metrics(PORT)
        );
    }
    std::thread::sleep(PASSES);
    for m in [&a, &b] {
        assert!(underlay_route_intact(m), "{}", routes(m));
        assert!(m.reaches_etcd(&etcd), "{}: etcd unreachable", m.node.name());
    }
    assert!(reach(&a, &ga, &b, &gb));
}

#[test]
fn lease_overlapping_a_host_prefix_inside_the_network_is_rejected_on_that_host_only() {
    let (ul, etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(&ul, &etcd);
    let (ga, gb) = pods(&a, &b);
    // A link of a's (added after twilld started: at start the overlap would be refused)
    // holding an address inside the Network.
    let ns = &a.node.ns;
    ns.exec(&[
        "ip", "link", "add", "hostnet0", "type", "veth", "peer", "name", "hostnet1",
    ]);
    ns.exec(&["ip", "addr", "add", "10.5.250.1/24", "dev", "hostnet0"]);
    ns.exec(&["ip", "link", "set", "hostnet1", "up"]);
    ns.exec(&["ip", "link", "set", "hostnet0", "up"]);
    let (mac, peer_ip) = ("02:aa:bb:cc:fa:01", "192.168.100.77");
    put(&etcd, "10.5.250.0-24", &vxlan_lease(peer_ip, mac));

    // b has no such interface: for b it is an ordinary peer.
    assert!(
        wait_for(
            || has_vxlan_peer(&b.node.ns, VTEP, "10.5.250.0/24", mac, peer_ip),
            WAIT
        ),
        "{:?}",
        b.vtep_state()
    );
    settle(&a, 1);
    let connected = ns.exec(&["ip", "-4", "route", "show", "10.5.250.0/24"]);
    assert!(
        connected.lines().count() == 1
            && connected.starts_with("10.5.250.0/24 dev hostnet0 proto kernel"),
        "a's connected route was replaced:\n{connected}"
    );
    assert!(!vtep_mentions(&a, mac), "{:?}", a.vtep_state());
    assert_eq!(rejected(&a, "overlaps_host"), 1, "{}", a.metrics(PORT));
    assert_eq!(rejected_for(&b, &REASONS), 0, "{}", b.metrics(PORT));
    assert!(reach(&a, &ga, &b, &gb));
}

#[test]
fn etcd_address_lease_keeps_etcd_reachable_and_the_watch_alive() {
    let (ul, etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(&ul, &etcd);
    let (ga, gb) = pods(&a, &b);
    put(
        &etcd,
        "192.168.100.254-32",
        &vxlan_lease("192.168.100.77", "02:aa:bb:cc:dd:ee"),
    );
    settle(&a, 1);
    settle(&b, 1);
    for m in [&a, &b] {
        assert!(
            m.reaches_etcd(&etcd),
            "{}: etcd unreachable; routes:\n{}",
            m.node.name(),
            routes(m)
        );
        let via = m
            .node
            .ns
            .exec(&["ip", "-4", "route", "get", "192.168.100.254"]);
        assert!(via.contains("dev eth0"), "{}: {via}", m.node.name());
    }

    // The watch still works: a valid lease planted afterwards reaches both nodes, and its
    // deletion too.
    let (mac, ip) = ("02:aa:bb:cc:c8:01", "192.168.100.78");
    put(&etcd, "10.5.200.0-24", &vxlan_lease(ip, mac));
    for m in [&a, &b] {
        assert!(
            wait_for(
                || has_vxlan_peer(&m.node.ns, VTEP, "10.5.200.0/24", mac, ip),
                WAIT
            ),
            "{}: the watch is broken: {:?}\n{}",
            m.node.name(),
            m.vtep_state(),
            m.daemon.log()
        );
    }
    del(&etcd, "10.5.200.0-24");
    for m in [&a, &b] {
        assert!(
            wait_for(|| !vtep_mentions(m, mac), WAIT),
            "{}: {:?}",
            m.node.name(),
            m.vtep_state()
        );
    }
    assert!(reach(&a, &ga, &b, &gb));
    for m in [&a, &b] {
        assert!(
            rejected_for(m, &["outside_network", "overlaps_host"]) >= 1,
            "{}",
            m.metrics(PORT)
        );
    }
}

#[test]
fn half_of_a_peers_subnet_is_rejected_and_its_pods_stay_reachable() {
    let (ul, etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(&ul, &etcd);
    let (ga, gb) = pods(&a, &b);
    // A pod address in the upper half of b's subnet, the half the planted lease claims.
    let bnet = u32::from(b.subnet().network());
    let upper = std::net::Ipv4Addr::from(bnet + 200).to_string();
    let half = std::net::Ipv4Addr::from(bnet + 128);
    b.node
        .ns
        .exec(&["ip", "addr", "add", &format!("{upper}/24"), "dev", "cni0"]);
    assert!(reach(&a, &ga, &b, &upper));

    put(
        &etcd,
        &format!("{half}-25"),
        &vxlan_lease("192.168.100.77", "02:aa:bb:cc:dd:ee"),
    );
    settle(&a, 1);
    assert!(
        reach(&a, &ga, &b, &upper) && reach(&a, &ga, &b, &gb),
        "pods in b's subnet blackholed; a's routes:\n{}",
        routes(&a)
    );
    assert!(
        !vtep_mentions(&a, &format!("{half}/25")),
        "{:?}",
        a.vtep_state()
    );
    assert!(
        !vtep_mentions(&b, &format!("{half}/25")),
        "{:?}",
        b.vtep_state()
    );
    assert_eq!(rejected(&a, "overlaps_lease"), 1, "{}", a.metrics(PORT));
    assert!(
        rejected_for(&b, &["overlaps_node_subnet", "overlaps_lease"]) >= 1,
        "{}",
        b.metrics(PORT)
    );
}

#[test]
fn a_zero_prefix_lease_does_not_stop_new_nodes() {
    let (ul, etcd) = setup(CONFIG);
    put(
        &etcd,
        "0.0.0.0-0",
        &vxlan_lease("192.168.100.77", "02:aa:bb:cc:dd:ee"),
    );
    let (a, b) = meshed_pair(&ul, &etcd);
    let (ga, gb) = pods(&a, &b);
    std::thread::sleep(PASSES);
    for m in [&a, &b] {
        let default = m.node.ns.exec(&["ip", "-4", "route", "show", "default"]);
        assert_eq!(
            default.trim(),
            "default via 192.168.100.254 dev eth0",
            "{}",
            m.node.name()
        );
        assert!(
            !vtep_mentions(m, "02:aa:bb:cc:dd:ee"),
            "{:?}",
            m.vtep_state()
        );
        assert!(m.reaches_etcd(&etcd));
        assert_eq!(readyz(m).0, 200, "{}", m.node.name());
        assert!(
            rejected_for(m, &REASONS) >= 1,
            "{}: {}",
            m.node.name(),
            m.metrics(PORT)
        );
    }
    assert!(reach(&a, &ga, &b, &gb));
}

#[test]
fn leases_the_kernel_would_refuse_do_not_keep_a_new_node_not_ready() {
    let (ul, etcd) = setup(CONFIG);
    let a = start(&ul, &etcd);
    a.wait_ready();
    put(
        &etcd,
        "10.5.201.0-24",
        &vxlan_lease("192.168.100.77", "01:00:5e:00:00:01"),
    );
    put(
        &etcd,
        "10.5.202.0-24",
        &vxlan_lease("192.168.100.78", "00:00:00:00:00:00"),
    );
    put(
        &etcd,
        "224.0.0.0-24",
        &vxlan_lease("192.168.100.79", "02:aa:bb:cc:e0:01"),
    );
    put(
        &etcd,
        "10.5.203.0-24",
        &vxlan_lease("0.0.0.0", "02:aa:bb:cc:cb:01"),
    );

    // A node starting now turns Ready and meshes with the healthy one.
    let b = start(&ul, &etcd);
    b.wait_ready();
    assert!(
        wait_for(|| readyz(&b).0 == 200, WAIT),
        "{:?}\n{}",
        readyz(&b),
        b.daemon.log()
    );
    assert!(
        wait_for(|| a.sees(&b) && b.sees(&a), WAIT),
        "{:?}\n{:?}",
        a.vtep_state(),
        b.vtep_state()
    );
    let (ga, gb) = pods(&a, &b);
    assert!(reach(&a, &ga, &b, &gb));
    assert_eq!(readyz(&a).0, 200);
    for m in [&a, &b] {
        for planted in [
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "224.0.0.0",
            "10.5.203.0",
        ] {
            assert!(
                !vtep_mentions(m, planted),
                "{}: {planted}: {:?}",
                m.node.name(),
                m.vtep_state()
            );
        }
        assert!(
            wait_for(
                || rejected(m, "bad_vtep_mac") == 2
                    && rejected(m, "outside_network") >= 1
                    && rejected(m, "bad_public_ip") == 1,
                WAIT
            ),
            "{}: {}",
            m.node.name(),
            m.metrics(PORT)
        );
    }
}

#[test]
fn a_foreign_rewrite_of_the_own_lease_is_put_back() {
    let (ul, etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(&ul, &etcd);
    let (ga, gb) = pods(&a, &b);
    let k = a.lease_key();
    let own = etcd.get(&k).expect("a's lease");
    let etcd_lease = etcd.key_lease(&k);
    assert_ne!(etcd_lease, 0);

    // Same key, PublicIP and etcd lease; another VtepMAC.
    let mut forged: Value = serde_json::from_str(&own).unwrap();
    forged["BackendData"]["VtepMAC"] = Value::from("02:de:ad:be:ef:01");
    etcd.etcdctl(&["put", "--ignore-lease", &k, &forged.to_string()]);
    assert!(
        wait_for(|| etcd.get(&k).as_deref() == Some(own.as_str()), WAIT),
        "the forged value stayed: {:?}\n{}",
        etcd.get(&k),
        a.daemon.log()
    );
    assert_eq!(etcd.key_lease(&k), etcd_lease, "the etcd lease must stay");
    assert!(
        warn_lines(&a, &["02:de:ad:be:ef:01"]) >= 1,
        "the rewrite must be logged with what was changed:\n{}",
        a.daemon.log()
    );
    assert!(
        wait_for(
            || b.sees(&a) && !b.vtep_state().1.contains("02:de:ad:be:ef:01"),
            WAIT
        ),
        "{:?}",
        b.vtep_state()
    );
    assert!(reach(&a, &ga, &b, &gb));

    // Another BackendType.
    let forged = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
        a.node.ip
    );
    etcd.etcdctl(&["put", "--ignore-lease", &k, &forged]);
    assert!(
        wait_for(|| etcd.get(&k).as_deref() == Some(own.as_str()), WAIT),
        "the forged value stayed: {:?}\n{}",
        etcd.get(&k),
        a.daemon.log()
    );
    assert!(wait_for(|| b.sees(&a), WAIT), "{:?}", b.vtep_state());
    assert!(reach(&a, &ga, &b, &gb));
}

#[test]
fn a_cloned_state_dir_heals_the_duplicate_vtep_mac() {
    use std::os::unix::fs::PermissionsExt;
    let (ul, etcd) = setup(CONFIG);
    let a = start(&ul, &etcd);
    a.wait_ready();
    let amac = a.mac();
    let file = a.dirs.state_dir().join("vtep-mac-1");
    let saved = std::fs::read_to_string(&file).expect("a's vtep-mac-1");
    assert_eq!(saved.trim(), amac);

    // b's state dir is a copy of a's (a cloned VM image).
    let dirs = NodeDirs::new();
    std::fs::create_dir_all(dirs.state_dir()).unwrap();
    std::fs::set_permissions(dirs.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(dirs.state_dir().join("vtep-mac-1"), &saved).unwrap();
    std::fs::set_permissions(
        dirs.state_dir().join("vtep-mac-1"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let b = start_with(&ul, &etcd, dirs);
    b.wait_ready();

    let lease_mac = |m: &Member| {
        lease_json(&etcd, &m.lease_key())["BackendData"]["VtepMAC"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        wait_for(
            || lease_mac(&a) != lease_mac(&b)
                && lease_mac(&a) == a.mac()
                && lease_mac(&b) == b.mac()
                && a.sees(&b)
                && b.sees(&a),
            WAIT
        ),
        "a: {} {} b: {} {}\n{:?}\n{:?}\n{}",
        lease_mac(&a),
        a.mac(),
        lease_mac(&b),
        b.mac(),
        a.vtep_state(),
        b.vtep_state(),
        b.daemon.log()
    );
    // The older lease keeps its MAC; the newer one changed and persisted the new MAC.
    assert_eq!(a.mac(), amac);
    assert_ne!(b.mac(), amac);
    let persisted = std::fs::read_to_string(b.dirs.state_dir().join("vtep-mac-1")).unwrap();
    assert_eq!(persisted.trim(), b.mac());
    // Logged, naming the other lease or the MAC.
    let asub = a.subnet();
    let akey = format!("{}-{}", asub.network(), asub.prefix());
    assert!(
        warn_lines(&b, &[&amac, &asub.to_string(), &akey]) >= 1,
        "{}",
        b.daemon.log()
    );
    let (ga, gb) = pods(&a, &b);
    assert!(reach(&a, &ga, &b, &gb));
}

#[test]
fn a_network_overlapping_the_node_is_refused_at_start() {
    let (ul, etcd) = setup(r#"{"Network":"192.168.0.0/16","Backend":{"Type":"vxlan"}}"#);
    let mut a = Member::start(&ul, &etcd, &["--reconcile-interval=1"]);
    let status = a.daemon.wait_exit(WAIT);
    let log = a.daemon.log();
    let status = status.unwrap_or_else(|| panic!("twilld must refuse the config:\n{log}"));
    assert!(!status.success(), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("192.168.0.0/16") && l.contains("192.168.100.")),
        "the refusal must name the Network and the node's address:\n{log}"
    );
    assert!(!a.dirs.conflist().exists(), "{log}");
    assert!(
        etcd.get_prefix(&format!("{FLANNEL_PREFIX}/subnets/"))
            .is_empty(),
        "no lease for a refused config"
    );
    assert!(underlay_route_intact(&a), "{}", routes(&a));
}

#[test]
fn host_gw_peer_off_link_does_not_block_readiness() {
    let (ul, etcd) = setup(HOST_GW);
    put(
        &etcd,
        "10.6.200.0-24",
        r#"{"PublicIP":"10.99.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#,
    );
    let a = start(&ul, &etcd);
    a.wait_ready();
    assert!(
        wait_for(|| readyz(&a).0 == 200, WAIT),
        "{:?}\n{}",
        readyz(&a),
        a.daemon.log()
    );
    let b = start(&ul, &etcd);
    b.wait_ready();
    let route_via = |m: &Member, p: &Member| {
        let want = format!("{} via {} dev eth0", p.subnet(), p.node.ip);
        routes(m).lines().any(|l| l.starts_with(&want))
    };
    assert!(
        wait_for(|| route_via(&a, &b) && route_via(&b, &a), WAIT),
        "{}\n{}\n{}",
        routes(&a),
        routes(&b),
        a.daemon.log()
    );
    assert!(!routes(&a).contains("10.6.200.0/24"), "{}", routes(&a));
    let (ga, gb) = pods(&a, &b);
    assert!(reach(&a, &ga, &b, &gb));

    // Retried every pass: once the PublicIP is on a link of a's, the route appears.
    a.node
        .ns
        .exec(&["ip", "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    assert!(
        wait_for(
            || routes(&a)
                .lines()
                .any(|l| l.starts_with("10.6.200.0/24 via 10.99.0.1 dev eth0")),
            WAIT
        ),
        "{}\n{}",
        routes(&a),
        a.daemon.log()
    );
}

#[test]
fn corrupted_subnet_env_and_conflist_are_rewritten() {
    let (ul, etcd) = setup(CONFIG);
    let a = start(&ul, &etcd);
    a.wait_ready();
    assert!(wait_for(|| readyz(&a).0 == 200, WAIT), "{:?}", readyz(&a));
    let env = a.env();
    let conflist = std::fs::read_to_string(a.dirs.conflist()).unwrap();

    // Poll /readyz quickly while the file is wrong; the repair is what is asserted.
    let mut not_ready: Vec<String> = Vec::new();
    std::fs::write(a.dirs.subnet_file(), "FLANNEL_SUBNET=garbage\n").unwrap();
    let repaired = wait_for(
        || {
            if let (503, body) = readyz(&a) {
                not_ready.push(body);
            }
            a.env() == env
        },
        WAIT,
    );
    assert!(
        repaired,
        "subnet.env not rewritten: {:?}\n{}",
        a.env(),
        a.daemon.log()
    );
    eprintln!("/readyz while subnet.env was wrong: {not_ready:?}");

    // While subnet.env cannot be put right (a directory in its place), /readyz says so.
    std::fs::remove_file(a.dirs.subnet_file()).unwrap();
    let blocker = a.dirs.subnet_file().join("blocker");
    std::fs::create_dir_all(&blocker).unwrap();
    assert!(
        wait_for(
            || {
                let (code, body) = readyz(&a);
                code == 503 && body.contains("subnet.env")
            },
            WAIT
        ),
        "{:?}\n{}",
        readyz(&a),
        a.daemon.log()
    );
    std::fs::remove_dir_all(a.dirs.subnet_file()).unwrap();
    assert!(
        wait_for(|| a.env() == env, WAIT),
        "subnet.env not rewritten: {:?}\n{}",
        a.env(),
        a.daemon.log()
    );

    std::fs::write(a.dirs.conflist(), "{}").unwrap();
    assert!(
        wait_for(
            || std::fs::read_to_string(a.dirs.conflist()).unwrap_or_default() == conflist,
            WAIT
        ),
        "conflist not rewritten\n{}",
        a.daemon.log()
    );
    std::fs::remove_file(a.dirs.conflist()).unwrap();
    assert!(
        wait_for(
            || std::fs::read_to_string(a.dirs.conflist()).unwrap_or_default() == conflist,
            WAIT
        ),
        "conflist not rewritten\n{}",
        a.daemon.log()
    );
    assert!(wait_for(|| readyz(&a).0 == 200, WAIT), "{:?}", readyz(&a));
}

#[test]
fn ip_forward_is_put_back() {
    let (ul, etcd) = setup(CONFIG);
    let (a, b) = meshed_pair(&ul, &etcd);
    let (ga, gb) = pods(&a, &b);
    let forward = || {
        a.node
            .ns
            .exec(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .trim()
            .to_string()
    };
    a.node.ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    assert!(
        wait_for(|| forward() == "1", WAIT),
        "ip_forward stayed 0\n{}",
        a.daemon.log()
    );
    assert!(warn_lines(&a, &["ip_forward"]) >= 1, "{}", a.daemon.log());
    assert!(reach(&a, &ga, &b, &gb));
}

#[test]
fn conflist_is_withheld_after_a_reboot_but_kept_across_restarts() {
    let (ul, mut etcd) = setup(CONFIG);
    let mut a = start(&ul, &etcd);
    a.wait_ready();
    let subnet = a.subnet();
    assert!(a.daemon.terminate().is_some_and(|s| s.success()));
    assert!(
        a.dirs.conflist().exists(),
        "a SIGTERM must keep the conflist"
    );

    // A restart (subnet.env still there): the conflist never disappears.
    let gone = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (gone, stop, path) = (gone.clone(), stop.clone(), a.dirs.conflist());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if !path.exists() {
                    gone.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    a.restart(&etcd, &args(&[]));
    let ready = wait_for(|| readyz(&a).0 == 200, WAIT);
    std::thread::sleep(PASSES);
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    assert!(ready, "{:?}\n{}", readyz(&a), a.daemon.log());
    assert!(
        !gone.load(Ordering::SeqCst),
        "the conflist flapped across a restart"
    );

    // subnet.env alone deleted (an operator, a cleanup script) while twilld is down: at its
    // start twilld takes the conflist away until it holds its lease again.
    a.daemon.terminate();
    std::fs::remove_file(a.dirs.subnet_file()).unwrap();
    etcd.stop();
    a.restart(&etcd, &args(&[]));
    assert!(
        wait_for(|| !a.dirs.conflist().exists(), Duration::from_secs(10)),
        "the runtime still sees the conflist before twilld has a lease\n{}",
        a.daemon.log()
    );
    etcd.start();
    a.wait_ready();
    assert_eq!(a.subnet(), subnet);

    // A reboot: /run is wiped. From boot on (the runtime starts before twilld) there is no
    // readable conflist, also while twilld waits for etcd.
    a.daemon.terminate();
    a.dirs.wipe_run_dir();
    assert!(
        !a.dirs.conflist().exists(),
        "right after a reboot the runtime still reads twill's conflist"
    );
    etcd.stop();
    a.restart(&etcd, &args(&[]));
    std::thread::sleep(PASSES);
    assert!(
        !a.dirs.conflist().exists(),
        "the conflist came back before twilld has a lease\n{}",
        a.daemon.log()
    );
    etcd.start();
    a.wait_ready();
    assert_eq!(a.subnet(), subnet, "the lease is reused by PublicIP");
}

#[test]
fn a_shadowing_cni_config_is_reported() {
    let (ul, etcd) = setup(CONFIG);
    let a = start(&ul, &etcd);
    a.wait_ready();
    let shadowed = |a: &Member| metric(&a.metrics(PORT), "twill_cni_config_shadowed");
    // Not shadowed: the gauge at 0 (or absent, from a server that answers).
    let clear = |a: &Member| {
        let text = a.metrics(PORT);
        !text.is_empty() && metric(&text, "twill_cni_config_shadowed").unwrap_or(0.0) == 0.0
    };
    assert!(wait_for(|| clear(&a), WAIT), "{}", a.metrics(PORT));
    let dir = a.dirs.cni_conf_dir();
    // Sorting after twill's own file: not shadowing.
    std::fs::write(
        dir.join("99-late.conflist"),
        r#"{"cniVersion":"1.0.0","name":"late","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("05-other.conflist"),
        r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    assert!(
        wait_for(
            || shadowed(&a) == Some(1.0) && readyz(&a).1.contains("05-other.conflist"),
            WAIT
        ),
        "{}\n{:?}",
        a.metrics(PORT),
        readyz(&a)
    );
    assert!(!readyz(&a).1.contains("99-late"), "{:?}", readyz(&a));
    assert!(
        warn_lines(&a, &["05-other.conflist"]) >= 1,
        "{}",
        a.daemon.log()
    );
    std::fs::remove_file(dir.join("05-other.conflist")).unwrap();
    assert!(
        wait_for(|| clear(&a) && !readyz(&a).1.contains("05-other"), WAIT),
        "{}",
        a.metrics(PORT)
    );

    // A flannel config left from a migration.
    std::fs::write(
        dir.join("10-flannel.conflist"),
        r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
    )
    .unwrap();
    assert!(
        wait_for(
            || shadowed(&a) == Some(1.0) && readyz(&a).1.contains("10-flannel.conflist"),
            WAIT
        ),
        "{}\n{:?}",
        a.metrics(PORT),
        readyz(&a)
    );
    std::fs::remove_file(dir.join("10-flannel.conflist")).unwrap();
    assert!(wait_for(|| clear(&a), WAIT), "{}", a.metrics(PORT));
}

#[test]
fn health_server_listens_on_loopback_by_default() {
    let (ul, etcd) = setup(CONFIG);
    let a = start(&ul, &etcd);
    assert!(
        wait_for(|| a.http_get(PORT, "/healthz").0 == 200, WAIT),
        "{}",
        a.daemon.log()
    );
    let listening = a.node.ns.exec(&["ss", "-ltnH"]);
    let ours: Vec<&str> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|addr| addr.ends_with(&format!(":{PORT}")))
        .collect();
    assert_eq!(ours, [format!("127.0.0.1:{PORT}")], "{listening}");
    // Not reachable from the underlay.
    let url = format!("http://{}:{PORT}/healthz", a.node.ip);
    let out = twill_tests::sh::output_in(ul.ns_name(), &["curl", "-s", "--max-time", "3", &url]);
    assert!(!out.status.success(), "reachable from the underlay");
}

/// Issue 9 item 13: an etcd lease granted for a create whose transaction then fails was leaked
/// for its whole TTL, once per retry. A user that may read the prefix but not write it gets
/// its grants (no permission needed) and fails every create txn (permission denied): after
/// several retries no lease may be left.
#[test]
fn a_failed_create_txn_leaks_no_etcd_lease() {
    let (ul, etcd) = setup(CONFIG);
    let root = ["--user=root:s3cret"];
    etcd.etcdctl(&[
        "user",
        "add",
        "root",
        "--new-user-password=s3cret",
        "--interactive=false",
    ]);
    etcd.etcdctl(&[
        "user",
        "add",
        "reader",
        "--new-user-password=r3ad",
        "--interactive=false",
    ]);
    etcd.etcdctl(&["role", "add", "ro"]);
    etcd.etcdctl(&[
        "role",
        "grant-permission",
        "ro",
        "read",
        "/coreos.com/network/",
        "--prefix=true",
    ]);
    etcd.etcdctl(&["user", "grant-role", "reader", "ro"]);
    etcd.etcdctl(&["auth", "enable"]);
    let a = Member::start(
        &ul,
        &etcd,
        &args(&["--etcd-username=reader", "--etcd-password=r3ad"]),
    );
    // Every create is refused; twilld retries with a backoff (0.1, 0.2, 0.4, … s).
    assert!(
        wait_for(
            || a.daemon.log().matches("permission denied").count() >= 4,
            WAIT
        ),
        "the create was never refused for permission:\n{}",
        a.daemon.log()
    );
    let leases = etcd.etcdctl(&[&root[..], &["lease", "list"]].concat());
    assert!(
        leases.trim_start().starts_with("found 0 leases"),
        "etcd leases leaked by failed creates: {leases}\n{}",
        a.daemon.log()
    );
    assert!(!a.dirs.conflist().exists());
}
