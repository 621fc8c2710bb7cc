//! Docker hosts: `filter FORWARD` with policy DROP, set through iptables-nft and through
//! iptables-legacy inside the node namespaces. Pods on two twill nodes still reach each other
//! (twilld's `TWILL-FWD` chain, jumped from `filter FORWARD`), a flushed chain or deleted jump
//! comes back on the next reconcile pass, and nothing of twill's is on the forward path when
//! nothing drops. The same for a native nftables firewall chain with `policy drop`.
#![cfg(feature = "root")]

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{json, Value};
use twill_tests::etcd::Etcd;
use twill_tests::netns::{veth_pair, Netns};
use twill_tests::underlay::{
    add_pod_bridge, ping_from, wait_for, Member, NodeDirs, Twilld, Underlay,
};

const CONFIG: &str =
    r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.63.0","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(30);
/// A reconcile pass every second, so repairs show quickly.
const FAST: &str = "--reconcile-interval=1";
/// twilld's jump from FORWARD, as iptables-save prints it.
const JUMP: &str = r#"-A FORWARD -m comment --comment "twill forward" -j TWILL-FWD"#;
const CHAIN_RULES: [&str; 2] = [
    r#"-A TWILL-FWD -s 10.5.0.0/16 -m comment --comment "twill forward" -j ACCEPT"#,
    r#"-A TWILL-FWD -d 10.5.0.0/16 -m comment --comment "twill forward" -j ACCEPT"#,
];

/// One iptables backend, always run inside a node namespace.
#[derive(Clone, Copy)]
struct Ipt {
    bin: &'static str,
    save: &'static str,
}

const IPT_NFT: Ipt = Ipt {
    bin: "iptables-nft",
    save: "iptables-nft-save",
};
const IPT_LEGACY: Ipt = Ipt {
    bin: "iptables-legacy",
    save: "iptables-legacy-save",
};

impl Ipt {
    fn run(self, ns: &Netns, args: &[&str]) {
        ns.exec(&[&[self.bin, "-w", "5"], args].concat());
    }

    /// The filter table's lines (policies and rules). For legacy only when the table exists:
    /// `iptables-legacy-save -t filter` would create it.
    fn filter(self, ns: &Netns) -> Vec<String> {
        if self.bin == IPT_LEGACY.bin && !has_legacy_filter(ns) {
            return Vec::new();
        }
        ns.exec(&[self.save, "-t", "filter"])
            .lines()
            .filter(|l| l.starts_with('-') || l.starts_with(':'))
            .map(str::to_string)
            .collect()
    }

    /// Whether twill's chain holds exactly its two rules and FORWARD jumps to it.
    fn installed(self, ns: &Netns) -> bool {
        let f = self.filter(ns);
        let chain: Vec<&str> = f
            .iter()
            .map(String::as_str)
            .filter(|l| l.starts_with("-A TWILL-FWD "))
            .collect();
        chain == CHAIN_RULES && f.iter().filter(|l| *l == JUMP).count() == 1
    }

    /// Whether neither twill's chain nor a jump to it exists.
    fn absent(self, ns: &Netns) -> bool {
        !self
            .filter(ns)
            .iter()
            .any(|l| l.contains("TWILL-FWD") || l.contains("twill forward"))
    }
}

fn has_legacy_filter(ns: &Netns) -> bool {
    String::from_utf8_lossy(&ns.output(&["cat", "/proc/net/ip_tables_names"]).stdout)
        .lines()
        .any(|l| l.trim() == "filter")
}

/// A pod: a namespace behind the node's `cni0`, so its traffic is forwarded by the node.
struct Pod {
    ns: Netns,
    ip: Ipv4Addr,
}

