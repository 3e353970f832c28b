//! `tollgate run`: the agent itself.

use std::path::PathBuf;

use tollgate::{daemon, loader::AttachMode};

use super::{Ctx, Given, Outcome, exit};

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
    /// Control socket, replacing the config's. The global `--socket` (or `TOLLGATE_SOCKET`)
    /// does the same for `run`, so that the agent listens where the CLI connects; given both
    /// on the command line, they must name the same path.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// On SIGINT/SIGTERM, detach and remove every pin (for ad-hoc runs and labs).
    #[arg(long)]
    detach_on_exit: bool,
    /// Load the XDP program from this BPF object file instead of the one built into the
    /// binary (to stage a rebuilt program). Its maps must match the pins like the built-in
    /// object's; a program the verifier refuses leaves the running one attached, and the
    /// agent exits 6.
    #[arg(long, value_name = "FILE", env = "TOLLGATE_PROGRAM_OBJECT")]
    program_object: Option<PathBuf>,
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
pub fn run(a: RunArgs, ctx: &Ctx) -> Outcome {
    let control_socket = control_socket(a.control_socket, ctx)?;
    init_logging();
    if let Some(path) = &a.program_object {
        tollgate::object::stage(path).or_else(|e| super::fail(exit::CONFIG, e))?;
        tracing::info!(object = %path.display(), "program object staged from a file");
    }
    let opts = daemon::Options {
        config: a.config,
        interfaces: a.interfaces,
        mode: a.mode,
        pin_dir: a.pin_dir,
        state_dir: a.state_dir,
        control_socket,
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

/// The control socket `run` was given: `--control-socket`, else the global `--socket` when
/// it was given (on the command line or in `TOLLGATE_SOCKET`), else none (the config's).
fn control_socket(control: Option<PathBuf>, ctx: &Ctx) -> Result<Option<PathBuf>, super::Failure> {
    match (control, ctx.socket_from) {
        (Some(c), Given::CommandLine) if c != ctx.socket => Err(super::Failure::new(
            exit::USAGE,
            format!(
                "--socket {} and --control-socket {} name different control sockets; \
                 give one",
                ctx.socket.display(),
                c.display()
            ),
        )),
        (Some(c), _) => Ok(Some(c)),
        (None, Given::CommandLine | Given::Env) => Ok(Some(ctx.socket.clone())),
        (None, Given::Default) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Output;

    fn ctx(socket: &str, socket_from: Given) -> Ctx {
        Ctx {
            socket: socket.into(),
            socket_from,
            output: Output::Text,
        }
    }

    #[test]
    fn the_global_socket_is_the_agents_control_socket() {
        let p = |s: &str| Some(PathBuf::from(s));
        let default = ctx(tollgate::paths::CONTROL_SOCKET, Given::Default);
        assert_eq!(control_socket(None, &default).unwrap(), None);
        assert_eq!(control_socket(p("/b"), &default).unwrap(), p("/b"));
        let given = ctx("/a", Given::CommandLine);
        assert_eq!(control_socket(None, &given).unwrap(), p("/a"));
        assert_eq!(control_socket(p("/a"), &given).unwrap(), p("/a"));
        let f = control_socket(p("/b"), &given).unwrap_err();
        assert_eq!(f.code, exit::USAGE);
        assert!(
            f.message.contains("/a") && f.message.contains("/b"),
            "{}",
            f.message
        );
        // TOLLGATE_SOCKET counts as given, and --control-socket wins over it.
        let env = ctx("/a", Given::Env);
        assert_eq!(control_socket(None, &env).unwrap(), p("/a"));
        assert_eq!(control_socket(p("/b"), &env).unwrap(), p("/b"));
    }
}
