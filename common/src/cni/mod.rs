//! The CNI protocol (spec 0.1.0 … 1.1.0) for twill's plugins.
//!
//! A plugin implements [`Plugin`] and calls [`run`] from `main`:
//!
//! ```no_run
//! use twill_common::cni::{run, CniError, CniResult, Plugin, Request};
//! struct Mine;
//! impl Plugin for Mine {
//!     fn add(&self, req: &Request) -> Result<CniResult, CniError> {
//!         // req.env: CNI_* (validated); req.conf: NetConf (unknown keys in `extra`);
//!         // req.stdin: the raw config, to pass to a delegate unchanged.
//!         let ipam = twill_common::cni::delegate_add(req.conf.ipam_type(), &req.env.path, &req.stdin, req.conf.version())?;
//!         Ok(ipam)
//!     }
//!     fn del(&self, _req: &Request) -> Result<(), CniError> { Ok(()) }
//!     fn check(&self, _req: &Request) -> Result<(), CniError> { Ok(()) }
//!     fn about(&self) -> String { "mine".into() }
//! }
//! fn main() { run(&Mine) }
//! ```
//!
//! [`run`] does what the reference `skel` does: validates the env (code 4 naming missing
//! variables, 3 for an empty container ID), reads stdin (5), parses the config (6), checks
//! `cniVersion` against [`Plugin::versions`] (1; CHECK needs ≥ 0.4.0, STATUS/GC ≥ 1.1.0),
//! validates the network name (7) and ifname (4), answers VERSION itself, prints an ADD result
//! in the config's version, and prints any error as JSON on stdout with exit status 1.
//! [`invoke`] executes delegates from `CNI_PATH` with the same env and returns their
//! parsed result or error.

pub mod conf;
pub mod env;
pub mod error;
pub mod invoke;
pub mod result;
pub mod skel;
pub mod version;

pub use conf::{Attachment, NetConf};
pub use env::{CniArgs, Command, Env};
pub use error::{code, io_err, CniError};
pub use invoke::{delegate, delegate_add, exec_plugin, find_in_path};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use skel::{dispatch, run, Outcome, Plugin, Request};
pub use version::{Version, CURRENT_VERSION, SUPPORTED_VERSIONS};
