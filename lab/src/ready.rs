//! Node readiness from the daemons' own signal: the CNI config appearing in a node's conf dir,
//! seen through one inotify instance watching every conf dir. The lab reacts to each file as
//! it lands instead of re-reading every pending node's dir on a timer (O(N) per tick, O(N²)
//! for a whole start-up). Uses one inotify instance (fs.inotify.max_user_instances is 128 by
//! default, per user) and one watch per node (max_user_watches is far larger).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

pub struct ConfWatch {
    fd: OwnedFd,
    /// watch descriptor → caller's key (node index into its list).
    wds: HashMap<i32, usize>,
}

impl ConfWatch {
    pub fn new() -> Result<ConfWatch> {
        // SAFETY: inotify_init1(2); the fd is owned right away.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if raw < 0 {
            return Err(Error::Lab(format!(
                "inotify_init1: {} (fs.inotify.max_user_instances?)",
                std::io::Error::last_os_error()
            )));
        }
        Ok(ConfWatch {
            // SAFETY: raw is a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            wds: HashMap::new(),
        })
    }

    /// Watches `dir` (which must exist) for files created or renamed into it, as `key`.
    pub fn add(&mut self, dir: &Path, key: usize) -> Result<()> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| Error::Lab(format!("{} contains NUL", dir.display())))?;
        let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE;
        // SAFETY: c is a valid C string for the duration of the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(Error::Lab(format!(
                "inotify_add_watch {}: {} (fs.inotify.max_user_watches?)",
                dir.display(),
                std::io::Error::last_os_error()
            )));
        }
        self.wds.insert(wd, key);
        Ok(())
    }

    /// Waits up to `timeout` for events; returns the keys of dirs that changed (deduplicated).
    pub fn wait(&mut self, timeout: Duration) -> Vec<usize> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one pollfd we own.
        if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
            return Vec::new();
        }
        let mut keys = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: read(2) into a buffer we own, its length passed.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            let n = n as usize;
            // struct inotify_event: wd i32, mask u32, cookie u32, len u32, name[len].
            while off + 16 <= n {
                let wd = i32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]);
                let len = u32::from_ne_bytes([
                    buf[off + 12],
                    buf[off + 13],
                    buf[off + 14],
                    buf[off + 15],
                ]) as usize;
                if let Some(k) = self.wds.get(&wd) {
                    keys.push(*k);
                }
                off += 16 + len;
            }
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_landing_in_a_watched_dir_names_its_key() {
        let root = std::env::temp_dir().join(format!("twill-lab-ready-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let mut w = ConfWatch::new().unwrap();
        w.add(&a, 7).unwrap();
        w.add(&b, 9).unwrap();
        assert!(w.wait(Duration::from_millis(10)).is_empty());
        std::fs::write(b.join("x.tmp"), "{}").unwrap();
        std::fs::rename(b.join("x.tmp"), b.join("10-twill.conflist")).unwrap();
        let got = w.wait(Duration::from_secs(5));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(got, vec![9]);
    }
}
