//! The daemon's single error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("invalid network config: {0}")]
    Config(String),
    #[error("out of subnets: every subnet between SubnetMin and SubnetMax is leased or reserved")]
    OutOfSubnets,
    #[error("lost the race for subnets {0} times in a row")]
    RaceRetriesExhausted(u32),
    #[error("netlink: {0}")]
    Netlink(#[from] twill_common::netlink::NlError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("interface: {0}")]
    Iface(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error("{0}")]
    SubnetEnv(#[from] twill_common::subnet_env::SubnetEnvError),
    #[error("CNI plugins not ready in {dir}: {reason}")]
    CniPlugins { dir: PathBuf, reason: String },
    #[error("nftables: {0}")]
    Nft(String),
    #[error("iptables: {0}")]
    Iptables(String),
    #[error(
        "{key} already holds a different network config:\n  stored: {stored}\n  wanted: {wanted}\n\
         (use --force to replace it)"
    )]
    ConfigExists {
        key: String,
        stored: String,
        wanted: String,
    },
}

impl Error {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
