//! CNI benchmark, driven through libcni (`cniharness bench`) inside a throw-away node namespace,
//! with the config a runtime would pass (flannel's delegate shape, cni-notes §15.2):
//! 1. twill-bridge + twill-host-local against Debian's reference bridge + host-local;
//! 2. the hostPort chain: the same twill bridge + IPAM followed by twill-portmap against the
//!    same chain with the reference portmap, every pod mapping its own host port.
//!
//! Prints ADD and DEL p50/p90 per side and the twill/reference ratios, then the binary sizes.
//!
//! Run as root after `cargo build --release --workspace --bins`:
//! `target/release/cni-bench [--pods 50] [--parallel 1,8] [--rounds 1]`

use std::path::{Path, PathBuf};

use clap::Parser;
use serde_json::{json, Value};
use twill_tests::bins::{target_dir, REFERENCE_CNI_DIR};
use twill_tests::netns::Netns;

#[derive(Parser)]
#[command(about = "twill vs reference CNI bridge+host-local latency and binary size")]
struct Args {
    /// Pods per run.
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// Parallelism levels, comma separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    parallel: Vec<usize>,
    /// Runs per side and level; the reported figures are the medians over rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

struct Side {
    label: &'static str,
    confdir: PathBuf,
    bin: String,
    cache: PathBuf,
    /// Pod i maps host port `port_base + i` (0: no mappings).
    port_base: u16,
}

fn conflist(bridge_type: &str, ipam_type: &str, bridge: &str, subnet: &str, data: &Path) -> Value {
    json!({"cniVersion": "1.0.0", "name": "cnibench", "plugins": [{
        "type": bridge_type, "bridge": bridge, "isGateway": true, "ipMasq": false, "hairpinMode": true,
        "ipam": {"type": ipam_type, "subnet": subnet, "dataDir": data, "routes": [{"dst": "0.0.0.0/0"}]}
    }]})
}

/// [`conflist`] with a portmap plugin of `portmap_type` chained after the bridge.
fn with_portmap(mut list: Value, portmap_type: &str) -> Value {
    if let Some(plugins) = list["plugins"].as_array_mut() {
        plugins.push(json!({"type": portmap_type, "capabilities": {"portMappings": true}}));
    }
    list
}

fn side(label: &'static str, root: &Path, list: Value, bin: String) -> Side {
    let confdir = root.join(label).join("conf");
    std::fs::create_dir_all(&confdir).expect("mkdir conf");
    std::fs::write(confdir.join("10-bench.conflist"), list.to_string()).expect("write conflist");
    Side {
        label,
        confdir,
        bin,
        cache: root.join(label).join("cache"),
        port_base: 0,
    }
}

fn run(node: &Netns, s: &Side, pods: usize, par: usize) -> Value {
    let (confdir, cache) = (
        s.confdir.display().to_string(),
        s.cache.display().to_string(),
    );
    let (n, p, ports) = (pods.to_string(), par.to_string(), s.port_base.to_string());
    let out = node.exec(&[
        "cniharness",
        "bench",
        "-confdir",
        &confdir,
        "-bin",
        &s.bin,
        "-n",
        &n,
        "-parallel",
        &p,
        "-cache",
        &cache,
        "-port-base",
        &ports,
    ]);
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("bad bench output {out:?}: {e}"));
    assert_eq!(v["failures"], 0, "{}: failures in {v}", s.label);
    assert_eq!(v["unique_ips"], pods as u64, "{}: {v}", s.label);
    v
}

