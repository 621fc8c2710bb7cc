//! The node daemon's life cycle: config → lease → device → subnet.env → peers → rules →
//! CNI conflist, then a loop over [`Event`]s: watch updates, lease renewals, reconcile passes
//! and device deletions. [`Daemon::handle`] works only through the `SubnetStore`, `Backend`,
//! `Rules` and `Host` traits and plain files, so the unit tests below drive it with fakes.
//! Every pass re-checks everything (device, peers, rules, ip_forward, subnet.env, the
//! conflist) whatever happened before: one failure never keeps a node NotReady for good.
//! Nothing is torn down on exit: the lease, the device, the routes, the rules and the conflist
//! stay, so a restart changes nothing for running pods.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
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
use crate::guard;
use crate::host::{self, Host, NodeHost};
use crate::lease::{Lease, LeaseAttrs};
use crate::metrics::Metrics;
use crate::own_lease::{self, Verdict};
use crate::readiness::{Part, Readiness};
use crate::rules::{NftRules, Rules};
use crate::store::{LeaseEvent, StoreUpdate, SubnetStore};
use crate::{health, iface};
use twill_common::netlink::Netlink;

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
    // A reboot wipes /run (subnet.env) but not the CNI conf dir: until this node holds its
    // lease, device and peers again, the runtime must not see a conflist and report
    // NetworkReady. A plain restart keeps subnet.env, so its conflist stays (no flap).
    let conflist = cni_conf::Location::beside(&args.cni_conf_dir, &args.subnet_file);
    if !args.subnet_file.exists() && conflist.remove()? {
        warn!(
            "{} is missing (a reboot?): removed {} until this node is ready again",
            args.subnet_file.display(),
            conflist.link.display()
        );
    }
    let metrics = Arc::new(Metrics::default());
    if args.healthz_port != 0 {
        health::serve(
            SocketAddr::new(args.healthz_ip, args.healthz_port),
            metrics.clone(),
        )
        .await?;
    }
    let store = EtcdStore::connect_retry(&args.etcd.config()).await?;
    let nl = Netlink::open()?;
    let cfg = wait_config(&store).await;
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, backend = %cfg.backend.backend_type(), "network config loaded");
    let underlay = iface::detect(&nl, args.iface.as_deref(), args.public_ip).await?;
    info!(iface = %underlay.name, public_ip = %underlay.public_ip, mtu = underlay.mtu, "underlay");
    let etcd_ips = host::etcd_addresses(&args.etcd.etcd_endpoints);
    host::check_network(cfg.network, &underlay.addrs, &etcd_ips)?;
    let backend = RoutedBackend::new(
        nl.clone(),
        &cfg.backend,
        underlay,
        args.state_dir.clone(),
        args.vxlan_tx_checksum_offload,
    )?;
    let rules = NftRules::new(args.ip_masq);
    let daemon_cfg = DaemonConfig::from_args(&args, etcd_ips);
    Daemon::new(
        store,
        backend,
        rules,
        NodeHost { nl },
        cfg,
        daemon_cfg,
        metrics,
    )
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

/// What the daemon needs from the command line, decoupled from clap.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub lease_ttl: u64,
    pub reconcile_interval: u64,
    pub ip_masq: bool,
    pub subnet_file: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_data_dir: PathBuf,
    /// etcd endpoints' addresses: never routed into the overlay.
    pub etcd_ips: Vec<Ipv4Addr>,
}

impl DaemonConfig {
    pub fn from_args(args: &RunArgs, etcd_ips: Vec<Ipv4Addr>) -> DaemonConfig {
        DaemonConfig {
            lease_ttl: args.lease_ttl,
            reconcile_interval: args.reconcile_interval,
            ip_masq: args.ip_masq,
            subnet_file: args.subnet_file.clone(),
            cni_conf_dir: args.cni_conf_dir.clone(),
            cni_bin_dir: args.cni_bin_dir.clone(),
            cni_data_dir: args.cni_data_dir.clone(),
            etcd_ips,
        }
    }
}

/// What drives the daemon's loop.
#[derive(Debug)]
pub enum Event {
    Store(StoreUpdate),
    /// Time to renew the etcd lease.
    Renew,
    /// A reconcile pass: device, peers, rules, ip_forward, subnet.env, conflist.
    Tick,
    /// The VTEP was deleted (netlink monitor).
    DeviceDeleted,
}

pub struct Daemon<S: SubnetStore, B: Backend, R: Rules, H: Host> {
    store: S,
    backend: B,
    rules: R,
    host: H,
    net: NetworkConfig,
    cfg: DaemonConfig,
    metrics: Arc<Metrics>,
    own: Option<Lease>,
    /// Every lease key in etcd but our own.
    leases: HashMap<Ipv4Network, Lease>,
    /// What the lease guard let through, as programmed (or being programmed).
    accepted: HashMap<Ipv4Network, Lease>,
    view: guard::NodeView,
    /// Rejections and peer failures already logged (logged once, not every pass).
    logged_rejections: HashMap<Ipv4Network, (guard::Reason, i64)>,
    logged_failures: HashMap<Ipv4Network, String>,
    readiness: Readiness,
    conflist: cni_conf::Desired,
    shadowed_by: Option<String>,
    /// A full listing of the leases has been applied. Until then `leases` is empty, not the
    /// cluster: a reconcile pass must not take that for "no peers" and delete the routes a
    /// previous run left (a restart under load, or etcd slow to list, outlasts a tick).
    listed: bool,
}

