//! twill-portmap as a runtime drives it: twill-bridge (+ twill-host-local) and twill-portmap
//! chained in a node namespace, pods in their own namespaces, a second "node" connected to the
//! first by a veth. Host ports are reached from the other node, from the node itself (its
//! address and localhost) and from a pod of the same node (hairpin), over TCP and UDP, IPv4 and
//! IPv6; plus DEL/GC/CHECK/STATUS/VERSION and bad input straight on the plugin.
//! Needs root and `cargo build --workspace --bins`.
#![cfg(feature = "root")]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Map, Value};
use std::time::Duration;
use twill_lab::runtime::{Attachment, NetworkList, Runtime};
use twill_tests::cni::{self, exec, Invocation};
use twill_tests::netns::{veth_pair, Netns};
use twill_tests::underlay::wait_for;

const NODE_IP: &str = "192.0.2.1";
const OTHER_IP: &str = "192.0.2.2";
const NODE_IP6: &str = "fd50::1";
const OTHER_IP6: &str = "fd50::2";
const GATEWAY: &str = "10.251.1.1";
const GATEWAY6: &str = "fd51::1";

fn python() -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| {
        // The real interpreter, not a pyenv shim, so a listener's PID is python's own.
        let out = twill_tests::sh::run(&["python3", "-c", "import sys; print(sys.executable)"]);
        out.trim().to_string()
    })
}

/// Answers every TCP connection and UDP datagram on `port` (both families) with
/// `<name> <peer address>`.
const SERVER: &str = r#"
import select, socket, sys
name, port = sys.argv[1], int(sys.argv[2])
def sock(kind):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    return s
t, u = sock(socket.SOCK_STREAM), sock(socket.SOCK_DGRAM)
t.listen(64)
def peer(a):
    h = a[0]
    return h[7:] if h.startswith("::ffff:") else h
print("ready", flush=True)
while True:
    r, _, _ = select.select([t, u], [], [])
    if t in r:
        c, a = t.accept()
        c.sendall(("%s %s" % (name, peer(a))).encode())
        c.close()
    if u in r:
        d, a = u.recvfrom(2048)
        u.sendto(("%s %s" % (name, peer(a))).encode(), a)
"#;

/// One request; prints the answer, or `ERR <why>`.
const CLIENT: &str = r#"
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sport = int(sys.argv[4]) if len(sys.argv) > 4 else 0
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect((host, port))
        print(s.recv(200).decode())
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        s.settimeout(5)
        s.sendto(b"x", (host, port))
        print(s.recvfrom(200)[0].decode())
except Exception as e:
    print("ERR %s" % e)
"#;

/// A listener process inside a namespace; killed (by its PID) on drop.
struct Server(Child);

impl Server {
    fn start(ns: &Netns, name: &str, port: u16) -> Server {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), python(), "-c", SERVER, name])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn listener");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("listener output");
        assert_eq!(line.trim(), "ready", "listener {name} did not start");
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One TCP or UDP request from `ns`; the answer or `ERR …`.
fn ask(ns: &Netns, proto: &str, host: &str, port: u16, sport: Option<u16>) -> String {
    let port = port.to_string();
    let sport = sport.map(|p| p.to_string());
    let mut argv = vec![python(), "-c", CLIENT, proto, host, &port];
    if let Some(s) = &sport {
        argv.push(s);
    }
    String::from_utf8_lossy(&ns.output(&argv).stdout)
        .trim()
        .to_string()
}

