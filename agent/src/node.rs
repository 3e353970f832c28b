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
    pub control: ControlLoop,
    pub drop_stats: DropEventStats,
    /// Interfaces the program is attached to.
    pub attached: Vec<String>,
    /// Decapsulating devices found in the namespace and what covers them.
    pub tunnels: crate::tunnels::Tunnels,
    pub started_unix_ms: u64,
    /// Set once `uninstall` removed the pins: the daemon stops.
    pub uninstalled: bool,
}

impl Node {
    /// Identities as the kernel sees them, from this node's configuration and state.
    pub fn identities(&self) -> Resolver<'_> {
        Resolver::new(&self.config, &self.state)
    }

    /// Writes the persisted state.
    pub fn save_state(&self) -> Result<(), crate::state::StateError> {
        self.state.save(&self.config.node.state_dir)
    }
}
