//! The netlink layer's one error type. Plugins turn it into a CNI error (code 999) at their
//! boundary (`From<NlError> for CniError`); the daemon wraps it in its own error.

use std::fmt;

/// A failed netlink operation: what was being done, and the kernel's (or the socket's) answer.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("{op}: {}", Kernel(.source))]
    Kernel {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

/// Renders a kernel reply as its errno text (`File exists`), not rtnetlink's debug dump.
struct Kernel<'a>(&'a rtnetlink::Error);

impl fmt::Display for Kernel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match errno(self.0) {
            Some(n) => write!(f, "{}", std::io::Error::from_raw_os_error(n)),
            None => write!(f, "{}", self.0),
        }
    }
}

impl NlError {
    /// `map_err(NlError::kernel("ip route replace 10.0.0.0/24"))`.
    pub fn kernel(op: impl fmt::Display) -> impl FnOnce(rtnetlink::Error) -> NlError {
        move |source| NlError::Kernel {
            op: op.to_string(),
            source,
        }
    }

    pub fn io(op: impl fmt::Display) -> impl FnOnce(std::io::Error) -> NlError {
        move |source| NlError::Io {
            op: op.to_string(),
            source,
        }
    }

    /// The errno of a kernel reply (positive), or of an I/O error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel { source, .. } => errno(source),
            NlError::Io { source, .. } => source.raw_os_error(),
        }
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// The object (link, address, route, neighbour) is not there.
    pub fn is_not_found(&self) -> bool {
        self.errno().is_some_and(not_found)
    }
}

/// The errnos the kernel answers for a missing link, address, route or neighbour.
fn not_found(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL
    )
}

/// For code that still holds a raw kernel reply (e.g. inside a retry loop).
pub fn is_exists(e: &rtnetlink::Error) -> bool {
    errno(e) == Some(libc::EEXIST)
}

pub fn is_not_found(e: &rtnetlink::Error) -> bool {
    errno(e).is_some_and(not_found)
}

/// The plugin boundary: a netlink failure is CNI code 999 (internal) with its context.
impl From<NlError> for crate::cni::CniError {
    fn from(e: NlError) -> crate::cni::CniError {
        crate::cni::CniError::internal(e.to_string())
    }
}

/// The negative-errno of a netlink error reply, as a positive errno.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()).filter(|c| *c != 0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_errno_and_context() {
        let e = NlError::io("open socket")(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(e.errno(), Some(libc::EMFILE));
        assert!(!e.is_exists() && !e.is_not_found());
        assert!(e.to_string().starts_with("open socket: "), "{e}");
        let gone = NlError::io("get link")(std::io::Error::from_raw_os_error(libc::ENODEV));
        assert!(gone.is_not_found());
    }
}
