//! `twill-loopback`: the reference loopback plugin at every spec version.

use ipnetwork::IpNetwork;
use netlink_packet_route::link::LinkFlags;
use rtnetlink::LinkUnspec;
use twill_common::cni::{CniError, CniResult, Interface, IpConfig, Plugin, Request};
use twill_common::netlink::{addrs_of, link_get, run_in_ns, NlError};
use twill_common::netns;

const LO: &str = "lo";

pub struct Loopback;

impl Plugin for Loopback {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        // Checked before `lo` is touched: bad input changes nothing.
        req.conf.check_prev_result()?;
        let ns = req.env.open_netns()?;
        let addrs = run_in_ns(ns, |h| async move {
            let lo = link_get(&h, LO)
                .await?
                .ok_or_else(|| CniError::internal("no lo in netns"))?;
            let idx = lo.header.index;
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(NlError::kernel("set lo up"))?;
            let addrs = addrs_of(&h, idx).await?;
            Ok(addrs
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<IpNetwork>>())
        })?;
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(CniError::internal(format!(
                "loopback interface found with non-loopback address {:?}",
                a.ip()
            )));
        }
        if let Some(prev) = req.conf.prev_result()? {
            return Ok(prev);
        }
        let first = |v4: bool| addrs.iter().find(|a| a.is_ipv4() == v4).copied();
        let ips = [first(true), first(false)]
            .into_iter()
            .flatten()
            .map(|address| IpConfig {
                address,
                gateway: None,
                interface: Some(0),
            })
            .collect();
        Ok(CniResult {
            interfaces: vec![Interface {
                name: LO.into(),
                mac: "00:00:00:00:00:00".into(),
                sandbox: req.env.netns.as_ref().map(|p| p.display().to_string()),
                ..Interface::default()
            }],
            ips,
            ..CniResult::default()
        })
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let Some(p) = &req.env.netns else {
            return Ok(());
        };
        let Ok(Some(ns)) = netns::open_if_live(p) else {
            return Ok(());
        };
        run_in_ns(ns, |h| async move {
            if let Some(lo) = link_get(&h, LO).await? {
                h.link()
                    .set(LinkUnspec::new_with_index(lo.header.index).down().build())
                    .execute()
                    .await
                    .map_err(NlError::kernel("set lo down"))?;
            }
            Ok(())
        })
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let ns = req.env.open_netns()?;
        let up = run_in_ns(ns, |h| async move {
            let lo = link_get(&h, LO)
                .await?
                .ok_or_else(|| CniError::internal("no lo in netns"))?;
            Ok(lo.header.flags.contains(LinkFlags::Up))
        })?;
        if !up {
            return Err(CniError::internal("loopback interface is down"));
        }
        Ok(())
    }

    fn about(&self) -> String {
        "twill-loopback: brings up lo in the container".into()
    }
}
