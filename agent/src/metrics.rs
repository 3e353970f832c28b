//! `/metrics`: the kernel's counters and the agent's state in the Prometheus (OpenMetrics)
//! text format, built fresh on every scrape with prometheus-client. Label sets are bounded:
//! reasons, endpoints, classes, plans, GPUs, windows; identities appear only in the top-K
//! families, and never an address or a token. The HTTP side is `servers::metrics`.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tollgate_common::{Verdict, policy::Q8_ONE};

use crate::node::Node;

mod egress;

type Labels = Vec<(String, String)>;

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        _ => "drop",
    }
}

/// Counter families keyed by labels, filled with totals (fresh registry per scrape).
struct Counters(Family<Labels, Counter<u64, AtomicU64>>);

impl Counters {
    fn new() -> Self {
        Counters(Family::default())
    }
    fn add(&self, labels: Labels, v: u64) {
        self.0.get_or_create(&labels).inc_by(v);
    }
}

/// Counters of a float total (seconds summed), as [`Counters`].
struct FloatCounters(Family<Labels, Counter<f64, AtomicU64>>);

impl FloatCounters {
    fn new() -> Self {
        FloatCounters(Family::default())
    }
    fn add(&self, labels: Labels, v: f64) {
        self.0.get_or_create(&labels).inc_by(v);
    }
}

struct Gauges(Family<Labels, Gauge<f64, AtomicU64>>);

impl Gauges {
    fn new() -> Self {
        Gauges(Family::default())
    }
    fn set(&self, labels: Labels, v: f64) {
        self.0.get_or_create(&labels).set(v);
    }
}

fn gauge(v: f64) -> Gauge<f64, AtomicU64> {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    g
}

fn counter(v: u64) -> Counter<u64, AtomicU64> {
    let c = Counter::<u64, AtomicU64>::default();
    c.inc_by(v);
    c
}

