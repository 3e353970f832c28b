//! Fleet-wide rates and quotas: what one node computes from what every node reports through
//! the store (`store::spend`). Pure arithmetic, no clock and no I/O, so the convergence and
//! the bounds are tested by simulation (share/tests.rs). Wired by `fleet::global`.
//!
//! # Global rates: demand-weighted shares
//!
//! Every interval each node measures, per identity, the **offered** load of the interval: what
//! the kernel passed plus what it dropped for that identity ([`offered`], from the per-CPU
//! `IDENTITY_COUNTERS` delta: `passed` + `dropped`, packets and bytes). Offered, not admitted:
//! a node capped by its share admits exactly its share, so admitted load could never show that
//! it needs more. (The per-identity counters do not split drops by reason; a drop for
//! isolation or a spent quota counts as demand too. It is still load arriving at this node,
//! which is what the weights are for, and a quarantined or over-quota identity admits nothing
//! whatever its share.)
//!
//! The node smooths it ([`DemandTracker`]: `w ← ⌊(w + 3·offered) / 4⌋` each interval: it
//! follows a shift within an interval or two, and an idle node's weight falls to a quarter
//! every interval and reaches 0, withdrawing its report and its floor, within 32), publishes
//! `w`, and reads everybody's fresh `w`. Its own share of a plan rate `R` is ([`split`]):
//!
//! ```text
//! n      = 1 + (other nodes with a fresh report and w > 0)
//! f      = max(1, floor)                       every participant's floor
//! rest   = R − n·f                             (when R ≤ n·f: each gets max(1, R / n))
//! m      = min(w_now, w_previous)              this node's own weight (see below)
//! W      = m + Σ others' w
//! share  = f + ⌊rest · m / W⌋                  (W = 0: f)
//! ```
//!
//! **What sums to what.** With every node in every other's view, `Σ share ≤ R`, and
//! `Σ share ≥ R − n` when every node's demand is steady (the floors of the division, at most
//! one unit per node, are left unallocated rather than over-allocated). The proof that the
//! sum never exceeds `R` although nodes read the store at different moments is the `min`:
//! every node reports every interval `T`, so at any instant node `i`'s view of node `j` is
//! either `j`'s report from the cycle that computed `j`'s current share or the one before
//! it; both are ≥ `m_j`, the weight `j` used for itself. Every denominator is therefore
//! ≥ `Σ m_j`, and `Σ_i m_i / W_i ≤ 1`. The cost: a node's own growth takes effect one
//! interval after the others have seen it. Exceptions, documented as the tolerance: a node
//! that has just started reporting is not yet in the others' views, so for one interval the
//! sum can be `R + (new nodes × f)`; and a node whose report is late (jitter beyond one
//! interval) can be read below its own `m` for that interval.
//!
//! The burst is split the same way: `burst_i = max(1, ⌊burst · share_i / R⌋)` (one packet at
//! least: the kernel's GCRA admits nothing with a zero burst tolerance).
//!
//! **Stale reports.** The store stamps each report with the server's clock; a report older
//! than the store call's `ttl` (N intervals, e.g. 4 × 250 ms) is left out of the view and so
//! out of the sum: a node that died stops holding a share after N intervals.
//!
//! **Floor.** A node that starts seeing the identity has `m = 0` (its previous report was
//! nothing) and gets `f` at once: never zero. [`default_floor`] is `R / (10 · pool size)`,
//! at least 1: with 4 nodes a new node starts at 2.5 % of the rate for one interval.
//!
//! # Global quotas
//!
//! Every interval each node reports its own cumulative spend in the current window period
//! (bytes and cost; an absolute value, so a report retried after a lost reply is counted
//! once, see `store::spend`) and reads the fleet total back in the same pipeline
//! ([`QuotaTrack`]). The node's view of the total never goes down within a period
//! (`max(store total, last view + own spend since)`), so a store that lost the key or a
//! writer that deleted it cannot hand the budget out again. The identity is over quota when
//! the view reaches the limit.
//!
//! **Overshoot bound.** Let node `k` set the flag at its cycle `t_k` and let `τ` be the last
//! of the cycles `t_k − T` (the cycle before each node's flag). Every node `j` reported at
//! `t_j − T ≤ τ`, so the store read at `τ` held at least `Σ_j own_j(t_j − T)`, and it was
//! below the limit `L` (that node did not set its flag). Each node admits at most
//! `r_j·T + b_j` between `t_j − T` and `t_j` (GCRA: rate × time + burst). So the fleet admits
//! less than `L + Σ_j (r_j·T + b_j)`, i.e. `L + N·(T·r + b)` when every node runs the plan's
//! rate `r` and burst `b` (with global rates, `Σ r_j ≤ r`: `L + T·r + Σ b_j`).
//! Example: 4 nodes, T = 250 ms, 1 MB/s each, burst 64 KiB: at most
//! 1 MB + 4 × (250 000 + 65 536) B = 1 MB + 1 262 144 B.
//!
//! **Store outage** (after the same grace as for rates, [`outage_rate`]: the caller calls
//! [`QuotaTrack::outage`] once `G` consecutive reports failed, and counts on the view until
//! then; [`OutageMode`], from the last fleet total seen, `T_cut`, and this node's
//! own spend then, `own_cut`; `N` the last known pool size):
//! - `share`: this node may spend `(L − T_cut) / N` more: the fleet stays within `L` (plus
//!   one interval per node) if every node is cut off alike.
//! - `local`: the node counts on from `T_cut` as if alone: up to `N × (L − T_cut)` more
//!   fleet-wide, nobody cut short.
//! - `closed`: nothing more until the store answers again (the flag is set when the grace
//!   ends).
//!
//! The grace adds at most `G·T·r_j` per node to each bound.

