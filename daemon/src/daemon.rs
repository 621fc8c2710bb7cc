//! The node daemon's life cycle: config → lease → device → subnet.env → peers → rules →
//! CNI conflist, then a loop over watch updates, lease renewals, reconcile ticks and device
//! deletions. Nothing is torn down on exit: the lease, the device, the routes, the rules and
//! the conflist stay, so a restart changes nothing for running pods.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::NetlinkPayload;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{error, info, warn};
use twill_common::subnet_env::SubnetEnv;

use crate::alloc::{self, Plan};
use crate::backend::routed::RoutedBackend;
use crate::backend::Backend;
use crate::cli::RunArgs;
use crate::cni_conf::{self, CniPaths};
use crate::config::NetworkConfig;
use crate::error::{Error, Result};
use crate::etcd_store::{EtcdStore, BACKOFF_MAX, BACKOFF_MIN};
use crate::lease::{Lease, LeaseAttrs};
use crate::metrics::Metrics;
use crate::netlink::Netlink;
use crate::rules::{self, NftRules, Rules};
use crate::store::{LeaseEvent, StoreUpdate, SubnetStore};
use crate::{health, iface};

/// Lost create races tolerated in a row before giving up (flanneld gives up after the first).
const RACE_RETRIES: u32 = 10;

/// Netlink replies take microseconds; a lost one must never stall the daemon's loop.
async fn bounded<T>(limit: Duration, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| Error::Backend(format!("kernel did not answer within {limit:?}")))?
}

const PEER_OP_LIMIT: Duration = Duration::from_secs(5);
const BULK_LIMIT: Duration = Duration::from_secs(60);

/// Entry point of `twilld` without a subcommand.
pub async fn run(args: RunArgs) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    if args.healthz_port != 0 {
        health::serve(
            SocketAddr::new(args.healthz_ip, args.healthz_port),
            metrics.clone(),
        )
        .await?;
    }
    let store = EtcdStore::connect_retry(&args.etcd).await?;
    let nl = Netlink::open()?;
    let cfg = wait_config(&store).await;
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, backend = cfg.backend.type_name(), "network config loaded");
    if let Err(e) = rules::enable_ip_forward() {
        warn!("cannot enable ip_forward: {e}");
    }
    let underlay = iface::detect(&nl, args.iface.as_deref(), args.public_ip).await?;
    info!(iface = %underlay.name, public_ip = %underlay.public_ip, mtu = underlay.mtu, "underlay");
    let backend = RoutedBackend::new(nl.clone(), &cfg.backend, underlay, args.state_dir.clone())?;
    let rules = NftRules::new(args.ip_masq);
    Daemon::new(store, backend, rules, cfg, args, metrics)
        .run()
        .await
}

