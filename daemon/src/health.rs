//! `/healthz`, `/readyz` and `/metrics` over a minimal HTTP/1.0 responder: three GET paths
//! do not justify an HTTP framework in a daemon that must stay small.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Binds and serves until the runtime stops.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(Error::io(format!("bind health server on {addr}")))?;
    info!("health server on http://{addr}/ (healthz, readyz, metrics)");
    tokio::spawn(async move {
        let mut backoff = Duration::ZERO;
        loop {
            let conn = match listener.accept().await {
                Ok((conn, _)) => {
                    backoff = Duration::ZERO;
                    conn
                }
                Err(e) => {
                    // EMFILE/ENFILE stay until a descriptor frees up: retrying at once spins a
                    // core and starves the daemon's own work (nft, netlink).
                    backoff = accept_backoff(backoff);
                    if backoff == ACCEPT_BACKOFF_MIN {
                        warn!("health server: accept failed: {e}; backing off");
                    }
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = tokio::time::timeout(Duration::from_secs(5), handle(conn, m)).await
                {
                    debug!("health request timed out: {e}");
                }
            });
        }
    });
    Ok(())
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The wait after a failed accept: doubling from 10 ms up to 1 s.
fn accept_backoff(prev: Duration) -> Duration {
    (prev * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX)
}

fn respond(path: &str, metrics: &Metrics) -> (u16, &'static str, String) {
    match path {
        "/healthz" => (200, "text/plain", "twilld is running\n".into()),
        "/readyz" if metrics.is_ready() => (200, "text/plain", metrics.readiness_body()),
        "/readyz" => (503, "text/plain", metrics.readiness_body()),
        "/metrics" => (200, "text/plain; version=0.0.4", metrics.render()),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

async fn handle(mut conn: TcpStream, metrics: Arc<Metrics>) {
    let mut buf = [0u8; 1024];
    let mut len = 0;
    // Only the request line matters; stop at its end or when the buffer is full.
    while len < buf.len() {
        match conn.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
        if buf[..len].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let mut parts = line.split_whitespace();
    let (status, ctype, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => {
            respond(target.split('?').next().unwrap_or(target), &metrics)
        }
        _ => (405, "text/plain", "method not allowed\n".to_string()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_up_to_a_second() {
        let mut b = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..10 {
            b = accept_backoff(b);
            waits.push(b);
        }
        assert_eq!(waits[0], ACCEPT_BACKOFF_MIN, "never zero: no spinning");
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), ACCEPT_BACKOFF_MAX);
    }
}