use tollgate_common::policy::{IdentityCounters, PlanLimits};

use crate::config::OutageMode;

/// Load measured in one interval, or a smoothed weight derived from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    pub packets: u64,
    pub bytes: u64,
}

impl Demand {
    pub fn is_zero(&self) -> bool {
        self.packets == 0 && self.bytes == 0
    }

    fn min(self, o: Demand) -> Demand {
        Demand {
            packets: self.packets.min(o.packets),
            bytes: self.bytes.min(o.bytes),
        }
    }
}

/// The offered load of an interval from the identity's counter delta
/// (`IdentityCounters::since` over the summed per-CPU slots): passed + dropped.
pub fn offered(delta: &IdentityCounters) -> Demand {
    Demand {
        packets: delta.passed.packets.saturating_add(delta.dropped.packets),
        bytes: delta.passed.bytes.saturating_add(delta.dropped.bytes),
    }
}

/// One identity's demand on this node across intervals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DemandTracker {
    /// What this node published last interval (what the others may still be reading).
    published: Demand,
}

/// What [`DemandTracker::update`] yields for one interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemandStep {
    /// Publish this (all zero: remove this node's report; it is idle for the identity).
    pub publish: Demand,
    /// Weigh this node with this in its own [`split`]: `min(publish, previous publish)`.
    pub own: Demand,
}

impl DemandTracker {
    /// Takes the interval's offered load: `w ← ⌊(w + 3·offered) / 4⌋` per dimension (an idle
    /// node keeps a quarter every interval: 0 after at most 32).
    pub fn update(&mut self, offered: Demand) -> DemandStep {
        let ewma = |w: u64, d: u64| ((u128::from(w) + 3 * u128::from(d)) / 4) as u64;
        let publish = Demand {
            packets: ewma(self.published.packets, offered.packets),
            bytes: ewma(self.published.bytes, offered.bytes),
        };
        let own = publish.min(self.published);
        self.published = publish;
        DemandStep { publish, own }
    }

    /// Whether the tracker can be dropped (its identity idle here, nothing published).
    pub fn is_idle(&self) -> bool {
        self.published.is_zero()
    }
}

/// The floor [`split`] uses by default: a tenth of an equal share of `rate` over the pool,
/// at least 1.
pub fn default_floor(rate: u64, pool_size: usize) -> u64 {
    (rate / (10 * pool_size.max(1) as u64)).max(1)
}

