//! `cargo xtask deb`: the Debian package (cargo-deb), and the check the test suite runs on
//! it: it installs, `tollgate --version` and `tollgate config check` work from it, and
//! purging it leaves nothing behind.

use std::{collections::BTreeSet, path::PathBuf};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Builds the release binary, the generated assets (completions, man page) and the package;
/// returns the .deb's path.
pub fn build() -> anyhow::Result<PathBuf> {
    build_assets()?;
    cmd::run(cmd::command("cargo").args([
        "deb",
        "--package",
        "tollgate",
        "--no-build",
        "--no-strip",
    ]))?;
    let root = cmd::workspace_root();
    let dir = root.join("target/debian");
    let deb = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .context("cargo deb produced no .deb")?;
    eprintln!("[deb] {}", deb.display());
    Ok(deb)
}

/// The release binary and what is generated from it: completions and the man page.
pub fn build_assets() -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    cmd::run(cmd::command("cargo").args(["build", "--release", "--package", "tollgate"]))?;
    let bin = root.join("target/release/tollgate");
    // Next to the binary: cargo-deb maps `target/release/...` to the real target directory.
    let assets = root.join("target/release");
    std::fs::create_dir_all(&assets).with_context(|| format!("creating {}", assets.display()))?;
    for (args, file) in [
        (["completions", "bash"], "tollgate.bash"),
        (["man", ""], "tollgate.1"),
    ] {
        let out = cmd::command(&bin)
            .args(args.iter().filter(|a| !a.is_empty()))
            .output()
            .context("running the release binary")?;
        if !out.status.success() {
            bail!("tollgate {args:?} failed");
        }
        std::fs::write(assets.join(file), out.stdout).context("writing an asset")?;
    }
    Ok(())
}

/// Everything under the paths a package may touch, to compare before and after.
pub fn snapshot() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in [
        "/usr/bin",
        "/lib/systemd/system",
        "/usr/lib/sysusers.d",
        "/etc",
        "/usr/share/doc",
        "/usr/share/man/man1",
        "/usr/share/bash-completion/completions",
        "/var/lib",
        "/sys/fs/bpf",
    ] {
        let walk =
            cmd::output(cmd::command("find").args([dir, "-maxdepth", "2"])).unwrap_or_default();
        out.extend(
            walk.lines()
                .filter(|l| l.contains("tollgate"))
                .map(str::to_owned),
        );
    }
    for db in ["/etc/passwd", "/etc/group"] {
        if let Ok(text) = std::fs::read_to_string(db) {
            out.extend(
                text.lines()
                    .filter(|l| l.starts_with("tollgate:"))
                    .map(|l| format!("{db}: {l}")),
            );
        }
    }
    out
}

/// Installs, exercises and purges the package; fails with what was left behind.
pub fn check(deb: &std::path::Path) -> anyhow::Result<()> {
    if cmd::output(cmd::command("dpkg-query").args(["-W", "tollgate"])).is_some() {
        bail!("a tollgate package is already installed here; the check would remove it");
    }
    let before = snapshot();
    cmd::run(cmd::command("dpkg").arg("-i").arg(deb))?;
    let result = (|| -> anyhow::Result<()> {
        let v = cmd::output(cmd::command("/usr/bin/tollgate").arg("--version"))
            .context("tollgate --version failed")?;
        if !v.starts_with("tollgate ") {
            bail!("unexpected version output {v:?}");
        }
        cmd::run(cmd::command("/usr/bin/tollgate").args([
            "config",
            "check",
            "/etc/tollgate/tollgate.toml",
        ]))?;
        if !std::path::Path::new("/usr/share/man/man1/tollgate.1.gz").exists()
            && !std::path::Path::new("/usr/share/man/man1/tollgate.1").exists()
        {
            bail!("the man page is not installed");
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        if !passwd.lines().any(|l| l.starts_with("tollgate:")) {
            bail!("the postinst created no tollgate user");
        }
        Ok(())
    })();
    cmd::run(cmd::command("dpkg").args(["--purge", "tollgate"]))?;
    result?;
    let after = snapshot();
    let left: Vec<&String> = after.difference(&before).collect();
    if !left.is_empty() {
        bail!("purging the package left behind: {left:?}");
    }
    eprintln!("[deb] installed, checked, purged; nothing left behind");
    Ok(())
}
