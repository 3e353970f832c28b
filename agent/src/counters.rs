//! Reading the kernel's per-CPU counters into totals.

use std::{borrow::Borrow, path::Path};

use aya::maps::{Map, MapData, PerCpuArray};
use serde::Serialize;
use tollgate_common::{Counter, Reason};

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

/// Sums every reason's per-CPU slots.
pub fn reason_totals<T: Borrow<MapData>>(
    map: &PerCpuArray<T, Counter>,
) -> Result<Vec<(Reason, Counter)>, aya::maps::MapError> {
    Reason::ALL
        .iter()
        .map(|r| {
            let slots = map.get(&(*r as u32), 0)?;
            Ok((*r, Counter::sum(slots.iter())))
        })
        .collect()
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
