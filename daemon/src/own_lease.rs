//! This node's own lease as others see it: is the key still ours, rewritten by someone else,
//! taken over, or gone — and must we give up our VtepMAC because an older lease uses it.
//! Pure decisions; the daemon acts on them.

use crate::lease::{Lease, LeaseAttrs};

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The key holds what we wrote.
    Ours,
    /// Our key (same etcd lease or our PublicIP) holds another value: write ours back.
    Rewritten,
    /// Another node's key now (another etcd lease and another PublicIP): lease again.
    Taken,
    /// The key is gone: lease again.
    Gone,
}

/// Judges the stored value of our key against the lease we hold and the attributes we advertise.
pub fn judge(held: &Lease, stored: Option<&Lease>, ours: &LeaseAttrs) -> Verdict {
    let Some(s) = stored else {
        return Verdict::Gone;
    };
    let same_binding = s.etcd_lease == held.etcd_lease;
    if !same_binding && s.attrs.public_ip != ours.public_ip {
        return Verdict::Taken;
    }
    if s.attrs == *ours {
        Verdict::Ours
    } else {
        Verdict::Rewritten
    }
}

/// When another lease advertises our VtepMAC, the younger key (higher etcd create revision)
/// changes its MAC, so exactly one of two cloned nodes moves. True when that is us.
pub fn must_renew_mac<'a>(own: &Lease, others: impl IntoIterator<Item = &'a Lease>) -> bool {
    let Some((mac, _)) = own.attrs.vtep() else {
        return false;
    };
    others.into_iter().any(|o| {
        o.subnet != own.subnet
            && o.attrs.vtep().is_some_and(|(m, _)| m == mac)
            && (o.create_revision, o.subnet) < (own.create_revision, own.subnet)
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::lease::Mac;

    fn lease(subnet: &str, ip: u8, mac: u8, etcd_lease: i64, rev: i64) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(
                Ipv4Addr::new(192, 168, 100, ip),
                1,
                Mac([2, 0, 0, 0, 0, mac]),
            ),
            etcd_lease,
            mod_revision: rev,
            create_revision: rev,
        }
    }

    #[test]
    fn verdicts() {
        let held = lease("10.5.3.0/24", 1, 1, 7, 10);
        let ours = held.attrs.clone();
        assert_eq!(judge(&held, Some(&held), &ours), Verdict::Ours);
        assert_eq!(judge(&held, None, &ours), Verdict::Gone);
        // Same key and etcd lease, another VtepMAC or BackendType: a foreign rewrite.
        let mac = lease("10.5.3.0/24", 1, 9, 7, 11);
        assert_eq!(judge(&held, Some(&mac), &ours), Verdict::Rewritten);
        let mut typ = held.clone();
        typ.attrs.backend_type = crate::backend_type::BackendType::HostGw;
        assert_eq!(judge(&held, Some(&typ), &ours), Verdict::Rewritten);
        // Someone rewrote the PublicIP but kept our etcd lease: still ours.
        let ip = lease("10.5.3.0/24", 66, 1, 7, 12);
        assert_eq!(judge(&held, Some(&ip), &ours), Verdict::Rewritten);
        // `etcdctl put` without --ignore-lease detaches the key, same PublicIP: ours.
        let detached = lease("10.5.3.0/24", 1, 9, 0, 13);
        assert_eq!(judge(&held, Some(&detached), &ours), Verdict::Rewritten);
        // Expired and re-created by another node.
        let other = lease("10.5.3.0/24", 2, 2, 8, 14);
        assert_eq!(judge(&held, Some(&other), &ours), Verdict::Taken);
    }

    #[test]
    fn the_younger_of_two_cloned_macs_moves() {
        let a = lease("10.5.3.0/24", 1, 1, 7, 10);
        let b = lease("10.5.4.0/24", 2, 1, 8, 20);
        assert!(must_renew_mac(&b, [&a]));
        assert!(!must_renew_mac(&a, [&b]));
        let c = lease("10.5.5.0/24", 3, 3, 9, 5);
        assert!(!must_renew_mac(&b, [&c]), "other MACs do not matter");
        assert!(!must_renew_mac(&a, [&a]), "our own key is not a clone");
    }
}
