//! Masquerade and forward rules, as a narrow trait with one implementation.
//!
//! twill owns the table `ip twill` and rewrites it whole in one `nft -j -f -` transaction of
//! typed commands (`twill_common::nft::model`), so a network change replaces the old rules
//! atomically and nothing else's rules are touched. Drift is found by comparing the table's JSON
//! listing, as a structure, with the one taken right after installing.
//! Semantics follow flannel's nftables mode (flannel-compat §7.2): no NAT inside the pod
//! network, masquerade (fully-random) from pods to the outside, packets marked 0x4000 skipped.
//!
//! The table has no forward chain: an accept there cannot override another table's drop, and
//! with nothing dropping it would only cost every forwarded packet a rule walk. Where a
//! firewall does drop forwarded traffic (Docker's `filter FORWARD` policy DROP), the accept is
//! put into that chain instead ([`crate::forward`]).

use std::future::Future;

use ipnetwork::{IpNetwork, Ipv4Network};
use serde_json::Value;
use tracing::{info, warn};
use twill_common::nft::model::{
    self, Base, ChainType, Cmd, Expr, Family, Field, Hook, Rule, Val, PRIO_SRCNAT,
};

use crate::error::{Error, Result};
use crate::forward::ForwardAccept;

pub trait Rules: Send {
    /// Installs the rules for the pod `network` and this node's `subnet`.
    fn apply(
        &mut self,
        network: Ipv4Network,
        subnet: Ipv4Network,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Re-applies the last rules if they were changed or removed; true when it had to.
    fn check(&mut self) -> impl Future<Output = Result<bool>> + Send;
}

pub const TABLE: &str = "twill";

/// The table as typed nftables commands: recreated whole in one transaction (add, delete,
/// add again, so it works whether or not the table exists).
pub fn commands(network: Ipv4Network, subnet: Ipv4Network, masquerade: bool) -> Vec<Cmd> {
    let table = || TABLE.to_string();
    let mut cmds = vec![
        Cmd::AddTable(Family::Ip, table()),
        Cmd::DeleteTable(Family::Ip, table()),
        Cmd::AddTable(Family::Ip, table()),
    ];
    if masquerade {
        cmds.push(Cmd::AddChain {
            family: Family::Ip,
            table: table(),
            name: "postrtg".into(),
            base: Some(Base {
                kind: ChainType::Nat,
                hook: Hook::Postrouting,
                prio: PRIO_SRCNAT,
                accept: true,
            }),
        });
        let net = Val::Net(IpNetwork::V4(network));
        let sub = Val::Net(IpNetwork::V4(subnet));
        let multicast = Val::Net("224.0.0.0/4".parse().expect("a valid prefix"));
        let rule = |exprs: Vec<Expr>| {
            Cmd::AddRule(Rule {
                family: Family::Ip,
                table: table(),
                chain: "postrtg".into(),
                exprs,
                comment: None,
            })
        };
        let masq = Expr::Masquerade { fully_random: true };
        cmds.extend([
            rule(vec![
                Expr::is(Field::MarkAnd(0x4000), Val::Int(0x4000)),
                Expr::Return,
            ]),
            rule(vec![
                Expr::is(Field::Saddr, sub.clone()),
                Expr::is(Field::Daddr, net.clone()),
                Expr::Return,
            ]),
            rule(vec![
                Expr::is(Field::Saddr, net.clone()),
                Expr::is(Field::Daddr, sub.clone()),
                Expr::Return,
            ]),
            rule(vec![
                Expr::is_not(Field::Saddr, sub),
                Expr::is(Field::Daddr, net.clone()),
                Expr::Return,
            ]),
            rule(vec![
                Expr::is(Field::Saddr, net.clone()),
                Expr::is_not(Field::Daddr, multicast),
                masq.clone(),
            ]),
            rule(vec![
                Expr::is_not(Field::Saddr, net.clone()),
                Expr::is(Field::Daddr, net),
                masq,
            ]),
        ]);
    }
    cmds
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = twill_common::nft::run(args, stdin).map_err(|e| Error::Nft(e.to_string()))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn nft_async(args: Vec<String>, stdin: Option<String>) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        nft(&a, stdin.as_deref())
    })
    .await
    .map_err(|e| Error::Nft(format!("nft task: {e}")))?
}

/// twill's own nftables table, plus its accept rules where iptables drops forwarded traffic.
pub struct NftRules {
    masquerade: bool,
    /// The commands last installed.
    installed: Option<Vec<Cmd>>,
    /// The table's normalized JSON listing right after installing, to spot removal or edits.
    listing: Option<Value>,
    /// The pod network of the last `apply`, for the forward rules' checks.
    network: Option<Ipv4Network>,
    forward: ForwardAccept,
}

