//! A simulated L2 underlay: a namespace holding a bridge, and "nodes" (namespaces) plugged into
//! it by veth pairs. Nothing touches the root namespace.
//!
//! ```ignore
//! let ul = Underlay::new();                 // netns with bridge `br-ul`, 192.168.100.254/24 on it
//! let etcd = Etcd::start_in(ul.ns_name(), &ul.etcd_ip().to_string());
//! let n1 = ul.add_node();                   // netns with `eth0` = 192.168.100.1/24, lo up,
//! let n2 = ul.add_node();                   //   default route via .254, ip_forward=1
//! n1.ns.exec(&["ping", "-c1", &n2.ip.to_string()]);
//! ```
//! Each [`Node`] owns its namespace (deleted on drop); the [`Underlay`] owns the bridge
//! namespace. Since every underlay lives in namespaces of its own, tests running in parallel
//! can all use 192.168.100.0/24.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::netns::Netns;

/// Name of the bridge inside the underlay namespace.
pub const BRIDGE: &str = "br-ul";
/// Name of each node's underlay interface.
pub const NODE_IF: &str = "eth0";

/// The underlay: a namespace with bridge [`BRIDGE`] holding `192.168.100.254/24`.
pub struct Underlay {
    ns: Netns,
    mtu: u32,
    next: AtomicU8,
}

/// A node namespace with one underlay interface ([`NODE_IF`]).
pub struct Node {
    pub ns: Netns,
    /// The node's underlay address (its public IP).
    pub ip: Ipv4Addr,
}

impl Node {
    pub fn name(&self) -> &str {
        self.ns.name()
    }
}

impl Underlay {
    /// An underlay with MTU 1500.
    pub fn new() -> Underlay {
        Underlay::with_mtu(1500)
    }

    /// An underlay whose bridge and node links all have `mtu`.
    pub fn with_mtu(mtu: u32) -> Underlay {
        let ns = Netns::new("u");
        let mtu_s = mtu.to_string();
        ns.exec(&["ip", "link", "add", BRIDGE, "mtu", &mtu_s, "type", "bridge"]);
        ns.exec(&["ip", "addr", "add", "192.168.100.254/24", "dev", BRIDGE]);
        ns.exec(&["ip", "link", "set", BRIDGE, "up"]);
        Underlay {
            ns,
            mtu,
            next: AtomicU8::new(1),
        }
    }

    /// Name of the underlay namespace (run etcd here, see [`Underlay::etcd_ip`]).
    pub fn ns_name(&self) -> &str {
        self.ns.name()
    }

    /// The bridge's own address, where an etcd started in [`Underlay::ns_name`] listens.
    pub fn etcd_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, 254)
    }

    /// Adds a node: a new namespace, veth `eth0` ↔ bridge port, address 192.168.100.N/24.
    pub fn add_node(&self) -> Node {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        assert!(n < 254, "underlay full");
        let ns = Netns::new("n");
        let port = format!("p{n}");
        let mtu = self.mtu.to_string();
        // Created inside the node namespace, peer moved into the underlay namespace.
        ns.exec(&[
            "ip",
            "link",
            "add",
            NODE_IF,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "mtu",
            &mtu,
            "netns",
            self.ns.name(),
        ]);
        self.ns
            .exec(&["ip", "link", "set", &port, "master", BRIDGE, "up"]);
        let ip = Ipv4Addr::new(192, 168, 100, n);
        ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", NODE_IF]);
        ns.exec(&["ip", "link", "set", NODE_IF, "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", "192.168.100.254"]);
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        Node { ns, ip }
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Underlay::new()
    }
}

/// Per-node directories for a `twilld` (all flags that write files point below one temp dir),
/// kept across daemon restarts. The CNI bin dir holds symlinks to the built twill plugins
/// (`cargo build --workspace --bins`); a plugin not built yet is replaced by a stand-in script
/// that only answers VERSION.
pub struct NodeDirs {
    root: tempfile::TempDir,
}

/// twill's plugins (the image ships and install-cni installs them; twilld chains
/// twill-portmap when it is present).
pub const TWILL_PLUGINS: [&str; 5] = [
    "twill",
    "twill-bridge",
    "twill-host-local",
    "twill-loopback",
    "twill-portmap",
];

impl NodeDirs {
    pub fn new() -> NodeDirs {
        let root = tempfile::Builder::new()
            .prefix("twill-node")
            .tempdir()
            .expect("node temp dir");
        let d = NodeDirs { root };
        std::fs::create_dir_all(d.cni_bin_dir()).expect("bin dir");
        for p in TWILL_PLUGINS {
            let built = crate::bins::target_dir().join(p);
            let dst = d.cni_bin_dir().join(p);
            if built.is_file() {
                std::os::unix::fs::symlink(&built, &dst).expect("symlink plugin");
            } else {
                d.stand_in(p);
            }
        }
        d
    }

