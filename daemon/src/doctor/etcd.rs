//! etcd: reachability, TLS and auth, the network config, and this node's lease against
//! its subnet.env.

use std::net::Ipv4Addr;
use std::path::Path;

use twill_common::subnet_env::SubnetEnv;

use super::Finding;
use crate::config::{BackendConfig, NetworkConfig};
use crate::lease::Lease;

/// What talking to etcd gave.
#[derive(Debug, Clone)]
pub struct EtcdFacts {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub tls: bool,
    pub user: Option<String>,
    /// The raw `<prefix>/config` (None: key absent), or the error chain of the failed read.
    pub config: Result<Option<String>, String>,
    /// The leases under `<prefix>/subnets/`, or why listing failed.
    pub leases: Result<Vec<Lease>, String>,
    /// Why a direct HTTP(S) request to the first endpoint failed, if it did: gRPC over TLS
    /// reports a client certificate the server rejects as a broken pipe, while the direct
    /// handshake names the TLS alert.
    pub direct: Option<String>,
}

/// The cause of a failed etcd call, from its error chain, and what to do about it.
pub fn classify(err: &str) -> (&'static str, &'static str) {
    let e = err.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| e.contains(w));
    if has(&["--etcd-certfile", "read /", "no such file"]) {
        (
            "cannot read the TLS files",
            "check --etcd-cafile, --etcd-certfile and --etcd-keyfile (paths readable by twilld, given together)",
        )
    } else if has(&[
        "certificate",
        "tls",
        "handshake",
        "alert",
        "ssl",
        "x509",
        "unknownissuer",
        "invalid peer",
    ]) {
        (
            "TLS failed",
            "check --etcd-cafile (must sign etcd's server certificate, whose SAN must match the endpoint) and --etcd-certfile/--etcd-keyfile (signed by etcd's --trusted-ca-file)",
        )
    } else if has(&[
        "authentication",
        "invalid auth",
        "unauthenticated",
        "user name is empty",
        "permission denied",
        "permissiondenied",
        "password",
    ]) {
        (
            "authentication or permission denied",
            "check --etcd-username/--etcd-password and the user's role (read/write on the prefix)",
        )
    } else if has(&["refused"]) {
        (
            "connection refused",
            "check --etcd-endpoints: nothing listens there (is etcd running, on that address and port?)",
        )
    } else if has(&["timed out", "timeout", "deadline"]) {
        (
            "timed out",
            "check --etcd-endpoints and the network path to etcd (firewall, routes)",
        )
    } else if has(&[
        "dns",
        "resolve",
        "no route",
        "unreachable",
        "invalid uri",
        "invalid url",
    ]) {
        (
            "endpoint unreachable",
            "check --etcd-endpoints (host name, address and scheme http:// or https://)",
        )
    } else {
        (
            "request failed",
            "check --etcd-endpoints, the TLS flags and etcd's log",
        )
    }
}

pub fn reachability(f: &EtcdFacts) -> Finding {
    let check = "etcd";
    let eps = f.endpoints.join(",");
    match &f.config {
        Err(e) => {
            // The direct request's error names TLS alerts and refusals plainly; gRPC's may
            // not (a rejected client certificate is a closed connection there). Auth is only
            // in gRPC's, since /version needs none.
            let (cause, fix, detail) = match f.direct.as_deref() {
                Some(d) if classify(d).0 != "request failed" => {
                    let (c, x) = classify(d);
                    (c, x, format!("direct request to /version: {d}"))
                }
                _ => {
                    let (c, x) = classify(e);
                    (c, x, e.clone())
                }
            };
            Finding::fail(check, format!("{eps}: {cause} ({detail})"), fix)
        }
        Ok(_) => {
            let tls = if f.tls {
                "TLS"
            } else {
                "plain HTTP, no client certificate"
            };
            let auth = match &f.user {
                Some(u) => format!(", user {u}"),
                None => String::new(),
            };
            let leases = match &f.leases {
                Ok(l) => format!("{} lease(s)", l.len()),
                Err(e) => format!("listing the leases failed: {e}"),
            };
            match &f.leases {
                Ok(_) => Finding::ok(check, format!("{eps} reached ({tls}{auth}); {leases}")),
                Err(e) => {
                    let (cause, fix) = classify(e);
                    Finding::fail(
                        check,
                        format!("{eps}: reading {}/subnets/ failed: {cause} ({e})", f.prefix),
                        fix,
                    )
                }
            }
        }
    }
}

