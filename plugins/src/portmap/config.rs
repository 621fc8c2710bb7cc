//! twill-portmap's input: the reference portmap's config keys and `runtimeConfig.portMappings`,
//! parsed and validated before anything is changed (every failure is code 7).

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;
use twill_common::cni::{CniError, NetConf};

/// The reference's default `markMasqBit`: mark 0x2000, as its iptables backend uses.
pub const DEFAULT_MARK_BIT: u32 = 13;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The nft protocol keyword.
    pub fn nft(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    /// One letter for rule comments.
    pub fn letter(self) -> char {
        match self {
            Proto::Tcp => 't',
            Proto::Udp => 'u',
            Proto::Sctp => 's',
        }
    }
}

/// One entry of `runtimeConfig.portMappings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
    /// `None`: every local address of both families. An unspecified address (`0.0.0.0`, `::`)
    /// restricts the mapping to its family only, as the reference does.
    pub host_ip: Option<IpAddr>,
}

impl Mapping {
    /// Whether the mapping applies to container addresses of this family.
    pub fn for_family(&self, v4: bool) -> bool {
        self.host_ip.is_none_or(|ip| ip.is_ipv4() == v4)
    }

    /// The `daddr` the mapping is bound to, if any.
    pub fn bound_to(&self) -> Option<IpAddr> {
        self.host_ip.filter(|ip| !ip.is_unspecified())
    }
}

/// The validated configuration of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapConf {
    /// Masquerade hairpin and localhost traffic (reference `snat`, default true).
    pub snat: bool,
    /// Masquerade all traffic to the mapped ports, not only hairpin and localhost.
    pub masq_all: bool,
    /// The mark (`1 << markMasqBit`) that selects the connections to masquerade.
    pub mark: u32,
    pub conditions_v4: Vec<String>,
    pub conditions_v6: Vec<String>,
    /// `None` when the runtime sent no `portMappings` at all (unknown, e.g. DEL without the
    /// cached runtime config), `Some(empty)` when it sent an empty list.
    pub mappings: Option<Vec<Mapping>>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    snat: Option<bool>,
    #[serde(rename = "masqAll", default)]
    masq_all: Option<bool>,
    #[serde(rename = "markMasqBit", default)]
    mark_masq_bit: Option<i64>,
    #[serde(rename = "externalSetMarkChain", default)]
    external_set_mark_chain: Option<String>,
    #[serde(rename = "conditionsV4", default)]
    conditions_v4: Option<Vec<String>>,
    #[serde(rename = "conditionsV6", default)]
    conditions_v6: Option<Vec<String>>,
    #[serde(default)]
    backend: Option<String>,
}

impl PortMapConf {
    pub fn load(conf: &NetConf) -> Result<PortMapConf, CniError> {
        let raw: Raw = conf.decode()?;
        if raw.mark_masq_bit.is_some() && raw.external_set_mark_chain.is_some() {
            return Err(CniError::invalid_config(
                "cannot specify externalSetMarkChain and markMasqBit",
            ));
        }
        // externalSetMarkChain names an iptables chain (kube-proxy's KUBE-MARK-MASQ) that an
        // nftables rule cannot jump to; the masquerade it asks for is done in our own table.
        let bit = raw.mark_masq_bit.unwrap_or(DEFAULT_MARK_BIT as i64);
        if !(0..=31).contains(&bit) {
            return Err(CniError::invalid_config(
                "MasqMarkBit must be between 0 and 31",
            ));
        }
        match raw.backend.as_deref() {
            None | Some("") | Some("nftables") => {}
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "twill-portmap supports only the nftables backend, not {other:?}"
                )))
            }
        }
        let conditions_v4 = raw.conditions_v4.unwrap_or_default();
        let conditions_v6 = raw.conditions_v6.unwrap_or_default();
        for c in conditions_v4.iter().chain(&conditions_v6) {
            check_condition(c)?;
        }
        // The rules are typed JSON: conditions must parse into typed matches (see
        // `conditions`), so a config nft would only refuse at ADD is refused here already.
        super::conditions::parse(&conditions_v4)?;
        super::conditions::parse(&conditions_v6)?;
        Ok(PortMapConf {
            snat: raw.snat.unwrap_or(true),
            masq_all: raw.masq_all.unwrap_or(false),
            mark: 1u32 << bit,
            conditions_v4,
            conditions_v6,
            mappings: parse_mappings(conf.runtime("portMappings"))?,
        })
    }

    /// The mappings, empty when none were sent.
    pub fn mappings(&self) -> &[Mapping] {
        self.mappings.as_deref().unwrap_or(&[])
    }

    pub fn conditions(&self, v4: bool) -> &[String] {
        if v4 {
            &self.conditions_v4
        } else {
            &self.conditions_v6
        }
    }
}

