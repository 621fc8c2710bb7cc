//! The delegate config the `twill` plugin hands to its bridge, rendered from the plugin's
//! own config and the node's subnet.env exactly as the flannel CNI plugin renders it.

use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use twill_common::cni::{CniError, NetConf};
use twill_common::subnet_env::{SubnetEnv, SubnetEnvError};

/// Default location of the subnet file twilld writes.
pub const DEFAULT_SUBNET_FILE: &str = "/run/twill/subnet.env";
/// Default directory of the saved delegate configs.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/twill";
/// Delegate and IPAM types used when the config names none.
pub const DEFAULT_DELEGATE: &str = "twill-bridge";
pub const DEFAULT_IPAM: &str = "twill-host-local";

/// The `twill` plugin's own fields (flannel CNI plugin names).
#[derive(Debug, Clone, Deserialize)]
pub struct MetaConf {
    #[serde(rename = "subnetFile", default = "default_subnet_file")]
    pub subnet_file: PathBuf,
    #[serde(rename = "dataDir", default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub delegate: Option<Map<String, Value>>,
}

fn default_subnet_file() -> PathBuf {
    PathBuf::from(DEFAULT_SUBNET_FILE)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

impl MetaConf {
    /// Reads the plugin's fields and validates `delegate` as the flannel plugin does.
    pub fn from_netconf(conf: &NetConf) -> Result<MetaConf, CniError> {
        let m: MetaConf = conf.decode()?;
        if let Some(d) = &m.delegate {
            if d.contains_key("name") {
                return Err(CniError::invalid_config(
                    "'delegate' dictionary must not have 'name' field, it'll be set by twill",
                ));
            }
            if d.contains_key("ipam") {
                return Err(CniError::invalid_config(
                    "'delegate' dictionary must not have 'ipam' field, it'll be set by twill",
                ));
            }
            if d.get("type").is_some_and(|t| !t.is_string()) {
                return Err(CniError::invalid_config(
                    "'delegate' field 'type' must be a string",
                ));
            }
        }
        if m.subnet_file.as_os_str().is_empty() || m.data_dir.as_os_str().is_empty() {
            return Err(CniError::invalid_config(
                "subnetFile and dataDir must not be empty",
            ));
        }
        Ok(m)
    }
}

/// Reads the subnet file: missing is "try again later" (twilld has not written it yet),
/// malformed is an invalid configuration.
pub fn load_subnet_env(meta: &MetaConf) -> Result<SubnetEnv, CniError> {
    let env = SubnetEnv::read(&meta.subnet_file).map_err(|e| match e {
        SubnetEnvError::Read { path, source } => CniError::new(
            twill_common::cni::code::TRY_AGAIN_LATER,
            format!(
                "failed to load twill subnet file {}: {source}; twilld writes it once the node's \
                 network is up: check that twilld runs on this node and read its log",
                path.display()
            ),
        ),
        e => CniError::invalid_config(e.to_string()),
    })?;
    check_subnets_inside(&env, &meta.subnet_file)?;
    Ok(env)
}

/// The node's subnet must lie inside the cluster network: routes and the masquerade exclusion
/// are rendered from the network, so a subnet outside it would give pods a broken datapath.
fn check_subnets_inside(env: &SubnetEnv, file: &std::path::Path) -> Result<(), CniError> {
    let outside = |net: IpNetwork, sub: IpNetwork, kn: &str, ks: &str| {
        CniError::invalid_config(format!(
            "{}: {ks} {sub} is outside {kn} {net}",
            file.display()
        ))
    };
    if let (Some(n), Some(s)) = (env.network, env.subnet) {
        if s.prefix() < n.prefix() || !n.contains(s.network()) {
            return Err(outside(
                n.into(),
                s.into(),
                "FLANNEL_NETWORK",
                "FLANNEL_SUBNET",
            ));
        }
    }
    if let (Some(n), Some(s)) = (env.ipv6_network, env.ipv6_subnet) {
        if s.prefix() < n.prefix() || !n.contains(s.network()) {
            return Err(outside(
                n.into(),
                s.into(),
                "FLANNEL_IPV6_NETWORK",
                "FLANNEL_IPV6_SUBNET",
            ));
        }
    }
    Ok(())
}

/// Renders the delegate config (flannel `getDelegateIPAM` + `doCmdAdd`).
pub fn render(
    conf: &NetConf,
    meta: &MetaConf,
    env: &SubnetEnv,
) -> Result<Map<String, Value>, CniError> {
    let mut d = meta.delegate.clone().unwrap_or_default();
    d.entry("type").or_insert_with(|| json!(DEFAULT_DELEGATE));
    d.entry("ipMasq").or_insert_with(|| json!(!env.ipmasq));
    d.entry("mtu").or_insert_with(|| json!(env.mtu));
    let is_bridge = matches!(
        d.get("type").and_then(Value::as_str),
        Some("twill-bridge" | "bridge")
    );
    if is_bridge {
        d.entry("isGateway").or_insert_with(|| json!(true));
        // The gateway follows subnet.env: when the node's subnet changed (lease lost, new
        // PublicIP), cni0 still holds the old gateway and flannel fails every new pod with
        // "already has an IP address different from" (flannel#1850). Repair it instead.
        d.entry("forceAddress").or_insert_with(|| json!(true));
    }
    let cluster: Vec<String> = [
        env.network.map(|n| n.to_string()),
        env.ipv6_network.map(|n| n.to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    // Pod→pod traffic across nodes keeps the pod's source IP: twill-bridge's masquerade skips
    // the whole cluster network, not only this node's subnet (the flannel plugin's bridge
    // NATs it). The reference bridge has no such field, so it is rendered for twill-bridge only.
    if d.get("type").and_then(Value::as_str) == Some(DEFAULT_DELEGATE)
        && d.get("ipMasq").and_then(Value::as_bool) == Some(true)
        && !cluster.is_empty()
    {
        d.entry("masqExclude").or_insert_with(|| json!(cluster));
    }
    d.insert("name".into(), json!(conf.name));
    d.insert("cniVersion".into(), json!(conf.version()));

    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type").or_insert_with(|| json!(DEFAULT_IPAM));
    let mut ranges = Vec::new();
    if let Some(s) = env.subnet {
        ranges.push(json!([{"subnet": s.to_string()}]));
    }
    if let Some(s) = env.ipv6_subnet {
        ranges.push(json!([{"subnet": s.to_string()}]));
    }
    if ranges.is_empty() {
        return Err(CniError::invalid_config(format!(
            "{} has no FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET",
            meta.subnet_file.display()
        )));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes = match ipam.get("routes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(r)) => r.clone(),
        Some(_) => return Err(CniError::invalid_config("ipam.routes must be a list")),
    };
    for net in [
        env.network.map(|n| n.to_string()),
        env.ipv6_network.map(|n| n.to_string()),
    ]
    .into_iter()
    .flatten()
    {
        routes.push(json!({"dst": net}));
    }
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));

    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), Value::Object(rc.clone()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netconf(v: Value) -> NetConf {
        NetConf::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn renders_like_flannel() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let conf = netconf(
            json!({"cniVersion":"0.3.1","name":"cni-flannel","type":"twill",
            "delegate":{"hairpinMode":true,"isDefaultGateway":true},
            "ipam":{"dataDir":"/x/networks"},"runtimeConfig":{"portMappings":[]}}),
        );
        let meta = MetaConf::from_netconf(&conf).unwrap();
        assert_eq!(meta.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(meta.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let d = render(&conf, &meta, &env).unwrap();
        assert_eq!(
            Value::Object(d),
            json!({"type":"twill-bridge","ipMasq":false,"mtu":1472,"isGateway":true,
                "forceAddress":true,"hairpinMode":true,"isDefaultGateway":true,"name":"cni-flannel","cniVersion":"0.3.1",
                "ipam":{"type":"twill-host-local","dataDir":"/x/networks",
                        "ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"}]},
                "runtimeConfig":{"portMappings":[]}})
        );
    }

    #[test]
    fn bridge_masquerade_excludes_the_cluster_network() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let conf = netconf(json!({"cniVersion":"1.0.0","name":"n","type":"twill"}));
        let d = render(&conf, &MetaConf::from_netconf(&conf).unwrap(), &env).unwrap();
        assert_eq!(d["ipMasq"], json!(true));
        assert_eq!(d["masqExclude"], json!(["10.1.0.0/16"]));
        // The reference bridge does not know the field; an explicit value wins.
        for (delegate, want) in [
            (json!({"type":"bridge"}), None),
            (
                json!({"masqExclude":["10.0.0.0/8"]}),
                Some(json!(["10.0.0.0/8"])),
            ),
            (json!({"ipMasq":false}), None),
        ] {
            let c = netconf(
                json!({"cniVersion":"1.0.0","name":"n","type":"twill","delegate":delegate}),
            );
            let d = render(&c, &MetaConf::from_netconf(&c).unwrap(), &env).unwrap();
            assert_eq!(d.get("masqExclude").cloned(), want);
        }
    }

    #[test]
    fn subnet_outside_the_network_is_invalid_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("subnet.env");
        let conf =
            netconf(json!({"cniVersion":"1.0.0","name":"n","type":"twill","subnetFile":file}));
        let meta = MetaConf::from_netconf(&conf).unwrap();
        for (text, names) in [
            ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.2.3.1/24\n", ["10.2.3.0/24", "10.1.0.0/16"]),
            ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.0.0.1/8\n", ["10.0.0.0/8", "10.1.0.0/16"]),
            ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.1.1/24\nFLANNEL_IPV6_NETWORK=fd00:1::/56\nFLANNEL_IPV6_SUBNET=fd00:2::1/64\n",
             ["fd00:2::/64", "fd00:1::/56"]),
        ] {
            std::fs::write(&file, format!("{text}FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")).unwrap();
            let e = load_subnet_env(&meta).unwrap_err();
            assert_eq!(e.code, 7, "{e}");
            assert!(names.iter().all(|n| e.msg.contains(n)), "{e}");
        }
        std::fs::write(&file, "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n").unwrap();
        load_subnet_env(&meta).unwrap();
    }

    #[test]
    fn explicit_fields_win_and_bad_delegates_are_rejected() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let conf = netconf(json!({"cniVersion":"1.0.0","name":"n","type":"twill",
            "delegate":{"type":"ptp","ipMasq":false,"mtu":1400},
            "ipam":{"type":"host-local","routes":[{"dst":"0.0.0.0/0"}]}}));
        let d = render(&conf, &MetaConf::from_netconf(&conf).unwrap(), &env).unwrap();
        assert_eq!(
            (d["type"].as_str(), d["ipMasq"].as_bool(), d["mtu"].as_u64()),
            (Some("ptp"), Some(false), Some(1400))
        );
        assert!(
            d.get("isGateway").is_none() && d.get("forceAddress").is_none(),
            "isGateway and forceAddress are for bridges only"
        );
        assert_eq!(d["ipam"]["type"], "host-local");
        assert_eq!(
            d["ipam"]["routes"],
            json!([{"dst":"0.0.0.0/0"},{"dst":"10.1.0.0/16"}])
        );
        for bad in [json!({"name":"x"}), json!({"ipam":{}}), json!({"type":5})] {
            let c = netconf(json!({"cniVersion":"1.0.0","name":"n","type":"twill","delegate":bad}));
            assert_eq!(MetaConf::from_netconf(&c).unwrap_err().code, 7);
        }
    }
}
