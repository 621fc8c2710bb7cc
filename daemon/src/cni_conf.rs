//! The CNI conflist that turns the node Ready: `<cni-conf-dir>/10-twill.conflist`.
//!
//! Written (atomically, only when its content changes) once the lease, the device and the
//! peers are in place, and compared with what twilld would write on every reconcile pass (an
//! edited or deleted file is put back). The file lives on tmpfs next to subnet.env and the conf
//! dir holds a symlink to it ([`Location`]): a reboot takes the conflist away with /run, so the
//! runtime reports NetworkReady=false until twilld writes it again. A restart leaves it in
//! place (no readiness flap).
//! `cniVersion` is 1.0.0 (runtimes before spec 1.1 read only that); `cniVersions` lists what
//! every plugin of the chain reports in VERSION, up to 1.1.0.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use twill_common::cni::version::Version;

use crate::error::{Error, Result};

pub const CONFLIST_NAME: &str = "10-twill.conflist";
/// Plugins the chain cannot work without.
pub const REQUIRED_PLUGINS: [&str; 3] = ["twill", "twill-bridge", "twill-host-local"];
/// Chained after twill when installed (install-cni always installs it). The node's reference
/// `portmap` is never chained: it would hold the chain at CNI 1.0.0 and program iptables.
pub const PORTMAP: &str = "twill-portmap";
const MAX_VERSION: Version = Version::V1_1_0;

pub struct CniPaths<'a> {
    pub bin_dir: &'a Path,
    pub data_dir: &'a Path,
    pub subnet_file: &'a Path,
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `CNI_COMMAND=VERSION` on a plugin and returns its supportedVersions.
pub(crate) fn plugin_versions(bin: &Path) -> Result<Vec<String>> {
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
    let mut common: Option<Vec<Version>> = None;
    for p in &chain {
        let mut vs: Vec<Version> = plugin_versions(&paths.bin_dir.join(p))?
            .iter()
            .filter_map(|v| Version::parse(v).ok())
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
    if !versions.contains(&Version::V1_0_0) {
        return Err(Error::CniPlugins {
            dir: paths.bin_dir.to_path_buf(),
            reason: format!("the plugins {chain:?} do not all support CNI 1.0.0"),
        });
    }
    let versions: Vec<String> = versions
        .iter()
        .map(|Version(a, b, c)| format!("{a}.{b}.{c}"))
        .collect();
    let mut plugins = vec![json!({
        "type": "twill",
        "subnetFile": paths.subnet_file,
        "dataDir": paths.data_dir.join("twill"),
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
        "ipam": {"type": "twill-host-local", "dataDir": paths.data_dir.join("networks")},
    })];
    if portmap {
        plugins.push(json!({"type": PORTMAP, "capabilities": {"portMappings": true}}));
    }
    let conf = json!({
        "cniVersion": "1.0.0",
        "cniVersions": versions,
        "name": "twill",
        "plugins": plugins,
    });
    serde_json::to_string_pretty(&conf).map_err(|e| Error::Backend(e.to_string()))
}

/// The file's text for the plugins now in `bin_dir`. Probing runs every plugin, so the text is
/// kept and built again only when a plugin binary changes (install-cni replaced it).
#[derive(Debug, Default)]
pub struct Desired {
    stamp: Vec<(String, Option<(std::time::SystemTime, u64)>)>,
    text: Option<String>,
}

impl Desired {
    fn stamp(bin_dir: &Path) -> Vec<(String, Option<(std::time::SystemTime, u64)>)> {
        REQUIRED_PLUGINS
            .iter()
            .chain(std::iter::once(&PORTMAP))
            .map(|p| {
                let m = std::fs::metadata(bin_dir.join(p)).ok();
                let key = m.and_then(|m| Some((m.modified().ok()?, m.len())));
                (p.to_string(), key)
            })
            .collect()
    }

    pub fn text(&mut self, paths: &CniPaths) -> Result<String> {
        let stamp = Desired::stamp(paths.bin_dir);
        if let (true, Some(t)) = (stamp == self.stamp, &self.text) {
            return Ok(t.clone());
        }
        let text = build(paths)? + "\n";
        self.stamp = stamp;
        self.text = Some(text.clone());
        Ok(text)
    }
}

/// Where the conflist lives. The runtime reads `<conf-dir>/10-twill.conflist`, a symlink to
/// the real file next to subnet.env on tmpfs (`/run/twill`): a reboot wipes the file, the link
/// dangles, and the runtime reports NetworkReady=false from boot until twilld has written it
/// again — a regular file in the conf dir would keep the node Ready over a network that is not
/// there yet. (containerd's go-cni fails the load of a dangling conflist; CRI-O skips it.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub link: PathBuf,
    pub file: PathBuf,
}

