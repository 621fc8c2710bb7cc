//! `twilld doctor` on nodes built in namespaces with a real etcd: a healthy node is all ok
//! (exit 0), and each broken prerequisite shows as its check's line with exit 1 (warnings)
//! or 2 (failures), while no other check fails.
#![cfg(feature = "root")]

use std::time::Duration;

use twill_tests::etcd::{Etcd, Pki};
use twill_tests::underlay::{wait_for, Member, Node, NodeDirs, Underlay, FLANNEL_PREFIX};

const CONFIG: &str =
    r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.63.0","Backend":{"Type":"vxlan"}}"#;

/// Node dirs whose CNI bin dir also holds the reference `loopback`, as a node prepared for
/// containerd has (twill-portmap comes with twill's plugins).
fn dirs() -> NodeDirs {
    let d = NodeDirs::new();
    let src = std::path::Path::new(twill_tests::bins::REFERENCE_CNI_DIR).join("loopback");
    std::os::unix::fs::symlink(&src, d.cni_bin_dir().join("loopback")).expect("symlink plugin");
    d
}

struct Report {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Report {
    /// The line of `check` (`[status] check: ...`); panics with the report when absent.
    fn line(&self, check: &str) -> &str {
        let tag = format!("] {check}: ");
        self.stdout
            .lines()
            .find(|l| l.starts_with('[') && l.contains(&tag))
            .unwrap_or_else(|| panic!("no {check} line in:\n{}", self.stdout))
    }

    fn lines_with(&self, status: &str) -> Vec<&str> {
        let prefix = format!("[{status}] ");
        self.stdout
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    /// Asserts the exit code, that `check`'s line has `status` and contains `needle`, and
    /// that no other check failed.
    fn expect(&self, code: i32, status: &str, check: &str, needle: &str) {
        let line = self.line(check);
        assert!(
            line.starts_with(&format!("[{status}] {check}: ")) && line.contains(needle),
            "{check} should be {status} mentioning {needle:?}:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        let other_failures: Vec<&str> = self
            .lines_with("fail")
            .into_iter()
            .filter(|l| !l.contains(&format!("] {check}: ")))
            .collect();
        assert!(
            other_failures.is_empty(),
            "only {check} may fail:\n{}",
            self.stdout
        );
        assert_eq!(
            self.code, code,
            "exit code:\n{}\n{}",
            self.stdout, self.stderr
        );
    }
}

/// `twilld doctor --iface=eth0 <dirs' paths> --etcd-endpoints=<endpoint> <extra>` inside the
/// node's namespace, as the DaemonSet pod (hostNetwork) would run it.
fn doctor(node: &Node, dirs: &NodeDirs, endpoint: &str, extra: &[&str]) -> Report {
    let mut argv: Vec<String> = vec![
        "ip".into(),
        "netns".into(),
        "exec".into(),
        node.name().into(),
        twill_tests::bins::bin("twilld").display().to_string(),
        "doctor".into(),
        "--iface=eth0".into(),
        format!("--etcd-endpoints={endpoint}"),
    ];
    argv.extend(dirs.args());
    argv.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = twill_tests::sh::output(&a);
    let r = Report {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    println!(
        "--- twilld doctor on {} (exit {}):\n{}",
        node.name(),
        r.code,
        r.stdout
    );
    r
}

fn member_doctor(m: &Member, etcd: &Etcd, extra: &[&str]) -> Report {
    doctor(&m.node, &m.dirs, &etcd.endpoint(), extra)
}

/// A node that got ready, then twilld stopped (SIGTERM leaves lease, VTEP, rules, subnet.env
/// and conflist in place): a stable node to break one thing on.
fn stopped_member(ul: &Underlay, etcd: &Etcd) -> Member {
    let mut m = Member::start_with(ul, etcd, dirs(), &[]);
    m.wait_ready();
    let status = m.daemon.terminate().expect("twilld exited");
    assert!(status.success(), "{status}");
    m
}

#[test]
fn healthy_node_is_all_ok() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let m = Member::start_with(&ul, &etcd, dirs(), &[]);
    m.wait_ready();
    let r = member_doctor(&m, &etcd, &[]);
    // br_netfilter depends on the machine's kernel, not on twill (built in here).
    let machine_warns = r
        .lines_with("warn")
        .iter()
        .filter(|l| l.starts_with("[warn] module br_netfilter: "))
        .count();
    assert!(
        r.lines_with("warn").len() == machine_warns && r.lines_with("fail").is_empty(),
        "a healthy node must be all ok:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    let want = if machine_warns == 0 { 0 } else { 1 };
    assert_eq!(r.code, want, "{}", r.stdout);
    for check in [
        "module vxlan",
        "module br_netfilter",
        "ip_forward",
        "forward policy",
        "cni config",
        "plugin twill",
        "plugin twill-bridge",
        "plugin twill-host-local",
        "plugin loopback",
        "plugin twill-portmap",
        "etcd",
        "network config",
        "vxlan port",
        "mtu",
        "subnet lease",
        "vtep offload",
        "clock",
    ] {
        r.line(check);
    }
    assert!(
        r.line("vxlan port").contains("held by twill.1"),
        "{}",
        r.stdout
    );
    assert!(r.line("subnet lease").contains(&m.subnet().to_string()));
    assert!(r.line("mtu").contains("pod MTU 1450"));
    assert!(r
        .line("clock")
        .contains("HTTP Date of http://192.168.100.254:2379/version"));

    let j = member_doctor(&m, &etcd, &["--json"]);
    assert_eq!(j.code, want);
    let v: serde_json::Value = serde_json::from_str(&j.stdout).expect("--json prints JSON");
    let list = v.as_array().expect("an array");
    assert_eq!(list.len(), 17, "{}", j.stdout);
    for f in list {
        assert!(f["check"].is_string() && f["message"].is_string(), "{f}");
        if f["check"] == "module br_netfilter" && f["status"] == "warn" {
            assert!(f["fix"].is_string(), "{f}");
            continue;
        }
        assert_eq!(f["status"], "ok", "{f}");
        assert!(f["fix"].is_null(), "{f}");
    }
}

#[test]
fn ip_forward_off_fails() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let m = stopped_member(&ul, &etcd);
    // Only inside the node's namespace.
    m.node.ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    member_doctor(&m, &etcd, &[]).expect(2, "fail", "ip_forward", "net.ipv4.ip_forward = 0");
}

#[test]
fn shadowing_config_fails() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let m = stopped_member(&ul, &etcd);
    std::fs::write(
        m.dirs.cni_conf_dir().join("05-other.conflist"),
        r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge","bridge":"br9"}]}"#,
    )
    .unwrap();
    let r = member_doctor(&m, &etcd, &[]);
    r.expect(2, "fail", "cni config", "05-other.conflist");
    assert!(r
        .line("cni config")
        .contains("sorts before 10-twill.conflist"));
}

#[test]
fn flannel_leftover_config_warns() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let m = stopped_member(&ul, &etcd);
    std::fs::write(
        m.dirs.cni_conf_dir().join("10-flannel.conflist"),
        r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
    )
    .unwrap();
    member_doctor(&m, &etcd, &[]).expect(1, "warn", "cni config", "10-flannel.conflist");
}

#[test]
fn missing_loopback_fails() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let m = stopped_member(&ul, &etcd);
    std::fs::remove_file(m.dirs.cni_bin_dir().join("loopback")).unwrap();
    let r = member_doctor(&m, &etcd, &[]);
    r.expect(2, "fail", "plugin loopback", "not in");
    assert!(r.line("plugin loopback").contains("install-cni"));
}

