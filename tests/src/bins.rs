//! Locating the workspace's built binaries from a test or bench executable.

use std::path::PathBuf;

/// The cargo profile dir the current executable lives in (`target/debug` or `target/release`);
/// the lab's rule, so tests, benches and `twill-lab` agree on it.
pub use twill_lab::bins::target_dir;

/// Path of a workspace binary (`twilld`, `twill-bridge`, `twill-lab`, ...). Panics with a hint
/// when missing, since every test depends on `cargo build --workspace --bins` having run first
/// (`cargo test -p twill-tests` builds no binary of the other packages).
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Directory of Debian's reference CNI plugins.
pub const REFERENCE_CNI_DIR: &str = "/usr/lib/cni";
