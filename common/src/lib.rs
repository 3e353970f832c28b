//! Shared between the XDP program (`tollgate-ebpf`, built for `bpfel-unknown-none`) and the
//! agent. Everything here is `no_std` and free of kernel helpers so that it can be unit-tested
//! on the host: the packet parser, the verdict reasons, the layouts of map values.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate std;

pub mod counters;
pub mod parse;
pub mod reason;

#[cfg(any(test, feature = "user"))]
pub mod packet;

#[cfg(test)]
mod parse_tests;

pub use counters::Counter;
pub use reason::{REASON_COUNT, Reason, Verdict};

/// Names of the maps the XDP program defines. The agent looks maps up by these names and pins
/// them under the same file names, so they are defined once, here.
pub mod map_names {
    /// Per-CPU packet and byte counters indexed by [`crate::Reason`].
    pub const REASON_COUNTERS: &str = "REASON_COUNTERS";
}

/// Names of the programs in the object.
pub mod program_names {
    /// The enforcing XDP program.
    pub const XDP: &str = "tollgate";
    /// An XDP program that passes everything: the benchmark's baseline.
    pub const NOOP: &str = "tollgate_noop";
}
