//! twill under a real container runtime: Debian's containerd 1.6 with runc in each node
//! namespace, driven through the CRI v1 API the way the kubelet drives it. Every node's CNI bin
//! dir holds only what `twilld install-cni` installed (containerd always attaches a `loopback`
//! network too, so the node must get one from install-cni).
//!
//! Timings (NetworkReady after twilld start, first sandbox, 10 sandboxes at once, stop +
//! remove) are printed; run with `--nocapture --test-threads=1` to see them.
#![cfg(feature = "root")]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use twill_tests::cni::{host_veths, reservations};
use twill_tests::containerd::{
    bin_dir_entries, cached_results, in_pod, installed_node_dirs, mounts_below, secs, Containerd,
    HostPort, PodProcess,
};
use twill_tests::etcd::Etcd;
use twill_tests::underlay::{wait_for, Member, Twilld, Underlay, TWILL_PLUGINS};

const CONFIG: &str = r#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(30);

/// Accepts connections forever, answering each with a fixed word and the peer's address.
const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
while True:
    c, peer = s.accept()
    c.sendall(("twill-hostport " + peer[0] + "\n").encode())
    c.close()
"#;
/// Connects to argv[1]:argv[2] and prints the first line it gets.
const CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print(c.recv(200).decode().strip())
"#;

fn network_ready(rt: &Containerd) -> bool {
    rt.network_ready().0
}

/// Waits for CRI NetworkReady=true; panics with both logs otherwise.
fn wait_network_ready(rt: &Containerd, m: &Member) {
    assert!(
        wait_for(|| network_ready(rt), WAIT),
        "NetworkReady never turned true ({}); twilld log:\n{}\ncontainerd log:\n{}",
        rt.network_ready().1,
        m.daemon.log(),
        rt.log()
    );
}

/// A node running twilld with the plugins install-cni installed, and a containerd on it.
fn node(ul: &Underlay, etcd: &Etcd) -> (Member, Containerd) {
    let m = Member::start_with(ul, etcd, installed_node_dirs(), &[]);
    m.wait_ready();
    let rt = Containerd::start(&m.node, &m.dirs);
    wait_network_ready(&rt, &m);
    (m, rt)
}

fn run_pod(rt: &Containerd, m: &Member, name: &str, ports: &[HostPort]) -> String {
    rt.run_pod(name, ports).unwrap_or_else(|e| {
        panic!(
            "RunPodSandbox {name} on {}: {e}\nbin dir: {:?}\ncontainerd log:\n{}",
            m.node.name(),
            bin_dir_entries(&m.dirs),
            rt.log()
        )
    })
}

