//! flannel's `subnet.env`: written by `twilld`, read by the `twill` CNI plugin.
//!
//! Format (flannel `WriteSubnetFile`, line order fixed, family lines only when present):
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.1.1/24
//! FLANNEL_IPV6_NETWORK=2001:cafe:42::/56
//! FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```
//! Parsing follows the flannel CNI plugin: unknown keys are ignored, CIDRs are masked to their
//! network (`10.1.17.1/24` → `10.1.17.0/24`), `FLANNEL_IPMASQ` is true only for exactly `true`,
//! and a network, a subnet, `FLANNEL_MTU` and `FLANNEL_IPMASQ` are required.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

/// Why a subnet.env could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("failed to load flannel 'subnet.env' file: open {path}: {source}. Check the twilld log for this node.")]
    Read { path: PathBuf, source: io::Error },
    #[error("{0} is missing {1}")]
    Missing(String, String),
    #[error("subnet.env: bad value for {key}: {value:?}")]
    BadValue { key: &'static str, value: String },
    #[error("subnet.env: cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The content of a subnet.env. A comma-separated `FLANNEL_NETWORK` list (which the flannel
/// plugin accepts) is validated entry by entry; twill keeps the first entry, the only one twilld
/// ever writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// Cluster pod network (masked).
    pub network: Option<Ipv4Network>,
    /// This node's pod subnet, masked (`10.244.1.0/24`).
    pub subnet: Option<Ipv4Network>,
    pub ipv6_network: Option<Ipv6Network>,
    pub ipv6_subnet: Option<Ipv6Network>,
    pub mtu: u32,
    pub ipmasq: bool,
}

fn mask(net: IpNetwork) -> IpNetwork {
    // ipnetwork's constructors only fail on prefix > max, which the parsed value already obeys.
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

fn parse_v4(key: &'static str, v: &str) -> Result<Ipv4Network, SubnetEnvError> {
    match v.trim().parse::<IpNetwork>().map(mask) {
        Ok(IpNetwork::V4(n)) => Ok(n),
        _ => Err(SubnetEnvError::BadValue {
            key,
            value: v.to_string(),
        }),
    }
}

fn parse_v6(key: &'static str, v: &str) -> Result<Ipv6Network, SubnetEnvError> {
    match v.trim().parse::<IpNetwork>().map(mask) {
        Ok(IpNetwork::V6(n)) => Ok(n),
        _ => Err(SubnetEnvError::BadValue {
            key,
            value: v.to_string(),
        }),
    }
}

impl SubnetEnv {
    /// A v4-only subnet.env.
    pub fn new_v4(network: Ipv4Network, subnet: Ipv4Network, mtu: u32, ipmasq: bool) -> SubnetEnv {
        SubnetEnv {
            network: Some(network),
            subnet: Some(subnet),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu,
            ipmasq,
        }
    }

    /// Parses the file content; `origin` names the file in error messages.
    pub fn parse_named(text: &str, origin: &str) -> Result<SubnetEnv, SubnetEnvError> {
        let mut networks = Vec::new();
        let mut subnet = None;
        let mut ipv6_network = None;
        let mut ipv6_subnet = None;
        let mut mtu = None;
        let mut ipmasq = None;
        for line in text.lines() {
            let line = line.trim();
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k.trim() {
                "FLANNEL_NETWORK" => {
                    networks = v
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| parse_v4("FLANNEL_NETWORK", s))
                        .collect::<Result<_, _>>()?;
                }
                "FLANNEL_SUBNET" => subnet = Some(parse_v4("FLANNEL_SUBNET", v)?),
                "FLANNEL_IPV6_NETWORK" => ipv6_network = Some(parse_v6("FLANNEL_IPV6_NETWORK", v)?),
                "FLANNEL_IPV6_SUBNET" => ipv6_subnet = Some(parse_v6("FLANNEL_IPV6_SUBNET", v)?),
                "FLANNEL_MTU" => {
                    mtu = Some(
                        v.trim()
                            .parse::<u32>()
                            .map_err(|_| SubnetEnvError::BadValue {
                                key: "FLANNEL_MTU",
                                value: v.to_string(),
                            })?,
                    )
                }
                "FLANNEL_IPMASQ" => ipmasq = Some(v == "true"),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        if networks.is_empty() && ipv6_network.is_none() {
            missing.push("FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK");
        }
        if subnet.is_none() && ipv6_subnet.is_none() {
            missing.push("FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET");
        }
        if mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if ipmasq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        if !missing.is_empty() {
            return Err(SubnetEnvError::Missing(
                origin.to_string(),
                missing.join(", "),
            ));
        }
        Ok(SubnetEnv {
            network: networks.first().copied(),
            subnet,
            ipv6_network,
            ipv6_subnet,
            mtu: mtu.unwrap_or_default(),
            ipmasq: ipmasq.unwrap_or_default(),
        })
    }

    /// Parses the file content.
    pub fn parse(text: &str) -> Result<SubnetEnv, SubnetEnvError> {
        SubnetEnv::parse_named(text, "subnet.env")
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let text = std::fs::read_to_string(path).map_err(|source| SubnetEnvError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        SubnetEnv::parse_named(&text, &path.display().to_string())
    }

    /// flannel's rendering: subnets as their first usable address with the prefix length.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.network {
            s.push_str(&format!("FLANNEL_NETWORK={n}\n"));
        }
        if let Some(sn) = self.subnet {
            s.push_str(&format!(
                "FLANNEL_SUBNET={}\n",
                first_host(IpNetwork::V4(sn))
            ));
        }
        if let Some(n) = self.ipv6_network {
            s.push_str(&format!("FLANNEL_IPV6_NETWORK={n}\n"));
        }
        if let Some(sn) = self.ipv6_subnet {
            s.push_str(&format!(
                "FLANNEL_IPV6_SUBNET={}\n",
                first_host(IpNetwork::V6(sn))
            ));
        }
        s.push_str(&format!("FLANNEL_MTU={}\n", self.mtu));
        s.push_str(&format!("FLANNEL_IPMASQ={}\n", self.ipmasq));
        s
    }

    /// Writes the file atomically, mode 0644 (the CNI plugin runs as root, but operators read it).
    /// The parent directory is created 0755 if missing, as flannel does.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        let err = |source| SubnetEnvError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !dir.exists() {
                crate::fsutil::ensure_dir(dir, 0o755).map_err(err)?;
            }
        }
        crate::fsutil::atomic_write(path, self.render().as_bytes(), 0o644).map_err(err)
    }
}

