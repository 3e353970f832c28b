//! The control loop (the controller's driver over the node's configuration and state; the
//! signals and decisions it runs are `controller`'s): every `controller.interval_ms` it reads the GPUs and the kernel's
//! per-identity counters, and decides hold-back per (endpoint, plan), quota flags and, once
//! a second, anomaly responses. Every decision goes to the audit log with its inputs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde_json::json;
use tollgate_common::{
    flow::EgressCounters,
    policy::{
        ID_QUARANTINED, ID_QUOTA_EXHAUSTED, ID_RESPONSE_CAPPED, ID_THROTTLED, IdentityCounters,
        MAX_PLANS,
    },
};
use tracing::{info, warn};

use crate::controller::{
    anomaly::{Decision, Hold, Sample, Step, Tracker},
    gpu::{GpuReading, GpuSource, NvmlSource, SimulatedSource},
    handshakes::{self, Evidence, Snapshot},
    pressure::{Saturation, Signal, combine, hold_back_q8, share},
    quota::{QuotaBook, QuotaLimits, Window},
    response::{self, Action, ResponseCaps, Seen},
    scrape::{self, Change, Feed},
};
use crate::{
    audit::{Actor, Audit},
    clock::{self, StepWatch},
    config::{AnomalyMode, Config, GpuSourceKind},
    identity::Resolver,
    net::prefix_covers,
    state::{Quarantine, QuarantineOwner, State, now_unix_ms},
    tables::{KernelTables, Proto, to_q8},
};

/// One endpoint's pressure as of the last tick.
#[derive(Clone, Debug, Default)]
struct Load {
    signals: Vec<Signal>,
    source: &'static str,
}

/// What the loop keeps between ticks.
pub struct ControlLoop {
    source: Option<Box<dyn GpuSource>>,
    /// Why there is no GPU source (said once in the log, shown in `status`).
    pub gpu_error: Option<String>,
    pub readings: Vec<GpuReading>,
    saturation: BTreeMap<u32, Saturation>,
    /// Each endpoint's pressure at the last tick, with its signals and their source.
    pressure: BTreeMap<u32, Load>,
    /// The model-server feeds, by endpoint name (a reload keeps a feed whose server stays).
    feeds: BTreeMap<String, Feed>,
    /// The TLS client of `https` model servers (`None` where none is https).
    scrape_client: Option<crate::issuers::fetch::Client>,
    hold_back: BTreeMap<(u32, u16), u16>,
    pub quotas: QuotaBook,
    quota_dirty: bool,
    exhausted: BTreeSet<String>,
    /// The last reading of each slot, indexed by slot (dense: 64 bytes a slot, not a map
    /// entry and a name). A slot given to another identity was cleared first, so `since`
    /// counts its new owner from zero.
    last: Vec<Option<IdentityCounters>>,
    /// Counter deltas summed since the last anomaly sample, and when that window began.
    window: BTreeMap<String, IdentityCounters>,
    window_start_ms: u64,
    pub trackers: BTreeMap<String, Tracker>,
    /// Anomaly decisions by (step, mode), for metrics.
    pub actions: BTreeMap<(String, &'static str), u64>,
    /// Throttled identities' connections since their throttle began (the evidence an
    /// automatic quarantine needs, `anomaly.require_handshake`).
    evidence: BTreeMap<String, Evidence>,
    /// Quarantines the ladder decided and did not impose, by [`Hold`] reason, for metrics.
    pub withheld: BTreeMap<&'static str, u64>,
    /// Loops run, and how long the last one took (seconds).
    pub loops: u64,
    pub last_loop_s: f64,
    /// Whether `exhausted` has been read from the kernel's flags yet (once, at the first
    /// tick: the flags outlive the agent, the set does not).
    exhausted_seeded: bool,
    /// Wall-clock steps against the boot clock, reported (`clock_step`), never followed.
    clock_watch: StepWatch,
    /// Response caps: the egress readings and the identities held capped.
    responses: ResponseCaps,
    /// Whether `responses` has been seeded from the kernel's flags (once, as `exhausted`).
    responses_seeded: bool,
}

fn open_source(config: &Config) -> Result<Box<dyn GpuSource>, String> {
    match config.controller.gpu_source {
        GpuSourceKind::Nvml => NvmlSource::open()
            .map(|s| Box::new(s) as Box<dyn GpuSource>)
            .map_err(|e| e.to_string()),
        GpuSourceKind::Simulated => Ok(Box::new(SimulatedSource::new(
            &config.controller.simulated_file,
        ))),
        GpuSourceKind::None => {
            Err("gpu_source = \"none\": running on traffic signals alone".into())
        }
    }
}

/// The TLS client for the configured `https` model servers, if any.
fn scrape_client(config: &Config) -> Option<crate::issuers::fetch::Client> {
    let servers: Vec<_> = config
        .endpoints
        .iter()
        .filter_map(|e| e.model_server.as_ref())
        .collect();
    scrape::client_for(&servers)
}

impl ControlLoop {
    /// A quota file that cannot be read is an error: starting from zero would hand out every
    /// quota again (and the next save would destroy the record).
    pub fn new(config: &Config) -> Result<ControlLoop, crate::controller::quota::QuotaError> {
        let (source, gpu_error) = match open_source(config) {
            Ok(s) => (Some(s), None),
            Err(e) => {
                // Said once: a node without a GPU runs on traffic signals alone.
                warn!("no GPU readings: {e}; enforcing on traffic signals alone");
                (None, Some(e))
            }
        };
        let quotas = QuotaBook::load(&config.node.state_dir)?;
        Ok(ControlLoop {
            source,
            gpu_error,
            readings: Vec::new(),
            saturation: BTreeMap::new(),
            pressure: BTreeMap::new(),
            feeds: BTreeMap::new(),
            scrape_client: scrape_client(config),
            hold_back: BTreeMap::new(),
            quotas,
            quota_dirty: false,
            exhausted: BTreeSet::new(),
            last: Vec::new(),
            window: BTreeMap::new(),
            window_start_ms: now_unix_ms(),
            trackers: BTreeMap::new(),
            actions: BTreeMap::new(),
            evidence: BTreeMap::new(),
            withheld: BTreeMap::new(),
            loops: 0,
            last_loop_s: 0.0,
            exhausted_seeded: false,
            clock_watch: StepWatch::default(),
            responses: ResponseCaps::default(),
            responses_seeded: false,
        })
    }