impl<S: SubnetStore, B: Backend, R: Rules, H: Host> Daemon<S, B, R, H> {
    pub fn new(
        store: S,
        backend: B,
        rules: R,
        host: H,
        net: NetworkConfig,
        cfg: DaemonConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let view = guard::NodeView {
            network: Some(net.network),
            ..Default::default()
        };
        Daemon {
            store,
            backend,
            rules,
            host,
            net,
            cfg,
            metrics,
            own: None,
            leases: HashMap::new(),
            accepted: HashMap::new(),
            view,
            logged_rejections: HashMap::new(),
            logged_failures: HashMap::new(),
            readiness: Readiness::default(),
            conflist: cni_conf::Desired::default(),
            shadowed_by: None,
            listed: false,
        }
    }

    fn ttl(&self) -> i64 {
        self.cfg.lease_ttl.clamp(5, i64::MAX as u64) as i64
    }

    /// Keep-alive period: a third of the TTL, at most 10 minutes.
    fn renew_period(&self) -> Duration {
        Duration::from_secs((self.ttl() as u64 / 3).clamp(1, 600))
    }

    fn reconcile_period(&self) -> Duration {
        Duration::from_secs(self.cfg.reconcile_interval.max(1))
    }

    fn previous_subnet(&self) -> Option<Ipv4Network> {
        self.own.as_ref().map(|l| l.subnet).or_else(|| {
            SubnetEnv::read(&self.cfg.subnet_file)
                .ok()
                .and_then(|e| e.subnet)
        })
    }

    /// Sets up the device, takes the lease and puts the node side in place.
    pub async fn start(&mut self) -> Result<()> {
        self.backend.prepare().await?;
        self.take_lease().await?;
        if self.own.is_some() && !self.readiness.is_ok(Part::Device) {
            return Err(Error::Backend("could not set up the data path".into()));
        }
        // The rest of a first pass right away (peers follow the watch's first snapshot).
        self.check_ip_forward();
        self.check_subnet_env();
        self.check_shadowing();
        self.publish();
        Ok(())
    }

    /// Handles one event; Err only for what the daemon cannot go on without.
    pub async fn handle(&mut self, ev: Event) -> Result<()> {
        match ev {
            Event::Store(StoreUpdate::Snapshot(list)) => self.on_snapshot(list).await?,
            Event::Store(StoreUpdate::Events(evs)) => self.on_events(evs).await?,
            Event::Renew => {}
            Event::Tick => self.pass().await,
            Event::DeviceDeleted => {
                warn!("the vxlan device was deleted; recreating it and re-programming every peer");
                self.ensure_device().await;
                self.sync_peers().await;
            }
        }
        if !self.readiness.is_ok(Part::Conflist) && self.readiness.conflist_due() {
            self.check_conflist().await;
        }
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        self.metrics.set_readiness(&self.readiness);
    }

    /// Acquires (or re-acquires) the lease and puts the node side in place for it.
    async fn take_lease(&mut self) -> Result<()> {
        let attrs = self.backend.lease_attrs();
        let prev = self.previous_subnet();
        let lease = acquire_retry(&self.store, &self.net, &attrs, prev, self.ttl()).await?;
        let changed = self.own.as_ref().map(|o| o.subnet) != Some(lease.subnet);
        if changed && self.own.is_some() {
            error!(
                old = %self.own.as_ref().map(|o| o.subnet.to_string()).unwrap_or_default(),
                new = %lease.subnet,
                "this node's subnet changed; pods on the old subnet lose connectivity"
            );
        }
        self.leases.remove(&lease.subnet);
        if self.accepted.remove(&lease.subnet).is_some() {
            let _ = bounded(PEER_OP_LIMIT, self.backend.remove_peer(lease.subnet)).await;
        }
        self.own = Some(lease);
        self.readiness.set_ok(Part::Lease);
        if changed {
            self.ensure_device().await;
            self.check_subnet_env();
            self.apply_rules().await;
        }
        Ok(())
    }

    async fn ensure_device(&mut self) {
        let Some(own) = self.own.clone() else { return };
        match bounded(BULK_LIMIT, self.backend.ensure(own.subnet)).await {
            Ok(recreated) => {
                if recreated {
                    info!("the vxlan device was (re)created");
                }
                self.readiness.set_ok(Part::Device);
            }
            Err(e) => {
                error!("backend setup failed: {e}; retrying on the next pass");
                self.readiness.set_missing(Part::Device, e.to_string());
            }
        }
    }

