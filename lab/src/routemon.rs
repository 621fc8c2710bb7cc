//! Watching the routes of many node namespaces at once, without polling them: one
//! NETLINK_ROUTE socket per namespace (created by a thread inside it, so it stays bound to that
//! namespace), subscribed to IPv4 route notifications and seeded with one dump. The lab then
//! knows, per node, which peer subnets are routed and when each route appeared or went, from a
//! single thread `poll`ing all sockets: O(changes), not O(nodes × polls).

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::error::{Error, Result};
use crate::probe::in_netns;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTA_DST: u16 = 1;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;
/// Receive buffer per socket: a node learning 5,000 peers at once gets ~5,000 notifications
/// of ~100 bytes before the lab reads them.
const RCVBUF: libc::c_int = 8 << 20;

/// A route change seen on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added(Ipv4Network),
    Removed(Ipv4Network),
}

/// The peer routes of one namespace: main-table unicast routes to a subnet of `network`
/// with prefix `subnet_len`.
pub struct RouteMon {
    fd: OwnedFd,
    network: Ipv4Network,
    subnet_len: u8,
    routes: HashSet<Ipv4Network>,
    dump_seq: u32,
    /// Entries of a dump in progress; swapped in at NLMSG_DONE.
    dumping: Option<HashSet<Ipv4Network>>,
    /// When the dump in progress was requested.
    dump_sent: Option<Instant>,
    /// Notifications were lost (ENOBUFS) or a dump failed: dump again as soon as the socket
    /// has no dump running (a second one would fail with EBUSY).
    need_dump: bool,
    /// The first dump completed.
    pub seeded: bool,
}

fn sock_err(what: &str) -> Error {
    Error::Lab(format!("{what}: {}", std::io::Error::last_os_error()))
}

impl RouteMon {
    /// Opens a monitor inside netns `ns` and sends the seeding dump request.
    pub fn open(ns: &str, network: Ipv4Network, subnet_len: u8) -> Result<RouteMon> {
        let fd = in_netns(ns, || {
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    libc::NETLINK_ROUTE,
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: raw is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
            let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            sa.nl_family = libc::AF_NETLINK as u16;
            sa.nl_groups = RTMGRP_IPV4_ROUTE;
            // SAFETY: sa lives across the call; its size is passed.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SO_RCVBUFFORCE (root) lifts net.core.rmem_max for this socket only.
            // SAFETY: an int option, its size passed.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &RCVBUF as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            Ok(fd)
        })?;
        let mut m = RouteMon {
            fd,
            network,
            subnet_len,
            routes: HashSet::new(),
            dump_seq: 0,
            dumping: None,
            dump_sent: None,
            need_dump: false,
            seeded: false,
        };
        m.request_dump()?;
        Ok(m)
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Peer routes currently known.
    pub fn routes(&self) -> &HashSet<Ipv4Network> {
        &self.routes
    }

    /// Dumps again if notifications were lost and no dump runs, or if a dump's answer has
    /// been missing for 5 s (its end or error lost to an overrun).
    pub fn maintain(&mut self) -> Result<()> {
        let stale = self
            .dump_sent
            .is_some_and(|t| t.elapsed() > Duration::from_secs(5));
        if (self.need_dump && self.dumping.is_none()) || (self.dumping.is_some() && stale) {
            self.need_dump = false;
            self.request_dump()?;
        }
        Ok(())
    }

    fn request_dump(&mut self) -> Result<()> {
        self.dump_seq = self.dump_seq.wrapping_add(1).max(1);
        let mut req = Vec::with_capacity(NLMSG_HDRLEN + 12);
        req.extend_from_slice(&((NLMSG_HDRLEN + 12) as u32).to_ne_bytes());
        req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&self.dump_seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        // struct rtmsg: family AF_INET, the rest zero (all tables).
        req.push(libc::AF_INET as u8);
        req.extend_from_slice(&[0u8; 11]);
        // SAFETY: send(2) of a buffer we own, its length passed.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                req.as_ptr() as *const libc::c_void,
                req.len(),
                0,
            )
        };
        if n < 0 {
            return Err(sock_err("netlink route dump request"));
        }
        self.dumping = Some(HashSet::new());
        self.dump_sent = Some(Instant::now());
        Ok(())
    }

    /// Reads whatever is queued; returns the notifications seen (dump results update the
    /// set silently). An overrun (ENOBUFS) re-dumps, so the set stays exact.
    pub fn read(&mut self) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: recv(2) into a buffer we own, its length passed.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(changes),
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        self.need_dump = true;
                        continue;
                    }
                    _ => return Err(Error::Lab(format!("netlink route monitor: {e}"))),
                }
            }
            self.parse(&buf[..n as usize], &mut changes);
        }
    }

    fn parse(&mut self, mut b: &[u8], changes: &mut Vec<Change>) {
        while b.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if len < NLMSG_HDRLEN || len > b.len() {
                return;
            }
            let ty = u16::from_ne_bytes([b[4], b[5]]);
            let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
            let body = &b[NLMSG_HDRLEN..len];
            let in_dump = seq != 0 && seq == self.dump_seq && self.dumping.is_some();
            match ty {
                NLMSG_DONE if in_dump => {
                    if let Some(set) = self.dumping.take() {
                        self.routes = set;
                        self.seeded = true;
                        self.dump_sent = None;
                    }
                }
                NLMSG_ERROR if in_dump => {
                    // A failed dump (EBUSY, or EINTR when the table changed under it): ask
                    // again once nothing runs.
                    self.dumping = None;
                    self.dump_sent = None;
                    self.need_dump = true;
                }
                RTM_NEWROUTE | RTM_DELROUTE => {
                    if let Some(dst) = self.peer_route(body) {
                        if in_dump {
                            if let Some(d) = self.dumping.as_mut() {
                                d.insert(dst);
                            }
                        } else {
                            // A notification during a dump may concern a part the dump already
                            // passed: it applies to the dump's set too, or the set swapped in
                            // at NLMSG_DONE would miss it.
                            if let Some(d) = self.dumping.as_mut() {
                                if ty == RTM_NEWROUTE {
                                    d.insert(dst);
                                } else {
                                    d.remove(&dst);
                                }
                            }
                            if ty == RTM_NEWROUTE {
                                if self.routes.insert(dst) {
                                    changes.push(Change::Added(dst));
                                }
                            } else if self.routes.remove(&dst) {
                                changes.push(Change::Removed(dst));
                            }
                        }
                    }
                }
                _ => {}
            }
            let aligned = (len + 3) & !3;
            b = &b[aligned.min(b.len())..];
        }
    }

    /// The destination of a main-table unicast route to a peer subnet, else None.
    fn peer_route(&self, body: &[u8]) -> Option<Ipv4Network> {
        if body.len() < 12 {
            return None;
        }
        let (family, dst_len, table, rtype) = (body[0], body[1], body[4], body[7]);
        if family != libc::AF_INET as u8 || dst_len != self.subnet_len || rtype != RTN_UNICAST {
            return None;
        }
        let mut table = u32::from(table);
        let mut dst = None;
        let mut a = &body[12..];
        while a.len() >= 4 {
            let alen = u16::from_ne_bytes([a[0], a[1]]) as usize;
            let aty = u16::from_ne_bytes([a[2], a[3]]) & 0x3fff;
            if alen < 4 || alen > a.len() {
                break;
            }
            let v = &a[4..alen];
            match aty {
                RTA_DST if v.len() == 4 => {
                    dst = Some(std::net::Ipv4Addr::new(v[0], v[1], v[2], v[3]))
                }
                RTA_TABLE if v.len() == 4 => table = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
                _ => {}
            }
            a = &a[((alen + 3) & !3).min(a.len())..];
        }
        let dst = Ipv4Network::new(dst?, dst_len).ok()?;
        (table == RT_TABLE_MAIN && self.network.contains(dst.network())).then_some(dst)
    }
}

