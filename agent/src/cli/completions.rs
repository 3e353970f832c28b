//! `tollgate completions SHELL`.

use super::Outcome;

/// Print a shell completion script.
#[derive(clap::Args)]
pub struct CompletionsArgs {
    shell: clap_complete::Shell,
}

/// `cli` is the whole command line's definition (`Cli::command()` in main.rs).
pub fn run(a: CompletionsArgs, mut cli: clap::Command) -> Outcome {
    clap_complete::generate(a.shell, &mut cli, "tollgate", &mut std::io::stdout());
    Ok(())
}
