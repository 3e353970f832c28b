//! `tollgate fleet status`.

use tollgate::control::{protocol::Request, reply::FleetStatus};

use super::{Ctx, Outcome, print::table};

/// The pool this node shares bindings, revocations, quarantines and the rates and quotas of
/// `scope = "fleet"` plans with ([fleet]; docs/fleet.md).
#[derive(clap::Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    verb: FleetVerb,
}

#[derive(clap::Subcommand)]
enum FleetVerb {
    /// The store's health, this node's sync position and queue, and every member with the
    /// age of its last heartbeat, then the shares of the fleet-wide plans' top identities. A
    /// member whose heartbeat is old (seconds, not ms) is cut off or gone; a growing outbox
    /// means the store does not take this node's changes; "unshared" changes hold on this
    /// node only (repeat them on the others).
    Status,
}

pub fn run(a: FleetArgs, ctx: &Ctx) -> Outcome {
    match a.verb {
        FleetVerb::Status => super::call(
            &ctx.socket,
            &Request::FleetStatus {},
            ctx.print_with(|s: &FleetStatus| print!("{}", text(s))),
        ),
    }
}

fn ms(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| format!("{v} ms"))
}

fn text(s: &FleetStatus) -> String {
    let mut out = format!(
        "pool {} · node {}\nstore {}{}: {}{}\nsync: last pass {} ago (interval {} ms), position {} ({} ms behind the stream), {} entries held\noutbox: {} waiting\n",
        s.pool,
        s.node,
        s.store,
        s.primary
            .as_ref()
            .map_or(String::new(), |p| format!(" (primary {p})")),
        if s.store_up { "up" } else { "DOWN" },
        match (&s.last_error, s.down_for_ms) {
            (Some(e), Some(d)) => format!(" for {d} ms ({e})"),
            _ => String::new(),
        },
        ms(s.sync_age_ms),
        s.sync_interval_ms,
        s.position,
        s.stream_lag_ms,
        s.held,
        s.outbox,
    );
    let cells: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.node.clone(),
                m.heartbeat_age_ms.map_or("-".into(), |a| format!("{a} ms")),
                m.outbox.map_or("-".into(), |v| v.to_string()),
                m.bindings.map_or("-".into(), |v| v.to_string()),
            ]
        })
        .collect();
    out.push_str(&table(
        &["member", "heartbeat", "outbox", "bindings"],
        &cells,
    ));
    let line = |name: &str, m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{name}: {}\n", parts.join(" "))
    };
    out.push_str(&line("refused", &s.refused));
    out.push_str(&line("published", &s.published));
    out.push_str(&line("installed", &s.installs));
    out.push_str(&line("claims", &s.claims));
    if s.global_identities > 0 {
        out.push_str(&format!(
            "fleet-wide plans: {} identities, pool of {}{}\n",
            s.global_identities,
            s.pool_size,
            if s.global_outage {
                " (store out: [fleet.outage] modes)"
            } else {
                ""
            }
        ));
        let rate = |v: Option<u64>| v.map_or("unlimited".into(), |v| v.to_string());
        let cells: Vec<Vec<String>> = s
            .shares
            .iter()
            .map(|v| {
                vec![
                    v.identity.clone(),
                    format!("{}/{}", v.demand_packets, v.demand_bytes),
                    v.nodes.to_string(),
                    rate(v.packets_per_s),
                    rate(v.bytes_per_s),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "identity",
                "demand pkts/bytes",
                "nodes",
                "share pps",
                "share cost/s",
            ],
            &cells,
        ));
    }
    out
}
