//! The tollgate agent as a library: the embedded XDP object and the userspace API that loads,
//! attaches and reads it. The `tollgate` binary (daemon and CLI) and the integration tests in
//! `tests/` are its users.
//!
//! The daemon's house: `node` is the node's state in one struct; `ops` is what can be done to
//! it (bindings, quarantine, quotas, tokens, the read verbs), each with a typed reply from
//! `control::reply`; `servers` are the adapters that bring requests to `ops` (the control
//! socket, `/metrics`, the HTTPS bind listener); `daemon` starts the node, reloads it and
//! runs the loop. `identity` is where a name becomes what the kernel needs, `net` where an
//! address or prefix is parsed and masked. `controller` holds the signals (GPU pressure,
//! quotas, anomalies) and their sections of the configuration; `control_loop` runs them over
//! the node every interval. No module imports one that imports it back.

pub mod audit;
pub mod caps;
pub mod clock;
pub mod config;
pub mod control;
pub mod control_loop;
pub mod controller;
pub mod counter_read;
pub mod daemon;
pub mod drop_events;
pub mod explain;
pub mod fleet;
pub mod flow_programs;
pub mod heap;
pub mod identity;
pub mod issuers;
pub mod kernel_clock;
pub mod link_info;
pub mod loader;
pub mod metrics;
pub mod net;
pub mod node;
pub mod object;
pub mod ops;
pub mod paths;
pub mod pins;
pub mod policy_apply;
pub mod reconcile;
pub mod servers;
pub mod sizes;
pub mod state;
pub mod tables;
#[cfg(test)]
pub(crate) mod test_dir;
pub mod token_bind;
pub mod tunnels;
pub mod usage;
