//! Quarantine: an operator's (or the controller's) "this identity passes nothing", and its
//! release, by hand or when its time is up.

use std::net::IpAddr;

use serde_json::json;
use tollgate_common::policy::ID_QUARANTINED;
use tracing::warn;

use super::{Change, Done, Failed, OpError, not_recorded};
use crate::{
    audit::Actor,
    clock,
    control::reply::{Quarantined, Released},
    fleet::{self, entry::Kind, payload},
    node::Node,
    state::{Quarantine, QuarantineOwner, now_unix_ms},
};

/// An identity name, or the identity an address is bound to. A quarantined name without a
/// slot (a token identity whose tokens expired, an identity left out of the configuration)
/// is still a target: its quarantine stays until released or expired.
pub fn resolve_target(node: &Node, target: &str) -> Result<String, OpError> {
    let ids = node.identities();
    if ids.slot(target).is_some() || node.state.quarantines.contains_key(target) {
        return Ok(target.to_owned());
    }
    if let Ok(addr) = target.parse::<IpAddr>() {
        let found = node.pinned.tables.lookup_binding(addr)?;
        return match found.and_then(|(_, b)| ids.name_of(b.identity)) {
            Some(n) => Ok(n.to_owned()),
            None => Err(OpError::NotFound(format!(
                "{addr} is not bound to any identity"
            ))),
        };
    }
    Err(OpError::NotFound(format!(
        "no identity named {target:?} (and it is not an address)"
    )))
}

/// Sets or clears the kernel's quarantine flag of `name`. A name without a slot has no
/// kernel record: nothing to do (the flag is set from the state when it gets one).
pub fn set_flag(node: &mut Node, name: &str, on: bool) -> Result<(), OpError> {
    let Some(id) = node.identities().slot(name) else {
        return Ok(());
    };
    let tables = &mut node.pinned.tables;
    let mut rec = tables.identity(id)?;
    if on {
        rec.flags |= ID_QUARANTINED;
    } else {
        rec.flags &= !ID_QUARANTINED;
    }
    tables.set_identity(id, &rec)?;
    Ok(())
}

/// Quarantines `target` (an identity, or the identity an address is bound to) for
/// `for_secs` or until released.
pub fn quarantine(
    node: &mut Node,
    who: &Actor,
    target: &str,
    for_secs: Option<u64>,
    reason: &str,
) -> Result<Done<Quarantined>, Failed> {
    if reason.trim().is_empty() {
        return Err(OpError::BadRequest("a quarantine needs a --reason".into()).into());
    }
    let name = resolve_target(node, target)?;
    let now = now_unix_ms();
    let until = for_secs.map(|s| now + s.saturating_mul(1000));
    let done = quarantine_name(node, who, name, until, reason)?;
    let p = payload::encode(&payload::Quarantine {
        until_wall_ms: until.map(clock::to_wall_ms),
        reason: reason.to_owned(),
    });
    fleet::link::publish(node, Kind::Quarantine, &done.reply.identity, p);
    Ok(done)
}

/// Quarantines the identity `name` until `until` (agent time) without resolving or
/// publishing it: what a quarantine from the pool installs (its identity may have no slot
/// here yet; the flag is set when it gets one).
pub fn quarantine_name(
    node: &mut Node,
    who: &Actor,
    name: String,
    until: Option<u64>,
    reason: &str,
) -> Result<Done<Quarantined>, Failed> {
    let now = now_unix_ms();
    let before = node.state.quarantines.insert(
        name.clone(),
        Quarantine {
            until_unix_ms: until,
            since_unix_ms: now,
            reason: reason.to_owned(),
            by: QuarantineOwner::from(who),
        },
    );
    // Durable first (a crash after it still quarantines at the next start), then the kernel;
    // if either fails, nothing is left saying it happened.
    let undo = |node: &mut Node| match &before {
        Some(q) => {
            node.state.quarantines.insert(name.clone(), q.clone());
        }
        None => {
            node.state.quarantines.remove(&name);
        }
    };
    if let Err(e) = node.record(vec![node.state.quarantine_entry(&name)]) {
        undo(node);
        return Err(not_recorded(e).into());
    }
    if let Err(e) = set_flag(node, &name, true) {
        undo(node);
        if let Err(s) = node.record(vec![node.state.quarantine_entry(&name)]) {
            warn!("undoing the quarantine of {name} in the state: {s}");
            node.state.mark_stale();
        }
        return Err(e.into());
    }
    let reply = Quarantined {
        identity: name,
        until_unix_ms: until,
    };
    let change = Change::new("quarantine", reason, &reply);
    Ok(Done::changed(reply, change))
}

/// Releases `target` from quarantine, and queues the release for the pool.
pub fn release(node: &mut Node, target: &str, reason: &str) -> Result<Done<Released>, Failed> {
    let name = resolve_target(node, target)?;
    let done = release_name(node, name, reason)?;
    let p = payload::encode(&payload::Release {
        reason: reason.to_owned(),
    });
    fleet::link::publish(node, Kind::Release, &done.reply.identity, p);
    Ok(done)
}

/// Releases the identity `name` without publishing it (a release from the pool).
pub fn release_name(node: &mut Node, name: String, reason: &str) -> Result<Done<Released>, Failed> {
    let Some(before) = node.state.quarantines.remove(&name) else {
        return Err(OpError::NotFound(format!("{name} is not quarantined")).into());
    };
    // As for a quarantine: durable, then the kernel, and undone if either fails.
    if let Err(e) = node.record(vec![node.state.quarantine_entry(&name)]) {
        node.state.quarantines.insert(name, before);
        return Err(not_recorded(e).into());
    }
    if let Err(e) = set_flag(node, &name, false) {
        node.state.quarantines.insert(name.clone(), before);
        if let Err(s) = node.record(vec![node.state.quarantine_entry(&name)]) {
            warn!("undoing the release of {name} in the state: {s}");
            node.state.mark_stale();
        }
        return Err(e.into());
    }
    let reply = Released { identity: name };
    let change = Change::new("release", reason, &reply);
    Ok(Done::changed(reply, change))
}

/// Releases the quarantines whose time is up; the audit records of what went, for the agent
/// to write. Each is noted for the next journal record; the caller records.
pub fn expire(node: &mut Node, now: u64) -> Vec<Change> {
    let expired: Vec<String> = node
        .state
        .quarantines
        .iter()
        .filter(|(_, q)| q.until_unix_ms.is_some_and(|u| u <= now))
        .map(|(n, _)| n.clone())
        .collect();
    let mut changes = Vec::new();
    for name in expired {
        node.state.quarantines.remove(&name);
        let entry = node.state.quarantine_entry(&name);
        node.state.note(entry);
        if let Err(e) = set_flag(node, &name, false) {
            warn!("releasing {name}: {e}");
        }
        changes.push(Change::new(
            "release",
            "quarantine expired",
            json!({ "identity": name }),
        ));
    }
    changes
}
