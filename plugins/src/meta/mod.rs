//! The `twill` meta plugin (the flannel CNI plugin's role): reads the node's subnet.env,
//! renders a bridge + IPAM config from it, saves that config, and delegates to the bridge.
//!
//! Differences from the flannel plugin, on purpose:
//! - DEL removes the saved config only after the delegate's DEL succeeded, so a failed DEL
//!   can be retried instead of leaking the veth and IP;
//! - CHECK, STATUS and GC are implemented (STATUS is code 50 while subnet.env is missing);
//! - a missing subnet.env on ADD is code 11 (try again later);
//! - an unreadable saved config makes DEL fail (999, naming the file) unless the attachment is
//!   provably gone (flannel returns success and leaks the pod's veth and address);
//! - a FLANNEL_SUBNET outside FLANNEL_NETWORK is code 7; with `ipMasq` rendered for twill-bridge
//!   the cluster network is excluded from the masquerade (`masqExclude`).

mod gone;
pub mod render;
pub mod store;

use serde_json::{json, Map, Value};
use twill_common::cni::{
    code, delegate, delegate_add, exec_plugin, find_in_path, CniError, CniResult, Command, NetConf,
    Plugin, Request,
};

use render::{load_subnet_env, render, MetaConf, DEFAULT_DELEGATE};

/// The plugin.
pub struct Meta;

fn delegate_type(conf: &Map<String, Value>) -> String {
    conf.get("type")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_DELEGATE)
        .to_string()
}

fn to_bytes(v: &Map<String, Value>) -> Result<Vec<u8>, CniError> {
    serde_json::to_vec(v).map_err(|e| CniError::internal(format!("encode delegate config: {e}")))
}

/// The saved config with this request's prevResult and runtimeConfig (DEL/CHECK).
fn saved_with_request(saved: Map<String, Value>, conf: &NetConf) -> Map<String, Value> {
    let mut d = saved;
    if let Some(prev) = &conf.prev_result {
        d.insert("prevResult".into(), prev.clone());
    }
    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), Value::Object(rc.clone()));
    }
    d
}

fn unreadable(path: &std::path::Path, why: &str) -> CniError {
    CniError::internal(format!(
        "saved config {} is not a JSON object, so DEL cannot tell what to undo, and the \
         attachment may still exist ({why}); repair or remove the file, then DEL again",
        path.display()
    ))
}

/// The delegate type the current config renders (the saved one is unreadable).
fn meta_delegate_type(meta: &MetaConf) -> String {
    meta.delegate
        .as_ref()
        .map(delegate_type)
        .unwrap_or_else(|| DEFAULT_DELEGATE.to_string())
}