impl Location {
    pub fn new(conf_dir: &Path, run_dir: &Path) -> Location {
        Location {
            link: conf_dir.join(CONFLIST_NAME),
            file: run_dir.join(CONFLIST_NAME),
        }
    }

    /// Next to the subnet file.
    pub fn beside(conf_dir: &Path, subnet_file: &Path) -> Location {
        let run_dir = subnet_file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Location::new(conf_dir, run_dir)
    }

    /// Whether the runtime would read something other than `text` (missing, edited, truncated,
    /// a regular file or a link elsewhere).
    pub fn differs(&self, text: &str) -> bool {
        std::fs::read_link(&self.link).ok().as_deref() != Some(self.file.as_path())
            || std::fs::read(&self.file).ok().as_deref() != Some(text.as_bytes())
    }

    /// Writes the file, then (re)points the link at it with an atomic rename, which also wakes
    /// runtimes that watch the conf dir (containerd's fsnotify sees no change to the target).
    pub fn write(&self, text: &str) -> Result<()> {
        if !self.differs(text) {
            return Ok(());
        }
        for dir in [self.file.parent(), self.link.parent()]
            .into_iter()
            .flatten()
        {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                twill_common::fsutil::ensure_dir(dir, 0o755)
                    .map_err(Error::io(format!("create {}", dir.display())))?;
            }
        }
        twill_common::fsutil::atomic_write(&self.file, text.as_bytes(), 0o644)
            .map_err(Error::io(format!("write {}", self.file.display())))?;
        let tmp = self.link.with_file_name(format!(
            ".{CONFLIST_NAME}.{}.{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::os::unix::fs::symlink(&self.file, &tmp)
            .map_err(Error::io(format!("link {}", tmp.display())))?;
        std::fs::rename(&tmp, &self.link).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("rename onto {}", self.link.display()))(e)
        })
    }

    /// Removes the link and the file (after a reboot, until the node is ready again). True if
    /// the runtime could read a conflist before.
    pub fn remove(&self) -> Result<bool> {
        let readable = self.link.exists();
        for p in [&self.link, &self.file] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("remove {}", p.display()))(e)),
            }
        }
        Ok(readable)
    }
}

