//! tollgate's project commands. `cargo xtask setup` installs what the build needs;
//! `cargo xtask test` runs the whole suite; both are what CI runs (`.ci/run`).

mod bench;
mod cmd;
mod deb;
mod demo;
mod install;
mod preflight;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "tollgate's project commands", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the pinned nightly (with rust-src and clippy), bpf-linker built against that
    /// nightly's LLVM, and the Debian packages the tests need. Idempotent: a second run
    /// changes nothing and says so.
    Setup,
    /// Run the whole suite: fmt check, clippy -D warnings (the eBPF crate included), host unit
    /// tests, BPF_PROG_TEST_RUN fixtures and network-namespace tests. Needs root.
    Test {
        /// Extra arguments for `cargo test` (a test name filter, `--nocapture`, ...).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run every benchmark (per-packet cost through BPF_PROG_TEST_RUN, live-frames floods
    /// against nftables and iptables, end to end, control plane at scale, quarantine, binds,
    /// token verification, scrape, fleet), each against a baseline in the same run, and
    /// rewrite BENCHMARKS.md (targets met or missed) and its charts in docs/bench/. Under 15
    /// minutes once built. Needs root.
    Bench {
        /// A regression check under 2 minutes once built: per-packet at 1 and 10 000
        /// identities and a short live-frames round; writes target/bench/BENCHMARKS.md and
        /// leaves BENCHMARKS.md alone.
        #[arg(long)]
        quick: bool,
    },
    /// Install the binary, the unit (to /etc/systemd/system), the sysusers file, the default
    /// config (if none), completions and the man page on this machine. Needs root.
    Install,
    /// Remove what `install` put here, detach the program and remove every pin.
    Uninstall,
    /// Build the agent and run the demo: a GPU node (a streaming model-server stand-in and
    /// tollgate on the simulated GPU source), an internal service, a partner, a customer and
    /// an attacker in network namespaces. The clients bind with real tokens; midway the GPU
    /// saturates and the attacker floods. Narrates live, ends with a table per identity.
    /// About 40 s after the build; cleans up, also on Ctrl-C. Needs root.
    Demo {
        /// The fleet instead: three nodes and a Redis store; a bind on one node served by
        /// all, a revocation on another cutting it everywhere, the store killed (enforcement
        /// carries on) and back empty (the nodes catch up and re-seed it). About 30 s.
        #[arg(long)]
        fleet: bool,
    },
    /// Build the Debian package (target/debian/tollgate_*.deb) with cargo-deb.
    Deb {
        /// Then install it here, run `tollgate --version` and `config check` from it, purge it
        /// and fail if anything is left behind (needs root; part of `cargo xtask test`).
        #[arg(long)]
        check: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run().map(|_| ()),
        Command::Test { cargo_test_args } => test::run(&cargo_test_args),
        Command::Bench { quick } => bench::run(quick),
        Command::Demo { fleet } => demo::run(fleet),
        Command::Install => install::install(),
        Command::Uninstall => install::uninstall(),
        Command::Deb { check } => deb::build().and_then(|p| {
            println!("{}", p.display());
            if check { deb::check(&p) } else { Ok(()) }
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