fn add_pod(m: &Member) -> Pod {
    let subnet = m.subnet();
    let gw = add_pod_bridge(&m.node.ns, subnet);
    let ns = Netns::new("p");
    veth_pair(&m.node.ns, "vpod", &ns, "eth0");
    m.node
        .ns
        .exec(&["ip", "link", "set", "vpod", "master", "cni0"]);
    let ip = Ipv4Addr::from(u32::from(gw) + 1);
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{ip}/{}", subnet.prefix()),
        "dev",
        "eth0",
    ]);
    ns.exec(&["ip", "route", "add", "default", "via", &gw.to_string()]);
    Pod { ns, ip }
}

fn reach(from: &Pod, to: &Pod) -> bool {
    ping_from(&from.ns, &from.ip.to_string(), &to.ip.to_string())
}

/// Both directions, waiting for reconcile passes to catch up.
fn pods_reach_each_other(a: &Pod, b: &Pod) -> bool {
    wait_for(|| reach(a, b) && reach(b, a), WAIT)
}

/// A node whose `filter FORWARD` policy is DROP (set through `ipt`) before twilld starts.
fn start_on_docker_host(ul: &Underlay, etcd: &Etcd, ipt: Ipt) -> Member {
    let node = ul.add_node();
    ipt.run(&node.ns, &["-P", "FORWARD", "DROP"]);
    let dirs = NodeDirs::new();
    let daemon = Twilld::start(
        node.name(),
        &dirs,
        &etcd.endpoint(),
        &["--iface=eth0", FAST],
    );
    Member { node, dirs, daemon }
}

fn meshed(a: &Member, b: &Member) {
    a.wait_ready();
    b.wait_ready();
    assert!(
        wait_for(|| a.sees(b) && b.sees(a), WAIT),
        "{:?}\n{:?}",
        a.vtep_state(),
        b.vtep_state()
    );
}

fn twill_table(m: &Member) -> String {
    m.node.ns.exec(&["nft", "list", "table", "ip", "twill"])
}

fn state(m: &Member, ipt: Ipt) -> String {
    format!(
        "{} filter:\n{}\nlog:\n{}",
        ipt.bin,
        ipt.filter(&m.node.ns).join("\n"),
        m.daemon.log()
    )
}

fn forward_drop(ipt: Ipt, other: Ipt) {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    // a: DROP before twilld starts. b: DROP after twilld is ready (Docker started later).
    let a = start_on_docker_host(&ul, &etcd, ipt);
    let b = Member::start(&ul, &etcd, &[FAST]);
    meshed(&a, &b);
    // Ready means the accept is in place already.
    assert!(ipt.installed(&a.node.ns), "{}", state(&a, ipt));
    ipt.run(&b.node.ns, &["-P", "FORWARD", "DROP"]);

    let pa = add_pod(&a);
    let pb = add_pod(&b);
    assert!(
        pods_reach_each_other(&pa, &pb),
        "pods {} and {} cannot reach each other\n{}\n{}",
        pa.ip,
        pb.ip,
        state(&a, ipt),
        state(&b, ipt)
    );
    assert!(
        wait_for(|| ipt.installed(&b.node.ns), WAIT),
        "{}",
        state(&b, ipt)
    );
    for m in [&a, &b] {
        let table = twill_table(m);
        assert!(!table.contains("hook forward"), "{table}");
        // Only where the drop is: the other backend gets nothing (for legacy: not even a
        // filter table, which would hook every packet).
        assert!(other.absent(&m.node.ns), "{}", state(m, other));
        if other.bin == IPT_LEGACY.bin {
            assert!(!has_legacy_filter(&m.node.ns));
        }
    }

    // Flushed chain (a) and deleted jump (b) come back on the next reconcile pass.
    ipt.run(&a.node.ns, &["-F", "TWILL-FWD"]);
    ipt.run(
        &b.node.ns,
        &[
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "twill forward",
            "-j",
            "TWILL-FWD",
        ],
    );
    assert!(
        wait_for(|| ipt.installed(&a.node.ns), WAIT),
        "{}",
        state(&a, ipt)
    );
    assert!(
        wait_for(|| ipt.installed(&b.node.ns), WAIT),
        "{}",
        state(&b, ipt)
    );
    assert!(pods_reach_each_other(&pa, &pb));

    // Policy back to ACCEPT: twill removes its chain and jump, and only those.
    ipt.run(&a.node.ns, &["-N", "USER-FWD"]);
    ipt.run(
        &a.node.ns,
        &["-A", "USER-FWD", "-s", "10.5.0.0/16", "-j", "RETURN"],
    );
    ipt.run(&a.node.ns, &["-A", "FORWARD", "-j", "USER-FWD"]);
    ipt.run(&a.node.ns, &["-P", "FORWARD", "ACCEPT"]);
    assert!(
        wait_for(|| ipt.absent(&a.node.ns), WAIT),
        "{}",
        state(&a, ipt)
    );
    let f = ipt.filter(&a.node.ns);
    for want in [
        ":USER-FWD - [0:0]",
        "-A USER-FWD -s 10.5.0.0/16 -j RETURN",
        "-A FORWARD -j USER-FWD",
    ] {
        assert!(
            f.iter().any(|l| l == want || l.starts_with(want)),
            "{want:?} missing: {f:?}"
        );
    }
    assert!(pods_reach_each_other(&pa, &pb));
    // b still drops: its accept stays.
    assert!(ipt.installed(&b.node.ns), "{}", state(&b, ipt));
}

