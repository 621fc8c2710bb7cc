//! Masquerade of pod traffic leaving its subnet, in twill's own nftables table
//! `inet twill_masq`. Rules carry a comment keyed by network name + container ID (not by IP),
//! so DEL without a netns or `prevResult`, and GC, still find them.
//!
//! Driven with `nft -j -f -` from typed commands ([`model`]): no value is ever parsed as nft
//! syntax, the comment included.

use ipnetwork::IpNetwork;
use twill_common::cni::{Attachment, CniError};
use twill_common::nft;
use twill_common::nft::model::{
    self, Base, ChainType, Cmd, Expr, Family, Field, Hook, Rule, Val, PRIO_SRCNAT,
};

use crate::nft_rules;

const TABLE: &str = "twill_masq";
const CHAIN: &str = "postrouting";

/// The rule comment of one attachment: readable when it fits nft's 128-byte limit, hashed otherwise.
pub fn key(network: &str, container_id: &str) -> String {
    nft_rules::key("twill", &[network, container_id], 120)
}

fn network_prefixes(network: &str) -> [String; 2] {
    nft_rules::prefixes("twill", &[network])
}

/// The commands that add the attachment's rules (and the table and chain if missing): one
/// masquerade rule per address: `saddr ip, daddr outside its subnet, outside every `exclude`
/// prefix of its family (the cluster network: pod→pod keeps the pod's source IP), and not
/// multicast`. Pure.
pub fn commands(
    network: &str,
    container_id: &str,
    addrs: &[IpNetwork],
    exclude: &[IpNetwork],
) -> Result<Vec<Cmd>, CniError> {
    let k = key(network, container_id);
    let mut cmds = vec![
        Cmd::AddTable(Family::Inet, TABLE.into()),
        Cmd::AddChain {
            family: Family::Inet,
            table: TABLE.into(),
            name: CHAIN.into(),
            base: Some(Base {
                kind: ChainType::Nat,
                hook: Hook::Postrouting,
                prio: PRIO_SRCNAT,
                accept: true,
            }),
        },
    ];
    let prefix = |n: &IpNetwork| {
        IpNetwork::new(n.network(), n.prefix()).map_err(|e| CniError::internal(e.to_string()))
    };
    for a in addrs {
        let mcast: IpNetwork = if a.is_ipv4() {
            "224.0.0.0/4"
        } else {
            "ff00::/8"
        }
        .parse()
        .map_err(|e: ipnetwork::IpNetworkError| CniError::internal(e.to_string()))?;
        // One `daddr !=` per prefix (all must hold): an anonymous set would refuse the
        // overlapping subnet and cluster network.
        let mut skip = vec![prefix(a)?];
        for e in exclude.iter().filter(|e| e.is_ipv4() == a.is_ipv4()) {
            let e = prefix(e)?;
            if !skip.contains(&e) {
                skip.push(e);
            }
        }
        skip.push(mcast);
        let mut exprs = vec![Expr::is(Field::Saddr, Val::Addr(a.ip()))];
        exprs.extend(
            skip.into_iter()
                .map(|n| Expr::is_not(Field::Daddr, Val::Net(n))),
        );
        exprs.push(Expr::Masquerade {
            fully_random: false,
        });
        cmds.push(Cmd::AddRule(Rule {
            family: Family::Inet,
            table: TABLE.into(),
            chain: CHAIN.into(),
            exprs,
            comment: Some(k.clone()),
        }));
    }
    Ok(cmds)
}

/// Adds the attachment's masquerade rules (see [`commands`]) in one transaction.
pub fn add(
    network: &str,
    container_id: &str,
    addrs: &[IpNetwork],
    exclude: &[IpNetwork],
) -> Result<(), CniError> {
    if addrs.is_empty() {
        return Ok(());
    }
    let script = model::script(&commands(network, container_id, addrs, exclude)?);
    nft::run(&["-j", "-f", "-"], Some(&script))
        .map(|_| ())
        .map_err(|e| CniError::internal(e.to_string()))
}

/// Comments of the rules in the chain; empty when the table does not exist.
fn rules() -> Result<Vec<String>, CniError> {
    Ok(nft_rules::list(Family::Inet, TABLE)?
        .into_iter()
        .filter(|r| r.chain == CHAIN)
        .map(|r| r.comment)
        .collect())
}

