//! `cargo xtask setup`: everything the build and the tests need on a fresh Debian machine.
//! Each step checks first and only acts when something is missing, so a second run changes
//! nothing and says so.

use anyhow::{Context as _, bail};

use crate::cmd::{self, BPF_LINKER_VERSION, EBPF_RUSTC_VERSION, EBPF_TOOLCHAIN};

/// Debian packages the tests use: `ip` and network namespaces (iproute2), `nsenter`
/// (util-linux), `ping` for reachability checks (iputils-ping), a C++ compiler for the
/// libFuzzer runtime that the token fuzz target links (g++), curl, and Prometheus with
/// promtool, Redis for the fleet store, and nftables, iptables and hping3 for the
/// benchmark's comparisons with the kernel's own filters.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "libfaketime",
    "util-linux",
    "iputils-ping",
    "g++",
    // curl binds with tokens over HTTPS from a client namespace (tests/tokens.rs).
    "curl",
    // A real Prometheus server and promtool for the metrics tests.
    "prometheus",
    // systemd-analyze verifies the service unit (tests/systemd.rs).
    "systemd",
    // The fleet store's tests run a real Redis (agent/src/fleet, issue 14): redis-server,
    // redis-cli to write entries by hand, and redis-sentinel for the failover lab. Their
    // packaged services stay stopped (the policy-rc.d below); tests start their own.
    "redis-server",
    "redis-tools",
    "redis-sentinel",
    // The live-frames benchmark's comparisons and the end-to-end flood (tests/bench_live.rs,
    // issue 15): nft for the nftables allow-list, iptables (Debian's default nft backend,
    // never iptables-legacy, whose hooks outlive the rules) for the hashlimit rule, and
    // hping3 for the random-source flood from an attacker namespace.
    "nftables",
    "iptables",
    "hping3",
];

/// cargo-fuzz, for the token verifier's fuzz smoke run (`common/fuzz`). Installed with the
/// machine's stable toolchain; the fuzz build itself uses the eBPF nightly.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-deb, for the Debian package (`cargo xtask deb`), built with the stable toolchain.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Components of the eBPF toolchain: the core sources for `-Z build-std=core`, and clippy for
/// linting the eBPF crate.
const COMPONENTS: &[&str] = &["rust-src", "clippy"];

/// What a step found.
#[derive(PartialEq, Eq)]
enum Step {
    Present,
    Installed,
}

/// Runs every step; returns whether anything was installed.
pub fn run() -> anyhow::Result<bool> {
    let steps = [
        (
            "Debian packages",
            debian_packages as fn() -> anyhow::Result<Step>,
        ),
        ("eBPF toolchain", ebpf_toolchain),
        ("bpf-linker", bpf_linker),
        ("cargo-fuzz", cargo_fuzz),
        ("cargo-deb", cargo_deb),
        ("Node.js", nodejs),
        ("OpenID Provider lab (npm ci in tests/oidc)", oidc_lab),
    ];
    let mut changed = false;
    for (name, step) in steps {
        eprintln!("[setup] {name}: checking");
        let outcome = step().with_context(|| format!("setup step `{name}`"))?;
        match outcome {
            Step::Present => eprintln!("[setup] {name}: already present"),
            Step::Installed => {
                eprintln!("[setup] {name}: installed");
                changed = true;
            }
        }
    }
    if changed {
        eprintln!("[setup] done");
    } else {
        eprintln!("[setup] nothing to do: everything was already installed");
    }
    Ok(changed)
}

/// Whether every step would find its part present (used by `xtask test` to decide whether to
/// run setup first).
pub fn is_complete() -> bool {
    missing_debian_packages().is_empty()
        && toolchain_ok()
        && missing_components().is_empty()
        && bpf_linker_ok()
        && cargo_fuzz_ok()
        && cargo_deb_ok()
        && node_ok()
        && oidc_lab_ok()
}

fn missing_debian_packages() -> Vec<&'static str> {
    DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let status =
                cmd::output(cmd::command("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", p]));
            !status.is_some_and(|s| s.starts_with("ii"))
        })
        .collect()
}

