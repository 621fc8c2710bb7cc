//! Every verb of twill-bridge, twill-host-local and twill-loopback at every spec version,
//! results parsed back as that version. Root only; each test in its own namespaces.
#![cfg(feature = "root")]

use std::path::Path;

use serde_json::{json, Value};
use twill_common::cni::{CniResult, Version, SUPPORTED_VERSIONS};
use twill_tests::cni::{exec, reservations, twill, with_prev, Invocation, Reply};
use twill_tests::netns::Netns;

fn bridge_conf(version: &str, bridge: &str, subnet: &str, data: &Path) -> Value {
    json!({
        "cniVersion": version, "name": "twv", "type": "twill-bridge", "bridge": bridge,
        "isGateway": true, "hairpinMode": true,
        "ipam": {"type": "twill-host-local", "subnet": subnet, "dataDir": data, "routes": [{"dst": "0.0.0.0/0"}]}
    })
}

/// Runs `verb` for container `id` with `pod` as its netns; the plugin runs inside `node`
/// (`None`: the test's own namespace).
fn in_pod(
    node: Option<&Netns>,
    bin: &Path,
    verb: &str,
    id: &str,
    pod: &Netns,
    conf: &Value,
) -> Reply {
    exec(node, bin, &Invocation::new(verb, id, &pod.path()), conf)
}

/// Asserts the version-specific shape and returns the parsed result.
fn parse_as(version: &str, v: &Value, with_interfaces: bool) -> CniResult {
    assert_eq!(v["cniVersion"], version, "{v}");
    let ver = Version::parse(version).unwrap();
    if ver < Version::V0_3_0 {
        assert!(v["ip4"]["ip"].is_string(), "0.x shape: {v}");
        assert!(
            v.get("ips").is_none() && v.get("interfaces").is_none(),
            "{v}"
        );
    } else {
        let ips = v["ips"].as_array().expect("ips");
        assert!(!ips.is_empty());
        for ip in ips {
            if ver < Version::V1_0_0 {
                assert_eq!(
                    ip["version"],
                    if ip["address"].as_str().unwrap().contains(':') {
                        "6"
                    } else {
                        "4"
                    }
                );
            } else {
                assert!(ip.get("version").is_none(), "1.x has no ips[].version: {v}");
            }
            if with_interfaces {
                assert_eq!(ip["interface"], 2, "{v}");
            }
        }
        if with_interfaces {
            assert_eq!(v["interfaces"].as_array().unwrap().len(), 3);
        }
    }
    CniResult::from_value(v, "0.0.0").expect("parses back")
}

#[test]
fn bridge_every_verb_every_version() {
    let node = Netns::new("nv");
    let data = tempfile::tempdir().unwrap();
    let bin = twill("twill-bridge");
    for (i, version) in SUPPORTED_VERSIONS.iter().enumerate() {
        let ver = Version::parse(version).unwrap();
        let pod = Netns::new("pv");
        let id = format!("ctr-{i}");
        let conf = bridge_conf(version, "twvbr0", "10.201.0.0/24", data.path());
        let add = in_pod(Some(&node), &bin, "ADD", &id, &pod, &conf).ok();
        let r = parse_as(version, &add, true);
        let ip = r.ips[0].address.ip().to_string();
        assert!(pod
            .exec(&["ip", "-o", "addr", "show", "dev", "eth0"])
            .contains(&ip));
        // The gateway answers: the packet crosses veth and bridge.
        pod.exec(&["ping", "-c1", "-W2", "10.201.0.1"]);
        let ports = node.exec(&["bridge", "-d", "link", "show", "master", "twvbr0"]);
        assert!(
            ports.contains("hairpin on") && ports.contains("state forwarding"),
            "{ports}"
        );
        assert_eq!(reservations(data.path(), "twv").len(), 1);

        let check = in_pod(
            Some(&node),
            &bin,
            "CHECK",
            &id,
            &pod,
            &with_prev(&conf, &add),
        );
        if ver >= Version::V0_4_0 {
            assert_eq!(check.ok(), Value::Null, "CHECK prints nothing");
        } else {
            assert_eq!(check.err_code(), 1);
        }
        for verb in ["STATUS", "GC"] {
            let mut c = conf.clone();
            if verb == "GC" {
                c["cni.dev/valid-attachments"] = json!([{"containerID": id, "ifname": "eth0"}]);
            }
            let r = exec(Some(&node), &bin, &Invocation::new(verb, "", ""), &c);
            if ver >= Version::V1_1_0 {
                r.ok();
            } else {
                assert_eq!(r.err_code(), 1, "{verb} below 1.1.0");
            }
        }
        assert_eq!(
            reservations(data.path(), "twv").len(),
            1,
            "GC kept the valid attachment"
        );

        let del = Invocation::new("DEL", &id, &pod.path());
        exec(Some(&node), &bin, &del, &with_prev(&conf, &add)).ok();
        assert!(!pod.has_link("eth0"));
        assert!(reservations(data.path(), "twv").is_empty());
        exec(Some(&node), &bin, &del, &with_prev(&conf, &add)).ok();
    }
    let ver = exec(
        None,
        &bin,
        &Invocation::new("VERSION", "", ""),
        &json!({"cniVersion": "0.3.1"}),
    )
    .ok();
    assert_eq!(ver["supportedVersions"], json!(SUPPORTED_VERSIONS));
}

