//! The nftables rules of twill-portmap, planned from the config and the container addresses
//! (pure: the plugin runs the scripts built here).
//!
//! ```text
//! table inet twill-portmap
//!   prerouting  (nat, dstnat)  fib daddr type local jump hostports
//!   output      (nat, -100)    fib daddr type local jump hostports   (the node's own traffic)
//!   hostports   per mapping: mark hairpin (pod subnet) and localhost sources, then DNAT
//!   postrouting (nat, srcnat)  per mapping: masquerade marked connections to the container
//! ```
//!
//! Every per-attachment rule carries the comment `<key> <what><family><proto><hostPort>`, the
//! key being network + container ID + ifname: DEL and GC find an attachment's rules without
//! its config, CHECK compares them with what ADD would add, and the UDP host ports whose
//! conntrack entries must go are read back from the DNAT rules. The two jump rules are the
//! only rules without a per-attachment key; they are rewritten (flush + add in the same
//! transaction) by every ADD, so concurrent ADDs never duplicate them.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::config::{Mapping, PortMapConf, Proto};
use crate::nft_rules::{self, Rule};

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "twill-portmap";
pub const HOSTPORTS: &str = "hostports";
pub const POSTROUTING: &str = "postrouting";
/// The comment of the two jump rules.
pub const BASE_COMMENT: &str = "twill-portmap";
const TAG: &str = "twpm";
/// Leaves room for the ` <what><family><proto><port>` suffix within nft's 128-byte comments.
const MAX_KEY: usize = 100;

/// The key of one attachment.
pub fn key(network: &str, container_id: &str, ifname: &str) -> String {
    nft_rules::key(TAG, &[network, container_id, ifname], MAX_KEY)
}

/// Prefixes of the keys of every attachment of `network` (GC).
pub fn network_prefixes(network: &str) -> [String; 2] {
    nft_rules::prefixes(TAG, &[network])
}

/// Prefixes of the keys of one container, whatever its ifname (GC entries without an ifname).
pub fn container_prefixes(network: &str, container_id: &str) -> [String; 2] {
    nft_rules::prefixes(TAG, &[network, container_id])
}

/// The key part of a rule comment.
pub fn key_of(comment: &str) -> &str {
    comment.split(' ').next().unwrap_or("")
}

/// The container's addresses the mappings point to: the first of each family (as the reference).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Targets {
    pub v4: Option<IpNetwork>,
    pub v6: Option<IpNetwork>,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// One rule to add: chain, match/action text, comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub chain: &'static str,
    pub body: String,
    pub comment: String,
}

fn desc(what: char, v4: bool, m: &Mapping) -> String {
    format!(
        "{what}{}{}{}",
        if v4 { '4' } else { '6' },
        m.proto.letter(),
        m.host_port
    )
}

/// The rules of one attachment, in chain order.
pub fn plan(key: &str, conf: &PortMapConf, targets: &Targets) -> Vec<Planned> {
    let mut out = Vec::new();
    for (v4, addr) in [(true, targets.v4), (false, targets.v6)] {
        let Some(addr) = addr else { continue };
        let (fam, nfproto) = if v4 { ("ip", "ipv4") } else { ("ip6", "ipv6") };
        let cond: String = conf
            .conditions(v4)
            .iter()
            .map(|c| format!("{c} "))
            .collect();
        let subnet = IpNetwork::new(addr.network(), addr.prefix()).unwrap_or(addr);
        let to = match addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        for m in conf.mappings().iter().filter(|m| m.for_family(v4)) {
            let daddr = m
                .bound_to()
                .map(|ip| format!("{fam} daddr {ip} "))
                .unwrap_or_default();
            let proto = m.proto.nft();
            let matches = format!(
                "meta nfproto {nfproto} {cond}{daddr}{proto} dport {}",
                m.host_port
            );
            let mark = format!("meta mark set meta mark | {:#x}", conf.mark);
            let rule = |chain, body: String, what| Planned {
                chain,
                body,
                comment: format!("{key} {}", desc(what, v4, m)),
            };
            if conf.snat {
                if conf.masq_all {
                    out.push(rule(HOSTPORTS, format!("{matches} {mark}"), 'a'));
                } else {
                    // Hairpin: a pod of this subnet reaching a host port that leads back into
                    // the subnet would get replies straight from the pod, not via the host.
                    out.push(rule(
                        HOSTPORTS,
                        format!("{matches} {fam} saddr {subnet} {mark}"),
                        'h',
                    ));
                    // localhost: 127/8 cannot leave the host, so it is masqueraded (with
                    // route_localnet on the host interface); ::1 is never routed, so no v6.
                    if v4 {
                        out.push(rule(
                            HOSTPORTS,
                            format!("{matches} ip saddr 127.0.0.0/8 {mark}"),
                            'l',
                        ));
                    }
                }
                out.push(rule(
                    POSTROUTING,
                    format!(
                        "meta nfproto {nfproto} meta mark & {m:#x} == {m:#x} {fam} daddr {ip} {proto} dport {cp} masquerade",
                        m = conf.mark,
                        ip = addr.ip(),
                        cp = m.container_port
                    ),
                    'm',
                ));
            }
            out.push(rule(
                HOSTPORTS,
                format!("{matches} dnat {fam} to {to}:{}", m.container_port),
                'd',
            ));
        }
    }
    out
}