/// This node's part of `rate`, given its own weight `me` and the fresh weights of the other
/// nodes (`others`; zero weights and this node's own entry must be left out by the caller:
/// [`others_of`]). See the module comment for the formula and what sums to what.
pub fn split(rate: u64, floor: u64, others: &[u64], me: u64) -> u64 {
    let n = 1 + others.iter().filter(|w| **w > 0).count() as u64;
    let f = floor.max(1);
    let Some(rest) = rate.checked_sub(n.saturating_mul(f)).filter(|r| *r > 0) else {
        // Too small a rate to give everyone its floor: equal parts, at least one unit.
        return (rate / n).max(1);
    };
    let total: u128 = u128::from(me) + others.iter().map(|w| u128::from(*w)).sum::<u128>();
    if total == 0 || me == 0 {
        return f;
    }
    let part = (u128::from(rest) * u128::from(me) / total) as u64;
    f.saturating_add(part).min(rate)
}

/// The other nodes' weights from a store reading (`(node, demand)`), this node's own entry
/// and zero weights left out, one dimension picked.
pub fn others_of(view: &[(String, Demand)], me: &str, dim: fn(&Demand) -> u64) -> Vec<u64> {
    view.iter()
        .filter(|(n, _)| n != me)
        .map(|(_, d)| dim(d))
        .filter(|w| *w > 0)
        .collect()
}

/// One node's limits for an identity whose plan rate is fleet-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeShare {
    pub packets_per_s: Option<u64>,
    pub packet_burst: u64,
    pub bytes_per_s: Option<u64>,
    pub byte_burst: u64,
}

impl NodeShare {
    /// As the kernel record takes it (`tables::records::identity_record`).
    pub fn limits(&self) -> PlanLimits {
        PlanLimits {
            packets_per_s: self.packets_per_s,
            packet_burst: self.packet_burst,
            bytes_per_s: self.bytes_per_s,
            byte_burst: self.byte_burst,
        }
    }
}

/// The burst that goes with a share: the same fraction of the plan's burst, at least 1.
pub fn burst_for(plan_rate: u64, plan_burst: u64, share: u64) -> u64 {
    if plan_rate == 0 {
        return plan_burst.max(1);
    }
    ((u128::from(plan_burst) * u128::from(share) / u128::from(plan_rate)) as u64).max(1)
}

/// This node's limits for a plan declared fleet-wide: each budget split by its own dimension
/// (packets by offered packets, the cost budget by offered bytes: the kernel records cost
/// only for passed packets, and a share is a fraction, so bytes stand in for cost). An
/// unlimited budget stays unlimited.
pub fn node_share(
    plan: &PlanLimits,
    pool_size: usize,
    view: &[(String, Demand)],
    me: &str,
    own: Demand,
) -> NodeShare {
    let one = |rate: Option<u64>, burst: u64, dim: fn(&Demand) -> u64| match rate {
        None => (None, burst),
        Some(r) => {
            let s = split(
                r,
                default_floor(r, pool_size),
                &others_of(view, me, dim),
                dim(&own),
            );
            (Some(s), burst_for(r, burst, s))
        }
    };
    let (packets_per_s, packet_burst) = one(plan.packets_per_s, plan.packet_burst, |d| d.packets);
    let (bytes_per_s, byte_burst) = one(plan.bytes_per_s, plan.byte_burst, |d| d.bytes);
    NodeShare {
        packets_per_s,
        packet_burst,
        bytes_per_s,
        byte_burst,
    }
}

/// This node's part of a fleet-wide `rate` while the store cannot be reached: `share`: 1/N
/// (N the last known pool size; at least the floor); `local`: the whole rate; `closed`: the
/// floor (the rate cannot be checked against the fleet, so only the least is granted; never
/// zero).
///
/// The caller keeps the last share while fewer than `G` consecutive reports failed and only
/// then takes this, `G` one less than the intervals in the store's `ttl`: the others still
/// count this node's last report for `ttl`, so keeping its share that long grants nothing
/// twice, and one slow round trip does not move a node's limit. After that, in a partial
/// outage (this node cut off, the others not) the others divide the whole rate among
/// themselves, so the fleet admits up to the rate plus this (`share`: `R + R/N`).
pub fn outage_rate(mode: OutageMode, rate: u64, pool_size: usize) -> u64 {
    let floor = default_floor(rate, pool_size);
    match mode {
        OutageMode::Share => (rate / pool_size.max(1) as u64).max(floor),
        OutageMode::Local => rate,
        OutageMode::Closed => floor,
    }
}

