//! `tollgate man`.

use std::process::ExitCode;

/// Print the man page (roff).
#[derive(clap::Args)]
pub struct ManArgs {}

/// `cli` is the whole command line's definition (`Cli::command()` in main.rs).
pub fn run(_: ManArgs, cli: clap::Command) -> ExitCode {
    match clap_mangen::Man::new(cli).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        }
    }
}
