//! Installs another node's change on this one, through the same operations a local request
//! uses (`ops`), as `Actor::FLEET`, so every rule of a single node holds for the pool too:
//! a binding's token is verified again here (signature, expiry, audience, issuer,
//! revocations, replay, placement), so the store can never grant what a valid token did not;
//! a binding expires in this kernel at the token's `exp`; a revocation, quarantine or
//! release is journalled and audited here like one made here (the audit record names the
//! origin node). Nothing installed here is published again.

use serde_json::json;

use super::{entry::Kind, entry::Verified, payload};
use crate::{
    audit::Actor,
    clock,
    node::Node,
    ops::{self, Done, Failed},
    state::{QuarantineOwner, now_unix_ms},
};

/// What installing an entry did: `installed`, `unchanged` (this node already had it), or
/// the refusal's label (e.g. `expired` for a binding whose token has expired since,
/// `bad_payload`).
pub fn install(node: &mut Node, v: &Verified) -> &'static str {
    let e = v.entry();
    let origin = e.origin.as_str();
    let Some(subject) = payload::decode_subject(&e.subject) else {
        return "bad_subject";
    };
    let subject = subject.as_str();
    match e.kind {
        Kind::Binding => {
            let Some(b) = payload::decode::<payload::Binding>(&e.payload) else {
                return "bad_payload";
            };
            let r = ops::tokens::bind_token(node, &b.token, b.address, &Actor::FLEET, None);
            match r {
                // The same token, address and expiry already bound: nothing written.
                Ok(Done { change: None, .. }) => "unchanged",
                r => match ops::audited(node, &Actor::FLEET, with_origin(r, origin)) {
                    Ok(_) => "installed",
                    Err(f) => f.label(),
                },
            }
        }
        Kind::Revocation => {
            let Some(r) = payload::decode::<payload::Revocation>(&e.payload) else {
                return "bad_payload";
            };
            let held = node.state.revoked_tokens.contains_key(subject);
            let bound = node
                .state
                .bindings
                .iter()
                .any(|b| b.token_id.as_deref() == Some(subject));
            if held && !bound {
                return "unchanged";
            }
            let done = ops::tokens::revoke_at(node, Some(subject), None, &r.reason, None);
            result(node, done, origin)
        }
        Kind::IdentityRevocation => {
            let Some(r) = payload::decode::<payload::IdentityRevocation>(&e.payload) else {
                return "bad_payload";
            };
            if node
                .state
                .revoked_identities
                .get(subject)
                .is_some_and(|c| *c >= r.cutoff_wall_ms)
            {
                return "unchanged";
            }
            let done = ops::tokens::revoke_at(
                node,
                None,
                Some(subject),
                &r.reason,
                Some(r.cutoff_wall_ms),
            );
            result(node, done, origin)
        }
        Kind::Quarantine => {
            let Some(q) = payload::decode::<payload::Quarantine>(&e.payload) else {
                return "bad_payload";
            };
            // The end on this node's agent time, read now: its wall clock may step later.
            let until = q.until_wall_ms.map(clock::from_wall_ms);
            if until.is_some_and(|u| u <= now_unix_ms()) {
                return "expired";
            }
            // The same end within a second is the same quarantine: agent time minus wall time
            // moves by a few ms between two conversions.
            let close = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => a.abs_diff(b) < 1000,
                (a, b) => a == b,
            };
            if node
                .state
                .quarantines
                .get(subject)
                .is_some_and(|held| close(held.until_unix_ms, until) && held.reason == q.reason)
            {
                return "unchanged";
            }
            let done = ops::quarantine::quarantine_name(
                node,
                &Actor::FLEET,
                subject.to_owned(),
                until,
                &q.reason,
            );
            result(node, done, origin)
        }
        Kind::Release => {
            let Some(r) = payload::decode::<payload::Release>(&e.payload) else {
                return "bad_payload";
            };
            match node.state.quarantines.get(subject) {
                None => return "unchanged",
                // The anomaly ladder's quarantine is this node's own (it saw the traffic):
                // the pool does not lift it; the ladder does.
                Some(q) if matches!(q.by, QuarantineOwner::Controller) => return "local_controller",
                Some(_) => {}
            }
            let done = ops::quarantine::release_name(node, subject.to_owned(), &r.reason);
            result(node, done, origin)
        }
    }
}

/// Whether an outcome is a failure to put the change in force (not a refusal of it): the
/// journal could not record it, or the kernel refused the write. The task offers such an
/// entry again (`Applier::forget`) instead of holding it as done: nothing accepted is lost.
pub fn retry(outcome: &str) -> bool {
    matches!(outcome, "kernel" | "unrecorded")
}

/// The audit record names the node the change came from.
fn with_origin<T, E>(r: Result<Done<T>, Failed<E>>, origin: &str) -> Result<Done<T>, Failed<E>> {
    let tag = |c: &mut Option<ops::Change>| {
        if let Some(c) = c
            && let Some(d) = c.detail.as_object_mut()
        {
            d.insert("origin".into(), json!(origin));
        }
    };
    match r {
        Ok(mut d) => {
            tag(&mut d.change);
            Ok(d)
        }
        Err(mut f) => {
            tag(&mut f.change);
            Err(f)
        }
    }
}

fn result<T>(node: &Node, r: Result<Done<T>, Failed>, origin: &str) -> &'static str {
    match ops::audited(node, &Actor::FLEET, with_origin(r, origin)) {
        Ok(_) => "installed",
        Err(e) => match e {
            ops::OpError::BadRequest(_) | ops::OpError::Labelled { .. } => "refused",
            ops::OpError::NotFound(_) => "not_found",
            ops::OpError::Config(_) => "config",
            ops::OpError::Kernel(_) => "kernel",
        },
    }
}
