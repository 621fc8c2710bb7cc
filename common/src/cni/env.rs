//! The `CNI_*` environment, parsed and validated like the reference `skel`.

use std::fs::File;
use std::path::PathBuf;

use super::error::{code, CniError};

/// The verb in `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::invalid_env(format!(
                    "unknown CNI_COMMAND: {other}"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

/// `CNI_ARGS`: `K1=V1;K2=V2`, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(pub Vec<(String, String)>);

impl CniArgs {
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut out = Vec::new();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| CniError::invalid_env(format!("CNI_ARGS: invalid pair {pair:?}")))?;
            out.push((k.to_string(), v.to_string()));
        }
        Ok(CniArgs(out))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `IgnoreUnknown=1|true` (case-insensitive, like Go's ParseBool).
    pub fn ignore_unknown(&self) -> bool {
        matches!(
            self.get("IgnoreUnknown")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("1" | "t" | "true")
        )
    }

    /// Rejects keys outside `known` unless `IgnoreUnknown` is set, as `types.LoadArgs` does.
    pub fn check_known(&self, known: &[&str]) -> Result<(), CniError> {
        if self.ignore_unknown() {
            return Ok(());
        }
        for (k, _) in &self.0 {
            if k != "IgnoreUnknown" && !known.contains(&k.as_str()) {
                return Err(CniError::invalid_env(format!(
                    "CNI_ARGS: unknown args [\"{k}\"]"
                )));
            }
        }
        Ok(())
    }
}

/// The parsed environment of one plugin invocation.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    /// Empty for VERSION/STATUS/GC.
    pub container_id: String,
    /// `CNI_NETNS`; `None` when unset or empty (allowed for DEL).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
    /// `CNI_PATH` split on `:`.
    pub path: Vec<PathBuf>,
}

fn valid_id(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Container ID rule of the spec: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`; empty is code 3.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            "missing containerID",
        ));
    }
    if !valid_id(id) {
        return Err(
            CniError::invalid_env("invalid characters in containerID").with_details(id.to_string())
        );
    }
    Ok(())
}

/// Network name rule (same regex as container IDs; it becomes a path component); code 7.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::invalid_config("missing network name"));
    }
    if !valid_id(name) {
        return Err(
            CniError::invalid_config("invalid characters found in network name")
                .with_details(name.to_string()),
        );
    }
    Ok(())
}

/// Interface name rule of the kernel: ≤ 15 bytes, not `.`/`..`, no `/`, `:` or whitespace; code 4.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = |why: &str| {
        Err(CniError::invalid_env(format!(
            "interface name {name:?} {why}"
        )))
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 15 {
        return bad("is too long");
    }
    if name == "." || name == ".." {
        return bad("is not valid");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return bad("contains invalid characters");
    }
    Ok(())
}

impl Env {
    /// Reads the variables through `lookup` (the process env in plugins, a map in tests).
    /// Missing required variables give code 4 naming them, like skel.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let get = |k: &str| lookup(k).unwrap_or_default();
        let command = Command::parse(&get("CNI_COMMAND"))?;
        let required: &[&str] = match command {
            Command::Add | Command::Check => {
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
            }
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Command::Gc => &["CNI_PATH"],
            Command::Status | Command::Version => &[],
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|k| get(k).is_empty())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::invalid_env(format!(
                "required env variables [{}] missing",
                missing.join(",")
            )));
        }
        let netns = Some(get("CNI_NETNS"))
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let path = get("CNI_PATH")
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Env {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns,
            ifname: get("CNI_IFNAME"),
            args: CniArgs::parse(&get("CNI_ARGS"))?,
            path,
        })
    }

    /// Opens `CNI_NETNS` for the verbs that need the namespace (code 4 when unset).
    pub fn open_netns(&self) -> Result<File, CniError> {
        let p = self
            .netns
            .as_ref()
            .ok_or_else(|| CniError::invalid_env("required env variables [CNI_NETNS] missing"))?;
        crate::netns::open(p)
            .map_err(|e| CniError::internal(format!("failed to open netns {:?}: {e}", p.display())))
    }

    /// Checks container ID and ifname for the verbs that carry them.
    pub fn validate(&self) -> Result<(), CniError> {
        if matches!(self.command, Command::Add | Command::Del | Command::Check) {
            validate_container_id(&self.container_id)?;
            validate_ifname(&self.ifname)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn required_vars_named() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert_eq!(e.code, 4);
        assert_eq!(e.msg, "required env variables [CNI_NETNS,CNI_PATH] missing");
        let e = env(&[("CNI_COMMAND", "FOO")]).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "unknown CNI_COMMAND: FOO"));
        let ok = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/a:/b"),
        ])
        .unwrap();
        assert!(ok.netns.is_none());
        assert_eq!(ok.path, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
    }

    #[test]
    fn validation() {
        assert_eq!(validate_container_id("").unwrap_err().code, 3);
        assert_eq!(validate_container_id("-x").unwrap_err().code, 4);
        assert!(validate_container_id("abc_1.2-3").is_ok());
        assert_eq!(validate_network_name("a/b").unwrap_err().code, 7);
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "0123456789abcdef"] {
            assert_eq!(validate_ifname(bad).unwrap_err().code, 4, "{bad}");
        }
        assert!(validate_ifname("eth0").is_ok());
    }

    #[test]
    fn cni_args() {
        let a = CniArgs::parse("IP=10.0.0.5;K8S_POD_NAME=x").unwrap();
        assert_eq!(a.get("IP"), Some("10.0.0.5"));
        assert_eq!(a.check_known(&["IP"]).unwrap_err().code, 4);
        let a = CniArgs::parse("IgnoreUnknown=1;IP=10.0.0.5;K8S_POD_NAME=x").unwrap();
        assert!(a.check_known(&["IP"]).is_ok());
        assert!(CniArgs::parse("novalue").is_err());
    }
}
