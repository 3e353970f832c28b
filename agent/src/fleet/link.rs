//! What a node holds of its pool ([`Link`], `Node::fleet`): its names, the durable outbox of
//! changes to publish, the store client binds claim tokens on, the store's health as the
//! fleet task last saw it, the members it last listed, and the counters `/metrics` and
//! `tollgate fleet status` show. The fleet task (`fleet::task`) owns the rest (the sync
//! cursor, the applier, its own connections) and borrows the node only between awaits.

use std::{net::IpAddr, rc::Rc, time::Duration};

use tokio::sync::Notify;
use tracing::warn;

use super::{
    entry::Kind,
    outbox::{Outbox, Pending},
    store::{Claim, Store, StoreError},
};
use crate::{clock, node::Node};

/// The store as the fleet task last found it.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub up: bool,
    /// Agent time of the last sync pass that succeeded.
    pub last_sync_ms: Option<u64>,
    /// The last error's label and message (never a credential: `StoreError` carries none).
    pub last_error: Option<String>,
    /// Agent time the current outage began (`None` while up).
    pub down_since_ms: Option<u64>,
}

/// A member as listed in the store, with what its heartbeat said.
#[derive(Clone, Debug)]
pub struct MemberView {
    pub node: String,
    /// The member's own wall clock when it beat (informational: a member's clock may be off).
    pub heartbeat_wall_ms: Option<u64>,
    pub outbox: Option<u64>,
    pub bindings: Option<u64>,
}

/// Counters since the agent started (`/metrics`: `tollgate_fleet_*`).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Entries refused by verification or by the applier, by label.
    pub refused: std::collections::BTreeMap<&'static str, u64>,
    /// Entries of other nodes installed here, by kind and outcome (`installed`, or the
    /// refusal's label: a binding whose token no longer verifies, …).
    pub installs: std::collections::BTreeMap<(&'static str, String), u64>,
    /// Entries this node published, by kind.
    pub published: std::collections::BTreeMap<&'static str, u64>,
    /// Publish attempts that failed (retried).
    pub publish_errors: u64,
    /// Token claims by outcome: `claimed`, `replay`, `fallback` (store unreachable: the
    /// node's own memory decided).
    pub claims: std::collections::BTreeMap<&'static str, u64>,
    /// Snapshot loads by reason, and store re-seeds.
    pub reloads: std::collections::BTreeMap<&'static str, u64>,
    pub reseeded: u64,
    /// Changes that could not be queued (the outbox's disk): applied here, not published.
    pub unshared: u64,
}

pub struct Link {
    pub pool: String,
    pub node: String,
    pub outbox: Outbox,
    /// The client binds claim tokens with: each bind clones it and puts back the clone with
    /// the connection it used, so binds share one multiplexed connection.
    pub claims: Store,
    pub health: Health,
    pub members: Vec<MemberView>,
    pub stats: Stats,
    /// Woken when a change is queued, so it is published now rather than next interval.
    pub wake: Rc<Notify>,
    pub sync_interval: Duration,
    /// The store's URL or `sentinel:<service>`, and the primary the fleet task last reached
    /// through the sentinels.
    pub store: String,
    pub primary: Option<String>,
    /// How far the stream ran ahead of this node at its last pass (ms of stream ids).
    pub stream_lag_ms: u64,
    /// Entries held by the applier and the stream position (the task's, mirrored here).
    pub held: usize,
    pub position: String,
}

impl Link {
    /// Queues a change of this node's for the pool. A change that cannot be queued (the
    /// state disk) stays made here and is counted and logged: the operator is told to repeat
    /// it once the disk has room, or it reaches the other nodes through a re-seed.
    pub fn publish(&mut self, kind: Kind, subject: &str, payload: String) {
        let p = Pending {
            kind,
            subject: super::payload::encode_subject(subject),
            payload,
            wall_ms: clock::wall_ms(),
            seq: 0,
        };
        // What no node would accept (a name too long even encoded, a payload over the
        // entry's bound: a token near `max_token_bytes`) is refused here, loudly, rather
        // than queued and dropped later: the change holds on this node only.
        let probe = super::entry::Entry {
            kind,
            pool: self.pool.clone(),
            origin: self.node.clone(),
            seq: 1,
            wall_ms: p.wall_ms,
            subject: p.subject.clone(),
            payload: p.payload.clone(),
        };
        if let Err(r) = super::entry::check_entry(&probe) {
            self.stats.unshared += 1;
            warn!(
                kind = kind.label(),
                reason = r.label(),
                "NOT shared with the pool (applied on this node only): the change cannot be \
                 an entry; revoke or quarantine on each node by hand"
            );
            return;
        }
        match self.outbox.push(p) {
            Ok(()) => self.wake.notify_one(),
            Err(e) => {
                self.stats.unshared += 1;
                warn!(
                    kind = kind.label(),
                    subject, "not published to the pool (applied on this node only): {e}"
                );
            }
        }
    }
}

