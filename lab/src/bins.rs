//! Where the workspace's built binaries are, seen from the running executable (the lab, a
//! bench or a test): the lab finds `twilld` and the plugins next to itself.

use std::path::PathBuf;

/// The cargo profile dir the current executable lives in (`target/debug` or `target/release`).
/// Test executables live one level deeper, in `deps/`. `TWILL_BIN_DIR` overrides it.
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
