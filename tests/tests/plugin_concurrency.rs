//! twill-bridge + twill-host-local under concurrency, DEL idempotency (also without a netns),
//! GC and STATUS. Root only; every node and pod is a throw-away namespace.
#![cfg(feature = "root")]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::{json, Value};
use std::time::Duration;
use twill_tests::cni::{exec, host_veths, reservations, twill, with_prev, Invocation};
use twill_tests::netns::Netns;
use twill_tests::underlay::wait_for;

fn conf(name: &str, bridge: &str, subnet: &str, data: &std::path::Path, masq: bool) -> Value {
    json!({
        "cniVersion": "1.1.0", "name": name, "type": "twill-bridge", "bridge": bridge,
        "isGateway": true, "ipMasq": masq,
        "ipam": {"type": "twill-host-local", "subnet": subnet, "dataDir": data, "routes": [{"dst": "0.0.0.0/0"}]}
    })
}

/// Comments of the masquerade rules in `node` (empty when twill's table is absent).
fn masq_rules(node: &Netns) -> Vec<String> {
    let out = node.output(&["nft", "list", "chain", "inet", "twill_masq", "postrouting"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("comment \"").nth(1))
        .map(|c| c.trim_end_matches('"').to_string())
        .collect()
}

fn par_for(n: usize, par: usize, f: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..par {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                f(i);
            });
        }
    });
}

