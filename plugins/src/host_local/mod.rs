//! `twill-host-local`: the reference host-local IPAM (same config, same on-disk store),
//! plus GC and STATUS. Also called in-process by twill-bridge.

pub mod config;
pub mod store;

use std::fs;
use std::net::IpAddr;

use twill_common::cni::{code, CniError, CniResult, Dns, Env, IpConfig, NetConf, Plugin, Request};

use crate::ipnet::{from_u128, to_u128, with_prefix};
use config::{describe_set, set_contains, IpamConfig, Range, RangeSet};
use store::Store;

/// The next candidates of a range set in round-robin order: after `last` if it is inside
/// the set, else from the first range's start; every address once, with its range.
fn round_robin(
    set: &RangeSet,
    last: Option<IpAddr>,
) -> impl Iterator<Item = (IpAddr, &Range)> + '_ {
    let (start_range, start_at) =
        match last.and_then(|l| set.iter().position(|r| r.contains(l)).map(|i| (i, l))) {
            Some((i, l)) => (i, Some(to_u128(l))),
            None => (0, None),
        };
    // Walk ranges from start_range, wrapping; the first range begins after `last`,
    // and the same range is revisited at the end for the addresses before `last`.
    let n = set.len();
    (0..=n).flat_map(move |k| {
        let r = &set[(start_range + k) % n];
        let v4 = r.start.is_ipv4();
        let (lo, hi) = (to_u128(r.start), to_u128(r.end));
        let (from, to) = match (k, start_at) {
            (0, Some(l)) => (l.saturating_add(1), hi),
            (k, Some(l)) if k == n => (lo, l),
            (k, None) if k == n => (1, 0),
            _ => (lo, hi),
        };
        (from..=to).map(move |x| (from_u128(x, v4), r))
    })
}

fn exhausted(idx: usize, set: &RangeSet) -> CniError {
    CniError::new(
        code::POOL_EXHAUSTED,
        format!(
            "failed to allocate for range {idx}: no IP addresses available in range set: {}",
            describe_set(set)
        ),
    )
}

fn parse_resolv_conf(path: &std::path::Path) -> Result<Dns, CniError> {
    let text = fs::read_to_string(path)
        .map_err(|e| CniError::internal(format!("read {}: {e}", path.display())))?;
    let mut dns = Dns::default();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => dns.nameservers.extend(f.next().map(str::to_string)),
            Some("domain") => dns.domain = f.next().unwrap_or_default().to_string(),
            Some("search") => dns.search = f.map(str::to_string).collect(),
            Some("options") => dns.options.extend(f.map(str::to_string)),
            _ => {}
        }
    }
    Ok(dns)
}

/// ADD: one address per range set (requested ones first), all or nothing.
pub fn add(conf: &NetConf, env: &Env) -> Result<CniResult, CniError> {
    let cfg = IpamConfig::load(conf, env)?;
    let dns = match &cfg.resolv_conf {
        Some(p) => parse_resolv_conf(p)?,
        None => Dns::default(),
    };
    let store = Store::open(&cfg.store_dir())?;
    let mine = store.find(&env.container_id, &env.ifname)?;
    let mut requested = cfg.requested.clone();
    let mut got: Vec<IpConfig> = Vec::new();
    let result = (|| {
        for (idx, set) in cfg.range_sets.iter().enumerate() {
            if let Some(r) = mine.iter().find(|r| set_contains(set, r.ip)) {
                return Err(CniError::internal(format!(
                    "{} has been allocated to {}, duplicate allocation is not allowed",
                    r.ip, env.container_id
                )));
            }
            let want = requested
                .iter()
                .position(|ip| set_contains(set, *ip))
                .map(|i| requested.remove(i));
            let (ip, range) = if let Some(ip) = want {
                let range = set
                    .iter()
                    .find(|r| r.contains(ip))
                    .ok_or_else(|| CniError::internal("range lookup"))?;
                if range.gateway == Some(ip) {
                    return Err(CniError::internal(format!(
                        "requested ip {ip} is subnet's gateway"
                    )));
                }
                if !store.reserve(ip, &env.container_id, &env.ifname, idx)? {
                    return Err(CniError::internal(format!(
                        "requested IP address {ip} is not available in range set {}",
                        describe_set(set)
                    )));
                }
                (ip, range)
            } else {
                let mut chosen = None;
                for (ip, range) in round_robin(set, store.last_reserved(idx)) {
                    if range.gateway == Some(ip) {
                        continue;
                    }
                    if store.reserve(ip, &env.container_id, &env.ifname, idx)? {
                        chosen = Some((ip, range));
                        break;
                    }
                }
                chosen.ok_or_else(|| exhausted(idx, set))?
            };
            let address = with_prefix(ip, range.subnet.prefix())
                .ok_or_else(|| CniError::internal("bad prefix"))?;
            got.push(IpConfig {
                address,
                gateway: range.gateway,
                interface: None,
            });
        }
        if !requested.is_empty() {
            let list: Vec<String> = requested.iter().map(ToString::to_string).collect();
            return Err(CniError::internal(format!(
                "failed to allocate all requested IPs: {}",
                list.join(", ")
            )));
        }
        Ok(())
    })();
    if let Err(e) = result {
        for ip in &got {
            let _ = store.release_ip(ip.address.ip());
        }
        return Err(e);
    }
    Ok(CniResult {
        interfaces: Vec::new(),
        ips: got,
        routes: cfg.routes.clone(),
        dns,
    })
}

