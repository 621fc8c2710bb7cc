//! The thin effectful layer: reads files, runs the plugins' VERSION and iptables-save, asks
//! etcd and the kernel, then hands the facts to the pure checks in display order.

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{InfoKind, InfoVxlan};
use serde_json::{json, Value};
use twill_common::subnet_env::{SubnetEnv, SubnetEnvError};

use super::cni::{self, ConfFile, PluginFacts};
use super::etcd::{self, EnvFacts, EtcdFacts};
use super::firewall::{self, NftChain};
use super::kernel::{self, ModuleFacts, OffloadFacts};
use super::net::{self, Vtep};
use super::{clock, Finding};
use crate::cli::RunArgs;
use crate::config::BackendConfig;
use crate::etcd_store::{EtcdConfig, EtcdStore};
use crate::forward;
use crate::iptables::{Backend, Filter};
use crate::offload::KernelVersion;
use crate::store::SubnetStore;
use twill_common::netlink::Netlink;

const ETCD_LIMIT: Duration = Duration::from_secs(10);

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn module_facts(name: &str, release: Option<&str>, side_effect: &str) -> ModuleFacts {
    let lib = release.map(|r| Path::new("/lib/modules").join(r));
    ModuleFacts {
        proc_modules: read("/proc/modules"),
        sys_module: Path::new("/sys/module").join(name).exists(),
        side_effect: !side_effect.is_empty() && Path::new(side_effect).exists(),
        builtin: lib.as_ref().and_then(|l| read(l.join("modules.builtin"))),
        dep: lib.as_ref().and_then(|l| read(l.join("modules.dep"))),
    }
}

fn conf_files(dir: &Path) -> Option<Vec<ConfFile>> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
            .map(|e| {
                let path = e.path();
                // Configs are small; a huge file is not one (read at most 1 MiB).
                let content = std::fs::File::open(&path).ok().and_then(|f| {
                    let mut s = String::new();
                    f.take(1 << 20).read_to_string(&mut s).ok().map(|_| s)
                });
                ConfFile {
                    name: e.file_name().to_string_lossy().into_owned(),
                    content,
                }
            })
            .collect(),
    )
}

fn plugin_facts(path: &Path) -> PluginFacts {
    match std::fs::metadata(path) {
        Err(_) => PluginFacts::Missing,
        Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => PluginFacts::NotExecutable,
        Ok(_) => {
            PluginFacts::Probed(crate::cni_conf::plugin_versions(path).map_err(|e| e.to_string()))
        }
    }
}

/// An error and its sources, which carry the useful part of tonic's errors.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

async fn etcd_facts(args: &EtcdConfig) -> EtcdFacts {
    let mut f = EtcdFacts {
        endpoints: args.effective_endpoints(),
        prefix: args.prefix.trim_end_matches('/').to_string(),
        tls: args.uses_tls(),
        user: args.username.clone(),
        config: Err("not asked".into()),
        leases: Err("not asked".into()),
        direct: None,
    };
    let timed_out = || format!("request timed out after {ETCD_LIMIT:?}");
    let store = match tokio::time::timeout(ETCD_LIMIT, EtcdStore::connect(args)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            f.config = Err(chain(&e));
            return f;
        }
        Err(_) => {
            f.config = Err(timed_out());
            return f;
        }
    };
    f.config = match tokio::time::timeout(ETCD_LIMIT, store.get_config()).await {
        Ok(r) => r.map_err(|e| chain(&e)),
        Err(_) => Err(timed_out()),
    };
    if f.config.is_ok() {
        f.leases = match tokio::time::timeout(ETCD_LIMIT, store.list()).await {
            Ok(r) => r.map(|(l, _)| l).map_err(|e| chain(&e)),
            Err(_) => Err(timed_out()),
        };
    }
    f
}

fn nft_json(input: &Value) -> Option<Value> {
    let out = twill_common::nft::run(&["-j", "-f", "-"], Some(&input.to_string())).ok()?;
    serde_json::from_slice(&out).ok()
}

/// Native forward chains of other tables, and whether twill's accepts are complete in the
/// dropping ones (JSON both ways: chain names come from the kernel).
fn nft_chains(network: Option<Ipv4Network>) -> Vec<NftChain> {
    let Some(listing) = nft_json(&json!({"nftables": [{"list": {"chains": {}}}]})) else {
        return Vec::new();
    };
    forward::nft::forward_chains(&listing, crate::rules::TABLE)
        .into_iter()
        .map(|c| {
            let covered = c.drops
                && network.is_some_and(|net| {
                    let list = json!({"nftables": [{"list": {"chain": {
                        "family": c.family, "table": c.table, "name": c.name}}}]});
                    nft_json(&list).is_some_and(|rules| {
                        forward::nft::plan(&c, &forward::nft::our_rules(&rules), net).is_empty()
                    })
                });
            NftChain {
                place: format!("nft {} {} {}", c.family, c.table, c.name),
                drops: c.drops,
                covered,
            }
        })
        .collect()
}

