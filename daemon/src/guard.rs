//! The lease guard: which peer leases may reach the kernel.
//!
//! etcd is shared with other writers (flannel nodes, operators, scripts, attackers), and a lease
//! becomes routes, neighbours and FDB entries on every node. flannel programs whatever it reads:
//! one key for the underlay's /24 replaces the connected route, one for etcd's /32 sends the
//! watch itself into the overlay, half of a peer's subnet blackholes its pods. twill screens
//! every lease first; this module is the pure decision, tested without root.
//!
//! Rules, in order (the first that fails names the reason):
//! 1. the subnet lies inside the config's `Network` and is smaller than it;
//! 2. it does not overlap this node's own subnet;
//! 3. it does not overlap an address or connected prefix of this node (underlay, etcd
//!    endpoints) outside the pod network;
//! 4. its PublicIP is a usable unicast address; a vxlan lease has a unicast, non-zero VtepMAC
//!    that is not this node's own and not a MAC an older lease already uses;
//! 5. it does not overlap another accepted lease: the older key (etcd create revision) wins, so
//!    every node decides the same way.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::lease::{Lease, Mac};

/// Why a lease is not programmed. `as_str` is the `/metrics` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    OutsideNetwork,
    OverlapsNodeSubnet,
    OverlapsHost,
    BadPublicIp,
    BadVtepMac,
    DuplicateVtepMac,
    OverlapsLease,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::OutsideNetwork,
        Reason::OverlapsNodeSubnet,
        Reason::OverlapsHost,
        Reason::BadPublicIp,
        Reason::BadVtepMac,
        Reason::DuplicateVtepMac,
        Reason::OverlapsLease,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OutsideNetwork => "outside_network",
            Reason::OverlapsNodeSubnet => "overlaps_node_subnet",
            Reason::OverlapsHost => "overlaps_host",
            Reason::BadPublicIp => "bad_public_ip",
            Reason::BadVtepMac => "bad_vtep_mac",
            Reason::DuplicateVtepMac => "duplicate_vtep_mac",
            Reason::OverlapsLease => "overlaps_lease",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the guard knows about this node.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// The cluster's pod network (`Network`).
    pub network: Option<Ipv4Network>,
    /// This node's own subnet, once leased.
    pub own_subnet: Option<Ipv4Network>,
    /// This node's VtepMAC (vxlan only).
    pub own_mac: Option<Mac>,
    /// Addresses and connected prefixes of this node outside the pod network, plus the etcd
    /// endpoints' addresses as /32.
    pub host_prefixes: Vec<Ipv4Network>,
}

/// The outcome of screening a set of peer leases.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Screened {
    pub accepted: HashMap<Ipv4Network, Lease>,
    pub rejected: Vec<(Lease, Reason)>,
}

impl Screened {
    /// Number of rejected leases per reason (every reason present, zeros included).
    pub fn counts(&self) -> BTreeMap<Reason, u64> {
        let mut m: BTreeMap<Reason, u64> = Reason::ALL.iter().map(|r| (*r, 0)).collect();
        for (_, r) in &self.rejected {
            *m.entry(*r).or_default() += 1;
        }
        m
    }
}

pub fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

fn usable_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.octets()[0] == 0
        || ip.octets()[0] >= 240)
}

/// A MAC the kernel accepts as a neighbour/FDB destination: unicast and not all zero.
pub fn usable_mac(m: Mac) -> bool {
    m.0[0] & 0x01 == 0 && m.0 != [0; 6]
}

