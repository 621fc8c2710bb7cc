//! The CNI conflist that turns the node Ready: `<cni-conf-dir>/10-twill.conflist`.
//!
//! Written (atomically, only when its content changes) once the lease, the device and the
//! peers are in place, and never removed: a restart must not flap the node's readiness.
//! `cniVersion` is 1.0.0 (runtimes before spec 1.1 read only that); `cniVersions` lists what
//! every plugin of the chain reports in VERSION, up to 1.1.0.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

pub const CONFLIST_NAME: &str = "10-twill.conflist";
/// Plugins the chain cannot work without.
pub const REQUIRED_PLUGINS: [&str; 3] = ["twill", "twill-bridge", "twill-host-local"];
pub const PORTMAP: &str = "portmap";
const MAX_VERSION: (u32, u32, u32) = (1, 1, 0);

pub struct CniPaths<'a> {
    pub conf_dir: &'a Path,
    pub bin_dir: &'a Path,
    pub data_dir: &'a Path,
    pub subnet_file: &'a Path,
}

fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().unwrap_or(Some(0))?))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `CNI_COMMAND=VERSION` on a plugin and returns its supportedVersions.
fn plugin_versions(bin: &Path) -> Result<Vec<String>> {
    let err = |reason: String| Error::CniPlugins {
        dir: bin.parent().map(Path::to_path_buf).unwrap_or_default(),
        reason,
    };
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| err(format!("cannot run {}: {e}", bin.display())))?;
    if let Some(mut w) = child.stdin.take() {
        let _ = w.write_all(br#"{"cniVersion":"1.0.0"}"#);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!("{} VERSION timed out", bin.display())));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(format!("{} VERSION: {e}", bin.display())))?;
    if !out.status.success() {
        return Err(err(format!(
            "{} VERSION failed ({})",
            bin.display(),
            out.status
        )));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| err(format!("{} VERSION printed no JSON: {e}", bin.display())))?;
    let list = v["supportedVersions"].as_array().ok_or_else(|| {
        err(format!(
            "{} VERSION has no supportedVersions",
            bin.display()
        ))
    })?;
    Ok(list
        .iter()
        .filter_map(|s| s.as_str().map(String::from))
        .collect())
}

/// Builds the conflist JSON, probing the plugins in `bin_dir`.
pub fn build(paths: &CniPaths) -> Result<String> {
    let mut chain: Vec<&str> = REQUIRED_PLUGINS.to_vec();
    for p in REQUIRED_PLUGINS {
        if !is_executable(&paths.bin_dir.join(p)) {
            return Err(Error::CniPlugins {
                dir: paths.bin_dir.to_path_buf(),
                reason: format!("plugin {p} is missing or not executable"),
            });
        }
    }
    let portmap = is_executable(&paths.bin_dir.join(PORTMAP));
    if portmap {
        chain.push(PORTMAP);
    }
    let mut common: Option<Vec<(u32, u32, u32)>> = None;
    for p in &chain {
        let mut vs: Vec<(u32, u32, u32)> = plugin_versions(&paths.bin_dir.join(p))?
            .iter()
            .filter_map(|v| parse_version(v))
            .filter(|v| *v <= MAX_VERSION)
            .collect();
        if let Some(c) = &common {
            vs.retain(|v| c.contains(v));
        }
        common = Some(vs);
    }
    let mut versions = common.unwrap_or_default();
    versions.sort();
    versions.dedup();
    if !versions.contains(&(1, 0, 0)) {
        return Err(Error::CniPlugins {
            dir: paths.bin_dir.to_path_buf(),
            reason: format!("the plugins {chain:?} do not all support CNI 1.0.0"),
        });
    }
    let versions: Vec<String> = versions
        .iter()
        .map(|(a, b, c)| format!("{a}.{b}.{c}"))
        .collect();
    let mut plugins = vec![json!({
        "type": "twill",
        "subnetFile": paths.subnet_file,
        "dataDir": paths.data_dir.join("twill"),
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
        "ipam": {"type": "twill-host-local", "dataDir": paths.data_dir.join("networks")},
    })];
    if portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    let conf = json!({
        "cniVersion": "1.0.0",
        "cniVersions": versions,
        "name": "twill",
        "plugins": plugins,
    });
    serde_json::to_string_pretty(&conf).map_err(|e| Error::Backend(e.to_string()))
}

/// Writes the conflist if its content differs; returns the path.
pub fn write(paths: &CniPaths) -> Result<PathBuf> {
    let text = build(paths)? + "\n";
    let path = paths.conf_dir.join(CONFLIST_NAME);
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(path);
    }
    if !paths.conf_dir.exists() {
        twill_common::fsutil::ensure_dir(paths.conf_dir, 0o755)
            .map_err(Error::io(format!("create {}", paths.conf_dir.display())))?;
    }
    twill_common::fsutil::atomic_write(&path, text.as_bytes(), 0o644)
        .map_err(Error::io(format!("write {}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_plugin(dir: &Path, name: &str, versions: &str) {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[{versions}]}}'\n"),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn conflist_shape_and_versions() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        let conf = d.path().join("conf");
        std::fs::create_dir_all(&bin).unwrap();
        let paths = CniPaths {
            conf_dir: &conf,
            bin_dir: &bin,
            data_dir: Path::new("/var/lib/cni"),
            subnet_file: Path::new("/run/twill/subnet.env"),
        };
        let all = r#""0.3.1","0.4.0","1.0.0","1.1.0","1.2.0""#;
        fake_plugin(&bin, "twill", all);
        fake_plugin(&bin, "twill-bridge", all);
        assert!(build(&paths).is_err(), "host-local missing");
        fake_plugin(&bin, "twill-host-local", all);
        let v: Value = serde_json::from_str(&build(&paths).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["cniVersions"],
            json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
        assert_eq!(v["plugins"][0]["subnetFile"], "/run/twill/subnet.env");
        assert_eq!(v["plugins"][0]["dataDir"], "/var/lib/cni/twill");
        assert_eq!(v["plugins"][0]["ipam"]["dataDir"], "/var/lib/cni/networks");
        assert_eq!(v["plugins"][0]["delegate"]["isDefaultGateway"], true);
        fake_plugin(&bin, "portmap", r#""0.4.0","1.0.0""#);
        let v: Value = serde_json::from_str(&build(&paths).unwrap()).unwrap();
        assert_eq!(v["cniVersions"], json!(["0.4.0", "1.0.0"]));
        assert_eq!(v["plugins"][1]["type"], "portmap");
        let p = write(&paths).unwrap();
        assert!(p.ends_with(CONFLIST_NAME));
        fake_plugin(&bin, "twill-bridge", r#""0.4.0""#);
        assert!(build(&paths).is_err(), "no common 1.0.0");
    }
}
