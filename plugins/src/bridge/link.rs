//! The netlink side of twill-bridge: bridge, veth pair, addresses, routes, port wait.
//! Every function takes the handle of the namespace it works in.

use std::net::IpAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::address::AddressHeaderFlags;
use netlink_packet_route::link::{
    BridgePortState, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage, State,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol,
    RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec};
use twill_common::cni::{CniError, Route};
use twill_common::netlink::{addrs_of, is_exists, is_not_found, link_get, Mac, NlError};

pub fn kind_of(m: &LinkMessage) -> Option<&InfoKind> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn attr_u32(m: &LinkMessage, f: impl Fn(&LinkAttribute) -> Option<u32>) -> Option<u32> {
    m.attributes.iter().find_map(f)
}

pub fn controller_of(m: &LinkMessage) -> Option<u32> {
    attr_u32(m, |a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

pub fn peer_index_of(m: &LinkMessage) -> Option<u32> {
    attr_u32(m, |a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

fn oper_up(m: &LinkMessage) -> bool {
    m.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::OperState(State::Up)))
}

fn port_forwarding(m: &LinkMessage) -> bool {
    m.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| match i {
            LinkInfo::PortData(InfoPortData::BridgePort(p)) => p
                .iter()
                .any(|x| matches!(x, InfoBridgePort::State(BridgePortState::Forwarding))),
            _ => false,
        }),
        _ => false,
    })
}

/// Ensures the bridge exists and is up; tolerates a concurrent creator (EEXIST).
/// Returns the bridge's link message and whether this call created it.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    mtu: Option<u32>,
    promisc: bool,
) -> Result<(LinkMessage, bool), CniError> {
    let mut created = false;
    let mut link = link_get(h, name).await?;
    if link.is_none() {
        // A fixed MAC keeps the bridge from following its lowest port's MAC as ports come and go.
        let mut b = LinkBridge::new(name).address(Mac::random().0.to_vec()).up();
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        match h.link().add(b.build()).execute().await {
            Ok(()) => created = true,
            Err(e) if is_exists(&e) => {}
            Err(e) => {
                return Err(NlError::kernel(format!("could not add bridge {name:?}"))(e).into())
            }
        }
        link = link_get(h, name).await?;
    }
    let link = link.ok_or_else(|| CniError::internal(format!("bridge {name:?} vanished")))?;
    if kind_of(&link) != Some(&InfoKind::Bridge) {
        return Err(CniError::internal(format!(
            "{name:?} already exists but is not a bridge"
        )));
    }
    let up = link.header.flags.contains(LinkFlags::Up);
    let is_promisc = link.header.flags.contains(LinkFlags::Promisc);
    if !up || (promisc && !is_promisc) {
        let mut m = LinkUnspec::new_with_index(link.header.index).up();
        if promisc {
            m = m.promiscuous(true);
        }
        h.link()
            .set(m.build())
            .execute()
            .await
            .map_err(NlError::kernel(format!("set bridge {name:?} up")))?;
    }
    Ok((link, created))
}

/// Creates the veth pair from the host side: `host_name` here (up, on the bridge) and
/// `ifname` directly inside the namespace `ns_fd` (down: the kernel cannot open a peer
/// before the pair is linked, so the caller sets it up). Retries host names on a clash.
/// Returns `(host name, host MAC, container MAC)`.
pub async fn create_veth(
    host: &Handle,
    container: &Handle,
    ns_fd: RawFd,
    ifname: &str,
    bridge_index: u32,
    mtu: Option<u32>,
    container_mac: Option<[u8; 6]>,
) -> Result<(String, [u8; 6], [u8; 6]), CniError> {
    for _ in 0..10 {
        let host_name = format!(
            "veth{:08x}",
            u32::from_ne_bytes(Mac::random().0[..4].try_into().unwrap_or([0; 4]))
        );
        let (hmac, cmac) = (
            Mac::random().0,
            container_mac.unwrap_or_else(|| Mac::random().0),
        );
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(ifname.to_string())
            .address(cmac.to_vec())
            .setns_by_fd(ns_fd);
        let mut me = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(host_name.clone())
            .address(hmac.to_vec())
            .controller(bridge_index)
            .up();
        if let Some(m) = mtu {
            peer = peer.mtu(m);
            me = me.mtu(m);
        }
        let msg = me
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .build();
        match host.link().add(msg).execute().await {
            Ok(()) => return Ok((host_name, hmac, cmac)),
            Err(e) if is_exists(&e) => {
                if link_get(container, ifname).await?.is_some() {
                    return Err(CniError::internal(format!(
                        "container veth name ({ifname:?}) peer provided ({host_name:?}) already exists"
                    )));
                }
            }
            Err(e) => return Err(NlError::kernel("failed to create veth pair")(e).into()),
        }
    }
    Err(CniError::internal("failed to find a free host veth name"))
}

