//! The container-runtime side of CNI, as libcni/containerd do it: load the first network
//! config of a conf dir, pick the version, build each plugin's request, exec the plugins
//! from the bin dir with the CNI environment, cache the final result for CHECK and DEL,
//! and DEL the whole chain when an ADD fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{io, Error, Result};

/// Which runtime attaches the lab's pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// This module: plugins exec'd straight from the lab, pods are named netns. Fastest, and
    /// needs nothing beyond the lab's own packages.
    #[default]
    Lab,
    /// A containerd (1.6, runc) per node, pods are CRI sandboxes (`RunPodSandbox`) whose
    /// networks containerd's go-cni sets up: what a kubelet node does.
    Containerd,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Lab => "lab",
            Kind::Containerd => "containerd",
        })
    }
}

/// Versions this runtime speaks (libcni's `version.All`).
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

fn version_key(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let key = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(key)
}

/// A loaded network configuration list.
#[derive(Debug, Clone)]
pub struct NetworkList {
    pub file: PathBuf,
    pub name: String,
    /// The version all plugins are called with.
    pub version: String,
    pub disable_check: bool,
    pub plugins: Vec<Map<String, Value>>,
    /// The file's bytes, cached with the result so DEL uses what ADD used.
    pub raw: String,
}

impl NetworkList {
    /// Parses a conflist (or a legacy single-plugin `.conf`, which go-cni up-converts).
    pub fn parse(file: &Path, raw: &str) -> Result<NetworkList> {
        let bad = |m: &str| Error::Lab(format!("{}: {m}", file.display()));
        let v: Value = serde_json::from_str(raw).map_err(|e| bad(&e.to_string()))?;
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object"))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("no network name"))?
            .to_string();
        let plugins: Vec<Map<String, Value>> = match obj.get("plugins") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|p| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| bad("plugin is not an object"))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("plugins is not a list")),
            None if obj.contains_key("type") => vec![obj.clone()],
            None => return Err(bad("no plugins")),
        };
        if plugins.is_empty() {
            return Err(bad("no plugins"));
        }
        for p in &plugins {
            let t = p.get("type").and_then(Value::as_str).unwrap_or("");
            if t.is_empty() || t.contains('/') {
                return Err(bad(&format!("invalid plugin type {t:?}")));
            }
        }
        // Since 1.1 the runtime picks the highest version of cniVersion ∪ cniVersions it supports.
        let mut candidates: Vec<&str> = obj
            .get("cniVersions")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        // libcni decodes a missing cniVersion as 0.1.0.
        candidates.push(
            obj.get("cniVersion")
                .and_then(Value::as_str)
                .unwrap_or("0.1.0"),
        );
        let version = candidates
            .into_iter()
            .filter(|v| SUPPORTED_VERSIONS.contains(v))
            .max_by_key(|v| version_key(v))
            .ok_or_else(|| bad("no supported cniVersion"))?
            .to_string();
        let disable_check = matches!(obj.get("disableCheck"), Some(Value::Bool(true)))
            || obj.get("disableCheck").and_then(Value::as_str) == Some("true");
        Ok(NetworkList {
            file: file.to_path_buf(),
            name,
            version,
            disable_check,
            plugins,
            raw: raw.to_string(),
        })
    }

    /// The default network of a conf dir: the first `.conf`/`.conflist`/`.json` file in
    /// lexical order (go-cni's `max_conf_num = 1`). `Ok(None)` while there is none.
    pub fn load_first(conf_dir: &Path) -> Result<Option<NetworkList>> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(conf_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(
                            p.extension().and_then(|e| e.to_str()),
                            Some("conf" | "conflist" | "json")
                        )
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(conf_dir)(e)),
        };
        files.sort();
        match files.first() {
            None => Ok(None),
            Some(f) => {
                let raw = std::fs::read_to_string(f).map_err(io(f))?;
                NetworkList::parse(f, &raw).map(Some)
            }
        }
    }

    fn version_at_least(&self, v: &str) -> bool {
        version_key(&self.version) >= version_key(v)
    }
}