/// Conditions are nft match expressions (`ip daddr 192.0.2.0/24`, `iifname "eth0"` is not
/// possible: quotes are refused) placed in front of every rule of their family. They are parsed
/// into typed matches (`super::conditions`), never spliced into nft text; this first check keeps
/// the message for characters no match has (`;`, a newline, `#`, quotes, `$`, `@`, `\`).
fn check_condition(c: &str) -> Result<(), CniError> {
    let ok = !c.trim().is_empty()
        && c.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b' ' | b'.'
                        | b':'
                        | b'/'
                        | b'_'
                        | b'-'
                        | b','
                        | b'{'
                        | b'}'
                        | b'!'
                        | b'='
                        | b'<'
                        | b'>'
                        | b'&'
                        | b'|'
                        | b'['
                        | b']'
                )
        });
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_config(format!(
            "invalid condition {c:?}: only nft match expressions without quotes, ';' or '#'"
        )))
    }
}

/// A mapping's field the way Go's encoding/json finds it (the reference decodes with it): the
/// exact key, else any key equal ignoring case. containerd's go-cni sends `HostPort`,
/// `ContainerPort`, `Protocol`, `HostIP` (its struct has no json tags).
fn field<'a>(m: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn port(m: &serde_json::Map<String, Value>, name: &str) -> Result<u16, CniError> {
    let bad = |why: String| CniError::invalid_config(format!("invalid portMappings: {why}"));
    match field(m, name) {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(p @ 1..=65535) => Ok(p as u16),
            _ => Err(bad(format!("{name} {n} is not a port number (1-65535)"))),
        },
        Some(Value::String(s)) if s.contains('-') || s.contains(':') => {
            Err(bad(format!("{name} {s:?}: port ranges are not supported")))
        }
        Some(other) => Err(bad(format!("{name} must be a number, got {other}"))),
        None => Err(bad(format!("{name} missing"))),
    }
}

