//! A real container runtime for the root tests: Debian's containerd (1.6) with runc, started
//! inside a node namespace and driven through the CRI v1 API, the way the kubelet drives it.
//!
//! ```ignore
//! let dirs = containerd::installed_node_dirs();   // bin dir = what `twilld install-cni` put there
//! let m = Member::start_with(&ul, &etcd, dirs, &[]);
//! let rt = Containerd::start(&m.node, &m.dirs);   // own root/state/socket below a temp dir
//! assert!(rt.network_ready().0);
//! let id = rt.run_pod("web", &[]).expect("RunPodSandbox");
//! println!("{}", rt.pod_ip(&id));
//! ```
//! Everything lives below one temp dir (config, root, state, socket) except what containerd
//! and its shims cannot be told to put elsewhere: shim sockets in `/run/containerd/s`, libcni's
//! result cache in `/var/lib/cni/results` and runc's cgroups (under a parent of our own).
//! The guard removes exactly those entries of its own on drop: pods stopped and removed through
//! CRI, containerd, shims and pod processes killed by PID, mounts below the temp dir unmounted.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxState, PodSandboxStatusRequest, PortMapping, Protocol, RemovePodSandboxRequest,
    RunPodSandboxRequest, StatusRequest, StopPodSandboxRequest,
};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::underlay::{Node, NodeDirs};

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";
/// busybox-static: the only program in the sandbox image.
pub const BUSYBOX: &str = "/bin/busybox";
/// The sandbox ("pause") image, built locally and imported; never pulled.
pub const SANDBOX_IMAGE: &str = "twill.test/pause:1";
/// CRI's namespace in containerd.
const K8S_NS: &str = "k8s.io";
/// libcni's result cache (go-cni in containerd 1.6 cannot be pointed elsewhere).
pub const CNI_RESULTS: &str = "/var/lib/cni/results";
/// Where containerd's runc v2 shims put their sockets whatever the config says.
const SHIM_SOCKETS: &str = "/run/containerd/s";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long one CRI call may take (RunPodSandbox runs runc and the whole CNI chain).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A node's [`NodeDirs`] whose CNI bin dir holds only what `twilld install-cni` installs from
/// an image-like source dir (the built twill plugins, as the Dockerfile ships them) — nothing
/// copied in by hand, in particular no reference `loopback` or `portmap`.
pub fn installed_node_dirs() -> NodeDirs {
    let dirs = NodeDirs::new();
    let bin = dirs.cni_bin_dir();
    // NodeDirs links the plugins in; start from an empty bin dir instead.
    for e in std::fs::read_dir(&bin).expect("read bin dir").flatten() {
        std::fs::remove_file(e.path()).expect("empty bin dir");
    }
    let image = tempfile::Builder::new()
        .prefix("twill-image-bin")
        .tempdir()
        .expect("image bin dir");
    for p in crate::underlay::TWILL_PLUGINS {
        std::os::unix::fs::symlink(crate::bins::bin(p), image.path().join(p)).expect("link");
    }
    crate::deploy::output_ok(
        crate::deploy::twilld()
            .arg("install-cni")
            .arg("--src-dir")
            .arg(image.path())
            .arg("--dest-dir")
            .arg(&bin),
    );
    dirs
}

/// Names of the entries of the node's CNI bin dir, sorted.
pub fn bin_dir_entries(dirs: &NodeDirs) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dirs.cni_bin_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A hostPort → containerPort mapping for [`Containerd::run_pod`].
#[derive(Debug, Clone, Copy)]
pub struct HostPort {
    pub host: u16,
    pub container: u16,
}

/// What [`Containerd::pod_status`] reports about one sandbox.
#[derive(Debug, Clone)]
pub struct PodStatus {
    pub ready: bool,
    pub ip: Option<Ipv4Addr>,
    /// The pod's network namespace (a bind mount below containerd's state dir), if any.
    pub netns: Option<String>,
    /// The pod's init (sandbox) process.
    pub pid: Option<i32>,
}

/// A containerd running in a node namespace, with its own root, state and socket.
pub struct Containerd {
    dir: tempfile::TempDir,
    netns_path: String,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
    cgroup_parent: String,
    /// Every sandbox ID this guard created (for the libcni result cache cleanup).
    pods: std::sync::Mutex<Vec<String>>,
    /// Whether `/run/containerd` (and its `s`) existed before this guard: only dirs the shims
    /// created for us are removed again.
    run_dirs_existed: (bool, bool),
    /// The same for `/var/lib/cni` and its `results` (libcni creates them on first use).
    cache_dirs_existed: (bool, bool),
    /// Sandbox and shim PIDs seen (for a kill by PID once containerd is gone).
    procs: std::sync::Mutex<Vec<i32>>,
}

