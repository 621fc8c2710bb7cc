//! Kernel prerequisites: modules, `ip_forward`, and the VTEP's checksum offload on kernels
//! with the VXLAN checksum bug.

use super::Finding;
use crate::offload::KernelVersion;

/// What the node shows about one kernel module.
#[derive(Debug, Clone, Default)]
pub struct ModuleFacts {
    /// `/proc/modules` (None on kernels without module support, or unreadable).
    pub proc_modules: Option<String>,
    /// `/sys/module/<name>` exists (loaded, or built in with parameters).
    pub sys_module: bool,
    /// A file only the module creates exists (e.g. `bridge-nf-call-iptables` for br_netfilter).
    pub side_effect: bool,
    /// `/lib/modules/<release>/modules.builtin` (None when not visible, e.g. in a pod).
    pub builtin: Option<String>,
    /// `/lib/modules/<release>/modules.dep`.
    pub dep: Option<String>,
}

fn lists(list: &Option<String>, name: &str) -> bool {
    let ko = format!("/{name}.ko");
    list.as_deref().is_some_and(|l| {
        l.lines()
            .filter_map(|line| line.split(':').next())
            .any(|path| path.ends_with(&ko) || path.contains(&format!("{ko}.")))
    })
}

/// `required`: a missing module is a failure (vxlan for the vxlan backend); otherwise a warning.
/// `why` says what needs it.
pub fn module(name: &str, facts: &ModuleFacts, required: bool, why: &str) -> Finding {
    let check = format!("module {name}");
    let in_proc = facts
        .proc_modules
        .as_deref()
        .is_some_and(|m| m.lines().any(|l| l.split_whitespace().next() == Some(name)));
    if in_proc {
        return Finding::ok(check, "loaded");
    }
    if lists(&facts.builtin, name) {
        return Finding::ok(check, "built into the kernel");
    }
    if facts.sys_module || facts.side_effect {
        return Finding::ok(check, "active (built in or loaded)");
    }
    let persist = format!(
        "modprobe {name}; to load it at boot: echo {name} > /etc/modules-load.d/twill.conf"
    );
    if lists(&facts.dep, name) {
        return Finding::warn(
            check,
            format!("not loaded (available as a module; {why})"),
            persist,
        );
    }
    if facts.dep.is_none() {
        return Finding::warn(
            check,
            format!(
                "not loaded, and /lib/modules is not visible to tell whether it can be ({why})"
            ),
            format!("{persist} (on the node; in a pod, mount /lib/modules read-only)"),
        );
    }
    let msg = format!("neither loaded nor available in this kernel ({why})");
    let fix = format!("use a kernel built with {name} (as a module or built in)");
    if required {
        Finding::fail(check, msg, fix)
    } else {
        Finding::warn(check, msg, fix)
    }
}

/// `/proc/sys/net/ipv4/ip_forward` of this network namespace.
pub fn ip_forward(value: Option<&str>) -> Finding {
    let check = "ip_forward";
    match value.map(str::trim) {
        Some("1") => Finding::ok(check, "net.ipv4.ip_forward = 1"),
        Some(v) => Finding::fail(
            check,
            format!("net.ipv4.ip_forward = {v}: this node does not route pod traffic"),
            "sysctl -w net.ipv4.ip_forward=1 and persist it in /etc/sysctl.d/ (twilld turns it \
             on at start; something turned it off since)",
        ),
        None => Finding::fail(
            check,
            "cannot read /proc/sys/net/ipv4/ip_forward",
            "run doctor on the node (or in the hostNetwork DaemonSet pod) with /proc mounted",
        ),
    }
}

/// What the node shows about the VTEP's offload.
#[derive(Debug, Clone)]
pub struct OffloadFacts {
    /// The running kernel (None when `/proc/sys/kernel/osrelease` cannot be parsed).
    pub kernel: Option<KernelVersion>,
    /// The VTEP's name; None for host-gw (no VTEP).
    pub device: Option<String>,
    pub device_exists: bool,
    /// TX checksum offload of the device (ethtool ioctl), or why it could not be read.
    pub tx_checksum: Result<bool, String>,
}

