//! Fleet-wide plans (`scope = "fleet"`) on this node: the one place that holds, per
//! identity, its demand tracker and current share of the plan's rate, and its quota tracks
//! per window period (`fleet::share` has the rules, `store::spend` the store side).
//!
//! It lives in `State` (not persisted), because [`crate::identity::Resolver::record`], the one
//! place a kernel record gets its plan's limits (binds, reloads, reconcile), must give an
//! identity on a fleet-wide plan its current share (or the floor), never the full rate.
//!
//! Once per sync interval the fleet task ([`super::task`]) runs a cycle: [`Global::prepare`]
//! reads the identities' kernel counters (its own baseline, so the measuring interval is the
//! reporting interval), updates the trackers and returns the reports; the task sends them
//! (`report_demand`, one `report_spend` per window kind) with the node not borrowed; then
//! [`Global::finish`] takes the answers (or the failure), computes the shares and returns
//! the identities whose share changed, for the task to write into the kernel. The
//! controller sets quota flags from [`Global::over`].
//!
//! Only identities with something to say are reported: demand while the tracker is not idle
//! (and once more to withdraw), spend when this node's spend in the period changed or it has
//! no answer yet.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use tollgate_common::policy::{IdentityCounters, PlanLimits};

use super::{
    share::{self, Demand, DemandTracker, QuotaTrack, Seen, Spend},
    store::spend::{DemandRound, FleetSpend, Refused, SpendRound},
};
use crate::{
    config::{Config, OutageMode, Plan},
    controller::quota::{QuotaBook, QuotaLimits, Window},
    identity::Resolver,
    state::State,
    tables::KernelTables,
};

/// Lifetime of a demand report in intervals: the others drop a report older than this.
pub const REPORT_INTERVALS: u32 = 4;
/// Consecutive failed cycles during which a node keeps its last share and counts on its
/// quota view (the others still count its report): `ttl / T − 1`.
pub const GRACE: u32 = REPORT_INTERVALS - 1;
/// A spend key outlives its period by this much (a node that reports just at the end).
const SPEND_MARGIN: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Default)]
struct Rate {
    /// The plan `prepare` found it on.
    plan: String,
    tracker: DemandTracker,
    /// `DemandStep::own` of the last cycle.
    own: Demand,
    /// What this node published last (what `status` shows as its demand).
    published: Demand,
    /// Everyone's fresh demand as the last answer had it.
    view: Vec<(String, Demand)>,
    /// The limits in force (written to the kernel), `None` before the first cycle.
    share: Option<PlanLimits>,
}

#[derive(Clone, Debug, Default)]
struct Quota {
    /// The period these counts belong to (unix s).
    start: u64,
    track: QuotaTrack,
    /// `own` as last reported (nothing to report while unchanged).
    sent: Option<Spend>,
}

/// Counters for `/metrics`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GlobalStats {
    pub cycles: u64,
    pub failed_cycles: u64,
    pub round_trips: u64,
    /// Store values refused or bounded, by (`spend`|`demand`, label).
    pub refused: BTreeMap<(&'static str, &'static str), u64>,
}

#[derive(Clone, Debug, Default)]
pub struct Global {
    /// Set by the fleet task when it starts: the node has a pool.
    pub on: bool,
    pub node: String,
    pub interval: Duration,
    /// The last known pool size (members listed), at least 1.
    pub pool_size: usize,
    pub outage: crate::config::Outage,
    /// Consecutive cycles the store did not answer.
    pub failures: u32,
    last: BTreeMap<String, IdentityCounters>,
    rates: BTreeMap<String, Rate>,
    quotas: BTreeMap<(String, Window), Quota>,
    pub stats: GlobalStats,
}

/// One cycle's reports, owned, so the node is not borrowed while they are sent.
pub struct Job {
    pub node: String,
    pub demand: Vec<(String, Demand)>,
    pub demand_ttl: Duration,
    pub spend: Vec<SpendJob>,
}

pub struct SpendJob {
    pub window: Window,
    /// The store's name of the period (`minute-1764613620`).
    pub name: String,
    pub ttl: Duration,
    pub reports: Vec<(String, Spend, Option<Seen>)>,
}

