//! The read verbs: status, endpoints, identities, explain. Nothing here changes the node.

use std::collections::{BTreeMap, HashMap};

use tollgate_common::{
    Verdict,
    policy::{Class, IdentityCounters},
};

use super::OpError;
use crate::{
    config::GpuSourceKind,
    control::reply::{
        EndpointRow, Endpoints, Explained, GpuStatus, Identities, Identity, IdentityRow,
        QuarantineInfo, Status, TokenStatus,
    },
    counter_read::{reason_endpoint_totals, reason_totals},
    explain::{self, Probe},
    identity::Resolved,
    kernel_clock::{self, Clock},
    net::mask,
    node::Node,
    state::now_unix_ms,
};

fn label_of<T: std::fmt::Debug>(v: T) -> String {
    format!("{v:?}").to_lowercase()
}

fn gpu_source(k: GpuSourceKind) -> String {
    label_of(k)
}

/// The program object in use and the failed loads recorded in the state directory.
fn program_status(node: &Node) -> crate::control::reply::ProgramStatus {
    let failures = crate::object::load_failures(&node.config.node.state_dir);
    crate::control::reply::ProgramStatus {
        object: crate::object::source(),
        load_failures: failures.total,
        last_load_failure: failures.last.map(|f| {
            format!(
                "at unix {} s: {}: {}",
                f.at_unix_ms / 1000,
                f.object,
                f.error
            )
        }),
    }
}

pub fn status(node: &Node) -> Result<Status, OpError> {
    let totals = reason_totals(node.pinned.tables.reason_counters())
        .map_err(|e| OpError::Kernel(e.to_string()))?;
    let (mut passed, mut dropped) = (0u64, 0u64);
    let mut drops = BTreeMap::new();
    for (r, c) in &totals {
        if r.verdict() == Verdict::Pass {
            passed += c.packets;
        } else {
            dropped += c.packets;
            if c.packets != 0 {
                drops.insert(r.label().to_owned(), c.packets);
            }
        }
    }
    let config = &node.config;
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        config: config.source.clone(),
        interfaces: node.attached.clone(),
        xdp_mode: config.node.xdp_mode.label().to_owned(),
        pin_dir: config.node.pin_dir.clone(),
        adopted_pins: node.pinned.adopted,
        layout_version: tollgate_common::LAYOUT_VERSION,
        uptime_s: (now_unix_ms() - node.started_unix_ms) / 1000,
        endpoints: config.endpoints.len(),
        identities: node.state.identity_ids.len(),
        bindings: node.pinned.tables.binding_counts().iter().sum(),
        quarantined: node.state.quarantines.keys().cloned().collect(),
        response_capped: node.control.response_capped_names(),
        passed_packets: passed,
        dropped_packets: dropped,
        drops,
        gpu: GpuStatus {
            source: gpu_source(config.controller.gpu_source),
            error: node.control.gpu_error.clone(),
            readings: node.control.readings.clone(),
            saturated_endpoints: node.control.saturated(config),
            endpoints: node.control.loads(config),
        },
        anomaly_mode: label_of(config.anomaly.mode),
        tokens: node.tokens.as_ref().map(token_status),
        tunnels: node.tunnels.report(),
        program: program_status(node),
        fleet: fleet_scope(node),
        tables: tables_status(node),
        clock: Some(clock_status(node)?),
    })
}

/// `status.clock`: the tick and the plans the kernel charges on the precise clock.
fn clock_status(node: &Node) -> Result<crate::control::reply::ClockStatus, OpError> {
    let tick = crate::kernel_clock::tick();
    let precise_plans = node
        .config
        .plans
        .iter()
        .filter(|p| crate::kernel_clock::clock_for(&p.limits.to_kernel()) == Clock::Precise)
        .map(|p| p.name.clone())
        .collect();
    Ok(crate::control::reply::ClockStatus {
        tick_ns: tick.ns,
        tick_source: tick.source,
        precise_plans,
        anonymous: Clock::of_anonymous(&node.pinned.tables.settings()?),
    })
}

