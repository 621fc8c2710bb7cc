//! End-to-end: the lab at (small) scale. `twill-lab up` with many nodes and no pods (parallel
//! start, readiness from the conflists appearing, summarised tables), and the `scale`
//! measurement's shape: every figure reported, nothing changed by the renewal storm, nothing
//! left behind. No timing is asserted (CI machines vary); the 1,000-node run is a bench
//! (`twill-lab scale`, docs/capacity.md). Needs root and `cargo build --workspace --bins`.
#![cfg(feature = "root")]

use std::path::Path;

use twill_lab::routemon::RouteMon;
use twill_lab::scale::{self, ScaleOptions};
use twill_lab::{self as lab, Lab, LabOptions, NodeState};

fn options(tag: &str, root: &Path, nodes: usize) -> LabOptions {
    let mut o = LabOptions::new(&format!("e2s{}{tag}", std::process::id() % 100_000));
    o.root = root.to_path_buf();
    o.bin_src = twill_tests::bins::target_dir();
    o.network = lab::addr::default_network(nodes).to_string();
    o
}

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the lab when the test ends, pass or fail.
struct Down(Option<Lab>);

impl Drop for Down {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            let _ = l.down();
        }
    }
}

#[test]
fn up_with_many_nodes_and_no_pods_is_ready_meshed_and_summarised() {
    let root = tempfile::tempdir().unwrap();
    let nodes = 24;
    let o = options("up", root.path(), nodes);
    let name = o.name.clone();
    let mut out = Vec::new();
    let res = lab::up(o.clone(), nodes, 0, &mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    eprintln!("{text}");
    let lab = match res {
        Ok(l) => Down(Some(l)),
        Err(e) => {
            if let Ok(Some(p)) = Lab::open(&o.root, &o.name) {
                let _ = p.down();
            }
            panic!("up failed: {e}");
        }
    };
    let l = lab.0.as_ref().unwrap();
    assert_eq!(l.nodes().len(), nodes);
    assert!(l.pods().is_empty());
    for n in l.nodes() {
        assert_eq!(l.node_state(&n.name), NodeState::Ready, "{}", n.name);
    }
    // A large lab's output is a summary, not a line per node.
    assert!(
        text.contains(&format!("{nodes} nodes NotReady -> Ready")),
        "{text}"
    );
    assert!(text.contains("first and last 5 shown"), "{text}");
    assert!(!text.contains("node7: NotReady -> Ready"), "{text}");
    // Every node routes every other one (seen through the route monitor's dump).
    let net: ipnetwork::Ipv4Network = l.options().network.parse().unwrap();
    for n in [&l.nodes()[0], &l.nodes()[nodes / 2], &l.nodes()[nodes - 1]] {
        let mut m = [RouteMon::open(&n.ns, net, 24).unwrap()];
        let ok = twill_lab::routemon::run_until(
            &mut m,
            std::time::Duration::from_secs(60),
            |_, _, _| {},
            |m| m[0].routes().len() == nodes - 1,
        )
        .unwrap();
        assert!(ok, "{}: {} peer routes", n.name, m[0].routes().len());
    }
    // Node and etcd resolve each other through permanent entries (the shared neighbour
    // table's gc_thresh never applies).
    let n1 = &l.nodes()[0];
    let neigh =
        twill_lab::process::run(&["ip", "-n", &n1.ns, "neigh", "show", "192.168.100.254"]).unwrap();
    assert!(neigh.contains("PERMANENT"), "{neigh}");
    let ul =
        twill_lab::process::run(&["ip", "-n", l.underlay_ns(), "neigh", "show", "dev", "br-ul"])
            .unwrap();
    assert_eq!(
        ul.lines().filter(|x| x.contains("PERMANENT")).count(),
        nodes,
        "{ul}"
    );
    drop(lab);
    assert!(namespaces_with_prefix(&name).is_empty());
    assert!(!root.path().join(&name).exists());
}

#[test]
fn scale_reports_every_figure_changes_no_subnet_and_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let nodes = 10;
    let o = options("sc", root.path(), nodes);
    let name = o.name.clone();
    let so = ScaleOptions {
        nodes,
        joins: 3,
        idle_secs: 2,
    };
    let mut progress = Vec::new();
    let report = scale::run(o, &so, &mut progress);
    eprintln!("{}", String::from_utf8_lossy(&progress));
    let report = report.unwrap();
    eprintln!("{report}");
    for want in [
        "start-up: namespaces built and 10 twilld spawned",
        "full mesh (90 routes)",
        "join (lease written -> its route on every one of 10 nodes), 3 samples",
        "leave (lease deleted -> its route gone from every node), 3 samples",
        "subnets changed: 0; routes lost meanwhile: 0; lease keys in etcd: 10",
        "requests/s per node",
        "twilld RSS mean",
        "etcd: RSS",
        "kernel state on node1: 9 peer routes, 9 neighbours and 9 FDB entries on twill.1",
    ] {
        assert!(report.contains(want), "missing {want:?} in:\n{report}");
    }
    assert!(namespaces_with_prefix(&name).is_empty());
    assert!(!root.path().join(&name).exists());
}