/// Checks that need only the lease and the node (rules 1 to 4, except duplicate MACs).
fn check_alone(l: &Lease, node: &NodeView) -> Option<Reason> {
    let s = l.subnet;
    match node.network {
        Some(n) if n.contains(s.network()) && s.prefix() > n.prefix() => {}
        _ => return Some(Reason::OutsideNetwork),
    }
    if node.own_subnet.is_some_and(|o| overlaps(o, s)) {
        return Some(Reason::OverlapsNodeSubnet);
    }
    if node.host_prefixes.iter().any(|h| overlaps(*h, s)) {
        return Some(Reason::OverlapsHost);
    }
    if !usable_unicast(l.attrs.public_ip) {
        return Some(Reason::BadPublicIp);
    }
    if l.attrs.is_vxlan() {
        match l.attrs.vtep() {
            Some((mac, _)) if usable_mac(mac) => {}
            _ => return Some(Reason::BadVtepMac),
        }
    }
    None
}

/// Non-overlapping accepted ranges, keyed by first address (for O(log n) overlap checks).
#[derive(Default)]
struct Ranges(BTreeMap<u32, u32>);

impl Ranges {
    fn bounds(n: Ipv4Network) -> (u32, u32) {
        let first = u32::from(n.network());
        let last = first | (u32::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0));
        (first, last)
    }

    fn overlaps(&self, n: Ipv4Network) -> bool {
        let (first, last) = Ranges::bounds(n);
        // The accepted ranges are disjoint: only the one starting at or before `first` and
        // the first one starting after it can overlap.
        if let Some((_, end)) = self.0.range(..=first).next_back() {
            if *end >= first {
                return true;
            }
        }
        self.0
            .range(first.saturating_add(1)..)
            .next()
            .is_some_and(|(start, _)| *start <= last)
    }

    fn insert(&mut self, n: Ipv4Network) {
        let (first, last) = Ranges::bounds(n);
        self.0.insert(first, last);
    }
}