fn debian_packages() -> anyhow::Result<Step> {
    let missing = missing_debian_packages();
    if missing.is_empty() {
        return Ok(Step::Present);
    }
    if !cmd::is_root() {
        bail!(
            "Debian packages missing: {}. Installing them needs root: run `sudo cargo xtask \
             setup`, or `sudo apt-get install {}` yourself",
            missing.join(" "),
            missing.join(" ")
        );
    }
    cmd::run(cmd::command("apt-get").args(["update", "-q"]))?;
    // Packages like prometheus start a service from their postinst; the tests run their own
    // instances, so a policy-rc.d keeps the packaged ones from starting (only if the machine
    // has none of its own, and removed again afterwards).
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let own_policy =
        !policy.exists() && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok() && {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755)).is_ok()
        };
    let installed = cmd::run(
        cmd::command("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    installed?;
    Ok(Step::Installed)
}

fn toolchain_ok() -> bool {
    let arg = format!("+{EBPF_TOOLCHAIN}");
    cmd::output(cmd::command("rustc").args([arg.as_str(), "--version"]))
        .is_some_and(|v| v.trim() == EBPF_RUSTC_VERSION)
}

fn missing_components() -> Vec<&'static str> {
    let installed = cmd::output(cmd::command("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
    .unwrap_or_default();
    COMPONENTS
        .iter()
        .copied()
        .filter(|c| {
            !installed
                .lines()
                .any(|l| l.starts_with(&format!("{c}-")) || l == *c)
        })
        .collect()
}

fn ebpf_toolchain() -> anyhow::Result<Step> {
    let mut step = Step::Present;
    if !toolchain_ok() {
        let mut install = cmd::command("rustup");
        install.args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
        ]);
        for c in COMPONENTS {
            install.args(["-c", c]);
        }
        if let Err(e) = cmd::run(&mut install) {
            // The machine image may ship the very same build as `nightly`; reuse it under the
            // dated name instead of downloading (shared/TOOLCHAIN.md).
            eprintln!(
                "[setup] installing {EBPF_TOOLCHAIN} failed ({e:#}); trying the local `nightly`"
            );
            link_local_nightly().context("no dated nightly and no matching local `nightly`")?;
        }
        if !toolchain_ok() {
            bail!(
                "{EBPF_TOOLCHAIN} installed, but `rustc +{EBPF_TOOLCHAIN} --version` does not print `{EBPF_RUSTC_VERSION}`"
            );
        }
        step = Step::Installed;
    }
    let missing = missing_components();
    if !missing.is_empty() {
        cmd::run(
            cmd::command("rustup")
                .args(["component", "add", "--toolchain", EBPF_TOOLCHAIN])
                .args(&missing),
        )?;
        step = Step::Installed;
    }
    Ok(step)
}

/// Adds the components to a local `nightly` that is the pinned build, and links it under the
/// dated name.
fn link_local_nightly() -> anyhow::Result<()> {
    let version = cmd::output(cmd::command("rustc").args(["+nightly", "--version"]))
        .context("no local `nightly` toolchain")?;
    if version.trim() != EBPF_RUSTC_VERSION {
        bail!(
            "local `nightly` is `{}`, not `{EBPF_RUSTC_VERSION}`",
            version.trim()
        );
    }
    cmd::run(
        cmd::command("rustup")
            .args(["component", "add", "--toolchain", "nightly"])
            .args(COMPONENTS),
    )?;
    let sysroot = cmd::output(cmd::command("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("asking `nightly` for its sysroot")?;
    cmd::run(cmd::command("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, sysroot.trim()]))
}

/// Where the nightly's libLLVM is linked for bpf-linker: the binary finds it through its
/// rpath, so this directory must stay.
fn llvm_prefix() -> std::path::PathBuf {
    cmd::home().join(".local/share/tollgate/llvm22")
}

fn bpf_linker_ok() -> bool {
    let bin = cmd::cargo_home().join("bin/bpf-linker");
    cmd::output(cmd::command(&bin).arg("--version"))
        .is_some_and(|v| v.trim() == format!("bpf-linker {BPF_LINKER_VERSION}"))
}

fn bpf_linker() -> anyhow::Result<Step> {
    if bpf_linker_ok() {
        return Ok(Step::Present);
    }
    // bpf-linker 0.13 defaults to LLVM 23; Debian has no LLVM 22, but the nightly ships its
    // own libLLVM 22, which is the one that must read the nightly's bitcode anyway.
    let sysroot = cmd::output(cmd::command("rustc").args([
        format!("+{EBPF_TOOLCHAIN}"),
        "--print".into(),
        "sysroot".into(),
    ]))
    .context("asking the eBPF toolchain for its sysroot")?;
    let libdir = std::path::Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.22.1-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.22.1-rust-* in {}", libdir.display()))?;
    let prefix = llvm_prefix();
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let name = lib.file_name().context("library has no file name")?;
    for link in [prefix_lib.join(name), prefix_lib.join("libLLVM.so")] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), lib.display()))?;
    }
    cmd::run(
        cmd::command("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker installed but `bpf-linker --version` does not print {BPF_LINKER_VERSION}"
        );
    }
    Ok(Step::Installed)
}

fn cargo_fuzz_ok() -> bool {
    let bin = cmd::cargo_home().join("bin/cargo-fuzz");
    cmd::output(cmd::command(&bin).arg("--version"))
        .is_some_and(|v| v.trim() == format!("cargo-fuzz {CARGO_FUZZ_VERSION}"))
}

