//! `cargo xtask test`: the whole suite, in the order that fails fastest.

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
    eprintln!("[test] all passed");
    Ok(())
}
