//! vxlan and host-gw, flannel-compatible, with full reconciliation.
//!
//! Per vxlan peer, in this order (so the kernel never ARPs for the gateway):
//! permanent neighbour (peer network address → VtepMAC), FDB (VtepMAC → PublicIP),
//! route `<subnet> via <network address> dev twill.<VNI> onlink`. A DirectRouting peer on
//! our L2 and every host-gw peer get `<subnet> via <PublicIP> dev <underlay> proto 116`.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{InfoKind, InfoVxlan};
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::LinkVxlan;
use tracing::{info, warn};

use super::Backend;
use crate::config::{BackendConfig, VxlanConfig};
use crate::error::{Error, Result};
use crate::iface::Underlay;
use crate::lease::{Lease, LeaseAttrs, Mac};
use crate::netlink::{Netlink, TWILL_ROUTE_PROTO};

/// In-flight netlink requests while bulk-programming (one socket, pipelined).
const PARALLEL: usize = 128;

/// What one peer needs in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Vxlan {
        gw: Ipv4Addr,
        mac: Mac,
        public: Ipv4Addr,
    },
    Direct {
        gw: Ipv4Addr,
    },
}

pub struct RoutedBackend {
    nl: Netlink,
    vxlan: Option<VxlanConfig>,
    underlay: Underlay,
    state_dir: PathBuf,
    mac: Option<Mac>,
    dev_index: u32,
    programmed: HashMap<Ipv4Network, Path>,
}

/// Runs `f` over `items` with bounded concurrency; returns the number of failures.
async fn run_all<T, F, Fut>(items: Vec<T>, f: F) -> usize
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let results: Vec<Result<()>> = futures::stream::iter(items.into_iter().map(f))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut failed = 0;
    for r in results {
        if let Err(e) = r {
            if failed == 0 {
                warn!("netlink: {e}");
            }
            failed += 1;
        }
    }
    failed
}

