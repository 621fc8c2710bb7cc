//! `conditionsV4` / `conditionsV6`: the reference portmap splices these strings, joined by
//! spaces, into its nft rules. twill writes its rules as typed JSON (`nft -j -f -`), where no
//! string is parsed as nft syntax, so the conditions are parsed here into typed matches.
//!
//! Why a parser and not a raw-text escape hatch: nft's JSON input has no expression that takes
//! nft text, and nft 1.0.6 cannot translate text to JSON without committing it (`--check`
//! prints nothing, `--echo -j` drops text input), so raw text would need a second transaction
//! on a scratch table per ADD — an extra nft run and a window where other tools see it.
//!
//! Accepted: a sequence of matches `<selector> [<op>] <value>`, where
//! - selector: `ip saddr|daddr|protocol`, `ip6 saddr|daddr|nexthdr`, `tcp|udp|sctp sport|dport`,
//!   `meta iifname|oifname|iif|oif|mark|l4proto|nfproto` (the `meta` may be left out), and
//!   `[meta] mark & <mask>`;
//! - op: `==`, `!=`, `<`, `>`, `<=`, `>=` or `eq`, `ne`, `lt`, `gt`, `le`, `ge`; none means `==`;
//! - value: an address, a prefix `a/len`, an integer (decimal or `0x…`), a range `lo-hi` of
//!   integers or addresses, a plain word (`eth0`, `tcp`), or a set `{ v, v … }` of those.
//!
//! Anything else is refused with code 7 when the config is loaded, before anything changes.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use twill_common::cni::CniError;
use twill_common::nft::model::{Expr, Field, Op, Val};

fn bad(all: &str, why: &str) -> CniError {
    CniError::invalid_config(format!(
        "invalid conditions {all:?}: {why} (accepted: `<selector> [op] <value>` matches on \
         ip/ip6 saddr/daddr, ip protocol, ip6 nexthdr, tcp/udp/sctp sport/dport, meta \
         iifname/oifname/iif/oif/mark/l4proto/nfproto, mark & mask)"
    ))
}

/// Words, with `{`, `}` and `,` as words of their own.
fn tokens(s: &str) -> Vec<String> {
    let spaced = s
        .replace('{', " { ")
        .replace('}', " } ")
        .replace(',', " , ");
    spaced.split_whitespace().map(str::to_string).collect()
}

fn meta_key(w: &str) -> Option<&'static str> {
    Some(match w {
        "iifname" => "iifname",
        "oifname" => "oifname",
        "iif" => "iif",
        "oif" => "oif",
        "mark" => "mark",
        "l4proto" => "l4proto",
        "nfproto" => "nfproto",
        _ => return None,
    })
}

fn payload(proto: &str, field: &str) -> Option<Field> {
    let proto = match proto {
        "ip" => "ip",
        "ip6" => "ip6",
        "tcp" => "tcp",
        "udp" => "udp",
        "sctp" => "sctp",
        _ => return None,
    };
    let field = match (proto, field) {
        ("ip" | "ip6", "saddr") => "saddr",
        ("ip" | "ip6", "daddr") => "daddr",
        ("ip", "protocol") => "protocol",
        ("ip6", "nexthdr") => "nexthdr",
        ("tcp" | "udp" | "sctp", "sport") => "sport",
        ("tcp" | "udp" | "sctp", "dport") => "dport",
        _ => return None,
    };
    Some(Field::Payload(proto, field))
}

fn op(w: &str) -> Option<Op> {
    Some(match w {
        "==" | "eq" => Op::Eq,
        "!=" | "ne" => Op::Ne,
        "<" | "lt" => Op::Lt,
        ">" | "gt" => Op::Gt,
        "<=" | "le" => Op::Le,
        ">=" | "ge" => Op::Ge,
        _ => return None,
    })
}

fn int(w: &str) -> Option<u64> {
    match w.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None if w.bytes().all(|b| b.is_ascii_digit()) => w.parse().ok(),
        None => None,
    }
}