/// Creates the table and chains and rewrites the two jump rules; idempotent.
pub fn base_script() -> String {
    let t = format!("{FAMILY} {TABLE}");
    format!(
        "table {t} {{\n\
         \x20chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         \x20chain output {{ type nat hook output priority -100; policy accept; }}\n\
         \x20chain {POSTROUTING} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         \x20chain {HOSTPORTS} {{ }}\n\
         }}\n\
         flush chain {t} prerouting\n\
         add rule {t} prerouting fib daddr type local jump {HOSTPORTS} comment \"{BASE_COMMENT}\"\n\
         flush chain {t} output\n\
         add rule {t} output fib daddr type local jump {HOSTPORTS} comment \"{BASE_COMMENT}\"\n"
    )
}

/// [`base_script`] plus the attachment's rules. Host-port rules are inserted at the top of
/// `hostports` (in reverse, so they keep their order): the newest mapping of a host port wins,
/// as with the reference.
pub fn add_script(rules: &[Planned]) -> String {
    let mut s = base_script();
    for r in rules.iter().rev().filter(|r| r.chain == HOSTPORTS) {
        s.push_str(&format!(
            "insert rule {FAMILY} {TABLE} {} {} comment \"{}\"\n",
            r.chain, r.body, r.comment
        ));
    }
    for r in rules.iter().filter(|r| r.chain != HOSTPORTS) {
        s.push_str(&format!(
            "add rule {FAMILY} {TABLE} {} {} comment \"{}\"\n",
            r.chain, r.body, r.comment
        ));
    }
    s
}

