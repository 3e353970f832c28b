//! `tollgate run`: the agent itself.

use std::path::PathBuf;

use tollgate::{daemon, loader::AttachMode};

use super::{Outcome, exit};

/// Run the agent: validate the config, adopt or create the pinned state, apply the
/// policy, attach, and serve the control socket until SIGINT/SIGTERM (SIGHUP reloads).
/// Stopping leaves the program attached with the last policy; `tollgate uninstall`
/// removes it.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Configuration file [default: /etc/tollgate/tollgate.toml if it exists, else the
    /// embedded default].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Interface to enforce on, replacing the config's list (repeat for several).
    #[arg(long = "iface", value_name = "IFACE")]
    interfaces: Vec<String>,
    /// XDP attach mode, replacing the config's.
    #[arg(long, value_enum)]
    mode: Option<AttachMode>,
    /// Pin directory on a bpffs, replacing the config's.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// State directory (state.json, audit.log), replacing the config's.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Control socket, replacing the config's.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// On SIGINT/SIGTERM, detach and remove every pin (for ad-hoc runs and labs).
    #[arg(long)]
    detach_on_exit: bool,
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Runs the agent until it is stopped: 0 after a clean stop, 5 for a configuration error, 6
/// for any other start failure.
pub fn run(a: RunArgs) -> Outcome {
    init_logging();
    let opts = daemon::Options {
        config: a.config,
        interfaces: a.interfaces,
        mode: a.mode,
        pin_dir: a.pin_dir,
        state_dir: a.state_dir,
        control_socket: a.control_socket,
        detach_on_exit: a.detach_on_exit,
    };
    match daemon::run(opts) {
        Ok(()) => Ok(()),
        Err(e) => super::fail(
            match e {
                daemon::DaemonError::Config(_) => exit::CONFIG,
                _ => exit::KERNEL,
            },
            e,
        ),
    }
}
