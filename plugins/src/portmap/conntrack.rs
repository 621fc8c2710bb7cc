//! Deletes UDP conntrack entries by original destination port, over NETLINK_NETFILTER.
//!
//! A UDP flow to a host port keeps its conntrack entry (and so its DNAT to the old pod IP) for
//! as long as packets keep coming; a re-created pod would never see it. As the reference does
//! (netlink's ConntrackDeleteFilter), the table is dumped and every UDP entry whose original
//! destination port is one of the host ports is deleted by its tuple. Only the few constants
//! and the two messages below are needed, so they are written by hand instead of pulling in a
//! netfilter crate.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netfilter netlink request: nlmsghdr, nfgenmsg (family, version 0, res_id 0), attributes.
pub fn request(msg: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGEN_HDRLEN + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&[family, 0, 0, 0]);
    b.extend_from_slice(attrs);
    b
}

/// Netlink messages in a receive buffer: (type, payload). Stops at a malformed length.
pub fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        out.push((ty, &buf[off + NLMSG_HDRLEN..off + len]));
        off += align4(len);
    }
    out
}

/// Attributes: (type without flags, payload, the whole attribute including its header).
fn attrs(buf: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > buf.len() {
            break;
        }
        out.push((ty, &buf[off + 4..off + len], &buf[off..off + len]));
        off += align4(len);
    }
    out
}

/// A conntrack entry of a dump, reduced to what the filter and the delete need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub family: u8,
    pub proto: u8,
    pub dport: u16,
    /// The `CTA_TUPLE_ORIG` (and `CTA_ZONE`) attributes as the kernel sent them: echoed back
    /// in the delete, they name exactly this entry.
    pub key_attrs: Vec<u8>,
}