/// The pool (only on a node with `[fleet]`): store health, sync age, members, the outbox,
/// and entries refused, published, installed and claims made. Every label is a fixed word
/// (kinds, refusal labels, outcomes), pre-registered so a scrape shows zeros.
fn fleet_families(
    reg: &mut Registry,
    link: Option<&crate::fleet::link::Link>,
    global: &crate::fleet::global::Global,
) {
    use crate::fleet::{apply::ApplyRefusal, entry::Kind};
    let Some(link) = link else { return };
    reg.register(
        "tollgate_fleet_global_identities",
        "Identities on fleet-wide plans (scope = \"fleet\") this node tracks",
        gauge(global.tracked() as f64),
    );
    reg.register(
        "tollgate_fleet_global_outage",
        "Whether fleet-wide plans run by [fleet.outage] (1: the store failed past the grace)",
        gauge(if global.in_outage() { 1.0 } else { 0.0 }),
    );
    reg.register(
        "tollgate_fleet_global_cycles",
        "Report cycles of fleet-wide plans (spend and demand)",
        counter(global.stats.cycles),
    );
    reg.register(
        "tollgate_fleet_global_failed_cycles",
        "Report cycles the store did not answer",
        counter(global.stats.failed_cycles),
    );
    reg.register(
        "tollgate_fleet_global_round_trips",
        "Store round trips (pipelines) of the spend and demand reports",
        counter(global.stats.round_trips),
    );
    let g_refused = Counters::new();
    for op in ["spend", "demand"] {
        for label in crate::fleet::store::spend::Refused::default()
            .labels()
            .map(|(l, _)| l)
        {
            g_refused.add(
                l(&[("report", op), ("reason", label)]),
                global.stats.refused.get(&(op, label)).copied().unwrap_or(0),
            );
        }
    }
    reg.register(
        "tollgate_fleet_global_refused_values",
        "Spend and demand values read from the store and refused or bounded: malformed, \
         clamped, stale, too_many, wrong_type, bad_identity",
        g_refused.0,
    );
    let now = crate::clock::now_ms();
    reg.register(
        "tollgate_fleet_store_up",
        "Whether the fleet store answered the last operation (1) or not (0)",
        gauge(if link.health.up { 1.0 } else { 0.0 }),
    );
    reg.register(
        "tollgate_fleet_sync_age_seconds",
        "Seconds since the last sync pass that succeeded (-1: none yet)",
        gauge(
            link.health
                .last_sync_ms
                .map_or(-1.0, |s| now.saturating_sub(s) as f64 / 1000.0),
        ),
    );
    reg.register(
        "tollgate_fleet_stream_lag_seconds",
        "How far the change stream's newest entry was ahead of what this node had read at its \
         last pass (by the entries' ids); above a few intervals the node is falling behind",
        gauge(link.stream_lag_ms as f64 / 1000.0),
    );
    reg.register(
        "tollgate_fleet_members",
        "Members of the pool with a live heartbeat, as last listed",
        gauge(link.members.len() as f64),
    );
    reg.register(
        "tollgate_fleet_outbox_entries",
        "Changes made on this node not yet taken by the store",
        gauge(link.outbox.len() as f64),
    );
    reg.register(
        "tollgate_fleet_held_entries",
        "Entries this node holds from the pool (one per subject)",
        gauge(link.held as f64),
    );
    let refused = Counters::new();
    for label in crate::fleet::entry::Refusal::ALL
        .iter()
        .map(|r| r.label())
        .chain(ApplyRefusal::ALL.iter().map(|r| r.label()))
    {
        refused.add(
            l(&[("reason", label)]),
            link.stats.refused.get(label).copied().unwrap_or(0),
        );
    }
    reg.register(
        "tollgate_fleet_refused_entries",
        "Store entries refused: not signed with the pool key (bad_mac), malformed, another \
         pool's, stale (older than what is held) or a binding of a revoked token",
        refused.0,
    );
    let published = Counters::new();
    for k in Kind::ALL {
        published.add(
            l(&[("kind", k.label())]),
            link.stats.published.get(k.label()).copied().unwrap_or(0),
        );
    }
    reg.register(
        "tollgate_fleet_published_entries",
        "Changes of this node taken by the store, by kind",
        published.0,
    );
    reg.register(
        "tollgate_fleet_unshared_changes",
        "Changes made here that could not be shared with the pool (in force here only): a \
         name or payload no entry can carry, or the outbox's disk",
        counter(link.stats.unshared),
    );
    reg.register(
        "tollgate_fleet_outbox_dropped",
        "Queued bindings dropped past the outbox's bound (their clients bind again)",
        counter(link.outbox.dropped),
    );
    let reloads = Counters::new();
    for reason in crate::fleet::sync::Reload::ALL.map(|r| r.label()) {
        reloads.add(
            l(&[("reason", reason)]),
            link.stats.reloads.get(reason).copied().unwrap_or(0),
        );
    }
    reg.register(
        "tollgate_fleet_snapshot_loads",
        "Snapshot loads by reason: first, gap (the stream lost entries after this node's \
         position), store_reset (a new epoch), restart (a restart or the periodic \
         reconciliation)",
        reloads.0,
    );
    reg.register(
        "tollgate_fleet_publish_errors",
        "Publish attempts that failed (the change stays queued and is retried)",
        counter(link.stats.publish_errors),
    );
    let installs = Counters::new();
    for ((kind, outcome), n) in &link.stats.installs {
        installs.add(l(&[("kind", kind), ("outcome", outcome)]), *n);
    }
    for k in Kind::ALL {
        installs.add(l(&[("kind", k.label()), ("outcome", "installed")]), 0);
    }
    reg.register(
        "tollgate_fleet_installs",
        "Other nodes' changes put in force here, by kind and outcome (installed, unchanged, \
         or why not: a binding whose token no longer verifies says its refusal)",
        installs.0,
    );
    let claims = Counters::new();
    for outcome in crate::fleet::link::CLAIM_OUTCOMES {
        claims.add(
            l(&[("outcome", outcome)]),
            link.stats.claims.get(outcome).copied().unwrap_or(0),
        );
    }
    reg.register(
        "tollgate_fleet_claims",
        "Token claims on bind: claimed, replay (held by another address), fallback (store \
         unreachable: this node's memory decided)",
        claims.0,
    );
}

/// Every endpoint's pressure, and the model servers' readings and scrapes: labelled by
/// endpoint name (bounded by the configuration) and scrape outcome (a fixed list).
fn model_server_families(
    reg: &mut Registry,
    config: &crate::config::Config,
    c: &crate::control_loop::ControlLoop,
) {
    let pressure = Gauges::new();
    let up = Gauges::new();
    let queue = Gauges::new();
    let running = Gauges::new();
    let kv = Gauges::new();
    let scrapes = Counters::new();
    for load in c.loads(config) {
        let ep = l(&[("endpoint", &load.endpoint)]);
        if let Some(p) = load.pressure {
            pressure.set(ep.clone(), p);
        }
        let Some(ms) = &load.model_server else {
            continue;
        };
        let fresh = ms.age_intervals == Some(0) && ms.error.is_none();
        up.set(ep.clone(), if fresh { 1.0 } else { 0.0 });
        if let Some(r) = &ms.reading {
            if let Some(q) = r.queue {
                queue.set(ep.clone(), q);
            }
            if let Some(n) = r.running {
                running.set(ep.clone(), n);
            }
            if let Some(k) = r.kv_cache {
                kv.set(ep.clone(), k);
            }
        }
        for outcome in crate::controller::scrape::OUTCOMES {
            let n = c
                .feed(&load.endpoint)
                .and_then(|f| f.scrapes.get(outcome).copied())
                .unwrap_or(0);
            scrapes.add(l(&[("endpoint", &load.endpoint), ("outcome", outcome)]), n);
        }
    }
    reg.register(
        "tollgate_endpoint_pressure",
        "An endpoint's pressure: its largest signal over that signal's threshold (1: saturating)",
        pressure.0,
    );
    reg.register(
        "tollgate_model_server_up",
        "1 while the endpoint's model server answered its last scrape with a reading",
        up.0,
    );
    reg.register(
        "tollgate_model_server_queue_requests",
        "Requests waiting in the model server's queue (the reading in use)",
        queue.0,
    );
    reg.register(
        "tollgate_model_server_running_requests",
        "Requests in the model server's running batch (the reading in use)",
        running.0,
    );
    reg.register(
        "tollgate_model_server_kv_cache_usage_ratio",
        "The model server's KV-cache usage, 0 to 1 (the reading in use)",
        kv.0,
    );
    reg.register(
        "tollgate_model_server_scrapes",
        "Scrapes of the endpoint's model server, by outcome",
        scrapes.0,
    );
}