/// Comments of the rules in the node's `inet twill-portmap` table (empty when there is none).
fn comments(node: &Netns) -> Vec<String> {
    let out = node.output(&["nft", "list", "table", "inet", "twill-portmap"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("comment \"").nth(1))
        .filter_map(|c| c.split('"').next())
        .map(str::to_string)
        .collect()
}

fn attachment_comments(node: &Netns, id: &str) -> Vec<String> {
    comments(node)
        .into_iter()
        .filter(|c| c.contains(&format!(":{id}:")))
        .collect()
}

/// A node namespace with cni0 (twill-bridge), a second node connected over `ethn`/`etho`, and
/// the conflist bridge + portmap in a temp dir.
struct Lab {
    node: Netns,
    other: Netns,
    _dir: tempfile::TempDir,
    root: PathBuf,
    list: NetworkList,
}

impl Lab {
    /// twill-bridge + twill-portmap, dual-stack, at 1.1.0.
    fn new() -> Lab {
        Lab::with_portmap("twill-portmap")
    }

    /// twill-bridge + `portmap` (`twill-portmap`, or Debian's reference `portmap`: then IPv4
    /// only and at most 1.0.0, what that build speaks).
    fn with_portmap(portmap: &str) -> Lab {
        let reference = portmap == "portmap";
        let node = Netns::new("pn");
        let other = Netns::new("po");
        veth_pair(&node, "ethn", &other, "etho");
        for (ns, dev, v4, v6) in [
            (&node, "ethn", NODE_IP, NODE_IP6),
            (&other, "etho", OTHER_IP, OTHER_IP6),
        ] {
            ns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        for d in ["conf", "bin", "data", "cache"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for p in ["twill-bridge", "twill-host-local", "twill-portmap"] {
            std::os::unix::fs::symlink(cni::twill(p), root.join("bin").join(p)).unwrap();
        }
        std::os::unix::fs::symlink(cni::reference("portmap"), root.join("bin/portmap")).unwrap();
        let (versions, ranges) = if reference {
            (
                json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]),
                json!([[{"subnet": "10.251.1.0/24"}]]),
            )
        } else {
            (
                json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
                json!([[{"subnet": "10.251.1.0/24"}], [{"subnet": "fd51::/64"}]]),
            )
        };
        let conflist = json!({
            "cniVersion": "1.0.0",
            "cniVersions": versions,
            "name": "pmnet",
            "plugins": [
                {"type": "twill-bridge", "bridge": "cni0", "isDefaultGateway": true,
                 "hairpinMode": true,
                 "ipam": {"type": "twill-host-local", "dataDir": root.join("data"),
                          "ranges": ranges}},
                {"type": portmap, "capabilities": {"portMappings": true}}
            ]
        });
        let file = root.join("conf/10-pm.conflist");
        std::fs::write(&file, conflist.to_string()).unwrap();
        let list = NetworkList::parse(&file, &conflist.to_string()).unwrap();
        assert_eq!(list.version, if reference { "1.0.0" } else { "1.1.0" });
        Lab {
            node,
            other,
            _dir: dir,
            root,
            list,
        }
    }

    fn rt(&self) -> Runtime {
        Runtime {
            node_ns: self.node.name().to_string(),
            bin_dir: self.root.join("bin"),
            cache_dir: self.root.join("cache"),
        }
    }
}

fn attachment(pod: &Netns, mappings: Value) -> Attachment {
    let mut caps = Map::new();
    caps.insert("portMappings".into(), mappings);
    Attachment {
        container_id: format!("c-{}", pod.name()),
        netns: pod.path(),
        ifname: "eth0".into(),
        args: vec![],
        capability_args: caps,
    }
}

fn first_ip(result: &Value, v4: bool) -> String {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|i| i["address"].as_str())
        .find(|a| a.contains('.') == v4)
        .and_then(|a| a.split('/').next())
        .expect("address of the family")
        .to_string()
}

