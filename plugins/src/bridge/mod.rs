//! `twill-bridge`: the reference `bridge` plugin's behaviour (same config fields), faster:
//! IPAM `twill-host-local` runs in-process, all netlink work runs on one short-lived thread
//! holding a host socket and a container socket, and the port wait polls instead of sleeping.

pub mod link;

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use ipnetwork::IpNetwork;
use rtnetlink::LinkUnspec;
use serde::Deserialize;
use twill_common::cni::{
    code, delegate, delegate_add, CniError, CniResult, Command, Dns, Interface, NetConf, Plugin,
    Request, Route,
};
use twill_common::netlink::{format_mac, link_get, mac_of, run, run_in_ns, Mac, NlError};
use twill_common::{cni::env::validate_ifname, netns};

use crate::host_local;
use crate::ipnet::from_u128;
use crate::masq;

/// The bridge config (reference field names).
#[derive(Debug, Clone, Deserialize)]
pub struct BridgeConf {
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(rename = "isGateway", default)]
    pub is_gateway: bool,
    #[serde(rename = "isDefaultGateway", default)]
    pub is_default_gateway: bool,
    #[serde(rename = "forceAddress", default)]
    pub force_address: bool,
    #[serde(rename = "ipMasq", default)]
    pub ip_masq: bool,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(rename = "hairpinMode", default)]
    pub hairpin_mode: bool,
    #[serde(rename = "promiscMode", default)]
    pub promisc_mode: bool,
    #[serde(default)]
    pub enabledad: bool,
    #[serde(default)]
    pub vlan: u32,
    /// twill-bridge only: destinations the masquerade leaves alone besides the pod's own
    /// subnet (the meta plugin renders the cluster network, so pod→pod keeps its source IP).
    #[serde(rename = "masqExclude", default)]
    pub masq_exclude: Vec<String>,
}

fn default_bridge() -> String {
    "cni0".into()
}

impl BridgeConf {
    pub fn load(conf: &NetConf) -> Result<BridgeConf, CniError> {
        let mut c: BridgeConf = conf.decode()?;
        if c.is_default_gateway {
            c.is_gateway = true;
        }
        if c.hairpin_mode && c.promisc_mode {
            return Err(CniError::invalid_config(
                "cannot set hairpin mode and promiscuous mode at the same time",
            ));
        }
        if c.vlan != 0 {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("unsupported field: vlan = {}", c.vlan),
            ));
        }
        if let Some(m) = c.mtu {
            if !(68..=65535).contains(&m) {
                return Err(CniError::invalid_config(format!("invalid mtu {m}")));
            }
        }
        validate_ifname(&c.bridge)
            .map_err(|e| CniError::invalid_config(format!("invalid bridge name: {}", e.msg)))?;
        c.masq_exclude_nets()?;
        Ok(c)
    }

    /// `masqExclude` parsed; a malformed entry is code 7.
    pub fn masq_exclude_nets(&self) -> Result<Vec<IpNetwork>, CniError> {
        self.masq_exclude
            .iter()
            .map(|s| {
                s.parse::<IpNetwork>().map_err(|_| {
                    CniError::invalid_config(format!("invalid masqExclude entry {s:?}"))
                })
            })
            .collect()
    }
}

