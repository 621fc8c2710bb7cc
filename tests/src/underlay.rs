//! A simulated L2 underlay: a namespace holding a bridge, and "nodes" (namespaces) plugged into
//! it by veth pairs. Nothing touches the root namespace.
//!
//! ```ignore
//! let ul = Underlay::new();                 // netns with bridge `br-ul`, 192.168.100.254/24 on it
//! let etcd = Etcd::start_in(ul.ns_name(), &ul.etcd_ip().to_string());
//! let n1 = ul.add_node();                   // netns with `eth0` = 192.168.100.1/24, lo up,
//! let n2 = ul.add_node();                   //   default route via .254, ip_forward=1
//! n1.ns.exec(&["ping", "-c1", &n2.ip.to_string()]);
//! ```
//! Each [`Node`] owns its namespace (deleted on drop); the [`Underlay`] owns the bridge
//! namespace. Since every underlay lives in namespaces of its own, tests running in parallel
//! can all use 192.168.100.0/24.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::netns::Netns;

/// Name of the bridge inside the underlay namespace.
pub const BRIDGE: &str = "br-ul";
/// Name of each node's underlay interface.
pub const NODE_IF: &str = "eth0";

/// The underlay: a namespace with bridge [`BRIDGE`] holding `192.168.100.254/24`.
pub struct Underlay {
    ns: Netns,
    mtu: u32,
    next: AtomicU8,
}

/// A node namespace with one underlay interface ([`NODE_IF`]).
pub struct Node {
    pub ns: Netns,
    /// The node's underlay address (its public IP).
    pub ip: Ipv4Addr,
    /// The interface in the node namespace.
    pub ifname: String,
}

impl Node {
    pub fn name(&self) -> &str {
        self.ns.name()
    }
}

impl Underlay {
    /// An underlay with MTU 1500.
    pub fn new() -> Underlay {
        Underlay::with_mtu(1500)
    }

    /// An underlay whose bridge and node links all have `mtu`.
    pub fn with_mtu(mtu: u32) -> Underlay {
        let ns = Netns::new("u");
        let mtu_s = mtu.to_string();
        ns.exec(&["ip", "link", "add", BRIDGE, "mtu", &mtu_s, "type", "bridge"]);
        ns.exec(&["ip", "addr", "add", "192.168.100.254/24", "dev", BRIDGE]);
        ns.exec(&["ip", "link", "set", BRIDGE, "up"]);
        Underlay {
            ns,
            mtu,
            next: AtomicU8::new(1),
        }
    }

    /// Name of the underlay namespace (run etcd here, see [`Underlay::etcd_ip`]).
    pub fn ns_name(&self) -> &str {
        self.ns.name()
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The bridge's own address, where an etcd started in [`Underlay::ns_name`] listens.
    pub fn etcd_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, 254)
    }

    /// Adds a node: a new namespace, veth `eth0` ↔ bridge port, address 192.168.100.N/24.
    pub fn add_node(&self) -> Node {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        assert!(n < 254, "underlay full");
        let ns = Netns::new("n");
        let port = format!("p{n}");
        let mtu = self.mtu.to_string();
        // Created inside the node namespace, peer moved into the underlay namespace.
        ns.exec(&[
            "ip",
            "link",
            "add",
            NODE_IF,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "mtu",
            &mtu,
            "netns",
            self.ns.name(),
        ]);
        self.ns
            .exec(&["ip", "link", "set", &port, "master", BRIDGE, "up"]);
        let ip = Ipv4Addr::new(192, 168, 100, n);
        ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", NODE_IF]);
        ns.exec(&["ip", "link", "set", NODE_IF, "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", "192.168.100.254"]);
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        Node {
            ns,
            ip,
            ifname: NODE_IF.to_string(),
        }
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Underlay::new()
    }
}