#[test]
fn two_hundred_parallel_adds_then_dels_leave_nothing() {
    const N: usize = 200;
    let node = Netns::new("nc");
    let data = tempfile::tempdir().unwrap();
    let c = conf("twcc", "twccbr0", "10.210.0.0/24", data.path(), true);
    let bin = twill("twill-bridge");
    let pods: Vec<Netns> = (0..N).map(|_| Netns::new("pc")).collect();
    let results: Mutex<Vec<Option<Value>>> = Mutex::new(vec![None; N]);
    // All first ADDs race on a fresh node: bridge, its address and the nft table are created concurrently.
    par_for(N, 16, |i| {
        let r = exec(
            Some(&node),
            &bin,
            &Invocation::new("ADD", &format!("cc{i}"), &pods[i].path()),
            &c,
        )
        .ok();
        results.lock().unwrap()[i] = Some(r);
    });
    let results: Vec<Value> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let ips: HashSet<String> = results
        .iter()
        .map(|r| r["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), N, "every pod got its own IP");
    assert_eq!(reservations(data.path(), "twcc").len(), N);
    assert_eq!(host_veths(&node).len(), N);
    assert_eq!(masq_rules(&node).len(), N);

    par_for(N, 16, |i| {
        let inv = Invocation::new("DEL", &format!("cc{i}"), &pods[i].path());
        exec(Some(&node), &bin, &inv, &with_prev(&c, &results[i])).ok();
    });
    assert!(reservations(data.path(), "twcc").is_empty());
    let left: Vec<String> = twill_tests::cni::files(&data.path().join("twcc"));
    assert_eq!(
        left,
        ["last_reserved_ip.0", "lock"],
        "only the allocator's own files stay"
    );
    assert!(masq_rules(&node).is_empty());
    assert!(pods.iter().all(|p| !p.has_link("eth0")));
    // The kernel finishes the veth teardown in the background.
    assert!(
        wait_for(|| host_veths(&node).is_empty(), Duration::from_secs(10)),
        "host veths left: {:?}",
        host_veths(&node)
    );
    // A second DEL of every pod succeeds too.
    par_for(N, 16, |i| {
        let inv = Invocation::new("DEL", &format!("cc{i}"), &pods[i].path());
        exec(Some(&node), &bin, &inv, &with_prev(&c, &results[i])).ok();
    });
}

#[test]
fn del_after_netns_is_gone_releases_ip_and_masquerade() {
    let node = Netns::new("ng");
    let data = tempfile::tempdir().unwrap();
    let c = conf("twgone", "twgobr0", "10.211.0.0/24", data.path(), true);
    let bin = twill("twill-bridge");
    for (id, netns_arg) in [("gone1", "path"), ("gone2", "empty")] {
        let pod = Netns::new("pg");
        let path = pod.path();
        let add = exec(Some(&node), &bin, &Invocation::new("ADD", id, &path), &c).ok();
        assert_eq!(reservations(data.path(), "twgone").len(), 1);
        assert_eq!(masq_rules(&node).len(), 1);
        drop(pod);
        let ns = if netns_arg == "path" {
            path.as_str()
        } else {
            ""
        };
        // Without prevResult too: state is keyed by network + container ID.
        exec(Some(&node), &bin, &Invocation::new("DEL", id, ns), &c).ok();
        assert!(
            reservations(data.path(), "twgone").is_empty(),
            "{id}: IP released"
        );
        assert!(masq_rules(&node).is_empty(), "{id}: masquerade removed");
        exec(
            Some(&node),
            &bin,
            &Invocation::new("DEL", id, ns),
            &with_prev(&c, &add),
        )
        .ok();
    }
    // A netns path whose namespace was unmounted is an empty regular file: DEL treats it as gone.
    let pod = Netns::new("pg");
    let add = exec(
        Some(&node),
        &bin,
        &Invocation::new("ADD", "gone3", &pod.path()),
        &c,
    )
    .ok();
    let stale = tempfile::NamedTempFile::new().unwrap();
    let stale_path = stale.path().display().to_string();
    exec(
        Some(&node),
        &bin,
        &Invocation::new("DEL", "gone3", &stale_path),
        &with_prev(&c, &add),
    )
    .ok();
    assert!(reservations(data.path(), "twgone").is_empty());
    assert!(masq_rules(&node).is_empty());
    drop(pod);
    assert!(wait_for(
        || host_veths(&node).is_empty(),
        Duration::from_secs(10)
    ));
}

#[test]
fn gc_releases_only_attachments_not_listed() {
    let node = Netns::new("nk");
    let data = tempfile::tempdir().unwrap();
    let c = conf("twgc", "twgcbr0", "10.212.0.0/24", data.path(), true);
    let bin = twill("twill-bridge");
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("pk")).collect();
    for (i, p) in pods.iter().enumerate() {
        exec(
            Some(&node),
            &bin,
            &Invocation::new("ADD", &format!("gc{i}"), &p.path()),
            &c,
        )
        .ok();
    }
    // No key at all: nothing is known to be stale, so nothing is released.
    exec(Some(&node), &bin, &Invocation::new("GC", "", ""), &c).ok();
    assert_eq!(reservations(data.path(), "twgc").len(), 3);
    assert_eq!(masq_rules(&node).len(), 3);
    let mut g = c.clone();
    g["cni.dev/valid-attachments"] = json!([{"containerID": "gc1", "ifname": "eth0"}]);
    exec(Some(&node), &bin, &Invocation::new("GC", "", ""), &g).ok();
    let kept = reservations(data.path(), "twgc");
    assert_eq!(kept.len(), 1);
    let owner = std::fs::read_to_string(data.path().join("twgc").join(&kept[0])).unwrap();
    assert_eq!(owner, "gc1\r\neth0");
    assert_eq!(masq_rules(&node), ["twill:twgc:gc1"]);
    let files = twill_tests::cni::files(&data.path().join("twgc"));
    assert!(
        files.contains(&"lock".to_string()) && files.contains(&"last_reserved_ip.0".to_string())
    );
    // An empty list is meaningful: everything goes.
    g["cni.dev/valid-attachments"] = json!([]);
    exec(Some(&node), &bin, &Invocation::new("GC", "", ""), &g).ok();
    assert!(reservations(data.path(), "twgc").is_empty());
    assert!(masq_rules(&node).is_empty());
}

#[test]
fn status_reports_50_when_the_pool_is_full() {
    let node = Netns::new("ns");
    let data = tempfile::tempdir().unwrap();
    // A /30 has one address besides the gateway.
    let c = conf("twst", "twstbr0", "10.213.0.0/30", data.path(), false);
    let bin = twill("twill-bridge");
    exec(Some(&node), &bin, &Invocation::new("STATUS", "", ""), &c).ok();
    let pod = Netns::new("ps");
    exec(
        Some(&node),
        &bin,
        &Invocation::new("ADD", "st1", &pod.path()),
        &c,
    )
    .ok();
    let st = exec(Some(&node), &bin, &Invocation::new("STATUS", "", ""), &c);
    assert_eq!(st.err_code(), 50, "{}", st.stdout);
    let hl = exec(
        None,
        &twill("twill-host-local"),
        &Invocation::new("STATUS", "", ""),
        &c,
    );
    assert_eq!(hl.err_code(), 50);
    exec(
        Some(&node),
        &bin,
        &Invocation::new("DEL", "st1", &pod.path()),
        &c,
    )
    .ok();
    exec(Some(&node), &bin, &Invocation::new("STATUS", "", ""), &c).ok();
}

#[test]
fn re_add_into_the_same_netns_right_after_del_reuses_name_and_address() {
    let node = Netns::new("nr");
    let pod = Netns::new("pr");
    let data = tempfile::tempdir().unwrap();
    let c = conf("twreadd", "twrabr0", "10.212.0.0/24", data.path(), true);
    let bin = twill("twill-bridge");
    let parked = |p: &Netns| {
        p.exec(&["ip", "-o", "link", "show"])
            .lines()
            .filter(|l| l.contains("twdel"))
            .count()
    };
    // Same container ID, ifname and address each time (a runtime that keeps the netns).
    let inv = |verb: &str| Invocation::new(verb, "readd", &pod.path()).args("IP=10.212.0.9");
    for _ in 0..5 {
        let r = exec(Some(&node), &bin, &inv("ADD"), &c).ok();
        assert_eq!(r["ips"][0]["address"], "10.212.0.9/24");
        exec(Some(&node), &bin, &inv("DEL"), &with_prev(&c, &r)).ok();
    }
    let r = exec(Some(&node), &bin, &inv("ADD"), &c).ok();
    assert!(pod
        .exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .contains("10.212.0.9/24"));
    assert!(
        wait_for(
            || parked(&pod) == 0 && host_veths(&node).len() == 1,
            Duration::from_secs(10)
        ),
        "parked links or host veths left: {} / {:?}",
        pod.exec(&["ip", "-o", "link", "show"]),
        host_veths(&node)
    );
    assert!(pod
        .exec(&["ip", "-4", "route", "show"])
        .contains("default via 10.212.0.1 dev eth0"));
    assert_eq!(masq_rules(&node).len(), 1);
    exec(Some(&node), &bin, &inv("DEL"), &with_prev(&c, &r)).ok();
    assert!(reservations(data.path(), "twreadd").is_empty());
    assert!(wait_for(
        || parked(&pod) == 0 && host_veths(&node).is_empty(),
        Duration::from_secs(10)
    ));
}

/// A reaper killed before it deleted its parked link (node reboot of the runtime, OOM) leaves a
/// `twdel…` link in a netns the runtime keeps; the next DEL there sweeps it too.
#[test]
fn del_sweeps_parked_links_a_killed_reaper_left_behind() {
    let node = Netns::new("nk");
    let pod = Netns::new("pk");
    let data = tempfile::tempdir().unwrap();
    let c = conf("twsweep", "twswbr0", "10.213.0.0/24", data.path(), false);
    let bin = twill("twill-bridge");
    // What a killed reaper leaves: a parked veth inside the pod, its peer in the node.
    pod.exec(&[
        "ip",
        "link",
        "add",
        "twdeldead",
        "type",
        "veth",
        "peer",
        "name",
        "vethdead",
        "netns",
        node.name(),
    ]);
    let inv = |verb: &str| Invocation::new(verb, "sweep", &pod.path());
    let r = exec(Some(&node), &bin, &inv("ADD"), &c).ok();
    exec(Some(&node), &bin, &inv("DEL"), &with_prev(&c, &r)).ok();
    assert!(
        wait_for(
            || !pod.has_link("twdeldead") && host_veths(&node).is_empty(),
            Duration::from_secs(10)
        ),
        "leftover parked link not swept: {} / {:?}",
        pod.exec(&["ip", "-o", "link", "show"]),
        host_veths(&node)
    );
}

/// Issue 9 item 7: concurrent DELs of one masqueraded attachment. Each DEL lists the rule
/// handles, then deletes them in one nft transaction; a handle another DEL removed in between
/// failed the whole DEL with 999 `delete rule … No such file or directory`.
#[test]
fn concurrent_dels_of_one_masqueraded_attachment_all_succeed() {
    let node = Netns::new("nd");
    let data = tempfile::tempdir().unwrap();
    let mut c = conf("twcd", "twcdbr0", "10.212.0.0/24", data.path(), true);
    // Two addresses, two rules per attachment: more handles to race on.
    c["ipam"] = json!({"type": "twill-host-local", "dataDir": data.path(),
        "ranges": [[{"subnet": "10.212.0.0/24"}], [{"subnet": "fd12:212::/64"}]]});
    let bin = twill("twill-bridge");
    // Another attachment whose rules must survive the storm.
    let bystander = Netns::new("pd");
    exec(
        Some(&node),
        &bin,
        &Invocation::new("ADD", "cdkeep", &bystander.path()),
        &c,
    )
    .ok();
    for round in 0..6 {
        let pod = Netns::new("pd");
        let id = format!("cd{round}");
        let result = exec(
            Some(&node),
            &bin,
            &Invocation::new("ADD", &id, &pod.path()),
            &c,
        )
        .ok();
        assert_eq!(
            masq_rules(&node)
                .iter()
                .filter(|r| r.ends_with(&id))
                .count(),
            2
        );
        let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
        par_for(16, 16, |i| {
            // Half with the netns and prevResult, half without a netns (GC-like teardown).
            let netns = if i % 2 == 0 {
                pod.path()
            } else {
                String::new()
            };
            let r = exec(
                Some(&node),
                &bin,
                &Invocation::new("DEL", &id, &netns),
                &with_prev(&c, &result),
            );
            if r.status != 0 {
                failures.lock().unwrap().push(r.stdout.clone());
            }
        });
        let failures = failures.into_inner().unwrap();
        assert!(
            failures.is_empty(),
            "round {round}: failed DELs: {failures:?}"
        );
        assert!(
            !masq_rules(&node).iter().any(|r| r.ends_with(&id)),
            "rules left: {:?}",
            masq_rules(&node)
        );
        assert!(!pod.has_link("eth0"));
    }
    assert_eq!(
        masq_rules(&node),
        ["twill:twcd:cdkeep", "twill:twcd:cdkeep"],
        "the bystander's rules are untouched"
    );
    assert_eq!(
        reservations(data.path(), "twcd").len(),
        2,
        "only the bystander's"
    );
    exec(
        Some(&node),
        &bin,
        &Invocation::new("DEL", "cdkeep", &bystander.path()),
        &c,
    )
    .ok();
    assert!(masq_rules(&node).is_empty());
    assert!(wait_for(
        || host_veths(&node).is_empty(),
        Duration::from_secs(10)
    ));
}