/// Per issuer: its keys, their age, its fetches and its refusals. Issuer names come from the
/// configuration only (never from a token: an `iss` no issuer has counts under
/// `issuer="none"`), and every label value is pre-registered, so a scrape shows zeros and
/// the series are as many as the configuration makes.
fn issuer_families(reg: &mut Registry, tokens: Option<&crate::token_bind::TokenService>) {
    use crate::issuers::{OUTCOMES, TRIGGERS};
    use tollgate_common::token::{REFUSALS, SKIP_REASONS};
    let keys = Gauges::new();
    let skipped = Gauges::new();
    let age = Gauges::new();
    let fetches = Counters::new();
    let refusals = Counters::new();
    if let Some(t) = tokens {
        for i in &t.issuers {
            let st = i.keys.status();
            let name = i.name.as_str();
            keys.set(l(&[("issuer", name)]), st.kids.len() as f64);
            for r in SKIP_REASONS {
                let n = st.skipped.iter().filter(|s| s.reason == r.label()).count();
                skipped.set(l(&[("issuer", name), ("reason", r.label())]), n as f64);
            }
            if let Some(a) = st.age_s {
                age.set(l(&[("issuer", name)]), a as f64);
            }
            for tr in TRIGGERS {
                for o in OUTCOMES {
                    let n = st
                        .fetches
                        .iter()
                        .find(|f| f.trigger == tr.label() && f.outcome == o.label())
                        .map_or(0, |f| f.count);
                    fetches.add(
                        l(&[
                            ("issuer", name),
                            ("trigger", tr.label()),
                            ("outcome", o.label()),
                        ]),
                        n,
                    );
                }
            }
            for r in REFUSALS {
                let n = i.refusals.get(r.label()).copied().unwrap_or(0);
                refusals.add(l(&[("issuer", name), ("reason", r.label())]), n);
            }
        }
        for r in REFUSALS {
            let n = t.unselected.get(r.label()).copied().unwrap_or(0);
            refusals.add(l(&[("issuer", "none"), ("reason", r.label())]), n);
        }
    }
    reg.register(
        "tollgate_issuer_keys",
        "Usable keys of each issuer's key set",
        keys.0,
    );
    reg.register(
        "tollgate_issuer_keys_skipped",
        "Keys of each issuer's JWKS not used, by reason (encryption_key, unsupported_alg, ...)",
        skipped.0,
    );
    reg.register(
        "tollgate_issuer_key_age_seconds",
        "Seconds since each issuer's key set in use was fetched or read",
        age.0,
    );
    reg.register(
        "tollgate_issuer_fetches",
        "Key fetches of each issuer by trigger (start, schedule, unknown_kid, file_changed) and outcome",
        fetches.0,
    );
    reg.register(
        "tollgate_issuer_refusals",
        "Token refusals by issuer (none: before one was chosen) and reason",
        refusals.0,
    );
}

