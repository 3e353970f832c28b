//! `cargo xtask demo`: builds the agent and runs the demo lab (tests/demo/): a GPU node,
//! an internal service, a partner, a customer and an attacker in network namespaces, with
//! tollgate enforcing. About 40 s of traffic after the build; cleans up after itself, also on
//! Ctrl-C. `--fleet`: three nodes and a Redis store instead (tests/demo/fleet.rs).

use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context as _, bail};

use crate::{cmd, preflight, setup};

/// The demo's pid while it runs (0 otherwise), for the signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// Passes SIGINT/SIGTERM on to the demo, which stops and tears its lab down; this process
/// waits for it rather than returning to the shell while the lab still exists.
extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; the pid is our unreaped child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Installs `handler` for `sig`; returns the previous disposition.
fn set_handler(sig: libc::c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: signal() with a previous disposition or `forward`, which only does
    // async-signal-safe work.
    unsafe { libc::signal(sig, handler) }
}

pub fn run(fleet: bool) -> anyhow::Result<()> {
    preflight::check()?;
    if !setup::is_complete() {
        eprintln!("[demo] the toolchain or packages are incomplete: running setup first");
        setup::run()?;
    }
    let root = cmd::workspace_root();
    eprintln!("[demo] building the agent and the demo (release)");
    cmd::run(cmd::command("cargo").args(["build", "--release", "--package", "tollgate"]))?;
    cmd::run(cmd::command("cargo").args([
        "build",
        "--release",
        "--package",
        "tollgate-tests",
        "--bin",
        "demo",
    ]))?;
    let mut c = cmd::command("cargo");
    c.args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "tollgate-tests",
        "--bin",
        "demo",
    ])
    .env("TOLLGATE_BIN", root.join("target/release/tollgate"));
    if fleet {
        c.args(["--", "--fleet"]);
    }
    // Installed before the demo starts, so that no signal can end this process first.
    let handler = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
    let previous = [libc::SIGINT, libc::SIGTERM].map(|sig| (sig, set_handler(sig, handler)));
    let status = c
        .spawn()
        .context("starting the demo")
        .and_then(|mut child| {
            CHILD.store(child.id() as i32, Ordering::SeqCst);
            child.wait().context("waiting for the demo")
        });
    CHILD.store(0, Ordering::SeqCst);
    for (sig, old) in previous {
        set_handler(sig, old);
    }
    let status = status?;
    match status.code() {
        Some(0) => Ok(()),
        Some(130) => bail!("interrupted (the lab was torn down)"),
        _ => bail!("the demo failed ({status})"),
    }
}
