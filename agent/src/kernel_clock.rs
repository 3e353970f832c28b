//! The clocks the XDP program reads, as the agent sees them: CLOCK_MONOTONIC (the domain of
//! binding expiry and of every limiter TAT), and the tick of CLOCK_MONOTONIC_COARSE, which
//! decides per plan whether its budgets may run on the coarse clock
//! (`tollgate_common::limiter::needs_precise_clock`) or need the precise one
//! (`ID_PRECISE_CLOCK`, `SET_ANON_PRECISE_CLOCK`).
//!
//! The tick is measured once, at first use (the agent's start), and kept here. The figure is
//! `clock_getres(CLOCK_MONOTONIC_COARSE)`: for the coarse clocks the kernel answers with the
//! length of one jiffy (`TICK_NSEC`), which is exactly the step the coarse clock takes. It
//! costs one syscall and is the same on every start of a boot, so a plan's clock does not
//! flip between restarts with the noise of a sampled figure. Sampling the clock's steps is
//! the fallback where the kernel reports nothing usable; if that fails too the agent assumes
//! 10 ms (HZ=100, the coarsest tick Linux builds use), which errs towards the precise clock.
//!
//! Monotonic, not BOOTTIME: the program reads no boot-time clock any more (the coarse clock
//! has no boot-time variant). The two differ by the time the machine spent suspended, which a
//! server does not; were a node suspended, a binding would outlive its token by that long in
//! the kernel, until the agent's own expiry (on its boot-time clock, `crate::clock`) removes it.

use std::sync::OnceLock;

use tracing::info;

use serde::{Deserialize, Serialize};
use tollgate_common::{
    limiter,
    policy::{
        ID_PRECISE_CLOCK, Identity, Limits, SET_ANON_PRECISE_CLOCK, SET_MONOTONIC_TATS, Settings,
    },
};

use crate::tables::{KernelTables, TableError};

/// A BOOTTIME − MONOTONIC difference below this is the two reads' own distance, not time
/// suspended: nothing to convert.
const SUSPENDED_NS: u64 = 1_000_000;

/// Assumed when neither the kernel nor sampling tells the tick (HZ=100).
pub const FALLBACK_TICK_NS: u64 = 10_000_000;

/// A coarse tick above this is not believed (no Linux HZ is below 100; a sample that saw a
/// stall): the fallback is used instead.
const MAX_TICK_NS: u64 = 100_000_000;

/// How the tick was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TickSource {
    /// `clock_getres(CLOCK_MONOTONIC_COARSE)`.
    ClockGetres,
    /// The smallest step of the coarse clock seen while sampling it.
    Sampled,
    /// Neither worked: [`FALLBACK_TICK_NS`].
    Assumed,
}

impl TickSource {
    pub fn label(self) -> &'static str {
        match self {
            TickSource::ClockGetres => "clock_getres",
            TickSource::Sampled => "sampled",
            TickSource::Assumed => "assumed",
        }
    }
}

/// The coarse clock's tick, as measured at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    pub ns: u64,
    pub source: TickSource,
}

static TICK: OnceLock<Tick> = OnceLock::new();

/// The tick (measured on the first call, the same afterwards).
pub fn tick() -> Tick {
    *TICK.get_or_init(measure)
}

fn measure() -> Tick {
    if let Some(ns) = getres().filter(|ns| (1..=MAX_TICK_NS).contains(ns)) {
        return Tick {
            ns,
            source: TickSource::ClockGetres,
        };
    }
    match sample_step(MAX_TICK_NS) {
        Some(ns) => Tick {
            ns,
            source: TickSource::Sampled,
        },
        None => Tick {
            ns: FALLBACK_TICK_NS,
            source: TickSource::Assumed,
        },
    }
}

