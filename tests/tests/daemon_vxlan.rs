//! twilld against a real etcd, nodes as namespaces on an underlay bridge: leases in flannel's
//! schema, kernel state per peer, pings across the VXLAN, lease removal, flannel-node leases,
//! health endpoints.
#![cfg(feature = "root")]

use std::time::Duration;

use serde_json::Value;
use twill_tests::etcd::{Etcd, Pki};
use twill_tests::underlay::{
    add_pod_bridge, has_vxlan_peer, lacks_vxlan_peer, ping_from, wait_for, Member, Underlay,
    FLANNEL_PREFIX,
};

/// Nodes lease from 10.5.1.0–10.5.63.0: the subnets above are the tests' hand-written peers and
/// stray entries, which a node picking them at random would collide with.
const CONFIG: &str =
    r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.63.0","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(30);

fn leases(etcd: &Etcd) -> Vec<(String, Value)> {
    etcd.get_prefix(&format!("{FLANNEL_PREFIX}/subnets/"))
        .into_iter()
        .map(|(k, v)| (k, serde_json::from_str(&v).expect("lease json")))
        .collect()
}

fn has_peer(m: &Member, subnet: &str, mac: &str, public_ip: &str) -> bool {
    has_vxlan_peer(&m.node.ns, "twill.1", subnet, mac, public_ip)
}

fn lacks_peer(m: &Member, subnet: &str, mac: &str) -> bool {
    lacks_vxlan_peer(&m.node.ns, "twill.1", subnet, mac)
}

fn add_pod(m: &Member) -> String {
    add_pod_bridge(&m.node.ns, m.subnet()).to_string()
}

fn ping(from: &Member, src: &str, dst: &str) -> bool {
    ping_from(&from.node.ns, src, dst)
}