    /// A reload may change the source; readings and state carry over.
    pub fn reconfigure(&mut self, config: &Config) {
        match open_source(config) {
            Ok(s) => {
                self.source = Some(s);
                self.gpu_error = None;
            }
            Err(e) => {
                self.source = None;
                self.gpu_error = Some(e);
            }
        }
        // Re-derive every hold-back entry from the new plans and endpoints.
        self.hold_back.clear();
        // A feed whose endpoint still has the same model server keeps its last reading and
        // outage; one whose server changed (URL, kind, thresholds) starts again.
        self.feeds.retain(|name, feed| {
            config
                .endpoints
                .iter()
                .any(|e| &e.name == name && e.model_server.as_ref().is_some_and(|s| feed.serves(s)))
        });
        self.pressure.clear();
        self.scrape_client = scrape_client(config);
    }

    /// One tick.
    pub fn tick(
        &mut self,
        config: &Config,
        state: &mut State,
        tables: &mut KernelTables,
        audit: &Audit,
    ) {
        let t = std::time::Instant::now();
        self.gpu(config, tables, audit);
        self.counters(config, state, tables, audit);
        self.loops += 1;
        self.last_loop_s = t.elapsed().as_secs_f64();
    }

    fn gpu(&mut self, config: &Config, tables: &mut KernelTables, audit: &Audit) {
        self.readings = match self.source.as_mut().map(|s| s.read()) {
            Some(Ok(r)) => {
                if self.gpu_error.take().is_some() {
                    info!("GPU readings are back");
                }
                r
            }
            Some(Err(e)) => {
                let e = e.to_string();
                if self.gpu_error.as_deref() != Some(e.as_str()) {
                    warn!("GPU readings failed: {e}");
                    self.gpu_error = Some(e);
                }
                Vec::new()
            }
            None => Vec::new(),
        };
        let cfg = config.controller.pressure_config();
        let normalised = cfg.normalised();
        self.model_servers(config, audit);
        for (i, ep) in config.endpoints.iter().enumerate() {
            let id = i as u32 + 1;
            let util = self
                .readings
                .iter()
                .filter(|r| ep.gpus.contains(&r.index))
                .map(|r| r.utilization)
                .fold(None, |m: Option<f64>, u| Some(m.map_or(u, |m| m.max(u))));
            let server = ep.model_server.as_ref();
            let reading = match (server, self.feeds.get(&ep.name)) {
                (Some(s), Some(f)) => f.usable(s.fallback_intervals),
                _ => scrape::Use::Pending,
            };
            let pending = reading == scrape::Use::Pending && server.is_some();
            let (signals, source) = scrape::signals(server, reading, util, cfg.saturate_at);
            let pressure = combine(&signals);
            let sat = self.saturation.entry(id).or_default();
            // Waiting for a model server's first answer decides nothing: no reading is not
            // a calm reading (it would lift a hold-back without `recover_after`).
            if !pending && sat.update(pressure.map(|p| p.0), &normalised) {
                let _ = audit.record(
                    &Actor::AGENT,
                    if sat.saturated() {
                        "gpu_saturated"
                    } else {
                        "gpu_recovered"
                    },
                    "controller",
                    json!({"endpoint": ep.name, "utilization": util, "gpus": ep.gpus,
                           "pressure": pressure.map(|p| p.0), "driver": pressure.map(|p| p.1),
                           "source": source, "signals": signals, "readings": self.readings}),
                );
            }
            self.pressure.insert(id, Load { signals, source });
            let saturated = sat.saturated();
            for (p, plan) in config.plans.iter().enumerate().take(MAX_PLANS as usize) {
                let q8 = hold_back_q8(share(plan.priority, saturated, cfg.floor));
                if self.hold_back.get(&(id, p as u16)) != Some(&q8) {
                    match tables.set_hold_back(id, p as u16, q8) {
                        Ok(()) => {
                            self.hold_back.insert((id, p as u16), q8);
                        }
                        Err(e) => warn!("hold-back for {} / {}: {e}", ep.name, plan.name),
                    }
                }
            }
        }
    }

