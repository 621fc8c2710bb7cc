//! `twilld init-network` against a real etcd: writes `<prefix>/config` once, accepts an equal
//! config (also one flannel wrote), refuses a different one unless `--force`, lets exactly one
//! of several concurrent runs win, validates before writing, and speaks TLS with client certs
//! like the manifest's Job does.
#![cfg(feature = "root")]

use std::fs;
use std::process::{Child, Output, Stdio};

use serde_json::{json, Value};
use twill_tests::deploy::twilld;
use twill_tests::etcd::{Etcd, Pki};

const KEY: &str = "/coreos.com/network/config";

fn init_network(endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    twilld()
        .args(["init-network", "--etcd-endpoints", endpoint])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("spawn twilld init-network")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stored(etcd: &Etcd, key: &str) -> Option<Value> {
    etcd.get(key)
        .map(|v| serde_json::from_str(&v).expect("stored config is JSON"))
}

fn mod_revision(etcd: &Etcd, key: &str) -> i64 {
    let out = etcd.etcdctl(&["get", key, "-w", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["kvs"][0]["mod_revision"].as_i64().unwrap_or(0)
}

#[test]
fn writes_once_then_accepts_equal_and_refuses_different() {
    let etcd = Etcd::start_loopback();
    let ep = etcd.endpoint();

    let out = init_network(&ep, &["--network", "10.244.0.0/16"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stored(&etcd, KEY),
        Some(json!({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}))
    );
    let rev = mod_revision(&etcd, KEY);

    // Same request again (a re-run Job): success, nothing written.
    let out = init_network(
        &ep,
        &["--network", "10.244.0.0/16", "--backend", "vxlan"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        mod_revision(&etcd, KEY),
        rev,
        "an equal config was rewritten"
    );

    // A different network: refused, the stored config stays.
    let out = init_network(&ep, &["--network", "10.50.0.0/16"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{}",
        text(&out)
    );
    assert_eq!(mod_revision(&etcd, KEY), rev);
    let out = init_network(
        &ep,
        &["--network", "10.244.0.0/16", "--backend", "host-gw"],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(mod_revision(&etcd, KEY), rev);

    // --force replaces it (flags also come from the environment).
    let out = init_network(
        &ep,
        &[],
        &[
            ("TWILLD_NETWORK", "10.50.0.0/16"),
            ("TWILLD_BACKEND", "host-gw"),
            ("TWILLD_SUBNET_LEN", "26"),
            ("TWILLD_FORCE", "true"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stored(&etcd, KEY),
        Some(json!({"Network": "10.50.0.0/16", "SubnetLen": 26, "Backend": {"Type": "host-gw"}}))
    );
}

#[test]
fn a_config_flannel_wrote_counts_as_equal() {
    let etcd = Etcd::start_loopback();
    let ep = etcd.endpoint();
    // Go's case-insensitive keys and an upper-case backend type, as an admin may have typed it.
    let flannel = r#"{"network":"10.244.0.0/16","backend":{"type":"VXLAN"}}"#;
    etcd.etcdctl(&["put", KEY, flannel]);
    let rev = mod_revision(&etcd, KEY);

    let out = init_network(&ep, &["--network", "10.244.0.0/16"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        etcd.get(KEY).as_deref(),
        Some(flannel),
        "flannel's config was rewritten"
    );
    assert_eq!(mod_revision(&etcd, KEY), rev);

    // flannel's defaults spelled out are the same network too.
    let explicit = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;
    etcd.etcdctl(&["put", KEY, explicit]);
    let rev = mod_revision(&etcd, KEY);
    let out = init_network(&ep, &["--network", "10.244.0.0/16"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mod_revision(&etcd, KEY), rev);
    // ... but another VNI is not.
    let vni2 = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#;
    etcd.etcdctl(&["put", KEY, vni2]);
    let out = init_network(&ep, &["--network", "10.244.0.0/16"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(etcd.get(KEY).as_deref(), Some(vni2));
}

#[test]
fn config_file_and_custom_prefix() {
    let etcd = Etcd::start_loopback();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net-conf.json");
    // The ConfigMap's net-conf.json, pretty-printed as in the manifest.
    let conf = "{\n  \"Network\": \"10.244.0.0/16\",\n  \"Backend\": {\"Type\": \"vxlan\", \"VNI\": 1}\n}\n";
    fs::write(&file, conf).unwrap();
    let file_arg = file.to_str().unwrap();
    let args = [
        "--etcd-prefix",
        "/twill-test/network/",
        "--config-file",
        file_arg,
    ];

    let out = init_network(&ep, &args, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stored(&etcd, KEY), None, "wrote under the default prefix");
    let key = "/twill-test/network/config";
    assert_eq!(
        stored(&etcd, key),
        Some(json!({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1}}))
    );
    let rev = mod_revision(&etcd, key);
    let out = init_network(&ep, &args, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mod_revision(&etcd, key), rev);

    // --network and --config-file exclude each other; one of them is required. Both are
    // usage errors (clap's exit code 2) that write nothing.
    let out = init_network(
        &ep,
        &["--network", "10.1.0.0/16", "--config-file", file_arg],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = init_network(&ep, &[], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(mod_revision(&etcd, key), rev);
}

#[test]
fn invalid_configs_write_nothing() {
    let etcd = Etcd::start_loopback();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let bad_json = dir.path().join("bad.json");
    fs::write(&bad_json, "{\"Network\": ").unwrap();
    let udp = dir.path().join("udp.json");
    fs::write(
        &udp,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
    )
    .unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--network", "10.244.0.0/29"],
        vec!["--network", "10.244.0.0/16", "--subnet-len", "17"],
        vec!["--network", "10.244.0.0/16", "--subnet-len", "31"],
        vec!["--network", "not-a-cidr"],
        vec!["--network", "10.244.1.0/16"],
        vec!["--network", "10.244.0.0/16", "--backend", "udp"],
        vec!["--config-file", bad_json.to_str().unwrap()],
        vec!["--config-file", udp.to_str().unwrap()],
        vec!["--config-file", "/nonexistent/twill/net-conf.json"],
    ];
    for args in cases {
        let out = init_network(&ep, &args, &[]);
        assert!(!out.status.success(), "{args:?} accepted: {}", text(&out));
        assert!(!out.stderr.is_empty(), "{args:?}: no error message");
    }
    assert!(etcd.get_prefix("/coreos.com/network").is_empty());
}

#[test]
fn concurrent_runs_have_exactly_one_winner() {
    let etcd = Etcd::start_loopback();
    let ep = etcd.endpoint();
    let children: Vec<(String, Child)> = (10..16)
        .map(|i| {
            let net = format!("10.{i}.0.0/16");
            let child = twilld()
                .args(["init-network", "--etcd-endpoints", &ep, "--network", &net])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn init-network");
            (net, child)
        })
        .collect();
    let mut winners = Vec::new();
    for (net, child) in children {
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            winners.push(net);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        stored(&etcd, KEY).unwrap()["Network"],
        Value::String(winners[0].clone())
    );
}

#[test]
fn unreachable_etcd_is_an_error() {
    // A port nothing listens on: bind and drop a listener to find one.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = init_network(
        &format!("http://127.0.0.1:{port}"),
        &["--network", "10.244.0.0/16"],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("etcd"),
        "{}",
        text(&out)
    );
}

#[test]
fn tls_with_client_certificate() {
    let pki = Pki::new("127.0.0.1");
    let etcd = Etcd::start_loopback_tls(&pki);
    let ca = pki.files().ca;
    let ca = ca.to_str().unwrap();

    // Without a client certificate etcd refuses the request; nothing is written.
    let out = init_network(
        &etcd.endpoint(),
        &["--network", "10.244.0.0/16", "--etcd-cafile", ca],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let got = etcd.etcdctl_output(&["get", KEY, "--print-value-only"]);
    assert!(
        got.status.success() && got.stdout.is_empty(),
        "the refused run wrote the config: {}",
        text(&got)
    );

    // The manifest's way: files from the Secret, given through the environment.
    let cert = pki.files().client_cert;
    let key = pki.files().client_key;
    let out = init_network(
        &etcd.endpoint(),
        &["--network", "10.244.0.0/16"],
        &[
            ("TWILLD_ETCD_CAFILE", ca),
            ("TWILLD_ETCD_CERTFILE", cert.to_str().unwrap()),
            ("TWILLD_ETCD_KEYFILE", key.to_str().unwrap()),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let got = etcd.etcdctl_output(&["get", KEY, "--print-value-only"]);
    assert!(got.status.success(), "{}", text(&got));
    let v: Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(
        v,
        json!({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    );

    // Only half a client identity is a usage error.
    let out = init_network(
        &etcd.endpoint(),
        &[
            "--network",
            "10.244.0.0/16",
            "--etcd-cafile",
            ca,
            "--etcd-certfile",
            cert.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--etcd-keyfile"),
        "{}",
        text(&out)
    );
}
