//! The fleet: what a pool of nodes shares through a Redis (or Valkey) store: bindings (with
//! their tokens, verified again by every node), revocations, quarantines and releases, and
//! the rates and quotas of fleet-wide plans (`share` the rules, `global` this node's part).
//!
//! `entry` is the authenticated change (binding, revocation, quarantine, release) and the pool
//! key that signs it; `store` is the client: the change stream each node reads from its last
//! position, the snapshot a node loads at start, the fleet-wide token claims and membership
//! heartbeats, every operation bounded by a timeout. The store is never on the packet path;
//! everything read from it is verified before a caller sees it. `apply` is the per-subject
//! order entries are taken in (replays of old entries refused `stale`, revocations never
//! undone), `cursor` the node's durable position (`fleet.json`), `sync` one read pass
//! (snapshot at first or after a gap, else the stream after the cursor). The wiring:
//! `link` is what the node holds (outbox, health, counters, the claim client), `outbox` the
//! durable queue of this node's changes, `payload` what each kind carries, `install` how
//! another node's change is put in force here, `task` the loop that publishes, syncs,
//! re-seeds and beats. `share` (with `store::spend`) is the logic of fleet-wide rates and
//! quotas. docs/fleet.md has the key layout and the outage rules.

pub mod apply;
pub mod cursor;
pub mod entry;
pub mod global;
pub mod install;
pub mod link;
pub mod outbox;
pub mod payload;
pub mod share;
pub mod store;
pub mod sync;
pub mod task;
