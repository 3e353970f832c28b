//! Helpers for tollgate's integration tests: running fixture tables through
//! BPF_PROG_TEST_RUN, and building network-namespace labs that clean up after themselves.

pub mod fixture;
pub mod netns;
pub mod tokenlab;

/// Whether this process may load BPF programs; tests need root (CAP_BPF + CAP_NET_ADMIN).
/// `cargo xtask test` checks this before running anything, with a clear message.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load XDP programs and build network namespaces: run them as root \
         (`sudo cargo xtask test`)"
    );
}
