//! Interop with Debian's reference plugins (v1.1.1 in /usr/lib/cni), driven through libcni
//! (`cniharness`) like containerd: portmap chained after twill-bridge, the reference bridge
//! using twill-host-local, and the host-local store shared in both directions.

use serde_json::{json, Value};
use twill_tests::bins::{target_dir, REFERENCE_CNI_DIR};
use twill_tests::cni::{
    eventually, exec, harness_run, host_veths, reference, reservations, twill, Invocation,
};
use twill_tests::netns::Netns;

fn write_conflist(dir: &std::path::Path, list: &Value) {
    std::fs::write(dir.join("10-test.conflist"), list.to_string()).unwrap();
}

/// Listens on `port` inside `pod`, connects to `target` from inside `node`, and returns what
/// the pod received. Each side runs on a short-lived thread that entered its namespace.
fn through_host_port(node: &Netns, pod: &Netns, target: &str, port: u16) -> String {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};
    let pod_ns = twill_common::netns::open(std::path::Path::new(&pod.path())).unwrap();
    let listener =
        twill_common::netns::run_in(Some(pod_ns), move || TcpListener::bind(("0.0.0.0", port)))
            .unwrap()
            .expect("listen in pod");
    listener.set_nonblocking(true).unwrap();
    let node_ns = twill_common::netns::open(std::path::Path::new(&node.path())).unwrap();
    let target: std::net::SocketAddr = target.parse().unwrap();
    let client = std::thread::spawn(move || {
        twill_common::netns::enter(&node_ns).unwrap();
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .expect("connect to host port");
        s.write_all(b"hello-through-portmap").unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = String::new();
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.read_to_string(&mut got);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    client.join().expect("client thread");
    got
}

fn bin_path() -> String {
    format!("{}:{}", target_dir().display(), REFERENCE_CNI_DIR)
}

#[test]
fn reference_portmap_chained_after_twill_bridge() {
    let node = Netns::new("ni");
    let pod = Netns::new("pi");
    let conf = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write_conflist(
        conf.path(),
        &json!({"cniVersion": "1.0.0", "name": "twpm", "plugins": [
            {"type": "twill-bridge", "bridge": "twpmbr0", "isGateway": true, "ipMasq": true,
             "ipam": {"type": "twill-host-local", "subnet": "10.230.0.0/24", "dataDir": data.path()}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]}),
    );
    let cache_s = cache.path().display().to_string();
    let ports = r#"[{"hostPort":18080,"containerPort":80,"protocol":"tcp"}]"#;
    let add = harness_run(
        &node,
        "add",
        conf.path(),
        &bin_path(),
        &pod,
        "pm1",
        &["-ports", ports, "-cache", &cache_s],
    );
    let res = add.ok();
    let pod_ip = res["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let nat = node.exec(&["iptables-save", "-t", "nat"]);
    assert!(
        nat.contains(&format!("{pod_ip}:80")),
        "portmap DNAT for the pod: {nat}"
    );

    // A connection to the host port on the node arrives in the pod.
    assert_eq!(
        through_host_port(&node, &pod, "10.230.0.1:18080", 80),
        "hello-through-portmap"
    );

    // No CHECK through this list: Debian's portmap 1.1.1 fails CHECK on nft-backed ip6tables
    // ("could not check ipv6 dnat: chain CNI-DN-... not found"), with the reference bridge too.
    harness_run(
        &node,
        "del",
        conf.path(),
        &bin_path(),
        &pod,
        "pm1",
        &["-ports", ports, "-cache", &cache_s],
    )
    .ok();
    let nat = node.exec(&["iptables-save", "-t", "nat"]);
    assert!(
        !nat.contains(&format!("{pod_ip}:80")),
        "portmap rules removed"
    );
    assert!(reservations(data.path(), "twpm").is_empty());
    assert!(eventually(10, || host_veths(&node).is_empty()));
}

#[test]
fn reference_bridge_with_twill_host_local() {
    let node = Netns::new("nr");
    let pod = Netns::new("pr");
    let conf = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write_conflist(
        conf.path(),
        &json!({"cniVersion": "0.4.0", "name": "twrb", "plugins": [
            {"type": "bridge", "bridge": "twrbbr0", "isGateway": true,
             "ipam": {"type": "twill-host-local", "subnet": "10.231.0.0/24", "dataDir": data.path(),
                      "routes": [{"dst": "0.0.0.0/0", "gw": "10.231.0.1"}]}}
        ]}),
    );
    let cache_s = cache.path().display().to_string();
    let res = harness_run(
        &node,
        "add",
        conf.path(),
        &bin_path(),
        &pod,
        "rb1",
        &["-cache", &cache_s],
    )
    .ok();
    assert_eq!(res["ips"][0]["address"], "10.231.0.2/24");
    assert_eq!(reservations(data.path(), "twrb"), ["10.231.0.2"]);
    pod.exec(&["ping", "-c1", "-W2", "10.231.0.1"]);
    harness_run(
        &node,
        "check",
        conf.path(),
        &bin_path(),
        &pod,
        "rb1",
        &["-cache", &cache_s],
    )
    .ok();
    harness_run(
        &node,
        "del",
        conf.path(),
        &bin_path(),
        &pod,
        "rb1",
        &["-cache", &cache_s],
    )
    .ok();
    assert!(reservations(data.path(), "twrb").is_empty());
}

#[test]
fn host_local_store_is_shared_both_ways() {
    let data = tempfile::tempdir().unwrap();
    let pod = Netns::new("ps");
    let conf = json!({"cniVersion": "0.4.0", "name": "twshare", "type": "host-local",
        "ipam": {"type": "host-local", "subnet": "10.232.0.0/24", "dataDir": data.path()}});
    let ours = twill("twill-host-local");
    let theirs = reference("host-local");
    let inv = |cmd: &str, id: &str| Invocation::new(cmd, id, &pod.path());
    let ip_of = |v: &Value| v["ips"][0]["address"].as_str().unwrap().to_string();

    // Reference writes, twill reads and continues round-robin.
    assert_eq!(
        ip_of(&exec(None, &theirs, &inv("ADD", "r1"), &conf).ok()),
        "10.232.0.2/24"
    );
    assert_eq!(
        ip_of(&exec(None, &theirs, &inv("ADD", "r2"), &conf).ok()),
        "10.232.0.3/24"
    );
    exec(None, &ours, &inv("CHECK", "r1"), &conf).ok();
    assert_eq!(
        ip_of(&exec(None, &ours, &inv("ADD", "t1"), &conf).ok()),
        "10.232.0.4/24"
    );
    let dup = exec(None, &ours, &inv("ADD", "r2"), &conf);
    assert!(
        dup.stdout.contains("duplicate allocation"),
        "{}",
        dup.stdout
    );
    exec(None, &ours, &inv("DEL", "r1"), &conf).ok();
    assert!(!reservations(data.path(), "twshare").contains(&"10.232.0.2".to_string()));

    // twill writes, the reference reads and continues.
    exec(None, &theirs, &inv("CHECK", "t1"), &conf).ok();
    assert_eq!(
        ip_of(&exec(None, &theirs, &inv("ADD", "r3"), &conf).ok()),
        "10.232.0.5/24"
    );
    exec(None, &theirs, &inv("DEL", "t1"), &conf).ok();
    assert!(!reservations(data.path(), "twshare").contains(&"10.232.0.4".to_string()));
    assert_eq!(
        std::fs::read_to_string(data.path().join("twshare/last_reserved_ip.0"))
            .unwrap()
            .trim(),
        "10.232.0.5"
    );

    // A legacy id-only file (pre-ifname reference versions) is released by container ID.
    std::fs::write(data.path().join("twshare/10.232.0.200"), "legacy1").unwrap();
    exec(None, &ours, &inv("CHECK", "legacy1"), &conf).ok();
    exec(None, &ours, &inv("DEL", "legacy1"), &conf).ok();
    assert!(!reservations(data.path(), "twshare").contains(&"10.232.0.200".to_string()));
    for id in ["r2", "r3"] {
        exec(None, &ours, &inv("DEL", id), &conf).ok();
    }
    assert!(reservations(data.path(), "twshare").is_empty());
}

#[test]
fn containerd_style_conflist_add_check_del_through_libcni() {
    let node = Netns::new("nl");
    let pod = Netns::new("pl");
    let conf = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // Shaped like containerd's default 10-containerd-net.conflist (0.4.0, promiscMode, dual-stack).
    write_conflist(
        conf.path(),
        &json!({"cniVersion": "0.4.0", "name": "twcd", "plugins": [
            {"type": "twill-bridge", "bridge": "twcdbr0", "isGateway": true, "ipMasq": true, "promiscMode": true,
             "ipam": {"type": "twill-host-local", "dataDir": data.path(),
                      "ranges": [[{"subnet": "10.234.0.0/16"}], [{"subnet": "fd23:4::/64"}]],
                      "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}
        ]}),
    );
    let cache_s = cache.path().display().to_string();
    let args = ["-cache", cache_s.as_str()];
    let res = harness_run(&node, "add", conf.path(), &bin_path(), &pod, "cd1", &args).ok();
    assert_eq!(res["ips"].as_array().unwrap().len(), 2, "{res}");
    pod.exec(&["ping", "-c1", "-W2", "10.234.0.1"]);
    harness_run(&node, "check", conf.path(), &bin_path(), &pod, "cd1", &args).ok();
    harness_run(&node, "del", conf.path(), &bin_path(), &pod, "cd1", &args).ok();
    harness_run(&node, "del", conf.path(), &bin_path(), &pod, "cd1", &args).ok();
    assert!(reservations(data.path(), "twcd").is_empty());
}

#[test]
fn twill_bridge_delegates_to_reference_host_local() {
    let node = Netns::new("nh");
    let pod = Netns::new("ph");
    let conf = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // Any IPAM type other than twill-host-local is executed from CNI_PATH with the same env.
    write_conflist(
        conf.path(),
        &json!({"cniVersion": "1.0.0", "name": "twdh", "plugins": [
            {"type": "twill-bridge", "bridge": "twdhbr0", "isGateway": true, "ipMasq": true,
             "ipam": {"type": "host-local", "subnet": "10.235.0.0/24", "dataDir": data.path(),
                      "routes": [{"dst": "0.0.0.0/0"}]}}
        ]}),
    );
    let cache_s = cache.path().display().to_string();
    let args = ["-cache", cache_s.as_str()];
    let res = harness_run(&node, "add", conf.path(), &bin_path(), &pod, "dh1", &args).ok();
    assert_eq!(res["ips"][0]["address"], "10.235.0.2/24");
    assert_eq!(reservations(data.path(), "twdh"), ["10.235.0.2"]);
    pod.exec(&["ping", "-c1", "-W2", "10.235.0.1"]);
    harness_run(&node, "check", conf.path(), &bin_path(), &pod, "dh1", &args).ok();
    harness_run(&node, "del", conf.path(), &bin_path(), &pod, "dh1", &args).ok();
    assert!(reservations(data.path(), "twdh").is_empty());
    // A failing delegate's error comes back as the plugin's error, and nothing is left.
    let bad = tempfile::tempdir().unwrap();
    write_conflist(
        bad.path(),
        &json!({"cniVersion": "1.0.0", "name": "twdh", "plugins": [
            {"type": "twill-bridge", "bridge": "twdhbr0",
             "ipam": {"type": "host-local", "subnet": "10.235.1.0/31", "dataDir": data.path()}}
        ]}),
    );
    let r = harness_run(&node, "add", bad.path(), &bin_path(), &pod, "dh2", &args);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("too small"), "{}", r.stderr);
    assert!(!pod.has_link("eth0"));
}