#[test]
fn host_ports_reach_the_pod_from_everywhere_tcp_udp_v4_v6() {
    let lab = Lab::new();
    let rt = lab.rt();
    let pod = Netns::new("pa");
    let a = attachment(
        &pod,
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
               {"hostPort": 8053, "containerPort": 80, "protocol": "udp"},
               {"hostPort": 8081, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_IP}]),
    );
    let result = rt.add(&lab.list, &a).expect("ADD bridge + portmap");
    let ip4 = first_ip(&result, true);
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(
        result["interfaces"].as_array().map(Vec::len),
        Some(3),
        "portmap passes prevResult through: {result}"
    );
    let _srv = Server::start(&pod, "pod-a", 80);

    // Another node: the pod sees the client's own address (no masquerade).
    for proto in ["tcp", "udp"] {
        let port = if proto == "tcp" { 8080 } else { 8053 };
        assert_eq!(
            ask(&lab.other, proto, NODE_IP, port, None),
            format!("pod-a {OTHER_IP}"),
            "{proto} from another node (v4)"
        );
        assert_eq!(
            ask(&lab.other, proto, NODE_IP6, port, None),
            format!("pod-a {OTHER_IP6}"),
            "{proto} from another node (v6)"
        );
    }
    // The node itself, to its own address (output hook) and to localhost (masqueraded to
    // the bridge address: 127.0.0.1 cannot leave the host).
    assert_eq!(
        ask(&lab.node, "tcp", NODE_IP, 8080, None),
        format!("pod-a {NODE_IP}")
    );
    assert_eq!(
        ask(&lab.node, "tcp", "127.0.0.1", 8080, None),
        format!("pod-a {GATEWAY}")
    );
    assert_eq!(
        ask(&lab.node, "udp", "127.0.0.1", 8053, None),
        format!("pod-a {GATEWAY}")
    );
    assert_eq!(
        ask(&lab.node, "tcp", NODE_IP6, 8080, None),
        format!("pod-a {NODE_IP6}")
    );

    // Hairpin: a second pod on the node reaches the first through the node's addresses; the
    // connection is masqueraded so replies come back through the node.
    let pod_b = Netns::new("pb");
    let b = attachment(&pod_b, json!([]));
    rt.add(&lab.list, &b).expect("ADD second pod");
    for host in [NODE_IP, GATEWAY] {
        assert_eq!(
            ask(&pod_b, "tcp", host, 8080, None),
            format!("pod-a {GATEWAY}"),
            "hairpin via {host}"
        );
    }
    assert_eq!(
        ask(&pod_b, "udp", NODE_IP, 8053, None),
        format!("pod-a {GATEWAY}")
    );
    assert_eq!(
        ask(&pod_b, "tcp", NODE_IP6, 8080, None),
        format!("pod-a {GATEWAY6}"),
        "hairpin v6"
    );
    // The pod reaches itself through its host port too.
    assert_eq!(
        ask(&pod, "tcp", NODE_IP, 8080, None),
        format!("pod-a {GATEWAY}")
    );

    // hostIP binds the mapping to that address only.
    lab.node
        .exec(&["ip", "addr", "add", "192.0.2.11/24", "dev", "ethn"]);
    assert_eq!(
        ask(&lab.other, "tcp", NODE_IP, 8081, None),
        format!("pod-a {OTHER_IP}")
    );
    assert_eq!(
        ask(&lab.other, "tcp", "192.0.2.11", 8080, None),
        format!("pod-a {OTHER_IP}"),
        "an unbound mapping answers on every node address"
    );
    let refused = ask(&lab.other, "tcp", "192.0.2.11", 8081, None);
    assert!(refused.starts_with("ERR"), "bound to {NODE_IP}: {refused}");
    assert!(
        ask(&lab.other, "tcp", NODE_IP6, 8081, None).starts_with("ERR"),
        "a v4 hostIP maps nothing on v6"
    );

    // A healthy dual-stack pod passes CHECK through the whole chain at 1.1.0.
    rt.check(&lab.list, &a).expect("CHECK healthy");
    rt.status(&lab.list).expect("STATUS");

    rt.del(Some(&lab.list), &a).expect("DEL");
    rt.del(Some(&lab.list), &b).expect("DEL b");
    assert!(
        ask(&lab.other, "tcp", NODE_IP, 8080, None).starts_with("ERR"),
        "mapping gone after DEL"
    );
    assert_eq!(
        comments(&lab.node)
            .iter()
            .filter(|c| c.starts_with("twpm"))
            .count(),
        0
    );
    assert!(!ip4.is_empty());
}