/// Queues a change on `node`'s pool, if it has one.
pub fn publish(node: &mut Node, kind: Kind, subject: &str, payload: String) {
    if let Some(link) = node.fleet.as_mut() {
        link.publish(kind, subject, payload);
    }
}

/// Outcomes of a bind's claim, as counted (`tollgate_fleet_claims_total{outcome}`).
pub const CLAIM_OUTCOMES: [&str; 3] = ["claimed", "replay", "fallback"];

/// What the pool says about a token a bind is about to bind: claimed for `addr` (or the
/// store could not say), or held by another address (a replay).
pub async fn claim(
    node: &std::cell::RefCell<Node>,
    token_id: &str,
    addr: IpAddr,
    exp_unix: u64,
) -> Option<IpAddr> {
    let store = {
        let n = node.borrow();
        let link = n.fleet.as_ref()?;
        // While the store is known down a bind does not wait on it: the node's own memory
        // decides (docs/fleet.md).
        if !link.health.up {
            drop(n);
            count_claim(node, "fallback");
            return None;
        }
        link.claims.clone()
    };
    let ttl_ms = exp_unix
        .saturating_mul(1000)
        .saturating_sub(clock::wall_ms())
        .max(1);
    let mut store = store;
    let r = store
        .claim_token(token_id, addr, Duration::from_millis(ttl_ms))
        .await;
    // The connection this claim made (or found broken) is the next claim's: binds share one
    // multiplexed connection instead of opening one each.
    if let Some(link) = node.borrow_mut().fleet.as_mut() {
        link.claims = store;
    }
    match r {
        Ok(Claim::Claimed) => {
            count_claim(node, "claimed");
            None
        }
        Ok(Claim::HeldBy(other)) => {
            count_claim(node, "replay");
            Some(other)
        }
        Err(e) => {
            // Only the store's unreachability marks it down (binds then skip it); an answer
            // that is no address (a store writer's value) is this bind's fallback alone.
            if matches!(
                e,
                StoreError::Timeout { .. }
                    | StoreError::Connection { .. }
                    | StoreError::Auth { .. }
            ) && let Some(link) = node.borrow_mut().fleet.as_mut()
            {
                link.mark_down(&e);
            }
            count_claim(node, "fallback");
            None
        }
    }
}

fn count_claim(node: &std::cell::RefCell<Node>, outcome: &'static str) {
    if let Some(link) = node.borrow_mut().fleet.as_mut() {
        *link.stats.claims.entry(outcome).or_default() += 1;
    }
}

impl Link {
    /// Records a failed store operation; the first of an outage is logged.
    pub fn mark_down(&mut self, e: &StoreError) {
        if self.health.up || self.health.down_since_ms.is_none() {
            warn!(
                error = e.label(),
                "fleet store unreachable: {e}; enforcing from this node's state, changes queued"
            );
            self.health.down_since_ms = Some(clock::now_ms());
        }
        self.health.up = false;
        self.health.last_error = Some(format!("{}: {e}", e.label()));
    }

    pub fn mark_up(&mut self) {
        if !self.health.up
            && let Some(since) = self.health.down_since_ms
        {
            tracing::info!(
                down_ms = clock::now_ms().saturating_sub(since),
                "fleet store reachable again"
            );
        }
        self.health.up = true;
        self.health.down_since_ms = None;
    }
}

/// Opens this node's link to the pool `cfg` names: the key, the credentials, the store
/// client (not connected: a node starts while the store is down), the durable cursor and
/// outbox in `state_dir`; and the task that serves them (`fleet::task::run`).
pub fn open(
    cfg: &crate::config::Fleet,
    state_dir: &std::path::Path,
) -> Result<(Link, super::task::Task), String> {
    use super::store::{Credentials, StoreConfig};
    let key = super::entry::PoolKey::load(&cfg.pool_key, &cfg.pool).map_err(|e| e.to_string())?;
    let credentials = match &cfg.credentials {
        Some(p) => Some(Credentials::load(p).map_err(|e| e.to_string())?),
        None => None,
    };
    let store_cfg = StoreConfig::from_fleet(cfg, credentials).map_err(|e| e.to_string())?;
    let store = Store::new(&store_cfg, key).map_err(|e| e.to_string())?;
    let cursor = super::cursor::CursorFile::load(state_dir).map_err(|e| e.to_string())?;
    let outbox = Outbox::load(state_dir).map_err(|e| e.to_string())?;
    let wake = Rc::new(Notify::new());
    let interval = Duration::from_millis(cfg.sync_interval_ms);
    let link = Link {
        pool: cfg.pool.clone(),
        node: cfg.node.clone(),
        outbox,
        claims: store.clone(),
        health: Health::default(),
        members: Vec::new(),
        stats: Stats::default(),
        wake: Rc::clone(&wake),
        sync_interval: interval,
        store: store.target().to_owned(),
        primary: None,
        stream_lag_ms: 0,
        held: 0,
        position: cursor.cursor().last.to_string(),
    };
    Ok((link, super::task::Task::new(store, cursor, interval, wake)))
}