#[test]
fn unreachable_etcd_fails() {
    let ul = Underlay::new();
    let _etcd = ul.start_etcd(Some(CONFIG));
    let node = ul.add_node();
    let d = dirs();
    // Right host, no etcd on that port.
    let r = doctor(&node, &d, "http://192.168.100.254:2399", &[]);
    r.expect(2, "fail", "etcd", "connection refused");
    assert!(r.line("network config").starts_with("[warn]"));
    assert!(r.line("clock").contains("cannot measure"), "{}", r.stdout);
}

#[test]
fn etcd_tls_right_and_wrong_client_cert() {
    let ul = Underlay::new();
    let ip = ul.etcd_ip().to_string();
    let pki = Pki::new(&ip);
    let other = Pki::new(&ip);
    let etcd = Etcd::start_in_tls(ul.ns_name(), &ip, &pki);
    etcd.etcdctl(&["put", &format!("{FLANNEL_PREFIX}/config"), CONFIG]);
    let node = ul.add_node();
    let d = dirs();
    let flags = |t: &twill_tests::etcd::TlsFiles, ca: &std::path::Path| {
        vec![
            format!("--etcd-cafile={}", ca.display()),
            format!("--etcd-certfile={}", t.client_cert.display()),
            format!("--etcd-keyfile={}", t.client_key.display()),
        ]
    };
    let good = flags(&pki.files(), &pki.files().ca);
    let g: Vec<&str> = good.iter().map(String::as_str).collect();
    let r = doctor(&node, &d, &etcd.endpoint(), &g);
    assert!(
        r.line("etcd").starts_with("[ok] etcd: https://"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(r.line("network config").starts_with("[ok]"), "{}", r.stdout);
    // The clock is measured over TLS with the same certificates.
    assert!(
        r.line("clock").starts_with("[ok] clock: local clock"),
        "{}",
        r.stdout
    );

    // A client certificate from another CA: etcd's --client-cert-auth rejects it.
    let bad = flags(&other.files(), &pki.files().ca);
    let b: Vec<&str> = bad.iter().map(String::as_str).collect();
    doctor(&node, &d, &etcd.endpoint(), &b).expect(2, "fail", "etcd", "TLS failed");
}

#[test]
fn missing_network_config_fails() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(None);
    let node = ul.add_node();
    let r = doctor(&node, &dirs(), &etcd.endpoint(), &[]);
    r.expect(
        2,
        "fail",
        "network config",
        "/coreos.com/network/config does not exist",
    );
    assert!(r.line("etcd").starts_with("[ok]"));
}

#[test]
fn taken_vxlan_port_fails() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let node = ul.add_node();
    // A leftover flannel VTEP holds 8472.
    node.ns.exec(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        "eth0",
    ]);
    node.ns.exec(&["ip", "link", "set", "flannel.1", "up"]);
    doctor(&node, &dirs(), &etcd.endpoint(), &[]).expect(
        2,
        "fail",
        "vxlan port",
        "UDP 8472 is in use",
    );
}