/// What a user of hostPort sees with one portmap plugin: the answers (pod and the peer address
/// it saw) over IPv4 from another node, the node itself (its address and localhost) and a pod
/// of the same node (hairpin), TCP and UDP, plus a hostIP-bound mapping on another address.
fn reachability(portmap: &str) -> Vec<(String, String)> {
    let lab = Lab::with_portmap(portmap);
    let rt = lab.rt();
    let pod = Netns::new("pa");
    let a = attachment(
        &pod,
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
               {"hostPort": 8053, "containerPort": 80, "protocol": "udp"},
               {"hostPort": 8081, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_IP}]),
    );
    rt.add(&lab.list, &a).expect("ADD");
    let _srv = Server::start(&pod, "pod-a", 80);
    let pod_b = Netns::new("pb");
    let b = attachment(&pod_b, json!([]));
    rt.add(&lab.list, &b).expect("ADD second pod");
    lab.node
        .exec(&["ip", "addr", "add", "192.0.2.11/24", "dev", "ethn"]);
    let mut seen = Vec::new();
    for (what, ns, proto, host, port) in [
        ("other node tcp", &lab.other, "tcp", NODE_IP, 8080),
        ("other node udp", &lab.other, "udp", NODE_IP, 8053),
        ("node tcp", &lab.node, "tcp", NODE_IP, 8080),
        ("node localhost tcp", &lab.node, "tcp", "127.0.0.1", 8080),
        ("node localhost udp", &lab.node, "udp", "127.0.0.1", 8053),
        ("hairpin tcp", &pod_b, "tcp", NODE_IP, 8080),
        ("hairpin udp", &pod_b, "udp", NODE_IP, 8053),
        ("hairpin via gateway", &pod_b, "tcp", GATEWAY, 8080),
        ("hostIP bound", &lab.other, "tcp", NODE_IP, 8081),
        (
            "hostIP other address",
            &lab.other,
            "tcp",
            "192.0.2.11",
            8081,
        ),
    ] {
        let answer = ask(ns, proto, host, port, None);
        // Only "answered by whom, seen from where" or "no answer" counts, not the error text.
        let answer = if answer.starts_with("ERR") {
            "no answer".to_string()
        } else {
            answer
        };
        seen.push((what.to_string(), answer));
    }
    rt.del(Some(&lab.list), &a).expect("DEL");
    rt.del(Some(&lab.list), &b).expect("DEL b");
    seen
}

/// Interop: the same runtimeConfig gives the same reachability as Debian's reference portmap
/// (IPv4: that build's IPv6 path needs ip6tables NAT, which not every host has).
#[test]
fn same_reachability_as_the_reference_portmap() {
    let twill = reachability("twill-portmap");
    let reference = reachability("portmap");
    assert_eq!(twill, reference);
    // And it is the reachability a user expects, not two plugins failing alike.
    let answered = twill
        .iter()
        .filter(|(_, a)| a.starts_with("pod-a "))
        .count();
    assert_eq!(answered, twill.len() - 1, "{twill:?}");
    assert_eq!(
        twill.last().map(|(_, a)| a.as_str()),
        Some("no answer"),
        "{twill:?}"
    );
}

/// UDP conntrack entries of the node whose original destination port is `port`.
fn udp_entries(node: &Netns, port: u16) -> usize {
    let table = node.exec(&["cat", "/proc/net/nf_conntrack"]);
    let dport = format!("dport={port} ");
    table
        .lines()
        .filter(|l| {
            l.contains(" udp ") && l.split("src=").nth(1).is_some_and(|o| o.contains(&dport))
        })
        .count()
}

/// kubernetes#59033 and the reference's DEL: a UDP flow keeps its conntrack entry (and so its
/// DNAT) while packets keep coming. DEL and ADD delete the host port's UDP entries, so the same
/// flow reaches the host after DEL and the re-created pod right after ADD.
#[test]
fn udp_flow_follows_a_recreated_pod_at_once() {
    let lab = Lab::new();
    let rt = lab.rt();
    let maps = json!([{"hostPort": 5300, "containerPort": 53, "protocol": "udp"}]);
    const SPORT: u16 = 40123;

    let pod1 = Netns::new("pa");
    let a1 = attachment(&pod1, maps.clone());
    let ip1 = first_ip(&rt.add(&lab.list, &a1).expect("ADD pod 1"), true);
    let srv1 = Server::start(&pod1, "pod-1", 53);
    assert_eq!(
        ask(&lab.other, "udp", NODE_IP, 5300, Some(SPORT)),
        format!("pod-1 {OTHER_IP}")
    );

    assert_eq!(udp_entries(&lab.node, 5300), 1, "the flow is tracked");
    rt.del(Some(&lab.list), &a1).expect("DEL pod 1");
    assert_eq!(
        udp_entries(&lab.node, 5300),
        0,
        "DEL deletes the host port's UDP conntrack entries"
    );
    drop(srv1);
    drop(pod1);
    // The same flow now belongs to the node: its listener answers at once.
    let _node_srv = Server::start(&lab.node, "node", 5300);
    assert_eq!(
        ask(&lab.other, "udp", NODE_IP, 5300, Some(SPORT)),
        format!("node {OTHER_IP}"),
        "after DEL the flow must not stay DNATed to the deleted pod"
    );

    let pod2 = Netns::new("pa");
    let a2 = attachment(&pod2, maps);
    let ip2 = first_ip(&rt.add(&lab.list, &a2).expect("ADD pod 2"), true);
    assert_ne!(ip1, ip2, "host-local hands out a new address");
    let _srv2 = Server::start(&pod2, "pod-2", 53);
    assert_eq!(
        ask(&lab.other, "udp", NODE_IP, 5300, Some(SPORT)),
        format!("pod-2 {OTHER_IP}"),
        "after ADD the same flow reaches the new pod"
    );
    rt.del(Some(&lab.list), &a2).expect("DEL pod 2");
}

