//! Clock skew against etcd. etcd has no time API, so the sample is the HTTP `Date` header of
//! `GET /version` on the first client URL (plain or TLS with the configured certificates),
//! compared with the local time halfway through the request.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::Finding;
use crate::etcd_store::EtcdConfig;

/// Skew above this is reported: certificates and lease expiry read in logs stop lining up.
const WARN_SKEW: Duration = Duration::from_secs(5);
const LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct ClockSample {
    pub sent: SystemTime,
    pub received: SystemTime,
    /// The server's `Date` (whole seconds).
    pub server: SystemTime,
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Local minus etcd time in seconds, and the measurement's uncertainty: `Date` has whole
/// seconds (so the server's time lies in [Date, Date+1)) and the request took a round trip.
pub fn skew(s: &ClockSample) -> (f64, f64) {
    let rtt = secs_between(s.received, s.sent).max(0.0);
    let local_mid = s.sent + Duration::from_secs_f64(rtt / 2.0);
    let server_mid = s.server + Duration::from_millis(500);
    (secs_between(local_mid, server_mid), 0.5 + rtt / 2.0)
}

pub fn clock(endpoint: &str, sample: &Result<ClockSample, String>) -> Finding {
    let check = "clock";
    match sample {
        Err(e) => Finding::warn(
            check,
            format!("cannot measure: no HTTP Date from {endpoint}/version ({e})"),
            "compare `date -u` with the etcd host's clock by hand; keep both synced (chrony, systemd-timesyncd)",
        ),
        Ok(s) => {
            let (d, err) = skew(s);
            let msg = format!(
                "local clock {d:+.1} s from etcd's (±{err:.1} s, HTTP Date of {endpoint}/version)"
            );
            if d.abs() - err > WARN_SKEW.as_secs_f64() {
                Finding::warn(
                    check,
                    msg,
                    "sync this node's clock (chrony, systemd-timesyncd): TLS certificate validity and lease times in logs depend on it",
                )
            } else {
                Finding::ok(check, msg)
            }
        }
    }
}

/// The `Date` header of an HTTP response head.
pub fn date_header(head: &str) -> Option<SystemTime> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim().eq_ignore_ascii_case("date") {
            httpdate::parse_http_date(v.trim()).ok()
        } else {
            None
        }
    })
}

/// `https://host:port/...` → (tls, host, authority).
fn split_url(url: &str) -> Result<(bool, String, String), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url}: not an http:// or https:// URL"));
    };
    let authority = rest.split('/').next().unwrap_or(rest).to_string();
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6).to_string()
    } else {
        authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&authority)
            .to_string()
    };
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    Ok((tls, host, authority))
}

fn tls_config(args: &EtcdConfig) -> Result<rustls::ClientConfig, String> {
    let ca = args
        .cafile
        .as_ref()
        .ok_or("https without --etcd-cafile: cannot verify etcd's certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(c.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    match (&args.certfile, &args.keyfile) {
        (Some(c), Some(k)) => {
            let certs = CertificateDer::pem_file_iter(c)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", c.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(k).map_err(|e| format!("{}: {e}", k.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    authority: &str,
) -> Result<(SystemTime, String), String> {
    let req = format!(
        "GET /version HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: twilld-doctor\r\nConnection: close\r\n\r\n"
    );
    let sent = SystemTime::now();
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The head is all that matters; stop at its end (or 64 KiB).
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((sent, String::from_utf8_lossy(&buf).into_owned()))
}

/// One sample against `url` (the endpoint as twilld uses it).
pub async fn sample(url: &str, args: &EtcdConfig) -> Result<ClockSample, String> {
    let (tls, host, authority) = split_url(url)?;
    let work = async {
        let tcp = TcpStream::connect(authority.as_str())
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let (sent, head) = if tls {
            let config = tls_config(args)?;
            let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(stream, &authority).await?
        } else {
            exchange(tcp, &authority).await?
        };
        let received = SystemTime::now();
        let server = date_header(&head).ok_or_else(|| {
            format!(
                "no Date header in the reply ({:?})",
                head.lines().next().unwrap_or("empty reply")
            )
        })?;
        Ok(ClockSample {
            sent,
            received,
            server,
        })
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .map_err(|_| format!("no reply within {LIMIT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    #[test]
    fn header_and_url() {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ndate: Wed, 02 Dec 2026 10:55:42 GMT\r\n\r\n";
        let t = date_header(head).unwrap();
        assert_eq!(httpdate::fmt_http_date(t), "Wed, 02 Dec 2026 10:55:42 GMT");
        assert_eq!(date_header("HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(
            split_url("http://192.168.100.254:2379").unwrap(),
            (
                false,
                "192.168.100.254".into(),
                "192.168.100.254:2379".into()
            )
        );
        assert_eq!(
            split_url("https://etcd.example:2379/").unwrap(),
            (true, "etcd.example".into(), "etcd.example:2379".into())
        );
        assert_eq!(
            split_url("https://[fd00::1]:2379").unwrap(),
            (true, "fd00::1".into(), "[fd00::1]:2379".into())
        );
        assert!(split_url("unix:///run/etcd.sock").is_err());
    }

    #[test]
    fn skew_within_the_date_resolution_is_ok() {
        let server = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |ms: u64| server + Duration::from_millis(ms);
        let s = ClockSample {
            sent: at(400),
            received: at(600),
            server,
        };
        let (d, err) = skew(&s);
        assert!(d.abs() < 0.01, "{d}");
        assert!((err - 0.6).abs() < 0.01, "{err}");
        assert_eq!(clock("http://e:2379", &Ok(s)).status, Status::Ok);
        let ahead = ClockSample {
            sent: at(30_400),
            received: at(30_600),
            server,
        };
        let f = clock("http://e:2379", &Ok(ahead));
        assert_eq!(f.status, Status::Warn);
        assert!(f.message.contains("+30.0 s"), "{}", f.message);
        let behind = ClockSample {
            sent: server - Duration::from_secs(20),
            received: server - Duration::from_secs(20),
            server,
        };
        assert_eq!(clock("e", &Ok(behind)).status, Status::Warn);
        let none = clock("http://e:2379", &Err("refused".into()));
        assert_eq!(none.status, Status::Warn);
        assert!(none.message.starts_with("cannot measure"));
    }
}
