//! The per-plugin network configuration a runtime sends on stdin.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::CniError;
use super::result::{CniResult, Dns};

/// One GC attachment entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

/// The network config of one plugin invocation. Keys this type does not name are kept in
/// `extra` (so re-serializing gives the runtime's config back, e.g. for delegation).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetConf {
    /// Missing or empty means `0.1.0` (libcni's decoder).
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Map<String, Value>>,
    /// The IPAM section, `{"type": …, …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// Kept raw: its shape depends on its own `cniVersion` (or the config's); see [`NetConf::prev_result`].
    #[serde(
        rename = "prevResult",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prev_result: Option<Value>,
    #[serde(
        rename = "runtimeConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub runtime_config: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Map<String, Value>>,
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Pre-rename spelling that libcni still sends alongside.
    #[serde(
        rename = "cni.dev/attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_attachments: Option<Vec<Attachment>>,
    /// Every other key (plugin-specific fields such as `bridge`, `ipMasq`, `delegate`).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl NetConf {
    /// Parses stdin. Malformed JSON is code 6.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        serde_json::from_slice(stdin)
            .map_err(|e| CniError::decoding(format!("failed to parse network config: {e}")))
    }

    /// The effective version (`"0.1.0"` when absent).
    pub fn version(&self) -> &str {
        if self.cni_version.is_empty() {
            "0.1.0"
        } else {
            &self.cni_version
        }
    }

    /// Parses `prevResult` in its own version, or the config's when it carries none.
    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        match &self.prev_result {
            None | Some(Value::Null) => Ok(None),
            Some(v) => CniResult::from_value(v, self.version()).map(Some),
        }
    }

    /// `ipam.type`, empty when there is no IPAM section.
    pub fn ipam_type(&self) -> &str {
        self.ipam
            .as_ref()
            .and_then(|m| m.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The GC keep-list: `cni.dev/valid-attachments`, else the legacy key. `None` (no key at all)
    /// means "unknown", never "nothing is valid".
    pub fn gc_attachments(&self) -> Option<&[Attachment]> {
        self.valid_attachments
            .as_deref()
            .or(self.legacy_attachments.as_deref())
    }

    /// `runtimeConfig.<key>`.
    pub fn runtime(&self, key: &str) -> Option<&Value> {
        self.runtime_config.as_ref().and_then(|m| m.get(key))
    }

    /// `args.cni.<key>` (the args convention).
    pub fn cni_arg(&self, key: &str) -> Option<&Value> {
        self.args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get(key))
    }

    /// Checks on ADD what the reference plugins get from decoding `prevResult` into a typed
    /// result: a value other than an object (or null) is an invalid config (code 7); an object
    /// must parse as a result of its version (code 6 or 1 from the parser).
    pub fn check_prev_result(&self) -> Result<(), CniError> {
        match &self.prev_result {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Object(_)) => self.prev_result().map(|_| ()),
            Some(other) => Err(CniError::invalid_config(format!(
                "invalid network config: prevResult must be an object, got {other}"
            ))),
        }
    }

    /// `runtimeConfig.<key>` as a string; absent or null is `None`, another type is code 7.
    pub fn runtime_str(&self, key: &str) -> Result<Option<&str>, CniError> {
        typed_str(self.runtime(key), &format!("runtimeConfig.{key}"))
    }

    /// `args.cni.<key>` as a string; absent or null is `None`, another type is code 7.
    pub fn cni_arg_str(&self, key: &str) -> Result<Option<&str>, CniError> {
        typed_str(self.cni_arg(key), &format!("args.cni.{key}"))
    }

    /// `runtimeConfig.<key>` as a list of strings; absent or null is empty, anything else
    /// (a string, a number, a list holding a non-string) is code 7, as the reference's decoder.
    pub fn runtime_strs(&self, key: &str) -> Result<Vec<&str>, CniError> {
        typed_strs(self.runtime(key), &format!("runtimeConfig.{key}"))
    }

    /// `args.cni.<key>` as a list of strings (see [`NetConf::runtime_strs`]).
    pub fn cni_arg_strs(&self, key: &str) -> Result<Vec<&str>, CniError> {
        typed_strs(self.cni_arg(key), &format!("args.cni.{key}"))
    }

    /// Decodes the whole config (named and extra keys) into a plugin's own config type;
    /// type mismatches are code 7 naming the field.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        let v = serde_json::to_value(self)
            .map_err(|e| CniError::internal(format!("encode config: {e}")))?;
        serde_json::from_value(v)
            .map_err(|e| CniError::invalid_config(format!("invalid network config: {e}")))
    }
}

