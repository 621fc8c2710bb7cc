//! Reconcile as a pure plan: wanted peers + a dump of the kernel → the changes to make.
//!
//! The effects (dumping, then executing the changes over netlink) stay in `routed.rs`; every
//! decision about what is stale, what is missing and what is not ours to touch is here, so it is
//! unit-tested without root.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::lease::Mac;

/// What one peer needs in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Neighbour gw → mac and FDB mac → public on the VTEP, route `subnet via gw onlink`.
    Vxlan {
        gw: Ipv4Addr,
        mac: Mac,
        public: Ipv4Addr,
    },
    /// Route `subnet via gw` on the underlay (host-gw, DirectRouting).
    Direct { gw: Ipv4Addr },
}

/// A main-table route as the plan needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct KRoute {
    pub dst: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// On the VTEP, or on the underlay with twill's protocol number.
    pub ours: bool,
}

/// A neighbour (ip, mac) or FDB entry (mac, dst) on the VTEP.
#[derive(Debug, Clone, PartialEq)]
pub struct KNeigh {
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Kernel {
    pub routes: Vec<KRoute>,
    pub neighbours: Vec<KNeigh>,
    /// FDB entries: `ip` is the remote (dst).
    pub fdb: Vec<KNeigh>,
}

/// What a peer still needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    pub subnet: Ipv4Network,
    pub path: Path,
    pub neigh: bool,
    pub fdb: bool,
    pub route: bool,
}

/// The changes, as indices into the dump for deletions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Changes {
    pub del_routes: Vec<usize>,
    pub del_neighbours: Vec<usize>,
    pub del_fdb: Vec<usize>,
    pub add: Vec<Missing>,
    /// Peers left out because a route twill does not own holds their destination.
    pub blocked: Vec<(Ipv4Network, String)>,
}

impl Changes {
    pub fn deletions(&self) -> usize {
        self.del_routes.len() + self.del_neighbours.len() + self.del_fdb.len()
    }
}

/// Devices of this node: the VTEP (0 when host-gw) and the underlay.
#[derive(Debug, Clone, Copy)]
pub struct Devs {
    pub vtep: u32,
    pub underlay: u32,
}

fn route_matches(r: &KRoute, p: Path, d: Devs) -> bool {
    let (gw, oif, onlink) = match p {
        Path::Vxlan { gw, .. } => (gw, d.vtep, true),
        Path::Direct { gw } => (gw, d.underlay, false),
    };
    r.gateway == Some(gw) && r.oif == Some(oif) && r.onlink == onlink
}

