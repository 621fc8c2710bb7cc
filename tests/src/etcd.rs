//! A throw-away etcd (Debian's `/usr/bin/etcd` 3.4) for tests and benches.
//!
//! ```ignore
//! let ul = Underlay::new();                       // bridge namespace, 192.168.100.0/24
//! let etcd = Etcd::start_in(ul.ns_name(), &ul.etcd_ip().to_string());
//! etcd.etcdctl(&["put", "/coreos.com/network/config", r#"{"Network":"10.5.0.0/16"}"#]);
//! let endpoint = etcd.endpoint();                 // http://192.168.100.254:2379
//! ```
//! The guard owns a temp data dir and the etcd process; it kills the process **by PID** and
//! removes the data dir on drop. `stop()`/`start()` restart it on the same data dir (outage
//! tests). [`Etcd::start_loopback`] runs it on 127.0.0.1 with free ports instead.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use twill_lab::etcd::ETCD;
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// A running (or stopped) single-member etcd.
pub struct Etcd {
    tls: Option<TlsFiles>,
    netns: Option<String>,
    ip: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

/// etcd's flags for a one-member cluster on `client`/`peer` URLs with its data in `data_dir`,
/// logging warnings to stderr; with `tls`, clients must present a certificate of its CA.
pub fn server_args(
    name: &str,
    data_dir: &Path,
    client: &str,
    peer: &str,
    tls: Option<&TlsFiles>,
) -> Vec<String> {
    let mut a = twill_lab::etcd::server_args(name, data_dir, client, peer);
    if let Some(t) = tls {
        a.extend([
            "--cert-file".to_string(),
            t.server_cert.display().to_string(),
            "--key-file".to_string(),
            t.server_key.display().to_string(),
            "--trusted-ca-file".to_string(),
            t.ca.display().to_string(),
            "--client-cert-auth".to_string(),
        ]);
    }
    a
}

impl Etcd {
    /// etcd listening on `ip`:2379 (peer :2380) inside the named netns.
    pub fn start_in(netns: &str, ip: &str) -> Etcd {
        Etcd::launch(Some(netns.to_string()), ip.to_string(), 2379, 2380)
    }

    /// etcd on 127.0.0.1 of the root namespace, on two free ports.
    pub fn start_loopback() -> Etcd {
        Etcd::launch(None, "127.0.0.1".to_string(), free_port(), free_port())
    }

    /// etcd on 127.0.0.1 of the root namespace, on two free ports, serving TLS and requiring
    /// client certificates signed by `pki`'s CA.
    pub fn start_loopback_tls(pki: &Pki) -> Etcd {
        Etcd::launch_with(
            None,
            "127.0.0.1".to_string(),
            free_port(),
            free_port(),
            Some(pki.files()),
        )
    }

    fn launch(netns: Option<String>, ip: String, client_port: u16, peer_port: u16) -> Etcd {
        Etcd::launch_with(netns, ip, client_port, peer_port, None)
    }

    /// etcd on `ip`:2379 inside the netns, serving TLS and requiring client certificates
    /// signed by `pki`'s CA (kubeadm's `--client-cert-auth`).
    pub fn start_in_tls(netns: &str, ip: &str, pki: &Pki) -> Etcd {
        Etcd::launch_with(
            Some(netns.to_string()),
            ip.to_string(),
            2379,
            2380,
            Some(pki.files()),
        )
    }

    fn launch_with(
        netns: Option<String>,
        ip: String,
        client_port: u16,
        peer_port: u16,
        tls: Option<TlsFiles>,
    ) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("twill-etcd")
            .tempdir()
            .expect("etcd temp dir");
        let loopback_ports = netns.is_none();
        let mut e = Etcd {
            tls,
            netns,
            ip,
            client_port,
            peer_port,
            dir,
            child: None,
        };
        // free_port() only promises a port was free a moment ago: another test may bind it
        // first. On loopback, pick new ports and try again.
        for _ in 0..5 {
            match e.try_start() {
                Ok(()) => return e,
                Err(log) if loopback_ports && log.contains("address already in use") => {
                    e.client_port = free_port();
                    e.peer_port = free_port();
                }
                Err(log) => panic!("{log}"),
            }
        }
        e.start();
        e
    }