// ---- the plugin alone, with a prevResult as the bridge would hand it ----

fn node_only() -> Netns {
    Netns::new("pq")
}

fn prev(version: &str, v4: &str, v6: Option<&str>) -> Value {
    let mut ips = vec![json!({"address": v4, "gateway": "10.252.0.1", "interface": 1})];
    if let Some(v6) = v6 {
        ips.push(json!({"address": v6, "interface": 1}));
    }
    if version.starts_with("0.") {
        for ip in &mut ips {
            let fam = if ip["address"].as_str().unwrap().contains(':') {
                "6"
            } else {
                "4"
            };
            ip["version"] = json!(fam);
        }
    }
    json!({"cniVersion": version,
           "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
           "ips": ips})
}

fn pm_conf(version: &str, name: &str, mappings: Value, prev_result: Option<Value>) -> Value {
    let mut c = json!({"cniVersion": version, "name": name, "type": "twill-portmap",
                       "runtimeConfig": {"portMappings": mappings}});
    if let Some(p) = prev_result {
        c["prevResult"] = p;
    }
    c
}

fn portmap() -> PathBuf {
    cni::twill("twill-portmap")
}

fn call(node: &Netns, verb: &str, id: &str, conf: &Value) -> cni::Reply {
    exec(
        Some(node),
        &portmap(),
        &Invocation::new(verb, id, "/run/netns/none"),
        conf,
    )
}

const WEB: &str = r#"[{"hostPort": 8080, "containerPort": 80}, {"hostPort": 8053, "containerPort": 53, "protocol": "UDP"}]"#;

fn web() -> Value {
    serde_json::from_str(WEB).unwrap()
}

#[test]
fn versions_add_passes_prev_result_through_and_del_removes_everything() {
    let node = node_only();
    let v = exec(
        Some(&node),
        &portmap(),
        &Invocation::new("VERSION", "", ""),
        &json!({"cniVersion": "1.1.0"}),
    )
    .ok();
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .into_iter()
        .enumerate()
    {
        let id = format!("v{i}");
        let p = prev(
            version,
            &format!("10.252.0.{}/24", 10 + i),
            Some("fd52::5/64"),
        );
        let out = call(
            &node,
            "ADD",
            &id,
            &pm_conf(version, "pmnet", web(), Some(p.clone())),
        )
        .ok();
        // Unchanged, with `dns` spelled out as every result carries it (the reference too).
        let mut want = p.clone();
        want["dns"] = json!({});
        assert_eq!(out, want, "{version}: prevResult passes through");
        assert_eq!(
            attachment_comments(&node, &id).len(),
            // Per family: tcp (hairpin, [localhost,] masquerade, DNAT) + udp (same).
            8 + 6,
            "{version}: {:?}",
            comments(&node)
        );
        if version >= "0.4.0" {
            call(
                &node,
                "CHECK",
                &id,
                &pm_conf(version, "pmnet", web(), Some(p)),
            )
            .ok();
        }
        call(&node, "DEL", &id, &pm_conf(version, "pmnet", web(), None)).ok();
        assert!(attachment_comments(&node, &id).is_empty(), "{version}");
    }
    let old = call(
        &node,
        "ADD",
        "old",
        &pm_conf(
            "0.2.0",
            "pmnet",
            web(),
            Some(prev("0.2.0", "10.252.0.9/24", None)),
        ),
    );
    assert_eq!(old.err_code(), 1, "0.2.0 is not supported");
    let status = call(
        &node,
        "STATUS",
        "",
        &pm_conf("1.1.0", "pmnet", json!([]), None),
    );
    status.ok();
    // Without a usable nft (here: none on PATH) STATUS says the plugin cannot serve ADD.
    let conf = pm_conf("1.1.0", "pmnet", json!([]), None).to_string();
    let bin = portmap().display().to_string();
    let out: cni::Reply = twill_tests::sh::run_with_input(
        &[
            "ip",
            "netns",
            "exec",
            node.name(),
            "env",
            "-i",
            "PATH=/nonexistent",
            "CNI_COMMAND=STATUS",
            &bin,
        ],
        &[],
        conf.as_bytes(),
    )
    .into();
    assert_eq!(out.err_code(), 50, "{}", out.stdout);
}

