//! host-local's configuration: range sets, legacy single range, routes, dataDir, resolvConf,
//! requested IPs; canonicalized and validated like the reference allocator.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::Value;
use twill_common::cni::{CniError, Env, NetConf, Route, Version};

use crate::ipnet::{bounds, from_u128, same_family, to_u128};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

#[derive(Debug, Clone, Default, Deserialize)]
struct RawRange {
    #[serde(default)]
    subnet: String,
    #[serde(rename = "rangeStart", default)]
    range_start: Option<String>,
    #[serde(rename = "rangeEnd", default)]
    range_end: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RawIpam {
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(flatten)]
    legacy: RawRange,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(rename = "dataDir", default)]
    data_dir: Option<String>,
    #[serde(rename = "resolvConf", default)]
    resolv_conf: Option<String>,
}

/// One canonical range: `start..=end` inside `subnet`, with its gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The network with host bits zero.
    pub subnet: IpNetwork,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: Option<IpAddr>,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        same_family(ip, self.start)
            && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    fn overlaps(&self, o: &Range) -> bool {
        same_family(self.start, o.start)
            && to_u128(self.start) <= to_u128(o.end)
            && to_u128(o.start) <= to_u128(self.end)
    }

    /// Addresses allocatable from this range (the gateway excluded).
    pub fn size(&self) -> u128 {
        let n = (to_u128(self.end) - to_u128(self.start)).saturating_add(1);
        match self.gateway {
            Some(g) if self.contains(g) => n - 1,
            _ => n,
        }
    }

    pub fn describe(&self) -> String {
        format!("{}-{}", self.start, self.end)
    }
}

/// A range set: one address is allocated from each set.
pub type RangeSet = Vec<Range>;

pub fn set_contains(set: &RangeSet, ip: IpAddr) -> bool {
    set.iter().any(|r| r.contains(ip))
}

pub fn describe_set(set: &RangeSet) -> String {
    set.iter()
        .map(Range::describe)
        .collect::<Vec<_>>()
        .join(",")
}