fn parse_saved(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

impl Plugin for Meta {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let meta = MetaConf::from_netconf(&req.conf)?;
        req.conf.check_prev_result()?;
        let env = load_subnet_env(&meta)?;
        let d = render(&req.conf, &meta, &env)?;
        let bytes = to_bytes(&d)?;
        // Saved first: if we die mid-ADD, the runtime's DEL still finds what to undo.
        store::save(&meta.data_dir, &req.env.container_id, &bytes)?;
        delegate_add(
            &delegate_type(&d),
            &req.env.path,
            &bytes,
            req.conf.version(),
        )
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let meta = MetaConf::from_netconf(&req.conf)?;
        let id = &req.env.container_id;
        let Some(bytes) = store::load(&meta.data_dir, id)? else {
            // Never ADDed, or already deleted: DEL is idempotent.
            return Ok(());
        };
        let Some(saved) = parse_saved(&bytes) else {
            return self.del_unreadable(req, &meta);
        };
        let d = saved_with_request(saved, &req.conf);
        delegate(
            &delegate_type(&d),
            Command::Del,
            &req.env.path,
            &to_bytes(&d)?,
        )?;
        store::remove(&meta.data_dir, id)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let meta = MetaConf::from_netconf(&req.conf)?;
        let id = &req.env.container_id;
        let bytes = store::load(&meta.data_dir, id)?.ok_or_else(|| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "no saved config for container {id} in {}",
                    meta.data_dir.display()
                ),
            )
        })?;
        let saved = parse_saved(&bytes).ok_or_else(|| {
            CniError::decoding(format!(
                "{} is not a JSON object",
                store::path(&meta.data_dir, id).display()
            ))
        })?;
        let d = saved_with_request(saved, &req.conf);
        delegate(
            &delegate_type(&d),
            Command::Check,
            &req.env.path,
            &to_bytes(&d)?,
        )
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        let meta = MetaConf::from_netconf(&req.conf)?;
        let env = load_subnet_env(&meta).map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
        let d = render(&req.conf, &meta, &env)?;
        delegate(
            &delegate_type(&d),
            Command::Status,
            &req.env.path,
            &to_bytes(&d)?,
        )
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let meta = MetaConf::from_netconf(&req.conf)?;
        let mut errors: Vec<String> = Vec::new();
        // Without a keep-list nothing is known to be stale (an absent key never means "none valid").
        if let Some(valid) = req.conf.gc_attachments() {
            for id in store::list(&meta.data_dir)? {
                if valid.iter().any(|a| a.container_id == id) {
                    continue;
                }
                if let Err(e) = self.gc_one(&meta, &req.conf.name, &id, &req.env.path) {
                    errors.push(format!("{id}: {e}"));
                }
            }
        }
        // Then the delegate collects its own state (IPAM reservations) with the same keep-list.
        let forwarded = load_subnet_env(&meta).and_then(|env| {
            let mut d = render(&req.conf, &meta, &env)?;
            if let Some(v) = &req.conf.valid_attachments {
                d.insert("cni.dev/valid-attachments".into(), json!(v));
            }
            if let Some(v) = &req.conf.legacy_attachments {
                d.insert("cni.dev/attachments".into(), json!(v));
            }
            delegate(
                &delegate_type(&d),
                Command::Gc,
                &req.env.path,
                &to_bytes(&d)?,
            )
        });
        if let Err(e) = forwarded {
            errors.push(format!("delegate GC: {e}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::internal(format!("GC: {}", errors.join("; "))))
        }
    }

    fn about(&self) -> String {
        "twill CNI plugin: renders a bridge config from twilld's subnet.env and delegates".into()
    }
}

impl Meta {
    /// DEL when the saved config cannot be parsed: nothing tells what to undo. Success (and the
    /// file goes) only when the attachment is provably gone (its netns and its reservations);
    /// otherwise code 999 naming the file, so the runtime retries until an operator repairs
    /// or removes it, instead of leaking the pod's veth and address (flannel returns success).
    fn del_unreadable(&self, req: &Request, meta: &MetaConf) -> Result<(), CniError> {
        let id = &req.env.container_id;
        let path = store::path(&meta.data_dir, id);
        match gone::attachment_gone(req) {
            Ok(gone::Gone::Yes) => {
                // The default delegate's masquerade rules are keyed by network + container ID,
                // so they can be removed without the saved config.
                if meta_delegate_type(meta) == DEFAULT_DELEGATE {
                    crate::masq::del(&req.conf.name, id)?;
                }
                eprintln!(
                    "twill: {} is not a JSON object; its netns and reservations are gone, removing it",
                    path.display()
                );
                store::remove(&meta.data_dir, id)
            }
            Ok(gone::Gone::No(why)) => Err(unreadable(&path, &why)),
            Err(e) => Err(unreadable(&path, &e.to_string())),
        }
    }

    /// A synthesised DEL of a stale attachment (its netns is assumed gone), then the file goes.
    /// Only attachments of `network`: the runtime lists the valid attachments of the network
    /// it collects, and networks of this plugin may share a dataDir.
    fn gc_one(
        &self,
        meta: &MetaConf,
        network: &str,
        id: &str,
        path: &[std::path::PathBuf],
    ) -> Result<(), CniError> {
        let Some(bytes) = store::load(&meta.data_dir, id)? else {
            return Ok(());
        };
        let saved = parse_saved(&bytes)
            .ok_or_else(|| CniError::decoding("saved config is not a JSON object"))?;
        if saved.get("name").and_then(Value::as_str) != Some(network) {
            return Ok(());
        }
        let bin = find_in_path(&delegate_type(&saved), path)?;
        // The saved file does not record the ifname; runtimes use eth0 for the pod network.
        exec_plugin(
            &bin,
            Command::Del,
            &bytes,
            &[
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", ""),
            ],
        )?;
        store::remove(&meta.data_dir, id)
    }
}