/// The container MAC requested by the runtime: `runtimeConfig.mac` > `args.cni.mac` > `CNI_ARGS MAC=`.
fn requested_mac(req: &Request) -> Result<Option<[u8; 6]>, CniError> {
    // Both typed sources are checked even when the first is set: a wrong type is an error.
    let (rt, arg) = (req.conf.runtime_str("mac")?, req.conf.cni_arg_str("mac")?);
    let s = rt.or(arg).or_else(|| req.env.args.get("MAC"));
    let Some(s) = s.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let bad = || CniError::invalid_config(format!("invalid MAC address {s:?}"));
    let mac: Mac = s.parse().map_err(|_| bad())?;
    // A multicast address cannot be an interface's own.
    if mac.0[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(Some(mac.0))
}

/// IPAM runs in-process when it is our own host-local; any other type is executed from CNI_PATH.
fn in_process_ipam(conf: &NetConf) -> bool {
    conf.ipam_type() == "twill-host-local"
}

fn ipam_add(req: &Request) -> Result<CniResult, CniError> {
    if in_process_ipam(&req.conf) {
        host_local::add(&req.conf, &req.env)
    } else {
        delegate_add(
            req.conf.ipam_type(),
            &req.env.path,
            &req.stdin,
            req.conf.version(),
        )
    }
}

fn ipam_other(req: &Request, cmd: Command) -> Result<(), CniError> {
    if req.conf.ipam_type().is_empty() {
        return Ok(());
    }
    if in_process_ipam(&req.conf) {
        return match cmd {
            Command::Del => host_local::del(&req.conf, &req.env),
            Command::Check => host_local::check(&req.conf, &req.env),
            Command::Status => host_local::status(&req.conf, &req.env),
            Command::Gc => host_local::gc(&req.conf, &req.env),
            _ => Ok(()),
        };
    }
    delegate(req.conf.ipam_type(), cmd, &req.env.path, &req.stdin)
}

fn first_host(net: &IpNetwork) -> IpAddr {
    let (first, _) = crate::ipnet::bounds(net);
    from_u128(first.saturating_add(1), net.is_ipv4())
}

/// Fills gateways and the container index, and adds default routes for isDefaultGateway.
/// Returns the bridge addresses (gateway/prefix) to ensure.
fn calc_gateways(bc: &BridgeConf, r: &mut CniResult) -> Vec<IpNetwork> {
    let mut gws = Vec::new();
    let mut extra_routes = Vec::new();
    for ip in r.ips.iter_mut() {
        ip.interface = Some(2);
        if ip.gateway.is_none() && bc.is_gateway {
            ip.gateway = Some(first_host(&ip.address));
        }
        let Some(gw) = ip.gateway else { continue };
        if bc.is_gateway {
            if let Ok(n) = IpNetwork::new(gw, ip.address.prefix()) {
                if !gws.contains(&n) {
                    gws.push(n);
                }
            }
        }
        if bc.is_default_gateway {
            let v4 = ip.address.is_ipv4();
            let has_default = r
                .routes
                .iter()
                .chain(extra_routes.iter())
                .any(|rt: &Route| {
                    rt.dst.prefix() == 0 && rt.dst.is_ipv4() == v4 && rt.gw.is_some()
                });
            if !has_default {
                let dst = if v4 { "0.0.0.0/0" } else { "::/0" };
                if let Ok(d) = dst.parse() {
                    extra_routes.push(Route::new(d, Some(gw)));
                }
            }
        }
    }
    r.routes.extend(extra_routes);
    gws
}

fn write_sysctl(path: &str, value: &str) -> Result<(), CniError> {
    std::fs::write(path, value).map_err(|e| CniError::internal(format!("write {path}: {e}")))
}

/// Writes a sysctl only when it differs (the write takes a lock in the kernel).
fn ensure_sysctl(path: &str, value: &str) -> Result<(), CniError> {
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == value => Ok(()),
        _ => write_sysctl(path, value),
    }
}

struct AddOutcome {
    bridge_mac: String,
    host_name: String,
    host_mac: String,
    container_mac: String,
    bridge_created: bool,
}

