//! The GCRA limiter on a coarse clock (one that reads the same for a whole tick, as
//! CLOCK_MONOTONIC_COARSE does for a jiffy): simulated arrivals at and around a plan's rate,
//! with `now` quantised to the tick, against the same arrivals on an exact clock and against
//! the plan. Why plans whose burst does not cover [`CLOCK_MARGIN_TICKS`] ticks get the
//! precise clock, and that the others lose nothing.

use std::format;

use crate::{
    limiter::{
        CLOCK_FRAME_BYTES, CLOCK_MARGIN_TICKS, Gcra, NS_PER_S, budget_needs_precise_clock,
        byte_tau_ns, gcra, needs_precise_clock, packet_increment_ns, packet_tau_ns,
    },
    policy::{Limits, PlanLimits, Q8_ONE},
};

const MS: u64 = 1_000_000;
/// Far from 0, and not on a tick boundary of any tick used here.
const START: u64 = 3600 * NS_PER_S + 1_234_567;

/// Packets admitted of `n` arrivals spaced `step` ns apart, the clock read as the start of
/// its tick (`tick` 1: an exact clock).
fn admitted(pps: u64, burst: u64, tick: u64, step: u64, n: u64) -> u64 {
    let inc = packet_increment_ns(pps, Q8_ONE as u64).unwrap();
    let tau = packet_tau_ns(pps, burst);
    let mut tat = 0;
    let mut count = 0;
    for i in 0..n {
        let t = START + i * step;
        let now = t - t % tick;
        if let Gcra::Conform(new) = gcra(tat, now, inc, tau) {
            tat = new;
            count += 1;
        }
    }
    count
}

/// The least burst that keeps a `pps` budget on the coarse clock at `tick`.
fn least_coarse_burst(pps: u64, tick: u64) -> u64 {
    let inc = packet_increment_ns(pps, Q8_ONE as u64).unwrap();
    (CLOCK_MARGIN_TICKS * tick + inc).div_ceil(inc)
}

fn limits(pps: u64, burst: u64) -> Limits {
    PlanLimits::packets(pps, burst).to_kernel()
}

