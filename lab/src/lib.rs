//! `twill-lab`: a multi-node twill cluster on one machine, made of network namespaces.
//!
//! Layout (every link lives inside a lab namespace; the root namespace is never touched):
//! ```text
//!  <lab>-ul        bridge br-ul 192.168.100.254/24, etcd on :2379
//!   ├─ <lab>-node1  eth0 192.168.100.1, twilld (conf/bin/data/state dirs under the state dir)
//!   │    ├─ <lab>-node1-pod1   eth0 from the CNI chain twilld's conflist names
//!   │    └─ ...
//!   └─ <lab>-node2 ...
//! ```
//! Everything the lab creates is recorded in `<root>/<lab>/lab.json` *before* it is created,
//! so `down` can remove a half-built lab; processes are stopped by recorded PID + start time.

pub mod bench;
pub mod bins;
pub mod error;
pub mod etcd;
pub mod probe;
pub mod process;
pub mod runtime;
mod table;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map};

use twill_common::fsutil::{atomic_write, ensure_dir};
use twill_common::subnet_env::SubnetEnv;

use error::io;
pub use error::{Error, Result};
use process::{run, run_in, wait_for, Proc};
use runtime::{Attachment, NetworkList, Runtime};

/// Default parent of lab state dirs.
pub const DEFAULT_ROOT: &str = "/run/twill-lab";
/// Bridge inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br-ul";
/// Underlay interface of each node.
pub const NODE_IF: &str = "eth0";
/// etcd's address on the underlay bridge.
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 254);
/// flannel's default etcd prefix, which twilld uses.
pub const ETCD_PREFIX: &str = "/coreos.com/network";
/// The plugins twilld's conflist may name; linked into every node's bin dir (as install-cni
/// would put them there: twill-portmap makes the chain's hostPorts work).
pub const PLUGINS: &[&str] = &[
    "twill",
    "twill-bridge",
    "twill-host-local",
    "twill-loopback",
    "twill-portmap",
];
/// The loopback network containerd sets up in every pod before the pod network.
pub const LOOPBACK_CONFLIST: &str =
    r#"{"cniVersion":"0.3.1","name":"cni-loopback","plugins":[{"type":"twill-loopback"}]}"#;

/// How a lab is built.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabOptions {
    /// Lab name: prefix of every namespace, name of the state dir.
    pub name: String,
    /// Parent of the state dir.
    pub root: PathBuf,
    /// Directory with the built `twilld` and plugins.
    pub bin_src: PathBuf,
    /// Cluster pod network written to etcd.
    pub network: String,
    /// Run twilld with `--ip-masq` (as kube-flannel does).
    pub ip_masq: bool,
}

impl LabOptions {
    /// Options for lab `name` under [`DEFAULT_ROOT`], binaries next to the current executable.
    pub fn new(name: &str) -> LabOptions {
        LabOptions {
            name: name.to_string(),
            root: PathBuf::from(DEFAULT_ROOT),
            bin_src: bins::target_dir(),
            network: "10.244.0.0/16".to_string(),
            ip_masq: true,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRec {
    pub name: String,
    pub index: u8,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub daemon: Option<Proc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRec {
    pub node: String,
    pub name: String,
    pub ns: String,
    pub container_id: String,
    pub ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    opts: LabOptions,
    underlay_ns: String,
    etcd: Option<Proc>,
    nodes: Vec<NodeRec>,
    pods: Vec<PodRec>,
    /// Namespaces made for other purposes (bench), removed by `down` too.
    extra_ns: Vec<String>,
    next_index: u8,
}

/// A node's readiness as a kubelet would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// twilld runs but has not written a CNI config yet.
    NotReady,
    /// A CNI config is in the node's conf dir.
    Ready,
    /// The node's twilld is not running.
    Stopped,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::NotReady => "NotReady",
            NodeState::Ready => "Ready",
            NodeState::Stopped => "Stopped",
        })
    }
}

/// A lab, loaded from or saved to its state file after every change.
pub struct Lab {
    st: State,
}

fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Lab names become namespace names and a path component.
fn check_name(name: &str) -> Result<()> {
    let valid = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Error::Lab(format!(
            "invalid lab name {name:?}: up to 40 of [A-Za-z0-9_.-], starting alphanumeric"
        )))
    }
}

