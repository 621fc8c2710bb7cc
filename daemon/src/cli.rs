//! Command line of `twilld`. Flag names follow flanneld where flanneld has one;
//! every flag can also be set as `TWILLD_<FLAG>` in the environment.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use ipnetwork::Ipv4Network;

use crate::backend_type::BackendType;

#[derive(Debug, Parser)]
#[command(
    name = "twilld",
    version,
    about = "twill node daemon: subnet lease, overlay, CNI config"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands besides the daemon itself (which runs when none is given).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy the CNI plugins shipped in the image into the node's CNI bin dir, atomically
    /// (the DaemonSet's init container).
    InstallCni(crate::install_cni::InstallCniArgs),
    /// Store the network config (`<prefix>/config`) in etcd unless an equal one is there.
    InitNetwork(InitNetworkArgs),
    /// Check this node's prerequisites (kernel, firewall, CNI, etcd, lease, MTU, clock);
    /// exit 0 all ok, 1 warnings, 2 failures.
    Doctor(DoctorArgs),
}

/// How to reach etcd; shared by the daemon and `init-network`.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// Comma-separated etcd endpoints.
    #[arg(
        long,
        env = "TWILLD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of the network (flannel's schema).
    #[arg(
        long,
        env = "TWILLD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// CA bundle that signs the etcd server certificate.
    #[arg(long, env = "TWILLD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate; TLS is used when both certfile and keyfile are set.
    #[arg(long, env = "TWILLD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key.
    #[arg(long, env = "TWILLD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    #[arg(long, env = "TWILLD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    #[arg(long, env = "TWILLD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
}

impl EtcdArgs {
    /// The plain config the etcd clients take.
    pub fn config(&self) -> crate::etcd_store::EtcdConfig {
        crate::etcd_store::EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            cafile: self.etcd_cafile.clone(),
            certfile: self.etcd_certfile.clone(),
            keyfile: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Underlay interface, by name or by one of its IPs (default: the default-route interface).
    #[arg(long, env = "TWILLD_IFACE")]
    pub iface: Option<String>,
    /// IP to advertise to peers (default: the interface's first IPv4 address).
    #[arg(long, env = "TWILLD_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    /// Masquerade traffic from pods to outside the pod network.
    #[arg(long, env = "TWILLD_IP_MASQ")]
    pub ip_masq: bool,
    /// TX checksum offload on the VXLAN device: auto turns it off only on kernels older than
    /// 5.7, whose NAT breaks offloaded VXLAN checksums (see daemon/README.md).
    #[arg(
        long,
        env = "TWILLD_VXLAN_TX_CHECKSUM_OFFLOAD",
        value_enum,
        default_value_t = crate::offload::OffloadMode::Auto
    )]
    pub vxlan_tx_checksum_offload: crate::offload::OffloadMode,
    /// flannel-format subnet file read by the `twill` CNI plugin.
    #[arg(
        long,
        env = "TWILLD_SUBNET_FILE",
        default_value = "/run/twill/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Address of the health server (default 127.0.0.1: metrics and state stay on the node
    /// unless asked; the DaemonSet's probes run on the node).
    #[arg(long, env = "TWILLD_HEALTHZ_IP", default_value = "127.0.0.1")]
    pub healthz_ip: IpAddr,
    /// Port of /healthz, /readyz and /metrics; 0 disables the server.
    #[arg(long, env = "TWILLD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// Where the CNI conflist is written once the node is ready.
    #[arg(long, env = "TWILLD_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where the CNI plugins live (twill-portmap is chained only if it is found here).
    #[arg(long, env = "TWILLD_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Base of the plugins' data dirs (IPAM store, meta plugin state).
    #[arg(long, env = "TWILLD_CNI_DATA_DIR", default_value = "/var/lib/cni")]
    pub cni_data_dir: PathBuf,
    /// twilld's own state (VTEP MAC, previous network for rule cleanup).
    #[arg(long, env = "TWILLD_STATE_DIR", default_value = "/var/lib/twill")]
    pub state_dir: PathBuf,
    /// TTL of the subnet lease in etcd, in seconds (renewed before expiry).
    #[arg(long, env = "TWILLD_LEASE_TTL", default_value_t = 86_400)]
    pub lease_ttl: u64,
    /// Seconds between reconcile passes (kernel entries against leases, rules, CNI config).
    #[arg(long, env = "TWILLD_RECONCILE_INTERVAL", default_value_t = 10)]
    pub reconcile_interval: u64,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["network", "config_file"])))]
pub struct InitNetworkArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Pod network (IPv4 CIDR, at least a /28); kubeadm's --pod-network-cidr.
    #[arg(long, env = "TWILLD_NETWORK")]
    pub network: Option<Ipv4Network>,
    /// Overlay backend.
    #[arg(long, env = "TWILLD_BACKEND", value_enum, default_value_t = BackendType::Vxlan)]
    pub backend: BackendType,
    /// Prefix length of each node's subnet (default: flannel's, 24 for networks up to /22).
    #[arg(long, env = "TWILLD_SUBNET_LEN")]
    pub subnet_len: Option<u8>,
    /// Store this flannel net-conf.json instead of one built from --network/--backend.
    #[arg(long, env = "TWILLD_CONFIG_FILE", conflicts_with_all = ["network", "backend", "subnet_len"])]
    pub config_file: Option<PathBuf>,
    /// Replace an existing, different config (nodes keep their leases only if they still fit).
    #[arg(long, env = "TWILLD_FORCE")]
    pub force: bool,
}

/// `twilld doctor [--json] <the daemon's flags>`: the same etcd flags, paths and interface
/// selection as the daemon, so the DaemonSet's environment works unchanged.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// Print a JSON array of {check, status, message, fix} instead of text lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub run: RunArgs,
}