    /// The model servers' answers since the last tick (an outage's start and end reported
    /// once each), then the next scrapes, which run while the loop goes on.
    fn model_servers(&mut self, config: &Config, audit: &Audit) {
        let now_ms = now_unix_ms();
        for ep in &config.endpoints {
            let Some(server) = &ep.model_server else {
                continue;
            };
            let feed = self
                .feeds
                .entry(ep.name.clone())
                .or_insert_with(|| Feed::new(server));
            match feed.collect(now_ms) {
                Some(Change::Down(o)) => {
                    warn!(
                        endpoint = %ep.name,
                        "model server {} failed ({}): {}; its last reading holds for {} intervals, \
                         then the GPUs' utilisation decides; said once until it answers again",
                        server.url, o.error.outcome, o.error.message, server.fallback_intervals
                    );
                    let _ = audit.record(
                        &Actor::AGENT,
                        "model_server_down",
                        &o.error.outcome,
                        json!({"endpoint": ep.name, "url": server.url.to_string(),
                               "error": o.error.message,
                               "fallback_intervals": server.fallback_intervals}),
                    );
                }
                Some(Change::Up(o)) => {
                    let down_ms = now_ms.saturating_sub(o.since_unix_ms);
                    info!(
                        endpoint = %ep.name,
                        "model server {} answers again after {down_ms} ms ({} failed scrapes)",
                        server.url, o.failed_scrapes
                    );
                    let _ = audit.record(
                        &Actor::AGENT,
                        "model_server_back",
                        "controller",
                        json!({"endpoint": ep.name, "url": server.url.to_string(),
                               "down_ms": down_ms, "failed_scrapes": o.failed_scrapes,
                               "first_error": o.error.message}),
                    );
                }
                None => {}
            }
            feed.launch(
                self.scrape_client.clone(),
                server.clone(),
                server.timeout(config.controller.interval_ms),
            );
        }
    }

    /// Every endpoint's pressure as of the last tick, for `status`.
    pub fn loads(&self, config: &Config) -> Vec<crate::control::reply::EndpointLoad> {
        use crate::control::reply::{EndpointLoad, ModelServerView};
        config
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| {
                let id = i as u32 + 1;
                let load = self.pressure.get(&id).cloned().unwrap_or_default();
                let model_server = ep.model_server.as_ref().map(|s| {
                    let feed = self.feeds.get(&ep.name);
                    let current = feed.and_then(|f| f.current(s.fallback_intervals));
                    ModelServerView {
                        url: s.url.to_string(),
                        kind: s.kind,
                        reading: current.map(|(r, _)| r.clone()),
                        age_intervals: current.map(|(_, a)| a),
                        error: feed
                            .and_then(|f| f.outage.as_ref())
                            .map(|o| o.error.message.clone()),
                        scrapes: feed.map(|f| f.scrapes.clone()).unwrap_or_default(),
                    }
                });
                EndpointLoad::new(
                    &ep.name,
                    load.source,
                    &load.signals,
                    self.is_saturated(id),
                    model_server,
                )
            })
            .collect()
    }

    /// The feed of endpoint `name`'s model server, for metrics.
    pub fn feed(&self, name: &str) -> Option<&Feed> {
        self.feeds.get(name)
    }