/// Plans the changes that make the kernel hold exactly `want` among the entries twill owns.
/// Routes twill does not own are never deleted or replaced: a wanted peer whose destination
/// holds a foreign route is reported as blocked.
pub fn plan(want: &HashMap<Ipv4Network, Path>, k: &Kernel, d: Devs) -> Changes {
    let mut c = Changes::default();
    let foreign: HashSet<Ipv4Network> =
        k.routes.iter().filter(|r| !r.ours).map(|r| r.dst).collect();
    let mut route_ok: HashSet<Ipv4Network> = HashSet::new();
    for (i, r) in k.routes.iter().enumerate() {
        if !r.ours {
            continue;
        }
        match want.get(&r.dst) {
            Some(p) if route_matches(r, *p, d) && !route_ok.contains(&r.dst) => {
                route_ok.insert(r.dst);
            }
            // A wrong route of ours to a wanted dst is fixed by the replace; a duplicate of
            // ours is left to that replace too.
            Some(_) => {}
            None => c.del_routes.push(i),
        }
    }

    let want_neigh: HashMap<Ipv4Addr, Mac> = want
        .values()
        .filter_map(|p| match p {
            Path::Vxlan { gw, mac, .. } => Some((*gw, *mac)),
            Path::Direct { .. } => None,
        })
        .collect();
    let want_fdb: HashSet<(Mac, Ipv4Addr)> = want
        .values()
        .filter_map(|p| match p {
            Path::Vxlan { mac, public, .. } => Some((*mac, *public)),
            Path::Direct { .. } => None,
        })
        .collect();
    let mut neigh_ok = HashSet::new();
    for (i, n) in k.neighbours.iter().enumerate() {
        match (n.ip, n.mac) {
            (Some(ip), Some(mac)) if want_neigh.get(&ip) == Some(&mac) && n.permanent => {
                neigh_ok.insert(ip);
            }
            (Some(ip), _) if want_neigh.contains_key(&ip) => {} // replaced below
            _ => c.del_neighbours.push(i),
        }
    }
    let mut fdb_ok = HashSet::new();
    for (i, f) in k.fdb.iter().enumerate() {
        match (f.mac, f.ip) {
            (Some(mac), Some(ip)) if want_fdb.contains(&(mac, ip)) => {
                fdb_ok.insert((mac, ip));
            }
            // FDB entries are keyed by MAC: an old MAC's entry would stay forever.
            (Some(_), Some(_)) => c.del_fdb.push(i),
            _ => {}
        }
    }

    let mut subnets: Vec<&Ipv4Network> = want.keys().collect();
    subnets.sort();
    for subnet in subnets {
        let path = want[subnet];
        if foreign.contains(subnet) && !route_ok.contains(subnet) {
            c.blocked.push((
                *subnet,
                "a route to it exists that twilld does not own; left in place".into(),
            ));
            continue;
        }
        let (neigh, fdb) = match path {
            Path::Vxlan { gw, mac, public } => {
                (!neigh_ok.contains(&gw), !fdb_ok.contains(&(mac, public)))
            }
            Path::Direct { .. } => (false, false),
        };
        let route = !route_ok.contains(subnet);
        if neigh || fdb || route {
            c.add.push(Missing {
                subnet: *subnet,
                path,
                neigh,
                fdb,
                route,
            });
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Devs = Devs {
        vtep: 10,
        underlay: 2,
    };

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn vx(subnet: &str, mac: u8, public: u8) -> (Ipv4Network, Path) {
        let n = net(subnet);
        (
            n,
            Path::Vxlan {
                gw: n.network(),
                mac: Mac([2, 0, 0, 0, 0, mac]),
                public: Ipv4Addr::new(192, 168, 100, public),
            },
        )
    }

    fn programmed(want: &HashMap<Ipv4Network, Path>) -> Kernel {
        let mut k = Kernel::default();
        for (dst, p) in want {
            if let Path::Vxlan { gw, mac, public } = p {
                k.routes.push(KRoute {
                    dst: *dst,
                    gateway: Some(*gw),
                    oif: Some(D.vtep),
                    onlink: true,
                    ours: true,
                });
                k.neighbours.push(KNeigh {
                    ip: Some(*gw),
                    mac: Some(*mac),
                    permanent: true,
                });
                k.fdb.push(KNeigh {
                    ip: Some(*public),
                    mac: Some(*mac),
                    permanent: true,
                });
            }
        }
        k
    }

    #[test]
    fn an_empty_kernel_gets_everything_in_order() {
        let want: HashMap<_, _> = [vx("10.5.7.0/24", 7, 7), vx("10.5.8.0/24", 8, 8)].into();
        let c = plan(&want, &Kernel::default(), D);
        assert_eq!(c.add.len(), 2);
        assert!(c.add.iter().all(|m| m.neigh && m.fdb && m.route));
        assert_eq!(c.deletions(), 0);
    }

    #[test]
    fn an_in_sync_kernel_needs_nothing() {
        let want: HashMap<_, _> = [vx("10.5.7.0/24", 7, 7), vx("10.5.8.0/24", 8, 8)].into();
        let c = plan(&want, &programmed(&want), D);
        assert_eq!(c, Changes::default());
    }

    #[test]
    fn a_stale_route_of_ours_is_deleted_and_a_missing_one_added() {
        let want: HashMap<_, _> = [vx("10.5.7.0/24", 7, 7)].into();
        let mut k = programmed(&want);
        k.routes.push(KRoute {
            dst: net("10.5.99.0/24"),
            gateway: Some(Ipv4Addr::new(10, 5, 99, 0)),
            oif: Some(D.vtep),
            onlink: true,
            ours: true,
        });
        k.routes.retain(|r| r.dst != net("10.5.7.0/24"));
        let c = plan(&want, &k, D);
        assert_eq!(c.del_routes.len(), 1);
        assert_eq!(k.routes[c.del_routes[0]].dst, net("10.5.99.0/24"));
        assert_eq!(c.add.len(), 1);
        assert!(c.add[0].route && !c.add[0].neigh && !c.add[0].fdb);
    }

    #[test]
    fn a_changed_mac_replaces_the_neighbour_and_drops_the_old_fdb_entry() {
        let old: HashMap<_, _> = [vx("10.5.7.0/24", 7, 7)].into();
        let k = programmed(&old);
        let new: HashMap<_, _> = [vx("10.5.7.0/24", 77, 7)].into();
        let c = plan(&new, &k, D);
        assert_eq!(c.del_fdb, vec![0], "the old MAC's FDB entry goes");
        assert!(
            c.del_neighbours.is_empty(),
            "the neighbour is replaced in place"
        );
        assert_eq!(c.add.len(), 1);
        assert!(c.add[0].neigh && c.add[0].fdb && !c.add[0].route);
    }

    #[test]
    fn foreign_routes_are_never_touched() {
        let want: HashMap<_, _> = [vx("10.5.7.0/24", 7, 7)].into();
        let mut k = Kernel::default();
        // An operator's static route to the same prefix, and the underlay's connected route.
        k.routes.push(KRoute {
            dst: net("10.5.7.0/24"),
            gateway: Some(Ipv4Addr::new(192, 168, 100, 50)),
            oif: Some(D.underlay),
            onlink: false,
            ours: false,
        });
        k.routes.push(KRoute {
            dst: net("192.168.100.0/24"),
            gateway: None,
            oif: Some(D.underlay),
            onlink: false,
            ours: false,
        });
        let c = plan(&want, &k, D);
        assert!(c.del_routes.is_empty());
        assert!(c.add.is_empty());
        assert_eq!(c.blocked.len(), 1);
        assert_eq!(c.blocked[0].0, net("10.5.7.0/24"));
    }

    #[test]
    fn host_gw_routes_live_on_the_underlay() {
        let n = net("10.5.9.0/24");
        let want: HashMap<_, _> = [(
            n,
            Path::Direct {
                gw: Ipv4Addr::new(192, 168, 100, 9),
            },
        )]
        .into();
        let mut k = Kernel::default();
        // A vxlan-era route of ours to the same dst must be replaced, not kept.
        k.routes.push(KRoute {
            dst: n,
            gateway: Some(n.network()),
            oif: Some(D.vtep),
            onlink: true,
            ours: true,
        });
        let c = plan(&want, &k, D);
        assert!(c.del_routes.is_empty());
        assert_eq!(c.add.len(), 1);
        assert!(c.add[0].route && !c.add[0].neigh);
    }
}