#[test]
fn del_is_idempotent_without_netns_and_under_concurrency() {
    let node = node_only();
    // 100 attachments with mappings, added 8 at a time.
    let ids: Vec<String> = (0..100).map(|i| format!("pod{i}")).collect();
    std::thread::scope(|s| {
        for chunk in ids.chunks(13) {
            let node = &node;
            s.spawn(move || {
                for id in chunk {
                    let n: usize = id[3..].parse().unwrap();
                    let p = prev(
                        "1.1.0",
                        &format!("10.252.{}.{}/16", n / 200, 2 + n % 200),
                        None,
                    );
                    call(node, "ADD", id, &pm_conf("1.1.0", "pmnet", web(), Some(p))).ok();
                }
            });
        }
    });
    assert_eq!(
        comments(&node)
            .iter()
            .filter(|c| c.starts_with("twpm"))
            .count(),
        100 * 8
    );
    // 8 DELs in flight, all walking the same attachments in the same order, so most DELs of
    // an attachment race another one; half of them without a netns and without runtimeConfig
    // (a runtime that lost its cache).
    std::thread::scope(|s| {
        for t in 0..8 {
            let (node, ids) = (&node, &ids);
            s.spawn(move || {
                for id in ids {
                    let reply = if t % 2 == 0 {
                        call(node, "DEL", id, &pm_conf("1.1.0", "pmnet", web(), None))
                    } else {
                        let conf =
                            json!({"cniVersion": "1.1.0", "name": "pmnet", "type": "twill-portmap"});
                        exec(
                            Some(node),
                            &portmap(),
                            &Invocation::new("DEL", id, ""),
                            &conf,
                        )
                    };
                    reply.ok();
                }
            });
        }
    });
    assert_eq!(
        comments(&node)
            .iter()
            .filter(|c| c.starts_with("twpm"))
            .count(),
        0,
        "{:?}",
        comments(&node)
    );
    // DEL of what is gone, and of what never was.
    call(
        &node,
        "DEL",
        "pod1",
        &pm_conf("1.1.0", "pmnet", web(), None),
    )
    .ok();
    call(
        &node,
        "DEL",
        "never",
        &pm_conf("1.1.0", "pmnet", web(), None),
    )
    .ok();
}

/// PIDs of `nft` processes running inside `ns` (the orphans of a killed plugin).
fn nft_processes_in(ns: &Netns) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(ns.path()).expect("netns").ino();
    let want = format!("net:[{ino}]");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap_or_default();
            comm.trim() == "nft" && net.to_string_lossy() == want
        })
        .collect()
}

