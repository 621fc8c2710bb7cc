//! The network config at `<prefix>/config`, in flannel's JSON.
//!
//! Keys match case-insensitively (Go's `encoding/json` does, so `"network"` == `"Network"`).
//! Defaults and checks follow flannel's `CheckNetworkConfig`. twill's default backend, when
//! `Backend` or its `Type` is absent, is **vxlan** (flannel documents vxlan but its code falls
//! back to udp). IPv4 only: `EnableIPv6: true` and `EnableIPv4: false` are rejected.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde_json::{Map, Value};

use crate::backend_type::BackendType;
use crate::error::{Error, Result};

/// Kernel default VXLAN port for devices flannel creates (not IANA's 4789).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Vxlan(VxlanConfig),
    HostGw,
}

impl BackendConfig {
    /// The lease's `BackendType`.
    pub fn backend_type(&self) -> BackendType {
        match self {
            BackendConfig::Vxlan(_) => BackendType::Vxlan,
            BackendConfig::HostGw => BackendType::HostGw,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// UDP port; flannel's 0 is resolved to 8472 here.
    pub port: u16,
    /// Underlay MTU; the device gets this − 50. None: the underlay interface's MTU.
    pub mtu: Option<u32>,
    pub direct_routing: bool,
}

/// Lower-cases every key of a JSON object (Go's case-insensitive field matching); the config
/// and the lease values are read through this one function.
pub fn lower_keys(obj: &Map<String, Value>) -> Map<String, Value> {
    obj.iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect()
}

fn get_str(m: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(Error::Config(format!("{key}: expected a string, got {v}"))),
    }
}

fn get_u64(m: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Error::Config(format!("{key}: expected a non-negative integer, got {v}"))
        }),
    }
}

fn get_bool(m: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(Error::Config(format!(
            "{key}: expected true or false, got {v}"
        ))),
    }
}

fn get_ip(m: &Map<String, Value>, key: &str) -> Result<Option<Ipv4Addr>> {
    get_str(m, key)?
        .map(|s| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| Error::Config(format!("{key}: {s:?} is not an IPv4 address")))
        })
        .transpose()
}

impl NetworkConfig {
    pub fn parse(text: &str) -> Result<NetworkConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(Error::Config("expected a JSON object".into()));
        };
        let m = lower_keys(&obj);
        if get_bool(&m, "enableipv4")? == Some(false) {
            return Err(Error::Config(
                "EnableIPv4=false is not supported by twill".into(),
            ));
        }
        if get_bool(&m, "enableipv6")? == Some(true) {
            return Err(Error::Config(
                "EnableIPv6 is not supported by twill yet".into(),
            ));
        }
        let net_s =
            get_str(&m, "network")?.ok_or_else(|| Error::Config("Network is missing".into()))?;
        let parsed: Ipv4Network = net_s
            .parse()
            .map_err(|_| Error::Config(format!("Network {net_s:?} is not an IPv4 CIDR")))?;
        let network = Ipv4Network::new(parsed.network(), parsed.prefix())
            .map_err(|e| Error::Config(e.to_string()))?;
        let prefix = network.prefix();
        if prefix > 28 {
            return Err(Error::Config(format!(
                "Network {network} is too small: the minimum is /28"
            )));
        }
        let subnet_len = match get_u64(&m, "subnetlen")? {
            None | Some(0) => {
                if prefix <= 22 {
                    24
                } else {
                    prefix + 2
                }
            }
            Some(l) => {
                u8::try_from(l).map_err(|_| Error::Config(format!("SubnetLen {l} out of range")))?
            }
        };
        if subnet_len < prefix + 2 || subnet_len > 30 {
            return Err(Error::Config(format!(
                "SubnetLen {subnet_len} must be between /{} and /30 for Network {network}",
                prefix + 2
            )));
        }
        let size = 1u32 << (32 - subnet_len);
        let base = u32::from(network.network());
        let last = base | !(u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0));
        let check = |name: &str, ip: Ipv4Addr| -> Result<()> {
            if !network.contains(ip) {
                return Err(Error::Config(format!(
                    "{name} {ip} is outside Network {network}"
                )));
            }
            if u32::from(ip) % size != 0 {
                return Err(Error::Config(format!(
                    "{name} {ip} is not aligned to SubnetLen /{subnet_len}"
                )));
            }
            Ok(())
        };
        let subnet_min = get_ip(&m, "subnetmin")?.unwrap_or(Ipv4Addr::from(base + size));
        let subnet_max = get_ip(&m, "subnetmax")?.unwrap_or(Ipv4Addr::from(last - size + 1));
        check("SubnetMin", subnet_min)?;
        check("SubnetMax", subnet_max)?;
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(Error::Config(format!(
                "SubnetMin {subnet_min} is above SubnetMax {subnet_max}"
            )));
        }
        let backend = match m.get("backend") {
            None | Some(Value::Null) => BackendConfig::Vxlan(VxlanConfig::default()),
            Some(Value::Object(b)) => parse_backend(&lower_keys(b))?,
            Some(v) => {
                return Err(Error::Config(format!(
                    "Backend: expected an object, got {v}"
                )))
            }
        };
        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }

    /// Whether `subnet` is one this config could hand out.
    pub fn accepts(&self, subnet: Ipv4Network) -> bool {
        let ip = u32::from(subnet.network());
        subnet.prefix() == self.subnet_len
            && ip >= u32::from(self.subnet_min)
            && ip <= u32::from(self.subnet_max)
            && self.network.contains(subnet.network())
    }
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            vni: 1,
            port: DEFAULT_VXLAN_PORT,
            mtu: None,
            direct_routing: false,
        }
    }
}

