//! The nftables rules of twill-portmap, planned from the config and the container addresses as
//! typed commands ([`model::Cmd`]; pure: the plugin applies them with `nft -j -f -`).
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

use ipnetwork::IpNetwork;
use twill_common::cni::CniError;
use twill_common::nft::model::{
    Base, ChainType, Cmd, Expr, Family, Field, Hook, NfProto, Rule as NftRule, Val, PRIO_DSTNAT,
    PRIO_SRCNAT,
};

use super::conditions;
use super::config::{Mapping, PortMapConf, Proto};
use crate::nft_rules::{self, Rule};

pub const FAMILY: Family = Family::Inet;
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

/// One rule to add: chain, matches and actions, comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub chain: &'static str,
    pub exprs: Vec<Expr>,
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

/// The rules of one attachment, in chain order. Fails (code 7) only on conditions
/// [`conditions::parse`] refuses, which loading the config already rejected.
pub fn plan(key: &str, conf: &PortMapConf, targets: &Targets) -> Result<Vec<Planned>, CniError> {
    let mut out = Vec::new();
    for (v4, addr) in [(true, targets.v4), (false, targets.v6)] {
        let Some(addr) = addr else { continue };
        let nfproto = Expr::nfproto(if v4 { NfProto::Ipv4 } else { NfProto::Ipv6 });
        let cond = conditions::parse(conf.conditions(v4))?;
        let subnet = IpNetwork::new(addr.network(), addr.prefix()).unwrap_or(addr);
        for m in conf.mappings().iter().filter(|m| m.for_family(v4)) {
            let proto = m.proto.nft();
            let mut matches = vec![nfproto.clone()];
            matches.extend(cond.iter().cloned());
            if let Some(ip) = m.bound_to() {
                matches.push(Expr::is(Field::Daddr, Val::Addr(ip)));
            }
            matches.push(Expr::is(Field::Dport(proto), Val::Int(m.host_port.into())));
            let mark = Expr::MarkSetOr(conf.mark);
            let rule = |chain, extra: Vec<Expr>, what| {
                let mut exprs = matches.clone();
                exprs.extend(extra);
                Planned {
                    chain,
                    exprs,
                    comment: format!("{key} {}", desc(what, v4, m)),
                }
            };
            if conf.snat {
                if conf.masq_all {
                    out.push(rule(HOSTPORTS, vec![mark.clone()], 'a'));
                } else {
                    // Hairpin: a pod of this subnet reaching a host port that leads back into
                    // the subnet would get replies straight from the pod, not via the host.
                    out.push(rule(
                        HOSTPORTS,
                        vec![Expr::is(Field::Saddr, Val::Net(subnet)), mark.clone()],
                        'h',
                    ));
                    // localhost: 127/8 cannot leave the host, so it is masqueraded (with
                    // route_localnet on the host interface); ::1 is never routed, so no v6.
                    if v4 {
                        let lo = IpNetwork::new([127, 0, 0, 0].into(), 8)
                            .map_err(|e| CniError::internal(e.to_string()))?;
                        out.push(rule(
                            HOSTPORTS,
                            vec![Expr::is(Field::Saddr, Val::Net(lo)), mark.clone()],
                            'l',
                        ));
                    }
                }
                out.push(Planned {
                    chain: POSTROUTING,
                    exprs: vec![
                        nfproto.clone(),
                        Expr::is(Field::MarkAnd(conf.mark), Val::Int(conf.mark.into())),
                        Expr::is(Field::Daddr, Val::Addr(addr.ip())),
                        Expr::is(Field::Dport(proto), Val::Int(m.container_port.into())),
                        Expr::Masquerade {
                            fully_random: false,
                        },
                    ],
                    comment: format!("{key} {}", desc('m', v4, m)),
                });
            }
            out.push(rule(
                HOSTPORTS,
                vec![Expr::Dnat {
                    addr: addr.ip(),
                    port: Some(m.container_port),
                }],
                'd',
            ));
        }
    }
    Ok(out)
}

fn rule(chain: &str, exprs: Vec<Expr>, comment: &str) -> NftRule {
    NftRule {
        family: FAMILY,
        table: TABLE.into(),
        chain: chain.into(),
        exprs,
        comment: Some(comment.into()),
    }
}

