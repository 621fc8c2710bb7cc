//! `twill-lab scale`: how twill behaves with N real nodes (N twilld processes, one etcd) on
//! one machine. In one run it measures
//!
//! 1. start-up: all N nodes Ready (inotify on the conf dirs) and the full mesh (every node
//!    routes the N−1 others: netlink route monitors in every node namespace, no polling);
//! 2. joins and leaves: a lease written to etcd (a node joining) until its route is on every
//!    node, and deleted until the route is gone everywhere (p50/p99/max over the samples);
//! 3. a renewal storm: every twilld restarted at once, until each reports Ready with all N−1
//!    peers programmed again (its /metrics), no subnet changed and no route lost meanwhile;
//! 4. idle cost: etcd requests per second per node over an idle window (etcd's own
//!    `grpc_server_handled_total`), CPU and RSS per twilld, etcd's CPU, RSS and DB size;
//! 5. kernel state on one node (routes, neighbours, FDB entries).
//!
//! Everything runs in a lab of its own (`<name>-scale`), removed at the end even on failure.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::error::{Error, Result};
use crate::probe::in_netns;
use crate::process::run_in;
use crate::routemon::{self, Change, RouteMon};
use crate::{addr, Lab, LabOptions, ETCD_IP, ETCD_PREFIX, HEALTHZ_PORT};

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub nodes: usize,
    /// Join/leave samples.
    pub joins: usize,
    /// Length of the idle window.
    pub idle_secs: u64,
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn dist(v: &[f64]) -> String {
    let s = sorted(v.to_vec());
    format!(
        "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&s, 50.0) * 1e3,
        percentile(&s, 99.0) * 1e3,
        s.last().copied().unwrap_or(0.0) * 1e3
    )
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (etcd's JSON gateway takes keys and values so).
pub fn base64(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                s.push(B64[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// One HTTP/1.0 exchange (no chunked replies) from a socket opened inside `ns`; the body.
pub fn http(ns: &str, to: SocketAddr, method: &str, path: &str, body: &str) -> Result<String> {
    let mut conn = in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {to}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let io = |e: std::io::Error| Error::Lab(format!("http {to}{path}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    conn.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Lab(format!("http {to}{path}: no header end")))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(Error::Lab(format!(
            "http {to}{path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_string())
}

/// Sum of every sample of Prometheus metric `name` (all label sets) in `text`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn etcd_addr() -> SocketAddr {
    SocketAddr::from((ETCD_IP, 2379))
}

fn etcd_metrics(lab: &Lab) -> Result<String> {
    http(lab.underlay_ns(), etcd_addr(), "GET", "/metrics", "")
}

fn etcd_put(lab: &Lab, key: &str, value: &str) -> Result<()> {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        base64(key.as_bytes()),
        base64(value.as_bytes())
    );
    http(lab.underlay_ns(), etcd_addr(), "POST", "/v3/kv/put", &body).map(drop)
}

fn etcd_del(lab: &Lab, key: &str) -> Result<()> {
    let body = format!(r#"{{"key":"{}"}}"#, base64(key.as_bytes()));
    http(
        lab.underlay_ns(),
        etcd_addr(),
        "POST",
        "/v3/kv/deleterange",
        &body,
    )
    .map(drop)
}

/// utime + stime (clock ticks) and VmRSS (bytes) of a process.
fn cpu_rss(pid: i32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3; utime and stime are fields 14 and 15.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ticks, kb * 1024))
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf with a valid name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn mb(b: f64) -> String {
    format!("{:.1} MB", b / 1e6)
}

/// A peer's lease as twilld writes it (flannel's schema), for a node that does not exist.
fn fake_lease(k: usize) -> (String, String) {
    let public = Ipv4Addr::new(192, 168, 250, (k % 250 + 1) as u8);
    let value = format!(
        r#"{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:66:00:00:{:02x}:{:02x}"}}}}"#,
        k / 256,
        k % 256
    );
    (String::new(), value)
}

/// Subnets of `network` (in /24s) that no lease in `used` holds, from the top down.
fn free_subnets(network: Ipv4Network, used: &[Ipv4Network], n: usize) -> Vec<Ipv4Network> {
    let first = u32::from(network.network()) >> 8;
    let count = 1u32 << (24 - u32::from(network.prefix()));
    (1..count - 1)
        .rev()
        .filter_map(|i| Ipv4Network::new(Ipv4Addr::from((first + i) << 8), 24).ok())
        .filter(|s| !used.contains(s))
        .take(n)
        .collect()
}

/// Runs the whole measurement; the lab is removed afterwards whatever happened.
pub fn run(opts: LabOptions, so: &ScaleOptions, out: &mut dyn Write) -> Result<String> {
    let mut lab = Lab::create(opts)?;
    let res = measure(&mut lab, so, out);
    let t = Instant::now();
    let down = lab.down();
    let report = res?;
    down?;
    Ok(format!(
        "{report}lab removed in {:.1} s\n",
        t.elapsed().as_secs_f64()
    ))
}

fn say(out: &mut dyn Write, s: &str) {
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

fn measure(lab: &mut Lab, so: &ScaleOptions, out: &mut dyn Write) -> Result<String> {
    let n = so.nodes;
    let network: Ipv4Network = lab
        .options()
        .network
        .parse()
        .map_err(|e| Error::Lab(format!("network: {e}")))?;
    let mut r = String::new();
    let load0 = loadavg();
    say(out, &format!("starting {n} nodes (load average {load0})"));

    // 1. Start-up.
    let t0 = Instant::now();
    let started = lab.add_nodes(n)?;
    let t_spawned = t0.elapsed();
    let waited = lab.wait_ready_many(&started, crate::ready_timeout(n), |_, _| {})?;
    let t_ready = t0.elapsed();
    say(
        out,
        &format!("all {n} Ready after {:.1} s", t_ready.as_secs_f64()),
    );
    let mut mons: Vec<RouteMon> = lab
        .nodes()
        .iter()
        .map(|node| RouteMon::open(&node.ns, network, 24))
        .collect::<Result<_>>()?;
    let want = n - 1;
    let meshed = routemon::run_until(
        &mut mons,
        Duration::from_secs(crate::ready_timeout(n)),
        |_, _, _| {},
        |m| m.iter().all(|x| x.routes().len() >= want),
    )?;
    let t_mesh = t0.elapsed();
    if !meshed {
        let short: Vec<usize> = (0..mons.len())
            .filter(|i| mons[*i].routes().len() < want)
            .collect();
        // What the kernel says, next to what the monitor saw, for the first few.
        let detail: Vec<String> = short
            .iter()
            .take(3)
            .map(|i| {
                let x = &lab.nodes()[*i];
                let kernel = run_in(&x.ns, &["ip", "route", "show", "dev", "twill.1"])
                    .map(|s| s.lines().count().to_string())
                    .unwrap_or_else(|e| e.to_string());
                format!(
                    "{}: monitor {} routes, kernel {kernel} on twill.1",
                    x.name,
                    mons[*i].routes().len()
                )
            })
            .collect();
        return Err(Error::Lab(format!(
            "{} of {n} nodes still lack peer routes after {:.0} s ({})",
            short.len(),
            t_mesh.as_secs_f64(),
            detail.join("; ")
        )));
    }
    say(
        out,
        &format!("full mesh after {:.1} s", t_mesh.as_secs_f64()),
    );
    let w = sorted(waited.iter().map(Duration::as_secs_f64).collect());
    r += &format!(
        "twill scale run: {n} nodes (one twilld each, own network namespace), one etcd, \
         {} CPUs; load average at start {load0}\n",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    r += &format!(
        "start-up: namespaces built and {n} twilld spawned in {:.1} s; all Ready {:.1} s and \
         full mesh ({} routes) {:.1} s after the first start; per daemon start -> conflist p50 \
         {:.2} s, max {:.2} s\n",
        t_spawned.as_secs_f64(),
        t_ready.as_secs_f64(),
        n * want,
        t_mesh.as_secs_f64(),
        percentile(&w, 50.0),
        w.last().copied().unwrap_or(0.0)
    );

    // 2. Joins and leaves.
    let used: Vec<Ipv4Network> = lab
        .nodes()
        .iter()
        .filter_map(|x| lab.subnet(&x.name))
        .collect();
    let subnets = free_subnets(network, &used, so.joins);
    let (mut join_all, mut join_last, mut leave_last) = (Vec::new(), Vec::new(), Vec::new());
    for (k, sn) in subnets.iter().enumerate() {
        let key = format!("{ETCD_PREFIX}/subnets/{}-{}", sn.network(), sn.prefix());
        let (_, value) = fake_lease(k);
        let t = Instant::now();
        etcd_put(lab, &key, &value)?;
        let mut seen = 0usize;
        let ok = routemon::run_until(
            &mut mons,
            Duration::from_secs(60),
            |_, c, when| {
                if c == Change::Added(*sn) {
                    seen += 1;
                    join_all.push((when - t).as_secs_f64());
                }
            },
            |m| m.iter().all(|x| x.routes().contains(sn)),
        )?;
        if !ok {
            return Err(Error::Lab(format!(
                "join {sn}: not routed everywhere in 60 s"
            )));
        }
        join_last.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        etcd_del(lab, &key)?;
        let ok = routemon::run_until(
            &mut mons,
            Duration::from_secs(60),
            |_, _, _| {},
            |m| m.iter().all(|x| !x.routes().contains(sn)),
        )?;
        if !ok {
            return Err(Error::Lab(format!(
                "leave {sn}: route left somewhere after 60 s"
            )));
        }
        leave_last.push(t.elapsed().as_secs_f64());
        let _ = seen;
    }
    r += &format!(
        "join (lease written -> its route on every one of {n} nodes), {} samples: {}; \
         per node: {}\n",
        join_last.len(),
        dist(&join_last),
        dist(&join_all)
    );
    r += &format!(
        "leave (lease deleted -> its route gone from every node), {} samples: {}\n",
        leave_last.len(),
        dist(&leave_last)
    );
    say(out, "joins and leaves measured");

    // 3. Renewal storm.
    let before: HashMap<String, Option<Ipv4Network>> = lab
        .nodes()
        .iter()
        .map(|x| (x.name.clone(), lab.subnet(&x.name)))
        .collect();
    let t = Instant::now();
    lab.restart_daemons_at_once()?;
    let t_restarted = t.elapsed();
    let mut lost = 0usize;
    let names: Vec<(String, String)> = lab
        .nodes()
        .iter()
        .map(|x| (x.name.clone(), x.ns.clone()))
        .collect();
    let mut pending: Vec<usize> = (0..names.len()).collect();
    let deadline = Instant::now() + Duration::from_secs(crate::ready_timeout(n));
    while !pending.is_empty() {
        // Route monitors catch any route lost meanwhile.
        let ready = routemon::wait_readable(&mons, Duration::from_millis(300));
        for i in ready {
            for c in mons[i].read()? {
                if matches!(c, Change::Removed(_)) {
                    lost += 1;
                }
            }
        }
        for m in mons.iter_mut() {
            m.maintain()?;
        }
        let checks = crate::parallel_map(&pending, 16, |i| {
            http(
                &names[*i].1,
                SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT)),
                "GET",
                "/metrics",
                "",
            )
            .map(|m| {
                metric_sum(&m, "twill_ready") == 1.0
                    && metric_sum(&m, "twill_peers_programmed") as usize == want
            })
            .unwrap_or(false)
        });
        pending = pending
            .iter()
            .zip(checks)
            .filter(|(_, ok)| !ok)
            .map(|(i, _)| *i)
            .collect();
        if Instant::now() > deadline {
            return Err(Error::Lab(format!(
                "renewal storm: {} daemons not back to Ready with {want} peers",
                pending.len()
            )));
        }
    }
    let t_storm = t.elapsed();
    let changed = lab
        .nodes()
        .iter()
        .filter(|x| before.get(&x.name).cloned().flatten() != lab.subnet(&x.name))
        .count();
    let keys = lab.lease_keys()?.len();
    r += &format!(
        "renewal storm (all {n} twilld restarted at once; stop+spawn took {:.1} s): every daemon \
         Ready with {want} peers programmed {:.1} s after the restart began; subnets changed: \
         {changed}; routes lost meanwhile: {lost}; lease keys in etcd: {keys}\n",
        t_restarted.as_secs_f64(),
        t_storm.as_secs_f64()
    );
    say(out, "renewal storm measured; idle window starts");

    // 4. Idle cost.
    let pids: Vec<i32> = lab
        .nodes()
        .iter()
        .filter_map(|x| lab.daemon_pid(&x.name))
        .collect();
    let etcd_pid = lab.etcd_pid();
    let m0 = etcd_metrics(lab)?;
    let c0: Vec<Option<(u64, u64)>> = pids.iter().map(|p| cpu_rss(*p)).collect();
    let e0 = etcd_pid.and_then(cpu_rss);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(so.idle_secs));
    let secs = t.elapsed().as_secs_f64();
    let m1 = etcd_metrics(lab)?;
    let c1: Vec<Option<(u64, u64)>> = pids.iter().map(|p| cpu_rss(*p)).collect();
    let e1 = etcd_pid.and_then(cpu_rss);
    let reqs =
        metric_sum(&m1, "grpc_server_handled_total") - metric_sum(&m0, "grpc_server_handled_total");
    let tck = clk_tck();
    let mut cpu: Vec<f64> = Vec::new();
    let mut rss: Vec<f64> = Vec::new();
    for (a, b) in c0.iter().zip(&c1) {
        if let (Some(a), Some(b)) = (a, b) {
            cpu.push((b.0.saturating_sub(a.0)) as f64 / tck / secs * 100.0);
            rss.push(b.1 as f64);
        }
    }
    let cpu = sorted(cpu);
    let rss = sorted(rss);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (etcd_cpu, etcd_rss) = match (e0, e1) {
        (Some(a), Some(b)) => (
            (b.0.saturating_sub(a.0)) as f64 / tck / secs * 100.0,
            b.1 as f64,
        ),
        _ => (0.0, 0.0),
    };
    r += &format!(
        "idle {secs:.0} s: etcd handled {reqs:.0} gRPC requests = {:.4} requests/s per node; \
         twilld CPU mean {:.3} %, max {:.3} % of a core; twilld RSS mean {}, max {}; \
         all twilld together {:.1} % of a core\n",
        reqs / secs / n as f64,
        mean(&cpu),
        cpu.last().copied().unwrap_or(0.0),
        mb(mean(&rss)),
        mb(rss.last().copied().unwrap_or(0.0)),
        cpu.iter().sum::<f64>()
    );
    r += &format!(
        "etcd: RSS {}, CPU {:.2} % of a core idle, DB size {:.0} kB ({:.0} kB in use), {} keys \
         under {ETCD_PREFIX}/subnets, revision {:.0}\n",
        mb(etcd_rss),
        etcd_cpu,
        metric_sum(&m1, "etcd_mvcc_db_total_size_in_bytes") / 1e3,
        metric_sum(&m1, "etcd_mvcc_db_total_size_in_use_in_bytes") / 1e3,
        keys,
        metric_sum(&m1, "etcd_debugging_mvcc_current_revision")
    );

    // 5. Kernel state on one node.
    if let Some(x) = lab.nodes().first() {
        let count = |argv: &[&str]| run_in(&x.ns, argv).map(|s| s.lines().count()).unwrap_or(0);
        let routes = mons.first().map_or(0, |m| m.routes().len());
        let neigh = count(&["ip", "neigh", "show", "dev", "twill.1"]);
        let fdb = count(&["bridge", "fdb", "show", "dev", "twill.1"]);
        r += &format!(
            "kernel state on {}: {routes} peer routes, {neigh} neighbours and {fdb} FDB entries on twill.1\n",
            x.name
        );
    }
    r += &format!("load average at end {}\n", loadavg());
    let _ = addr::MAX_NODES;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            base64(b"/coreos.com/network/subnets/10.0.1.0-24"),
            "L2NvcmVvcy5jb20vbmV0d29yay9zdWJuZXRzLzEwLjAuMS4wLTI0"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 99.0), 20.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn metrics_are_summed_over_labels_and_not_prefixes() {
        let t = "# HELP x\ngrpc_server_handled_total{a=\"1\"} 3\ngrpc_server_handled_total{a=\"2\"} 4\ngrpc_server_handled_total_other 9\ntwill_ready 1\n";
        assert_eq!(metric_sum(t, "grpc_server_handled_total"), 7.0);
        assert_eq!(metric_sum(t, "twill_ready"), 1.0);
    }

    #[test]
    fn free_subnets_avoid_used_ones_and_the_edges() {
        let net: Ipv4Network = "10.244.0.0/16".parse().unwrap();
        let used = vec!["10.244.254.0/24".parse().unwrap()];
        let f = free_subnets(net, &used, 2);
        assert_eq!(
            f,
            vec![
                "10.244.253.0/24".parse().unwrap(),
                "10.244.252.0/24".parse().unwrap()
            ]
        );
    }
}