/// Screens peer leases (this node's own key excluded by the caller). Deterministic: every node
/// with the same view accepts the same set.
pub fn screen<'a>(leases: impl IntoIterator<Item = &'a Lease>, node: &NodeView) -> Screened {
    let mut out = Screened::default();
    let mut candidates: Vec<&Lease> = Vec::new();
    for l in leases {
        match check_alone(l, node) {
            Some(r) => out.rejected.push((l.clone(), r)),
            None => candidates.push(l),
        }
    }
    // Older keys first; ties (same revision cannot happen in etcd, but fakes) by subnet.
    candidates.sort_by_key(|l| {
        (
            l.create_revision,
            u32::from(l.subnet.network()),
            l.subnet.prefix(),
        )
    });
    let mut ranges = Ranges::default();
    let mut macs: HashMap<Mac, Ipv4Network> = HashMap::new();
    for l in candidates {
        if ranges.overlaps(l.subnet) {
            out.rejected.push((l.clone(), Reason::OverlapsLease));
            continue;
        }
        if let Some((mac, _)) = l.attrs.vtep() {
            if node.own_mac == Some(mac) || macs.contains_key(&mac) {
                out.rejected.push((l.clone(), Reason::DuplicateVtepMac));
                continue;
            }
            macs.insert(mac, l.subnet);
        }
        ranges.insert(l.subnet);
        out.accepted.insert(l.subnet, l.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn lease(subnet: &str, ip: [u8; 4], mac: [u8; 6], rev: i64) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(Ipv4Addr::from(ip), 1, Mac(mac)),
            etcd_lease: 1,
            mod_revision: rev,
            create_revision: rev,
        }
    }

    fn node() -> NodeView {
        NodeView {
            network: Some("10.5.0.0/16".parse().unwrap()),
            own_subnet: Some("10.5.3.0/24".parse().unwrap()),
            own_mac: Some(Mac([2, 0, 0, 0, 0, 3])),
            host_prefixes: vec![
                "192.168.100.0/24".parse().unwrap(),
                "192.168.100.254/32".parse().unwrap(),
            ],
        }
    }

    fn reasons(s: &Screened) -> Vec<(String, Reason)> {
        let mut v: Vec<_> = s
            .rejected
            .iter()
            .map(|(l, r)| (l.subnet.to_string(), *r))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn healthy_peers_are_accepted() {
        let a = lease("10.5.7.0/24", [192, 168, 100, 7], [2, 0, 0, 0, 0, 7], 10);
        let b = lease("10.5.8.0/24", [192, 168, 100, 8], [2, 0, 0, 0, 0, 8], 11);
        let s = screen([&a, &b], &node());
        assert_eq!(s.accepted.len(), 2);
        assert!(s.rejected.is_empty());
        assert_eq!(s.counts().values().sum::<u64>(), 0);
    }

    #[test]
    fn leases_that_would_cut_the_node_off_are_rejected() {
        let ip = [192, 168, 100, 9];
        let cases = [
            ("192.168.100.0/24", Reason::OutsideNetwork),
            ("192.168.100.254/32", Reason::OutsideNetwork),
            ("0.0.0.0/0", Reason::OutsideNetwork),
            ("224.0.0.0/24", Reason::OutsideNetwork),
            ("10.5.0.0/16", Reason::OutsideNetwork),
            ("10.5.3.128/25", Reason::OverlapsNodeSubnet),
            ("10.5.0.0/20", Reason::OverlapsNodeSubnet),
        ];
        for (i, (subnet, want)) in cases.iter().enumerate() {
            let l = lease(subnet, ip, [2, 0, 0, 0, 1, i as u8], 5);
            let s = screen([&l], &node());
            assert_eq!(reasons(&s), vec![(l.subnet.to_string(), *want)], "{subnet}");
            assert!(s.accepted.is_empty());
        }
    }

    #[test]
    fn a_network_that_contains_host_prefixes_still_protects_them() {
        let mut n = node();
        n.network = Some("10.0.0.0/8".parse().unwrap());
        n.host_prefixes = vec!["10.200.0.0/24".parse().unwrap()];
        let l = lease("10.200.0.0/25", [10, 200, 0, 9], [2, 0, 0, 0, 0, 9], 5);
        assert_eq!(
            reasons(&screen([&l], &n)),
            vec![("10.200.0.0/25".into(), Reason::OverlapsHost)]
        );
    }

    #[test]
    fn bad_public_ips_and_macs() {
        let n = node();
        let cases = [
            (
                lease("10.5.9.0/24", [0, 0, 0, 0], [2, 0, 0, 0, 0, 9], 5),
                Reason::BadPublicIp,
            ),
            (
                lease("10.5.9.0/24", [224, 0, 0, 1], [2, 0, 0, 0, 0, 9], 5),
                Reason::BadPublicIp,
            ),
            (
                lease("10.5.9.0/24", [127, 0, 0, 1], [2, 0, 0, 0, 0, 9], 5),
                Reason::BadPublicIp,
            ),
            (
                lease("10.5.9.0/24", [255, 255, 255, 255], [2, 0, 0, 0, 0, 9], 5),
                Reason::BadPublicIp,
            ),
            (
                lease(
                    "10.5.9.0/24",
                    [192, 168, 100, 9],
                    [0x01, 0, 0x5e, 0, 0, 1],
                    5,
                ),
                Reason::BadVtepMac,
            ),
            (
                lease("10.5.9.0/24", [192, 168, 100, 9], [0; 6], 5),
                Reason::BadVtepMac,
            ),
            (
                lease("10.5.9.0/24", [192, 168, 100, 9], [2, 0, 0, 0, 0, 3], 5),
                Reason::DuplicateVtepMac,
            ),
        ];
        for (l, want) in cases {
            assert_eq!(
                reasons(&screen([&l], &n)),
                vec![("10.5.9.0/24".into(), want)],
                "{l:?}"
            );
        }
        let mut no_mac = lease("10.5.9.0/24", [192, 168, 100, 9], [2, 0, 0, 0, 0, 9], 5);
        no_mac.attrs.backend_data = serde_json::json!({"VNI": 1});
        assert_eq!(
            reasons(&screen([&no_mac], &n)),
            vec![("10.5.9.0/24".into(), Reason::BadVtepMac)]
        );
        let hostgw = Lease {
            attrs: LeaseAttrs::host_gw(Ipv4Addr::new(10, 99, 0, 1)),
            ..no_mac
        };
        assert!(
            screen([&hostgw], &n).rejected.is_empty(),
            "host-gw leases carry no MAC"
        );
    }

    #[test]
    fn the_older_of_two_overlapping_leases_wins_in_any_order() {
        let peer = lease("10.5.30.0/24", [192, 168, 100, 30], [2, 0, 0, 0, 0, 30], 10);
        let half = lease(
            "10.5.30.128/25",
            [192, 168, 100, 31],
            [2, 0, 0, 0, 0, 31],
            20,
        );
        let wide = lease("10.5.16.0/20", [192, 168, 100, 32], [2, 0, 0, 0, 0, 32], 30);
        for order in [
            [&peer, &half, &wide],
            [&wide, &half, &peer],
            [&half, &wide, &peer],
        ] {
            let s = screen(order, &node());
            assert_eq!(
                s.accepted.keys().copied().collect::<Vec<_>>(),
                vec![peer.subnet]
            );
            assert_eq!(
                reasons(&s),
                vec![
                    ("10.5.16.0/20".into(), Reason::OverlapsLease),
                    ("10.5.30.128/25".into(), Reason::OverlapsLease)
                ]
            );
        }
        // The older half wins over a younger full subnet.
        let old_half = Lease {
            create_revision: 1,
            ..half.clone()
        };
        let s = screen([&peer, &old_half], &node());
        assert!(s.accepted.contains_key(&old_half.subnet));
        assert_eq!(s.counts()[&Reason::OverlapsLease], 1);
    }

    #[test]
    fn adjacent_subnets_do_not_overlap() {
        let a = lease("10.5.30.0/25", [192, 168, 100, 30], [2, 0, 0, 0, 0, 30], 10);
        let b = lease(
            "10.5.30.128/25",
            [192, 168, 100, 31],
            [2, 0, 0, 0, 0, 31],
            11,
        );
        let c = lease("10.5.31.0/24", [192, 168, 100, 32], [2, 0, 0, 0, 0, 32], 12);
        let d = lease(
            "10.5.255.0/24",
            [192, 168, 100, 33],
            [2, 0, 0, 0, 0, 33],
            13,
        );
        assert_eq!(screen([&a, &b, &c, &d], &node()).accepted.len(), 4);
    }

    #[test]
    fn a_duplicate_mac_is_rejected_on_the_younger_lease() {
        let a = lease("10.5.7.0/24", [192, 168, 100, 7], [2, 0, 0, 0, 0, 7], 10);
        let b = lease("10.5.8.0/24", [192, 168, 100, 8], [2, 0, 0, 0, 0, 7], 11);
        let s = screen([&b, &a], &node());
        assert!(s.accepted.contains_key(&a.subnet));
        assert_eq!(
            reasons(&s),
            vec![("10.5.8.0/24".into(), Reason::DuplicateVtepMac)]
        );
    }

    #[test]
    fn thousands_of_leases_screen_quickly_and_all_pass() {
        let leases: Vec<Lease> = (0..5000u32)
            .map(|i| {
                let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + (i << 8));
                let o = i.to_be_bytes();
                Lease {
                    subnet: Ipv4Network::new(net, 24).unwrap(),
                    attrs: LeaseAttrs::vxlan(
                        Ipv4Addr::new(172, 16, o[2], o[3]),
                        1,
                        Mac([2, 1, 0, o[1], o[2], o[3]]),
                    ),
                    etcd_lease: 1,
                    mod_revision: i as i64,
                    create_revision: i as i64,
                }
            })
            .collect();
        let mut n = node();
        n.network = Some("10.0.0.0/8".parse().unwrap());
        let s = screen(&leases, &n);
        assert_eq!(s.accepted.len(), 5000);
    }
}