/// Parses the payload of one `IPCTNL_MSG_CT_NEW` dump message.
pub fn parse_entry(payload: &[u8]) -> Option<Entry> {
    let family = *payload.first()?;
    let top = attrs(payload.get(NFGEN_HDRLEN..)?);
    let (_, orig, orig_whole) = top.iter().find(|(t, _, _)| *t == CTA_TUPLE_ORIG)?;
    let (_, proto, _) = attrs(orig)
        .into_iter()
        .find(|(t, _, _)| *t == CTA_TUPLE_PROTO)?;
    let pattrs = attrs(proto);
    let num = pattrs
        .iter()
        .find(|(t, _, _)| *t == CTA_PROTO_NUM)
        .and_then(|(_, v, _)| v.first().copied())?;
    let dport = pattrs
        .iter()
        .find(|(t, _, _)| *t == CTA_PROTO_DST_PORT)
        .and_then(|(_, v, _)| Some(u16::from_be_bytes([*v.first()?, *v.get(1)?])))
        .unwrap_or(0);
    let mut key_attrs = orig_whole.to_vec();
    key_attrs.resize(align4(key_attrs.len()), 0);
    if let Some((_, _, zone)) = top.iter().find(|(t, _, _)| *t == CTA_ZONE) {
        key_attrs.extend_from_slice(zone);
        key_attrs.resize(align4(key_attrs.len()), 0);
    }
    Some(Entry {
        family,
        proto: num,
        dport,
        key_attrs,
    })
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let s = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        // A kernel that never answers must not hang the runtime's call.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: valid fd, pointer and length of a timeval.
        let rc = unsafe {
            libc::setsockopt(
                s.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: valid fd and buffer; netlink to the kernel needs no address on a raw socket.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: valid fd and writable buffer of that length.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The errno of an NLMSG_ERROR payload (0 is an ACK).
fn error_of(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map(|b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

const RECV_BUF: usize = 1 << 16;

/// Every conntrack entry of this network namespace (both families).
fn dump(s: &Socket) -> io::Result<Vec<Entry>> {
    s.send(&request(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        libc::AF_UNSPEC as u8,
        &[],
    ))?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = Vec::new();
    loop {
        let n = s.recv(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        for (ty, payload) in messages(&buf[..n]) {
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => match error_of(payload) {
                    0 => {}
                    e => return Err(io::Error::from_raw_os_error(e)),
                },
                t if t == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                    out.extend(parse_entry(payload));
                }
                _ => {}
            }
        }
    }
}

fn delete(s: &Socket, e: &Entry, seq: u32) -> io::Result<()> {
    s.send(&request(
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        e.family,
        &e.key_attrs,
    ))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = s.recv(&mut buf)?;
        for (ty, payload) in messages(&buf[..n]) {
            if ty == NLMSG_ERROR {
                return match error_of(payload) {
                    // Gone already (expired, or another DEL got it first).
                    0 | libc::ENOENT => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// Deletes the UDP entries whose original destination port is in `ports`; returns how many.
/// A kernel without conntrack has nothing to delete.
pub fn delete_udp(ports: &[u16]) -> io::Result<usize> {
    if ports.is_empty() {
        return Ok(0);
    }
    let s = Socket::open()?;
    let entries = match dump(&s) {
        Ok(e) => e,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::ENOENT | libc::EPROTONOSUPPORT)
            ) =>
        {
            return Ok(0)
        }
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for (i, e) in entries
        .iter()
        .filter(|e| e.proto == IPPROTO_UDP && ports.contains(&e.dport))
        .enumerate()
    {
        delete(&s, e, 2 + i as u32)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(align4(b.len()), 0);
        b
    }

    /// A dump message as the kernel sends it (nested attributes flagged NLA_F_NESTED).
    fn ct_message(family: u8, proto: u8, dport: u16, zone: Option<u16>) -> Vec<u8> {
        let ip = attr(
            0x8000 | 1,
            &[attr(1, &[10, 0, 0, 1]), attr(2, &[10, 0, 0, 2])].concat(),
        );
        let p = attr(
            0x8000 | CTA_TUPLE_PROTO,
            &[
                attr(CTA_PROTO_NUM, &[proto]),
                attr(2, &40000u16.to_be_bytes()),
                attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
            ]
            .concat(),
        );
        let orig = attr(0x8000 | CTA_TUPLE_ORIG, &[ip, p].concat());
        let reply = attr(0x8000 | 2, &[]);
        let mut a = [orig, reply].concat();
        if let Some(z) = zone {
            a.extend(attr(CTA_ZONE, &z.to_be_bytes()));
        }
        request(IPCTNL_MSG_CT_NEW, 2, 1, family, &a)
    }

    #[test]
    fn request_layout() {
        let r = request(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            2,
            &[1, 2, 3, 4],
        );
        assert_eq!(r.len(), 24);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 24);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 0x0102);
        assert_eq!(u16::from_ne_bytes(r[6..8].try_into().unwrap()), 5);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        assert_eq!(&r[16..20], &[2, 0, 0, 0]);
    }

    #[test]
    fn parses_dump_messages_and_keeps_the_tuple_to_echo() {
        let mut buf = ct_message(2, IPPROTO_UDP, 8053, None);
        buf.extend(ct_message(10, 6, 80, Some(3)));
        let done = {
            let mut d = Vec::new();
            d.extend_from_slice(&20u32.to_ne_bytes());
            d.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
            d.extend_from_slice(&[0; 10]);
            d.extend_from_slice(&0i32.to_ne_bytes());
            d
        };
        buf.extend(&done);
        let msgs = messages(&buf);
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[2].0, NLMSG_DONE);
        let a = parse_entry(msgs[0].1).unwrap();
        assert_eq!((a.family, a.proto, a.dport), (2, IPPROTO_UDP, 8053));
        let b = parse_entry(msgs[1].1).unwrap();
        assert_eq!((b.family, b.proto, b.dport), (10, 6, 80));
        // The delete names the entry by its original tuple (+ zone), bytes as received.
        let orig_len = u16::from_ne_bytes(a.key_attrs[0..2].try_into().unwrap()) as usize;
        assert_eq!(a.key_attrs.len(), align4(orig_len));
        let (zty, _, _) = attrs(&b.key_attrs)[1];
        assert_eq!(zty, CTA_ZONE);
        assert!(parse_entry(&[2, 0, 0, 0]).is_none(), "no tuple");
        assert!(messages(&[1, 2, 3]).is_empty());
        assert_eq!(error_of(&(-2i32).to_ne_bytes()), 2);
    }
}