    /// Writes a script for `name` that answers VERSION only (for plugins not built yet).
    pub fn stand_in(&self, name: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.cni_bin_dir().join(name);
        let _ = std::fs::remove_file(&p);
        std::fs::write(
            &p,
            "#!/bin/sh\necho '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}'\n",
        )
        .expect("stand-in plugin");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    pub fn subnet_file(&self) -> std::path::PathBuf {
        self.run_dir().join("subnet.env")
    }
    /// The node's `/run/twill`: subnet.env and the conflist file the conf dir links to.
    pub fn run_dir(&self) -> std::path::PathBuf {
        self.root.path().join("run")
    }
    /// What a reboot does to `/run/twill`: everything in it is gone.
    pub fn wipe_run_dir(&self) {
        match std::fs::remove_dir_all(self.run_dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("wipe {}: {e}", self.run_dir().display()),
        }
    }
    pub fn cni_conf_dir(&self) -> std::path::PathBuf {
        self.root.path().join("net.d")
    }
    pub fn conflist(&self) -> std::path::PathBuf {
        self.cni_conf_dir().join("10-twill.conflist")
    }
    pub fn cni_bin_dir(&self) -> std::path::PathBuf {
        self.root.path().join("bin")
    }
    pub fn cni_data_dir(&self) -> std::path::PathBuf {
        self.root.path().join("cni")
    }
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.root.path().join("state")
    }
    pub fn log(&self) -> std::path::PathBuf {
        self.root.path().join("twilld.log")
    }

    /// The flags pointing every file twilld writes below this dir.
    pub fn args(&self) -> Vec<String> {
        let p = |f: &str, v: std::path::PathBuf| format!("--{f}={}", v.display());
        vec![
            p("subnet-file", self.subnet_file()),
            p("cni-conf-dir", self.cni_conf_dir()),
            p("cni-bin-dir", self.cni_bin_dir()),
            p("cni-data-dir", self.cni_data_dir()),
            p("state-dir", self.state_dir()),
        ]
    }

    /// `FLANNEL_SUBNET`'s network (e.g. `10.5.3.0/24`) once subnet.env exists.
    pub fn subnet(&self) -> Option<ipnetwork::Ipv4Network> {
        let text = std::fs::read_to_string(self.subnet_file()).ok()?;
        let env = twill_common::subnet_env::SubnetEnv::parse(&text).ok()?;
        env.subnet
    }
}

impl Default for NodeDirs {
    fn default() -> Self {
        NodeDirs::new()
    }
}

/// A `twilld` process running inside a node namespace; killed by PID on drop.
///
/// ```ignore
/// let dirs = NodeDirs::new();
/// let d = Twilld::start(node.name(), &dirs, &etcd.endpoint(), &["--iface=eth0"]);
/// wait_for(|| dirs.conflist().exists(), Duration::from_secs(20));
/// ```
pub struct Twilld {
    child: Option<std::process::Child>,
    log: std::path::PathBuf,
}

impl Twilld {
    /// `ip netns exec NS twilld --etcd-endpoints=ETCD <dirs.args()> <extra>`; stderr appended
    /// to `dirs.log()`. `RUST_LOG` defaults to `info`.
    pub fn start(ns: &str, dirs: &NodeDirs, etcd_endpoint: &str, extra: &[&str]) -> Twilld {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dirs.log())
            .expect("twilld log");
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(crate::bins::bin("twilld"))
            .arg(format!("--etcd-endpoints={etcd_endpoint}"))
            .args(dirs.args())
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn twilld");
        Twilld {
            child: Some(child),
            log: dirs.log(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The daemon's log so far (all runs with the same dirs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to 10 s) for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = Twilld::wait_child(child, std::time::Duration::from_secs(10));
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = None;
        status
    }

    /// Kills the daemon with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the process exits by itself (None on timeout).
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let s = Twilld::wait_child(child, timeout);
        if s.is_some() {
            self.child = None;
        }
        s
    }

