//! The share and quota rules, by deterministic simulation: no clock, no store. Rates run
//! through the kernel's own GCRA arithmetic (`tollgate_common::limiter`), packets spread
//! evenly over each interval; nodes run their cycle one after the other within an interval,
//! so each reads some reports of this interval and some of the last, as real nodes whose
//! phases differ do.

use std::collections::BTreeMap;

use tollgate_common::{
    limiter::{Gcra, gcra, packet_increment_ns, packet_tau_ns},
    policy::Q8_ONE,
};

use super::*;

const T_NS: u64 = 250_000_000;
const RATE: u64 = 1000;
const BURST: u64 = 50;
/// Reports older than this many intervals are out of the view (the store's `ttl`).
const STALE_AFTER: u64 = 4;
/// What the sum of the shares may exceed the rate by, and the admitted total over a second
/// too: the new-node floor transient (one interval, f = 2.5 % with 4 nodes) and the bursts.
const TOLERANCE: f64 = 0.05;

struct SimNode {
    name: String,
    tracker: DemandTracker,
    /// Offered packets per second (the traffic arriving here).
    offered_pps: u64,
    rate: u64,
    burst: u64,
    tat: u64,
    /// Passed and dropped in the last interval: what the kernel counters show.
    passed: u64,
    dropped: u64,
    /// Whether this node's cycle is running (false: crashed, reports nothing).
    up: bool,
}

impl SimNode {
    fn new(name: &str, offered_pps: u64) -> SimNode {
        SimNode {
            name: name.into(),
            tracker: DemandTracker::default(),
            offered_pps,
            rate: default_floor(RATE, 4),
            burst: 1,
            tat: 0,
            passed: 0,
            dropped: 0,
            up: true,
        }
    }
}

struct Sim {
    nodes: Vec<SimNode>,
    /// The store: node → (published weight, interval it was written in).
    store: BTreeMap<String, (Demand, u64)>,
    k: u64,
    /// Admitted packets per interval (fleet total) and each interval's shares.
    admitted: Vec<u64>,
    shares: Vec<Vec<u64>>,
}

impl Sim {
    fn new(split: &[u64]) -> Sim {
        let nodes = split
            .iter()
            .enumerate()
            .map(|(i, pps)| SimNode::new(&format!("node-{}", i + 1), *pps))
            .collect();
        Sim {
            nodes,
            store: BTreeMap::new(),
            k: 0,
            admitted: Vec::new(),
            shares: Vec::new(),
        }
    }

    /// One interval: every live node's cycle in turn, then the interval's traffic.
    fn step(&mut self) {
        let k = self.k;
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            if !node.up {
                continue;
            }
            let step = node.tracker.update(Demand {
                packets: node.passed + node.dropped,
                bytes: 0,
            });
            if step.publish.is_zero() {
                self.store.remove(&node.name);
            } else {
                self.store.insert(node.name.clone(), (step.publish, k));
            }
            let view: Vec<(String, Demand)> = self
                .store
                .iter()
                .filter(|(_, (_, at))| k - at < STALE_AFTER)
                .map(|(n, (d, _))| (n.clone(), *d))
                .collect();
            let others = others_of(&view, &node.name, |d| d.packets);
            node.rate = split(RATE, default_floor(RATE, 4), &others, step.own.packets);
            node.burst = burst_for(RATE, BURST, node.rate);
        }
        self.shares.push(
            self.nodes
                .iter()
                .filter(|n| n.up && n.offered_pps > 0)
                .map(|n| n.rate)
                .collect(),
        );
        let start = k * T_NS;
        let mut total = 0;
        for node in &mut self.nodes {
            node.passed = 0;
            node.dropped = 0;
            if !node.up {
                continue;
            }
            let count = node.offered_pps * T_NS / 1_000_000_000;
            let inc = packet_increment_ns(node.rate, u64::from(Q8_ONE)).unwrap();
            let tau = packet_tau_ns(node.rate, node.burst);
            for j in 0..count {
                let now = start + (2 * j + 1) * T_NS / (2 * count);
                match gcra(node.tat, now, inc, tau) {
                    Gcra::Conform(t) => {
                        node.tat = t;
                        node.passed += 1;
                    }
                    Gcra::Exceed => node.dropped += 1,
                }
            }
            total += node.passed;
        }
        self.admitted.push(total);
        self.k += 1;
    }

    fn run(&mut self, intervals: u64) {
        for _ in 0..intervals {
            self.step();
        }
    }

    /// Admitted over the second (4 intervals) ending with interval `k`.
    fn second_ending(&self, k: usize) -> u64 {
        self.admitted[k + 1 - 4..=k].iter().sum()
    }

    fn node(&self, name: &str) -> &SimNode {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    /// No interval's shares (of nodes with traffic) summed above the rate plus tolerance, and
    /// no second admitted more than the rate plus tolerance.
    fn assert_bounded(&self) {
        let max_sum = (RATE as f64 * (1.0 + TOLERANCE)) as u64;
        for (k, s) in self.shares.iter().enumerate() {
            let sum: u64 = s.iter().sum();
            assert!(sum <= max_sum, "interval {k}: shares {s:?} sum to {sum}");
        }
        for k in 3..self.admitted.len() {
            let a = self.second_ending(k);
            assert!(a <= max_sum, "second ending at interval {k} admitted {a}");
        }
    }
}

