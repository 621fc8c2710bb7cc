//! Bad input gets a CNI error JSON with the spec's code on stdout, a non-zero exit,
//! and changes nothing on the node (links, addresses, routes, nftables, IPAM store).
#![cfg(feature = "root")]

use serde_json::{json, Value};
use std::time::Duration;
use twill_tests::cni::{exec, snapshot, twill, Invocation, Reply};
use twill_tests::netns::Netns;
use twill_tests::underlay::wait_for;

fn base(data: &std::path::Path) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": "twerr", "type": "twill-bridge", "bridge": "twerrbr0",
        "isGateway": true, "ipMasq": true,
        "ipam": {"type": "twill-host-local", "subnet": "10.220.0.0/30", "dataDir": data}
    })
}

fn settled(node: &Netns) -> bool {
    let out = node.output(&["ip", "-o", "addr", "show"]);
    !String::from_utf8_lossy(&out.stdout).contains("tentative")
}

/// Runs the bad call and checks the code and that node and pod did not change.
fn expect(
    node: &Netns,
    pod: &Netns,
    data: &std::path::Path,
    what: &str,
    code: u64,
    call: impl FnOnce() -> Reply,
) {
    assert!(wait_for(|| settled(node), Duration::from_secs(5)));
    let before = (snapshot(node, data), snapshot(pod, data));
    let r = call();
    assert_eq!(r.err_code(), code, "{what}: {}", r.stdout);
    assert!(r.stdout.ends_with('\n') || r.stdout.ends_with('}'));
    let v = r.json();
    assert!(
        v["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: msg"
    );
    assert!(v["cniVersion"].is_string(), "{what}: cniVersion");
    assert_eq!(
        (snapshot(node, data), snapshot(pod, data)),
        before,
        "{what} changed the host"
    );
}

#[test]
fn bad_inputs_give_their_codes_and_change_nothing() {
    let node = Netns::new("ne");
    let pod = Netns::new("pe");
    let data = tempfile::tempdir().unwrap();
    let bin = twill("twill-bridge");
    let ok = base(data.path());
    let add = || Invocation::new("ADD", "err1", &pod.path());
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = ok.clone();
        f(&mut c);
        c
    };

    let raw = |stdin: &str| {
        let argv = [
            "ip",
            "netns",
            "exec",
            node.name(),
            "env",
            "-i",
            "CNI_COMMAND=ADD",
            "CNI_CONTAINERID=err1",
        ];
        let ns = format!("CNI_NETNS={}", pod.path());
        let bin_s = bin.display().to_string();
        let mut a: Vec<&str> = argv.to_vec();
        a.extend([
            ns.as_str(),
            "CNI_IFNAME=eth0",
            "CNI_PATH=/usr/lib/cni",
            bin_s.as_str(),
        ]);
        Reply::from(twill_tests::sh::run_with_input(&a, &[], stdin.as_bytes()))
    };
    let d = data.path();
    expect(&node, &pod, d, "malformed JSON", 6, || {
        raw(r#"{"cniVersion": "1.0.0", "name": "#)
    });
    expect(&node, &pod, d, "unknown cniVersion", 1, || {
        exec(
            Some(&node),
            &bin,
            &add(),
            &with(&|c| c["cniVersion"] = json!("9.9.9")),
        )
    });
    expect(&node, &pod, d, "missing CNI_NETNS", 4, || {
        exec(Some(&node), &bin, &Invocation::new("ADD", "err1", ""), &ok)
    });
    let mut no_path = add();
    no_path.cni_path = String::new();
    expect(&node, &pod, d, "missing CNI_PATH", 4, || {
        exec(Some(&node), &bin, &no_path, &ok)
    });
    expect(&node, &pod, d, "bad ifname", 4, || {
        exec(Some(&node), &bin, &add().ifname("eth0/x"), &ok)
    });
    expect(&node, &pod, d, "too long ifname", 4, || {
        exec(Some(&node), &bin, &add().ifname("a-very-long-ifname"), &ok)
    });
    expect(&node, &pod, d, "bad container ID", 4, || {
        exec(
            Some(&node),
            &bin,
            &Invocation::new("ADD", "bad/id", &pod.path()),
            &ok,
        )
    });
    expect(&node, &pod, d, "bad network name", 7, || {
        exec(
            Some(&node),
            &bin,
            &add(),
            &with(&|c| c["name"] = json!("a/b")),
        )
    });
    expect(&node, &pod, d, "/31 subnet", 7, || {
        exec(
            Some(&node),
            &bin,
            &add(),
            &with(&|c| c["ipam"]["subnet"] = json!("10.220.1.0/31")),
        )
    });
    expect(&node, &pod, d, "overlapping ranges", 7, || {
        let f = |c: &mut Value| {
            c["ipam"] = json!({"type": "twill-host-local", "dataDir": d,
                "ranges": [[{"subnet": "10.220.2.0/24"}], [{"subnet": "10.220.2.128/25"}]]})
        };
        exec(Some(&node), &bin, &add(), &with(&f))
    });
    expect(&node, &pod, d, "hairpin with promisc", 7, || {
        exec(
            Some(&node),
            &bin,
            &add(),
            &with(&|c| {
                c["hairpinMode"] = json!(true);
                c["promiscMode"] = json!(true);
            }),
        )
    });
    expect(&node, &pod, d, "unknown CNI_ARGS key", 4, || {
        exec(Some(&node), &bin, &add().args("FOO=bar"), &ok)
    });
    expect(&node, &pod, d, "CHECK below 0.4.0", 1, || {
        exec(
            Some(&node),
            &bin,
            &Invocation::new("CHECK", "err1", &pod.path()),
            &with(&|c| c["cniVersion"] = json!("0.3.1")),
        )
    });

    // Exhausted pool: the /30 holds one pod; the second ADD fails and leaves no trace.
    let other = Netns::new("pe");
    exec(
        Some(&node),
        &bin,
        &Invocation::new("ADD", "err0", &other.path()),
        &ok,
    )
    .ok();
    expect(&node, &pod, d, "exhausted pool", 100, || {
        exec(Some(&node), &bin, &add(), &ok)
    });
    let r = exec(Some(&node), &bin, &add(), &ok);
    assert!(
        r.json()["msg"]
            .as_str()
            .unwrap()
            .contains("no IP addresses available"),
        "{}",
        r.stdout
    );
    exec(
        Some(&node),
        &bin,
        &Invocation::new("DEL", "err0", &other.path()),
        &ok,
    )
    .ok();
    // The veth teardown finishes in the background; let the bridge lose its last port first.
    assert!(wait_for(
        || twill_tests::cni::host_veths(&node).is_empty()
            && node
                .exec(&["ip", "link", "show", "twerrbr0"])
                .contains("NO-CARRIER"),
        Duration::from_secs(10)
    ));
    // Requested IP that is the gateway, and one outside every range.
    let mut req = ok.clone();
    req["args"] = json!({"cni": {"ips": ["10.220.0.1"]}});
    expect(&node, &pod, d, "requested gateway", 999, || {
        exec(Some(&node), &bin, &add(), &req)
    });
    req["args"] = json!({"cni": {"ips": ["10.99.99.99"]}});
    expect(&node, &pod, d, "requested IP outside ranges", 999, || {
        exec(Some(&node), &bin, &add(), &req)
    });
}

#[test]
fn existing_ifname_fails_and_rolls_back() {
    let node = Netns::new("nx");
    let pod = Netns::new("px");
    let data = tempfile::tempdir().unwrap();
    let mut c = base(data.path());
    c["ipam"]["subnet"] = json!("10.221.0.0/24");
    let bin = twill("twill-bridge");
    // A stray eth0 already in the pod: ADD must fail and release its reservation and veth.
    let other = Netns::new("px");
    twill_tests::netns::veth_pair(&pod, "eth0", &other, "peer0");
    let r = exec(
        Some(&node),
        &bin,
        &Invocation::new("ADD", "dup1", &pod.path()),
        &c,
    );
    assert_eq!(r.err_code(), 999, "{}", r.stdout);
    assert!(r.stdout.contains("already exists"), "{}", r.stdout);
    assert!(
        pod.has_link("eth0"),
        "the rollback left the stray eth0 alone"
    );
    assert!(twill_tests::cni::reservations(data.path(), "twerr").is_empty());
    assert!(twill_tests::cni::host_veths(&node).is_empty());
    let rules = node.output(&["nft", "list", "ruleset"]);
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("twill:twerr:dup1"));
}

