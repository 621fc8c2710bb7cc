//! End-to-end: `twill-lab bench`'s measuring code on a 2-node lab. Asserts that every path
//! carries TCP (iperf3 reports a throughput) with 1 and 4 streams, that the hand-made nodes got
//! twilld's nft table and flannel's iptables rules (and that traffic went through the latter),
//! that the report has twill against (a) and (b) with the targets, and that the hand-made
//! namespaces are gone afterwards. No timing assertions: the figures themselves are for the
//! report (docs/lab.md). Needs root and `cargo build --workspace --bins`.
#![cfg(feature = "root")]

use std::path::Path;

use twill_lab::bench::PathKind;
use twill_lab::{self as lab, bench, Lab, LabOptions};

/// Takes the lab down on drop, pass or fail.
struct Guard {
    lab: Option<Lab>,
    _root: tempfile::TempDir,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take() {
            let res = lab.down();
            if !std::thread::panicking() {
                res.expect("lab down");
            }
        }
    }
}

fn lab_namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The `[packets:bytes]` counter of the first `iptables-save -c` line that ends with `rule`.
fn packets(saved: &str, rule: &str) -> u64 {
    saved
        .lines()
        .find(|l| l.ends_with(rule))
        .and_then(|l| l.strip_prefix('[')?.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counted rule {rule:?} in\n{saved}"))
}

fn state_files(lab: &Lab, prefix: &str, suffix: &str) -> Vec<String> {
    std::fs::read_dir(lab.state_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect()
}

#[test]
fn bench_measures_all_six_paths_at_1_and_4_streams_and_cleans_up() {
    let root = tempfile::Builder::new()
        .prefix("twill-e2e-bench")
        .tempdir()
        .unwrap();
    let name = format!("e2eb{}", std::process::id() % 100_000);
    let mut o = LabOptions::new(&name);
    o.root = root.path().to_path_buf();
    o.bin_src = twill_tests::bins::target_dir();
    let mut out = Vec::new();
    let lab = match lab::up(o.clone(), 2, 1, &mut out) {
        Ok(lab) => lab,
        Err(e) => {
            // A half-built lab (daemons, namespaces) is not the guard's yet: remove it here.
            if let Ok(Some(partial)) = Lab::open(&o.root, &o.name) {
                let _ = partial.down();
            }
            panic!("lab up: {e}\n{}", String::from_utf8_lossy(&out));
        }
    };
    let mut g = Guard {
        lab: Some(lab),
        _root: root,
    };
    let lab = g.lab.as_mut().unwrap();
    let before = lab_namespaces(&format!("{name}-"));

    let opts = bench::BenchOptions {
        seconds: 1,
        runs: 1,
        streams: vec![1, 4],
    };
    let mut log = Vec::new();
    let res = bench::run(lab, &opts, &mut log);
    let log = String::from_utf8_lossy(&log);
    let res = res.unwrap_or_else(|e| panic!("bench: {e}\n{log}"));

    let labels: Vec<&str> = res.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(res.len(), 12, "{labels:?}");
    let want = [
        (PathKind::Underlay, "node->node underlay"),
        (PathKind::BareVxlan, "hand VXLAN node->node, bare"),
        (PathKind::HandBare, "(b) hand topology pod->pod, no rules"),
        (
            PathKind::HandFlannel,
            "(a) hand topology pod->pod + flannel's iptables rules",
        ),
        (
            PathKind::HandTwillNft,
            "hand topology pod->pod + twilld's nft table",
        ),
        (PathKind::Twill, "twill pod->pod"),
    ];
    for (i, r) in res.iter().enumerate() {
        let (kind, label) = want[i % want.len()];
        assert_eq!(r.kind, kind, "{}", r.label);
        assert!(r.label.starts_with(label), "{} vs {label}", r.label);
        assert_eq!(r.streams, if i < want.len() { 1 } else { 4 }, "{}", r.label);
        assert_eq!(r.runs.len(), 1);
        assert!(
            r.runs[0] > 0.0,
            "{} -P {}: no throughput\n{log}",
            r.label,
            r.streams
        );
    }
    // The table given to the hand-made nodes is twilld's, with the hand subnets.
    let nft = state_files(lab, "nft-", ".nft");
    assert_eq!(
        nft.len(),
        2,
        "one table per hand-made node with twilld's rules"
    );
    for t in &nft {
        assert!(t.contains("table ip twill"), "{t}");
        assert!(t.contains("masquerade"), "{t}");
        assert!(t.contains("10.99.0.0/16") && !t.contains("10.244."), "{t}");
    }
    // flannel's rules were in the kernel of both flannel nodes, and the measured traffic
    // went through them: the forward accept and the masquerade chain's jump counted packets.
    let saved = state_files(lab, "iptables-", ".save");
    assert_eq!(
        saved.len(),
        2,
        "one iptables-save per hand-made node with flannel's rules"
    );
    for t in &saved {
        assert!(
            packets(
                t,
                "-A FLANNEL-FWD -s 10.99.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"
            ) > 0,
            "{t}"
        );
        assert!(
            packets(
                t,
                "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"
            ) > 0,
            "{t}"
        );
        assert!(t.contains("-j MASQUERADE --random-fully"), "{t}");
        assert!(!t.contains("10.244."), "{t}");
    }
    // The report sets twill against (a) and (b) per stream count, targets on single-stream.
    let report = bench::report(&res, &opts, true);
    for streams in ["1", "4"] {
        let row = report
            .lines()
            .find(|l| l.split_whitespace().next() == Some(streams))
            .unwrap_or_else(|| panic!("no headline row for -P {streams}:\n{report}"));
        assert_eq!(
            row.split_whitespace().count(),
            if streams == "1" { 9 } else { 5 },
            "{row}"
        );
    }
    assert!(
        report.contains("twill/(a)") && report.contains("twill/(b)"),
        "{report}"
    );
    assert!(
        report.contains(">= 0.98") && report.contains(">= 0.93"),
        "{report}"
    );

    // Hand-made namespaces are gone; the lab's own are untouched.
    assert_eq!(lab_namespaces(&format!("{name}-")), before);
    assert!(lab.extra_namespaces().is_empty());
    for n in lab.nodes() {
        assert!(Path::new("/run/netns").join(&n.ns).exists());
    }
}
