//! Reachability probes between pods: ICMP with `ping`, and a TCP exchange whose both ends
//! are sockets of this process opened inside the pod namespaces (each from a short-lived
//! thread that entered the namespace), so no helper process is left to clean up.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{io, Error, Result};
use crate::process::{run, succeeds_in};

/// Port of the lab's echo listener inside every pod.
pub const ECHO_PORT: u16 = 7777;

/// A pod's netns: a name below /run/netns (the lab's runtime), or the absolute path of a
/// containerd sandbox's netns mount (`--runtime containerd`).
pub fn netns_path(ns: &str) -> String {
    if ns.starts_with('/') {
        ns.to_string()
    } else {
        format!("/run/netns/{ns}")
    }
}

/// Runs `f` on a short-lived thread inside netns `ns` (twill_common::netns::run_in).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let path = netns_path(ns);
    let file = twill_common::netns::open(std::path::Path::new(&path)).map_err(io(&path))?;
    twill_common::netns::run_in(Some(file), f)
        .and_then(|r| r)
        .map_err(io(path))
}

/// An echo server listening inside a pod namespace until dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &str) -> Result<EchoServer> {
        let listener = in_netns(ns, || {
            let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, ECHO_PORT)))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        thread::spawn(move || echo(conn));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(EchoServer {
            stop,
            thread: Some(thread),
        })
    }
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
    let mut buf = Vec::new();
    if conn.read_to_end(&mut buf).is_ok() {
        let _ = conn.write_all(&buf);
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` to `ip:ECHO_PORT`, sends a message and expects it back.
pub fn tcp_exchange(ns: &str, ip: Ipv4Addr, timeout: Duration) -> bool {
    let msg = format!("twill-lab {ns} -> {ip} {:?}", Instant::now());
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, ECHO_PORT)), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(msg.as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut back = String::new();
        s.read_to_string(&mut back)?;
        Ok(back == msg)
    })
    .unwrap_or(false)
}

/// One ICMP echo from inside `ns`, retried a few times (the first may wait for ARP).
pub fn ping(ns: &str, ip: Ipv4Addr, attempts: u32) -> bool {
    let ip = ip.to_string();
    let argv = ["ping", "-c", "1", "-W", "1", "-q", &ip];
    // `ip netns exec` takes names only; a sandbox's netns is entered by path.
    let net = format!("--net={}", netns_path(ns));
    let nsenter = [&["nsenter", net.as_str()][..], &argv[..]].concat();
    (0..attempts).any(|_| {
        if ns.starts_with('/') {
            run(&nsenter).is_ok()
        } else {
            succeeds_in(ns, &argv)
        }
    })
}

/// Outcome of probing one ordered pod pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    pub ping: bool,
    pub tcp: bool,
}

impl Reach {
    pub fn ok(&self) -> bool {
        self.ping && self.tcp
    }
}

/// Probes every ordered pair of `(netns, ip)` endpoints; `result[i][j]` is i → j
/// (`None` on the diagonal). Sources are probed in parallel.
pub fn matrix(endpoints: &[(String, Ipv4Addr)]) -> Result<Vec<Vec<Option<Reach>>>> {
    let servers: Vec<EchoServer> = endpoints
        .iter()
        .map(|(ns, _)| EchoServer::start(ns))
        .collect::<Result<_>>()?;
    let eps: Arc<Vec<(String, Ipv4Addr)>> = Arc::new(endpoints.to_vec());
    let rows: Vec<thread::JoinHandle<Vec<Option<Reach>>>> = (0..eps.len())
        .map(|i| {
            let eps = eps.clone();
            thread::spawn(move || {
                (0..eps.len())
                    .map(|j| {
                        (i != j).then(|| Reach {
                            ping: ping(&eps[i].0, eps[j].1, 3),
                            tcp: tcp_exchange(&eps[i].0, eps[j].1, Duration::from_secs(2)),
                        })
                    })
                    .collect()
            })
        })
        .collect();
    let out = rows
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| Error::Lab("probe thread panicked".into()))
        })
        .collect();
    drop(servers);
    out
}

/// Up to `k` distinct ordered pairs `(i, j)`, `i != j`, of `n` endpoints, spread evenly: pair
/// `m` goes from endpoint `m·n/k` to the one `n/2 + m` further on (so sources cover the whole
/// list and destinations differ from sources' neighbours). Deterministic: a re-run of
/// `status` probes the same pairs.
pub fn sample_pairs(n: usize, k: usize) -> Vec<(usize, usize)> {
    if n < 2 {
        return Vec::new();
    }
    if n * (n - 1) <= k {
        return (0..n)
            .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
            .collect();
    }
    let mut out = Vec::with_capacity(k);
    let mut m = 0;
    while out.len() < k && m < 4 * k {
        let i = m * n / k % n;
        let mut j = (i + n / 2 + m) % n;
        if j == i {
            j = (j + 1) % n;
        }
        if !out.contains(&(i, j)) {
            out.push((i, j));
        }
        m += 1;
    }
    out
}

/// Probes the given ordered pairs of `(netns, ip)` endpoints (ping + TCP echo), a thread per
/// source; echo servers run only in the pairs' destinations.
pub fn pairs(endpoints: &[(String, Ipv4Addr)], pairs: &[(usize, usize)]) -> Result<Vec<Reach>> {
    let mut dests: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    dests.sort_unstable();
    dests.dedup();
    let servers: Vec<EchoServer> = dests
        .iter()
        .map(|d| EchoServer::start(&endpoints[*d].0))
        .collect::<Result<_>>()?;
    let handles: Vec<thread::JoinHandle<Reach>> = pairs
        .iter()
        .map(|(i, j)| {
            let (ns, ip) = (endpoints[*i].0.clone(), endpoints[*j].1);
            thread::spawn(move || Reach {
                ping: ping(&ns, ip, 3),
                tcp: tcp_exchange(&ns, ip, Duration::from_secs(2)),
            })
        })
        .collect();
    let out = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| Error::Lab("probe thread panicked".into()))
        })
        .collect();
    drop(servers);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_pairs_are_distinct_ordered_pairs_spread_over_the_sources() {
        for n in [2usize, 3, 7, 40, 1000] {
            let p = sample_pairs(n, 48);
            assert_eq!(p.len(), (n * (n - 1)).min(48), "n={n}");
            assert!(p.iter().all(|(i, j)| i != j && *i < n && *j < n));
            let mut d = p.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), p.len());
        }
        let srcs: std::collections::HashSet<usize> =
            sample_pairs(1000, 48).iter().map(|p| p.0).collect();
        assert!(srcs.len() >= 40, "{srcs:?}");
        assert!(sample_pairs(1, 48).is_empty());
    }
}
