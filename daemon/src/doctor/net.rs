//! The data path's network prerequisites: a free VXLAN port and an MTU that fits the underlay.

use std::io::ErrorKind;

use super::Finding;
use crate::config::{BackendConfig, NetworkConfig};

/// VXLAN encapsulation overhead over IPv4 (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Every IPv4 host must accept datagrams of 576 bytes (RFC 791).
const IPV4_MIN: u32 = 576;
/// IPv6 needs 1280 on every link (RFC 8200); pods with IPv6 break below it.
const IPV6_MIN: u32 = 1280;

/// The VTEP device as the kernel shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vtep {
    pub name: String,
    pub is_vxlan: bool,
    pub port: Option<u16>,
    pub mtu: u32,
}

/// `bind`: the outcome of binding UDP 0.0.0.0:<port>; `vtep`: twill.<VNI> if it exists.
pub fn vxlan_port(
    cfg: Option<&NetworkConfig>,
    bind: Option<Result<(), ErrorKind>>,
    vtep: Option<&Vtep>,
) -> Finding {
    let check = "vxlan port";
    let Some(cfg) = cfg else {
        return Finding::warn(
            check,
            "not checked: no valid network config",
            "fix the network config check first",
        );
    };
    let BackendConfig::Vxlan(v) = &cfg.backend else {
        return Finding::ok(check, "not used by the host-gw backend");
    };
    let port = v.port;
    let Some(bind) = bind else {
        return Finding::warn(check, format!("UDP {port} not checked"), "rerun doctor");
    };
    let ours = vtep.filter(|d| d.is_vxlan && d.port == Some(port));
    match bind {
        Ok(()) => Finding::ok(check, format!("UDP {port} is free")),
        Err(ErrorKind::AddrInUse) => match ours {
            Some(d) => Finding::ok(check, format!("UDP {port} is held by {} (twilld's VTEP)", d.name)),
            None => Finding::fail(
                check,
                format!("UDP {port} is in use by another socket: twilld cannot create its VTEP"),
                format!(
                    "find it with `ss -ulpn 'sport = :{port}'` and `ip -d link show type vxlan` (a leftover flannel.1 holds 8472); remove it or set Backend.Port to a free port"
                ),
            ),
        },
        Err(kind) => Finding::warn(
            check,
            format!("cannot bind UDP {port} to test it: {kind}"),
            "run doctor as root in the node's network namespace",
        ),
    }
}