/// The whole ADD netlink job (runs on its netns thread). On failure it removes the veth it made.
#[allow(clippy::too_many_arguments)]
async fn add_links(
    s: twill_common::netlink::Sockets,
    ns_fd: File,
    bc: BridgeConf,
    ifname: String,
    result: CniResult,
    gws: Vec<IpNetwork>,
    mac: Option<[u8; 6]>,
) -> Result<AddOutcome, CniError> {
    let ch = s.ns.ok_or_else(|| CniError::internal("no netns socket"))?;
    let h = s.host;
    let (br, bridge_created) = link::ensure_bridge(&h, &bc.bridge, bc.mtu, bc.promisc_mode).await?;
    let br_index = br.header.index;
    let (host_name, hmac, cmac) =
        link::create_veth(&h, &ch, ns_fd.as_raw_fd(), &ifname, br_index, bc.mtu, mac).await?;
    let work = async {
        let v6 = result.ips.iter().any(|i| i.address.is_ipv6());
        // This thread is inside the container netns, so /proc/sys/net is the container's.
        let _ = write_sysctl(&format!("/proc/sys/net/ipv4/conf/{ifname}/arp_notify"), "1");
        if v6 {
            let base = format!("/proc/sys/net/ipv6/conf/{ifname}");
            let _ = ensure_sysctl(&format!("{base}/disable_ipv6"), "0");
            if bc.enabledad {
                let _ = write_sysctl(&format!("{base}/enhanced_dad"), "1");
                let _ = write_sysctl(&format!("{base}/accept_dad"), "1");
            } else {
                let _ = write_sysctl(&format!("{base}/accept_dad"), "0");
            }
        }
        let container = async {
            let c = link_get(&ch, &ifname).await?.ok_or_else(|| {
                CniError::internal(format!("container link {ifname:?} missing after creation"))
            })?;
            let idx = c.header.index;
            for ip in &result.ips {
                link::add_addr(&ch, idx, ip.address, !bc.enabledad).await?;
            }
            ch.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(NlError::kernel("set container link up"))?;
            for r in &result.routes {
                let gw = r.gw.or_else(|| result.family_gateway(r.dst.is_ipv4()));
                link::add_route(&ch, r, gw, idx).await?;
            }
            Ok::<(), CniError>(())
        };
        let host = async {
            for gw in &gws {
                link::ensure_bridge_addr(&h, br_index, &bc.bridge, *gw, bc.force_address).await?;
            }
            if bc.hairpin_mode {
                let l = link_get(&h, &host_name)
                    .await?
                    .ok_or_else(|| CniError::internal("host veth missing"))?;
                link::set_hairpin(&h, l.header.index).await?;
            }
            Ok::<(), CniError>(())
        };
        let (a, b) = futures::future::join(container, host).await;
        a?;
        b?;
        link::wait_port_forwarding(&h, &host_name).await?;
        Ok::<(), CniError>(())
    };
    if let Err(e) = work.await {
        let _ = link::del_link_get(&h, &host_name).await;
        return Err(e);
    }
    Ok(AddOutcome {
        bridge_mac: mac_of(&br),
        host_name,
        host_mac: format_mac(&hmac),
        container_mac: format_mac(&cmac),
        bridge_created,
    })
}

/// The `Threads:` count of a `/proc/<pid>/status` text.
fn threads_in_status(status: &str) -> Option<usize> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether this process has exactly one thread (unknown counts as no).
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| threads_in_status(&s))
        == Some(1)
}

/// Deletes parked container links in a forked child, so DEL does not wait for the kernel's
/// veth teardown. Called last, when the netlink thread was joined and no lock is held; the
/// child drops our stdio at once because the runtime reads our stdout to EOF. A child of a
/// multi-threaded process may only call async-signal-safe functions (another thread may hold
/// the allocator's lock), so the fork happens only when this process is provably
/// single-threaded; otherwise, or if the fork fails, the links are deleted here, synchronously.
fn reap_later(ns: File, names: Vec<String>) -> Result<(), CniError> {
    use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fork, setsid, ForkResult};
    if !single_threaded() {
        return reap(ns, names);
    }
    // SAFETY: this process has a single thread (checked just above, and this thread spawns
    // none in between), so the child may allocate and spawn threads.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => Ok(()),
        Ok(ForkResult::Child) => {
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let _ = dup2_stdin(&null);
                let _ = dup2_stdout(&null);
                let _ = dup2_stderr(&null);
            }
            let _ = setsid();
            let code = i32::from(reap(ns, names).is_err());
            // SAFETY: _exit skips atexit handlers and stdio flushing that belong to the parent.
            unsafe { libc::_exit(code) }
        }
        Err(_) => reap(ns, names),
    }
}

