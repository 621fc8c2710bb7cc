//! Native nftables chains that drop forwarded traffic (a host firewall's `table inet filter`
//! with `policy drop`, say): accept rules for the pod network at the top of that chain,
//! present only while it drops. Pure: `nft -j` listings in, `nft -j -f -` commands out.
//!
//! JSON both ways, because table and chain names come from the kernel: in nft's text syntax a
//! name that is also a keyword (e.g. `fwd`) cannot be written, and nothing needs quoting in
//! JSON.

use ipnetwork::Ipv4Network;
use serde_json::{json, Value};

use super::{canonical, COMMENT};

/// A forward-hook base chain of another table that twill may have to accept in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardChain {
    pub family: String,
    pub table: String,
    pub name: String,
    /// `policy drop`.
    pub drops: bool,
}

/// Tables iptables-nft keeps in family `ip`; their `FORWARD` chains are handled through the
/// iptables-nft binary (`TWILL-FWD`), since native rules there would break iptables-nft-save.
const IPTABLES_TABLES: [&str; 5] = ["filter", "mangle", "raw", "security", "nat"];

/// The forward-hook base chains in `nft -j list chains` output that can carry IPv4 rules
/// (families `ip` and `inet`), leaving out twill's own table and iptables-nft's chains.
pub fn forward_chains(listing: &Value, own_table: &str) -> Vec<ForwardChain> {
    let Some(items) = listing.get("nftables").and_then(Value::as_array) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| i.get("chain"))
        .filter(|c| c.get("hook").and_then(Value::as_str) == Some("forward"))
        .filter_map(|c| {
            let field = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
            let (family, table, name) = (field("family")?, field("table")?, field("name")?);
            if !matches!(family.as_str(), "ip" | "inet") {
                return None;
            }
            if family == "ip"
                && (table == own_table
                    || (name == "FORWARD" && IPTABLES_TABLES.contains(&table.as_str())))
            {
                return None;
            }
            let drops = field("policy").as_deref() == Some("drop");
            Some(ForwardChain {
                family,
                table,
                name,
                drops,
            })
        })
        .collect()
}

/// twill's rules in `nft -j list chain …` output: `(handle, expressions)`, recognised by
/// their comment.
pub fn our_rules(listing: &Value) -> Vec<(u64, Value)> {
    let Some(items) = listing.get("nftables").and_then(Value::as_array) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter(|r| r.get("comment").and_then(Value::as_str) == Some(COMMENT))
        .filter_map(|r| Some((r.get("handle")?.as_u64()?, r.get("expr")?.clone())))
        .collect()
}

/// `ip saddr|daddr <network> accept`, as nft lists it back.
fn accept_expr(field: &str, network: Ipv4Network) -> Value {
    let n = canonical(network);
    json!([
        {"match": {"op": "==",
                   "left": {"payload": {"protocol": "ip", "field": field}},
                   "right": {"prefix": {"addr": n.network().to_string(), "len": n.prefix()}}}},
        {"accept": null}
    ])
}

