//! Forward and masquerade rules, as a narrow trait with an nftables implementation.
//!
//! twill owns the table `ip twill` and rewrites it whole in one `nft -f -` transaction, so a
//! network change replaces the old rules atomically and nothing else's rules are touched.
//! Semantics follow flannel's nftables mode (flannel-compat §7.2): no NAT inside the pod
//! network, masquerade (fully-random) from pods to the outside, packets marked 0x4000 skipped;
//! plus FORWARD accept for the pod network.

use std::future::Future;

use ipnetwork::Ipv4Network;
use tracing::{info, warn};

use crate::error::{Error, Result};

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
    s.push_str(&format!(
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n\
         \x20   ip saddr {network} accept\n    ip daddr {network} accept\n  }}\n}}\n"
    ));
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

/// twill's own nftables table.
pub struct NftRules {
    masquerade: bool,
    script: Option<String>,
    /// `nft list table` right after applying, to spot removal or edits.
    listing: Option<String>,
}

impl NftRules {
    pub fn new(masquerade: bool) -> NftRules {
        NftRules {
            masquerade,
            script: None,
            listing: None,
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
        let script = render(network, subnet, self.masquerade);
        if self.script.as_deref() == Some(script.as_str()) {
            self.check().await?;
            return Ok(());
        }
        self.install(script).await?;
        info!(network = %network, subnet = %subnet, masquerade = self.masquerade, "nftables table ip {TABLE} installed");
        Ok(())
    }

    async fn check(&mut self) -> Result<bool> {
        let Some(script) = self.script.clone() else {
            return Ok(false);
        };
        let now = NftRules::list().await.ok();
        if now.is_some() && now == self.listing {
            return Ok(false);
        }
        warn!("nftables table ip {TABLE} was changed or removed; re-applying");
        self.install(script).await?;
        Ok(true)
    }
}

/// Turns on IPv4 forwarding in this network namespace (pods' traffic is routed).
pub fn enable_ip_forward() -> Result<()> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(p)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(p, "1").map_err(Error::io(format!("write {p}")))
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
        assert!(rules.contains(&"ip saddr 10.5.0.0/16 accept"));
        let no_masq = render(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.3.0/24".parse().unwrap(),
            false,
        );
        assert!(!no_masq.contains("masquerade"));
        assert!(no_masq.contains("chain forward"));
    }
}
