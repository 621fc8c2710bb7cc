//! Address arithmetic over `IpAddr` as integers (v4 in the low 32 bits).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn from_u128(n: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

/// The network address of `net` as an integer, and the last address of it.
pub fn bounds(net: &IpNetwork) -> (u128, u128) {
    let bits: u32 = if net.is_ipv4() { 32 } else { 128 };
    let host_bits = bits - net.prefix() as u32;
    let mask: u128 = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let first = to_u128(net.network());
    (first, first | mask)
}

pub fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// A `/prefix` network holding `ip` (the address kept, host bits included).
pub fn with_prefix(ip: IpAddr, prefix: u8) -> Option<IpNetwork> {
    IpNetwork::new(ip, prefix).ok()
}