pub async fn set_hairpin(h: &Handle, index: u32) -> Result<(), NlError> {
    h.link()
        .set_port(LinkBridgePort::new(index).hairpin(true).build())
        .execute()
        .await
        .map_err(NlError::kernel("set hairpin"))
}

/// Deletes a link by name; a missing link is success. Returns whether it existed.
pub async fn del_link_get(h: &Handle, name: &str) -> Result<bool, CniError> {
    match h
        .link()
        .del_with_message(LinkUnspec::new_with_name(name).build())
        .execute()
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(NlError::kernel(format!("failed to delete {name:?}"))(e).into()),
    }
}

/// Prefix of container links that DEL has detached and left for the reaper to delete.
pub const PARKED_PREFIX: &str = "twdel";

/// Takes the container link out of service at once: down and renamed to `twdel<hex>`, so the
/// pod has no `ifname` any more and a new ADD may reuse the name. Returns the new name, or
/// `None` when there is no such link. Deleting a veth waits for an RCU barrier (~15-20 ms),
/// which the caller leaves to a detached reaper.
pub async fn park_link(h: &Handle, ifname: &str) -> Result<Option<String>, CniError> {
    let Some(l) = link_get(h, ifname).await? else {
        return Ok(None);
    };
    for _ in 0..5 {
        let r = Mac::random().0;
        let name = format!(
            "{PARKED_PREFIX}{:02x}{:02x}{:02x}{:02x}",
            r[1], r[2], r[3], r[4]
        );
        let msg = LinkUnspec::new_with_index(l.header.index)
            .down()
            .name(name.clone())
            .build();
        match h.link().set(msg).execute().await {
            Ok(()) => return Ok(Some(name)),
            Err(e) if is_exists(&e) => continue,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(NlError::kernel(format!("failed to detach {ifname:?}"))(e).into()),
        }
    }
    Err(CniError::internal(
        "failed to find a free name to detach the container link",
    ))
}

/// Names of all parked links: the one just parked, and any a killed reaper left behind.
pub async fn parked_links(h: &Handle) -> Result<Vec<String>, CniError> {
    let mut names = Vec::new();
    let mut links = h.link().get().execute();
    while let Some(l) = links
        .try_next()
        .await
        .map_err(NlError::kernel("list links"))?
    {
        for a in &l.attributes {
            if let LinkAttribute::IfName(n) = a {
                if n.starts_with(PARKED_PREFIX) {
                    names.push(n.clone());
                }
            }
        }
    }
    Ok(names)
}

/// Adds `addr` (address with prefix) to a link; EEXIST is fine. `nodad` skips IPv6 DAD.
pub async fn add_addr(
    h: &Handle,
    index: u32,
    addr: IpNetwork,
    nodad: bool,
) -> Result<(), CniError> {
    let mut req = h.address().add(index, addr.ip(), addr.prefix());
    if nodad && addr.is_ipv6() {
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(e) => Err(NlError::kernel(format!("failed to add IP addr {addr}"))(e).into()),
    }
}

/// Puts the gateway address `gw` on the bridge. A different v4 address (or an overlapping
/// v6 one) is replaced only with `force`, else it is the reference's error.
pub async fn ensure_bridge_addr(
    h: &Handle,
    index: u32,
    bridge: &str,
    gw: IpNetwork,
    force: bool,
) -> Result<(), CniError> {
    for (have, msg) in addrs_of(h, index).await? {
        if have.ip() == gw.ip() && have.prefix() == gw.prefix() {
            return Ok(());
        }
        let clash = if gw.is_ipv4() {
            have.is_ipv4()
        } else {
            have.is_ipv6()
                && (have.contains(gw.ip()) || gw.contains(have.ip()))
                && !have.ip().is_unicast_link_local_v6()
        };
        if clash {
            if !force {
                return Err(CniError::internal(format!(
                    "failed to set bridge addr: {bridge:?} already has an IP address different from {gw}"
                )));
            }
            h.address()
                .del(msg)
                .execute()
                .await
                .map_err(NlError::kernel("remove old bridge address"))?;
        }
    }
    add_addr(h, index, gw, true).await
}