/// Commands (for one `nft -j -f -` transaction) bringing `chain`, whose twill rules are
/// `ours`, in line: both accepts while it drops, none otherwise. Empty when nothing to do.
pub fn plan(chain: &ForwardChain, ours: &[(u64, Value)], network: Ipv4Network) -> Vec<Value> {
    let want = [accept_expr("saddr", network), accept_expr("daddr", network)];
    let complete =
        ours.len() == want.len() && want.iter().all(|w| ours.iter().any(|(_, e)| e == w));
    if chain.drops && complete {
        return Vec::new();
    }
    let at = |extra: Value| {
        let mut r = json!({"family": chain.family, "table": chain.table, "chain": chain.name});
        if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
            r.extend(extra.clone());
        }
        r
    };
    let mut cmds: Vec<Value> = ours
        .iter()
        .map(|(h, _)| json!({"delete": {"rule": at(json!({"handle": h}))}}))
        .collect();
    if chain.drops {
        // Each insert goes to the head: the saddr rule ends up first.
        for e in want.into_iter().rev() {
            cmds.push(json!({"insert": {"rule": at(json!({"comment": COMMENT, "expr": e}))}}));
        }
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Ipv4Network {
        "10.5.0.0/16".parse().unwrap()
    }

    fn chain(drops: bool) -> ForwardChain {
        ForwardChain {
            family: "inet".into(),
            table: "fw".into(),
            name: "fwd".into(),
            drops,
        }
    }

    /// `nft -j list chains` of a host with a native firewall, iptables-nft, twill's table and
    /// an ip6 chain (nft 1.0.6's output).
    const CHAINS: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"chain": {"family": "inet", "table": "fw", "name": "fwd", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "fw", "name": "reg", "handle": 4}},
        {"chain": {"family": "inet", "table": "fw", "name": "input", "handle": 5, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "ip", "table": "filter", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "twill", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
        {"chain": {"family": "ip6", "table": "x", "name": "f", "handle": 1, "type": "filter", "hook": "forward", "prio": 10, "policy": "drop"}}]}"#;

    /// `nft -j list chain inet fw fwd` with one twill rule and one of the firewall's.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"chain": {"family": "inet", "table": "fw", "name": "fwd", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
        {"rule": {"family": "inet", "table": "fw", "chain": "fwd", "handle": 3, "comment": "twill forward", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.5.0.0", "len": 16}}}}, {"accept": null}]}},
        {"rule": {"family": "inet", "table": "fw", "chain": "fwd", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"drop": null}]}}]}"#;

    #[test]
    fn finds_other_tables_forward_chains_only() {
        let chains = forward_chains(&serde_json::from_str(CHAINS).unwrap(), "twill");
        assert_eq!(
            chains,
            [
                chain(true),
                ForwardChain {
                    family: "ip".into(),
                    table: "filter".into(),
                    name: "forward".into(),
                    drops: false
                }
            ]
        );
        assert!(forward_chains(&json!({}), "twill").is_empty());
    }

    #[test]
    fn recognises_twills_rules_by_comment() {
        let ours = our_rules(&serde_json::from_str(LISTED).unwrap());
        assert_eq!(ours, [(3, accept_expr("saddr", net()))]);
    }

    fn insert(field: &str) -> Value {
        json!({"insert": {"rule": {"family": "inet", "table": "fw", "chain": "fwd",
            "comment": "twill forward", "expr": accept_expr(field, net())}}})
    }

    fn delete(h: u64) -> Value {
        json!({"delete": {"rule": {"family": "inet", "table": "fw", "chain": "fwd", "handle": h}}})
    }

    #[test]
    fn dropping_chain_gets_both_accepts_and_keeps_them() {
        assert_eq!(
            plan(&chain(true), &[], net()),
            [insert("daddr"), insert("saddr")]
        );
        let ours = [
            (7, accept_expr("daddr", net())),
            (8, accept_expr("saddr", net())),
        ];
        assert!(plan(&chain(true), &ours, net()).is_empty());
        let host_bits: Ipv4Network = "10.5.9.9/16".parse().unwrap();
        assert!(plan(&chain(true), &ours, host_bits).is_empty());
    }

    #[test]
    fn partial_or_stale_rules_are_replaced() {
        let ours = our_rules(&serde_json::from_str(LISTED).unwrap());
        assert_eq!(
            plan(&chain(true), &ours, net()),
            [delete(3), insert("daddr"), insert("saddr")]
        );
        let old: Ipv4Network = "10.9.0.0/16".parse().unwrap();
        let ours = [
            (7, accept_expr("daddr", old)),
            (8, accept_expr("saddr", old)),
        ];
        assert_eq!(
            plan(&chain(true), &ours, net()),
            [delete(7), delete(8), insert("daddr"), insert("saddr")]
        );
    }

    #[test]
    fn chain_that_stopped_dropping_loses_twills_rules_only() {
        let ours = [
            (7, accept_expr("daddr", net())),
            (8, accept_expr("saddr", net())),
        ];
        assert_eq!(plan(&chain(false), &ours, net()), [delete(7), delete(8)]);
        assert!(plan(&chain(false), &[], net()).is_empty());
    }
}