/// DEL: releases every reservation of (container ID, ifname); idempotent, no netns needed.
pub fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let cfg = IpamConfig::load(conf, env)?;
    let dir = cfg.store_dir();
    if !dir.exists() {
        return Ok(());
    }
    Store::open(&dir)?
        .release_by_id(&env.container_id, &env.ifname)
        .map(|_| ())
}

/// CHECK: the reservation must exist.
pub fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let cfg = IpamConfig::load(conf, env)?;
    let store = Store::open(&cfg.store_dir())?;
    if store.find(&env.container_id, &env.ifname)?.is_empty() {
        return Err(CniError::internal(format!(
            "host-local: Failed to find address added by container {}",
            env.container_id
        )));
    }
    Ok(())
}

/// STATUS: code 50 when some range set has no free address left.
pub fn status(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let cfg = IpamConfig::load(conf, env)?;
    let dir = cfg.store_dir();
    let taken = if dir.exists() {
        Store::open(&dir)?.list()?
    } else {
        Vec::new()
    };
    for (idx, set) in cfg.range_sets.iter().enumerate() {
        let size: u128 = set.iter().map(|r| r.size()).sum();
        let used = taken
            .iter()
            .filter(|t| {
                set.iter()
                    .any(|r| r.contains(t.ip) && r.gateway != Some(t.ip))
            })
            .count() as u128;
        if used >= size {
            return Err(
                CniError::new(code::NOT_AVAILABLE, "no IP addresses available")
                    .with_details(format!("range set {idx} ({}) is full", describe_set(set))),
            );
        }
    }
    Ok(())
}