#[test]
fn forward_drop_through_iptables_nft() {
    forward_drop(IPT_NFT, IPT_LEGACY);
}

#[test]
fn forward_drop_through_iptables_legacy() {
    forward_drop(IPT_LEGACY, IPT_NFT);
}

#[test]
fn nothing_on_the_forward_path_when_nothing_drops() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let a = Member::start(&ul, &etcd, &[FAST, "--ip-masq"]);
    let b = Member::start(&ul, &etcd, &[FAST]);
    // b: an iptables-nft filter table with Docker's chains but policy ACCEPT.
    IPT_NFT.run(&b.node.ns, &["-N", "DOCKER-USER"]);
    IPT_NFT.run(&b.node.ns, &["-A", "FORWARD", "-j", "DOCKER-USER"]);
    meshed(&a, &b);
    let pa = add_pod(&a);
    let pb = add_pod(&b);
    assert!(pods_reach_each_other(&pa, &pb));
    for m in [&a, &b] {
        for ipt in [IPT_NFT, IPT_LEGACY] {
            assert!(ipt.absent(&m.node.ns), "{}", state(m, ipt));
        }
        assert!(
            !has_legacy_filter(&m.node.ns),
            "twilld created a legacy table"
        );
        let table = twill_table(m);
        assert!(!table.contains("hook forward"), "{table}");
    }
    // The masquerade rules stay as they are.
    assert!(
        twill_table(&a).contains("type nat hook postrouting priority srcnat"),
        "{}",
        twill_table(&a)
    );
    assert!(IPT_NFT
        .filter(&b.node.ns)
        .contains(&"-A FORWARD -j DOCKER-USER".to_string()));
}

/// Runs `nft -j -f <file>` in `ns` with `{"nftables": cmds}`: JSON, because the chain is
/// named `fwd`, a keyword nft's text syntax cannot take as a name.
fn nft_json(ns: &Netns, cmds: Value) {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), json!({ "nftables": cmds }).to_string()).expect("write nft json");
    ns.exec(&["nft", "-j", "-f", &f.path().display().to_string()]);
}

/// A host firewall's forward chain `inet hostfw fwd` with `policy` and one rule of its own.
fn host_firewall(ns: &Netns, policy: &str) {
    nft_json(
        ns,
        json!([
            {"add": {"table": {"family": "inet", "name": "hostfw"}}},
            {"add": {"chain": {"family": "inet", "table": "hostfw", "name": "fwd",
                "type": "filter", "hook": "forward", "prio": 0, "policy": policy}}},
        ]),
    );
}