/// One attachment: a container's interface on the network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    /// CNI_NETNS, e.g. `/run/netns/x`.
    pub netns: String,
    pub ifname: String,
    /// `K=V` pairs for CNI_ARGS.
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, ...), handed to plugins that declare them.
    pub capability_args: Map<String, Value>,
}

/// The result cache entry (libcni's `cniCacheV1`, in JSON rather than base64).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheEntry {
    pub kind: String,
    pub config: String,
    pub network_name: String,
    pub attachment: Attachment,
    pub result: Value,
}

/// Executes plugins for the networks of one node.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The node's netns: plugins run inside it, as they would on the node.
    pub node_ns: String,
    pub bin_dir: PathBuf,
    pub cache_dir: PathBuf,
}

impl Runtime {
    fn cache_path(&self, net: &str, a: &Attachment) -> PathBuf {
        self.cache_dir
            .join(format!("{}-{}-{}", net, a.container_id, a.ifname))
    }

    pub fn cached(&self, net: &str, a: &Attachment) -> Option<CacheEntry> {
        let raw = std::fs::read(self.cache_path(net, a)).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// Per-plugin request: the plugin object plus name, cniVersion, prevResult and the
    /// capability args it asked for as runtimeConfig (libcni `buildOneConfig`).
    fn request(
        list: &NetworkList,
        plugin: &Map<String, Value>,
        a: &Attachment,
        prev: Option<&Value>,
    ) -> Value {
        let mut conf = plugin.clone();
        conf.insert("name".into(), json!(list.name));
        conf.insert("cniVersion".into(), json!(list.version));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut rc = Map::new();
        if let Some(Value::Object(caps)) = plugin.get("capabilities") {
            for (cap, on) in caps {
                if on == &Value::Bool(true) {
                    if let Some(arg) = a.capability_args.get(cap) {
                        rc.insert(cap.clone(), arg.clone());
                    }
                }
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(conf)
    }

    /// Execs one plugin with the CNI environment; returns its parsed stdout (if any).
    pub fn exec(
        &self,
        verb: &str,
        plugin_type: &str,
        conf: &Value,
        a: Option<&Attachment>,
    ) -> Result<Option<Value>> {
        let path = self.bin_dir.join(plugin_type);
        if !path.is_file() {
            return Err(Error::Plugin {
                plugin: plugin_type.into(),
                verb: verb.to_lowercase(),
                code: None,
                detail: format!(
                    "failed to find plugin {plugin_type:?} in path [{}]",
                    self.bin_dir.display()
                ),
            });
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_ns])
            .arg(&path)
            .env("CNI_COMMAND", verb)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match a {
            Some(a) => {
                let args: Vec<String> = std::iter::once("IgnoreUnknown=1".to_string())
                    .chain(a.args.iter().map(|(k, v)| format!("{k}={v}")))
                    .collect();
                cmd.env("CNI_CONTAINERID", &a.container_id)
                    .env("CNI_NETNS", &a.netns)
                    .env("CNI_IFNAME", &a.ifname)
                    .env("CNI_ARGS", args.join(";"));
            }
            None => {
                cmd.env("CNI_CONTAINERID", "")
                    .env("CNI_NETNS", "")
                    .env("CNI_IFNAME", "");
            }
        }
        let mut child = cmd.spawn().map_err(io("ip"))?;
        let body = serde_json::to_vec(conf)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin may exit before reading stdin; its answer is what counts.
            let _ = stdin.write_all(&body);
        }
        let out = child.wait_with_output().map_err(io(&path))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed: Option<Value> = if stdout.trim().is_empty() {
            None
        } else {
            serde_json::from_str(&stdout).ok()
        };
        if !out.status.success() {
            let (code, detail) = match &parsed {
                Some(e) => (
                    e.get("code").and_then(Value::as_u64),
                    format!(
                        "{}{}",
                        e.get("msg").and_then(Value::as_str).unwrap_or(""),
                        e.get("details")
                            .and_then(Value::as_str)
                            .map(|d| format!("; {d}"))
                            .unwrap_or_default()
                    ),
                ),
                None => (
                    None,
                    format!(
                        "netplugin failed: {:?}",
                        format!(
                            "{}{}",
                            stdout.trim(),
                            String::from_utf8_lossy(&out.stderr).trim()
                        )
                    ),
                ),
            };
            return Err(Error::Plugin {
                plugin: plugin_type.into(),
                verb: verb.to_lowercase(),
                code,
                detail,
            });
        }
        if !stdout.trim().is_empty() && parsed.is_none() {
            return Err(Error::Plugin {
                plugin: plugin_type.into(),
                verb: verb.to_lowercase(),
                code: None,
                detail: format!("unparseable result: {}", stdout.trim()),
            });
        }
        Ok(parsed)
    }

    /// ADD through the chain. On failure the whole chain is DELeted (as containerd does)
    /// and the ADD error is returned.
    pub fn add(&self, list: &NetworkList, a: &Attachment) -> Result<Value> {
        match self.add_chain(list, a) {
            Ok(result) => {
                twill_common::fsutil::ensure_dir(&self.cache_dir, 0o700)
                    .map_err(io(&self.cache_dir))?;
                let entry = CacheEntry {
                    kind: "cniCacheV1".into(),
                    config: list.raw.clone(),
                    network_name: list.name.clone(),
                    attachment: a.clone(),
                    result: result.clone(),
                };
                let path = self.cache_path(&list.name, a);
                twill_common::fsutil::atomic_write(&path, &serde_json::to_vec(&entry)?, 0o600)
                    .map_err(io(&path))?;
                Ok(result)
            }
            Err(e) => {
                let _ = self.del_chain(list, a, None);
                Err(e)
            }
        }
    }

    fn add_chain(&self, list: &NetworkList, a: &Attachment) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for p in &list.plugins {
            let t = p["type"].as_str().unwrap_or_default();
            let conf = Self::request(list, p, a, prev.as_ref());
            let mut res = self
                .exec("ADD", t, &conf, Some(a))?
                .ok_or_else(|| Error::Plugin {
                    plugin: t.into(),
                    verb: "add".into(),
                    code: None,
                    detail: "empty result".into(),
                })?;
            // A result without cniVersion takes the config's (libcni fixupResultVersion).
            if let Value::Object(m) = &mut res {
                m.entry("cniVersion").or_insert_with(|| json!(list.version));
            }
            prev = Some(res);
        }
        prev.ok_or_else(|| Error::Lab("empty plugin chain".into()))
    }