impl Containerd {
    /// Writes the config, starts containerd with `nsenter --net=/run/netns/<node>` (not
    /// `ip netns exec`, whose private /sys mount hides the cgroup mounts runc needs), waits
    /// for its socket and imports the sandbox image.
    pub fn start(node: &Node, dirs: &NodeDirs) -> Containerd {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = tempfile::Builder::new()
            .prefix("twill-containerd")
            .tempdir()
            .expect("containerd temp dir");
        let cgroup_parent = format!("/twill-cri-{}-{n}", std::process::id());
        std::fs::write(
            dir.path().join("config.toml"),
            config_toml(dir.path(), dirs),
        )
        .expect("write config.toml");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut c = Containerd {
            dir,
            netns_path: node.ns.path(),
            child: None,
            rt,
            client: None,
            cgroup_parent,
            pods: std::sync::Mutex::new(Vec::new()),
            procs: std::sync::Mutex::new(Vec::new()),
            run_dirs_existed: existed(SHIM_SOCKETS),
            cache_dirs_existed: existed(CNI_RESULTS),
        };
        c.launch();
        let image = write_sandbox_image(c.dir.path());
        let out = Command::new(CTR)
            .arg("--address")
            .arg(c.socket())
            .args(["-n", K8S_NS, "images", "import"])
            .arg(&image)
            .stdin(Stdio::null())
            .output()
            .expect("spawn ctr");
        assert!(
            out.status.success(),
            "ctr images import failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    /// The temp dir holding config, root, state, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }
    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    /// containerd's `/run/containerd` (state): wiped by a reboot.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    /// Where the CRI plugin bind-mounts pod network namespaces
    /// (`netns_mounts_under_state_dir`).
    pub fn netns_dir(&self) -> PathBuf {
        self.state_dir().join("io.containerd.grpc.v1.cri/netns")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }
    /// containerd's log so far (every start), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts containerd (again, on the same root and state dirs) and waits for CRI to answer.
    pub fn launch(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("containerd log");
        // nsenter execs containerd, so the child's PID is containerd's own.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path))
            .arg(CONTAINERD)
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    panic!("containerd exited with {status}:\n{}", self.log());
                }
            }
            if self.socket().exists() {
                if let Ok(client) = self.connect() {
                    self.client = Some(client);
                    if self
                        .call(
                            |mut c| async move { c.status(StatusRequest { verbose: false }).await },
                        )
                        .is_ok()
                    {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd's CRI did not answer within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn connect(&self) -> Result<RuntimeServiceClient<Channel>, tonic::transport::Error> {
        let sock = self.socket();
        // The URI is required by tonic but unused: every connection goes to the unix socket.
        let endpoint = Endpoint::from_static("http://[::]:50051").timeout(CALL_TIMEOUT);
        let channel = self
            .rt
            .block_on(
                endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let sock = sock.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(sock).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                })),
            )?;
        Ok(RuntimeServiceClient::new(channel))
    }

