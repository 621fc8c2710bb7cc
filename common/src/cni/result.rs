//! CNI results, one in-memory model (the 1.x types) converted to and from every version's JSON.
//!
//! - 0.1.0/0.2.0: `{"ip4":{ip,gateway,routes},"ip6":…,"dns"}`; only the first address per family survives,
//!   and a result without any address cannot be expressed (libcni fails the same way).
//! - 0.3.0/0.3.1/0.4.0: `interfaces`, `ips[]` with the required `version`, `routes`, `dns`.
//! - 1.0.0/1.1.0: as 0.4.0 without `ips[].version`, plus interface `mtu`/`socketPath`/`pciID`.

use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::error::CniError;
use super::version::{is_legacy_result, Version};

/// (De)serializes a `FromStr + Display` value (addresses, CIDRs) as a JSON string.
mod text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<T, D::Error>
    where
        T::Err: Display,
    {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }

    pub mod opt {
        use super::*;
        pub fn serialize<T: Display, S: Serializer>(
            v: &Option<T>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }
        pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<T>, D::Error>
        where
            T::Err: Display,
        {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(s) if s.is_empty() => Ok(None),
                Some(s) => s
                    .parse()
                    .map(Some)
                    .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}"))),
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with the prefix length of its subnet, e.g. `10.244.1.5/24`.
    #[serde(with = "text")]
    pub address: IpNetwork,
    #[serde(default, with = "text::opt", skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`; absent in IPAM results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    #[serde(with = "text")]
    pub dst: IpNetwork,
    /// `None` means "the gateway of the interface's address family".
    #[serde(default, with = "text::opt", skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_empty()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// A result of any version, held as the 1.x types.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

fn family(ip: &IpNetwork) -> &'static str {
    if ip.is_ipv4() {
        "4"
    } else {
        "6"
    }
}

impl CniResult {
    /// Parses a result of any version. A result without `cniVersion` takes `default_version`
    /// (libcni's fixup for delegated plugins and `prevResult`).
    pub fn from_value(v: &Value, default_version: &str) -> Result<CniResult, CniError> {
        let obj = v
            .as_object()
            .ok_or_else(|| CniError::decoding("result is not a JSON object"))?;
        let ver = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or(default_version);
        let ver = Version::parse(ver)?;
        let bad = |e: serde_json::Error| CniError::decoding(format!("failed to parse result: {e}"));
        if !is_legacy_result(ver) {
            return serde_json::from_value(v.clone()).map_err(bad);
        }
        #[derive(Deserialize)]
        struct Legacy {
            #[serde(with = "text")]
            ip: IpNetwork,
            #[serde(default, with = "text::opt")]
            gateway: Option<IpAddr>,
            #[serde(default)]
            routes: Vec<Route>,
        }
        let mut r = CniResult::default();
        for key in ["ip4", "ip6"] {
            if let Some(l) = obj.get(key).filter(|v| !v.is_null()) {
                let l: Legacy = serde_json::from_value(l.clone()).map_err(bad)?;
                r.ips.push(IpConfig {
                    address: l.ip,
                    gateway: l.gateway,
                    interface: None,
                });
                r.routes.extend(l.routes);
            }
        }
        if let Some(d) = obj.get("dns").filter(|v| !v.is_null()) {
            r.dns = serde_json::from_value(d.clone()).map_err(bad)?;
        }
        Ok(r)
    }

    /// Parses result bytes (a plugin's stdout).
    pub fn from_slice(b: &[u8], default_version: &str) -> Result<CniResult, CniError> {
        let v: Value = serde_json::from_slice(b)
            .map_err(|e| CniError::decoding(format!("failed to parse result: {e}")))?;
        CniResult::from_value(&v, default_version)
    }

