//! Driving CNI plugins from tests and benches: direct execs inside a node namespace,
//! `cniharness` runs, and snapshots of a node's network state for "nothing changed" checks.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::netns::Netns;
use crate::sh;

/// What a plugin process returned.
#[derive(Debug)]
pub struct Reply {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    /// The stdout as JSON (`null` when empty).
    pub fn json(&self) -> Value {
        if self.stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts success and returns the stdout JSON.
    pub fn ok(&self) -> Value {
        assert_eq!(
            self.status, 0,
            "plugin failed: stdout={} stderr={}",
            self.stdout, self.stderr
        );
        self.json()
    }

    /// Asserts failure with a CNI error JSON on stdout and returns its code.
    pub fn err_code(&self) -> u64 {
        assert_ne!(
            self.status, 0,
            "plugin unexpectedly succeeded: {}",
            self.stdout
        );
        let v = self.json();
        v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no error code in {v}; stderr={}", self.stderr))
    }
}

impl From<std::process::Output> for Reply {
    fn from(out: std::process::Output) -> Reply {
        Reply {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// One CNI invocation's environment.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub cni_path: String,
    pub args: String,
}

impl Invocation {
    pub fn new(command: &str, container_id: &str, netns: &str) -> Invocation {
        Invocation {
            command: command.into(),
            container_id: container_id.into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            cni_path: format!(
                "{}:{}",
                crate::bins::target_dir().display(),
                crate::bins::REFERENCE_CNI_DIR
            ),
            args: String::new(),
        }
    }

    pub fn ifname(mut self, ifname: &str) -> Invocation {
        self.ifname = ifname.into();
        self
    }

    pub fn args(mut self, args: &str) -> Invocation {
        self.args = args.into();
        self
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("CNI_COMMAND", self.command.clone())];
        for (k, v) in [
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_PATH", &self.cni_path),
            ("CNI_ARGS", &self.args),
        ] {
            if !v.is_empty() {
                env.push((k, v.clone()));
            }
        }
        env
    }
}

/// Executes `bin` with `inv` and `conf` on stdin, inside `node` (so its links and rules land there).
pub fn exec(node: Option<&Netns>, bin: &Path, inv: &Invocation, conf: &Value) -> Reply {
    let bin_s = bin.display().to_string();
    let mut argv: Vec<&str> = Vec::new();
    if let Some(n) = node {
        argv.extend(["ip", "netns", "exec", n.name()]);
    }
    // `env -i` so nothing from the test process leaks in; PATH lets the plugin find `nft`.
    argv.extend(["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
    let env = inv.env();
    let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    argv.extend(pairs.iter().map(String::as_str));
    argv.push(&bin_s);
    sh::run_with_input(&argv, &[], conf.to_string().as_bytes()).into()
}

/// `conf` with `prevResult` set.
pub fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

/// `cniharness run` inside `node` with a conflist dir.
pub fn harness_run(
    node: &Netns,
    verb: &str,
    confdir: &Path,
    bin: &str,
    pod: &Netns,
    id: &str,
    extra: &[&str],
) -> Reply {
    let confdir = confdir.display().to_string();
    let netns = format!("/var/run/netns/{}", pod.name());
    let mut argv = vec![
        "ip",
        "netns",
        "exec",
        node.name(),
        "cniharness",
        "run",
        "-verb",
        verb,
        "-confdir",
        &confdir,
        "-bin",
        bin,
        "-netns",
        &netns,
        "-id",
        id,
    ];
    argv.extend_from_slice(extra);
    sh::output(&argv).into()
}

/// A node's network state (links, addresses, routes, the nftables ruleset) and the files of
/// an IPAM data dir, for asserting that a rejected request changed nothing.
pub fn snapshot(node: &Netns, data_dir: &Path) -> String {
    let mut s = String::new();
    for argv in [
        &["ip", "-o", "link", "show"][..],
        &["ip", "-o", "addr", "show"],
        &["ip", "route", "show", "table", "all"],
        &["nft", "list", "ruleset"],
    ] {
        let out = node.output(argv);
        s.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    s.push_str(&format!("{:?}", files(data_dir)));
    s
}

/// Sorted file names under `dir` (recursively, relative), empty when missing.
pub fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.display().to_string());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The reservation files (named as IPs) of one network in a host-local data dir.
pub fn reservations(data_dir: &Path, network: &str) -> Vec<String> {
    files(&data_dir.join(network))
        .into_iter()
        .filter(|f| f.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

/// Host-side veth links in `node` (name starting with `veth`).
pub fn host_veths(node: &Netns) -> Vec<String> {
    let out = node.output(&["ip", "-o", "link", "show", "type", "veth"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("veth"))
        .collect()
}

/// The twill plugin binary `name` (built by `cargo build --workspace --bins`).
pub fn twill(name: &str) -> PathBuf {
    crate::bins::bin(name)
}

/// A reference plugin from Debian's containernetworking-plugins.
pub fn reference(name: &str) -> PathBuf {
    Path::new(crate::bins::REFERENCE_CNI_DIR).join(name)
}
