//! End-to-end: `twill-lab bench`'s measuring code on a 2-node lab. Asserts that every path
//! carries TCP (iperf3 reports a throughput), that the hand-made twill topology got twilld's
//! nft table, and that the hand-made namespaces are gone afterwards. No timing assertions:
//! the figures themselves are for the report (docs/lab.md). Needs root and
//! `cargo build --workspace --bins`.

use std::path::Path;

use twill_tests::lab::{self, bench, Lab, LabOptions};

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

#[test]
fn bench_measures_all_five_paths_and_cleans_up() {
    let root = tempfile::Builder::new()
        .prefix("twill-e2e-bench")
        .tempdir()
        .unwrap();
    let name = format!("e2eb{}", std::process::id() % 100_000);
    let mut o = LabOptions::new(&name);
    o.root = root.path().to_path_buf();
    o.bin_src = twill_tests::bins::target_dir();
    let mut out = Vec::new();
    let lab = lab::up(o, 2, 1, &mut out).unwrap_or_else(|e| {
        panic!("lab up: {e}\n{}", String::from_utf8_lossy(&out));
    });
    let mut g = Guard {
        lab: Some(lab),
        _root: root,
    };
    let lab = g.lab.as_mut().unwrap();
    let before = lab_namespaces(&format!("{name}-"));

    let opts = bench::BenchOptions {
        seconds: 1,
        runs: 1,
        streams: 1,
    };
    let mut log = Vec::new();
    let res = bench::run(lab, &opts, &mut log);
    let log = String::from_utf8_lossy(&log);
    let res = res.unwrap_or_else(|e| panic!("bench: {e}\n{log}"));

    let labels: Vec<&str> = res.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(res.len(), 5, "{labels:?}");
    for (r, want) in res.iter().zip([
        "node->node underlay",
        "hand VXLAN node->node, bare",
        "hand twill topology pod->pod, no rules",
        "hand twill topology pod->pod + twilld's nft table",
        "twill pod->pod",
    ]) {
        assert!(r.label.starts_with(want), "{} vs {want}", r.label);
        assert_eq!(r.runs.len(), 1);
        assert!(r.runs[0] > 0.0, "{}: no throughput\n{log}", r.label);
    }
    // The table given to the hand-made nodes is twilld's, with the hand subnets.
    let nft = std::fs::read_dir(lab.state_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("nft-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(nft.len(), 2, "one table per hand-made node with rules");
    for t in &nft {
        assert!(t.contains("table ip twill"), "{t}");
        assert!(t.contains("masquerade"), "{t}");
        assert!(t.contains("10.99.0.0/16") && !t.contains("10.244."), "{t}");
    }
    let report = bench::report(&res, &opts);
    assert!(report.contains("target >= 95 %"), "{report}");

    // Hand-made namespaces are gone; the lab's own are untouched.
    assert_eq!(lab_namespaces(&format!("{name}-")), before);
    assert!(lab.extra_namespaces().is_empty());
    for n in lab.nodes() {
        assert!(Path::new("/run/netns").join(&n.ns).exists());
    }
}