/// The store's answers to a [`Job`], in its order.
pub struct Answers {
    pub demand: Option<DemandRound>,
    pub spend: Vec<SpendRound>,
}

/// One identity's share as `tollgate fleet status` shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ShareView {
    pub identity: String,
    /// This node's smoothed offered load (packets, bytes per interval).
    pub demand_packets: u64,
    pub demand_bytes: u64,
    /// Nodes with demand for it in the last answer (this one included).
    pub nodes: usize,
    pub packets_per_s: Option<u64>,
    pub bytes_per_s: Option<u64>,
}

impl Global {
    pub fn pool(&self) -> usize {
        self.pool_size.max(1)
    }

    /// Whether the store has failed long enough for the outage modes to apply.
    pub fn in_outage(&self) -> bool {
        self.failures >= GRACE
    }

    /// The limits a kernel record for `name` on fleet-wide `plan` gets: its current share,
    /// or the floor when it has none yet (never the plan's full rate: every node would
    /// grant it until the next cycle).
    pub fn limits_for(&self, name: &str, plan: &Plan) -> PlanLimits {
        if let Some(s) = self.rates.get(name).and_then(|r| r.share) {
            return s;
        }
        floor_limits(&plan.limits, self.pool())
    }

    /// Identities on fleet-wide plans that this node tracks.
    pub fn tracked(&self) -> usize {
        let mut n: std::collections::BTreeSet<&str> =
            self.rates.keys().map(String::as_str).collect();
        n.extend(self.quotas.keys().map(|(i, _)| i.as_str()));
        n.len()
    }

    /// The `k` identities with the most demand here, with their shares.
    pub fn top(&self, k: usize) -> Vec<ShareView> {
        let mut v: Vec<ShareView> = self
            .rates
            .iter()
            .map(|(name, r)| ShareView {
                identity: name.clone(),
                demand_packets: r.published.packets,
                demand_bytes: r.published.bytes,
                nodes: r
                    .view
                    .iter()
                    .filter(|(n, d)| *n != self.node && !d.is_zero())
                    .count()
                    + 1,
                packets_per_s: r.share.and_then(|s| s.packets_per_s),
                bytes_per_s: r.share.and_then(|s| s.bytes_per_s),
            })
            .collect();
        v.sort_by(|a, b| {
            (b.demand_packets, b.demand_bytes)
                .cmp(&(a.demand_packets, a.demand_bytes))
                .then_with(|| a.identity.cmp(&b.identity))
        });
        v.truncate(k);
        v
    }

    /// The first window whose fleet-wide quota `name` has spent (as `Spent::exhausted`),
    /// by the fleet view, or by the outage mode while the store is out.
    pub fn over(&self, name: &str, limits: &QuotaLimits) -> Option<(Window, &'static str)> {
        Window::ALL.into_iter().find_map(|w| {
            let (lb, lc) = limits.get(w);
            let q = self.quotas.get(&(name.to_owned(), w))?;
            if !q.track.exhausted((lb, lc), self.outage.quotas, self.pool()) {
                return None;
            }
            let v = q.track.view();
            Some((
                w,
                if lb.is_some_and(|l| v.bytes >= l) || lc.is_none() {
                    "bytes"
                } else {
                    "cost"
                },
            ))
        })
    }

    /// The fleet's spend of `name` in `w`'s period as this node sees it.
    pub fn spend_view(&self, name: &str, w: Window) -> Option<Spend> {
        self.quotas
            .get(&(name.to_owned(), w))
            .map(|q| q.track.view())
    }

