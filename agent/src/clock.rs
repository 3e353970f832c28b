//! The agent's clock for deadlines: revocations, quarantines, quota windows and binding expiry
//! run on CLOCK_BOOTTIME (which does not step), expressed in Unix milliseconds through an
//! anchor taken once (wall time and boot time read together). A wall-clock step therefore
//! moves no deadline; it is detected by [`StepWatch`], logged, audited (`clock_step`) and
//! counted. The wall clock itself ([`wall_ms`]) is read only where a token's own times
//! (`exp`, `iat`, `nbf`) require it.
//!
//! The anchor is persisted in `state.json` with the boot id: a restart within the same boot
//! keeps it (deadlines written before the restart mean the same instants after it); after a
//! reboot the boot clock restarts from zero, so a new anchor is taken from the wall clock.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::tables::boot_ns;

/// A wall-clock step larger than this (relative to the boot clock's progress) is reported.
pub const STEP_BOUND_MS: u64 = 2_000;

/// Wall time and boot time read together: agent time = `unix_ms` + boot time elapsed since `boot_ns`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub unix_ms: u64,
    pub boot_ns: u64,
    /// `/proc/sys/kernel/random/boot_id` when the anchor was taken; another boot id means a reboot.
    #[serde(default)]
    pub boot_id: String,
}

static ANCHOR: Mutex<Option<Anchor>> = Mutex::new(None);
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the Unix epoch on the wall clock (steps with it).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This boot's id, empty if unreadable.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn fresh() -> Anchor {
    Anchor {
        unix_ms: wall_ms(),
        boot_ns: boot_ns(),
        boot_id: boot_id(),
    }
}

/// The anchor in use (taken from the wall clock on first use unless one was adopted).
pub fn anchor() -> Anchor {
    ANCHOR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(fresh)
        .clone()
}

/// Adopts a persisted anchor if it was taken in this boot (and not in the future of the boot
/// clock); otherwise keeps (or takes) one from the wall clock. Returns whether it was adopted.
pub fn adopt(saved: &Anchor) -> bool {
    let ok = !saved.boot_id.is_empty() && saved.boot_id == boot_id() && saved.boot_ns <= boot_ns();
    if ok {
        *ANCHOR.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved.clone());
    }
    ok
}

/// Agent time in Unix milliseconds: the anchor's wall time plus the boot clock's progress.
pub fn now_ms() -> u64 {
    // Read under the lock rather than through `anchor()`: that clones the anchor (its boot
    // id is a String), an allocation on every deadline check for nothing.
    let mut guard = ANCHOR.lock().unwrap_or_else(|e| e.into_inner());
    let a = guard.get_or_insert_with(fresh);
    a.unix_ms + boot_ns().saturating_sub(a.boot_ns) / 1_000_000
}

/// How far the wall clock is ahead (+) or behind (−) agent time, in ms.
pub fn wall_offset_ms() -> i64 {
    wall_ms() as i64 - now_ms() as i64
}

/// Converts a wall-clock instant (a token's `exp`) to agent time, reading both clocks now.
pub fn from_wall_ms(wall: u64) -> u64 {
    let off = wall_offset_ms();
    (wall as i64 - off).max(0) as u64
}

/// Converts an agent-time instant to the wall clock, reading both clocks now: what another
/// node (whose agent time is its own) can compare with its wall clock.
pub fn to_wall_ms(agent: u64) -> u64 {
    (agent as i64 + wall_offset_ms()).max(0) as u64
}

/// Wall-clock steps seen by this process (for /metrics).
pub fn steps_total() -> u64 {
    STEPS.load(Ordering::Relaxed)
}

/// Watches the wall clock against the boot clock between ticks.
#[derive(Debug, Default)]
pub struct StepWatch {
    last_offset_ms: Option<i64>,
}

impl StepWatch {
    /// The size of a step (ms, signed) since the last call, if larger than [`STEP_BOUND_MS`].
    pub fn check(&mut self) -> Option<i64> {
        let off = wall_offset_ms();
        let prev = self.last_offset_ms.replace(off)?;
        let step = off - prev;
        (step.unsigned_abs() > STEP_BOUND_MS).then(|| {
            STEPS.fetch_add(1, Ordering::Relaxed);
            step
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_time_follows_the_boot_clock() {
        let a = now_ms();
        let w = wall_ms();
        assert!(a.abs_diff(w) < 1_000, "agent {a} wall {w}");
        let b = now_ms();
        assert!(b >= a);
    }

    #[test]
    fn an_anchor_from_another_boot_is_not_adopted() {
        let other = Anchor {
            unix_ms: 1,
            boot_ns: 0,
            boot_id: "not-this-boot".into(),
        };
        assert!(!adopt(&other));
        assert!(now_ms() > 1_000_000);
    }

    #[test]
    fn no_step_without_a_wall_jump() {
        let mut w = StepWatch::default();
        assert_eq!(w.check(), None);
        assert_eq!(w.check(), None);
    }
}