impl NftRules {
    pub fn new(masquerade: bool) -> NftRules {
        NftRules {
            masquerade,
            installed: None,
            listing: None,
            network: None,
            forward: ForwardAccept::new(),
        }
    }

    async fn list() -> Result<Value> {
        let text = nft_async(
            vec![
                "-j".into(),
                "list".into(),
                "table".into(),
                "ip".into(),
                TABLE.into(),
            ],
            None,
        )
        .await?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Nft(format!("nft -j list printed no JSON: {e}")))?;
        Ok(model::normalized(&v))
    }

    async fn install(&mut self, cmds: Vec<Cmd>) -> Result<()> {
        nft_async(
            vec!["-j".into(), "-f".into(), "-".into()],
            Some(model::script(&cmds)),
        )
        .await?;
        self.listing = Some(NftRules::list().await?);
        self.installed = Some(cmds);
        Ok(())
    }
}

impl Rules for NftRules {
    async fn apply(&mut self, network: Ipv4Network, subnet: Ipv4Network) -> Result<()> {
        // Set first: without masquerade the table does not name the network, so a changed
        // network reaches the forward rules only through this.
        self.network = Some(network);
        let cmds = commands(network, subnet, self.masquerade);
        if self.installed.as_ref() == Some(&cmds) {
            self.check().await?;
            return Ok(());
        }
        self.install(cmds).await?;
        info!(network = %network, subnet = %subnet, masquerade = self.masquerade, "nftables table ip {TABLE} installed");
        self.forward.ensure(network).await?;
        Ok(())
    }

    async fn check(&mut self) -> Result<bool> {
        let (Some(cmds), Some(network)) = (self.installed.clone(), self.network) else {
            return Ok(false);
        };
        let now = NftRules::list().await.ok();
        let mut corrected = false;
        if now.is_none() || now != self.listing {
            warn!("nftables table ip {TABLE} was changed or removed; re-applying");
            self.install(cmds).await?;
            corrected = true;
        }
        // Also picks up a drop that appeared after startup (Docker started later).
        Ok(self.forward.ensure(network).await? || corrected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_of(cmds: &[Cmd]) -> Vec<Vec<Expr>> {
        cmds.iter()
            .filter_map(|c| match c {
                Cmd::AddRule(r) => Some(r.exprs.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn table_follows_flannel_nft_semantics() {
        let net: Ipv4Network = "10.5.0.0/16".parse().unwrap();
        let sub: Ipv4Network = "10.5.3.0/24".parse().unwrap();
        let cmds = commands(net, sub, true);
        let (n, s) = (Val::Net(IpNetwork::V4(net)), Val::Net(IpNetwork::V4(sub)));
        let masq = Expr::Masquerade { fully_random: true };
        assert_eq!(
            rules_of(&cmds),
            vec![
                vec![
                    Expr::is(Field::MarkAnd(0x4000), Val::Int(0x4000)),
                    Expr::Return
                ],
                vec![
                    Expr::is(Field::Saddr, s.clone()),
                    Expr::is(Field::Daddr, n.clone()),
                    Expr::Return
                ],
                vec![
                    Expr::is(Field::Saddr, n.clone()),
                    Expr::is(Field::Daddr, s.clone()),
                    Expr::Return
                ],
                vec![
                    Expr::is_not(Field::Saddr, s),
                    Expr::is(Field::Daddr, n.clone()),
                    Expr::Return
                ],
                vec![
                    Expr::is(Field::Saddr, n.clone()),
                    Expr::is_not(Field::Daddr, Val::Net("224.0.0.0/4".parse().unwrap())),
                    masq.clone()
                ],
                vec![
                    Expr::is_not(Field::Saddr, n.clone()),
                    Expr::is(Field::Daddr, n),
                    masq
                ],
            ]
        );
        assert!(rules_of(&commands(net, sub, false)).is_empty());
    }

    /// Nothing of twill's on the forward path: an accept in its own table cannot beat another
    /// table's drop and only costs throughput (see `forward` for where the accept goes).
    #[test]
    fn table_has_no_forward_chain() {
        for masq in [true, false] {
            let cmds = commands(
                "10.5.0.0/16".parse().unwrap(),
                "10.5.3.0/24".parse().unwrap(),
                masq,
            );
            assert!(cmds.iter().all(
                |c| !matches!(c, Cmd::AddChain { base: Some(b), .. } if b.hook == Hook::Forward)
            ));
            assert!(rules_of(&cmds).iter().flatten().all(|e| *e != Expr::Accept));
            assert_eq!(
                &cmds[..3],
                &[
                    Cmd::AddTable(Family::Ip, TABLE.into()),
                    Cmd::DeleteTable(Family::Ip, TABLE.into()),
                    Cmd::AddTable(Family::Ip, TABLE.into())
                ]
            );
        }
    }
}