/// 4× the fleet rate offered, split 70/10/10/10.
fn skewed() -> Sim {
    Sim::new(&[2800, 400, 400, 400])
}

#[test]
fn offered_is_passed_plus_dropped() {
    let mut c = IdentityCounters::default();
    c.passed.packets = 7;
    c.passed.bytes = 700;
    c.dropped.packets = 3;
    c.dropped.bytes = 300;
    assert_eq!(
        offered(&c),
        Demand {
            packets: 10,
            bytes: 1000
        }
    );
}

#[test]
fn split_sums_to_at_most_the_rate_and_loses_under_one_unit_per_node() {
    // Deterministic pseudo-random weights (an LCG), many node counts and rates.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        x >> 33
    };
    for round in 0..2000 {
        let n = 1 + (round % 16) as usize;
        let rate = 100 + next() % 100_000;
        let floor = default_floor(rate, n);
        let weights: Vec<u64> = (0..n).map(|_| 1 + next() % 1_000_000).collect();
        let sum: u64 = (0..n)
            .map(|i| {
                let others: Vec<u64> = (0..n).filter(|j| *j != i).map(|j| weights[j]).collect();
                split(rate, floor, &others, weights[i])
            })
            .sum();
        assert!(sum <= rate, "round {round}: {sum} > {rate} ({weights:?})");
        assert!(
            sum + n as u64 >= rate,
            "round {round}: {sum} loses more than {n} of {rate}"
        );
    }
}

#[test]
fn split_floor_small_rates_and_zero_weights() {
    // A node with no weight of its own yet gets the floor, never zero.
    assert_eq!(split(1000, 25, &[500, 500], 0), 25);
    assert_eq!(split(1000, 0, &[500], 0), 1);
    // Alone with weight: the whole rate.
    assert_eq!(split(1000, 25, &[], 7), 1000);
    // Zero weights of others are not participants.
    assert_eq!(split(1000, 25, &[0, 0], 7), 1000);
    // A rate below the floors: equal parts, at least one.
    assert_eq!(split(3, 2, &[1, 1, 1], 1), 1);
    assert_eq!(split(10, 5, &[1], 1), 5);
    // Exact arithmetic: 2 floors of 25, 950 split 3:1.
    assert_eq!(split(1000, 25, &[300], 100), 25 + 950 / 4);
    assert_eq!(split(1000, 25, &[100], 300), 25 + 950 * 3 / 4);
    // Huge weights do not overflow.
    assert_eq!(
        split(u64::MAX - 1, 1, &[u64::MAX], u64::MAX),
        1 + (u64::MAX - 3) / 2
    );
    assert_eq!(burst_for(1000, 50, 250), 12);
    assert_eq!(burst_for(1000, 50, 1), 1);
}

