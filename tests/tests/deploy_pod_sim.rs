//! The manifest's pods, simulated on namespaced nodes with exactly the privileges the manifest
//! grants: the Job's `init-network` and the DaemonSet's `install-cni` with no capability at all,
//! `twilld` with only the capabilities in its securityContext (NET_ADMIN, NET_RAW) and no new
//! privileges, configured by the manifest's own environment (downward-API node IP, ConfigMap
//! values). The nodes must turn Ready (conflist written, `/readyz` 200 where the kubelet probes)
//! and pods on the two nodes must reach each other over the overlay.
#![cfg(feature = "root")]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use twill_tests::bins;
use twill_tests::deploy::{load_yaml, object, repo, PLUGINS};

use twill_tests::etcd::{Etcd, Pki};
use twill_tests::underlay::{add_pod_bridge, ping_from, wait_for, Node, NodeDirs, Underlay};

/// What the node would hand the container: the pod's env with the downward API and the
/// ConfigMap resolved, the host paths moved into `dirs`, the Secret's mount into `secret`,
/// the etcd endpoint of this test.
fn container_env(
    c: &Value,
    cm: &Value,
    node_ip: &str,
    endpoint: &str,
    secret: &Path,
    dirs: Option<&NodeDirs>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP" {
            node_ip.to_string()
        } else if let Some(key) = e["valueFrom"]["configMapKeyRef"]["key"].as_str() {
            cm["data"][key].as_str().expect("ConfigMap key").to_string()
        } else {
            panic!("unsupported env source {e}");
        };
        env.insert(name, value);
    }
    // Containers that talk to etcd get the endpoint of this test and the Secret's files.
    if env.contains_key("TWILLD_ETCD_ENDPOINTS") {
        for k in [
            "TWILLD_ETCD_CAFILE",
            "TWILLD_ETCD_CERTFILE",
            "TWILLD_ETCD_KEYFILE",
        ] {
            let v = env
                .get(k)
                .unwrap_or_else(|| panic!("{}: {k} not set", c["name"]));
            let file = Path::new(v).file_name().expect("file name").to_owned();
            env.insert(k.into(), secret.join(file).display().to_string());
        }
        env.insert("TWILLD_ETCD_ENDPOINTS".into(), endpoint.into());
    }
    if let Some(d) = dirs {
        let paths = [
            ("TWILLD_SUBNET_FILE", d.subnet_file()),
            ("TWILLD_CNI_CONF_DIR", d.cni_conf_dir()),
            ("TWILLD_CNI_BIN_DIR", d.cni_bin_dir()),
            ("TWILLD_DEST_DIR", d.cni_bin_dir()),
            ("TWILLD_CNI_DATA_DIR", d.cni_data_dir()),
            ("TWILLD_STATE_DIR", d.state_dir()),
        ];
        for (k, p) in paths {
            if env.contains_key(k) {
                env.insert(k.into(), p.display().to_string());
            }
        }
    }
    env
}

/// `ip netns exec NS setpriv ...` limiting the process to the container's capabilities.
fn confined(ns: &str, c: &Value, program: &Path, args: &[&str]) -> Command {
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true);
    let drops_all = sc["capabilities"]["drop"]
        .as_array()
        .is_some_and(|d| d.contains(&Value::from("ALL")));
    assert!(drops_all, "{}: the simulation assumes drop ALL", c["name"]);
    let mut bounding = String::from("-all");
    for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
        bounding.push_str(&format!(",+{}", cap.as_str().unwrap().to_lowercase()));
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "setpriv"])
        .arg(format!("--bounding-set={bounding}"))
        .arg("--inh-caps=-all");
    if sc["allowPrivilegeEscalation"] == false {
        cmd.arg("--no-new-privs");
    }
    cmd.arg("--").arg(program).args(args);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

/// The subcommand of a container's command line (`/usr/local/bin/twilld install-cni` → install-cni).
fn subcommand(c: &Value) -> Vec<String> {
    let cmd: Vec<&str> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["args"].as_array().into_iter().flatten())
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(cmd[0], "/usr/local/bin/twilld");
    cmd[1..].iter().map(|s| s.to_string()).collect()
}