    fn counters(
        &mut self,
        config: &Config,
        state: &mut State,
        tables: &mut KernelTables,
        audit: &Audit,
    ) {
        // Quota windows run on agent time (the boot clock, see `clock`): a window rolls at
        // its boundary only once the boot clock has got there, whatever the wall clock says.
        let now_ms = now_unix_ms();
        let now_s = now_ms / 1000;
        if let Some(step) = self.clock_watch.check() {
            warn!(
                "the wall clock stepped by {step} ms against the boot clock; deadlines keep running on the boot clock"
            );
            let _ = audit.record(
                &Actor::AGENT,
                "clock_step",
                "controller",
                json!({"step_ms": step, "wall_offset_ms": clock::wall_offset_ms()}),
            );
        }
        if !self.exhausted_seeded {
            self.exhausted = state
                .identity_ids
                .iter()
                .filter(|(_, id)| {
                    tables
                        .identity(**id)
                        .is_ok_and(|r| r.flags & ID_QUOTA_EXHAUSTED != 0)
                })
                .map(|(n, _)| n.clone())
                .collect();
            self.exhausted_seeded = true;
        }
        // One batch pass over the counter array per tick, not one syscall per identity.
        let upto = state.identity_ids.values().max().map_or(1, |m| m + 1);
        let counters = match tables.identity_counters_upto(upto) {
            Ok(c) => c,
            Err(e) => {
                warn!("reading identity counters: {e}");
                Vec::new()
            }
        };
        if self.last.len() < counters.len() {
            self.last.resize(counters.len(), None);
        }
        for (name, id) in &state.identity_ids {
            let Some(&now) = counters.get(*id as usize) else {
                continue;
            };
            let delta = match self.last[*id as usize].replace(now) {
                // `since`, not `delta`: a slot cleared for reuse starts again from zero.
                Some(prev) => now.since(&prev),
                // First sight (start or a new identity): no delta, a baseline for the next.
                None => IdentityCounters::default(),
            };
            // Only identities that sent something, or whose ladder is under way (a silent
            // one's ladder still expires), are sampled: an idle identity costs no entry
            // here and no tracker (a fresh tracker's expiry decides nothing).
            if delta != IdentityCounters::default() || self.trackers.contains_key(name) {
                self.window
                    .entry(name.clone())
                    .or_default()
                    .accumulate(&delta);
            }
            let Some(plan_name) = Resolver::new(config, state)
                .with_slot(name, Some(*id))
                .map(|r| r.plan)
            else {
                continue;
            };
            let limits: QuotaLimits = config.plan(plan_name).map(|p| p.quota).unwrap_or_default();
            if limits == QuotaLimits::default() {
                if self.exhausted.remove(name) {
                    let _ = tables.update_identity_flags(*id, 0, ID_QUOTA_EXHAUSTED, None);
                }
                continue;
            }
            let spent = self.quotas.spent.entry(name.clone()).or_default();
            if delta.passed.bytes > 0 || delta.cost > 0 {
                self.quota_dirty = true;
            }
            // The local book keeps counting (persistence, `quota show`); a fleet-wide plan's
            // flag follows the pool's total (`fleet::global`), on a node in a pool.
            spent.add(now_s, delta.passed.bytes, delta.cost);
            let fleet_wide =
                state.fleet.on && config.plan(plan_name).is_some_and(|p| p.fleet_wide());
            let over = if fleet_wide {
                state.fleet.over(name, &limits)
            } else {
                spent.exhausted(&limits)
            };
            let detail = |window: Window| {
                let (b, c) = if fleet_wide {
                    let v = state.fleet.spend_view(name, window).unwrap_or_default();
                    (v.bytes, v.cost)
                } else {
                    spent.get(window)
                };
                let (t, m) = spent.usage(window);
                json!({"spent_bytes": b, "spent_cost": c, "spent_tokens": t, "spent_money_nano": m,
                       "until_unix": spent.window_ends(window),
                       "scope": if fleet_wide { "fleet" } else { "node" }})
            };
            let detail = over.map(|(w, _)| detail(w));
            self.quota_flag(name, *id, plan_name, over, detail, tables, audit);
        }
        self.response_caps(config, state, tables, audit, now_ms, upto);
        if self.quota_dirty {
            // At most one interval of spend is lost to a crash.
            match self.quotas.save(&config.node.state_dir) {
                Ok(()) => self.quota_dirty = false,
                Err(e) => warn!("saving quotas: {e}"),
            }
        }
        // Anomaly samples once a second: shorter windows are mostly noise.
        let elapsed_ms = now_ms.saturating_sub(self.window_start_ms);
        if elapsed_ms >= 1000 {
            let window = std::mem::take(&mut self.window);
            self.window_start_ms = now_ms;
            if config.anomaly.mode != AnomalyMode::Off {
                self.anomaly(
                    config,
                    state,
                    tables,
                    audit,
                    &window,
                    elapsed_ms as f64 / 1000.0,
                    now_s,
                );
            }
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; the pieces are the daemon's"
    )]
    fn anomaly(
        &mut self,
        config: &Config,
        state: &mut State,
        tables: &mut KernelTables,
        audit: &Audit,
        window: &BTreeMap<String, IdentityCounters>,
        secs: f64,
        now_s: u64,
    ) {
        let a = &config.anomaly;
        // First every identity's decision, then (when one escalates) one read of the
        // kernel's connections for all of them, then the decisions applied.
        let mut decided = Vec::new();
        for (name, d) in window {
            let Some(id) = state.identity_ids.get(name).copied() else {
                continue;
            };
            // A token's class label this build does not know is judged as the resolver's
            // fallback class (a customer, as before).
            let Some(class) = Resolver::new(config, state).get(name).map(|r| r.class) else {
                continue;
            };
            let cfg = a.ladder(class);
            let packets = d.passed.packets + d.dropped.packets;
            let sample = Sample {
                packets_per_s: packets as f64 / secs,
                bytes_per_s: (d.passed.bytes + d.dropped.bytes) as f64 / secs,
                new_flows_per_s: d.syn as f64 / secs,
                small_packet_ratio: if packets == 0 {
                    0.0
                } else {
                    d.small as f64 / packets as f64
                },
                drop_ratio: if packets == 0 {
                    0.0
                } else {
                    d.dropped.packets as f64 / packets as f64
                },
            };
            if let Some(ev) = self.evidence.get_mut(name) {
                ev.passed_packets += d.passed.packets;
                ev.passed_bytes += d.passed.bytes;
            }
            let tracker = self.trackers.entry(name.clone()).or_default();
            let before = tracker.decided_step();
            // A silent second is not a sample: learning "idle" would make the identity's
            // next ordinary request look like a flood. Its ladder still expires.
            let decision = if packets == 0 {
                tracker.expire(now_s, &cfg)
            } else {
                tracker.observe(sample, now_s, &cfg)
            };
            if let Some(decision) = decision {
                decided.push((name.clone(), id, cfg, before, decision));
            }
        }
        let onset =
            |before: Step, d: &Decision| before == Step::Observe && d.step == Step::Throttle;
        let escalates =
            |before: Step, d: &Decision| before == Step::Throttle && d.step == Step::Quarantine;
        let table = (a.require_handshake
            && decided
                .iter()
                .any(|(_, _, _, b, d)| onset(*b, d) || escalates(*b, d)))
        .then(handshakes::established);
        // Automatic quarantines in force (a shadow ladder's count as if enforced, so shadow
        // mode reports what enforcing would do).
        let mut active = state
            .quarantines
            .values()
            .filter(|q| matches!(q.by, QuarantineOwner::Controller))
            .count()
            + self
                .trackers
                .values()
                .filter(|t| t.decided_step() == Step::Quarantine && t.step() == Step::Observe)
                .count();
        for (name, id, cfg, before, mut decision) in decided {
            let quarantine_before = state.quarantines.get(&name).cloned();
            if matches!(decision.step, Step::Release | Step::Observe) {
                self.evidence.remove(&name);
            }
            let connections = |t: &handshakes::Established| {
                Snapshot::of(&t.conns, connection_of(config, state, &name))
            };
            if onset(before, &decision)
                && let Some(Ok(t)) = &table
                && !t.truncated
            {
                self.evidence
                    .insert(name.clone(), Evidence::starting(connections(t)));
            }
            if escalates(before, &decision) {
                let proof = if a.require_handshake {
                    self.proof(&name, &table, connections)
                } else {
                    Ok("anomaly.require_handshake = false".to_owned())
                };
                let cap = a.max_auto_quarantines as usize;
                let allowed = proof.and_then(|seen| {
                    if active >= cap {
                        Err((
                            Hold::Capped,
                            format!(
                                "{active} automatic quarantine(s) in force, anomaly.max_auto_quarantines = {cap}"
                            ),
                        ))
                    } else {
                        Ok(seen)
                    }
                });
                let tracker = self.trackers.get_mut(&name).expect("observed above");
                match allowed {
                    Ok(seen) => {
                        active += 1;
                        decision.reason = format!("{}; {seen}", decision.reason);
                    }
                    Err((why, detail)) => {
                        let original = decision.reason.clone();
                        let news = tracker.withhold(&mut decision, why, &detail, now_s, &cfg);
                        *self.withheld.entry(why.as_str()).or_default() += 1;
                        if news {
                            let action = if why == Hold::Capped {
                                "quarantine_capped"
                            } else {
                                "quarantine_withheld"
                            };
                            let _ = audit.record(
                                &Actor::AGENT,
                                action,
                                why.as_str(),
                                json!({"identity": name, "detail": detail, "decided": original,
                                       "shadow": decision.shadow, "until_unix": decision.until_unix_s}),
                            );
                        }
                    }
                }
            }
            *self
                .actions
                .entry((
                    decision.step.to_string(),
                    if decision.shadow { "shadow" } else { "enforce" },
                ))
                .or_default() += 1;
            let _ = audit.record(
                &Actor::AGENT,
                "anomaly",
                &decision.reason,
                json!({"identity": name, "decision": decision}),
            );
            if decision.shadow {
                continue;
            }
            let throttle = to_q8(a.throttle_factor);
            let applied = match decision.step {
                Step::Throttle => tables.update_identity_flags(id, ID_THROTTLED, 0, Some(throttle)),
                Step::Quarantine => {
                    state.quarantines.entry(name.clone()).or_insert(Quarantine {
                        until_unix_ms: decision.until_unix_s.map(|u| u * 1000),
                        since_unix_ms: now_s * 1000,
                        reason: format!("anomaly: {}", decision.reason),
                        by: QuarantineOwner::Controller,
                    });
                    tables.update_identity_flags(id, ID_QUARANTINED, ID_THROTTLED, None)
                }
                Step::Release | Step::Observe => {
                    // Lift only what the controller itself set: an operator's quarantine stays.
                    let ours = state
                        .quarantines
                        .get(&name)
                        .is_some_and(|q| matches!(q.by, QuarantineOwner::Controller));
                    if ours {
                        state.quarantines.remove(&name);
                    }
                    let clear = if ours {
                        ID_THROTTLED | ID_QUARANTINED
                    } else {
                        ID_THROTTLED
                    };
                    tables.update_identity_flags(id, 0, clear, None)
                }
            };
            if let Err(e) = applied {
                warn!("anomaly response for {name}: {e}");
            }
            // One journal record when the quarantine changed (a throttle is not state); one
            // that cannot be written now rides on the next record that can.
            if state.quarantines.get(&name) != quarantine_before.as_ref() {
                let entry = state.quarantine_entry(&name);
                if let Err(e) = state.record(&config.node.state_dir, vec![entry.clone()]) {
                    warn!("recording the anomaly response for {name}: {e}");
                    state.note(entry);
                }
            }
        }
    }