fn http_get(m: &Member, url: &str) -> (u16, String) {
    let out = m
        .node
        .ns
        .output(&["curl", "-s", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn two_nodes_flannel_schema_kernel_state_and_ping() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let a = Member::start(
        &ul,
        &etcd,
        &["--healthz-ip=127.0.0.1", "--healthz-port=18081"],
    );
    // b also lists a dead endpoint first, as flanneld's default endpoint list does.
    let b = Member::start(
        &ul,
        &etcd,
        &["--etcd-endpoints=http://192.168.100.254:4001"],
    );
    a.wait_ready();
    b.wait_ready();

    // subnet.env in flannel's format.
    let env = std::fs::read_to_string(a.dirs.subnet_file()).unwrap();
    let sa = a.subnet();
    let first = std::net::Ipv4Addr::from(u32::from(sa.network()) + 1);
    assert_eq!(
        env,
        format!("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET={first}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    );
    let sb = b.subnet();
    assert_ne!(sa, sb);

    // Leases in flannel's schema, bound to an etcd lease.
    let ls = leases(&etcd);
    assert_eq!(ls.len(), 2, "{ls:?}");
    for (m, s) in [(&a, sa), (&b, sb)] {
        let key = format!("{FLANNEL_PREFIX}/subnets/{}-{}", s.network(), s.prefix());
        let (_, v) = ls.iter().find(|(k, _)| *k == key).expect("lease key");
        assert_eq!(v["PublicIP"], m.node.ip.to_string());
        assert_eq!(v["PublicIPv6"], Value::Null);
        assert_eq!(v["BackendType"], "vxlan");
        assert_eq!(v["BackendData"]["VNI"], 1);
        assert_eq!(v["BackendData"]["VtepMAC"], m.mac());
        assert_ne!(etcd.key_lease(&key), 0, "lease key must carry a TTL");
        let raw = etcd.get(&key).unwrap();
        assert!(
            raw.starts_with(r#"{"PublicIP":""#),
            "field order as flannel: {raw}"
        );
    }

    // The VTEP: flannel's attributes, /32 network address, MTU 1450.
    let link = a.node.ns.exec(&["ip", "-d", "link", "show", "twill.1"]);
    for want in [
        "mtu 1450",
        "vxlan id 1",
        &format!("local {}", a.node.ip),
        "dev eth0",
        "dstport 8472",
        "nolearning",
    ] {
        assert!(link.contains(want), "{want:?} missing in {link}");
    }
    let addr = a
        .node
        .ns
        .exec(&["ip", "-4", "addr", "show", "dev", "twill.1"]);
    assert!(
        addr.contains(&format!("inet {}/32", sa.network())),
        "{addr}"
    );

    // Each node has exactly its peer programmed.
    assert!(wait_for(|| a.sees(&b), WAIT), "{:?}", a.vtep_state());
    assert!(wait_for(|| b.sees(&a), WAIT), "{:?}", b.vtep_state());
    assert_eq!(a.vtep_state().2.lines().count(), 1, "only the peer's route");

    // A ping between addresses of the two subnets crosses the VXLAN.
    let ga = add_pod(&a);
    let gb = add_pod(&b);
    let before = b
        .node
        .ns
        .exec(&["cat", "/sys/class/net/twill.1/statistics/rx_packets"]);
    assert!(
        ping(&a, &ga, &gb),
        "ping {ga} -> {gb} failed; {:?}",
        a.vtep_state()
    );
    assert!(ping(&b, &gb, &ga), "ping {gb} -> {ga} failed");
    let after = b
        .node
        .ns
        .exec(&["cat", "/sys/class/net/twill.1/statistics/rx_packets"]);
    assert!(
        after.trim().parse::<u64>().unwrap() > before.trim().parse::<u64>().unwrap(),
        "the ping did not arrive through twill.1"
    );

    // Health endpoints.
    let (code, body) = http_get(&a, "http://127.0.0.1:18081/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(wait_for(
        || http_get(&a, "http://127.0.0.1:18081/readyz").0 == 200,
        WAIT
    ));
    let (code, metrics) = http_get(&a, "http://127.0.0.1:18081/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("twill_leases_known 2"), "{metrics}");
    assert!(metrics.contains("twill_peers_programmed 1"), "{metrics}");
    assert_eq!(http_get(&a, "http://127.0.0.1:18081/nope").0, 404);

    // The conflist follows the contract.
    let conf: Value =
        serde_json::from_str(&std::fs::read_to_string(a.dirs.conflist()).unwrap()).unwrap();
    assert_eq!(conf["cniVersion"], "1.0.0");
    assert_eq!(conf["name"], "twill");
    assert_eq!(conf["plugins"][0]["type"], "twill");
    assert_eq!(
        conf["plugins"][0]["subnetFile"],
        a.dirs.subnet_file().display().to_string()
    );
    assert_eq!(conf["plugins"][0]["ipam"]["type"], "twill-host-local");
    assert!(conf["cniVersions"]
        .as_array()
        .unwrap()
        .contains(&Value::from("1.0.0")));
    drop(a.daemon);
    drop(b.daemon);
}

/// Grants an etcd lease with `ttl` seconds; returns its hex ID as etcdctl prints it.
fn grant(etcd: &Etcd, ttl: u32) -> String {
    let out = etcd.etcdctl(&["lease", "grant", &ttl.to_string()]);
    out.split_whitespace().nth(1).expect("lease id").to_string()
}

#[test]
fn flannel_node_lease_is_honoured_and_deleted_lease_removed_everywhere() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let members: Vec<Member> = (0..3).map(|_| Member::start(&ul, &etcd, &[])).collect();
    for m in &members {
        m.wait_ready();
    }

    // A node running flannel: its lease written the way flanneld writes it, its data path
    // set up as flanneld's vxlan backend would (device flannel.1, routes to node 0).
    let f = ul.add_node();
    let fmac = "02:aa:bb:cc:dd:01";
    let fsub = "10.5.200.0/24";
    let fns = &f.ns;
    fns.exec(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "address",
        fmac,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &f.ip.to_string(),
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ]);
    fns.exec(&["ip", "addr", "add", "10.5.200.0/32", "dev", "flannel.1"]);
    fns.exec(&["ip", "link", "set", "flannel.1", "up"]);
    fns.exec(&["ip", "link", "add", "cni0", "type", "bridge"]);
    fns.exec(&["ip", "addr", "add", "10.5.200.1/24", "dev", "cni0"]);
    fns.exec(&["ip", "link", "set", "cni0", "up"]);
    let a = &members[0];
    let (asub, amac) = (a.subnet(), a.mac());
    let anet = asub.network().to_string();
    fns.exec(&[
        "ip",
        "neigh",
        "replace",
        &anet,
        "lladdr",
        &amac,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ]);
    fns.exec(&[
        "bridge",
        "fdb",
        "replace",
        &amac,
        "dev",
        "flannel.1",
        "dst",
        &a.node.ip.to_string(),
        "self",
        "permanent",
    ]);
    fns.exec(&[
        "ip",
        "route",
        "replace",
        &asub.to_string(),
        "via",
        &anet,
        "dev",
        "flannel.1",
        "onlink",
    ]);
    let fkey = format!("{FLANNEL_PREFIX}/subnets/10.5.200.0-24");
    let fval = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{fmac}"}}}}"#,
        f.ip
    );
    let lease = grant(&etcd, 600);
    etcd.etcdctl(&["put", &format!("--lease={lease}"), &fkey, &fval]);

    // Every twill node programs the flannel node, and traffic flows between them.
    for m in &members {
        assert!(
            wait_for(|| has_peer(m, fsub, fmac, &f.ip.to_string()), WAIT),
            "{} lacks the flannel peer: {:?}",
            m.node.name(),
            m.vtep_state()
        );
        for o in &members {
            if o.node.ip != m.node.ip {
                assert!(m.sees(o), "{:?}", m.vtep_state());
            }
        }
        assert_eq!(
            m.vtep_state().2.lines().count(),
            3,
            "two twill peers + the flannel node"
        );
    }
    let ga = add_pod(a);
    assert!(ping(a, &ga, "10.5.200.1"), "twill -> flannel ping failed");

    // Deleting the lease key removes that peer from every node.
    etcd.etcdctl(&["del", &fkey]);
    for m in &members {
        assert!(
            wait_for(|| lacks_peer(m, fsub, fmac), WAIT),
            "{} still has the deleted peer: {:?}",
            m.node.name(),
            m.vtep_state()
        );
        assert_eq!(m.vtep_state().2.lines().count(), 2);
    }
    assert!(!ping(a, &ga, "10.5.200.1"));
}

/// Whether `m`'s twilld logged `refusal` `times` times: it was refused on its retries too, and a
/// daemon that got through on one would have had the seconds in between to get ready.
fn refused_repeatedly(m: &Member, refusal: &str, times: usize) -> bool {
    wait_for(|| m.daemon.log().matches(refusal).count() >= times, WAIT)
}

#[test]
fn etcd_with_tls_client_certificates() {
    let ul = Underlay::new();
    let pki = Pki::new(&ul.etcd_ip().to_string());
    let etcd = Etcd::start_in_tls(ul.ns_name(), &ul.etcd_ip().to_string(), &pki);
    etcd.etcdctl(&["put", &format!("{FLANNEL_PREFIX}/config"), CONFIG]);
    let f = pki.files();
    let (ca, cert, key) = (
        format!("--etcd-cafile={}", f.ca.display()),
        format!("--etcd-certfile={}", f.client_cert.display()),
        format!("--etcd-keyfile={}", f.client_key.display()),
    );
    let a = Member::start(&ul, &etcd, &[&ca, &cert, &key]);
    a.wait_ready();
    assert_eq!(leases(&etcd).len(), 1);

    // Without a client certificate etcd refuses twilld, on every retry too (the TLS connection
    // is opened by the first request, retried every second): no lease, no CNI config.
    let b = Member::start(&ul, &etcd, &[&ca]);
    assert!(
        refused_repeatedly(&b, "cannot read the network config", 3),
        "{}",
        b.daemon.log()
    );
    assert!(!b.dirs.conflist().exists(), "{}", b.daemon.log());
    assert_eq!(leases(&etcd).len(), 1);
}

#[test]
fn peer_mac_change_replaces_fdb_and_readyz_turns_ready() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(None);
    let a = Member::start(
        &ul,
        &etcd,
        &["--healthz-ip=127.0.0.1", "--healthz-port=18084"],
    );
    // No config yet: alive but not ready.
    assert!(wait_for(
        || http_get(&a, "http://127.0.0.1:18084/healthz").0 == 200,
        WAIT
    ));
    assert_eq!(http_get(&a, "http://127.0.0.1:18084/readyz").0, 503);
    etcd.etcdctl(&["put", &format!("{FLANNEL_PREFIX}/config"), CONFIG]);
    a.wait_ready();
    assert!(wait_for(
        || http_get(&a, "http://127.0.0.1:18084/readyz").0 == 200,
        WAIT
    ));

    let key = format!("{FLANNEL_PREFIX}/subnets/10.5.77.0-24");
    let value = |mac: &str, ip: &str| {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    };
    etcd.etcdctl(&["put", &key, &value("02:00:00:00:77:01", "192.168.100.77")]);
    assert!(wait_for(
        || has_peer(&a, "10.5.77.0/24", "02:00:00:00:77:01", "192.168.100.77"),
        WAIT
    ));
    // The peer's VTEP MAC changed (e.g. its device was recreated by flannel): the old FDB
    // entry, keyed by MAC, must go, or it would linger forever.
    etcd.etcdctl(&["put", &key, &value("02:00:00:00:77:02", "192.168.100.78")]);
    assert!(
        wait_for(
            || has_peer(&a, "10.5.77.0/24", "02:00:00:00:77:02", "192.168.100.78")
                && !a.vtep_state().1.contains("02:00:00:00:77:01"),
            WAIT
        ),
        "{:?}",
        a.vtep_state()
    );
    assert_eq!(a.vtep_state().1.lines().count(), 1, "{:?}", a.vtep_state());
}

#[test]
fn etcd_basic_auth() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    etcd.etcdctl(&[
        "user",
        "add",
        "root",
        "--new-user-password=s3cret",
        "--interactive=false",
    ]);
    etcd.etcdctl(&["auth", "enable"]);
    let a = Member::start(
        &ul,
        &etcd,
        &["--etcd-username=root", "--etcd-password=s3cret"],
    );
    a.wait_ready();
    let listed = etcd.etcdctl(&[
        "--user=root:s3cret",
        "get",
        &format!("{FLANNEL_PREFIX}/subnets/"),
        "--prefix",
        "--keys-only",
    ]);
    assert_eq!(
        listed.lines().filter(|l| !l.is_empty()).count(),
        1,
        "{listed}"
    );
    let b = Member::start(
        &ul,
        &etcd,
        &["--etcd-username=root", "--etcd-password=wrong"],
    );
    // Authentication happens on connect, retried with a backoff that takes ~3 s for five.
    assert!(
        refused_repeatedly(&b, "cannot connect to etcd", 5),
        "{}",
        b.daemon.log()
    );
    assert!(
        b.daemon.log().contains("authentication failed"),
        "{}",
        b.daemon.log()
    );
    assert!(!b.dirs.conflist().exists(), "{}", b.daemon.log());
}