fn reap(ns: File, names: Vec<String>) -> Result<(), CniError> {
    if let Some(bad) = names.iter().find(|n| !n.starts_with(link::PARKED_PREFIX)) {
        return Err(CniError::invalid_env(format!("refusing to reap {bad:?}")));
    }
    run_in_ns(ns, move |ch| async move {
        for name in &names {
            link::del_link_get(&ch, name).await?;
        }
        Ok(())
    })
}

pub struct Bridge;

impl Bridge {
    fn add_inner(
        &self,
        req: &Request,
        bc: &BridgeConf,
        ns: File,
        ns_fd: File,
        mac: Option<[u8; 6]>,
        mut result: CniResult,
    ) -> Result<CniResult, CniError> {
        if !req.conf.ipam_type().is_empty() && result.ips.is_empty() {
            return Err(CniError::internal("IPAM plugin returned missing IP config"));
        }
        let gws = calc_gateways(bc, &mut result);
        let ifname = req.env.ifname.clone();
        let (bc2, r2, g2) = (bc.clone(), result.clone(), gws.clone());
        let out = run(Some(ns), move |s| {
            add_links(s, ns_fd, bc2, ifname, r2, g2, mac)
        })?;
        let host_side = || -> Result<(), CniError> {
            if out.bridge_created {
                let _ = write_sysctl(
                    &format!("/proc/sys/net/ipv6/conf/{}/accept_ra", bc.bridge),
                    "0",
                );
            }
            if bc.is_gateway {
                if gws.iter().any(|g| g.is_ipv4()) {
                    ensure_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
                }
                if gws.iter().any(|g| g.is_ipv6()) {
                    ensure_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
                }
            }
            if bc.ip_masq {
                let addrs: Vec<IpNetwork> = result.ips.iter().map(|i| i.address).collect();
                let exclude = bc.masq_exclude_nets()?;
                masq::add(&req.conf.name, &req.env.container_id, &addrs, &exclude)?;
            }
            Ok(())
        };
        if let Err(e) = host_side() {
            let host_name = out.host_name.clone();
            let _ = run(None, move |s| async move {
                link::del_link_get(&s.host, &host_name).await
            });
            if bc.ip_masq {
                let _ = masq::del(&req.conf.name, &req.env.container_id);
            }
            return Err(e);
        }
        result.interfaces = vec![
            Interface {
                name: bc.bridge.clone(),
                mac: out.bridge_mac,
                ..Interface::default()
            },
            Interface {
                name: out.host_name,
                mac: out.host_mac,
                ..Interface::default()
            },
            Interface {
                name: req.env.ifname.clone(),
                mac: out.container_mac,
                sandbox: req.env.netns.as_ref().map(|p| p.display().to_string()),
                ..Interface::default()
            },
        ];
        if let Some(d) = req.conf.dns.as_ref().filter(|d: &&Dns| !d.is_empty()) {
            result.dns = d.clone();
        }
        Ok(result)
    }
}