/// Per class and per plan totals, and the top K identities by packets. The kernel's
/// identity counters are read in one batch pass (`KernelTables::identity_counters_upto`: a
/// few syscalls for 100 000 identities, not one each), summed into per-class and per-plan
/// totals without a label set per identity, and only the top K get a label.
fn identity_families(reg: &mut Registry, d: &Node) -> Result<(), String> {
    use tollgate_common::policy::IdentityCounters;
    let config = &d.config;
    let upto = d.state.identity_ids.values().max().map_or(1, |m| m + 1);
    let counters = d
        .pinned
        .tables
        .identity_counters_upto(upto)
        .map_err(|e| e.to_string())?;
    let of = |slot: u32| counters.get(slot as usize);
    // (passed packets, dropped packets, passed bytes, dropped bytes, cost)
    let mut classes: BTreeMap<&str, [u64; 4]> = BTreeMap::new();
    let mut plans: BTreeMap<&str, [u64; 5]> = BTreeMap::new();
    let add = |t: &mut [u64], c: &IdentityCounters| {
        let v = [
            c.passed.packets,
            c.dropped.packets,
            c.passed.bytes,
            c.dropped.bytes,
            c.cost,
        ];
        for (a, b) in t.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    };
    if let Some(c) = of(0) {
        add(classes.entry("anonymous").or_default(), c);
    }
    // (packets, resolved identity, counters) of every identity with a plan, for the top K.
    let mut ranked = Vec::with_capacity(d.state.identity_ids.len());
    for r in d.identities().all() {
        let Some(c) = r.slot.and_then(of) else {
            continue;
        };
        add(classes.entry(r.class.label()).or_default(), c);
        if !r.plan.is_empty() {
            add(plans.entry(r.plan).or_default(), c);
            ranked.push((c.packets(), r, c));
        }
    }
    let class_p = Counters::new();
    let class_b = Counters::new();
    for (class, t) in &classes {
        class_p.add(l(&[("class", class), ("verdict", "pass")]), t[0]);
        class_p.add(l(&[("class", class), ("verdict", "drop")]), t[1]);
        class_b.add(l(&[("class", class), ("verdict", "pass")]), t[2]);
        class_b.add(l(&[("class", class), ("verdict", "drop")]), t[3]);
    }
    let plan_p = Counters::new();
    let plan_b = Counters::new();
    let plan_cost = Counters::new();
    for (plan, t) in &plans {
        plan_p.add(l(&[("plan", plan), ("verdict", "pass")]), t[0]);
        plan_p.add(l(&[("plan", plan), ("verdict", "drop")]), t[1]);
        plan_b.add(l(&[("plan", plan), ("verdict", "pass")]), t[2]);
        plan_b.add(l(&[("plan", plan), ("verdict", "drop")]), t[3]);
        plan_cost.add(l(&[("plan", plan)]), t[4]);
    }
    reg.register(
        "tollgate_class_packets",
        "Packets to protected endpoints by identity class and verdict",
        class_p.0,
    );
    reg.register(
        "tollgate_class_bytes",
        "Bytes to protected endpoints by identity class and verdict",
        class_b.0,
    );
    reg.register(
        "tollgate_plan_packets",
        "Packets by plan and verdict",
        plan_p.0,
    );
    reg.register("tollgate_plan_bytes", "Bytes by plan and verdict", plan_b.0);
    reg.register(
        "tollgate_plan_cost_units",
        "Cost units charged (bytes x weight x multipliers) by plan",
        plan_cost.0,
    );
    // The K busiest, found without sorting every identity (a partial selection, then a
    // sort of the K); ties in name order, as the resolver hands them out.
    let k = config.metrics.top_k.min(ranked.len());
    let by_packets =
        |a: &(u64, crate::identity::Resolved<'_>, &IdentityCounters),
         b: &(u64, crate::identity::Resolved<'_>, &IdentityCounters)| {
            b.0.cmp(&a.0).then_with(|| a.1.name.cmp(b.1.name))
        };
    if k > 0 && k < ranked.len() {
        ranked.select_nth_unstable_by(k - 1, by_packets);
    }
    ranked.truncate(k);
    ranked.sort_by(by_packets);
    let top_p = Counters::new();
    let top_b = Counters::new();
    let top_egress = egress::TopEgress::new();
    // What the node sent back to the same K (one batch read; none when K is 0).
    let sent = if ranked.is_empty() {
        Vec::new()
    } else {
        d.pinned
            .tables
            .egress_identities_upto(upto)
            .map_err(|e| e.to_string())?
    };
    for (_, r, c) in &ranked {
        // Any local user can read /metrics: a token identity (a customer's name, chosen by
        // the issuer) is shown by its slot unless the operator asked for names.
        let name = match (r.source, r.slot) {
            (crate::identity::IdentitySource::Token, Some(id))
                if !config.metrics.identity_names =>
            {
                format!("slot-{id}")
            }
            _ => r.name.to_owned(),
        };
        top_p.add(
            l(&[("identity", &name), ("verdict", "pass")]),
            c.passed.packets,
        );
        top_p.add(
            l(&[("identity", &name), ("verdict", "drop")]),
            c.dropped.packets,
        );
        top_b.add(
            l(&[("identity", &name), ("verdict", "pass")]),
            c.passed.bytes,
        );
        top_b.add(
            l(&[("identity", &name), ("verdict", "drop")]),
            c.dropped.bytes,
        );
        let e = r.slot.and_then(|s| sent.get(s as usize)).copied();
        top_egress.add(&name, &e.unwrap_or_default());
    }
    reg.register(
        "tollgate_top_identity_packets",
        "Packets of the top-K identities by traffic (K = metrics.top_k)",
        top_p.0,
    );
    reg.register(
        "tollgate_top_identity_bytes",
        "Bytes of the top-K identities by traffic",
        top_b.0,
    );
    top_egress.register(reg);
    Ok(())
}

/// The whole exposition.
pub fn render(d: &Node) -> Result<String, String> {
    let config = &d.config;
    let tables = &d.pinned.tables;
    let mut reg = Registry::default();

    // Kernel verdict counters by (verdict, reason, endpoint).
    let per = crate::counter_read::reason_endpoint_totals(tables.reason_counters())
        .map_err(|e| e.to_string())?;
    let packets = Counters::new();
    let bytes = Counters::new();
    let ep_name = |id: u32| {
        id.checked_sub(1)
            .and_then(|i| config.endpoints.get(i as usize))
            .map_or_else(|| "none".to_owned(), |e| e.name.clone())
    };
    for (r, ep, c) in &per {
        let labels = l(&[
            ("verdict", verdict(r.verdict())),
            ("reason", r.label()),
            ("endpoint", &ep_name(*ep)),
        ]);
        packets.add(labels.clone(), c.packets);
        bytes.add(labels, c.bytes);
    }
    reg.register(
        "tollgate_packets",
        "Packets by verdict, reason and endpoint (endpoint none: not protected)",
        packets.0,
    );
    reg.register(
        "tollgate_bytes",
        "Bytes (whole frames) by verdict, reason and endpoint",
        bytes.0,
    );

    // Per identity: class and plan totals, and the top K.
    identity_families(&mut reg, d)?;

    // What the protected endpoints sent back, times to first byte, the flow table.
    let names: Vec<&str> = config.endpoints.iter().map(|e| e.name.as_str()).collect();
    egress::register(&mut reg, &names, &egress::Readings::read(tables)?);

    // Occupancy.
    let counts = tables.binding_counts();
    let bindings = Gauges::new();
    let capacity = Gauges::new();
    for (i, map) in ["exact_v4", "exact_v6", "cidr_v4", "cidr_v6"]
        .iter()
        .enumerate()
    {
        bindings.set(l(&[("map", map)]), counts[i] as f64);
        let cap = if i < 2 {
            tables.sizes().exact_bindings
        } else {
            tables.sizes().cidr_bindings
        };
        capacity.set(l(&[("map", map)]), f64::from(cap));
    }
    reg.register(
        "tollgate_bindings",
        "Bindings in the kernel by map",
        bindings.0,
    );
    reg.register(
        "tollgate_bindings_capacity",
        "Capacity of each binding map (a full map refuses, never evicts)",
        capacity.0,
    );
    reg.register(
        "tollgate_identities",
        "Identity slots in use",
        gauge(d.state.identity_ids.len() as f64),
    );
    reg.register(
        "tollgate_identities_capacity",
        "Identity slots",
        gauge(f64::from(tables.identity_slots() - 1)),
    );
    let anon = tables.anon_counts();
    let anon_g = Gauges::new();
    let anon_cap = Gauges::new();
    for (i, fam) in ["ipv4", "ipv6"].iter().enumerate() {
        anon_g.set(l(&[("family", fam)]), anon[i] as f64);
        anon_cap.set(
            l(&[("family", fam)]),
            f64::from(tables.sizes().anon_prefixes),
        );
    }
    reg.register(
        "tollgate_anonymous_prefixes",
        "Anonymous prefixes tracked (LRU: a flood ages out others, never bindings)",
        anon_g.0,
    );
    reg.register(
        "tollgate_anonymous_prefixes_capacity",
        "Capacity of the anonymous prefix tables",
        anon_cap.0,
    );
    reg.register(
        "tollgate_quarantined_identities",
        "Identities quarantined (operator or anomaly ladder)",
        gauge(d.state.quarantines.len() as f64),
    );

    // Tokens.
    let verifications = Counters::new();
    let mut thefts = 0;
    if let Some(t) = &d.tokens {
        for (label, n) in &t.results {
            verifications.add(l(&[("result", label)]), *n);
        }
        thefts = t.thefts;
    }
    reg.register(
        "tollgate_token_verifications",
        "Token verifications by result (ok or the refusal label)",
        verifications.0,
    );
    reg.register(
        "tollgate_token_thefts",
        "Tokens presented from a second address while bound (probable theft)",
        counter(thefts),
    );
    issuer_families(&mut reg, d.tokens.as_ref());
    fleet_families(&mut reg, d.fleet.as_ref(), &d.state.fleet);

    // Listeners: what each holds open and what it turned away, before authentication.
    let open = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let max = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let accepted = Counters::new();
    let capped = Counters::new();
    let accept_errors = Counters::new();
    let evicted = Counters::new();
    for (name, st) in crate::servers::limit::listeners() {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let lb = l(&[("listener", name)]);
        open.get_or_create(&lb).set(get(&st.open) as f64);
        max.get_or_create(&lb).set(get(&st.max) as f64);
        accepted.add(lb.clone(), get(&st.accepted));
        accept_errors.add(lb.clone(), get(&st.accept_errors));
        evicted.add(lb, get(&st.evicted));
        capped.add(
            l(&[("listener", name), ("cap", "listener")]),
            get(&st.refused_listener_cap),
        );
        capped.add(
            l(&[("listener", name), ("cap", "source")]),
            get(&st.refused_source_cap),
        );
    }
    reg.register(
        "tollgate_listener_connections_open",
        "Connections each listener is serving now",
        open,
    );
    reg.register(
        "tollgate_listener_connections_max",
        "The most connections each listener holds at once",
        max,
    );
    reg.register(
        "tollgate_listener_connections_accepted",
        "Connections accepted and served, by listener",
        accepted.0,
    );
    reg.register(
        "tollgate_listener_connections_capped",
        "Connections closed at once: the listener, or their source (bind: an IPv4 address or IPv6 /64), at its cap",
        capped.0,
    );
    reg.register(
        "tollgate_listener_connections_evicted",
        "Connections that had not sent their request, closed to make room at the listener's cap",
        evicted.0,
    );
    reg.register(
        "tollgate_listener_accept_errors",
        "Failed accepts (descriptor exhaustion and the like), each backed off",
        accept_errors.0,
    );
    let refusals = Counters::new();
    for ((listener, reason), n) in crate::servers::limit::refusals() {
        refusals.add(l(&[("listener", listener), ("reason", reason)]), n);
    }
    reg.register(
        "tollgate_listener_refusals",
        "Requests refused before authentication (malformed, too large, timed out, TLS handshake, no token, wrong path or method)",
        refusals.0,
    );
    reg.register(
        "tollgate_descriptor_limit",
        "The soft RLIMIT_NOFILE in force (raised to the hard limit at start)",
        gauge(crate::servers::limit::FD_LIMIT.load(std::sync::atomic::Ordering::Relaxed) as f64),
    );
    reg.register(
        "tollgate_audit_refusals_suppressed",
        "Refusals counted but not written to the audit log one line each (rate limit; see the refusals_suppressed lines)",
        counter(d.audit.suppressed_refusals()),
    );

    reg.register(
        "tollgate_clock_steps",
        "Wall-clock steps larger than 2 s seen against the boot clock (each audited as clock_step; deadlines follow the boot clock)",
        counter(crate::clock::steps_total()),
    );

    let tunnels = Gauges::new();
    let (covered, uncovered) = d.tunnels.counts();
    tunnels.set(l(&[("state", "covered")]), covered as f64);
    tunnels.set(l(&[("state", "uncovered")]), uncovered as f64);
    reg.register(
        "tollgate_tunnel_devices",
        "Decapsulation points in the node's namespace (tunnel devices; IPsec SAs as one): covered by the program (generic XDP), or uncovered (see `tollgate status`)",
        tunnels.0,
    );
    let drift = Counters::new();
    for (table, n) in crate::reconcile::repairs_total() {
        drift.add(l(&[("table", table)]), n);
    }
    reg.register(
        "tollgate_drift_repairs",
        "Kernel table entries found differing from the agent's policy (changed behind its back) and restored by the reconcile",
        drift.0,
    );
    reg.register(
        "tollgate_program_load_failures",
        "Program loads that failed (verifier refusal, maps that do not fit the pins) recorded in the state directory; the program running before each kept enforcing",
        counter(crate::object::load_failures(&d.config.node.state_dir).total),
    );
    let (runs, last) = crate::reconcile::runs();
    reg.register(
        "tollgate_reconcile_runs",
        "Reconciles of the kernel's tables against the policy",
        counter(runs),
    );
    reg.register(
        "tollgate_reconcile_duration_seconds",
        "Duration of the last reconcile",
        gauge(last.as_secs_f64()),
    );

    // Controller.
    let c = &d.control;
    reg.register(
        "tollgate_controller_loops",
        "Controller loops run",
        counter(c.loops),
    );
    reg.register(
        "tollgate_controller_loop_duration_seconds",
        "Duration of the last controller loop",
        gauge(c.last_loop_s),
    );
    reg.register(
        "tollgate_gpu_up",
        "1 while GPU readings arrive, 0 when there is no GPU source or it fails",
        gauge(if c.gpu_error.is_none() && !c.readings.is_empty() {
            1.0
        } else {
            0.0
        }),
    );
    let util = Gauges::new();
    let mem_used = Gauges::new();
    let mem_total = Gauges::new();
    let power = Gauges::new();
    for r in &c.readings {
        let gpu = r.index.to_string();
        util.set(l(&[("gpu", &gpu)]), r.utilization);
        mem_used.set(l(&[("gpu", &gpu)]), r.memory_used_bytes as f64);
        mem_total.set(l(&[("gpu", &gpu)]), r.memory_total_bytes as f64);
        if let Some(w) = r.power_watts {
            power.set(l(&[("gpu", &gpu)]), w);
        }
    }
    reg.register(
        "tollgate_gpu_utilization_ratio",
        "GPU utilisation, 0 to 1",
        util.0,
    );
    reg.register(
        "tollgate_gpu_memory_used_bytes",
        "GPU memory in use",
        mem_used.0,
    );
    reg.register("tollgate_gpu_memory_total_bytes", "GPU memory", mem_total.0);
    reg.register("tollgate_gpu_power_watts", "GPU power draw", power.0);
    let saturated = Gauges::new();
    let share = Gauges::new();
    for (i, ep) in config.endpoints.iter().enumerate() {
        let id = i as u32 + 1;
        saturated.set(
            l(&[("endpoint", &ep.name)]),
            if c.is_saturated(id) { 1.0 } else { 0.0 },
        );
        for (p, plan) in config.plans.iter().enumerate() {
            let q8 = c.hold_back(id, p as u16).unwrap_or(Q8_ONE);
            share.set(
                l(&[("endpoint", &ep.name), ("plan", &plan.name)]),
                f64::from(Q8_ONE) / f64::from(q8.max(1)),
            );
        }
    }
    reg.register(
        "tollgate_endpoint_saturated",
        "1 while an endpoint's GPUs are saturated",
        saturated.0,
    );
    model_server_families(&mut reg, config, c);
    reg.register(
        "tollgate_hold_back_share",
        "Share of its budget a plan keeps on an endpoint (1: not held back)",
        share.0,
    );
    reg.register(
        "tollgate_pressure_multiplier",
        "The static cost multiplier (controller.pressure)",
        gauge(config.controller.pressure),
    );
    let spent_b = Gauges::new();
    let spent_c = Gauges::new();
    let exhausted = Gauges::new();
    let mut per_plan: BTreeMap<(String, &'static str), (u64, u64)> = BTreeMap::new();
    let ids = d.identities();
    for (name, spent) in &c.quotas.spent {
        let Some(plan) = ids.get(name).map(|r| r.plan) else {
            continue;
        };
        for w in crate::controller::quota::Window::ALL {
            let (b, cost) = spent.get(w);
            let e = per_plan.entry((plan.to_owned(), w.as_str())).or_default();
            e.0 += b;
            e.1 += cost;
        }
    }
    for ((plan, window), (b, cost)) in &per_plan {
        spent_b.set(l(&[("plan", plan), ("window", window)]), *b as f64);
        spent_c.set(l(&[("plan", plan), ("window", window)]), *cost as f64);
    }
    // By plan and reason (`quota::reason_of`: bytes and cost, tokens, money), every pair
    // pre-registered at 0: both labels are bounded by the configuration.
    let mut ex: BTreeMap<(String, &'static str), f64> = config
        .plans
        .iter()
        .flat_map(|p| {
            crate::controller::quota::REASONS
                .iter()
                .map(|r| ((p.name.clone(), *r), 0.0))
        })
        .collect();
    for name in c.exhausted() {
        if let Some(plan) = ids.get(name).map(|r| r.plan) {
            let reason = c
                .exhausted_reason(config, Some(plan), name)
                .unwrap_or("quota_exhausted");
            *ex.entry((plan.to_owned(), reason)).or_default() += 1.0;
        }
    }
    for ((plan, reason), n) in ex {
        exhausted.set(l(&[("plan", &plan), ("reason", reason)]), n);
    }
    usage_families(&mut reg, d);
    reg.register(
        "tollgate_quota_spent_bytes",
        "Bytes spent in the current window, summed over a plan's identities",
        spent_b.0,
    );
    reg.register(
        "tollgate_quota_spent_cost_units",
        "Cost units spent in the current window, summed over a plan's identities",
        spent_c.0,
    );
    reg.register(
        "tollgate_quota_exhausted_identities",
        "Identities whose quota is spent, by plan and reason",
        exhausted.0,
    );
    let actions = Counters::new();
    // Every (step, mode) from the start, at 0: increase() then sees the first action too.
    for step in ["throttle", "quarantine", "release", "observe"] {
        for mode in ["shadow", "enforce"] {
            actions.add(l(&[("step", step), ("mode", mode)]), 0);
        }
    }
    for ((step, mode), n) in &c.actions {
        actions.add(l(&[("step", step), ("mode", mode)]), *n);
    }
    reg.register(
        "tollgate_anomaly_actions",
        "Anomaly ladder decisions by step and mode",
        actions.0,
    );
    let withheld = Counters::new();
    for why in crate::controller::anomaly::Hold::ALL {
        let n = c.withheld.get(why.as_str()).copied().unwrap_or(0);
        withheld.add(l(&[("reason", why.as_str())]), n);
    }
    reg.register(
        "tollgate_anomaly_quarantines_withheld",
        "Quarantines the anomaly ladder decided and did not impose (the identity stays throttled), by reason",
        withheld.0,
    );
    reg.register(
        "tollgate_drop_events",
        "Sampled drop events read from the kernel",
        counter(d.drop_stats.read.load(Ordering::Relaxed)),
    );
    reg.register(
        "tollgate_drop_events_suppressed",
        "Drop events not logged because of the log rate limit",
        counter(d.drop_stats.suppressed.load(Ordering::Relaxed)),
    );
    let info = Gauges::new();
    info.set(l(&[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    reg.register(
        "tollgate_build_info",
        "The agent's version (always 1)",
        info.0,
    );

    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(to_text_format(&out))
}

/// The usage feed: reports by outcome (every label pre-registered), tokens by kind, money,
/// and tokens spent in the current window summed over a plan's identities. No identity
/// label: the feed names identities, the metrics do not.
fn usage_families(reg: &mut Registry, d: &Node) {
    let f = &d.usage;
    let outcomes = Counters::new();
    for o in std::iter::once("accepted").chain(crate::usage::Refusal::LABELS) {
        outcomes.add(
            l(&[("outcome", o)]),
            f.outcomes.get(o).copied().unwrap_or(0),
        );
    }
    reg.register(
        "tollgate_usage_reports",
        "Usage reports by outcome: accepted, or the refusal's label",
        outcomes.0,
    );
    let tokens = Counters::new();
    tokens.add(l(&[("kind", "prompt")]), f.prompt_tokens);
    tokens.add(l(&[("kind", "completion")]), f.completion_tokens);
    reg.register(
        "tollgate_usage_tokens",
        "Tokens of accepted usage reports, by kind",
        tokens.0,
    );
    reg.register(
        "tollgate_usage_money_nano",
        "What accepted usage reports cost, in nano-units (1e-9) of the price table's currency",
        counter(f.money_nano),
    );
    let spent_t = Gauges::new();
    let spent_m = Gauges::new();
    let mut per_plan: BTreeMap<(String, &'static str), (u64, u64)> = BTreeMap::new();
    let ids = d.identities();
    for (name, spent) in &d.control.quotas.spent {
        let Some(plan) = ids.get(name).map(|r| r.plan) else {
            continue;
        };
        for w in crate::controller::quota::Window::ALL {
            let (t, m) = spent.usage(w);
            let e = per_plan.entry((plan.to_owned(), w.as_str())).or_default();
            e.0 += t;
            e.1 += m;
        }
    }
    for ((plan, window), (t, m)) in &per_plan {
        spent_t.set(l(&[("plan", plan), ("window", window)]), *t as f64);
        spent_m.set(l(&[("plan", plan), ("window", window)]), *m as f64);
    }
    reg.register(
        "tollgate_quota_spent_tokens",
        "Tokens spent in the current window, summed over a plan's identities",
        spent_t.0,
    );
    reg.register(
        "tollgate_quota_spent_money_nano",
        "Money spent in the current window (nano-units), summed over a plan's identities",
        spent_m.0,
    );
}

/// OpenMetrics text as the Prometheus text format (0.0.4), which every Prometheus and
/// promtool read: a counter's HELP and TYPE name its `_total` series, and the OpenMetrics-only
/// `# UNIT` and `# EOF` lines go.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match rewritten {
            Some(r) => out.push_str(&r),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every issuer's series are there from the start, at zero, labelled by the names the
    /// configuration gave; an `iss` no issuer has is `issuer="none"`, never its own label.
    #[test]
    fn issuer_families_are_pre_registered_and_bounded_by_the_configuration() {
        let dir = crate::token_bind::tests::Dir::new("token-bind", "metrics");
        let (mut svc, _, _) = crate::token_bind::tests::service(&dir, false);
        svc.count(None, "wrong_issuer");
        svc.count(Some(0), "expired");
        let mut reg = Registry::default();
        issuer_families(&mut reg, Some(&svc));
        let mut om = String::new();
        encode(&mut om, &reg).unwrap();
        let text = to_text_format(&om);
        for line in [
            "tollgate_issuer_keys{issuer=\"a\"} 1",
            "tollgate_issuer_keys{issuer=\"remote\"} 0",
            "tollgate_issuer_keys_skipped{issuer=\"a\",reason=\"encryption_key\"} 0",
            "tollgate_issuer_fetches_total{issuer=\"remote\",trigger=\"unknown_kid\",outcome=\"ok\"} 0",
            "tollgate_issuer_refusals_total{issuer=\"a\",reason=\"expired\"} 1",
            "tollgate_issuer_refusals_total{issuer=\"remote\",reason=\"keys_unavailable\"} 0",
            "tollgate_issuer_refusals_total{issuer=\"none\",reason=\"wrong_issuer\"} 1",
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
        // a's keys were read; the remote issuer has none yet, so no age.
        assert!(
            text.contains("tollgate_issuer_key_age_seconds{issuer=\"a\"}"),
            "{text}"
        );
        assert!(
            !text.contains("tollgate_issuer_key_age_seconds{issuer=\"remote\"}"),
            "{text}"
        );
        let issuers: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.split("issuer=\"").nth(1))
            .filter_map(|r| r.split('"').next())
            .collect();
        assert_eq!(issuers, ["a", "none", "remote"].into());
    }

    #[test]
    fn counters_get_their_total_names_and_openmetrics_lines_go() {
        let om = "# HELP a_packets Packets.\n# TYPE a_packets counter\na_packets_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\n# UNIT g bytes\ng 1.0\n# EOF\n";
        let text = to_text_format(om);
        assert_eq!(
            text,
            "# HELP a_packets_total Packets.\n# TYPE a_packets_total counter\na_packets_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1.0\n"
        );
    }
}
