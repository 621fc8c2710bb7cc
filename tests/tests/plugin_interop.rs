//! Interop with Debian's reference plugins (v1.1.1 in /usr/lib/cni), driven through libcni
//! (`cniharness`) like containerd: portmap chained after twill-bridge, the reference bridge
//! using twill-host-local, and the host-local store shared in both directions.
#![cfg(feature = "root")]

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use twill_tests::bins::{target_dir, REFERENCE_CNI_DIR};
use twill_tests::cni::{
    exec, harness_run, host_veths, reference, reservations, twill, Invocation, Reply,
};
use twill_tests::netns::Netns;
use twill_tests::underlay::wait_for;

fn write_conflist(dir: &Path, list: &Value) {
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

/// One pod driven through libcni (`cniharness`) like containerd: a pod and a node namespace
/// (`p<tag>`, `n<tag>`), a conflist dir, an IPAM data dir and a libcni cache dir.
struct Libcni {
    pod: Netns,
    node: Netns,
    conf: tempfile::TempDir,
    data: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl Libcni {
    /// Writes the conflist `list(data_dir)` returns.
    fn new(tag: &str, list: impl FnOnce(&Path) -> Value) -> Libcni {
        let lc = Libcni {
            pod: Netns::new(&format!("p{tag}")),
            node: Netns::new(&format!("n{tag}")),
            conf: tempfile::tempdir().unwrap(),
            data: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
        };
        write_conflist(lc.conf.path(), &list(lc.data.path()));
        lc
    }

    /// `cniharness run -verb VERB` on the pod with container `id`, using the cache dir.
    fn run(&self, verb: &str, id: &str, extra: &[&str]) -> Reply {
        let cache = self.cache.path().display().to_string();
        let args = [&["-cache", cache.as_str()], extra].concat();
        harness_run(
            &self.node,
            verb,
            self.conf.path(),
            &bin_path(),
            &self.pod,
            id,
            &args,
        )
    }

    fn reservations(&self, network: &str) -> Vec<String> {
        reservations(self.data.path(), network)
    }
}

#[test]
fn reference_portmap_chained_after_twill_bridge() {
    let lc = Libcni::new("i", |data| {
        json!({"cniVersion": "1.0.0", "name": "twpm", "plugins": [
            {"type": "twill-bridge", "bridge": "twpmbr0", "isGateway": true, "ipMasq": true,
             "ipam": {"type": "twill-host-local", "subnet": "10.230.0.0/24", "dataDir": data}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]})
    });
    let (node, pod) = (&lc.node, &lc.pod);
    let ports = r#"[{"hostPort":18080,"containerPort":80,"protocol":"tcp"}]"#;
    let res = lc.run("add", "pm1", &["-ports", ports]).ok();
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
        through_host_port(node, pod, "10.230.0.1:18080", 80),
        "hello-through-portmap"
    );

    // No CHECK through this list: Debian's portmap 1.1.1 fails CHECK on nft-backed ip6tables
    // ("could not check ipv6 dnat: chain CNI-DN-... not found"), with the reference bridge too.
    lc.run("del", "pm1", &["-ports", ports]).ok();
    let nat = node.exec(&["iptables-save", "-t", "nat"]);
    assert!(
        !nat.contains(&format!("{pod_ip}:80")),
        "portmap rules removed"
    );
    assert!(lc.reservations("twpm").is_empty());
    assert!(wait_for(
        || host_veths(node).is_empty(),
        Duration::from_secs(10)
    ));
}

#[test]
fn reference_bridge_with_twill_host_local() {
    let lc = Libcni::new("r", |data| {
        json!({"cniVersion": "0.4.0", "name": "twrb", "plugins": [
            {"type": "bridge", "bridge": "twrbbr0", "isGateway": true,
             "ipam": {"type": "twill-host-local", "subnet": "10.231.0.0/24", "dataDir": data,
                      "routes": [{"dst": "0.0.0.0/0", "gw": "10.231.0.1"}]}}
        ]})
    });
    let res = lc.run("add", "rb1", &[]).ok();
    assert_eq!(res["ips"][0]["address"], "10.231.0.2/24");
    assert_eq!(lc.reservations("twrb"), ["10.231.0.2"]);
    lc.pod.exec(&["ping", "-c1", "-W2", "10.231.0.1"]);
    lc.run("check", "rb1", &[]).ok();
    lc.run("del", "rb1", &[]).ok();
    assert!(lc.reservations("twrb").is_empty());
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
    // Shaped like containerd's default 10-containerd-net.conflist (0.4.0, promiscMode, dual-stack).
    let lc = Libcni::new("l", |data| {
        json!({"cniVersion": "0.4.0", "name": "twcd", "plugins": [
            {"type": "twill-bridge", "bridge": "twcdbr0", "isGateway": true, "ipMasq": true, "promiscMode": true,
             "ipam": {"type": "twill-host-local", "dataDir": data,
                      "ranges": [[{"subnet": "10.234.0.0/16"}], [{"subnet": "fd23:4::/64"}]],
                      "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}
        ]})
    });
    let res = lc.run("add", "cd1", &[]).ok();
    assert_eq!(res["ips"].as_array().unwrap().len(), 2, "{res}");
    assert_eq!(
        lc.reservations("twcd").len(),
        2,
        "one address per range set"
    );
    let br = lc.node.exec(&["ip", "link", "show", "twcdbr0"]);
    assert!(br.contains("PROMISC"), "promiscMode: {br}");
    lc.pod.exec(&["ping", "-c1", "-W2", "10.234.0.1"]);
    lc.pod.exec(&["ping", "-6", "-c1", "-W2", "fd23:4::1"]);
    lc.run("check", "cd1", &[]).ok();
    lc.run("del", "cd1", &[]).ok();
    assert!(!lc.pod.has_link("eth0"));
    lc.run("del", "cd1", &[]).ok();
    assert!(lc.reservations("twcd").is_empty());
}

#[test]
fn twill_bridge_delegates_to_reference_host_local() {
    // Any IPAM type other than twill-host-local is executed from CNI_PATH with the same env.
    let lc = Libcni::new("h", |data| {
        json!({"cniVersion": "1.0.0", "name": "twdh", "plugins": [
            {"type": "twill-bridge", "bridge": "twdhbr0", "isGateway": true, "ipMasq": true,
             "ipam": {"type": "host-local", "subnet": "10.235.0.0/24", "dataDir": data,
                      "routes": [{"dst": "0.0.0.0/0"}]}}
        ]})
    });
    let res = lc.run("add", "dh1", &[]).ok();
    assert_eq!(res["ips"][0]["address"], "10.235.0.2/24");
    assert_eq!(lc.reservations("twdh"), ["10.235.0.2"]);
    lc.pod.exec(&["ping", "-c1", "-W2", "10.235.0.1"]);
    lc.run("check", "dh1", &[]).ok();
    lc.run("del", "dh1", &[]).ok();
    assert!(lc.reservations("twdh").is_empty());
    // A failing delegate's error comes back as the plugin's error, and nothing is left
    // (the list is replaced by one whose /31 range host-local refuses).
    write_conflist(
        lc.conf.path(),
        &json!({"cniVersion": "1.0.0", "name": "twdh", "plugins": [
            {"type": "twill-bridge", "bridge": "twdhbr0",
             "ipam": {"type": "host-local", "subnet": "10.235.1.0/31", "dataDir": lc.data.path()}}
        ]}),
    );
    let r = lc.run("add", "dh2", &[]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("too small"), "{}", r.stderr);
    assert!(!lc.pod.has_link("eth0"));
}