    /// Measures the interval and builds the reports (see the module comment).
    /// `book`: this node's own spend as the controller keeps it (`quota.json`): a node that
    /// restarts mid-window resumes its own spend from it, so its first report does not
    /// overwrite its earlier spend in the store with less.
    pub fn prepare(
        &mut self,
        config: &Config,
        state: &State,
        tables: &KernelTables,
        book: &QuotaBook,
    ) -> Job {
        let now_s = crate::state::now_unix_ms() / 1000;
        let resolver = Resolver::new(config, state);
        let mut demand = Vec::new();
        let mut spend: BTreeMap<Window, Vec<(String, Spend, Option<Seen>)>> = BTreeMap::new();
        let mut seen_names = std::collections::BTreeSet::new();
        let mut counters: Option<Vec<IdentityCounters>> = None;
        for (name, id) in &state.identity_ids {
            let Some(plan) = resolver
                .with_slot(name, Some(*id))
                .and_then(|r| config.plan(r.plan))
                .filter(|p| p.fleet_wide())
            else {
                continue;
            };
            // One batch read of the counters, on the first fleet-wide identity (not a
            // syscall per identity).
            let counters = counters.get_or_insert_with(|| {
                let upto = state.identity_ids.values().max().map_or(1, |m| m + 1);
                tables.identity_counters_upto(upto).unwrap_or_default()
            });
            let Some(&now) = counters.get(*id as usize) else {
                continue;
            };
            seen_names.insert(name.clone());
            let (delta, first) = match self.last.insert(name.clone(), now) {
                Some(prev) => (now.since(&prev), false),
                None => (IdentityCounters::default(), true),
            };
            if plan.limits.packets_per_s.is_some() || plan.limits.bytes_per_s.is_some() {
                let r = self.rates.entry(name.clone()).or_default();
                r.plan.clone_from(&plan.name);
                let before = r.published;
                let step = r.tracker.update(share::offered(&delta));
                r.own = step.own;
                r.published = step.publish;
                // Something to say: a weight, or the withdrawal of the last one.
                if !(step.publish.is_zero() && before.is_zero()) {
                    demand.push((name.clone(), step.publish));
                }
            }
            for w in Window::ALL {
                let (lb, lc) = plan.quota.get(w);
                if lb.is_none() && lc.is_none() {
                    continue;
                }
                let start = w.period_start(now_s);
                let q = self.quotas.entry((name.clone(), w)).or_default();
                if q.start != start {
                    *q = Quota {
                        start,
                        ..Quota::default()
                    };
                    if first && let Some(s) = book.spent.get(name) {
                        let w_spent = match w {
                            Window::Minute => s.minute,
                            Window::Day => s.day,
                            Window::Month => s.month,
                        };
                        if w_spent.start_unix_s == start {
                            q.track.own = Spend {
                                bytes: w_spent.bytes,
                                cost: w_spent.cost,
                            };
                        }
                    }
                }
                q.track.add(Spend {
                    bytes: delta.passed.bytes,
                    cost: delta.cost,
                });
                if q.sent != Some(q.track.own) || q.track.seen.is_none() {
                    spend
                        .entry(w)
                        .or_default()
                        .push((name.clone(), q.track.own, q.track.seen));
                }
            }
        }
        // Identities gone from fleet-wide plans (or from the node) are forgotten.
        self.last.retain(|n, _| seen_names.contains(n));
        self.rates.retain(|n, _| seen_names.contains(n));
        self.quotas.retain(|(n, _), _| seen_names.contains(n));
        let spend = spend
            .into_iter()
            .map(|(w, reports)| {
                let start = w.period_start(now_s);
                let end = w.period_end(start);
                SpendJob {
                    window: w,
                    name: format!("{}-{start}", w.as_str()),
                    ttl: Duration::from_secs(end.saturating_sub(now_s)) + SPEND_MARGIN,
                    reports,
                }
            })
            .collect();
        Job {
            node: self.node.clone(),
            demand,
            demand_ttl: self.interval * REPORT_INTERVALS,
            spend,
        }
    }

