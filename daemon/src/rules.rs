//! Masquerade and forward rules, as a narrow trait with one implementation.
//!
//! twill owns the table `ip twill` and rewrites it whole in one `nft -f -` transaction, so a
//! network change replaces the old rules atomically and nothing else's rules are touched.
//! Semantics follow flannel's nftables mode (flannel-compat §7.2): no NAT inside the pod
//! network, masquerade (fully-random) from pods to the outside, packets marked 0x4000 skipped.
//!
//! The table has no forward chain: an accept there cannot override another table's drop, and
//! with nothing dropping it would only cost every forwarded packet a rule walk. Where a
//! firewall does drop forwarded traffic (Docker's `filter FORWARD` policy DROP), the accept is
//! put into that chain instead ([`crate::forward`]).

use std::future::Future;

use ipnetwork::Ipv4Network;
use tracing::{info, warn};

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

/// The nftables script (typed inputs only: CIDRs rendered by ipnetwork).
pub fn render(network: Ipv4Network, subnet: Ipv4Network, masquerade: bool) -> String {
    let mut s = format!("add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    if masquerade {
        s.push_str(&format!(
            "  chain postrtg {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   meta mark & 0x00004000 == 0x00004000 return\n\
             \x20   ip saddr {subnet} ip daddr {network} return\n\
             \x20   ip saddr {network} ip daddr {subnet} return\n\
             \x20   ip saddr != {subnet} ip daddr {network} return\n\
             \x20   ip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
             \x20   ip saddr != {network} ip daddr {network} masquerade fully-random\n  }}\n"
        ));
    }
    s.push_str("}\n");
    s
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
    script: Option<String>,
    /// `nft list table` right after applying, to spot removal or edits.
    listing: Option<String>,
    /// The pod network of the last `apply`, for the forward rules' checks.
    network: Option<Ipv4Network>,
    forward: ForwardAccept,
}

impl NftRules {
    pub fn new(masquerade: bool) -> NftRules {
        NftRules {
            masquerade,
            script: None,
            listing: None,
            network: None,
            forward: ForwardAccept::new(),
        }
    }

    async fn list() -> Result<String> {
        nft_async(
            vec!["list".into(), "table".into(), "ip".into(), TABLE.into()],
            None,
        )
        .await
    }

    async fn install(&mut self, script: String) -> Result<()> {
        nft_async(vec!["-f".into(), "-".into()], Some(script.clone())).await?;
        self.listing = Some(NftRules::list().await?);
        self.script = Some(script);
        Ok(())
    }
}

impl Rules for NftRules {
    async fn apply(&mut self, network: Ipv4Network, subnet: Ipv4Network) -> Result<()> {
        // Set first: without masquerade the script does not name the network, so a changed
        // network reaches the forward rules only through this.
        self.network = Some(network);
        let script = render(network, subnet, self.masquerade);
        if self.script.as_deref() == Some(script.as_str()) {
            self.check().await?;
            return Ok(());
        }
        self.install(script).await?;
        info!(network = %network, subnet = %subnet, masquerade = self.masquerade, "nftables table ip {TABLE} installed");
        self.forward.ensure(network).await?;
        Ok(())
    }

    async fn check(&mut self) -> Result<bool> {
        let (Some(script), Some(network)) = (self.script.clone(), self.network) else {
            return Ok(false);
        };
        let now = NftRules::list().await.ok();
        let mut corrected = false;
        if now.is_none() || now != self.listing {
            warn!("nftables table ip {TABLE} was changed or removed; re-applying");
            self.install(script).await?;
            corrected = true;
        }
        // Also picks up a drop that appeared after startup (Docker started later).
        Ok(self.forward.ensure(network).await? || corrected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_follows_flannel_nft_semantics() {
        let s = render(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.3.0/24".parse().unwrap(),
            true,
        );
        let rules: Vec<&str> = s.lines().map(str::trim).collect();
        let want = [
            "meta mark & 0x00004000 == 0x00004000 return",
            "ip saddr 10.5.3.0/24 ip daddr 10.5.0.0/16 return",
            "ip saddr 10.5.0.0/16 ip daddr 10.5.3.0/24 return",
            "ip saddr != 10.5.3.0/24 ip daddr 10.5.0.0/16 return",
            "ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
            "ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random",
        ];
        let start = rules.iter().position(|l| *l == want[0]).unwrap();
        assert_eq!(&rules[start..start + 6], &want);
        let no_masq = render(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.3.0/24".parse().unwrap(),
            false,
        );
        assert!(!no_masq.contains("masquerade"));
    }

    /// Nothing of twill's on the forward path: an accept in its own table cannot beat another
    /// table's drop and only costs throughput (see `forward` for where the accept goes).
    #[test]
    fn table_has_no_forward_chain() {
        for masq in [true, false] {
            let s = render(
                "10.5.0.0/16".parse().unwrap(),
                "10.5.3.0/24".parse().unwrap(),
                masq,
            );
            assert!(!s.contains("hook forward"), "{s}");
            assert!(!s.contains(" accept\n"), "{s}");
            assert!(
                s.starts_with("add table ip twill\ndelete table ip twill\n"),
                "{s}"
            );
        }
    }
}
