//! The CNI side of the node: which config the runtime picks, and the plugins it will run.

use std::path::Path;

use serde_json::Value;

use super::Finding;
use crate::cni_conf::CONFLIST_NAME;

/// Runtimes (libcni's `ConfFiles`) read these extensions and use the first file in byte order.
const CONF_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// One file of the conf dir: its name and content (None when unreadable).
#[derive(Debug, Clone)]
pub struct ConfFile {
    pub name: String,
    pub content: Option<String>,
}

fn is_cni_conf(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| CONF_EXTENSIONS.contains(&e))
}

/// `network "x", plugins a, b` of a config the runtime would load, and whether it is
/// flannel's; None for files the runtime skips (not JSON, no `type`/`plugins`) and for
/// twill's own network.
fn describe(f: &ConfFile) -> Option<(String, bool)> {
    let v: Value = serde_json::from_str(f.content.as_deref()?).ok()?;
    let types: Vec<String> = match v["plugins"].as_array() {
        Some(list) => list
            .iter()
            .filter_map(|p| p["type"].as_str().map(String::from))
            .collect(),
        None => v["type"].as_str().map(String::from).into_iter().collect(),
    };
    let name = v["name"].as_str().unwrap_or("?");
    if types.is_empty() || name == "twill" {
        return None;
    }
    let flannel = f.name.contains("flannel") || types.iter().any(|t| t == "flannel");
    Some((
        format!("network {name:?}, plugins {}", types.join(", ")),
        flannel,
    ))
}

/// `files`: the conf dir's entries (None when the dir cannot be read).
pub fn configs(dir: &Path, files: Option<&[ConfFile]>) -> Finding {
    let check = "cni config";
    let d = dir.display();
    let Some(files) = files else {
        return Finding::warn(
            check,
            format!("{d} does not exist or cannot be read"),
            format!("twilld creates {d} and writes {CONFLIST_NAME} once the node is ready; check --cni-conf-dir"),
        );
    };
    let mut confs: Vec<&ConfFile> = files.iter().filter(|f| is_cni_conf(&f.name)).collect();
    confs.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let before: Vec<&&ConfFile> = confs
        .iter()
        .take_while(|f| f.name.as_str() < CONFLIST_NAME)
        .collect();
    let (foreign, flannel): (Vec<_>, Vec<_>) = before
        .iter()
        .filter_map(|f| describe(f).map(|d| (f, d)))
        .partition(|(_, (_, fl))| !fl);
    if !foreign.is_empty() {
        let names: Vec<String> = foreign
            .iter()
            .map(|(f, (desc, _))| format!("{} ({desc})", f.name))
            .collect();
        let files: Vec<&str> = foreign.iter().map(|(f, _)| f.name.as_str()).collect();
        return Finding::fail(
            check,
            format!(
                "{} sorts before {CONFLIST_NAME} in {d}: the runtime uses it instead of twill",
                names.join(", ")
            ),
            format!(
                "move {} out of {d} if this node should use twill (runtimes take the first file in lexical order)",
                files.join(", ")
            ),
        );
    }
    if !flannel.is_empty() {
        let files: Vec<&str> = flannel.iter().map(|(f, _)| f.name.as_str()).collect();
        return Finding::warn(
            check,
            format!(
                "{} left from flannel sorts before {CONFLIST_NAME}: the runtime runs flannel's plugin, not twill's",
                files.join(", ")
            ),
            format!("remove {} from {d}", files.join(", ")),
        );
    }
    match confs.iter().find(|f| f.name == CONFLIST_NAME) {
        None => Finding::warn(
            check,
            format!("{CONFLIST_NAME} is not in {d} yet: the runtime reports the network not ready"),
            "twilld writes it once the lease, the VTEP, the peers and the rules are in place; check that twilld runs and its log",
        ),
        Some(ours) => {
            let v: Option<Value> = ours
                .content
                .as_deref()
                .and_then(|c| serde_json::from_str(c).ok());
            match v {
                Some(v) if v["name"] == "twill" => Finding::ok(
                    check,
                    format!(
                        "{CONFLIST_NAME} is the first of {} config(s) in {d}",
                        confs.len()
                    ),
                ),
                _ => Finding::fail(
                    check,
                    format!("{d}/{CONFLIST_NAME} is not twill's conflist (unreadable, not JSON or another network name)"),
                    format!("remove {d}/{CONFLIST_NAME}; twilld writes it again on its next pass"),
                ),
            }
        }
    }
}

/// One plugin of the chain as found in the bin dir.
#[derive(Debug, Clone)]
pub enum PluginFacts {
    Missing,
    NotExecutable,
    /// supportedVersions from VERSION, or why VERSION failed.
    Probed(Result<Vec<String>, String>),
}

/// The plugins a node needs, and why; `required` ones fail when missing.
pub const PLUGINS: [(&str, bool, &str); 5] = [
    ("twill", true, "twill's conflist starts with it"),
    ("twill-bridge", true, "twill delegates pod interfaces to it"),
    (
        "twill-host-local",
        true,
        "twill's pod addresses come from it",
    ),
    (
        "loopback",
        true,
        "containerd and CRI-O run it for every pod sandbox",
    ),
    (
        "twill-portmap",
        false,
        "hostPorts need it; twilld chains it only when present",
    ),
];

