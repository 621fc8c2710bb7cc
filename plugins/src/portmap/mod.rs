//! `twill-portmap`: hostPort for pods, the reference `portmap` plugin's config and runtime
//! config in nftables only (table `inet twill-portmap`, see [`rules`]), at CNI 0.3.0–1.1.0.
//!
//! - ADD: adds the attachment's rules (replacing any it already has, in one transaction),
//!   enables `route_localnet` on the host interface that routes to the pod (localhost DNAT),
//!   deletes the UDP conntrack entries of the host ports, and passes `prevResult` through.
//! - DEL: deletes the rules keyed by network + container ID + ifname (no netns, prevResult or
//!   runtime config needed), then the UDP conntrack entries of their host ports.
//! - CHECK: the attachment's rules are exactly what ADD would add.
//! - GC: deletes the rules of this network's attachments that are not in the valid list.
//! - STATUS: nftables can take the table (a checked, not committed, transaction).

pub mod conditions;
pub mod config;
pub mod conntrack;
pub mod rules;

use std::net::IpAddr;

use twill_common::cni::{code, Attachment, CniError, CniResult, Plugin, Request};
use twill_common::nft;
use twill_common::nft::model;

use crate::bridge::link::routes;
use crate::nft_rules::{self, Rule};
use config::PortMapConf;
use rules::{Targets, FAMILY, HOSTPORTS, POSTROUTING, TABLE};

pub struct Portmap;

/// Spec versions twill-portmap accepts (chained plugins need `prevResult`, so 0.3.0 on).
pub const VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The container's addresses: `prevResult.ips` on the interface named `ifname` inside a sandbox,
/// the first of each family (the reference's rule: an IP without an interface index is skipped,
/// one whose index points outside `interfaces` is kept).
pub fn targets(prev: &CniResult, ifname: &str) -> Targets {
    let mut t = Targets::default();
    for ip in &prev.ips {
        let Some(i) = ip.interface else { continue };
        if let Some(intf) = prev.interfaces.get(i) {
            if intf.name != ifname || intf.sandbox.as_deref().unwrap_or("").is_empty() {
                continue;
            }
        }
        let slot = if ip.address.is_ipv4() {
            &mut t.v4
        } else {
            &mut t.v6
        };
        if slot.is_none() {
            *slot = Some(ip.address);
        }
    }
    t
}

fn chained_prev(req: &Request) -> Result<CniResult, CniError> {
    req.conf.check_prev_result()?;
    req.conf
        .prev_result()?
        .ok_or_else(|| CniError::invalid_config("must be called as chained plugin"))
}

fn attachment_key(req: &Request) -> String {
    rules::key(&req.conf.name, &req.env.container_id, &req.env.ifname)
}

/// Deletes the UDP conntrack entries of the DNAT rules among `rules` (added or removed). A
/// failure is reported on stderr only: the mappings are in place (or gone), as the reference.
fn flush_udp(rules: &[Rule]) {
    let ports = rules::udp_ports(rules);
    if let Err(e) = conntrack::delete_udp(&ports) {
        eprintln!("twill-portmap: deleting UDP conntrack entries of ports {ports:?}: {e}");
    }
}

/// `route_localnet=1` on the host interface that routes to `ip`, so DNATed 127.0.0.1 traffic
/// may leave through it (as the reference). Written in the namespace this plugin runs in.
fn enable_route_localnet(ip: IpAddr) -> Result<(), CniError> {
    let name = twill_common::netlink::run(None, move |s| async move {
        let best = routes(&s.host, ip.is_ipv4())
            .await?
            .into_iter()
            .filter(|(dst, _, oif)| oif.is_some() && dst.contains(ip))
            .max_by_key(|(dst, _, _)| dst.prefix())
            .and_then(|(_, _, oif)| oif);
        let Some(idx) = best else { return Ok(None) };
        let link = twill_common::netlink::link_get(&s.host, idx).await?;
        Ok(link.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                netlink_packet_route::link::LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        }))
    })?;
    let Some(name) = name.filter(|n| !n.contains('/') && n != "." && n != "..") else {
        return Ok(());
    };
    let path = format!("/proc/sys/net/ipv4/conf/{name}/route_localnet");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => {
            std::fs::write(&path, "1").map_err(|e| CniError::internal(format!("write {path}: {e}")))
        }
    }
}

