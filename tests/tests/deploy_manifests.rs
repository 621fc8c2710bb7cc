//! The Kubernetes manifests and the image definition, checked statically:
//! `kubernetes-validate --strict` on every manifest, the DaemonSet's invariants (host network,
//! exactly NET_ADMIN+NET_RAW, tolerations, install-cni init container, every path twilld writes
//! mounted from the host at the same path), the Job, the flags/env the manifests use existing in
//! `twilld`, and the Dockerfile shipping what the manifests and `install-cni` expect.
#![cfg(feature = "root")]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use twill_tests::deploy::{load_yaml, object, output_ok, repo, twilld, PLUGINS};
use twill_tests::etcd::Etcd;

/// Oldest and newest Kubernetes versions the manifests are validated against (schemas shipped
/// offline by kubernetes-validate 1.37).
const K8S_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(repo().join("manifests"))
        .expect("manifests dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests found");
    files
}

fn all_objects() -> Vec<Value> {
    manifest_files().iter().flat_map(|p| load_yaml(p)).collect()
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    arr(&container["env"])
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

fn env_required<'a>(container: &'a Value, name: &str) -> &'a str {
    env_value(container, name)
        .unwrap_or_else(|| panic!("container {} must set {name}", container["name"]))
}

fn command_line(container: &Value) -> Vec<String> {
    arr(&container["command"])
        .iter()
        .chain(arr(&container["args"]))
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

/// The volume mounted over `path` in `container` (longest mountPath that is `path` or a parent).
fn mount_for<'a>(spec: &'a Value, container: &'a Value, path: &Path) -> (&'a Value, &'a Value) {
    let mount = arr(&container["volumeMounts"])
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap_or("\0")))
        .max_by_key(|m| m["mountPath"].as_str().map(str::len))
        .unwrap_or_else(|| {
            panic!(
                "{}: nothing mounted over {}",
                container["name"],
                path.display()
            )
        });
    let volume = arr(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("volume {} not declared", mount["name"]));
    (mount, volume)
}

/// Asserts `path` in the container is the same path on the host, through a hostPath volume.
fn assert_host_path(spec: &Value, container: &Value, path: &Path, writable: bool) {
    let (mount, volume) = mount_for(spec, container, path);
    let host = volume["hostPath"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{} is not on a hostPath volume", path.display()));
    assert_eq!(
        mount["mountPath"].as_str(),
        Some(host),
        "{}: host plugins read this path, so it must be mounted at the host's own path",
        path.display()
    );
    if writable {
        assert_ne!(
            mount["readOnly"],
            Value::Bool(true),
            "{} must be writable",
            path.display()
        );
    }
}

/// `kubernetes-validate ARGS FILE`; through `python3 -m` when pip put the script off PATH.
fn kubernetes_validate(args: &[&str], file: &Path) -> std::process::Output {
    let run = |mut cmd: Command| cmd.args(args).arg(file).stdin(Stdio::null()).output();
    match run(Command::new("kubernetes-validate")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "kubernetes_validate"]);
            run(cmd)
        }
        other => other,
    }
    .expect("kubernetes-validate (PyPI; scripts/setup.sh installs it)")
}

