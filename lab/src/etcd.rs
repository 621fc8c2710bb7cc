//! How the lab (and the test harness, which adds TLS) runs Debian's etcd 3.4 as a
//! one-member cluster.

use std::path::Path;

pub const ETCD: &str = "/usr/bin/etcd";

/// etcd's flags for a one-member cluster on `client`/`peer` URLs with its data in `data_dir`,
/// logging warnings to stderr.
pub fn server_args(name: &str, data_dir: &Path, client: &str, peer: &str) -> Vec<String> {
    [
        "--name",
        name,
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        &format!("{name}={peer}"),
        "--initial-cluster-state",
        "new",
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
        "--log-level",
        "warn",
    ]
    .map(String::from)
    .to_vec()
}
