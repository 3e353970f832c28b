//! Shared between the XDP program (`tollgate-ebpf`, built for `bpfel-unknown-none`) and the
//! agent. Everything here is `no_std` and free of kernel helpers so that it can be unit-tested
//! on the host: the packet parser, the verdict reasons, the layouts of map values.
#![no_std]

#[cfg(any(test, feature = "user", feature = "token"))]
extern crate std;

pub mod counters;
pub mod decide;
#[cfg(any(test, feature = "user"))]
pub mod decide_cases;
pub mod flow;
pub mod limiter;
pub mod parse;
pub mod policy;
pub mod reason;
#[cfg(feature = "token")]
pub mod token;

#[cfg(any(test, feature = "user"))]
pub mod packet;

#[cfg(test)]
mod coarse_clock_tests;
#[cfg(test)]
mod decide_tests;
#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod parse_tests;

pub use counters::Counter;
pub use reason::{REASON_COUNT, REASON_SLOTS, Reason, Verdict};

/// Names of the maps the XDP program defines. The agent looks maps up by these names and pins
/// them under the same file names, so they are defined once, here.
pub mod map_names {
    /// Per-CPU packet and byte counters indexed by [`crate::Reason`].
    pub const REASON_COUNTERS: &str = "REASON_COUNTERS";
    /// Port table: `policy::port_slot` -> endpoint id.
    pub const PORTS: &str = "PORTS";
    /// Endpoint id -> `policy::Endpoint`.
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// IPv4 /32 -> `policy::Binding`.
    pub const BIND_V4: &str = "BIND_V4";
    /// IPv6 /128 -> `policy::Binding`.
    pub const BIND_V6: &str = "BIND_V6";
    /// IPv4 CIDR (LPM trie) -> `policy::Binding`.
    pub const BIND_CIDR_V4: &str = "BIND_CIDR_V4";
    /// IPv6 CIDR (LPM trie) -> `policy::Binding`.
    pub const BIND_CIDR_V6: &str = "BIND_CIDR_V6";
    /// Identity id -> `policy::Identity`.
    pub const IDENTITIES: &str = "IDENTITIES";
    /// Identity id -> `policy::Bucket` (limiter state).
    pub const BUCKETS: &str = "BUCKETS";
    /// IPv4 /24 -> anonymous TAT (LRU).
    pub const ANON_V4: &str = "ANON_V4";
    /// `policy::AnonKey6` -> anonymous TAT (LRU).
    pub const ANON_V6: &str = "ANON_V6";
    /// Single slot: `policy::Settings`.
    pub const SETTINGS: &str = "SETTINGS";
    /// Identity id -> per-CPU `policy::IdentityCounters`.
    pub const IDENTITY_COUNTERS: &str = "IDENTITY_COUNTERS";
    /// Ring buffer of sampled `policy::DropEvent`s.
    pub const DROP_EVENTS: &str = "DROP_EVENTS";
    /// Per-CPU time of the last drop event (sampling state).
    pub const DROP_EVENT_CLOCK: &str = "DROP_EVENT_CLOCK";
    /// Single slot: the [`crate::LAYOUT_VERSION`] of the build that created the pins.
    pub const LAYOUT: &str = "LAYOUT";
    /// (endpoint, plan) -> Q8 hold-back multiplier set by the controller.
    pub const HOLD_BACK: &str = "HOLD_BACK";

    /// Flow key -> `flow::Flow` (LRU): both directions of bound identities' TCP flows.
    pub const FLOWS: &str = "FLOWS";
    /// Endpoint id -> `flow::FlowPolicy` (tracking on/off, request-size caps).
    pub const FLOW_POLICY: &str = "FLOW_POLICY";
    /// Per-CPU flow-tracking counters (`flow::FLOW_*` slots).
    pub const FLOW_COUNTERS: &str = "FLOW_COUNTERS";
    /// Identity id -> per-CPU `flow::EgressCounters` (what the node sent back to it).
    pub const EGRESS_IDENTITY: &str = "EGRESS_IDENTITY";
    /// Endpoint id -> per-CPU `flow::EgressCounters`.
    pub const EGRESS_ENDPOINT: &str = "EGRESS_ENDPOINT";
    /// `flow::ttfb_index(endpoint, class)` -> per-CPU `flow::TtfbHist`.
    pub const TTFB: &str = "TTFB";
    /// Program array: the flow programs the enforcing ones tail-call (slot 0 Ethernet, 1
    /// layer 3).
    pub const FLOW_PROG: &str = "FLOW_PROG";
    /// Per-CPU hand-over of a bound packet's decision to the flow program.
    pub const FLOW_PENDING: &str = "FLOW_PENDING";

