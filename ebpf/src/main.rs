//! tollgate's XDP program. The decisions live in `tollgate-common` (tested on the host); this
//! file binds them to the kernel: packet access, maps, counters.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The limiter's compare-and-swap: core::sync::atomic offers no compare_exchange on
// bpfel-unknown-none, the intrinsic lowers to BPF_CMPXCHG (shared/TOOLCHAIN.md).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core_intrinsics for atomic_cxchg")
)]

#[cfg(target_arch = "bpf")]
mod program;

// Benchmark-only programs (`cargo xtask bench`), never loaded by the agent.
#[cfg(target_arch = "bpf")]
mod bench;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only by `cargo check --workspace`-style commands; the real program is
    // the bpfel-unknown-none build of `program`.
    eprintln!("tollgate-ebpf is an eBPF object, built by the agent's build.rs");
}