impl Plugin for Portmap {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let conf = PortMapConf::load(&req.conf)?;
        let prev = chained_prev(req)?;
        let t = targets(&prev, &req.env.ifname);
        // Pods without host ports (most of them) cost no nft run at all.
        if conf.mappings().is_empty() || t.is_empty() {
            return Ok(prev);
        }
        let key = attachment_key(req);
        let planned = rules::plan(&key, &conf, &t)?;
        if planned.is_empty() {
            return Ok(prev);
        }
        if conf.snat {
            if let Some(v4) = t.v4 {
                enable_route_localnet(v4.ip())?;
            }
        }
        let cmds = rules::add_commands(&planned);
        let old = nft_rules::replace(FAMILY, TABLE, |r| rules::key_of(&r.comment) == key, &cmds)?;
        let added: Vec<Rule> = planned
            .iter()
            .map(|p| Rule {
                chain: p.chain.to_string(),
                handle: 0,
                comment: p.comment.clone(),
            })
            .chain(old)
            .collect();
        flush_udp(&added);
        Ok(prev)
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let conf = PortMapConf::load(&req.conf)?;
        // An explicit empty list: this attachment never had rules. Without the list (a runtime
        // that lost its cache) the table is looked at anyway.
        if conf.mappings.as_ref().is_some_and(Vec::is_empty) {
            return Ok(());
        }
        let key = attachment_key(req);
        let removed = nft_rules::replace(FAMILY, TABLE, |r| rules::key_of(&r.comment) == key, &[])?;
        flush_udp(&removed);
        Ok(())
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let conf = PortMapConf::load(&req.conf)?;
        let prev = chained_prev(req)?;
        let t = targets(&prev, &req.env.ifname);
        if conf.mappings().is_empty() || t.is_empty() {
            return Ok(());
        }
        let key = attachment_key(req);
        let planned = rules::plan(&key, &conf, &t)?;
        let have = nft_rules::list(FAMILY, TABLE)?;
        let jumps = ["prerouting", "output"].iter().all(|c| {
            have.iter()
                .any(|r| r.chain == *c && r.comment == rules::BASE_COMMENT)
        });
        if !jumps {
            return Err(CniError::internal(format!(
                "twill-portmap: the jump rules of table {} {TABLE} are missing",
                FAMILY.as_str()
            )));
        }
        let want = rules::signature(planned.iter().map(|p| (p.chain, p.comment.as_str())));
        let got = rules::signature(
            have.iter()
                .filter(|r| rules::key_of(&r.comment) == key)
                .map(|r| (r.chain.as_str(), r.comment.as_str())),
        );
        if want != got {
            let missing: Vec<&str> = want
                .iter()
                .filter(|w| !got.contains(w))
                .map(|(_, c)| c.as_str())
                .collect();
            return Err(CniError::internal(format!(
                "twill-portmap: port mapping rules differ from the config (missing: {missing:?}, found {} of {})",
                got.len(),
                want.len()
            )));
        }
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        PortMapConf::load(&req.conf)?;
        // No list at all means "unknown", never "nothing is valid".
        let Some(valid) = req.conf.gc_attachments() else {
            return Ok(());
        };
        let net = req.conf.name.as_str();
        let ours = rules::network_prefixes(net);
        let keep = |k: &str| {
            valid.iter().any(|a: &Attachment| {
                if a.ifname.is_empty() {
                    rules::container_prefixes(net, &a.container_id)
                        .iter()
                        .any(|p| k.starts_with(p.as_str()))
                } else {
                    k == rules::key(net, &a.container_id, &a.ifname)
                }
            })
        };
        let removed = nft_rules::replace(
            FAMILY,
            TABLE,
            |r| {
                let k = rules::key_of(&r.comment);
                (r.chain == HOSTPORTS || r.chain == POSTROUTING)
                    && ours.iter().any(|p| k.starts_with(p.as_str()))
                    && !keep(k)
            },
            &[],
        )?;
        flush_udp(&removed);
        Ok(())
    }

    fn status(&self, _req: &Request) -> Result<(), CniError> {
        let script = model::script(&rules::base_commands());
        nft::run(&["-j", "-c", "-f", "-"], Some(&script)).map_err(|e| {
            CniError::new(
                code::NOT_AVAILABLE,
                format!(
                    "twill-portmap: nftables cannot take table {} {TABLE}: {e}",
                    FAMILY.as_str()
                ),
            )
        })?;
        Ok(())
    }

    fn versions(&self) -> &'static [&'static str] {
        VERSIONS
    }

    fn about(&self) -> String {
        "twill-portmap: hostPort mappings in nftables (table inet twill-portmap)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn targets_follow_the_reference_interface_rule() {
        let prev = CniResult::from_value(
            &json!({"cniVersion":"1.0.0",
                "interfaces":[{"name":"cni0"},{"name":"eth0","sandbox":"/run/netns/p"},{"name":"eth1","sandbox":"/run/netns/p"}],
                "ips":[{"address":"10.9.0.9/24"},
                       {"address":"10.1.0.9/24","interface":0},
                       {"address":"10.3.0.3/24","interface":2},
                       {"address":"10.1.0.5/24","interface":1},
                       {"address":"10.1.0.6/24","interface":1},
                       {"address":"fd00::5/64","interface":1}]}),
            "1.0.0",
        )
        .unwrap();
        let t = targets(&prev, "eth0");
        assert_eq!(t.v4.unwrap().to_string(), "10.1.0.5/24");
        assert_eq!(t.v6.unwrap().to_string(), "fd00::5/64");
        let t = targets(&prev, "eth1");
        assert_eq!(
            (t.v4.unwrap().to_string(), t.v6),
            ("10.3.0.3/24".into(), None)
        );
        assert!(targets(&prev, "eth9").is_empty());
    }
}
