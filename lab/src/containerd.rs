//! A real container runtime for the lab and the root tests: Debian's containerd (1.6) with runc,
//! started inside a node namespace and driven through the CRI v1 API, the way the kubelet
//! drives it.
//!
//! ```ignore
//! let spec = Spec::new(dir, "/run/netns/n1", bin_dir, conf_dir, "/twill-lab-x-node1");
//! let mut rt = Containerd::spawn(spec)?;      // config.toml, `nsenter --net=... containerd`
//! rt.wait_ready()?;                           // CRI answers
//! rt.import_image(&write_sandbox_image(dir)?)?;
//! let id = rt.run_pod(&PodSpec::new("web", "default", "web-uid"))?;
//! println!("{:?}", rt.pod_status(&id)?.ip);
//! rt.teardown();                              // pods, processes, mounts, cgroups, cache
//! rt.remove_created_dirs();
//! ```
//! Everything lives below one dir (config, root, state, socket, log) except what containerd
//! and its shims cannot be told to put elsewhere: shim sockets in `/run/containerd/s`, libcni's
//! result cache in `/var/lib/cni/results` and runc's cgroups (under a parent of our own).
//! [`Containerd::teardown`] removes exactly those entries of its own. A [`Record`] of an
//! instance (its dirs, its PID and start time, the sandboxes and processes it made) is
//! serializable, so another process can [`Containerd::attach`] to it later and tear it down
//! (the lab keeps it in its state file between `up`, `status` and `down`).
//!
//! What this machine needs: containerd is entered with `nsenter --net=<path>`, not
//! `ip netns exec`, whose private /sys mount hides the cgroup mounts runc needs;
//! `restrict_oom_score_adj` and `netns_mounts_under_state_dir` (see [`config_toml`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxState, PodSandboxStatusRequest, PortMapping, Protocol, RemovePodSandboxRequest,
    RunPodSandboxRequest, StatusRequest, StopPodSandboxRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{io, Error, Result};
use crate::process::{run, Proc};

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
/// How long containerd may take to answer CRI after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where one containerd keeps its files and which node it serves. Fixed for its lifetime.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Config, root, state, socket and log live below it.
    pub dir: PathBuf,
    /// The node's network namespace (entered with `nsenter --net=`).
    pub netns_path: String,
    /// CRI's CNI `bin_dir` and `conf_dir`: the node's.
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// The sandboxes' cgroup parent: every cgroup runc creates is found below it.
    pub cgroup_parent: String,
    /// Whether `/run/containerd` (and its `s`) existed before this instance: only dirs the
    /// shims created for us are removed again.
    pub run_dirs_existed: (bool, bool),
    /// The same for `/var/lib/cni` and its `results` (libcni creates them on first use).
    pub cache_dirs_existed: (bool, bool),
}

