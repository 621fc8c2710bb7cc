//! The `twill` meta plugin driven as a runtime drives it: the conflist twilld writes, executed
//! by the lab's CNI runtime inside a node namespace, with real twill-bridge/twill-host-local
//! and Debian's portmap. Needs root and `cargo build --workspace --bins`.
#![cfg(feature = "root")]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use std::time::Duration;
use twill_lab::runtime::{Attachment, NetworkList, Runtime};
use twill_lab::Error;
use twill_tests::bins;
use twill_tests::cni::host_veths;
use twill_tests::netns::Netns;
use twill_tests::underlay::wait_for;

const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.250.0.0/16\nFLANNEL_SUBNET=10.250.3.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n";

/// A node namespace with its own conf/bin/data dirs and the conflist twilld writes. With
/// Debian's portmap (spec ≤ 1.0.0) chained, `cniVersions` stops at 1.0.0 as twilld's does;
/// without it the list reaches 1.1.0 (STATUS, GC).
struct Node {
    ns: Netns,
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Node {
    fn new(portmap: bool) -> Node {
        let ns = Netns::new("m");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        for d in ["conf", "bin", "data", "cache"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for p in ["twill", "twill-bridge", "twill-host-local"] {
            std::os::unix::fs::symlink(bins::bin(p), root.join("bin").join(p)).unwrap();
        }
        std::os::unix::fs::symlink("/usr/lib/cni/portmap", root.join("bin/portmap")).unwrap();
        let mut plugins = vec![json!(
                {"type": "twill", "subnetFile": root.join("subnet.env"), "dataDir": root.join("data/twill"),
                 "delegate": {"hairpinMode": true, "isDefaultGateway": true},
                 "ipam": {"type": "twill-host-local", "dataDir": root.join("data/networks")}})];
        let mut versions = vec!["0.3.1", "0.4.0", "1.0.0"];
        if portmap {
            plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
        } else {
            versions.push("1.1.0");
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "cniVersions": versions,
            "name": "twill",
            "plugins": plugins,
        });
        fs::write(root.join("conf/10-twill.conflist"), conflist.to_string()).unwrap();
        Node {
            ns,
            _dir: dir,
            root,
        }
    }

    fn write_subnet_env(&self) {
        fs::write(self.root.join("subnet.env"), SUBNET_ENV).unwrap();
    }

    fn list(&self) -> NetworkList {
        NetworkList::load_first(&self.root.join("conf"))
            .unwrap()
            .expect("conflist")
    }

    fn runtime(&self) -> Runtime {
        Runtime {
            node_ns: self.ns.name().to_string(),
            bin_dir: self.root.join("bin"),
            cache_dir: self.root.join("cache"),
        }
    }

    fn saved(&self, id: &str) -> PathBuf {
        self.root.join("data/twill").join(id)
    }

    fn reservation(&self, ip: &str) -> PathBuf {
        self.root.join("data/networks/twill").join(ip)
    }

    fn veths(&self) -> usize {
        host_veths(&self.ns).len()
    }
}

fn attachment(pod: &Netns) -> Attachment {
    Attachment {
        container_id: format!("c-{}", pod.name()),
        netns: pod.path(),
        ifname: "eth0".into(),
        args: vec![("K8S_POD_NAME".into(), pod.name().into())],
        capability_args: Map::new(),
    }
}

fn ip_of(result: &Value) -> String {
    let a = twill_lab::runtime::result_ipv4(result).expect("IPv4 in result");
    a.split('/').next().unwrap().to_string()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn code_of(e: Error) -> Option<u64> {
    match e {
        Error::Plugin { code, .. } => code,
        other => panic!("expected a plugin error, got {other}"),
    }
}

#[test]
fn add_renders_saves_then_del_cleans_up() {
    let node = Node::new(true);
    node.write_subnet_env();
    let pod = Netns::new("p");
    let a = attachment(&pod);
    let list = node.list();
    assert_eq!(list.version, "1.0.0", "runtime picks the highest version");
    let rt = node.runtime();
    let result = rt.add(&list, &a).expect("ADD through twill + portmap");
    let ip = ip_of(&result);
    assert!(ip.starts_with("10.250.3."), "{ip} not in the node subnet");
    let eth0 = pod.exec(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(eth0.contains(&format!("{ip}/24")), "{eth0}");
    assert!(
        pod.exec(&["ip", "link", "show", "eth0"])
            .contains("mtu 1400"),
        "FLANNEL_MTU is the pod MTU"
    );
    pod.exec(&["ping", "-c", "1", "-W", "2", "10.250.3.1"]);

    // The delegate config, saved 0600 in a 0700 dir, rendered from subnet.env + conflist.
    let saved = node.saved(&a.container_id);
    assert_eq!(mode(&saved), 0o600);
    assert_eq!(mode(saved.parent().unwrap()), 0o700);
    let d: Value = serde_json::from_slice(&fs::read(&saved).unwrap()).unwrap();
    assert_eq!(d["type"], "twill-bridge");
    assert_eq!(d["name"], "twill");
    assert_eq!(d["cniVersion"], "1.0.0");
    assert_eq!(
        d["ipMasq"], false,
        "twilld masquerades (FLANNEL_IPMASQ=true)"
    );
    assert_eq!(d["mtu"], 1400);
    assert_eq!(
        (
            d["isGateway"].as_bool(),
            d["hairpinMode"].as_bool(),
            d["isDefaultGateway"].as_bool()
        ),
        (Some(true), Some(true), Some(true))
    );
    assert_eq!(d["ipam"]["type"], "twill-host-local");
    assert_eq!(d["ipam"]["ranges"], json!([[{"subnet": "10.250.3.0/24"}]]));
    assert_eq!(d["ipam"]["routes"], json!([{"dst": "10.250.0.0/16"}]));
    assert_eq!(d["ipam"]["dataDir"], json!(node.root.join("data/networks")));
    assert!(node.reservation(&ip).exists(), "IP reserved");

    rt.check(&list, &a)
        .expect("CHECK forwarded to the delegate passes");
    pod.exec(&["ip", "addr", "flush", "dev", "eth0"]);
    let err = rt
        .check(&list, &a)
        .expect_err("CHECK must notice the missing address");
    assert!(
        matches!(err, Error::Plugin { ref plugin, code: Some(999), .. } if plugin == "twill"),
        "the delegate's CHECK error comes back through twill: {err}"
    );

    rt.del(Some(&list), &a).expect("DEL");
    assert!(!saved.exists(), "saved config removed after DEL");
    assert!(!node.reservation(&ip).exists(), "IP released");
    // The bridge frees the veth in a forked reaper after DEL returns.
    assert!(
        wait_for(|| node.veths() == 0, Duration::from_secs(10)),
        "host veth removed"
    );
    rt.del(Some(&list), &a).expect("repeated DEL succeeds");

    // DEL of a container twill never saw: no saved file is success.
    let ghost = Attachment {
        container_id: "never-added".into(),
        ..attachment(&pod)
    };
    rt.del(Some(&list), &ghost)
        .expect("DEL without saved config succeeds");
}

/// flannel#1850: after the node's subnet changed, cni0 still holds the old gateway and every new
/// pod failed with "already has an IP address different from". twill moves the gateway.
#[test]
fn new_subnet_moves_the_bridge_gateway_instead_of_failing_pods() {
    let node = Node::new(true);
    node.write_subnet_env();
    let list = node.list();
    let rt = node.runtime();
    let old = Netns::new("p");
    let a = attachment(&old);
    rt.add(&list, &a).expect("ADD in the first subnet");
    rt.del(Some(&list), &a).expect("DEL");

    fs::write(
        node.root.join("subnet.env"),
        SUBNET_ENV.replace("10.250.3.1/24", "10.250.9.1/24"),
    )
    .unwrap();
    let pod = Netns::new("p");
    let b = attachment(&pod);
    let result = rt.add(&list, &b).expect("ADD after the subnet changed");
    assert!(ip_of(&result).starts_with("10.250.9."), "{result}");
    let cni0 = node
        .ns
        .exec(&["ip", "-o", "-4", "addr", "show", "dev", "cni0"]);
    assert!(cni0.contains("10.250.9.1/24"), "gateway not moved: {cni0}");
    assert!(!cni0.contains("10.250.3.1/24"), "old gateway kept: {cni0}");
    pod.exec(&["ping", "-c", "1", "-W", "2", "10.250.9.1"]);
    rt.del(Some(&list), &b).expect("DEL");
}

#[test]
fn failed_delegate_del_keeps_the_saved_config() {
    let node = Node::new(true);
    node.write_subnet_env();
    let pod = Netns::new("p");
    let a = attachment(&pod);
    let list = node.list();
    let rt = node.runtime();
    let ip = ip_of(&rt.add(&list, &a).expect("ADD"));
    let bridge = node.root.join("bin/twill-bridge");
    fs::remove_file(&bridge).unwrap();
    assert!(
        rt.del(Some(&list), &a).is_err(),
        "DEL must fail without its delegate"
    );
    assert!(
        node.saved(&a.container_id).exists(),
        "saved config kept for the retry"
    );
    assert!(node.reservation(&ip).exists());
    std::os::unix::fs::symlink(bins::bin("twill-bridge"), &bridge).unwrap();
    rt.del(Some(&list), &a).expect("retried DEL");
    assert!(!node.saved(&a.container_id).exists());
    assert!(
        !node.reservation(&ip).exists(),
        "the retry released the IP (flannel leaks it)"
    );
    assert!(
        wait_for(|| node.veths() == 0, Duration::from_secs(10)),
        "host veth removed"
    );
}

#[test]
fn missing_subnet_env_is_try_again_and_status_not_available() {
    let node = Node::new(false);
    let pod = Netns::new("p");
    let a = attachment(&pod);
    let list = node.list();
    let rt = node.runtime();
    let twill = list.plugins[0].clone();
    let mut conf = twill.clone();
    conf.insert("name".into(), json!("twill"));
    conf.insert("cniVersion".into(), json!("1.1.0"));
    let conf = Value::Object(conf);

    let err = rt.exec("ADD", "twill", &conf, Some(&a)).unwrap_err();
    let msg = err.to_string();
    assert_eq!(
        code_of(err),
        Some(11),
        "ADD without subnet.env is try-again-later"
    );
    assert!(
        msg.contains(&node.root.join("subnet.env").display().to_string()) && msg.contains("twilld"),
        "{msg}"
    );
    assert!(!node.saved(&a.container_id).exists(), "nothing saved");
    assert_eq!(node.veths(), 0, "nothing created");
    assert!(!pod.has_link("eth0"));

    let err = rt.status(&list).unwrap_err();
    assert_eq!(code_of(err), Some(50), "STATUS while subnet.env is missing");
    node.write_subnet_env();
    rt.status(&list).expect("STATUS once subnet.env exists");
    rt.add(&list, &a).expect("ADD once subnet.env exists");
    rt.del(Some(&list), &a).expect("DEL");
}

#[test]
fn gc_deletes_stale_attachments_only() {
    let node = Node::new(false);
    node.write_subnet_env();
    let keep_ns = Netns::new("p");
    let stale_ns = Netns::new("p");
    let (keep, stale) = (attachment(&keep_ns), attachment(&stale_ns));
    let list = node.list();
    let rt = node.runtime();
    let keep_ip = ip_of(&rt.add(&list, &keep).expect("ADD keep"));
    let stale_ip = ip_of(&rt.add(&list, &stale).expect("ADD stale"));
    // The stale pod's sandbox is gone, as GC assumes.
    drop(stale_ns);

    let mut conf = list.plugins[0].clone();
    conf.insert("name".into(), json!("twill"));
    conf.insert("cniVersion".into(), json!("1.1.0"));
    conf.insert(
        "cni.dev/valid-attachments".into(),
        json!([{"containerID": keep.container_id, "ifname": "eth0"}]),
    );
    rt.exec("GC", "twill", &Value::Object(conf), None)
        .expect("GC");
    assert!(
        !node.saved(&stale.container_id).exists(),
        "stale delegate config removed"
    );
    assert!(!node.reservation(&stale_ip).exists(), "stale IP released");
    assert!(
        node.saved(&keep.container_id).exists(),
        "valid attachment kept"
    );
    assert!(node.reservation(&keep_ip).exists());
    // Another network of this plugin sharing the dataDir: its GC lists only its own attachments
    // and must leave this network's alone.
    let mut other = list.plugins[0].clone();
    other.insert("name".into(), json!("twill-other"));
    other.insert("cniVersion".into(), json!("1.1.0"));
    other.insert("cni.dev/valid-attachments".into(), json!([]));
    rt.exec("GC", "twill", &Value::Object(other), None)
        .expect("GC of another network");
    assert!(
        node.saved(&keep.container_id).exists(),
        "another network's GC removed this network's attachment"
    );
    assert!(node.reservation(&keep_ip).exists());
    keep_ns.exec(&["ping", "-c", "1", "-W", "2", "10.250.3.1"]);
    rt.del(Some(&list), &keep).expect("DEL keep");
    // The stale pod's host veth goes with its netns, which the kernel tears down asynchronously.
    assert!(
        wait_for(|| node.veths() == 0, Duration::from_secs(10)),
        "veths left on the node"
    );
}

#[test]
fn failed_add_is_rolled_back_by_the_runtime_del() {
    let node = Node::new(true);
    // A /30: one address for pods once the gateway has .1.
    fs::write(
        node.root.join("subnet.env"),
        "FLANNEL_NETWORK=10.250.0.0/16\nFLANNEL_SUBNET=10.250.3.1/30\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let (p1, p2) = (Netns::new("p"), Netns::new("p"));
    let (a1, a2) = (attachment(&p1), attachment(&p2));
    let list = node.list();
    let rt = node.runtime();
    let ip1 = ip_of(&rt.add(&list, &a1).expect("first pod"));
    assert_eq!(ip1, "10.250.3.2");
    let err = rt.add(&list, &a2).expect_err("the subnet is full");
    assert!(
        matches!(err, Error::Plugin { ref plugin, .. } if plugin == "twill"),
        "{err}"
    );
    // The runtime DELeted the failed attachment: nothing of it is left.
    assert!(
        !node.saved(&a2.container_id).exists(),
        "saved config of the failed ADD removed by DEL"
    );
    assert!(!p2.has_link("eth0"));
    assert_eq!(node.veths(), 1, "only the first pod's veth");
    assert!(
        node.reservation(&ip1).exists(),
        "the first pod keeps its IP"
    );
    rt.del(Some(&list), &a1).expect("DEL");
    assert!(
        wait_for(|| node.veths() == 0, Duration::from_secs(10)),
        "host veth removed"
    );
}

/// Issue 9 item 8: a corrupt saved config used to make DEL succeed and leak the pod's eth0 and
/// address (the runtime never retries a successful DEL). It fails with 999 naming the file
/// until the attachment is provably gone: no netns and no reservation.
#[test]
fn corrupt_saved_config_fails_del_until_the_attachment_is_gone() {
    let node = Node::new(false);
    node.write_subnet_env();
    let pod = Netns::new("p");
    let a = attachment(&pod);
    let list = node.list();
    let rt = node.runtime();
    let ip = ip_of(&rt.add(&list, &a).expect("ADD"));
    let saved = node.saved(&a.container_id);
    fs::write(&saved, b"{\"type\": \"twill-br").unwrap();

    let err = rt
        .del(Some(&list), &a)
        .expect_err("DEL with a corrupt saved config must fail while the pod exists");
    let msg = err.to_string();
    assert!(msg.contains(&saved.display().to_string()), "{msg}");
    assert_eq!(code_of(err), Some(999));
    assert!(saved.exists(), "the file is kept for the retry");
    assert!(node.reservation(&ip).exists(), "the address is still held");
    assert!(pod.has_link("eth0"), "the pod's eth0 is untouched");

    // The sandbox is gone, but the reservation is not: still not provably gone.
    drop(pod);
    let err = rt.del(Some(&list), &a).expect_err("reservation still held");
    let msg = err.to_string();
    assert!(msg.contains(&ip), "{msg}");
    assert_eq!(code_of(err), Some(999));
    assert!(saved.exists());

    // Once the address is released too (host-local GC, an operator), DEL succeeds and the
    // file goes; a repeated DEL is success as always.
    fs::remove_file(node.reservation(&ip)).unwrap();
    rt.del(Some(&list), &a)
        .expect("DEL of a provably gone attachment");
    assert!(!saved.exists(), "the corrupt file is removed");
    rt.del(Some(&list), &a).expect("repeated DEL");
    assert!(
        wait_for(|| node.veths() == 0, Duration::from_secs(10)),
        "veth left on the node"
    );
}

/// Issue 9 item 10: the plugins' dirs are created 0700, but an operator's existing dirs keep
/// their mode (a shared 1777 or a 0755 store was chmod-ed to 0700 before).
#[test]
fn existing_data_dirs_keep_their_mode_fresh_ones_are_private() {
    let node = Node::new(false);
    node.write_subnet_env();
    let meta_dir = node.root.join("data/twill");
    let store_dir = node.root.join("data/networks/twill");
    fs::create_dir_all(&meta_dir).unwrap();
    fs::create_dir_all(&store_dir).unwrap();
    fs::set_permissions(&meta_dir, fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(&store_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let full_mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let list = node.list();
    let rt = node.runtime();
    let pod = Netns::new("p");
    let a = attachment(&pod);
    rt.add(&list, &a).expect("ADD");
    assert_eq!(full_mode(&meta_dir), 0o1777, "meta dataDir chmod-ed");
    assert_eq!(full_mode(&store_dir), 0o755, "host-local store chmod-ed");
    assert_eq!(mode(&node.saved(&a.container_id)), 0o600);
    rt.del(Some(&list), &a).expect("DEL");

    let fresh = Node::new(false);
    fresh.write_subnet_env();
    let pod = Netns::new("p");
    let b = attachment(&pod);
    let list = fresh.list();
    let rt = fresh.runtime();
    rt.add(&list, &b).expect("ADD on a fresh node");
    for d in ["data/twill", "data/networks", "data/networks/twill"] {
        assert_eq!(full_mode(&fresh.root.join(d)), 0o700, "{d}");
    }
    rt.del(Some(&list), &b).expect("DEL");
}

/// Issue 9 item 12, meta plugin: a subnet.env whose FLANNEL_SUBNET lies outside FLANNEL_NETWORK
/// and a prevResult that is not an object are invalid configs (7) and change nothing.
#[test]
fn bad_subnet_env_and_prev_result_are_refused() {
    let node = Node::new(false);
    fs::write(
        node.root.join("subnet.env"),
        SUBNET_ENV.replace("10.250.3.1/24", "10.99.3.1/24"),
    )
    .unwrap();
    let pod = Netns::new("p");
    let a = attachment(&pod);
    let list = node.list();
    let rt = node.runtime();
    let mut conf = list.plugins[0].clone();
    conf.insert("name".into(), json!("twill"));
    conf.insert("cniVersion".into(), json!("1.0.0"));
    let err = rt
        .exec("ADD", "twill", &Value::Object(conf.clone()), Some(&a))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("10.99.3.0/24") && msg.contains("10.250.0.0/16"),
        "the message names both: {msg}"
    );
    assert_eq!(code_of(err), Some(7));
    node.write_subnet_env();
    conf.insert("prevResult".into(), json!("x"));
    let err = rt
        .exec("ADD", "twill", &Value::Object(conf), Some(&a))
        .unwrap_err();
    assert_eq!(code_of(err), Some(7));
    assert!(!node.saved(&a.container_id).exists(), "nothing saved");
    assert!(
        !node.root.join("data/networks/twill").exists(),
        "nothing reserved"
    );
    assert_eq!(node.veths(), 0, "nothing created");
    assert!(!pod.has_link("eth0"));
}

/// A TCP listener inside `ns` that reports the peer address of the first connection.
struct PeerProbe {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl PeerProbe {
    fn listen(ns: &Netns, addr: &str, port: u16) -> PeerProbe {
        use std::io::BufRead;
        const SCRIPT: &str = "import socket,sys\n\
s=socket.socket()\n\
s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
s.bind((sys.argv[1],int(sys.argv[2])))\n\
s.listen(1)\n\
print('ready',flush=True)\n\
s.settimeout(60)\n\
c,a=s.accept()\n\
print(a[0],flush=True)\n";
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "python3", "-c", SCRIPT, addr])
            .arg(port.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 listener");
        let out = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(out).lines();
        let ready = lines.next().and_then(|l| l.ok());
        assert_eq!(ready.as_deref(), Some("ready"), "listener did not start");
        PeerProbe { child, lines }
    }

    /// Connects from `from` and returns the source address the listener saw.
    fn peer_of(mut self, from: &Netns, addr: &str, port: u16) -> String {
        from.exec(&[
            "python3",
            "-c",
            "import socket,sys\nsocket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10).close()",
            addr,
            &port.to_string(),
        ]);
        let seen = self
            .lines
            .next()
            .and_then(|l| l.ok())
            .expect("peer address");
        let _ = self.child.wait();
        seen
    }
}

impl Drop for PeerProbe {
    fn drop(&mut self) {
        // Only our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 10 item 5: without --ip-masq (FLANNEL_IPMASQ=false) the bridge masquerades pod
/// traffic, and pod→pod across nodes was NAT'd to the sending node's address because the rule
/// excluded only the node's own /24. The rule now skips the whole cluster network: the
/// receiving pod sees the sending pod's IP, while traffic leaving the cluster is still NAT'd.
#[test]
fn pod_to_pod_across_nodes_keeps_the_pod_source_ip() {
    let env = |subnet: &str| {
        format!(
            "FLANNEL_NETWORK=10.250.0.0/16\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n"
        )
    };
    let (n1, n2) = (Node::new(false), Node::new(false));
    fs::write(n1.root.join("subnet.env"), env("10.250.1.1/24")).unwrap();
    fs::write(n2.root.join("subnet.env"), env("10.250.2.1/24")).unwrap();
    // The underlay between the two node namespaces, with a route to the other node's pods.
    twill_tests::netns::veth_pair(&n1.ns, "twund0", &n2.ns, "twund0");
    n1.ns
        .exec(&["ip", "addr", "add", "192.168.251.1/24", "dev", "twund0"]);
    n2.ns
        .exec(&["ip", "addr", "add", "192.168.251.2/24", "dev", "twund0"]);
    n1.ns.exec(&[
        "ip",
        "route",
        "add",
        "10.250.2.0/24",
        "via",
        "192.168.251.2",
    ]);
    n2.ns.exec(&[
        "ip",
        "route",
        "add",
        "10.250.1.0/24",
        "via",
        "192.168.251.1",
    ]);
    let (p1, p2) = (Netns::new("p"), Netns::new("p"));
    let (a1, a2) = (attachment(&p1), attachment(&p2));
    let (l1, l2) = (n1.list(), n2.list());
    let (r1, r2) = (n1.runtime(), n2.runtime());
    let ip1 = ip_of(&r1.add(&l1, &a1).expect("ADD on node 1"));
    let ip2 = ip_of(&r2.add(&l2, &a2).expect("ADD on node 2"));
    let d: Value = serde_json::from_slice(&fs::read(n1.saved(&a1.container_id)).unwrap()).unwrap();
    assert_eq!(
        d["ipMasq"], true,
        "FLANNEL_IPMASQ=false: the bridge masquerades"
    );
    assert_eq!(d["masqExclude"], json!(["10.250.0.0/16"]));

    let chain = n1
        .ns
        .exec(&["nft", "list", "chain", "inet", "twill_masq", "postrouting"]);
    let rule = chain
        .lines()
        .find(|l| l.contains(&format!("ip saddr {ip1} ")))
        .unwrap_or_else(|| panic!("no masquerade rule for {ip1}: {chain}"));
    assert!(
        rule.contains("ip daddr != 10.250.1.0/24")
            && rule.contains("ip daddr != 10.250.0.0/16")
            && rule.contains("masquerade"),
        "{rule}"
    );

    let seen = PeerProbe::listen(&p2, "0.0.0.0", 7071).peer_of(&p1, &ip2, 7071);
    assert_eq!(
        seen, ip1,
        "pod 2 must see pod 1's address, not a NAT address"
    );
    // Leaving the cluster network (to node 2's underlay address) is still masqueraded.
    let seen = PeerProbe::listen(&n2.ns, "192.168.251.2", 7072).peer_of(&p1, "192.168.251.2", 7072);
    assert_eq!(seen, "192.168.251.1", "traffic out of the cluster is NAT'd");

    r1.del(Some(&l1), &a1).expect("DEL 1");
    r2.del(Some(&l2), &a2).expect("DEL 2");
    let chain = n1
        .ns
        .output(&["nft", "list", "chain", "inet", "twill_masq", "postrouting"]);
    assert!(
        !String::from_utf8_lossy(&chain.stdout).contains("saddr"),
        "rules left"
    );
}
