//! Accepting forwarded pod traffic where another firewall drops it (Docker hosts).
//!
//! Docker sets `filter FORWARD` to policy DROP. A verdict of accept in one netfilter base
//! chain does not stop a later base chain (another nftables table, or the other iptables
//! backend) from dropping the packet, so an accept in twill's own table cannot help: the
//! accept has to sit in the chain that drops. As flannel's iptables mode does with
//! `FLANNEL-FWD`, twill then inserts a jump to its own chain `TWILL-FWD` at the top of
//! `filter FORWARD` ([`xtables`]); in a native nftables chain that drops (a host firewall's
//! `policy drop`), it inserts the two accept rules at the top of that chain ([`nft`]).
//!
//! Kubernetes' iptables wrapper picks the one backend (nft or legacy) that holds the host's
//! rules. twill looks at both instead, and acts only in a backend whose filter table already
//! exists and drops forwarded traffic: with one backend in use (the usual host) that is the
//! same choice, and with both in use a drop in either one is covered. Nothing is installed
//! while nothing drops, so no rule of twill's sits on the per-packet path then; when the drop
//! goes away (policy back to ACCEPT) twill removes its rules again. Only twill's own chain,
//! the jumps into it and the rules carrying twill's comment are ever changed.

pub mod nft;
pub mod xtables;

use ipnetwork::Ipv4Network;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::iptables::{self, Backend, Filter};

/// Comment on each of twill's rules (flannel's is "flanneld forward").
pub const COMMENT: &str = "twill forward";

/// Listings print the network address, so a CIDR with host bits set would never compare
/// equal and be re-applied on every pass.
fn canonical(n: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(n.network(), n.prefix()).unwrap_or(n)
}

/// What one pass did at one place (a backend's `filter FORWARD`, or an nft chain).
enum Outcome {
    Unchanged,
    Installed,
    Removed,
    /// The rules could not be read (binary missing, …): nothing known, nothing done.
    Unreadable(String),
}

/// One place and what happened there; built off the async runtime, logged on it.
type Report = (String, Result<Outcome>);

fn converge_xtables(backend: Backend, network: Ipv4Network) -> Result<Outcome> {
    let save = match backend.save_filter() {
        Ok(s) => s,
        Err(e) if iptables::is_missing(&e) => {
            return Ok(Outcome::Unreadable(format!(
                "{} not installed",
                backend.name()
            )))
        }
        Err(e) => return Ok(Outcome::Unreadable(e.to_string())),
    };
    let filter = save.as_deref().and_then(Filter::parse);
    let cmds = xtables::plan(filter.as_ref(), network);
    if cmds.is_empty() {
        return Ok(Outcome::Unchanged);
    }
    for c in &cmds {
        backend.filter(c)?;
    }
    Ok(if filter.as_ref().is_some_and(xtables::drops_forwarded) {
        Outcome::Installed
    } else {
        Outcome::Removed
    })
}

/// `nft -j -f -` with `{"nftables": cmds}`: keyword-safe names, one transaction.
fn nft_json(cmds: Vec<Value>) -> Result<Value> {
    let input = json!({ "nftables": cmds }).to_string();
    let out = twill_common::nft::run(&["-j", "-f", "-"], Some(&input))
        .map_err(|e| Error::Nft(e.to_string()))?;
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out).map_err(|e| Error::Nft(format!("unreadable nft JSON: {e}")))
}

fn converge_nft(network: Ipv4Network, reports: &mut Vec<Report>) {
    let listing = twill_common::nft::run(&["-j", "list", "chains"], None)
        .map_err(|e| e.to_string())
        .and_then(|out| serde_json::from_slice::<Value>(&out).map_err(|e| e.to_string()));
    let listing = match listing {
        Ok(l) => l,
        Err(why) => {
            reports.push(("nft forward chains".into(), Ok(Outcome::Unreadable(why))));
            return;
        }
    };
    for chain in nft::forward_chains(&listing, crate::rules::TABLE) {
        let place = format!("nft {} {} {}", chain.family, chain.table, chain.name);
        let result = (|| {
            let rules = nft_json(vec![json!({"list": {"chain": {
                "family": chain.family, "table": chain.table, "name": chain.name}}})])?;
            let cmds = nft::plan(&chain, &nft::our_rules(&rules), network);
            if cmds.is_empty() {
                return Ok(Outcome::Unchanged);
            }
            nft_json(cmds)?;
            Ok(if chain.drops {
                Outcome::Installed
            } else {
                Outcome::Removed
            })
        })();
        reports.push((place, result));
    }
}

/// Keeps twill's accept rules in every chain that drops forwarded traffic, and nowhere else.
#[derive(Default)]
pub struct ForwardAccept {
    /// Places that could not be read, with the reason last logged, so each is logged once.
    warned: Vec<(String, String)>,
}

impl ForwardAccept {
    pub fn new() -> ForwardAccept {
        ForwardAccept::default()
    }

    /// Brings every place in line for `network`; true when a rule had to change.
    pub async fn ensure(&mut self, network: Ipv4Network) -> Result<bool> {
        let reports = tokio::task::spawn_blocking(move || {
            let mut reports: Vec<Report> = Backend::ALL
                .iter()
                .map(|b| {
                    (
                        format!("{} filter FORWARD", b.name()),
                        converge_xtables(*b, network),
                    )
                })
                .collect();
            converge_nft(network, &mut reports);
            reports
        })
        .await
        .map_err(|e| Error::Iptables(format!("forward rules task: {e}")))?;
        let mut changed = false;
        let mut first_err = None;
        for (place, outcome) in reports {
            match outcome {
                Ok(Outcome::Unchanged) => self.warned.retain(|(p, _)| *p != place),
                Ok(Outcome::Installed) => {
                    changed = true;
                    info!(%network, "{place} drops forwarded packets; accepting the pod network there");
                }
                Ok(Outcome::Removed) => {
                    changed = true;
                    info!(
                        "{place} no longer drops forwarded packets; removed twill's accept rules"
                    );
                }
                Ok(Outcome::Unreadable(why)) => {
                    if !self.warned.iter().any(|(p, w)| *p == place && *w == why) {
                        warn!("cannot read {place} ({why}); a drop there would stop pod traffic between nodes");
                        self.warned.retain(|(p, _)| *p != place);
                        self.warned.push((place, why));
                    }
                }
                Err(e) => {
                    warn!("{place}: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }
}