    /// The JSON of this result at `version`, with `cniVersion` set.
    pub fn to_value(&self, version: &str) -> Result<Value, CniError> {
        let ver = Version::parse(version)?;
        if is_legacy_result(ver) {
            return self.to_legacy(version);
        }
        let mut v = serde_json::to_value(self)
            .map_err(|e| CniError::internal(format!("encode result: {e}")))?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| CniError::internal("result encodes to a non-object"))?;
        if ver < Version::V1_0_0 {
            if let Some(Value::Array(ifs)) = obj.get_mut("interfaces") {
                for i in ifs.iter_mut().filter_map(Value::as_object_mut) {
                    i.remove("mtu");
                    i.remove("socketPath");
                    i.remove("pciID");
                }
            }
            if let Some(Value::Array(ips)) = obj.get_mut("ips") {
                for (ip, cfg) in ips.iter_mut().zip(&self.ips) {
                    if let Some(o) = ip.as_object_mut() {
                        o.insert("version".into(), json!(family(&cfg.address)));
                    }
                }
            }
        }
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version));
        out.extend(std::mem::take(obj));
        Ok(Value::Object(out))
    }

    fn to_legacy(&self, version: &str) -> Result<Value, CniError> {
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version));
        let mut any = false;
        for (key, v4) in [("ip4", true), ("ip6", false)] {
            let Some(ip) = self.ips.iter().find(|i| i.address.is_ipv4() == v4) else {
                continue;
            };
            any = true;
            let mut o = Map::new();
            o.insert("ip".into(), json!(ip.address.to_string()));
            if let Some(gw) = ip.gateway {
                o.insert("gateway".into(), json!(gw.to_string()));
            }
            let routes: Vec<Value> = self
                .routes
                .iter()
                .filter(|r| r.dst.is_ipv4() == v4)
                .map(|r| {
                    let mut m = json!({"dst": r.dst.to_string()});
                    if let Some(gw) = r.gw {
                        m["gw"] = json!(gw.to_string());
                    }
                    m
                })
                .collect();
            if !routes.is_empty() {
                o.insert("routes".into(), Value::Array(routes));
            }
            out.insert(key.into(), Value::Object(o));
        }
        if !any {
            return Err(CniError::decoding("cannot convert: no valid IP addresses"));
        }
        out.insert(
            "dns".into(),
            serde_json::to_value(&self.dns).unwrap_or_else(|_| json!({})),
        );
        Ok(Value::Object(out))
    }

    /// Index of the interface named `ifname` inside `sandbox` (the container's interface).
    pub fn container_interface(&self, ifname: &str) -> Option<usize> {
        self.interfaces
            .iter()
            .position(|i| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
    }

    /// The family gateway for a route without `gw`: the first IP of that family with a gateway.
    pub fn family_gateway(&self, v4: bool) -> Option<IpAddr> {
        self.ips
            .iter()
            .filter(|i| i.address.is_ipv4() == v4)
            .find_map(|i| i.gateway)
    }
}

impl FromStr for CniResult {
    type Err = CniError;
    fn from_str(s: &str) -> Result<CniResult, CniError> {
        CniResult::from_slice(s.as_bytes(), super::version::CURRENT_VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::version::SUPPORTED_VERSIONS;

    fn sample() -> CniResult {
        serde_json::from_value(json!({
            "interfaces":[{"name":"cni0","mac":"42:d2:d6:74:d1:b2"},{"name":"veth1","mac":"56:d6:17:4e:d0:00","mtu":1450},
                          {"name":"eth0","mac":"5a:91:04:0e:c0:08","sandbox":"/var/run/netns/x"}],
            "ips":[{"interface":2,"address":"10.244.7.2/24","gateway":"10.244.7.1"},
                   {"interface":2,"address":"fd00::2/64","gateway":"fd00::1"}],
            "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0","gw":"fd00::1"}],
            "dns":{"nameservers":["10.0.0.10"]}
        }))
        .unwrap()
    }

    #[test]
    fn round_trip_every_version() {
        let r = sample();
        for v in SUPPORTED_VERSIONS {
            let j = r.to_value(v).unwrap();
            assert_eq!(j["cniVersion"], json!(v));
            let back = CniResult::from_value(&j, "9.9.9").unwrap();
            let ver = Version::parse(v).unwrap();
            if is_legacy_result(ver) {
                assert!(j.get("ips").is_none());
                assert_eq!(j["ip4"]["ip"], "10.244.7.2/24");
                assert_eq!(j["ip6"]["gateway"], "fd00::1");
                assert_eq!(back.ips.len(), 2);
                assert_eq!(back.routes.len(), 2);
            } else if ver < Version::V1_0_0 {
                assert_eq!(j["ips"][0]["version"], "4");
                assert_eq!(j["ips"][1]["version"], "6");
                assert!(j["interfaces"][1].get("mtu").is_none());
                let mut expect = r.clone();
                expect.interfaces[1].mtu = None;
                assert_eq!(back, expect);
            } else {
                assert!(j["ips"][0].get("version").is_none());
                assert_eq!(back, r);
            }
        }
    }

    #[test]
    fn legacy_needs_an_ip_and_default_version() {
        let empty = CniResult::default();
        assert_eq!(empty.to_value("0.2.0").unwrap_err().code, 6);
        // No cniVersion: the config's version decides the shape.
        let r = CniResult::from_value(&json!({"ip4":{"ip":"10.1.0.2/24"}}), "0.2.0").unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.2/24");
        assert_eq!(sample().container_interface("eth0"), Some(2));
        assert_eq!(
            sample().family_gateway(true),
            Some("10.244.7.1".parse().unwrap())
        );
    }
}
