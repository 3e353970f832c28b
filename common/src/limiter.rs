//! GCRA ("virtual scheduling") arithmetic. One u64 theoretical arrival time (TAT) per budget;
//! a packet conforms when, after adding its cost, the TAT is no further ahead of now than the
//! burst tolerance. The kernel wraps [`gcra`] in a bounded compare-and-swap; everything here is
//! pure integer arithmetic that cannot overflow or divide by zero.

use crate::policy::{Limits, Q8_ONE, UNLIMITED};

pub const NS_PER_S: u64 = 1_000_000_000;

/// Largest Q8 factor (255.99).
pub const MAX_Q8: u64 = u16::MAX as u64;

/// What a budget check yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gcra {
    /// Conforms: store this TAT.
    Conform(u64),
    /// Over budget: leave the TAT alone.
    Exceed,
}

#[inline(always)]
const fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// Combined cost multiplier (Q8) of the pressure and a throttle, saturating at [`MAX_Q8`].
/// A zero pressure reads as 1.0 (an unset settings map must not make traffic free).
#[inline(always)]
pub fn multiplier_q8(pressure_q8: u16, throttle_q8: Option<u16>) -> u64 {
    let p = if pressure_q8 == 0 {
        Q8_ONE
    } else {
        pressure_q8
    } as u64;
    let m = match throttle_q8 {
        Some(t) if t != 0 => (p * t as u64) >> 8,
        _ => p,
    };
    if m == 0 {
        1
    } else if m > MAX_Q8 {
        MAX_Q8
    } else {
        m
    }
}

/// `mult_q8` scaled by another Q8 factor (0 reads as 1.0), clamped to 1..=[`MAX_Q8`].
#[inline(always)]
pub fn scale_q8(mult_q8: u64, factor_q8: u16) -> u64 {
    let f = if factor_q8 == 0 { Q8_ONE } else { factor_q8 } as u64;
    let m = if mult_q8 > MAX_Q8 { MAX_Q8 } else { mult_q8 };
    let r = (m * f) >> 8;
    if r == 0 {
        1
    } else if r > MAX_Q8 {
        MAX_Q8
    } else {
        r
    }
}

/// Budget time (ns) one packet costs at `pps`, with a Q8 cost multiplier. `None`: rate 0, so
/// nothing conforms. Unlimited costs nothing.
#[inline(always)]
pub fn packet_increment_ns(pps: u64, mult_q8: u64) -> Option<u64> {
    if pps == UNLIMITED {
        return Some(0);
    }
    if pps == 0 {
        return None;
    }
    let mult = if mult_q8 > MAX_Q8 { MAX_Q8 } else { mult_q8 };
    // mult <= 2^16 and 1e9 < 2^30: the product fits in u64.
    Some(div_ceil(div_ceil(mult * NS_PER_S, pps), Q8_ONE as u64))
}

/// Cost units of a frame: bytes × weight × multiplier, rounded up.
#[inline(always)]
pub fn byte_units(bytes: u64, weight_q8: u16, mult_q8: u64) -> u64 {
    let bytes = if bytes > 0xffff { 0xffff } else { bytes };
    let mult = if mult_q8 > MAX_Q8 { MAX_Q8 } else { mult_q8 };
    // <= 2^16 * 2^16 * 2^16 = 2^48: fits.
    div_ceil(
        bytes * weight_q8 as u64 * mult,
        (Q8_ONE as u64) * (Q8_ONE as u64),
    )
}

/// Budget time (ns) `units` cost units take at `bps` units per second.
#[inline(always)]
pub fn byte_increment_ns(bps: u64, units: u64) -> Option<u64> {
    if bps == UNLIMITED {
        return Some(0);
    }
    if bps == 0 {
        return None;
    }
    // units <= 2^32 (byte_units' bound) and 1e9 < 2^30: fits.
    let units = if units > u32::MAX as u64 {
        u32::MAX as u64
    } else {
        units
    };
    Some(div_ceil(units * NS_PER_S, bps))
}

/// One GCRA step: `tat` the stored theoretical arrival time, `inc` this packet's cost in ns,
/// `tau` the burst tolerance in ns.
///
/// An idle budget (TAT in the past) restarts from `now`: a full burst, never more. A clock
/// that goes backwards (now < previous now) only makes the TAT look further ahead, which can
/// refuse but never refill.
#[inline(always)]
pub fn gcra(tat: u64, now: u64, inc: u64, tau: u64) -> Gcra {
    let base = if tat > now { tat } else { now };
    let new = base.saturating_add(inc);
    // new >= base >= now: no underflow.
    if new - now <= tau {
        Gcra::Conform(new)
    } else {
        Gcra::Exceed
    }
}

/// Burst tolerance for `burst` packets at `pps`, consistent with [`packet_increment_ns`] at
/// multiplier 1.0 (so that exactly `burst` packets conform from idle).
pub fn packet_tau_ns(pps: u64, burst: u64) -> u64 {
    match packet_increment_ns(pps, Q8_ONE as u64) {
        Some(inc) => inc.saturating_mul(burst),
        None => 0,
    }
}

