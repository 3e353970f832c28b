//! `tollgate config check|default`: works without the agent.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use tollgate::config::Config;

use super::{Failure, Outcome, exit};

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

pub fn run(a: ConfigArgs) -> Outcome {
    match a.action {
        Action::Check { file } => check(file),
        Action::Default => {
            print!("{}", Config::embedded_default_text());
            Ok(())
        }
    }
}

fn check(file: Option<PathBuf>) -> Outcome {
    if file.is_none() && !Path::new(Config::DEFAULT_PATH).exists() {
        println!(
            "{} does not exist: `tollgate run` would use the embedded default \
             (`tollgate config default` prints it)",
            Config::DEFAULT_PATH
        );
        return Ok(());
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
            for line in tollgate::sizes::summary(&c.limits) {
                println!("{line}");
            }
            Ok(())
        }
        // The error names file, line and field itself: printed as it is.
        Err(e) => Err(Failure::bare(exit::CONFIG, e)),
    }
}
