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
    /// `meta <key>` (`nfproto`, `iifname`, `mark`, …).
    Meta(&'static str),
    /// `<protocol> <field>` spelled out, for when the value does not tell the family (`ip6 saddr
    /// { … }`) or the field has no variant of its own (`tcp sport`, `ip protocol`).
    Payload(&'static str, &'static str),
}

/// A match's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Gt => ">",
            Op::Le => "<=",
            Op::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Net(IpNetwork),
    Addr(IpAddr),
    Int(u64),
    /// A symbol nft resolves by the field it is compared with (`local`, `ipv4`, `tcp`, an
    /// interface name): a JSON string, never parsed as nft syntax.
    Str(String),
    /// An anonymous set `{ a, b }`.
    Set(Vec<Val>),
    /// `lo-hi`.
    Range(Box<Val>, Box<Val>),
}

/// nft's `meta nfproto` values: which family an inet-table rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NfProto {
    Ipv4,
    Ipv6,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `<field> <op> value`.
    Match {
        field: Field,
        op: Op,
        value: Val,
    },
    Accept,
    Drop,
    Return,
    Jump(String),
    Masquerade {
        fully_random: bool,
    },
    /// `dnat ip to addr[:port]` / `dnat ip6 to [addr][:port]`; the family is the address's,
    /// which an inet table requires.
    Dnat {
        addr: IpAddr,
        port: Option<u16>,
    },
    /// `meta mark set meta mark | bits`.
    MarkSetOr(u32),
}

impl Expr {
    pub fn is(field: Field, value: Val) -> Expr {
        Expr::Match {
            field,
            op: Op::Eq,
            value,
        }
    }

    pub fn is_not(field: Field, value: Val) -> Expr {
        Expr::Match {
            field,
            op: Op::Ne,
            value,
        }
    }

    /// `meta nfproto ipv4|ipv6`: restricts a rule of an inet table to one family.
    pub fn nfproto(p: NfProto) -> Expr {
        let v = match p {
            NfProto::Ipv4 => "ipv4",
            NfProto::Ipv6 => "ipv6",
        };
        Expr::is(Field::Meta("nfproto"), Val::Str(v.into()))
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
    /// Adds the rule at the top of its chain.
    InsertRule(Rule),
    DeleteRule {
        family: Family,
        table: String,
        chain: String,
        handle: u64,
    },
    /// Removes every rule of the chain, keeps the chain.
    FlushChain {
        family: Family,
        table: String,
        name: String,
    },
}

fn addr_family(v: &Val) -> &'static str {
    match v {
        Val::Net(IpNetwork::V6(_)) | Val::Addr(IpAddr::V6(_)) => "ip6",
        Val::Set(items) => items.first().map_or("ip", addr_family),
        Val::Range(lo, _) => addr_family(lo),
        _ => "ip",
    }
}

fn val(v: &Val) -> Value {
    match v {
        Val::Net(n) => json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix()}}),
        Val::Addr(a) => json!(a.to_string()),
        Val::Int(i) => json!(i),
        Val::Str(s) => json!(s),
        Val::Set(items) => json!({ "set": items.iter().map(val).collect::<Vec<_>>() }),
        Val::Range(lo, hi) => json!({ "range": [val(lo), val(hi)] }),
    }
}