#[test]
fn malformed_and_foreign_leases_are_skipped_with_a_log() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let put = |name: &str, value: &str| {
        etcd.etcdctl(&["put", &format!("{FLANNEL_PREFIX}/subnets/{name}"), value]);
    };
    // Seen in the first listing...
    put("10.5.90.0-24", "{not json");
    put("10.5.91.0-24", r#"{"PublicIP":42,"BackendType":"vxlan"}"#);
    let mut a = Member::start(&ul, &etcd, &[]);
    a.wait_ready();
    // ...and as watch events.
    put("10.5.92.0-24", r#"["a","list"]"#);
    put(
        "10.5.93.0-24",
        r#"{"PublicIP":"192.168.100.93","PublicIPv6":null,"BackendType":"host-gw"}"#,
    );
    put(
        "10.5.94.0-24",
        &format!(
            r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:94:01"}}}}"#,
            a.node.ip
        ),
    );
    let good = r#"{"PublicIP":"192.168.100.95","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:95:01"}}"#;
    put("10.5.95.0-24", good);
    assert!(
        wait_for(
            || has_peer(&a, "10.5.95.0/24", "02:00:00:00:95:01", "192.168.100.95"),
            WAIT
        ),
        "{}",
        a.daemon.log()
    );
    assert!(a.daemon.wait_exit(Duration::from_millis(200)).is_none());
    let routes = a.node.ns.exec(&["ip", "-4", "route", "show"]);
    for n in 90..=94 {
        assert!(
            !routes.contains(&format!("10.5.{n}.0/24")),
            "10.5.{n}.0/24 must not be programmed:\n{routes}"
        );
    }
    // An operator must be able to see why a lease is ignored.
    let log = a.daemon.log();
    for n in 90..=92 {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(&format!("10.5.{n}.0-24"))),
            "no warning for the malformed lease 10.5.{n}.0-24:\n{log}"
        );
    }
}