/// Deletes the rules `select` picks; one already gone is success (see [`nft_rules::replace`]).
fn delete_matching(select: impl Fn(&str) -> bool) -> Result<(), CniError> {
    nft_rules::replace(
        Family::Inet,
        TABLE,
        |r| r.chain == CHAIN && select(&r.comment),
        &[],
    )
    .map(|_| ())
}

/// Removes the rules of one attachment; nothing to remove is success.
pub fn del(network: &str, container_id: &str) -> Result<(), CniError> {
    let k = key(network, container_id);
    delete_matching(|c| c == k)
}

/// Whether the attachment has its rules (CHECK).
pub fn present(network: &str, container_id: &str) -> Result<bool, CniError> {
    let k = key(network, container_id);
    Ok(rules()?.contains(&k))
}

/// Removes this network's rules whose container is not in `valid`.
pub fn gc(network: &str, valid: &[Attachment]) -> Result<(), CniError> {
    let keep: Vec<String> = valid
        .iter()
        .map(|a| key(network, &a.container_id))
        .collect();
    let prefixes = network_prefixes(network);
    delete_matching(|c| {
        prefixes.iter().any(|p| c.starts_with(p.as_str())) && !keep.iter().any(|k| k == c)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(key("cbr0", "abc"), "twill:cbr0:abc");
        let long = "a".repeat(200);
        assert!(key("cbr0", &long).starts_with("twill#"));
        assert!(key("cbr0", "x\"y").starts_with("twill#"));
        assert!(network_prefixes("cbr0")
            .iter()
            .any(|p| key("cbr0", &long).starts_with(p.as_str())));
        assert!(!key("cbr01", "abc").starts_with(&network_prefixes("cbr0")[0]));
    }

    /// nft itself takes the rendered JSON (`-c`: checked, nothing is committed).
    #[test]
    #[ignore = "needs root: scripts/test.sh root"]
    fn nft_accepts_the_commands() {
        let addrs: Vec<IpNetwork> = vec![
            "10.1.0.5/24".parse().unwrap(),
            "fd00::5/64".parse().unwrap(),
        ];
        let exclude: Vec<IpNetwork> = vec!["10.0.0.0/8".parse().unwrap()];
        let script = model::script(&commands("cbr0", "abc", &addrs, &exclude).unwrap());
        nft::run(&["-j", "-c", "-f", "-"], Some(&script))
            .unwrap_or_else(|e| panic!("{e}\n{script}"));
    }

    #[test]
    fn one_rule_per_address_skipping_subnet_cluster_and_multicast() {
        let addrs: Vec<IpNetwork> = vec![
            "10.1.0.5/24".parse().unwrap(),
            "fd00::5/64".parse().unwrap(),
        ];
        let exclude: Vec<IpNetwork> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "10.1.0.0/24".parse().unwrap(),
            "fd00::/48".parse().unwrap(),
        ];
        let cmds = commands("cbr0", "abc", &addrs, &exclude).unwrap();
        let j: Vec<serde_json::Value> = cmds.iter().map(Cmd::to_json).collect();
        assert_eq!(
            j[1]["add"]["chain"],
            serde_json::json!({"family": "inet", "table": "twill_masq", "name": "postrouting",
                "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"})
        );
        let rule = |i: usize| j[i]["add"]["rule"].clone();
        assert_eq!(rule(2)["comment"], "twill:cbr0:abc");
        let m = |op: &str, p: &str, f: &str, right: serde_json::Value| serde_json::json!({"match": {"op": op, "left": {"payload": {"protocol": p, "field": f}}, "right": right}});
        let pfx = |a: &str, l: u8| serde_json::json!({"prefix": {"addr": a, "len": l}});
        assert_eq!(
            rule(2)["expr"],
            serde_json::json!([
                m("==", "ip", "saddr", "10.1.0.5".into()),
                m("!=", "ip", "daddr", pfx("10.1.0.0", 24)),
                m("!=", "ip", "daddr", pfx("10.0.0.0", 8)),
                m("!=", "ip", "daddr", pfx("224.0.0.0", 4)),
                {"masquerade": null}
            ])
        );
        assert_eq!(
            rule(3)["expr"],
            serde_json::json!([
                m("==", "ip6", "saddr", "fd00::5".into()),
                m("!=", "ip6", "daddr", pfx("fd00::", 64)),
                m("!=", "ip6", "daddr", pfx("fd00::", 48)),
                m("!=", "ip6", "daddr", pfx("ff00::", 8)),
                {"masquerade": null}
            ])
        );
        assert_eq!(j.len(), 4);
    }
}
