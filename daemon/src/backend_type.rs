//! flannel's `BackendType`, one type for the network config, the leases and `init-network`.
//! Leases of backends twill does not run (udp, wireguard, …) round-trip as `Other`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendType {
    Vxlan,
    HostGw,
    /// A backend twill does not run; kept so a foreign lease is not misread.
    Other(String),
}

impl BackendType {
    /// The name as flannel writes it (`"vxlan"`, `"host-gw"`).
    pub fn as_str(&self) -> &str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
            BackendType::Other(s) => s,
        }
    }

    /// flannel matches backend names case-insensitively in the config.
    pub fn parse(s: &str) -> BackendType {
        match s.to_ascii_lowercase().as_str() {
            "vxlan" => BackendType::Vxlan,
            "host-gw" => BackendType::HostGw,
            _ => BackendType::Other(s.to_string()),
        }
    }
}

impl fmt::Display for BackendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--backend` of `init-network`: only the backends twill runs.
impl clap::ValueEnum for BackendType {
    fn value_variants<'a>() -> &'a [Self] {
        &[BackendType::Vxlan, BackendType::HostGw]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        match self {
            BackendType::Vxlan => Some(clap::builder::PossibleValue::new("vxlan")),
            BackendType::HostGw => Some(clap::builder::PossibleValue::new("host-gw")),
            BackendType::Other(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in [
            BackendType::Vxlan,
            BackendType::HostGw,
            BackendType::Other("udp".into()),
        ] {
            assert_eq!(BackendType::parse(t.as_str()), t);
        }
        assert_eq!(BackendType::parse("VXLAN"), BackendType::Vxlan);
        assert_eq!(BackendType::parse("Host-GW"), BackendType::HostGw);
        use clap::ValueEnum;
        assert_eq!(
            BackendType::from_str("host-gw", false).unwrap(),
            BackendType::HostGw
        );
        assert!(BackendType::from_str("udp", false).is_err());
    }
}
