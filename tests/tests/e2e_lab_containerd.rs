//! End-to-end: `twill-lab up --runtime containerd` — a containerd (1.6, runc) per node
//! namespace, pods as CRI sandboxes attached by containerd through twilld's conflist.
//! Needs root, containerd, runc, busybox-static and `cargo build --workspace --bins`.
//! The lab lives under a temp state root and is removed when the test ends, pass or fail.
#![cfg(feature = "root")]

use std::path::{Path, PathBuf};

use twill_lab::containerd::{cached_results, mounts_below};
use twill_lab::runtime::Kind;
use twill_lab::{self as lab, Lab, LabOptions};

/// Owns the lab; `down` on drop (errors ignored when the test already failed).
struct Guard {
    lab: Option<Lab>,
    root: tempfile::TempDir,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take() {
            if std::thread::panicking() {
                for n in lab.nodes() {
                    let dir = lab.state_dir().join("nodes").join(&n.name);
                    for log in ["twilld.log", "containerd/containerd.log"] {
                        let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(30).collect();
                        eprintln!("--- {} {log} (last lines) ---", n.name);
                        for l in tail.iter().rev() {
                            eprintln!("{l}");
                        }
                    }
                }
            }
            let _ = lab.down();
        }
    }
}

/// Whether a process with this PID runs and its command line mentions `needle`.
fn running_with(pid: i32, needle: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    if stat.contains(") Z ") {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Every process whose command line mentions `needle` (containerd, shims serving its socket).
fn processes_mentioning(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != std::process::id() as i32 && running_with(*pid, needle))
        .collect()
}

fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|p| p.exists())
        .collect()
}