    async fn apply_rules(&mut self) {
        let Some(own) = &self.own else { return };
        let r = if self.readiness.is_ok(Part::Rules) {
            match self.rules.check().await {
                Ok(true) => {
                    self.metrics.reconcile_corrections.inc();
                    Ok(())
                }
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            self.rules.apply(self.net.network, own.subnet).await
        };
        if let Err(e) = &r {
            error!("installing forward/masquerade rules failed: {e}; retrying");
        }
        self.readiness
            .set(Part::Rules, r.map_err(|e| e.to_string()));
    }

    fn wanted_subnet_env(&self) -> Option<SubnetEnv> {
        let own = self.own.as_ref()?;
        Some(SubnetEnv::new_v4(
            self.net.network,
            own.subnet,
            self.backend.mtu(),
            self.cfg.ip_masq,
        ))
    }

    /// subnet.env must say what twilld would write; an edited, truncated or deleted file is put
    /// back (every pod ADD on this node reads it).
    fn check_subnet_env(&mut self) {
        let Some(want) = self.wanted_subnet_env() else {
            return;
        };
        let text = want.render();
        let path = &self.cfg.subnet_file;
        let now = std::fs::read(path).ok();
        if now.as_deref() == Some(text.as_bytes()) {
            self.readiness.set_ok(Part::SubnetEnv);
            return;
        }
        if now.is_some() {
            warn!(path = %path.display(), "subnet.env differs from this node's lease; rewriting it");
            self.metrics.reconcile_corrections.inc();
        }
        match want.write(path) {
            Ok(()) => {
                info!(path = %path.display(), subnet = %want.subnet.map(|s| s.to_string()).unwrap_or_default(), mtu = want.mtu, "wrote subnet.env");
                self.readiness.set_ok(Part::SubnetEnv);
            }
            Err(e) => {
                error!("{e}");
                self.readiness.set_missing(Part::SubnetEnv, e.to_string());
            }
        }
    }

    /// Writes the conflist once everything it promises is in place, and puts it back when it
    /// was edited or deleted. Probing the plugins runs them: on a blocking thread, and only when
    /// a plugin binary changed.
    async fn check_conflist(&mut self) {
        if !self.readiness.conflist_due() {
            if !self.readiness.is_ok(Part::Conflist) {
                return;
            }
            // Leave the file (no readiness flap for running pods), but /readyz says why.
            self.readiness
                .set_missing(Part::Conflist, "waiting for the parts above");
            return;
        }
        let cfg = self.cfg.clone();
        let mut desired = std::mem::take(&mut self.conflist);
        let (desired, result) = tokio::task::spawn_blocking(move || {
            let paths = CniPaths {
                bin_dir: &cfg.cni_bin_dir,
                data_dir: &cfg.cni_data_dir,
                subnet_file: &cfg.subnet_file,
            };
            let loc = cni_conf::Location::beside(&cfg.cni_conf_dir, &cfg.subnet_file);
            let r = desired.text(&paths).and_then(|text| {
                let repaired = loc.differs(&text);
                loc.write(&text).map(|()| (loc.link.clone(), repaired))
            });
            (desired, r)
        })
        .await
        .unwrap_or_else(|e| {
            (
                cni_conf::Desired::default(),
                Err(Error::Backend(format!("conflist task: {e}"))),
            )
        });
        self.conflist = desired;
        match result {
            Ok((p, repaired)) => {
                if !self.readiness.is_ok(Part::Conflist) {
                    info!(path = %p.display(), "CNI config written; the node can turn Ready");
                } else if repaired {
                    warn!(path = %p.display(), "the CNI config was changed or removed; rewrote it");
                    self.metrics.reconcile_corrections.inc();
                }
                self.readiness.set_ok(Part::Conflist);
            }
            Err(e) => {
                let msg = e.to_string();
                if self.readiness.is_ok(Part::Conflist) || !self.body_mentions(&msg) {
                    error!("NOT writing the CNI config, the node stays NotReady: {msg}");
                }
                self.readiness.set_missing(Part::Conflist, msg);
            }
        }
    }

    fn body_mentions(&self, msg: &str) -> bool {
        self.readiness.body().contains(msg)
    }

    /// Another network's config sorting before ours takes the runtime's pods.
    fn check_shadowing(&mut self) {
        let found = cni_conf::shadowing(&cni_conf::read_conf_dir(&self.cfg.cni_conf_dir));
        if found != self.shadowed_by {
            match &found {
                Some(f) => {
                    warn!(file = %f, "the CNI config {f} sorts before {} and belongs to another network: the container runtime uses it, not twill; remove it", cni_conf::CONFLIST_NAME)
                }
                None => info!("no other network's CNI config shadows twill's any more"),
            }
        }
        self.metrics.cni_config_shadowed.set(found.is_some() as u64);
        self.readiness.warn(
            "shadowed",
            found.as_ref().map(|f| {
                format!(
                    "the CNI config {f} sorts before {} and belongs to another network; the runtime uses it",
                    cni_conf::CONFLIST_NAME
                )
            }),
        );
        self.shadowed_by = found;
    }

    fn check_ip_forward(&mut self) {
        match self.host.ensure_ip_forward() {
            Ok(true) => {
                warn!("net.ipv4.ip_forward was 0 (reset by someone); set it back to 1");
                self.metrics.reconcile_corrections.inc();
                self.readiness.set_ok(Part::IpForward);
            }
            Ok(false) => self.readiness.set_ok(Part::IpForward),
            Err(e) => {
                error!("cannot enable ip_forward: {e}; pods cannot reach other nodes");
                self.readiness.set_missing(Part::IpForward, e.to_string());
            }
        }
    }

    async fn refresh_view(&mut self) {
        match self.host.addresses().await {
            Ok(addrs) => {
                let own = self.own.as_ref().map(|o| o.subnet);
                self.view.host_prefixes = host::host_prefixes(&addrs, own, &self.cfg.etcd_ips);
            }
            Err(e) => warn!("cannot list this node's addresses: {e}; keeping the last view"),
        }
        self.view.own_subnet = self.own.as_ref().map(|o| o.subnet);
        self.view.own_mac = self.backend.lease_attrs().vtep().map(|(m, _)| m);
    }

    /// Runs the lease guard over every known lease; logs new rejections once.
    fn screen(&mut self) -> HashMap<Ipv4Network, Lease> {
        let s = guard::screen(self.leases.values(), &self.view);
        let mut seen = HashMap::new();
        for (l, reason) in &s.rejected {
            let key = (*reason, l.mod_revision);
            if self.logged_rejections.get(&l.subnet) != Some(&key) {
                warn!(key = %crate::lease::subnet_key(l.subnet), public_ip = %l.attrs.public_ip, reason = %reason, "lease rejected by the lease guard; not programmed");
            }
            seen.insert(l.subnet, key);
        }
        self.logged_rejections = seen;
        self.metrics.set_rejected(s.counts());
        s.accepted
    }

    /// Full sync: guard, then reconcile the kernel against what passed.
    async fn sync_peers(&mut self) {
        if !self.listed {
            self.readiness
                .set_missing(Part::Peers, "waiting for the first listing of leases");
            return;
        }
        self.refresh_view().await;
        self.accepted = self.screen();
        if !self.readiness.is_ok(Part::Device) {
            self.readiness
                .set_missing(Part::Peers, "waiting for the device");
            return;
        }
        match bounded(BULK_LIMIT, self.backend.reconcile(&self.accepted)).await {
            Ok(report) => {
                if report.corrections > 0 {
                    info!("reconcile corrected {} kernel entries", report.corrections);
                }
                self.metrics.reconcile_corrections.add(report.corrections);
                self.note_failures(report.failed);
                self.readiness.set_ok(Part::Peers);
            }
            Err(e) => {
                warn!("reconcile: {e}; retrying on the next pass");
                self.readiness.set_missing(Part::Peers, e.to_string());
            }
        }
        self.metrics
            .peers_programmed
            .set(self.backend.programmed() as u64);
    }

    /// Peers the kernel refused: logged once per reason, counted, retried every pass; they
    /// never keep the node from turning Ready.
    fn note_failures(&mut self, failed: Vec<(Ipv4Network, String)>) {
        let mut now = HashMap::new();
        for (subnet, why) in failed {
            if self.logged_failures.get(&subnet) != Some(&why) {
                warn!(subnet = %subnet, "programming peer failed: {why}; retrying every pass");
            }
            now.insert(subnet, why);
        }
        self.metrics.peers_failed.set(now.len() as u64);
        self.logged_failures = now;
    }

    /// Applies a peer-set change incrementally (watch events).
    async fn apply_peer_changes(&mut self) {
        self.view.own_subnet = self.own.as_ref().map(|o| o.subnet);
        let next = self.screen();
        let removed: Vec<Ipv4Network> = self
            .accepted
            .keys()
            .filter(|k| !next.contains_key(k))
            .copied()
            .collect();
        for s in removed {
            if let Err(e) = bounded(PEER_OP_LIMIT, self.backend.remove_peer(s)).await {
                warn!(subnet = %s, "removing peer failed: {e}; the next pass retries");
            }
        }
        let mut failed = Vec::new();
        for (subnet, l) in &next {
            if self.accepted.get(subnet) == Some(l) {
                continue;
            }
            if let Err(e) = bounded(PEER_OP_LIMIT, self.backend.add_peer(l)).await {
                failed.push((*subnet, e.to_string()));
            }
        }
        self.accepted = next;
        if !failed.is_empty() {
            let mut all: Vec<(Ipv4Network, String)> = self
                .logged_failures
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            all.extend(failed);
            self.note_failures(all);
        }
        self.metrics
            .peers_programmed
            .set(self.backend.programmed() as u64);
    }

    /// Our key as stored: keep, restore, or lease again.
    async fn judge_own(&mut self, stored: Option<Lease>) -> Result<()> {
        let Some(held) = self.own.clone() else {
            return Ok(());
        };
        let attrs = self.backend.lease_attrs();
        match own_lease::judge(&held, stored.as_ref(), &attrs) {
            Verdict::Ours => {
                if let Some(s) = stored {
                    self.own = Some(s);
                }
            }
            Verdict::Rewritten => {
                let Some(s) = stored else { return Ok(()) };
                warn!(
                    key = %crate::lease::subnet_key(s.subnet),
                    stored = %s.attrs.to_json(),
                    ours = %attrs.to_json(),
                    "another writer changed this node's lease; writing ours back"
                );
                self.restore_own(&s, &attrs).await;
            }
            Verdict::Taken => {
                warn!(subnet = %held.subnet, "our subnet was given to another node; re-acquiring");
                self.take_lease().await?;
            }
            Verdict::Gone => {
                warn!("this node's lease was deleted; re-acquiring (its key is gone from etcd: deleted or expired)");
                self.take_lease().await?;
            }
        }
        Ok(())
    }

    /// Writes our value back into our key (CAS on what was read), keeping our etcd lease.
    async fn restore_own(&mut self, stored: &Lease, attrs: &LeaseAttrs) {
        let etcd_lease = self
            .own
            .as_ref()
            .map_or(stored.etcd_lease, |o| o.etcd_lease);
        let target = Lease {
            etcd_lease,
            ..stored.clone()
        };
        match self.store.rewrite(&target, attrs).await {
            Ok(Some(l)) => {
                self.metrics.reconcile_corrections.inc();
                self.own = Some(l);
            }
            Ok(None) => {
                warn!("this node's lease changed again while restoring it; the next update retries")
            }
            Err(e) => warn!("restoring this node's lease failed: {e}; the next pass retries"),
        }
    }

    /// Two leases with our VtepMAC: the younger key moves (see `own_lease::must_renew_mac`).
    async fn check_mac_clash(&mut self) {
        let Some(own) = self.own.clone() else { return };
        if !own_lease::must_renew_mac(&own, self.leases.values()) {
            return;
        }
        let clash = self
            .leases
            .values()
            .find(|l| l.attrs.vtep().map(|v| v.0) == own.attrs.vtep().map(|v| v.0))
            .map(|l| crate::lease::subnet_key(l.subnet))
            .unwrap_or_default();
        warn!(other = %clash, "the older lease {clash} advertises this node's VtepMAC (a cloned state dir?); picking a new MAC");
        if let Err(e) = self.backend.renew_mac().await {
            error!("changing the VtepMAC failed: {e}; retrying on the next pass");
            return;
        }
        let attrs = self.backend.lease_attrs();
        self.restore_own(&own, &attrs).await;
        self.refresh_view().await;
    }

    /// Applies a full listing: our key, the peer set, then a full kernel sync.
    async fn on_snapshot(&mut self, leases: Vec<Lease>) -> Result<()> {
        self.metrics.leases_known.set(leases.len() as u64);
        let own_subnet = self.own.as_ref().map(|o| o.subnet);
        let mut stored_own = None;
        self.leases = HashMap::with_capacity(leases.len());
        for l in leases {
            if Some(l.subnet) == own_subnet {
                stored_own = Some(l);
            } else {
                self.leases.insert(l.subnet, l);
            }
        }
        self.listed = true;
        self.judge_own(stored_own).await?;
        self.check_mac_clash().await;
        self.sync_peers().await;
        Ok(())
    }

    async fn on_events(&mut self, events: Vec<LeaseEvent>) -> Result<()> {
        for ev in events {
            let own_subnet = self.own.as_ref().map(|o| o.subnet);
            match ev {
                LeaseEvent::Put(l) if Some(l.subnet) == own_subnet => {
                    self.judge_own(Some(l)).await?;
                }
                LeaseEvent::Delete(s) if Some(s) == own_subnet => {
                    self.judge_own(None).await?;
                }
                LeaseEvent::Put(l) => {
                    self.leases.insert(l.subnet, l);
                }
                LeaseEvent::Delete(s) => {
                    if self.leases.remove(&s).is_some() {
                        info!(subnet = %s, "peer lease removed");
                    }
                }
            }
        }
        self.metrics
            .leases_known
            .set(self.leases.len() as u64 + self.own.is_some() as u64);
        self.check_mac_clash().await;
        self.apply_peer_changes().await;
        Ok(())
    }

    /// One reconcile pass. Runs whatever state the node is in: a failed first pass, a device
    /// that could not be created, a missing file — each is retried here.
    async fn pass(&mut self) {
        if self.own.is_some() {
            self.ensure_device().await;
        }
        self.check_mac_clash().await;
        self.sync_peers().await;
        self.apply_rules().await;
        self.check_ip_forward();
        self.check_subnet_env();
        self.check_shadowing();
        self.check_conflist().await;
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

    async fn run(mut self) -> Result<()> {
        self.start().await?;

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
            let ev = tokio::select! {
                update = rx.recv() => {
                    let Some(update) = update else {
                        return Err(Error::Backend("etcd watch task stopped".into()));
                    };
                    Event::Store(update)
                }
                _ = sleep_until(next_renew) => {
                    next_renew = Instant::now() + self.renew().await;
                    Event::Renew
                }
                _ = tick.tick() => Event::Tick,
                Some(()) = async { match link_gone.as_mut() { Some(r) => r.recv().await, None => None } } => Event::DeviceDeleted,
            };
            self.handle(ev).await?;
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
                    create_revision: 1,
                });
                return Ok(None);
            }
            let l = Lease {
                subnet,
                attrs: a.clone(),
                etcd_lease: 8,
                mod_revision: 2,
                create_revision: 2,
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
        async fn rewrite(&self, current: &Lease, a: &LeaseAttrs) -> Result<Option<Lease>> {
            Ok(Some(Lease {
                attrs: a.clone(),
                ..current.clone()
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

    // ---- The daemon's event handling, driven with fakes (no root, no etcd, no kernel). ----

    use crate::backend::Report;
    use std::os::unix::fs::PermissionsExt;

    /// An in-memory etcd: leases by subnet, revisions counted like etcd's.
    #[derive(Clone, Default)]
    struct MemStore {
        inner: Arc<Mutex<(HashMap<Ipv4Network, Lease>, i64)>>,
        rewrites: Arc<Mutex<Vec<LeaseAttrs>>>,
    }

    impl MemStore {
        fn put(&self, mut l: Lease) -> Lease {
            let mut g = self.inner.lock().unwrap();
            g.1 += 1;
            l.mod_revision = g.1;
            l.create_revision = g.0.get(&l.subnet).map_or(g.1, |o| o.create_revision);
            g.0.insert(l.subnet, l.clone());
            l
        }
        fn get(&self, s: Ipv4Network) -> Option<Lease> {
            self.inner.lock().unwrap().0.get(&s).cloned()
        }
        fn all(&self) -> Vec<Lease> {
            self.inner.lock().unwrap().0.values().cloned().collect()
        }
    }

    impl SubnetStore for MemStore {
        async fn get_config(&self) -> Result<Option<String>> {
            Ok(None)
        }
        async fn list(&self) -> Result<(Vec<Lease>, i64)> {
            let g = self.inner.lock().unwrap();
            Ok((g.0.values().cloned().collect(), g.1))
        }
        async fn create(
            &self,
            subnet: Ipv4Network,
            a: &LeaseAttrs,
            _: i64,
        ) -> Result<Option<Lease>> {
            if self.get(subnet).is_some() {
                return Ok(None);
            }
            Ok(Some(self.put(Lease {
                subnet,
                attrs: a.clone(),
                etcd_lease: 42,
                mod_revision: 0,
                create_revision: 0,
            })))
        }
        async fn update(&self, old: &Lease, a: &LeaseAttrs, _: i64) -> Result<Option<Lease>> {
            Ok(Some(self.put(Lease {
                attrs: a.clone(),
                ..old.clone()
            })))
        }
        async fn rewrite(&self, cur: &Lease, a: &LeaseAttrs) -> Result<Option<Lease>> {
            if self.get(cur.subnet).map(|l| l.mod_revision) != Some(cur.mod_revision) {
                return Ok(None);
            }
            self.rewrites.lock().unwrap().push(a.clone());
            Ok(Some(self.put(Lease {
                attrs: a.clone(),
                ..cur.clone()
            })))
        }
        async fn delete(&self, l: &Lease) -> Result<()> {
            self.inner.lock().unwrap().0.remove(&l.subnet);
            Ok(())
        }
        async fn keep_alive(&self, _: i64) -> Result<bool> {
            Ok(true)
        }
        async fn watch(&self, _: mpsc::Sender<StoreUpdate>, _: Arc<Metrics>) {}
    }

    /// A kernel that holds peers in a map; `refuse` peers fail, `fail_reconciles` passes fail
    /// whole (the dump), `fail_ensure` device set-ups fail.
    #[derive(Default)]
    struct FakeBackend {
        mac: Option<Mac>,
        programmed: HashMap<Ipv4Network, Lease>,
        refuse: HashSet<Ipv4Network>,
        fail_reconciles: u32,
        fail_ensure: u32,
        reconciles: u32,
        ensures: u32,
        renewed_macs: u32,
    }

    impl Backend for FakeBackend {
        fn lease_attrs(&self) -> LeaseAttrs {
            LeaseAttrs::vxlan(
                Ipv4Addr::new(192, 168, 100, 1),
                1,
                self.mac.unwrap_or(Mac([2, 0, 0, 0, 0, 1])),
            )
        }
        fn mtu(&self) -> u32 {
            1450
        }
        fn device_name(&self) -> Option<String> {
            None
        }
        fn programmed(&self) -> usize {
            self.programmed.len()
        }
        async fn prepare(&mut self) -> Result<()> {
            Ok(())
        }
        async fn ensure(&mut self, _: Ipv4Network) -> Result<bool> {
            self.ensures += 1;
            if self.fail_ensure > 0 {
                self.fail_ensure -= 1;
                return Err(Error::Backend(
                    "RTNETLINK answers: Operation not permitted".into(),
                ));
            }
            Ok(false)
        }
        async fn add_peer(&mut self, l: &Lease) -> Result<()> {
            if self.refuse.contains(&l.subnet) {
                return Err(Error::Backend("Invalid argument".into()));
            }
            self.programmed.insert(l.subnet, l.clone());
            Ok(())
        }
        async fn remove_peer(&mut self, s: Ipv4Network) -> Result<()> {
            self.programmed.remove(&s);
            Ok(())
        }
        async fn reconcile(&mut self, peers: &HashMap<Ipv4Network, Lease>) -> Result<Report> {
            self.reconciles += 1;
            if self.fail_reconciles > 0 {
                self.fail_reconciles -= 1;
                return Err(Error::Backend("dump interrupted".into()));
            }
            let mut r = Report::default();
            self.programmed.clear();
            for (s, l) in peers {
                if self.refuse.contains(s) {
                    r.failed.push((*s, "Invalid argument".into()));
                } else {
                    self.programmed.insert(*s, l.clone());
                }
            }
            Ok(r)
        }
        async fn renew_mac(&mut self) -> Result<()> {
            self.renewed_macs += 1;
            self.mac = Some(Mac([2, 0, 0, 0, 0xee, self.renewed_macs as u8]));
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeRules {
        applied: u32,
    }

    impl Rules for FakeRules {
        async fn apply(&mut self, _: Ipv4Network, _: Ipv4Network) -> Result<()> {
            self.applied += 1;
            Ok(())
        }
        async fn check(&mut self) -> Result<bool> {
            Ok(false)
        }
    }

    struct FakeHost {
        forward_off: Arc<Mutex<bool>>,
    }

    impl Host for FakeHost {
        async fn addresses(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
            Ok(vec![(2, Ipv4Addr::new(192, 168, 100, 1), 24)])
        }
        fn ensure_ip_forward(&self) -> Result<bool> {
            Ok(std::mem::replace(
                &mut *self.forward_off.lock().unwrap(),
                false,
            ))
        }
    }

    struct Rig {
        d: Daemon<MemStore, FakeBackend, FakeRules, FakeHost>,
        store: MemStore,
        forward_off: Arc<Mutex<bool>>,
        metrics: Arc<Metrics>,
        _dir: tempfile::TempDir,
    }

    fn fake_plugins(bin: &std::path::Path) {
        std::fs::create_dir_all(bin).unwrap();
        for p in cni_conf::REQUIRED_PLUGINS {
            let f = bin.join(p);
            std::fs::write(&f, "#!/bin/sh\necho '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\",\"1.1.0\"]}'\n").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    fn rig(backend: FakeBackend) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        fake_plugins(&dir.path().join("bin"));
        let store = MemStore::default();
        let forward_off = Arc::new(Mutex::new(false));
        let metrics = Arc::new(Metrics::default());
        // Own subnets 10.5.1-3 only: the tests' peers never collide with them.
        let net = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}"#);
        let c = DaemonConfig {
            lease_ttl: 60,
            reconcile_interval: 10,
            ip_masq: true,
            subnet_file: dir.path().join("run/subnet.env"),
            cni_conf_dir: dir.path().join("net.d"),
            cni_bin_dir: dir.path().join("bin"),
            cni_data_dir: dir.path().join("data"),
            etcd_ips: vec![Ipv4Addr::new(192, 168, 100, 254)],
        };
        let host = FakeHost {
            forward_off: forward_off.clone(),
        };
        let d = Daemon::new(
            store.clone(),
            backend,
            FakeRules::default(),
            host,
            net,
            c,
            metrics.clone(),
        );
        Rig {
            d,
            store,
            forward_off,
            metrics,
            _dir: dir,
        }
    }

    fn peer(subnet: &str, last: u8) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(
                Ipv4Addr::new(192, 168, 100, last),
                1,
                Mac([2, 0, 0, 0, 1, last]),
            ),
            etcd_lease: 5,
            mod_revision: 0,
            create_revision: 0,
        }
    }

    impl Rig {
        async fn snapshot(&mut self) {
            let all = self.store.all();
            self.d
                .handle(Event::Store(StoreUpdate::Snapshot(all)))
                .await
                .unwrap();
        }
        async fn tick(&mut self) {
            self.d.handle(Event::Tick).await.unwrap();
        }
        fn own(&self) -> Lease {
            self.d.own.clone().unwrap()
        }
    }

    #[tokio::test]
    async fn a_pass_before_the_first_listing_keeps_the_routes_a_previous_run_left() {
        // A restart: the kernel still holds the peer a previous twilld programmed.
        let kept = peer("10.5.7.0/24", 7);
        let mut programmed = HashMap::new();
        programmed.insert(kept.subnet, kept.clone());
        let mut r = rig(FakeBackend {
            programmed,
            ..Default::default()
        });
        r.store.put(kept.clone());
        r.d.start().await.unwrap();
        // The watch's listing is slow: a reconcile tick comes first.
        r.tick().await;
        assert!(
            r.d.backend.programmed.contains_key(&kept.subnet),
            "a pass before the first listing deleted the peer's route"
        );
        assert!(!r.metrics.is_ready());
        assert!(r
            .metrics
            .readiness_body()
            .contains("waiting for the first listing of leases"));
        r.snapshot().await;
        assert!(r.d.backend.programmed.contains_key(&kept.subnet));
        r.tick().await;
        assert!(r.d.backend.programmed.contains_key(&kept.subnet));
    }

    #[tokio::test]
    async fn a_failed_first_reconcile_is_retried_and_the_node_turns_ready() {
        let mut r = rig(FakeBackend {
            fail_reconciles: 1,
            ..Default::default()
        });
        r.store.put(peer("10.5.7.0/24", 7));
        r.d.start().await.unwrap();
        r.snapshot().await;
        assert!(!r.metrics.is_ready(), "the first pass failed");
        let body = r.metrics.readiness_body();
        assert!(
            body.contains("not ready: peers:") && body.contains("dump interrupted"),
            "{body}"
        );
        assert!(!r.d.cfg.cni_conf_dir.join(cni_conf::CONFLIST_NAME).exists());
        r.tick().await;
        assert_eq!(
            r.d.backend.reconciles, 2,
            "the pass reconciles although the first failed"
        );
        assert!(r.metrics.is_ready(), "{}", r.metrics.readiness_body());
        assert!(r.d.cfg.cni_conf_dir.join(cni_conf::CONFLIST_NAME).exists());
        assert!(r
            .d
            .backend
            .programmed
            .contains_key(&"10.5.7.0/24".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_failed_device_setup_is_retried_by_the_next_pass() {
        let mut r = rig(FakeBackend {
            fail_ensure: 1,
            ..Default::default()
        });
        assert!(
            r.d.start().await.is_err(),
            "start reports a device that cannot be set up"
        );
        r.d.readiness.set_ok(Part::Lease);
        r.tick().await;
        assert!(r.d.readiness.is_ok(Part::Device));
    }

    #[tokio::test]
    async fn a_peer_the_kernel_refuses_does_not_keep_the_node_not_ready() {
        let bad: Ipv4Network = "10.5.8.0/24".parse().unwrap();
        let mut b = FakeBackend::default();
        b.refuse.insert(bad);
        let mut r = rig(b);
        r.store.put(peer("10.5.7.0/24", 7));
        r.store.put(peer("10.5.8.0/24", 8));
        r.d.start().await.unwrap();
        r.snapshot().await;
        assert!(r.metrics.is_ready(), "{}", r.metrics.readiness_body());
        assert_eq!(r.metrics.peers_failed.get(), 1);
        assert_eq!(r.d.backend.programmed.len(), 1);
        // The kernel accepts it later: the next pass programs it.
        r.d.backend.refuse.clear();
        r.tick().await;
        assert_eq!(r.d.backend.programmed.len(), 2);
        assert_eq!(r.metrics.peers_failed.get(), 0);
    }

    #[tokio::test]
    async fn leases_come_and_go_and_the_guard_keeps_bad_ones_out_of_the_kernel() {
        let mut r = rig(FakeBackend::default());
        r.d.start().await.unwrap();
        r.snapshot().await;
        assert!(r.metrics.is_ready());
        let good = r.store.put(peer("10.5.7.0/24", 7));
        let underlay = r.store.put(peer("192.168.100.0/24", 66));
        let etcd = r.store.put(peer("192.168.100.254/32", 67));
        let half = r.store.put(peer("10.5.7.128/25", 68));
        let zero = r.store.put(peer("0.0.0.0/0", 69));
        let events = [&good, &underlay, &etcd, &half, &zero]
            .map(|l| LeaseEvent::Put(l.clone()))
            .to_vec();
        r.d.handle(Event::Store(StoreUpdate::Events(events)))
            .await
            .unwrap();
        let kernel: Vec<_> = r.d.backend.programmed.keys().copied().collect();
        assert_eq!(
            kernel,
            vec![good.subnet],
            "only the healthy lease reaches the kernel; {}",
            r.metrics.render()
        );
        let m = r.metrics.render();
        assert!(
            m.contains("twill_leases_rejected{reason=\"outside_network\"} 3"),
            "{m}"
        );
        assert!(
            m.contains("twill_leases_rejected{reason=\"overlaps_lease\"} 1"),
            "{m}"
        );
        assert!(r.metrics.is_ready());
        r.d.handle(Event::Store(StoreUpdate::Events(vec![LeaseEvent::Delete(
            good.subnet,
        )])))
        .await
        .unwrap();
        // The half subnet was only rejected for overlapping: with the peer gone it is accepted.
        assert_eq!(
            r.d.backend.programmed.keys().copied().collect::<Vec<_>>(),
            vec![half.subnet]
        );
        r.tick().await;
        assert_eq!(
            r.d.backend.programmed.keys().copied().collect::<Vec<_>>(),
            vec![half.subnet]
        );
    }

    #[tokio::test]
    async fn a_foreign_rewrite_of_our_lease_is_written_back() {
        let mut r = rig(FakeBackend::default());
        r.d.start().await.unwrap();
        r.snapshot().await;
        let own = r.own();
        let mut tampered = own.clone();
        tampered.attrs = LeaseAttrs::vxlan(own.attrs.public_ip, 1, Mac([2, 9, 9, 9, 9, 9]));
        let tampered = r.store.put(tampered);
        r.d.handle(Event::Store(StoreUpdate::Events(vec![LeaseEvent::Put(
            tampered,
        )])))
        .await
        .unwrap();
        let stored = r.store.get(own.subnet).unwrap();
        assert_eq!(stored.attrs, r.d.backend.lease_attrs(), "our value is back");
        assert_eq!(
            stored.etcd_lease, own.etcd_lease,
            "still bound to our etcd lease"
        );
        assert_eq!(r.store.rewrites.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_deleted_own_lease_is_taken_again_with_the_same_subnet() {
        let mut r = rig(FakeBackend::default());
        r.d.start().await.unwrap();
        let own = r.own();
        r.store.inner.lock().unwrap().0.remove(&own.subnet);
        r.d.handle(Event::Store(StoreUpdate::Events(vec![LeaseEvent::Delete(
            own.subnet,
        )])))
        .await
        .unwrap();
        assert_eq!(r.store.get(own.subnet).unwrap().attrs, own.attrs);
        assert_eq!(r.own().subnet, own.subnet);
    }

    #[tokio::test]
    async fn the_younger_of_two_nodes_with_one_vtep_mac_picks_a_new_one() {
        let mut r = rig(FakeBackend::default());
        // An older lease of another node with our MAC (a cloned state dir).
        let mut clone = peer("10.5.7.0/24", 7);
        clone.attrs =
            LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 100, 7), 1, Mac([2, 0, 0, 0, 0, 1]));
        r.store.put(clone.clone());
        r.d.start().await.unwrap();
        r.snapshot().await;
        assert_eq!(r.d.backend.renewed_macs, 1);
        let stored = r.store.get(r.own().subnet).unwrap();
        assert_ne!(
            stored.attrs.vtep().unwrap().0,
            clone.attrs.vtep().unwrap().0
        );
        assert!(
            r.d.backend.programmed.contains_key(&clone.subnet),
            "the clone is a peer again"
        );
    }

    #[tokio::test]
    async fn broken_files_and_ip_forward_are_put_back_every_pass() {
        let mut r = rig(FakeBackend::default());
        r.d.start().await.unwrap();
        r.snapshot().await;
        assert!(r.metrics.is_ready());
        let env = r.d.cfg.subnet_file.clone();
        let good = std::fs::read_to_string(&env).unwrap();
        std::fs::write(&env, "FLANNEL_SUBNET=garbage\n").unwrap();
        let conflist = r.d.cfg.cni_conf_dir.join(cni_conf::CONFLIST_NAME);
        let good_conflist = std::fs::read_to_string(&conflist).unwrap();
        std::fs::remove_file(&conflist).unwrap();
        *r.forward_off.lock().unwrap() = true;
        let before = r.metrics.reconcile_corrections.get();
        r.tick().await;
        assert_eq!(std::fs::read_to_string(&env).unwrap(), good);
        assert_eq!(std::fs::read_to_string(&conflist).unwrap(), good_conflist);
        assert!(!*r.forward_off.lock().unwrap(), "ip_forward set again");
        assert!(r.metrics.reconcile_corrections.get() >= before + 3);
        assert!(r.metrics.is_ready());
    }

    #[tokio::test]
    async fn a_shadowing_config_is_a_warning_in_readyz_and_metrics() {
        let mut r = rig(FakeBackend::default());
        r.d.start().await.unwrap();
        r.snapshot().await;
        let other = r.d.cfg.cni_conf_dir.join("05-other.conflist");
        std::fs::write(
            &other,
            r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        r.tick().await;
        assert_eq!(r.metrics.cni_config_shadowed.get(), 1);
        assert!(r.metrics.readiness_body().contains("05-other.conflist"));
        std::fs::remove_file(&other).unwrap();
        r.tick().await;
        assert_eq!(r.metrics.cni_config_shadowed.get(), 0);
        assert!(!r.metrics.readiness_body().contains("05-other"));
    }
}
