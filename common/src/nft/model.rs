//! A typed model of the nftables objects twill writes, rendered to nft's JSON schema
//! (`nft -j -f -`): tables, base chains and rules built from typed matches and verdicts, so no
//! rule is a `format!` string, and a listing is compared as a structure, not as text.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

/// A base chain's hook, type, priority and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    pub kind: ChainType,
    pub hook: Hook,
    pub prio: i32,
    /// true: policy accept, false: policy drop.
    pub accept: bool,
}

/// nft's named priorities.
pub const PRIO_SRCNAT: i32 = 100;
pub const PRIO_DSTNAT: i32 = -100;
pub const PRIO_FILTER: i32 = 0;

/// What a match looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// `ip saddr` / `ip6 saddr` (by the address family of the value).
    Saddr,
    Daddr,
    /// `meta mark & mask`.
    MarkAnd(u32),
    /// `tcp dport` / `udp dport` / `sctp dport`.
    Dport(&'static str),
    /// `fib daddr type`.
    FibDaddrType,
    /// `meta l4proto`.
    L4proto,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Net(IpNetwork),
    Addr(IpAddr),
    Int(u64),
    Str(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `<field> == value` (or `!=` when `neg`).
    Match {
        field: Field,
        neg: bool,
        value: Val,
    },
    Accept,
    Drop,
    Return,
    Jump(String),
    Masquerade {
        fully_random: bool,
    },
    Dnat {
        addr: IpAddr,
        port: Option<u16>,
    },
}

impl Expr {
    pub fn is(field: Field, value: Val) -> Expr {
        Expr::Match {
            field,
            neg: false,
            value,
        }
    }

    pub fn is_not(field: Field, value: Val) -> Expr {
        Expr::Match {
            field,
            neg: true,
            value,
        }
    }
}

/// One rule of `family table chain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub family: Family,
    pub table: String,
    pub chain: String,
    pub exprs: Vec<Expr>,
    pub comment: Option<String>,
}

/// The commands of one `nft -j -f -` transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    AddTable(Family, String),
    DeleteTable(Family, String),
    AddChain {
        family: Family,
        table: String,
        name: String,
        base: Option<Base>,
    },
    AddRule(Rule),
}

fn addr_family(v: &Val) -> &'static str {
    match v {
        Val::Net(IpNetwork::V6(_)) | Val::Addr(IpAddr::V6(_)) => "ip6",
        _ => "ip",
    }
}

fn val(v: &Val) -> Value {
    match v {
        Val::Net(n) => json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix()}}),
        Val::Addr(a) => json!(a.to_string()),
        Val::Int(i) => json!(i),
        Val::Str(s) => json!(s),
    }
}

fn expr(e: &Expr) -> Value {
    match e {
        Expr::Match { field, neg, value } => {
            let left = match field {
                Field::Saddr => {
                    json!({"payload": {"protocol": addr_family(value), "field": "saddr"}})
                }
                Field::Daddr => {
                    json!({"payload": {"protocol": addr_family(value), "field": "daddr"}})
                }
                Field::MarkAnd(mask) => json!({"&": [{"meta": {"key": "mark"}}, mask]}),
                Field::Dport(proto) => json!({"payload": {"protocol": proto, "field": "dport"}}),
                Field::FibDaddrType => json!({"fib": {"result": "type", "flags": ["daddr"]}}),
                Field::L4proto => json!({"meta": {"key": "l4proto"}}),
            };
            json!({"match": {"op": if *neg { "!=" } else { "==" }, "left": left, "right": val(value)}})
        }
        Expr::Accept => json!({"accept": null}),
        Expr::Drop => json!({"drop": null}),
        Expr::Return => json!({"return": null}),
        Expr::Jump(t) => json!({"jump": {"target": t}}),
        Expr::Masquerade { fully_random } => {
            if *fully_random {
                json!({"masquerade": {"flags": ["fully-random"]}})
            } else {
                json!({"masquerade": null})
            }
        }
        Expr::Dnat { addr, port } => {
            let mut m = Map::new();
            m.insert("addr".into(), json!(addr.to_string()));
            if let Some(p) = port {
                m.insert("port".into(), json!(p));
            }
            if addr.is_ipv6() {
                m.insert("family".into(), json!("ip6"));
            } else {
                m.insert("family".into(), json!("ip"));
            }
            json!({ "dnat": m })
        }
    }
}

fn rule_obj(r: &Rule) -> Value {
    let mut o = json!({
        "family": r.family.as_str(),
        "table": r.table,
        "chain": r.chain,
        "expr": r.exprs.iter().map(expr).collect::<Vec<_>>(),
    });
    if let Some(c) = &r.comment {
        o["comment"] = json!(c);
    }
    o
}