impl RoutedBackend {
    pub fn new(
        nl: Netlink,
        cfg: &BackendConfig,
        underlay: Underlay,
        state_dir: PathBuf,
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
            None => (lease.attrs.backend_type == "host-gw").then_some(Path::Direct { gw: public }),
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
        if let Some(link) = self.nl.link_by_name(&name).await? {
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
            Err(e) if twill_common::netlink::is_exists(&e) => {}
            Err(e) => return Err(e.into()),
        }
        let link = self
            .nl
            .link_by_name(&name)
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

    async fn program(&self, subnet: Ipv4Network, path: Path, old: Option<Path>) -> Result<()> {
        let nl = &self.nl;
        match path {
            Path::Vxlan { gw, mac, public } => {
                nl.neigh_replace(self.dev_index, gw, mac).await?;
                if let Err(e) = nl.fdb_replace(self.dev_index, mac, public).await {
                    let _ = nl.neigh_del(Netlink::neigh_msg(self.dev_index, gw)).await;
                    return Err(e);
                }
                if let Err(e) = nl.route_replace(subnet, gw, self.dev_index, true).await {
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
                nl.route_replace(subnet, gw, self.underlay.index, false)
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
        let mut note = |r: Result<()>| {
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
        first_err.map_or(Ok(()), Err)
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
            .link_by_index(self.dev_index)
            .await?
            .ok_or_else(|| Error::Backend("vxlan device vanished".into()))?;
        if link.mtu != self.mtu() {
            self.nl.set_mtu(self.dev_index, self.mtu()).await?;
        }
        self.nl.set_up(self.dev_index).await?;
        // Bringing a link up can let udev rewrite its MAC; the lease advertises ours.
        let link = self
            .nl
            .link_by_index(self.dev_index)
            .await?
            .ok_or_else(|| Error::Backend("vxlan device vanished".into()))?;
        if link.mac != self.mac {
            if let Some(want) = self.mac {
                self.nl.set_mac(self.dev_index, want).await?;
                let again = self.nl.link_by_index(self.dev_index).await?;
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

    async fn reconcile(&mut self, peers: &HashMap<Ipv4Network, Lease>) -> Result<u64> {
        let want: HashMap<Ipv4Network, Path> = peers
            .values()
            .filter_map(|l| self.path_for(l).map(|p| (l.subnet, p)))
            .collect();
        let dev = self.dev_index;
        let ul = self.underlay.index;
        let nl = self.nl.clone();
        let mut corrections = 0u64;

        // Current kernel state that is ours to manage.
        let routes = nl.main_routes().await?;
        let ours = |r: &crate::netlink::RouteEntry| {
            (dev != 0 && r.oif == Some(dev))
                || (r.oif == Some(ul) && r.protocol == RouteProtocol::Other(TWILL_ROUTE_PROTO))
        };
        let mut have_routes: HashMap<Ipv4Network, Vec<crate::netlink::RouteEntry>> = HashMap::new();
        for r in routes.into_iter().filter(|r| ours(r)) {
            have_routes.entry(r.dst).or_default().push(r);
        }
        let (have_neigh, have_fdb) = if self.vxlan.is_some() && dev != 0 {
            (nl.neighbours(dev).await?, nl.fdb(dev).await?)
        } else {
            (Vec::new(), Vec::new())
        };

        let want_neigh: HashMap<Ipv4Addr, Mac> = want
            .values()
            .filter_map(|p| match p {
                Path::Vxlan { gw, mac, .. } => Some((*gw, *mac)),
                _ => None,
            })
            .collect();
        let want_fdb: HashSet<(Mac, Ipv4Addr)> = want
            .values()
            .filter_map(|p| match p {
                Path::Vxlan { mac, public, .. } => Some((*mac, *public)),
                _ => None,
            })
            .collect();

        // 1. Routes no lease explains (flannel leaves these behind).
        let mut del_routes = Vec::new();
        let mut route_ok: HashSet<Ipv4Network> = HashSet::new();
        for (dst, entries) in have_routes {
            let expected = want.get(&dst).map(|p| match p {
                Path::Vxlan { gw, .. } => (*gw, dev, true),
                Path::Direct { gw } => (*gw, ul, false),
            });
            for e in entries {
                let matches = expected.is_some_and(|(gw, oif, onlink)| {
                    e.gateway == Some(gw) && e.oif == Some(oif) && e.onlink == onlink
                });
                if matches && !route_ok.contains(&dst) {
                    route_ok.insert(dst);
                } else if expected.is_none() {
                    del_routes.push(e.msg);
                }
                // A wrong route to a wanted dst is fixed by the replace below.
            }
        }
        corrections += del_routes.len() as u64;
        run_all(del_routes, |m| nl.route_del(m)).await;

        // 2. Neighbours and FDB entries: drop stale, collect missing.
        let mut neigh_ok = HashSet::new();
        let mut del_neigh = Vec::new();
        for n in have_neigh {
            match (n.ip, n.mac) {
                (Some(ip), Some(mac)) if want_neigh.get(&ip) == Some(&mac) && n.permanent => {
                    neigh_ok.insert(ip);
                }
                (Some(ip), _) if want_neigh.contains_key(&ip) => {} // replaced below
                _ => del_neigh.push(n.msg),
            }
        }
        let mut fdb_ok = HashSet::new();
        for f in have_fdb {
            let dst = f.ip;
            match (f.mac, dst) {
                (Some(mac), Some(ip)) if want_fdb.contains(&(mac, ip)) => {
                    fdb_ok.insert((mac, ip));
                }
                (Some(_), Some(_)) => del_neigh.push(f.msg),
                _ => {}
            }
        }
        corrections += del_neigh.len() as u64;
        run_all(del_neigh, |m| nl.neigh_del(m)).await;

        // 3. Add in flannel's order: all neighbours, then all FDB entries, then all routes.
        let add_neigh: Vec<(Ipv4Addr, Mac)> = want_neigh
            .iter()
            .filter(|(ip, _)| !neigh_ok.contains(*ip))
            .map(|(ip, mac)| (*ip, *mac))
            .collect();
        let add_fdb: Vec<(Mac, Ipv4Addr)> = want_fdb
            .iter()
            .filter(|k| !fdb_ok.contains(*k))
            .copied()
            .collect();
        let add_routes: Vec<(Ipv4Network, Path)> = want
            .iter()
            .filter(|(dst, _)| !route_ok.contains(*dst))
            .map(|(d, p)| (*d, *p))
            .collect();
        let fresh = self.programmed.is_empty();
        let added = (add_neigh.len() + add_fdb.len() + add_routes.len()) as u64;
        let mut failed = run_all(add_neigh, |(ip, mac)| nl.neigh_replace(dev, ip, mac)).await;
        failed += run_all(add_fdb, |(mac, ip)| nl.fdb_replace(dev, mac, ip)).await;
        failed += run_all(add_routes, |(dst, p)| {
            let nl = &nl;
            async move {
                match p {
                    Path::Vxlan { gw, .. } => nl.route_replace(dst, gw, dev, true).await,
                    Path::Direct { gw } => nl.route_replace(dst, gw, ul, false).await,
                }
            }
        })
        .await;
        // Programming from scratch (start, device recreated) is not drift.
        if !fresh {
            corrections += added;
        }
        self.programmed = want;
        if failed > 0 {
            return Err(Error::Backend(format!(
                "{failed} netlink operations failed during reconcile"
            )));
        }
        Ok(corrections)
    }
}
