//! `tollgate`: `tollgate run` is the daemon; the other subcommands are the CLI.

mod cli;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use tollgate::{
    config::Config, control::protocol::Request, counters, daemon, explain::Probe,
    loader::AttachMode, paths, pins,
};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the agent refused the request (bad input, unknown name)
  2  command-line usage error
  3  no agent answers on the control socket
  4  not allowed on the control socket (root and the tollgate group only)
  5  the configuration is invalid (nothing was changed)
  6  the kernel refused an operation (load, attach, map update)";

/// Identity-bound, GPU-aware XDP enforcement for inference nodes.
///
/// `tollgate run` is the agent (normally started by systemd); every other command talks to
/// it over the control socket, except `config check`, `counters`, `completions` and `man`.
#[derive(Parser)]
#[command(version, about, long_about, after_help = EXIT_CODES)]
struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, env = "TOLLGATE_SOCKET", value_name = "PATH", default_value = paths::CONTROL_SOCKET)]
    socket: PathBuf,
    /// Output format of the read verbs (status, endpoints, identities, explain, counters).
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// The output format, passed to the printers.
struct OutputArg {
    output: Output,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: validate the config, adopt or create the pinned state, apply the
    /// policy, attach, and serve the control socket until SIGINT/SIGTERM (SIGHUP reloads).
    /// Stopping leaves the program attached with the last policy; `tollgate uninstall`
    /// removes it.
    Run {
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
    },
    /// The agent's state: interfaces, config, pins, counts, packets passed and dropped.
    Status,
    /// Protected endpoints with their packet counts.
    Endpoints,
    /// Identities: list them, or show one.
    Identities {
        #[command(subcommand)]
        action: Option<IdentitiesAction>,
    },
    /// Bind an address or CIDR to a configured identity (run-time binding, persisted), or,
    /// with --token, bind a client's address with the client's token (for a trusted gateway
    /// that terminates the client's connection itself).
    #[command(group(clap::ArgGroup::new("who").required(true).args(["identity", "token"])))]
    Bind {
        /// Address (a /32 or /128) or CIDR, host bits zero.
        #[arg(required_unless_present = "addr", conflicts_with = "addr")]
        target: Option<String>,
        /// The client's address (same as TARGET; reads better with --token).
        #[arg(long, value_name = "ADDR")]
        addr: Option<String>,
        /// The identity's name.
        #[arg(long)]
        identity: Option<String>,
        /// The client's token: the binding gets the token's identity and expiry.
        #[arg(long, conflicts_with = "for_secs")]
        token: Option<String>,
        /// Expire after this long (90s, 15m, 2h, 7d); the kernel enforces the expiry itself.
        #[arg(long = "for", value_name = "DURATION", value_parser = cli::args::duration_secs)]
        for_secs: Option<u64>,
    },
    /// Tokens: issue (without an identity provider), verify, revoke.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// A live view of identities, endpoints, drops and GPU pressure (q quits, s sorts);
    /// `--once` prints one snapshot (with `--output json` for scripts).
    Top {
        /// Seconds between polls (rates are measured over the real time between them).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one snapshot (two polls `interval` apart) and exit.
        #[arg(long)]
        once: bool,
        /// Identities shown at most (0: all).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Quota spent per identity and plan window (minute, day, month).
    Quota {
        #[command(subcommand)]
        action: QuotaAction,
    },
    /// GPU readings: simulate them (for labs and demos without a GPU).
    Gpu {
        #[command(subcommand)]
        action: GpuAction,
    },
    /// Signing keys for `token issue`.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Remove a run-time binding (configured ones are changed in the config).
    Unbind {
        /// Address or CIDR exactly as bound.
        target: String,
    },
    /// Drop everything an identity sends to protected endpoints, at once.
    Quarantine {
        /// Identity name, or an address whose binding names it.
        target: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Release by itself after this long (90s, 15m, 2h, 7d).
        #[arg(long = "for", value_name = "DURATION", value_parser = cli::args::duration_secs)]
        for_secs: Option<u64>,
    },
    /// Lift a quarantine.
    Release {
        /// Identity name, or an address whose binding names it.
        target: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The verdict a packet from SRC to DST:PORT/PROTO would get now, and why.
    Explain {
        /// Source address.
        src: std::net::IpAddr,
        /// Destination as ADDR:PORT/PROTO, e.g. 198.19.0.1:8000/tcp or [2001:db8::1]:443/udp.
        #[arg(value_parser = cli::args::destination)]
        dst: (std::net::IpAddr, u16, tollgate::tables::Proto),
        /// Frame size in bytes to weigh against the byte budget.
        #[arg(long, default_value_t = 100)]
        bytes: u16,
    },
    /// Re-read the configuration; a file that fails validation changes nothing.
    Reload,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Detach from every interface and remove every pin (enforcement stops). Asks the agent
    /// if one is running, else does it directly.
    Uninstall {
        /// Pin directory, when no agent is running.
        #[arg(long, value_name = "DIR", default_value = paths::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// The kernel's verdict counters read straight from the pins (works without the agent).
    Counters {
        /// Pin directory.
        #[arg(long, value_name = "DIR", default_value = paths::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Sign a token with a key from `tollgate keys generate`; prints it.
    Issue {
        /// The signing key file (`<kid>.key.json`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The identity (the `sub` claim).
        #[arg(long)]
        identity: String,
        /// Class claim: internal, partner or customer.
        #[arg(long)]
        class: Option<String>,
        /// Plan claim: a plan of the nodes' configuration.
        #[arg(long)]
        plan: Option<String>,
        /// Role claims, comma-separated.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Audience: the node pool's `tokens.audience`.
        #[arg(long)]
        audience: String,
        /// Lifetime (90s, 15m, 2h); at most the nodes' `tokens.max_ttl_s`.
        #[arg(long, value_parser = cli::args::duration_secs, default_value = "15m")]
        ttl: u64,
        /// Token id (`jti`); random if absent.
        #[arg(long)]
        id: Option<String>,
    },
    /// Check a token as a node would; prints its claims or the reason it is refused.
    Verify {
        token: String,
        /// Take keys and policy from this config's [tokens] section.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Or: the JWKS file ...
        #[arg(long, value_name = "FILE", requires = "audience")]
        jwks: Option<PathBuf>,
        /// ... and the audience.
        #[arg(long)]
        audience: Option<String>,
    },
    /// Revoke a token id, or every token of an identity issued until now: their bindings
    /// are removed at once and the revocation persists.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["token_id", "identity"])))]
    Revoke {
        /// The token's `jti`.
        #[arg(long)]
        token_id: Option<String>,
        /// The identity (the `sub` claim).
        #[arg(long)]
        identity: Option<String>,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum QuotaAction {
    /// What each identity has spent in its current windows, against its plan's quotas.
    Show {
        #[arg(long)]
        identity: Option<String>,
    },
    /// Forget what was spent (one identity, or all) and lift quota drops at once.
    Reset { identity: Option<String> },
}

#[derive(Subcommand)]
enum GpuAction {
    /// Write the file the simulated GPU source reads (`controller.gpu_source = "simulated"`):
    /// one or more GPUs at the given utilisation. The agent picks it up on its next interval.
    Simulate {
        /// Utilisation, 0 to 1 (0.95 = 95% busy).
        #[arg(long)]
        util: f64,
        /// How many GPUs (indices 0..N).
        #[arg(long, default_value_t = 1)]
        gpus: u32,
        /// Memory in use, fraction of 80 GiB.
        #[arg(long, default_value_t = 0.5)]
        memory: f64,
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/run/tollgate/gpu-simulated.json"
        )]
        file: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyAlg {
    /// Ed25519 (JWS "EdDSA").
    Eddsa,
    /// ECDSA P-256 with SHA-256 (JWS "ES256").
    Es256,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a signing key (<DIR>/<KID>.key.json, secret) and add its public half to
    /// <DIR>/jwks.json (what the nodes' `tokens.jwks` points at).
    Generate {
        #[arg(long, value_enum, default_value_t = KeyAlg::Eddsa)]
        alg: KeyAlg,
        /// Key id, unique among the keys in use (e.g. 2026-11).
        #[arg(long)]
        kid: String,
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum IdentitiesAction {
    /// All identities (the default).
    List,
    /// One identity in full.
    Show { name: String },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate a configuration file as `run` and `reload` would; prints the first error
    /// with file, line and field.
    Check {
        /// The file [default: /etc/tollgate/tollgate.toml].
        file: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    Default,
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

fn print_with(
    output: &OutputArg,
    text: impl FnOnce(&serde_json::Value),
) -> impl FnOnce(&serde_json::Value) {
    let json = matches!(output.output, Output::Json);
    move |v| {
        if json { cli::print::json(v) } else { text(v) }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket;
    let output = OutputArg { output: cli.output };
    match cli.command {
        Command::Run {
            config,
            interfaces,
            mode,
            pin_dir,
            state_dir,
            control_socket,
            detach_on_exit,
        } => {
            init_logging();
            let opts = daemon::Options {
                config,
                interfaces,
                mode,
                pin_dir,
                state_dir,
                control_socket,
                detach_on_exit,
            };
            match daemon::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    ExitCode::from(match e {
                        daemon::DaemonError::Config(_) => cli::exit::CONFIG,
                        _ => cli::exit::KERNEL,
                    })
                }
            }
        }
        Command::Status => cli::call(
            &socket,
            &Request::Status {},
            print_with(&output, cli::print::status),
        ),
        Command::Endpoints => cli::call(
            &socket,
            &Request::Endpoints {},
            print_with(&output, |v| {
                cli::print::table(
                    v,
                    &[
                        "id",
                        "name",
                        "protocol",
                        "ports",
                        "weight",
                        "classes",
                        "roles",
                        "anonymous",
                        "packets_passed",
                        "packets_dropped",
                    ],
                )
            }),
        ),
        Command::Identities { action } => match action {
            None | Some(IdentitiesAction::List) => cli::call(
                &socket,
                &Request::Identities {},
                print_with(&output, |v| {
                    cli::print::table(
                        v,
                        &[
                            "id",
                            "name",
                            "class",
                            "plan",
                            "bindings",
                            "quarantined",
                            "passed_packets",
                            "dropped_packets",
                        ],
                    )
                }),
            ),
            Some(IdentitiesAction::Show { name }) => cli::call(
                &socket,
                &Request::Identity { name },
                print_with(&output, cli::print::status),
            ),
        },
        Command::Bind {
            target,
            addr,
            identity,
            token,
            for_secs,
        } => {
            let target = target.or(addr).unwrap_or_default();
            let req = match (identity, token) {
                (Some(identity), _) => Request::Bind {
                    target,
                    identity,
                    for_secs,
                },
                (None, Some(token)) => match target.parse() {
                    Ok(addr) => Request::BindToken { token, addr },
                    Err(_) => {
                        eprintln!(
                            "tollgate: {target:?} is not an address (a token binds one address)"
                        );
                        return ExitCode::from(cli::exit::REFUSED);
                    }
                },
                (None, None) => unreachable!("clap requires --identity or --token"),
            };
            cli::call(&socket, &req, cli::print::done)
        }
        Command::Token { action } => match action {
            TokenAction::Issue {
                key,
                identity,
                class,
                plan,
                roles,
                audience,
                ttl,
                id,
            } => cli::token::issue(&cli::token::IssueArgs {
                key: &key,
                identity: &identity,
                class: class.as_deref(),
                plan: plan.as_deref(),
                roles: &roles,
                audience: &audience,
                ttl_secs: ttl,
                jti: id.as_deref(),
            }),
            TokenAction::Verify {
                token,
                config,
                jwks,
                audience,
            } => cli::token::verify_cmd(
                &token,
                jwks.as_deref(),
                audience.as_deref(),
                config.as_deref(),
            ),
            TokenAction::Revoke {
                token_id,
                identity,
                reason,
            } => cli::call(
                &socket,
                &Request::Revoke {
                    token_id,
                    identity,
                    reason,
                },
                cli::print::done,
            ),
        },
        Command::Top {
            interval,
            once,
            limit,
        } => {
            if !(interval.is_finite() && interval > 0.0) {
                eprintln!("tollgate: --interval must be a positive number of seconds");
                return ExitCode::from(2);
            }
            cli::top::run(
                &socket,
                &cli::top::TopArgs {
                    interval: std::time::Duration::from_secs_f64(interval),
                    once,
                    json: matches!(output.output, Output::Json),
                    limit,
                },
            )
        }
        Command::Quota { action } => match action {
            QuotaAction::Show { identity } => cli::call(
                &socket,
                &Request::QuotaShow { identity },
                print_with(&output, cli::print::json),
            ),
            QuotaAction::Reset { identity } => {
                cli::call(&socket, &Request::QuotaReset { identity }, cli::print::done)
            }
        },
        Command::Gpu {
            action:
                GpuAction::Simulate {
                    util,
                    gpus,
                    memory,
                    file,
                },
        } => {
            let total = 80u64 << 30;
            let readings: Vec<tollgate::controller::gpu::GpuReading> = (0..gpus)
                .map(|index| tollgate::controller::gpu::GpuReading {
                    index,
                    name: "simulated".into(),
                    utilization: util,
                    memory_used_bytes: (total as f64 * memory.clamp(0.0, 1.0)) as u64,
                    memory_total_bytes: total,
                    power_watts: Some(100.0 + 600.0 * util.clamp(0.0, 1.0)),
                })
                .collect();
            if let Some(dir) = file.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match tollgate::controller::gpu::write_simulated(&file, &readings) {
                Ok(()) => {
                    println!(
                        "ok: {} simulated GPU(s) at {util} in {}",
                        gpus,
                        file.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tollgate: {}: {e}", file.display());
                    ExitCode::from(cli::exit::REFUSED)
                }
            }
        }
        Command::Keys {
            action: KeysAction::Generate { alg, kid, out_dir },
        } => cli::token::generate(
            match alg {
                KeyAlg::Eddsa => tollgate_common::token::Alg::EdDSA,
                KeyAlg::Es256 => tollgate_common::token::Alg::ES256,
            },
            &kid,
            &out_dir,
        ),
        Command::Unbind { target } => {
            cli::call(&socket, &Request::Unbind { target }, cli::print::done)
        }
        Command::Quarantine {
            target,
            reason,
            for_secs,
        } => cli::call(
            &socket,
            &Request::Quarantine {
                target,
                for_secs,
                reason,
            },
            cli::print::done,
        ),
        Command::Release { target, reason } => cli::call(
            &socket,
            &Request::Release { target, reason },
            cli::print::done,
        ),
        Command::Explain { src, dst, bytes } => cli::call(
            &socket,
            &Request::Explain(Probe {
                src,
                dst: dst.0,
                port: dst.1,
                proto: dst.2,
                bytes: Some(bytes),
            }),
            print_with(&output, cli::print::explain),
        ),
        Command::Reload => cli::call(&socket, &Request::Reload {}, |_| println!("ok: reloaded")),
        Command::Config { action } => match action {
            ConfigAction::Check { file } => {
                if file.is_none() && !std::path::Path::new(Config::DEFAULT_PATH).exists() {
                    println!(
                        "{} does not exist: `tollgate run` would use the embedded default \
                         (`tollgate config default` prints it)",
                        Config::DEFAULT_PATH
                    );
                    return ExitCode::SUCCESS;
                }
                let path = file.unwrap_or_else(|| PathBuf::from(Config::DEFAULT_PATH));
                match Config::load(&path) {
                    Ok(c) => {
                        println!(
                            "{}: ok ({} endpoints, {} plans, {} identities)",
                            path.display(),
                            c.endpoints.len(),
                            c.plans.len(),
                            c.identities.len()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ExitCode::from(cli::exit::CONFIG)
                    }
                }
            }
            ConfigAction::Default => {
                print!("{}", Config::embedded_default_text());
                ExitCode::SUCCESS
            }
        },
        Command::Uninstall { pin_dir } => {
            if socket.exists() {
                return cli::call(&socket, &Request::Uninstall {}, |v| {
                    println!(
                        "uninstalled: {} pins removed",
                        v["removed"].as_array().map_or(0, Vec::len)
                    )
                });
            }
            match pins::uninstall(&pin_dir) {
                Ok(removed) => {
                    println!(
                        "uninstalled: {} pins removed (no agent was running)",
                        removed.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    ExitCode::from(cli::exit::KERNEL)
                }
            }
        }
        Command::Counters { pin_dir } => {
            let path = pins::maps_dir(&pin_dir).join(tollgate_common::map_names::REASON_COUNTERS);
            match counters::reason_totals_from_pin(&path) {
                Ok(totals) => {
                    let rows = serde_json::json!(counters::to_rows(&totals));
                    print_with(&output, |v| {
                        cli::print::table(v, &["reason", "verdict", "packets", "bytes"])
                    })(&rows);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    ExitCode::from(cli::exit::NO_AGENT)
                }
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tollgate",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
