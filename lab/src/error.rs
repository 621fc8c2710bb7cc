//! The lab's error type: what went wrong, in words an operator can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{cmd} failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A CNI plugin answered with an error (or garbage) on stdout.
    #[error("plugin type=\"{plugin}\" failed ({verb}): {detail}")]
    Plugin {
        plugin: String,
        verb: String,
        code: Option<u64>,
        detail: String,
    },
    /// A CRI call to a containerd failed.
    #[error("CRI {call}: {code:?}: {message}")]
    Cri {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("{0}")]
    Lab(String),
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
