//! Small file helpers: atomic writes with explicit modes, private directories.
//!
//! Runtimes watch config dirs with fsnotify and ignore Create/Chmod, and the kubelet may
//! exec a binary at any moment, so everything twill publishes goes temp file → fsync → rename.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Creates `dir` (and missing parents) with `mode`. Only directories created here get `mode`:
/// an existing directory keeps the mode its owner chose (an operator's 1777 or 0755 is theirs).
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match DirBuilder::new().mode(mode).create(dir) {
        // The umask may have narrowed the mode given to mkdir(); this dir is ours to set.
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if fs::metadata(dir)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", dir.display()),
                ))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => ensure_dir(parent, mode)?,
                None => return Err(e),
            }
            // Another process may create `dir` between the parent and this call: theirs then.
            ensure_dir_leaf(dir, mode)
        }
        Err(e) => Err(e),
    }
}

fn ensure_dir_leaf(dir: &Path, mode: u32) -> io::Result<()> {
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Marks twill's temp files (`.<name>.twill-tmp.<pid>.<n>.<random>`), so a sweep can find the
/// ones a killed writer left behind.
pub const TEMP_MARK: &str = ".twill-tmp.";

/// A temp name no other call (in this or another process) uses: pid, a per-process counter
/// and random bits. Opened with O_EXCL anyway, so a file or symlink planted there is refused.
fn temp_name(name: &std::ffi::OsStr) -> std::ffi::OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        "{TEMP_MARK}{}.{}.{:016x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u64>()
    ));
    tmp
}

/// Writes `data` to `path` atomically: a fresh temp file (O_EXCL) in the same dir with `mode`,
/// fsync, rename over `path`, fsync of the dir. Readers see the old or the new file, never a part.
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    atomic_write_with(path, mode, |f| f.write_all(data))
}

/// [`atomic_write`] with the content written by `fill` (e.g. a copy from another file). The
/// temp file is closed before the rename: exec of a binary still open for writing fails with
/// ETXTBSY, so a plugin installed this way is runnable the moment it appears.
pub fn atomic_write_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut attempt = 0;
    let (tmp, mut f) = loop {
        let tmp = dir.join(temp_name(name));
        // create_new = O_CREAT|O_EXCL: never opens an existing file and never follows a symlink.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let written = (|| {
        // The umask may have narrowed the mode given to open().
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        fill(&mut f)?;
        f.sync_all()
    })();
    drop(f);
    let result = written.and_then(|()| {
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        ensure_dir(&dir, 0o700).unwrap();
        assert_eq!(mode_of(&dir), 0o700);
        let p = dir.join("f");
        atomic_write(&p, b"one", 0o600).unwrap();
        atomic_write(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p) & 0o777, 0o600);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left behind"
        );
    }

    #[test]
    fn existing_dirs_keep_their_mode_new_ones_get_it() {
        let tmp = tempfile::tempdir().unwrap();
        for m in [0o755, 0o1777, 0o750] {
            let d = tmp.path().join(format!("pre{m:o}"));
            fs::create_dir(&d).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(m)).unwrap();
            ensure_dir(&d, 0o700).unwrap();
            assert_eq!(mode_of(&d), m, "an existing dir was chmod-ed");
        }
        // Fresh dirs, parents included, get the mode asked for whatever the umask.
        let deep = tmp.path().join("a/b/c");
        ensure_dir(&deep, 0o700).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode_of(&tmp.path().join(d)), 0o700, "{d}");
        }
        // Under an existing 1777 parent only the new child is 0700.
        let shared = tmp.path().join("pre1777/child");
        ensure_dir(&shared, 0o700).unwrap();
        assert_eq!(mode_of(&shared), 0o700);
        assert_eq!(mode_of(shared.parent().unwrap()), 0o1777);
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(ensure_dir(&file, 0o700).is_err(), "a file is not a dir");
    }

    #[test]
    fn planted_symlink_at_the_old_temp_name_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let p = tmp.path().join("conf");
        // The name the old code used for every write of this process.
        let planted = tmp.path().join(format!(".conf.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        atomic_write(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious", "symlink followed");
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert!(!fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
    }

    #[test]
    fn concurrent_writes_of_one_path_all_succeed() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("shared");
        std::thread::scope(|s| {
            for t in 0..8 {
                let p = &p;
                s.spawn(move || {
                    for i in 0..50 {
                        atomic_write(p, format!("{t}-{i}").as_bytes(), 0o600)
                            .expect("concurrent atomic_write");
                    }
                });
            }
        });
        assert_eq!(
            fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "temp files left"
        );
    }
}
