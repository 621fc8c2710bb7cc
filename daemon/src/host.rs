//! What the daemon reads and sets on the node itself besides the data path: its addresses (for
//! the lease guard) and IPv4 forwarding. A trait so the daemon's event handling runs in unit
//! tests without root.

use std::future::Future;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::error::{Error, Result};
use twill_common::netlink::Netlink;

pub trait Host: Send {
    /// Every IPv4 address of the node with its prefix length and link index.
    fn addresses(&self) -> impl Future<Output = Result<Vec<(u32, Ipv4Addr, u8)>>> + Send;
    /// Makes sure IPv4 forwarding is on; true when it was off and had to be set.
    fn ensure_ip_forward(&self) -> Result<bool>;
}

/// The real node: netlink for addresses, /proc/sys for forwarding.
pub struct NodeHost {
    pub nl: Netlink,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl Host for NodeHost {
    async fn addresses(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
        Ok(self.nl.v4_addresses().await?)
    }

    fn ensure_ip_forward(&self) -> Result<bool> {
        let on = std::fs::read_to_string(IP_FORWARD)
            .map_err(Error::io(format!("read {IP_FORWARD}")))?
            .trim()
            == "1";
        if on {
            return Ok(false);
        }
        std::fs::write(IP_FORWARD, "1").map_err(Error::io(format!("write {IP_FORWARD}")))?;
        Ok(true)
    }
}

/// The lease guard's host prefixes: each address of the node as /32 and its connected prefix,
/// plus the etcd endpoints' addresses — except addresses inside this node's own subnet (cni0's
/// gateway, the VTEP's /32), which are twill's own. An address inside the pod network but
/// outside the own subnet (another interface, cni0 still holding a previous subnet) is
/// protected like the underlay.
pub fn host_prefixes(
    addrs: &[(u32, Ipv4Addr, u8)],
    own_subnet: Option<Ipv4Network>,
    etcd: &[Ipv4Addr],
) -> Vec<Ipv4Network> {
    let mut out = Vec::new();
    for (_, ip, len) in addrs {
        if own_subnet.is_some_and(|o| o.contains(*ip)) {
            continue;
        }
        if let Ok(n) = Ipv4Network::new(*ip, *len) {
            if let Ok(p) = Ipv4Network::new(n.network(), *len) {
                out.push(p);
            }
        }
        if let Ok(n) = Ipv4Network::new(*ip, 32) {
            out.push(n);
        }
    }
    for ip in etcd {
        if let Ok(n) = Ipv4Network::new(*ip, 32) {
            out.push(n);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The IPv4 addresses of etcd endpoint URLs (`https://10.0.0.5:2379`); host names are resolved.
pub fn etcd_addresses(endpoints: &[String]) -> Vec<Ipv4Addr> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for e in endpoints {
        let rest = e.split_once("://").map_or(e.as_str(), |(_, r)| r);
        let hostport = rest.split('/').next().unwrap_or(rest);
        let with_port = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:2379")
        };
        if let Ok(it) = with_port.to_socket_addrs() {
            for a in it {
                if let std::net::IpAddr::V4(v4) = a.ip() {
                    out.push(v4);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A `Network` that overlaps the node's underlay or etcd would route the node's own traffic
/// into the overlay (flannel starts anyway and cuts nodes off): refused, naming both.
pub fn check_network(
    network: Ipv4Network,
    underlay: &[(Ipv4Addr, u8)],
    etcd: &[Ipv4Addr],
) -> Result<()> {
    for (ip, len) in underlay {
        let Ok(p) = Ipv4Network::new(*ip, *len) else {
            continue;
        };
        let p = Ipv4Network::new(p.network(), *len).unwrap_or(p);
        if crate::guard::overlaps(p, network) {
            return Err(Error::Config(format!(
                "the Network {network} overlaps this node's address {ip}/{len} ({p}); pick a pod network outside the node network"
            )));
        }
    }
    for ip in etcd {
        if network.contains(*ip) {
            return Err(Error::Config(format!(
                "the Network {network} contains the etcd endpoint {ip}; pick a pod network outside the node network"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_prefixes_skip_only_the_own_subnet() {
        let addrs = [
            (2, Ipv4Addr::new(192, 168, 100, 1), 24),
            (5, Ipv4Addr::new(10, 5, 3, 1), 24),
            (6, Ipv4Addr::new(10, 5, 3, 0), 32),
            (1, Ipv4Addr::new(127, 0, 0, 1), 8),
            (7, Ipv4Addr::new(10, 5, 250, 1), 24),
        ];
        let p = host_prefixes(
            &addrs,
            Some("10.5.3.0/24".parse().unwrap()),
            &[Ipv4Addr::new(192, 168, 100, 254)],
        );
        let s: Vec<String> = p.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            s,
            [
                "10.5.250.0/24",
                "10.5.250.1/32",
                "127.0.0.0/8",
                "127.0.0.1/32",
                "192.168.100.0/24",
                "192.168.100.1/32",
                "192.168.100.254/32"
            ]
        );
    }

    #[test]
    fn a_network_overlapping_the_node_is_refused_naming_both() {
        let ul = [(Ipv4Addr::new(192, 168, 100, 1), 24)];
        let e = check_network("192.168.0.0/16".parse().unwrap(), &ul, &[]).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("192.168.0.0/16") && m.contains("192.168.100.1/24"),
            "{m}"
        );
        let etcd = [Ipv4Addr::new(10, 5, 0, 9)];
        assert!(check_network("10.5.0.0/16".parse().unwrap(), &ul, &etcd).is_err());
        assert!(check_network(
            "10.5.0.0/16".parse().unwrap(),
            &ul,
            &[Ipv4Addr::new(192, 168, 100, 254)]
        )
        .is_ok());
    }

    #[test]
    fn etcd_endpoint_addresses() {
        let eps = [
            "https://10.0.0.5:2379".to_string(),
            "http://127.0.0.1:4001".to_string(),
            "192.168.1.2".to_string(),
        ];
        assert_eq!(
            etcd_addresses(&eps),
            [
                Ipv4Addr::new(10, 0, 0, 5),
                Ipv4Addr::new(127, 0, 0, 1),
                Ipv4Addr::new(192, 168, 1, 2)
            ]
        );
    }
}