pub fn plugin(name: &str, required: bool, why: &str, bin_dir: &Path, f: &PluginFacts) -> Finding {
    let check = format!("plugin {name}");
    let d = bin_dir.display();
    let install = match name {
        "loopback" => "run `twilld install-cni` (it installs twill-loopback as loopback when the node has none) or install the reference plugins (containernetworking-plugins)".to_string(),

        _ => format!("run `twilld install-cni` (the DaemonSet's init container) to copy {name} into {d}"),
    };
    let missing = |msg: String| {
        if required {
            Finding::fail(&check, msg, install.clone())
        } else {
            Finding::warn(&check, msg, install.clone())
        }
    };
    match f {
        PluginFacts::Missing => missing(format!("not in {d}: {why}")),
        PluginFacts::NotExecutable => missing(format!("{d}/{name} is not an executable file")),
        PluginFacts::Probed(Err(e)) => missing(format!("VERSION failed: {e}")),
        PluginFacts::Probed(Ok(versions)) if !versions.iter().any(|v| v == "1.0.0") => {
            missing(format!(
                "does not support CNI 1.0.0, the conflist's version (supports {})",
                versions.join(", ")
            ))
        }
        PluginFacts::Probed(Ok(versions)) => Finding::ok(
            check,
            format!("{d}/{name} supports CNI {}", versions.join(", ")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    fn file(name: &str, content: &str) -> ConfFile {
        ConfFile {
            name: name.into(),
            content: Some(content.into()),
        }
    }

    fn ours() -> ConfFile {
        file(
            CONFLIST_NAME,
            r#"{"cniVersion":"1.0.0","name":"twill","plugins":[{"type":"twill"}]}"#,
        )
    }

    #[test]
    fn first_config_wins() {
        let dir = Path::new("/etc/cni/net.d");
        let ok = configs(
            dir,
            Some(&[ours(), file("99-other.conflist", "{}"), file("README", "")]),
        );
        assert_eq!(ok.status, Status::Ok, "{}", ok.line());
        let shadow = configs(
            dir,
            Some(&[
                ours(),
                file(
                    "05-other.conflist",
                    r#"{"name":"other","plugins":[{"type":"bridge"}]}"#,
                ),
            ]),
        );
        assert_eq!(shadow.status, Status::Fail);
        assert!(
            shadow.message.contains("05-other.conflist"),
            "{}",
            shadow.message
        );
        assert!(shadow.message.contains("\"other\""));
        let flannel = configs(
            dir,
            Some(&[
                ours(),
                file(
                    "10-flannel.conflist",
                    r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#,
                ),
            ]),
        );
        assert_eq!(flannel.status, Status::Warn, "{}", flannel.line());
        assert!(flannel.message.contains("10-flannel.conflist"));
        // A non-config file sorting first does not shadow.
        assert_eq!(
            configs(dir, Some(&[ours(), file("00-notes.txt", "")])).status,
            Status::Ok
        );
        // Files the runtime skips do not shadow; byte order puts Z.conf after ours.
        assert_eq!(
            configs(dir, Some(&[ours(), file("00-broken.conf", "{")])).status,
            Status::Ok
        );
        assert_eq!(
            configs(
                dir,
                Some(&[ours(), file("Z.conf", r#"{"name":"z","type":"bridge"}"#)])
            )
            .status,
            Status::Ok
        );
    }

    #[test]
    fn missing_or_foreign_conflist() {
        let dir = Path::new("/etc/cni/net.d");
        assert_eq!(configs(dir, None).status, Status::Warn);
        assert_eq!(configs(dir, Some(&[])).status, Status::Warn);
        let bad = configs(dir, Some(&[file(CONFLIST_NAME, "not json")]));
        assert_eq!(bad.status, Status::Fail);
    }

    #[test]
    fn plugins() {
        let bin = Path::new("/opt/cni/bin");
        let ok = PluginFacts::Probed(Ok(vec!["0.4.0".into(), "1.0.0".into()]));
        assert_eq!(plugin("twill", true, "", bin, &ok).status, Status::Ok);
        let lo = plugin("loopback", true, "sandboxes", bin, &PluginFacts::Missing);
        assert_eq!(lo.status, Status::Fail);
        assert!(lo.fix.unwrap().contains("install-cni"));
        assert_eq!(
            plugin("twill-portmap", false, "", bin, &PluginFacts::Missing).status,
            Status::Warn
        );
        assert_eq!(
            plugin("twill", true, "", bin, &PluginFacts::NotExecutable).status,
            Status::Fail
        );
        let old = PluginFacts::Probed(Ok(vec!["0.3.1".into()]));
        assert_eq!(
            plugin("twill-bridge", true, "", bin, &old).status,
            Status::Fail
        );
        let broken = PluginFacts::Probed(Err("timed out".into()));
        assert_eq!(plugin("twill", true, "", bin, &broken).status, Status::Fail);
    }
}