    /// Whether the kernel's connections (`table`, this tick's read) prove that `name`'s
    /// flood is its own ([`handshakes::judge`] against its reading at the throttle's start).
    fn proof(
        &mut self,
        name: &str,
        table: &Option<std::io::Result<handshakes::Established>>,
        connections: impl Fn(&handshakes::Established) -> Snapshot,
    ) -> Result<String, (Hold, String)> {
        let t = match table {
            Some(Ok(t)) if !t.truncated => t,
            Some(Ok(_)) => {
                return Err((
                    Hold::Unreadable,
                    format!(
                        "more than {} ESTABLISHED connections on this node",
                        handshakes::MAX_CONNECTIONS
                    ),
                ));
            }
            Some(Err(e)) => {
                return Err((Hold::Unreadable, format!("reading the connections: {e}")));
            }
            None => return Err((Hold::Unreadable, "the connections were not read".into())),
        };
        match self.evidence.get(name) {
            Some(ev) => handshakes::judge(&connections(t), ev),
            // Throttled before this agent started, or the read at the throttle's start
            // failed: measure from now, judge at the next try.
            None => {
                self.evidence
                    .insert(name.to_owned(), Evidence::starting(connections(t)));
                Err((
                    Hold::Unreadable,
                    "no reading of its connections from the throttle's start; measuring from now"
                        .into(),
                ))
            }
        }
    }