    /// Takes the store's answers (`None`: the store failed this cycle) and computes the
    /// shares; returns the identities whose limits changed (to be written to the kernel).
    pub fn finish(&mut self, config: &Config, job: &Job, answers: Option<Answers>) -> Vec<String> {
        self.stats.cycles += 1;
        match answers {
            Some(a) => {
                self.failures = 0;
                if let Some(d) = a.demand {
                    self.count(&d.refused, "demand", d.round_trips);
                    for ((name, _), view) in job.demand.iter().zip(d.views) {
                        if let (Some(r), Some(v)) = (self.rates.get_mut(name), view) {
                            r.view = v;
                        }
                    }
                }
                for (sj, round) in job.spend.iter().zip(a.spend) {
                    self.count(&round.refused, "spend", round.round_trips);
                    for ((name, own, _), total) in sj.reports.iter().zip(round.totals) {
                        let Some(q) = self.quotas.get_mut(&(name.clone(), sj.window)) else {
                            continue;
                        };
                        if let FleetSpend::Total { total, .. } = total {
                            q.track.observe(*own, total);
                            q.sent = Some(*own);
                        }
                    }
                }
            }
            None => {
                self.stats.failed_cycles += 1;
                self.failures = self.failures.saturating_add(1);
                if self.in_outage() {
                    for q in self.quotas.values_mut() {
                        q.track.outage();
                        // Everything is sent again once the store answers.
                        q.sent = None;
                    }
                }
            }
        }
        let (pool, node, outage) = (self.pool(), self.node.clone(), self.in_outage());
        let mode = self.outage.rates;
        let mut changed = Vec::new();
        for (name, r) in self.rates.iter_mut() {
            // A reload between `prepare` and here may have removed the plan: the identity
            // keeps its limits until the next cycle.
            let Some(plan) = config.plan(&r.plan).filter(|p| p.fleet_wide()) else {
                continue;
            };
            let limits = if outage {
                outage_limits(&plan.limits, mode, pool)
            } else if r.view.is_empty() || r.own.is_zero() {
                floor_limits(&plan.limits, pool)
            } else {
                frame_safe(
                    share::node_share(&plan.limits, pool, &r.view, &node, r.own).limits(),
                    &plan.limits,
                )
            };
            if r.share != Some(limits) {
                r.share = Some(limits);
                changed.push(name.clone());
            }
        }
        changed
    }

    fn count(&mut self, refused: &Refused, op: &'static str, round_trips: u32) {
        self.stats.round_trips += u64::from(round_trips);
        for (label, n) in refused.labels() {
            if n > 0 {
                *self.stats.refused.entry((op, label)).or_default() += n;
            }
        }
    }
}

/// Each budget at its floor (`share::default_floor`), the burst in proportion.
pub fn floor_limits(plan: &PlanLimits, pool: usize) -> PlanLimits {
    each(plan, |r| share::default_floor(r, pool))
}

/// Each budget at its outage rate (`share::outage_rate`).
pub fn outage_limits(plan: &PlanLimits, mode: OutageMode, pool: usize) -> PlanLimits {
    each(plan, |r| share::outage_rate(mode, r, pool))
}

/// A byte burst below one full frame would never pass a maximum-size packet: a share's byte
/// burst is at least that (or the plan's own, if smaller), whatever its fraction.
fn frame_safe(mut l: PlanLimits, plan: &PlanLimits) -> PlanLimits {
    if l.bytes_per_s.is_some() {
        l.byte_burst = l.byte_burst.max(MIN_FRAME_BURST.min(plan.byte_burst));
    }
    l
}

/// `config::check`'s least byte burst (one full Ethernet frame).
const MIN_FRAME_BURST: u64 = 1518;

