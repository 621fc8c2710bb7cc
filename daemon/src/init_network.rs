//! `twilld init-network`: stores the network config (`<prefix>/config`, flannel's JSON) in
//! etcd once. An etcd transaction on the key's absence makes concurrent runs safe: exactly one
//! creates the key; the others find it and succeed only if it says the same.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, ValueEnum};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, TlsOptions, Txn, TxnOp,
    TxnOpResponse,
};
use ipnetwork::Ipv4Network;
use serde_json::{Map, Value};

use crate::cli::EtcdArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Vxlan,
    HostGw,
}

impl Backend {
    fn flannel_type(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["network", "config_file"])))]
pub struct InitNetworkArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Pod network (IPv4 CIDR, at least a /28); kubeadm's --pod-network-cidr.
    #[arg(long, env = "TWILLD_NETWORK")]
    pub network: Option<Ipv4Network>,
    /// Overlay backend.
    #[arg(long, env = "TWILLD_BACKEND", value_enum, default_value_t = Backend::Vxlan)]
    pub backend: Backend,
    /// Prefix length of each node's subnet (default: flannel's, 24 for networks up to /22).
    #[arg(long, env = "TWILLD_SUBNET_LEN")]
    pub subnet_len: Option<u8>,
    /// Store this flannel net-conf.json instead of one built from --network/--backend.
    #[arg(long, env = "TWILLD_CONFIG_FILE", conflicts_with_all = ["network", "backend", "subnet_len"])]
    pub config_file: Option<PathBuf>,
    /// Replace an existing, different config (nodes keep their leases only if they still fit).
    #[arg(long, env = "TWILLD_FORCE")]
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InitNetworkError {
    #[error("invalid network config: {0}")]
    Invalid(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd TLS needs both --etcd-certfile and --etcd-keyfile")]
    HalfTls,
    #[error(
        "{key} already holds a different config:\n  stored: {stored}\n  wanted: {wanted}\n\
         (use --force to replace it)"
    )]
    Different {
        key: String,
        stored: String,
        wanted: String,
    },
}

/// What `init-network` found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    AlreadyEqual,
    Replaced,
}

pub async fn run(args: &InitNetworkArgs) -> Result<Outcome, InitNetworkError> {
    let wanted = match &args.config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| InitNetworkError::Read {
                path: path.clone(),
                source,
            })?;
            serde_json::from_str::<Value>(&text)
                .map_err(|e| InitNetworkError::Invalid(format!("{}: {e}", path.display())))?
        }
        None => build_config(args)?,
    };
    validate(&wanted)?;
    let wanted_text = wanted.to_string();
    let key = format!("{}/config", args.etcd.etcd_prefix.trim_end_matches('/'));

    let mut client = connect(&args.etcd).await?;
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
        let stored = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .unwrap_or_default();
        let stored_text = String::from_utf8_lossy(&stored).into_owned();
        let equal = serde_json::from_slice::<Value>(&stored)
            .map(|v| normalize(&v) == normalize(&wanted))
            .unwrap_or(false);
        if equal {
            Outcome::AlreadyEqual
        } else if args.force {
            client.put(key.as_str(), wanted_text.as_str(), None).await?;
            Outcome::Replaced
        } else {
            return Err(InitNetworkError::Different {
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
fn build_config(args: &InitNetworkArgs) -> Result<Value, InitNetworkError> {
    let net = args
        .network
        .ok_or_else(|| InitNetworkError::Invalid("--network is required".into()))?;
    let mut obj = Map::new();
    obj.insert("Network".into(), Value::String(net.to_string()));
    if let Some(len) = args.subnet_len {
        obj.insert("SubnetLen".into(), Value::from(len));
    }
    let mut backend = Map::new();
    backend.insert(
        "Type".into(),
        Value::String(args.backend.flannel_type().into()),
    );
    obj.insert("Backend".into(), Value::Object(backend));
    Ok(Value::Object(obj))
}

/// The IPv4 subset of flannel's `CheckNetworkConfig` that can be judged without a node.
fn validate(cfg: &Value) -> Result<(), InitNetworkError> {
    let bad = |m: String| Err(InitNetworkError::Invalid(m));
    let norm = normalize(cfg);
    let Some(obj) = norm.as_object() else {
        return bad("the config must be a JSON object".into());
    };
    let Some(net) = obj.get("network").and_then(Value::as_str) else {
        return bad("\"Network\" (an IPv4 CIDR) is required".into());
    };
    let net: Ipv4Network = net
        .parse()
        .map_err(|e| InitNetworkError::Invalid(format!("Network {net:?}: {e}")))?;
    if net.network() != net.ip() {
        return bad(format!(
            "Network {net} has host bits set (did you mean {}/{}?)",
            net.network(),
            net.prefix()
        ));
    }
    if net.prefix() > 28 {
        return bad(format!("Network {net} is smaller than a /28"));
    }
    let subnet_len = match obj.get("subnetlen") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= u64::from(net.prefix()) + 2 && n <= 30 => Some(n as u8),
            _ => {
                return bad(format!(
                    "SubnetLen {v} must be between {} (four subnets) and 30",
                    net.prefix() + 2
                ))
            }
        },
    };
    let len = subnet_len.unwrap_or(if net.prefix() <= 22 {
        24
    } else {
        net.prefix() + 2
    });
    for field in ["subnetmin", "subnetmax"] {
        if let Some(v) = obj.get(field) {
            let ip: std::net::Ipv4Addr =
                v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    InitNetworkError::Invalid(format!("{field} {v} is not an IPv4 address"))
                })?;
            let aligned = u32::from(ip) & (u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0))
                == u32::from(ip);
            if !net.contains(ip) || !aligned {
                return bad(format!("{field} {ip} is not a /{len} subnet inside {net}"));
            }
        }
    }
    if obj.get("enableipv6").and_then(Value::as_bool) == Some(true) {
        return bad("twill supports IPv4 networks only (EnableIPv6)".into());
    }
    if let Some(backend) = obj.get("backend") {
        match backend.get("type").and_then(Value::as_str) {
            Some("vxlan" | "host-gw") => {}
            other => {
                return bad(format!(
                    "Backend.Type {other:?}: twill runs vxlan or host-gw"
                ))
            }
        }
    }
    Ok(())
}

