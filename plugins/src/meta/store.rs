//! Saved delegate configs: `<dataDir>/<containerID>`, file 0600 in a 0700 dir (the flannel
//! plugin's layout). ADD saves before delegating, so a DEL after a crash can still undo it.

use std::io;
use std::path::{Path, PathBuf};

use twill_common::cni::error::io_err;
use twill_common::cni::CniError;
use twill_common::fsutil::{atomic_write, ensure_dir};

pub fn path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// Saves atomically (temp file, fsync, rename, dir fsync).
pub fn save(data_dir: &Path, container_id: &str, bytes: &[u8]) -> Result<(), CniError> {
    ensure_dir(data_dir, 0o700).map_err(io_err(format!("create {}", data_dir.display())))?;
    let p = path(data_dir, container_id);
    atomic_write(&p, bytes, 0o600).map_err(io_err(format!("write {}", p.display())))
}

/// The saved config, `None` if there is none.
pub fn load(data_dir: &Path, container_id: &str) -> Result<Option<Vec<u8>>, CniError> {
    let p = path(data_dir, container_id);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("read {}", p.display()))(e)),
    }
}

pub fn remove(data_dir: &Path, container_id: &str) -> Result<(), CniError> {
    let p = path(data_dir, container_id);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("remove {}", p.display()))(e)),
    }
}

/// Container IDs with a saved config (temp files of an interrupted write are skipped).
pub fn list(data_dir: &Path) -> Result<Vec<String>, CniError> {
    let rd = match std::fs::read_dir(data_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("read {}", data_dir.display()))(e)),
    };
    let mut ids: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    ids.sort();
    Ok(ids)
}