/// The masquerade rules of the bridge plugin (twill's own nftables table) in the node.
fn masq_rules(m: &Member) -> String {
    let out = m
        .node
        .ns
        .output(&["nft", "list", "table", "inet", "twill_masq"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_local_dir(m: &Member) -> std::path::PathBuf {
    m.dirs.cni_data_dir().join("networks")
}

/// The meta plugin's saved delegate config of a sandbox.
fn saved_config(m: &Member, id: &str) -> std::path::PathBuf {
    m.dirs.cni_data_dir().join("twill").join(id)
}

/// The pod netns files containerd keeps in its state dir, and the netns bind mounts there.
fn netns_left(rt: &Containerd) -> (Vec<String>, Vec<String>) {
    let files = std::fs::read_dir(rt.netns_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mounts = mounts_below(&rt.netns_dir())
        .into_iter()
        .map(|p| p.display().to_string())
        .collect();
    (files, mounts)
}

#[test]
fn network_ready_follows_twilld() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let node = ul.add_node();
    let dirs = installed_node_dirs();
    let bin = bin_dir_entries(&dirs);
    for p in TWILL_PLUGINS.iter().chain(&["loopback"]) {
        assert!(
            bin.iter().any(|b| b == p),
            "install-cni left no {p} in the bin dir: {bin:?}"
        );
    }
    assert!(
        !bin.iter().any(|b| b == "portmap"),
        "the reference portmap is no longer shipped: {bin:?}"
    );
    let rt = Containerd::start(&node, &dirs);
    let (ready, why) = rt.network_ready();
    assert!(
        !ready,
        "NetworkReady true before twilld ran (conf dir {}): {why}",
        dirs.cni_conf_dir().display()
    );

    let t0 = Instant::now();
    let daemon = Twilld::start(node.name(), &dirs, &etcd.endpoint(), &["--iface=eth0"]);
    let mut conflist_at = None;
    let became_ready = wait_for(
        || {
            if conflist_at.is_none() && dirs.conflist().exists() {
                conflist_at = Some(t0.elapsed());
            }
            network_ready(&rt)
        },
        WAIT,
    );
    let ready_at = t0.elapsed();
    assert!(
        became_ready,
        "NetworkReady never turned true ({}); twilld log:\n{}\ncontainerd log:\n{}",
        rt.network_ready().1,
        daemon.log(),
        rt.log()
    );
    assert!(
        dirs.conflist().exists() && dirs.subnet().is_some(),
        "NetworkReady true without twill's conflist and lease"
    );
    let conflist_at = conflist_at.unwrap_or(ready_at);
    println!(
        "timing: NetworkReady {} after twilld start (conflist written after {}, seen by \
         containerd {} later)",
        secs(ready_at),
        secs(conflist_at),
        secs(ready_at.saturating_sub(conflist_at))
    );
}

#[test]
fn pods_on_two_nodes_reach_each_other_and_a_host_port() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let (a, ra) = node(&ul, &etcd);
    let (b, rb) = node(&ul, &etcd);

    let t = Instant::now();
    let pa = run_pod(&ra, &a, "pod-a", &[]);
    println!(
        "timing: first sandbox (RunPodSandbox) {}",
        secs(t.elapsed())
    );
    let hp = HostPort {
        host: 18080,
        container: 8080,
    };
    let pb = run_pod(&rb, &b, "pod-b", &[hp]);
    let (ip_a, ip_b) = (ra.pod_ip(&pa), rb.pod_ip(&pb));
    assert!(a.subnet().contains(ip_a), "{ip_a} outside {}", a.subnet());
    assert!(b.subnet().contains(ip_b), "{ip_b} outside {}", b.subnet());
    let (ns_a, ns_b) = (ra.pod_netns(&pa), rb.pod_netns(&pb));

    for (from, to) in [(&ns_a, ip_b), (&ns_b, ip_a)] {
        let to = to.to_string();
        assert!(
            wait_for(
                || in_pod(from, &["ping", "-c1", "-W1", &to]).status.success(),
                Duration::from_secs(15)
            ),
            "pod in {from} cannot reach {to}; twilld logs:\n{}\n{}",
            a.daemon.log(),
            b.daemon.log()
        );
    }

    // hostPort: a listener in pod B, reached through node B's address from node A.
    let mut server =
        PodProcess::spawn(&ns_b, &["python3", "-c", SERVER, &hp.container.to_string()]);
    let node_b = b.node.ip.to_string();
    let port = hp.host.to_string();
    let mut reply = String::new();
    let reached = wait_for(
        || {
            let out = a.node.ns.output(&["python3", "-c", CLIENT, &node_b, &port]);
            reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
            reply.starts_with("twill-hostport")
        },
        Duration::from_secs(15),
    );
    assert!(
        reached,
        "hostPort {node_b}:{port} unreachable from {} (got {reply:?}, server exited: {:?}); \
         nat rules of {}:\n{}",
        a.node.name(),
        server.exited(),
        b.node.name(),
        String::from_utf8_lossy(&b.node.ns.output(&["iptables-save", "-t", "nat"]).stdout)
    );
    println!("hostPort {node_b}:{port} from node {}: {reply}", a.node.ip);
}

#[test]
fn ten_sandboxes_at_once_then_stop_and_remove_leave_nothing() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let (m, rt) = node(&ul, &etcd);
    let subnet = m.subnet();

    let names: Vec<String> = (0..10).map(|i| format!("par-{i}")).collect();
    let t = Instant::now();
    let results = rt.run_pods_concurrently(&names);
    let took = t.elapsed();
    let ids: Vec<String> = results
        .into_iter()
        .zip(&names)
        .map(|(r, n)| {
            r.unwrap_or_else(|e| panic!("RunPodSandbox {n}: {e}\ncontainerd log:\n{}", rt.log()))
        })
        .collect();
    println!("timing: 10 sandboxes at once {}", secs(took));

    let mut ips: Vec<Ipv4Addr> = ids.iter().map(|id| rt.pod_ip(id)).collect();
    for ip in &ips {
        assert!(subnet.contains(*ip), "{ip} outside {subnet}");
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 10, "duplicate pod IPs: {ips:?}");
    assert_eq!(
        reservations(&host_local_dir(&m), "twill").len(),
        10,
        "host-local reservations"
    );
    assert_eq!(host_veths(&m.node.ns).len(), 10, "host veths");
    let masq = masq_rules(&m);
    for (id, ip) in ids.iter().zip(ids.iter().map(|id| rt.pod_ip(id))) {
        assert!(saved_config(&m, id).is_file(), "no saved config for {id}");
        assert!(
            masq.contains(id.as_str()) && masq.contains(&format!("saddr {ip} ")),
            "no masquerade rule for {id} ({ip}):\n{masq}"
        );
    }
    let (files, mounts) = netns_left(&rt);
    assert_eq!(
        (files.len(), mounts.len()),
        (10, 10),
        "{files:?} {mounts:?}"
    );

    let t = Instant::now();
    for id in &ids {
        rt.stop_pod(id)
            .unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e}\n{}", rt.log()));
        rt.remove_pod(id)
            .unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e}\n{}", rt.log()));
    }
    let took = t.elapsed();
    println!(
        "timing: stop + remove of 10 sandboxes {} ({} per sandbox)",
        secs(took),
        secs(took / 10)
    );

    assert_eq!(rt.list_pods().expect("ListPodSandbox"), Vec::new());
    assert!(
        wait_for(
            || host_veths(&m.node.ns).is_empty(),
            Duration::from_secs(10)
        ),
        "veths left: {:?}",
        host_veths(&m.node.ns)
    );
    assert_eq!(
        reservations(&host_local_dir(&m), "twill"),
        Vec::<String>::new(),
        "host-local reservations left"
    );
    for id in &ids {
        assert!(!saved_config(&m, id).exists(), "saved config of {id} left");
    }
    let masq = masq_rules(&m);
    for id in &ids {
        assert!(
            !masq.contains(id.as_str()),
            "masquerade rule of {id} left:\n{masq}"
        );
    }
    assert_eq!(netns_left(&rt), (vec![], vec![]), "pod netns left");
    assert_eq!(
        cached_results(&ids),
        Vec::<String>::new(),
        "libcni cache left"
    );
}

