//! Binding by token: verify, apply the revocation list, refuse replays from a second
//! address, give the identity a slot, bind the caller's observed address until the token
//! expires. The HTTPS listener and `tollgate bind --token` both end here; so do revocations
//! and the tokens' housekeeping.

use std::net::IpAddr;

use serde_json::json;
use tollgate_common::token::Refusal;
use tracing::warn;

use super::{AuditFailed, Change, Done, Failed, OpError, not_recorded};
use crate::{
    audit::Actor,
    clock,
    control::reply::{Revoked, TokenBound, TokenUnbound},
    fleet::{self, entry::Kind, payload},
    identity,
    net::{host_len, prefix_text},
    node::Node,
    state::{DynBinding, TokenIdentity, journal::Entry, now_unix_ms},
    tables::TableError,
    token_bind::{BindFailure, placement},
};

impl From<BindFailure> for OpError {
    fn from(f: BindFailure) -> OpError {
        let message = f.message();
        match f {
            BindFailure::Kernel(_) | BindFailure::Unrecorded(_) | BindFailure::Unaudited(_) => {
                OpError::Kernel(message)
            }
            BindFailure::Disabled => OpError::NotFound(message),
            _ => OpError::BadRequest(message),
        }
    }
}

impl From<AuditFailed> for BindFailure {
    fn from(e: AuditFailed) -> BindFailure {
        BindFailure::Unaudited(e.0)
    }
}

/// Verifies `token` and binds `addr` (the observed peer, or the gateway's client) to its
/// identity until it expires. Every outcome is counted; refusals and binds are audited.
/// `held_by` is the address the pool's claim names for this token when it is another one
/// (`fleet::link::claim`): the bind is a replay. A bind made here (not one installed from
/// the pool, `Actor::FLEET`) is queued for the pool with its token.
pub fn bind_token(
    node: &mut Node,
    token: &str,
    addr: IpAddr,
    who: &Actor,
    held_by: Option<IpAddr>,
) -> Result<Done<TokenBound>, Failed<BindFailure>> {
    // An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
    let addr = addr.to_canonical();
    // The issuer the token chose, once it has: its tally takes the refusal.
    let mut issuer = None;
    let r = bind_verified(node, token, addr, who, held_by, &mut issuer);
    if let Ok(Done {
        reply,
        change: Some(_),
    }) = &r
        && who.via != Actor::FLEET.via
    {
        let payload = payload::encode(&payload::Binding {
            token: token.to_owned(),
            address: addr,
        });
        fleet::link::publish(node, Kind::Binding, &reply.token_id, payload);
    }
    r.map_err(|f| {
        if let Some(svc) = node.tokens.as_mut() {
            match &f {
                BindFailure::Refused(refusal) => svc.count(issuer, refusal.label()),
                BindFailure::Replay { .. } => svc.thefts += 1,
                BindFailure::BindingCap { .. } => svc.count(issuer, "binding_cap"),
                _ => {}
            }
        }
        let action = if matches!(f, BindFailure::Replay { .. }) {
            "token_theft"
        } else {
            "token_refused"
        };
        let mut detail = json!({"address": addr, "message": f.message()});
        if let BindFailure::Replay { bound_to } = &f {
            detail["bound_to"] = json!(bound_to);
        }
        let change = Change::new(action, f.label(), detail);
        Failed::audited(f, change)
    })
}

