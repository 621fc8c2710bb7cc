//! Scale benchmark for `twilld` (not a test): with N leases (default 5,000) already in etcd,
//! measures
//!   1. the time from starting twilld to all N peers programmed (neighbour + FDB + route),
//!   2. the time from one new lease written to its route on the running node (repeated),
//!   3. twilld's peak RSS (VmHWM).
//!
//! It prints them against the targets (3 s, 100 ms, 20 MB).
//!
//! Run as root after `cargo build --release --workspace --bins`:
//! `target/release/twilld-scale-bench [--leases 5000] [--samples 20]`.
//! Everything runs in namespaces it creates (underlay + one node); etcd listens on the
//! underlay bridge. Leases are written with etcd's JSON gateway (`/v3/kv/txn`, 100 puts per
//! transaction) through curl inside the underlay namespace.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use clap::Parser;
use twill_tests::etcd::Etcd;
use twill_tests::underlay::{wait_for, NodeDirs, Twilld, Underlay};

const PREFIX: &str = "/coreos.com/network";

#[derive(Parser)]
struct Args {
    /// Leases written to etcd before twilld starts.
    #[arg(long, default_value_t = 5000)]
    leases: u32,
    /// New-lease latency samples.
    #[arg(long, default_value_t = 20)]
    samples: u32,
}

