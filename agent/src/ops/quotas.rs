//! Quotas: what each identity spent in its windows, and resetting them.

use tollgate_common::policy::ID_QUOTA_EXHAUSTED;

use super::{Change, Done, Failed, OpError};
use crate::{
    control::reply::{QuotaReset, QuotaRow, QuotaWindow, Quotas},
    controller::{
        quota::{QuotaLimits, Spent, Window},
        response::ResponseLimits,
    },
    node::Node,
};

fn known(node: &Node, only: Option<&str>) -> Result<(), OpError> {
    match only {
        Some(n) if node.identities().slot(n).is_none() => Err(OpError::no_identity(n)),
        _ => Ok(()),
    }
}

fn window(spent: &Spent, w: Window, quota: &QuotaLimits, response: &ResponseLimits) -> QuotaWindow {
    let limits = quota.get(w);
    let (bytes, cost) = spent.get(w);
    let (tokens, money_nano) = spent.usage(w);
    let (tokens_limit, money_limit_nano) = quota.usage(w);
    QuotaWindow {
        tokens,
        tokens_limit,
        money_nano,
        money_limit_nano,
        bytes,
        bytes_limit: limits.0,
        cost,
        cost_limit: limits.1,
        ends_unix: spent.window_ends(w),
        response_bytes: spent.response(w),
        response_bytes_limit: response.window(w),
    }
}

/// Spending per identity (every identity that spent, or `only`).
pub fn show(node: &Node, only: Option<&str>) -> Result<Quotas, OpError> {
    known(node, only)?;
    let ids = node.identities();
    let mut rows = Vec::new();
    for (name, spent) in &node.control.quotas.spent {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let plan = ids.get(name).map(|r| r.plan);
        let p = plan.and_then(|p| node.config.plan(p));
        let limits = p.map(|p| p.quota).unwrap_or_default();
        let response = p.map(|p| p.response).unwrap_or_default();
        let fleet = p.filter(|p| p.fleet_wide()).map(|_| {
            Window::ALL
                .into_iter()
                .filter_map(|w| {
                    let v = node.state.fleet.spend_view(name, w)?;
                    Some((w.as_str().to_owned(), (v.bytes, v.cost)))
                })
                .collect()
        });
        rows.push(QuotaRow {
            identity: name.clone(),
            plan: plan.map(str::to_owned),
            minute: window(spent, Window::Minute, &limits, &response),
            day: window(spent, Window::Day, &limits, &response),
            month: window(spent, Window::Month, &limits, &response),
            exhausted: node
                .control
                .exhausted_reason(&node.config, plan, name)
                .map(str::to_owned),
            currency: node.config.prices.currency.clone(),
            fleet,
            response_bytes_per_second: response.bytes_per_second,
            response_capped: node
                .control
                .response_cap(name)
                .and_then(|c| c.over)
                .map(|o| o.describe()),
        });
    }
    Ok(rows)
}

/// Forgets the spending of `only` (or everyone's) and lifts the exhausted flags.
pub fn reset(node: &mut Node, only: Option<&str>) -> Result<Done<QuotaReset>, Failed> {
    known(node, only)?;
    node.control.quotas.reset(only);
    node.control
        .quotas
        .save(&node.config.node.state_dir)
        .map_err(|e| OpError::Kernel(e.to_string()))?;
    let ids: Vec<u32> = match only {
        Some(n) => node.identities().slot(n).into_iter().collect(),
        None => node.state.identity_ids.values().copied().collect(),
    };
    for id in ids {
        node.pinned
            .tables
            .update_identity_flags(id, 0, ID_QUOTA_EXHAUSTED, None)?;
    }
    node.control.forget_exhausted(only);
    let reply = QuotaReset {
        identity: only.map(str::to_owned),
        reset: true,
    };
    let change = Change::new("quota_reset", "operator", &reply);
    Ok(Done::changed(reply, change))
}