fn bind_verified(
    node: &mut Node,
    token: &str,
    addr: IpAddr,
    who: &Actor,
    held_by: Option<IpAddr>,
    issuer: &mut Option<usize>,
) -> Result<Done<TokenBound>, BindFailure> {
    let cfg = node.config.tokens.clone().ok_or(BindFailure::Disabled)?;
    let svc = node.tokens.as_mut().ok_or(BindFailure::Disabled)?;
    let now_ms = now_unix_ms();
    // The token's own times are on the wall clock; every deadline below is on agent time.
    let (chosen, claims) = svc
        .verify(token, clock::wall_ms() / 1000)
        .map_err(|(i, r)| {
            *issuer = i;
            BindFailure::Refused(r)
        })?;
    *issuer = Some(chosen);
    let issuer_cfg = cfg.issuers[chosen].clone();
    let state = &node.state;
    if state.revoked_tokens.contains_key(&claims.jti)
        || state
            .revoked_identities
            .get(&claims.identity)
            .is_some_and(|at| claims.iat.saturating_mul(1000) <= *at)
    {
        return Err(BindFailure::Refused(Refusal::Revoked));
    }
    svc.count(Some(chosen), "ok");
    // Replay: the same token, bound and alive, from another address.
    if let Some(b) = state
        .bindings
        .iter()
        .find(|b| b.token_id.as_deref() == Some(claims.jti.as_str()) && !b.expired(now_ms))
        && b.addr != addr
    {
        return Err(BindFailure::Replay { bound_to: b.addr });
    }
    // The same across the pool: its claim names another address (docs/fleet.md).
    if let Some(other) = held_by.filter(|a| a.to_canonical() != addr) {
        return Err(BindFailure::Replay { bound_to: other });
    }
    let len = host_len(addr);
    // exp − wall-now at bind time, on agent time: a later wall-clock step does not move it.
    let expires_ms = clock::from_wall_ms(claims.exp.saturating_mul(1000));
    let held = |b: &DynBinding| b.identity == claims.identity && !b.expired(now_ms);
    // An idempotent rebind (the same token, address and expiry, already bound) changes
    // nothing, so it writes nothing: no state save, no audit line (#12 finding 7).
    let same = state.bindings.iter().any(|b| {
        held(b)
            && b.addr == addr
            && b.prefix_len == len
            // The same token id is the same token, so the same `exp`. (Comparing the
            // converted expiry would not do: agent time minus wall time moves by a few ms
            // between two reads.)
            && b.token_id.as_deref() == Some(claims.jti.as_str())
    });
    if same && node.identities().slot(&claims.identity).is_some() {
        return Ok(Done::read(TokenBound {
            address: addr,
            identity: claims.identity,
            token_id: claims.jti,
            key_id: claims.kid,
            expires_unix: claims.exp,
        }));
    }
    // One identity holds at most `max_bindings_per_identity` live bindings: a bind from a
    // further address is refused, so one customer cannot fill the binding table (and make
    // every bind rewrite a huge state file). Rebinding an address it holds is not counted.
    let holds = state
        .bindings
        .iter()
        .filter(|b| held(b) && !(b.addr == addr && b.prefix_len == len))
        .count();
    if holds >= cfg.max_bindings_per_identity {
        return Err(BindFailure::BindingCap {
            cap: cfg.max_bindings_per_identity,
        });
    }
    if let Some(owner) = node.identities().static_owner(addr, len) {
        return Err(BindFailure::Unplaceable(format!(
            "{addr} is bound to {owner} by the configuration"
        )));
    }
    let placed = placement(&node.config, &issuer_cfg, &claims).map_err(BindFailure::Unplaceable)?;
    let fresh = node.identities().slot(&claims.identity).is_none();
    let slots = node.pinned.tables.identity_slots();
    let id = node
        .state
        .identity_id(&claims.identity, slots)
        .ok_or_else(|| {
            BindFailure::Kernel(format!("no free identity slot for {}", claims.identity))
        })?;
    if fresh {
        // A reused slot starts afresh: no budget, flags or counters of its last occupant.
        node.pinned
            .tables
            .clear_identity(id)
            .map_err(|e| BindFailure::Kernel(e.to_string()))?;
    }
    let previous = super::bindings::previous_binding(node, addr, len);
    let previous_identity = node.state.token_identities.get(&claims.identity).cloned();
    if let Some(mut t) = placed {
        t.expires_unix_ms = clock::from_wall_ms(t.expires_unix_ms);
        let merged = match node.state.token_identities.get(&claims.identity) {
            Some(old) if old.expires_unix_ms > t.expires_unix_ms => TokenIdentity {
                expires_unix_ms: old.expires_unix_ms,
                ..t
            },
            _ => t,
        };
        let ids = node.identities();
        let rec = ids.record(
            &identity::token(&claims.identity, Some(id), &merged),
            node.state.quarantined(&claims.identity, now_ms),
        );
        node.pinned
            .tables
            .set_identity_keeping_controller_flags(id, &rec)
            .map_err(|e| BindFailure::Kernel(e.to_string()))?;
        node.state
            .token_identities
            .insert(claims.identity.clone(), merged);
    }
    super::bindings::install(
        node,
        id,
        DynBinding {
            addr,
            prefix_len: len,
            identity: claims.identity.clone(),
            expires_unix_ms: Some(expires_ms),
            created_unix_ms: now_ms,
            by: who.describe(),
            token_id: Some(claims.jti.clone()),
        },
    )
    .map_err(|e| BindFailure::Kernel(e.to_string()))?;
    // A bind that is not durable is not made: the kernel and the state are put back.
    let entries = vec![
        node.state.slot_entry(&claims.identity),
        node.state.token_identity_entry(&claims.identity),
        node.state.binding_entry(addr, len),
    ];
    if let Err(e) = node.record(entries) {
        super::bindings::undo_bind(node, addr, len, previous);
        match previous_identity {
            Some(t) => {
                node.state
                    .token_identities
                    .insert(claims.identity.clone(), t);
            }
            None => {
                node.state.token_identities.remove(&claims.identity);
            }
        }
        if fresh {
            // The slot was taken for this bind: it goes back, empty.
            node.state.identity_ids.remove(&claims.identity);
            if let Err(e) = node.pinned.tables.clear_identity(id) {
                warn!("undoing the slot of {}: {e}", claims.identity);
            }
        }
        return Err(BindFailure::Unrecorded(e.to_string()));
    }
    let reply = TokenBound {
        address: addr,
        identity: claims.identity,
        token_id: claims.jti,
        key_id: claims.kid,
        expires_unix: claims.exp,
    };
    let change = Change::new("bind", "token", &reply);
    Ok(Done::changed(reply, change))
}

