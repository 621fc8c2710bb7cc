//! Choosing this node's subnet from a listing of the leases (flannel's `tryAcquireLease`).
//!
//! Order: a lease or reservation whose PublicIP is ours (if the config still accepts it), then
//! the subnet from the previous subnet.env if free, then a random one among the first 100 free.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::config::NetworkConfig;
use crate::error::{Error, Result};
use crate::lease::Lease;

/// What to do to get a subnet.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// A key already holding our PublicIP: rewrite its value (and bind a fresh etcd lease unless
    /// it is a reservation).
    Reuse(Lease),
    /// Create the key for this subnet (only if absent).
    Create(Ipv4Network),
}

/// The chosen plan and our own stale leases (our PublicIP, not reservations, not chosen or no
/// longer accepted by the config) that should be deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub plan: Plan,
    pub stale: Vec<Lease>,
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Decides which subnet to take. `lost` holds subnets whose creation lost a race this round.
pub fn decide(
    cfg: &NetworkConfig,
    leases: &[Lease],
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Network>,
    lost: &HashSet<Ipv4Network>,
) -> Result<Decision> {
    let mut own: Vec<&Lease> = leases
        .iter()
        .filter(|l| l.attrs.public_ip == public_ip)
        .collect();
    // Reservations first, then the previous subnet, so a restart keeps what it had.
    own.sort_by_key(|l| (l.etcd_lease != 0, Some(l.subnet) != previous));
    let chosen = own
        .iter()
        .find(|l| cfg.accepts(l.subnet))
        .map(|l| (*l).clone());
    let stale: Vec<Lease> = own
        .iter()
        .filter(|l| l.etcd_lease != 0 && Some(l.subnet) != chosen.as_ref().map(|c| c.subnet))
        .map(|l| (*l).clone())
        .collect();
    if let Some(l) = chosen {
        return Ok(Decision {
            plan: Plan::Reuse(l),
            stale,
        });
    }
    // Our stale leases are about to go, so their subnets count as free. Keys the lease guard
    // rejects as outside the network (`0.0.0.0-0`, a key for the whole network) take nothing:
    // no node routes them, and counting them would leave every new node out of subnets.
    let taken: Vec<Ipv4Network> = leases
        .iter()
        .filter(|l| !stale.iter().any(|s| s.subnet == l.subnet))
        .filter(|l| {
            cfg.network.contains(l.subnet.network()) && l.subnet.prefix() > cfg.network.prefix()
        })
        .map(|l| l.subnet)
        .collect();
    let exact: HashSet<Ipv4Network> = taken.iter().copied().collect();
    let odd: Vec<Ipv4Network> = taken
        .iter()
        .copied()
        .filter(|t| t.prefix() != cfg.subnet_len)
        .collect();
    let is_free = |n: Ipv4Network| {
        !exact.contains(&n) && !lost.contains(&n) && !odd.iter().any(|t| overlaps(*t, n))
    };
    if let Some(prev) = previous.filter(|p| cfg.accepts(*p)) {
        if is_free(prev) {
            return Ok(Decision {
                plan: Plan::Create(prev),
                stale,
            });
        }
    }
    let step = 1u64 << (32 - cfg.subnet_len);
    let mut ip = u32::from(cfg.subnet_min) as u64;
    let max = u32::from(cfg.subnet_max) as u64;
    let mut free = Vec::new();
    while ip <= max && free.len() < 100 {
        if let Ok(n) = Ipv4Network::new(Ipv4Addr::from(ip as u32), cfg.subnet_len) {
            if is_free(n) {
                free.push(n);
            }
        }
        ip += step;
    }
    if free.is_empty() {
        return Err(Error::OutOfSubnets);
    }
    let pick = free[rand::random_range(0..free.len())];
    Ok(Decision {
        plan: Plan::Create(pick),
        stale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{LeaseAttrs, Mac};

    fn lease(subnet: &str, ip: [u8; 4], etcd_lease: i64) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(Ipv4Addr::from(ip), 1, Mac([2, 0, 0, 0, 0, 1])),
            etcd_lease,
            mod_revision: 1,
            create_revision: 1,
        }
    }

    fn cfg(s: &str) -> NetworkConfig {
        NetworkConfig::parse(s).unwrap()
    }

    #[test]
    fn reuse_by_public_ip_and_reservation_first() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let me = Ipv4Addr::new(192, 168, 100, 1);
        let ls = vec![
            lease("10.5.3.0/24", [192, 168, 100, 1], 7),
            lease("10.5.4.0/24", [192, 168, 100, 2], 8),
        ];
        let d = decide(&c, &ls, me, None, &HashSet::new()).unwrap();
        assert_eq!(d.plan, Plan::Reuse(ls[0].clone()));
        assert!(d.stale.is_empty());

        let mut ls2 = ls.clone();
        ls2.push(lease("10.5.9.0/24", [192, 168, 100, 1], 0));
        let d = decide(&c, &ls2, me, None, &HashSet::new()).unwrap();
        assert_eq!(d.plan, Plan::Reuse(ls2[2].clone()), "a reservation wins");
        assert_eq!(d.stale, vec![ls2[0].clone()]);
    }

    #[test]
    fn incompatible_own_lease_is_replaced() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetLen":25}"#);
        let me = Ipv4Addr::new(192, 168, 100, 1);
        let ls = vec![lease("10.5.3.0/24", [192, 168, 100, 1], 7)];
        let d = decide(&c, &ls, me, None, &HashSet::new()).unwrap();
        assert_eq!(d.stale, ls);
        let Plan::Create(n) = d.plan else { panic!() };
        assert_eq!(n.prefix(), 25);
    }

    #[test]
    fn previous_subnet_then_random_free() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let me = Ipv4Addr::new(192, 168, 100, 9);
        let ls = vec![lease("10.5.3.0/24", [192, 168, 100, 1], 7)];
        let prev: Ipv4Network = "10.5.77.0/24".parse().unwrap();
        let d = decide(&c, &ls, me, Some(prev), &HashSet::new()).unwrap();
        assert_eq!(d.plan, Plan::Create(prev));
        let taken_prev: Ipv4Network = "10.5.3.0/24".parse().unwrap();
        for _ in 0..50 {
            let d = decide(&c, &ls, me, Some(taken_prev), &HashSet::new()).unwrap();
            let Plan::Create(n) = d.plan else { panic!() };
            assert_ne!(n, taken_prev);
            assert!(c.accepts(n));
            assert!(
                u32::from(n.network()) < u32::from(Ipv4Addr::new(10, 5, 102, 0)),
                "first 100 free"
            );
        }
    }

    #[test]
    fn out_of_subnets_and_lost_races() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0"}"#);
        let me = Ipv4Addr::new(192, 168, 100, 9);
        let ls = vec![lease("10.5.1.0/24", [192, 168, 100, 1], 7)];
        let lost: HashSet<_> = ["10.5.2.0/24".parse().unwrap()].into();
        assert!(matches!(
            decide(&c, &ls, me, None, &lost),
            Err(Error::OutOfSubnets)
        ));
        let d = decide(&c, &ls, me, None, &HashSet::new()).unwrap();
        assert_eq!(d.plan, Plan::Create("10.5.2.0/24".parse().unwrap()));
        // A reservation of another node blocks its subnet too, also with another length.
        let ls = vec![
            lease("10.5.0.0/23", [192, 168, 100, 1], 0),
            lease("10.5.2.0/24", [192, 168, 100, 2], 3),
        ];
        assert!(matches!(
            decide(&c, &ls, me, None, &HashSet::new()),
            Err(Error::OutOfSubnets)
        ));
    }

    #[test]
    fn keys_outside_the_network_take_no_subnet() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0"}"#);
        let me = Ipv4Addr::new(192, 168, 100, 9);
        let ls = vec![
            lease("0.0.0.0/0", [192, 168, 100, 66], 7),
            lease("10.5.0.0/16", [192, 168, 100, 67], 7),
            lease("10.0.0.0/8", [192, 168, 100, 68], 7),
            lease("10.5.1.0/24", [192, 168, 100, 1], 7),
        ];
        let d = decide(&c, &ls, me, None, &HashSet::new()).unwrap();
        assert_eq!(d.plan, Plan::Create("10.5.2.0/24".parse().unwrap()));
        // A foreign half of a subnet inside the network still blocks it.
        let ls = vec![
            lease("10.5.1.128/25", [192, 168, 100, 1], 7),
            lease("10.5.2.0/24", [192, 168, 100, 2], 7),
        ];
        assert!(matches!(
            decide(&c, &ls, me, None, &HashSet::new()),
            Err(Error::OutOfSubnets)
        ));
    }
}