/// Fails if a namespace of that name exists: the lab never adopts (and later deletes)
/// a namespace it did not create.
fn check_free(ns: &str) -> Result<()> {
    if netns_exists(ns) {
        return Err(Error::Lab(format!(
            "network namespace {ns} already exists and is not part of this lab's state; \
             remove it or pick another --name"
        )));
    }
    Ok(())
}

fn add_netns(ns: &str) -> Result<()> {
    run(&["ip", "netns", "add", ns])?;
    run_in(ns, &["ip", "link", "set", "lo", "up"])?;
    Ok(())
}

fn del_netns(ns: &str) -> Result<()> {
    if netns_exists(ns) {
        run(&["ip", "netns", "del", ns])?;
    }
    Ok(())
}

impl Lab {
    fn state_file(opts: &LabOptions) -> PathBuf {
        opts.state_dir().join("lab.json")
    }

    fn save(&self) -> Result<()> {
        let p = Lab::state_file(&self.st.opts);
        atomic_write(&p, &serde_json::to_vec_pretty(&self.st)?, 0o600).map_err(io(&p))
    }

    /// Opens an existing lab; `Ok(None)` if there is none of that name.
    pub fn open(root: &Path, name: &str) -> Result<Option<Lab>> {
        check_name(name)?;
        let p = root.join(name).join("lab.json");
        match std::fs::read(&p) {
            Ok(raw) => Ok(Some(Lab {
                st: serde_json::from_slice(&raw)?,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(p)(e)),
        }
    }

    /// Creates the underlay namespace and etcd with the network config. No nodes yet.
    pub fn create(opts: LabOptions) -> Result<Lab> {
        if Lab::state_file(&opts).exists() {
            return Err(Error::Lab(format!(
                "lab {:?} already exists ({}); run `twill-lab down` first",
                opts.name,
                opts.state_dir().display()
            )));
        }
        for bin in std::iter::once("twilld").chain(PLUGINS.iter().copied()) {
            let p = opts.bin_src.join(bin);
            if !p.is_file() {
                return Err(Error::Lab(format!(
                    "{} not built: run `cargo build --workspace --bins` first",
                    p.display()
                )));
            }
        }
        check_name(&opts.name)?;
        check_free(&format!("{}-ul", opts.name))?;
        // The root may be a shared dir (e.g. /tmp): create it if missing, never re-mode it.
        if !opts.root.is_dir() {
            ensure_dir(&opts.root, 0o700).map_err(io(&opts.root))?;
        }
        ensure_dir(&opts.state_dir(), 0o700).map_err(io(opts.state_dir()))?;
        let mut lab = Lab {
            st: State {
                underlay_ns: format!("{}-ul", opts.name),
                opts,
                etcd: None,
                nodes: vec![],
                pods: vec![],
                extra_ns: vec![],
                next_index: 1,
            },
        };
        lab.save()?;
        let ul = lab.st.underlay_ns.clone();
        add_netns(&ul)?;
        run_in(
            &ul,
            &["ip", "link", "add", UNDERLAY_BRIDGE, "type", "bridge"],
        )?;
        run_in(
            &ul,
            &[
                "ip",
                "addr",
                "add",
                &format!("{ETCD_IP}/24"),
                "dev",
                UNDERLAY_BRIDGE,
            ],
        )?;
        run_in(&ul, &["ip", "link", "set", UNDERLAY_BRIDGE, "up"])?;
        lab.start_etcd()?;
        let config = json!({"Network": lab.st.opts.network, "Backend": {"Type": "vxlan"}});
        lab.etcdctl(&["put", &format!("{ETCD_PREFIX}/config"), &config.to_string()])?;
        Ok(lab)
    }

    pub fn name(&self) -> &str {
        &self.st.opts.name
    }

    pub fn state_dir(&self) -> PathBuf {
        self.st.opts.state_dir()
    }

    pub fn underlay_ns(&self) -> &str {
        &self.st.underlay_ns
    }

    pub fn etcd_endpoint(&self) -> String {
        format!("http://{ETCD_IP}:2379")
    }

    pub fn nodes(&self) -> &[NodeRec] {
        &self.st.nodes
    }

    pub fn pods(&self) -> &[PodRec] {
        &self.st.pods
    }

    pub fn node(&self, name: &str) -> Result<&NodeRec> {
        self.st
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::Lab(format!("no node {name:?} in lab {:?}", self.name())))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut NodeRec> {
        let lab = self.st.opts.name.clone();
        self.st
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::Lab(format!("no node {name:?} in lab {lab:?}")))
    }

    pub fn etcd_running(&self) -> bool {
        self.st.etcd.as_ref().is_some_and(Proc::alive)
    }

    /// Starts etcd (again, on the same data dir) and waits until it answers.
    pub fn start_etcd(&mut self) -> Result<()> {
        if self.etcd_running() {
            return Ok(());
        }
        let dir = self.state_dir().join("etcd");
        ensure_dir(&dir, 0o700).map_err(io(&dir))?;
        let client = self.etcd_endpoint();
        let peer = "http://127.0.0.1:2380";
        let mut argv = vec![etcd::ETCD.to_string()];
        argv.extend(etcd::server_args("lab", &dir.join("data"), &client, peer));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let proc = Proc::spawn_in(&self.st.underlay_ns, &argv, &[], &dir.join("etcd.log"))?;
        self.st.etcd = Some(proc);
        self.save()?;
        wait_for("etcd to answer", 30, || {
            self.etcdctl(&["endpoint", "health"]).ok()
        })?;
        Ok(())
    }

    /// Stops etcd by PID (the data dir stays for a restart).
    pub fn stop_etcd(&mut self) -> Result<()> {
        if let Some(p) = self.st.etcd.take() {
            p.stop(Duration::from_secs(5));
        }
        self.save()
    }

    /// Runs `etcdctl` (API v3) against the lab's etcd from inside the underlay namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let ep = format!("--endpoints={}", self.etcd_endpoint());
        let mut argv = vec![
            "/usr/bin/etcdctl",
            &ep,
            "--dial-timeout=2s",
            "--command-timeout=5s",
        ];
        argv.extend_from_slice(args);
        run_in(&self.st.underlay_ns, &argv)
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.state_dir().join("nodes").join(node)
    }