#[test]
fn every_manifest_passes_kubernetes_validate_strict() {
    for file in manifest_files() {
        for version in K8S_VERSIONS {
            let out = kubernetes_validate(&["--strict", "-k", version], &file);
            assert!(
                out.status.success(),
                "{} fails kubernetes-validate --strict -k {version}:\n{}{}",
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn daemonset_invariants() {
    let objs = all_objects();
    let ds = object(&objs, "DaemonSet", "twill");
    let ns = ds["metadata"]["namespace"].as_str().expect("namespace");
    let spec = &ds["spec"]["template"]["spec"];

    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    // Runs on every node whatever its taints, NotReady (not-ready:NoSchedule/NoExecute) included.
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            arr(&spec["tolerations"])
                .iter()
                .any(|t| t["operator"] == "Exists"
                    && t["effect"] == effect
                    && t.get("key").is_none()),
            "no blanket {effect} toleration: {}",
            spec["tolerations"]
        );
    }

    // Least rights: the ServiceAccount exists, gets no token and no RBAC binding.
    let sa = spec["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    let sa_obj = object(&objs, "ServiceAccount", sa);
    assert_eq!(sa_obj["metadata"]["namespace"], ns);
    assert_eq!(spec["automountServiceAccountToken"], false);
    for kind in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
        assert!(
            !objs.iter().any(|o| o["kind"] == kind),
            "etcd mode needs no API rights, yet a {kind} is defined"
        );
    }
    let namespace = object(&objs, "Namespace", ns);
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );

    let containers = arr(&spec["containers"]);
    assert_eq!(containers.len(), 1);
    let twilld = &containers[0];
    for c in containers.iter().chain(arr(&spec["initContainers"])) {
        let sc = &c["securityContext"];
        assert_ne!(sc["privileged"], true, "{} is privileged", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert!(
            arr(&sc["capabilities"]["drop"]).contains(&Value::from("ALL")),
            "{} must drop ALL capabilities",
            c["name"]
        );
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{}",
            c["name"]
        );
        assert!(
            c["resources"]["requests"]["memory"].is_string(),
            "{}",
            c["name"]
        );
    }
    let caps: BTreeSet<&str> = arr(&twilld["securityContext"]["capabilities"]["add"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(caps, BTreeSet::from(["NET_ADMIN", "NET_RAW"]));

    // The init container installs the plugins into the same host dir twilld looks in.
    let inits = arr(&spec["initContainers"]);
    let install = inits
        .iter()
        .find(|c| command_line(c).iter().any(|a| a == "install-cni"))
        .expect("an init container runs `twilld install-cni`");
    assert!(
        arr(&install["securityContext"]["capabilities"]["add"]).is_empty(),
        "install-cni needs no capability"
    );
    let dest = env_value(install, "TWILLD_DEST_DIR").unwrap_or("/opt/cni/bin");
    assert_host_path(spec, install, Path::new(dest), true);
    let bin_dir = env_required(twilld, "TWILLD_CNI_BIN_DIR");
    assert_eq!(
        dest, bin_dir,
        "install-cni and twilld disagree on the CNI bin dir"
    );
    assert_host_path(spec, twilld, Path::new(bin_dir), false);

    // Every path twilld writes is the host's own.
    let subnet_file = Path::new(env_required(twilld, "TWILLD_SUBNET_FILE"));
    let subnet_dir = subnet_file.parent().expect("subnet file dir");
    assert_host_path(spec, twilld, subnet_dir, true);
    for var in [
        "TWILLD_CNI_CONF_DIR",
        "TWILLD_CNI_DATA_DIR",
        "TWILLD_STATE_DIR",
    ] {
        assert_host_path(spec, twilld, Path::new(env_required(twilld, var)), true);
    }
    assert_host_path(spec, twilld, Path::new("/run/xtables.lock"), true);
    let (_, lock) = mount_for(spec, twilld, Path::new("/run/xtables.lock"));
    assert_eq!(lock["hostPath"]["type"], "FileOrCreate");

    // etcd client certificate from a Secret.
    for var in [
        "TWILLD_ETCD_CAFILE",
        "TWILLD_ETCD_CERTFILE",
        "TWILLD_ETCD_KEYFILE",
    ] {
        let (_, vol) = mount_for(spec, twilld, Path::new(env_required(twilld, var)));
        assert!(
            vol["secret"]["secretName"].is_string(),
            "{var} not from a Secret"
        );
    }

    // The node IP comes from the downward API.
    let public_ip = arr(&twilld["env"])
        .iter()
        .find(|e| e["name"] == "TWILLD_PUBLIC_IP")
        .expect("TWILLD_PUBLIC_IP");
    assert_eq!(
        public_ip["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );

    // Probes hit twilld's health server where it listens.
    let port: u64 = env_required(twilld, "TWILLD_HEALTHZ_PORT")
        .parse()
        .expect("port");
    assert_ne!(port, 0, "the health server must be enabled");
    let ip = env_required(twilld, "TWILLD_HEALTHZ_IP");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &twilld[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], port, "{probe}");
        if ip != "0.0.0.0" {
            assert_eq!(get["host"], ip, "{probe} must target the bound address");
        }
    }
}

#[test]
fn init_network_job_stores_the_configmaps_network() {
    let objs = all_objects();
    let job = object(&objs, "Job", "twill-init-network");
    let spec = &job["spec"]["template"]["spec"];
    // No pod network exists yet when it runs.
    assert_eq!(spec["hostNetwork"], true);
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(arr(&spec["tolerations"])
            .iter()
            .any(|t| t["operator"] == "Exists" && t["effect"] == effect));
    }
    let c = &arr(&spec["containers"])[0];
    assert!(command_line(c).iter().any(|a| a == "init-network"));
    assert!(arr(&c["securityContext"]["capabilities"]["add"]).is_empty());
    let conf_path = env_required(c, "TWILLD_CONFIG_FILE");
    let (mount, vol) = mount_for(spec, c, Path::new(conf_path));
    let cm = object(
        &objs,
        "ConfigMap",
        vol["configMap"]["name"].as_str().expect("configMap"),
    );
    let key = mount["subPath"].as_str().expect("subPath");
    let net_conf = cm["data"][key]
        .as_str()
        .expect("net-conf.json in the ConfigMap");

    // twilld itself accepts the ConfigMap's net-conf.json and stores it.
    let etcd = Etcd::start_loopback();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net-conf.json");
    fs::write(&file, net_conf).unwrap();
    let prefix = cm["data"]["etcd-prefix"].as_str().expect("etcd-prefix");
    output_ok(
        twilld()
            .args(["init-network", "--etcd-endpoints", &etcd.endpoint()])
            .args(["--etcd-prefix", prefix, "--config-file"])
            .arg(&file),
    );
    let stored: Value =
        serde_json::from_str(&etcd.get(&format!("{prefix}/config")).expect("stored")).unwrap();
    let expected: Value = serde_json::from_str(net_conf).unwrap();
    assert_eq!(stored, expected);
    assert_eq!(
        prefix, "/coreos.com/network",
        "flannel's prefix, for mixed clusters"
    );
    assert!(cm["data"]["etcd-endpoints"].is_string());
}

#[test]
fn every_flag_the_manifests_use_exists_in_twilld() {
    let help = |sub: Option<&str>| {
        let out = output_ok(twilld().args(sub).arg("--help"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let objs = all_objects();
    let mut checked = 0;
    for obj in &objs {
        let spec = &obj["spec"]["template"]["spec"];
        for c in arr(&spec["initContainers"])
            .iter()
            .chain(arr(&spec["containers"]))
        {
            let cmd = command_line(c);
            assert_eq!(cmd[0], "/usr/local/bin/twilld", "{}", c["name"]);
            let sub = cmd[1..]
                .iter()
                .find(|a| !a.starts_with('-'))
                .map(String::as_str);
            let text = help(sub);
            for e in arr(&c["env"]) {
                let name = e["name"].as_str().unwrap();
                assert!(
                    text.contains(&format!("[env: {name}")),
                    "{}: twilld {} has no {name}",
                    c["name"],
                    sub.unwrap_or("")
                );
                checked += 1;
            }
            for flag in cmd[1..].iter().filter(|a| a.starts_with("--")) {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    text.contains(flag),
                    "twilld {} has no {flag}",
                    sub.unwrap_or("")
                );
            }
        }
    }
    assert!(checked > 10, "only {checked} env vars checked");
}

#[test]
fn dockerfile_ships_what_the_manifests_expect() {
    let root = repo();
    let dockerfile = fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.trim_start().starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {froms:?}");
    assert!(froms[0].contains("rust:") && froms[0].contains(" AS build"));
    assert!(
        froms[1].contains("-slim"),
        "small runtime base: {}",
        froms[1]
    );
    assert!(
        dockerfile.contains("protobuf-compiler"),
        "etcd-client needs protoc"
    );
    assert!(dockerfile.contains("--locked"));

    // The packages it builds exist with the binaries it copies; the plugins, which run on the
    // host whatever its glibc, are static.
    let builds: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.contains("cargo build"))
        .collect();
    for (dir, pkg) in [("daemon", "twilld"), ("plugins", "twill-plugins")] {
        let toml = fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap();
        assert!(toml.contains(&format!("name = \"{pkg}\"")));
        assert!(
            builds.iter().any(|b| b.contains(&format!("-p {pkg}"))),
            "{pkg} not built: {builds:?}"
        );
    }
    let plugins_build = dockerfile
        .find("-p twill-plugins")
        .map(|i| &dockerfile[..i])
        .and_then(|head| head.rfind("RUSTFLAGS=").map(|j| &head[j..]))
        .expect("plugins built with RUSTFLAGS");
    assert!(plugins_build.contains("+crt-static") && plugins_build.contains("--target"));
    let plugin_loop = dockerfile
        .lines()
        .find(|l| l.contains("for p in"))
        .expect("plugin copy loop");
    for p in PLUGINS {
        assert!(
            plugin_loop
                .split_whitespace()
                .any(|w| w.trim_end_matches(';') == p),
            "Dockerfile does not ship {p}"
        );
        assert!(
            root.join("plugins/src/bin")
                .join(format!("{p}.rs"))
                .is_file(),
            "no binary target {p}"
        );
    }

    // Paths the manifests rely on.
    assert!(dockerfile.contains("COPY --from=build /out/bin/twilld /usr/local/bin/twilld"));
    let objs = all_objects();
    let ds = object(&objs, "DaemonSet", "twill");
    let install = &arr(&ds["spec"]["template"]["spec"]["initContainers"])[0];
    let src = env_value(install, "TWILLD_SRC_DIR").unwrap_or("/opt/twill/bin");
    assert!(
        dockerfile.contains(&format!("COPY --from=build /out/cni/ {src}/")),
        "the image must carry the plugins in {src}"
    );
    // All pods run the same image.
    let images: BTreeSet<&str> = objs
        .iter()
        .flat_map(|o| {
            let spec = &o["spec"]["template"]["spec"];
            arr(&spec["initContainers"])
                .iter()
                .chain(arr(&spec["containers"]))
                .filter_map(|c| c["image"].as_str())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");

    // Every RUN script is valid /bin/sh (what the builder runs it with); checked with `sh -n`.
    let runs = twill_tests::deploy::dockerfile_instructions(&dockerfile)
        .into_iter()
        .filter_map(|i| i.strip_prefix("RUN ").map(str::to_string))
        .collect::<Vec<_>>();
    assert!(runs.len() >= 3, "{runs:?}");
    for run in runs {
        let script = run
            .split_whitespace()
            .skip_while(|w| w.starts_with("--mount="))
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "RUN {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let ignore = fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim_end_matches('/') == "target"));
}