/// Subnet i (1-based) of 10.0.0.0/8 split in /24s, and its fake peer.
fn lease(i: u32) -> (String, String, String) {
    let subnet = Ipv4Addr::from(0x0a00_0000 | (i << 8));
    let public = Ipv4Addr::from(0x6440_0000 | i); // 100.64.x.y
    let mac = format!(
        "02:00:00:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    );
    let key = format!("{PREFIX}/subnets/{subnet}-24");
    let value = format!(
        r#"{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    (key, value, format!("{subnet}/24"))
}

/// POSTs JSON to etcd's gateway from inside the underlay namespace.
fn gateway(ul: &Underlay, etcd: &Etcd, path: &str, body: &str) -> Result<String, String> {
    let url = format!("{}{path}", etcd.endpoint());
    let out = twill_tests::sh::run_with_input(
        &[
            "ip",
            "netns",
            "exec",
            ul.ns_name(),
            "curl",
            "-sf",
            "-X",
            "POST",
            &url,
            "--data-binary",
            "@-",
        ],
        &[],
        body.as_bytes(),
    );
    if !out.status.success() {
        return Err(format!(
            "POST {path} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn put_leases(
    ul: &Underlay,
    etcd: &Etcd,
    range: std::ops::RangeInclusive<u32>,
    lease_id: &str,
) -> Result<(), String> {
    let all: Vec<u32> = range.collect();
    for chunk in all.chunks(100) {
        let ops: Vec<String> = chunk
            .iter()
            .map(|i| {
                let (k, v, _) = lease(*i);
                format!(
                    r#"{{"requestPut":{{"key":"{}","value":"{}","lease":"{lease_id}"}}}}"#,
                    BASE64.encode(k),
                    BASE64.encode(v)
                )
            })
            .collect();
        gateway(
            ul,
            etcd,
            "/v3/kv/txn",
            &format!(r#"{{"success":[{}]}}"#, ops.join(",")),
        )?;
    }
    Ok(())
}

fn metric(ns: &str, port: u16, name: &str) -> Option<u64> {
    let out = twill_tests::sh::output_in(
        ns,
        &["curl", "-s", &format!("http://127.0.0.1:{port}/metrics")],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn count_lines(ns: &str, argv: &[&str]) -> usize {
    let out = twill_tests::sh::output_in(ns, argv);
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Release builds abort on panic (no destructors), so failures are returned: the namespaces,
/// etcd and twilld are then removed by their guards before the exit.
fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twilld-scale-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let n = args.leases;
    let ul = Underlay::new();
    let etcd = Etcd::start_in(ul.ns_name(), &ul.etcd_ip().to_string());
    etcd.etcdctl(&[
        "put",
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.0.0.0/8"}"#,
    ]);
    let grant = gateway(&ul, &etcd, "/v3/lease/grant", r#"{"TTL":3600}"#)?;
    let v: serde_json::Value =
        serde_json::from_str(&grant).map_err(|e| format!("lease grant reply: {e}"))?;
    let lease_id = v["ID"]
        .as_str()
        .ok_or_else(|| format!("no lease ID in {grant}"))?
        .to_string();
    let t = Instant::now();
    put_leases(&ul, &etcd, 1..=n, &lease_id)?;
    println!("wrote {n} leases in {:.2} s", t.elapsed().as_secs_f64());

    let node = ul.add_node();
    let dirs = NodeDirs::new();
    let port = 18099u16;
    let port_arg = format!("--healthz-port={port}");
    let started = Instant::now();
    let mut daemon = Twilld::start(
        node.name(),
        &dirs,
        &etcd.endpoint(),
        &["--iface=eth0", "--healthz-ip=127.0.0.1", &port_arg],
    );
    let pid = daemon.pid().ok_or("twilld has no pid")?;
    let all = wait_for(
        || metric(node.name(), port, "twill_peers_programmed") == Some(n as u64),
        Duration::from_secs(120),
    );
    let startup = started.elapsed();
    if !all {
        return Err(format!(
            "twilld never programmed all {n} peers; log:\n{}",
            daemon.log()
        ));
    }
    let routes = count_lines(
        node.name(),
        &["ip", "-4", "route", "show", "dev", "twill.1"],
    );
    let neigh = count_lines(
        node.name(),
        &["ip", "-4", "neigh", "show", "dev", "twill.1"],
    );
    let fdb = count_lines(node.name(), &["bridge", "fdb", "show", "dev", "twill.1"]);
    if !(routes == n as usize && neigh == n as usize && fdb >= n as usize) {
        return Err(format!(
            "kernel has {routes} routes, {neigh} neighbours, {fdb} FDB entries for {n} peers"
        ));
    }

    // One new lease at a time: write it, poll for its route.
    let mut lat = Vec::new();
    for s in 0..args.samples {
        // From the top of the pool: twilld took one of the first free subnets after the N.
        let i = 65_000 - s;
        let (_, _, subnet) = lease(i);
        let t0 = Instant::now();
        put_leases(&ul, &etcd, i..=i, &lease_id)?;
        let seen = wait_for_fast(|| {
            let out = twill_tests::sh::output_in(
                node.name(),
                &["ip", "-4", "route", "show", "exact", &subnet],
            );
            !out.stdout.is_empty()
        });
        if !seen {
            return Err(format!(
                "route for {subnet} never appeared; log:\n{}",
                daemon.log()
            ));
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    let median = lat.get(lat.len() / 2).copied().unwrap_or_default();
    let max = lat.last().copied().unwrap_or_default();
    let hwm = vm_hwm_kib(pid).unwrap_or(0);
    daemon.terminate();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let profile = twill_tests::bins::target_dir();
    println!(
        "twilld scale bench: {n} peers (vxlan), binaries from {}",
        profile.display()
    );
    println!(
        "  start -> all peers programmed : {:8.1} ms   target 3000 ms  ratio {:.2}",
        ms(startup),
        ms(startup) / 3000.0
    );
    println!(
        "  new lease -> route (median)   : {:8.1} ms   target  100 ms  ratio {:.2}   (max {:.1} ms, {} samples, includes spawning curl)",
        ms(median),
        ms(median) / 100.0,
        ms(max),
        lat.len()
    );
    println!(
        "  peak RSS (VmHWM)              : {:8.1} MB   target   20 MB  ratio {:.2}",
        hwm as f64 / 1024.0,
        hwm as f64 / 1024.0 / 20.0
    );
    Ok(())
}

/// Polls every 2 ms for up to 10 s.
fn wait_for_fast(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}
