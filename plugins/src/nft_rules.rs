//! Rules of one attachment in a table of twill's own, found again by their comment.
//!
//! twill-bridge's masquerade (`inet twill_masq`) and twill-portmap (`inet twill-portmap`) tag
//! every rule they add with a comment keyed by network + container ID (+ ifname), never by IP,
//! so DEL without a netns or `prevResult`, and GC, still find them. Deleting lists the table
//! (`nft -j list table`, parsed here and nowhere else) and deletes the picked handles in one
//! `nft -j -f -` transaction of typed commands ([`model::Cmd`]); when another process removed
//! one of them first the transaction fails as a whole with ENOENT, and the list-then-delete is
//! retried, so concurrent DELs of the same attachment all succeed.

use serde_json::Value;
use twill_common::cni::CniError;
use twill_common::nft;
use twill_common::nft::model::{self, Cmd, Family};

/// One rule of a table, as `nft -j list table` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub handle: u64,
    /// Empty when the rule has none.
    pub comment: String,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `tag:part1:part2…` when it is at most `max` bytes and every part is plain
/// (`[A-Za-z0-9_.-]+`); otherwise `tag#<fnv(part1)>:<fnv(part2)>…`. Comments are limited to
/// 128 bytes, hence the fallback (the hash also keeps them plain words for whoever reads
/// `nft list` text).
pub fn key(tag: &str, parts: &[&str], max: usize) -> String {
    let plain = format!("{tag}:{}", parts.join(":"));
    if plain.len() <= max && parts.iter().all(|p| safe(p)) {
        plain
    } else {
        hashed(tag, parts)
    }
}

fn hashed(tag: &str, parts: &[&str]) -> String {
    let h: Vec<String> = parts.iter().map(|p| format!("{:016x}", fnv(p))).collect();
    format!("{tag}#{}", h.join(":"))
}

/// The two prefixes (plain and hashed) every key starting with `parts` begins with.
pub fn prefixes(tag: &str, parts: &[&str]) -> [String; 2] {
    [
        format!("{tag}:{}:", parts.join(":")),
        format!("{}:", hashed(tag, parts)),
    ]
}

/// Every rule of `family table`; empty when the table does not exist.
pub fn list(family: Family, table: &str) -> Result<Vec<Rule>, CniError> {
    let out = match nft::run(&["-j", "list", "table", family.as_str(), table], None) {
        Ok(o) => o,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(CniError::internal(e.to_string())),
    };
    parse_rules(&out)
}

fn parse_rules(json: &[u8]) -> Result<Vec<Rule>, CniError> {
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| CniError::internal(format!("parse nft output: {e}")))?;
    Ok(v.get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("rule"))
        .filter_map(|r| {
            Some(Rule {
                chain: r.get("chain")?.as_str()?.to_string(),
                handle: r.get("handle")?.as_u64()?,
                comment: r
                    .get("comment")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            })
        })
        .collect())
}

/// How often the list-then-delete is retried when another process removed some of the listed
/// rules first. Each retry only happens after someone else made progress, so few are needed.
const ATTEMPTS: usize = 16;

/// The commands deleting `victims` of `family table`.
pub fn delete_cmds(family: Family, table: &str, victims: &[Rule]) -> Vec<Cmd> {
    victims
        .iter()
        .map(|r| Cmd::DeleteRule {
            family,
            table: table.to_string(),
            chain: r.chain.clone(),
            handle: r.handle,
        })
        .collect()
}

/// In one transaction: deletes the rules `select` picks, then runs `then` (more commands, may be
/// empty). Returns the rules it deleted. A rule already gone is success (see the module doc).
pub fn replace(
    family: Family,
    table: &str,
    select: impl Fn(&Rule) -> bool,
    then: &[Cmd],
) -> Result<Vec<Rule>, CniError> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let victims: Vec<Rule> = list(family, table)?.into_iter().filter(&select).collect();
        if victims.is_empty() && then.is_empty() {
            return Ok(victims);
        }
        let mut cmds = delete_cmds(family, table, &victims);
        cmds.extend_from_slice(then);
        match nft::run(&["-j", "-f", "-"], Some(&model::script(&cmds))) {
            Ok(_) => return Ok(victims),
            Err(e) if e.is_not_found() && !victims.is_empty() => last = Some(e),
            Err(e) => return Err(CniError::internal(e.to_string())),
        }
    }
    Err(CniError::internal(format!(
        "rules of {} {table} kept changing while being deleted: {}",
        family.as_str(),
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_prefixes() {
        assert_eq!(key("twill", &["cbr0", "abc"], 120), "twill:cbr0:abc");
        let long = "a".repeat(200);
        let k = key("twill", &["cbr0", &long], 120);
        assert!(k.starts_with("twill#"), "{k}");
        assert!(key("twill", &["cbr0", "x\"y"], 120).starts_with("twill#"));
        assert!(prefixes("twill", &["cbr0"])
            .iter()
            .any(|p| k.starts_with(p.as_str())));
        assert!(!key("twill", &["cbr01", "abc"], 120).starts_with(&prefixes("twill", &["cbr0"])[0]));
        assert!(key("t", &["n", "c", "eth0"], 120).starts_with(&prefixes("t", &["n", "c"])[0]));
        let h = key("t", &["n", "c", &long], 120);
        assert!(h.starts_with(&prefixes("t", &["n", "c"])[1]), "{h}");
        assert!(h.len() < 64);
    }

    #[test]
    fn parses_rules_with_and_without_comment() {
        let j = br#"{"nftables":[{"metainfo":{}},{"table":{"family":"inet","name":"t","handle":1}},
            {"chain":{"family":"inet","table":"t","name":"pre","handle":1}},
            {"rule":{"family":"inet","table":"t","chain":"pre","handle":5,"expr":[]}},
            {"rule":{"family":"inet","table":"t","chain":"hostports","handle":7,"comment":"k d4t80","expr":[]}}]}"#;
        assert_eq!(
            parse_rules(j).unwrap(),
            vec![
                Rule {
                    chain: "pre".into(),
                    handle: 5,
                    comment: String::new()
                },
                Rule {
                    chain: "hostports".into(),
                    handle: 7,
                    comment: "k d4t80".into()
                }
            ]
        );
        assert!(parse_rules(b"{nope").is_err());
    }

    #[test]
    fn deletes_by_handle_in_the_listed_chain() {
        let v = vec![Rule {
            chain: "hostports".into(),
            handle: 7,
            comment: "k d4t80".into(),
        }];
        let cmds = delete_cmds(Family::Inet, "t", &v);
        assert_eq!(
            cmds.iter().map(Cmd::to_json).collect::<Vec<_>>(),
            [serde_json::json!({"delete": {"rule": {
                "family": "inet", "table": "t", "chain": "hostports", "handle": 7}}})]
        );
    }
}
