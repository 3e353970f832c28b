//! Run-time bindings an operator makes and ends (`tollgate bind --identity`, `unbind`), and
//! their expiry. Token bindings are `ops::tokens`'.

use std::net::IpAddr;

use serde_json::json;
use tracing::warn;

use super::{Change, Done, Failed, OpError, not_recorded};
use crate::{
    audit::Actor,
    control::reply::{Bound, Unbound},
    net::{parse_target, prefix_text},
    node::Node,
    policy_apply::expiry_boot_ns,
    state::{DynBinding, now_unix_ms},
    tables::TableError,
};

fn static_binding(addr: std::net::IpAddr, len: u8, owner: &str) -> OpError {
    OpError::BadRequest(format!(
        "{addr}/{len} is bound to {owner} by the configuration; change it there"
    ))
}

/// Binds `target` (an address or CIDR) to `identity`, for `for_secs` or until unbound.
pub fn bind(
    node: &mut Node,
    who: &Actor,
    target: &str,
    identity: &str,
    for_secs: Option<u64>,
) -> Result<Done<Bound>, Failed> {
    let (addr, len) = parse_target(target).map_err(OpError::BadRequest)?;
    let ids = node.identities();
    let id = ids
        .slot(identity)
        .ok_or_else(|| OpError::no_identity(identity))?;
    if let Some(owner) = ids.static_owner(addr, len) {
        return Err(static_binding(addr, len, owner).into());
    }
    if for_secs == Some(0) {
        return Err(OpError::BadRequest("--for must be at least 1 second".into()).into());
    }
    let now = now_unix_ms();
    let expires = for_secs.map(|s| now + s.saturating_mul(1000));
    let previous = previous_binding(node, addr, len);
    install(
        node,
        id,
        DynBinding {
            addr,
            prefix_len: len,
            identity: identity.to_owned(),
            expires_unix_ms: expires,
            created_unix_ms: now,
            by: who.describe(),
            token_id: None,
        },
    )?;
    // A bind that is not durable is not made: the kernel and the state are put back.
    if let Err(e) = node.record(vec![node.state.binding_entry(addr, len)]) {
        undo_bind(node, addr, len, previous);
        return Err(not_recorded(e).into());
    }
    let reply = Bound {
        target: prefix_text(addr, len),
        identity: identity.to_owned(),
        expires_unix_ms: expires,
    };
    let change = Change::new("bind", "", &reply);
    Ok(Done::changed(reply, change))
}

/// Puts run-time binding `b` of slot `id` in the kernel (expiring on the boot clock when
/// `b` does) and in the state, replacing any of the same prefix. The caller saves the state.
pub(super) fn install(node: &mut Node, id: u32, b: DynBinding) -> Result<(), TableError> {
    let exp_ns = expiry_boot_ns(b.expires_unix_ms, b.created_unix_ms).unwrap_or(1);
    node.pinned.tables.bind(b.addr, b.prefix_len, id, exp_ns)?;
    node.state
        .bindings
        .retain(|x| !(x.addr == b.addr && x.prefix_len == b.prefix_len));
    node.state.bindings.push(b);
    Ok(())
}

/// The run-time binding of exactly `addr/len`, if any: what [`undo_bind`] puts back.
pub(crate) fn previous_binding(node: &Node, addr: IpAddr, len: u8) -> Option<DynBinding> {
    node.state
        .bindings
        .iter()
        .find(|b| b.addr == addr && b.prefix_len == len)
        .cloned()
}

/// Undoes a bind of `addr/len` whose state could not be saved: the kernel and the state get
/// back `previous` (or no binding), so that nothing says the bind happened.
pub(crate) fn undo_bind(node: &mut Node, addr: IpAddr, len: u8, previous: Option<DynBinding>) {
    node.state
        .bindings
        .retain(|b| !(b.addr == addr && b.prefix_len == len));
    let restored = match &previous {
        Some(p) => match node.state.identity_ids.get(&p.identity).copied() {
            Some(id) => {
                let exp_ns = expiry_boot_ns(p.expires_unix_ms, now_unix_ms()).unwrap_or(1);
                node.pinned.tables.bind(addr, len, id, exp_ns)
            }
            None => node.pinned.tables.unbind(addr, len),
        },
        None => node.pinned.tables.unbind(addr, len),
    };
    if let Err(e) = restored {
        warn!("undoing the bind of {addr}/{len}: {e}");
    }
    node.state.bindings.extend(previous);
}

/// Ends the run-time binding of exactly `target`.
pub fn unbind(node: &mut Node, target: &str) -> Result<Done<Unbound>, Failed> {
    let (addr, len) = parse_target(target).map_err(OpError::BadRequest)?;
    if let Some(owner) = node.identities().static_owner(addr, len) {
        return Err(static_binding(addr, len, owner).into());
    }
    let Some(previous) = previous_binding(node, addr, len) else {
        return Err(OpError::NotFound(format!("no run-time binding for {addr}/{len}")).into());
    };
    match node.pinned.tables.unbind(addr, len) {
        Ok(()) | Err(TableError::NoBinding(_)) => {}
        Err(e) => return Err(e.into()),
    }
    node.state
        .bindings
        .retain(|b| !(b.addr == addr && b.prefix_len == len));
    // An unbind that is not durable is not made: a restart would bring the binding back.
    if let Err(e) = node.record(vec![node.state.binding_entry(addr, len)]) {
        undo_bind(node, addr, len, Some(previous));
        return Err(not_recorded(e).into());
    }
    let reply = Unbound {
        target: prefix_text(addr, len),
    };
    let change = Change::new("unbind", "", &reply);
    Ok(Done::changed(reply, change))
}

/// Frees the slots of run-time bindings whose time is up (the kernel already ignores them);
/// the audit records of what went, for the agent to write. Each is noted for the next
/// journal record (`State::note`); the caller records.
pub fn expire(node: &mut Node, now: u64) -> Vec<Change> {
    let stale: Vec<DynBinding> = node
        .state
        .bindings
        .iter()
        .filter(|b| b.expired(now))
        .cloned()
        .collect();
    let mut changes = Vec::new();
    for b in &stale {
        // The kernel already ignores it; this frees the slot.
        let _ = node.pinned.tables.unbind(b.addr, b.prefix_len);
        changes.push(Change::new(
            "unbind",
            "binding expired",
            json!({"target": prefix_text(b.addr, b.prefix_len), "identity": b.identity}),
        ));
    }
    node.state.bindings.retain(|b| !b.expired(now));
    for b in &stale {
        let entry = node.state.binding_entry(b.addr, b.prefix_len);
        node.state.note(entry);
    }
    changes
}
