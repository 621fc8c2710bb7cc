//! Locating the workspace's built binaries from a test or bench executable.

use std::path::PathBuf;

/// The cargo profile dir the current executable lives in (`target/debug` or `target/release`).
/// Test executables live one level deeper, in `deps/`.
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TWILL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary (`twilld`, `twill-bridge`, ...). Panics with a hint when missing,
/// since every test depends on `cargo build --workspace --bins` having run first.
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
