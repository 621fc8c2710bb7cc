//! `twilld`: twill's node daemon. See `daemon.rs` for the life cycle.

mod alloc;
mod backend;
mod backend_type;
mod cli;
mod cni_conf;
mod config;
mod daemon;
mod doctor;
mod error;
mod etcd_store;
mod forward;
mod guard;
mod health;
mod host;
mod iface;
mod init_network;
mod install_cni;
mod iptables;
mod lease;
mod metrics;
mod offload;
mod own_lease;
mod readiness;
mod rules;
mod store;

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// Runs the daemon until it fails or SIGTERM/SIGINT arrives. On a signal nothing is undone:
/// the lease, the device, routes, rules and the CNI config stay for a restart to adopt.
async fn run_daemon(args: cli::RunArgs) -> error::Result<()> {
    let mut term = signal(SignalKind::terminate()).map_err(error::Error::io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(error::Error::io("SIGINT handler"))?;
    tokio::select! {
        r = daemon::run(args) => r,
        _ = term.recv() => {
            info!("SIGTERM: exiting; the lease, the data path and the CNI config stay in place");
            Ok(())
        }
        _ = int.recv() => {
            info!("SIGINT: exiting; the lease, the data path and the CNI config stay in place");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        None => rt.block_on(run_daemon(cli.run)).map_err(|e| e.to_string()),
        Some(cli::Command::InstallCni(args)) => install_cni::run(&args).map_err(|e| e.to_string()),
        Some(cli::Command::Doctor(args)) => return doctor::main(rt, &args),
        Some(cli::Command::InitNetwork(args)) => rt
            .block_on(init_network::run(&args))
            .map(drop)
            .map_err(|e| e.to_string()),
    };
    // Background tasks (watch, health server) end with the runtime.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
