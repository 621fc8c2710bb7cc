//! Picking the underlay interface and the public IP (flanneld's `--iface` / `--public-ip`).

use std::net::{IpAddr, Ipv4Addr};

use crate::error::{Error, Result};
use twill_common::netlink::Netlink;

/// The underlay interface twilld sends encapsulated or routed traffic through.
#[derive(Debug, Clone)]
pub struct Underlay {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// The address advertised to peers (PublicIP); differs from `iface_ip` behind NAT.
    pub public_ip: Ipv4Addr,
    /// The interface's own address: the VTEP's local (source) address.
    pub iface_ip: Ipv4Addr,
    /// IPv4 addresses with prefix lengths on the interface (for the same-L2 check).
    pub addrs: Vec<(Ipv4Addr, u8)>,
}

/// `iface`: a name or one of the interface's IPs; None means the default-route interface.
/// `public_ip`: overrides the advertised address (default: the interface's first IPv4).
pub async fn detect(
    nl: &Netlink,
    iface: Option<&str>,
    public_ip: Option<IpAddr>,
) -> Result<Underlay> {
    let addrs = nl.v4_addresses().await?;
    let (index, by_ip) = match iface {
        Some(s) => match s.parse::<Ipv4Addr>() {
            Ok(ip) => {
                let idx = addrs
                    .iter()
                    .find(|(_, a, _)| *a == ip)
                    .map(|(i, _, _)| *i)
                    .ok_or_else(|| Error::Iface(format!("no interface has the address {ip}")))?;
                (idx, Some(ip))
            }
            Err(_) => {
                let link = nl
                    .link(s)
                    .await?
                    .ok_or_else(|| Error::Iface(format!("interface {s:?} not found")))?;
                (link.index, None)
            }
        },
        None => (
            nl.default_route_oif()
                .await?
                .ok_or_else(|| Error::Iface("no default route; pass --iface".into()))?,
            None,
        ),
    };
    let link = nl
        .link(index)
        .await?
        .ok_or_else(|| Error::Iface(format!("interface #{index} vanished")))?;
    let own: Vec<(Ipv4Addr, u8)> = addrs
        .iter()
        .filter(|(i, _, _)| *i == index)
        .map(|(_, a, l)| (*a, *l))
        .collect();
    let iface_ip = by_ip
        .or_else(|| own.first().map(|(a, _)| *a))
        .ok_or_else(|| Error::Iface(format!("{} has no IPv4 address", link.name)))?;
    let public_ip = match public_ip {
        Some(IpAddr::V4(ip)) => ip,
        Some(IpAddr::V6(ip)) => {
            return Err(Error::Iface(format!(
                "--public-ip {ip}: IPv6 is not supported"
            )))
        }
        None => iface_ip,
    };
    Ok(Underlay {
        index,
        name: link.name,
        mtu: link.mtu,
        public_ip,
        iface_ip,
        addrs: own,
    })
}