/// Deletes every link of the node but `lo` and its underlay interface (what a reboot loses).
fn delete_links(m: &Member) {
    let out = m.node.ns.exec(&["ip", "-o", "link", "show"]);
    for l in out.lines() {
        let Some(name) = l.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name != "lo" && name != twill_tests::underlay::NODE_IF {
            let _ = m.node.ns.output(&["ip", "link", "del", name]);
        }
    }
}

#[test]
fn reboot_keeps_the_subnet_and_releases_the_old_pods_address() {
    let ul = Underlay::new();
    let etcd = ul.start_etcd(Some(CONFIG));
    let (mut m, mut rt) = node(&ul, &etcd);
    let subnet = m.subnet();
    let old = run_pod(&rt, &m, "before-reboot", &[]);
    let old_ip = rt.pod_ip(&old);
    let reserved = |m: &Member, ip: Ipv4Addr| {
        reservations(&host_local_dir(m), "twill").contains(&ip.to_string())
    };
    assert!(reserved(&m, old_ip), "no reservation for {old_ip}");

    // Power cut: every process dies, links and rules and /run are gone; /var/lib (the CNI data
    // dir, twilld's state dir, containerd's root) and /etc (the conflist) stay.
    rt.power_off();
    m.daemon.kill();
    rt.wipe_state();
    delete_links(&m);
    m.node.ns.exec(&["nft", "flush", "ruleset"]);
    m.dirs.wipe_run_dir();
    assert!(
        std::fs::symlink_metadata(m.dirs.conflist()).is_ok() && !m.dirs.conflist().exists(),
        "the conf dir keeps twill's link, whose target went with /run"
    );
    assert!(
        reserved(&m, old_ip),
        "the reservation lives in the data dir"
    );

    // Boot: containerd first (as a unit ordered before the kubelet, which starts twill's pod).
    rt.launch();
    let (ready_before_twilld, why) = rt.network_ready();
    println!(
        "after reboot, before twilld runs: NetworkReady={ready_before_twilld} ({why}); \
         sandboxes: {:?}",
        rt.list_pods().expect("ListPodSandbox")
    );
    // Issue 10 item 3: Ready means the network works, also between boot and twilld's start.
    assert!(
        !ready_before_twilld,
        "NetworkReady true after a reboot before twilld holds its lease: {why}"
    );
    let t0 = Instant::now();
    m.restart(&etcd, &[]);
    m.wait_ready();
    wait_network_ready(&rt, &m);
    println!(
        "timing: NetworkReady after reboot {} after twilld start",
        secs(t0.elapsed())
    );
    assert_eq!(
        m.subnet(),
        subnet,
        "the node's subnet changed across the reboot"
    );

    let listed = rt.list_pods().expect("ListPodSandbox");
    assert!(
        listed.contains(&(old.clone(), false)),
        "the old sandbox should be known and NOTREADY after the reboot: {listed:?}"
    );
    println!(
        "after containerd restart: old pod's {old_ip} reserved: {}",
        reserved(&m, old_ip)
    );

    let new = run_pod(&rt, &m, "after-reboot", &[]);
    let new_ip = rt.pod_ip(&new);
    assert!(subnet.contains(new_ip), "{new_ip} outside {subnet}");
    println!(
        "after RunPodSandbox of a new pod ({new_ip}): old pod's {old_ip} reserved: {}",
        reserved(&m, old_ip)
    );
    assert!(
        wait_for(
            || m.node
                .ns
                .output(&["ping", "-c1", "-W1", &new_ip.to_string()])
                .status
                .success(),
            Duration::from_secs(10)
        ),
        "the node cannot reach its new pod {new_ip}"
    );

    // The kubelet stops and removes sandboxes that are no longer ready: CNI DEL without a netns.
    let t = Instant::now();
    rt.stop_pod(&old)
        .unwrap_or_else(|e| panic!("StopPodSandbox of the pre-reboot pod: {e}\n{}", rt.log()));
    rt.remove_pod(&old)
        .unwrap_or_else(|e| panic!("RemovePodSandbox of the pre-reboot pod: {e}\n{}", rt.log()));
    println!(
        "timing: stop + remove of the pre-reboot sandbox {}",
        secs(t.elapsed())
    );
    assert!(
        !reserved(&m, old_ip),
        "{old_ip} still reserved after the old sandbox was stopped and removed"
    );
    assert!(
        !saved_config(&m, &old).exists(),
        "saved config of the pre-reboot pod left"
    );
    assert!(
        !masq_rules(&m).contains(old.as_str()),
        "masquerade rule of the pre-reboot pod left"
    );
    assert!(reserved(&m, new_ip), "the new pod lost its reservation");
    assert_eq!(
        cached_results(std::slice::from_ref(&old)),
        Vec::<String>::new()
    );
}