/// Waits until one of `mons` is readable (or `timeout`); returns the readable indices.
pub fn wait_readable(mons: &[RouteMon], timeout: Duration) -> Vec<usize> {
    let mut fds: Vec<libc::pollfd> = mons
        .iter()
        .map(|m| libc::pollfd {
            fd: m.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll(2) over a vector we own, its length passed.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return Vec::new();
    }
    fds.iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect()
}

/// Reads every monitor until `done(mons)` holds or `timeout` passes; each change is handed to
/// `seen(node index, change, when)`. Returns whether `done` held.
pub fn run_until(
    mons: &mut [RouteMon],
    timeout: Duration,
    mut seen: impl FnMut(usize, Change, Instant),
    mut done: impl FnMut(&[RouteMon]) -> bool,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if mons.iter().all(|m| m.seeded) && done(mons) {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let ready = wait_readable(mons, (deadline - now).min(Duration::from_millis(200)));
        let when = Instant::now();
        for i in ready {
            for c in mons[i].read()? {
                seen(i, c, when);
            }
        }
        for m in mons.iter_mut() {
            m.maintain()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RTM_NEWROUTE/RTM_DELROUTE message to `dst`/24 in the main table.
    fn msg(ty: u16, seq: u32, dst: [u8; 4]) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 24, 0, 0, 254, 0, 0, RTN_UNICAST];
        body.extend_from_slice(&[0u8; 4]);
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&RTA_DST.to_ne_bytes());
        body.extend_from_slice(&dst);
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn done(seq: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + 4) as u32).to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&[0u8; 8]);
        m
    }

    #[test]
    fn a_route_notified_while_a_dump_runs_survives_the_dump() {
        // SAFETY: an unbound netlink socket, only to own an fd; never read here.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) };
        assert!(raw >= 0);
        let mut m = RouteMon {
            // SAFETY: raw is a fresh descriptor.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            network: "10.0.0.0/8".parse().unwrap(),
            subnet_len: 24,
            routes: HashSet::new(),
            dump_seq: 1,
            dumping: Some(HashSet::new()),
            dump_sent: Some(Instant::now()),
            need_dump: false,
            seeded: false,
        };
        let mut changes = Vec::new();
        // The dump has passed 10.0.9.0 already when its route is added and notified.
        m.parse(&msg(RTM_NEWROUTE, 1, [10, 0, 1, 0]), &mut changes);
        m.parse(&msg(RTM_NEWROUTE, 0, [10, 0, 9, 0]), &mut changes);
        m.parse(&msg(RTM_NEWROUTE, 1, [10, 0, 20, 0]), &mut changes);
        m.parse(&msg(RTM_DELROUTE, 0, [10, 0, 1, 0]), &mut changes);
        m.parse(&done(1), &mut changes);
        let mut got: Vec<String> = m.routes().iter().map(|n| n.to_string()).collect();
        got.sort();
        assert_eq!(got, vec!["10.0.20.0/24", "10.0.9.0/24"]);
        assert!(m.seeded);
        // Outside the pod network or the wrong length: not a peer route.
        m.parse(&msg(RTM_NEWROUTE, 0, [192, 168, 9, 0]), &mut changes);
        assert_eq!(m.routes().len(), 2);
    }
}