fn expr(e: &Expr) -> Value {
    match e {
        Expr::Match { field, op, value } => {
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
                Field::Meta(key) => json!({"meta": {"key": key}}),
                Field::Payload(proto, f) => json!({"payload": {"protocol": proto, "field": f}}),
            };
            json!({"match": {"op": op.as_str(), "left": left, "right": val(value)}})
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
        Expr::MarkSetOr(bits) => json!({"mangle": {
            "key": {"meta": {"key": "mark"}},
            "value": {"|": [{"meta": {"key": "mark"}}, bits]}
        }}),
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
            Cmd::InsertRule(r) => json!({"insert": {"rule": rule_obj(r)}}),
            Cmd::DeleteRule {
                family,
                table,
                chain,
                handle,
            } => json!({"delete": {"rule": {
                "family": family.as_str(), "table": table, "chain": chain, "handle": handle
            }}}),
            Cmd::FlushChain {
                family,
                table,
                name,
            } => {
                json!({"flush": {"chain": {"family": family.as_str(), "table": table, "name": name}}})
            }
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
    fn inet_matches_marks_dnat_and_jumps_render_to_nfts_json_schema() {
        // Each as `nft -j list` shows what the nft text in the comment adds.
        let m = |left: Value, op: &str, right: Value| json!({"match": {"op": op, "left": left, "right": right}});
        // meta nfproto ipv6
        assert_eq!(
            expr(&Expr::nfproto(NfProto::Ipv6)),
            m(json!({"meta": {"key": "nfproto"}}), "==", json!("ipv6"))
        );
        // fib daddr type local
        assert_eq!(
            expr(&Expr::is(Field::FibDaddrType, Val::Str("local".into()))),
            m(
                json!({"fib": {"result": "type", "flags": ["daddr"]}}),
                "==",
                json!("local")
            )
        );
        // meta mark set meta mark | 0x2000
        assert_eq!(
            expr(&Expr::MarkSetOr(0x2000)),
            json!({"mangle": {"key": {"meta": {"key": "mark"}},
                              "value": {"|": [{"meta": {"key": "mark"}}, 8192]}}})
        );
        // dnat ip to 10.1.0.5:80 / dnat ip6 to [fd00::5]:80 (an inet table needs the family)
        assert_eq!(
            expr(&Expr::Dnat {
                addr: "10.1.0.5".parse().unwrap(),
                port: Some(80)
            }),
            json!({"dnat": {"family": "ip", "addr": "10.1.0.5", "port": 80}})
        );
        assert_eq!(
            expr(&Expr::Dnat {
                addr: "fd00::5".parse().unwrap(),
                port: None
            }),
            json!({"dnat": {"family": "ip6", "addr": "fd00::5"}})
        );
        // jump hostports
        assert_eq!(
            expr(&Expr::Jump("hostports".into())),
            json!({"jump": {"target": "hostports"}})
        );
        // ip6 saddr != { fd00::1, fd00::/64 } (family from the set's elements)
        let set = Val::Set(vec![
            Val::Addr("fd00::1".parse().unwrap()),
            Val::Net("fd00::/64".parse().unwrap()),
        ]);
        assert_eq!(
            expr(&Expr::is_not(Field::Saddr, set)),
            m(
                json!({"payload": {"protocol": "ip6", "field": "saddr"}}),
                "!=",
                json!({"set": ["fd00::1", {"prefix": {"addr": "fd00::", "len": 64}}]})
            )
        );
        // tcp sport >= 1-5 (any op; ranges)
        assert_eq!(
            expr(&Expr::Match {
                field: Field::Payload("tcp", "sport"),
                op: Op::Ge,
                value: Val::Range(Box::new(Val::Int(1)), Box::new(Val::Int(5))),
            }),
            m(
                json!({"payload": {"protocol": "tcp", "field": "sport"}}),
                ">=",
                json!({"range": [1, 5]})
            )
        );
        // iifname "eth0"
        assert_eq!(
            expr(&Expr::is(Field::Meta("iifname"), Val::Str("eth0".into())))["match"]["left"],
            json!({"meta": {"key": "iifname"}})
        );
        for (o, s) in [(Op::Lt, "<"), (Op::Gt, ">"), (Op::Le, "<="), (Op::Eq, "==")] {
            assert_eq!(o.as_str(), s);
        }
    }

    #[test]
    fn insert_delete_and_flush_commands() {
        let r = Rule {
            family: Family::Inet,
            table: "t".into(),
            chain: "c".into(),
            exprs: vec![Expr::Accept],
            comment: Some("k d4t80".into()),
        };
        // insert rule inet t c accept comment "k d4t80" (at the top of the chain)
        assert_eq!(
            Cmd::InsertRule(r).to_json(),
            json!({"insert": {"rule": {"family": "inet", "table": "t", "chain": "c",
                "comment": "k d4t80", "expr": [{"accept": null}]}}})
        );
        // delete rule inet t c handle 7
        assert_eq!(
            Cmd::DeleteRule {
                family: Family::Inet,
                table: "t".into(),
                chain: "c".into(),
                handle: 7
            }
            .to_json(),
            json!({"delete": {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 7}}})
        );
        let chain = json!({"family": "inet", "table": "t", "name": "c"});
        // flush chain inet t c
        assert_eq!(
            Cmd::FlushChain {
                family: Family::Inet,
                table: "t".into(),
                name: "c".into()
            }
            .to_json(),
            json!({"flush": {"chain": chain}})
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
