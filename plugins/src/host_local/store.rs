//! The reference host-local on-disk store, byte-compatible in both directions:
//! `<dir>/<ip>` holding `id\r\nifname` (legacy: just `id`), `<dir>/last_reserved_ip.<set>`,
//! and `<dir>/lock`, the `flock` every host-local (ours or the reference) serializes on.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use twill_common::cni::error::io_err;
use twill_common::cni::CniError;
use twill_common::fsutil::ensure_dir;

const LINE_BREAK: &str = "\r\n";
const LAST_RESERVED: &str = "last_reserved_ip.";

/// One reservation file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    pub container_id: String,
    /// Empty for legacy id-only files.
    pub ifname: String,
}

/// The store of one network, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

/// File name of an IP (the reference's Windows `:`→`_` form does not apply on Linux).
fn file_of(ip: IpAddr) -> String {
    ip.to_string()
}

impl Store {
    /// Opens (creating, 0700) `dir` and takes the exclusive lock on `dir/lock`.
    pub fn open(dir: &Path) -> Result<Store, CniError> {
        ensure_dir(dir, 0o700).map_err(io_err(format!("create {}", dir.display())))?;
        let lock_path = dir.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(format!("open {}", lock_path.display())))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| CniError::internal(format!("flock {}: {e}", lock_path.display())))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Creates the reservation file; `false` when the address is taken.
    pub fn reserve(
        &self,
        ip: IpAddr,
        id: &str,
        ifname: &str,
        set_idx: usize,
    ) -> Result<bool, CniError> {
        let path = self.dir.join(file_of(ip));
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err(format!("create {}", path.display()))(e)),
        };
        let body = format!("{}{LINE_BREAK}{ifname}", id.trim());
        if let Err(e) = f.write_all(body.as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(io_err(format!("write {}", path.display()))(e));
        }
        let last = self.dir.join(format!("{LAST_RESERVED}{set_idx}"));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&last)
            .and_then(|mut f| f.write_all(ip.to_string().as_bytes()))
            .map_err(io_err(format!("write {}", last.display())))?;
        Ok(true)
    }

    pub fn last_reserved(&self, set_idx: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_RESERVED}{set_idx}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every reservation file (skipping `lock`, `last_reserved_ip.*` and anything not named as an IP).
    pub fn list(&self) -> Result<Vec<Reservation>, CniError> {
        let rd = fs::read_dir(&self.dir).map_err(io_err(format!("read {}", self.dir.display())))?;
        let mut out = Vec::new();
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                continue;
            };
            let Ok(data) = fs::read_to_string(ent.path()) else {
                continue;
            };
            let data = data.trim();
            let (id, ifname) = match data.split_once(LINE_BREAK) {
                Some((id, ifn)) => (id.trim(), ifn.trim()),
                None => (data, ""),
            };
            out.push(Reservation {
                ip,
                container_id: id.to_string(),
                ifname: ifname.to_string(),
            });
        }
        Ok(out)
    }

    /// The reservations of `(id, ifname)`, with the legacy id-only fallback of the reference.
    pub fn find(&self, id: &str, ifname: &str) -> Result<Vec<Reservation>, CniError> {
        let all = self.list()?;
        let id = id.trim();
        let exact: Vec<Reservation> = all
            .iter()
            .filter(|r| r.container_id == id && r.ifname == ifname)
            .cloned()
            .collect();
        if !exact.is_empty() {
            return Ok(exact);
        }
        Ok(all
            .into_iter()
            .filter(|r| r.container_id == id && r.ifname.is_empty())
            .collect())
    }

    /// Removes one reservation file; a missing file is fine.
    pub fn release_ip(&self, ip: IpAddr) -> Result<(), CniError> {
        match fs::remove_file(self.dir.join(file_of(ip))) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(format!("release {ip}"))(e)),
            _ => Ok(()),
        }
    }

    /// Releases every reservation of `(id, ifname)`; returns how many.
    pub fn release_by_id(&self, id: &str, ifname: &str) -> Result<usize, CniError> {
        let found = self.find(id, ifname)?;
        for r in &found {
            self.release_ip(r.ip)?;
        }
        Ok(found.len())
    }
}
