//! Network namespaces: opening `/run/netns/...` paths and running work inside one.
//!
//! `setns` changes only the calling thread, so work inside a namespace runs on a
//! short-lived thread of its own that dies afterwards; shared runtimes are never moved.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// Opens a netns file (e.g. `CNI_NETNS`). `NotFound` means the namespace is gone.
pub fn open(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// Whether `f` is a namespace file (nsfs). A netns path whose namespace was unmounted is
/// left as an empty regular file; such a path means "the namespace is gone".
pub fn is_netns(f: &File) -> bool {
    nix::sys::statfs::fstatfs(f)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Opens `path` if it is a live namespace; `Ok(None)` when it is missing or not a namespace.
pub fn open_if_live(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) if is_netns(&f) => Ok(Some(f)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Moves the calling thread into `ns`. Only for threads this process owns and discards.
pub fn enter(ns: impl AsFd) -> io::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` on a fresh thread inside `ns` (or in the current namespace when `None`)
/// and returns its value. The thread ends with `f`, taking the namespace switch with it.
pub fn run_in<T: Send + 'static>(
    ns: Option<File>,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    std::thread::spawn(move || -> io::Result<T> {
        if let Some(ns) = ns {
            enter(&ns)?;
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("netns worker thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_in_current_namespace_and_reports_missing_paths() {
        assert_eq!(run_in(None, || 41 + 1).unwrap(), 42);
        let e = open(Path::new("/run/netns/twill-does-not-exist")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(open_if_live(Path::new("/run/netns/twill-does-not-exist"))
            .unwrap()
            .is_none());
        // A plain file (what an unmounted netns path leaves behind) is not a live namespace.
        let plain = std::env::temp_dir().join(format!("twill-netns-plain-{}", std::process::id()));
        std::fs::write(&plain, b"").unwrap();
        assert!(open_if_live(&plain).unwrap().is_none());
        std::fs::remove_file(&plain).unwrap();
        assert!(open_if_live(Path::new("/proc/self/ns/net"))
            .unwrap()
            .is_some());
    }

    /// Entering our own namespace is a no-op that must succeed (needs CAP_SYS_ADMIN).
    #[test]
    #[ignore = "needs root: scripts/test.sh root"]
    fn entering_the_own_namespace_works() {
        let me = open(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(run_in(Some(me), || 7).unwrap(), 7);
    }
}
