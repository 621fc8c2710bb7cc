//! Subnet leases in flannel's schema: key `<prefix>/subnets/<a.b.c.d>-<len>`, value
//! `{"PublicIP":..,"PublicIPv6":null,"BackendType":..,"BackendData":{"VNI":..,"VtepMAC":..}}`.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde_json::{json, Value};

use crate::backend_type::BackendType;
use crate::config::lower_keys;

/// VtepMACs are the netlink layer's one MAC type.
pub use twill_common::netlink::Mac;

/// The lease value. `backend_data` is kept raw so foreign backends round-trip.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    pub backend_type: BackendType,
    pub backend_data: Value,
}

impl LeaseAttrs {
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, mac: Mac) -> LeaseAttrs {
        LeaseAttrs {
            public_ip,
            backend_type: BackendType::Vxlan,
            backend_data: json!({"VNI": vni, "VtepMAC": mac.to_string()}),
        }
    }

    pub fn host_gw(public_ip: Ipv4Addr) -> LeaseAttrs {
        LeaseAttrs {
            public_ip,
            backend_type: BackendType::HostGw,
            backend_data: Value::Null,
        }
    }

    /// flannel's JSON, field order as Go marshals `LeaseAttrs`.
    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"PublicIP\":\"{}\",\"PublicIPv6\":null,\"BackendType\":{}",
            self.public_ip,
            Value::String(self.backend_type.to_string())
        );
        if !self.backend_data.is_null() {
            s.push_str(",\"BackendData\":");
            s.push_str(&self.backend_data.to_string());
        }
        s.push('}');
        s
    }

    /// Parses a lease value; keys match case-insensitively, as in Go.
    pub fn parse(value: &[u8]) -> Option<LeaseAttrs> {
        let v: Value = serde_json::from_slice(value).ok()?;
        let obj = lower_keys(v.as_object()?);
        let public_ip = obj.get("publicip")?.as_str()?.parse().ok()?;
        // Lease values are exact (flannel writes lower case); an unknown one stays as it is.
        let backend_type = match obj
            .get("backendtype")
            .and_then(|t| t.as_str())
            .unwrap_or("")
        {
            "vxlan" => BackendType::Vxlan,
            "host-gw" => BackendType::HostGw,
            other => BackendType::Other(other.to_string()),
        };
        let backend_data = obj.get("backenddata").cloned().unwrap_or(Value::Null);
        Some(LeaseAttrs {
            public_ip,
            backend_type,
            backend_data,
        })
    }

    pub fn is_vxlan(&self) -> bool {
        self.backend_type == BackendType::Vxlan
    }

    /// VtepMAC and VNI of a vxlan lease.
    pub fn vtep(&self) -> Option<(Mac, u32)> {
        if !self.is_vxlan() {
            return None;
        }
        let d = lower_keys(self.backend_data.as_object()?);
        let mac = d.get("vtepmac")?.as_str()?.parse().ok()?;
        let vni = d.get("vni").and_then(|v| v.as_u64()).unwrap_or(1) as u32;
        Some((mac, vni))
    }
}

/// A lease as seen in etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Network,
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is bound to; 0 for a reservation (a key without a lease).
    pub etcd_lease: i64,
    /// The key's mod revision, for compare-and-swap updates.
    pub mod_revision: i64,
    /// The key's create revision: the older of two conflicting keys wins (lease guard,
    /// duplicate VtepMAC).
    pub create_revision: i64,
}

/// `10.5.52.0-24` for `10.5.52.0/24`.
pub fn subnet_key(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

/// Parses the last path element of a lease key (`10.5.52.0-24`, optionally `&<v6>-<len>`,
/// whose v6 part twill ignores).
pub fn parse_subnet_key(key: &str) -> Option<Ipv4Network> {
    let name = key.rsplit('/').next()?;
    let v4 = name.split('&').next()?;
    let (ip, len) = v4.split_once('-')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let net = Ipv4Network::new(ip, len).ok()?;
    // A key whose address is not the network address is not one flannel would write.
    (net.network() == ip).then_some(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_value_roundtrip() {
        let raw = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let a = LeaseAttrs::parse(raw.as_bytes()).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(a.vtep().unwrap().0.to_string(), "c6:d2:32:6f:8f:44");
        let ours = LeaseAttrs::vxlan(a.public_ip, 1, a.vtep().unwrap().0);
        assert_eq!(ours.to_json(), raw);
        assert_eq!(
            LeaseAttrs::host_gw(a.public_ip).to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        let lc = LeaseAttrs::parse(br#"{"publicip":"10.0.0.1","backendtype":"vxlan","backenddata":{"vtepmac":"02:00:00:00:00:01"}}"#).unwrap();
        assert_eq!(lc.vtep().unwrap().1, 1);
        assert!(LeaseAttrs::parse(b"{}").is_none());
    }

    #[test]
    fn keys() {
        let n: Ipv4Network = "10.5.52.0/24".parse().unwrap();
        assert_eq!(subnet_key(n), "10.5.52.0-24");
        assert_eq!(
            parse_subnet_key("/coreos.com/network/subnets/10.5.52.0-24"),
            Some(n)
        );
        assert_eq!(
            parse_subnet_key("10.12.13.0-24&fd00:12:13::-56")
                .unwrap()
                .to_string(),
            "10.12.13.0/24"
        );
        assert_eq!(parse_subnet_key("10.5.52.1-24"), None);
        assert_eq!(parse_subnet_key("garbage"), None);
    }

    #[test]
    fn random_mac_is_local_unicast() {
        for _ in 0..100 {
            let m = Mac::random();
            assert_eq!(m.0[0] & 0x03, 0x02);
            assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        }
    }
}
