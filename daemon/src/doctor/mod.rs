//! `twilld doctor`: a node preflight in the style of kubeadm's preflight checks.
//!
//! Each check is a pure function from gathered facts to a [`Finding`] (unit-tested without
//! root); [`gather`] is the thin layer that reads files, runs tools and asks etcd and the
//! kernel. The output is one line per check, `[ok|warn|fail] <check>: <finding>`, with what
//! to do for warnings and failures; the exit code is 0 (all ok), 1 (warnings only) or 2 (a
//! failure). `--json` prints the findings as an array of `{check, status, message, fix}`.

mod clock;
mod cni;
mod etcd;
mod firewall;
mod gather;
mod kernel;
mod net;

use std::process::ExitCode;

use serde::Serialize;

use crate::cli::DoctorArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Status,
    pub message: String,
    /// What to do; None for ok.
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            status: Status::Ok,
            message: message.into(),
            fix: None,
        }
    }

    pub fn warn(
        check: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            status: Status::Warn,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(
        check: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            status: Status::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    /// `[warn] check: message -- fix: what to do`.
    pub fn line(&self) -> String {
        let mut s = format!("[{}] {}: {}", self.status.label(), self.check, self.message);
        if let Some(fix) = &self.fix {
            s.push_str(" -- fix: ");
            s.push_str(fix);
        }
        s
    }
}

/// 0 when every check is ok, 1 with warnings only, 2 with any failure.
pub fn exit_code(findings: &[Finding]) -> u8 {
    match findings.iter().map(|f| f.status).max() {
        Some(Status::Fail) => 2,
        Some(Status::Warn) => 1,
        _ => 0,
    }
}

/// The text report: one line per check, then a summary.
pub fn render_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&f.line());
        out.push('\n');
    }
    let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
    out.push_str(&format!(
        "{} ok, {} warnings, {} failures\n",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    ));
    out
}

pub fn render_json(findings: &[Finding]) -> String {
    // Serializing plain strings and enums cannot fail.
    serde_json::to_string_pretty(findings).unwrap_or_else(|_| "[]".into()) + "\n"
}

/// Runs every check and prints the report; the runtime is shut down here so the dispatch in
/// `main` stays one line.
pub fn main(rt: tokio::runtime::Runtime, args: &DoctorArgs) -> ExitCode {
    let findings = rt.block_on(gather::run_checks(&args.run));
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    let text = if args.json {
        render_json(&findings)
    } else {
        render_text(&findings)
    };
    print!("{text}");
    ExitCode::from(exit_code(&findings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_lines() {
        let ok = Finding::ok("ip_forward", "1");
        let warn = Finding::warn("module br_netfilter", "not loaded", "modprobe br_netfilter");
        let fail = Finding::fail("etcd", "connection refused", "start etcd");
        assert_eq!(exit_code(std::slice::from_ref(&ok)), 0);
        assert_eq!(exit_code(&[]), 0);
        assert_eq!(exit_code(&[ok.clone(), warn.clone()]), 1);
        assert_eq!(exit_code(&[warn.clone(), fail.clone(), ok.clone()]), 2);
        assert_eq!(ok.line(), "[ok] ip_forward: 1");
        assert_eq!(
            warn.line(),
            "[warn] module br_netfilter: not loaded -- fix: modprobe br_netfilter"
        );
        let text = render_text(&[ok, warn, fail]);
        assert!(text.ends_with("1 ok, 1 warnings, 1 failures\n"), "{text}");
    }

    #[test]
    fn json_shape() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&[
            Finding::ok("ip_forward", "1"),
            Finding::fail("etcd", "refused", "start etcd"),
        ]))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {"check": "ip_forward", "status": "ok", "message": "1", "fix": null},
                {"check": "etcd", "status": "fail", "message": "refused", "fix": "start etcd"},
            ])
        );
    }
}
