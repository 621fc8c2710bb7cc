//! Typed operations over one rtnetlink socket for what twilld's backends need: links,
//! addresses, neighbours, FDB entries and routes, in the namespace the socket was opened in.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::error::NlError;
use super::link::{link_get, LinkId, LinkSummary};
use super::mac::Mac;

type Result<T, E = NlError> = std::result::Result<T, E>;

/// Protocol number on the routes twilld installs on the underlay (host-gw, DirectRouting), so
/// a reconcile only ever removes its own routes there ("proto 116" in `ip route`).
pub const TWILL_ROUTE_PROTO: u8 = 116;

/// Ok for "already gone" errors, so deletes are idempotent.
fn ignore_missing(r: Result<(), rtnetlink::Error>, op: impl std::fmt::Display) -> Result<()> {
    match r.map_err(NlError::kernel(op)) {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// The kernel's view of one neighbour or FDB entry.
#[derive(Debug, Clone)]
pub struct NeighEntry {
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<Mac>,
    pub permanent: bool,
    pub msg: NeighbourMessage,
}

/// A route in the main table, as far as reconciling goes.
#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub dst: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    pub protocol: RouteProtocol,
    pub msg: RouteMessage,
}

#[derive(Clone)]
pub struct Netlink {
    pub handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the current namespace and drives it on the current runtime.
    pub fn open() -> Result<Netlink> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(NlError::io("open netlink socket"))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The link `id` (by name or index), None when there is none.
    pub async fn link(&self, id: impl Into<LinkId>) -> Result<Option<LinkSummary>> {
        Ok(link_get(&self.handle, id)
            .await?
            .as_ref()
            .map(LinkSummary::of))
    }

    /// `(ifindex, address, prefix)` of every IPv4 address.
    pub async fn v4_addresses(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(NlError::kernel("list addresses"))?;
        let mut out = Vec::new();
        for m in msgs {
            for a in &m.attributes {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
                if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                    out.push((m.header.index, *ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Ensures `ip/32` is on the link and removes every other IPv4 address from it (the link
    /// is twill's own; an address of an earlier network or subnet must not linger).
    pub async fn ensure_only_v4_address(&self, index: u32, ip: Ipv4Addr) -> Result<()> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(NlError::kernel(format!(
                "list addresses of ifindex {index}"
            )))?;
        let mut have = false;
        for m in msgs {
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let Some(addr) = addr else { continue };
            if addr == ip && m.header.prefix_len == 32 {
                have = true;
            } else {
                ignore_missing(
                    self.handle.address().del(m).execute().await,
                    format!("delete {addr} from ifindex {index}"),
                )?;
            }
        }
        if !have {
            match self
                .handle
                .address()
                .add(index, IpAddr::V4(ip), 32)
                .execute()
                .await
                .map_err(NlError::kernel(format!("add {ip}/32 to ifindex {index}")))
            {
                Ok(()) => {}
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(NlError::kernel(format!("set ifindex {index} up")))
    }

    pub async fn set_mac(&self, index: u32, mac: Mac) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .address(mac.0.to_vec())
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(NlError::kernel(format!(
                "set ifindex {index} address {mac}"
            )))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(NlError::kernel(format!("set ifindex {index} mtu {mtu}")))
    }

    pub async fn add_link(&self, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(NlError::kernel("add link"))
    }

    pub async fn del_link(&self, index: u32) -> Result<()> {
        ignore_missing(
            self.handle.link().del(index).execute().await,
            format!("delete ifindex {index}"),
        )
    }

    /// Every IPv4 route the kernel lists (all tables).
    async fn dump_routes(&self) -> Result<Vec<RouteMessage>> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        self.handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(NlError::kernel("list routes"))
    }

    /// The interface of the IPv4 default route (lowest metric first).
    pub async fn default_route_oif(&self) -> Result<Option<u32>> {
        let routes = self.dump_routes().await?;
        let mut best: Option<(u32, u32)> = None;
        for r in routes {
            if r.header.destination_prefix_length != 0
                || r.header.table != RouteHeader::RT_TABLE_MAIN
            {
                continue;
            }
            let mut oif = None;
            let mut prio = 0;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => prio = *p,
                    _ => {}
                }
            }
            if let Some(o) = oif {
                if best.is_none_or(|(p, _)| prio < p) {
                    best = Some((prio, o));
                }
            }
        }
        Ok(best.map(|(_, o)| o))
    }

    // ----- neighbours and FDB -----

    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
    pub async fn neigh_replace(&self, index: u32, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .kind(RouteType::Unicast)
            .replace()
            .execute()
            .await
            .map_err(NlError::kernel(format!(
                "ip neigh replace {ip} lladdr {mac}"
            )))
    }

    /// `bridge fdb replace <mac> dev <index> dst <ip> self permanent`.
    pub async fn fdb_replace(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(IpAddr::V4(dst))
            .replace()
            .execute()
            .await
            .map_err(NlError::kernel(format!(
                "bridge fdb replace {mac} dst {dst}"
            )))
    }

    pub async fn neigh_del(&self, msg: NeighbourMessage) -> Result<()> {
        ignore_missing(
            self.handle.neighbours().del(msg).execute().await,
            "delete neighbour",
        )
    }

    pub fn neigh_msg(index: u32, ip: Ipv4Addr) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = index;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        m
    }

    pub fn fdb_msg(index: u32, mac: Mac, dst: Ipv4Addr) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.flags = NeighbourFlags::Own;
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        m
    }

    async fn dump_neigh(&self, family: AddressFamily, index: u32) -> Result<Vec<NeighEntry>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(NlError::kernel("list neighbours"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .map(|m| {
                let mut e = NeighEntry {
                    ip: None,
                    mac: None,
                    permanent: m.header.state == NeighbourState::Permanent,
                    msg: m.clone(),
                };
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                            e.ip = Some(*ip)
                        }
                        // In AF_BRIDGE dumps the VXLAN remote comes back as raw bytes.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b))
                            if b.len() == 4 =>
                        {
                            e.ip = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                        }
                        NeighbourAttribute::LinkLayerAddress(b) => e.mac = Mac::from_bytes(b),
                        _ => {}
                    }
                }
                e
            })
            .collect())
    }

    /// IPv4 neighbour entries on `index`.
    pub async fn neighbours(&self, index: u32) -> Result<Vec<NeighEntry>> {
        self.dump_neigh(AddressFamily::Inet, index).await
    }

    /// FDB entries on `index` (bridge family).
    pub async fn fdb(&self, index: u32) -> Result<Vec<NeighEntry>> {
        self.dump_neigh(AddressFamily::Bridge, index).await
    }

    // ----- routes -----

    fn route_msg(dst: Ipv4Network, gw: Ipv4Addr, oif: u32, onlink: bool) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .gateway(gw)
            .output_interface(oif)
            .protocol(RouteProtocol::Other(TWILL_ROUTE_PROTO))
            .scope(RouteScope::Universe);
        if onlink {
            b = b.onlink();
        }
        b.build()
    }

    /// `ip route replace <dst> via <gw> dev <oif> [onlink] proto 116`.
    pub async fn route_replace(
        &self,
        dst: Ipv4Network,
        gw: Ipv4Addr,
        oif: u32,
        onlink: bool,
    ) -> Result<()> {
        self.route_install(dst, gw, oif, onlink, true).await
    }

    /// `ip route add <dst> via <gw> dev <oif> [onlink] proto 116`: fails with EEXIST when any
    /// route to `dst` exists (so a foreign one is never replaced blindly).
    pub async fn route_add(
        &self,
        dst: Ipv4Network,
        gw: Ipv4Addr,
        oif: u32,
        onlink: bool,
    ) -> Result<()> {
        self.route_install(dst, gw, oif, onlink, false).await
    }

    async fn route_install(
        &self,
        dst: Ipv4Network,
        gw: Ipv4Addr,
        oif: u32,
        onlink: bool,
        replace: bool,
    ) -> Result<()> {
        let req = self
            .handle
            .route()
            .add(Netlink::route_msg(dst, gw, oif, onlink));
        let (req, verb) = if replace {
            (req.replace(), "replace")
        } else {
            (req, "add")
        };
        req.execute()
            .await
            .map_err(NlError::kernel(format!("ip route {verb} {dst} via {gw}")))
    }

    pub async fn route_del(&self, msg: RouteMessage) -> Result<()> {
        ignore_missing(self.handle.route().del(msg).execute().await, "delete route")
    }

    /// Deletes twill's main-table route to `dst` out of `oif` (whatever its next hop). Device
    /// and protocol are part of the match: when ours is already gone, the kernel would
    /// otherwise delete the first other route to `dst` it finds, which twill does not own.
    pub async fn route_del_dst(&self, dst: Ipv4Network, oif: u32) -> Result<()> {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .output_interface(oif)
            .build();
        msg.header.protocol = RouteProtocol::Other(TWILL_ROUTE_PROTO);
        msg.header.scope = RouteScope::NoWhere;
        msg.header.kind = RouteType::Unspec;
        self.route_del(msg).await
    }

    /// IPv4 unicast routes of the main table.
    pub async fn main_routes(&self) -> Result<Vec<RouteEntry>> {
        let msgs = self.dump_routes().await?;
        let mut out = Vec::new();
        for m in msgs {
            // Every type counts: a foreign blackhole or unreachable route to a peer's prefix
            // must be seen (and left alone) as much as a unicast one.
            if m.header.table != RouteHeader::RT_TABLE_MAIN {
                continue;
            }
            let mut dst = None;
            let mut gateway = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let Ok(dst) = Ipv4Network::new(
                dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
                m.header.destination_prefix_length,
            ) else {
                continue;
            };
            out.push(RouteEntry {
                dst,
                gateway,
                oif,
                onlink: m.header.flags.contains(RouteFlags::Onlink),
                protocol: m.header.protocol,
                msg: m,
            });
        }
        Ok(out)
    }
}
