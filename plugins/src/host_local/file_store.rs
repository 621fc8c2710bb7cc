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

use super::store::{LockedStore, Reservation, Store};

const LINE_BREAK: &str = "\r\n";
const LAST_RESERVED: &str = "last_reserved_ip.";
const LOCK_FILE: &str = "lock";

/// The store of one network: `<dataDir>/<network name>`.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// The locked store; the `flock` on `dir/lock` is held for as long as this value lives.
pub struct FileGuard<'a> {
    dir: &'a Path,
    _lock: Flock<File>,
}

/// File name of an IP (the reference's Windows `:`→`_` form does not apply on Linux).
fn file_of(ip: IpAddr) -> String {
    ip.to_string()
}

impl FileStore {
    /// Names the store; nothing is touched until `lock`.
    pub fn new(dir: impl Into<PathBuf>) -> FileStore {
        FileStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether anything was ever stored (DEL, GC and STATUS must not create the directory).
    pub fn exists(&self) -> bool {
        self.dir.exists()
    }
}

impl Store for FileStore {
    type Guard<'a> = FileGuard<'a>;

    /// Creates `dir` (0700) when missing and takes the exclusive lock on `dir/lock`.
    fn lock(&self) -> Result<FileGuard<'_>, CniError> {
        let dir = &self.dir;
        ensure_dir(dir, 0o700).map_err(io_err(format!("create {}", dir.display())))?;
        let lock_path = dir.join(LOCK_FILE);
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
        Ok(FileGuard { dir, _lock: lock })
    }
}

impl LockedStore for FileGuard<'_> {
    /// Creates the reservation file (O_EXCL: an existing file means taken).
    fn reserve(
        &mut self,
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

    fn last_reserved(&self, set_idx: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_RESERVED}{set_idx}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every reservation file (skipping `lock`, `last_reserved_ip.*` and anything not named
    /// as an IP).
    fn list(&self) -> Result<Vec<Reservation>, CniError> {
        let rd = fs::read_dir(self.dir).map_err(io_err(format!("read {}", self.dir.display())))?;
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
        // readdir order is the filesystem's: sorted, every caller sees the same order.
        out.sort_by_key(|r| r.ip);
        Ok(out)
    }

    /// Removes one reservation file; a missing file is fine.
    fn release_ip(&mut self, ip: IpAddr) -> Result<(), CniError> {
        match fs::remove_file(self.dir.join(file_of(ip))) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(format!("release {ip}"))(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The layout the reference host-local reads and writes, byte for byte.
    #[test]
    fn writes_and_reads_the_reference_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("net");
        let store = FileStore::new(&dir);
        assert!(!store.exists());
        let mut g = store.lock().unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(g.reserve(ip("10.1.0.5"), " c1 ", "eth0", 1).unwrap());
        assert!(!g.reserve(ip("10.1.0.5"), "c2", "eth0", 1).unwrap());
        assert_eq!(fs::read(dir.join("10.1.0.5")).unwrap(), b"c1\r\neth0");
        assert_eq!(
            fs::metadata(dir.join("10.1.0.5"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_to_string(dir.join("last_reserved_ip.1")).unwrap(),
            "10.1.0.5"
        );
        assert_eq!(g.last_reserved(1), Some(ip("10.1.0.5")));
        assert_eq!(g.last_reserved(0), None);
        assert!(g.reserve(ip("fd00::2"), "c1", "eth0", 0).unwrap());
        assert!(dir.join("fd00::2").exists());
        // Written by the reference (trailing newline) or by an old version (id only).
        fs::write(dir.join("last_reserved_ip.2"), "10.2.0.9\n").unwrap();
        assert_eq!(g.last_reserved(2), Some(ip("10.2.0.9")));
        fs::write(dir.join("10.1.0.3"), "legacy\n").unwrap();
        fs::write(dir.join("not-an-ip"), "c1\r\neth0").unwrap();
        assert_eq!(
            g.list().unwrap(),
            [
                Reservation {
                    ip: ip("10.1.0.3"),
                    container_id: "legacy".into(),
                    ifname: String::new()
                },
                Reservation {
                    ip: ip("10.1.0.5"),
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                },
                Reservation {
                    ip: ip("fd00::2"),
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                },
            ]
        );
        g.release_ip(ip("10.1.0.5")).unwrap();
        g.release_ip(ip("10.1.0.5")).unwrap();
        assert!(!dir.join("10.1.0.5").exists());
        assert!(dir.join(LOCK_FILE).exists());
    }

    /// The guard holds the flock on `dir/lock` (the one the reference takes) until dropped.
    #[test]
    fn guard_holds_the_reference_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(tmp.path());
        let try_lock = || {
            let f = File::open(tmp.path().join(LOCK_FILE)).unwrap();
            // Even a shared lock is refused while an exclusive one is held.
            Flock::lock(f, FlockArg::LockSharedNonblock).is_ok()
        };
        let g = store.lock().unwrap();
        assert!(!try_lock(), "lock must be held while the guard lives");
        drop(g);
        assert!(try_lock(), "lock must be free once the guard is dropped");
    }
}