    /// Client URL, e.g. `http://192.168.100.254:2379` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
    }

    /// The data dir (a `data` folder below it) and log file live here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// etcd's log (stdout+stderr of every start), for failure messages.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// PID of the running etcd, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts etcd (again) on the same data dir and waits until it answers.
    pub fn start(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("{log}");
        }
    }

    /// [`Etcd::start`], returning why etcd exited instead of panicking.
    fn try_start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let client = self.endpoint();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log");
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            // `ip netns exec` execs the program, so the child's PID is etcd's own.
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        argv.push(ETCD.to_string());
        let data = self.dir.path().join("data");
        argv.extend(server_args(
            "twill-test",
            &data,
            &client,
            &peer,
            self.tls.as_ref(),
        ));
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(30))
    }

    fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status}: {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                ));
            }
            let out = self.etcdctl_output(&["endpoint", "health", "--command-timeout=1s"]);
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd not healthy after {timeout:?}: {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops etcd (SIGTERM, then SIGKILL after 5 s) by its PID; the data dir stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `etcdctl` (API v3) against this etcd, run in its namespace; panics on failure, returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_output(args);
        assert!(
            out.status.success(),
            "etcdctl {:?} failed: {}{}",
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like [`Etcd::etcdctl`] but returns the output whatever the status.
    pub fn etcdctl_output(&self, args: &[&str]) -> Output {
        self.etcdctl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn etcdctl")
    }

    fn etcdctl_cmd(&self, args: &[&str]) -> Command {
        let endpoints = format!("--endpoints={}", self.endpoint());
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCDCTL]);
                c
            }
            None => Command::new(ETCDCTL),
        };
        cmd.env("ETCDCTL_API", "3").arg(endpoints);
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        cmd.args(args);
        cmd
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("endpoint status json");
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("revision in endpoint status")
    }

    /// Compacts the history up to the current revision (watchers behind it get ErrCompacted).
    pub fn compact(&self) -> i64 {
        let rev = self.revision();
        self.etcdctl(&["compact", &rev.to_string(), "--physical"]);
        rev
    }

    /// Value of `key`, or None.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", key, "--print-value-only"]);
        let v = out.trim_end_matches('\n');
        if v.is_empty() {
            None
        } else {
            Some(v.to_string())
        }
    }

    /// `(key, value)` pairs under `prefix`.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.etcdctl(&["get", prefix, "--prefix", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("get json");
        let b64 = |s: &serde_json::Value| decode_b64(s.as_str().unwrap_or_default());
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| (b64(&kv["key"]), b64(&kv["value"])))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The etcd lease ID (decimal) a key is bound to, 0 when none.
    pub fn key_lease(&self, key: &str) -> i64 {
        let out = self.etcdctl(&["get", key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("get json");
        v["kvs"][0]["lease"].as_i64().unwrap_or(0)
    }
}

/// Paths of the PEM files of a [`Pki`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A throw-away CA with a server certificate for one IP and a client certificate, made with
/// openssl (like kubeadm's /etc/kubernetes/pki/etcd). Removed on drop.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new(server_ip: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("twill-pki")
            .tempdir()
            .expect("pki dir");
        let pki = Pki { dir };
        let p = |n: &str| pki.dir.path().join(n).display().to_string();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("spawn openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=etcd-ca",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
        ]);
        std::fs::write(
            pki.dir.path().join("server.ext"),
            format!("subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("server.ext");
        std::fs::write(
            pki.dir.path().join("client.ext"),
            "extendedKeyUsage=clientAuth\n",
        )
        .expect("client.ext");
        for (name, cn) in [("server", server_ip), ("client", "twilld")] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.csr")),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.crt"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p(&format!("{name}.ext")),
                "-out",
                &p(&format!("{name}.crt")),
            ]);
        }
        pki
    }

    pub fn files(&self) -> TlsFiles {
        let d = self.dir.path();
        TlsFiles {
            ca: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
        }
    }
}

/// Minimal standard base64 decoder for etcdctl's JSON output (keys/values are base64).
fn decode_b64(s: &str) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64() {
        assert_eq!(super::decode_b64("L2NvcmVvcy5jb20="), "/coreos.com");
        assert_eq!(super::decode_b64("YWJj"), "abc");
    }
}