    pub fn conf_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("conf")
    }
    pub fn bin_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("bin")
    }
    /// The node's `--cni-data-dir` (IPAM store in `networks/`, delegate files in `twill/`).
    pub fn data_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("data")
    }
    pub fn daemon_state_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("state")
    }
    pub fn subnet_file(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("subnet.env")
    }
    pub fn daemon_log(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("twilld.log")
    }
    fn cache_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("cache")
    }

    /// Adds a node namespace on the underlay and starts its twilld. Returns the node name.
    pub fn add_node(&mut self) -> Result<String> {
        let index = self.st.next_index;
        if index > 200 {
            return Err(Error::Lab("the underlay holds at most 200 nodes".into()));
        }
        let name = format!("node{index}");
        let ns = format!("{}-{}", self.name(), name);
        let ip = Ipv4Addr::new(192, 168, 100, index);
        check_free(&ns)?;
        self.st.next_index += 1;
        self.st.nodes.push(NodeRec {
            name: name.clone(),
            index,
            ns: ns.clone(),
            ip,
            daemon: None,
        });
        self.save()?;

        add_netns(&ns)?;
        self.plug_into_underlay(&ns, &format!("ul-{name}"), ip)?;
        run_in(
            &ns,
            &["ip", "route", "add", "default", "via", &ETCD_IP.to_string()],
        )?;
        run_in(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;

        for d in [
            self.node_dir(&name),
            self.conf_dir(&name),
            self.bin_dir(&name),
            self.data_dir(&name),
            self.daemon_state_dir(&name),
        ] {
            ensure_dir(&d, 0o700).map_err(io(&d))?;
        }
        let bin = self.bin_dir(&name);
        let sources = PLUGINS.iter().map(|p| self.st.opts.bin_src.join(p));
        for src in sources {
            let Some(file) = src.file_name() else {
                continue;
            };
            let link = bin.join(file);
            if src.is_file() && !link.exists() {
                std::os::unix::fs::symlink(&src, &link).map_err(io(&link))?;
            }
        }
        self.start_daemon(&name)?;
        Ok(name)
    }

    /// Starts the node's twilld (no-op while it runs).
    pub fn start_daemon(&mut self, node: &str) -> Result<()> {
        let rec = self.node(node)?.clone();
        if rec.daemon.as_ref().is_some_and(Proc::alive) {
            return Ok(());
        }
        let twilld = self.st.opts.bin_src.join("twilld").display().to_string();
        let ep = self.etcd_endpoint();
        let subnet = self.subnet_file(node).display().to_string();
        let conf = self.conf_dir(node).display().to_string();
        let bin = self.bin_dir(node).display().to_string();
        let data = self.data_dir(node).display().to_string();
        let state = self.daemon_state_dir(node).display().to_string();
        let mut argv = vec![
            twilld.as_str(),
            "--etcd-endpoints",
            &ep,
            "--iface",
            NODE_IF,
            "--subnet-file",
            &subnet,
            "--cni-conf-dir",
            &conf,
            "--cni-bin-dir",
            &bin,
            "--cni-data-dir",
            &data,
            "--state-dir",
            &state,
        ];
        if self.st.opts.ip_masq {
            argv.push("--ip-masq");
        }
        let proc = Proc::spawn_in(
            &rec.ns,
            &argv,
            &[("RUST_LOG", "info")],
            &self.daemon_log(node),
        )?;
        self.node_mut(node)?.daemon = Some(proc);
        self.save()
    }

    /// Stops the node's twilld by PID (SIGTERM, then SIGKILL after 10 s).
    pub fn stop_daemon(&mut self, node: &str) -> Result<()> {
        if let Some(p) = self.node_mut(node)?.daemon.take() {
            p.stop(Duration::from_secs(10));
        }
        self.save()
    }

    pub fn daemon_pid(&self, node: &str) -> Option<i32> {
        self.node(node)
            .ok()?
            .daemon
            .as_ref()
            .filter(|p| p.alive())
            .map(|p| p.pid)
    }

    /// The node's state as the kubelet would see it.
    pub fn node_state(&self, node: &str) -> NodeState {
        if self.daemon_pid(node).is_none() {
            return NodeState::Stopped;
        }
        match NetworkList::load_first(&self.conf_dir(node)) {
            Ok(Some(_)) => NodeState::Ready,
            _ => NodeState::NotReady,
        }
    }

    /// The node's pod subnet from its subnet.env.
    pub fn subnet(&self, node: &str) -> Option<Ipv4Network> {
        SubnetEnv::read(&self.subnet_file(node)).ok()?.subnet
    }

    /// Waits until the node is Ready; fails early if its twilld died.
    pub fn wait_ready(&self, node: &str, secs: u64) -> Result<Duration> {
        let t0 = Instant::now();
        wait_for(&format!("{node} to become Ready"), secs, || {
            match self.node_state(node) {
                NodeState::Ready => Some(Ok(())),
                NodeState::Stopped => Some(Err(Error::Lab(format!(
                    "twilld of {node} is not running; see {}",
                    self.daemon_log(node).display()
                )))),
                NodeState::NotReady => None,
            }
        })??;
        Ok(t0.elapsed())
    }

    fn runtime(&self, node: &NodeRec) -> Runtime {
        Runtime {
            node_ns: node.ns.clone(),
            bin_dir: self.bin_dir(&node.name),
            cache_dir: self.cache_dir(&node.name),
        }
    }

    fn loopback() -> Result<NetworkList> {
        NetworkList::parse(Path::new("<built-in loopback>"), LOOPBACK_CONFLIST)
    }

    fn lo_attachment(&self, pod: &PodRec) -> Attachment {
        Attachment {
            ifname: "lo".into(),
            ..self.attachment(pod)
        }
    }

    fn attachment(&self, pod: &PodRec) -> Attachment {
        Attachment {
            container_id: pod.container_id.clone(),
            netns: format!("/run/netns/{}", pod.ns),
            ifname: "eth0".into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), format!("{}-{}", pod.node, pod.name)),
                (
                    "K8S_POD_INFRA_CONTAINER_ID".into(),
                    pod.container_id.clone(),
                ),
            ],
            capability_args: Map::new(),
        }
    }

    /// The network a runtime on `node` would use now: the first config in its conf dir.
    pub fn network(&self, node: &str) -> Result<NetworkList> {
        NetworkList::load_first(&self.conf_dir(node))?.ok_or_else(|| {
            Error::Lab(format!(
                "no network config found in {}: cni plugin not initialized",
                self.conf_dir(node).display()
            ))
        })
    }

    /// Creates a pod on `node`: a netns, then ADD through the node's CNI chain.
    /// On failure the chain is DELeted and the netns removed.
    pub fn add_pod(&mut self, node: &str) -> Result<PodRec> {
        let rec = self.node(node)?.clone();
        let k = (1..)
            .find(|k| {
                !self
                    .st
                    .pods
                    .iter()
                    .any(|p| p.node == node && p.name == format!("pod{k}"))
            })
            .unwrap_or(1);
        let name = format!("pod{k}");
        let ns = format!("{}-{}", rec.ns, name);
        let mut pod = PodRec {
            node: node.to_string(),
            name,
            container_id: ns.clone(),
            ns: ns.clone(),
            ip: None,
        };
        check_free(&ns)?;
        self.st.pods.push(pod.clone());
        self.save()?;
        let outcome = (|| {
            // lo stays down: bringing it up is the loopback plugin's job.
            run(&["ip", "netns", "add", &ns])?;
            let list = self.network(node)?;
            let rt = self.runtime(&rec);
            // As containerd: the loopback network first, then the pod network on eth0.
            rt.add(&Lab::loopback()?, &self.lo_attachment(&pod))?;
            rt.add(&list, &self.attachment(&pod))
        })();
        match outcome {
            Ok(result) => {
                pod.ip = runtime::result_ipv4(&result)
                    .and_then(|a| a.split('/').next().and_then(|ip| ip.parse().ok()));
                if let Some(p) = self.st.pods.iter_mut().find(|p| p.ns == ns) {
                    p.ip = pod.ip;
                }
                self.save()?;
                Ok(pod)
            }
            Err(e) => {
                let _ = del_netns(&ns);
                self.st.pods.retain(|p| p.ns != ns);
                self.save()?;
                Err(e)
            }
        }
    }

    pub fn pod(&self, node: &str, pod: &str) -> Result<PodRec> {
        self.st
            .pods
            .iter()
            .find(|p| p.node == node && p.name == pod)
            .cloned()
            .ok_or_else(|| Error::Lab(format!("no pod {node}/{pod}")))
    }

    /// CHECK a pod's attachment with the cached result.
    pub fn check_pod(&self, node: &str, pod: &str) -> Result<()> {
        let p = self.pod(node, pod)?;
        let list = self.network(node)?;
        self.runtime(self.node(node)?)
            .check(&list, &self.attachment(&p))
    }

    /// DEL a pod through the chain (cached config and result), then remove its netns.
    pub fn del_pod(&mut self, node: &str, pod: &str) -> Result<()> {
        let p = self.pod(node, pod)?;
        let rec = self.node(node)?.clone();
        let list = self.network(node).ok();
        let rt = self.runtime(&rec);
        rt.del(list.as_ref(), &self.attachment(&p))?;
        rt.del(Some(&Lab::loopback()?), &self.lo_attachment(&p))?;
        del_netns(&p.ns)?;
        self.st.pods.retain(|x| x.ns != p.ns);
        self.save()
    }

    /// Deletes the node's lease key from etcd (what an operator does when a node leaves).
    pub fn delete_lease(&self, node: &str) -> Result<()> {
        let subnet = self
            .subnet(node)
            .ok_or_else(|| Error::Lab(format!("{node} has no subnet.env")))?;
        let key = format!(
            "{ETCD_PREFIX}/subnets/{}-{}",
            subnet.network(),
            subnet.prefix()
        );
        self.etcdctl(&["del", &key])?;
        Ok(())
    }

    /// The lease keys currently in etcd.
    pub fn lease_keys(&self) -> Result<Vec<String>> {
        let out = self.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{ETCD_PREFIX}/subnets/"),
        ])?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// A node leaves: its twilld stops, its lease is deleted, its pods and namespace go.
    pub fn remove_node(&mut self, node: &str) -> Result<()> {
        self.stop_daemon(node)?;
        self.delete_lease(node)?;
        let pods: Vec<PodRec> = self
            .st
            .pods
            .iter()
            .filter(|p| p.node == node)
            .cloned()
            .collect();
        for p in pods {
            del_netns(&p.ns)?;
            self.st.pods.retain(|x| x.ns != p.ns);
        }
        let ns = self.node(node)?.ns.clone();
        del_netns(&ns)?;
        self.st.nodes.retain(|n| n.name != node);
        self.save()?;
        let dir = self.node_dir(node);
        std::fs::remove_dir_all(&dir).map_err(io(dir))
    }

    /// Connects `ns` to the underlay bridge: `eth0` inside with `ip`/24, its peer `port` a
    /// port of the bridge. The pair is created inside `ns` with the peer moved straight into
    /// the underlay namespace, so nothing ever appears in the root namespace.
    fn plug_into_underlay(&self, ns: &str, port: &str, ip: Ipv4Addr) -> Result<()> {
        let ul = &self.st.underlay_ns;
        run_in(
            ns,
            &[
                "ip", "link", "add", NODE_IF, "type", "veth", "peer", "name", port, "netns", ul,
            ],
        )?;
        run_in(
            ul,
            &["ip", "link", "set", port, "master", UNDERLAY_BRIDGE, "up"],
        )?;
        run_in(
            ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", NODE_IF],
        )?;
        run_in(ns, &["ip", "link", "set", NODE_IF, "up"]).map(drop)
    }

    /// Creates a namespace plugged into the underlay at 192.168.100.`host` (for benches).
    pub fn add_underlay_ns(&mut self, suffix: &str, host: u8) -> Result<String> {
        let ns = format!("{}-{}", self.name(), suffix);
        check_free(&ns)?;
        self.st.extra_ns.push(ns.clone());
        self.save()?;
        add_netns(&ns)?;
        let ip = Ipv4Addr::new(192, 168, 100, host);
        self.plug_into_underlay(&ns, &format!("ul-{suffix}"), ip)?;
        Ok(ns)
    }

    /// Creates an empty namespace recorded like [`Lab::add_underlay_ns`]'s (for benches).
    pub fn add_extra_ns(&mut self, suffix: &str) -> Result<String> {
        let ns = format!("{}-{}", self.name(), suffix);
        check_free(&ns)?;
        self.st.extra_ns.push(ns.clone());
        self.save()?;
        add_netns(&ns)?;
        Ok(ns)
    }

    /// Namespaces made by [`Lab::add_underlay_ns`] and [`Lab::add_extra_ns`].
    pub fn extra_namespaces(&self) -> &[String] {
        &self.st.extra_ns
    }

    /// Removes a namespace made by [`Lab::add_underlay_ns`] or [`Lab::add_extra_ns`].
    pub fn del_extra_ns(&mut self, ns: &str) -> Result<()> {
        del_netns(ns)?;
        // Its underlay port died with the veth; nothing else to clean.
        self.st.extra_ns.retain(|n| n != ns);
        self.save()
    }

    /// Restarts every twilld (stop all, then start all) and waits for Ready again.
    pub fn restart_daemons(&mut self, secs: u64) -> Result<()> {
        let names: Vec<String> = self.st.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &names {
            self.stop_daemon(n)?;
        }
        for n in &names {
            self.start_daemon(n)?;
        }
        for n in &names {
            self.wait_ready(n, secs)?;
        }
        Ok(())
    }

    /// Ping + TCP between every ordered pair of pods (`[i][j]` is pods()[i] → pods()[j]).
    pub fn matrix(&self) -> Result<Vec<Vec<Option<probe::Reach>>>> {
        let eps: Vec<(String, Ipv4Addr)> = self
            .st
            .pods
            .iter()
            .map(|p| {
                p.ip.map(|ip| (p.ns.clone(), ip))
                    .ok_or_else(|| Error::Lab(format!("pod {}/{} has no IP", p.node, p.name)))
            })
            .collect::<Result<_>>()?;
        probe::matrix(&eps)
    }

    /// Text of the node table.
    pub fn nodes_table(&self) -> String {
        table::nodes(self)
    }

    /// Text of the pod table.
    pub fn pods_table(&self) -> String {
        table::pods(self)
    }

    /// Text of a connectivity matrix.
    pub fn matrix_table(&self, m: &[Vec<Option<probe::Reach>>]) -> String {
        table::matrix(self, m)
    }

    /// Removes everything the lab made: processes by PID, namespaces, the state dir.
    /// Safe to run on a half-built lab and to run twice.
    pub fn down(self) -> Result<()> {
        for n in &self.st.nodes {
            if let Some(p) = &n.daemon {
                p.stop(Duration::from_secs(10));
            }
        }
        if let Some(p) = &self.st.etcd {
            p.stop(Duration::from_secs(5));
        }
        let mut errors = Vec::new();
        let namespaces = self
            .st
            .pods
            .iter()
            .map(|p| p.ns.clone())
            .chain(self.st.extra_ns.iter().cloned())
            .chain(self.st.nodes.iter().map(|n| n.ns.clone()))
            .chain(std::iter::once(self.st.underlay_ns.clone()));
        for ns in namespaces {
            if let Err(e) = del_netns(&ns) {
                errors.push(e.to_string());
            }
        }
        if !errors.is_empty() {
            return Err(Error::Lab(errors.join("; ")));
        }
        let dir = self.state_dir();
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(dir)(e)),
        }
    }
}