#[test]
fn containerd_lab_up_status_down_leaves_nothing() {
    let root = tempfile::Builder::new()
        .prefix("twill-e2e-cri-lab")
        .tempdir()
        .unwrap();
    let mut o = LabOptions::new(&format!("e2e{}k", std::process::id() % 100_000));
    o.root = root.path().to_path_buf();
    o.bin_src = twill_tests::bins::target_dir();
    o.runtime = Kind::Containerd;
    let mut out = Vec::new();
    let res = lab::up(o.clone(), 2, 1, &mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    eprintln!("{text}");
    let mut g = Guard { lab: None, root };
    let lab = match res {
        Ok(lab) => g.lab.insert(lab),
        Err(e) => {
            // The guard takes the partial lab down (printing its logs).
            g.lab = Lab::open(&o.root, &o.name).ok().flatten();
            panic!("lab up failed: {e}\n{text}");
        }
    };
    assert_eq!(lab.runtime_kind(), Kind::Containerd);
    let state_dir = lab.state_dir();
    assert!(state_dir.starts_with(g.root.path()));

    // Every node: a live containerd whose bin dir holds what install-cni installs.
    let mut sockets = Vec::new();
    for n in lab.nodes() {
        let bin: Vec<String> = std::fs::read_dir(lab.bin_dir(&n.name))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for p in lab::PLUGINS.iter().chain(&["loopback"]) {
            assert!(bin.iter().any(|b| b == p), "{}: no {p} in {bin:?}", n.name);
        }
        let rec = n.containerd.clone().expect("containerd record");
        let proc = rec.proc.clone().expect("containerd PID recorded");
        assert!(proc.alive(), "containerd of {} not running", n.name);
        let c = lab.containerd(&n.name).expect("CRI client");
        assert!(c.network_ready().expect("CRI Status").0);
        sockets.push(rec.spec.socket().display().to_string());
    }

    // Two sandboxes, one per node, with IPs in their node's subnet and netns below the node's
    // containerd state dir.
    assert_eq!(lab.pods().len(), 2);
    let mut ids = Vec::new();
    let mut netns_paths = Vec::new();
    for p in lab.pods() {
        assert!(p.is_sandbox(), "{p:?}");
        let ip = p.ip.expect("pod IP");
        let subnet = lab.subnet(&p.node).expect("subnet.env");
        assert!(subnet.contains(ip), "{ip} outside {}'s {subnet}", p.node);
        let st = lab
            .containerd(&p.node)
            .unwrap()
            .pod_status(&p.container_id)
            .expect("PodSandboxStatus");
        assert!(st.ready, "{p:?}: {st:?}");
        assert_eq!(st.ip, Some(ip));
        assert_eq!(st.netns.as_deref(), Some(p.ns.as_str()));
        assert!(
            Path::new(&p.ns).starts_with(state_dir.join("nodes").join(&p.node)),
            "{}",
            p.ns
        );
        ids.push(p.container_id.clone());
        netns_paths.push(p.ns.clone());
    }
    assert_ne!(lab.pods()[0].node, lab.pods()[1].node);
    assert!(text.contains("2/2 pairs ok"), "{text}");
    assert!(text.contains("NetworkReady"), "{text}");

    // The same matrix from this process, into the sandboxes' netns by path.
    let m = lab.matrix().expect("probe");
    let bad = m.iter().flatten().flatten().filter(|r| !r.ok()).count();
    assert_eq!(bad, 0, "{}", lab.matrix_table(&m));

    // `twill-lab status` (another process) finds the containerds and sandboxes again.
    let lab_bin = twill_tests::bins::bin("twill-lab");
    let status = twill_tests::sh::output(&[
        lab_bin.to_str().unwrap(),
        "--name",
        lab.name(),
        "--root",
        g.root.path().to_str().unwrap(),
        "status",
    ]);
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success()
            && status_text.contains(&lab.pods_table())
            && status_text.contains("2/2 pairs ok")
            && status_text.contains("1/1"),
        "{status_text}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // A third node joins with its own containerd and sandbox; then it leaves: its containerd,
    // shims and sandbox go with it, the others keep running.
    let n3 = lab.add_node().expect("node3");
    lab.wait_ready(&n3, 60).expect("node3 Ready");
    let p3 = lab.add_pod(&n3).expect("sandbox on node3");
    assert!(p3.is_sandbox() && lab.subnet(&n3).unwrap().contains(p3.ip.unwrap()));
    let m = lab.matrix().expect("probe");
    let bad = m.iter().flatten().flatten().filter(|r| !r.ok()).count();
    assert_eq!(bad, 0, "{}", lab.matrix_table(&m));
    let sock3 = lab
        .node(&n3)
        .unwrap()
        .containerd
        .clone()
        .unwrap()
        .spec
        .socket();
    let sock3 = sock3.display().to_string();
    assert!(!processes_mentioning(&sock3).is_empty());
    ids.push(p3.container_id.clone());
    let ns3 = lab.node(&n3).unwrap().ns.clone();
    assert!(
        !cgroup_dirs(&ns3).is_empty(),
        "no cgroup parent {ns3} for node3's sandbox"
    );
    lab.remove_node(&n3).expect("node3 leaves");
    assert_eq!(
        cgroup_dirs(&ns3),
        Vec::<PathBuf>::new(),
        "node3's cgroups left"
    );
    let left = processes_mentioning(&sock3);
    assert!(
        left.is_empty(),
        "node3's containerd or shims left: {left:?}"
    );
    assert!(!Path::new(&p3.ns).exists(), "node3's sandbox netns left");
    assert_eq!(cached_results(&ids[2..]), Vec::<String>::new());
    for p in lab.pods() {
        let st = lab.containerd(&p.node).unwrap().pod_status(&p.container_id);
        assert!(
            st.expect("PodSandboxStatus").ready,
            "{p:?} after node3 left"
        );
    }

    // Down: no containerd or shim left, no netns, no mount under the state dir, no cgroup,
    // no result cache entry, no state dir.
    let node_ns: Vec<String> = lab.nodes().iter().map(|n| n.ns.clone()).collect();
    let lab = g.lab.take().unwrap();
    let ul = lab.underlay_ns().to_string();
    lab.down().expect("down");
    for s in &sockets {
        let left = processes_mentioning(s);
        assert!(left.is_empty(), "processes serving {s} left: {left:?}");
    }
    for ns in node_ns.iter().chain([&ul]) {
        assert!(!Path::new("/run/netns").join(ns).exists(), "{ns} left");
    }
    for p in &netns_paths {
        assert!(!Path::new(p).exists(), "sandbox netns {p} left");
    }
    let mounts = mounts_below(g.root.path());
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    for ns in &node_ns {
        assert_eq!(cgroup_dirs(ns), Vec::<PathBuf>::new(), "cgroups left");
    }
    assert_eq!(cached_results(&ids), Vec::<String>::new());
    assert!(!state_dir.exists(), "state dir left");
}