#[test]
fn retried_add_of_a_live_container_keeps_its_address() {
    let node = Netns::new("nr");
    let pod = Netns::new("pr");
    let data = tempfile::tempdir().unwrap();
    let mut c = base(data.path());
    c["ipam"]["subnet"] = json!("10.222.0.0/24");
    let bin = twill("twill-bridge");
    let add = Invocation::new("ADD", "retry1", &pod.path());
    let first = exec(Some(&node), &bin, &add, &c).ok();
    let ip = first["ips"][0]["address"].as_str().unwrap().to_string();
    let reserved = twill_tests::cni::reservations(data.path(), "twerr");
    assert_eq!(reserved.len(), 1);
    // The runtime retries the ADD (e.g. after a timeout): IPAM refuses the duplicate...
    let r = exec(Some(&node), &bin, &add, &c);
    assert_eq!(r.err_code(), 999, "{}", r.stdout);
    assert!(r.stdout.contains("duplicate allocation"), "{}", r.stdout);
    // ...and the failure must not release the address the live pod still uses.
    assert_eq!(
        twill_tests::cni::reservations(data.path(), "twerr"),
        reserved
    );
    let other = Netns::new("pr");
    let second = exec(
        Some(&node),
        &bin,
        &Invocation::new("ADD", "retry2", &other.path()),
        &c,
    )
    .ok();
    assert_ne!(second["ips"][0]["address"].as_str().unwrap(), ip);
    for (id, p) in [("retry1", &pod), ("retry2", &other)] {
        exec(
            Some(&node),
            &bin,
            &Invocation::new("DEL", id, &p.path()),
            &c,
        )
        .ok();
    }
    assert!(twill_tests::cni::reservations(data.path(), "twerr").is_empty());
}

