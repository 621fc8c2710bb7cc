//! vxlan and host-gw, flannel-compatible, with full reconciliation.
//!
//! Per vxlan peer, in this order (so the kernel never ARPs for the gateway):
//! permanent neighbour (peer network address → VtepMAC), FDB (VtepMAC → PublicIP),
//! route `<subnet> via <network address> dev twill.<VNI> onlink`. A DirectRouting peer on
//! our L2 and every host-gw peer get `<subnet> via <PublicIP> dev <underlay> proto 116`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{InfoKind, InfoVxlan};
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::LinkVxlan;
use tracing::{info, warn};

use super::plan::{self, Devs, KNeigh, KRoute, Kernel, Path};
use super::{Backend, Report};
use crate::backend_type::BackendType;
use crate::config::{BackendConfig, VxlanConfig};
use crate::error::{Error, Result};
use crate::iface::Underlay;
use crate::lease::{Lease, LeaseAttrs, Mac};
use crate::offload::OffloadMode;
use twill_common::netlink::{Netlink, NlError, TWILL_ROUTE_PROTO};

/// In-flight netlink requests while bulk-programming (one socket, pipelined).
const PARALLEL: usize = 128;

pub struct RoutedBackend {
    nl: Netlink,
    vxlan: Option<VxlanConfig>,
    underlay: Underlay,
    state_dir: PathBuf,
    offload: OffloadMode,
    mac: Option<Mac>,
    dev_index: u32,
    programmed: HashMap<Ipv4Network, Path>,
}

/// Runs `f` over `items` with bounded concurrency; returns the items whose operation failed,
/// with the error.
async fn run_all<T, E, F, Fut>(items: Vec<T>, f: F) -> Vec<(T, String)>
where
    T: Copy,
    E: std::fmt::Display,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    futures::stream::iter(items.into_iter().map(|t| {
        let fut = f(t);
        async move { (t, fut.await) }
    }))
    .buffer_unordered(PARALLEL)
    .filter_map(|(t, r)| async move { r.err().map(|e| (t, e.to_string())) })
    .collect()
    .await
}

impl RoutedBackend {
    pub fn new(
        nl: Netlink,
        cfg: &BackendConfig,
        underlay: Underlay,
        state_dir: PathBuf,
        offload: OffloadMode,
    ) -> Result<RoutedBackend> {
        let vxlan = match cfg {
            BackendConfig::Vxlan(v) => Some(v.clone()),
            BackendConfig::HostGw => {
                // host-gw cannot work through NAT: peers route to our PublicIP directly.
                if !underlay
                    .addrs
                    .iter()
                    .any(|(ip, _)| *ip == underlay.public_ip)
                {
                    return Err(Error::Backend(format!(
                        "host-gw needs the public IP {} on {}; it is not (NAT?)",
                        underlay.public_ip, underlay.name
                    )));
                }
                None
            }
        };
        Ok(RoutedBackend {
            nl,
            vxlan,
            underlay,
            state_dir,
            offload,
            mac: None,
            dev_index: 0,
            programmed: HashMap::new(),
        })
    }

    fn dev_name(vni: u32) -> String {
        format!("twill.{vni}")
    }

    fn mac_file(&self, vni: u32) -> PathBuf {
        self.state_dir.join(format!("vtep-mac-{vni}"))
    }

    fn stored_mac(&self, vni: u32) -> Option<Mac> {
        std::fs::read_to_string(self.mac_file(vni))
            .ok()?
            .parse()
            .ok()
    }

    fn store_mac(&self, vni: u32, mac: Mac) -> Result<()> {
        twill_common::fsutil::ensure_dir(&self.state_dir, 0o700)
            .map_err(Error::io(format!("create {}", self.state_dir.display())))?;
        let p = self.mac_file(vni);
        twill_common::fsutil::atomic_write(&p, format!("{mac}\n").as_bytes(), 0o600)
            .map_err(Error::io(format!("write {}", p.display())))
    }

    fn same_l2(&self, ip: Ipv4Addr) -> bool {
        self.underlay.addrs.iter().any(|(a, len)| {
            Ipv4Network::new(*a, *len)
                .map(|n| n.contains(ip))
                .unwrap_or(false)
        })
    }