/// Ends the binding `token` made for `addr` (DELETE /v1/bind): the token must verify and
/// must be the one that made it.
pub fn unbind_token(
    node: &mut Node,
    token: &str,
    addr: IpAddr,
) -> Result<Done<TokenUnbound>, Failed<BindFailure>> {
    let plain = |f: BindFailure| Failed {
        error: f,
        change: None,
    };
    // An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
    let addr = addr.to_canonical();
    let svc = node
        .tokens
        .as_mut()
        .ok_or(BindFailure::Disabled)
        .map_err(plain)?;
    let (_, claims) = svc
        .verify(token, clock::wall_ms() / 1000)
        .map_err(|(_, r)| plain(BindFailure::Refused(r)))?;
    let len = host_len(addr);
    let Some(previous) = super::bindings::previous_binding(node, addr, len)
        .filter(|b| b.token_id.as_deref() == Some(claims.jti.as_str()))
    else {
        return Err(plain(BindFailure::Unplaceable(format!(
            "{addr} is not bound by this token"
        ))));
    };
    match node.pinned.tables.unbind(addr, len) {
        Ok(()) | Err(TableError::NoBinding(_)) => {}
        Err(e) => return Err(plain(BindFailure::Kernel(e.to_string()))),
    }
    node.state
        .bindings
        .retain(|b| !(b.addr == addr && b.prefix_len == len));
    // Not durable, not done: a restart would bring the binding back.
    if let Err(e) = node.record(vec![node.state.binding_entry(addr, len)]) {
        super::bindings::undo_bind(node, addr, len, Some(previous));
        return Err(plain(BindFailure::Unrecorded(e.to_string())));
    }
    let reply = TokenUnbound {
        address: addr,
        identity: claims.identity,
        token_id: claims.jti,
    };
    let change = Change::new("unbind", "token", &reply);
    Ok(Done::changed(reply, change))
}