fn parse_backend(b: &Map<String, Value>) -> Result<BackendConfig> {
    let ty = get_str(b, "type")?.unwrap_or_else(|| "vxlan".into());
    match BackendType::parse(&ty) {
        BackendType::Vxlan => {
            let vni = get_u64(b, "vni")?.unwrap_or(1);
            let vni = u32::try_from(vni)
                .ok()
                .filter(|v| *v < (1 << 24))
                .ok_or_else(|| Error::Config(format!("VNI {vni} out of range")))?;
            let port = match get_u64(b, "port")?.unwrap_or(0) {
                0 => DEFAULT_VXLAN_PORT,
                p => {
                    u16::try_from(p).map_err(|_| Error::Config(format!("Port {p} out of range")))?
                }
            };
            let mtu = match get_u64(b, "mtu")? {
                None | Some(0) => None,
                Some(m) if (118..=65535).contains(&m) => Some(m as u32),
                Some(m) => return Err(Error::Config(format!("MTU {m} out of range"))),
            };
            if get_bool(b, "gbp")? == Some(true) {
                return Err(Error::Config("vxlan GBP is not supported by twill".into()));
            }
            Ok(BackendConfig::Vxlan(VxlanConfig {
                vni,
                port,
                mtu,
                direct_routing: get_bool(b, "directrouting")?.unwrap_or(false),
            }))
        }
        BackendType::HostGw => Ok(BackendConfig::HostGw),
        BackendType::Other(other) => Err(Error::Config(format!(
            "backend type {:?} is not supported by twill (vxlan, host-gw)",
            other.to_ascii_lowercase()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_defaults() {
        let c = NetworkConfig::parse(r#"{"network":"10.3.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 3, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 3, 255, 0));
        assert_eq!(c.backend, BackendConfig::Vxlan(VxlanConfig::default()));
        let c = NetworkConfig::parse(r#"{"Network":"10.3.0.0/24"}"#).unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 3, 0, 64));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 3, 0, 192));
    }

    #[test]
    fn case_insensitive_backend() {
        let c = NetworkConfig::parse(
            r#"{"NETWORK":"10.5.0.0/16","subnetLen":26,"backend":{"type":"VXLAN","vni":7,"port":4790,"mtu":9000,"directrouting":true}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan(VxlanConfig {
                vni: 7,
                port: 4790,
                mtu: Some(9000),
                direct_routing: true
            })
        );
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        assert_eq!(c.backend, BackendConfig::HostGw);
    }

    #[test]
    fn validation() {
        for bad in [
            r#"{}"#,
            r#"{"Network":"10.0.0.0/29"}"#,
            r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#,
            r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#,
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#,
            r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.3.7"}"#,
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp"}}"#,
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#,
            r#"{"Network":"nope"}"#,
            r#"not json"#,
        ] {
            assert!(NetworkConfig::parse(bad).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn accepts() {
        let c = NetworkConfig::parse(r#"{"Network":"10.3.0.0/16"}"#).unwrap();
        assert!(c.accepts("10.3.7.0/24".parse().unwrap()));
        assert!(
            !c.accepts("10.3.0.0/24".parse().unwrap()),
            "first subnet is skipped"
        );
        assert!(!c.accepts("10.3.7.0/25".parse().unwrap()));
        assert!(!c.accepts("10.4.7.0/24".parse().unwrap()));
    }
}