#[test]
fn bridge_dual_stack_reaches_both_gateways() {
    let node = Netns::new("nd");
    let pod = Netns::new("pd");
    let data = tempfile::tempdir().unwrap();
    let conf = json!({
        "cniVersion": "1.0.0", "name": "twds", "type": "twill-bridge", "bridge": "twdsbr0", "isDefaultGateway": true, "ipMasq": true,
        "ipam": {"type": "twill-host-local", "dataDir": data.path(),
                 "ranges": [[{"subnet": "10.202.0.0/24"}], [{"subnet": "fd20:202::/64"}]]},
        "runtimeConfig": {"mac": "02:42:0a:ca:00:09"}
    });
    let bin = twill("twill-bridge");
    let add = in_pod(Some(&node), &bin, "ADD", "ds1", &pod, &conf).ok();
    let prev = with_prev(&conf, &add);
    let r = parse_as("1.0.0", &add, true);
    assert_eq!(r.ips.len(), 2);
    assert_eq!(add["interfaces"][2]["mac"], "02:42:0a:ca:00:09");
    let rules = node.exec(&["nft", "list", "chain", "inet", "twill_masq", "postrouting"]);
    assert_eq!(
        rules.matches("twill:twds:ds1").count(),
        2,
        "one masquerade rule per family: {rules}"
    );
    assert!(rules.contains("ip6 daddr != fd20:202::/64"), "{rules}");
    assert!(pod
        .exec(&["ip", "link", "show", "eth0"])
        .contains("02:42:0a:ca:00:09"));
    assert_eq!(
        r.routes.len(),
        2,
        "isDefaultGateway adds a default route per family: {add}"
    );
    // DAD is off by default, so the v6 address is usable at once.
    pod.exec(&["ping", "-c1", "-W2", "10.202.0.1"]);
    pod.exec(&["ping", "-6", "-c1", "-W2", "fd20:202::1"]);
    let routes6 = pod.exec(&["ip", "-6", "route", "show", "default"]);
    assert!(routes6.contains("via fd20:202::1"), "{routes6}");
    in_pod(Some(&node), &bin, "CHECK", "ds1", &pod, &prev).ok();
    // 0.2.0 keeps one address per family.
    let v02 = r.to_value("0.2.0").unwrap();
    assert_eq!(v02["ip6"]["gateway"], "fd20:202::1");
    in_pod(Some(&node), &bin, "DEL", "ds1", &pod, &prev).ok();
    assert!(reservations(data.path(), "twds").is_empty());
    let rules = node.exec(&["nft", "list", "chain", "inet", "twill_masq", "postrouting"]);
    assert!(!rules.contains("twill:twds:ds1"), "{rules}");
}

#[test]
fn host_local_every_verb_every_version() {
    let data = tempfile::tempdir().unwrap();
    let bin = twill("twill-host-local");
    let pod = Netns::new("ph");
    for (i, version) in SUPPORTED_VERSIONS.iter().enumerate() {
        let ver = Version::parse(version).unwrap();
        let conf = json!({"cniVersion": version, "name": "twh", "type": "twill-host-local",
            "ipam": {"type": "twill-host-local", "subnet": "10.203.0.0/24", "dataDir": data.path(),
                     "routes": [{"dst": "10.0.0.0/8"}]}});
        let id = format!("h{i}");
        let add = in_pod(None, &bin, "ADD", &id, &pod, &conf).ok();
        let r = parse_as(version, &add, false);
        assert_eq!(r.ips[0].gateway.unwrap().to_string(), "10.203.0.1");
        assert_eq!(r.routes[0].dst.to_string(), "10.0.0.0/8");
        let check = in_pod(None, &bin, "CHECK", &id, &pod, &with_prev(&conf, &add));
        if ver >= Version::V0_4_0 {
            check.ok();
        } else {
            assert_eq!(check.err_code(), 1);
        }
        let st = exec(None, &bin, &Invocation::new("STATUS", "", ""), &conf);
        if ver >= Version::V1_1_0 {
            st.ok();
        } else {
            assert_eq!(st.err_code(), 1);
        }
        exec(None, &bin, &Invocation::new("DEL", &id, ""), &conf).ok();
        exec(None, &bin, &Invocation::new("DEL", &id, ""), &conf).ok();
        assert!(reservations(data.path(), "twh").is_empty());
        let check = in_pod(None, &bin, "CHECK", &id, &pod, &with_prev(&conf, &add));
        if ver >= Version::V0_4_0 {
            assert_eq!(
                check.err_code(),
                999,
                "CHECK after DEL finds no reservation"
            );
        }
    }
}

