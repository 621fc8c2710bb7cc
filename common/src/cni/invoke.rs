//! Executing another plugin (a delegate such as an IPAM plugin) found in `CNI_PATH`.
//!
//! The child inherits this process's environment (so the same `CNI_*` values), with
//! `CNI_COMMAND` replaced by the verb asked for, and gets the given bytes on stdin.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::Duration;

use super::env::Command;
use super::error::CniError;
use super::result::CniResult;

/// Finds `plugin` (a bare name) as a regular file in one of `dirs`.
pub fn find_in_path(plugin: &str, dirs: &[PathBuf]) -> Result<PathBuf, CniError> {
    if plugin.is_empty() || plugin.contains('/') {
        return Err(CniError::invalid_config(format!(
            "invalid plugin name {plugin:?}"
        )));
    }
    dirs.iter()
        .map(|d| d.join(plugin))
        .find(|p| p.metadata().map(|m| m.is_file()).unwrap_or(false))
        .ok_or_else(|| {
            CniError::internal(format!("failed to find plugin {plugin:?} in path {dirs:?}"))
        })
}

/// Runs `bin` with verb `command`, `stdin`, the inherited env plus `env` overrides.
/// Returns stdout on success; a non-zero exit becomes the error the child printed
/// (or its stderr wrapped as code 999 when stdout holds no error JSON).
pub fn exec_plugin(
    bin: &Path,
    command: Command,
    stdin: &[u8],
    env: &[(&str, &str)],
) -> Result<Vec<u8>, CniError> {
    let mut attempt = 0;
    let mut child = loop {
        let spawned = Proc::new(bin)
            .env("CNI_COMMAND", command.as_str())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(c) => break c,
            // A binary being replaced right now (libcni retries the same way).
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(CniError::internal(format!("exec {}: {e}", bin.display()))),
        }
    };
    // stdin is written from a second thread while this one drains stdout and stderr: a child
    // that prints more than a pipe buffer before reading its stdin would otherwise deadlock.
    let out = std::thread::scope(|s| {
        if let Some(mut si) = child.stdin.take() {
            // A child that exits without reading stdin closes the pipe: not our error.
            s.spawn(move || {
                let _ = si.write_all(stdin);
            });
        }
        child.wait_with_output()
    })
    .map_err(|e| CniError::internal(format!("wait {}: {e}", bin.display())))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    if let Ok(e) = serde_json::from_slice::<CniError>(&out.stdout) {
        return Err(e);
    }
    Err(CniError::internal(format!(
        "netplugin failed: {:?}",
        String::from_utf8_lossy(if out.stdout.is_empty() {
            &out.stderr
        } else {
            &out.stdout
        })
        .trim()
    )))
}

/// Delegated ADD of `plugin` from `dirs`; the result is parsed in its own version
/// (`conf_version` when it carries none).
pub fn delegate_add(
    plugin: &str,
    dirs: &[PathBuf],
    stdin: &[u8],
    conf_version: &str,
) -> Result<CniResult, CniError> {
    let bin = find_in_path(plugin, dirs)?;
    let out = exec_plugin(&bin, Command::Add, stdin, &[])?;
    CniResult::from_slice(&out, conf_version)
}

/// Delegated DEL, CHECK, STATUS or GC (no result on success).
pub fn delegate(
    plugin: &str,
    command: Command,
    dirs: &[PathBuf],
    stdin: &[u8],
) -> Result<(), CniError> {
    let bin = find_in_path(plugin, dirs)?;
    exec_plugin(&bin, command, stdin, &[]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_plugin_and_bad_names() {
        assert_eq!(find_in_path("a/b", &[]).unwrap_err().code, 7);
        assert_eq!(
            find_in_path("nope-twill", &[PathBuf::from("/usr/bin")])
                .unwrap_err()
                .code,
            999
        );
        assert!(find_in_path(
            "sh",
            &[PathBuf::from("/nonexistent"), PathBuf::from("/bin")]
        )
        .is_ok());
    }

    #[test]
    fn child_error_json_and_stderr_fallback() {
        let sh = Path::new("/bin/sh");
        // `sh -s` reads the script from stdin.
        let e = exec_plugin(
            sh,
            Command::Add,
            br#"echo '{"code":7,"msg":"bad"}'; exit 1"#,
            &[],
        );
        assert_eq!(e.unwrap_err(), CniError::new(7, "bad"));
        let e = exec_plugin(sh, Command::Add, b"echo oops >&2; exit 3", &[]).unwrap_err();
        assert_eq!(e.code, 999);
        assert!(e.msg.contains("oops"), "{e}");
        let ok = exec_plugin(sh, Command::Del, b"echo $CNI_COMMAND", &[]).unwrap();
        assert_eq!(ok, b"DEL\n");
    }

    /// A delegate that prints more than a pipe buffer before it reads a stdin larger than one:
    /// writing all of stdin first deadlocks both processes.
    #[test]
    fn large_stdout_before_reading_large_stdin_does_not_deadlock() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("chatty");
        std::fs::write(
            &bin,
            "#!/bin/sh\nhead -c 200000 /dev/zero\nwc -c >&2\nexit 0\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let stdin = vec![b'{'; 200_000];
        let (tx, rx) = std::sync::mpsc::channel();
        let b = bin.clone();
        std::thread::spawn(move || {
            let _ = tx.send(exec_plugin(&b, Command::Add, &stdin, &[]));
        });
        let out = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("exec_plugin deadlocked on a chatty delegate")
            .unwrap();
        assert_eq!(out.len(), 200_000);
    }
}
