//! Drift repair: every [`INTERVAL`] the kernel's tables are compared with what the agent
//! intends (the configuration and the persisted state, as `policy_apply` wrote them), and
//! every difference is put back, counted (`tollgate_drift_repairs_total{table}`) and
//! summarised in one `drift_repaired` audit line per reconcile. A change made behind the
//! agent's back (`bpftool map update`, a stray tool sharing the pins) lasts one interval.
//!
//! What the kernel program and the controller write is theirs and never compared: limiter
//! buckets, counters, anonymous prefixes, hold-back, and in identity records the throttle and
//! quota flags and the throttle factor (the fields `set_identity_keeping_controller_flags`
//! keeps). The quarantine flag is compared: the controller records its quarantines in the
//! state before it sets the flag, in the same turn, so the state always says it.
//!
//! Cost at 131 072 exact bindings: the exact binding maps, the identity and endpoint arrays
//! and the port table are read with batch lookups (about 40 `bpf(2)` calls, ~5 MB copied);
//! the CIDR tries key by key (two calls per CIDR binding); plus one write per repair. Measured
//! (release build, a shared 2-core machine, 65 536 IPv4 + 65 536 IPv6 bindings): 0.12-0.15 s
//! per reconcile, of which ~40 ms the port table and ~70 ms the binding maps; the daemon's
//! thread is busy for that long once per interval.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde_json::json;
use tollgate_common::policy::{
    Endpoint, ID_QUOTA_EXHAUSTED, ID_RESPONSE_CAPPED, ID_THROTTLED, Identity, Q8_ONE, port_slot,
};
use tracing::warn;

use crate::{
    audit::Actor,
    config::Config,
    identity::Resolver,
    net::{mask, prefix_text},
    node::Node,
    policy_apply::expiry_boot_ns,
    state::State,
    tables::{KernelTables, TableError, to_q8},
};

/// How often the tables are compared.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Examples named in one audit line; the rest are only counted.
const EXAMPLES: usize = 8;

/// Binding expiries within this of each other are the same (the conversion from the agent's
/// clock to the kernel's CLOCK_MONOTONIC moves by microseconds between calls), as in `policy_apply`.
const EXPIRY_SLACK_NS: u64 = 1_000_000_000;

/// The tables compared, as the `table` label says them.
pub const TABLES: [&str; 5] = ["settings", "endpoints", "ports", "identities", "bindings"];

static REPAIRS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static RUNS: AtomicU64 = AtomicU64::new(0);
static LAST_MICROS: AtomicU64 = AtomicU64::new(0);
static LAST_RUN_BOOT_MS: AtomicU64 = AtomicU64::new(0);

/// Repairs made since the agent started, per table (in [`TABLES`] order).
pub fn repairs_total() -> [(&'static str, u64); 5] {
    std::array::from_fn(|i| (TABLES[i], REPAIRS[i].load(Ordering::Relaxed)))
}

/// Reconciles run, and how long the last one took.
pub fn runs() -> (u64, Duration) {
    (
        RUNS.load(Ordering::Relaxed),
        Duration::from_micros(LAST_MICROS.load(Ordering::Relaxed)),
    )
}

/// What one reconcile put back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Repairs per table, in [`TABLES`] order.
    pub repaired: [u64; 5],
    /// The first few repairs, said in words.
    pub examples: Vec<String>,
}

impl Drift {
    fn note(&mut self, table: usize, what: impl FnOnce() -> String) {
        self.repaired[table] += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what());
        }
    }

    pub fn total(&self) -> u64 {
        self.repaired.iter().sum()
    }
}

/// A binding's address and prefix length as one sortable value (family and length, then
/// the address as an integer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    family_len: u16,
    addr: u128,
}

impl Key {
    fn of(addr: IpAddr, len: u8) -> Key {
        match addr {
            IpAddr::V4(a) => Key {
                family_len: len.into(),
                addr: u32::from(a).into(),
            },
            IpAddr::V6(a) => Key {
                family_len: 0x100 | u16::from(len),
                addr: a.into(),
            },
        }
    }