/// `status.tables`.
fn tables_status(node: &Node) -> crate::control::reply::TablesStatus {
    let maps: Vec<crate::control::reply::TableStatus> = node
        .pinned
        .tables
        .memory()
        .into_iter()
        .map(
            |(map, max_entries, bytes)| crate::control::reply::TableStatus {
                map: map.to_owned(),
                max_entries,
                bytes,
            },
        )
        .collect();
    crate::control::reply::TablesStatus {
        kernel_memory: maps.iter().map(|m| m.bytes).sum(),
        allowance: node.config.limits.allowance,
        maps,
    }
}

/// "8000" or "8000-8010".
fn port_range(r: &std::ops::RangeInclusive<u16>) -> String {
    if r.start() == r.end() {
        r.start().to_string()
    } else {
        format!("{}-{}", r.start(), r.end())
    }
}

/// `status.fleet`.
fn fleet_scope(node: &Node) -> Option<crate::control::reply::FleetScope> {
    let l = node.fleet.as_ref()?;
    Some(crate::control::reply::FleetScope {
        pool: l.pool.clone(),
        node: l.node.clone(),
        store_up: l.health.up,
        outbox: l.outbox.len(),
        members: l.members.len(),
    })
}

/// `tollgate fleet status`: the pool as this node sees it.
pub fn fleet(node: &Node) -> Result<crate::control::reply::FleetStatus, OpError> {
    use crate::control::reply::{FleetMember, FleetStatus};
    let l = node.fleet.as_ref().ok_or_else(|| {
        OpError::NotFound("this node is in no pool: [fleet] is not configured".into())
    })?;
    let now = crate::clock::now_ms();
    let wall = crate::clock::wall_ms() as i64;
    let labels = |m: &std::collections::BTreeMap<&'static str, u64>| {
        m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    };
    Ok(FleetStatus {
        pool: l.pool.clone(),
        node: l.node.clone(),
        store: l.store.clone(),
        primary: l.primary.clone(),
        store_up: l.health.up,
        last_error: l.health.last_error.clone(),
        down_for_ms: l.health.down_since_ms.map(|s| now.saturating_sub(s)),
        sync_age_ms: l.health.last_sync_ms.map(|s| now.saturating_sub(s)),
        sync_interval_ms: l.sync_interval.as_millis() as u64,
        position: l.position.clone(),
        stream_lag_ms: l.stream_lag_ms,
        held: l.held,
        outbox: l.outbox.len(),
        members: l
            .members
            .iter()
            .map(|m| FleetMember {
                node: m.node.clone(),
                // A forged heartbeat may say anything: an absurd time is no age.
                heartbeat_age_ms: m
                    .heartbeat_wall_ms
                    .and_then(|w| i64::try_from(w).ok())
                    .and_then(|w| wall.checked_sub(w)),
                outbox: m.outbox,
                bindings: m.bindings,
            })
            .collect(),
        refused: labels(&l.stats.refused),
        published: labels(&l.stats.published),
        installs: l
            .stats
            .installs
            .iter()
            .map(|((k, o), v)| (format!("{k}/{o}"), *v))
            .collect(),
        claims: labels(&l.stats.claims),
        unshared: l.stats.unshared,
        outbox_dropped: l.outbox.dropped,
        reloads: labels(&l.stats.reloads),
        reseeded: l.stats.reseeded,
        shares: node
            .state
            .fleet
            .top(crate::control::reply::FLEET_TOP_SHARES),
        global_identities: node.state.fleet.tracked(),
        global_outage: node.state.fleet.in_outage(),
        pool_size: node.state.fleet.pool(),
    })
}

pub fn endpoints(node: &Node) -> Result<Endpoints, OpError> {
    let per = reason_endpoint_totals(node.pinned.tables.reason_counters())
        .map_err(|e| OpError::Kernel(e.to_string()))?;
    Ok(node
        .config
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| {
            let id = i as u32 + 1;
            let (mut passed, mut dropped) = (0u64, 0u64);
            for (r, e, c) in &per {
                if *e == id {
                    if r.verdict() == Verdict::Pass {
                        passed += c.packets;
                    } else {
                        dropped += c.packets;
                    }
                }
            }
            EndpointRow {
                id,
                name: ep.name.clone(),
                protocol: ep.spec.proto,
                ports: ep.port_ranges.iter().map(port_range).collect(),
                weight: ep.spec.weight,
                classes: ep.spec.allowed_classes.clone(),
                roles: ep.role_names.clone(),
                anonymous: ep.spec.anonymous,
                passed_packets: passed,
                dropped_packets: dropped,
            }
        })
        .collect())
}

