//! `twilld install-cni`: copies the CNI plugins shipped in the image into the node's CNI bin
//! dir (the DaemonSet's init container).
//!
//! The container runtime may exec a plugin at any moment, including while a previous version
//! is running, so every binary goes temp file in the destination dir → fsync → chmod 0755 →
//! rename. Writing in place would fail with ETXTBSY while the old binary runs, and would let
//! a concurrent exec see a half-written file.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Args;

use crate::error::{Error, Result};

/// twill's own plugins: always installed, replaced when the image carries another version.
pub const PLUGINS: [&str; 5] = [
    "twill",
    "twill-bridge",
    "twill-host-local",
    "twill-loopback",
    "twill-portmap",
];

/// Reference plugins installed only when the node has none, as `(name on the node, file in the
/// image)`; never replaced (the node's package manager or another add-on owns them).
/// `loopback`: containerd's CRI attaches a `loopback` network to every sandbox whatever the
/// conflist says, so a node holding only twill's plugins could not start a pod without it;
/// `twill-loopback` is a drop-in replacement of the reference plugin.
/// The reference `portmap` is no longer shipped: twilld chains `twill-portmap`, and a node's own
/// `portmap` is left where it is (unused by twill's conflist).
pub const FALLBACK_PLUGINS: [(&str, &str); 1] = [("loopback", "twill-loopback")];

const BIN_MODE: u32 = 0o755;
/// Temp files of ours older than this are leftovers of a crashed run, not a concurrent one.
const STALE_TEMP_AGE: Duration = Duration::from_secs(600);
use twill_common::fsutil::TEMP_MARK;

#[derive(Debug, Clone, Args)]
pub struct InstallCniArgs {
    /// Directory (inside the image) holding the plugin binaries to install.
    #[arg(long, env = "TWILLD_SRC_DIR", default_value = "/opt/twill/bin")]
    pub src_dir: PathBuf,
    /// The node's CNI plugin directory (a hostPath mount).
    #[arg(long, env = "TWILLD_DEST_DIR", default_value = "/opt/cni/bin")]
    pub dest_dir: PathBuf,
}

fn io_err(op: &str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    Error::io(format!("{op} {}", path.display()))
}

/// What happened to one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written (new or replaced).
    Installed,
    /// Already identical; left alone (its mode fixed if needed).
    Unchanged,
    /// A fallback plugin the node already has; left alone.
    KeptNodeCopy,
    /// A fallback plugin the image does not ship.
    NotShipped,
}

/// Installs every plugin and logs what it did. Fails on the first error, leaving
/// already-installed plugins in place (each one is complete on its own).
pub fn run(args: &InstallCniArgs) -> Result<()> {
    for name in PLUGINS {
        if !args.src_dir.join(name).is_file() {
            return Err(Error::CniPlugins {
                dir: args.src_dir.clone(),
                reason: format!("plugin {name} is missing from the image"),
            });
        }
    }
    if !args.dest_dir.is_dir() {
        fs::create_dir_all(&args.dest_dir).map_err(io_err("create dir", &args.dest_dir))?;
        fs::set_permissions(&args.dest_dir, fs::Permissions::from_mode(BIN_MODE))
            .map_err(io_err("chmod", &args.dest_dir))?;
    }
    remove_stale_temps(&args.dest_dir);

    for name in PLUGINS {
        let outcome = install_one(&args.src_dir.join(name), &args.dest_dir, name)?;
        tracing::info!(plugin = name, ?outcome, dest = %args.dest_dir.display(), "install-cni");
    }
    for (name, src_name) in FALLBACK_PLUGINS {
        let src = args.src_dir.join(src_name);
        let dest = args.dest_dir.join(name);
        let outcome = if !src.is_file() {
            Outcome::NotShipped
        } else if fs::symlink_metadata(&dest).is_ok() {
            // Any entry counts, even a dangling symlink: it is the node's, not ours to replace.
            Outcome::KeptNodeCopy
        } else {
            install_one(&src, &args.dest_dir, name)?
        };
        tracing::info!(plugin = name, from = src_name, ?outcome, dest = %args.dest_dir.display(), "install-cni");
    }
    Ok(())
}

