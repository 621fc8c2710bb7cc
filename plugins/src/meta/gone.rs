//! Whether an attachment is provably gone, for a DEL whose saved config is unreadable:
//! its netns no longer exists and the IPAM store holds no address of the container.

use std::path::PathBuf;

use twill_common::cni::{CniError, Request};
use twill_common::netns;

use crate::host_local::config::DEFAULT_DATA_DIR;
use crate::host_local::file_store::FileStore;
use crate::host_local::store::{LockedStore, Store};

use super::render::DEFAULT_IPAM;

/// The verdict; `No` carries the reason, for the error message.
#[derive(Debug, PartialEq, Eq)]
pub enum Gone {
    Yes,
    No(String),
}

/// IPAM types whose store twill can read (twill-host-local keeps the reference layout).
fn readable_ipam(t: &str) -> bool {
    matches!(t, "twill-host-local" | "host-local")
}

pub fn attachment_gone(req: &Request) -> Result<Gone, CniError> {
    let Some(p) = &req.env.netns else {
        return Ok(Gone::No(
            "no CNI_NETNS given, so the pod's netns cannot be shown gone".into(),
        ));
    };
    let live = netns::open_if_live(p)
        .map_err(|e| CniError::internal(format!("open netns {}: {e}", p.display())))?;
    if live.is_some() {
        return Ok(Gone::No(format!("netns {} still exists", p.display())));
    }
    let ipam = req.conf.ipam.clone().unwrap_or_default();
    let ipam_type = match req.conf.ipam_type() {
        "" => DEFAULT_IPAM,
        t => t,
    };
    if !readable_ipam(ipam_type) {
        return Ok(Gone::No(format!(
            "IPAM {ipam_type:?} keeps its reservations where twill cannot check them"
        )));
    }
    let data_dir = ipam
        .get("dataDir")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_DATA_DIR);
    let dir = PathBuf::from(data_dir).join(&req.conf.name);
    if !dir.is_dir() {
        return Ok(Gone::Yes);
    }
    let id = req.env.container_id.trim();
    let held: Vec<String> = FileStore::new(&dir)
        .lock()?
        .list()?
        .into_iter()
        .filter(|r| r.container_id == id)
        .map(|r| r.ip.to_string())
        .collect();
    if held.is_empty() {
        Ok(Gone::Yes)
    } else {
        Ok(Gone::No(format!(
            "{} still holds {} for it",
            dir.display(),
            held.join(", ")
        )))
    }
}
