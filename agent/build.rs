//! Builds the XDP program for bpfel-unknown-none with the pinned nightly and leaves the object
//! in OUT_DIR, where `src/object.rs` embeds it. `cargo xtask setup` installs what this needs.
//! `AYA_BUILD_SKIP=1` skips the build (aya-build's switch) for check-only runs.
use anyhow::{Context as _, anyhow};

/// The dated nightly the program is built with (shared/TOOLCHAIN.md; installed by
/// `cargo xtask setup`, which names the same toolchain).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("the agent crate has no parent directory"))?
        .join("ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tollgate-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the XDP program (run `cargo xtask setup` if the toolchain is missing)")
}