impl Spec {
    /// A spec; notes now whether the shared dirs it may create exist already.
    pub fn new(
        dir: &Path,
        netns_path: &str,
        cni_bin_dir: &Path,
        cni_conf_dir: &Path,
        cgroup_parent: &str,
    ) -> Spec {
        Spec {
            dir: dir.to_path_buf(),
            netns_path: netns_path.to_string(),
            cni_bin_dir: cni_bin_dir.to_path_buf(),
            cni_conf_dir: cni_conf_dir.to_path_buf(),
            cgroup_parent: cgroup_parent.to_string(),
            run_dirs_existed: existed(SHIM_SOCKETS),
            cache_dirs_existed: existed(CNI_RESULTS),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// containerd's `/run/containerd` (state): wiped by a reboot.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// Where the CRI plugin bind-mounts pod network namespaces
    /// (`netns_mounts_under_state_dir`).
    pub fn netns_dir(&self) -> PathBuf {
        self.state_dir().join("io.containerd.grpc.v1.cri/netns")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
}

/// Sandboxes and processes an instance has made (for the cleanup).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Seen {
    /// Every sandbox ID (for the libcni result cache entries).
    pub sandboxes: Vec<String>,
    /// Sandbox and shim PIDs (for a kill by PID once containerd is gone: shims outlive it).
    pub procs: Vec<i32>,
}

/// Everything needed to find an instance again from another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub spec: Spec,
    /// containerd itself (PID and start time).
    pub proc: Option<Proc>,
    #[serde(default)]
    pub seen: Seen,
    /// Whether the sandbox image was imported (into the root dir: restarts keep it).
    #[serde(default)]
    pub image_imported: bool,
}

impl Record {
    /// A record of an instance not started yet.
    pub fn new(spec: Spec) -> Record {
        Record {
            spec,
            proc: None,
            seen: Seen::default(),
            image_imported: false,
        }
    }
}

/// A hostPort → containerPort mapping of a sandbox.
#[derive(Debug, Clone, Copy)]
pub struct HostPort {
    pub host: u16,
    pub container: u16,
}

/// What a sandbox is asked to be (CRI `PodSandboxConfig`, the parts used here).
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub ports: Vec<HostPort>,
}

impl PodSpec {
    pub fn new(name: &str, namespace: &str, uid: &str) -> PodSpec {
        PodSpec {
            name: name.to_string(),
            namespace: namespace.to_string(),
            uid: uid.to_string(),
            ports: Vec::new(),
        }
    }
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

fn cri_err(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |s| Error::Cri {
        call,
        code: s.code(),
        message: s.message().to_string(),
    }
}

fn not_running() -> tonic::Status {
    tonic::Status::unavailable("containerd is not running")
}

/// A containerd serving one node, and a CRI client to it.
pub struct Containerd {
    spec: Spec,
    proc: Option<Proc>,
    seen: Mutex<Seen>,
    image_imported: bool,
    rt: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
}

impl Containerd {
    fn new(rec: Record) -> Result<Containerd> {
        // Its own single-threaded runtime: CRI calls block the caller, no thread changes netns.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("tokio runtime"))?;
        Ok(Containerd {
            spec: rec.spec,
            proc: rec.proc,
            seen: Mutex::new(rec.seen),
            image_imported: rec.image_imported,
            rt,
            client: None,
        })
    }

    /// Writes the config and starts containerd in the node's namespace; does not wait for it
    /// (see [`Containerd::wait_ready`]), so several can start at once.
    pub fn spawn(spec: Spec) -> Result<Containerd> {
        Containerd::respawn(Record::new(spec))
    }

    /// [`Containerd::spawn`] for an instance that ran before (a restart keeps what it saw).
    pub fn respawn(rec: Record) -> Result<Containerd> {
        let spec = &rec.spec;
        twill_common::fsutil::ensure_dir(&spec.dir, 0o700).map_err(io(&spec.dir))?;
        let config = spec.config_path();
        twill_common::fsutil::atomic_write(&config, config_toml(spec).as_bytes(), 0o600)
            .map_err(io(&config))?;
        let mut c = Containerd::new(rec)?;
        c.launch()?;
        Ok(c)
    }

    /// The instance behind `rec`, with a CRI connection if its containerd still runs (a
    /// containerd that does not answer leaves the client unset: teardown still works).
    pub fn attach(rec: Record) -> Result<Containerd> {
        let mut c = Containerd::new(rec)?;
        if c.running() {
            c.client = c.connect().ok();
        }
        Ok(c)
    }