/// Reads `<prefix>/config` until it is present and valid, logging why not.
async fn wait_config<S: SubnetStore>(store: &S) -> NetworkConfig {
    let mut last = String::new();
    loop {
        let why = match store.get_config().await {
            Ok(Some(raw)) => match NetworkConfig::parse(&raw) {
                Ok(c) => return c,
                Err(e) => format!("{e}; fix the config key in etcd"),
            },
            Ok(None) => "network config not found in etcd (<prefix>/config); did you create it with the etcd v3 API?".into(),
            Err(e) => format!("cannot read the network config: {e}"),
        };
        if why != last {
            warn!("{why}; retrying every second");
            last = why;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Takes a subnet: reuse, previous, or a random free one; retries lost races.
async fn acquire<S: SubnetStore>(
    store: &S,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<Ipv4Network>,
    ttl: i64,
) -> Result<Lease> {
    let mut lost = HashSet::new();
    for _ in 0..RACE_RETRIES {
        let (leases, _) = store.list().await?;
        let d = alloc::decide(cfg, &leases, attrs.public_ip, previous, &lost)?;
        for s in &d.stale {
            info!(subnet = %s.subnet, "deleting a stale lease of this node");
            store.delete(s).await?;
        }
        match d.plan {
            Plan::Reuse(l) => match store.update(&l, attrs, ttl).await? {
                Some(n) => {
                    info!(subnet = %n.subnet, reservation = (n.etcd_lease == 0), "reusing this node's lease");
                    return Ok(n);
                }
                None => warn!(subnet = %l.subnet, "lease changed while renewing it; retrying"),
            },
            Plan::Create(sn) => match store.create(sn, attrs, ttl).await? {
                Some(n) => {
                    info!(subnet = %n.subnet, "acquired a new lease");
                    return Ok(n);
                }
                None => {
                    warn!(subnet = %sn, "another node took subnet {sn} first; retrying with another");
                    lost.insert(sn);
                }
            },
        }
    }
    Err(Error::RaceRetriesExhausted(RACE_RETRIES))
}

/// Retries [`acquire`] through etcd outages; other errors (out of subnets) are fatal.
async fn acquire_retry<S: SubnetStore>(
    store: &S,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<Ipv4Network>,
    ttl: i64,
) -> Result<Lease> {
    let mut backoff = BACKOFF_MIN;
    loop {
        match acquire(store, cfg, attrs, previous, ttl).await {
            Err(Error::Etcd(e)) => {
                warn!("etcd unavailable while acquiring a lease: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

/// Subscribes to link deletions and reports those of `name`.
fn watch_link_deletions(name: String) -> Result<mpsc::Receiver<()>> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])
            .map_err(Error::io("open netlink link monitor"))?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) = msg.payload {
                let ours = m
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if *n == name));
                if ours && tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

struct Daemon<S: SubnetStore, B: Backend, R: Rules> {
    store: S,
    backend: B,
    rules: R,
    cfg: NetworkConfig,
    args: RunArgs,
    metrics: Arc<Metrics>,
    own: Option<Lease>,
    peers: HashMap<Ipv4Network, Lease>,
    subnet_env_ok: bool,
    backend_ok: bool,
    rules_ok: bool,
    conflist_ok: bool,
    synced: bool,
    last_conflist_attempt: Option<Instant>,
    last_conflist_error: String,
}

impl<S: SubnetStore, B: Backend, R: Rules> Daemon<S, B, R> {
    fn new(
        store: S,
        backend: B,
        rules: R,
        cfg: NetworkConfig,
        args: RunArgs,
        metrics: Arc<Metrics>,
    ) -> Self {
        Daemon {
            store,
            backend,
            rules,
            cfg,
            args,
            metrics,
            own: None,
            peers: HashMap::new(),
            subnet_env_ok: false,
            backend_ok: false,
            rules_ok: false,
            conflist_ok: false,
            synced: false,
            last_conflist_attempt: None,
            last_conflist_error: String::new(),
        }
    }

    fn ttl(&self) -> i64 {
        self.args.lease_ttl.clamp(5, i64::MAX as u64) as i64
    }

    /// Keep-alive period: a third of the TTL, at most 10 minutes.
    fn renew_period(&self) -> Duration {
        Duration::from_secs((self.ttl() as u64 / 3).clamp(1, 600))
    }

    fn reconcile_period(&self) -> Duration {
        Duration::from_secs(self.args.reconcile_interval.max(1))
    }

    fn previous_subnet(&self) -> Option<Ipv4Network> {
        self.own.as_ref().map(|l| l.subnet).or_else(|| {
            SubnetEnv::read(&self.args.subnet_file)
                .ok()
                .and_then(|e| e.subnet)
        })
    }

    /// Acquires (or re-acquires) the lease and puts the node side in place for it.
    async fn take_lease(&mut self) -> Result<()> {
        let attrs = self.backend.lease_attrs();
        let prev = self.previous_subnet();
        let lease = acquire_retry(&self.store, &self.cfg, &attrs, prev, self.ttl()).await?;
        let changed = self.own.as_ref().map(|o| o.subnet) != Some(lease.subnet);
        if changed && self.own.is_some() {
            error!(
                old = %self.own.as_ref().map(|o| o.subnet.to_string()).unwrap_or_default(),
                new = %lease.subnet,
                "this node's subnet changed; pods on the old subnet lose connectivity"
            );
        }
        self.peers.remove(&lease.subnet);
        let _ = bounded(PEER_OP_LIMIT, self.backend.remove_peer(lease.subnet)).await;
        self.own = Some(lease);
        if changed {
            self.setup_node().await;
        }
        Ok(())
    }

    /// Device address, subnet.env and rules for the current lease.
    async fn setup_node(&mut self) {
        let Some(own) = self.own.clone() else { return };
        match bounded(BULK_LIMIT, self.backend.ensure(own.subnet)).await {
            Ok(recreated) => {
                self.backend_ok = true;
                if recreated && self.synced {
                    self.reconcile().await;
                }
            }
            Err(e) => {
                self.backend_ok = false;
                error!("backend setup failed: {e}");
            }
        }
        let env = SubnetEnv::new_v4(
            self.cfg.network,
            own.subnet,
            self.backend.mtu(),
            self.args.ip_masq,
        );
        match env.write(&self.args.subnet_file) {
            Ok(()) => {
                self.subnet_env_ok = true;
                info!(path = %self.args.subnet_file.display(), subnet = %own.subnet, mtu = self.backend.mtu(), "wrote subnet.env");
            }
            Err(e) => {
                self.subnet_env_ok = false;
                error!("{e}");
            }
        }
        self.apply_rules().await;
    }

    async fn apply_rules(&mut self) {
        let Some(own) = &self.own else { return };
        match self.rules.apply(self.cfg.network, own.subnet).await {
            Ok(()) => self.rules_ok = true,
            Err(e) => {
                self.rules_ok = false;
                error!("installing forward/masquerade rules failed: {e}; retrying");
            }
        }
    }

    async fn reconcile(&mut self) {
        match bounded(BULK_LIMIT, self.backend.reconcile(&self.peers)).await {
            Ok(n) => {
                if n > 0 {
                    info!("reconcile corrected {n} kernel entries");
                }
                self.metrics.reconcile_corrections.add(n);
                self.synced = true;
            }
            Err(e) => warn!("reconcile: {e}"),
        }
        self.metrics
            .peers_programmed
            .set(self.backend.programmed() as u64);
    }

    fn is_own(&self, l: &Lease) -> bool {
        self.own.as_ref().is_some_and(|o| o.subnet == l.subnet)
    }

    /// Applies a full listing: diff against the known peers, then reconcile the kernel.
    async fn on_snapshot(&mut self, leases: Vec<Lease>) -> Result<()> {
        self.metrics.leases_known.set(leases.len() as u64);
        let mut own_seen = false;
        let mut next = HashMap::with_capacity(leases.len());
        for l in leases {
            if self.is_own(&l) {
                if l.attrs.public_ip == self.backend.lease_attrs().public_ip {
                    own_seen = true;
                    self.own = Some(l);
                }
                continue;
            }
            next.insert(l.subnet, l);
        }
        self.peers = next;
        if !own_seen {
            warn!("this node's lease is gone from etcd (expired or deleted); re-acquiring");
            self.take_lease().await?;
        }
        self.reconcile().await;
        Ok(())
    }

    async fn on_events(&mut self, events: Vec<LeaseEvent>) -> Result<()> {
        let mut reacquire = false;
        for ev in events {
            match ev {
                LeaseEvent::Put(l) => {
                    if self.is_own(&l) {
                        if l.attrs.public_ip == self.backend.lease_attrs().public_ip {
                            self.own = Some(l);
                        } else {
                            warn!(subnet = %l.subnet, other = %l.attrs.public_ip, "our subnet was given to another node");
                            reacquire = true;
                        }
                        continue;
                    }
                    let subnet = l.subnet;
                    if let Err(e) = bounded(PEER_OP_LIMIT, self.backend.add_peer(&l)).await {
                        warn!(subnet = %subnet, "programming peer failed: {e}; the next reconcile retries");
                    }
                    self.peers.insert(subnet, l);
                }
                LeaseEvent::Delete(s) => {
                    if self.own.as_ref().is_some_and(|o| o.subnet == s) {
                        warn!(subnet = %s, "this node's lease was deleted; re-acquiring");
                        reacquire = true;
                        continue;
                    }
                    if self.peers.remove(&s).is_some() {
                        info!(subnet = %s, "peer lease removed");
                    }
                    if let Err(e) = bounded(PEER_OP_LIMIT, self.backend.remove_peer(s)).await {
                        warn!(subnet = %s, "removing peer failed: {e}; the next reconcile retries");
                    }
                }
            }
        }
        self.metrics
            .leases_known
            .set(self.peers.len() as u64 + self.own.is_some() as u64);
        self.metrics
            .peers_programmed
            .set(self.backend.programmed() as u64);
        if reacquire {
            self.take_lease().await?;
        }
        Ok(())
    }

    /// Writes the conflist once everything it promises is in place. Probing the plugins
    /// runs them, so it happens on a blocking thread and at most once a second.
    async fn try_conflist(&mut self) {
        if !(self.subnet_env_ok && self.backend_ok && self.synced && self.rules_ok) {
            return;
        }
        if self
            .last_conflist_attempt
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_conflist_attempt = Some(Instant::now());
        let (conf, bin, data, subnet) = (
            self.args.cni_conf_dir.clone(),
            self.args.cni_bin_dir.clone(),
            self.args.cni_data_dir.clone(),
            self.args.subnet_file.clone(),
        );
        let result = tokio::task::spawn_blocking(move || {
            cni_conf::write(&CniPaths {
                conf_dir: &conf,
                bin_dir: &bin,
                data_dir: &data,
                subnet_file: &subnet,
            })
        })
        .await
        .map_err(|e| Error::Backend(format!("conflist task: {e}")))
        .and_then(|r| r);
        match result {
            Ok(p) => {
                if !self.conflist_ok {
                    info!(path = %p.display(), "CNI config written; the node can turn Ready");
                }
                self.conflist_ok = true;
                self.last_conflist_error.clear();
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != self.last_conflist_error {
                    error!("NOT writing the CNI config, the node stays NotReady: {msg}");
                    self.last_conflist_error = msg;
                }
                self.conflist_ok = false;
            }
        }
    }

    fn update_ready(&self) {
        let ready = self.subnet_env_ok
            && self.backend_ok
            && self.synced
            && self.rules_ok
            && self.conflist_ok;
        self.metrics.set_ready(ready);
    }

    async fn run(mut self) -> Result<()> {
        self.backend.prepare().await?;
        self.take_lease().await?;
        if self.own.is_some() && !self.backend_ok {
            return Err(Error::Backend("could not set up the data path".into()));
        }

        let (tx, mut rx) = mpsc::channel(64);
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move { store.watch(tx, metrics).await });
        let mut link_gone = match self.backend.device_name() {
            Some(name) => Some(watch_link_deletions(name)?),
            None => None,
        };

        let mut next_renew = Instant::now() + self.renew_period();
        let mut tick = tokio::time::interval(self.reconcile_period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                update = rx.recv() => {
                    let Some(update) = update else {
                        return Err(Error::Backend("etcd watch task stopped".into()));
                    };
                    match update {
                        StoreUpdate::Snapshot(list) => self.on_snapshot(list).await?,
                        StoreUpdate::Events(evs) => self.on_events(evs).await?,
                    }
                    if !self.conflist_ok {
                        self.try_conflist().await;
                    }
                }
                _ = sleep_until(next_renew) => {
                    next_renew = Instant::now() + self.renew().await;
                }
                _ = tick.tick() => {
                    self.periodic().await;
                }
                Some(()) = async { match link_gone.as_mut() { Some(r) => r.recv().await, None => None } } => {
                    warn!("the vxlan device was deleted; recreating it and re-programming every peer");
                    self.heal_device().await;
                }
            }
            self.update_ready();
        }
    }

    async fn heal_device(&mut self) {
        let Some(own) = self.own.clone() else { return };
        match bounded(BULK_LIMIT, self.backend.ensure(own.subnet)).await {
            Ok(_) => {
                self.backend_ok = true;
                self.reconcile().await;
            }
            Err(e) => {
                self.backend_ok = false;
                error!("recreating the vxlan device failed: {e}; retrying on the next tick");
            }
        }
    }

    /// Renews our etcd lease; returns when to try next.
    async fn renew(&mut self) -> Duration {
        let Some(own) = self.own.clone() else {
            return self.renew_period();
        };
        if own.etcd_lease == 0 {
            return self.renew_period(); // a reservation does not expire
        }
        match self.store.keep_alive(own.etcd_lease).await {
            Ok(true) => {
                self.metrics.lease_renewals.inc();
                self.renew_period()
            }
            Ok(false) => {
                warn!(subnet = %own.subnet, "this node's etcd lease expired; re-acquiring");
                if let Err(e) = self.take_lease().await {
                    error!("re-acquiring the lease failed: {e}");
                    return Duration::from_secs(5);
                }
                self.renew_period()
            }
            Err(e) => {
                warn!("renewing the lease failed: {e}; retrying in 5s");
                Duration::from_secs(5)
            }
        }
    }

    async fn periodic(&mut self) {
        if let Some(own) = self.own.clone() {
            match bounded(BULK_LIMIT, self.backend.ensure(own.subnet)).await {
                Ok(recreated) => {
                    self.backend_ok = true;
                    if recreated {
                        warn!("the vxlan device was missing; recreated it");
                    }
                }
                Err(e) => {
                    self.backend_ok = false;
                    error!("backend: {e}");
                }
            }
        }
        if self.synced {
            self.reconcile().await;
        }
        if !self.rules_ok {
            self.apply_rules().await;
        } else {
            match self.rules.check().await {
                Ok(true) => self.metrics.reconcile_corrections.inc(),
                Ok(false) => {}
                Err(e) => {
                    self.rules_ok = false;
                    error!("rules: {e}");
                }
            }
        }
        if !self.subnet_env_ok || !self.args.subnet_file.exists() {
            self.setup_node().await;
        }
        // Probing the plugins runs them; only when the conflist is missing or not written yet.
        if !self.conflist_ok
            || !self
                .args
                .cni_conf_dir
                .join(cni_conf::CONFLIST_NAME)
                .exists()
        {
            self.conflist_ok = false;
            self.last_conflist_attempt = None;
            self.try_conflist().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::lease::Mac;

    /// A store where another node wins the next `steal` creations (it writes the key first).
    #[derive(Clone)]
    struct RacyStore {
        leases: Arc<Mutex<Vec<Lease>>>,
        steal: Arc<Mutex<u32>>,
    }

    impl RacyStore {
        fn new(steal: u32) -> RacyStore {
            RacyStore {
                leases: Arc::new(Mutex::new(Vec::new())),
                steal: Arc::new(Mutex::new(steal)),
            }
        }
    }

    fn attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs::vxlan(
            std::net::Ipv4Addr::new(192, 168, 0, last),
            1,
            Mac([2, 0, 0, 0, 0, last]),
        )
    }

    impl SubnetStore for RacyStore {
        async fn get_config(&self) -> Result<Option<String>> {
            Ok(None)
        }
        async fn list(&self) -> Result<(Vec<Lease>, i64)> {
            Ok((self.leases.lock().unwrap().clone(), 1))
        }
        async fn create(
            &self,
            subnet: Ipv4Network,
            a: &LeaseAttrs,
            _ttl: i64,
        ) -> Result<Option<Lease>> {
            let mut steal = self.steal.lock().unwrap();
            let mut leases = self.leases.lock().unwrap();
            if *steal > 0 {
                *steal -= 1;
                leases.push(Lease {
                    subnet,
                    attrs: attrs(99),
                    etcd_lease: 7,
                    mod_revision: 1,
                });
                return Ok(None);
            }
            let l = Lease {
                subnet,
                attrs: a.clone(),
                etcd_lease: 8,
                mod_revision: 2,
            };
            leases.push(l.clone());
            Ok(Some(l))
        }
        async fn update(&self, old: &Lease, a: &LeaseAttrs, _ttl: i64) -> Result<Option<Lease>> {
            Ok(Some(Lease {
                attrs: a.clone(),
                ..old.clone()
            }))
        }
        async fn delete(&self, _: &Lease) -> Result<()> {
            Ok(())
        }
        async fn keep_alive(&self, _: i64) -> Result<bool> {
            Ok(true)
        }
        async fn watch(&self, _: mpsc::Sender<StoreUpdate>, _: Arc<Metrics>) {}
    }

    fn cfg(s: &str) -> NetworkConfig {
        NetworkConfig::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_lost_race_retries_with_another_subnet() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}"#);
        let store = RacyStore::new(2);
        let l = acquire(&store, &c, &attrs(1), None, 60).await.unwrap();
        let all = store.leases.lock().unwrap().clone();
        assert_eq!(all.len(), 3, "two lost races, then a win");
        let lost: Vec<_> = all
            .iter()
            .filter(|x| x.attrs.public_ip != attrs(1).public_ip)
            .collect();
        assert!(lost.iter().all(|x| x.subnet != l.subnet));
        assert_eq!(l.attrs, attrs(1));
    }

    #[tokio::test]
    async fn losing_the_last_subnet_is_out_of_subnets() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.1.0"}"#);
        let store = RacyStore::new(1);
        let e = acquire(&store, &c, &attrs(1), None, 60).await.unwrap_err();
        assert!(matches!(e, Error::OutOfSubnets), "{e}");
    }

    #[tokio::test]
    async fn endless_races_give_up() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let store = RacyStore::new(u32::MAX);
        let e = acquire(&store, &c, &attrs(1), None, 60).await.unwrap_err();
        assert!(
            matches!(e, Error::RaceRetriesExhausted(RACE_RETRIES)),
            "{e}"
        );
    }
}
