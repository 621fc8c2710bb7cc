//! The CNI error object and the spec's error codes.

use serde::{Deserialize, Serialize};
use serde_json::json;

/// Error codes of the CNI spec (SPEC.md "Error"); 100+ are plugin-specific.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited connectivity.
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
    /// First plugin-specific code: twill's "IP pool exhausted".
    pub const POOL_EXHAUSTED: u32 = 100;
    /// A failure from the kernel, a file or a child process (libcni's ErrInternal).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: printed as `{"cniVersion","code","msg","details"}` on stdout with a
/// non-zero exit status, and parsed back from a delegated plugin's stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.details.is_empty() {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "{}: {}", self.msg, self.details)
        }
    }
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// Code 999: kernel, file or process failures that are no fault of the input.
    pub fn internal(msg: impl Into<String>) -> CniError {
        CniError::new(code::INTERNAL, msg)
    }

    /// Code 7: the network configuration is invalid.
    pub fn invalid_config(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_CONFIG, msg)
    }

    /// Code 6: content could not be decoded.
    pub fn decoding(msg: impl Into<String>) -> CniError {
        CniError::new(code::DECODING_FAILURE, msg)
    }

    /// Code 4: invalid or missing environment variables.
    pub fn invalid_env(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_ENV, msg)
    }

    /// Prefixes the message with context, keeping the code.
    pub fn context(mut self, ctx: impl std::fmt::Display) -> CniError {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// The JSON printed on stdout; `cni_version` is the config's version when known.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut v = json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

/// Wraps an I/O error with context as code 999.
pub fn io_err(ctx: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::internal(format!("{ctx}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = CniError::invalid_config("Invalid Configuration").with_details("too small");
        assert_eq!(
            e.to_json("1.1.0"),
            json!({"cniVersion":"1.1.0","code":7,"msg":"Invalid Configuration","details":"too small"})
        );
        let e = CniError::new(3, "missing containerID");
        assert!(e.to_json("0.4.0").get("details").is_none());
        let back: CniError = serde_json::from_str(r#"{"code":999,"msg":"x"}"#).unwrap();
        assert_eq!(back, CniError::internal("x"));
    }
}