#[test]
fn the_tracker_quarters_when_idle_and_reports_its_own_growth_one_interval_late() {
    let mut t = DemandTracker::default();
    let s = t.update(Demand {
        packets: 1000,
        bytes: 10,
    });
    assert_eq!(s.publish.packets, 750);
    assert_eq!(
        s.own.packets, 0,
        "own growth waits for the others to see it"
    );
    let s = t.update(Demand {
        packets: 1000,
        bytes: 10,
    });
    assert_eq!((s.publish.packets, s.own.packets), (937, 750));
    // Idle: a quarter left every interval, down at once in its own weight, zero within 32.
    let s = t.update(Demand::default());
    assert_eq!((s.publish.packets, s.own.packets), (234, 234));
    let mut n = 1;
    while !t.is_idle() {
        t.update(Demand::default());
        n += 1;
        assert!(n <= 32);
    }
    let mut t = DemandTracker {
        published: Demand {
            packets: u64::MAX,
            bytes: u64::MAX,
        },
    };
    let mut n = 0;
    while !t.is_idle() {
        t.update(Demand::default());
        n += 1;
    }
    assert!(n <= 32, "{n} intervals");
}

#[test]
fn four_nodes_at_four_times_the_rate_split_70_10_10_10_converge_to_the_rate() {
    let mut sim = skewed();
    sim.run(40);
    // From the first full second on every second is within ±5 % of the rate.
    let settled = (3..sim.admitted.len())
        .find(|&k| {
            (k..sim.admitted.len()).all(|j| {
                let a = sim.second_ending(j) as f64;
                (a - RATE as f64).abs() <= RATE as f64 * 0.05
            })
        })
        .unwrap_or_else(|| panic!("never settled: {:?}", sim.admitted));
    eprintln!("70/10/10/10: within ±5 % from the second ending at interval {settled}");
    assert!(settled <= 8, "settled only at interval {settled}");
    // The shares follow the demand: 70 % of the demand holds most of the rate.
    let big = sim.node("node-1").rate;
    assert!(big > RATE * 6 / 10, "node-1's share {big}");
    sim.assert_bounded();
}

#[test]
fn demand_moving_to_one_node_gets_it_90_percent_within_eight_intervals() {
    let mut sim = skewed();
    sim.run(20);
    // All of it moves to node-2, one of the 10 % nodes.
    for n in &mut sim.nodes {
        n.offered_pps = if n.name == "node-2" { 4000 } else { 0 };
    }
    let moved = sim.admitted.len();
    sim.run(8);
    let per_interval = RATE * T_NS / 1_000_000_000;
    let reached = (moved..sim.admitted.len())
        .find(|&k| sim.admitted[k] * 10 >= per_interval * 9)
        .unwrap_or_else(|| panic!("not reached in 8: {:?}", &sim.admitted[moved..]));
    eprintln!(
        "demand shift: node-2 at >= 90 % after {} intervals",
        reached - moved + 1
    );
    // And it stays there.
    sim.run(8);
    for k in reached..sim.admitted.len() {
        assert!(
            sim.admitted[k] * 10 >= per_interval * 9,
            "interval {k}: {}",
            sim.admitted[k]
        );
    }
    sim.assert_bounded();
}

#[test]
fn a_node_that_starts_seeing_the_identity_is_never_at_zero() {
    let mut sim = skewed();
    sim.run(12);
    sim.nodes.push(SimNode::new("node-5", 400));
    sim.run(1);
    let n5 = sim.node("node-5");
    assert!(n5.rate >= default_floor(RATE, 4), "share {}", n5.rate);
    assert!(n5.passed > 0, "admitted nothing in its first interval");
    sim.run(12);
    // It settles into its demand-weighted part, and the fleet stays at the rate.
    let n5 = sim.node("node-5").rate;
    assert!(n5 > RATE / 20, "node-5's share {n5}");
    sim.assert_bounded();
}

#[test]
fn a_dead_node_drops_out_of_the_sum_after_its_reports_go_stale() {
    let mut sim = skewed();
    sim.run(12);
    sim.nodes[0].up = false;
    sim.run(STALE_AFTER + 6);
    // The survivors hold the whole rate between them again.
    let sum: u64 = sim.nodes[1..].iter().map(|n| n.rate).sum();
    assert!(
        sum + 3 >= RATE && sum <= RATE,
        "survivors' shares sum to {sum}"
    );
    let last = sim.admitted.len() - 1;
    let a = sim.second_ending(last);
    assert!(a as f64 >= RATE as f64 * 0.95, "admitted {a}");
}