/// Creates the table and chains and rewrites the two jump rules; idempotent.
pub fn base_commands() -> Vec<Cmd> {
    let chain = |name: &str, base: Option<(Hook, i32)>| Cmd::AddChain {
        family: FAMILY,
        table: TABLE.into(),
        name: name.into(),
        base: base.map(|(hook, prio)| Base {
            kind: ChainType::Nat,
            hook,
            prio,
            accept: true,
        }),
    };
    let mut cmds = vec![
        Cmd::AddTable(FAMILY, TABLE.into()),
        chain("prerouting", Some((Hook::Prerouting, PRIO_DSTNAT))),
        chain("output", Some((Hook::Output, -100))),
        chain(POSTROUTING, Some((Hook::Postrouting, PRIO_SRCNAT))),
        chain(HOSTPORTS, None),
    ];
    for c in ["prerouting", "output"] {
        cmds.push(Cmd::FlushChain {
            family: FAMILY,
            table: TABLE.into(),
            name: c.into(),
        });
        cmds.push(Cmd::AddRule(rule(
            c,
            vec![
                Expr::is(Field::FibDaddrType, Val::Str("local".into())),
                Expr::Jump(HOSTPORTS.into()),
            ],
            BASE_COMMENT,
        )));
    }
    cmds
}