/// The kernel's bindings as text, grouped by identity slot (one pass: listing thousands of
/// identities stays linear).
fn bindings_by_slot(node: &Node) -> Result<HashMap<u32, Vec<String>>, OpError> {
    // The kernel judges expiry on its coarse monotonic clock.
    let now_boot = kernel_clock::coarse_ns();
    let mut by_id: HashMap<u32, Vec<String>> = HashMap::new();
    for (a, l, b) in node.pinned.tables.bindings()? {
        let net = mask(a, l);
        let text = if b.expires_ns == 0 {
            format!("{net}/{l}")
        } else if b.expires_ns > now_boot {
            format!(
                "{net}/{l} (expires in {}s)",
                (b.expires_ns - now_boot) / 1_000_000_000
            )
        } else {
            format!("{net}/{l} (expired)")
        };
        by_id.entry(b.identity).or_default().push(text);
    }
    Ok(by_id)
}

fn row(
    node: &Node,
    r: &Resolved<'_>,
    id: u32,
    bindings: Vec<String>,
    c: IdentityCounters,
    record: &tollgate_common::policy::Identity,
    egress: Option<tollgate_common::flow::EgressCounters>,
) -> IdentityRow {
    IdentityRow {
        id,
        name: r.name.to_owned(),
        class: r.class,
        plan: r.plan.to_owned(),
        roles: r.roles.to_vec(),
        source: r.source,
        bindings,
        quarantined: node.state.quarantines.get(r.name).map(|q| QuarantineInfo {
            reason: q.reason.clone(),
            until_unix_ms: q.until_unix_ms,
            by: q.by.clone(),
        }),
        passed_packets: c.passed.packets,
        passed_bytes: c.passed.bytes,
        dropped_packets: c.dropped.packets,
        dropped_bytes: c.dropped.bytes,
        clock: Some(Clock::of_identity(record)),
        egress: egress.map(Into::into),
        response_capped: response_capped(node, r.name, record),
        quota_exhausted: node
            .control
            .exhausted_reason(&node.config, Some(r.plan), r.name)
            .map(str::to_owned),
    }
}

/// The response cap `name` is held by: the controller's figures, or (flagged in the kernel,
/// not judged yet since a start) the flag alone.
fn response_capped(
    node: &Node,
    name: &str,
    record: &tollgate_common::policy::Identity,
) -> Option<String> {
    if record.flags & tollgate_common::policy::ID_RESPONSE_CAPPED == 0 {
        return None;
    }
    Some(
        node.control
            .response_cap(name)
            .and_then(|c| c.over)
            .map_or_else(
                || "response cap (judged again at the next interval)".to_owned(),
                |o| o.describe(),
            ),
    )
}

/// Every identity with a slot, by slot. The counters are read in one batch pass (what
/// `tollgate top` polls every second), not one syscall per identity.
pub fn identities(node: &Node) -> Result<Identities, OpError> {
    let mut by_id = bindings_by_slot(node)?;
    let upto = node.state.identity_ids.values().max().map_or(1, |m| m + 1);
    let counters = node.pinned.tables.identity_counters_upto(upto)?;
    let records = node.pinned.tables.identities_upto(upto)?;
    // What went back to them; a failed read leaves the field out rather than the list.
    let sent = node.pinned.tables.egress_identities_upto(upto).ok();
    let mut rows = Vec::new();
    for r in node.identities().all() {
        let Some(id) = r.slot else { continue };
        let c = counters.get(id as usize).copied().unwrap_or_default();
        let rec = records.get(id as usize).copied().unwrap_or_default();
        rows.push(row(
            node,
            &r,
            id,
            by_id.remove(&id).unwrap_or_default(),
            c,
            &rec,
            sent.as_ref()
                .map(|s| s.get(id as usize).copied().unwrap_or_default()),
        ));
    }
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub fn identity(node: &Node, name: &str) -> Result<Identity, OpError> {
    let ids = node.identities();
    let (Some(r), Some(id)) = (ids.get(name), ids.slot(name)) else {
        return Err(OpError::no_identity(name));
    };
    let bindings = bindings_by_slot(node)?.remove(&id).unwrap_or_default();
    let c = node.pinned.tables.identity_counters(id)?;
    let rec = node.pinned.tables.identity(id)?;
    let sent = node
        .pinned
        .tables
        .egress_identities_upto(id + 1)
        .ok()
        .map(|s| s.get(id as usize).copied().unwrap_or_default());
    Ok(row(node, &r, id, bindings, c, &rec, sent))
}

struct Names<'a>(&'a Node);

