//! [`SubnetStore`] on etcd v3, flannel's key schema under `--etcd-prefix`.
//!
//! No per-key `TimeToLive` RPCs (flannel does one per key): a key's etcd lease ID comes with
//! the listing, and expiry shows up as a DELETE event.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use ipnetwork::Ipv4Network;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::lease::{parse_subnet_key, subnet_key, Lease, LeaseAttrs};
use crate::metrics::Metrics;
use crate::store::{LeaseEvent, StoreUpdate, SubnetStore};

/// Backoff between reconnect attempts: 100 ms doubling up to 5 s (flannel's bounds).
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Logged (at warn, so an operator sees it) for a key under `subnets/` that is skipped.
const UNPARSEABLE: &str =
    "ignoring a lease that is not in flannel's format (key <a.b.c.d>-<len>, JSON value with PublicIP)";

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

/// How to reach etcd: endpoints, key prefix, TLS files and basic auth. Built from the command
/// line in `cli.rs`; the store, init-network and doctor take this, not clap types.
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub cafile: Option<std::path::PathBuf>,
    pub certfile: Option<std::path::PathBuf>,
    pub keyfile: Option<std::path::PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl EtcdConfig {
    /// TLS when a client certificate is given or any endpoint is https.
    pub fn uses_tls(&self) -> bool {
        (self.certfile.is_some() && self.keyfile.is_some())
            || self.endpoints.iter().any(|e| e.starts_with("https://"))
    }

    /// The endpoints as dialled: all https:// when TLS is used.
    pub fn effective_endpoints(&self) -> Vec<String> {
        let tls = self.uses_tls();
        self.endpoints
            .iter()
            .map(|e| {
                if tls {
                    e.replacen("http://", "https://", 1)
                } else {
                    e.clone()
                }
            })
            .collect()
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(Error::io(format!("read {}", path.display())))
}

/// Connection options from the flags: TLS when certfile+keyfile are given (or an endpoint is
/// https), the CA from cafile; basic auth from username/password.
pub(crate) fn connect_options(args: &EtcdConfig) -> Result<(Vec<String>, ConnectOptions)> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    let client_cert = match (&args.certfile, &args.keyfile) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        (None, None) => None,
        _ => {
            return Err(Error::Config(
                "--etcd-certfile and --etcd-keyfile must be given together".into(),
            ))
        }
    };
    let tls = args.uses_tls();
    let endpoints = args.effective_endpoints();
    if tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &args.cafile {
            t = t.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let Some((cert, key)) = client_cert {
            t = t.identity(Identity::from_pem(cert, key));
        }
        opts = opts.with_tls(t);
    } else {
        warn!("etcd: no client certificate given, talking plain HTTP");
    }
    if let (Some(u), Some(p)) = (&args.username, &args.password) {
        opts = opts.with_user(u.clone(), p.clone());
    }
    Ok((endpoints, opts))
}

impl EtcdStore {
    /// Connects once; the caller retries.
    pub async fn connect(args: &EtcdConfig) -> Result<EtcdStore> {
        let (endpoints, opts) = connect_options(args)?;
        let client = Client::connect(endpoints, Some(opts)).await?;
        Ok(EtcdStore {
            client,
            prefix: args.prefix.trim_end_matches('/').to_string(),
        })
    }