    fn prefix(self) -> (IpAddr, u8) {
        let len = self.family_len as u8;
        if self.family_len & 0x100 == 0 {
            (IpAddr::V4((self.addr as u32).into()), len)
        } else {
            (IpAddr::V6(self.addr.into()), len)
        }
    }
}

/// The agent's part of an identity record: without what the controller owns.
fn agent_part(rec: &Identity) -> Identity {
    let mut r = *rec;
    r.flags &= !(ID_THROTTLED | ID_QUOTA_EXHAUSTED | ID_RESPONSE_CAPPED);
    r.throttle_q8 = 0;
    r.response_q8 = 0;
    r
}

/// Compares the kernel's tables with `config` and `state` at agent time `now_ms` and writes
/// back every difference. `state` is only read: what has expired is the daemon's to remove
/// (it runs just before), and is left alone here rather than fought over.
pub fn reconcile(
    config: &Config,
    state: &State,
    tables: &mut KernelTables,
    now_ms: u64,
) -> Result<Drift, TableError> {
    let mut drift = Drift::default();
    // Phase times for `TOLLGATE_LOG=tollgate::reconcile=debug`.
    let started = std::time::Instant::now();
    let mut phases = [std::time::Duration::ZERO; 5];

    // Settings: the fields policy_apply writes.
    let have = tables.settings()?;
    let mut want = have;
    want.pressure_q8 = to_q8(config.controller.pressure);
    if want.pressure_q8 == 0 {
        want.pressure_q8 = Q8_ONE;
    }
    want.anon_pps = config.anonymous.packets_per_second;
    want.anon_tau_ns = tollgate_common::limiter::packet_tau_ns(
        config.anonymous.packets_per_second,
        config.anonymous.burst,
    );
    want.drop_event_interval_ns = config.drop_events.interval_ms.saturating_mul(1_000_000);
    crate::kernel_clock::set_anonymous_clock(&mut want);
    if want != have {
        tables.set_settings(&want)?;
        drift.note(0, || "settings".into());
    }

    phases[0] = started.elapsed();
    // Endpoint records before the ports that point at them.
    let records = tables.endpoint_table()?;
    for (id, have) in records.iter().enumerate().skip(1) {
        let want = match config.endpoints.get(id - 1) {
            Some(ep) => ep.spec.to_kernel()?,
            None => Endpoint::default(),
        };
        if *have != want {
            tables.set_endpoint_record(id as u32, &want)?;
            drift.note(1, || format!("endpoint {id}"));
        }
    }
    for (id, have) in tables.flow_policy_table()?.iter().enumerate().skip(1) {
        let want = config
            .endpoints
            .get(id - 1)
            .map_or_else(tollgate_common::flow::FlowPolicy::default, |ep| ep.flow);
        if *have != want {
            tables.set_flow_policy(id as u32, &want)?;
            drift.note(1, || format!("flow policy of endpoint {id}"));
        }
    }
    let mut want_ports: BTreeMap<u32, u32> = BTreeMap::new();
    for (i, ep) in config.endpoints.iter().enumerate() {
        for range in &ep.port_ranges {
            for port in range.clone() {
                if let Some(slot) = port_slot(ep.spec.proto.number(), port) {
                    want_ports.insert(slot, i as u32 + 1);
                }
            }
        }
    }
    for (slot, have) in tables.port_table()?.into_iter().enumerate() {
        let want = want_ports.get(&(slot as u32)).copied().unwrap_or(0);
        if have != want {
            tables.set_port_slot(slot as u32, want)?;
            drift.note(2, || format!("port slot {slot}: {have} -> {want}"));
        }
    }

    phases[1] = started.elapsed();
    // Identity records (before the bindings that point at them). A slot nobody holds is
    // empty; one whose holder neither the configuration nor a token names any more is on
    // its way out and left as it is.
    let resolver = Resolver::new(config, state);
    let mut holder: BTreeMap<u32, &str> = BTreeMap::new();
    for (name, id) in &state.identity_ids {
        holder.insert(*id, name.as_str());
    }
    let records = tables.identity_table()?;
    // The whole array: one entry per slot the kernel made.
    for (id, have) in records.iter().enumerate().skip(1) {
        let id = id as u32;
        let want = match holder.get(&id) {
            Some(name) => match resolver.get(name) {
                Some(r) => resolver.record(&r, state.quarantined(name, now_ms)),
                None => continue,
            },
            None => Identity::default(),
        };
        if agent_part(have) == agent_part(&want) {
            continue;
        }
        if want == Identity::default() {
            // A record in a free slot: cleared with its bucket and counters, as a freed
            // slot is, so that no later holder inherits them.
            tables.clear_identity(id)?;
        } else {
            tables.set_identity_keeping_controller_flags(id, &want)?;
        }
        drift.note(3, || {
            let who = holder.get(&id).copied().unwrap_or("free slot");
            format!(
                "identity {id} ({who}): flags {:#x} -> {:#x}",
                have.flags, want.flags
            )
        });
    }

    phases[2] = started.elapsed();
    // Bindings: the configuration's, then the state's run-time ones (which win, as in
    // policy_apply). Both sides are sorted vectors of compact keys, merged in one pass: at
    // 131 072 bindings maps of `IpAddr` keys cost several times more.
    let mut want: Vec<(Key, u32, u64)> = Vec::with_capacity(state.bindings.len());
    for ident in &config.identities {
        let Some(id) = state.identity_ids.get(&ident.name) else {
            continue;
        };
        for (addr, len) in &ident.bind {
            want.push((Key::of(*addr, *len), *id, 0));
        }
    }
    // Run-time bindings that have just expired (or whose identity is going) are the
    // daemon's to remove: neither restored nor removed here.
    let mut leave: Vec<Key> = Vec::new();
    let mut last: Option<(&str, Option<u32>)> = None;
    for b in &state.bindings {
        // Bindings of one identity come in runs (tokens, bulk binds): one lookup per run.
        let id = match last {
            Some((name, id)) if name == b.identity => id,
            _ => {
                let id = state.identity_ids.get(&b.identity).copied();
                last = Some((b.identity.as_str(), id));
                id
            }
        };
        // Masked as the kernel keys a CIDR binding (the CLI refuses host bits; a hand-edited
        // state might not, and must not read as drift every interval).
        let key = Key::of(mask(b.addr, b.prefix_len), b.prefix_len);
        match (id, expiry_boot_ns(b.expires_unix_ms, now_ms)) {
            (Some(id), Some(exp)) if !b.expired(now_ms) => want.push((key, id, exp)),
            _ => leave.push(key),
        }
    }
    // Stable sort of the reversed list: of two entries for one key, the later (the state's)
    // comes first and is the one `dedup` keeps.
    want.reverse();
    want.sort_by_key(|w| w.0);
    want.dedup_by_key(|w| w.0);
    leave.sort_unstable();
    phases[3] = started.elapsed();
    let mut have: Vec<(Key, u32, u64)> = tables
        .bindings()?
        .into_iter()
        .map(|(a, l, b)| (Key::of(a, l), b.identity, b.expires_ns))
        .collect();
    have.sort_unstable_by_key(|h| h.0);
    phases[4] = started.elapsed();
    let (mut i, mut j) = (0, 0);
    while i < want.len() || j < have.len() {
        use std::cmp::Ordering::{Equal, Greater, Less};
        let order = match (want.get(i), have.get(j)) {
            (Some(w), Some(h)) => w.0.cmp(&h.0),
            (Some(_), None) => Less,
            (None, _) => Greater,
        };
        match order {
            Equal => {
                let (w, h) = (want[i], have[j]);
                let (id, exp) = (w.1, w.2);
                let same =
                    h.1 == id && (h.2 == exp || exp != 0 && h.2.abs_diff(exp) < EXPIRY_SLACK_NS);
                if !same {
                    let (addr, len) = w.0.prefix();
                    tables.bind(addr, len, id, exp)?;
                    drift.note(4, || {
                        format!("{} identity {} -> {id}", prefix_text(addr, len), h.1)
                    });
                }
                i += 1;
                j += 1;
            }
            // Wanted, not in the kernel: put back.
            Less => {
                let w = want[i];
                let (addr, len) = w.0.prefix();
                tables.bind(addr, len, w.1, w.2)?;
                drift.note(4, || {
                    format!("{} restored (identity {})", prefix_text(addr, len), w.1)
                });
                i += 1;
            }
            // In the kernel, not wanted: removed, unless it is the daemon's to expire.
            Greater => {
                let h = have[j];
                if leave.binary_search(&h.0).is_err() {
                    let (addr, len) = h.0.prefix();
                    tables.unbind(addr, len)?;
                    drift.note(4, || {
                        format!("{} removed (not the agent's)", prefix_text(addr, len))
                    });
                }
                j += 1;
            }
        }
    }
    tracing::debug!(
        settings = ?phases[0],
        endpoints_ports = ?(phases[1] - phases[0]),
        identities = ?(phases[2] - phases[1]),
        state_bindings = ?(phases[3] - phases[2]),
        kernel_bindings = ?(phases[4] - phases[3]),
        merge = ?(started.elapsed() - phases[4]),
        "reconcile phases"
    );
    Ok(drift)
}