    fn wait_child(
        child: &mut std::process::Child,
        timeout: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Twilld {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns true; false after `timeout`.
pub fn wait_for(mut f: impl FnMut() -> bool, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `ip -4 neigh`, `bridge fdb` and `ip -4 route` of a device, for assertions and messages.
pub fn vtep_state(ns: &Netns, dev: &str) -> (String, String, String) {
    let run = |argv: &[&str]| String::from_utf8_lossy(&ns.output(argv).stdout).into_owned();
    (
        run(&["ip", "-4", "neigh", "show", "dev", dev]),
        run(&["bridge", "fdb", "show", "dev", dev]),
        run(&["ip", "-4", "route", "show", "dev", dev]),
    )
}

/// Whether `dev` carries flannel's three entries for a vxlan peer: permanent neighbour
/// (network address → MAC), FDB (MAC → public IP), onlink route via the network address.
pub fn has_vxlan_peer(ns: &Netns, dev: &str, subnet: &str, mac: &str, public_ip: &str) -> bool {
    let net = subnet.split('/').next().unwrap_or_default();
    let (neigh, fdb, routes) = vtep_state(ns, dev);
    neigh.contains(&format!("{net} lladdr {mac} PERMANENT"))
        && fdb.contains(&format!("{mac} dst {public_ip} self permanent"))
        && routes
            .lines()
            .any(|l| l.starts_with(&format!("{subnet} via {net} ")) && l.contains("onlink"))
}

/// Whether `dev` has none of the entries of a peer.
pub fn lacks_vxlan_peer(ns: &Netns, dev: &str, subnet: &str, mac: &str) -> bool {
    let net = subnet.split('/').next().unwrap_or_default();
    let (neigh, fdb, routes) = vtep_state(ns, dev);
    !neigh.lines().any(|l| l.starts_with(&format!("{net} ")))
        && !fdb.contains(mac)
        && !routes.contains(subnet)
}

/// A stand-in pod address: bridge `cni0` in `ns` holding the first address of `subnet`.
pub fn add_pod_bridge(ns: &Netns, subnet: ipnetwork::Ipv4Network) -> Ipv4Addr {
    let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    ns.exec(&["ip", "link", "add", "cni0", "type", "bridge"]);
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{gw}/{}", subnet.prefix()),
        "dev",
        "cni0",
    ]);
    ns.exec(&["ip", "link", "set", "cni0", "up"]);
    gw
}

/// One ping from `src` (an address in `ns`) to `dst`, 2 s timeout.
pub fn ping_from(ns: &Netns, src: &str, dst: &str) -> bool {
    ns.output(&["ping", "-c1", "-W2", "-I", src, dst])
        .status
        .success()
}

/// etcd prefix of flannel's key schema, which twilld shares.
pub const FLANNEL_PREFIX: &str = "/coreos.com/network";
/// twilld's VXLAN device (VNI 1).
pub const VTEP: &str = "twill.1";
/// How long [`Member::wait_ready`] waits for a node to become ready.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Underlay {
    /// etcd inside the underlay namespace at [`Underlay::etcd_ip`], holding `network_config`
    /// under `<FLANNEL_PREFIX>/config` when given.
    pub fn start_etcd(&self, network_config: Option<&str>) -> crate::etcd::Etcd {
        let etcd = crate::etcd::Etcd::start_in(self.ns_name(), &self.etcd_ip().to_string());
        if let Some(c) = network_config {
            etcd.etcdctl(&["put", &format!("{FLANNEL_PREFIX}/config"), c]);
        }
        etcd
    }
}

/// One twill node of an underlay test: a node namespace, its [`NodeDirs`] and the `twilld`
/// running there (killed on drop, the namespace deleted).
///
/// ```ignore
/// let ul = Underlay::new();
/// let etcd = ul.start_etcd(Some(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#));
/// let a = Member::start(&ul, &etcd, &[]);
/// a.wait_ready();
/// println!("{} leased {}", a.node.name(), a.subnet());
/// ```
pub struct Member {
    // Dropped in declaration order: the daemon goes first, so it cannot recreate files in the
    // dirs (it repairs missing ones every pass) or touch the namespace while they are removed.
    pub daemon: Twilld,
    pub node: Node,
    pub dirs: NodeDirs,
}

impl Member {
    /// Adds a node to `ul` and runs `twilld --iface=eth0 <extra>` there, with fresh dirs.
    pub fn start(ul: &Underlay, etcd: &crate::etcd::Etcd, extra: &[&str]) -> Member {
        Member::start_with(ul, etcd, NodeDirs::new(), extra)
    }

    /// [`Member::start`] with prepared `dirs` (e.g. a plugin replaced by a stand-in).
    pub fn start_with(
        ul: &Underlay,
        etcd: &crate::etcd::Etcd,
        dirs: NodeDirs,
        extra: &[&str],
    ) -> Member {
        let node = ul.add_node();
        let daemon = Twilld::start(node.name(), &dirs, &etcd.endpoint(), &Member::args(extra));
        Member { node, dirs, daemon }
    }