/// The parsed config when it is present and valid.
pub fn network_config(f: &EtcdFacts) -> (Finding, Option<NetworkConfig>) {
    let check = "network config";
    let key = format!("{}/config", f.prefix.trim_end_matches('/'));
    match &f.config {
        Err(_) => (
            Finding::warn(check, format!("{key} not checked: etcd unreachable"), "fix the etcd check first"),
            None,
        ),
        Ok(None) => (
            Finding::fail(
                check,
                format!("{key} does not exist in etcd (v3 API): twilld waits for it"),
                format!("create it: twilld init-network, or etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}' (ETCDCTL_API=3)"),
            ),
            None,
        ),
        Ok(Some(raw)) => match NetworkConfig::parse(raw) {
            Ok(c) => {
                let backend = match &c.backend {
                    BackendConfig::Vxlan(v) => format!(
                        "vxlan VNI {} port {}{}",
                        v.vni,
                        v.port,
                        v.mtu.map(|m| format!(" MTU {m}")).unwrap_or_default()
                    ),
                    BackendConfig::HostGw => "host-gw".into(),
                };
                let msg = format!(
                    "Network {}, /{} subnets {}-{}, {backend}",
                    c.network, c.subnet_len, c.subnet_min, c.subnet_max
                );
                (Finding::ok(check, msg), Some(c))
            }
            Err(e) => (
                Finding::fail(
                    check,
                    format!("{key} is invalid: {e}"),
                    format!("fix {key} (flannel's net-conf.json format)"),
                ),
                None,
            ),
        },
    }
}

/// subnet.env as found on disk.
#[derive(Debug, Clone)]
pub enum EnvFacts {
    Missing,
    Invalid(String),
    Found(SubnetEnv),
}