/// The effective host-local configuration.
#[derive(Debug, Clone)]
pub struct IpamConfig {
    pub name: String,
    pub version: String,
    pub range_sets: Vec<RangeSet>,
    pub routes: Vec<Route>,
    pub data_dir: PathBuf,
    pub resolv_conf: Option<PathBuf>,
    /// Requested addresses from CNI_ARGS `IP=`, `args.cni.ips` and `runtimeConfig.ips`.
    pub requested: Vec<IpAddr>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::invalid_config("Invalid Configuration").with_details(msg)
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr, CniError> {
    s.parse()
        .map_err(|_| invalid(format!("invalid {what} {s:?}")))
}

/// An address given as `a.b.c.d` or `a.b.c.d/len` (runtimeConfig.ips allows both).
fn parse_ip_or_cidr(s: &str) -> Result<IpAddr, CniError> {
    match s.split_once('/') {
        Some((ip, _)) => parse_ip(ip, "requested IP"),
        None => parse_ip(s, "requested IP"),
    }
}

fn opt(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

fn canonicalize(raw: &RawRange) -> Result<Range, CniError> {
    let net: IpNetwork = raw
        .subnet
        .parse()
        .map_err(|_| invalid(format!("invalid subnet {:?}", raw.subnet)))?;
    let bits = if net.is_ipv4() { 32 } else { 128 };
    // A /0 would hand out addresses such as 0.0.0.2/0 and give the pod a route to everything
    // through its own link: no pod network is the whole address space.
    if net.prefix() == 0 {
        return Err(invalid(format!(
            "Network {net} is the whole address space: not a valid pod subnet"
        )));
    }
    if net.prefix() > bits - 2 {
        return Err(invalid(format!(
            "Network {net} too small to allocate from."
        )));
    }
    if net.ip() != net.network() {
        return Err(invalid(format!(
            "Network has host bits set. For a subnet mask of length {} the network address is {}",
            net.prefix(),
            net.network()
        )));
    }
    let subnet = IpNetwork::new(net.network(), net.prefix()).map_err(|e| invalid(e.to_string()))?;
    let v4 = net.is_ipv4();
    let (first, last) = bounds(&subnet);
    let in_net = |ip: IpAddr, what: &str| -> Result<IpAddr, CniError> {
        if same_family(ip, subnet.ip()) && subnet.contains(ip) {
            Ok(ip)
        } else {
            Err(invalid(format!("{what} {ip} not in network {subnet}")))
        }
    };
    let gateway = match opt(&raw.gateway) {
        Some(g) => Some(parse_ip(g, "gateway")?),
        None => Some(from_u128(first + 1, v4)),
    };
    let start = match opt(&raw.range_start) {
        Some(s) => in_net(parse_ip(s, "rangeStart")?, "RangeStart")?,
        None => from_u128(first + 1, v4),
    };
    // The v4 broadcast address is never handed out.
    let end = match opt(&raw.range_end) {
        Some(s) => in_net(parse_ip(s, "rangeEnd")?, "RangeEnd")?,
        None => from_u128(if v4 { last - 1 } else { last }, v4),
    };
    if to_u128(start) > to_u128(end) {
        return Err(invalid(format!(
            "RangeStart {start} is after RangeEnd {end}"
        )));
    }
    Ok(Range {
        subnet,
        start,
        end,
        gateway,
    })
}

impl IpamConfig {
    /// Builds the config from the whole network config (host-local reads `name`,
    /// `cniVersion`, `ipam`, `args` and `runtimeConfig`) and the CNI_ARGS.
    pub fn load(conf: &NetConf, env: &Env) -> Result<IpamConfig, CniError> {
        let ipam = conf
            .ipam
            .clone()
            .ok_or_else(|| invalid("IPAM config missing 'ipam' key"))?;
        let raw: RawIpam =
            serde_json::from_value(Value::Object(ipam)).map_err(|e| invalid(e.to_string()))?;
        let mut raw_sets: Vec<Vec<RawRange>> = Vec::new();
        if let Some(rt) = conf.runtime("ipRanges") {
            let rt: Vec<Vec<RawRange>> = serde_json::from_value(rt.clone())
                .map_err(|e| invalid(format!("runtimeConfig.ipRanges: {e}")))?;
            raw_sets.extend(rt);
        }
        if !raw.legacy.subnet.is_empty() {
            raw_sets.push(vec![raw.legacy.clone()]);
        }
        raw_sets.extend(raw.ranges.iter().cloned());
        if raw_sets.is_empty() {
            return Err(invalid("no IP ranges specified"));
        }
        let mut range_sets: Vec<RangeSet> = Vec::new();
        for (i, set) in raw_sets.iter().enumerate() {
            if set.is_empty() {
                return Err(invalid(format!("empty range set {i}")));
            }
            let set: RangeSet = set.iter().map(canonicalize).collect::<Result<_, _>>()?;
            if set.iter().any(|r| !same_family(r.start, set[0].start)) {
                return Err(invalid(format!("mixed address families in range set {i}")));
            }
            for (a, ra) in set.iter().enumerate() {
                for rb in &set[a + 1..] {
                    if ra.overlaps(rb) {
                        return Err(invalid(format!(
                            "range set {i}: ranges {} and {} overlap",
                            ra.describe(),
                            rb.describe()
                        )));
                    }
                }
            }
            for (j, prev) in range_sets.iter().enumerate() {
                if prev.iter().any(|p| set.iter().any(|r| r.overlaps(p))) {
                    return Err(invalid(format!("range set {i} overlaps with {j}")));
                }
            }
            range_sets.push(set);
        }
        if Version::parse(conf.version())? < Version::V0_3_0 {
            let v4 = range_sets.iter().filter(|s| s[0].start.is_ipv4()).count();
            if v4 > 1 || range_sets.len() - v4 > 1 {
                return Err(invalid(format!(
                    "CNI version {} does not support more than 1 address per family",
                    conf.version()
                )));
            }
        }
        let mut requested = Vec::new();
        env.args.check_known(&["IP"])?;
        if let Some(ip) = env.args.get("IP") {
            for s in ip.split(',').filter(|s| !s.is_empty()) {
                requested.push(parse_ip(s.trim(), "CNI_ARGS IP")?);
            }
        }
        // Wrong-typed lists are errors (the reference fails to decode them), never ignored.
        for s in conf
            .cni_arg_strs("ips")?
            .into_iter()
            .chain(conf.runtime_strs("ips")?)
        {
            requested.push(parse_ip_or_cidr(s)?);
        }
        requested.dedup();
        Ok(IpamConfig {
            name: conf.name.clone(),
            version: conf.version().to_string(),
            range_sets,
            routes: raw.routes,
            data_dir: PathBuf::from(
                raw.data_dir
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            ),
            resolv_conf: raw.resolv_conf.filter(|s| !s.is_empty()).map(PathBuf::from),
            requested,
        })
    }

    /// `<dataDir>/<network name>`.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(ipam: Value) -> Result<IpamConfig, CniError> {
        let conf = NetConf::parse(
            json!({"cniVersion":"1.0.0","name":"n","type":"x","ipam":ipam})
                .to_string()
                .as_bytes(),
        )?;
        let env = Env::from_lookup(|k| (k == "CNI_COMMAND").then(|| "STATUS".to_string()))?;
        IpamConfig::load(&conf, &env)
    }

    #[test]
    fn defaults_and_validation() {
        let c = load(json!({"type":"host-local","subnet":"10.1.2.0/24"})).unwrap();
        let r = &c.range_sets[0][0];
        assert_eq!(r.start.to_string(), "10.1.2.1");
        assert_eq!(r.end.to_string(), "10.1.2.254");
        assert_eq!(r.gateway.unwrap().to_string(), "10.1.2.1");
        assert_eq!(r.size(), 253);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let e = load(json!({"subnet":"192.168.0.0/31"})).unwrap_err();
        assert_eq!(
            (e.code, e.details.as_str()),
            (7, "Network 192.168.0.0/31 too small to allocate from.")
        );
        assert_eq!(load(json!({"subnet":"10.1.2.5/24"})).unwrap_err().code, 7);
        let e = load(json!({"ranges":[[{"subnet":"10.1.0.0/24"},{"subnet":"10.1.0.0/25"}]]}))
            .unwrap_err();
        assert!(e.details.contains("overlap"), "{e}");
        let e = load(json!({"ranges":[[{"subnet":"10.1.0.0/24"}],[{"subnet":"10.1.0.128/25"}]]}))
            .unwrap_err();
        assert!(e.details.contains("overlaps"), "{e}");
        assert_eq!(
            load(json!({"ranges":[[{"subnet":"10.1.0.0/24"},{"subnet":"fd00::/64"}]]}))
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            load(json!({"subnet":"10.1.0.0/24","rangeStart":"10.2.0.1"}))
                .unwrap_err()
                .code,
            7
        );
        let v6 = load(json!({"ranges":[[{"subnet":"fd00::/120"}]]})).unwrap();
        assert_eq!(v6.range_sets[0][0].end.to_string(), "fd00::ff");
        assert_eq!(load(json!({})).unwrap_err().code, 7);
        for whole in ["0.0.0.0/0", "::/0"] {
            let e = load(json!({"subnet": whole})).unwrap_err();
            assert!(e.code == 7 && e.details.contains(whole), "{e}");
            let e = load(json!({"ranges":[[{"subnet": whole}]]})).unwrap_err();
            assert_eq!(e.code, 7);
        }
    }
}