/// Burst tolerance for `burst` cost units at `bps`, consistent with [`byte_increment_ns`].
pub fn byte_tau_ns(bps: u64, burst: u64) -> u64 {
    if bps == UNLIMITED || bps == 0 {
        return 0;
    }
    // burst * 1e9 may exceed u64; split to stay exact where it matters.
    let whole = (burst / bps).saturating_mul(NS_PER_S);
    let rest = div_ceil((burst % bps).saturating_mul(NS_PER_S), bps);
    whole.saturating_add(rest)
}

/// The frame a byte budget's clock choice is judged with: the largest Ethernet frame without
/// jumbo frames, the least byte burst the configuration accepts.
pub const CLOCK_FRAME_BYTES: u64 = 1518;

/// Ticks of margin a budget's burst tolerance must keep, beyond one packet, to run on the
/// coarse clock. See [`budget_needs_precise_clock`].
pub const CLOCK_MARGIN_TICKS: u64 = 2;

/// Whether a budget costing `inc` ns per packet with burst tolerance `tau` ns needs the precise
/// clock, on a coarse clock that advances in steps of `tick_ns`.
///
/// A coarse reading lags the true time by up to a tick, so on it a budget behaves as if its
/// tolerance were up to one tick smaller. Under a backlog, admission resumes at the first
/// reading at or after `TAT + inc − tau`, less than a tick late; the TAT stays ahead of the
/// clock (no credit is lost, the long-run rate is exact) if `tau − inc ≥ tick`. Traffic offered
/// near the rate sees the shortened tolerance directly: with one tick of margin it can lose
/// ~4% against the precise clock, with two under 1% (the host tests sweep this). So a budget
/// stays on the coarse clock when `tau − inc ≥ CLOCK_MARGIN_TICKS × tick`, i.e. its burst is
/// at least `2 × rate × tick + 1`. A budget that admits nothing or everything reads no clock
/// worth choosing.
pub fn budget_needs_precise_clock(inc: Option<u64>, tau: u64, tick_ns: u64) -> bool {
    match inc {
        None | Some(0) => false,
        Some(inc) => tau < inc.saturating_add(tick_ns.saturating_mul(CLOCK_MARGIN_TICKS)),
    }
}