/// Spend in a quota window: frame bytes and cost units (as `controller::quota` counts them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spend {
    pub bytes: u64,
    pub cost: u64,
}

impl Spend {
    pub fn plus(self, o: Spend) -> Spend {
        Spend {
            bytes: self.bytes.saturating_add(o.bytes),
            cost: self.cost.saturating_add(o.cost),
        }
    }

    pub fn minus(self, o: Spend) -> Spend {
        Spend {
            bytes: self.bytes.saturating_sub(o.bytes),
            cost: self.cost.saturating_sub(o.cost),
        }
    }

    pub fn max(self, o: Spend) -> Spend {
        Spend {
            bytes: self.bytes.max(o.bytes),
            cost: self.cost.max(o.cost),
        }
    }

    /// Whether either part reaches its limit (`None`: unlimited).
    pub fn reaches(&self, bytes: Option<u64>, cost: Option<u64>) -> bool {
        bytes.is_some_and(|l| self.bytes >= l) || cost.is_some_and(|l| self.cost >= l)
    }
}

/// A fleet total as a node saw it, with the node's own spend at that moment: what it re-seeds
/// a store that lost the window with (`store::spend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub total: Spend,
    pub own: Spend,
}

/// One identity in one window period on this node: its own spend and the fleet's as last
/// seen. A new period is a new `QuotaTrack` (the store key names the period too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaTrack {
    /// This node's spend in the period (what it reports, an absolute value).
    pub own: Spend,
    /// The last fleet total from the store, `None` before the first answer.
    pub seen: Option<Seen>,
    /// Set while the store is unreachable: what was known when it went.
    pub cut: Option<Seen>,
}

impl QuotaTrack {
    /// Counts this node's spend of an interval (passed bytes and cost of the counter delta).
    pub fn add(&mut self, delta: Spend) {
        self.own = self.own.plus(delta);
    }

    /// The fleet total as this node knows it now: the last total seen plus its own spend
    /// since (its own spend alone before any answer).
    pub fn view(&self) -> Spend {
        match self.seen {
            Some(s) => s.total.plus(self.own.minus(s.own)),
            None => self.own,
        }
    }

    /// The store answered a report of `reported` (the `own` sent) with `total`. The view
    /// never goes down: a total below it (a store that lost the key, a writer that deleted
    /// fields) is not believed.
    pub fn observe(&mut self, reported: Spend, total: Spend) {
        let floor = match self.seen {
            Some(s) => s.total.plus(reported.minus(s.own)),
            None => reported,
        };
        self.seen = Some(Seen {
            total: total.max(floor),
            own: reported,
        });
        self.cut = None;
    }

    /// The store did not answer this interval.
    pub fn outage(&mut self) {
        if self.cut.is_none() {
            self.cut = Some(self.seen.unwrap_or(Seen {
                total: self.own,
                own: self.own,
            }));
        }
    }

    /// Whether the identity is over `limits` (bytes, cost; `None` unlimited) in this period:
    /// with the store, by the fleet view; without it, by `mode` over `pool_size` nodes.
    pub fn exhausted(
        &self,
        limits: (Option<u64>, Option<u64>),
        mode: OutageMode,
        pool_size: usize,
    ) -> bool {
        let (lb, lc) = limits;
        let Some(cut) = self.cut else {
            return self.view().reaches(lb, lc);
        };
        if cut.total.reaches(lb, lc) {
            return true;
        }
        let since = self.own.minus(cut.own);
        match mode {
            OutageMode::Closed => true,
            OutageMode::Local => cut.total.plus(since).reaches(lb, lc),
            OutageMode::Share => {
                let n = pool_size.max(1) as u64;
                let part = |l: Option<u64>, spent: u64| l.map(|l| l.saturating_sub(spent) / n);
                since.reaches(part(lb, cut.total.bytes), part(lc, cut.total.cost))
            }
        }
    }
}

#[cfg(test)]
mod tests;