impl Plugin for Bridge {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let bc = BridgeConf::load(&req.conf)?;
        req.conf.check_prev_result()?;
        let mac = requested_mac(req)?;
        let ns = req.env.open_netns()?;
        let ns_fd = ns
            .try_clone()
            .map_err(|e| CniError::internal(format!("dup netns fd: {e}")))?;
        // A failed IPAM ADD reserved nothing of ours: rolling back with an IPAM DEL would
        // release the addresses of an earlier, live ADD of the same container (a retried ADD
        // fails as a duplicate allocation), and the next pod would get the same IP.
        let result = ipam_add(req)?;
        let r = self.add_inner(req, &bc, ns, ns_fd, mac, result);
        if r.is_err() {
            // Undo the reservation; the netlink job already removed its veth.
            let _ = ipam_other(req, Command::Del);
        }
        r
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let bc = BridgeConf::load(&req.conf)?;
        // A gone netns (or none given) only skips the link removal: IPAM and masquerade state
        // are released whatever happened to the container.
        let mut parked = None;
        if let Some(p) = &req.env.netns {
            let ns = netns::open_if_live(p).map_err(|e| {
                CniError::internal(format!("failed to open netns {:?}: {e}", p.display()))
            })?;
            if let Some(ns) = ns {
                // The reaper gets the namespace by fd: the runtime may unmount the path as
                // soon as we return.
                let keep = ns
                    .try_clone()
                    .map_err(|e| CniError::internal(format!("dup netns fd: {e}")))?;
                let ifname = req.env.ifname.clone();
                let names = run_in_ns(ns, move |ch| async move {
                    link::park_link(&ch, &ifname).await?;
                    link::parked_links(&ch).await
                })?;
                if !names.is_empty() {
                    parked = Some((keep, names));
                }
            }
        }
        let released = ipam_other(req, Command::Del).and_then(|()| {
            if bc.ip_masq {
                masq::del(&req.conf.name, &req.env.container_id)
            } else {
                Ok(())
            }
        });
        if let Some((ns, names)) = parked {
            reap_later(ns, names)?;
        }
        released
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let bc = BridgeConf::load(&req.conf)?;
        let prev = req
            .conf
            .prev_result()?
            .ok_or_else(|| CniError::invalid_config("Required prevResult missing"))?;
        ipam_other(req, Command::Check)?;
        let ns = req.env.open_netns()?;
        let netns_path = req
            .env
            .netns
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let cidx = prev
            .interfaces
            .iter()
            .position(|i| {
                i.name == req.env.ifname && i.sandbox.as_deref() == Some(netns_path.as_str())
            })
            .ok_or_else(|| {
                CniError::internal(format!(
                    "interface {} not found in prevResult",
                    req.env.ifname
                ))
            })?;
        if bc.ip_masq
            && !prev.ips.is_empty()
            && !masq::present(&req.conf.name, &req.env.container_id)?
        {
            return Err(CniError::internal("masquerade rules missing"));
        }
        let ifname = req.env.ifname.clone();
        run(Some(ns), move |s| check_links(s, bc, ifname, prev, cidx))
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        BridgeConf::load(&req.conf)?;
        ipam_other(req, Command::Status)
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let bc = BridgeConf::load(&req.conf)?;
        let mut errors = Vec::new();
        if let Err(e) = ipam_other(req, Command::Gc) {
            errors.push(e.to_string());
        }
        if let (true, Some(valid)) = (bc.ip_masq, req.conf.gc_attachments()) {
            if let Err(e) = masq::gc(&req.conf.name, valid) {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::internal(format!("gc: {}", errors.join("; "))))
        }
    }

    fn about(&self) -> String {
        "twill-bridge: Linux bridge + veth pod networking from twill".into()
    }
}