fn each(plan: &PlanLimits, f: impl Fn(u64) -> u64) -> PlanLimits {
    let one = |rate: Option<u64>, burst: u64| match rate {
        None => (None, burst),
        Some(r) => {
            let s = f(r);
            (Some(s), share::burst_for(r, burst, s))
        }
    };
    let (packets_per_s, packet_burst) = one(plan.packets_per_s, plan.packet_burst);
    let (bytes_per_s, byte_burst) = one(plan.bytes_per_s, plan.byte_burst);
    frame_safe(
        PlanLimits {
            packets_per_s,
            packet_burst,
            bytes_per_s,
            byte_burst,
        },
        plan,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlanScope;

    fn config() -> Config {
        let mut c = Config::embedded_default();
        c.plans.push(Plan {
            name: "g".into(),
            priority: 50,
            limits: PlanLimits {
                packets_per_s: Some(1000),
                packet_burst: 50,
                bytes_per_s: None,
                byte_burst: 0,
            },
            quota: QuotaLimits {
                minute_bytes: Some(1000),
                ..QuotaLimits::default()
            },
            response: Default::default(),
            scope: PlanScope::Fleet,
        });
        c
    }

    fn global() -> Global {
        Global {
            on: true,
            node: "a".into(),
            interval: Duration::from_millis(250),
            pool_size: 4,
            ..Global::default()
        }
    }

    fn job(demand: &[(&str, Demand)]) -> Job {
        Job {
            node: "a".into(),
            demand: demand.iter().map(|(n, d)| ((*n).to_owned(), *d)).collect(),
            demand_ttl: Duration::from_secs(1),
            spend: Vec::new(),
        }
    }

    fn d(packets: u64) -> Demand {
        Demand { packets, bytes: 0 }
    }

    #[test]
    fn a_record_gets_the_floor_then_the_share_never_the_whole_rate() {
        let c = config();
        let plan = c.plan("g").unwrap();
        let mut g = global();
        // Before any cycle: the floor (1000 / (10 · 4)), burst in proportion.
        let l = g.limits_for("x", plan);
        assert_eq!((l.packets_per_s, l.packet_burst), (Some(25), 1));
        g.rates.insert(
            "x".into(),
            Rate {
                plan: "g".into(),
                own: d(700),
                ..Rate::default()
            },
        );
        let view = vec![("a".to_owned(), d(700)), ("b".to_owned(), d(100))];
        let j = job(&[("x", d(700))]);
        let a = Answers {
            demand: Some(DemandRound {
                views: vec![Some(view)],
                refused: Refused::default(),
                round_trips: 1,
            }),
            spend: Vec::new(),
        };
        assert_eq!(g.finish(&c, &j, Some(a)), vec!["x".to_owned()]);
        // n = 2: 25 + ⌊950 · 700 / 800⌋ = 856.
        assert_eq!(g.limits_for("x", plan).packets_per_s, Some(856));
        // Unchanged: nothing to write.
        let a = Answers {
            demand: None,
            spend: Vec::new(),
        };
        assert!(g.finish(&c, &job(&[]), Some(a)).is_empty());
        // The store fails: the share holds for the grace, then 1/N.
        for i in 0..GRACE {
            let changed = g.finish(&c, &job(&[]), None);
            if i + 1 < GRACE {
                assert!(changed.is_empty(), "cycle {i}");
            }
        }
        assert!(g.in_outage());
        assert_eq!(g.limits_for("x", plan).packets_per_s, Some(250));
        g.outage.rates = OutageMode::Closed;
        g.finish(&c, &job(&[]), None);
        assert_eq!(g.limits_for("x", plan).packets_per_s, Some(25));
    }

    #[test]
    fn the_quota_flag_follows_the_fleet_total_and_the_outage_share() {
        let c = config();
        let limits = c.plan("g").unwrap().quota;
        let mut g = global();
        let mut q = Quota::default();
        q.track.add(Spend {
            bytes: 100,
            cost: 0,
        });
        g.quotas.insert(("x".into(), Window::Minute), q);
        assert_eq!(g.over("x", &limits), None);
        // The others spent 900: the pool's total reaches the quota.
        g.quotas
            .get_mut(&("x".to_owned(), Window::Minute))
            .unwrap()
            .track
            .observe(
                Spend {
                    bytes: 100,
                    cost: 0,
                },
                Spend {
                    bytes: 1000,
                    cost: 0,
                },
            );
        assert_eq!(g.over("x", &limits), Some((Window::Minute, "bytes")));
        // Another identity at 600 of 1000 when the store goes: `share` lets it spend
        // 400 / 4 = 100 more here.
        let mut q = Quota::default();
        q.track.add(Spend {
            bytes: 600,
            cost: 0,
        });
        q.track.observe(
            Spend {
                bytes: 600,
                cost: 0,
            },
            Spend {
                bytes: 600,
                cost: 0,
            },
        );
        g.quotas.insert(("y".into(), Window::Minute), q);
        for _ in 0..GRACE {
            g.finish(&c, &job(&[]), None);
        }
        let t = &mut g
            .quotas
            .get_mut(&("y".to_owned(), Window::Minute))
            .unwrap()
            .track;
        t.add(Spend { bytes: 99, cost: 0 });
        assert_eq!(g.over("y", &limits), None);
        let t = &mut g
            .quotas
            .get_mut(&("y".to_owned(), Window::Minute))
            .unwrap()
            .track;
        t.add(Spend { bytes: 1, cost: 0 });
        assert_eq!(g.over("y", &limits), Some((Window::Minute, "bytes")));
    }
}