fn word(w: &str) -> bool {
    w.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

fn single(w: &str) -> Option<Val> {
    if let Some(i) = int(w) {
        return Some(Val::Int(i));
    }
    if let Ok(a) = w.parse::<IpAddr>() {
        return Some(Val::Addr(a));
    }
    if w.contains('/') {
        let n: IpNetwork = w.parse().ok()?;
        return IpNetwork::new(n.network(), n.prefix()).ok().map(Val::Net);
    }
    if let Some((lo, hi)) = w.split_once('-') {
        match (int(lo), int(hi)) {
            (Some(l), Some(h)) => {
                return Some(Val::Range(Box::new(Val::Int(l)), Box::new(Val::Int(h))))
            }
            _ => {
                if let (Ok(l), Ok(h)) = (lo.parse::<IpAddr>(), hi.parse::<IpAddr>()) {
                    return Some(Val::Range(Box::new(Val::Addr(l)), Box::new(Val::Addr(h))));
                }
            }
        }
    }
    word(w).then(|| Val::Str(w.to_string()))
}

/// The conditions of one family as typed matches, in order.
pub fn parse(conditions: &[String]) -> Result<Vec<Expr>, CniError> {
    let all = conditions.join(" ");
    let t = tokens(&all);
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| t.get(i).map(String::as_str);
    while i < t.len() {
        // Selector.
        let mut field = if at(i) == Some("meta") {
            i += 1;
            let k = at(i)
                .and_then(meta_key)
                .ok_or_else(|| bad(&all, "unknown meta key"))?;
            i += 1;
            Field::Meta(k)
        } else if let Some(k) = at(i).and_then(meta_key) {
            i += 1;
            Field::Meta(k)
        } else {
            let f = match (at(i), at(i + 1)) {
                (Some(p), Some(f)) => payload(p, f),
                _ => None,
            }
            .ok_or_else(|| bad(&all, &format!("unknown selector at {:?}", at(i))))?;
            i += 2;
            f
        };
        if field == Field::Meta("mark") && at(i) == Some("&") {
            let mask = at(i + 1)
                .and_then(int)
                .and_then(|m| u32::try_from(m).ok())
                .ok_or_else(|| bad(&all, "mark & needs a 32-bit mask"))?;
            field = Field::MarkAnd(mask);
            i += 2;
        }
        // Operator.
        let o = match at(i).and_then(op) {
            Some(o) => {
                i += 1;
                o
            }
            None => Op::Eq,
        };
        // Value.
        let value = if at(i) == Some("{") {
            i += 1;
            let mut items = Vec::new();
            loop {
                match at(i) {
                    Some("}") if !items.is_empty() => break,
                    Some(w) if w != "," && w != "{" && w != "}" => {
                        items.push(single(w).ok_or_else(|| bad(&all, "bad set element"))?);
                        i += 1;
                        match at(i) {
                            Some(",") => i += 1,
                            Some("}") => {}
                            _ => return Err(bad(&all, "unterminated set")),
                        }
                    }
                    _ => return Err(bad(&all, "bad set")),
                }
            }
            i += 1;
            Val::Set(items)
        } else {
            let v = at(i)
                .and_then(single)
                .ok_or_else(|| bad(&all, &format!("bad value at {:?}", at(i))))?;
            i += 1;
            v
        };
        out.push(Expr::Match {
            field,
            op: o,
            value,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use twill_common::nft::model::{Cmd, Family, Rule};

    fn render(c: &[&str]) -> serde_json::Value {
        let v: Vec<String> = c.iter().map(|s| s.to_string()).collect();
        let r = Rule {
            family: Family::Inet,
            table: "t".into(),
            chain: "c".into(),
            exprs: parse(&v).unwrap(),
            comment: None,
        };
        Cmd::AddRule(r).to_json()["add"]["rule"]["expr"].clone()
    }

    #[test]
    fn typed_matches_of_the_accepted_forms() {
        assert_eq!(
            render(&["ip saddr != 10.9.0.0/16", "iifname eth0"]),
            json!([
                {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                           "right": {"prefix": {"addr": "10.9.0.0", "len": 16}}}},
                {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}
            ])
        );
        // The reference joins the list with spaces: one match may span elements.
        assert_eq!(
            render(&["ip6", "daddr", "{fd00::1,fd00::/64 }"]),
            json!([{"match": {"op": "==",
                "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                "right": {"set": ["fd00::1", {"prefix": {"addr": "fd00::", "len": 64}}]}}}])
        );
        assert_eq!(
            render(&["tcp sport 1000-2000 meta mark & 0x10 == 0x10 meta l4proto tcp"]),
            json!([
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "sport"}},
                           "right": {"range": [1000, 2000]}}},
                {"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 16]}, "right": 16}},
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
            ])
        );
        assert_eq!(
            render(&["ip daddr ge 10.0.0.1-10.0.0.9"])[0]["match"]["right"],
            json!({"range": ["10.0.0.1", "10.0.0.9"]})
        );
        assert!(parse(&[]).unwrap().is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_type() {
        for c in [
            "ip daddr 1.2.3.4; flush ruleset",
            "ip daddr",
            "ct state new",
            "ip saddr { 1.2.3.4",
            "ip saddr { }",
            "meta nope 1",
            "iifname \"eth0\"",
            "mark & 0x100000000 == 1",
            "ip saddr 1.2.3.4/33",
        ] {
            assert!(parse(&[c.to_string()]).is_err(), "{c}");
        }
    }
}
