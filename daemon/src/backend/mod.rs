//! The data-path layer: what turns leases into kernel state, as a narrow trait.
//!
//! [`routed::RoutedBackend`] implements both flannel backends twill speaks: `vxlan` (device
//! `twill.<VNI>`, neighbour → FDB → onlink route per peer, optional DirectRouting) and
//! `host-gw` (a plain route via the peer's PublicIP).

pub mod plan;
pub mod routed;

use std::collections::HashMap;
use std::future::Future;

use ipnetwork::Ipv4Network;

use crate::error::Result;
use crate::lease::{Lease, LeaseAttrs};

/// The outcome of a reconcile pass that could read the kernel.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    /// Kernel entries added or removed because they had drifted.
    pub corrections: u64,
    /// Peers not programmed this pass, with why; retried on the next pass. A peer the kernel
    /// refuses never keeps the node from turning Ready.
    pub failed: Vec<(Ipv4Network, String)>,
}

pub trait Backend: Send {
    /// BackendType and BackendData advertised in this node's lease. Valid after `prepare`.
    fn lease_attrs(&self) -> LeaseAttrs;
    /// MTU for pods (FLANNEL_MTU).
    fn mtu(&self) -> u32;
    /// Ifindex of the backend's own device, if it has one (for deletion watching).
    fn device_name(&self) -> Option<String>;
    /// Number of peers currently programmed.
    fn programmed(&self) -> usize;
    /// Creates or adopts the device (its MAC is chosen and persisted before it exists).
    fn prepare(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Makes sure the device exists with `own`'s network address, MTU and up. Returns true
    /// when it had to be recreated: then every peer must be programmed again.
    fn ensure(&mut self, own: Ipv4Network) -> impl Future<Output = Result<bool>> + Send;
    /// Programs (or updates) one peer.
    fn add_peer(&mut self, peer: &Lease) -> impl Future<Output = Result<()>> + Send;
    /// Removes what was programmed for a peer subnet.
    fn remove_peer(&mut self, subnet: Ipv4Network) -> impl Future<Output = Result<()>> + Send;
    /// Makes the kernel state exactly match `peers`: adds what is missing, removes what no
    /// lease explains, never touches what twill does not own. Err only when the kernel state
    /// could not be read; per-peer failures are in the report.
    fn reconcile(
        &mut self,
        peers: &HashMap<Ipv4Network, Lease>,
    ) -> impl Future<Output = Result<Report>> + Send;
    /// Picks a new random VtepMAC, persists it and sets it on the device (another node
    /// advertises ours). No-op for backends without a MAC.
    fn renew_mac(&mut self) -> impl Future<Output = Result<()>> + Send;
}
