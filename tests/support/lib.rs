//! The kit tollgate's integration tests are built from (tests/README.md says which test file
//! uses what):
//!
//! - [`lab`]: network namespaces and veth labs that clean up after themselves;
//! - [`agent`]: the real agent as a process, its directories, CLI and pinned counters;
//! - [`frames`]: raw frames into a lab, in a batch or at a steady rate;
//! - [`config`]: a typed builder that renders the agent's TOML configuration;
//! - [`fixture`]: fixture tables run through BPF_PROG_TEST_RUN;
//! - [`fleet`]: N nodes with their agents, one real `redis-server`, clients that reach every
//!   node with one address (#14);
//! - [`tokenlab`]: keys, certificates, tokens and HTTPS binds for token tests;
//! - [`node`]: the agent tests' world: a lab and a policy of six identities;
//! - [`model`]: a plain reference model of the verdicts, for the differential test;
//! - [`model_server`]: a model-server stand-in whose vLLM metrics follow its real in-flight
//!   requests (a hanging, garbage or absent `/metrics` on demand) and closed-loop clients (#17);
//! - [`pty`]: a pseudo-terminal for `tollgate top`, and taking it away;
//! - [`exhaust`]: many connections from many sources, HTTPS binds in-process, kernel flags;
//! - [`flood`]: floods that rewrite each frame's source, and a server-side tap counting what passed;
//! - [`scrape`]: `GET /metrics` from inside a namespace;
//! - [`stream`]: a streaming model-server stand-in (HTTP/1.1, server-sent events, an injected
//!   time to first byte) and a client that counts what its socket read (#16);
//! - [`bench`]: what the benchmark binaries share (figures for BENCHMARKS.md, batch fills);
//! - [`oidc`]: a real OpenID Provider (npm `oidc-provider`) in its own namespace, a test CA,
//!   and the independent token minter.

pub mod agent;
pub mod bench;
pub mod config;
pub mod exhaust;
pub mod fixture;
pub mod fleet;
pub mod flood;
pub mod frames;
pub mod lab;
pub mod model;
pub mod model_server;
pub mod node;
pub mod oidc;
pub mod pty;
pub mod scrape;
pub mod stream;
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
