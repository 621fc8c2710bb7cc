//! Masquerade of pod traffic leaving its subnet, in twill's own nftables table
//! `inet twill_masq`. Rules carry a comment keyed by network name + container ID (not by IP),
//! so DEL without a netns or `prevResult`, and GC, still find them.
//!
//! Driven with `nft -f -`; every interpolated value is a parsed address/prefix or a
//! name that passed the CNI name regex (`[A-Za-z0-9][A-Za-z0-9_.-]*`).

use ipnetwork::IpNetwork;
use twill_common::cni::{Attachment, CniError};
use twill_common::nft;

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

/// Comments of the rules in the chain; empty when the table does not exist.
fn rules() -> Result<Vec<String>, CniError> {
    Ok(nft_rules::list("inet", TABLE)?
        .into_iter()
        .filter(|r| r.chain == CHAIN)
        .map(|r| r.comment)
        .collect())
}

/// Deletes the rules `select` picks; one already gone is success (see [`nft_rules::replace`]).
fn delete_matching(select: impl Fn(&str) -> bool) -> Result<(), CniError> {
    nft_rules::replace(
        "inet",
        TABLE,
        |r| r.chain == CHAIN && select(&r.comment),
        "",
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
}