/// Underlay MTU against the config: the pod MTU (written to subnet.env) must carry IP.
pub fn mtu(
    cfg: Option<&NetworkConfig>,
    underlay: Result<(&str, u32), &str>,
    vtep: Option<&Vtep>,
    env_mtu: Option<u32>,
) -> Finding {
    let check = "mtu";
    let Some(cfg) = cfg else {
        return Finding::warn(
            check,
            "not checked: no valid network config",
            "fix the network config check first",
        );
    };
    let (name, ul) = match underlay {
        Ok(u) => u,
        Err(e) => {
            return Finding::warn(
                check,
                format!("not checked: no underlay interface ({e})"),
                "pass --iface (or give the node a default route)",
            )
        }
    };
    let (pod, what) = match &cfg.backend {
        BackendConfig::Vxlan(v) => {
            if let Some(m) = v.mtu.filter(|m| *m > ul) {
                return Finding::warn(
                    check,
                    format!("Backend.MTU {m} is larger than {name}'s MTU {ul}: encapsulated packets above {ul} bytes are dropped"),
                    format!("set Backend.MTU to at most {ul} (or remove it to follow {name})"),
                );
            }
            let base = v.mtu.unwrap_or(ul);
            (
                base.saturating_sub(VXLAN_OVERHEAD),
                format!(
                    "{name} {ul}, pod MTU {} (vxlan overhead {VXLAN_OVERHEAD})",
                    base.saturating_sub(VXLAN_OVERHEAD)
                ),
            )
        }
        BackendConfig::HostGw => (ul, format!("{name} {ul}, pod MTU {ul} (host-gw)")),
    };
    if pod < IPV4_MIN {
        return Finding::fail(
            check,
            format!("{what}: below IPv4's minimum of {IPV4_MIN}"),
            format!(
                "raise {name}'s MTU or Backend.MTU to at least {}",
                IPV4_MIN + VXLAN_OVERHEAD
            ),
        );
    }
    if pod < IPV6_MIN {
        return Finding::warn(
            check,
            format!("{what}: below {IPV6_MIN}, too small for IPv6 in pods"),
            format!(
                "raise {name}'s MTU or Backend.MTU to at least {}",
                IPV6_MIN + VXLAN_OVERHEAD
            ),
        );
    }
    if let Some(d) = vtep.filter(|d| matches!(cfg.backend, BackendConfig::Vxlan(_)) && d.mtu != pod)
    {
        return Finding::warn(
            check,
            format!("{what}, but {} has MTU {}", d.name, d.mtu),
            "twilld corrects the VTEP's MTU on its next reconcile pass; if it stays, restart twilld",
        );
    }
    if let Some(e) = env_mtu.filter(|e| *e != pod) {
        return Finding::warn(
            check,
            format!("{what}, but subnet.env has FLANNEL_MTU={e}"),
            "restart twilld so it rewrites subnet.env; pods created meanwhile get the old MTU",
        );
    }
    Finding::ok(check, what)
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    fn cfg(s: &str) -> NetworkConfig {
        NetworkConfig::parse(s).unwrap()
    }

    fn vtep(port: u16, mtu: u32) -> Vtep {
        Vtep {
            name: "twill.1".into(),
            is_vxlan: true,
            port: Some(port),
            mtu,
        }
    }

    #[test]
    fn port() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        assert_eq!(vxlan_port(Some(&c), Some(Ok(())), None).status, Status::Ok);
        let taken = vxlan_port(Some(&c), Some(Err(ErrorKind::AddrInUse)), None);
        assert_eq!(taken.status, Status::Fail);
        assert!(
            taken.message.contains("UDP 8472 is in use"),
            "{}",
            taken.message
        );
        let ours = vxlan_port(
            Some(&c),
            Some(Err(ErrorKind::AddrInUse)),
            Some(&vtep(8472, 1450)),
        );
        assert_eq!(ours.status, Status::Ok);
        assert!(ours.message.contains("twill.1"));
        // Our device on another port does not explain a taken 8472.
        let other = vxlan_port(
            Some(&c),
            Some(Err(ErrorKind::AddrInUse)),
            Some(&vtep(4789, 1450)),
        );
        assert_eq!(other.status, Status::Fail);
        let hostgw = cfg(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#);
        assert_eq!(vxlan_port(Some(&hostgw), None, None).status, Status::Ok);
        assert_eq!(vxlan_port(None, None, None).status, Status::Warn);
    }

    #[test]
    fn mtus() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let ok = mtu(
            Some(&c),
            Ok(("eth0", 1500)),
            Some(&vtep(8472, 1450)),
            Some(1450),
        );
        assert_eq!(ok.status, Status::Ok, "{}", ok.line());
        assert_eq!(ok.message, "eth0 1500, pod MTU 1450 (vxlan overhead 50)");
        let big = cfg(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","MTU":9000}}"#);
        let w = mtu(Some(&big), Ok(("eth0", 1500)), None, None);
        assert_eq!(w.status, Status::Warn);
        assert!(w
            .message
            .contains("Backend.MTU 9000 is larger than eth0's MTU 1500"));
        assert_eq!(
            mtu(Some(&c), Ok(("eth0", 1300)), None, None).status,
            Status::Warn
        );
        assert_eq!(
            mtu(Some(&c), Ok(("eth0", 600)), None, None).status,
            Status::Fail
        );
        assert_eq!(
            mtu(Some(&c), Ok(("eth0", 1500)), Some(&vtep(8472, 1400)), None).status,
            Status::Warn
        );
        assert_eq!(
            mtu(Some(&c), Ok(("eth0", 1500)), None, Some(8950)).status,
            Status::Warn
        );
        let hostgw = cfg(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#);
        assert_eq!(
            mtu(Some(&hostgw), Ok(("eth0", 1500)), None, Some(1500)).status,
            Status::Ok
        );
        assert_eq!(
            mtu(Some(&c), Err("no default route"), None, None).status,
            Status::Warn
        );
    }
}
