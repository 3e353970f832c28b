//! Reading the kernel's per-CPU counters into totals.

use std::{borrow::Borrow, path::Path};

use aya::maps::{IterableMap as _, Map, MapData, PerCpuArray};
use serde::Serialize;
use tollgate_common::{Counter, Reason, policy::MAX_ENDPOINTS, reason_counter_index};

/// Total packets and bytes for one reason, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReasonTotal {
    pub reason: &'static str,
    pub verdict: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("opening pinned map {path}: {source} (is `tollgate run` attached?)")]
    Open {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading counters: {0}")]
    Read(#[from] aya::maps::MapError),
}

/// Per-(reason, endpoint) totals, summed over CPUs; only slots that moved.
pub fn reason_endpoint_totals<T: Borrow<MapData>>(
    map: &PerCpuArray<T, Counter>,
) -> Result<Vec<(Reason, u32, Counter)>, aya::maps::MapError> {
    // One batch read of the slots in use (a few calls), not a lookup per (reason, endpoint):
    // that was a scrape's fixed cost of ~15 ms.
    let upto = Reason::ALL
        .iter()
        .map(|r| reason_counter_index(*r, MAX_ENDPOINTS - 1) + 1)
        .max()
        .unwrap_or(0);
    let mut sums = Vec::with_capacity(upto as usize);
    crate::tables::batch::for_each_per_cpu::<Counter>(map.map(), upto, |_, slots| {
        sums.push(Counter::sum(slots.iter()));
    })
    .map_err(aya::maps::MapError::IoError)?;
    let mut out = Vec::new();
    for r in Reason::ALL {
        for ep in 0..MAX_ENDPOINTS {
            let c = sums
                .get(reason_counter_index(*r, ep) as usize)
                .copied()
                .unwrap_or_default();
            if c.packets != 0 {
                out.push((*r, ep, c));
            }
        }
    }
    Ok(out)
}

/// Per-reason totals over every endpoint, one entry per reason (zeros included).
pub fn reason_totals<T: Borrow<MapData>>(
    map: &PerCpuArray<T, Counter>,
) -> Result<Vec<(Reason, Counter)>, aya::maps::MapError> {
    let per_ep = reason_endpoint_totals(map)?;
    Ok(Reason::ALL
        .iter()
        .map(|r| {
            let c = Counter::sum(per_ep.iter().filter(|(x, _, _)| x == r).map(|(_, _, c)| c));
            (*r, c)
        })
        .collect())
}

/// Reads the totals from the counter map pinned at `path`.
pub fn reason_totals_from_pin(path: &Path) -> Result<Vec<(Reason, Counter)>, CounterError> {
    let open = |source| CounterError::Open {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(path).map_err(open)?;
    let map = Map::from_map_data(data).map_err(open)?;
    let map: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(map).map_err(open)?;
    Ok(reason_totals(&map)?)
}

/// The totals in the shape the CLI prints.
pub fn to_rows(totals: &[(Reason, Counter)]) -> Vec<ReasonTotal> {
    totals
        .iter()
        .map(|(r, c)| ReasonTotal {
            reason: r.label(),
            verdict: match r.verdict() {
                tollgate_common::Verdict::Pass => "pass",
                tollgate_common::Verdict::Drop => "drop",
                tollgate_common::Verdict::Aborted => "aborted",
            },
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tollgate_common::{Counter, policy::IdentityCounters};

    #[test]
    fn identity_counters_sum_delta_and_accumulate() {
        let slot = |p: u64, cost: u64| IdentityCounters {
            passed: Counter {
                packets: p,
                bytes: p * 100,
            },
            dropped: Counter {
                packets: 1,
                bytes: 60,
            },
            cost,
            syn: 1,
            small: 0,
        };
        let total = IdentityCounters::sum(&[slot(2, 10), slot(3, u64::MAX)]);
        assert_eq!(total.passed.packets, 5);
        assert_eq!(total.dropped.bytes, 120);
        assert_eq!(total.cost, 9, "wraps like the kernel's counters");
        assert_eq!(total.packets(), 7);
        let earlier = slot(2, 10);
        let d = total.delta(&earlier);
        assert_eq!((d.passed.packets, d.dropped.packets, d.syn), (3, 1, 1));
        let mut back = earlier;
        back.accumulate(&d);
        assert_eq!(back, total);
    }

    /// A slot cleared for reuse reads lower than the last reading: `since` counts from zero
    /// (what is in the slot now is all new), where `delta` would wrap to ~2^64 and spend a
    /// quota at once.
    #[test]
    fn a_cleared_slot_counts_from_zero_again() {
        let reading = |p: u64| IdentityCounters {
            passed: Counter {
                packets: p,
                bytes: p * 100,
            },
            cost: p * 100,
            ..IdentityCounters::default()
        };
        let (before, after_clear) = (reading(50), reading(3));
        assert_eq!(after_clear.since(&before), after_clear);
        assert!(after_clear.delta(&before).passed.bytes > u64::MAX / 2);
        assert_eq!(reading(53).since(&before), reading(3));
    }
}
