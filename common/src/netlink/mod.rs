//! twill's one netlink layer: sockets per namespace on short-lived threads (this file), one
//! error type ([`NlError`]), links by name or index ([`LinkId`], [`link_get`]), one [`Mac`]
//! type, and the typed operations twilld's backends use ([`Netlink`]). The CNI plugins turn
//! [`NlError`] into a CNI error at their boundary.

pub mod error;
pub mod link;
pub mod mac;
pub mod ops;

pub use error::{errno, is_exists, is_not_found, NlError};
pub use link::{link_get, LinkId, LinkSummary};
pub use mac::{format_mac, BadMac, Mac};
pub use ops::{NeighEntry, Netlink, RouteEntry, TWILL_ROUTE_PROTO};

use std::fs::File;
use std::future::Future;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::Handle;

use crate::cni::CniError;
use crate::netns;

/// Netlink handles of one job: `host` in the caller's namespace, `ns` inside the target one.
pub struct Sockets {
    pub host: Handle,
    pub ns: Option<Handle>,
}

/// Runs `job` on a short-lived thread with a current-thread tokio runtime. The host socket is
/// opened before the thread enters `ns`, the namespace socket after, so one task can drive both.
pub fn run<T, F, Fut>(ns: Option<File>, job: F) -> Result<T, CniError>
where
    T: Send + 'static,
    F: FnOnce(Sockets) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, CniError>>,
{
    on_thread(move |rt| {
        // A new thread starts in its creator's namespace, so the first socket is the host's.
        let (host_conn, host, _) = rtnetlink::new_connection()
            .map_err(|e| CniError::internal(format!("netlink socket: {e}")))?;
        let in_ns = match ns {
            Some(f) => Some(socket_in(&f)?),
            None => None,
        };
        rt.block_on(async move {
            tokio::spawn(host_conn);
            let ns = in_ns.map(|(c, h)| {
                tokio::spawn(c);
                h
            });
            job(Sockets { host, ns }).await
        })
    })
}

/// Like [`run`] for work that happens only inside `ns`: one socket, opened there.
pub fn run_in_ns<T, F, Fut>(ns: File, job: F) -> Result<T, CniError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, CniError>>,
{
    on_thread(move |rt| {
        let (conn, h) = socket_in(&ns)?;
        rt.block_on(async move {
            tokio::spawn(conn);
            job(h).await
        })
    })
}

type Connection = rtnetlink::proto::Connection<netlink_packet_route::RouteNetlinkMessage>;

/// Moves this (short-lived) thread into `ns` and opens a socket there.
fn socket_in(ns: &File) -> Result<(Connection, Handle), CniError> {
    netns::enter(ns).map_err(|e| CniError::internal(format!("failed to enter netns: {e}")))?;
    let (c, h, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::internal(format!("netlink socket in netns: {e}")))?;
    Ok((c, h))
}

/// Runs `f` on a fresh thread inside a current-thread runtime's context (sockets register with
/// its reactor, so they are made inside it).
fn on_thread<T: Send + 'static>(
    f: impl FnOnce(&tokio::runtime::Runtime) -> Result<T, CniError> + Send + 'static,
) -> Result<T, CniError> {
    netns::run_in(None, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| CniError::internal(format!("tokio runtime: {e}")))?;
        let _guard = rt.enter();
        f(&rt)
    })
    .map_err(|e| CniError::internal(e.to_string()))?
}

/// Addresses of one link, with the messages that carry them (to delete one).
pub async fn addrs_of(h: &Handle, index: u32) -> Result<Vec<(IpNetwork, AddressMessage)>, NlError> {
    let mut s = h.address().get().set_link_index_filter(index).execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await.map_err(NlError::kernel(format!(
        "list addresses of ifindex {index}"
    )))? {
        if m.header.index != index {
            continue;
        }
        let ip = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(n) = ip.and_then(|ip| IpNetwork::new(ip, m.header.prefix_len).ok()) {
            out.push((n, m));
        }
    }
    Ok(out)
}

/// The MAC of a link as `aa:bb:…`, empty when it has none.
pub fn mac_of(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => Some(format_mac(b)),
            _ => None,
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root: scripts/test.sh root"]
    fn loopback_lookup_in_own_namespace() {
        let lo = run(None, |s| async move {
            Ok::<_, CniError>(link_get(&s.host, "lo").await?)
        })
        .unwrap();
        assert_eq!(lo.map(|m| m.header.index), Some(1));
        let none = run(None, |s| async move {
            Ok::<_, CniError>(link_get(&s.host, "twill-nope0").await?)
        })
        .unwrap();
        assert!(none.is_none());
        let me = File::open("/proc/self/ns/net").unwrap();
        let lo = run_in_ns(me, |h| async move {
            Ok::<_, CniError>(link_get(&h, "lo").await?)
        })
        .unwrap();
        assert_eq!(lo.map(|m| m.header.index), Some(1));
    }
}