#[test]
fn subnet_env_mismatching_the_lease_fails() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let m = stopped_member(&ul, &etcd);
    let leased = m.subnet();
    // 10.5.200.0/24 is outside SubnetMax, so no node of this test holds it.
    let env: String = m
        .env()
        .lines()
        .map(|l| {
            if l.starts_with("FLANNEL_SUBNET=") {
                "FLANNEL_SUBNET=10.5.200.1/24\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(m.dirs.subnet_file(), env).unwrap();
    let r = member_doctor(&m, &etcd, &[]);
    r.expect(
        2,
        "fail",
        "subnet lease",
        "has 10.5.200.0/24 but etcd leases",
    );
    assert!(
        r.line("subnet lease")
            .contains(&format!("leases {leased} to 192.168.100.1")),
        "{}",
        r.stdout
    );
}

#[test]
fn forward_drop_without_twill_fwd_warns_until_twilld_covers_it() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let mut m = stopped_member(&ul, &etcd);
    // Docker's FORWARD policy, inside the node's namespace only.
    m.node.ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    member_doctor(&m, &etcd, &[]).expect(
        1,
        "warn",
        "forward policy",
        "FORWARD drops in iptables-nft",
    );

    // twilld puts TWILL-FWD where the drop is; then the check is ok again.
    m.restart(&etcd, &["--reconcile-interval=1"]);
    let covered = wait_for(
        || {
            let r = member_doctor(&m, &etcd, &[]);
            r.line("forward policy").starts_with("[ok]") && r.code == 0
        },
        Duration::from_secs(30),
    );
    assert!(covered, "twilld log:\n{}", m.daemon.log());
}

#[test]
fn native_nft_forward_drop_warns_until_twilld_covers_it() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let mut m = stopped_member(&ul, &etcd);
    // A host firewall's own table, inside the node's namespace only.
    m.node.ns.exec(&["nft", "add", "table", "inet", "hostfw"]);
    m.node.ns.exec(&[
        "nft",
        "add chain inet hostfw fwchain { type filter hook forward priority 0; policy drop; }",
    ]);
    member_doctor(&m, &etcd, &[]).expect(
        1,
        "warn",
        "forward policy",
        "nft inet hostfw fwchain has policy drop",
    );
    m.restart(&etcd, &["--reconcile-interval=1"]);
    let covered = wait_for(
        || {
            let r = member_doctor(&m, &etcd, &[]);
            r.line("forward policy").starts_with("[ok]") && r.code == 0
        },
        Duration::from_secs(30),
    );
    assert!(covered, "twilld log:\n{}", m.daemon.log());
}

#[test]
fn backend_mtu_above_the_underlay_warns() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","MTU":9000}}"#,
    ));
    let node = ul.add_node();
    doctor(&node, &dirs(), &etcd.endpoint(), &[]).expect(
        1,
        "warn",
        "mtu",
        "Backend.MTU 9000 is larger than eth0's MTU 1500",
    );
}

#[test]
fn etcd_auth_failures_fail() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    etcd.etcdctl(&["user", "add", "root:rootpw"]);
    etcd.etcdctl(&["auth", "enable"]);
    let node = ul.add_node();
    let d = dirs();
    let ok = doctor(
        &node,
        &d,
        &etcd.endpoint(),
        &["--etcd-username=root", "--etcd-password=rootpw"],
    );
    assert!(
        ok.line("etcd").starts_with("[ok] etcd:") && ok.line("etcd").contains("user root"),
        "{}\n{}",
        ok.stdout,
        ok.stderr
    );
    assert!(ok.line("network config").starts_with("[ok]"));
    for creds in [
        &["--etcd-username=root", "--etcd-password=wrong"][..],
        &[][..],
    ] {
        doctor(&node, &d, &etcd.endpoint(), creds).expect(
            2,
            "fail",
            "etcd",
            "authentication or permission denied",
        );
    }
}