/// Runs both sides at every parallelism level and prints their figures and ratios.
fn compare(node: &Netns, sides: [&Side; 2], args: &Args) {
    println!(
        "{:<10} {:>4} {:>9} {:>9} {:>9} {:>9}",
        "side", "par", "ADD p50", "ADD p90", "DEL p50", "DEL p90"
    );
    let keys = ["add_ms_p50", "add_ms_p90", "del_ms_p50", "del_ms_p90"];
    for &par in &args.parallel {
        let mut figs: Vec<[f64; 4]> = Vec::new();
        for s in sides {
            let mut per: [Vec<f64>; 4] = Default::default();
            for _ in 0..args.rounds.max(1) {
                let v = run(node, s, args.pods, par);
                for (i, k) in keys.iter().enumerate() {
                    per[i].push(v[k].as_f64().unwrap_or(f64::NAN));
                }
            }
            let f = per.map(median);
            println!(
                "{:<10} {:>4} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                s.label, par, f[0], f[1], f[2], f[3]
            );
            figs.push(f);
        }
        let r: Vec<f64> = (0..4).map(|i| figs[0][i] / figs[1][i]).collect();
        println!(
            "{:<10} {:>4} {:>8.2}x {:>8.2}x {:>8.2}x {:>8.2}x",
            "ratio", par, r[0], r[1], r[2], r[3]
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    let dir = target_dir();
    for b in [
        "twill-bridge",
        "twill-host-local",
        "twill-loopback",
        "twill-portmap",
    ] {
        assert!(
            dir.join(b).is_file(),
            "{b} missing in {}: build the workspace bins first",
            dir.display()
        );
    }
    if !dir.ends_with("release") {
        eprintln!(
            "warning: measuring {} binaries; use --release for the real figures",
            dir.display()
        );
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let twill = side(
        "twill",
        root,
        conflist(
            "twill-bridge",
            "twill-host-local",
            "cnitest0",
            "10.244.7.0/24",
            &root.join("twill-data"),
        ),
        format!("{}:{REFERENCE_CNI_DIR}", dir.display()),
    );
    let reference = side(
        "reference",
        root,
        conflist(
            "bridge",
            "host-local",
            "cnitest1",
            "10.244.8.0/24",
            &root.join("ref-data"),
        ),
        REFERENCE_CNI_DIR.to_string(),
    );
    let twill_pm = Side {
        port_base: 20000,
        ..side(
            "twill-pm",
            root,
            with_portmap(
                conflist(
                    "twill-bridge",
                    "twill-host-local",
                    "cnitest2",
                    "10.244.9.0/24",
                    &root.join("pm-twill-data"),
                ),
                "twill-portmap",
            ),
            format!("{}:{REFERENCE_CNI_DIR}", dir.display()),
        )
    };
    let reference_pm = Side {
        port_base: 30000,
        ..side(
            "ref-pm",
            root,
            with_portmap(
                conflist(
                    "twill-bridge",
                    "twill-host-local",
                    "cnitest3",
                    "10.244.10.0/24",
                    &root.join("pm-ref-data"),
                ),
                "portmap",
            ),
            format!("{}:{REFERENCE_CNI_DIR}", dir.display()),
        )
    };
    let node = Netns::new("bench");
    println!(
        "CNI ADD/DEL latency through libcni, {} pods per run, {} round(s), ms",
        args.pods, args.rounds
    );
    println!("1. bridge + host-local: twill's against the reference plugins");
    compare(&node, [&twill, &reference], &args);
    println!();
    println!(
        "2. hostPort chain (twill-bridge + twill-host-local + portmap, one host port per pod): \
         twill-portmap against the reference portmap (target <= 0.5x)"
    );
    compare(&node, [&twill_pm, &reference_pm], &args);
    println!("note: twill's DEL returns once the pod link is down and renamed (the pod has no eth0 any more);");
    println!(
        "      the kernel's veth free (an RCU barrier, ~15-20 ms) finishes in a forked reaper."
    );
    println!();
    println!(
        "{:<28} {:>12} {:>28} {:>12}",
        "twill binary", "bytes", "reference binary", "bytes"
    );
    let (mut ours, mut theirs) = (0, 0);
    for (a, b) in [
        ("twill-bridge", "bridge"),
        ("twill-host-local", "host-local"),
        ("twill-loopback", "loopback"),
    ] {
        let (sa, sb) = (
            size(&dir.join(a)),
            size(&Path::new(REFERENCE_CNI_DIR).join(b)),
        );
        ours += sa;
        theirs += sb;
        println!("{a:<28} {sa:>12} {b:>28} {sb:>12}");
    }
    println!(
        "{:<28} {:>12} {:>28} {:>12}  ({:.2}x; budget 8 MB: {})",
        "total",
        ours,
        "total",
        theirs,
        ours as f64 / theirs as f64,
        if ours <= 8 * 1024 * 1024 {
            "ok"
        } else {
            "EXCEEDED"
        }
    );
    // Give detached reapers of the last DELs a moment before the node goes away with its links.
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(node);
}
