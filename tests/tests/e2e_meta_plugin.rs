//! The `twill` meta plugin driven as a runtime drives it: the conflist twilld writes, executed
//! by the lab's CNI runtime inside a node namespace, with real twill-bridge/twill-host-local
//! and Debian's portmap. Needs root and `cargo build --workspace --bins`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use twill_tests::bins;
use twill_tests::cni::{eventually, host_veths};
use twill_tests::lab::runtime::{Attachment, NetworkList, Runtime};
use twill_tests::lab::Error;
use twill_tests::netns::Netns;

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
    let a = twill_tests::lab::runtime::result_ipv4(result).expect("IPv4 in result");
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
    assert!(eventually(10, || node.veths() == 0), "host veth removed");
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
    assert!(eventually(10, || node.veths() == 0), "host veth removed");
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
        eventually(10, || node.veths() == 0),
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
    assert!(eventually(10, || node.veths() == 0), "host veth removed");
}
