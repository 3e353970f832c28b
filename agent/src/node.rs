//! The node's state, in one plain struct: the configuration in force, the pinned maps, the
//! persisted state, the audit log, the token service and the controller. Operations
//! (`ops`) take it by reference; the daemon builds it, reloads it and runs the loop around
//! it; the servers hand it to operations. Nothing here decides anything.

use crate::{
    audit::Audit, config::Config, control_loop::ControlLoop, drop_events::DropEventStats,
    identity::Resolver, pins::Pinned, state::State, token_bind::TokenService,
};

pub struct Node {
    pub config: Config,
    pub pinned: Pinned,
    pub state: State,
    pub audit: Audit,
    /// `None` when token binding is not configured.
    pub tokens: Option<TokenService>,
    /// The pool this node shares changes with; `None` on a node of its own.
    pub fleet: Option<crate::fleet::link::Link>,
    pub control: ControlLoop,
    pub drop_stats: DropEventStats,
    /// Interfaces the program is attached to.
    pub attached: Vec<String>,
    /// Decapsulating devices found in the namespace and what covers them.
    pub tunnels: crate::tunnels::Tunnels,
    pub started_unix_ms: u64,
    /// Set once `uninstall` removed the pins: the daemon stops.
    pub uninstalled: bool,
    /// The usage feed's rate limit, counters and secret (`crate::usage`).
    pub usage: crate::usage::Feed,
}

impl Node {
    /// Identities as the kernel sees them, from this node's configuration and state.
    pub fn identities(&self) -> Resolver<'_> {
        Resolver::new(&self.config, &self.state)
    }

    /// Writes the whole state as a new snapshot and empties the journal (start, clean stop).
    pub fn save_state(&mut self) -> Result<(), crate::state::StateError> {
        self.state.save(&self.config.node.state_dir)
    }

    /// The snapshot of a clean stop, the journal folded in ([`crate::state::State::save_folded`]).
    pub fn save_state_folded(&mut self) -> Result<(), crate::state::StateError> {
        self.state.save_folded(&self.config.node.state_dir)
    }

    /// Makes a change durable: one journal record of `entries`, the values of the keys it
    /// set (`State::*_entry`). On error nothing of it is on disk, and the caller puts the
    /// kernel and the state back: what is reported done is what a restart restores.
    pub fn record(
        &mut self,
        entries: Vec<crate::state::journal::Entry>,
    ) -> Result<(), crate::state::StateError> {
        self.state.record(&self.config.node.state_dir, entries)
    }
}