    /// Connects, retrying with capped backoff and a log line per failure.
    pub async fn connect_retry(args: &EtcdConfig) -> Result<EtcdStore> {
        let mut backoff = BACKOFF_MIN;
        loop {
            match EtcdStore::connect(args).await {
                Ok(s) => return Ok(s),
                Err(e @ (Error::Config(_) | Error::Io { .. })) => return Err(e),
                Err(e) => {
                    warn!(endpoints = ?args.endpoints, "cannot connect to etcd: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, subnet: Ipv4Network) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(subnet))
    }

    fn kv_to_lease(kv: &KeyValue) -> Option<Lease> {
        let key = kv.key_str().ok()?;
        let subnet = parse_subnet_key(key)?;
        let attrs = LeaseAttrs::parse(kv.value())?;
        Some(Lease {
            subnet,
            attrs,
            etcd_lease: kv.lease(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        })
    }
}

impl SubnetStore for EtcdStore {
    async fn get_config(&self) -> Result<Option<String>> {
        let resp = self
            .client
            .kv_client()
            .get(format!("{}/config", self.prefix), None)
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn list(&self) -> Result<(Vec<Lease>, i64)> {
        let resp = self
            .client
            .kv_client()
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            match EtcdStore::kv_to_lease(kv) {
                Some(l) => out.push(l),
                None => warn!(key = %String::from_utf8_lossy(kv.key()), "{UNPARSEABLE}"),
            }
        }
        Ok((out, rev))
    }

    async fn create(
        &self,
        subnet: Ipv4Network,
        attrs: &LeaseAttrs,
        ttl: i64,
    ) -> Result<Option<Lease>> {
        let mut lc = self.client.lease_client();
        let grant = lc.grant(ttl, None).await?;
        let key = self.key(subnet);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                attrs.to_json(),
                Some(PutOptions::new().with_lease(grant.id())),
            )]);
        // A failed or lost txn leaves the grant unattached: revoke it rather than let it live
        // for the TTL (once per retry).
        let resp = match self.client.kv_client().txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                let _ = lc.revoke(grant.id()).await;
                return Err(e.into());
            }
        };
        if !resp.succeeded() {
            let _ = lc.revoke(grant.id()).await;
            return Ok(None);
        }
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Some(Lease {
            subnet,
            attrs: attrs.clone(),
            etcd_lease: grant.id(),
            mod_revision: rev,
            create_revision: rev,
        }))
    }

    async fn update(&self, old: &Lease, attrs: &LeaseAttrs, ttl: i64) -> Result<Option<Lease>> {
        let key = self.key(old.subnet);
        let mut lc = self.client.lease_client();
        let lease_id = if old.etcd_lease == 0 {
            0
        } else {
            lc.grant(ttl, None).await?.id()
        };
        let put_opts = (lease_id != 0).then(|| PutOptions::new().with_lease(lease_id));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                old.mod_revision,
            )])
            .and_then([TxnOp::put(key, attrs.to_json(), put_opts)]);
        let resp = match self.client.kv_client().txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                if lease_id != 0 {
                    let _ = lc.revoke(lease_id).await;
                }
                return Err(e.into());
            }
        };
        if !resp.succeeded() {
            if lease_id != 0 {
                let _ = lc.revoke(lease_id).await;
            }
            return Ok(None);
        }
        // The old etcd lease would expire unattached (flannel leaks it); revoke it now.
        if old.etcd_lease != 0 && old.etcd_lease != lease_id {
            let _ = lc.revoke(old.etcd_lease).await;
        }
        Ok(Some(Lease {
            subnet: old.subnet,
            attrs: attrs.clone(),
            etcd_lease: lease_id,
            mod_revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            create_revision: old.create_revision,
        }))
    }

    async fn rewrite(&self, current: &Lease, attrs: &LeaseAttrs) -> Result<Option<Lease>> {
        let key = self.key(current.subnet);
        let put_opts =
            (current.etcd_lease != 0).then(|| PutOptions::new().with_lease(current.etcd_lease));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                current.mod_revision,
            )])
            .and_then([TxnOp::put(key, attrs.to_json(), put_opts)]);
        let resp = self.client.kv_client().txn(txn).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        Ok(Some(Lease {
            attrs: attrs.clone(),
            mod_revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            ..current.clone()
        }))
    }

    async fn delete(&self, lease: &Lease) -> Result<()> {
        let key = self.key(lease.subnet);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                lease.mod_revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        self.client.kv_client().txn(txn).await?;
        Ok(())
    }

    async fn keep_alive(&self, etcd_lease: i64) -> Result<bool> {
        let (mut keeper, mut stream) = self.client.lease_client().keep_alive(etcd_lease).await?;
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(resp) => Ok(resp.ttl() > 0),
            None => Err(Error::Backend("etcd closed the keep-alive stream".into())),
        }
    }

    async fn watch(&self, tx: mpsc::Sender<StoreUpdate>, metrics: Arc<Metrics>) {
        let prefix = self.subnets_prefix();
        let mut backoff = BACKOFF_MIN;
        let mut next_rev: Option<i64> = None;
        let mut failed = false;
        loop {
            if tx.is_closed() {
                return;
            }
            if failed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            let rev = match next_rev {
                Some(r) => r,
                None => match self.list().await {
                    Ok((leases, rev)) => {
                        if failed {
                            metrics.etcd_reconnects.inc();
                            info!(
                                "etcd: reconnected, re-listed {} leases at revision {rev}",
                                leases.len()
                            );
                        }
                        if tx.send(StoreUpdate::Snapshot(leases)).await.is_err() {
                            return;
                        }
                        rev + 1
                    }
                    Err(e) => {
                        if !failed {
                            warn!("etcd: listing leases failed: {e}; retrying with backoff (data path unchanged)");
                        }
                        failed = true;
                        continue;
                    }
                },
            };
            next_rev = Some(rev);
            let opts = WatchOptions::new().with_prefix().with_start_revision(rev);
            let mut stream = match self
                .client
                .watch_client()
                .watch(prefix.clone(), Some(opts))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    if !failed {
                        warn!(
                            "etcd: watch failed: {e}; retrying with backoff (data path unchanged)"
                        );
                    }
                    failed = true;
                    next_rev = None;
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() != 0 {
                            warn!(
                                "etcd: watch revision {} compacted (compact revision {}); re-listing",
                                next_rev.unwrap_or(0),
                                resp.compact_revision()
                            );
                            next_rev = None;
                            failed = false;
                            break;
                        }
                        if resp.canceled() {
                            warn!(
                                "etcd: watch canceled ({}); re-listing",
                                resp.cancel_reason()
                            );
                            next_rev = None;
                            failed = true;
                            break;
                        }
                        if failed {
                            failed = false;
                            backoff = BACKOFF_MIN;
                        }
                        let mut events = Vec::with_capacity(resp.events().len());
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            next_rev = Some(kv.mod_revision() + 1);
                            match ev.event_type() {
                                EventType::Put => match EtcdStore::kv_to_lease(kv) {
                                    Some(l) => events.push(LeaseEvent::Put(l)),
                                    None => warn!(
                                        key = %String::from_utf8_lossy(kv.key()),
                                        "{UNPARSEABLE}"
                                    ),
                                },
                                EventType::Delete => {
                                    if let Some(s) = kv.key_str().ok().and_then(parse_subnet_key) {
                                        events.push(LeaseEvent::Delete(s));
                                    }
                                }
                            }
                        }
                        if !events.is_empty() && tx.send(StoreUpdate::Events(events)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => {
                        warn!("etcd: watch stream ended; re-listing");
                        next_rev = None;
                        failed = true;
                        break;
                    }
                    Err(e) => {
                        warn!("etcd: watch broken: {e}; re-listing with backoff (data path unchanged)");
                        next_rev = None;
                        failed = true;
                        break;
                    }
                }
            }
        }
    }
}
