//! Masquerade of pod traffic leaving its subnet, in twill's own nftables table
//! `inet twill_masq`. Rules carry a comment keyed by network name + container ID (not by IP),
//! so DEL without a netns or `prevResult`, and GC, still find them.
//!
//! Driven with `nft -f -`; every interpolated value is a parsed address/prefix or a
//! name that passed the CNI name regex (`[A-Za-z0-9][A-Za-z0-9_.-]*`).

use ipnetwork::IpNetwork;
use serde_json::Value;
use twill_common::cni::{Attachment, CniError};
use twill_common::nft;

const TABLE: &str = "twill_masq";
const CHAIN: &str = "postrouting";

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

/// The rule comment of one attachment: readable when it fits nft's 128-byte limit, hashed otherwise.
pub fn key(network: &str, container_id: &str) -> String {
    let plain = format!("twill:{network}:{container_id}");
    if plain.len() <= 120 && safe(network) && safe(container_id) {
        plain
    } else {
        format!("twill#{:016x}:{:016x}", fnv(network), fnv(container_id))
    }
}

fn network_prefixes(network: &str) -> [String; 2] {
    [
        format!("twill:{network}:"),
        format!("twill#{:016x}:", fnv(network)),
    ]
}

fn run_nft(args: &[&str], stdin: Option<&str>) -> Result<Vec<u8>, CniError> {
    nft::run(args, stdin).map_err(|e| CniError::internal(e.to_string()))
}

/// Adds one masquerade rule per address: `saddr ip, daddr outside its subnet, outside every
/// `exclude` prefix of its family (the cluster network: pod→pod keeps the pod's source IP),
/// and not multicast`.
pub fn add(
    network: &str,
    container_id: &str,
    addrs: &[IpNetwork],
    exclude: &[IpNetwork],
) -> Result<(), CniError> {
    if addrs.is_empty() {
        return Ok(());
    }
    let k = key(network, container_id);
    let mut script = format!(
        "table inet {TABLE} {{\n chain {CHAIN} {{ type nat hook postrouting priority srcnat; policy accept; }}\n}}\n"
    );
    for a in addrs {
        let subnet = IpNetwork::new(a.network(), a.prefix())
            .map_err(|e| CniError::internal(e.to_string()))?;
        let (fam, mcast) = if a.is_ipv4() {
            ("ip", "224.0.0.0/4")
        } else {
            ("ip6", "ff00::/8")
        };
        // One `daddr !=` per prefix (all must hold): an anonymous set would refuse the
        // overlapping subnet and cluster network.
        let mut skip = vec![subnet];
        for e in exclude.iter().filter(|e| e.is_ipv4() == a.is_ipv4()) {
            let e = IpNetwork::new(e.network(), e.prefix())
                .map_err(|e| CniError::internal(e.to_string()))?;
            if !skip.contains(&e) {
                skip.push(e);
            }
        }
        let daddr: String = skip
            .iter()
            .map(|n| format!("{fam} daddr != {n} "))
            .collect();
        script.push_str(&format!(
            "add rule inet {TABLE} {CHAIN} {fam} saddr {ip} {daddr}{fam} daddr != {mcast} masquerade comment \"{k}\"\n",
            ip = a.ip()
        ));
    }
    run_nft(&["-f", "-"], Some(&script)).map(|_| ())
}

/// (handle, comment) of every rule in the chain; empty when the table does not exist.
fn rules() -> Result<Vec<(u64, String)>, CniError> {
    let out = match nft::run(&["-j", "list", "chain", "inet", TABLE, CHAIN], None) {
        Ok(o) => o,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(CniError::internal(e.to_string())),
    };
    let v: Value = serde_json::from_slice(&out)
        .map_err(|e| CniError::internal(format!("parse nft output: {e}")))?;
    Ok(v.get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("rule"))
        .filter_map(|r| {
            Some((
                r.get("handle")?.as_u64()?,
                r.get("comment")?.as_str()?.to_string(),
            ))
        })
        .collect())
}

/// How often the list-then-delete is retried when another process removed some of the listed
/// rules first. Each retry only happens after someone else made progress, so few are needed.
const DELETE_ATTEMPTS: usize = 16;

/// Deletes the rules `select` picks. A delete script is one transaction that fails as a whole
/// when any handle is gone (`No such file or directory`): another DEL or GC of the same
/// attachment got there first. Then the chain is listed again and what is left is deleted, so
/// concurrent DELs all succeed; a rule already gone is success.
fn delete_matching(select: impl Fn(&str) -> bool) -> Result<(), CniError> {
    let mut last = None;
    for _ in 0..DELETE_ATTEMPTS {
        let handles: Vec<u64> = rules()?
            .into_iter()
            .filter(|(_, c)| select(c))
            .map(|(h, _)| h)
            .collect();
        if handles.is_empty() {
            return Ok(());
        }
        let script: String = handles
            .iter()
            .map(|h| format!("delete rule inet {TABLE} {CHAIN} handle {h}\n"))
            .collect();
        match nft::run(&["-f", "-"], Some(&script)) {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => last = Some(e),
            Err(e) => return Err(CniError::internal(e.to_string())),
        }
    }
    Err(CniError::internal(format!(
        "masquerade rules kept changing while being deleted: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

/// Removes the rules of one attachment; nothing to remove is success.
pub fn del(network: &str, container_id: &str) -> Result<(), CniError> {
    let k = key(network, container_id);
    delete_matching(|c| c == k)
}

/// Whether the attachment has its rules (CHECK).
pub fn present(network: &str, container_id: &str) -> Result<bool, CniError> {
    let k = key(network, container_id);
    Ok(rules()?.iter().any(|(_, c)| *c == k))
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
}