    /// Replaces the daemon by a new `twilld --iface=eth0 <extra>` on the same node and dirs.
    pub fn restart(&mut self, etcd: &crate::etcd::Etcd, extra: &[&str]) {
        self.daemon = Twilld::start(
            self.node.name(),
            &self.dirs,
            &etcd.endpoint(),
            &Member::args(extra),
        );
    }

    fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--iface=eth0"];
        args.extend_from_slice(extra);
        args
    }

    /// Two nodes started with `args_a` / `args_b`, both ready and each carrying the other's
    /// VXLAN entries (panics with both VTEPs' state otherwise).
    pub fn meshed_pair(
        ul: &Underlay,
        etcd: &crate::etcd::Etcd,
        args_a: &[&str],
        args_b: &[&str],
    ) -> (Member, Member) {
        let a = Member::start(ul, etcd, args_a);
        let b = Member::start(ul, etcd, args_b);
        a.wait_ready();
        b.wait_ready();
        assert!(
            wait_for(|| a.sees(&b) && b.sees(&a), READY_TIMEOUT),
            "{:?}\n{:?}",
            a.vtep_state(),
            b.vtep_state()
        );
        (a, b)
    }

    /// Waits until the node wrote its subnet.env and CNI config (the kubelet's Ready signal);
    /// panics with the daemon's log after [`READY_TIMEOUT`].
    pub fn wait_ready(&self) {
        assert!(
            wait_for(
                || self.dirs.conflist().exists() && self.dirs.subnet().is_some(),
                READY_TIMEOUT
            ),
            "{} never got ready; log:\n{}",
            self.node.name(),
            self.daemon.log()
        );
    }

    /// The leased subnet from subnet.env; panics when there is none yet.
    pub fn subnet(&self) -> ipnetwork::Ipv4Network {
        self.dirs.subnet().expect("subnet.env")
    }

    /// The subnet.env text ("" when missing).
    pub fn env(&self) -> String {
        std::fs::read_to_string(self.dirs.subnet_file()).unwrap_or_default()
    }

    /// The MAC address of the node's [`VTEP`].
    pub fn mac(&self) -> String {
        self.node
            .ns
            .exec(&["cat", &format!("/sys/class/net/{VTEP}/address")])
            .trim()
            .to_string()
    }

    /// The etcd key of this node's lease.
    pub fn lease_key(&self) -> String {
        let s = self.subnet();
        format!("{FLANNEL_PREFIX}/subnets/{}-{}", s.network(), s.prefix())
    }

    /// Whether this node's [`VTEP`] has `peer`'s neighbour, FDB and route entries.
    pub fn sees(&self, peer: &Member) -> bool {
        has_vxlan_peer(
            &self.node.ns,
            VTEP,
            &peer.subnet().to_string(),
            &peer.mac(),
            &peer.node.ip.to_string(),
        )
    }

    /// [`vtep_state`] of this node's [`VTEP`].
    pub fn vtep_state(&self) -> (String, String, String) {
        vtep_state(&self.node.ns, VTEP)
    }
}

impl Member {
    /// `GET http://127.0.0.1:<port><path>` from inside the node's namespace, where twilld's
    /// health server listens: `(status, body)`, status 0 when nothing answered within 3 s.
    pub fn http_get(&self, port: u16, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{port}{path}");
        let out = self.node.ns.output(&[
            "curl",
            "-s",
            "--max-time",
            "3",
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The `/metrics` text of the health server on `port` ("" when it does not answer).
    pub fn metrics(&self, port: u16) -> String {
        match self.http_get(port, "/metrics") {
            (200, body) => body,
            _ => String::new(),
        }
    }

    /// Whether etcd answers a health check (a read) from inside this node's namespace, over
    /// the same route twilld uses.
    pub fn reaches_etcd(&self, etcd: &crate::etcd::Etcd) -> bool {
        self.node
            .ns
            .output(&[
                crate::etcd::ETCDCTL,
                &format!("--endpoints={}", etcd.endpoint()),
                "--dial-timeout=2s",
                "--command-timeout=3s",
                "endpoint",
                "health",
            ])
            .status
            .success()
    }
}

/// The value of one sample in a Prometheus text exposition: `sample` is the metric name with
/// its labels as rendered, e.g. `twill_leases_rejected{reason="bad_vtep_mac"}`. None when the
/// sample is absent or its value is not a number.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