/// The daemon's hook: reconciles when [`INTERVAL`] has passed since the last one (by the
/// boot clock), counts what was repaired and audits it in one line.
pub fn tick(node: &mut Node, now_ms: u64) {
    let boot_ms = crate::tables::boot_ns() / 1_000_000;
    let last = LAST_RUN_BOOT_MS.load(Ordering::Relaxed);
    if last != 0 && boot_ms.saturating_sub(last) < INTERVAL.as_millis() as u64 {
        return;
    }
    LAST_RUN_BOOT_MS.store(boot_ms, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let r = reconcile(&node.config, &node.state, &mut node.pinned.tables, now_ms);
    LAST_MICROS.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    RUNS.fetch_add(1, Ordering::Relaxed);
    let drift = match r {
        Ok(d) => d,
        Err(e) => {
            warn!("reconcile: {e}");
            return;
        }
    };
    if drift.total() == 0 {
        return;
    }
    for (i, n) in drift.repaired.iter().enumerate() {
        REPAIRS[i].fetch_add(*n, Ordering::Relaxed);
    }
    let by_table: BTreeMap<&str, u64> = TABLES
        .iter()
        .zip(drift.repaired)
        .filter(|(_, n)| *n > 0)
        .map(|(t, n)| (*t, n))
        .collect();
    warn!(
        repaired = drift.total(),
        "the kernel's tables differed from the agent's policy (changed behind its back); restored: {by_table:?}"
    );
    let detail = json!({
        "repaired": by_table,
        "examples": drift.examples,
        "more": drift.total().saturating_sub(drift.examples.len() as u64),
    });
    if let Err(e) = node
        .audit
        .record(&Actor::AGENT, "drift_repaired", "", detail)
    {
        warn!("audit log: recording a drift repair: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_keys_sort_by_family_then_length_and_give_back_the_prefix() {
        let v4: IpAddr = "198.18.0.64".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.0.64".parse().unwrap();
        for (a, l) in [(v4, 32), (v4, 26), (v6, 128), (v6, 64), (mapped, 128)] {
            assert_eq!(Key::of(a, l).prefix(), (a, l));
        }
        // An IPv4 binding and its IPv4-mapped IPv6 twin are different bindings.
        assert_ne!(Key::of(v4, 32), Key::of(mapped, 128));
        assert!(Key::of(v4, 32) < Key::of(v6, 128));
    }

    #[test]
    fn the_controllers_fields_are_not_the_agents() {
        let mut a = Identity {
            flags: tollgate_common::policy::ID_ACTIVE,
            throttle_q8: Q8_ONE,
            ..Identity::default()
        };
        let mut b = a;
        b.flags |= ID_THROTTLED | ID_QUOTA_EXHAUSTED | ID_RESPONSE_CAPPED;
        b.throttle_q8 = 64;
        b.response_q8 = 1024;
        assert_eq!(agent_part(&a), agent_part(&b));
        a.flags |= tollgate_common::policy::ID_QUARANTINED;
        assert_ne!(agent_part(&a), agent_part(&b));
    }
}
