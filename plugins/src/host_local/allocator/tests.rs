//! The allocator without root: mostly over the in-memory store, and the same scenarios over
//! the file store in a temp dir where the two must agree.

use super::*;
use crate::host_local::config::IpamConfig;
use crate::host_local::file_store::FileStore;
use crate::host_local::mem_store::MemStore;
use serde_json::{json, Value};
use twill_common::cni::{Env, NetConf};

/// Range sets as the plugin builds them from an `ipam` config (defaults, canonical bounds).
fn sets(ipam: Value) -> Vec<RangeSet> {
    let conf = NetConf::parse(
        json!({"cniVersion":"1.0.0","name":"n","type":"x","ipam":ipam})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let env = Env::from_lookup(|k| (k == "CNI_COMMAND").then(|| "STATUS".to_string())).unwrap();
    IpamConfig::load(&conf, &env).unwrap().range_sets
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|s| ip(s)).collect()
}

/// The addresses of one ADD, or its error code and message.
fn add<S: Store>(a: &Allocator<S>, id: &str, ifname: &str, req: &[&str]) -> String {
    match a.allocate(id, ifname, &ips(req)) {
        Ok(got) => got
            .iter()
            .map(|g| g.address.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        Err(e) => format!("err {} {}", e.code, e.msg),
    }
}

/// What the store holds, as `ip=id/ifname`.
fn held<S: Store>(a: &Allocator<S>) -> Vec<String> {
    a.store()
        .lock()
        .unwrap()
        .list()
        .unwrap()
        .iter()
        .map(|r| format!("{}={}/{}", r.ip, r.container_id, r.ifname))
        .collect()
}

fn v4_29() -> Vec<RangeSet> {
    // 10.9.0.1 (gateway) ..= 10.9.0.6: five allocatable addresses.
    sets(json!({"subnet":"10.9.0.0/29"}))
}

fn r(s: &str, e: &str) -> Range {
    Range {
        subnet: "10.0.0.0/24".parse().unwrap(),
        start: ip(s),
        end: ip(e),
        gateway: None,
    }
}

fn order(set: &RangeSet, last: Option<&str>) -> Vec<String> {
    round_robin(set, last.map(ip))
        .map(|(i, _)| i.to_string())
        .collect()
}

#[test]
fn round_robin_wraps_once() {
    let set = vec![r("10.0.0.2", "10.0.0.4"), r("10.0.0.10", "10.0.0.11")];
    let all = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.10", "10.0.0.11"];
    assert_eq!(order(&set, None), all);
    assert_eq!(
        order(&set, Some("10.0.0.3")),
        ["10.0.0.4", "10.0.0.10", "10.0.0.11", "10.0.0.2", "10.0.0.3"]
    );
    assert_eq!(
        order(&set, Some("10.0.0.4")),
        ["10.0.0.10", "10.0.0.11", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    );
    assert_eq!(order(&set, Some("10.0.0.11")), all);
    // Outside the set (the config changed): from the beginning.
    assert_eq!(order(&set, Some("10.9.0.1")), all);
    // The last address of the v6 space: no overflow, every address exactly once.
    let top = vec![Range {
        subnet: "ffff::/16".parse().unwrap(),
        start: ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"),
        end: ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        gateway: None,
    }];
    assert_eq!(
        order(&top, Some("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
        [
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        ]
    );
}

#[test]
fn round_robin_across_adds_and_dels_wraps_and_skips_the_gateway() {
    let a = Allocator::new(MemStore::new(), v4_29());
    assert_eq!(add(&a, "a", "eth0", &[]), "10.9.0.2/29");
    assert_eq!(add(&a, "b", "eth0", &[]), "10.9.0.3/29");
    assert_eq!(add(&a, "c", "eth0", &[]), "10.9.0.4/29");
    assert_eq!(a.release("b", "eth0").unwrap(), 1);
    // The freed .3 is not reused while unused addresses remain ahead.
    assert_eq!(add(&a, "d", "eth0", &[]), "10.9.0.5/29");
    assert_eq!(add(&a, "e", "eth0", &[]), "10.9.0.6/29");
    // Wraps: .1 is the gateway, .2 is taken.
    assert_eq!(add(&a, "f", "eth0", &[]), "10.9.0.3/29");
    a.release("a", "eth0").unwrap();
    a.release("c", "eth0").unwrap();
    // From after .3: .4 is free again before .2.
    assert_eq!(add(&a, "g", "eth0", &[]), "10.9.0.4/29");
    assert_eq!(add(&a, "h", "eth0", &[]), "10.9.0.2/29");
    assert_eq!(
        held(&a),
        [
            "10.9.0.2=h/eth0",
            "10.9.0.3=f/eth0",
            "10.9.0.4=g/eth0",
            "10.9.0.5=d/eth0",
            "10.9.0.6=e/eth0"
        ]
    );
}

#[test]
fn network_broadcast_gateway_and_range_bounds_are_never_handed_out() {
    // A gateway inside the range is skipped; .0 and the broadcast .7 are outside it.
    let a = Allocator::new(
        MemStore::new(),
        sets(json!({"subnet":"10.9.0.0/29","gateway":"10.9.0.3"})),
    );
    let got: Vec<String> = (0..5)
        .map(|i| add(&a, &format!("p{i}"), "eth0", &[]))
        .collect();
    assert_eq!(
        got,
        [
            "10.9.0.1/29",
            "10.9.0.2/29",
            "10.9.0.4/29",
            "10.9.0.5/29",
            "10.9.0.6/29"
        ]
    );
    assert_eq!(
        add(&a, "x", "eth0", &[]),
        "err 100 failed to allocate for range 0: no IP addresses available in range set: 10.9.0.1-10.9.0.6"
    );
    // rangeStart/rangeEnd bound the range; the gateway outside it does not count.
    let a = Allocator::new(
        MemStore::new(),
        sets(json!({"subnet":"10.8.0.0/24","rangeStart":"10.8.0.10","rangeEnd":"10.8.0.11"})),
    );
    assert_eq!(add(&a, "a", "eth0", &[]), "10.8.0.10/24");
    assert_eq!(add(&a, "b", "eth0", &[]), "10.8.0.11/24");
    assert_eq!(
        add(&a, "c", "eth0", &[]),
        "err 100 failed to allocate for range 0: no IP addresses available in range set: 10.8.0.10-10.8.0.11"
    );
    // v6 has no broadcast: the last address is handed out.
    let a = Allocator::new(MemStore::new(), sets(json!({"subnet":"fd00::/126"})));
    assert_eq!(add(&a, "a", "eth0", &[]), "fd00::2/126");
    assert_eq!(add(&a, "b", "eth0", &[]), "fd00::3/126");
    assert_eq!(add(&a, "c", "eth0", &[]).split(' ').nth(1), Some("100"));
}

#[test]
fn ranges_of_one_set_are_used_in_order_with_their_own_prefix_and_gateway() {
    let a = Allocator::new(
        MemStore::new(),
        sets(json!({"ranges":[[
            {"subnet":"10.1.0.0/24","rangeStart":"10.1.0.10","rangeEnd":"10.1.0.11"},
            {"subnet":"10.2.0.0/16","rangeStart":"10.2.0.20","rangeEnd":"10.2.0.21","gateway":"10.2.0.254"}
        ]]})),
    );
    let first = a.allocate("a", "eth0", &[]).unwrap();
    assert_eq!(
        first,
        [Allocation {
            address: "10.1.0.10/24".parse().unwrap(),
            gateway: Some(ip("10.1.0.1"))
        }]
    );
    assert_eq!(add(&a, "b", "eth0", &[]), "10.1.0.11/24");
    let third = a.allocate("c", "eth0", &[]).unwrap();
    assert_eq!(
        third,
        [Allocation {
            address: "10.2.0.20/16".parse().unwrap(),
            gateway: Some(ip("10.2.0.254"))
        }]
    );
    a.release("a", "eth0").unwrap();
    assert_eq!(add(&a, "d", "eth0", &[]), "10.2.0.21/16");
    // Wraps from the second range back to the first.
    assert_eq!(add(&a, "e", "eth0", &[]), "10.1.0.10/24");
    assert_eq!(
        add(&a, "f", "eth0", &[]),
        "err 100 failed to allocate for range 0: no IP addresses available in range set: \
         10.1.0.10-10.1.0.11,10.2.0.20-10.2.0.21"
    );
}

#[test]
fn one_address_per_range_set_with_round_robin_kept_per_set() {
    let store = MemStore::new();
    let a = Allocator::new(
        &store,
        sets(json!({"ranges":[[{"subnet":"10.1.0.0/29"}],[{"subnet":"fd00::/125"}]]})),
    );
    assert_eq!(add(&a, "a", "eth0", &[]), "10.1.0.2/29 fd00::2/125");
    assert_eq!(add(&a, "b", "eth0", &[]), "10.1.0.3/29 fd00::3/125");
    {
        let g = store.lock().unwrap();
        assert_eq!(g.last_reserved(0), Some(ip("10.1.0.3")));
        assert_eq!(g.last_reserved(1), Some(ip("fd00::3")));
    }
    // A requested v6 address moves only the v6 set's position.
    assert_eq!(
        add(&a, "c", "eth0", &["fd00::6"]),
        "10.1.0.4/29 fd00::6/125"
    );
    assert_eq!(add(&a, "d", "eth0", &[]), "10.1.0.5/29 fd00::7/125");
    // The same container on another interface is another attachment.
    assert_eq!(
        add(&a, "d", "net1", &["10.1.0.2"]).split(' ').nth(1),
        Some("999")
    );
    assert_eq!(add(&a, "d", "net1", &[]), "10.1.0.6/29 fd00::4/125");
    // v4 is full: the ADD fails at set 0 and takes none of the free v6 addresses.
    assert_eq!(
        add(&a, "e", "eth0", &[]),
        "err 100 failed to allocate for range 0: no IP addresses available in range set: 10.1.0.1-10.1.0.6"
    );
    assert!(!held(&a).iter().any(|h| h.starts_with("fd00::5=")));
}

#[test]
fn requested_addresses_ok_taken_outside_and_gateway() {
    let a = Allocator::new(MemStore::new(), v4_29());
    assert_eq!(add(&a, "a", "eth0", &["10.9.0.5"]), "10.9.0.5/29");
    assert_eq!(
        add(&a, "b", "eth0", &["10.9.0.5"]),
        "err 999 requested IP address 10.9.0.5 is not available in range set 10.9.0.1-10.9.0.6"
    );
    assert_eq!(
        add(&a, "b", "eth0", &["10.9.0.1"]),
        "err 999 requested ip 10.9.0.1 is subnet's gateway"
    );
    // Outside every set: the set's round-robin address is reserved first, then given back.
    assert_eq!(
        add(&a, "b", "eth0", &["10.9.1.1"]),
        "err 999 failed to allocate all requested IPs: 10.9.1.1"
    );
    // Two for one set: the first is used, the second is left over.
    assert_eq!(
        add(&a, "b", "eth0", &["10.9.0.3", "10.9.0.4"]),
        "err 999 failed to allocate all requested IPs: 10.9.0.4"
    );
    assert_eq!(held(&a), ["10.9.0.5=a/eth0"]);
    assert_eq!(add(&a, "b", "eth0", &["10.9.0.3"]), "10.9.0.3/29");
}

#[test]
fn a_failure_in_a_later_set_releases_exactly_what_this_add_reserved() {
    let store = MemStore::new();
    let two = sets(json!({"ranges":[[{"subnet":"10.1.0.0/29"}],[{"subnet":"fd00::/126"}]]}));
    let a = Allocator::new(&store, two);
    assert_eq!(add(&a, "a", "eth0", &[]), "10.1.0.2/29 fd00::2/126");
    assert_eq!(add(&a, "b", "eth0", &[]), "10.1.0.3/29 fd00::3/126");
    // The v6 set is full: the v4 address reserved for c is given back.
    assert_eq!(
        add(&a, "c", "eth0", &[]),
        "err 100 failed to allocate for range 1: no IP addresses available in range set: fd00::1-fd00::3"
    );
    let before = [
        "10.1.0.2=a/eth0",
        "10.1.0.3=b/eth0",
        "fd00::2=a/eth0",
        "fd00::3=b/eth0",
    ];
    assert_eq!(held(&a), before);
    // A requested address taken in the later set.
    assert_eq!(
        add(&a, "c", "eth0", &["fd00::2"]).split(' ').nth(1),
        Some("999")
    );
    assert_eq!(held(&a), before);
    // The attachment already holds a v6 address: its new v4 one goes, its old v6 one stays.
    a.release("b", "eth0").unwrap();
    store
        .lock()
        .unwrap()
        .reserve(ip("fd00::3"), "c", "eth0", 1)
        .unwrap();
    assert_eq!(
        add(&a, "c", "eth0", &[]),
        "err 999 fd00::3 has been allocated to c, duplicate allocation is not allowed"
    );
    assert_eq!(
        held(&a),
        ["10.1.0.2=a/eth0", "fd00::2=a/eth0", "fd00::3=c/eth0"]
    );
    // A store failure in the later set.
    a.release("c", "eth0").unwrap();
    store.fail_reserve_of(ip("fd00::3"));
    let e = a.allocate("d", "eth0", &[]).unwrap_err();
    assert_eq!(e.code, code::INTERNAL);
    assert!(e.msg.contains("injected failure"), "{e}");
    assert_eq!(held(&a), ["10.1.0.2=a/eth0", "fd00::2=a/eth0"]);
}

#[test]
fn release_is_exact_idempotent_and_finds_legacy_reservations() {
    let store = MemStore::new();
    let a = Allocator::new(&store, v4_29());
    add(&a, "a", "eth0", &[]);
    add(&a, "a", "net1", &[]);
    add(&a, "b", "eth0", &[]);
    assert_eq!(a.release("a", "eth0").unwrap(), 1);
    assert_eq!(a.release("a", "eth0").unwrap(), 0);
    assert_eq!(a.release("nobody", "eth0").unwrap(), 0);
    assert_eq!(held(&a), ["10.9.0.3=a/net1", "10.9.0.4=b/eth0"]);
    // Id-only reservations (old host-local) are found when nothing matches exactly...
    {
        let mut g = store.lock().unwrap();
        g.reserve(ip("10.9.0.5"), "old", "", 0).unwrap();
        g.reserve(ip("10.9.0.6"), "old", "", 0).unwrap();
    }
    assert_eq!(a.reservations_of("old", "eth0").unwrap().len(), 2);
    // They count as the attachment's own, so it gets no second address.
    assert!(add(&a, "old", "eth0", &[]).contains("duplicate allocation"));
    // ...and are left alone when something matches exactly.
    store
        .lock()
        .unwrap()
        .reserve(ip("10.9.0.2"), "old", "eth1", 0)
        .unwrap();
    assert_eq!(a.release("old", "eth1").unwrap(), 1);
    assert_eq!(a.release("old", "eth0").unwrap(), 2);
    assert_eq!(held(&a), ["10.9.0.3=a/net1", "10.9.0.4=b/eth0"]);
}

#[test]
fn gc_releases_everything_but_the_valid_attachments() {
    let store = MemStore::new();
    let a = Allocator::new(&store, v4_29());
    add(&a, "a", "eth0", &[]);
    add(&a, "a", "net1", &[]);
    add(&a, "b", "eth0", &[]);
    store
        .lock()
        .unwrap()
        .reserve(ip("10.9.0.6"), "c", "", 0)
        .unwrap();
    let att = |id: &str, ifname: &str| Attachment {
        container_id: id.into(),
        ifname: ifname.into(),
    };
    // A legacy reservation has no ifname: any attachment of its container keeps it.
    assert_eq!(a.gc(&[att("a", "eth0"), att("c", "eth9")]).unwrap(), 2);
    assert_eq!(held(&a), ["10.9.0.2=a/eth0", "10.9.0.6=c/"]);
    assert_eq!(a.gc(&[att("a", "eth0"), att("c", "eth9")]).unwrap(), 0);
    assert_eq!(a.gc(&[]).unwrap(), 2);
    assert!(held(&a).is_empty());
}

#[test]
fn status_is_code_50_once_a_set_is_full() {
    // 10.9.0.1 is the gateway: 10.9.0.2 is the only address.
    let a = Allocator::new(MemStore::new(), sets(json!({"subnet":"10.9.0.0/30"})));
    a.status().unwrap();
    check_free(&a.sets, &[]).unwrap();
    add(&a, "a", "eth0", &[]);
    let e = a.status().unwrap_err();
    assert_eq!(
        (e.code, e.msg.as_str(), e.details.as_str()),
        (
            code::NOT_AVAILABLE,
            "no IP addresses available",
            "range set 0 (10.9.0.1-10.9.0.2) is full"
        )
    );
    a.release("a", "eth0").unwrap();
    a.status().unwrap();
}

#[test]
fn one_add_takes_the_lock_once_for_every_set() {
    let store = MemStore::new();
    let a = Allocator::new(
        &store,
        sets(json!({"ranges":[[{"subnet":"10.1.0.0/29"}],[{"subnet":"fd00::/125"}]]})),
    );
    a.allocate("a", "eth0", &[]).unwrap();
    assert_eq!(store.locks(), 1);
    a.allocate("b", "eth0", &ips(&["10.9.9.9"])).unwrap_err();
    assert_eq!(
        store.locks(),
        2,
        "a failed ADD rolls back under the same lock"
    );
}

/// The same attachment added from many threads at once: the duplicate check and the
/// reservations run under one lock, so exactly one ADD wins and holds one address per set.
fn racing_adds<S: Store>(make: impl Fn() -> Allocator<S> + Sync) -> Vec<String> {
    let results: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| add(&make(), "same", "eth0", &[])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<&String> = results.iter().filter(|r| !r.starts_with("err")).collect();
    assert_eq!(ok.len(), 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter(|r| r.starts_with("err"))
            .all(|r| r.contains("duplicate allocation")),
        "{results:?}"
    );
    held(&make())
}

#[test]
fn concurrent_adds_of_one_attachment_serialize_on_the_lock() {
    let two = sets(json!({"ranges":[[{"subnet":"10.1.0.0/24"}],[{"subnet":"fd00::/120"}]]}));
    let mem = MemStore::new();
    let from_mem = racing_adds(|| Allocator::new(&mem, two.clone()));
    // One FileStore per thread, as separate plugin processes would open it.
    let tmp = tempfile::tempdir().unwrap();
    let from_file = racing_adds(|| Allocator::new(FileStore::new(tmp.path()), two.clone()));
    assert_eq!(from_mem, ["10.1.0.2=same/eth0", "fd00::2=same/eth0"]);
    assert_eq!(from_file, from_mem);
}

/// A sequence of ADD/DEL/GC/STATUS steps and what each returned.
fn scenario<S: Store>(a: &Allocator<S>) -> Vec<String> {
    let mut out = Vec::new();
    let mut log = |step: &str, what: String| out.push(format!("{step}: {what}"));
    log("add a", add(a, "a", "eth0", &[]));
    log("add b", add(a, "b", "eth0", &["10.9.0.5"]));
    log("add c", add(a, "c", "eth0", &[]));
    log("add a again", add(a, "a", "eth0", &[]));
    log("add d outside", add(a, "d", "eth0", &["10.9.1.1"]));
    log("del b", a.release("b", "eth0").unwrap().to_string());
    log("del b again", a.release("b", "eth0").unwrap().to_string());
    log("add d", add(a, "d", "eth0", &[]));
    log("add e", add(a, "e", "eth0", &[]));
    log("add f", add(a, "f", "eth0", &[]));
    log("status", format!("{:?}", a.status().map_err(|e| e.code)));
    log("add g", add(a, "g", "eth0", &[]));
    let keep = [Attachment {
        container_id: "c".into(),
        ifname: "eth0".into(),
    }];
    log("gc", a.gc(&keep).unwrap().to_string());
    log("add h", add(a, "h", "eth0", &[]));
    log("held", held(a).join(" "));
    let g = a.store().lock().unwrap();
    log(
        "last",
        format!("{:?} {:?}", g.last_reserved(0), g.last_reserved(1)),
    );
    out
}

#[test]
fn file_and_memory_stores_give_identical_results() {
    let two = sets(json!({"ranges":[[{"subnet":"10.9.0.0/29"}],
        [{"subnet":"fd00::/64","rangeStart":"fd00::10","rangeEnd":"fd00::1f"}]]}));
    let mem = scenario(&Allocator::new(MemStore::new(), two.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let file = scenario(&Allocator::new(FileStore::new(tmp.path()), two));
    assert_eq!(file, mem);
    assert_eq!(
        mem,
        [
            "add a: 10.9.0.2/29 fd00::10/64",
            "add b: 10.9.0.5/29 fd00::11/64",
            "add c: 10.9.0.6/29 fd00::12/64",
            "add a again: err 999 10.9.0.2 has been allocated to a, duplicate allocation is not allowed",
            "add d outside: err 999 failed to allocate all requested IPs: 10.9.1.1",
            "del b: 2",
            "del b again: 0",
            // The failed ADD moved the round-robin positions (as the reference's does).
            "add d: 10.9.0.4/29 fd00::14/64",
            "add e: 10.9.0.5/29 fd00::15/64",
            "add f: 10.9.0.3/29 fd00::16/64",
            "status: Err(50)",
            "add g: err 100 failed to allocate for range 0: no IP addresses available in range set: 10.9.0.1-10.9.0.6",
            "gc: 8",
            "add h: 10.9.0.4/29 fd00::17/64",
            "held: 10.9.0.4=h/eth0 10.9.0.6=c/eth0 fd00::12=c/eth0 fd00::17=h/eth0",
            "last: Some(10.9.0.4) Some(fd00::17)",
        ]
    );
}