    fn path_for(&self, lease: &Lease) -> Option<Path> {
        let public = lease.attrs.public_ip;
        if public == self.underlay.public_ip {
            return None;
        }
        match &self.vxlan {
            Some(cfg) => {
                let (mac, _vni) = lease.attrs.vtep()?;
                if cfg.direct_routing && self.same_l2(public) {
                    Some(Path::Direct { gw: public })
                } else {
                    Some(Path::Vxlan {
                        gw: lease.subnet.network(),
                        mac,
                        public,
                    })
                }
            }
            None => (lease.attrs.backend_type == BackendType::HostGw)
                .then_some(Path::Direct { gw: public }),
        }
    }

    fn vxlan_compatible(&self, cfg: &VxlanConfig, info: &[InfoVxlan]) -> bool {
        let mut id = None;
        let mut link = None;
        let mut local = None;
        let mut port = None;
        let mut learning = None;
        for i in info {
            match i {
                InfoVxlan::Id(v) => id = Some(*v),
                InfoVxlan::Link(v) => link = Some(*v),
                InfoVxlan::Local(v) => local = Some(*v),
                InfoVxlan::Port(v) => port = Some(*v),
                InfoVxlan::Learning(v) => learning = Some(*v),
                _ => {}
            }
        }
        id == Some(cfg.vni)
            && link == Some(self.underlay.index)
            && local == Some(self.underlay.iface_ip)
            && port == Some(cfg.port)
            && learning != Some(true)
    }

    /// Creates or adopts the vxlan device; returns true when it was created.
    async fn ensure_device(&mut self, cfg: &VxlanConfig) -> Result<bool> {
        let name = RoutedBackend::dev_name(cfg.vni);
        if let Some(link) = self.nl.link(&name).await? {
            if link.kind == Some(InfoKind::Vxlan) && self.vxlan_compatible(cfg, &link.vxlan) {
                self.dev_index = link.index;
                if let Some(mac) = link.mac {
                    if self.mac != Some(mac) && self.mac.is_some() {
                        // Our lease advertises the stored MAC: put it back.
                        if let Some(want) = self.mac {
                            warn!("{name}: MAC {mac} differs from the advertised {want}; restoring it");
                            self.nl.set_mac(link.index, want).await?;
                        }
                    } else if self.mac.is_none() {
                        self.mac = Some(mac);
                        if self.stored_mac(cfg.vni) != Some(mac) {
                            self.store_mac(cfg.vni, mac)?;
                        }
                    }
                }
                return Ok(false);
            }
            warn!("{name} exists with incompatible settings; recreating it");
            self.nl.del_link(link.index).await?;
        }
        // The MAC is fixed before LinkAdd so udev/systemd MACAddressPolicy cannot change it,
        // and persisted so a restart advertises the same VtepMAC.
        let mac = match self.mac.or_else(|| self.stored_mac(cfg.vni)) {
            Some(m) => m,
            None => Mac::random(),
        };
        if self.stored_mac(cfg.vni) != Some(mac) {
            self.store_mac(cfg.vni, mac)?;
        }
        self.mac = Some(mac);
        let msg = LinkVxlan::new(&name, cfg.vni)
            .dev(self.underlay.index)
            .local(self.underlay.iface_ip)
            .port(cfg.port)
            .learning(false)
            .mtu(self.mtu())
            .address(mac.0.to_vec())
            .build();
        match self.nl.add_link(msg).await {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(e.into()),
        }
        let link = self
            .nl
            .link(&name)
            .await?
            .ok_or_else(|| Error::Backend(format!("{name} vanished right after creation")))?;
        self.dev_index = link.index;
        // No router advertisements on the VTEP (flannel does the same).
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/accept_ra"), "0");
        info!(
            "created {name} (vni {}, local {}, dev {}, dstport {}, mac {mac}, mtu {})",
            cfg.vni,
            self.underlay.iface_ip,
            self.underlay.name,
            cfg.port,
            self.mtu()
        );
        Ok(true)
    }