#[test]
fn loopback_every_version() {
    let bin = twill("twill-loopback");
    for version in SUPPORTED_VERSIONS {
        let ver = Version::parse(version).unwrap();
        let pod = Netns::new("pl");
        pod.exec(&["ip", "link", "set", "lo", "down"]);
        let conf = json!({"cniVersion": version, "name": "cni-loopback", "type": "loopback"});
        let inv = |c: &str| Invocation::new(c, "lo1", &pod.path()).ifname("lo");
        let add = exec(None, &bin, &inv("ADD"), &conf).ok();
        let r = CniResult::from_value(&add, "0.0.0").unwrap();
        assert_eq!(add["cniVersion"], *version);
        assert!(
            r.ips.iter().any(|i| i.address.to_string() == "127.0.0.1/8"),
            "{add}"
        );
        if ver >= Version::V0_3_0 {
            assert_eq!(add["interfaces"][0]["name"], "lo");
            assert_eq!(add["interfaces"][0]["sandbox"], pod.path());
        }
        assert!(pod.exec(&["ip", "link", "show", "lo"]).contains("UP"));
        pod.exec(&["ping", "-c1", "-W1", "127.0.0.1"]);
        if ver >= Version::V0_4_0 {
            exec(None, &bin, &inv("CHECK"), &with_prev(&conf, &add)).ok();
        }
        exec(None, &bin, &inv("DEL"), &conf).ok();
        assert!(!pod.exec(&["ip", "link", "show", "lo"]).contains(",UP"));
        if ver >= Version::V0_4_0 {
            let c = exec(None, &bin, &inv("CHECK"), &with_prev(&conf, &add));
            assert_ne!(c.status, 0, "CHECK fails with lo down");
        }
    }
    // DEL with a netns that is gone, or none at all, succeeds.
    let conf = json!({"cniVersion": "0.3.1", "name": "cni-loopback", "type": "loopback"});
    exec(
        None,
        &bin,
        &Invocation::new("DEL", "x", "/run/netns/twill-gone-ns").ifname("lo"),
        &conf,
    )
    .ok();
    exec(
        None,
        &bin,
        &Invocation::new("DEL", "x", "").ifname("lo"),
        &conf,
    )
    .ok();
}

#[test]
fn bridge_check_detects_what_is_broken() {
    let node = Netns::new("nb");
    let pod = Netns::new("pb");
    let data = tempfile::tempdir().unwrap();
    let mut conf = bridge_conf("1.1.0", "twckbr0", "10.204.0.0/24", data.path());
    conf["ipMasq"] = json!(true);
    let bin = twill("twill-bridge");
    let inv = |c: &str| Invocation::new(c, "ck1", &pod.path());
    let add = exec(Some(&node), &bin, &inv("ADD"), &conf).ok();
    let chk = with_prev(&conf, &add);
    exec(Some(&node), &bin, &inv("CHECK"), &chk).ok();
    let ip = add["ips"][0]["address"].as_str().unwrap().to_string();

    // A missing route (the one without gw in prevResult).
    pod.exec(&["ip", "route", "del", "default"]);
    assert_ne!(
        exec(Some(&node), &bin, &inv("CHECK"), &chk).status,
        0,
        "route gone"
    );
    pod.exec(&["ip", "route", "add", "default", "via", "10.204.0.1"]);
    exec(Some(&node), &bin, &inv("CHECK"), &chk).ok();

    // A missing address.
    pod.exec(&["ip", "addr", "del", &ip, "dev", "eth0"]);
    assert_ne!(
        exec(Some(&node), &bin, &inv("CHECK"), &chk).status,
        0,
        "address gone"
    );
    pod.exec(&["ip", "addr", "add", &ip, "dev", "eth0"]);
    pod.exec(&["ip", "route", "replace", "default", "via", "10.204.0.1"]);
    exec(Some(&node), &bin, &inv("CHECK"), &chk).ok();

    // A missing IPAM reservation.
    let file = data.path().join("twv").join(ip.split('/').next().unwrap());
    let saved = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_ne!(
        exec(Some(&node), &bin, &inv("CHECK"), &chk).status,
        0,
        "reservation gone"
    );
    std::fs::write(&file, saved).unwrap();
    exec(Some(&node), &bin, &inv("CHECK"), &chk).ok();

    // Missing masquerade rules.
    node.exec(&["nft", "flush", "chain", "inet", "twill_masq", "postrouting"]);
    assert_ne!(
        exec(Some(&node), &bin, &inv("CHECK"), &chk).status,
        0,
        "masquerade gone"
    );

    // The host veth detached from the bridge.
    let host_veth = add["interfaces"][1]["name"].as_str().unwrap().to_string();
    let mut no_masq = chk.clone();
    no_masq["ipMasq"] = json!(false);
    exec(Some(&node), &bin, &inv("CHECK"), &no_masq).ok();
    node.exec(&["ip", "link", "set", &host_veth, "nomaster"]);
    assert_ne!(
        exec(Some(&node), &bin, &inv("CHECK"), &no_masq).status,
        0,
        "port detached"
    );
    exec(Some(&node), &bin, &inv("DEL"), &chk).ok();
}