fn cargo_fuzz() -> anyhow::Result<Step> {
    if cargo_fuzz_ok() {
        return Ok(Step::Present);
    }
    cmd::run(cmd::command("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
        "--force",
    ]))?;
    if !cargo_fuzz_ok() {
        bail!(
            "cargo-fuzz installed but `cargo-fuzz --version` does not print {CARGO_FUZZ_VERSION}"
        );
    }
    Ok(Step::Installed)
}

fn cargo_deb_ok() -> bool {
    let bin = cmd::cargo_home().join("bin/cargo-deb");
    cmd::output(cmd::command(&bin).arg("--version"))
        .is_some_and(|v| v.trim().ends_with(CARGO_DEB_VERSION))
}

fn cargo_deb() -> anyhow::Result<Step> {
    if cargo_deb_ok() {
        return Ok(Step::Present);
    }
    cmd::run(cmd::command("cargo").args([
        "install",
        &format!("cargo-deb@{CARGO_DEB_VERSION}"),
        "--locked",
        "--force",
    ]))?;
    if !cargo_deb_ok() {
        bail!("cargo-deb installed but `cargo-deb --version` does not end in {CARGO_DEB_VERSION}");
    }
    Ok(Step::Installed)
}

/// The oldest Node.js the OpenID Provider lab runs on: `jose` 6 and `oidc-provider` 9 need the
/// global WebCrypto of Node.js 20 (oidc-provider prints a warning below 22, and works).
const NODE_MIN: (u32, u32) = (20, 19);

/// The machine's `node` version as (major, minor), if it runs.
fn node_version() -> Option<(u32, u32)> {
    let v = cmd::output(cmd::command("node").arg("--version"))?;
    let mut parts = v.trim().trim_start_matches('v').split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn npm_runs() -> bool {
    cmd::output(cmd::command("npm").arg("--version")).is_some()
}

fn node_ok() -> bool {
    node_version().is_some_and(|v| v >= NODE_MIN) && npm_runs()
}

/// How to get a Node.js new enough on Debian 12, whose own `nodejs` is 18 (bookworm-backports
/// has none): what both refusals below tell the operator, as the README does.
const NODE_HOWTO: &str = "Debian 12's nodejs is 18 and bookworm-backports has none: install \
     NodeSource's Node.js 20 (as root: `curl -fsSL https://deb.nodesource.com/setup_20.x | bash - \
     && apt-get install -y nodejs`), then run `cargo xtask setup` again";

/// Node.js and npm come with the machine; a fresh Debian machine without them gets Debian's.
fn nodejs() -> anyhow::Result<Step> {
    if node_ok() {
        return Ok(Step::Present);
    }
    if node_version().is_none() || !npm_runs() {
        if !cmd::is_root() {
            bail!(
                "Node.js or npm is missing (the OpenID Provider lab, tests/oidc, needs Node.js \
                 {}.{} or later): run `sudo cargo xtask setup`, which installs the distribution's \
                 nodejs and npm; on Debian 12 those are too old: {NODE_HOWTO}",
                NODE_MIN.0,
                NODE_MIN.1
            );
        }
        cmd::run(cmd::command("apt-get").args(["update", "-q"]))?;
        cmd::run(
            cmd::command("apt-get")
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "nodejs",
                    "npm",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    match node_version() {
        Some(v) if v >= NODE_MIN => Ok(Step::Installed),
        Some((major, minor)) => bail!(
            "Node.js {major}.{minor} is too old for the OpenID Provider lab (tests/oidc): it needs \
             {}.{} or later. {NODE_HOWTO}",
            NODE_MIN.0,
            NODE_MIN.1
        ),
        None => bail!("`node --version` does not run after installing nodejs"),
    }
}

/// The lab's dependencies, exactly as `tests/oidc/package-lock.json` pins them.
fn oidc_dir() -> std::path::PathBuf {
    cmd::workspace_root().join("tests/oidc")
}

/// A copy of the lock file that `npm ci` last installed: while it equals the lock file,
/// `node_modules` is what the lock says and there is nothing to do.
fn oidc_stamp() -> std::path::PathBuf {
    oidc_dir().join("node_modules/.tollgate-installed-lock.json")
}

fn oidc_lab_ok() -> bool {
    let lock = std::fs::read(oidc_dir().join("package-lock.json"));
    let stamp = std::fs::read(oidc_stamp());
    matches!((lock, stamp), (Ok(l), Ok(s)) if l == s)
}

fn oidc_lab() -> anyhow::Result<Step> {
    if oidc_lab_ok() {
        return Ok(Step::Present);
    }
    let dir = oidc_dir();
    // `ci` installs exactly the lock (and fails if package.json disagrees with it); no audit
    // or funding calls, which only print.
    cmd::run(
        cmd::command("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir),
    )?;
    std::fs::copy(dir.join("package-lock.json"), oidc_stamp())
        .with_context(|| format!("writing {}", oidc_stamp().display()))?;
    Ok(Step::Installed)
}