/// Revokes a token id or every token of an identity issued until now (plus the allowed clock
/// skew): their bindings go at once, the revocation is persisted and queued for the pool.
pub fn revoke(
    node: &mut Node,
    token_id: Option<&str>,
    identity: Option<&str>,
    reason: &str,
) -> Result<Done<Revoked>, Failed> {
    let done = revoke_at(node, token_id, identity, reason, None)?;
    if let Some(t) = token_id
        && let Some(until) = node.state.revoked_tokens.get(t)
    {
        let p = payload::encode(&payload::Revocation {
            until_wall_ms: clock::to_wall_ms(*until),
            reason: reason.to_owned(),
        });
        fleet::link::publish(node, Kind::Revocation, t, p);
    }
    if let Some(i) = identity
        && let Some(cutoff) = node.state.revoked_identities.get(i)
    {
        let p = payload::encode(&payload::IdentityRevocation {
            cutoff_wall_ms: *cutoff,
            reason: reason.to_owned(),
        });
        fleet::link::publish(node, Kind::IdentityRevocation, i, p);
    }
    Ok(done)
}

/// [`revoke`] without publishing: what a revocation from the pool installs. An identity
/// revocation takes `identity_cutoff_wall_ms` when given (the origin's), else now plus the
/// skew; a cut-off already held that is later is kept.
pub fn revoke_at(
    node: &mut Node,
    token_id: Option<&str>,
    identity: Option<&str>,
    reason: &str,
    identity_cutoff_wall_ms: Option<u64>,
) -> Result<Done<Revoked>, Failed> {
    let now_ms = now_unix_ms();
    if token_id.is_none() && identity.is_none() {
        return Err(OpError::BadRequest("revoke needs --token-id or --identity".into()).into());
    }
    let hit = |b: &DynBinding| {
        token_id.is_some_and(|t| b.token_id.as_deref() == Some(t))
            || identity.is_some_and(|i| b.identity == i && b.token_id.is_some())
    };
    let removed: Vec<DynBinding> = node
        .state
        .bindings
        .iter()
        .filter(|b| hit(b))
        .cloned()
        .collect();
    // What the revocation replaces, to put back if it cannot be recorded.
    let before_token = token_id.map(|t| (t, node.state.revoked_tokens.get(t).copied()));
    let before_identity = identity.map(|i| (i, node.state.revoked_identities.get(i).copied()));
    for (n, b) in removed.iter().enumerate() {
        match node.pinned.tables.unbind(b.addr, b.prefix_len) {
            Ok(()) | Err(TableError::NoBinding(_)) => {}
            Err(e) => {
                // Put back the ones already gone: nothing is half revoked.
                for b in &removed[..n] {
                    super::bindings::undo_bind(node, b.addr, b.prefix_len, Some(b.clone()));
                }
                return Err(e.into());
            }
        }
    }
    node.state.bindings.retain(|b| !hit(b));
    if let Some(t) = token_id {
        // Kept until the token could have expired anyway: the longest max TTL of all
        // issuers + skew from now, on agent time (the boot clock), so a wall-clock step cannot end it early; longer if a
        // binding it made runs longer.
        let ttl = node
            .config
            .tokens
            .as_ref()
            .map_or(86400, |c| c.longest_ttl_s() + c.clock_skew_s);
        let until = removed
            .iter()
            .filter_map(|b| b.expires_unix_ms)
            .max()
            .unwrap_or(0)
            .max(now_ms + ttl * 1000)
            .max(node.state.revoked_tokens.get(t).copied().unwrap_or(0));
        node.state.revoked_tokens.insert(t.to_owned(), until);
    }
    if let Some(i) = identity {
        // The cut-off is now plus the allowed clock skew: an issuer whose clock runs ahead of
        // this node's (by up to the skew tokens are accepted with) stamps a token issued just
        // before the revocation with an `iat` after our "now". The price: a token issued
        // within the skew after the revocation is refused too.
        let skew_ms = node
            .config
            .tokens
            .as_ref()
            .map_or(0, |c| c.clock_skew_s.saturating_mul(1000));
        // Compared with a token's `iat`, so on the wall clock. Never moved earlier.
        let cutoff = identity_cutoff_wall_ms
            .unwrap_or_else(|| clock::wall_ms().saturating_add(skew_ms))
            .max(node.state.revoked_identities.get(i).copied().unwrap_or(0));
        node.state.revoked_identities.insert(i.to_owned(), cutoff);
    }
    let mut entries: Vec<Entry> = removed
        .iter()
        .map(|b| node.state.binding_entry(b.addr, b.prefix_len))
        .collect();
    entries.extend(token_id.map(|t| node.state.revoked_token_entry(t)));
    entries.extend(identity.map(|i| node.state.revoked_identity_entry(i)));
    // Not durable, not done: the bindings come back and the token stays valid, so that a
    // restart does not find a revocation the operator was told failed, or lose one.
    if let Err(e) = node.record(entries) {
        for b in &removed {
            super::bindings::undo_bind(node, b.addr, b.prefix_len, Some(b.clone()));
        }
        if let Some((t, was)) = before_token {
            match was {
                Some(u) => node.state.revoked_tokens.insert(t.to_owned(), u),
                None => node.state.revoked_tokens.remove(t),
            };
        }
        if let Some((i, was)) = before_identity {
            match was {
                Some(c) => node.state.revoked_identities.insert(i.to_owned(), c),
                None => node.state.revoked_identities.remove(i),
            };
        }
        return Err(not_recorded(e).into());
    }
    let reply = Revoked {
        token_id: token_id.map(str::to_owned),
        identity: identity.map(str::to_owned),
        bindings_removed: removed
            .iter()
            .map(|b| prefix_text(b.addr, b.prefix_len))
            .collect(),
    };
    let change = Change::new("revoke", reason, &reply);
    Ok(Done::changed(reply, change))
}