fn wrong_type(what: &str, want: &str, got: &Value) -> CniError {
    CniError::invalid_config(format!(
        "invalid network config: {what} must be {want}, got {got}"
    ))
}

fn typed_str<'a>(v: Option<&'a Value>, what: &str) -> Result<Option<&'a str>, CniError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(what, "a string", other)),
    }
}

fn typed_strs<'a>(v: Option<&'a Value>, what: &str) -> Result<Vec<&'a str>, CniError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| wrong_type(what, "a list of strings", x))
            })
            .collect(),
        Some(other) => Err(wrong_type(what, "a list of strings", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_unknown_keys_and_reserved_ones() {
        let raw = json!({
            "cniVersion":"1.1.0","name":"n","type":"twill-bridge","bridge":"cni0","ipMasq":true,
            "capabilities":{"portMappings":true},"runtimeConfig":{"portMappings":[]},
            "args":{"cni":{"ips":["10.0.0.9"]}},
            "ipam":{"type":"twill-host-local","subnet":"10.0.0.0/24"},
            "prevResult":{"ips":[{"address":"10.0.0.2/24"}]},
            "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]
        });
        let c = NetConf::parse(raw.to_string().as_bytes()).unwrap();
        assert_eq!(c.extra["bridge"], "cni0");
        assert_eq!(c.ipam_type(), "twill-host-local");
        assert_eq!(c.cni_arg("ips"), Some(&json!(["10.0.0.9"])));
        assert_eq!(c.gc_attachments().unwrap()[0].container_id, "c1");
        assert_eq!(c.prev_result().unwrap().unwrap().ips.len(), 1);
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back, raw);
        assert_eq!(NetConf::parse(b"{nope").unwrap_err().code, 6);
        assert_eq!(NetConf::parse(b"{}").unwrap().version(), "0.1.0");
        assert!(NetConf::parse(b"{}").unwrap().gc_attachments().is_none());
    }

    #[test]
    fn wrong_typed_runtime_inputs_are_invalid_config() {
        let c = |v: Value| NetConf::parse(v.to_string().as_bytes()).unwrap();
        let ok = c(
            json!({"runtimeConfig":{"ips":["10.0.0.2/24"],"mac":"02:00:00:00:00:01"},
            "args":{"cni":{"ips":null}},"prevResult":{"ips":[]}}),
        );
        assert_eq!(ok.runtime_strs("ips").unwrap(), ["10.0.0.2/24"]);
        assert_eq!(ok.runtime_str("mac").unwrap(), Some("02:00:00:00:00:01"));
        assert!(ok.cni_arg_strs("ips").unwrap().is_empty());
        assert_eq!(ok.cni_arg_str("mac").unwrap(), None);
        ok.check_prev_result().unwrap();
        let bad = c(json!({"runtimeConfig":{"ips":"10.0.0.2","mac":5},
            "args":{"cni":{"ips":[1],"mac":["x"]}},"prevResult":"x"}));
        assert_eq!(bad.runtime_strs("ips").unwrap_err().code, 7);
        assert_eq!(bad.runtime_str("mac").unwrap_err().code, 7);
        assert_eq!(bad.cni_arg_strs("ips").unwrap_err().code, 7);
        assert_eq!(bad.cni_arg_str("mac").unwrap_err().code, 7);
        let e = bad.check_prev_result().unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("prevResult"), "{e}");
    }
}