/// [`base_commands`] plus the attachment's rules. Host-port rules are inserted at the top of
/// `hostports` (in reverse, so they keep their order): the newest mapping of a host port wins,
/// as with the reference.
pub fn add_commands(rules: &[Planned]) -> Vec<Cmd> {
    let mut cmds = base_commands();
    for r in rules.iter().rev().filter(|r| r.chain == HOSTPORTS) {
        cmds.push(Cmd::InsertRule(rule(r.chain, r.exprs.clone(), &r.comment)));
    }
    for r in rules.iter().filter(|r| r.chain != HOSTPORTS) {
        cmds.push(Cmd::AddRule(rule(r.chain, r.exprs.clone(), &r.comment)));
    }
    cmds
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
    use serde_json::{json, Value};
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

    /// The JSON `expr` list nft gets for a planned rule.
    fn exprs(p: &Planned) -> Value {
        Cmd::AddRule(rule(p.chain, p.exprs.clone(), &p.comment)).to_json()["add"]["rule"]["expr"]
            .clone()
    }

    fn m(left: Value, right: Value) -> Value {
        json!({"match": {"op": "==", "left": left, "right": right}})
    }

    fn pl(proto: &str, field: &str) -> Value {
        json!({"payload": {"protocol": proto, "field": field}})
    }

    fn nfproto(p: &str) -> Value {
        m(json!({"meta": {"key": "nfproto"}}), json!(p))
    }

    fn mark_set() -> Value {
        json!({"mangle": {"key": {"meta": {"key": "mark"}},
            "value": {"|": [{"meta": {"key": "mark"}}, 0x2000]}}})
    }

    #[test]
    fn plans_hairpin_localhost_masquerade_and_dnat_per_family() {
        let c = conf(json!({"runtimeConfig":{"portMappings":[
            {"hostPort":8080,"containerPort":80,"protocol":"tcp"},
            {"hostPort":53,"containerPort":53,"protocol":"udp","hostIP":"192.0.2.1"}]}}));
        let p = plan("K", &c, &targets()).unwrap();
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
        // meta nfproto ipv4 tcp dport 8080 dnat ip to 10.1.0.5:80
        assert_eq!(
            exprs(&p[3]),
            json!([nfproto("ipv4"), m(pl("tcp", "dport"), json!(8080)),
                   {"dnat": {"addr": "10.1.0.5", "port": 80, "family": "ip"}}])
        );
        // meta nfproto ipv4 tcp dport 8080 ip saddr 10.1.0.0/24 meta mark set meta mark | 0x2000
        assert_eq!(
            exprs(&p[0]),
            json!([
                nfproto("ipv4"),
                m(pl("tcp", "dport"), json!(8080)),
                m(
                    pl("ip", "saddr"),
                    json!({"prefix": {"addr": "10.1.0.0", "len": 24}})
                ),
                mark_set()
            ])
        );
        assert_eq!(
            exprs(&p[1])[2]["match"]["right"],
            json!({"prefix": {"addr": "127.0.0.0", "len": 8}})
        );
        // meta nfproto ipv4 ip daddr 192.0.2.1 udp dport 53 dnat ip to 10.1.0.5:53
        assert_eq!(
            exprs(&p[7]),
            json!([nfproto("ipv4"), m(pl("ip", "daddr"), json!("192.0.2.1")),
                   m(pl("udp", "dport"), json!(53)),
                   {"dnat": {"addr": "10.1.0.5", "port": 53, "family": "ip"}}])
        );
        // meta nfproto ipv6 tcp dport 8080 dnat ip6 to [fd00::5]:80
        assert_eq!(
            exprs(&p[10]),
            json!([nfproto("ipv6"), m(pl("tcp", "dport"), json!(8080)),
                   {"dnat": {"addr": "fd00::5", "port": 80, "family": "ip6"}}])
        );
        // meta nfproto ipv4 meta mark & 0x2000 == 0x2000 ip daddr 10.1.0.5 tcp dport 80 masquerade
        assert_eq!(
            exprs(&p[2]),
            json!([nfproto("ipv4"), m(json!({"&": [{"meta": {"key": "mark"}}, 0x2000]}), json!(0x2000)),
                   m(pl("ip", "daddr"), json!("10.1.0.5")), m(pl("tcp", "dport"), json!(80)),
                   {"masquerade": null}])
        );
    }

    #[test]
    fn snat_off_masq_all_and_conditions() {
        let mp = json!([{"hostPort":8080,"containerPort":80}]);
        let off = conf(json!({"snat":false,"runtimeConfig":{"portMappings":mp}}));
        let v4 = Targets {
            v4: targets().v4,
            v6: None,
        };
        let p = plan("K", &off, &v4).unwrap();
        assert_eq!(p.len(), 1, "DNAT only: {p:?}");
        let all = conf(
            json!({"masqAll":true,"conditionsV4":["ip saddr != 10.9.0.0/16"],
            "runtimeConfig":{"portMappings":mp}}),
        );
        let p = plan("K", &all, &v4).unwrap();
        assert_eq!(
            p.iter().map(|r| r.comment.as_str()).collect::<Vec<_>>(),
            ["K a4t8080", "K m4t8080", "K d4t8080"]
        );
        // meta nfproto ipv4 ip saddr != 10.9.0.0/16 tcp dport 8080 meta mark set …
        assert_eq!(
            exprs(&p[0]),
            json!([nfproto("ipv4"),
                   {"match": {"op": "!=", "left": pl("ip", "saddr"),
                              "right": {"prefix": {"addr": "10.9.0.0", "len": 16}}}},
                   m(pl("tcp", "dport"), json!(8080)), mark_set()])
        );
        // Conditions apply to every rule of their family in hostports, not to postrouting.
        assert_eq!(exprs(&p[2])[1]["match"]["op"], "!=");
        assert_eq!(exprs(&p[1])[1]["match"]["left"]["&"][1], 0x2000);
    }

    /// nft itself takes the rendered JSON: every rule kind, both families, and conditions of
    /// each accepted form (`-c`: checked, nothing is committed).
    #[test]
    #[ignore = "needs root: scripts/test.sh root"]
    fn nft_accepts_the_planned_commands() {
        let c = conf(json!({
            "conditionsV4": ["ip saddr != { 10.0.0.0/8, 1.2.3.4 } iifname eth0",
                             "meta mark & 0x10 == 0x10 ip daddr 10.0.0.1-10.0.0.9 mark != 0x20"],
            "conditionsV6": ["ip6 saddr fd00::/8 oifname ne lo"],
            "runtimeConfig": {"portMappings": [
                {"hostPort": 5000, "containerPort": 5000, "protocol": "udp"},
                {"hostPort": 80, "containerPort": 8080, "hostIP": "192.0.2.1"},
                {"hostPort": 81, "containerPort": 81, "protocol": "sctp"}]}}));
        let p = plan("K", &c, &targets()).unwrap();
        assert_eq!(p.len(), 18);
        let script = twill_common::nft::model::script(&add_commands(&p));
        twill_common::nft::run(&["-j", "-c", "-f", "-"], Some(&script))
            .unwrap_or_else(|e| panic!("{e}\n{script}"));
    }

    #[test]
    fn command_order_and_udp_ports_from_comments() {
        let c = conf(json!({"runtimeConfig":{"portMappings":[
            {"hostPort":5000,"containerPort":5000,"protocol":"udp"},
            {"hostPort":80,"containerPort":80}]}}));
        let p = plan("twpm:n:c:eth0", &c, &targets()).unwrap();
        let cmds: Vec<Value> = add_commands(&p).iter().map(Cmd::to_json).collect();
        let pos = |what: &str| {
            cmds.iter()
                .position(|c| c.to_string().contains(what))
                .unwrap()
        };
        // Each insert goes to the top: the DNAT is inserted first, so the mark ends above it.
        assert!(pos("d4u5000") < pos("h4u5000"), "{cmds:?}");
        assert!(cmds[pos("d4u5000")].get("insert").is_some());
        assert!(cmds[pos("m4u5000")].get("add").is_some());
        assert_eq!(
            cmds[5],
            json!({"flush": {"chain": {"family": "inet", "table": "twill-portmap", "name": "prerouting"}}})
        );
        assert_eq!(
            cmds[6],
            json!({"add": {"rule": {"family": "inet", "table": "twill-portmap", "chain": "prerouting",
                "comment": "twill-portmap", "expr": [
                    m(json!({"fib": {"result": "type", "flags": ["daddr"]}}), json!("local")),
                    {"jump": {"target": "hostports"}}]}}})
        );
        assert_eq!(
            cmds[2]["add"]["chain"],
            json!({"family": "inet", "table": "twill-portmap", "name": "output", "type": "nat",
                   "hook": "output", "prio": -100, "policy": "accept"})
        );
        assert_eq!(
            cmds[4]["add"]["chain"],
            json!({"family": "inet", "table": "twill-portmap", "name": "hostports"})
        );
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
