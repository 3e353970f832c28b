//! The tollgate agent as a library: the embedded XDP object and the userspace API that loads,
//! attaches and reads it. The `tollgate` binary (daemon and CLI) and the integration tests in
//! `tests/` are its users.

pub mod audit;
pub mod bind_listener;
pub mod caps;
pub mod config;
pub mod control;
pub mod controller;
pub mod counters;
pub mod daemon;
pub mod explain;
pub mod loader;
pub mod metrics;
pub mod object;
pub mod paths;
pub mod pins;
pub mod policy;
pub mod state;
pub mod tables;
pub mod token_bind;