/// Plans the agent keeps on the coarse clock (the least such burst and larger ones), ticks of
/// 1, 4 (HZ=250) and 10 ms, traffic offered at, just above and far above the rate: the
/// admitted rate stays within 1% of the plan over the run (once its first burst is taken
/// off), and within 1% of what the exact clock admits from the same arrivals.
#[test]
fn a_coarse_clock_admits_the_plan_rate_when_the_burst_covers_the_margin() {
    let mut checked = 0;
    for tick in [MS, 4 * MS, 10 * MS] {
        for pps in [7u64, 100, 165, 300, 1000, 2000, 3000, 25_000, 100_000] {
            let least = least_coarse_burst(pps, tick);
            for burst in [least, least + 1, 4 * least] {
                assert!(!needs_precise_clock(&limits(pps, burst), tick));
                for offered in [1.0, 1.02, 1.1, 2.0, 10.0] {
                    // About 10 s of traffic, at most 200 000 arrivals.
                    let step = (NS_PER_S as f64 / (pps as f64 * offered)) as u64;
                    let n = (10 * NS_PER_S / step).min(200_000);
                    let secs = (n * step) as f64 / NS_PER_S as f64;
                    let coarse = admitted(pps, burst, tick, step, n);
                    let exact = admitted(pps, burst, 1, step, n);
                    let plan = pps as f64 * secs;
                    let what = format!(
                        "{pps} pps burst {burst}, tick {} ms, offered {offered}x for {secs:.1} s: \
                         coarse {coarse}, exact {exact}, plan {plan:.0}",
                        tick / MS
                    );
                    let vs_exact = coarse as f64 / exact as f64;
                    assert!((0.99..=1.01).contains(&vs_exact), "{what}");
                    let offered_total = n as f64;
                    let expected = plan.min(offered_total);
                    let steady = (coarse.saturating_sub(burst)) as f64;
                    assert!(
                        steady <= expected * 1.01 && coarse as f64 >= expected * 0.99 - 1.0,
                        "{what}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3 * 9 * 3 * 5);
}

/// Plans whose burst is below the margin, offered 50 times their rate: on the coarse clock they
/// fall short of their rate (the TAT falls behind the clock's reading every few ticks and
/// that credit is lost), on the exact clock they do not. These are the plans the agent puts
/// on the precise clock.
#[test]
fn below_the_margin_a_coarse_clock_under_admits() {
    let tick = 4 * MS;
    // (pps, burst): 100 pps with a one-packet burst covers two ticks (10 ms) and still loses
    // a quarter: the admitted packet's own increment is not tolerance.
    for (pps, burst, at_most) in [
        (100u64, 1u64, 0.85),
        (300, 1, 0.90),
        (300, 2, 0.98),
        (1000, 3, 0.80),
        (3000, 11, 0.95),
        (3000, 12, 0.97),
    ] {
        assert!(
            needs_precise_clock(&limits(pps, burst), tick),
            "{pps}/{burst}"
        );
        // 50x for 10 s: dense enough that the exact clock loses at most one arrival's spacing
        // per admitted packet (2%) even with a one-packet burst.
        let step = NS_PER_S / (50 * pps);
        let n = 500 * pps;
        let coarse = admitted(pps, burst, tick, step, n) as f64;
        let exact = admitted(pps, burst, 1, step, n) as f64;
        let plan = 10.0 * pps as f64;
        assert!(coarse <= plan * at_most, "{pps}/{burst}: coarse {coarse}");
        assert!(exact >= plan * 0.98, "{pps}/{burst}: exact {exact}");
    }
}

/// A burst from idle is exact on the coarse clock: every packet of a flood inside one tick
/// reads the same time, and exactly `burst` of them conform, wherever in the tick it starts.
#[test]
fn a_burst_is_exact_on_a_coarse_clock() {
    let tick = 4 * MS;
    for (pps, burst) in [(10u64, 50u64), (2000, 100), (1000, 9), (100_000, 801)] {
        for offset in [0, 1, tick / 2, tick - 1] {
            let inc = packet_increment_ns(pps, Q8_ONE as u64).unwrap();
            let tau = packet_tau_ns(pps, burst);
            let now = START - START % tick + offset;
            let quantised = now - now % tick;
            let mut tat = 0;
            let count = (0..burst + 100)
                .filter(|_| match gcra(tat, quantised, inc, tau) {
                    Gcra::Conform(t) => {
                        tat = t;
                        true
                    }
                    Gcra::Exceed => false,
                })
                .count() as u64;
            assert_eq!(count, burst, "{pps}/{burst} at +{offset}");
        }
    }
}

/// The choice at its boundary: one packet below the least coarse burst is precise, the least
/// one coarse, for packet and byte budgets, at several ticks; budgets that admit nothing or
/// everything never ask for the precise clock.
#[test]
fn the_clock_choice_at_the_boundary() {
    for tick in [MS, 4 * MS, 10 * MS, 3_333_333] {
        for pps in [1u64, 7, 100, 250, 1000, 3000, 1_000_000] {
            let least = least_coarse_burst(pps, tick);
            assert!(!needs_precise_clock(&limits(pps, least), tick));
            assert!(needs_precise_clock(&limits(pps, least - 1), tick));
        }
        // 1 MB/s: one full frame costs 1.518 ms; the burst must add two ticks of bytes.
        let bps = 1_000_000u64;
        let least = CLOCK_FRAME_BYTES + (CLOCK_MARGIN_TICKS * tick).div_ceil(NS_PER_S / bps);
        let bytes = |burst| {
            PlanLimits {
                packets_per_s: None,
                packet_burst: 0,
                bytes_per_s: Some(bps),
                byte_burst: burst,
            }
            .to_kernel()
        };
        assert!(!needs_precise_clock(&bytes(least), tick), "tick {tick}");
        assert!(needs_precise_clock(&bytes(least - 1), tick), "tick {tick}");
        assert_eq!(byte_tau_ns(bps, least), 1000 * least);
    }
    // Worked example of docs/policy.md: 1000 pps, HZ=250 (4 ms): bursts of 9 and more are
    // coarse; 2000 pps burst 100 (tests/limits.rs) is coarse; 100 pps burst 1 is precise.
    assert_eq!(least_coarse_burst(1000, 4 * MS), 9);
    assert!(!needs_precise_clock(&limits(2000, 100), 4 * MS));
    assert!(needs_precise_clock(&limits(100, 1), 4 * MS));
    // Unlimited, zero rates, and a tick of 0 (an exact clock) are never precise.
    assert!(!needs_precise_clock(
        &PlanLimits::UNLIMITED.to_kernel(),
        4 * MS
    ));
    assert!(!needs_precise_clock(&limits(0, 1), 4 * MS));
    assert!(!budget_needs_precise_clock(None, 0, 4 * MS));
    assert!(!budget_needs_precise_clock(Some(0), 0, 4 * MS));
    assert!(!needs_precise_clock(&limits(100, 1), 0));
}
