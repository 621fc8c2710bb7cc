//! Running commands (never through a shell) and checking their outcome.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Runs `argv`, panicking with its output on a non-zero exit. Returns stdout.
pub fn run(argv: &[&str]) -> String {
    let out = output(argv);
    assert!(
        out.status.success(),
        "{:?} failed ({}): {}{}",
        argv,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `argv` and returns its output whatever the exit status.
pub fn output(argv: &[&str]) -> Output {
    Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", argv))
}

/// Runs `argv` with `stdin` fed in and extra env; returns the output whatever the status.
pub fn run_with_input(argv: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", argv));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// Runs `argv` inside the named netns (`ip netns exec NS ...`), panicking on failure.
pub fn run_in(ns: &str, argv: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(argv);
    run(&full)
}

/// Like [`run_in`] but returns the output whatever the status.
pub fn output_in(ns: &str, argv: &[&str]) -> Output {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(argv);
    output(&full)
}