    /// Every map, in the order they are pinned. Maps added by a later build are created and
    /// pinned when an agent adopts pins that lack them (`pins::check_compatible` skips
    /// missing ones).
    pub const ALL: [&str; 25] = [
        LAYOUT,
        SETTINGS,
        HOLD_BACK,
        PORTS,
        ENDPOINTS,
        IDENTITIES,
        BUCKETS,
        BIND_V4,
        BIND_V6,
        BIND_CIDR_V4,
        BIND_CIDR_V6,
        ANON_V4,
        ANON_V6,
        REASON_COUNTERS,
        IDENTITY_COUNTERS,
        DROP_EVENTS,
        DROP_EVENT_CLOCK,
        FLOWS,
        FLOW_POLICY,
        FLOW_COUNTERS,
        EGRESS_IDENTITY,
        EGRESS_ENDPOINT,
        TTFB,
        FLOW_PROG,
        FLOW_PENDING,
    ];
}

/// Version of the meaning of the pinned maps. Bump it whenever a map's key or value changes
/// meaning (even at the same size): a restarted agent refuses pins of another version instead
/// of misreading them. Sizes and map types are checked on top of this. Adding a verdict
/// reason is not a layout change (the counter map reserves [`REASON_SLOTS`]).
///
/// 3: `REASON_COUNTERS` sized for `REASON_SLOTS` reasons instead of exactly `REASON_COUNT`.
pub const LAYOUT_VERSION: u32 = 3;

/// Index of the (reason, endpoint) counter: reason-major, each reason owning
/// `MAX_ENDPOINTS` slots, so existing indices never move when a reason is appended.
#[inline(always)]
pub const fn reason_counter_index(reason: Reason, endpoint: u32) -> u32 {
    reason as u32 * policy::MAX_ENDPOINTS + endpoint
}

/// Slots of the (reason, endpoint) counter map: every reserved reason slot, not only the
/// reasons defined today, so the pinned map keeps its shape when one is added.
pub const REASON_COUNTER_SLOTS: u32 = REASON_SLOTS * policy::MAX_ENDPOINTS;

/// Names of the programs in the object.
pub mod program_names {
    /// The enforcing XDP program.
    pub const XDP: &str = "tollgate";
    /// The enforcing program for layer-3 tunnel devices (packets start at the IP header).
    pub const XDP_L3: &str = "tollgate_l3";
    /// The TC (clsact egress) program: counts what the node sends to bound identities and
    /// closes their requests (time to first byte, request caps' reset).
    pub const EGRESS: &str = "tollgate_egress";
    /// The egress program for layer-3 tunnel devices (packets start at the IP header).
    pub const EGRESS_L3: &str = "tollgate_egress_l3";
    /// The flow programs (`FLOW_PROG` slots 0 and 1) the enforcing programs tail-call with a
    /// bound TCP packet.
    pub const FLOW: &str = "tollgate_flow";
    pub const FLOW_L3: &str = "tollgate_flow_l3";
    /// A TC program that passes everything: the egress benchmark's baseline.
    pub const TC_NOOP: &str = "tollgate_tc_noop";
    /// An XDP program that passes everything: the benchmark's baseline.
    pub const NOOP: &str = "tollgate_noop";
    /// Benchmark components (parser; parser + precise clock read; parser + coarse clock read,
    /// the one a coarse plan's bound packet reads; parser + binding lookup).
    pub const BENCH_COMPONENTS: [&str; 4] = [
        "bench_parse",
        "bench_clock",
        "bench_coarse_clock",
        "bench_lookup",
    ];
    /// Benchmark: steps the frame's IPv6 source over N bound addresses, then tail-calls the
    /// program under test (ebpf/src/bench.rs).
    pub const BENCH_ROTATE: &str = "bench_rotate";
    /// Benchmark: drops everything (the live-frames bench's floor).
    pub const BENCH_DROP: &str = "bench_drop";
    /// The rotator's program array and its (N, stride) array.
    pub const BENCH_NEXT: &str = "BENCH_NEXT";
    pub const BENCH_SPREAD: &str = "BENCH_SPREAD";
}