/// Installs `src` as `dest_dir/name` unless an identical file is already there.
pub fn install_one(src: &Path, dest_dir: &Path, name: &str) -> Result<Outcome> {
    let dest = dest_dir.join(name);
    if same_contents(src, &dest).map_err(io_err("compare", &dest))? {
        let mode = fs::metadata(&dest)
            .map_err(io_err("stat", &dest))?
            .permissions()
            .mode();
        if mode & 0o7777 != BIN_MODE {
            // chmod of the existing inode is atomic; no need to rewrite it.
            fs::set_permissions(&dest, fs::Permissions::from_mode(BIN_MODE))
                .map_err(io_err("chmod", &dest))?;
        }
        return Ok(Outcome::Unchanged);
    }

    let mut input = File::open(src).map_err(io_err("open", src))?;
    twill_common::fsutil::atomic_write_with(&dest, BIN_MODE, |out| {
        io::copy(&mut input, out).map(drop)
    })
    .map_err(io_err("install", &dest))?;
    Ok(Outcome::Installed)
}

fn same_contents(src: &Path, dest: &Path) -> io::Result<bool> {
    let dmeta = match fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !dmeta.is_file() || dmeta.len() != fs::metadata(src)?.len() {
        return Ok(false);
    }
    let (mut a, mut b) = (File::open(src)?, File::open(dest)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut a, &mut ba)?;
        let m = read_full(&mut b, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Removes our temp files left by a run that died between create and rename. Young ones may
/// belong to a concurrent install (a rolling update overlapping pods) and are kept.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') || !name.contains(TEMP_MARK) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn write(p: &Path, data: &[u8]) {
        fs::write(p, data).unwrap();
    }

    #[test]
    fn installs_skips_identical_and_keeps_node_fallbacks() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        for name in PLUGINS {
            write(&src.path().join(name), name.as_bytes());
        }
        write(&dest.path().join("portmap"), b"node portmap");
        let args = InstallCniArgs {
            src_dir: src.path().into(),
            dest_dir: dest.path().into(),
        };
        run(&args).unwrap();
        let ino = fs::metadata(dest.path().join("twill")).unwrap().ino();
        for name in PLUGINS {
            let p = dest.path().join(name);
            assert_eq!(fs::read(&p).unwrap(), name.as_bytes());
            assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o755);
        }
        assert_eq!(
            fs::read(dest.path().join("portmap")).unwrap(),
            b"node portmap"
        );
        // No loopback on the node: twill-loopback is installed under that name.
        assert_eq!(
            fs::read(dest.path().join("loopback")).unwrap(),
            b"twill-loopback"
        );
        write(&dest.path().join("loopback"), b"node loopback");
        write(&src.path().join("twill-loopback"), b"new twill-loopback");

        run(&args).unwrap();
        assert_eq!(
            fs::read(dest.path().join("loopback")).unwrap(),
            b"node loopback",
            "an existing loopback must never be replaced"
        );
        write(&src.path().join("twill-loopback"), b"twill-loopback");
        run(&args).unwrap();
        assert_eq!(
            fs::metadata(dest.path().join("twill")).unwrap().ino(),
            ino,
            "identical file rewritten"
        );
        assert_eq!(
            install_one(&src.path().join("twill"), dest.path(), "twill").unwrap(),
            Outcome::Unchanged
        );
        write(&src.path().join("twill"), b"new twill");
        assert_eq!(
            install_one(&src.path().join("twill"), dest.path(), "twill").unwrap(),
            Outcome::Installed
        );
        assert_eq!(fs::read(dest.path().join("twill")).unwrap(), b"new twill");
        let leftovers: Vec<_> = fs::read_dir(dest.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(TEMP_MARK))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }

    #[test]
    fn missing_plugin_fails_before_touching_dest() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        write(&src.path().join("twill"), b"x");
        let err = run(&InstallCniArgs {
            src_dir: src.path().into(),
            dest_dir: dest.path().into(),
        })
        .unwrap_err();
        assert!(
            matches!(err, Error::CniPlugins { ref reason, .. } if reason.contains("twill-bridge"))
        );
        assert_eq!(fs::read_dir(dest.path()).unwrap().count(), 0);
    }
}
