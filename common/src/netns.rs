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
        // Entering our own namespace is a no-op that must succeed (needs CAP_SYS_ADMIN).
        if nix::unistd::Uid::effective().is_root() {
            let me = open(Path::new("/proc/self/ns/net")).unwrap();
            assert_eq!(run_in(Some(me), || 7).unwrap(), 7);
        }
    }
}