impl explain::Names for Names<'_> {
    fn endpoint(&self, id: u32) -> Option<String> {
        self.0
            .config
            .endpoints
            .get(id.checked_sub(1)? as usize)
            .map(|e| e.name.clone())
    }
    fn identity(&self, id: u32) -> Option<String> {
        self.0.identities().name_of(id).map(str::to_owned)
    }
    fn response_cap(&self, name: &str) -> Option<String> {
        let c = self.0.control.response_cap(name)?;
        Some(c.over.map_or_else(
            || {
                "a response cap set before this agent started (judged again at the next interval)"
                    .to_owned()
            },
            |o| o.describe(),
        ))
    }
}

pub fn explain(node: &Node, probe: &Probe) -> Result<Explained, OpError> {
    let e = explain::explain(&node.pinned.tables, &Names(node), probe)
        .map_err(|e| OpError::BadRequest(e.to_string()))?;
    let scope = plan_scope(node, e.identity.as_deref());
    // Which quota the flag stands for is the controller's to say, not the kernel's.
    let quota_reason = e
        .identity
        .as_deref()
        .filter(|_| e.reason == "quota_exhausted")
        .and_then(|n| {
            let plan = node.identities().get(n).map(|r| r.plan);
            node.control.exhausted_reason(&node.config, plan, n)
        });
    let why = match quota_reason {
        Some(r @ ("token_quota_exhausted" | "budget_exhausted")) => format!(
            "{} ({r}: the plan's {} in this window is spent, as the usage feed reported)",
            e.why,
            if r == "budget_exhausted" {
                "budget"
            } else {
                "tokens"
            }
        ),
        _ => e.why,
    };
    Ok(Explained {
        quota_reason: quota_reason.map(str::to_owned),
        verdict: e.verdict.to_owned(),
        reason: e.reason.to_owned(),
        endpoint_id: e.endpoint_id,
        endpoint: e.endpoint,
        identity_id: e.identity_id,
        identity: e.identity,
        class: e.class.and_then(Class::from_label),
        binding: e.binding,
        clock: e.clock.map(str::to_owned),
        why: match scope {
            Some(s) => format!("{why} ({s})"),
            None => why,
        },
    })
}

/// "plan P is fleet-wide: this node's share …" for an identity on a fleet-wide plan.
fn plan_scope(node: &Node, identity: Option<&str>) -> Option<String> {
    let name = identity?;
    let ids = node.identities();
    let plan = node.config.plan(ids.get(name)?.plan)?;
    if !plan.fleet_wide() {
        return None;
    }
    let s = node.state.fleet.limits_for(name, plan);
    let rate = |v: Option<u64>| v.map_or("unlimited".to_owned(), |v| v.to_string());
    Some(format!(
        "plan {} is fleet-wide: this node's share is {} packets/s, {} cost/s",
        plan.name,
        rate(s.packets_per_s),
        rate(s.bytes_per_s)
    ))
}

fn nonzero(
    m: &std::collections::BTreeMap<&'static str, u64>,
) -> std::collections::BTreeMap<String, u64> {
    m.iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| ((*k).to_owned(), *n))
        .collect()
}

fn token_status(t: &crate::token_bind::TokenService) -> TokenStatus {
    let issuers: Vec<crate::control::reply::IssuerStatus> = t
        .issuers
        .iter()
        .map(|i| crate::control::reply::IssuerStatus {
            issuer: i.policy.issuer.clone(),
            audiences: i.policy.audiences.clone(),
            keys: i.keys.status(),
            verified: i.ok,
            refusals: nonzero(&i.refusals),
        })
        .collect();
    TokenStatus {
        keys: issuers.iter().flat_map(|i| i.keys.kids.clone()).collect(),
        verifications: t
            .results
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        probable_thefts: t.thefts,
        issuers,
        unselected_refusals: nonzero(&t.unselected),
    }
}
