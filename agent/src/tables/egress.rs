//! Reads of what the egress and flow programs count: per identity and per endpoint egress,
//! the time-to-first-byte histograms, the flow counters. Each is one batch walk of a per-CPU
//! array (summed over CPUs here), so a scrape or a controller tick costs a few syscalls.

use aya::maps::IterableMap as _;
use tollgate_common::{
    flow::{EgressCounters, FLOW_COUNTER_SLOTS, Flow, FlowKey, TTFB_SLOTS, TtfbHist},
    map_names as names,
    policy::MAX_ENDPOINTS,
};

use super::{
    KernelTables, Result, batch,
    bulk::{io_err, sum_per_cpu},
};

impl KernelTables {
    /// What the node sent to identity slots `0..upto`, summed over CPUs, indexed by slot.
    pub fn egress_identities_upto(&self, upto: u32) -> Result<Vec<EgressCounters>> {
        let upto = upto.min(self.sizes.identities);
        sum_per_cpu(
            self.egress_identity.map(),
            upto,
            names::EGRESS_IDENTITY,
            |s: &[EgressCounters]| EgressCounters::sum(s),
        )
    }

    /// What each endpoint sent, summed over CPUs, indexed by endpoint id.
    pub fn egress_endpoints(&self) -> Result<Vec<EgressCounters>> {
        sum_per_cpu(
            self.egress_endpoint.map(),
            MAX_ENDPOINTS,
            names::EGRESS_ENDPOINT,
            |s: &[EgressCounters]| EgressCounters::sum(s),
        )
    }

    /// The time-to-first-byte histograms, summed over CPUs, indexed by
    /// `flow::ttfb_index(endpoint, class)`; buckets per bucket, not cumulative.
    pub fn ttfb_histograms(&self) -> Result<Vec<TtfbHist>> {
        sum_per_cpu(self.ttfb.map(), TTFB_SLOTS, names::TTFB, |slots| {
            slots.iter().fold(TtfbHist::default(), |mut acc, h| {
                acc.accumulate(h);
                acc
            })
        })
    }

    /// The flow counters (`flow::FLOW_*` slots), summed over CPUs.
    pub fn flow_counters(&self) -> Result<[u64; FLOW_COUNTER_SLOTS as usize]> {
        let v = sum_per_cpu(
            self.flow_counters.map(),
            FLOW_COUNTER_SLOTS,
            names::FLOW_COUNTERS,
            |slots| slots.iter().fold(0u64, |a, b| a.wrapping_add(*b)),
        )?;
        let mut out = [0; FLOW_COUNTER_SLOTS as usize];
        out.copy_from_slice(&v);
        Ok(out)
    }

    /// Entries in the flow table (a batch walk, chunk by chunk). 0 if the walk fails: a
    /// gauge, never a reason to fail a scrape.
    pub fn flows_tracked(&self) -> usize {
        batch::count::<FlowKey, Flow>(self.flows.map(), self.sizes.flows).unwrap_or(0)
    }

    /// Every tracked flow (for tests and `status`-style inspection; a walk of the LRU map).
    pub fn flow_entries(&self) -> Result<Vec<(FlowKey, Flow)>> {
        batch::read_all::<FlowKey, Flow>(self.flows.map(), self.sizes.flows)
            .map_err(io_err(names::FLOWS))
    }
}
