//! `tollgate`: `tollgate run` is the daemon; the other subcommands are the CLI. This file is
//! the dispatch: it parses the command line, calls the verb's `run` (one module per verb
//! under `cli/`), and turns the verb's failure into its message and documented exit code.

mod cli;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, parser::ValueSource};
use tollgate::paths;

use crate::cli::{
    Ctx, Given, Output, bind, completions, config, counters, endpoints, explain, fleet, gpu,
    identities, keys, man, quarantine, quota, release, reload, run, status, token, top, unbind,
    uninstall, usage,
};

/// Identity-bound, GPU-aware XDP enforcement for inference nodes.
///
/// `tollgate run` is the agent (normally started by systemd); every other command talks to
/// it over the control socket, except `config check`, `counters`, `completions` and `man`.
#[derive(Parser)]
#[command(version, about, long_about, after_help = cli::EXIT_CODES)]
struct Cli {
    /// The agent's control socket: where the client verbs connect. Given to `tollgate run`
    /// (here or in TOLLGATE_SOCKET), where the agent listens, as `run --control-socket`;
    /// otherwise `run` listens on the configuration's `node.control_socket`.
    #[arg(long, global = true, env = "TOLLGATE_SOCKET", value_name = "PATH", default_value = paths::CONTROL_SOCKET)]
    socket: PathBuf,
    /// Output format of the read verbs (status, endpoints, identities, explain, counters,
    /// fleet status).
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// The verbs, in `--help` order; each one's arguments and help text are in its module.
#[derive(Subcommand)]
enum Command {
    Run(run::RunArgs),
    Status(status::StatusArgs),
    Endpoints(endpoints::EndpointsArgs),
    Identities(identities::IdentitiesArgs),
    Bind(bind::BindArgs),
    Token(token::TokenArgs),
    Top(top::TopArgs),
    Quota(quota::QuotaArgs),
    Usage(usage::UsageArgs),
    Gpu(gpu::GpuArgs),
    Keys(keys::KeysArgs),
    Unbind(unbind::UnbindArgs),
    Quarantine(quarantine::QuarantineArgs),
    Fleet(fleet::FleetArgs),
    Release(release::ReleaseArgs),
    Explain(explain::ExplainArgs),
    Reload(reload::ReloadArgs),
    Config(config::ConfigArgs),
    Uninstall(uninstall::UninstallArgs),
    Counters(counters::CountersArgs),
    Completions(completions::CompletionsArgs),
    Man(man::ManArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let socket_from = match matches.value_source("socket") {
        Some(ValueSource::CommandLine) => Given::CommandLine,
        Some(ValueSource::EnvVariable) => Given::Env,
        _ => Given::Default,
    };
    let ctx = Ctx {
        socket: cli.socket,
        socket_from,
        output: cli.output,
    };
    let outcome = match cli.command {
        Command::Run(a) => run::run(a, &ctx),
        Command::Status(a) => status::run(a, &ctx),
        Command::Endpoints(a) => endpoints::run(a, &ctx),
        Command::Identities(a) => identities::run(a, &ctx),
        Command::Bind(a) => bind::run(a, &ctx),
        Command::Token(a) => token::run(a, &ctx),
        Command::Top(a) => top::run(a, &ctx),
        Command::Quota(a) => quota::run(a, &ctx),
        Command::Usage(a) => usage::run(a, &ctx),
        Command::Gpu(a) => gpu::run(a, &ctx),
        Command::Keys(a) => keys::run(a),
        Command::Unbind(a) => unbind::run(a, &ctx),
        Command::Quarantine(a) => quarantine::run(a, &ctx),
        Command::Fleet(a) => fleet::run(a, &ctx),
        Command::Release(a) => release::run(a, &ctx),
        Command::Explain(a) => explain::run(a, &ctx),
        Command::Reload(a) => reload::run(a, &ctx),
        Command::Config(a) => config::run(a),
        Command::Uninstall(a) => uninstall::run(a, &ctx),
        Command::Counters(a) => counters::run(a, &ctx),
        Command::Completions(a) => completions::run(a, Cli::command()),
        Command::Man(a) => man::run(a, Cli::command()),
    };
    match outcome {
        Ok(()) => ExitCode::from(cli::exit::OK),
        Err(failure) => failure.report(),
    }
}