fn getres() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; both clocks used here always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The smallest step of CLOCK_MONOTONIC_COARSE over three steps, watching for at most
/// `budget_ns` of CLOCK_MONOTONIC; `None` if it did not step three times in that time.
pub fn sample_step(budget_ns: u64) -> Option<u64> {
    let start = read(libc::CLOCK_MONOTONIC);
    let mut last = read(libc::CLOCK_MONOTONIC_COARSE);
    let (mut steps, mut least) = (0, u64::MAX);
    // The first change only ends a partial tick; the next ones are whole ticks.
    let mut seen_first = false;
    while steps < 3 && read(libc::CLOCK_MONOTONIC).saturating_sub(start) < budget_ns {
        let now = read(libc::CLOCK_MONOTONIC_COARSE);
        if now != last {
            if seen_first {
                least = least.min(now - last);
                steps += 1;
            }
            seen_first = true;
            last = now;
        }
        std::hint::spin_loop();
    }
    (steps > 0 && least <= MAX_TICK_NS).then_some(least)
}

/// CLOCK_MONOTONIC now, in ns: the clock binding expiry (`Binding::expires_ns`) is written in
/// and the kernel judges it by (on its coarse reading).
pub fn now_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC_COARSE now, in ns: what the kernel judges binding expiry by.
pub fn coarse_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

/// Which clock a set of budgets runs on in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    Coarse,
    Precise,
}

impl Clock {
    pub fn label(self) -> &'static str {
        match self {
            Clock::Coarse => "coarse",
            Clock::Precise => "precise",
        }
    }

    /// The clock a kernel identity record says.
    pub fn of_identity(rec: &Identity) -> Clock {
        if rec.flags & ID_PRECISE_CLOCK != 0 {
            Clock::Precise
        } else {
            Clock::Coarse
        }
    }

    /// The clock the settings give the anonymous allowance.
    pub fn of_anonymous(s: &Settings) -> Clock {
        if s.flags & SET_ANON_PRECISE_CLOCK != 0 {
            Clock::Precise
        } else {
            Clock::Coarse
        }
    }
}

/// The clock `limits` need on this node's tick.
pub fn clock_for(limits: &Limits) -> Clock {
    clock_for_tick(limits, tick().ns)
}

/// The clock `limits` need on a coarse clock of `tick_ns`.
pub fn clock_for_tick(limits: &Limits, tick_ns: u64) -> Clock {
    if limiter::needs_precise_clock(limits, tick_ns) {
        Clock::Precise
    } else {
        Clock::Coarse
    }
}

/// Sets or clears `ID_PRECISE_CLOCK` on an identity record for its limits.
///
/// Both clocks count CLOCK_MONOTONIC (the coarse one as of the last tick), so a bucket whose
/// identity moves from one to the other keeps its TAT: read on the other clock it is off by
/// less than one tick, the same error the coarse clock makes on every read, never an offset
/// between clock domains. No reset or conversion is needed (and none is done: a reset would
/// hand out a fresh burst on every reload that moves a plan).
pub fn set_identity_clock(rec: &mut Identity) {
    match clock_for(&rec.limits) {
        Clock::Precise => rec.flags |= ID_PRECISE_CLOCK,
        Clock::Coarse => rec.flags &= !ID_PRECISE_CLOCK,
    }
}

/// Sets or clears `SET_ANON_PRECISE_CLOCK` for the anonymous allowance in `s` (`anon_pps`,
/// `anon_tau_ns`), as [`set_identity_clock`] does for an identity.
pub fn set_anonymous_clock(s: &mut Settings) {
    let limits = Limits {
        pps: s.anon_pps,
        pkt_tau_ns: s.anon_tau_ns,
        bps: tollgate_common::policy::UNLIMITED,
        byte_tau_ns: 0,
    };
    match clock_for(&limits) {
        Clock::Precise => s.flags |= SET_ANON_PRECISE_CLOCK,
        Clock::Coarse => s.flags &= !SET_ANON_PRECISE_CLOCK,
    }
}