trait LinkLocal {
    fn is_unicast_link_local_v6(&self) -> bool;
}
impl LinkLocal for IpAddr {
    fn is_unicast_link_local_v6(&self) -> bool {
        matches!(self, IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80)
    }
}

fn route_addr(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// The route message for `r` via `gw` (or on-link when `None`) out of `oif`.
pub fn route_message(r: &Route, gw: Option<IpAddr>, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    let table = r.table.unwrap_or(254);
    m.header = RouteHeader {
        address_family: if r.dst.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        },
        destination_prefix_length: r.dst.prefix(),
        table: if table < 256 { table as u8 } else { 252 },
        protocol: RouteProtocol::Boot,
        scope: match (r.scope, gw) {
            (Some(s), _) => RouteScope::from(s),
            (None, None) => RouteScope::Link,
            (None, Some(_)) => RouteScope::Universe,
        },
        kind: RouteType::Unicast,
        ..RouteHeader::default()
    };
    m.attributes
        .push(RouteAttribute::Destination(route_addr(r.dst.network())));
    if let Some(g) = gw {
        m.attributes.push(RouteAttribute::Gateway(route_addr(g)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    if table >= 256 {
        m.attributes.push(RouteAttribute::Table(table));
    }
    if let Some(p) = r.priority {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    let mut metrics = Vec::new();
    if let Some(v) = r.mtu {
        metrics.push(RouteMetric::Mtu(v));
    }
    if let Some(v) = r.advmss {
        metrics.push(RouteMetric::Advmss(v));
    }
    if !metrics.is_empty() {
        m.attributes.push(RouteAttribute::Metrics(metrics));
    }
    m
}

pub async fn add_route(
    h: &Handle,
    r: &Route,
    gw: Option<IpAddr>,
    oif: u32,
) -> Result<(), CniError> {
    match h.route().add(route_message(r, gw, oif)).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(e) => Err(NlError::kernel(format!("failed to add route {}", r.dst))(e).into()),
    }
}

/// Routes of one family in the main table (and others), as (dst, gateway, oif).
pub async fn routes(
    h: &Handle,
    v4: bool,
) -> Result<Vec<(IpNetwork, Option<IpAddr>, Option<u32>)>, CniError> {
    let mut tmpl = RouteMessage::default();
    tmpl.header.address_family = if v4 {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let mut s = h.route().get(tmpl).execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await.map_err(NlError::kernel("list routes"))? {
        let mut dst = None;
        let mut gw = None;
        let mut oif = None;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(x)) => dst = Some(IpAddr::V4(*x)),
                RouteAttribute::Destination(RouteAddress::Inet6(x)) => dst = Some(IpAddr::V6(*x)),
                RouteAttribute::Gateway(RouteAddress::Inet(x)) => gw = Some(IpAddr::V4(*x)),
                RouteAttribute::Gateway(RouteAddress::Inet6(x)) => gw = Some(IpAddr::V6(*x)),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let dst = dst.unwrap_or(if v4 {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        });
        if let Ok(n) = IpNetwork::new(dst, m.header.destination_prefix_length) {
            out.push((n, gw, oif));
        }
    }
    Ok(out)
}

/// Waits until the host port is operationally up and forwarding on the bridge
/// (the reference sleeps up to 2.5 s in coarse steps; this polls with a short backoff).
pub async fn wait_port_forwarding(h: &Handle, name: &str) -> Result<LinkMessage, CniError> {
    let mut delay = Duration::from_micros(250);
    let mut waited = Duration::ZERO;
    loop {
        let link = link_get(h, name)
            .await?
            .ok_or_else(|| CniError::internal(format!("host veth {name:?} vanished")))?;
        if oper_up(&link) && port_forwarding(&link) {
            return Ok(link);
        }
        if waited > Duration::from_secs(3) {
            return Err(CniError::internal(format!(
                "bridge port in error state: {name}"
            )));
        }
        tokio::time::sleep(delay).await;
        waited += delay;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}
