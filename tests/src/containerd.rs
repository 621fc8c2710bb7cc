//! containerd for the root tests: the lab's containerd instance (`twill_lab::containerd`:
//! process, config, sandbox image, CRI client, cleanup) below a temp dir, as a guard that
//! panics with containerd's log when something fails and removes everything on drop.
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
//! The guard removes exactly those entries of its own on drop (see
//! [`twill_lab::containerd::Containerd::teardown`]): pods stopped and removed through CRI,
//! containerd, shims and pod processes killed by PID, mounts below the temp dir unmounted.

use std::net::Ipv4Addr;
use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use twill_lab::containerd::{self as lab_cri, PodSpec, Spec};
pub use twill_lab::containerd::{
    cached_results, mounts_below, netns_from_info, unmount_below, HostPort, PodStatus, CNI_RESULTS,
    SANDBOX_IMAGE,
};

use crate::underlay::{Node, NodeDirs};

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

/// A containerd running in a node namespace, with its own root, state and socket below a temp
/// dir; the lab's [`lab_cri::Containerd`] (dereferenced to for the CRI calls), torn down on drop.
pub struct Containerd {
    inner: lab_cri::Containerd,
    // Dropped after `inner`'s teardown (Drop below) unmounted everything below it.
    dir: tempfile::TempDir,
}

impl Deref for Containerd {
    type Target = lab_cri::Containerd;
    fn deref(&self) -> &lab_cri::Containerd {
        &self.inner
    }
}

impl DerefMut for Containerd {
    fn deref_mut(&mut self) -> &mut lab_cri::Containerd {
        &mut self.inner
    }
}

impl Containerd {
    /// Writes the config, starts containerd with `nsenter --net=/run/netns/<node>`, waits
    /// for its CRI and imports the sandbox image.
    pub fn start(node: &Node, dirs: &NodeDirs) -> Containerd {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = tempfile::Builder::new()
            .prefix("twill-containerd")
            .tempdir()
            .expect("containerd temp dir");
        let spec = Spec::new(
            dir.path(),
            &node.ns.path(),
            &dirs.cni_bin_dir(),
            &dirs.cni_conf_dir(),
            &format!("/twill-cri-{}-{n}", std::process::id()),
        );
        let inner = lab_cri::Containerd::spawn(spec).expect("start containerd");
        let mut c = Containerd { inner, dir };
        c.launch();
        let image = lab_cri::write_sandbox_image(c.dir.path()).expect("sandbox image");
        c.inner
            .import_image(&image)
            .unwrap_or_else(|e| panic!("ctr images import: {e}\n{}", c.log()));
        c
    }

    /// Starts containerd (again, on the same root and state dirs) and waits for CRI to answer.
    pub fn launch(&mut self) {
        self.inner.launch().expect("spawn containerd");
        if let Err(e) = self.inner.wait_ready() {
            panic!("containerd did not come up: {e}\n{}", self.log());
        }
    }

    /// CRI `Status`: (NetworkReady, its reason and message).
    pub fn network_ready(&self) -> (bool, String) {
        self.inner
            .network_ready()
            .unwrap_or_else(|e| panic!("CRI Status: {e}\n{}", self.log()))
    }

    fn pod_spec(name: &str, ports: &[HostPort]) -> PodSpec {
        PodSpec {
            ports: ports.to_vec(),
            ..PodSpec::new(
                name,
                "twill-test",
                &format!("{name}-uid-{}", std::process::id()),
            )
        }
    }

    /// CRI `RunPodSandbox` (default runtime handler); the sandbox ID.
    pub fn run_pod(&self, name: &str, ports: &[HostPort]) -> twill_lab::Result<String> {
        self.inner.run_pod(&Containerd::pod_spec(name, ports))
    }

    /// `RunPodSandbox` for every name at once; results in the order of `names`.
    pub fn run_pods_concurrently(&self, names: &[String]) -> Vec<twill_lab::Result<String>> {
        let pods: Vec<PodSpec> = names.iter().map(|n| Containerd::pod_spec(n, &[])).collect();
        self.inner.run_pods_concurrently(&pods)
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

    /// What a reboot does to `/run` (only after `power_off`): the state dir and shim sockets go.
    pub fn wipe_state(&self) {
        self.inner.wipe_state().expect("wipe containerd state");
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let errors = self.inner.teardown();
        self.inner.remove_created_dirs();
        if !errors.is_empty() && !std::thread::panicking() {
            eprintln!("containerd teardown: {errors:?}");
        }
    }
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

/// Seconds as "1.234 s" for the timing lines the tests print.
pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}