/// A runtime that gives up on an ADD kills the plugin wherever it is; the DEL that follows
/// must leave nothing. The rules go in as one nft transaction, so a kill leaves all or none.
#[test]
fn killed_add_then_del_leaves_nothing() {
    let node = node_only();
    let bin = portmap().display().to_string();
    let mut committed = 0;
    for step in 0..24u64 {
        let id = format!("kill{step}");
        let conf = pm_conf(
            "1.1.0",
            "pmnet",
            web(),
            Some(prev("1.1.0", "10.252.0.20/24", Some("fd52::20/64"))),
        )
        .to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", node.name(), "env", "-i"])
            .args([
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "CNI_COMMAND=ADD",
                &format!("CNI_CONTAINERID={id}"),
                "CNI_NETNS=/run/netns/none",
                "CNI_IFNAME=eth0",
                "CNI_PATH=/nonexistent",
                &bin,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ADD");
        use std::io::Write;
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.as_bytes());
        // Kill points spread over the ADD's lifetime (not an assertion on time).
        std::thread::sleep(std::time::Duration::from_millis(step * step));
        let _ = child.kill();
        let _ = child.wait();
        // An nft the plugin had started finishes its transaction on its own; the runtime's DEL
        // comes after the ADD's (killed) process is gone, here after its nft too.
        assert!(
            wait_for(
                || nft_processes_in(&node).is_empty(),
                Duration::from_secs(30)
            ),
            "nft still running"
        );
        if !attachment_comments(&node, &id).is_empty() {
            committed += 1;
        }
        let conf = pm_conf("1.1.0", "pmnet", web(), None);
        call(&node, "DEL", &id, &conf).ok();
        assert!(
            attachment_comments(&node, &id).is_empty(),
            "kill after {} ms: {:?}",
            step * step,
            comments(&node)
        );
    }
    eprintln!("{committed} of 24 killed ADDs had committed their rules");
}

#[test]
fn gc_keeps_valid_attachments_and_other_networks() {
    let node = node_only();
    let add = |net: &str, id: &str, ifname: &str, ip: &str| {
        let conf = pm_conf("1.1.0", net, web(), Some(prev("1.1.0", ip, None)));
        let mut conf = conf;
        conf["prevResult"]["interfaces"][1]["name"] = json!(ifname);
        exec(
            Some(&node),
            &portmap(),
            &Invocation::new("ADD", id, "/run/netns/none").ifname(ifname),
            &conf,
        )
        .ok();
    };
    add("pmnet", "keep", "eth0", "10.252.0.2/24");
    add("pmnet", "stale", "eth0", "10.252.0.3/24");
    add("pmnet", "keep", "eth1", "10.252.0.4/24");
    add("pmnet", "any", "net1", "10.252.0.5/24");
    add("othernet", "stale", "eth0", "10.252.0.6/24");
    let before = comments(&node);
    let mut gc = json!({"cniVersion": "1.1.0", "name": "pmnet", "type": "twill-portmap",
        "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"},
                                      {"containerID": "any"}]});
    exec(Some(&node), &portmap(), &Invocation::new("GC", "", ""), &gc).ok();
    let after = comments(&node);
    let has = |c: &[String], k: &str| c.iter().any(|x| x.starts_with(&format!("{k} ")));
    assert!(has(&before, "twpm:pmnet:stale:eth0") && has(&before, "twpm:pmnet:keep:eth1"));
    assert!(
        !has(&after, "twpm:pmnet:stale:eth0"),
        "stale removed: {after:?}"
    );
    assert!(
        !has(&after, "twpm:pmnet:keep:eth1"),
        "valid container, other ifname: {after:?}"
    );
    assert!(has(&after, "twpm:pmnet:keep:eth0"));
    assert!(
        has(&after, "twpm:pmnet:any:net1"),
        "an entry without ifname keeps all"
    );
    assert!(
        has(&after, "twpm:othernet:stale:eth0"),
        "another network's rules"
    );
    // Without a list GC knows nothing and removes nothing.
    gc.as_object_mut()
        .unwrap()
        .remove("cni.dev/valid-attachments");
    exec(Some(&node), &portmap(), &Invocation::new("GC", "", ""), &gc).ok();
    assert_eq!(comments(&node), after);
}