    fn del_chain(&self, list: &NetworkList, a: &Attachment, cached: Option<&Value>) -> Result<()> {
        // prevResult on DEL only from 0.4.0 on.
        let prev = cached.filter(|_| list.version_at_least("0.4.0"));
        for p in list.plugins.iter().rev() {
            let t = p["type"].as_str().unwrap_or_default();
            let conf = Self::request(list, p, a, prev);
            self.exec("DEL", t, &conf, Some(a))?;
        }
        Ok(())
    }

    /// DEL with the cached config and result; the cache goes only when DEL succeeded.
    /// Without a cache the given list is used (the attachment may never have been cached).
    pub fn del(&self, list: Option<&NetworkList>, a: &Attachment) -> Result<()> {
        let name = list.map(|l| l.name.clone());
        let entry = name.as_deref().and_then(|n| self.cached(n, a));
        let (list, result) = match (&entry, list) {
            (Some(e), _) => (
                NetworkList::parse(Path::new("<cache>"), &e.config)?,
                Some(e.result.clone()),
            ),
            (None, Some(l)) => (l.clone(), None),
            (None, None) => return Ok(()),
        };
        self.del_chain(&list, a, result.as_ref())?;
        let path = self.cache_path(&list.name, a);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(path)(e)),
        }
    }

    /// CHECK every plugin against the cached result (0.4.0+, unless disableCheck).
    pub fn check(&self, list: &NetworkList, a: &Attachment) -> Result<()> {
        if list.disable_check {
            return Ok(());
        }
        if !list.version_at_least("0.4.0") {
            return Err(Error::Lab(format!(
                "configuration version {:?} does not support the CHECK command",
                list.version
            )));
        }
        let entry = self.cached(&list.name, a);
        for p in &list.plugins {
            let t = p["type"].as_str().unwrap_or_default();
            let conf = Self::request(list, p, a, entry.as_ref().map(|e| &e.result));
            self.exec("CHECK", t, &conf, Some(a))?;
        }
        Ok(())
    }

    /// STATUS every plugin (1.1.0+; a no-op below), stopping at the first error.
    pub fn status(&self, list: &NetworkList) -> Result<()> {
        if !list.version_at_least("1.1.0") {
            return Ok(());
        }
        for p in &list.plugins {
            let t = p["type"].as_str().unwrap_or_default();
            let mut conf = p.clone();
            conf.insert("name".into(), json!(list.name));
            conf.insert("cniVersion".into(), json!(list.version));
            self.exec("STATUS", t, &Value::Object(conf), None)?;
        }
        Ok(())
    }
}