/// Go's encoding/json matches keys case-insensitively and flannel lower-cases the backend
/// type, so compare configs with lower-case keys and type.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let k = k.to_ascii_lowercase();
                    let v = match (k.as_str(), v) {
                        ("type", Value::String(s)) => Value::String(s.to_ascii_lowercase()),
                        _ => normalize(v),
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        other => other.clone(),
    }
}

/// Connects per the etcd flags: TLS when a CA or client certificate is given (client
/// certificate only with both cert and key), plain otherwise.
pub async fn connect(e: &EtcdArgs) -> Result<Client, InitNetworkError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| InitNetworkError::Read {
            path: p.clone(),
            source,
        })
    };
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    let identity = match (&e.etcd_certfile, &e.etcd_keyfile) {
        (Some(c), Some(k)) => Some(Identity::from_pem(read(c)?, read(k)?)),
        (None, None) => None,
        _ => return Err(InitNetworkError::HalfTls),
    };
    if identity.is_some() || e.etcd_cafile.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &e.etcd_cafile {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        opts = opts.with_tls(tls);
    } else {
        tracing::warn!("connecting to etcd without TLS");
    }
    if let (Some(u), Some(p)) = (&e.etcd_username, &e.etcd_password) {
        opts = opts.with_user(u.as_str(), p.as_str());
    }
    Ok(Client::connect(&e.etcd_endpoints, Some(opts)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validation_follows_flannel() {
        assert!(
            validate(&json!({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})).is_ok()
        );
        assert!(validate(&json!({"network": "10.244.0.0/16", "SubnetLen": 26})).is_ok());
        assert!(validate(&json!({"Network": "10.244.0.0/29"})).is_err());
        assert!(validate(&json!({"Network": "10.244.1.0/16"})).is_err());
        assert!(validate(&json!({"Network": "10.244.0.0/16", "SubnetLen": 17})).is_err());
        assert!(validate(&json!({"Network": "10.244.0.0/16", "SubnetLen": 31})).is_err());
        assert!(
            validate(&json!({"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}})).is_err()
        );
        assert!(validate(&json!({"Network": "10.244.0.0/16", "SubnetMin": "10.244.3.0"})).is_ok());
        assert!(validate(&json!({"Network": "10.244.0.0/16", "SubnetMin": "10.244.3.5"})).is_err());
        assert!(validate(&json!({"Network": "10.244.0.0/16", "SubnetMax": "10.245.0.0"})).is_err());
        assert!(validate(&json!(["10.244.0.0/16"])).is_err());
    }

    #[test]
    fn comparison_ignores_key_case_and_order() {
        let a = json!({"Network": "10.244.0.0/16", "Backend": {"Type": "VXLAN", "VNI": 1}});
        let b = json!({"backend": {"vni": 1, "type": "vxlan"}, "network": "10.244.0.0/16"});
        assert_eq!(normalize(&a), normalize(&b));
        let c = json!({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}});
        assert_ne!(normalize(&a), normalize(&c));
    }
}