/// The UDP host ports of DNAT rules among `rules` (their conntrack entries must go).
pub fn udp_ports(rules: &[Rule]) -> Vec<u16> {
    let mut ports: Vec<u16> = rules
        .iter()
        .filter_map(|r| r.comment.split(' ').nth(1))
        .filter_map(|d| {
            let rest = d.strip_prefix('d')?;
            let rest = rest.strip_prefix('4').or_else(|| rest.strip_prefix('6'))?;
            rest.strip_prefix(Proto::Udp.letter())?.parse().ok()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// What CHECK compares: the (chain, comment) pairs of one attachment, sorted.
pub fn signature<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs.map(|(c, m)| (c.to_string(), m.to_string())).collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use twill_common::cni::NetConf;

    fn conf(v: serde_json::Value) -> PortMapConf {
        PortMapConf::load(&NetConf::parse(v.to_string().as_bytes()).unwrap()).unwrap()
    }

    fn targets() -> Targets {
        Targets {
            v4: Some("10.1.0.5/24".parse().unwrap()),
            v6: Some("fd00::5/64".parse().unwrap()),
        }
    }

    #[test]
    fn plans_hairpin_localhost_masquerade_and_dnat_per_family() {
        let c = conf(json!({"runtimeConfig":{"portMappings":[
            {"hostPort":8080,"containerPort":80,"protocol":"tcp"},
            {"hostPort":53,"containerPort":53,"protocol":"udp","hostIP":"192.0.2.1"}]}}));
        let p = plan("K", &c, &targets());
        let got: Vec<(&str, &str)> = p.iter().map(|r| (r.chain, r.comment.as_str())).collect();
        assert_eq!(
            got,
            [
                (HOSTPORTS, "K h4t8080"),
                (HOSTPORTS, "K l4t8080"),
                (POSTROUTING, "K m4t8080"),
                (HOSTPORTS, "K d4t8080"),
                (HOSTPORTS, "K h4u53"),
                (HOSTPORTS, "K l4u53"),
                (POSTROUTING, "K m4u53"),
                (HOSTPORTS, "K d4u53"),
                (HOSTPORTS, "K h6t8080"),
                (POSTROUTING, "K m6t8080"),
                (HOSTPORTS, "K d6t8080"),
            ]
        );
        assert_eq!(
            p[3].body,
            "meta nfproto ipv4 tcp dport 8080 dnat ip to 10.1.0.5:80"
        );
        assert_eq!(
            p[0].body,
            "meta nfproto ipv4 tcp dport 8080 ip saddr 10.1.0.0/24 meta mark set meta mark | 0x2000"
        );
        assert_eq!(
            p[7].body,
            "meta nfproto ipv4 ip daddr 192.0.2.1 udp dport 53 dnat ip to 10.1.0.5:53"
        );
        assert_eq!(
            p[10].body,
            "meta nfproto ipv6 tcp dport 8080 dnat ip6 to [fd00::5]:80"
        );
        assert_eq!(
            p[2].body,
            "meta nfproto ipv4 meta mark & 0x2000 == 0x2000 ip daddr 10.1.0.5 tcp dport 80 masquerade"
        );
    }

    #[test]
    fn snat_off_masq_all_and_conditions() {
        let m = json!([{"hostPort":8080,"containerPort":80}]);
        let off = conf(json!({"snat":false,"runtimeConfig":{"portMappings":m}}));
        let v4 = Targets {
            v4: targets().v4,
            v6: None,
        };
        let p = plan("K", &off, &v4);
        assert_eq!(p.len(), 1, "DNAT only: {p:?}");
        let all = conf(
            json!({"masqAll":true,"conditionsV4":["ip saddr != 10.9.0.0/16"],
            "runtimeConfig":{"portMappings":m}}),
        );
        let p = plan("K", &all, &v4);
        assert_eq!(
            p.iter().map(|r| r.comment.as_str()).collect::<Vec<_>>(),
            ["K a4t8080", "K m4t8080", "K d4t8080"]
        );
        assert!(
            p[0].body.starts_with(
                "meta nfproto ipv4 ip saddr != 10.9.0.0/16 tcp dport 8080 meta mark set"
            ),
            "{}",
            p[0].body
        );
    }

    #[test]
    fn script_order_and_udp_ports_from_comments() {
        let c = conf(json!({"runtimeConfig":{"portMappings":[
            {"hostPort":5000,"containerPort":5000,"protocol":"udp"},
            {"hostPort":80,"containerPort":80}]}}));
        let p = plan("twpm:n:c:eth0", &c, &targets());
        let s = add_script(&p);
        let h = s.find("h4u5000").unwrap();
        let d = s.find("d4u5000").unwrap();
        // Each insert goes to the top: the DNAT is inserted first, so the mark ends above it.
        assert!(d < h, "DNAT inserted before the hairpin mark:\n{s}");
        assert!(s.contains("flush chain inet twill-portmap prerouting"));
        let listed: Vec<Rule> = p
            .iter()
            .enumerate()
            .map(|(i, r)| Rule {
                chain: r.chain.into(),
                handle: i as u64,
                comment: r.comment.clone(),
            })
            .collect();
        assert_eq!(udp_ports(&listed), [5000]);
        assert_eq!(key_of("twpm:n:c:eth0 d4u5000"), "twpm:n:c:eth0");
        assert!(key("n", "c", "eth0").starts_with(&container_prefixes("n", "c")[0]));
        assert!(key("n", "c", "eth0").starts_with(&network_prefixes("n")[0]));
        let long = "f".repeat(64);
        let k = key("twill", &long, "eth0");
        assert_eq!(
            k,
            format!("twpm:twill:{long}:eth0"),
            "containerd IDs stay readable"
        );
        assert!(k.len() + " d6s65535".len() <= 127);
    }
}
