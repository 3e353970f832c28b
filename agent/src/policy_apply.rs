//! Makes the kernel's tables say what the configuration and the persisted state say:
//! settings, endpoints and their ports, identities, bindings. Writes only differences, in an
//! order that never leaves a packet pointing at nothing (records before the ports or
//! bindings that refer to them, references before the records they refer to are cleared).

use std::{collections::BTreeMap, net::IpAddr};

use tollgate_common::{
    limiter,
    policy::{Endpoint, MAX_ENDPOINTS, MAX_IDENTITIES, Q8_ONE, port_slot},
};

/// What an apply changed, for the log and the audit line.
pub use crate::control::reply::Applied;
use crate::{
    config::Config,
    identity::Resolver,
    net::prefix_text,
    state::State,
    tables::{KernelTables, TableError, boot_ns, to_q8},
};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Tables(#[from] TableError),
    #[error("no free identity slot for {0} ({MAX_IDENTITIES} slots)")]
    NoIdentitySlot(String),
}

/// CLOCK_BOOTTIME expiry for a wall-clock expiry, `None` if already past.
pub fn expiry_boot_ns(expires_unix_ms: Option<u64>, now_ms: u64) -> Option<u64> {
    match expires_unix_ms {
        None => Some(0),
        Some(e) if e <= now_ms => None,
        // +1: an expiry of 0 means "never" to the kernel.
        Some(e) => Some(boot_ns() + (e - now_ms) * 1_000_000 + 1),
    }
}

/// The slot of `name`; a newly allocated one (perhaps used before) is cleared first, so its
/// occupant gets no budget, flags or counters of the last.
fn slot_for(state: &mut State, tables: &mut KernelTables, name: &str) -> Result<u32, PolicyError> {
    let fresh = !state.identity_ids.contains_key(name);
    let id = state
        .identity_id(name, MAX_IDENTITIES)
        .ok_or_else(|| PolicyError::NoIdentitySlot(name.to_owned()))?;
    if fresh {
        tables.clear_identity(id)?;
    }
    Ok(id)
}

/// Applies `config` and `state` to the kernel. `state` loses entries that no longer apply
/// (identities gone from the config, expired run-time bindings); the caller saves it.
pub fn apply(
    config: &Config,
    state: &mut State,
    tables: &mut KernelTables,
    now_ms: u64,
) -> Result<Applied, PolicyError> {
    let mut applied = Applied::default();

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

    // Identities: configured ones get (or keep) a slot.
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
            applied.identities_removed.push(name.clone());
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
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    for ident in &config.identities {
        let id = slot_for(state, tables, &ident.name)?;
        let resolver = Resolver::new(config, state);
        let Some(r) = resolver.get(&ident.name) else {
            continue; // configured, so always found
        };
        let rec = resolver.record(&r, state.quarantined(&ident.name, now_ms));
        tables.set_identity_keeping_controller_flags(id, &rec)?;
        ids.insert(ident.name.clone(), id);
    }
    let token_names: Vec<String> = state.token_identities.keys().cloned().collect();
    for name in token_names {
        let t = state.token_identities[&name].clone();
        let id = slot_for(state, tables, &name)?;
        let rec = Resolver::new(config, state).record(
            &crate::identity::token(&name, Some(id), &t),
            state.quarantined(&name, now_ms),
        );
        tables.set_identity_keeping_controller_flags(id, &rec)?;
        ids.insert(name, id);
    }
    applied.identities = ids.len();

    // Bindings: static ones from the config, run-time ones from the state.
    state.bindings.retain(|b| {
        let keep = ids.contains_key(&b.identity) && !b.expired(now_ms);
        if !keep {
            applied.dropped_dynamic_bindings.push(format!(
                "{} ({})",
                prefix_text(b.addr, b.prefix_len),
                b.identity
            ));
        }
        keep
    });
    let mut desired: BTreeMap<(IpAddr, u8), (u32, u64)> = BTreeMap::new();
    for ident in &config.identities {
        for (addr, len) in &ident.bind {
            desired.insert((*addr, *len), (ids[&ident.name], 0));
        }
    }
    for b in &state.bindings {
        if let Some(exp) = expiry_boot_ns(b.expires_unix_ms, now_ms) {
            desired.insert((b.addr, b.prefix_len), (ids[&b.identity], exp));
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
    for ((addr, len), (id, exp)) in &desired {
        let same = existing.get(&(*addr, *len)).is_some_and(|(eid, eexp)| {
            eid == id && (eexp == exp || *exp != 0 && eexp.abs_diff(*exp) < 1_000_000_000)
        });
        if !same {
            tables.bind(*addr, *len, *id, *exp)?;
            applied.bindings_added += 1;
        }
    }
    applied.bindings = desired.len();

    // Identities that left the configuration: their bindings are gone; now their slots. A
    // quarantine stays: only a release or its own expiry ends one, and it is applied again
    // when the name gets a slot again (from the configuration or a token).
    for name in gone {
        if let Some(id) = state.identity_ids.remove(&name) {
            tables.clear_identity(id)?;
        }
        applied.identities_removed.push(name);
    }
    Ok(applied)
}
