//! Commands and background processes of the lab.
//!
//! Background processes are identified by PID *and* kernel start time, so a `down` run
//! long after `up` never signals an unrelated process that reused the PID.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{io, Error, Result};

/// Runs `argv` (never through a shell) and returns stdout; a non-zero exit is an error.
pub fn run(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(io(argv[0]))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: argv.join(" "),
            detail: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `argv` inside the named netns.
pub fn run_in(ns: &str, argv: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(argv);
    run(&full)
}

/// Whether `argv` inside `ns` exits 0.
pub fn succeeds_in(ns: &str, argv: &[&str]) -> bool {
    run_in(ns, argv).is_ok()
}

/// A process the lab started and must stop by PID.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat (clock ticks since boot).
    pub start_time: u64,
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parens: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

impl Proc {
    /// Starts `argv` inside netns `ns` in the background, output appended to `log`.
    /// It gets its own process group so a Ctrl-C on the lab command does not reach it.
    pub fn spawn_in(ns: &str, argv: &[&str], env: &[(&str, &str)], log: &Path) -> Result<Proc> {
        // `ip netns exec` execs the program, so the PID we get is the program's.
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(argv);
        Proc::spawn_named(argv[0], &full, env, log)
    }

    /// Starts `argv` in the background like [`Proc::spawn_in`], in the current namespaces
    /// (`argv` may enter others itself, e.g. with `nsenter`, which execs its program too).
    pub fn spawn(argv: &[&str], env: &[(&str, &str)], log: &Path) -> Result<Proc> {
        Proc::spawn_named(argv[0], argv, env, log)
    }

    /// [`Proc::spawn`], naming the program as `name` when it exits at once.
    fn spawn_named(name: &str, argv: &[&str], env: &[(&str, &str)], log: &Path) -> Result<Proc> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(log))?;
        let err = out.try_clone().map_err(io(log))?;
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io(argv[0]))?;
        let pid = child.id() as i32;
        // The child is reaped by whoever outlives it; dropping the handle does not kill it.
        drop(child);
        let start_time = start_time(pid)
            .ok_or_else(|| Error::Lab(format!("{name} exited at once; see {}", log.display())))?;
        Ok(Proc { pid, start_time })
    }

    /// Whether this very process (same start time) is still running.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    /// Sends `sig` if the process is still ours.
    pub fn signal(&self, sig: i32) -> bool {
        // SAFETY: kill(2) with a PID we verified by start time just before.
        start_time(self.pid) == Some(self.start_time) && unsafe { libc::kill(self.pid, sig) } == 0
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns once the process is gone.
    pub fn stop(&self, grace: Duration) {
        if !self.signal(libc::SIGTERM) {
            reap(self.pid);
            return;
        }
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            reap(self.pid);
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.alive() {
            self.signal(libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                reap(self.pid);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        reap(self.pid);
    }

    /// SIGKILL at once (a power cut, no chance to clean up); returns once the process is gone.
    pub fn kill(&self) {
        if self.signal(libc::SIGKILL) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                reap(self.pid);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        reap(self.pid);
    }
}

/// Collects the exit status if the process is our child (no-op otherwise).
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: WNOHANG waitpid on a specific PID; fails harmlessly if it is not our child.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Polls `f` every 100 ms until it returns Some, or fails after `secs`.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                secs,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