/// CHECK's netlink part: the container interface, its addresses and routes, the host veth and
/// the bridge, all as recorded in `prevResult`.
async fn check_links(
    s: twill_common::netlink::Sockets,
    bc: BridgeConf,
    ifname: String,
    prev: CniResult,
    cidx: usize,
) -> Result<(), CniError> {
    let ch = s.ns.ok_or_else(|| CniError::internal("no netns socket"))?;
    let h = s.host;
    let cif = &prev.interfaces[cidx];
    let c = link_get(&ch, &ifname)
        .await?
        .ok_or_else(|| CniError::internal(format!("container interface {ifname} missing")))?;
    if link::kind_of(&c) != Some(&netlink_packet_route::link::InfoKind::Veth) {
        return Err(CniError::internal(format!("{ifname} is not a veth")));
    }
    if !cif.mac.is_empty() && !mac_of(&c).eq_ignore_ascii_case(&cif.mac) {
        return Err(CniError::internal(format!(
            "interface {ifname} MAC {} differs from {}",
            mac_of(&c),
            cif.mac
        )));
    }
    let br = link_get(&h, &bc.bridge)
        .await?
        .ok_or_else(|| CniError::internal(format!("bridge {} missing", bc.bridge)))?;
    if link::kind_of(&br) != Some(&netlink_packet_route::link::InfoKind::Bridge) {
        return Err(CniError::internal(format!("{} is not a bridge", bc.bridge)));
    }
    if bc.promisc_mode
        && !br
            .header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Promisc)
    {
        return Err(CniError::internal(format!(
            "bridge {} is not promiscuous",
            bc.bridge
        )));
    }
    if let Some(want) = prev
        .interfaces
        .iter()
        .find(|i| i.name == bc.bridge && i.sandbox.is_none())
    {
        if !want.mac.is_empty() && !mac_of(&br).eq_ignore_ascii_case(&want.mac) {
            return Err(CniError::internal(format!(
                "bridge {} MAC differs from prevResult",
                bc.bridge
            )));
        }
    }
    // The host veth: a port of the bridge whose index is the container veth's peer.
    let peer =
        link::peer_index_of(&c).ok_or_else(|| CniError::internal("container veth has no peer"))?;
    let hostv = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_none() && i.name != bc.bridge);
    if let Some(hv) = hostv {
        let l = link_get(&h, &hv.name)
            .await?
            .ok_or_else(|| CniError::internal(format!("host veth {} missing", hv.name)))?;
        if l.header.index != peer {
            return Err(CniError::internal(format!(
                "host veth {} is not the peer of {ifname}",
                hv.name
            )));
        }
        if link::controller_of(&l) != Some(br.header.index) {
            return Err(CniError::internal(format!(
                "host veth {} is not attached to {}",
                hv.name, bc.bridge
            )));
        }
        if !hv.mac.is_empty() && !mac_of(&l).eq_ignore_ascii_case(&hv.mac) {
            return Err(CniError::internal(format!(
                "host veth {} MAC differs from prevResult",
                hv.name
            )));
        }
    }
    let have: Vec<IpNetwork> = twill_common::netlink::addrs_of(&ch, c.header.index)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for ip in prev.ips.iter().filter(|i| i.interface == Some(cidx)) {
        if !have
            .iter()
            .any(|h| h.ip() == ip.address.ip() && h.prefix() == ip.address.prefix())
        {
            return Err(CniError::internal(format!(
                "address {} missing on {ifname}",
                ip.address
            )));
        }
    }
    for v4 in [true, false] {
        let want: Vec<&Route> = prev
            .routes
            .iter()
            .filter(|r| r.dst.is_ipv4() == v4)
            .collect();
        if want.is_empty() {
            continue;
        }
        let table = link::routes(&ch, v4).await?;
        for r in want {
            let gw = r.gw.or_else(|| prev.family_gateway(v4));
            let dst = IpNetwork::new(r.dst.network(), r.dst.prefix())
                .map_err(|e| CniError::internal(e.to_string()))?;
            let found = table.iter().any(|(d, g, oif)| {
                *d == dst && (gw.is_none() || *g == gw) && oif.is_none_or(|o| o == c.header.index)
            });
            if !found {
                return Err(CniError::internal(format!(
                    "route {} via {:?} missing in the container",
                    r.dst, gw
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use twill_common::cni::Env;

    fn bc(v: serde_json::Value) -> BridgeConf {
        BridgeConf::load(&NetConf::parse(v.to_string().as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn gateways_and_default_routes() {
        let mut r = CniResult::from_value(
            &json!({"ips":[{"address":"10.1.0.5/24"},{"address":"fd00::5/64","gateway":"fd00::1"}],
                    "routes":[{"dst":"::/0","gw":"fd00::1"}]}),
            "1.0.0",
        )
        .unwrap();
        let c = bc(json!({"name":"n","type":"twill-bridge","isDefaultGateway":true}));
        assert!(c.is_gateway, "isDefaultGateway implies isGateway");
        assert_eq!(c.bridge, "cni0");
        let gws = calc_gateways(&c, &mut r);
        assert_eq!(
            gws.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
            ["10.1.0.1/24", "fd00::1/64"]
        );
        assert!(r.ips.iter().all(|i| i.interface == Some(2)));
        assert_eq!(r.ips[0].gateway.unwrap().to_string(), "10.1.0.1");
        // v4 gets a default route; v6 already had one with a gw.
        assert_eq!(r.routes.len(), 2);
        assert_eq!(r.routes[1].dst.to_string(), "0.0.0.0/0");
    }

    #[test]
    fn thread_count_from_status() {
        assert_eq!(
            threads_in_status("Name:\tx\nThreads:\t1\nSigQ:\t0/1\n"),
            Some(1)
        );
        assert_eq!(threads_in_status("Threads:\t12\n"), Some(12));
        assert_eq!(threads_in_status("Name:\tx\n"), None);
    }

    /// In a multi-threaded process the reaper must not fork: the links are gone when it returns.
    #[test]
    #[ignore = "needs root: scripts/test.sh root"]
    fn reaper_is_synchronous_when_other_threads_exist() {
        struct Ns(String);
        impl Drop for Ns {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        let sh = |args: &[&str]| {
            let ok = std::process::Command::new("ip").args(args).status();
            assert!(ok.is_ok_and(|s| s.success()), "ip {args:?}");
        };
        let ns = Ns(format!("twreap{}", std::process::id()));
        sh(&["netns", "add", &ns.0]);
        let (a, b) = (
            format!("{}a1", link::PARKED_PREFIX),
            format!("{}b1", link::PARKED_PREFIX),
        );
        sh(&[
            "-n", &ns.0, "link", "add", &a, "type", "veth", "peer", "name", &b,
        ]);
        let path = format!("/run/netns/{}", ns.0);
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _ = stop_rx.recv();
        });
        assert!(!single_threaded());
        reap_later(File::open(&path).unwrap(), vec![a.clone(), b.clone()]).unwrap();
        let left = run_in_ns(File::open(&path).unwrap(), move |h| async move {
            Ok((
                link_get(&h, &a).await?.is_some(),
                link_get(&h, &b).await?.is_some(),
            ))
        })
        .unwrap();
        let _ = stop_tx.send(());
        other.join().unwrap();
        assert_eq!(left, (false, false), "links still there: the reaper forked");
    }

    #[test]
    fn config_validation_and_mac() {
        let bad = |v: serde_json::Value| {
            BridgeConf::load(&NetConf::parse(v.to_string().as_bytes()).unwrap()).unwrap_err()
        };
        assert_eq!(
            bad(json!({"name":"n","hairpinMode":true,"promiscMode":true})).code,
            7
        );
        assert_eq!(bad(json!({"name":"n","vlan":5})).code, 2);
        assert_eq!(bad(json!({"name":"n","bridge":"a/b"})).code, 7);
        assert_eq!(bad(json!({"name":"n","mtu":"x"})).code, 7);
        assert_eq!(
            bad(json!({"name":"n","masqExclude":["10.0.0.0/33"]})).code,
            7
        );
        assert_eq!(bad(json!({"name":"n","masqExclude":"10.0.0.0/8"})).code, 7);
        let env = Env::from_lookup(|k| match k {
            "CNI_COMMAND" => Some("STATUS".into()),
            "CNI_ARGS" => Some("MAC=02:00:00:00:00:09".into()),
            _ => None,
        })
        .unwrap();
        let mk = |v: serde_json::Value| Request {
            env: env.clone(),
            conf: NetConf::parse(v.to_string().as_bytes()).unwrap(),
            stdin: vec![],
        };
        assert_eq!(
            requested_mac(&mk(json!({}))).unwrap(),
            Some([2, 0, 0, 0, 0, 9])
        );
        let rt = mk(
            json!({"runtimeConfig":{"mac":"02:00:00:00:00:0a"},"args":{"cni":{"mac":"02:00:00:00:00:0b"}}}),
        );
        assert_eq!(requested_mac(&rt).unwrap(), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(
            requested_mac(&mk(json!({"runtimeConfig":{"mac":"01:00:00:00:00:01"}})))
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            requested_mac(&mk(json!({"runtimeConfig":{"mac":"zz"}})))
                .unwrap_err()
                .code,
            7
        );
        for wrong in [
            json!({"runtimeConfig":{"mac":5}}),
            json!({"runtimeConfig":{"mac":["02:00:00:00:00:0a"]}}),
            json!({"args":{"cni":{"mac":{}}}}),
        ] {
            assert_eq!(requested_mac(&mk(wrong)).unwrap_err().code, 7);
        }
    }
}
