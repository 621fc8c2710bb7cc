//! Runs the `nft` program: the one shell-out twilld's rules and the plugins' masquerade share.
//!
//! Rules are built with the typed [`model`] and go in on stdin as JSON (`nft -j -f -`);
//! arguments go as argv, never through a shell. Nothing twill applies is an nft text script.

pub mod model;

use std::io::Write;
use std::process::{Command, Stdio};

const NFT: &str = "nft";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {NFT}: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("writing to {NFT}: {0}")]
    Write(#[source] std::io::Error),
    #[error("waiting for {NFT}: {0}")]
    Wait(#[source] std::io::Error),
    /// `nft` ran and exited non-zero; `stderr` is its trimmed message.
    #[error("{NFT} {args}: {stderr}")]
    Failed { args: String, stderr: String },
}

impl NftError {
    /// The table/chain/rule named does not exist — or `nft` itself is not installed, in which
    /// case no rules can exist either (lets idempotent cleanup succeed).
    pub fn is_not_found(&self) -> bool {
        match self {
            NftError::Spawn(e) => e.kind() == std::io::ErrorKind::NotFound,
            NftError::Failed { stderr, .. } => {
                stderr.contains("No such file") || stderr.contains("does not exist")
            }
            NftError::Write(_) | NftError::Wait(_) => false,
        }
    }
}

/// Runs `nft args...`, feeding `stdin` when given, and returns its stdout.
pub fn run(args: &[&str], stdin: Option<&str>) -> Result<Vec<u8>, NftError> {
    let mut child = Command::new(NFT)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes()).map_err(NftError::Write)?;
    }
    let out = child.wait_with_output().map_err(NftError::Wait)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_stdout() {
        let out = run(&["--version"], None).expect("nft --version");
        assert!(String::from_utf8_lossy(&out).contains("nftables"));
    }

    #[test]
    fn failure_carries_args_and_stderr() {
        // `-c` only checks the script: nothing is changed even if it parsed.
        let e = run(&["-c", "-f", "-"], Some("this is not nft syntax\n")).unwrap_err();
        let NftError::Failed { args, stderr } = &e else {
            panic!("expected Failed, got {e:?}");
        };
        assert_eq!(args, "-c -f -");
        assert!(stderr.contains("Error"), "stderr: {stderr}");
        assert!(e.to_string().starts_with("nft -c -f -: "), "{e}");
        assert!(!e.is_not_found());
    }

    #[test]
    #[ignore = "needs root: scripts/test.sh root"]
    fn missing_table_is_not_found() {
        let e = run(&["list", "table", "inet", "twill_no_such_table_x"], None).unwrap_err();
        assert!(e.is_not_found(), "{e}");
    }
}
