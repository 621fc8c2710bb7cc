//! `twilld init-network`: stores the network config (`<prefix>/config`, flannel's JSON) in
//! etcd once. An etcd transaction on the key's absence makes concurrent runs safe: exactly one
//! creates the key; the others find it and succeed only if it says the same.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use ipnetwork::Ipv4Network;
use serde_json::{Map, Value};

use crate::cli::InitNetworkArgs;
use crate::config::NetworkConfig;
use crate::error::{Error, Result};
use crate::etcd_store::EtcdConfig;

/// What `init-network` found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    AlreadyEqual,
    Replaced,
}

pub async fn run(args: &InitNetworkArgs) -> Result<Outcome> {
    let wanted_text = match &args.config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(Error::io(format!("read {}", path.display())))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            v.to_string()
        }
        None => build_config(args)?.to_string(),
    };
    let wanted = NetworkConfig::parse(&wanted_text)?;
    reject_host_bits(&wanted_text)?;
    let etcd = args.etcd.config();
    let key = format!("{}/config", etcd.prefix.trim_end_matches('/'));

    let mut client = connect(&etcd).await?;
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(key.as_str(), wanted_text.as_str(), None)])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let resp = client.txn(txn).await?;
    let outcome = if resp.succeeded() {
        Outcome::Created
    } else {
        let (stored, stored_rev) = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
                _ => None,
            })
            .unwrap_or_default();
        let stored_text = String::from_utf8_lossy(&stored).into_owned();
        // Equal as twill reads it: defaults applied, keys case-insensitive (Go's decoder).
        if NetworkConfig::parse(&stored_text).ok().as_ref() == Some(&wanted) {
            Outcome::AlreadyEqual
        } else if args.force {
            // Replace exactly the value that was read and compared: a config another operator
            // wrote in between is not overwritten blindly.
            let cas = Txn::new()
                .when(vec![Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    stored_rev,
                )])
                .and_then(vec![TxnOp::put(key.as_str(), wanted_text.as_str(), None)]);
            if !client.txn(cas).await?.succeeded() {
                return Err(Error::Config(format!(
                    "{key} changed while init-network --force was replacing it; run it again"
                )));
            }
            Outcome::Replaced
        } else {
            return Err(Error::ConfigExists {
                key,
                stored: stored_text,
                wanted: wanted_text,
            });
        }
    };
    println!("{key}: {outcome:?} {wanted_text}");
    Ok(outcome)
}

/// flannel's JSON with only what was asked for, so an equal flannel-written config compares equal.
fn build_config(args: &InitNetworkArgs) -> Result<Value> {
    let net = args
        .network
        .ok_or_else(|| Error::Config("--network is required".into()))?;
    let mut obj = Map::new();
    obj.insert("Network".into(), Value::String(net.to_string()));
    if let Some(len) = args.subnet_len {
        obj.insert("SubnetLen".into(), Value::from(len));
    }
    let mut backend = Map::new();
    backend.insert("Type".into(), Value::String(args.backend.to_string()));
    obj.insert("Backend".into(), Value::Object(backend));
    Ok(Value::Object(obj))
}

/// The parser masks host bits when reading; what goes into etcd for every node (flannel
/// nodes included) must be the network address itself.
fn reject_host_bits(text: &str) -> Result<()> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
    let net = v
        .as_object()
        .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case("network")))
        .and_then(|(_, v)| v.as_str())
        .and_then(|s| s.parse::<Ipv4Network>().ok());
    match net {
        Some(n) if n.ip() != n.network() => Err(Error::Config(format!(
            "Network {n} has host bits set (did you mean {}/{}?)",
            n.network(),
            n.prefix()
        ))),
        _ => Ok(()),
    }
}

/// Connects with the daemon's etcd options (TLS, client certificate, auth), bounding each
/// request so a hung etcd fails the Job instead of stalling it.
async fn connect(e: &EtcdConfig) -> Result<Client> {
    let (endpoints, opts) = crate::etcd_store::connect_options(e)?;
    Ok(Client::connect(endpoints, Some(opts.with_timeout(Duration::from_secs(10)))).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bits_are_refused() {
        assert!(reject_host_bits(r#"{"Network":"10.244.0.0/16"}"#).is_ok());
        assert!(reject_host_bits(r#"{"network":"10.244.1.0/16"}"#).is_err());
    }
}