/// What the agent's settings step adds for the clocks: the anonymous allowance's clock
/// ([`set_anonymous_clock`]), and once per set of pins the move of their TATs into the
/// CLOCK_MONOTONIC domain (`SET_MONOTONIC_TATS`): pins made before #15 hold BOOTTIME TATs,
/// ahead of MONOTONIC by the time the machine spent suspended. On a server that never
/// suspended that is nothing and no map is read; otherwise every TAT moves back by it
/// ([`KernelTables::shift_tats_back`]). Binding expiries need no such step: the settings
/// step's caller rewrites any binding whose expiry is a second or more off what the state
/// says, and a smaller offset only keeps a binding that much longer. (An older agent adopting
/// newer pins ignores the flag and reads MONOTONIC TATs as BOOTTIME, behind by the time
/// suspended: at most one burst of extra credit, GCRA's own cap.)
pub fn settle_settings(tables: &mut KernelTables, s: &mut Settings) -> Result<(), TableError> {
    if s.flags & SET_MONOTONIC_TATS == 0 {
        let offset = crate::tables::boot_ns().saturating_sub(now_ns());
        if offset >= SUSPENDED_NS {
            let moved = tables.shift_tats_back(offset)?;
            info!(
                offset_ms = offset / 1_000_000,
                moved, "limiter state moved from CLOCK_BOOTTIME to CLOCK_MONOTONIC"
            );
        }
        s.flags |= SET_MONOTONIC_TATS;
    }
    set_anonymous_clock(s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use tollgate_common::policy::PlanLimits;

    use super::*;

    #[test]
    fn the_tick_is_a_plausible_jiffy_and_stays_put() {
        let t = tick();
        // HZ is 100..=1000 on every Linux build.
        assert!((1_000_000..=10_000_000).contains(&t.ns), "{t:?}");
        assert_eq!(t.source, TickSource::ClockGetres);
        assert_eq!(tick(), t);
    }

    #[test]
    fn sampling_finds_the_same_tick_as_the_kernel_reports() {
        let reported = getres().unwrap();
        let sampled = sample_step(MAX_TICK_NS).expect("the coarse clock steps");
        // A step is one tick, or several if this thread was descheduled across some.
        assert!(
            (reported / 2..=reported * 10).contains(&sampled),
            "sampled {sampled}, reported {reported}"
        );
    }

    #[test]
    fn sampling_gives_up_within_its_budget() {
        // 1 µs cannot hold three steps of any coarse clock.
        assert_eq!(sample_step(1_000), None);
    }

    fn plan(pps: u64, burst: u64) -> Limits {
        PlanLimits::packets(pps, burst).to_kernel()
    }

    #[test]
    fn an_identity_flag_follows_its_plan_both_ways() {
        let tick = tick().ns;
        let least = (2 * tick).div_ceil(1_000_000) + 1; // 1000 pps: 1 ms per packet
        let mut rec = Identity {
            limits: plan(1000, least - 1),
            ..Default::default()
        };
        set_identity_clock(&mut rec);
        assert_eq!(Clock::of_identity(&rec), Clock::Precise);
        rec.limits = plan(1000, least);
        set_identity_clock(&mut rec);
        assert_eq!(Clock::of_identity(&rec), Clock::Coarse);
        assert_eq!(rec.flags, 0);
    }

    #[test]
    fn the_anonymous_flag_follows_its_allowance() {
        let mut s = Settings {
            anon_pps: 100,
            anon_tau_ns: limiter::packet_tau_ns(100, 1),
            ..Default::default()
        };
        set_anonymous_clock(&mut s);
        assert_eq!(Clock::of_anonymous(&s), Clock::Precise);
        s.anon_tau_ns = limiter::packet_tau_ns(100, 40);
        set_anonymous_clock(&mut s);
        assert_eq!(Clock::of_anonymous(&s), Clock::Coarse);
        // No allowance at all: nothing to be precise about.
        s.anon_pps = 0;
        set_anonymous_clock(&mut s);
        assert_eq!(Clock::of_anonymous(&s), Clock::Coarse);
    }

    #[test]
    fn monotonic_is_not_ahead_of_boottime() {
        let m = now_ns();
        let b = crate::tables::boot_ns();
        assert!(m <= b, "monotonic {m} boottime {b}");
    }
}