#[test]
fn outage_rates_follow_the_mode() {
    assert_eq!(outage_rate(OutageMode::Share, 1000, 4), 250);
    assert_eq!(outage_rate(OutageMode::Local, 1000, 4), 1000);
    assert_eq!(outage_rate(OutageMode::Closed, 1000, 4), 25);
    assert_eq!(outage_rate(OutageMode::Closed, 3, 4), 1, "never zero");
    // A pool size of 0 (never learnt) reads as 1.
    assert_eq!(outage_rate(OutageMode::Share, 1000, 0), 1000);
}

#[test]
fn node_share_splits_each_budget_by_its_own_dimension() {
    let plan = PlanLimits {
        packets_per_s: Some(1000),
        packet_burst: 100,
        bytes_per_s: None,
        byte_burst: 0,
    };
    let view = vec![
        (
            "a".to_string(),
            Demand {
                packets: 300,
                bytes: 1,
            },
        ),
        (
            "b".to_string(),
            Demand {
                packets: 100,
                bytes: 1,
            },
        ),
    ];
    let own = Demand {
        packets: 100,
        bytes: 1,
    };
    let s = node_share(&plan, 2, &view, "b", own);
    assert_eq!(s.packets_per_s, Some(50 + 900 / 4));
    assert_eq!(s.packet_burst, 27);
    assert_eq!((s.bytes_per_s, s.byte_burst), (None, 0));
    assert_eq!(s.limits().packets_per_s, Some(275));
}

// ---- global quotas ----

const L: u64 = 1_000_000;
/// Each node's byte rate (the plan's, per node) and burst.
const R_BYTES: u64 = 100_000;
const B_BYTES: u64 = 16_384;
const N: usize = 4;

/// Bytes one node admits in one interval while not flagged: the rate, plus the burst in the
/// first interval (GCRA from idle).
fn interval_spend(first: bool) -> u64 {
    R_BYTES * T_NS / 1_000_000_000 + if first { B_BYTES } else { 0 }
}

struct QuotaSim {
    tracks: Vec<QuotaTrack>,
    flagged: Vec<bool>,
    /// The store's hash: node → its reported own spend.
    store: BTreeMap<usize, u64>,
    k: u64,
}

impl QuotaSim {
    fn new() -> QuotaSim {
        QuotaSim {
            tracks: vec![QuotaTrack::default(); N],
            flagged: vec![false; N],
            store: BTreeMap::new(),
            k: 0,
        }
    }

    /// One interval: each node's cycle in turn (report own, read the total, decide), then
    /// traffic. `store_up`: whether reports reach the store.
    fn step(&mut self, store_up: bool, mode: OutageMode) {
        for i in 0..N {
            let t = &mut self.tracks[i];
            if store_up {
                self.store.insert(i, t.own.bytes);
                let total = self.store.values().sum();
                t.observe(
                    t.own,
                    Spend {
                        bytes: total,
                        cost: 0,
                    },
                );
            } else {
                t.outage();
            }
            self.flagged[i] = t.exhausted((Some(L), None), mode, N);
        }
        for i in 0..N {
            if !self.flagged[i] {
                self.tracks[i].add(Spend {
                    bytes: interval_spend(self.k == 0),
                    cost: 0,
                });
            }
        }
        self.k += 1;
    }

    fn admitted(&self) -> u64 {
        self.tracks.iter().map(|t| t.own.bytes).sum()
    }
}