/// A running confined twilld; killed by PID on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The capability bits a container adds (linux/capability.h numbers).
fn cap_mask(c: &Value) -> u64 {
    let mut mask = 0;
    for cap in c["securityContext"]["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
    {
        mask |= 1u64
            << match cap.as_str().unwrap() {
                "NET_BIND_SERVICE" => 10,
                "NET_BROADCAST" => 11,
                "NET_ADMIN" => 12,
                "NET_RAW" => 13,
                "SYS_MODULE" => 16,
                "SYS_ADMIN" => 21,
                other => panic!("add the bit of {other}"),
            };
    }
    mask
}

fn cap_line(pid: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_default()
}

#[test]
fn manifest_pods_work_with_only_the_granted_capabilities() {
    let objs = load_yaml(&repo().join("manifests/twill.yaml"));
    let cm = object(&objs, "ConfigMap", "twill-config");
    let job = &object(&objs, "Job", "twill-init-network")["spec"]["template"]["spec"];
    let ds = &object(&objs, "DaemonSet", "twill")["spec"]["template"]["spec"];
    let job_c = &job["containers"][0];
    let install_c = ds["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| subcommand(c).contains(&"install-cni".to_string()))
        .expect("install-cni init container");
    let twilld_c = &ds["containers"][0];
    let twilld = bins::bin("twilld");

    let ul = Underlay::new();
    let pki = Pki::new(&ul.etcd_ip().to_string());
    let etcd = Etcd::start_in_tls(ul.ns_name(), &ul.etcd_ip().to_string(), &pki);
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    // The Secret as docs/deploy.md creates it (keys ca.crt, tls.crt, tls.key), mode 0400 as
    // the manifest mounts it: root without CAP_DAC_OVERRIDE must still read it.
    let secret = tempfile::tempdir().unwrap();
    let files = pki.files();
    for (key, src) in [
        ("ca.crt", &files.ca),
        ("tls.crt", &files.client_cert),
        ("tls.key", &files.client_key),
    ] {
        let dst = secret.path().join(key);
        fs::copy(src, &dst).unwrap();
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o400)).unwrap();
    }

    // The Job: the ConfigMap's net-conf.json mounted where the container expects it.
    let conf_dir = tempfile::tempdir().unwrap();
    let conf_file = conf_dir.path().join("net-conf.json");
    fs::write(&conf_file, cm["data"]["net-conf.json"].as_str().unwrap()).unwrap();
    let ip = ul.etcd_ip().to_string();
    let mut env = container_env(job_c, cm, &ip, &endpoint, secret.path(), None);
    env.insert("TWILLD_CONFIG_FILE".into(), conf_file.display().to_string());
    let args = subcommand(job_c);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = confined(ul.ns_name(), job_c, &twilld, &args)
        .envs(&env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init-network: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The ConfigMap's network is what etcd holds now.
    let prefix = cm["data"]["etcd-prefix"].as_str().unwrap();
    let stored = etcd
        .get(&format!("{prefix}/config"))
        .expect("stored config");
    assert_eq!(
        serde_json::from_str::<Value>(&stored).unwrap(),
        serde_json::from_str::<Value>(cm["data"]["net-conf.json"].as_str().unwrap()).unwrap()
    );

    // The image: the built plugins in a source dir, as /opt/twill/bin.
    let image = tempfile::tempdir().unwrap();
    for p in PLUGINS {
        fs::copy(bins::bin(p), image.path().join(p)).unwrap();
    }

    let nodes: Vec<Node> = (0..2).map(|_| ul.add_node()).collect();
    let dirs: Vec<NodeDirs> = nodes.iter().map(|_| NodeDirs::new()).collect();
    let mut daemons = Vec::new();
    for (node, d) in nodes.iter().zip(&dirs) {
        // NodeDirs links the built plugins; the node starts empty like a fresh /opt/cni/bin.
        for p in PLUGINS {
            fs::remove_file(d.cni_bin_dir().join(p)).unwrap();
        }
        let ip = node.ip.to_string();
        let mut env = container_env(install_c, cm, &ip, &endpoint, secret.path(), Some(d));
        env.insert("TWILLD_SRC_DIR".into(), image.path().display().to_string());
        let args = subcommand(install_c);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = confined(node.name(), install_c, &twilld, &args)
            .envs(&env)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install-cni: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for p in PLUGINS {
            assert_eq!(
                fs::read(d.cni_bin_dir().join(p)).unwrap(),
                fs::read(image.path().join(p)).unwrap()
            );
        }

        let env = container_env(twilld_c, cm, &ip, &endpoint, secret.path(), Some(d));
        let args = subcommand(twilld_c);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = fs::File::create(d.log()).unwrap();
        let child = confined(node.name(), twilld_c, &twilld, &args)
            .envs(&env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        daemons.push(Daemon {
            child,
            log: d.log(),
        });
    }

    for (i, (d, daemon)) in dirs.iter().zip(&mut daemons).enumerate() {
        let ready = wait_for(|| d.conflist().exists(), Duration::from_secs(30));
        let log = fs::read_to_string(&daemon.log).unwrap_or_default();
        assert!(ready, "node {i} never wrote its conflist:\n{log}");
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "twilld exited:\n{log}"
        );
        // Exactly the manifest's capabilities.
        let pid = daemon.child.id();
        let mask = format!("{:016x}", cap_mask(twilld_c));
        assert_eq!(cap_line(pid, "CapEff:"), mask, "{log}");
        assert_eq!(cap_line(pid, "CapBnd:"), mask);
        assert_eq!(cap_line(pid, "NoNewPrivs:"), "1");
    }

    // The kubelet's probes, from the node's network namespace (hostNetwork).
    for node in &nodes {
        for probe in ["livenessProbe", "readinessProbe"] {
            let get = &twilld_c[probe]["httpGet"];
            let url = format!(
                "http://{}:{}{}",
                get["host"].as_str().unwrap_or(&node.ip.to_string()),
                get["port"],
                get["path"].as_str().unwrap()
            );
            let ok = wait_for(
                || {
                    node.ns
                        .output(&["curl", "-sf", "-m", "2", &url])
                        .status
                        .success()
                },
                Duration::from_secs(20),
            );
            assert!(ok, "{probe} {url} failed on {}", node.name());
        }
    }

    // Pods on the two nodes reach each other through the overlay twilld built.
    let gws: Vec<String> = nodes
        .iter()
        .zip(&dirs)
        .map(|(n, d)| add_pod_bridge(&n.ns, d.subnet().expect("leased subnet")).to_string())
        .collect();
    let ok = wait_for(
        || ping_from(&nodes[0].ns, &gws[0], &gws[1]),
        Duration::from_secs(20),
    );
    assert!(ok, "pod traffic {} -> {} failed", gws[0], gws[1]);
    assert!(ping_from(&nodes[1].ns, &gws[1], &gws[0]));
}