    /// Runs one CRI call on the guard's runtime.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self
            .client
            .clone()
            .ok_or_else(|| tonic::Status::unavailable("containerd is not running"))?;
        self.rt.block_on(f(client)).map(|r| r.into_inner())
    }

    /// CRI `Status`: (NetworkReady, its reason and message).
    pub fn network_ready(&self) -> (bool, String) {
        let st = self
            .call(|mut c| async move { c.status(StatusRequest { verbose: false }).await })
            .unwrap_or_else(|e| panic!("CRI Status: {e}"));
        let conds = st.status.map(|s| s.conditions).unwrap_or_default();
        let net = conds
            .iter()
            .find(|c| c.r#type == "NetworkReady")
            .unwrap_or_else(|| panic!("no NetworkReady condition in {conds:?}"));
        (net.status, format!("{}: {}", net.reason, net.message))
    }

    fn sandbox_config(&self, name: &str, ports: &[HostPort]) -> PodSandboxConfig {
        let uid = format!("{name}-uid-{}", std::process::id());
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid,
                namespace: "twill-test".to_string(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            port_mappings: ports
                .iter()
                .map(|p| PortMapping {
                    protocol: Protocol::Tcp as i32,
                    container_port: i32::from(p.container),
                    host_port: i32::from(p.host),
                    host_ip: String::new(),
                })
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                // A cgroup parent of our own, so every cgroup runc creates can be found and
                // removed even when a simulated reboot killed the pods.
                cgroup_parent: self.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// CRI `RunPodSandbox` (default runtime handler); the sandbox ID.
    pub fn run_pod(&self, name: &str, ports: &[HostPort]) -> Result<String, tonic::Status> {
        let config = self.sandbox_config(name, ports);
        let id = self.call(|mut c| async move {
            c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
        })?;
        self.remember(&id.pod_sandbox_id);
        self.record_procs(&id.pod_sandbox_id);
        Ok(id.pod_sandbox_id)
    }

    /// `RunPodSandbox` for every name at once (concurrent CRI calls on one connection, as a
    /// kubelet starting many pods does); results in the order of `names`.
    pub fn run_pods_concurrently(&self, names: &[String]) -> Vec<Result<String, tonic::Status>> {
        let Some(client) = self.client.clone() else {
            return names
                .iter()
                .map(|_| Err(tonic::Status::unavailable("containerd is not running")))
                .collect();
        };
        let configs: Vec<PodSandboxConfig> =
            names.iter().map(|n| self.sandbox_config(n, &[])).collect();
        let results: Vec<Result<String, tonic::Status>> = self.rt.block_on(async move {
            let handles: Vec<_> = configs
                .into_iter()
                .map(|config| {
                    let mut c = client.clone();
                    tokio::spawn(async move {
                        c.run_pod_sandbox(RunPodSandboxRequest {
                            config: Some(config),
                            runtime_handler: String::new(),
                        })
                        .await
                        .map(|r| r.into_inner().pod_sandbox_id)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for h in handles {
                out.push(
                    h.await
                        .unwrap_or_else(|e| Err(tonic::Status::internal(e.to_string()))),
                );
            }
            out
        });
        for id in results.iter().flatten() {
            self.remember(id);
            self.record_procs(id);
        }
        results
    }

    fn remember(&self, id: &str) {
        if let Ok(mut p) = self.pods.lock() {
            p.push(id.to_string());
        }
    }

    /// CRI `PodSandboxStatus` (verbose, for the netns path and the sandbox PID).
    pub fn pod_status(&self, id: &str) -> Result<PodStatus, tonic::Status> {
        let id = id.to_string();
        let resp = self.call(|mut c| async move {
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            })
            .await
        })?;
        let st = resp.status.unwrap_or_default();
        let ip = st
            .network
            .as_ref()
            .and_then(|n| n.ip.parse::<Ipv4Addr>().ok());
        let info: Value = resp
            .info
            .get("info")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        Ok(PodStatus {
            ready: st.state == PodSandboxState::SandboxReady as i32,
            ip,
            netns: netns_from_info(&info),
            pid: info["pid"].as_i64().and_then(|p| i32::try_from(p).ok()),
        })
    }

    /// The pod's IP; panics when it has none.
    pub fn pod_ip(&self, id: &str) -> Ipv4Addr {
        let st = self
            .pod_status(id)
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e}"));
        st.ip
            .unwrap_or_else(|| panic!("sandbox {id} has no IPv4 address: {st:?}"))
    }

    /// The pod's netns path; panics when it has none.
    pub fn pod_netns(&self, id: &str) -> String {
        let st = self
            .pod_status(id)
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e}"));
        st.netns
            .clone()
            .unwrap_or_else(|| panic!("sandbox {id} has no network namespace: {st:?}"))
    }

    /// CRI `StopPodSandbox` (tears the network down through CNI DEL).
    pub fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let id = id.to_string();
        self.call(|mut c| async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(|_| ())
    }

    /// CRI `RemovePodSandbox`.
    pub fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let id = id.to_string();
        self.call(|mut c| async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(|_| ())
    }

    /// CRI `ListPodSandbox`: (id, ready) of every sandbox containerd knows.
    pub fn list_pods(&self) -> Result<Vec<(String, bool)>, tonic::Status> {
        let l = self.call(|mut c| async move {
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
        })?;
        Ok(l.items
            .into_iter()
            .map(|p| (p.id, p.state == PodSandboxState::SandboxReady as i32))
            .collect())
    }

    /// Sandbox PIDs recorded in the state dir (`init.pid` per task; the runc v2 shim of
    /// containerd 1.6 writes no PID file of its own there).
    fn init_pids(&self) -> Vec<i32> {
        let tasks = self
            .state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(K8S_NS);
        std::fs::read_dir(tasks)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("init.pid")).ok())
            .filter_map(|s| s.trim().parse::<i32>().ok())
            .collect()
    }

    /// Records a sandbox's process and its shim (the sandbox's parent) right after it
    /// started: shims outlive a killed containerd, and only these PIDs lead to them.
    fn record_procs(&self, id: &str) {
        let Some(pid) = self.pod_status(id).ok().and_then(|st| st.pid) else {
            return;
        };
        let mut v = vec![pid];
        v.extend(parent_pid(pid).filter(|pp| self.is_our_shim(*pp)));
        if let Ok(mut p) = self.procs.lock() {
            p.extend(v);
        }
    }

    /// Whether `pid` is a shim serving this containerd (`-address <our socket>` in its argv),
    /// which also guards against a recorded PID reused by another process.
    fn is_our_shim(&self, pid: i32) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let sock = self.socket().display().to_string();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.windows(2)
            .any(|w| w[0] == b"-address" && w[1] == sock.as_bytes())
    }

    /// Live shims of this containerd and the sandbox processes they run, sandboxes first.
    fn our_procs(&self) -> Vec<i32> {
        let mut cands = self.procs.lock().map(|p| p.clone()).unwrap_or_default();
        let inits = self.init_pids();
        cands.extend(inits.iter().filter_map(|p| parent_pid(*p)));
        cands.extend(inits);
        cands.sort_unstable();
        cands.dedup();
        let shims: Vec<i32> = cands
            .iter()
            .copied()
            .filter(|p| pid_alive(*p) && self.is_our_shim(*p))
            .collect();
        let mut v: Vec<i32> = cands
            .iter()
            .copied()
            .filter(|p| pid_alive(*p) && parent_pid(*p).is_some_and(|pp| shims.contains(&pp)))
            .collect();
        v.extend(shims);
        v
    }

    /// Shim sockets of our tasks (in `/run/containerd/s`, named in each task's `address`).
    fn shim_sockets(&self) -> Vec<PathBuf> {
        let tasks = self
            .state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(K8S_NS);
        std::fs::read_dir(tasks)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("address")).ok())
            .filter_map(|a| a.trim().strip_prefix("unix://").map(PathBuf::from))
            .filter(|p| p.starts_with(SHIM_SOCKETS))
            .collect()
    }

    /// A power cut: containerd, every shim and every pod process get SIGKILL, nothing is
    /// torn down. The pods' netns mounts and the state dir stay until [`Containerd::wipe_state`].
    pub fn power_off(&mut self) {
        self.client = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let procs = self.our_procs();
        for pid in &procs {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // runc's cgroups of the killed pods become empty once the processes are gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while procs.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What a reboot does to `/run`: the state dir (with the pods' netns and shm mounts) and
    /// the shims' sockets are gone. Only after [`Containerd::power_off`].
    pub fn wipe_state(&self) {
        assert!(self.child.is_none(), "wipe_state while containerd runs");
        for s in self.shim_sockets() {
            let _ = std::fs::remove_file(s);
        }
        unmount_below(&self.state_dir());
        let _ = std::fs::remove_dir_all(self.state_dir());
    }

    /// Stops and removes every sandbox through CRI (best effort, for cleanup).
    fn remove_all_pods(&self) {
        for (id, _) in self.list_pods().unwrap_or_default() {
            // Also sandboxes whose RunPodSandbox failed: libcni may have cached their result.
            self.remember(&id);
            let _ = self.stop_pod(&id);
            let _ = self.remove_pod(&id);
        }
    }

    fn remove_cgroups(&self) {
        let rel = self.cgroup_parent.trim_start_matches('/');
        for e in std::fs::read_dir(CGROUP_ROOT)
            .into_iter()
            .flatten()
            .flatten()
        {
            let base = e.path().join(rel);
            if base.is_dir() {
                remove_cgroup_tree(&base);
            }
        }
    }

    fn remove_result_cache(&self) {
        let pods = self.pods.lock().map(|p| p.clone()).unwrap_or_default();
        for e in std::fs::read_dir(CNI_RESULTS)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            // libcni names entries `<network>-<containerID>-<ifname>`.
            if pods.iter().any(|id| name.contains(id.as_str())) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.client.is_some() {
            self.remove_all_pods();
        }
        self.power_off();
        for s in self.shim_sockets() {
            let _ = std::fs::remove_file(s);
        }
        unmount_below(self.dir.path());
        self.remove_cgroups();
        self.remove_result_cache();
        remove_created_dirs(SHIM_SOCKETS, self.run_dirs_existed);
        remove_created_dirs(CNI_RESULTS, self.cache_dirs_existed);
    }
}

/// Whether `dir`'s parent and `dir` exist.
fn existed(dir: &str) -> (bool, bool) {
    let d = Path::new(dir);
    (d.parent().is_some_and(Path::exists), d.exists())
}

/// Removes `dir` and its parent where they did not exist before (see [`existed`]) and are
/// empty now: remove_dir fails while another runtime still keeps entries there.
fn remove_created_dirs(dir: &str, existed: (bool, bool)) {
    let d = Path::new(dir);
    if !existed.1 {
        let _ = std::fs::remove_dir(d);
    }
    if !existed.0 {
        if let Some(parent) = d.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// The parent PID from `/proc/<pid>/stat` (the field after the `(comm)`).
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

/// The network namespace path in a verbose sandbox status (`info.runtimeSpec`).
pub fn netns_from_info(info: &Value) -> Option<String> {
    info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(String::from)
}

/// Removes a cgroup dir and its children, deepest first (cgroupfs dirs go with rmdir only).
fn remove_cgroup_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo; octal escapes
/// such as `\040` decoded).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything mounted at or below `dir` (netns bind mounts, shm, rootfs).
pub fn unmount_below(dir: &Path) {
    // A path can be stacked more than once; repeat until nothing is left.
    for _ in 0..8 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// containerd 1.6's config (version 2): everything below `dir`, CRI with the node's CNI dirs,
/// and what a test machine needs: `restrict_oom_score_adj` (root without CAP_SYS_RESOURCE, as
/// here, cannot give the sandbox CRI's default oom_score_adj of -998; restricted, it is never
/// set below containerd's own) and the pods' netns mounts below the state dir instead of the
/// shared /run/netns.
pub fn config_toml(dir: &Path, dirs: &NodeDirs) -> String {
    let q = |p: PathBuf| serde_json::to_string(&p.display().to_string()).expect("path as string");
    let root = q(dir.join("root"));
    let state = q(dir.join("state"));
    let runc_root = q(dir.join("state/runc"));
    let sock = q(dir.join("containerd.sock"));
    let ttrpc = q(dir.join("containerd.sock.ttrpc"));
    let bin = q(dirs.cni_bin_dir());
    let conf = q(dirs.cni_conf_dir());
    format!(
        r#"version = 2
root = {root}
state = {state}
# Only what CRI with runc and overlayfs needs.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      # runc's state goes below ours too (its default, /run/containerd/runc, is shared).
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = {runc_root}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {bin}
    conf_dir = {conf}
    max_conf_num = 1
"#
    )
}

/// Writes a docker-archive image tarball `SANDBOX_IMAGE` into `dir` and returns its path:
/// one layer holding busybox-static as `/bin/busybox`, entrypoint `busybox sleep` (a pause
/// container: the CRI kills the sandbox with SIGKILL, so no signal handling is needed).
pub fn write_sandbox_image(dir: &Path) -> PathBuf {
    let img = dir.join("image");
    let rootfs = img.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("image rootfs");
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox (busybox-static)");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).expect("sleep link");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("sh link");
    let layer = img.join("layer.tar");
    crate::deploy::output_ok(
        Command::new("tar")
            .args([
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--mtime=@0",
                "-C",
            ])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
    );
    let sum = crate::deploy::output_ok(Command::new("sha256sum").arg(&layer));
    let digest = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
    });
    std::fs::write(img.join("config.json"), config.to_string()).expect("config.json");
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [SANDBOX_IMAGE],
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(img.join("manifest.json"), manifest.to_string()).expect("manifest.json");
    let out = dir.join("sandbox-image.tar");
    crate::deploy::output_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&img)
            .arg("-cf")
            .arg(&out)
            .args(["manifest.json", "config.json", "layer.tar"]),
    );
    let _ = std::fs::remove_dir_all(&img);
    out
}

/// Runs `argv` inside a pod's network namespace (`nsenter --net=<path>`); its output.
pub fn in_pod(netns: &str, argv: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn nsenter {argv:?}: {e}"))
}

/// Starts `argv` inside a pod's network namespace in the background (killed by PID on drop).
pub struct PodProcess(Child);

impl PodProcess {
    pub fn spawn(netns: &str, argv: &[&str]) -> PodProcess {
        let child = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nsenter {argv:?}: {e}"));
        PodProcess(child)
    }

    /// None while it runs; its exit status and stderr once it has exited.
    pub fn exited(&mut self) -> Option<String> {
        use std::io::Read;
        let status = self.0.try_wait().ok().flatten()?;
        let mut err = String::new();
        if let Some(e) = self.0.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        Some(format!("{status}: {err}"))
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The IDs of sandboxes whose libcni result cache entries exist.
pub fn cached_results(ids: &[String]) -> Vec<String> {
    let names: Vec<String> = std::fs::read_dir(CNI_RESULTS)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names
        .into_iter()
        .filter(|n| ids.iter().any(|id| n.contains(id.as_str())))
        .collect()
}

/// Seconds as "1.234 s" for the timing lines the tests print.
pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}
