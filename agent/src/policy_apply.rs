//! Makes the kernel's tables say what the configuration and the persisted state say:
//! settings, endpoints and their ports, identities, bindings. Writes only differences, in an
//! order that never leaves a packet pointing at nothing (records before the ports or
//! bindings that refer to them, references before the records they refer to are cleared).

use std::{collections::BTreeMap, net::IpAddr};

use tollgate_common::{
    flow::FlowPolicy,
    limiter,
    policy::{Endpoint, MAX_ENDPOINTS, Q8_ONE, port_slot},
};

/// What an apply changed, for the log and the audit line.
pub use crate::control::reply::Applied;
use crate::{
    config::Config,
    identity::Resolver,
    net::prefix_text,
    state::State,
    tables::{KernelTables, TableError, to_q8},
};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Tables(#[from] TableError),
    #[error("no free identity slot for {0} ({1} slots: raise limits.identities)")]
    NoIdentitySlot(String, u32),
}

/// The kernel's expiry (CLOCK_MONOTONIC, `kernel_clock::now_ns`) for a wall-clock expiry,
/// `None` if already past.
pub fn expiry_boot_ns(expires_unix_ms: Option<u64>, now_ms: u64) -> Option<u64> {
    match expires_unix_ms {
        None => Some(0),
        Some(e) if e <= now_ms => None,
        // +1: an expiry of 0 means "never" to the kernel.
        Some(e) => Some(crate::kernel_clock::now_ns() + (e - now_ms) * 1_000_000 + 1),
    }
}

/// What [`settle`] decided, for [`enforce`] to write to the kernel.
#[derive(Debug, Default)]
pub struct Settled {
    applied: Applied,
    /// Identity name -> slot, of every identity the kernel is to know.
    ids: BTreeMap<String, u32>,
    /// Slots newly given out (perhaps used before): cleared before they are written.
    fresh: Vec<u32>,
    /// Slots of identities that went: cleared once nothing points at them.
    gone: Vec<u32>,
}

/// Brings `state` in line with `config` without touching the kernel: slots for configured
/// and token identities, none for identities that went, no run-time bindings of those or
/// past their expiry, no token identities past theirs. So a reload can record what it
/// changes before it changes the kernel ([`enforce`]).
pub fn settle(config: &Config, state: &mut State, now_ms: u64) -> Result<Settled, PolicyError> {
    let mut out = Settled::default();
    let configured: BTreeMap<&str, &crate::config::StaticIdentity> = config
        .identities
        .iter()
        .map(|i| (i.name.as_str(), i))
        .collect();
    // Token identities the configuration does not name live on until their tokens expire
    // (the daemon frees them); a token identity whose plan left the configuration goes.
    state.token_identities.retain(|name, t| {
        let keep = !configured.contains_key(name.as_str())
            && t.expires_unix_ms > now_ms
            && config.plan_index(&t.plan).is_some();
        if !keep {
            out.applied.identities_removed.push(name.clone());
        }
        keep
    });
    let gone: Vec<String> = state
        .identity_ids
        .keys()
        .filter(|n| {
            !configured.contains_key(n.as_str()) && !state.token_identities.contains_key(*n)
        })
        .cloned()
        .collect();
    // Slots are given out before the gone ones are freed: a slot is never handed from an
    // identity that went to a new one in the same apply (its counters would carry over).
    let names: Vec<String> = config
        .identities
        .iter()
        .map(|i| i.name.clone())
        .chain(state.token_identities.keys().cloned())
        .collect();
    // The kernel's tables have these sizes: the pins were migrated to them at start.
    let slots = config.limits.sizes.identities;
    for name in names {
        let fresh = !state.identity_ids.contains_key(&name);
        let id = state
            .identity_id(&name, slots)
            .ok_or_else(|| PolicyError::NoIdentitySlot(name.clone(), slots))?;
        if fresh {
            out.fresh.push(id);
        }
        out.ids.insert(name, id);
    }
    let ids = &out.ids;
    let dropped = &mut out.applied.dropped_dynamic_bindings;
    state.bindings.retain(|b| {
        let keep = ids.contains_key(&b.identity) && !b.expired(now_ms);
        if !keep {
            dropped.push(format!(
                "{} ({})",
                prefix_text(b.addr, b.prefix_len),
                b.identity
            ));
        }
        keep
    });
    // A quarantine stays: only a release or its own expiry ends one, and it is applied
    // again when the name gets a slot again (from the configuration or a token).
    for name in gone {
        if let Some(id) = state.identity_ids.remove(&name) {
            out.gone.push(id);
        }
        out.applied.identities_removed.push(name);
    }
    Ok(out)
}

/// Applies `config` and `state` to the kernel. `state` loses entries that no longer apply
/// (identities gone from the config, expired run-time bindings); the caller records it.
pub fn apply(
    config: &Config,
    state: &mut State,
    tables: &mut KernelTables,
    now_ms: u64,
) -> Result<Applied, PolicyError> {
    let settled = settle(config, state, now_ms)?;
    enforce(config, state, tables, settled, now_ms)
}

