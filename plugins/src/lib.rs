//! twill's CNI plugins. Each binary in `src/bin` is a thin `main` over a module here, so the
//! bridge can run its IPAM (twill-host-local) in-process instead of paying a second exec.

pub mod bridge;
pub mod host_local;
pub mod ipnet;
pub mod loopback;
pub mod masq;
pub mod meta;
pub mod nft_rules;
pub mod portmap;