/// Whether a plan's limits need the precise clock (some budget does, at multiplier 1.0: a
/// pressure or throttle raises the cost per packet, and a budget cut that far is not held to
/// its plan rate anyway).
pub fn needs_precise_clock(limits: &Limits, tick_ns: u64) -> bool {
    let one = Q8_ONE as u64;
    let pkt = packet_increment_ns(limits.pps, one);
    let byte = byte_increment_ns(limits.bps, byte_units(CLOCK_FRAME_BYTES, Q8_ONE, one));
    budget_needs_precise_clock(pkt, limits.pkt_tau_ns, tick_ns)
        || budget_needs_precise_clock(byte, limits.byte_tau_ns, tick_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600 * NS_PER_S;

    fn admit(tat: &mut u64, now: u64, inc: u64, tau: u64) -> bool {
        match gcra(*tat, now, inc, tau) {
            Gcra::Conform(t) => {
                *tat = t;
                true
            }
            Gcra::Exceed => false,
        }
    }

    #[test]
    fn burst_from_idle_is_exact() {
        for (pps, burst) in [(1, 1), (100, 10), (1000, 1), (1_000_000, 64), (3, 7)] {
            let inc = packet_increment_ns(pps, 256).unwrap();
            let tau = packet_tau_ns(pps, burst);
            let mut tat = 0;
            let now = 5 * HOUR;
            let admitted = (0..burst + 10)
                .filter(|_| admit(&mut tat, now, inc, tau))
                .count();
            assert_eq!(admitted as u64, burst, "pps {pps} burst {burst}");
        }
    }

    #[test]
    fn steady_rate_is_admitted_exactly() {
        // 1000 pps offered at 4x for 10 s: 10_000 + burst admitted.
        let (pps, burst) = (1000u64, 5u64);
        let inc = packet_increment_ns(pps, 256).unwrap();
        let tau = packet_tau_ns(pps, burst);
        let mut tat = 0;
        let step = NS_PER_S / (4 * pps);
        let admitted = (0..40_000u64)
            .filter(|i| admit(&mut tat, HOUR + i * step, inc, tau))
            .count() as u64;
        assert!((10_000..=10_000 + burst).contains(&admitted), "{admitted}");
    }

    #[test]
    fn idle_for_over_an_hour_refills_only_one_burst() {
        let (pps, burst) = (10, 3);
        let inc = packet_increment_ns(pps, 256).unwrap();
        let tau = packet_tau_ns(pps, burst);
        let mut tat = 0;
        assert!(admit(&mut tat, 1, inc, tau));
        let later = 1 + 2 * HOUR;
        let admitted = (0..100)
            .filter(|_| admit(&mut tat, later, inc, tau))
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn clock_going_backwards_never_refills() {
        let (pps, burst) = (10, 2);
        let inc = packet_increment_ns(pps, 256).unwrap();
        let tau = packet_tau_ns(pps, burst);
        let mut tat = 0;
        let now = HOUR;
        assert!(admit(&mut tat, now, inc, tau));
        assert!(admit(&mut tat, now, inc, tau));
        assert!(!admit(&mut tat, now, inc, tau));
        // Time jumps back by ten seconds: still nothing.
        for back in [1, NS_PER_S, 10 * NS_PER_S, now] {
            assert!(!admit(&mut tat, now - back, inc, tau), "back {back}");
        }
        // And the TAT did not move.
        assert_eq!(tat, now + 2 * inc);
    }

    #[test]
    fn tat_near_the_end_of_time_saturates() {
        assert_eq!(
            gcra(u64::MAX - 5, u64::MAX - 10, 100, 1000),
            Gcra::Conform(u64::MAX)
        );
        assert_eq!(gcra(u64::MAX, 0, 1, u64::MAX), Gcra::Conform(u64::MAX));
        assert_eq!(gcra(u64::MAX, 0, 1, 1000), Gcra::Exceed);
    }

    #[test]
    fn zero_rates_admit_nothing_and_do_not_divide_by_zero() {
        assert_eq!(packet_increment_ns(0, 256), None);
        assert_eq!(byte_increment_ns(0, 1500), None);
        assert_eq!(packet_tau_ns(0, 100), 0);
        assert_eq!(byte_tau_ns(0, 100), 0);
    }

    #[test]
    fn maximum_rates_and_factors_do_not_overflow() {
        assert_eq!(packet_increment_ns(UNLIMITED, MAX_Q8), Some(0));
        assert_eq!(packet_increment_ns(UNLIMITED - 1, MAX_Q8), Some(1));
        assert_eq!(
            packet_increment_ns(1, u64::MAX),
            Some(div_ceil(NS_PER_S * MAX_Q8, 256))
        );
        let units = byte_units(u64::MAX, u16::MAX, u64::MAX);
        assert_eq!(units, div_ceil(0xffff * 0xffff * 0xffff, 65536));
        assert!(byte_increment_ns(1, units).is_some());
        assert_eq!(
            byte_increment_ns(1, u64::MAX),
            Some(u32::MAX as u64 * NS_PER_S)
        );
        assert_eq!(byte_tau_ns(1, u64::MAX), u64::MAX);
        assert_eq!(packet_tau_ns(1, u64::MAX), u64::MAX);
        assert_eq!(multiplier_q8(u16::MAX, Some(u16::MAX)), MAX_Q8);
    }

    #[test]
    fn multiplier_defaults_and_combines() {
        assert_eq!(multiplier_q8(0, None), 256);
        assert_eq!(multiplier_q8(512, None), 512);
        assert_eq!(multiplier_q8(512, Some(1024)), 2048);
        assert_eq!(multiplier_q8(256, Some(0)), 256);
        assert_eq!(multiplier_q8(1, Some(1)), 1);
    }

    #[test]
    fn scaling_by_a_factor() {
        assert_eq!(scale_q8(256, 0), 256);
        assert_eq!(scale_q8(256, 512), 512);
        assert_eq!(scale_q8(512, 128), 256);
        assert_eq!(scale_q8(MAX_Q8, u16::MAX), MAX_Q8);
        assert_eq!(scale_q8(1, 1), 1);
    }

    #[test]
    fn byte_costs_scale_with_weight_and_pressure() {
        assert_eq!(byte_units(1000, 256, 256), 1000);
        assert_eq!(byte_units(1000, 512, 256), 2000);
        assert_eq!(byte_units(1000, 256, 768), 3000);
        assert_eq!(byte_units(1000, 128, 256), 500);
        // Rounded up: never free.
        assert_eq!(byte_units(1, 1, 1), 1);
    }

    #[test]
    fn byte_budget_admits_its_rate() {
        // 1 MB/s with a 10 kB burst, 1000-byte frames offered at 2 MB/s for 5 s.
        let bps = 1_000_000;
        let tau = byte_tau_ns(bps, 10_000);
        let mut tat = 0;
        let mut admitted_bytes = 0u64;
        let step = NS_PER_S / 2000;
        for i in 0..10_000u64 {
            let inc = byte_increment_ns(bps, byte_units(1000, 256, 256)).unwrap();
            if admit(&mut tat, HOUR + i * step, inc, tau) {
                admitted_bytes += 1000;
            }
        }
        assert!(
            (5_000_000..=5_010_000).contains(&admitted_bytes),
            "{admitted_bytes}"
        );
    }
}