/// Housekeeping for tokens: drop revocations of tokens that have expired anyway, free
/// token identities whose tokens have all expired, pick up a rotated JWKS. The audit records
/// of what changed, for the agent to write. What it frees is noted for the next journal
/// record; the caller records.
pub fn housekeeping(node: &mut Node, now_ms: u64) -> Vec<Change> {
    let state = &mut node.state;
    let lapsed: Vec<String> = state
        .revoked_tokens
        .iter()
        .filter(|(_, until)| **until <= now_ms)
        .map(|(t, _)| t.clone())
        .collect();
    for t in lapsed {
        state.revoked_tokens.remove(&t);
        state.note(state.revoked_token_entry(&t));
    }
    let expired: Vec<String> = state
        .token_identities
        .iter()
        .filter(|(n, t)| {
            t.expires_unix_ms <= now_ms && !state.bindings.iter().any(|b| &b.identity == *n)
        })
        .map(|(n, _)| n.clone())
        .collect();
    for name in expired {
        state.token_identities.remove(&name);
        state.note(state.token_identity_entry(&name));
        if let Some(id) = state.identity_ids.remove(&name) {
            state.note(state.slot_entry(&name));
            let _ = node.pinned.tables.clear_identity(id);
        }
    }
    let mut changes = Vec::new();
    // Keys refresh themselves (`issuers::Keys::run`); what changed since the last look is
    // audited once: a rotation picked up, a fetch that failed (the old keys kept).
    if let Some(svc) = node.tokens.as_mut() {
        for i in &mut svc.issuers {
            let status = i.keys.status();
            let Some(last) = status.last_fetch else {
                continue;
            };
            if i.seen_fetch_ms == Some(last.at_wall_ms) {
                continue;
            }
            let first = i.seen_fetch_ms.is_none();
            i.seen_fetch_ms = Some(last.at_wall_ms);
            match last.outcome.as_str() {
                "ok" if !first || last.trigger != "start" => changes.push(Change::new(
                    "keys_reloaded",
                    last.trigger.clone(),
                    json!({ "issuer": i.name, "keys": status.kids.len(), "kids": status.kids }),
                )),
                "ok" => {}
                outcome => warn!(
                    issuer = %i.name,
                    trigger = %last.trigger,
                    outcome,
                    "keeping the previous keys: {}",
                    last.error.as_deref().unwrap_or("")
                ),
            }
        }
    }
    changes
}