#[test]
fn check_passes_on_a_healthy_v4_pod_and_fails_when_rules_are_gone() {
    let node = node_only();
    let p = prev("1.0.0", "10.252.0.7/24", None);
    let conf = pm_conf("1.0.0", "pmnet", web(), Some(p));
    call(&node, "ADD", "chk", &conf).ok();
    call(&node, "CHECK", "chk", &conf).ok();
    // Someone flushed one DNAT rule.
    let listing = String::from_utf8_lossy(
        &node
            .output(&[
                "nft",
                "-a",
                "list",
                "chain",
                "inet",
                "twill-portmap",
                "hostports",
            ])
            .stdout,
    )
    .to_string();
    let handle = listing
        .lines()
        .find(|l| l.contains("d4u8053"))
        .and_then(|l| l.rsplit("# handle ").next())
        .expect("DNAT rule")
        .trim()
        .to_string();
    node.exec(&[
        "nft",
        "delete",
        "rule",
        "inet",
        "twill-portmap",
        "hostports",
        "handle",
        &handle,
    ]);
    let r = call(&node, "CHECK", "chk", &conf);
    assert_eq!(r.err_code(), 999, "{}", r.stdout);
    assert!(r.stdout.contains("d4u8053"), "{}", r.stdout);
    // No mappings: nothing to check.
    call(
        &node,
        "CHECK",
        "chk",
        &pm_conf(
            "1.0.0",
            "pmnet",
            json!([]),
            Some(prev("1.0.0", "10.252.0.7/24", None)),
        ),
    )
    .ok();
    // Chained only.
    assert_eq!(
        call(
            &node,
            "CHECK",
            "chk",
            &pm_conf("1.0.0", "pmnet", web(), None)
        )
        .err_code(),
        7
    );
    call(&node, "DEL", "chk", &conf).ok();
    assert!(attachment_comments(&node, "chk").is_empty());
}

#[test]
fn bad_input_gives_its_code_and_changes_nothing() {
    let node = node_only();
    // Some state to compare against.
    call(
        &node,
        "ADD",
        "base",
        &pm_conf(
            "1.1.0",
            "pmnet",
            web(),
            Some(prev("1.1.0", "10.252.0.8/24", None)),
        ),
    )
    .ok();
    let dir = tempfile::tempdir().unwrap();
    let before = cni::snapshot(&node, dir.path());
    let p = || Some(prev("1.1.0", "10.252.0.9/24", None));
    for (why, conf) in [
        (
            "hostPort 0",
            pm_conf(
                "1.1.0",
                "pmnet",
                json!([{"hostPort": 0, "containerPort": 80}]),
                p(),
            ),
        ),
        (
            "hostPort > 65535",
            pm_conf(
                "1.1.0",
                "pmnet",
                json!([{"hostPort": 70000, "containerPort": 80}]),
                p(),
            ),
        ),
        (
            "port range",
            pm_conf(
                "1.1.0",
                "pmnet",
                json!([{"hostPort": "8000-8010", "containerPort": 80}]),
                p(),
            ),
        ),
        (
            "unknown protocol",
            pm_conf(
                "1.1.0",
                "pmnet",
                json!([{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]),
                p(),
            ),
        ),
        (
            "mappings not a list",
            pm_conf("1.1.0", "pmnet", json!({"hostPort": 80}), p()),
        ),
        (
            "bad hostIP",
            pm_conf(
                "1.1.0",
                "pmnet",
                json!([{"hostPort": 80, "containerPort": 80, "hostIP": "x"}]),
                p(),
            ),
        ),
        ("not chained", pm_conf("1.1.0", "pmnet", web(), None)),
    ] {
        let r = call(&node, "ADD", "bad", &conf);
        assert_eq!(r.err_code(), 7, "{why}: {}", r.stdout);
        assert_eq!(r.json()["cniVersion"], "1.1.0", "{why}");
    }
    let mut injected = pm_conf("1.1.0", "pmnet", web(), p());
    injected["conditionsV4"] = json!(["ip daddr 1.2.3.4; flush ruleset"]);
    assert_eq!(call(&node, "ADD", "bad", &injected).err_code(), 7);
    let r = call(
        &node,
        "ADD",
        "bad",
        &json!({"cniVersion": "1.1.0", "name": "pmnet", "type": "twill-portmap", "prevResult": "x"}),
    );
    assert_eq!(r.err_code(), 7);
    let r = call(
        &node,
        "ADD",
        "bad",
        &json!({"cniVersion": "1.1.0", "name": "pmnet", "type": "twill-portmap", "prevResult": {"ips": [{"address": "nope"}]}}),
    );
    assert_eq!(r.err_code(), 6);
    assert_eq!(
        cni::snapshot(&node, dir.path()),
        before,
        "a rejected request changed something"
    );
    call(
        &node,
        "DEL",
        "base",
        &pm_conf("1.1.0", "pmnet", web(), None),
    )
    .ok();
}
