//! Applying a usage report: who it names, what it costs, and counting it against the plan.
//! A refused report changes nothing (no tokens counted, no flag); an accepted one is counted
//! even for an identity already cut off, since the requests it reports were in flight.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{Done, Failed, OpError};
use crate::{
    control::protocol::ErrorKind,
    controller::quota::Window,
    node::Node,
    state::now_unix_ms,
    usage::{Refusal, UsageReport, Who},
};

/// The answer to an accepted report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAccepted {
    pub identity: String,
    pub plan: String,
    pub tokens: u64,
    /// What the report cost, in nano-units of `currency` (0 when the model is unpriced and
    /// the plan has no money budget).
    pub money_nano: u64,
    pub currency: String,
    /// Tokens and money spent in the current minute, after this report.
    pub minute_tokens: u64,
    pub minute_money_nano: u64,
    /// The reason the identity is cut off now, if it is (`token_quota_exhausted`, ...).
    pub exhausted: Option<String>,
}

impl From<Refusal> for OpError {
    fn from(r: Refusal) -> OpError {
        let kind = match r {
            Refusal::UnknownIdentity(_) => ErrorKind::NotFound,
            _ => ErrorKind::BadRequest,
        };
        OpError::Labelled {
            kind,
            label: r.label(),
            message: r.message(),
        }
    }
}

/// The identity (name, slot) a live binding of `addr` names, by the kernel's own lookup: the
/// exact binding if it is live, else the longest live prefix (what `decide` finds).
fn bound_at(node: &Node, addr: IpAddr) -> Result<Option<(String, u32)>, OpError> {
    let now = crate::kernel_clock::coarse_ns();
    let slot = node
        .pinned
        .tables
        .live_binding(addr.to_canonical(), now)?
        .map(|b| b.identity);
    Ok(slot.and_then(|s| node.identities().name_of(s).map(|n| (n.to_owned(), s))))
}

/// Whom `who` names: an identity with a kernel slot, or a refusal naming what is unknown.
fn resolve(node: &Node, who: &Who) -> Result<(String, u32), Failed> {
    let unknown = |m: String| Failed::from(OpError::from(Refusal::UnknownIdentity(m)));
    let ids = node.identities();
    match who {
        Who::Identity(name) => match ids.get(name).and_then(|r| r.slot) {
            Some(slot) => Ok((name.clone(), slot)),
            None => Err(unknown(format!("no identity named {name:?} on this node"))),
        },
        Who::Client(addr) => bound_at(node, *addr)?
            .ok_or_else(|| unknown(format!("{addr} is not bound to any identity now"))),
        Who::TokenId(id) => {
            if node.state.revoked_tokens.contains_key(id) {
                return Err(unknown(format!("token id {id:?} is revoked")));
            }
            let now = now_unix_ms();
            let name = node
                .state
                .bindings
                .iter()
                .find(|b| b.token_id.as_deref() == Some(id.as_str()) && !b.expired(now))
                .map(|b| b.identity.clone());
            match name.and_then(|n| ids.slot(&n).map(|s| (n, s))) {
                Some(found) => Ok(found),
                None => Err(unknown(format!(
                    "token id {id:?} holds no live binding on this node"
                ))),
            }
        }
    }
}

/// A refusal a server made before the report reached [`report`] (a body too large, one that
/// does not parse, a missing secret): counted like the others, answered as an error.
pub fn refused(node: &mut Node, r: Refusal) -> OpError {
    node.usage.count(r.label());
    OpError::from(r)
}

/// Counts `report` against its identity. `size`: the bytes it arrived in (over
/// `[usage] max_report_bytes`: refused). Every outcome is counted for `/metrics`.
pub fn report(
    node: &mut Node,
    report: &UsageReport,
    size: usize,
) -> Result<Done<UsageAccepted>, Failed> {
    let r = apply(node, report, size);
    let outcome = match &r {
        Ok(_) => "accepted",
        Err(f) => match &f.error {
            OpError::Labelled { label, .. } => label,
            _ => "bad_report",
        },
    };
    node.usage.count(outcome);
    r
}

fn apply(
    node: &mut Node,
    report: &UsageReport,
    size: usize,
) -> Result<Done<UsageAccepted>, Failed> {
    let max = node.config.usage.max_report_bytes;
    if size > max {
        return Err(OpError::from(Refusal::TooLarge(max)).into());
    }
    // The bucket first: a flood of reports costs a comparison each, not a lookup.
    let rate = node.config.usage.max_reports_per_s;
    if !node.usage.admit(rate, crate::clock::now_ms()) {
        return Err(OpError::from(Refusal::RateLimited).into());
    }
    report.check().map_err(OpError::from)?;
    let (name, slot) = resolve(node, &report.who)?;
    let plan_name = node
        .identities()
        .get(&name)
        .map(|r| r.plan.to_owned())
        .unwrap_or_default();
    let limits = node
        .config
        .plan(&plan_name)
        .map(|p| p.quota)
        .unwrap_or_default();
    let u = report.usage;
    let money = node
        .config
        .prices
        .cost(&report.model, u.prompt_tokens, u.completion_tokens);
    let money = match money {
        Some(m) => m,
        // Counting it at 0 would let an unpriced model spend a money plan for free.
        None if limits.has_money() => {
            return Err(OpError::from(Refusal::UnpricedModel {
                model: report.model.clone(),
                plan: plan_name,
            })
            .into());
        }
        None => 0,
    };
    let tokens = report.tokens();
    let n = &mut *node;
    n.control.usage_reported(
        &name,
        slot,
        &plan_name,
        &limits,
        tokens,
        money,
        &mut n.pinned.tables,
        &n.audit,
    );
    n.usage.prompt_tokens += u.prompt_tokens;
    n.usage.completion_tokens += u.completion_tokens;
    n.usage.money_nano += money;
    let (minute_tokens, minute_money_nano) = n
        .control
        .quotas
        .spent
        .get(&name)
        .map(|s| s.usage(Window::Minute))
        .unwrap_or_default();
    let exhausted = n
        .control
        .exhausted_reason(&n.config, Some(&plan_name), &name)
        .map(str::to_owned);
    Ok(Done::read(UsageAccepted {
        identity: name,
        plan: plan_name,
        tokens,
        money_nano: money,
        currency: n.config.prices.currency.clone(),
        minute_tokens,
        minute_money_nano,
        exhausted,
    }))
}
