//! `tollgate`: `tollgate run` is the daemon; the other subcommands are the CLI.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tollgate::{counters, loader, paths};
use tracing::info;

/// Identity-bound, GPU-aware XDP enforcement for inference nodes.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the XDP program, attach it to an interface, and keep it attached
    /// until SIGINT or SIGTERM (then detach and remove the pins).
    Run {
        /// Interface to enforce on (the one the model servers' traffic arrives on).
        #[arg(long, value_name = "IFACE")]
        iface: String,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = loader::AttachMode::Auto)]
        mode: loader::AttachMode,
        /// Directory on a bpffs where maps are pinned.
        #[arg(long, value_name = "DIR", default_value = paths::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print the kernel's verdict counters (packets and bytes per reason) from the pinned map;
    /// works while `tollgate run` is attached, without talking to it.
    Counters {
        /// Directory on a bpffs where `tollgate run` pinned its maps.
        #[arg(long, value_name = "DIR", default_value = paths::PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            iface,
            mode,
            pin_dir,
        } => run(&iface, mode, &pin_dir),
        Command::Counters { pin_dir, output } => print_counters(&pin_dir, output),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(iface: &str, mode: loader::AttachMode, pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let attached = loader::Attached::start(iface, mode, pin_dir)?;
        info!(
            iface,
            mode = mode.label(),
            pin_dir = %pin_dir.display(),
            "attached; enforcing until SIGINT/SIGTERM"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
        let totals = counters::reason_totals(&loader::reason_counters(attached.ebpf())?)?;
        for (reason, c) in totals.iter().filter(|(_, c)| c.packets > 0) {
            info!(
                reason = reason.label(),
                packets = c.packets,
                bytes = c.bytes,
                "final count"
            );
        }
        attached.stop()?;
        info!(iface, "detached");
        Ok(())
    })
}

fn print_counters(pin_dir: &std::path::Path, output: Output) -> anyhow::Result<()> {
    let totals = counters::reason_totals_from_pin(&pin_dir.join(paths::PIN_REASON_COUNTERS))?;
    let rows = counters::to_rows(&totals);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => {
            println!(
                "{:<24} {:<7} {:>14} {:>18}",
                "REASON", "VERDICT", "PACKETS", "BYTES"
            );
            for r in rows {
                println!(
                    "{:<24} {:<7} {:>14} {:>18}",
                    r.reason, r.verdict, r.packets, r.bytes
                );
            }
        }
    }
    Ok(())
}