#[test]
fn a_global_quota_overshoots_by_at_most_nodes_times_interval_times_rate_plus_bursts() {
    let mut sim = QuotaSim::new();
    for _ in 0..40 {
        sim.step(true, OutageMode::Share);
    }
    let admitted = sim.admitted();
    let bound = L + N as u64 * (R_BYTES * T_NS / 1_000_000_000 + B_BYTES);
    eprintln!("global quota: admitted {admitted} of {L}, bound {bound}");
    assert!(admitted >= L, "the quota was not even spent: {admitted}");
    assert!(admitted <= bound, "{admitted} > {bound}");
    assert!(sim.flagged.iter().all(|f| *f), "every node flagged");
    // A new period is a new track: it passes again.
    let mut t = QuotaTrack::default();
    assert!(!t.exhausted((Some(L), None), OutageMode::Share, N));
    t.observe(Spend::default(), Spend::default());
    assert!(!t.exhausted((Some(L), None), OutageMode::Share, N));
}

#[test]
fn the_fleet_view_never_goes_down_within_a_period() {
    let mut t = QuotaTrack::default();
    t.add(Spend { bytes: 10, cost: 1 });
    t.observe(
        t.own,
        Spend {
            bytes: 900,
            cost: 90,
        },
    );
    t.add(Spend { bytes: 5, cost: 0 });
    assert_eq!(
        t.view(),
        Spend {
            bytes: 905,
            cost: 90
        }
    );
    // The store lost the key: it answers with our own spend alone. Not believed.
    t.observe(t.own, Spend { bytes: 15, cost: 1 });
    assert_eq!(
        t.view(),
        Spend {
            bytes: 905,
            cost: 90
        }
    );
    assert!(t.exhausted((Some(905), None), OutageMode::Local, 4));
    assert!(t.exhausted((None, Some(90)), OutageMode::Local, 4));
    assert!(!t.exhausted((Some(906), Some(91)), OutageMode::Local, 4));
}

/// Spends 40 % of the quota with the store, then runs `intervals` without it.
fn outage(mode: OutageMode, intervals: usize) -> (QuotaSim, u64) {
    let mut sim = QuotaSim::new();
    while sim.admitted() < L * 4 / 10 {
        sim.step(true, mode);
    }
    // One more good cycle so the store's total is what the nodes last saw.
    sim.step(true, mode);
    let at_cut: u64 = sim.store.values().sum();
    for _ in 0..intervals {
        sim.step(false, mode);
    }
    (sim, at_cut)
}

#[test]
fn outage_share_spends_a_pool_share_of_the_rest_on_each_node() {
    let (sim, at_cut) = outage(OutageMode::Share, 40);
    let admitted = sim.admitted();
    let per_node = N as u64 * interval_spend(false);
    assert!(admitted <= L + per_node, "{admitted}");
    assert!(
        admitted >= L - per_node,
        "{admitted}: the rest was not spent"
    );
    // Each node spent about a quarter of what was left.
    let rest = (L - at_cut) / N as u64;
    for t in &sim.tracks {
        let cut = t.cut.unwrap();
        let spent = t.own.bytes - cut.own.bytes;
        assert!(
            spent >= rest && spent <= rest + 2 * interval_spend(false),
            "spent {spent} of {rest}"
        );
    }
}

#[test]
fn outage_local_counts_on_alone_up_to_n_times_the_rest() {
    let (sim, at_cut) = outage(OutageMode::Local, 40);
    let admitted = sim.admitted();
    // Each node counts on from its own last view, which may lack up to one interval of each
    // other node's spend (the nodes' cycles are staggered), and overshoots by one interval.
    let rest = L - at_cut;
    let bound = at_cut + N as u64 * (rest + N as u64 * interval_spend(false));
    assert!(
        admitted > L,
        "local lets each node spend the rest: {admitted}"
    );
    assert!(admitted <= bound, "{admitted} > {bound}");
}

#[test]
fn outage_closed_spends_nothing_after_the_first_failed_report() {
    let (sim, at_cut) = outage(OutageMode::Closed, 40);
    // Only the interval before the first failed report is spent past the store's total.
    let bound = at_cut + N as u64 * interval_spend(false);
    assert!(sim.admitted() <= bound, "{} > {bound}", sim.admitted());
    assert!(sim.flagged.iter().all(|f| *f));
    // The store returns: the fleet total decides again.
    let mut sim = sim;
    sim.step(true, OutageMode::Closed);
    assert!(sim.flagged.iter().all(|f| !*f), "{:?}", sim.flagged);
}