/// `runtimeConfig.portMappings`; absent or null is `None`.
pub fn parse_mappings(v: Option<&Value>) -> Result<Option<Vec<Mapping>>, CniError> {
    let bad = |why: String| CniError::invalid_config(format!("invalid portMappings: {why}"));
    let list = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(bad(format!("must be a list, got {other}"))),
    };
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let m = e
            .as_object()
            .ok_or_else(|| bad(format!("entry must be an object, got {e}")))?;
        let proto = match field(m, "protocol") {
            None | Some(Value::Null) => Proto::Tcp,
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "" | "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                "sctp" => Proto::Sctp,
                _ => return Err(bad(format!("unknown protocol {s:?}"))),
            },
            Some(other) => return Err(bad(format!("protocol must be a string, got {other}"))),
        };
        let host_ip = match field(m, "hostIP") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| bad(format!("invalid hostIP {s:?}")))?,
            ),
            Some(other) => return Err(bad(format!("hostIP must be a string, got {other}"))),
        };
        out.push(Mapping {
            host_port: port(m, "hostPort")?,
            container_port: port(m, "containerPort")?,
            proto,
            host_ip,
        });
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(v: Value) -> Result<PortMapConf, CniError> {
        PortMapConf::load(&NetConf::parse(v.to_string().as_bytes()).unwrap())
    }

    #[test]
    fn defaults_and_fields() {
        let c = load(json!({"name":"n","type":"twill-portmap"})).unwrap();
        assert!(c.snat && !c.masq_all);
        assert_eq!(c.mark, 0x2000);
        assert_eq!(c.mappings, None);
        let c = load(json!({"snat":false,"masqAll":true,"markMasqBit":3,
            "conditionsV4":["ip daddr 192.0.2.0/24"],
            "runtimeConfig":{"portMappings":[
                {"hostPort":8080,"containerPort":80,"protocol":"TCP"},
                {"hostPort":53,"containerPort":5353,"protocol":"udp","hostIP":"192.0.2.1"},
                {"hostPort":9,"containerPort":9,"protocol":"sctp","hostIP":"::"}]}}))
        .unwrap();
        assert!(!c.snat && c.masq_all);
        assert_eq!(c.mark, 8);
        assert_eq!(c.conditions(true), ["ip daddr 192.0.2.0/24"]);
        let m = c.mappings();
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].proto, m[0].host_port, m[0].container_port),
            (Proto::Tcp, 8080, 80)
        );
        assert!(m[0].for_family(true) && m[0].for_family(false));
        assert_eq!(m[1].bound_to(), Some("192.0.2.1".parse().unwrap()));
        assert!(!m[1].for_family(false));
        assert_eq!(m[2].bound_to(), None, ":: binds to the family only");
        assert!(m[2].for_family(false) && !m[2].for_family(true));
        // containerd's go-cni spelling (Go's decoder ignores case).
        let go = load(json!({"runtimeConfig":{"portMappings":[
            {"HostPort":8080,"ContainerPort":80,"Protocol":"UDP","HostIP":"192.0.2.1"}]}}))
        .unwrap();
        assert_eq!(
            go.mappings(),
            [Mapping {
                host_port: 8080,
                container_port: 80,
                proto: Proto::Udp,
                host_ip: Some("192.0.2.1".parse().unwrap())
            }]
        );
        let empty = load(json!({"runtimeConfig":{"portMappings":[]}})).unwrap();
        assert_eq!(empty.mappings, Some(vec![]));
        assert!(load(json!({"externalSetMarkChain":"KUBE-MARK-MASQ"})).is_ok());
    }

    #[test]
    fn bad_input_is_invalid_config() {
        let pm = |m: Value| json!({"runtimeConfig":{"portMappings":m}});
        for bad in [
            pm(json!([{"hostPort":0,"containerPort":80}])),
            pm(json!([{"hostPort":65536,"containerPort":80}])),
            pm(json!([{"hostPort":-1,"containerPort":80}])),
            pm(json!([{"hostPort":80.5,"containerPort":80}])),
            pm(json!([{"hostPort":"8000-8010","containerPort":80}])),
            pm(json!([{"hostPort":"80","containerPort":80}])),
            pm(json!([{"hostPort":80,"containerPort":0}])),
            pm(json!([{"hostPort":80}])),
            pm(json!([{"hostPort":80,"containerPort":80,"protocol":"icmp"}])),
            pm(json!([{"hostPort":80,"containerPort":80,"protocol":6}])),
            pm(json!([{"hostPort":80,"containerPort":80,"hostIP":"nope"}])),
            pm(json!({"hostPort":80})),
            pm(json!(["80:80"])),
            json!({"markMasqBit":32}),
            json!({"markMasqBit":-1}),
            json!({"markMasqBit":13,"externalSetMarkChain":"X"}),
            json!({"snat":"yes"}),
            json!({"backend":"iptables"}),
            json!({"conditionsV4":["ip daddr 1.2.3.4; flush ruleset"]}),
            json!({"conditionsV6":["ip6 daddr ::1\nflush ruleset"]}),
            json!({"conditionsV4":["meta comment \"x\""]}),
            json!({"conditionsV4":"ip daddr 1.2.3.4"}),
        ] {
            let e = load(bad.clone()).unwrap_err();
            assert_eq!(e.code, 7, "{bad}: {e}");
        }
        let e = load(pm(json!([{"hostPort":"8000-8010","containerPort":80}]))).unwrap_err();
        assert!(e.msg.contains("port ranges"), "{e}");
    }
}
