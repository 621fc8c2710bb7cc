//! TX checksum offload on a VXLAN device, set and read through the ethtool ioctl twilld uses
//! (`twill_common::ethtool`, called by the daemon's `offload::apply_tx_checksum`), checked
//! against what `ethtool -k` reports, inside a namespace the test owns.
#![cfg(feature = "root")]

use std::fs::File;
use std::io;

use twill_common::ethtool::{set_tx_checksum, tx_checksum};
use twill_tests::netns::Netns;

const DEV: &str = "twoff.42";

/// The value `ethtool -k` prints for `feature` on `dev` inside `ns` ("on" / "off").
fn ethtool_feature(ns: &Netns, dev: &str, feature: &str) -> String {
    let out = ns.exec(&["ethtool", "-k", dev]);
    let prefix = format!("{feature}: ");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("no {feature} in ethtool -k {dev}:\n{out}"))
}

/// Runs `f` on a short-lived thread inside `ns` (the test's own threads stay where they are).
fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(ns.path()).expect("open netns");
    twill_common::netns::run_in(Some(file), f).expect("thread in netns")
}

#[test]
fn turns_vxlan_tx_checksum_offload_off_and_on_in_the_devices_namespace() {
    let ns = Netns::new("off");
    // A VTEP as twilld makes it (VNI, dstport, no learning); no underlay needed for features.
    ns.exec(&[
        "ip",
        "link",
        "add",
        DEV,
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "8472",
        "nolearning",
    ]);
    ns.exec(&["ip", "link", "set", DEV, "up"]);
    // The kernel's default for a VXLAN device, which `auto` keeps on kernels >= 5.7.
    assert_eq!(ethtool_feature(&ns, DEV, "tx-checksum-ip-generic"), "on");
    assert!(in_ns(&ns, || tx_checksum(DEV)).unwrap());

    in_ns(&ns, || set_tx_checksum(DEV, false)).expect("turn offload off");
    assert_eq!(ethtool_feature(&ns, DEV, "tx-checksum-ip-generic"), "off");
    assert_eq!(ethtool_feature(&ns, DEV, "tx-checksumming"), "off");
    // What flannel's documented workaround also gives: no segmentation without checksumming.
    assert_eq!(ethtool_feature(&ns, DEV, "tx-tcp-segmentation"), "off");
    assert!(!in_ns(&ns, || tx_checksum(DEV)).unwrap());
    // Idempotent: off again is fine and changes nothing.
    in_ns(&ns, || set_tx_checksum(DEV, false)).expect("off again");
    assert_eq!(ethtool_feature(&ns, DEV, "tx-checksum-ip-generic"), "off");

    in_ns(&ns, || set_tx_checksum(DEV, true)).expect("turn offload on");
    assert_eq!(ethtool_feature(&ns, DEV, "tx-checksum-ip-generic"), "on");
    assert!(in_ns(&ns, || tx_checksum(DEV)).unwrap());

    // The ioctl acts on the calling thread's namespace only: here, the device does not exist.
    let e = tx_checksum(DEV).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
    let e = set_tx_checksum(DEV, false).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
    assert_eq!(ethtool_feature(&ns, DEV, "tx-checksum-ip-generic"), "on");

    // A missing device inside the namespace is an error, not a silent no-op.
    let e: io::Error = in_ns(&ns, || set_tx_checksum("twoff.none", false)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
}