    /// Installs the route to a peer. A first install adds (exclusive): if a route to `dst`
    /// exists and is not ours (an operator's, a connected one), it stays and this peer fails;
    /// only our own route is replaced.
    async fn set_route(
        &self,
        dst: Ipv4Network,
        gw: Ipv4Addr,
        oif: u32,
        onlink: bool,
        first: bool,
    ) -> Result<()> {
        if first {
            match self.nl.route_add(dst, gw, oif, onlink).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(e.into()),
            }
            let foreign = self
                .nl
                .main_routes()
                .await?
                .iter()
                .any(|r| r.dst == dst && !self.owns(r));
            if foreign {
                return Err(Error::Backend(format!(
                    "a route to {dst} exists that twilld does not own; left in place"
                )));
            }
        }
        Ok(self.nl.route_replace(dst, gw, oif, onlink).await?)
    }

    /// A route twill manages: on its VTEP, or on the underlay with twill's protocol number.
    fn owns(&self, r: &twill_common::netlink::RouteEntry) -> bool {
        (self.dev_index != 0 && r.oif == Some(self.dev_index))
            || (r.oif == Some(self.underlay.index)
                && r.protocol == RouteProtocol::Other(TWILL_ROUTE_PROTO))
    }

    async fn program(&self, subnet: Ipv4Network, path: Path, old: Option<Path>) -> Result<()> {
        let nl = &self.nl;
        match path {
            Path::Vxlan { gw, mac, public } => {
                nl.neigh_replace(self.dev_index, gw, mac).await?;
                if let Err(e) = nl.fdb_replace(self.dev_index, mac, public).await {
                    let _ = nl.neigh_del(Netlink::neigh_msg(self.dev_index, gw)).await;
                    return Err(e.into());
                }
                if let Err(e) = self
                    .set_route(subnet, gw, self.dev_index, true, old.is_none())
                    .await
                {
                    let _ = nl.neigh_del(Netlink::neigh_msg(self.dev_index, gw)).await;
                    let _ = nl
                        .neigh_del(Netlink::fdb_msg(self.dev_index, mac, public))
                        .await;
                    return Err(e);
                }
                // FDB entries are keyed by MAC: an old MAC's entry would stay forever.
                if let Some(Path::Vxlan {
                    mac: om,
                    public: op,
                    ..
                }) = old
                {
                    if om != mac || op != public {
                        nl.neigh_del(Netlink::fdb_msg(self.dev_index, om, op))
                            .await?;
                    }
                }
            }
            Path::Direct { gw } => {
                self.set_route(subnet, gw, self.underlay.index, false, old.is_none())
                    .await?;
                if let Some(Path::Vxlan {
                    gw: og,
                    mac: om,
                    public: op,
                }) = old
                {
                    nl.neigh_del(Netlink::neigh_msg(self.dev_index, og)).await?;
                    nl.neigh_del(Netlink::fdb_msg(self.dev_index, om, op))
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn unprogram(&self, subnet: Ipv4Network, path: Path) -> Result<()> {
        let nl = &self.nl;
        let mut first_err = None;
        let mut note = |r: Result<(), NlError>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        match path {
            Path::Vxlan { gw, mac, public } => {
                note(nl.route_del_dst(subnet, self.dev_index).await);
                note(nl.neigh_del(Netlink::neigh_msg(self.dev_index, gw)).await);
                note(
                    nl.neigh_del(Netlink::fdb_msg(self.dev_index, mac, public))
                        .await,
                );
            }
            Path::Direct { .. } => note(nl.route_del_dst(subnet, self.underlay.index).await),
        }
        first_err.map_or(Ok(()), |e| Err(e.into()))
    }
}

impl Backend for RoutedBackend {
    fn lease_attrs(&self) -> LeaseAttrs {
        match (&self.vxlan, self.mac) {
            (Some(cfg), Some(mac)) => LeaseAttrs::vxlan(self.underlay.public_ip, cfg.vni, mac),
            (Some(cfg), None) => LeaseAttrs::vxlan(self.underlay.public_ip, cfg.vni, Mac([0; 6])),
            (None, _) => LeaseAttrs::host_gw(self.underlay.public_ip),
        }
    }

    fn mtu(&self) -> u32 {
        match &self.vxlan {
            Some(cfg) => cfg.mtu.unwrap_or(self.underlay.mtu).saturating_sub(50),
            None => self.underlay.mtu,
        }
    }

    fn device_name(&self) -> Option<String> {
        self.vxlan.as_ref().map(|c| RoutedBackend::dev_name(c.vni))
    }

    fn programmed(&self) -> usize {
        self.programmed.len()
    }

    async fn prepare(&mut self) -> Result<()> {
        if let Some(cfg) = self.vxlan.clone() {
            self.ensure_device(&cfg).await?;
        }
        Ok(())
    }

    async fn ensure(&mut self, own: Ipv4Network) -> Result<bool> {
        let Some(cfg) = self.vxlan.clone() else {
            return Ok(false);
        };
        let created = self.ensure_device(&cfg).await?;
        if created {
            // The kernel dropped every neighbour, FDB entry and route with the old device.
            self.programmed.clear();
        }
        self.nl
            .ensure_only_v4_address(self.dev_index, own.network())
            .await?;
        let link = self
            .nl
            .link(self.dev_index)
            .await?
            .ok_or_else(|| Error::Backend("vxlan device vanished".into()))?;
        if link.mtu != self.mtu() {
            self.nl.set_mtu(self.dev_index, self.mtu()).await?;
        }
        self.nl.set_up(self.dev_index).await?;
        // Checked every pass: a recreated device starts with the kernel's default again.
        crate::offload::apply_tx_checksum(&RoutedBackend::dev_name(cfg.vni), self.offload)?;
        // Bringing a link up can let udev rewrite its MAC; the lease advertises ours.
        let link = self
            .nl
            .link(self.dev_index)
            .await?
            .ok_or_else(|| Error::Backend("vxlan device vanished".into()))?;
        if link.mac != self.mac {
            if let Some(want) = self.mac {
                self.nl.set_mac(self.dev_index, want).await?;
                let again = self.nl.link(self.dev_index).await?;
                if again.and_then(|l| l.mac) != Some(want) {
                    return Err(Error::Backend(format!(
                        "{} MAC is not the advertised {want}",
                        RoutedBackend::dev_name(cfg.vni)
                    )));
                }
            }
        }
        Ok(created)
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<()> {
        let old = self.programmed.get(&peer.subnet).copied();
        let Some(path) = self.path_for(peer) else {
            if old.is_some() {
                return self.remove_peer(peer.subnet).await;
            }
            return Ok(());
        };
        if old == Some(path) {
            return Ok(());
        }
        self.program(peer.subnet, path, old).await?;
        self.programmed.insert(peer.subnet, path);
        Ok(())
    }

    async fn remove_peer(&mut self, subnet: Ipv4Network) -> Result<()> {
        match self.programmed.remove(&subnet) {
            Some(path) => self.unprogram(subnet, path).await,
            None => Ok(()),
        }
    }

    async fn renew_mac(&mut self) -> Result<()> {
        let Some(cfg) = self.vxlan.clone() else {
            return Ok(());
        };
        let mac = Mac::random();
        self.store_mac(cfg.vni, mac)?;
        self.mac = Some(mac);
        if self.dev_index != 0 {
            self.nl.set_mac(self.dev_index, mac).await?;
        }
        info!("{}: new VtepMAC {mac}", RoutedBackend::dev_name(cfg.vni));
        Ok(())
    }

    async fn reconcile(&mut self, peers: &HashMap<Ipv4Network, Lease>) -> Result<Report> {
        let want: HashMap<Ipv4Network, Path> = peers
            .values()
            .filter_map(|l| self.path_for(l).map(|p| (l.subnet, p)))
            .collect();
        let devs = Devs {
            vtep: self.dev_index,
            underlay: self.underlay.index,
        };
        let nl = self.nl.clone();

        // 1. Dump what the kernel has (a failure here fails the pass: nothing to plan from).
        let routes = nl.main_routes().await?;
        let (neighbours, fdb) = if self.vxlan.is_some() && devs.vtep != 0 {
            (nl.neighbours(devs.vtep).await?, nl.fdb(devs.vtep).await?)
        } else {
            (Vec::new(), Vec::new())
        };
        let kernel = Kernel {
            routes: routes
                .iter()
                .map(|r| KRoute {
                    dst: r.dst,
                    gateway: r.gateway,
                    oif: r.oif,
                    onlink: r.onlink,
                    ours: self.owns(r),
                })
                .collect(),
            neighbours: neighbours.iter().map(kneigh).collect(),
            fdb: fdb.iter().map(kneigh).collect(),
        };

        // 2. Decide.
        let changes = plan::plan(&want, &kernel, devs);
        let fresh = self.programmed.is_empty();
        let mut report = Report {
            corrections: changes.deletions() as u64,
            failed: changes.blocked.clone(),
        };

        // 3. Execute: deletions, then flannel's order (all neighbours, all FDB entries, all
        // routes); a peer whose neighbour or FDB entry failed gets no route (the kernel would
        // ARP for the gateway).
        let del_r: Vec<usize> = changes.del_routes.clone();
        for (i, e) in run_all(del_r, |i| nl.route_del(routes[i].msg.clone())).await {
            warn!(dst = %routes[i].dst, "deleting a stale route failed: {e}");
        }
        let del_n: Vec<usize> = changes.del_neighbours.clone();
        for (i, e) in run_all(del_n, |i| nl.neigh_del(neighbours[i].msg.clone())).await {
            warn!("deleting a stale neighbour failed: {e}");
            let _ = i;
        }
        let del_f: Vec<usize> = changes.del_fdb.clone();
        for (i, e) in run_all(del_f, |i| nl.neigh_del(fdb[i].msg.clone())).await {
            warn!("deleting a stale FDB entry failed: {e}");
            let _ = i;
        }
        let mut failed: HashMap<Ipv4Network, String> = HashMap::new();
        let adds: Vec<usize> = (0..changes.add.len()).collect();
        let add = &changes.add;
        let dev = devs.vtep;
        let step = |sel: fn(&plan::Missing) -> bool, failed: &HashMap<Ipv4Network, String>| {
            adds.iter()
                .copied()
                .filter(|i| sel(&add[*i]) && !failed.contains_key(&add[*i].subnet))
                .collect::<Vec<usize>>()
        };
        let neigh_ops = step(|m| m.neigh, &failed);
        let nl = &nl;
        for (i, e) in run_all(neigh_ops, |i| async move {
            match add[i].path {
                Path::Vxlan { gw, mac, .. } => nl.neigh_replace(dev, gw, mac).await,
                Path::Direct { .. } => Ok(()),
            }
        })
        .await
        {
            failed.insert(add[i].subnet, format!("neighbour: {e}"));
        }
        let fdb_ops = step(|m| m.fdb, &failed);
        for (i, e) in run_all(fdb_ops, |i| async move {
            match add[i].path {
                Path::Vxlan { mac, public, .. } => nl.fdb_replace(dev, mac, public).await,
                Path::Direct { .. } => Ok(()),
            }
        })
        .await
        {
            failed.insert(add[i].subnet, format!("FDB entry: {e}"));
        }
        let route_ops = step(|m| m.route, &failed);
        let this = &*self;
        for (i, e) in run_all(route_ops, |i| async move {
            let m = add[i];
            // The plan saw no foreign route to this dst: replace is safe.
            match m.path {
                Path::Vxlan { gw, .. } => this.nl.route_replace(m.subnet, gw, dev, true).await,
                Path::Direct { gw } => {
                    this.nl
                        .route_replace(m.subnet, gw, this.underlay.index, false)
                        .await
                }
            }
        })
        .await
        {
            failed.insert(add[i].subnet, format!("route: {e}"));
        }

        // Programming from scratch (start, device recreated) is not drift.
        if !fresh {
            report.corrections += (add.len() - failed.len()) as u64;
        }
        let mut programmed = want;
        for (subnet, _) in &report.failed {
            programmed.remove(subnet);
        }
        for subnet in failed.keys() {
            programmed.remove(subnet);
        }
        report.failed.extend(failed);
        report.failed.sort();
        self.programmed = programmed;
        Ok(report)
    }
}

fn kneigh(n: &twill_common::netlink::NeighEntry) -> KNeigh {
    KNeigh {
        ip: n.ip,
        mac: n.mac,
        permanent: n.permanent,
    }
}