fn env_facts(path: &Path) -> EnvFacts {
    match SubnetEnv::read(path) {
        Ok(e) => EnvFacts::Found(e),
        Err(SubnetEnvError::Read { source, .. }) if source.kind() == ErrorKind::NotFound => {
            EnvFacts::Missing
        }
        Err(e) => EnvFacts::Invalid(e.to_string()),
    }
}

fn vtep_of(link: &twill_common::netlink::LinkSummary) -> Vtep {
    Vtep {
        name: link.name.clone(),
        is_vxlan: link.kind == Some(InfoKind::Vxlan),
        port: link.vxlan.iter().find_map(|i| match i {
            InfoVxlan::Port(p) => Some(*p),
            _ => None,
        }),
        mtu: link.mtu,
    }
}

/// Every check, in display order.
pub async fn run_checks(args: &RunArgs) -> Vec<Finding> {
    let mut out = Vec::new();
    let release = read("/proc/sys/kernel/osrelease").map(|r| r.trim().to_string());

    // Facts from etcd come first: the backend decides what the kernel checks require.
    let etcd = args.etcd.config();
    let mut ef = etcd_facts(&etcd).await;
    // The clock sample is also the direct request that explains a failed TLS connection.
    let first = ef.endpoints.first().cloned().unwrap_or_default();
    let sample = clock::sample(&first, &etcd).await;
    if ef.config.is_err() {
        ef.direct = sample.as_ref().err().cloned();
    }
    let (config_finding, cfg) = etcd::network_config(&ef);
    let vxlan = match &cfg {
        Some(c) => match &c.backend {
            BackendConfig::Vxlan(v) => Some(v.clone()),
            BackendConfig::HostGw => None,
        },
        // Without a config, assume twill's default backend.
        None => Some(crate::config::VxlanConfig::default()),
    };

    out.push(kernel::module(
        "vxlan",
        &module_facts("vxlan", release.as_deref(), ""),
        vxlan.is_some(),
        "the vxlan backend's VTEP",
    ));
    out.push(kernel::module(
        "br_netfilter",
        &module_facts(
            "br_netfilter",
            release.as_deref(),
            "/proc/sys/net/bridge/bridge-nf-call-iptables",
        ),
        false,
        "kube-proxy sees traffic between pods on the same bridge only through it",
    ));
    out.push(kernel::ip_forward(
        read("/proc/sys/net/ipv4/ip_forward").as_deref(),
    ));
    // A backend that is not installed or cannot be read has no table that could drop.
    let filters: Vec<(&str, Option<Filter>)> = Backend::ALL
        .into_iter()
        .map(|b| {
            let f = b.save_filter().ok().flatten();
            (b.name(), f.as_deref().and_then(Filter::parse))
        })
        .collect();
    let network = cfg.as_ref().map(|c| c.network);
    out.push(firewall::forward_policy(
        &filters,
        &nft_chains(network),
        network,
    ));
    out.push(cni::configs(
        &args.cni_conf_dir,
        conf_files(&args.cni_conf_dir).as_deref(),
    ));
    for (name, required, why) in cni::PLUGINS {
        let facts = plugin_facts(&args.cni_bin_dir.join(name));
        out.push(cni::plugin(name, required, why, &args.cni_bin_dir, &facts));
    }

    out.push(etcd::reachability(&ef));
    out.push(config_finding);

    let nl = Netlink::open();
    let underlay = match &nl {
        Ok(nl) => crate::iface::detect(nl, args.iface.as_deref(), args.public_ip)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let vtep_name = vxlan.as_ref().map(|v| format!("twill.{}", v.vni));
    let vtep = match (&nl, &vtep_name) {
        (Ok(nl), Some(name)) => nl.link(name).await.ok().flatten().map(|l| vtep_of(&l)),
        _ => None,
    };
    let bind = match &cfg {
        Some(c) => match &c.backend {
            BackendConfig::Vxlan(v) => Some(
                UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, v.port))
                    .map(drop)
                    .map_err(|e| e.kind()),
            ),
            BackendConfig::HostGw => None,
        },
        None => None,
    };
    out.push(net::vxlan_port(cfg.as_ref(), bind, vtep.as_ref()));

    let env = env_facts(&args.subnet_file);
    let env_mtu = match &env {
        EnvFacts::Found(e) => Some(e.mtu),
        _ => None,
    };
    out.push(net::mtu(
        cfg.as_ref(),
        underlay
            .as_ref()
            .map(|u| (u.name.as_str(), u.mtu))
            .map_err(String::as_str),
        vtep.as_ref(),
        env_mtu,
    ));
    out.push(etcd::subnet_lease(
        &args.subnet_file,
        &env,
        underlay
            .as_ref()
            .map(|u| u.public_ip)
            .map_err(String::as_str),
        ef.leases.as_deref().ok(),
        cfg.as_ref(),
    ));

    let tx_checksum = match &vtep {
        Some(d) => twill_common::ethtool::tx_checksum(&d.name).map_err(|e| e.to_string()),
        None => Err("no VTEP".into()),
    };
    out.push(kernel::offload(&OffloadFacts {
        kernel: release.as_deref().and_then(KernelVersion::parse),
        device: vtep_name,
        device_exists: vtep.is_some(),
        tx_checksum,
    }));

    out.push(clock::clock(&first, &sample));
    out
}
