//! The kernel's sampled drop events: read from the ring buffer and logged (target `drop`),
//! rate-limited so that a flood does not flood the journal; `/metrics` counts them.

use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_common::policy::DropEvent;

use aya::maps::{MapData, RingBuf};

use crate::{config::Endpoint, state::now_unix_ms};

/// Drop events read from the kernel and logged, for the two drop-event counters.
#[derive(Default)]
pub struct DropEventStats {
    pub read: AtomicU64,
    pub suppressed: AtomicU64,
}

/// How many lines the current second has logged.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogBudget {
    second: u64,
    used: u32,
}

/// Reads the kernel's sampled drop events (`events`, the pinned ring buffer) and logs them
/// with the endpoint's name from `endpoints`, at most `per_second` lines a second; the rest
/// are counted as suppressed in `stats`.
pub fn drain(
    events: Option<&mut RingBuf<MapData>>,
    endpoints: &[Endpoint],
    stats: &DropEventStats,
    budget: &mut LogBudget,
    per_second: u32,
) {
    let Some(rb) = events else {
        return;
    };
    let now_s = now_unix_ms() / 1000;
    if budget.second != now_s {
        *budget = LogBudget {
            second: now_s,
            used: 0,
        };
    }
    // Bounded per call so a flood cannot keep the loop here.
    for _ in 0..4096 {
        let Some(item) = rb.next() else { break };
        if item.len() != std::mem::size_of::<DropEvent>() {
            continue;
        }
        // SAFETY: the size matches and DropEvent is plain old data written by the program.
        let e: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        drop(item);
        stats.read.fetch_add(1, Ordering::Relaxed);
        if budget.used >= per_second {
            stats.suppressed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        budget.used += 1;
        let reason = tollgate_common::Reason::from_index(e.reason).map_or("unknown", |r| r.label());
        let src = if e.family == 6 {
            std::net::IpAddr::from(e.src).to_string()
        } else {
            std::net::IpAddr::from([e.src[0], e.src[1], e.src[2], e.src[3]]).to_string()
        };
        let endpoint = e
            .endpoint
            .checked_sub(1)
            .and_then(|i| endpoints.get(i as usize))
            .map_or("none", |ep| ep.name.as_str());
        tracing::info!(target: "drop", reason, src, endpoint, proto = e.proto, dport = e.dport, bytes = e.bytes, identity = e.identity, "dropped");
    }
}