impl Cmd {
    pub fn to_json(&self) -> Value {
        match self {
            Cmd::AddTable(f, t) => json!({"add": {"table": {"family": f.as_str(), "name": t}}}),
            Cmd::DeleteTable(f, t) => {
                json!({"delete": {"table": {"family": f.as_str(), "name": t}}})
            }
            Cmd::AddChain {
                family,
                table,
                name,
                base,
            } => {
                let mut c = json!({"family": family.as_str(), "table": table, "name": name});
                if let Some(b) = base {
                    c["type"] = json!(match b.kind {
                        ChainType::Filter => "filter",
                        ChainType::Nat => "nat",
                    });
                    c["hook"] = json!(match b.hook {
                        Hook::Prerouting => "prerouting",
                        Hook::Input => "input",
                        Hook::Forward => "forward",
                        Hook::Output => "output",
                        Hook::Postrouting => "postrouting",
                    });
                    c["prio"] = json!(b.prio);
                    c["policy"] = json!(if b.accept { "accept" } else { "drop" });
                }
                json!({"add": {"chain": c}})
            }
            Cmd::AddRule(r) => json!({"add": {"rule": rule_obj(r)}}),
        }
    }
}

/// The document `nft -j -f -` takes.
pub fn script(cmds: &[Cmd]) -> String {
    let list: Vec<Value> = cmds.iter().map(Cmd::to_json).collect();
    json!({ "nftables": list }).to_string()
}

/// A listing (`nft -j list …`) without what changes on every (re)install — handles, the
/// metainfo header — so two listings compare equal exactly when the rules are the same.
pub fn normalized(listing: &Value) -> Value {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| k.as_str() != "handle")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(
                a.iter()
                    .filter(|x| x.get("metainfo").is_none())
                    .map(strip)
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    strip(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_to_nfts_json_schema() {
        let r = Rule {
            family: Family::Ip,
            table: "twill".into(),
            chain: "postrtg".into(),
            exprs: vec![
                Expr::is(Field::Saddr, Val::Net("10.5.0.0/16".parse().unwrap())),
                Expr::is_not(Field::Daddr, Val::Net("224.0.0.0/4".parse().unwrap())),
                Expr::Masquerade { fully_random: true },
            ],
            comment: None,
        };
        let j = Cmd::AddRule(r).to_json();
        assert_eq!(
            j,
            json!({"add": {"rule": {"family": "ip", "table": "twill", "chain": "postrtg", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                           "right": {"prefix": {"addr": "10.5.0.0", "len": 16}}}},
                {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                           "right": {"prefix": {"addr": "224.0.0.0", "len": 4}}}},
                {"masquerade": {"flags": ["fully-random"]}}
            ]}}})
        );
        let v6 = expr(&Expr::is(
            Field::Saddr,
            Val::Net("fd00::/8".parse().unwrap()),
        ));
        assert_eq!(v6["match"]["left"]["payload"]["protocol"], "ip6");
        let mark = expr(&Expr::is(Field::MarkAnd(0x4000), Val::Int(0x4000)));
        assert_eq!(
            mark["match"]["left"],
            json!({"&": [{"meta": {"key": "mark"}}, 16384]})
        );
        let chain = Cmd::AddChain {
            family: Family::Ip,
            table: "twill".into(),
            name: "postrtg".into(),
            base: Some(Base {
                kind: ChainType::Nat,
                hook: Hook::Postrouting,
                prio: PRIO_SRCNAT,
                accept: true,
            }),
        };
        assert_eq!(
            chain.to_json()["add"]["chain"],
            json!({"family": "ip", "table": "twill", "name": "postrtg", "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"})
        );
        let doc: Value =
            serde_json::from_str(&script(&[Cmd::AddTable(Family::Ip, "t".into())])).unwrap();
        assert_eq!(
            doc["nftables"][0],
            json!({"add": {"table": {"family": "ip", "name": "t"}}})
        );
    }

    #[test]
    fn normalized_listings_ignore_handles_and_metainfo() {
        let a = json!({"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "twill", "handle": 7}},
            {"rule": {"family": "ip", "table": "twill", "chain": "c", "handle": 3, "expr": [{"accept": null}]}}]});
        let b = json!({"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "twill", "handle": 9}},
            {"rule": {"family": "ip", "table": "twill", "chain": "c", "handle": 4, "expr": [{"accept": null}]}}]});
        assert_eq!(normalized(&a), normalized(&b));
        let c = json!({"nftables": [{"table": {"family": "ip", "name": "twill", "handle": 9}},
            {"rule": {"family": "ip", "table": "twill", "chain": "c", "handle": 4, "expr": [{"drop": null}]}}]});
        assert_ne!(normalized(&a), normalized(&c));
    }
}
