//! The deploy tests' view of the repository: the workspace root, the Kubernetes manifests as
//! JSON, and lookups in them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// twill's CNI plugin binaries: what the image ships and `install-cni` installs.
pub const PLUGINS: [&str; 5] = crate::underlay::TWILL_PLUGINS;

/// The built `twilld` with stdin closed, for its one-shot subcommands (`init-network`,
/// `install-cni`, `--help`).
pub fn twilld() -> Command {
    let mut cmd = Command::new(crate::bins::bin("twilld"));
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` and returns its output; panics with its stdout and stderr unless it exits 0.
pub fn output_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The workspace root (parent of the `tests` crate).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every non-empty document of a YAML file, as JSON (PyYAML, which kubernetes-validate
/// depends on, so YAML is read the way the validator reads it).
pub fn load_yaml(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("python3 (setup.sh installs it with PyYAML)");
    assert!(
        out.status.success(),
        "parsing {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("yaml as json") {
        Value::Array(docs) => docs,
        other => panic!("unexpected {other}"),
    }
}

/// The object of `kind` named `name`; panics when the manifests lack it.
pub fn object<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

/// Dockerfile instructions with continuation lines joined and comment lines dropped.
pub fn dockerfile_instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}
