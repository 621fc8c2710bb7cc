//! The lab's address plan: one /16 underlay that holds tens of thousands of nodes, with etcd's
//! address (and the first 253 nodes' addresses) where small labs always had them.
//!
//! ```text
//! underlay 192.168.0.0/16, bridge br-ul = etcd = 192.168.100.254 (MAC fixed)
//! node 1..=253        192.168.100.<index>
//! node 254..          192.168.101.1 .. 192.168.255.253, then 192.168.0.1 .. 192.168.99.253
//! ```
//! Host numbers .0, .254 and .255 of every /24 are skipped, so no node address is ever a
//! classful network or broadcast address nor etcd's. Every node's MAC derives from its index;
//! the lab installs permanent neighbour entries both ways (node → etcd, etcd → node), because
//! the kernel's neighbour table is shared by all namespaces and its gc_thresh3 (1024 by
//! default) would otherwise overflow around 500 nodes (each node resolves etcd and etcd
//! resolves each node). Permanent entries do not count towards gc_thresh.

use std::net::Ipv4Addr;

/// Prefix length of the underlay.
pub const UNDERLAY_PREFIX: u8 = 16;
/// The underlay network.
pub const UNDERLAY_NET: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 0);
/// MAC of the underlay bridge (set explicitly: a bridge otherwise takes its lowest port's MAC
/// and changes it as ports come and go, which would break the nodes' permanent entries).
pub const BRIDGE_MAC: [u8; 6] = [0x02, 0x74, 0x6c, 0xff, 0xff, 0xfe];
/// Usable host numbers per /24 (.1 to .253).
const PER_OCTET: u32 = 253;
/// Nodes the plan can place (256 /24s of 253 hosts).
pub const MAX_NODES: u32 = 256 * PER_OCTET;
/// Nodes that fit the default pod network (10.244.0.0/16 in /24s, less the first and last).
pub const DEFAULT_NETWORK_NODES: usize = 200;
/// The pod network of small labs.
pub const SMALL_NETWORK: &str = "10.244.0.0/16";
/// The pod network of labs beyond [`DEFAULT_NETWORK_NODES`]: 65,534 /24 subnets, outside the
/// underlay (twilld refuses a Network that overlaps its node's underlay prefix).
pub const LARGE_NETWORK: &str = "10.0.0.0/8";

/// Underlay address of node `index` (1-based); None beyond [`MAX_NODES`].
pub fn node_ip(index: u32) -> Option<Ipv4Addr> {
    if index == 0 || index > MAX_NODES {
        return None;
    }
    let k = index - 1;
    let third = (100 + k / PER_OCTET) % 256;
    let host = 1 + k % PER_OCTET;
    Some(Ipv4Addr::new(192, 168, third as u8, host as u8))
}

/// MAC of node `index`'s underlay interface: locally administered, unique per index.
pub fn node_mac(index: u32) -> [u8; 6] {
    let b = index.to_be_bytes();
    [0x02, 0x74, 0x6c, b[1], b[2], b[3]]
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The pod network a lab of `nodes` nodes needs (room for joins on top).
pub fn default_network(nodes: usize) -> &'static str {
    if nodes <= DEFAULT_NETWORK_NODES {
        SMALL_NETWORK
    } else {
        LARGE_NETWORK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn small_labs_keep_their_addresses() {
        assert_eq!(node_ip(1), Some(Ipv4Addr::new(192, 168, 100, 1)));
        assert_eq!(node_ip(253), Some(Ipv4Addr::new(192, 168, 100, 253)));
        assert_eq!(node_ip(254), Some(Ipv4Addr::new(192, 168, 101, 1)));
        assert_eq!(node_ip(0), None);
        assert_eq!(node_ip(MAX_NODES + 1), None);
    }

    #[test]
    fn every_address_is_unique_usable_and_inside_the_underlay() {
        let etcd = Ipv4Addr::new(192, 168, 100, 254);
        let mut seen = HashSet::new();
        for i in 1..=MAX_NODES {
            let ip = node_ip(i).unwrap();
            let o = ip.octets();
            assert_eq!(&o[..2], &[192, 168], "{ip}");
            assert!(o[3] != 0 && o[3] < 254, "{ip}");
            assert_ne!(ip, etcd);
            assert!(seen.insert(ip), "{ip} twice");
            assert!(seen.len() <= MAX_NODES as usize);
        }
        let macs: HashSet<[u8; 6]> = (1..=MAX_NODES).map(node_mac).collect();
        assert_eq!(macs.len(), MAX_NODES as usize);
        assert!(!macs.contains(&BRIDGE_MAC));
        assert!(macs.iter().all(|m| m[0] & 1 == 0));
    }

    #[test]
    fn large_labs_get_a_pod_network_that_holds_them_and_misses_the_underlay() {
        assert_eq!(default_network(3), SMALL_NETWORK);
        let n: ipnetwork::Ipv4Network = default_network(5000).parse().unwrap();
        assert!(2u32.pow(24 - u32::from(n.prefix())) > 5000);
        assert!(!n.contains(UNDERLAY_NET) && !n.contains(Ipv4Addr::new(192, 168, 255, 255)));
        assert_eq!(mac_str(node_mac(258)), "02:74:6c:00:01:02");
    }
}