/// GC: releases every reservation whose attachment is not in `cni.dev/valid-attachments`.
/// Without the key nothing is known, so nothing is released.
pub fn gc(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let Some(valid) = conf.gc_attachments() else {
        return Ok(());
    };
    let cfg = IpamConfig::load(conf, env)?;
    let dir = cfg.store_dir();
    if !dir.exists() {
        return Ok(());
    }
    let store = Store::open(&dir)?;
    let mut errors = Vec::new();
    for r in store.list()? {
        let keep = valid.iter().any(|a| {
            a.container_id == r.container_id && (r.ifname.is_empty() || a.ifname == r.ifname)
        });
        if !keep {
            if let Err(e) = store.release_ip(r.ip) {
                errors.push(e.to_string());
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::internal(format!("gc: {}", errors.join("; "))))
    }
}

/// The `twill-host-local` binary.
pub struct HostLocal;

impl Plugin for HostLocal {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        add(&req.conf, &req.env)
    }
    fn del(&self, req: &Request) -> Result<(), CniError> {
        del(&req.conf, &req.env)
    }
    fn check(&self, req: &Request) -> Result<(), CniError> {
        check(&req.conf, &req.env)
    }
    fn status(&self, req: &Request) -> Result<(), CniError> {
        status(&req.conf, &req.env)
    }
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        gc(&req.conf, &req.env)
    }
    fn about(&self) -> String {
        "twill-host-local: host-local IPAM (reference-compatible store) from twill".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str, e: &str) -> Range {
        Range {
            subnet: "10.0.0.0/24".parse().unwrap(),
            start: s.parse().unwrap(),
            end: e.parse().unwrap(),
            gateway: None,
        }
    }

    fn call(dir: &std::path::Path, id: &str, extra: serde_json::Value) -> (NetConf, Env) {
        let mut c = serde_json::json!({"cniVersion":"1.1.0","name":"unit","type":"twill-host-local",
            "ipam":{"type":"twill-host-local","subnet":"10.9.0.0/29","dataDir":dir}});
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let env = Env::from_lookup(|k| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_CONTAINERID" => Some(id.into()),
            "CNI_NETNS" => Some("/x".into()),
            "CNI_IFNAME" => Some("eth0".into()),
            "CNI_PATH" => Some("/x".into()),
            _ => None,
        })
        .unwrap();
        (NetConf::parse(c.to_string().as_bytes()).unwrap(), env)
    }

    #[test]
    fn allocate_request_exhaust_release_gc() {
        let dir = std::env::temp_dir().join(format!("twill-hl-unit-{}", std::process::id()));
        let ip = |r: &CniResult| r.ips[0].address.ip().to_string();
        let (c, e) = call(&dir, "a", serde_json::json!({}));
        assert_eq!(ip(&add(&c, &e).unwrap()), "10.9.0.2");
        assert!(add(&c, &e)
            .unwrap_err()
            .msg
            .contains("duplicate allocation"));
        let (c, e) = call(
            &dir,
            "b",
            serde_json::json!({"args":{"cni":{"ips":["10.9.0.5"]}}}),
        );
        assert_eq!(ip(&add(&c, &e).unwrap()), "10.9.0.5");
        let (c, e) = call(&dir, "c", serde_json::json!({}));
        assert_eq!(
            ip(&add(&c, &e).unwrap()),
            "10.9.0.6",
            "round-robin continues after the last reservation"
        );
        for id in ["d", "e"] {
            let (c, e) = call(&dir, id, serde_json::json!({}));
            add(&c, &e).unwrap();
        }
        let (c, e) = call(&dir, "g", serde_json::json!({}));
        let err = add(&c, &e).unwrap_err();
        assert_eq!(err.code, code::POOL_EXHAUSTED, "{err}");
        assert_eq!(status(&c, &e).unwrap_err().code, code::NOT_AVAILABLE);
        let (c, e) = call(&dir, "a", serde_json::json!({}));
        del(&c, &e).unwrap();
        del(&c, &e).unwrap();
        status(&c, &e).unwrap();
        let (c, e) = call(
            &dir,
            "x",
            serde_json::json!({"cni.dev/valid-attachments":[{"containerID":"b","ifname":"eth0"}]}),
        );
        gc(&c, &e).unwrap();
        let left: Vec<String> = Store::open(&dir.join("unit"))
            .unwrap()
            .list()
            .unwrap()
            .iter()
            .map(|r| r.container_id.clone())
            .collect();
        assert_eq!(left, ["b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_robin_wraps_once() {
        let set = vec![r("10.0.0.2", "10.0.0.4"), r("10.0.0.10", "10.0.0.11")];
        let all: Vec<String> = round_robin(&set, None)
            .map(|(i, _)| i.to_string())
            .collect();
        assert_eq!(
            all,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.10", "10.0.0.11"]
        );
        let all: Vec<String> = round_robin(&set, Some("10.0.0.3".parse().unwrap()))
            .map(|(i, _)| i.to_string())
            .collect();
        assert_eq!(
            all,
            ["10.0.0.4", "10.0.0.10", "10.0.0.11", "10.0.0.2", "10.0.0.3"]
        );
        let all: Vec<String> = round_robin(&set, Some("10.0.0.11".parse().unwrap()))
            .map(|(i, _)| i.to_string())
            .collect();
        assert_eq!(
            all,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.10", "10.0.0.11"]
        );
        // Outside the set: start from the beginning.
        assert_eq!(
            round_robin(&set, Some("10.9.0.1".parse().unwrap())).count(),
            5
        );
    }
}
