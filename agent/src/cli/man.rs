//! `tollgate man`.

use super::{Failure, Outcome, exit};

/// Print the man page (roff).
#[derive(clap::Args)]
pub struct ManArgs {}

/// `cli` is the whole command line's definition (`Cli::command()` in main.rs).
pub fn run(_: ManArgs, cli: clap::Command) -> Outcome {
    clap_mangen::Man::new(cli)
        .render(&mut std::io::stdout())
        .map_err(|e| Failure::new(exit::FAILURE, e))
}
