//! `cargo xtask test`: the whole suite, in the order that fails fastest.

use std::path::Path;

use anyhow::Context as _;

use crate::{
    cmd::{self, EBPF_TOOLCHAIN},
    preflight, setup,
};

pub fn run(cargo_test_args: &[String]) -> anyhow::Result<()> {
    preflight::check()?;
    if !setup::is_complete() {
        eprintln!("[test] the toolchain or packages are incomplete: running setup first");
        setup::run()?;
    }
    let root = cmd::workspace_root();

    eprintln!("[test] formatting");
    cmd::run(cmd::command("cargo").args(["fmt", "--all", "--", "--check"]))?;

    eprintln!("[test] clippy (host crates)");
    cmd::run(cmd::command("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "tollgate-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    eprintln!("[test] clippy (eBPF crate, bpfel-unknown-none)");
    // Its own target directory: a different toolchain and target would otherwise churn the
    // host build's cache.
    cmd::run(
        cmd::command("cargo")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .args([
                "clippy",
                "--package",
                "tollgate-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
            ])
            .arg(root.join("target/ebpf-clippy"))
            .args(["--", "-D", "warnings"]),
    )?;

    eprintln!("[test] building the agent binary");
    cmd::run(cmd::command("cargo").args(["build", "--package", "tollgate"]))?;

    eprintln!("[test] unit, fixture and namespace tests");
    cmd::run(
        cmd::command("cargo")
            .args(["test", "--workspace", "--exclude", "tollgate-ebpf"])
            .args(cargo_test_args)
            .env("TOLLGATE_BIN", root.join("target/debug/tollgate")),
    )?;

    fuzz_smoke(&root)?;
    eprintln!("[test] the Debian package: install, --version, config check, purge");
    let deb = crate::deb::build()?;
    crate::deb::check(&deb)?;
    eprintln!("[test] cargo xtask install / uninstall: nothing left behind");
    crate::install::check()?;
    eprintln!("[test] all passed");
    Ok(())
}

/// The fuzz targets of `common/fuzz`, each run by the smoke run.
const FUZZ_TARGETS: [&str; 5] = [
    "token_verify",
    "packet_parse",
    "config_parse",
    "control_request",
    "http_head",
];

/// How long the smoke run fuzzes each target, after the build (5 × 5 s: the step stays under a
/// minute once built).
const FUZZ_SECONDS: u32 = 5;

/// A short libFuzzer run of every target in `common/fuzz` (the token verifier, the packet
/// parser, the config loader, the control-socket request decoder, the HTTP request reader):
/// any panic, or any broken invariant a target asserts, fails the suite and leaves the input
/// under `common/fuzz/artifacts/<target>/`. No sanitizer and 16 codegen units keep the cold
/// build short on two cores (the code under test is safe Rust; `ring`'s C is not instrumented
/// either way). The agent's targets build its eBPF object too (its build.rs; `AYA_BUILD_SKIP`
/// cannot help: the object is embedded with `include_bytes!`).
/// `cargo +nightly-2026-05-20 fuzz run <target> --fuzz-dir common/fuzz` is the long run with
/// AddressSanitizer.
fn fuzz_smoke(root: &Path) -> anyhow::Result<()> {
    let fuzz_dir = root.join("common/fuzz");
    for target in FUZZ_TARGETS {
        eprintln!("[test] fuzz smoke run: {target}, {FUZZ_SECONDS} s");
        // New inputs go to the (ignored) corpus; the committed seeds are read only.
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        cmd::run(
            cmd::command("cargo")
                .arg(format!("+{EBPF_TOOLCHAIN}"))
                .args(["fuzz", "run", target, "--fuzz-dir"])
                .arg(&fuzz_dir)
                .args(["--sanitizer", "none", "--codegen-units", "16"])
                .arg(&corpus)
                .arg(fuzz_dir.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={FUZZ_SECONDS}")),
        )?;
    }
    Ok(())
}