/// Makes the kernel say what `config` and `state` (as [`settle`] left it) say.
pub fn enforce(
    config: &Config,
    state: &State,
    tables: &mut KernelTables,
    settled: Settled,
    now_ms: u64,
) -> Result<Applied, PolicyError> {
    let Settled {
        mut applied,
        ids,
        fresh,
        gone,
    } = settled;

    // Settings.
    let mut settings = tables.settings()?;
    settings.pressure_q8 = to_q8(config.controller.pressure);
    if settings.pressure_q8 == 0 {
        settings.pressure_q8 = Q8_ONE;
    }
    settings.anon_pps = config.anonymous.packets_per_second;
    settings.anon_tau_ns =
        limiter::packet_tau_ns(config.anonymous.packets_per_second, config.anonymous.burst);
    settings.drop_event_interval_ns = config.drop_events.interval_ms.saturating_mul(1_000_000);
    crate::kernel_clock::settle_settings(tables, &mut settings)?;
    tables.set_settings(&settings)?;

    // Endpoints: records first, then the port table, then stale records.
    let mut desired_ports: BTreeMap<u32, u32> = BTreeMap::new();
    for (i, ep) in config.endpoints.iter().enumerate() {
        let id = i as u32 + 1;
        tables.set_endpoint_record(id, &ep.spec.to_kernel()?)?;
        for range in &ep.port_ranges {
            for port in range.clone() {
                if let Some(slot) = port_slot(ep.spec.proto.number(), port) {
                    desired_ports.insert(slot, id);
                }
            }
        }
    }
    applied.endpoints = config.endpoints.len();
    let current = tables.port_table()?;
    for (slot, have) in current.iter().enumerate() {
        let want = desired_ports.get(&(slot as u32)).copied().unwrap_or(0);
        if *have != want {
            tables.set_port_slot(slot as u32, want)?;
            applied.port_slots_changed += 1;
        }
    }
    for id in config.endpoints.len() as u32 + 1..MAX_ENDPOINTS {
        if tables.endpoint_record(id)? != Endpoint::default() {
            tables.set_endpoint_record(id, &Endpoint::default())?;
        }
    }
    // Flow settings: each endpoint's, and none for the ids no endpoint has (an endpoint
    // that went must not leave its caps for the next one to get its id).
    let flow_policies = tables.flow_policy_table()?;
    for (id, have) in flow_policies.iter().enumerate().skip(1) {
        let want = config
            .endpoints
            .get(id - 1)
            .map_or_else(FlowPolicy::default, |ep| ep.flow);
        if *have != want {
            tables.set_flow_policy(id as u32, &want)?;
        }
    }

    // Identities: a newly given slot is cleared first, so its occupant gets no budget, flags
    // or counters of the last.
    // Batch writes (`tables::bulk`): a start with 100 000 identities is a few dozen
    // syscalls, not three per fresh slot and two per identity.
    tables.clear_identities(&fresh)?;
    let resolver = Resolver::new(config, state);
    let mut records = Vec::with_capacity(ids.len());
    for ident in &config.identities {
        let Some(r) = resolver.get(&ident.name) else {
            continue; // configured, so always found
        };
        let rec = resolver.record(&r, state.quarantined(&ident.name, now_ms));
        records.push((ids[&ident.name], rec));
    }
    for (name, t) in &state.token_identities {
        let Some(id) = ids.get(name).copied() else {
            continue; // settled, so always there
        };
        let rec = resolver.record(
            &crate::identity::token(name, Some(id), t),
            state.quarantined(name, now_ms),
        );
        records.push((id, rec));
    }
    tables.set_identities_keeping_controller_flags(&mut records)?;
    applied.identities = ids.len();

    // Bindings: static ones from the config, run-time ones from the state.
    let mut desired: BTreeMap<(IpAddr, u8), (u32, u64)> = BTreeMap::new();
    for ident in &config.identities {
        for (addr, len) in &ident.bind {
            desired.insert((*addr, *len), (ids[&ident.name], 0));
        }
    }
    for b in &state.bindings {
        if let (Some(exp), Some(id)) = (
            expiry_boot_ns(b.expires_unix_ms, now_ms),
            ids.get(&b.identity),
        ) {
            desired.insert((b.addr, b.prefix_len), (*id, exp));
        }
    }
    let existing = tables.bindings()?;
    for (addr, len, _) in &existing {
        if !desired.contains_key(&(*addr, *len)) {
            tables.unbind(*addr, *len)?;
            applied.bindings_removed += 1;
        }
    }
    let existing: BTreeMap<(IpAddr, u8), (u32, u64)> = existing
        .into_iter()
        .map(|(a, l, b)| ((a, l), (b.identity, b.expires_ns)))
        .collect();
    let mut writes = Vec::new();
    for ((addr, len), (id, exp)) in &desired {
        let same = existing.get(&(*addr, *len)).is_some_and(|(eid, eexp)| {
            eid == id && (eexp == exp || *exp != 0 && eexp.abs_diff(*exp) < 1_000_000_000)
        });
        if !same {
            writes.push((*addr, *len, *id, *exp));
        }
    }
    // One batch write for the exact bindings (a cold start with a million persisted ones).
    applied.bindings_added += tables.bind_many(&writes)?;
    applied.bindings = desired.len();

    // Identities that left the configuration: their bindings are gone; now their slots.
    for id in gone {
        tables.clear_identity(id)?;
    }
    Ok(applied)
}