/// The first CNI config of another network that sorts before twill's: the runtime (libcni,
/// CRI-O, containerd's go-cni) uses the first loadable file in lexical order, so while it exists
/// pods get that network, not twill's.
pub fn shadowing(names_and_texts: &[(String, Vec<u8>)]) -> Option<String> {
    let mut files: Vec<&(String, Vec<u8>)> = names_and_texts
        .iter()
        .filter(|(n, _)| {
            [".conf", ".conflist", ".json"]
                .iter()
                .any(|ext| n.ends_with(ext))
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, text) in files {
        if name.as_str() >= CONFLIST_NAME {
            return None;
        }
        // Files the runtime cannot load are skipped by it too.
        let Ok(v) = serde_json::from_slice::<Value>(text) else {
            continue;
        };
        let loadable = v.get("type").is_some_and(Value::is_string)
            || v.get("plugins")
                .is_some_and(|p| p.as_array().is_some_and(|a| !a.is_empty()));
        if !loadable {
            continue;
        }
        if v.get("name").and_then(Value::as_str) != Some("twill") {
            return Some(name.clone());
        }
    }
    None
}

/// Reads the conf dir for [`shadowing`] (only files sorting before twill's are read).
pub fn read_conf_dir(conf_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(conf_dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.as_str() >= CONFLIST_NAME {
                return None;
            }
            // Bounded read: a config is small; a huge file is not one the runtime loads either.
            let text = std::fs::read(e.path()).ok().filter(|t| t.len() < 1 << 20)?;
            Some((name, text))
        })
        .collect()
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
        // The node's reference portmap (1.0.0 at most) is not chained.
        fake_plugin(&bin, "portmap", r#""0.4.0","1.0.0""#);
        let v: Value = serde_json::from_str(&build(&paths).unwrap()).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(
            v["cniVersions"],
            json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        // twill-portmap is, and the chain still reaches 1.1.0.
        fake_plugin(
            &bin,
            "twill-portmap",
            r#""0.3.0","0.3.1","0.4.0","1.0.0","1.1.0""#,
        );
        let v: Value = serde_json::from_str(&build(&paths).unwrap()).unwrap();
        assert_eq!(
            v["cniVersions"],
            json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(v["plugins"][1]["type"], "twill-portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        fake_plugin(&bin, "twill-portmap", r#""0.4.0","1.0.0""#);
        let v: Value = serde_json::from_str(&build(&paths).unwrap()).unwrap();
        assert_eq!(
            v["cniVersions"],
            json!(["0.4.0", "1.0.0"]),
            "an older twill-portmap narrows it"
        );
        let loc = Location::new(&conf, &d.path().join("run"));
        loc.write(&(build(&paths).unwrap() + "\n")).unwrap();
        assert!(loc.link.ends_with(CONFLIST_NAME));
        fake_plugin(&bin, "twill-bridge", r#""0.4.0""#);
        assert!(build(&paths).is_err(), "no common 1.0.0");
    }

    #[test]
    fn desired_text_is_rebuilt_when_a_plugin_changes_and_repairs_the_file() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        let conf = d.path().join("conf");
        let run = d.path().join("run");
        std::fs::create_dir_all(&bin).unwrap();
        let paths = CniPaths {
            bin_dir: &bin,
            data_dir: Path::new("/var/lib/cni"),
            subnet_file: Path::new("/run/twill/subnet.env"),
        };
        let all = r#""0.4.0","1.0.0","1.1.0""#;
        for p in REQUIRED_PLUGINS {
            fake_plugin(&bin, p, all);
        }
        let loc = Location::new(&conf, &run);
        let mut want = Desired::default();
        let t1 = want.text(&paths).unwrap();
        assert!(loc.differs(&t1), "missing file differs");
        loc.write(&t1).unwrap();
        assert!(!loc.differs(&t1));
        assert_eq!(
            std::fs::read_to_string(&loc.link).unwrap(),
            t1,
            "the runtime reads it"
        );
        assert_eq!(std::fs::read_link(&loc.link).unwrap(), loc.file);
        std::fs::write(&loc.file, "{garbage").unwrap();
        assert!(loc.differs(&t1), "an edited file differs");
        loc.write(&t1).unwrap();
        // A regular file in the conf dir (an older twill) is replaced by the link.
        std::fs::remove_file(&loc.link).unwrap();
        std::fs::write(&loc.link, &t1).unwrap();
        assert!(loc.differs(&t1));
        loc.write(&t1).unwrap();
        assert!(!loc.differs(&t1));
        // A reboot wipes the run dir: the link dangles and nothing is readable.
        std::fs::remove_file(&loc.file).unwrap();
        assert!(!loc.link.exists());
        assert!(loc.differs(&t1));
        // A new twill-portmap changes the chain.
        fake_plugin(&bin, PORTMAP, all);
        let t2 = want.text(&paths).unwrap();
        assert_ne!(t1, t2);
        assert!(t2.contains("twill-portmap"));
        loc.write(&t2).unwrap();
        assert!(loc.remove().unwrap());
        assert!(!loc.remove().unwrap(), "removing twice is fine");
        assert!(std::fs::symlink_metadata(&loc.link).is_err());
        let left: Vec<_> = std::fs::read_dir(&conf).unwrap().collect();
        assert!(left.is_empty(), "no temp links left behind");
    }

    #[test]
    fn another_network_sorting_first_shadows_twill() {
        let f = |n: &str, t: &str| (n.to_string(), t.as_bytes().to_vec());
        let other = r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#;
        let flannel = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"}]}"#;
        let single = r#"{"cniVersion":"0.4.0","name":"k8s","type":"bridge"}"#;
        assert_eq!(
            shadowing(&[f("05-other.conflist", other)]),
            Some("05-other.conflist".into())
        );
        assert_eq!(
            shadowing(&[f("10-flannel.conflist", flannel)]),
            Some("10-flannel.conflist".into())
        );
        assert_eq!(
            shadowing(&[f("01-k8s.conf", single)]),
            Some("01-k8s.conf".into())
        );
        assert_eq!(
            shadowing(&[f("99-other.conflist", other)]),
            None,
            "sorts after twill's"
        );
        assert_eq!(
            shadowing(&[f("05-other.conflist.bak", other)]),
            None,
            "not a config name"
        );
        assert_eq!(
            shadowing(&[f("05-broken.conflist", "{")]),
            None,
            "not loadable"
        );
        assert_eq!(
            shadowing(&[f("05-empty.conflist", r#"{"name":"x","plugins":[]}"#)]),
            None
        );
        let twin = r#"{"cniVersion":"1.0.0","name":"twill","plugins":[{"type":"twill"}]}"#;
        assert_eq!(
            shadowing(&[f("00-twill.conflist", twin)]),
            None,
            "twill's own network"
        );
        assert_eq!(
            shadowing(&[f("07-b.conflist", other), f("06-a.conf", single)]),
            Some("06-a.conf".into()),
            "the first in lexical order is named"
        );
    }
}