/// The firewall's own rule, which twilld must never touch.
const FW_RULE: &str = "ct state invalid drop";

fn fw_rule(ns: &Netns) {
    nft_json(
        ns,
        json!([{"add": {"rule": {"family": "inet", "table": "hostfw", "chain": "fwd",
            "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
                     {"drop": null}]}}}]),
    );
}
/// twilld's accepts, as `nft list` prints them.
const NFT_ACCEPTS: [&str; 2] = [
    r#"ip saddr 10.5.0.0/16 accept comment "twill forward""#,
    r#"ip daddr 10.5.0.0/16 accept comment "twill forward""#,
];

fn hostfw(m: &Member) -> String {
    m.node
        .ns
        .exec(&["nft", "-a", "list", "table", "inet", "hostfw"])
}

/// Rules of the firewall chain without their handles, in order.
fn hostfw_rules(m: &Member) -> Vec<String> {
    hostfw(m)
        .lines()
        .map(|l| l.split(" # handle").next().unwrap_or("").trim().to_string())
        .filter(|l| {
            !l.is_empty()
                && !["table ", "chain ", "type ", "}"]
                    .iter()
                    .any(|p| l.starts_with(p))
        })
        .collect()
}

fn has_nft_accepts(m: &Member) -> bool {
    let r = hostfw_rules(m);
    r.len() == 3 && r[..2] == NFT_ACCEPTS && r[2] == FW_RULE
}

#[test]
fn forward_drop_in_a_native_nftables_chain() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    // a: the firewall drops before twilld starts; b: only after twilld is ready.
    let node = ul.add_node();
    host_firewall(&node.ns, "drop");
    fw_rule(&node.ns);
    let dirs = NodeDirs::new();
    let daemon = Twilld::start(
        node.name(),
        &dirs,
        &etcd.endpoint(),
        &["--iface=eth0", FAST],
    );
    let a = Member { node, dirs, daemon };
    let b = Member::start(&ul, &etcd, &[FAST]);
    meshed(&a, &b);
    assert!(has_nft_accepts(&a), "{}\n{}", hostfw(&a), a.daemon.log());
    host_firewall(&b.node.ns, "drop");
    fw_rule(&b.node.ns);

    let pa = add_pod(&a);
    let pb = add_pod(&b);
    assert!(
        pods_reach_each_other(&pa, &pb),
        "{}\n{}\n{}",
        hostfw(&a),
        hostfw(&b),
        b.daemon.log()
    );
    assert!(wait_for(|| has_nft_accepts(&b), WAIT), "{}", hostfw(&b));
    for m in [&a, &b] {
        assert!(IPT_NFT.absent(&m.node.ns), "{}", state(m, IPT_NFT));
        assert!(!has_legacy_filter(&m.node.ns));
        assert!(!twill_table(m).contains("hook forward"));
    }

    // One accept deleted by hand comes back, the firewall's rule untouched.
    let listing = hostfw(&a);
    let handle: u64 = listing
        .lines()
        .find(|l| l.contains(NFT_ACCEPTS[0]))
        .and_then(|l| l.rsplit("# handle ").next())
        .and_then(|h| h.trim().parse().ok())
        .unwrap_or_else(|| panic!("no handle in {listing}"));
    nft_json(
        &a.node.ns,
        json!([{"delete": {"rule": {"family": "inet", "table": "hostfw", "chain": "fwd",
            "handle": handle}}}]),
    );
    assert!(wait_for(|| has_nft_accepts(&a), WAIT), "{}", hostfw(&a));
    assert!(pods_reach_each_other(&pa, &pb));

    // Policy accept: twilld's rules go, the firewall's stays.
    host_firewall(&a.node.ns, "accept");
    assert!(
        wait_for(|| hostfw_rules(&a) == [FW_RULE], WAIT),
        "{}",
        hostfw(&a)
    );
    assert!(pods_reach_each_other(&pa, &pb));
}