fn first_host(net: IpNetwork) -> String {
    let ip = match net.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a).wrapping_add(1)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a).wrapping_add(1)).into()),
    };
    format!("{}/{}", ip, net.prefix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_v4() {
        let e = SubnetEnv::new_v4(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            1450,
            true,
        );
        let text = e.render();
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&text).unwrap(), e);
    }

    #[test]
    fn flannel_plugin_rules() {
        let e = SubnetEnv::parse(
            "FOO=bar\nFLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n\
             FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n\
             FLANNEL_MTU=1472\nFLANNEL_IPMASQ=TRUE\n",
        )
        .unwrap();
        assert_eq!(e.subnet.unwrap().to_string(), "10.1.17.0/24");
        assert_eq!(e.network.unwrap().to_string(), "10.1.0.0/16");
        assert_eq!(e.ipv6_subnet.unwrap().to_string(), "2001:cafe:42::/64");
        assert!(!e.ipmasq, "only the exact string `true` is true");
        assert_eq!(e.mtu, 1472);
        let again = SubnetEnv::parse(&e.render()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn missing_fields_are_named() {
        let err = SubnetEnv::parse("FLANNEL_SUBNET=10.1.17.1/24\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("FLANNEL_NETWORK"), "{msg}");
        assert!(msg.contains("FLANNEL_MTU"), "{msg}");
        assert!(msg.contains("FLANNEL_IPMASQ"), "{msg}");
        assert!(!msg.contains("FLANNEL_SUBNET,"), "{msg}");
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=nope\n").is_err());
    }

    #[test]
    fn write_and_read() {
        let dir = tempfile_dir();
        let p = dir.join("sub/subnet.env");
        let e = SubnetEnv::new_v4(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.7.0/24".parse().unwrap(),
            8950,
            false,
        );
        e.write(&p).unwrap();
        assert_eq!(SubnetEnv::read(&p).unwrap(), e);
        let err = SubnetEnv::read(&dir.join("nope")).unwrap_err().to_string();
        assert!(
            err.contains("failed to load flannel 'subnet.env' file"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "twill-subnetenv-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