    /// What another process needs to find this instance again.
    pub fn record(&self) -> Record {
        Record {
            spec: self.spec.clone(),
            proc: self.proc.clone(),
            seen: self.seen.lock().map(|s| s.clone()).unwrap_or_default(),
            image_imported: self.image_imported,
        }
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }
    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }
    pub fn socket(&self) -> PathBuf {
        self.spec.socket()
    }
    pub fn root_dir(&self) -> PathBuf {
        self.spec.root_dir()
    }
    pub fn state_dir(&self) -> PathBuf {
        self.spec.state_dir()
    }
    pub fn netns_dir(&self) -> PathBuf {
        self.spec.netns_dir()
    }
    pub fn log_path(&self) -> PathBuf {
        self.spec.log_path()
    }
    /// containerd's log so far (every start), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    /// containerd's PID while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().filter(|p| p.alive()).map(|p| p.pid)
    }
    pub fn running(&self) -> bool {
        self.pid().is_some()
    }
    /// Whether a CRI client is connected.
    pub fn connected(&self) -> bool {
        self.client.is_some()
    }

    /// Starts containerd (again, on the same root and state dirs) unless it runs; does not
    /// wait for CRI.
    pub fn launch(&mut self) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        self.client = None;
        let argv = [
            "nsenter".to_string(),
            format!("--net={}", self.spec.netns_path),
            CONTAINERD.to_string(),
            "--config".to_string(),
            self.spec.config_path().display().to_string(),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        // nsenter execs containerd, so the PID is containerd's own.
        self.proc = Some(Proc::spawn(&argv, &[], &self.spec.log_path())?);
        Ok(())
    }

    /// Waits until containerd's CRI answers (fails early if containerd exits).
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.running() {
                return Err(Error::Lab(format!(
                    "containerd exited; see {}:\n{}",
                    self.log_path().display(),
                    tail(&self.log(), 20)
                )));
            }
            if self.socket().exists() {
                if let Ok(client) = self.connect() {
                    self.client = Some(client);
                    if self.status().is_ok() {
                        return Ok(());
                    }
                    self.client = None;
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("containerd's CRI on {}", self.socket().display()),
                    secs: START_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether [`Containerd::import_image`] ran (for this instance, also in another process).
    pub fn image_imported(&self) -> bool {
        self.image_imported
    }

    /// Imports a docker-archive image (see [`write_sandbox_image`]) into CRI's namespace.
    pub fn import_image(&mut self, tarball: &Path) -> Result<()> {
        let sock = self.socket().display().to_string();
        let tar = tarball.display().to_string();
        run(&[
            CTR,
            "--address",
            &sock,
            "-n",
            K8S_NS,
            "images",
            "import",
            &tar,
        ])?;
        self.image_imported = true;
        Ok(())
    }

    fn connect(
        &self,
    ) -> std::result::Result<RuntimeServiceClient<Channel>, tonic::transport::Error> {
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

    /// Runs one CRI call on this instance's runtime.
    fn call<T, F, Fut>(&self, f: F) -> std::result::Result<T, tonic::Status>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone().ok_or_else(not_running)?;
        self.rt.block_on(f(client)).map(|r| r.into_inner())
    }

    fn status(&self) -> Result<k8s_cri::v1::StatusResponse> {
        self.call(|mut c| async move { c.status(StatusRequest { verbose: false }).await })
            .map_err(cri_err("Status"))
    }

    /// CRI `Status`: (NetworkReady, its reason and message).
    pub fn network_ready(&self) -> Result<(bool, String)> {
        let st = self.status()?;
        let conds = st.status.map(|s| s.conditions).unwrap_or_default();
        let net = conds
            .iter()
            .find(|c| c.r#type == "NetworkReady")
            .ok_or_else(|| Error::Lab(format!("no NetworkReady condition in {conds:?}")))?;
        Ok((net.status, format!("{}: {}", net.reason, net.message)))
    }

    fn sandbox_config(&self, pod: &PodSpec) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            hostname: pod.name.clone(),
            port_mappings: pod
                .ports
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
                cgroup_parent: self.spec.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// CRI `RunPodSandbox` (default runtime handler); the sandbox ID.
    pub fn run_pod(&self, pod: &PodSpec) -> Result<String> {
        let config = self.sandbox_config(pod);
        let id = self
            .call(|mut c| async move {
                c.run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                })
                .await
            })
            .map_err(cri_err("RunPodSandbox"))?;
        self.remember(&id.pod_sandbox_id);
        self.record_procs(&id.pod_sandbox_id);
        Ok(id.pod_sandbox_id)
    }

    /// `RunPodSandbox` for every pod at once (concurrent CRI calls on one connection, as a
    /// kubelet starting many pods does); results in the order of `pods`.
    pub fn run_pods_concurrently(&self, pods: &[PodSpec]) -> Vec<Result<String>> {
        let Some(client) = self.client.clone() else {
            return pods
                .iter()
                .map(|_| Err(cri_err("RunPodSandbox")(not_running())))
                .collect();
        };
        let configs: Vec<PodSandboxConfig> = pods.iter().map(|p| self.sandbox_config(p)).collect();
        let results: Vec<std::result::Result<String, tonic::Status>> =
            self.rt.block_on(async move {
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
            .into_iter()
            .map(|r| r.map_err(cri_err("RunPodSandbox")))
            .collect()
    }

    fn remember(&self, id: &str) {
        if let Ok(mut s) = self.seen.lock() {
            if !s.sandboxes.iter().any(|x| x == id) {
                s.sandboxes.push(id.to_string());
            }
        }
    }

    /// CRI `PodSandboxStatus` (verbose, for the netns path and the sandbox PID).
    pub fn pod_status(&self, id: &str) -> Result<PodStatus> {
        let id = id.to_string();
        let resp = self
            .call(|mut c| async move {
                c.pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: id,
                    verbose: true,
                })
                .await
            })
            .map_err(cri_err("PodSandboxStatus"))?;
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

    /// CRI `StopPodSandbox` (tears the network down through CNI DEL).
    pub fn stop_pod(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call(|mut c| async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(drop)
        .map_err(cri_err("StopPodSandbox"))
    }

    /// CRI `RemovePodSandbox`.
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call(|mut c| async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(drop)
        .map_err(cri_err("RemovePodSandbox"))
    }

    /// CRI `ListPodSandbox`: (id, ready) of every sandbox containerd knows.
    pub fn list_pods(&self) -> Result<Vec<(String, bool)>> {
        let l = self
            .call(|mut c| async move {
                c.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                    .await
            })
            .map_err(cri_err("ListPodSandbox"))?;
        Ok(l.items
            .into_iter()
            .map(|p| (p.id, p.state == PodSandboxState::SandboxReady as i32))
            .collect())
    }

    fn tasks_dir(&self) -> PathBuf {
        self.state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(K8S_NS)
    }

    /// Sandbox PIDs recorded in the state dir (`init.pid` per task; the runc v2 shim of
    /// containerd 1.6 writes no PID file of its own there).
    fn init_pids(&self) -> Vec<i32> {
        std::fs::read_dir(self.tasks_dir())
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
        if let Ok(mut s) = self.seen.lock() {
            s.procs.extend(v);
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
        let mut cands = self
            .seen
            .lock()
            .map(|s| s.procs.clone())
            .unwrap_or_default();
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
        std::fs::read_dir(self.tasks_dir())
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
        if let Some(p) = self.proc.take() {
            p.kill();
        }
        self.kill_procs();
    }

    /// SIGKILL to our shims and sandbox processes; waits (10 s at most) until they are gone.
    fn kill_procs(&self) {
        let procs = self.our_procs();
        for pid in &procs {
            // SAFETY: kill(2) on PIDs just checked to be our shims or their children.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        // runc's cgroups of the killed pods become empty once the processes are gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while procs.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What a reboot does to `/run`: the state dir (with the pods' netns and shm mounts) and
    /// the shims' sockets are gone. Only after [`Containerd::power_off`].
    pub fn wipe_state(&self) -> Result<()> {
        if self.running() {
            return Err(Error::Lab("wipe_state while containerd runs".into()));
        }
        for s in self.shim_sockets() {
            let _ = std::fs::remove_file(s);
        }
        unmount_below(&self.state_dir());
        match std::fs::remove_dir_all(self.state_dir()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(self.state_dir())(e)),
        }
    }

    /// Stops and removes every sandbox through CRI (CNI DEL releases their addresses);
    /// the errors of sandboxes that could not be removed.
    pub fn remove_all_pods(&self) -> Vec<Error> {
        let mut errors = Vec::new();
        let pods = match self.list_pods() {
            Ok(p) => p,
            Err(e) => return vec![e],
        };
        for (id, _) in pods {
            // Also sandboxes whose RunPodSandbox failed: libcni may have cached their result.
            self.remember(&id);
            if let Err(e) = self.stop_pod(&id).and_then(|()| self.remove_pod(&id)) {
                errors.push(e);
            }
        }
        errors
    }

    /// Removes everything this instance made except its dir and the shared dirs it created:
    /// sandboxes through CRI (if it runs), containerd (SIGTERM, then SIGKILL), leftover shims
    /// and pod processes by PID, shim sockets, mounts below its dir, its cgroups and its
    /// libcni result cache entries. Returns what went wrong removing the sandboxes.
    pub fn teardown(&mut self) -> Vec<Error> {
        let errors = if self.client.is_some() {
            self.remove_all_pods()
        } else {
            Vec::new()
        };
        self.client = None;
        if let Some(p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
        self.kill_procs();
        for s in self.shim_sockets() {
            let _ = std::fs::remove_file(s);
        }
        unmount_below(&self.spec.dir);
        self.remove_cgroups();
        self.remove_result_cache();
        errors
    }

    /// Removes `/run/containerd/s`, `/var/lib/cni/results` and their parents where this
    /// instance's spec saw them missing, if they are empty now (after every instance that
    /// may use them was torn down).
    pub fn remove_created_dirs(&self) {
        remove_created_dirs(SHIM_SOCKETS, self.spec.run_dirs_existed);
        remove_created_dirs(CNI_RESULTS, self.spec.cache_dirs_existed);
    }

    fn remove_cgroups(&self) {
        let rel = self.spec.cgroup_parent.trim_start_matches('/');
        if rel.is_empty() {
            return;
        }
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
        let ids = self
            .seen
            .lock()
            .map(|s| s.sandboxes.clone())
            .unwrap_or_default();
        for name in cached_results(&ids) {
            let _ = std::fs::remove_file(Path::new(CNI_RESULTS).join(name));
        }
    }
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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

/// Names of libcni result cache entries of the given sandboxes (`<network>-<id>-<ifname>`).
pub fn cached_results(ids: &[String]) -> Vec<String> {
    std::fs::read_dir(CNI_RESULTS)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| ids.iter().any(|id| n.contains(id.as_str())))
        .collect()
}

/// The parent PID from `/proc/<pid>/stat` (the field after the `(comm)`).
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
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
            let Ok(c) =
                std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(m.as_os_str()))
            else {
                continue;
            };
            // SAFETY: umount2 with a valid NUL-terminated path; failure is harmless here.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// containerd 1.6's config (version 2): everything below the spec's dir, CRI with the node's
/// CNI dirs, and what a test machine needs: `restrict_oom_score_adj` (root without
/// CAP_SYS_RESOURCE, as here, cannot give the sandbox CRI's default oom_score_adj of -998;
/// restricted, it is never set below containerd's own) and the pods' netns mounts below the
/// state dir instead of the shared /run/netns.
pub fn config_toml(spec: &Spec) -> String {
    // JSON strings are valid TOML basic strings.
    let q = |p: PathBuf| serde_json::Value::String(p.display().to_string()).to_string();
    let root = q(spec.root_dir());
    let state = q(spec.state_dir());
    let runc_root = q(spec.state_dir().join("runc"));
    let sock = q(spec.socket());
    let ttrpc = q(spec.dir.join("containerd.sock.ttrpc"));
    let bin = q(spec.cni_bin_dir.clone());
    let conf = q(spec.cni_conf_dir.clone());
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
pub fn write_sandbox_image(dir: &Path) -> Result<PathBuf> {
    let img = dir.join("image");
    let rootfs = img.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).map_err(io(&bin))?;
    std::fs::copy(BUSYBOX, bin.join("busybox"))
        .map_err(|e| Error::Lab(format!("copy {BUSYBOX} (package busybox-static): {e}")))?;
    for link in ["sleep", "sh"] {
        std::os::unix::fs::symlink("busybox", bin.join(link)).map_err(io(bin.join(link)))?;
    }
    let s = |p: &Path| p.display().to_string();
    let layer = img.join("layer.tar");
    run(&[
        "tar",
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "--mtime=@0",
        "-C",
        &s(&rootfs),
        "-cf",
        &s(&layer),
        ".",
    ])?;
    let sum = run(&["sha256sum", &s(&layer)])?;
    let digest = sum
        .split_whitespace()
        .next()
        .ok_or_else(|| Error::Lab(format!("sha256sum printed nothing for {}", s(&layer))))?
        .to_string();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
    });
    let config_path = img.join("config.json");
    std::fs::write(&config_path, config.to_string()).map_err(io(&config_path))?;
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [SANDBOX_IMAGE],
        "Layers": ["layer.tar"],
    }]);
    let manifest_path = img.join("manifest.json");
    std::fs::write(&manifest_path, manifest.to_string()).map_err(io(&manifest_path))?;
    let out = dir.join("sandbox-image.tar");
    run(&[
        "tar",
        "-C",
        &s(&img),
        "-cf",
        &s(&out),
        "manifest.json",
        "config.json",
        "layer.tar",
    ])?;
    std::fs::remove_dir_all(&img).map_err(io(&img))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_what_this_machine_needs_and_quotes_paths() {
        let spec = Spec::new(
            Path::new("/x/a \"b\""),
            "/run/netns/n",
            Path::new("/bin dir"),
            Path::new("/conf"),
            "/twill-x",
        );
        let t = config_toml(&spec);
        assert!(t.contains("restrict_oom_score_adj = true"));
        assert!(t.contains("netns_mounts_under_state_dir = true"));
        assert!(t.contains("max_conf_num = 1"));
        assert!(t.contains(r#"root = "/x/a \"b\"/root""#), "{t}");
        assert!(t.contains(r#"bin_dir = "/bin dir""#), "{t}");
        assert!(
            t.contains(r#"address = "/x/a \"b\"/containerd.sock""#),
            "{t}"
        );
    }

    #[test]
    fn netns_path_from_verbose_info() {
        let info = serde_json::json!({"runtimeSpec": {"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/s/netns/cni-1"},
        ]}}});
        assert_eq!(netns_from_info(&info).as_deref(), Some("/s/netns/cni-1"));
        let none = serde_json::json!({"runtimeSpec": {"linux": {"namespaces": [
            {"type": "network", "path": ""},
        ]}}});
        assert_eq!(netns_from_info(&none), None);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo(r"/plain\0"), r"/plain\0");
    }

    #[test]
    fn record_round_trips() {
        let spec = Spec::new(
            Path::new("/d"),
            "/run/netns/n",
            Path::new("/b"),
            Path::new("/c"),
            "/p",
        );
        let rec = Record {
            spec,
            proc: Some(Proc {
                pid: 7,
                start_time: 9,
            }),
            seen: Seen {
                sandboxes: vec!["abc".into()],
                procs: vec![1, 2],
            },
            image_imported: true,
        };
        let back: Record = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back.proc, rec.proc);
        assert_eq!(back.seen.sandboxes, ["abc"]);
        assert!(back.image_imported);
        assert_eq!(back.spec.dir, Path::new("/d"));
    }
}
