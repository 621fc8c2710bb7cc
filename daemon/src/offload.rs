//! TX checksum offload on the VTEP.
//!
//! Kernels before 5.7 send NAT'd VXLAN packets with a bad UDP checksum when the VTEP offloads
//! the checksum; the receiver drops them (flannel#1279, flannel#1929: connections through a
//! Service take ~63 s, TCP's SYN retry backoff, or fail). flannel documents
//! `ethtool -K flannel.1 tx-checksum-ip-generic off`; Calico turns offload off only below 5.7.
//! Off everywhere is no answer: on 6.18 it costs ~60 % of pod→pod throughput (the checksum
//! and the segmentation it enables move to the CPU). So `auto` turns it off only where the bug
//! is, and `on`/`off` force either way.

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use clap::ValueEnum;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// `--vxlan-tx-checksum-offload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OffloadMode {
    /// Off on kernels older than 5.7 (the affected ones), on otherwise.
    #[default]
    Auto,
    /// Always on (the kernel's default for a VXLAN device).
    On,
    /// Always off.
    Off,
}

/// The `major.minor` of a kernel release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    /// The first release whose NAT keeps VXLAN's offloaded UDP checksums right.
    pub const CHECKSUM_FIXED: KernelVersion = KernelVersion { major: 5, minor: 7 };

    /// Parses a release as uname prints it: "6.1.0-18-amd64", "5.4.0-150-generic", "4.19.0+",
    /// "6.18.44-fc-v1045", "5.7". Only `major.minor` matters; `None` without both.
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut parts = release.trim().splitn(3, '.');
        let number = |s: Option<&str>| -> Option<u32> {
            let s = s?;
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            s[..end].parse().ok()
        };
        let major_part = parts.next();
        // The major must be all digits ("6", not "v6" or "6-rc"): it is followed by the dot.
        if major_part.is_some_and(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_digit())) {
            return None;
        }
        Some(KernelVersion {
            major: number(major_part)?,
            minor: number(parts.next())?,
        })
    }

    /// The running kernel's, from `/proc/sys/kernel/osrelease` (uname's release).
    pub fn running() -> Result<KernelVersion> {
        let path = Path::new("/proc/sys/kernel/osrelease");
        let release = std::fs::read_to_string(path).map_err(Error::io("read kernel release"))?;
        KernelVersion::parse(&release).ok_or_else(|| {
            Error::Backend(format!(
                "cannot tell the kernel version from {}: {release:?}",
                path.display()
            ))
        })
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Whether TX checksum offload must be off on the VTEP.
pub fn tx_checksum_off(kernel: KernelVersion, mode: OffloadMode) -> bool {
    match mode {
        OffloadMode::Auto => kernel < KernelVersion::CHECKSUM_FIXED,
        OffloadMode::On => false,
        OffloadMode::Off => true,
    }
}

/// The running kernel's version, read once (it cannot change under a running process, and
/// the backend applies the setting on every reconcile pass). `None`, logged once, when the
/// release cannot be read or parsed.
fn running_kernel() -> Option<KernelVersion> {
    static RUNNING: OnceLock<Option<KernelVersion>> = OnceLock::new();
    *RUNNING.get_or_init(|| match KernelVersion::running() {
        Ok(k) => Some(k),
        Err(e) => {
            warn!(
                "{e}; --vxlan-tx-checksum-offload=auto keeps TX checksum offload on \
                 (set it to off on kernels older than 5.7)"
            );
            None
        }
    })
}

/// Sets the VTEP's TX checksum offload as `mode` asks on this kernel, in the caller's network
/// namespace (the daemon's own). Changes the device only when it differs (an adopted device
/// may still carry a previous run's setting), so it is cheap to call on every pass: one
/// ioctl. Returns whether offload is on afterwards.
pub fn apply_tx_checksum(dev: &str, mode: OffloadMode) -> Result<bool> {
    let want_off = match running_kernel() {
        Some(kernel) => tx_checksum_off(kernel, mode),
        // Nothing to go on: auto keeps the kernel's default (on).
        None => mode == OffloadMode::Off,
    };
    let is_on = twill_common::ethtool::tx_checksum(dev)
        .map_err(Error::io(format!("read TX checksum offload of {dev}")))?;
    if is_on == want_off {
        twill_common::ethtool::set_tx_checksum(dev, !want_off)
            .map_err(Error::io(format!("set TX checksum offload of {dev}")))?;
        info!(
            dev,
            ?mode,
            offload = !want_off,
            "TX checksum offload changed"
        );
    }
    Ok(!want_off)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> KernelVersion {
        KernelVersion { major, minor }
    }

    #[test]
    fn parses_kernel_releases() {
        for (release, want) in [
            ("6.1.0-18-amd64", Some(v(6, 1))),
            ("5.4.0-150-generic", Some(v(5, 4))),
            ("4.19.0+", Some(v(4, 19))),
            ("6.18.44-fc-v1045\n", Some(v(6, 18))),
            ("3.10.0-1160.el7.x86_64", Some(v(3, 10))),
            ("5.7", Some(v(5, 7))),
            ("5.10-rc1", Some(v(5, 10))),
            ("6", None),
            ("", None),
            ("v6.1", None),
            ("6.x", None),
            ("linux", None),
        ] {
            assert_eq!(KernelVersion::parse(release), want, "{release:?}");
        }
    }

    #[test]
    fn auto_turns_offload_off_only_below_5_7() {
        for (kernel, off) in [
            (v(3, 10), true),
            (v(4, 19), true),
            (v(5, 4), true),
            (v(5, 6), true),
            (v(5, 7), false),
            (v(5, 10), false),
            (v(6, 1), false),
            (v(6, 18), false),
        ] {
            assert_eq!(tx_checksum_off(kernel, OffloadMode::Auto), off, "{kernel}");
            assert!(!tx_checksum_off(kernel, OffloadMode::On), "{kernel}");
            assert!(tx_checksum_off(kernel, OffloadMode::Off), "{kernel}");
        }
    }

    /// The real effect, as the backend calls it: in a network namespace of its own (made by a
    /// short-lived thread, gone with it), on a VXLAN device like the VTEP.
    #[test]
    #[ignore = "needs root: scripts/test.sh root"]
    fn apply_sets_the_devices_offload_as_the_mode_says() {
        let modern = KernelVersion::running().unwrap() >= KernelVersion::CHECKSUM_FIXED;
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // Children of this thread start in its namespace.
            let st = std::process::Command::new("ip")
                .args(["link", "add", "twill.77", "type", "vxlan", "id", "77"])
                .args(["dstport", "8472", "nolearning"])
                .status()
                .unwrap();
            assert!(st.success());
            let read = || twill_common::ethtool::tx_checksum("twill.77").unwrap();
            assert!(read(), "a new vxlan device offloads");
            assert!(!apply_tx_checksum("twill.77", OffloadMode::Off).unwrap());
            assert!(!read());
            assert!(!apply_tx_checksum("twill.77", OffloadMode::Off).unwrap());
            assert!(!read());
            assert!(apply_tx_checksum("twill.77", OffloadMode::On).unwrap());
            assert!(read());
            // Auto on this kernel: off before 5.7, on from 5.7 (from off, to see it change).
            apply_tx_checksum("twill.77", OffloadMode::Off).unwrap();
            assert_eq!(
                apply_tx_checksum("twill.77", OffloadMode::Auto).unwrap(),
                modern
            );
            assert_eq!(read(), modern);
            let e = apply_tx_checksum("twill.none", OffloadMode::On).unwrap_err();
            assert!(e.to_string().contains("twill.none"), "{e}");
        })
        .join()
        .expect("netns thread");
    }

    #[test]
    fn the_running_kernel_parses() {
        let k = KernelVersion::running().unwrap();
        assert!(k.major >= 3, "{k}");
    }
}
