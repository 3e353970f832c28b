//! The node's servers, thin adapters over `ops`: the control socket, `/metrics`, the
//! HTTPS bind listener and the usage feed's HTTP listener. The two HTTP servers read their requests with the one bounded
//! reader in `http`; `limit` caps what each listener holds open and backs off failed
//! accepts.

pub mod bind;
pub mod control;
pub mod http;
pub mod limit;
pub mod metrics;
pub mod usage;
