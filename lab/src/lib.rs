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

pub mod addr;
pub mod bench;
pub mod bins;
pub mod containerd;
pub mod error;
pub mod etcd;
pub mod probe;
pub mod process;
pub mod ready;
pub mod routemon;
pub mod runtime;
mod sandboxes;
pub mod scale;
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
/// Plugins `twilld install-cni` installs under another name when the node has none:
/// containerd attaches a `loopback` network to every sandbox (`--runtime containerd`).
pub const FALLBACK_PLUGINS: &[(&str, &str)] = &[("loopback", "twill-loopback")];
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
    /// What attaches the pods: the lab's own CNI runtime or a containerd per node.
    #[serde(default)]
    pub runtime: runtime::Kind,
    /// twilld's `--reconcile-interval` in seconds (None: twilld's default, 10 s). On one
    /// machine every pass's neighbour dump walks the kernel's one neighbour table, which holds
    /// every node's entries: O(N) per pass per node, O(N²) for the lab (see capacity.md).
    #[serde(default)]
    pub reconcile_interval: Option<u64>,
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
            runtime: runtime::Kind::Lab,
            reconcile_interval: None,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRec {
    pub name: String,
    pub index: u32,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub daemon: Option<Proc>,
    /// The node's containerd (`--runtime containerd`), see [`containerd::Record`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containerd: Option<containerd::Record>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRec {
    pub node: String,
    pub name: String,
    pub ns: String,
    pub container_id: String,
    pub ip: Option<Ipv4Addr>,
    /// The CRI sandbox ID of a containerd pod; `ns` is then the sandbox's netns path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
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
    next_index: u32,
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

/// Port of every twilld's /healthz, /readyz and /metrics, on 127.0.0.1 inside its node's
/// namespace (so the same port on every node).
pub const HEALTHZ_PORT: u16 = 10260;
/// Threads building nodes at once: each mostly waits for `ip` and the kernel.
const NODE_WORKERS: usize = 16;

/// Writes sysctls (paths under /proc/sys) inside namespace `ns` only, from a thread that
/// entered it: /proc/sys/net follows the opening thread's namespace.
fn write_sysctls(ns: &str, kv: &[(&str, &str)]) -> Result<()> {
    let kv: Vec<(String, String)> = kv
        .iter()
        .map(|(k, v)| (format!("/proc/sys/{k}"), v.to_string()))
        .collect();
    probe::in_netns(ns, move || {
        for (k, v) in &kv {
            std::fs::write(k, v)?;
        }
        Ok(())
    })
}

/// Lets etcd (and the lab's own sockets) hold one descriptor per node: the soft limit up to
/// the hard one, for this process and what it starts. The host's hard limit is not changed.
fn raise_nofile_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Runs `ip [-n ns] -batch -` with `lines` on stdin: one process for many changes.
fn ip_batch(ns: Option<&str>, lines: &str) -> Result<()> {
    use std::io::Write as _;
    let mut cmd = std::process::Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io("ip"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(lines.as_bytes()).map_err(io("ip -batch"))?;
    }
    let out = child.wait_with_output().map_err(io("ip -batch"))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!(
                "ip {} -batch",
                ns.map(|n| format!("-n {n}")).unwrap_or_default()
            ),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Runs `f` over `items` on up to `workers` threads; results in the items' order.
pub(crate) fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers.clamp(1, items.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
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
        // Nothing on the underlay speaks IPv6: without it the bridge keeps no IPv6 neighbours
        // and answers none of the nodes' router solicitations.
        write_sysctls(
            &ul,
            &[
                ("net/ipv6/conf/all/disable_ipv6", "1"),
                ("net/ipv6/conf/default/disable_ipv6", "1"),
            ],
        )?;
        raise_nofile_limit();
        run_in(
            &ul,
            &[
                "ip",
                "link",
                "add",
                UNDERLAY_BRIDGE,
                "address",
                &addr::mac_str(addr::BRIDGE_MAC),
                "type",
                "bridge",
            ],
        )?;
        run_in(
            &ul,
            &[
                "ip",
                "addr",
                "add",
                &format!("{ETCD_IP}/{}", addr::UNDERLAY_PREFIX),
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

    pub fn options(&self) -> &LabOptions {
        &self.st.opts
    }

    /// etcd's PID while it runs.
    pub fn etcd_pid(&self) -> Option<i32> {
        self.st.etcd.as_ref().filter(|p| p.alive()).map(|p| p.pid)
    }

    /// Stops every twilld at once (SIGTERM from parallel threads), then starts them all again
    /// at once: a renewal storm. Does not wait for Ready.
    pub fn restart_daemons_at_once(&mut self) -> Result<()> {
        let procs: Vec<Proc> = self
            .st
            .nodes
            .iter()
            .filter_map(|n| n.daemon.clone())
            .collect();
        parallel_map(&procs, procs.len().max(1), |p| {
            p.stop(Duration::from_secs(10))
        });
        for n in &mut self.st.nodes {
            n.daemon = None;
        }
        let recs = self.st.nodes.clone();
        let spawned = parallel_map(&recs, NODE_WORKERS, |r| self.spawn_daemon(r));
        let mut first_err = None;
        for (r, res) in recs.iter().zip(spawned) {
            match res {
                Ok(p) => self.node_mut(&r.name)?.daemon = Some(p),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.save()?;
        first_err.map_or(Ok(()), Err)
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
        let mut added = self.add_nodes(1)?;
        added
            .pop()
            .map(|(n, _)| n)
            .ok_or_else(|| Error::Lab("no node was added".into()))
    }

    /// Adds `count` nodes: records them (one state write), builds their namespaces from
    /// [`NODE_WORKERS`] threads, plugs them into the underlay in one batch and starts every
    /// twilld. Returns the node names with the instant each twilld was started.
    pub fn add_nodes(&mut self, count: usize) -> Result<Vec<(String, Instant)>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let first = self.st.next_index;
        let last = first.saturating_add(count as u32 - 1);
        if addr::node_ip(last).is_none() {
            return Err(Error::Lab(format!(
                "the underlay holds at most {} nodes",
                addr::MAX_NODES
            )));
        }
        let mut recs = Vec::with_capacity(count);
        for index in first..=last {
            let name = format!("node{index}");
            let ns = format!("{}-{}", self.name(), name);
            check_free(&ns)?;
            let ip = addr::node_ip(index)
                .ok_or_else(|| Error::Lab(format!("no underlay address for node {index}")))?;
            recs.push(NodeRec {
                name,
                index,
                ns,
                ip,
                daemon: None,
                containerd: None,
            });
        }
        self.st.next_index = last + 1;
        self.st.nodes.extend(recs.iter().cloned());
        self.save()?;

        let adds: String = recs
            .iter()
            .map(|r| format!("netns add {}\n", r.ns))
            .collect();
        ip_batch(None, &adds)?;
        let ul = self.st.underlay_ns.clone();
        let built = parallel_map(&recs, NODE_WORKERS, |r| self.build_node(r, &ul));
        if built.len() != recs.len() {
            return Err(Error::Lab("a node-building thread panicked".into()));
        }
        built.into_iter().collect::<Result<Vec<()>>>()?;
        // The bridge side of every node at once: port up, permanent neighbour entry.
        let ports: String = recs
            .iter()
            .map(|r| {
                format!(
                    "link set ul-{} master {UNDERLAY_BRIDGE} up\n\
                     neigh replace {} lladdr {} nud permanent dev {UNDERLAY_BRIDGE}\n",
                    r.name,
                    r.ip,
                    addr::mac_str(addr::node_mac(r.index))
                )
            })
            .collect();
        ip_batch(Some(&ul), &ports)?;

        let spawned = parallel_map(&recs, NODE_WORKERS, |r| {
            self.spawn_daemon(r).map(|p| (p, Instant::now()))
        });
        let mut out = Vec::with_capacity(recs.len());
        let mut first_err = None;
        for (r, res) in recs.iter().zip(spawned) {
            match res {
                Ok((proc, t)) => {
                    self.node_mut(&r.name)?.daemon = Some(proc);
                    out.push((r.name.clone(), t));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.save()?;
        if let Some(e) = first_err {
            return Err(e);
        }
        if self.st.opts.runtime == runtime::Kind::Containerd {
            // Waited for on first use (ready_containerds): they start while twilld leases.
            let names: Vec<String> = out.iter().map(|(n, _)| n.clone()).collect();
            self.spawn_containerds(&names)?;
        }
        Ok(out)
    }

    /// A node's own side: sysctls, lo, the veth into the underlay (peer moved straight into the
    /// underlay namespace, so nothing ever appears in the root namespace), address, default
    /// route and a permanent entry for etcd (see [`addr`]), then its dirs and plugin links.
    fn build_node(&self, r: &NodeRec, ul: &str) -> Result<()> {
        write_sysctls(&r.ns, &[("net/ipv4/ip_forward", "1")])?;
        let batch = format!(
            "link set lo up\n\
             link add {NODE_IF} address {mac} type veth peer name ul-{name} netns {ul}\n\
             addr add {ip}/{len} dev {NODE_IF}\n\
             link set {NODE_IF} up\n\
             route add default via {ETCD_IP}\n\
             neigh replace {ETCD_IP} lladdr {brmac} nud permanent dev {NODE_IF}\n",
            mac = addr::mac_str(addr::node_mac(r.index)),
            name = r.name,
            ip = r.ip,
            len = addr::UNDERLAY_PREFIX,
            brmac = addr::mac_str(addr::BRIDGE_MAC),
        );
        ip_batch(Some(&r.ns), &batch)?;
        let name = &r.name;
        for d in [
            self.node_dir(name),
            self.conf_dir(name),
            self.bin_dir(name),
            self.data_dir(name),
            self.daemon_state_dir(name),
        ] {
            ensure_dir(&d, 0o700).map_err(io(&d))?;
        }
        let bin = self.bin_dir(name);
        let links = PLUGINS
            .iter()
            .map(|p| (*p, *p))
            .chain(FALLBACK_PLUGINS.iter().copied());
        for (file, src) in links {
            let src = self.st.opts.bin_src.join(src);
            let link = bin.join(file);
            if src.is_file() && !link.exists() {
                std::os::unix::fs::symlink(&src, &link).map_err(io(&link))?;
            }
        }
        Ok(())
    }

    /// Starts the node's twilld (no-op while it runs).
    pub fn start_daemon(&mut self, node: &str) -> Result<()> {
        let rec = self.node(node)?.clone();
        if rec.daemon.as_ref().is_some_and(Proc::alive) {
            return Ok(());
        }
        let proc = self.spawn_daemon(&rec)?;
        self.node_mut(node)?.daemon = Some(proc);
        self.save()
    }

    /// Starts a twilld in the node's namespace. `nsenter --net` enters only the network
    /// namespace and execs twilld (the PID is twilld's); `ip netns exec` would also give every
    /// daemon a mount namespace of its own, into which each later `ip netns add` propagates —
    /// O(N) mount work per node, O(N²) for a lab.
    fn spawn_daemon(&self, rec: &NodeRec) -> Result<Proc> {
        let node = rec.name.as_str();
        let twilld = self.st.opts.bin_src.join("twilld").display().to_string();
        let ep = self.etcd_endpoint();
        let subnet = self.subnet_file(node).display().to_string();
        let conf = self.conf_dir(node).display().to_string();
        let bin = self.bin_dir(node).display().to_string();
        let data = self.data_dir(node).display().to_string();
        let state = self.daemon_state_dir(node).display().to_string();
        let netns = format!("--net=/run/netns/{}", rec.ns);
        let port = HEALTHZ_PORT.to_string();
        let mut argv = vec![
            "nsenter",
            netns.as_str(),
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
            "--healthz-port",
            &port,
        ];
        if self.st.opts.ip_masq {
            argv.push("--ip-masq");
        }
        let interval = self.st.opts.reconcile_interval.map(|s| s.to_string());
        if let Some(i) = &interval {
            argv.extend(["--reconcile-interval", i.as_str()]);
        }
        Proc::spawn(&argv, &[("RUST_LOG", "info")], &self.daemon_log(node))
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
        if self.st.opts.runtime == runtime::Kind::Containerd {
            return self.add_sandbox(node, name);
        }
        let ns = format!("{}-{}", rec.ns, name);
        let mut pod = PodRec {
            node: node.to_string(),
            name,
            container_id: ns.clone(),
            ns: ns.clone(),
            ip: None,
            sandbox: None,
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
        if p.is_sandbox() {
            return self.check_sandbox(&p);
        }
        let list = self.network(node)?;
        self.runtime(self.node(node)?)
            .check(&list, &self.attachment(&p))
    }

    /// DEL a pod through the chain (cached config and result), then remove its netns.
    pub fn del_pod(&mut self, node: &str, pod: &str) -> Result<()> {
        let p = self.pod(node, pod)?;
        if p.is_sandbox() {
            return self.del_sandbox(&p);
        }
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
        self.stop_containerd(node)?;
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
            if !p.is_sandbox() {
                del_netns(&p.ns)?;
            }
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
            &[
                "ip",
                "addr",
                "add",
                &format!("{ip}/{}", addr::UNDERLAY_PREFIX),
                "dev",
                NODE_IF,
            ],
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

    /// Waits until every started node is Ready, from one inotify watch on all their conf dirs
    /// (no per-node polling); `on_ready(node, time since its twilld started)` as each turns
    /// Ready. Fails when a pending node's twilld exits (checked every 2 s) or after `secs`.
    pub fn wait_ready_many(
        &self,
        started: &[(String, Instant)],
        secs: u64,
        mut on_ready: impl FnMut(&str, Duration),
    ) -> Result<Vec<Duration>> {
        let mut watch = ready::ConfWatch::new()?;
        for (i, (n, _)) in started.iter().enumerate() {
            watch.add(&self.conf_dir(n), i)?;
        }
        let is_ready = |i: usize| {
            matches!(
                NetworkList::load_first(&self.conf_dir(&started[i].0)),
                Ok(Some(_))
            )
        };
        let mut got: Vec<Option<Duration>> = vec![None; started.len()];
        let mut left = started.len();
        let mut mark = |i: usize, got: &mut Vec<Option<Duration>>, left: &mut usize| {
            if got[i].is_none() && is_ready(i) {
                let d = started[i].1.elapsed();
                got[i] = Some(d);
                *left -= 1;
                on_ready(&started[i].0, d);
            }
        };
        // Nodes that turned Ready before the watch was in place.
        for i in 0..started.len() {
            mark(i, &mut got, &mut left);
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut checked = Instant::now();
        while left > 0 {
            for i in watch.wait(Duration::from_millis(200)) {
                mark(i, &mut got, &mut left);
            }
            if left == 0 {
                break;
            }
            if checked.elapsed() >= Duration::from_secs(2) {
                checked = Instant::now();
                if let Some(i) = (0..started.len())
                    .find(|i| got[*i].is_none() && self.daemon_pid(&started[*i].0).is_none())
                {
                    let n = &started[i].0;
                    return Err(Error::Lab(format!(
                        "twilld of {n} exited; see {}",
                        self.daemon_log(n).display()
                    )));
                }
            }
            if Instant::now() > deadline {
                let first = (0..started.len())
                    .find(|i| got[*i].is_none())
                    .map(|i| started[i].0.clone())
                    .unwrap_or_default();
                return Err(Error::Timeout {
                    what: format!("{left} nodes to become Ready (first: {first})"),
                    secs,
                });
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Connectivity between pods: the full matrix for a few pods, else sampled ordered pairs
    /// (every node's first pod appears as a source or a destination where the sample allows).
    pub fn probe_report(&self) -> Result<String> {
        if self.st.pods.is_empty() {
            return Ok(String::new());
        }
        if self.st.pods.len() <= MATRIX_PODS {
            let m = self.matrix()?;
            return Ok(self.matrix_table(&m));
        }
        let eps = self.endpoints()?;
        let pairs = probe::sample_pairs(eps.len(), SAMPLED_PAIRS);
        let reach = probe::pairs(&eps, &pairs)?;
        Ok(table::sampled(self, &pairs, &reach))
    }

    fn endpoints(&self) -> Result<Vec<(String, Ipv4Addr)>> {
        self.st
            .pods
            .iter()
            .map(|p| {
                p.ip.map(|ip| (p.ns.clone(), ip))
                    .ok_or_else(|| Error::Lab(format!("pod {}/{} has no IP", p.node, p.name)))
            })
            .collect()
    }

    /// Ping + TCP between every ordered pair of pods (`[i][j]` is pods()[i] → pods()[j]).
    pub fn matrix(&self) -> Result<Vec<Vec<Option<probe::Reach>>>> {
        probe::matrix(&self.endpoints()?)
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
        // Sandboxes first: their CNI DEL runs while the nodes are as they were.
        let mut errors = self.teardown_containerds();
        // All daemons at once: one after the other, a loaded 1,000-node lab takes minutes.
        let daemons: Vec<Proc> = self
            .st
            .nodes
            .iter()
            .filter_map(|n| n.daemon.clone())
            .collect();
        parallel_map(&daemons, daemons.len().clamp(1, 256), |p| {
            p.stop(Duration::from_secs(10))
        });
        if let Some(p) = &self.st.etcd {
            p.stop(Duration::from_secs(5));
        }
        let namespaces = self
            .st
            .pods
            .iter()
            .filter(|p| !p.is_sandbox())
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
        // Never recurse into a filesystem still mounted below the state dir.
        let mounts = containerd::mounts_below(&dir);
        if !mounts.is_empty() {
            return Err(Error::Lab(format!(
                "still mounted below {}: {mounts:?}",
                dir.display()
            )));
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(dir)(e)),
        }
    }
}

/// Labs beyond this many nodes get summaries instead of a line per node.
pub const DETAIL_NODES: usize = 20;
/// Beyond this many pods, connectivity is probed on sampled pairs instead of every pair.
pub const MATRIX_PODS: usize = 12;
/// Ordered pod pairs probed when sampling.
pub const SAMPLED_PAIRS: usize = 48;

/// How long a start of `nodes` daemons may take to turn Ready: generous, growing with N.
pub fn ready_timeout(nodes: usize) -> u64 {
    60 + nodes as u64 / 4
}

/// p50 and max of the daemons' start → Ready times, and when the last one turned Ready.
fn ready_summary(waited: &[Duration], since_first: Duration) -> String {
    let mut v: Vec<f64> = waited.iter().map(Duration::as_secs_f64).collect();
    v.sort_by(f64::total_cmp);
    format!(
        "{} nodes NotReady -> Ready: conflist written p50 {:.2} s, max {:.2} s after each twilld \
         started; all Ready {:.1} s after the first twilld started",
        v.len(),
        scale::percentile(&v, 50.0),
        v.last().copied().unwrap_or(0.0),
        since_first.as_secs_f64()
    )
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
    let t_nodes = Instant::now();
    let started = lab.add_nodes(nodes)?;
    let detail = started.len() <= DETAIL_NODES;
    say(
        out,
        format!(
            "\nstarted {} twilld in {:.1} s:\n{}",
            started.len(),
            t_nodes.elapsed().as_secs_f64(),
            lab.nodes_table()
        ),
    );
    // Each node's NotReady -> Ready transition, timed from its twilld's start; one line per
    // node for small labs, a summary for large ones.
    let mut lines = Vec::new();
    let waited = lab.wait_ready_many(&started, ready_timeout(started.len()), |n, d| {
        if detail {
            let file = lab
                .network(n)
                .ok()
                .and_then(|l| l.file.file_name().map(|f| f.to_string_lossy().into_owned()))
                .unwrap_or_default();
            lines.push(format!(
                "{n}: NotReady -> Ready ({file} written {:.2} s after twilld started)",
                d.as_secs_f64()
            ));
        }
    })?;
    for l in lines {
        say(out, l);
    }
    if !detail && !waited.is_empty() {
        say(out, ready_summary(&waited, t_nodes.elapsed()));
    }
    let names: Vec<String> = started.into_iter().map(|(n, _)| n).collect();
    say(out, format!("\n{}", lab.nodes_table()));
    if lab.runtime_kind() == runtime::Kind::Containerd {
        lab.report_containerds(out)?;
    }
    for n in &names {
        for _ in 0..pods {
            lab.add_pod(n)?;
        }
    }
    if pods > 0 {
        say(out, lab.pods_table());
    }
    if lab.runtime_kind() == runtime::Kind::Containerd {
        say(out, lab.containerd_table());
    }
    let probed = lab.probe_report()?;
    if !probed.is_empty() {
        say(out, probed);
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
