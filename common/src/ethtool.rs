//! TX checksum offload of a network device, read and set through the ethtool ioctl
//! (`SIOCETHTOOL` with `ETHTOOL_GTXCSUM` / `ETHTOOL_STXCSUM`): what `ethtool -k/-K <dev> tx`
//! does, without shelling out.
//!
//! The ioctl acts on the network namespace of the socket, which is the calling thread's at the
//! time the socket is made: call these from the namespace that holds the device (the daemon's
//! own, or a short-lived thread inside another one, see `netns::run_in`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `ETHTOOL_GTXCSUM` and `ETHTOOL_STXCSUM` from `<linux/ethtool.h>`. In the kernel they map to
/// every TX checksum feature at once (`tx-checksum-ip-generic`, `-ipv4`, `-ipv6`), and turning
/// them off also drops the features that need them (TSO, GSO partial), as `ethtool -K` does.
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Whether the device transmits with checksum offload (any TX checksum feature on).
pub fn tx_checksum(dev: &str) -> io::Result<bool> {
    let mut v = EthtoolValue {
        cmd: ETHTOOL_GTXCSUM,
        data: 0,
    };
    ethtool(dev, &mut v)?;
    Ok(v.data != 0)
}

/// Turns TX checksum offload of the device on or off. Idempotent.
pub fn set_tx_checksum(dev: &str, on: bool) -> io::Result<()> {
    let mut v = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(on),
    };
    ethtool(dev, &mut v)
}

/// The interface name as `ifr_name` wants it: NUL-terminated within IFNAMSIZ.
fn ifr_name(dev: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    let bytes = dev.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {dev:?}"),
        ));
    }
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(name)
}

fn ethtool(dev: &str, value: &mut EthtoolValue) -> io::Result<()> {
    let name = ifr_name(dev)?;
    // SAFETY: plain socket(2); the fd is owned (and closed) by the OwnedFd below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = name;
    req.ifr_ifru.ifru_data = (value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL reads ifr_name and the ethtool_value ifru_data points to, which
    // lives (borrowed mutably) until the call returns; the kernel writes only into it.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_before_any_ioctl() {
        for bad in ["", "0123456789abcdef", "a\0b"] {
            let e = tx_checksum(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            let e = set_tx_checksum(bad, false).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        let name = ifr_name("twill.1").unwrap();
        assert_eq!(
            name[..8],
            [116, 119, 105, 108, 108, 46, 49, 0].map(|b| b as libc::c_char)
        );
    }

    #[test]
    fn reads_loopback_and_reports_a_missing_device() {
        // lo checksums in software for free and always advertises it (no privilege needed).
        assert!(tx_checksum("lo").unwrap());
        let e = tx_checksum("twill-nodev0").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
    }
}
