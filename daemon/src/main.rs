mod cli;
mod init_network;
mod install_cni;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = cli::Cli::parse();
    let result = match cli.command {
        Some(cli::Command::InstallCni(args)) => install_cni::run(&args).map_err(|e| e.to_string()),
        Some(cli::Command::InitNetwork(args)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(init_network::run(&args))
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
        // The daemon itself is dispatched here by the daemon work.
        None => Err(format!("daemon mode is not built yet ({:?})", cli.run)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twilld: {e}");
            ExitCode::FAILURE
        }
    }
}
