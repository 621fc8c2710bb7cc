//! `twill-lab`: a multi-node twill cluster in network namespaces on one machine.
//!
//! `twill-lab up --nodes 3 --pods 2` builds it and leaves it running, `twill-lab status`
//! prints its tables again, `twill-lab down` removes everything it made, and
//! `twill-lab bench` measures pod-to-pod throughput against the same topology made by hand,
//! with flannel's rules and without.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use twill_lab::{self as lab, bench, Lab, LabOptions};

#[derive(Debug, Parser)]
#[command(
    name = "twill-lab",
    version,
    about = "twill multi-node lab in network namespaces"
)]
struct Cli {
    /// Lab name: prefix of its namespaces and name of its state dir.
    #[arg(long, global = true, default_value = "twill-lab")]
    name: String,
    /// Parent of the lab's state dir.
    #[arg(long, global = true, default_value = lab::DEFAULT_ROOT)]
    root: PathBuf,
    /// Directory holding the built twilld and plugins (default: next to this binary).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the lab (underlay, etcd, nodes running twilld, pods) and leave it running.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Let the bridge plugin masquerade instead of twilld (twilld without --ip-masq).
        #[arg(long)]
        no_ip_masq: bool,
        /// What attaches the pods: the lab's own CNI runtime (fastest), or a containerd per
        /// node driven through CRI (RunPodSandbox, real sandboxes; needs containerd, runc
        /// and busybox-static).
        #[arg(long, value_enum, default_value_t = lab::runtime::Kind::Lab)]
        runtime: lab::runtime::Kind,
        /// Cluster pod network written to etcd (default: 10.244.0.0/16 up to 200 nodes,
        /// 10.0.0.0/8 beyond).
        #[arg(long)]
        network: Option<String>,
        /// twilld's --reconcile-interval in seconds (default: twilld's own, 10 s); large labs on
        /// one machine may want more (docs/capacity.md).
        #[arg(long)]
        reconcile_interval: Option<u64>,
    },
    /// Measure a lab of N real nodes (its own, `<name>-scale`, removed afterwards): start-up
    /// to Ready and full mesh, join/leave propagation, a renewal storm, idle etcd load,
    /// twilld CPU and memory, etcd's memory and DB size.
    Scale {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Join/leave samples (a lease written, then deleted).
        #[arg(long, default_value_t = 20)]
        joins: usize,
        /// Seconds of the idle window (etcd requests, CPU).
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
        /// twilld's --reconcile-interval (default: twilld's own, 10 s).
        #[arg(long)]
        reconcile_interval: Option<u64>,
    },
    /// Print the node, pod and connectivity tables of a running lab.
    Status {
        /// Skip the connectivity probes.
        #[arg(long)]
        no_probe: bool,
    },
    /// Remove everything the lab made (processes by PID, namespaces, state dir).
    Down,
    /// Measure pod->pod TCP throughput on a 2-node lab of its own (`<name>-bench`, removed
    /// afterwards) against the same topology made by hand, with flannel's rules and without.
    Bench {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 4)]
        seconds: u32,
        /// Interleaved rounds over all paths; one run varies by ~20 % on a busy 2-core
        /// machine, so ratios are taken per round and their median reported.
        #[arg(long, default_value_t = 9)]
        runs: u32,
        /// iperf3 stream counts (-P) to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        streams: Vec<u32>,
        /// Run twilld without --ip-masq (flannel's side then gets the bridge plugin's masquerade).
        #[arg(long)]
        no_ip_masq: bool,
    },
}

fn options(cli: &Cli, name: &str) -> LabOptions {
    let mut o = LabOptions::new(name);
    o.root = cli.root.clone();
    if let Some(b) = &cli.bin_dir {
        o.bin_src = b.clone();
    }
    o
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twill-lab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> lab::Result<()> {
    let mut out = std::io::stdout();
    match &cli.command {
        Command::Up {
            nodes,
            pods,
            no_ip_masq,
            runtime,
            network,
            reconcile_interval,
        } => {
            let mut o = options(cli, &cli.name);
            o.ip_masq = !no_ip_masq;
            o.runtime = *runtime;
            o.network = network
                .clone()
                .unwrap_or_else(|| lab::addr::default_network(*nodes).to_string());
            o.reconcile_interval = *reconcile_interval;
            match lab::up(o, *nodes, *pods, &mut out) {
                Ok(_) => {
                    let _ = writeln!(out, "remove it with: twill-lab down{}", name_flag(cli));
                    Ok(())
                }
                Err(e) if matches!(Lab::open(&cli.root, &cli.name), Ok(Some(_))) => {
                    Err(lab::Error::Lab(format!(
                        "{e}\n(the partial lab stays for inspection; `twill-lab down{}` removes it)",
                        name_flag(cli)
                    )))
                }
                Err(e) => Err(e),
            }
        }
        Command::Status { no_probe } => {
            let lab = open(cli)?;
            let _ = writeln!(out, "{}\n{}", lab.nodes_table(), lab.pods_table());
            let cri = lab.containerd_table();
            if !cri.is_empty() {
                let _ = writeln!(out, "{cri}");
            }
            if !no_probe && !lab.pods().is_empty() {
                let _ = write!(out, "{}", lab.probe_report()?);
            }
            Ok(())
        }
        Command::Scale {
            nodes,
            joins,
            idle_secs,
            reconcile_interval,
        } => {
            let name = format!("{}-scale", cli.name);
            if let Some(stale) = Lab::open(&cli.root, &name)? {
                stale.down()?;
            }
            let mut o = options(cli, &name);
            o.network = lab::addr::default_network(nodes + joins).to_string();
            o.reconcile_interval = *reconcile_interval;
            let so = lab::scale::ScaleOptions {
                nodes: *nodes,
                joins: *joins,
                idle_secs: *idle_secs,
            };
            let report = lab::scale::run(o, &so, &mut out)?;
            let _ = write!(out, "\n{report}");
            Ok(())
        }
        Command::Down => match Lab::open(&cli.root, &cli.name)? {
            Some(lab) => {
                lab.down()?;
                let _ = writeln!(out, "lab {:?} removed", cli.name);
                Ok(())
            }
            None => {
                let _ = writeln!(out, "no lab {:?} (nothing to remove)", cli.name);
                Ok(())
            }
        },
        Command::Bench {
            seconds,
            runs,
            streams,
            no_ip_masq,
        } => {
            let name = format!("{}-bench", cli.name);
            if let Some(stale) = Lab::open(&cli.root, &name)? {
                stale.down()?;
            }
            let mut lo = options(cli, &name);
            lo.ip_masq = !no_ip_masq;
            let mut lab = lab::up(lo, 2, 1, &mut out)?;
            let o = bench::BenchOptions {
                seconds: *seconds,
                runs: *runs,
                streams: streams.clone(),
            };
            let res = bench::run(&mut lab, &o, &mut out);
            let down = lab.down();
            let res = res?;
            down?;
            let _ = write!(out, "\n{}", bench::report(&res, &o, !no_ip_masq));
            Ok(())
        }
    }
}

fn name_flag(cli: &Cli) -> String {
    if cli.name == "twill-lab" {
        String::new()
    } else {
        format!(" --name {}", cli.name)
    }
}

fn open(cli: &Cli) -> lab::Result<Lab> {
    Lab::open(&cli.root, &cli.name)?.ok_or_else(|| {
        lab::Error::Lab(format!(
            "no lab {:?} under {}; start one with `twill-lab up`",
            cli.name,
            cli.root.display()
        ))
    })
}