/// The first IPv4 address of a result of any version, as `a.b.c.d/len`.
pub fn result_ipv4(result: &Value) -> Option<String> {
    if let Some(ip) = result.pointer("/ip4/ip").and_then(Value::as_str) {
        return Some(ip.to_string());
    }
    result
        .get("ips")?
        .as_array()?
        .iter()
        .filter_map(|i| i.get("address").and_then(Value::as_str))
        .find(|a| !a.contains(':'))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_supported_version() {
        let l = NetworkList::parse(
            Path::new("x"),
            r#"{"cniVersion":"0.3.1","cniVersions":["1.0.0","1.1.0","9.9.9"],"name":"n","plugins":[{"type":"a"}]}"#,
        )
        .unwrap();
        assert_eq!(l.version, "1.1.0");
        let l = NetworkList::parse(Path::new("x"), r#"{"name":"n","type":"bridge"}"#).unwrap();
        assert_eq!(l.version, "0.1.0");
        assert_eq!(l.plugins.len(), 1);
        assert!(NetworkList::parse(Path::new("x"), r#"{"name":"n","plugins":[]}"#).is_err());
        assert!(NetworkList::parse(
            Path::new("x"),
            r#"{"name":"n","plugins":[{"type":"../x"}]}"#
        )
        .is_err());
    }

    #[test]
    fn request_injects_runtime_config_only_for_declared_capabilities() {
        let l = NetworkList::parse(
            Path::new("x"),
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"a","name":"ignored"},
                {"type":"portmap","capabilities":{"portMappings":true,"bandwidth":false}}]}"#,
        )
        .unwrap();
        let mut caps = Map::new();
        caps.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        caps.insert("bandwidth".into(), json!({"ingressRate": 1}));
        let a = Attachment {
            container_id: "c".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: vec![],
            capability_args: caps,
        };
        let first = Runtime::request(&l, &l.plugins[0], &a, None);
        assert_eq!(first["name"], "net");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("runtimeConfig").is_none() && first.get("prevResult").is_none());
        let prev = json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]});
        let second = Runtime::request(&l, &l.plugins[1], &a, Some(&prev));
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert!(second["runtimeConfig"].get("bandwidth").is_none());
        assert_eq!(result_ipv4(&prev).as_deref(), Some("10.0.0.2/24"));
        assert_eq!(
            result_ipv4(&json!({"ip4":{"ip":"10.1.0.3/24"}})).as_deref(),
            Some("10.1.0.3/24")
        );
    }
}