    /// Sets or clears `name`'s quota flag by `over` (the first window spent, if any); the
    /// set mirrors the kernel's flags (seeded at the first tick), so no map read here.
    #[expect(
        clippy::too_many_arguments,
        reason = "the two callers hold the pieces separately"
    )]
    fn quota_flag(
        &mut self,
        name: &str,
        id: u32,
        plan_name: &str,
        over: Option<(Window, &'static str)>,
        detail: Option<serde_json::Value>,
        tables: &mut KernelTables,
        audit: &Audit,
    ) {
        let flagged = self.exhausted.contains(name);
        match (over, flagged) {
            (Some((window, kind)), false) => {
                if tables
                    .update_identity_flags(id, ID_QUOTA_EXHAUSTED, 0, None)
                    .is_ok()
                {
                    self.exhausted.insert(name.to_owned());
                    let mut d = json!({"identity": name, "plan": plan_name, "window": window, "kind": kind,
                                       "reason": crate::controller::quota::reason_of(kind)});
                    if let (Some(d), Some(serde_json::Value::Object(more))) =
                        (d.as_object_mut(), detail)
                    {
                        d.extend(more);
                    }
                    let _ = audit.record(&Actor::AGENT, "quota_exhausted", "controller", d);
                }
            }
            (None, true) => {
                if tables
                    .update_identity_flags(id, 0, ID_QUOTA_EXHAUSTED, None)
                    .is_ok()
                {
                    self.exhausted.remove(name);
                    let _ = audit.record(
                        &Actor::AGENT,
                        "quota_reset",
                        "window rolled",
                        json!({"identity": name, "plan": plan_name}),
                    );
                }
            }
            (Some(_), true) => {
                self.exhausted.insert(name.to_owned());
            }
            (None, false) => {}
        }
    }

    /// Response caps, once a tick: the egress counters' payload deltas into the response
    /// windows, the rate over the tick, and the flag set or cleared where that changed.
    fn response_caps(
        &mut self,
        config: &Config,
        state: &State,
        tables: &mut KernelTables,
        audit: &Audit,
        now_ms: u64,
        upto: u32,
    ) {
        if !self.responses_seeded {
            let flagged: Vec<(String, u16)> = state
                .identity_ids
                .iter()
                .filter_map(|(n, id)| {
                    let r = tables.identity(*id).ok()?;
                    (r.flags & ID_RESPONSE_CAPPED != 0).then(|| (n.clone(), r.response_q8))
                })
                .collect();
            self.responses.seed(flagged);
            self.responses_seeded = true;
        }
        // No plan caps responses and nobody is held capped: nothing to read.
        if config.plans.iter().all(|p| p.response.is_unlimited())
            && self.responses.capped().is_empty()
        {
            return;
        }
        let counters = egress_counters(tables, upto);
        let resolver = Resolver::new(config, state);
        let seen = state.identity_ids.iter().map(|(name, id)| Seen {
            name,
            slot: *id,
            plan: resolver
                .with_slot(name, Some(*id))
                .and_then(|r| config.plan(r.plan))
                .map(|p| (p.name.as_str(), &p.response)),
        });
        let (dirty, actions) = self
            .responses
            .tick(now_ms, &counters, seen, &mut self.quotas);
        self.quota_dirty |= dirty;
        for a in actions {
            let (slot, set, q8) = match &a {
                Action::Set { slot, q8, .. } => (*slot, true, *q8),
                Action::Clear { slot, .. } => (*slot, false, 0),
            };
            if let Err(e) = set_response_flag(tables, slot, set, q8) {
                warn!("response cap flag of identity slot {slot}: {e}");
                continue;
            }
            self.responses.applied(&a);
            let _ = match &a {
                Action::Set {
                    name,
                    plan,
                    over,
                    q8,
                    ..
                } => {
                    let mode = config
                        .plan(plan)
                        .map_or("drop", |p| p.response.over.label());
                    audit.record(
                        &Actor::AGENT,
                        "response_capped",
                        "controller",
                        json!({"identity": name, "plan": plan, "cap": over.cap,
                               "spent_bytes": over.spent, "limit": over.limit,
                               "until_unix": over.until_unix, "mode": mode,
                               "response_q8": q8, "scope": "node"}),
                    )
                }
                Action::Clear {
                    name, plan, was, ..
                } => {
                    let why = match was.map(|o| o.cap) {
                        _ if plan
                            .as_deref()
                            .and_then(|p| config.plan(p))
                            .is_none_or(|p| p.response.is_unlimited()) =>
                        {
                            "the plan caps responses no more"
                        }
                        Some(response::Cap::Rate) => "rate back under",
                        Some(response::Cap::Window(_)) => "window rolled",
                        None => "under every cap",
                    };
                    audit.record(
                        &Actor::AGENT,
                        "response_cap_lifted",
                        why,
                        json!({"identity": name, "plan": plan, "cap": was.map(|o| o.cap),
                               "was": was}),
                    )
                }
            };
        }
    }

    /// The response cap `name` is held by, as of the last tick (`None`: not capped; a
    /// `Capped` with no `over`: found flagged at start, judged at the next tick).
    pub fn response_cap(&self, name: &str) -> Option<&response::Capped> {
        self.responses.capped().get(name)
    }

    /// The identities a response cap holds back now, by name.
    pub fn response_capped_names(&self) -> Vec<String> {
        self.responses.capped().keys().cloned().collect()
    }

    /// The quota flags of identities on fleet-wide plans, by the pool's totals: called by
    /// the fleet task right after a cycle's answers, so the flag is set in the cycle that
    /// saw the total (the overshoot bound counts on it), not one controller tick later.
    pub fn fleet_quota_flags(
        &mut self,
        config: &Config,
        state: &mut State,
        tables: &mut KernelTables,
        audit: &Audit,
    ) {
        if !self.exhausted_seeded || !state.fleet.on {
            return;
        }
        let resolver = Resolver::new(config, state);
        let mut todo = Vec::new();
        for (name, id) in &state.identity_ids {
            let Some(plan) = resolver
                .get(name)
                .and_then(|r| config.plan(r.plan))
                .filter(|p| p.fleet_wide() && !p.quota.is_unlimited())
            else {
                continue;
            };
            let over = state.fleet.over(name, &plan.quota);
            let detail = over.map(|(w, _)| {
                let v = state.fleet.spend_view(name, w).unwrap_or_default();
                json!({"spent_bytes": v.bytes, "spent_cost": v.cost, "scope": "fleet",
                       "until_unix": w.period_end(w.period_start(now_unix_ms() / 1000))})
            });
            todo.push((name.clone(), *id, plan.name.clone(), over, detail));
        }
        for (name, id, plan, over, detail) in todo {
            self.quota_flag(&name, id, &plan, over, detail, tables, audit);
        }
    }

    /// After `quota reset`: the flags are cleared, so nothing is exhausted any more (the
    /// response flags are not: the next tick finds the book empty and clears them).
    pub fn forget_exhausted(&mut self, only: Option<&str>) {
        match only {
            Some(n) => {
                self.exhausted.remove(n);
            }
            None => self.exhausted.clear(),
        }
    }

    /// Counts one accepted usage report against `name` (slot `id`, on `plan_name` with
    /// `limits`) and sets its quota flag at once if the report reached a limit: the cut-off
    /// falls on that report, not at the next tick. The next tick's pass clears the flag when
    /// the window rolls, as for bytes. The book is saved with the next tick's (`quota_dirty`).
    #[expect(
        clippy::too_many_arguments,
        reason = "the pieces are the node's, borrowed separately"
    )]
    pub fn usage_reported(
        &mut self,
        name: &str,
        id: u32,
        plan_name: &str,
        limits: &QuotaLimits,
        tokens: u64,
        money_nano: u64,
        tables: &mut KernelTables,
        audit: &Audit,
    ) {
        let now_s = now_unix_ms() / 1000;
        let spent = self.quotas.spent.entry(name.to_owned()).or_default();
        spent.add_usage(now_s, tokens, money_nano);
        self.quota_dirty = true;
        let over = spent.exhausted(limits);
        let detail = over.map(|(w, _)| {
            let (b, c) = spent.get(w);
            let (t, m) = spent.usage(w);
            json!({"spent_bytes": b, "spent_cost": c, "spent_tokens": t, "spent_money_nano": m,
                   "until_unix": spent.window_ends(w), "scope": "node", "by": "usage_report"})
        });
        // A report never lifts a flag: only a window's roll does (the tick's pass).
        if over.is_some() {
            self.quota_flag(name, id, plan_name, over, detail, tables, audit);
        }
    }

    /// The reason `name`'s quota flag is set (`quota::reason_of` of the first window spent),
    /// as of the book now; `None` when the controller has not flagged it.
    pub fn exhausted_reason(
        &self,
        config: &crate::config::Config,
        plan: Option<&str>,
        name: &str,
    ) -> Option<&'static str> {
        if !self.exhausted.contains(name) {
            return None;
        }
        let limits = plan
            .and_then(|p| config.plan(p))
            .map(|p| p.quota)
            .unwrap_or_default();
        let kind = self
            .quotas
            .spent
            .get(name)
            .and_then(|s| s.exhausted(&limits))
            .map_or("bytes", |(_, k)| k);
        Some(crate::controller::quota::reason_of(kind))
    }

    /// The Q8 hold-back multiplier written for (endpoint, plan), if any.
    pub fn hold_back(&self, endpoint: u32, plan: u16) -> Option<u16> {
        self.hold_back.get(&(endpoint, plan)).copied()
    }

    /// Identities whose quota flag the controller has set.
    pub fn exhausted(&self) -> &BTreeSet<String> {
        &self.exhausted
    }

    /// Whether endpoint `id` is saturated now.
    pub fn is_saturated(&self, id: u32) -> bool {
        self.saturation.get(&id).is_some_and(|s| s.saturated())
    }

    /// Saturated endpoints by name, for `status`.
    pub fn saturated(&self, config: &Config) -> Vec<String> {
        self.saturation
            .iter()
            .filter(|(_, s)| s.saturated())
            .filter_map(|(id, _)| {
                config
                    .endpoints
                    .get(*id as usize - 1)
                    .map(|e| e.name.clone())
            })
            .collect()
    }
}