/// Kernels before 5.7 corrupt the UDP checksum of NAT'd VXLAN packets when the VTEP offloads
/// it (fixed by ea64d8d6c675; flannel#1279): offload must be off there, and stays on elsewhere
/// (turning it off costs throughput).
pub fn offload(f: &OffloadFacts) -> Finding {
    let check = "vtep offload";
    let Some(dev) = &f.device else {
        return Finding::ok(check, "no VTEP with the host-gw backend");
    };
    let state = f.tx_checksum.as_ref().ok().copied();
    let state_s = match state {
        Some(true) => "tx checksum offload on",
        Some(false) => "tx checksum offload off",
        None => "offload state unknown",
    };
    let Some(k) = f.kernel else {
        return Finding::warn(
            check,
            format!("cannot tell the kernel version ({state_s})"),
            "check uname -r: kernels before 5.7 need tx-checksum-ip-generic off on the VTEP \
             (flannel#1279)",
        );
    };
    if k >= KernelVersion::CHECKSUM_FIXED {
        let on = if f.device_exists {
            format!("; {dev}: {state_s}")
        } else {
            String::new()
        };
        return Finding::ok(
            check,
            format!("kernel {k} has the VXLAN checksum fix (5.7+), offload can stay on{on}"),
        );
    }
    let fix = format!(
        "ethtool -K {dev} tx-checksum-ip-generic off, or run twilld with \
         --vxlan-tx-checksum-offload=auto/off (kernel {k} < 5.7 corrupts checksums of NAT'd \
         VXLAN packets: 63 s delays through Services, flannel#1279)"
    );
    if !f.device_exists {
        return Finding::warn(
            check,
            format!("kernel {k} < 5.7 and {dev} does not exist yet, cannot check"),
            format!("once twilld created {dev}: {fix}"),
        );
    }
    match &f.tx_checksum {
        Ok(false) => Finding::ok(
            check,
            format!("kernel {k} < 5.7 and {dev} has tx checksum offload off"),
        ),
        Ok(true) => Finding::warn(
            check,
            format!("kernel {k} < 5.7 with tx checksum offload on for {dev}"),
            fix,
        ),
        Err(e) => Finding::warn(
            check,
            format!("kernel {k} < 5.7 and the offload state of {dev} is unknown ({e})"),
            fix,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    const PROC_MODULES: &str = "vxlan 81920 0 - Live 0x0000000000000000\n\
                                ip6_udp_tunnel 16384 1 vxlan, Live 0x0000000000000000\n";

    #[test]
    fn modules() {
        let f = ModuleFacts {
            proc_modules: Some(PROC_MODULES.into()),
            ..Default::default()
        };
        assert_eq!(module("vxlan", &f, true, "vxlan").status, Status::Ok);
        // ip6_udp_tunnel's "vxlan," user column must not count as br_netfilter or vxlan.
        let none = ModuleFacts {
            proc_modules: Some(PROC_MODULES.into()),
            dep: Some(
                "kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.xz\n".into(),
            ),
            builtin: Some(String::new()),
            ..Default::default()
        };
        let w = module("br_netfilter", &none, false, "kube-proxy");
        assert_eq!(w.status, Status::Warn);
        assert!(w.message.contains("available as a module"), "{}", w.message);
        assert!(w.fix.unwrap().starts_with("modprobe br_netfilter"));
        let builtin = ModuleFacts {
            builtin: Some("kernel/drivers/net/vxlan/vxlan.ko\n".into()),
            ..Default::default()
        };
        assert_eq!(
            module("vxlan", &builtin, true, "").message,
            "built into the kernel"
        );
        let side = ModuleFacts {
            side_effect: true,
            ..Default::default()
        };
        assert_eq!(module("br_netfilter", &side, false, "").status, Status::Ok);
        let gone = ModuleFacts {
            proc_modules: Some(String::new()),
            builtin: Some(String::new()),
            dep: Some("kernel/net/bridge/bridge.ko:\n".into()),
            ..Default::default()
        };
        assert_eq!(module("vxlan", &gone, true, "").status, Status::Fail);
        assert_eq!(
            module("br_netfilter", &gone, false, "").status,
            Status::Warn
        );
        let blind = ModuleFacts::default();
        assert_eq!(module("vxlan", &blind, true, "").status, Status::Warn);
    }

    #[test]
    fn forwarding() {
        assert_eq!(ip_forward(Some("1\n")).status, Status::Ok);
        let f = ip_forward(Some("0\n"));
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("= 0"));
        assert_eq!(ip_forward(None).status, Status::Fail);
    }

    #[test]
    fn offload_only_matters_before_5_7() {
        let f = |release: &str, tx: Result<bool, String>, exists: bool| OffloadFacts {
            kernel: KernelVersion::parse(release),
            device: Some("twill.1".into()),
            device_exists: exists,
            tx_checksum: tx,
        };
        assert_eq!(offload(&f("6.18.0", Ok(true), true)).status, Status::Ok);
        let old = offload(&f("5.4.0-150-generic", Ok(true), true));
        assert_eq!(old.status, Status::Warn);
        assert!(old
            .fix
            .unwrap()
            .contains("ethtool -K twill.1 tx-checksum-ip-generic off"));
        assert_eq!(offload(&f("5.4.0", Ok(false), true)).status, Status::Ok);
        assert_eq!(offload(&f("5.4.0", Ok(true), false)).status, Status::Warn);
        assert_eq!(
            offload(&f("5.4.0", Err("ENODEV".into()), true)).status,
            Status::Warn
        );
        assert_eq!(offload(&f("garbage", Ok(true), true)).status, Status::Warn);
        let hostgw = OffloadFacts {
            device: None,
            ..f("5.4.0", Ok(true), false)
        };
        assert_eq!(offload(&hostgw).status, Status::Ok);
    }
}
