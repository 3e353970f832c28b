//! `tollgate config check|default`: works without the agent.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Subcommand;
use tollgate::config::Config;

use super::exit;

/// Configuration tools.
#[derive(clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Validate a configuration file as `run` and `reload` would; prints the first error
    /// with file, line and field.
    Check {
        /// The file [default: /etc/tollgate/tollgate.toml].
        file: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    Default,
}

pub fn run(a: ConfigArgs) -> ExitCode {
    match a.action {
        Action::Check { file } => check(file),
        Action::Default => {
            print!("{}", Config::embedded_default_text());
            ExitCode::SUCCESS
        }
    }
}

fn check(file: Option<PathBuf>) -> ExitCode {
    if file.is_none() && !Path::new(Config::DEFAULT_PATH).exists() {
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
            ExitCode::from(exit::CONFIG)
        }
    }
}