/// Builds a lab of `nodes` nodes with `pods` pods each, reporting progress on `out`.
/// Node states are printed while they change, NotReady → Ready.
pub fn up(
    opts: LabOptions,
    nodes: usize,
    pods: usize,
    out: &mut dyn std::io::Write,
) -> Result<Lab> {
    let t0 = Instant::now();
    let mut lab = Lab::create(opts)?;
    let say = |out: &mut dyn std::io::Write, s: String| {
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    say(
        out,
        format!(
            "underlay {}/{} in netns {}, etcd {} ({:.1} s)",
            UNDERLAY_BRIDGE,
            ETCD_IP,
            lab.underlay_ns(),
            lab.etcd_endpoint(),
            t0.elapsed().as_secs_f64()
        ),
    );
    let mut started = Vec::new();
    for _ in 0..nodes {
        started.push((lab.add_node()?, Instant::now()));
    }
    say(
        out,
        format!("\nstarted {} twilld:\n{}", started.len(), lab.nodes_table()),
    );
    // Report each node's NotReady -> Ready transition, timed from its twilld's start.
    let mut pending = started.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        let mut still = Vec::new();
        for (n, t) in pending {
            match lab.node_state(&n) {
                NodeState::Ready => say(
                    out,
                    format!(
                        "{n}: NotReady -> Ready ({} written {:.2} s after twilld started)",
                        lab.network(&n)
                            .ok()
                            .and_then(|l| l
                                .file
                                .file_name()
                                .map(|f| f.to_string_lossy().into_owned()))
                            .unwrap_or_default(),
                        t.elapsed().as_secs_f64()
                    ),
                ),
                NodeState::Stopped => {
                    return Err(Error::Lab(format!(
                        "twilld of {n} exited; see {}",
                        lab.daemon_log(&n).display()
                    )))
                }
                NodeState::NotReady => still.push((n, t)),
            }
        }
        pending = still;
        if !pending.is_empty() {
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("{} to become Ready", pending[0].0),
                    secs: 60,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let names: Vec<String> = started.into_iter().map(|(n, _)| n).collect();
    say(out, format!("\n{}", lab.nodes_table()));
    for n in &names {
        for _ in 0..pods {
            lab.add_pod(n)?;
        }
    }
    say(out, lab.pods_table());
    if !lab.pods().is_empty() {
        let m = lab.matrix()?;
        say(out, lab.matrix_table(&m));
    }
    say(
        out,
        format!(
            "lab {:?} up in {:.1} s; state in {}",
            lab.name(),
            t0.elapsed().as_secs_f64(),
            lab.state_dir().display()
        ),
    );
    Ok(lab)
}
