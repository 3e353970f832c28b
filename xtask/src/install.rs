//! `cargo xtask install` / `cargo xtask uninstall`: the service on this machine without a
//! package (the .deb does the same through dpkg). Uninstall leaves no pins, links or files.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::cmd;

/// (source relative to target/release or the workspace, destination, mode).
const FILES: [(&str, &str, u32); 6] = [
    ("target/release/tollgate", "/usr/local/bin/tollgate", 0o755),
    (
        "systemd/tollgate.service",
        "/etc/systemd/system/tollgate.service",
        0o644,
    ),
    (
        "systemd/tollgate.sysusers",
        "/etc/sysusers.d/tollgate.conf",
        0o644,
    ),
    (
        "target/release/tollgate.bash",
        "/etc/bash_completion.d/tollgate",
        0o644,
    ),
    (
        "target/release/tollgate.1",
        "/usr/local/share/man/man1/tollgate.1",
        0o644,
    ),
    (
        "README.md",
        "/usr/local/share/doc/tollgate/README.md",
        0o644,
    ),
];
const CONFIG: &str = "/etc/tollgate/tollgate.toml";

fn copy(src: &Path, dst: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dst = Path::new(dst);
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(src, dst).with_context(|| format!("{} -> {}", src.display(), dst.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))?;
    eprintln!("[install] {}", dst.display());
    Ok(())
}

pub fn install() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("installing into /usr/local and /etc needs root: sudo cargo xtask install");
    }
    // The binary and the generated assets (completions, man page) in release form.
    crate::deb::build_assets()?;
    let root = cmd::workspace_root();
    // The unit names /usr/bin/tollgate; a by-hand install lives in /usr/local/bin.
    for (src, dst, mode) in FILES {
        copy(&root.join(src), dst, mode)?;
    }
    let unit = "/etc/systemd/system/tollgate.service";
    let text =
        std::fs::read_to_string(unit)?.replace("/usr/bin/tollgate", "/usr/local/bin/tollgate");
    std::fs::write(unit, text)?;
    if !Path::new(CONFIG).exists() {
        copy(&root.join("agent/config/tollgate.toml"), CONFIG, 0o640)?;
        eprintln!("[install] edit {CONFIG} (interfaces, plans, endpoints) before starting");
    }
    if cmd::output(cmd::command("systemd-sysusers").arg("/etc/sysusers.d/tollgate.conf")).is_none()
    {
        let _ = cmd::output(cmd::command("adduser").args([
            "--system",
            "--group",
            "--home",
            "/var/lib/tollgate",
            "--no-create-home",
            "tollgate",
        ]));
    }
    if Path::new("/run/systemd/system").exists() {
        let _ = cmd::output(cmd::command("systemctl").arg("daemon-reload"));
    }
    eprintln!("[install] done: systemctl enable --now tollgate");
    Ok(())
}

pub fn uninstall() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("uninstalling needs root: sudo cargo xtask uninstall");
    }
    if Path::new("/run/systemd/system").exists() {
        let _ = cmd::output(cmd::command("systemctl").args(["disable", "--now", "tollgate"]));
    }
    // Detach and remove every pin before the binary goes.
    if Path::new("/usr/local/bin/tollgate").exists() {
        let _ = cmd::output(cmd::command("/usr/local/bin/tollgate").arg("uninstall"));
    }
    for (_, dst, _) in FILES {
        let _ = std::fs::remove_file(dst);
    }
    for dir in [
        "/usr/local/share/doc/tollgate",
        "/etc/tollgate",
        "/var/lib/tollgate",
        "/run/tollgate",
        "/sys/fs/bpf/tollgate",
    ] {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = cmd::output(cmd::command("userdel").arg("tollgate"));
    let _ = cmd::output(cmd::command("groupdel").arg("tollgate"));
    if Path::new("/run/systemd/system").exists() {
        let _ = cmd::output(cmd::command("systemctl").arg("daemon-reload"));
    }
    eprintln!("[uninstall] done");
    Ok(())
}

/// Install, run the installed binary, uninstall, and fail if anything is left behind.
pub fn check() -> anyhow::Result<()> {
    if Path::new("/usr/local/bin/tollgate").exists() || Path::new(CONFIG).exists() {
        bail!("tollgate is already installed here; the check would remove it");
    }
    let before = crate::deb::snapshot();
    install()?;
    let ran =
        cmd::output(cmd::command("/usr/local/bin/tollgate").args(["config", "check", CONFIG]));
    uninstall()?;
    if ran.is_none() {
        bail!("the installed tollgate could not check the installed config");
    }
    let after = crate::deb::snapshot();
    let left: Vec<&String> = after.difference(&before).collect();
    if !left.is_empty() {
        bail!("uninstall left behind: {left:?}");
    }
    eprintln!("[install] installed, checked, uninstalled; nothing left behind");
    Ok(())
}