/// This node's lease (by PublicIP) against subnet.env.
pub fn subnet_lease(
    path: &Path,
    env: &EnvFacts,
    public_ip: Result<Ipv4Addr, &str>,
    leases: Option<&[Lease]>,
    cfg: Option<&NetworkConfig>,
) -> Finding {
    let check = "subnet lease";
    let p = path.display();
    let restart = "restart twilld: it re-acquires its lease (preferring subnet.env's subnet) and rewrites subnet.env";
    let ip = match public_ip {
        Ok(ip) => ip,
        Err(e) => {
            return Finding::warn(
                check,
                format!("not checked: no public IP ({e})"),
                "pass --iface or --public-ip as twilld gets them",
            )
        }
    };
    let Some(leases) = leases else {
        return Finding::warn(
            check,
            "not checked: etcd unreachable",
            "fix the etcd check first",
        );
    };
    let mine: Vec<&Lease> = leases.iter().filter(|l| l.attrs.public_ip == ip).collect();
    let env = match env {
        EnvFacts::Invalid(e) => {
            return Finding::fail(check, format!("{p}: {e}"), restart);
        }
        EnvFacts::Missing => {
            return match mine.first() {
                None => Finding::warn(
                    check,
                    format!("no lease for {ip} in etcd and no {p}: twilld has not run here yet"),
                    "start twilld on this node",
                ),
                Some(l) => Finding::warn(
                    check,
                    format!(
                        "etcd has {} for {ip} but {p} is missing: pods cannot start",
                        l.subnet
                    ),
                    "check that twilld runs and can write --subnet-file (its log says why not)",
                ),
            };
        }
        EnvFacts::Found(env) => env,
    };
    let Some(sub) = env.subnet else {
        return Finding::fail(check, format!("{p} has no FLANNEL_SUBNET"), restart);
    };
    if let (Some(cfg), Some(net)) = (cfg, env.network) {
        if net != cfg.network {
            return Finding::fail(
                check,
                format!(
                    "{p} has FLANNEL_NETWORK={net} but the network config says {}",
                    cfg.network
                ),
                restart,
            );
        }
    }
    if mine.iter().any(|l| l.subnet == sub) {
        let others = mine.len() - 1;
        let extra = if others > 0 {
            format!(" ({others} more lease(s) of {ip}: twilld deletes stale ones)")
        } else {
            String::new()
        };
        return Finding::ok(
            check,
            format!("{p} has {sub}, leased in etcd to {ip}{extra}"),
        );
    }
    let holder = leases
        .iter()
        .find(|l| l.subnet == sub)
        .map(|l| format!("; {sub} is leased to {}", l.attrs.public_ip))
        .unwrap_or_default();
    let msg = match mine.first() {
        Some(l) => format!("{p} has {sub} but etcd leases {} to {ip}{holder}", l.subnet),
        None => format!("{p} has {sub} but etcd has no lease for {ip}{holder}"),
    };
    Finding::fail(
        check,
        msg,
        format!("{restart}; pods keep addresses of the old subnet until they are recreated"),
    )
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;
    use crate::lease::{LeaseAttrs, Mac};

    fn facts(
        config: Result<Option<String>, String>,
        leases: Result<Vec<Lease>, String>,
    ) -> EtcdFacts {
        EtcdFacts {
            endpoints: vec!["http://192.168.100.254:2379".into()],
            prefix: "/coreos.com/network".into(),
            tls: false,
            user: None,
            config,
            leases,
            direct: None,
        }
    }

    fn lease(subnet: &str, ip: [u8; 4]) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(Ipv4Addr::from(ip), 1, Mac([2, 0, 0, 0, 0, ip[3]])),
            etcd_lease: 7,
            mod_revision: 1,
            create_revision: 1,
        }
    }

    #[test]
    fn causes() {
        assert_eq!(classify("grpc request error: status: Unavailable, message: \"tcp connect error: Connection refused (os error 111)\"").0, "connection refused");
        assert_eq!(
            classify("transport error: invalid peer certificate: UnknownIssuer").0,
            "TLS failed"
        );
        assert_eq!(
            classify("received fatal alert: CertificateRequired").0,
            "TLS failed"
        );
        assert_eq!(
            classify("etcdserver: authentication failed, invalid user ID or password").0,
            "authentication or permission denied"
        );
        assert_eq!(
            classify("read /nope/client.crt: No such file or directory").0,
            "cannot read the TLS files"
        );
        assert_eq!(classify("request timed out").0, "timed out");
        assert_eq!(classify("something else").0, "request failed");
    }

    #[test]
    fn reach_and_config() {
        let down = facts(
            Err("tcp connect error: Connection refused".into()),
            Err("skipped".into()),
        );
        let r = reachability(&down);
        assert_eq!(r.status, Status::Fail);
        assert!(r.message.contains("connection refused"), "{}", r.message);
        assert_eq!(network_config(&down).0.status, Status::Warn);
        // A rejected client certificate: gRPC sees a broken pipe, the direct request the alert.
        let rejected = EtcdFacts {
            direct: Some("received fatal alert: BadCertificate".into()),
            ..facts(
                Err("transport error: stream closed because of a broken pipe".into()),
                Err("skipped".into()),
            )
        };
        let r = reachability(&rejected);
        assert!(r.message.contains("TLS failed"), "{}", r.message);
        assert!(r.message.contains("BadCertificate"), "{}", r.message);

        let missing = facts(Ok(None), Ok(vec![]));
        assert_eq!(reachability(&missing).status, Status::Ok);
        let (f, c) = network_config(&missing);
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.message
                .contains("/coreos.com/network/config does not exist"),
            "{}",
            f.message
        );
        assert!(c.is_none());

        let bad = facts(Ok(Some(r#"{"Network":"10.5.0.0/29"}"#.into())), Ok(vec![]));
        assert_eq!(network_config(&bad).0.status, Status::Fail);
        let good = facts(
            Ok(Some(
                r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#.into(),
            )),
            Ok(vec![]),
        );
        let (f, c) = network_config(&good);
        assert_eq!(f.status, Status::Ok);
        assert!(f.message.contains("vxlan VNI 2 port 8472"), "{}", f.message);
        assert!(c.is_some());
    }

    #[test]
    fn lease_against_subnet_env() {
        let p = Path::new("/run/twill/subnet.env");
        let me = Ok(Ipv4Addr::new(192, 168, 100, 1));
        let cfg = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        let env = |s: &str| {
            EnvFacts::Found(SubnetEnv::new_v4(
                "10.5.0.0/16".parse().unwrap(),
                s.parse().unwrap(),
                1450,
                false,
            ))
        };
        let leases = vec![
            lease("10.5.3.0/24", [192, 168, 100, 1]),
            lease("10.5.4.0/24", [192, 168, 100, 2]),
        ];
        let ok = subnet_lease(p, &env("10.5.3.0/24"), me, Some(&leases), Some(&cfg));
        assert_eq!(ok.status, Status::Ok, "{}", ok.line());
        let other = subnet_lease(p, &env("10.5.4.0/24"), me, Some(&leases), Some(&cfg));
        assert_eq!(other.status, Status::Fail);
        assert!(
            other
                .message
                .contains("etcd leases 10.5.3.0/24 to 192.168.100.1"),
            "{}",
            other.message
        );
        assert!(
            other
                .message
                .contains("10.5.4.0/24 is leased to 192.168.100.2"),
            "{}",
            other.message
        );
        let gone = subnet_lease(p, &env("10.5.3.0/24"), me, Some(&leases[1..]), Some(&cfg));
        assert_eq!(gone.status, Status::Fail);
        assert!(gone.message.contains("no lease for 192.168.100.1"));
        let wrong_net = EnvFacts::Found(SubnetEnv::new_v4(
            "10.6.0.0/16".parse().unwrap(),
            "10.5.3.0/24".parse().unwrap(),
            1450,
            false,
        ));
        assert_eq!(
            subnet_lease(p, &wrong_net, me, Some(&leases), Some(&cfg)).status,
            Status::Fail
        );
        assert_eq!(
            subnet_lease(p, &EnvFacts::Missing, me, Some(&[]), Some(&cfg)).status,
            Status::Warn
        );
        assert_eq!(
            subnet_lease(p, &EnvFacts::Missing, me, Some(&leases), Some(&cfg)).status,
            Status::Warn
        );
        assert_eq!(
            subnet_lease(p, &EnvFacts::Invalid("bad".into()), me, Some(&leases), None).status,
            Status::Fail
        );
        assert_eq!(
            subnet_lease(p, &env("10.5.3.0/24"), me, None, None).status,
            Status::Warn
        );
    }
}
