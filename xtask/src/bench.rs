//! `cargo xtask bench`: runs the benchmark binaries in release mode and keeps their tables.

use anyhow::Context as _;

use crate::{cmd, preflight, setup};

pub fn run() -> anyhow::Result<()> {
    preflight::check()?;
    if !setup::is_complete() {
        eprintln!("[bench] the toolchain or packages are incomplete: running setup first");
        setup::run()?;
    }
    let root = cmd::workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // The quarantine benchmark drives the real binary, built here in the same profile.
    cmd::run(cmd::command("cargo").args(["build", "--release", "--package", "tollgate"]))?;
    for (package, features, bench, what) in [
        (
            "tollgate-tests",
            None,
            "bench_xdp",
            "XDP paths through BPF_PROG_TEST_RUN",
        ),
        (
            "tollgate-tests",
            None,
            "bench_quarantine",
            "quarantine to first dropped packet, real agent and traffic",
        ),
        (
            "tollgate-tests",
            None,
            "bench_bind",
            "HTTPS bind request to first admitted packet, real agent and traffic",
        ),
        (
            "tollgate-tests",
            None,
            "bench_fleet",
            "fleet of four nodes and a store: bind on one node to admitted on the others, revoke to dropped everywhere",
        ),
        (
            "tollgate-tests",
            None,
            "bench_scrape",
            "one /metrics scrape with 10 000 identities",
        ),
        (
            "tollgate-common",
            Some("token"),
            "token_verify",
            "token verifications per second on one core: RS256 (2048, 4096), PS256, ES256, ES384, EdDSA, beside ring alone",
        ),
    ] {
        eprintln!("[bench] {what}");
        let mut c = cmd::command("cargo");
        c.args(["bench", "--package", package, "--bench", bench]);
        if let Some(f) = features {
            c.args(["--features", f]);
        }
        let out = c
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running cargo bench")?;
        if !out.status.success() {
            anyhow::bail!("{bench} failed ({})", out.status);
        }
        let table = String::from_utf8_lossy(&out.stdout);
        let path = out_dir.join(format!("{bench}.md"));
        std::fs::write(&path, table.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{table}");
        eprintln!("[bench] written to {}", path.display());
    }
    Ok(())
}