#[test]
fn bridge_with_another_address_needs_force_address() {
    let node = Netns::new("nf");
    let pod = Netns::new("pf");
    let data = tempfile::tempdir().unwrap();
    let mut c = base(data.path());
    c["bridge"] = json!("twfabr0");
    c["ipam"]["subnet"] = json!("10.222.0.0/24");
    // A node that rejoined with a new pod CIDR: the bridge still carries the old gateway.
    node.exec(&["ip", "link", "add", "twfabr0", "type", "bridge"]);
    node.exec(&["ip", "addr", "add", "10.222.9.1/24", "dev", "twfabr0"]);
    node.exec(&["ip", "link", "set", "twfabr0", "up"]);
    let bin = twill("twill-bridge");
    let r = exec(
        Some(&node),
        &bin,
        &Invocation::new("ADD", "fa1", &pod.path()),
        &c,
    );
    assert_eq!(r.err_code(), 999);
    assert!(
        r.stdout
            .contains("already has an IP address different from"),
        "{}",
        r.stdout
    );
    assert!(
        twill_tests::cni::reservations(data.path(), "twerr").is_empty(),
        "IPAM rolled back"
    );
    assert!(!pod.has_link("eth0"));
    let rules = node.output(&["nft", "list", "ruleset"]);
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("twill:twerr:fa1"));
    c["forceAddress"] = json!(true);
    exec(
        Some(&node),
        &bin,
        &Invocation::new("ADD", "fa1", &pod.path()),
        &c,
    )
    .ok();
    let addrs = node.exec(&["ip", "-4", "-o", "addr", "show", "dev", "twfabr0"]);
    assert!(
        addrs.contains("10.222.0.1/24") && !addrs.contains("10.222.9.1"),
        "{addrs}"
    );
    exec(
        Some(&node),
        &bin,
        &Invocation::new("DEL", "fa1", &pod.path()),
        &c,
    )
    .ok();
}

/// Inputs the reference plugins refuse (issue 9 item 12): a /0 pool, wrong-typed requested IPs
/// and MACs, a prevResult that is not an object. Each is an error with its code on ADD, and
/// nothing on the node or in the pod changes.
#[test]
fn lax_inputs_are_refused_and_change_nothing() {
    let node = Netns::new("nl");
    let pod = Netns::new("pl");
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let mut ok = base(d);
    ok["ipam"]["subnet"] = json!("10.223.0.0/24");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = ok.clone();
        f(&mut c);
        c
    };
    let add = || Invocation::new("ADD", "lax1", &pod.path());
    let cases: Vec<(&str, Value)> = vec![
        (
            "ipam subnet 0.0.0.0/0",
            with(&|c| c["ipam"]["subnet"] = json!("0.0.0.0/0")),
        ),
        (
            "ipam range ::/0",
            with(&|c| {
                c["ipam"] = json!({"type": "twill-host-local", "dataDir": d,
                    "ranges": [[{"subnet": "::/0"}]]})
            }),
        ),
        (
            "runtimeConfig.ips a string",
            with(&|c| c["runtimeConfig"] = json!({"ips": "10.223.0.9"})),
        ),
        (
            "runtimeConfig.ips holding a number",
            with(&|c| c["runtimeConfig"] = json!({"ips": [5]})),
        ),
        (
            "runtimeConfig.mac a number",
            with(&|c| c["runtimeConfig"] = json!({"mac": 5})),
        ),
        (
            "args.cni.ips an object",
            with(&|c| c["args"] = json!({"cni": {"ips": {"ip": "10.223.0.9"}}})),
        ),
        (
            "args.cni.mac a list",
            with(&|c| c["args"] = json!({"cni": {"mac": ["02:00:00:00:00:01"]}})),
        ),
        (
            "prevResult a string",
            with(&|c| c["prevResult"] = json!("x")),
        ),
    ];
    for bin in ["twill-bridge", "twill-host-local"] {
        let b = twill(bin);
        for (what, conf) in &cases {
            // host-local ignores MACs and prevResult, as the reference does.
            if bin == "twill-host-local" && (what.contains("mac") || what.contains("prevResult")) {
                continue;
            }
            expect(&node, &pod, d, &format!("{bin}: {what}"), 7, || {
                exec(Some(&node), &b, &add(), conf)
            });
        }
    }
    // The same config with well-typed values works, so the refusals were about the types.
    let good = with(&|c| {
        c["runtimeConfig"] = json!({"ips": ["10.223.0.9/24"], "mac": "02:00:00:00:00:09"});
        c["prevResult"] = json!({"cniVersion": "1.0.0", "ips": []});
    });
    let r = exec(Some(&node), &twill("twill-bridge"), &add(), &good).ok();
    assert_eq!(r["ips"][0]["address"], "10.223.0.9/24");
    exec(
        Some(&node),
        &twill("twill-bridge"),
        &Invocation::new("DEL", "lax1", &pod.path()),
        &good,
    )
    .ok();
}
