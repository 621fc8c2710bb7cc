//! The cluster store layer: what the daemon needs from etcd, as a narrow trait.

use std::future::Future;

use ipnetwork::Ipv4Network;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::lease::{Lease, LeaseAttrs};
use crate::metrics::Metrics;

/// A change seen by the watch.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    Put(Lease),
    Delete(Ipv4Network),
}

/// What the watch loop reports to the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreUpdate {
    /// A full listing (at start and after a compaction or disconnect): apply the difference.
    Snapshot(Vec<Lease>),
    /// Incremental changes, in order.
    Events(Vec<LeaseEvent>),
}

/// Subnet leases and network config in a shared store (flannel's etcd schema).
pub trait SubnetStore: Clone + Send + Sync + 'static {
    /// The raw network config, None while the key is missing.
    fn get_config(&self) -> impl Future<Output = Result<Option<String>>> + Send;
    /// Every parseable lease and the listing's revision.
    fn list(&self) -> impl Future<Output = Result<(Vec<Lease>, i64)>> + Send;
    /// Creates the lease key only if absent, bound to a new etcd lease of `ttl` seconds.
    /// Returns None when the key already exists (a lost race).
    fn create(
        &self,
        subnet: Ipv4Network,
        attrs: &LeaseAttrs,
        ttl: i64,
    ) -> impl Future<Output = Result<Option<Lease>>> + Send;
    /// Rewrites an existing key (compare-and-swap on its mod revision). A reservation stays
    /// without an etcd lease; any other key gets a fresh one. None when the key changed meanwhile.
    fn update(
        &self,
        old: &Lease,
        attrs: &LeaseAttrs,
        ttl: i64,
    ) -> impl Future<Output = Result<Option<Lease>>> + Send;
    /// Puts `attrs` back into an existing key, keeping its etcd lease (compare-and-swap on
    /// `current`'s mod revision): how a node restores its own lease after a foreign write.
    /// None when the key changed meanwhile.
    fn rewrite(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
    ) -> impl Future<Output = Result<Option<Lease>>> + Send;
    /// Deletes a key if unchanged since `lease` was read.
    fn delete(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send;
    /// Renews an etcd lease; false when it no longer exists.
    fn keep_alive(&self, etcd_lease: i64) -> impl Future<Output = Result<bool>> + Send;
    /// Runs until `tx` closes: sends a snapshot, then events; after a compaction or a lost
    /// connection it lists again (with capped backoff) and sends a new snapshot.
    fn watch(
        &self,
        tx: mpsc::Sender<StoreUpdate>,
        metrics: std::sync::Arc<Metrics>,
    ) -> impl Future<Output = ()> + Send;
}