/// The per-identity egress counters `0..upto`, summed over CPUs; empty (nothing counted this
/// tick, a warning) when they cannot be read.
fn egress_counters(tables: &KernelTables, upto: u32) -> Vec<EgressCounters> {
    match tables.egress_identities_upto(upto) {
        Ok(c) => c,
        Err(e) => {
            warn!("reading egress counters: {e}");
            Vec::new()
        }
    }
}

/// Sets (with `q8`, 0: drop) or clears `ID_RESPONSE_CAPPED` on identity `slot`, keeping
/// every other flag: the quota and anomaly flags are the controller's too.
fn set_response_flag(
    tables: &mut KernelTables,
    slot: u32,
    set: bool,
    q8: u16,
) -> Result<(), crate::tables::TableError> {
    let mut rec = tables.identity(slot)?;
    if set {
        rec.flags |= ID_RESPONSE_CAPPED;
        rec.response_q8 = q8;
    } else {
        rec.flags &= !ID_RESPONSE_CAPPED;
        rec.response_q8 = 0;
    }
    tables.set_identity(slot, &rec)
}

/// Whether a connection is one of `name`'s: from an address it is bound at (by the
/// configuration or a live token binding) to a protected TCP endpoint port on this node.
fn connection_of<'a>(
    config: &'a Config,
    state: &'a State,
    name: &str,
) -> impl Fn(&handshakes::Conn) -> bool + 'a {
    let now_ms = now_unix_ms();
    let mut prefixes: Vec<(IpAddr, u8)> = config
        .identity(name)
        .map(|i| i.bind.clone())
        .unwrap_or_default();
    prefixes.extend(
        state
            .bindings
            .iter()
            .filter(|b| b.identity == name && !b.expired(now_ms))
            .map(|b| (b.addr, b.prefix_len)),
    );
    move |c| {
        let local = c.local.ip();
        prefixes
            .iter()
            .any(|(net, len)| prefix_covers(*net, *len, c.remote.ip()))
            && config.endpoints.iter().any(|e| {
                e.spec.proto == Proto::Tcp
                    && e.port_ranges.iter().any(|r| r.contains(&c.local.port()))
                    && match local {
                        IpAddr::V4(a) => e
                            .spec
                            .v4_prefix
                            .is_none_or(|(n, l)| prefix_covers(IpAddr::V4(n), l, IpAddr::V4(a))),
                        IpAddr::V6(a) => e
                            .spec
                            .v6_prefix
                            .is_none_or(|(n, l)| prefix_covers(IpAddr::V6(n), l, IpAddr::V6(a))),
                    }
            })
    }
}
