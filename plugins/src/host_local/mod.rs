//! `twill-host-local`: the reference host-local IPAM (same config, same on-disk store),
//! plus GC and STATUS. Also called in-process by twill-bridge.
//!
//! Layout: `config` reads the IPAM config, `allocator` decides (over any `store::Store`),
//! `file_store` is the reference's on-disk store; this module is the CNI plumbing around them.

pub mod allocator;
pub mod config;
pub mod file_store;
#[cfg(test)]
pub mod mem_store;
pub mod store;

use std::fs;

use twill_common::cni::{CniError, CniResult, Dns, Env, IpConfig, NetConf, Plugin, Request};

use allocator::{check_free, Allocator};
use config::IpamConfig;
use file_store::FileStore;

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

/// The allocator over the network's on-disk store.
fn allocator(cfg: &IpamConfig) -> Allocator<FileStore> {
    Allocator::new(FileStore::new(cfg.store_dir()), cfg.range_sets.clone())
}

/// ADD: one address per range set (requested ones first), all or nothing.
pub fn add(conf: &NetConf, env: &Env) -> Result<CniResult, CniError> {
    let cfg = IpamConfig::load(conf, env)?;
    let dns = match &cfg.resolv_conf {
        Some(p) => parse_resolv_conf(p)?,
        None => Dns::default(),
    };
    let ips = allocator(&cfg)
        .allocate(&env.container_id, &env.ifname, &cfg.requested)?
        .into_iter()
        .map(|a| IpConfig {
            address: a.address,
            gateway: a.gateway,
            interface: None,
        })
        .collect();
    Ok(CniResult {
        interfaces: Vec::new(),
        ips,
        routes: cfg.routes,
        dns,
    })
}

/// DEL: releases every reservation of (container ID, ifname); idempotent, no netns needed.
pub fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let cfg = IpamConfig::load(conf, env)?;
    let alloc = allocator(&cfg);
    if !alloc.store().exists() {
        return Ok(());
    }
    alloc.release(&env.container_id, &env.ifname).map(|_| ())
}

/// CHECK: the reservation must exist.
pub fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let cfg = IpamConfig::load(conf, env)?;
    if allocator(&cfg)
        .reservations_of(&env.container_id, &env.ifname)?
        .is_empty()
    {
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
    let alloc = allocator(&cfg);
    if alloc.store().exists() {
        alloc.status()
    } else {
        check_free(&cfg.range_sets, &[])
    }
}

/// GC: releases every reservation whose attachment is not in `cni.dev/valid-attachments`.
/// Without the key nothing is known, so nothing is released.
pub fn gc(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let Some(valid) = conf.gc_attachments() else {
        return Ok(());
    };
    let cfg = IpamConfig::load(conf, env)?;
    let alloc = allocator(&cfg);
    if !alloc.store().exists() {
        return Ok(());
    }
    alloc.gc(valid).map(|_| ())
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
    use store::{LockedStore, Store};
    use twill_common::cni::code;

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

    /// The verbs end to end over the file store, as the binary runs them.
    #[test]
    fn allocate_request_exhaust_release_gc() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ip = |r: &CniResult| r.ips[0].address.to_string();
        let (c, e) = call(dir, "a", serde_json::json!({}));
        // Nothing stored yet: DEL and STATUS succeed without creating the store.
        del(&c, &e).unwrap();
        status(&c, &e).unwrap();
        assert!(!dir.join("unit").exists());
        let r = add(&c, &e).unwrap();
        assert_eq!(ip(&r), "10.9.0.2/29");
        assert_eq!(r.ips[0].gateway, Some("10.9.0.1".parse().unwrap()));
        check(&c, &e).unwrap();
        assert!(add(&c, &e)
            .unwrap_err()
            .msg
            .contains("duplicate allocation"));
        let (c, e) = call(
            dir,
            "b",
            serde_json::json!({"args":{"cni":{"ips":["10.9.0.5"]}}}),
        );
        assert_eq!(ip(&add(&c, &e).unwrap()), "10.9.0.5/29");
        let (c, e) = call(dir, "c", serde_json::json!({}));
        assert_eq!(
            ip(&add(&c, &e).unwrap()),
            "10.9.0.6/29",
            "round-robin continues after the last reservation"
        );
        for id in ["d", "e"] {
            let (c, e) = call(dir, id, serde_json::json!({}));
            add(&c, &e).unwrap();
        }
        let (c, e) = call(dir, "g", serde_json::json!({}));
        let err = add(&c, &e).unwrap_err();
        assert_eq!(err.code, code::POOL_EXHAUSTED, "{err}");
        assert_eq!(status(&c, &e).unwrap_err().code, code::NOT_AVAILABLE);
        assert_eq!(check(&c, &e).unwrap_err().code, code::INTERNAL);
        let (c, e) = call(dir, "a", serde_json::json!({}));
        del(&c, &e).unwrap();
        del(&c, &e).unwrap();
        status(&c, &e).unwrap();
        let (c, e) = call(
            dir,
            "x",
            serde_json::json!({"cni.dev/valid-attachments":[{"containerID":"b","ifname":"eth0"}]}),
        );
        gc(&c, &e).unwrap();
        let left: Vec<String> = FileStore::new(dir.join("unit"))
            .lock()
            .unwrap()
            .list()
            .unwrap()
            .iter()
            .map(|r| r.container_id.clone())
            .collect();
        assert_eq!(left, ["b"]);
    }
}
