//! The egress and flow families: what the node sent back per endpoint, the time-to-first-byte
//! histograms per (endpoint, class), and the flow table's counters and occupancy. Labels are
//! endpoint names (from the configuration), the four classes and the flow event words: never
//! an address, never an identity (those are the top-K families' in `metrics`).

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};
use tollgate_common::{
    flow::{
        EgressCounters, FLOW_ANSWERS, FLOW_COUNTER_SLOTS, FLOW_CREATED, FLOW_CUTS, FLOW_MIDSTREAM,
        FLOW_UNTRACKED, TTFB_BOUNDS_MS, TTFB_BUCKETS, TtfbHist, ttfb_index,
    },
    policy::Class,
};

use super::{Counters, Labels, gauge, l};

/// The flow counter slots exported, by their `event` label.
const FLOW_EVENTS: [(&str, u32); 5] = [
    ("created", FLOW_CREATED),
    ("midstream", FLOW_MIDSTREAM),
    ("untracked", FLOW_UNTRACKED),
    ("answers", FLOW_ANSWERS),
    ("cuts", FLOW_CUTS),
];

/// What the kernel's egress and flow maps held at one scrape.
#[derive(Clone, Debug, Default)]
pub(crate) struct Readings {
    /// Per endpoint, summed over CPUs; index = endpoint id (0: unprotected, not exported).
    pub endpoints: Vec<EgressCounters>,
    /// Per (endpoint, class), summed over CPUs; index = `ttfb_index(endpoint, class)`.
    pub ttfb: Vec<TtfbHist>,
    pub flows: [u64; FLOW_COUNTER_SLOTS as usize],
    /// Entries in the flow table now, and its size.
    pub tracked: usize,
    pub capacity: u32,
}

impl Readings {
    /// One read of each map (batch reads: a few syscalls, whatever the sizes).
    pub(crate) fn read(tables: &crate::tables::KernelTables) -> Result<Readings, String> {
        let e = |e: crate::tables::TableError| e.to_string();
        Ok(Readings {
            endpoints: tables.egress_endpoints().map_err(e)?,
            ttfb: tables.ttfb_histograms().map_err(e)?,
            flows: tables.flow_counters().map_err(e)?,
            tracked: tables.flows_tracked(),
            capacity: tables.sizes().flows,
        })
    }
}

/// One time-to-first-byte histogram as Prometheus has it: seconds, cumulative buckets.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TtfbSeries {
    /// Sum of the times, in seconds.
    pub sum_s: f64,
    /// Times counted: the sum of the buckets, so that it always equals the `+Inf` bucket (a
    /// scrape that reads a CPU's slot between the kernel's count and bucket increments
    /// would otherwise publish a histogram whose `_count` disagrees with `+Inf`).
    pub count: u64,
    /// (upper bound in seconds, times at or under it), ascending, the last `+Inf`.
    pub cumulative: [(f64, u64); TTFB_BUCKETS],
}

impl TtfbSeries {
    /// The kernel stores one count per bucket (times in (bound i-1, bound i]); Prometheus
    /// wants each bucket to hold everything at or under its bound.
    pub(crate) fn of(h: &TtfbHist) -> TtfbSeries {
        let mut cumulative = [(f64::INFINITY, 0u64); TTFB_BUCKETS];
        let mut running = 0u64;
        for (i, n) in h.buckets.iter().enumerate() {
            running = running.wrapping_add(*n);
            let le = TTFB_BOUNDS_MS
                .get(i)
                .map_or(f64::INFINITY, |ms| *ms as f64 / 1000.0);
            cumulative[i] = (le, running);
        }
        TtfbSeries {
            sum_s: h.sum_ns as f64 / 1e9,
            count: running,
            cumulative,
        }
    }
}

impl EncodeMetric for TtfbSeries {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The encoder adds the buckets up itself (it takes per-bucket counts, as its own
        // Histogram keeps them) and writes `+Inf` for an upper bound of f64::MAX: hand it the
        // differences of the cumulative series, so there is one conversion, `of`, and it is
        // the one the tests check.
        let mut prev = 0u64;
        let mut per_bucket = [(0f64, 0u64); TTFB_BUCKETS];
        for (i, (le, cum)) in self.cumulative.iter().enumerate() {
            let le = if le.is_finite() { *le } else { f64::MAX };
            per_bucket[i] = (le, cum.wrapping_sub(prev));
            prev = *cum;
        }
        encoder.encode_histogram::<NoLabelSet>(self.sum_s, self.count, &per_bucket, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The histograms of one scrape, by label set. Not prometheus-client's `Family`: that one
/// creates its metrics empty and hands out read guards, and these arrive filled.
#[derive(Debug, Default)]
struct TtfbFamily(Vec<(Labels, TtfbSeries)>);

impl EncodeMetric for TtfbFamily {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, series) in &self.0 {
            series.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Registers the families. `endpoints` are the configured endpoints' names in id order (id
/// = position + 1): only they are exported, so the label set is the configuration's.
pub(crate) fn register(reg: &mut Registry, endpoints: &[&str], r: &Readings) {
    let packets = Counters::new();
    let bytes = Counters::new();
    let payload = Counters::new();
    let mut ttfb = TtfbFamily::default();
    for (i, name) in endpoints.iter().enumerate() {
        let id = i as u32 + 1;
        // Every configured endpoint, at zero when nothing went out: few series (one per
        // endpoint), and increase() then sees the first bytes too.
        let c = r.endpoints.get(id as usize).copied().unwrap_or_default();
        packets.add(l(&[("endpoint", name)]), c.sent.packets);
        bytes.add(l(&[("endpoint", name)]), c.sent.bytes);
        payload.add(l(&[("endpoint", name)]), c.payload);
        for class in Class::ALL {
            let Some(h) = r.ttfb.get(ttfb_index(id, class as u8) as usize) else {
                continue;
            };
            // As the verdict counters: a (endpoint, class) that never answered has no
            // series. 13 buckets x 4 classes x every endpoint would be mostly zeros.
            if h.buckets.iter().all(|n| *n == 0) {
                continue;
            }
            ttfb.0.push((
                l(&[("endpoint", name), ("class", class.label())]),
                TtfbSeries::of(h),
            ));
        }
    }
    reg.register(
        "tollgate_egress_packets",
        "Packets the node sent from a protected endpoint (TC egress), by endpoint",
        packets.0,
    );
    reg.register(
        "tollgate_egress_bytes",
        "Bytes the node sent from a protected endpoint as the egress hook sees them (skb length: \
         L2 header included, a GSO super-packet once with all its bytes), by endpoint",
        bytes.0,
    );
    reg.register(
        "tollgate_response_bytes",
        "TCP and UDP payload bytes the node sent from a protected endpoint (what the client's \
         socket receives: HTTP headers and body, TLS records), by endpoint",
        payload.0,
    );
    reg.register(
        "tollgate_ttfb_seconds",
        "Time to first byte of tracked TCP flows, measured in the kernel: from a client's last \
         payload packet before the server's first payload packet to that packet (a TLS \
         handshake's answer counts too), by endpoint and class",
        ttfb,
    );
    let flows = Counters::new();
    for (event, slot) in FLOW_EVENTS {
        flows.add(
            l(&[("event", event)]),
            r.flows.get(slot as usize).copied().unwrap_or(0),
        );
    }
    reg.register(
        "tollgate_flows",
        "Flow-tracking events: created (a SYN), midstream (first seen carrying payload: older \
         than tracking, or evicted), untracked (a server payload with no flow entry), answers \
         (times to first byte measured), cuts (flows cut by a request-size cap)",
        flows.0,
    );
    reg.register(
        "tollgate_flows_tracked",
        "Entries in the flow table (LRU: when full, the oldest flows age out)",
        gauge(r.tracked as f64),
    );
    reg.register(
        "tollgate_flows_capacity",
        "Size of the flow table ([limits] flows)",
        gauge(f64::from(r.capacity)),
    );
}

/// Per identity, what [`super::identity_families`] adds to the top-K: the counters the
/// top-K families read, from `EGRESS_IDENTITY`.
pub(crate) struct TopEgress {
    pub response: Counters,
    pub ttfb_seconds: super::FloatCounters,
    pub answers: Counters,
}

impl TopEgress {
    pub(crate) fn new() -> TopEgress {
        TopEgress {
            response: Counters::new(),
            ttfb_seconds: super::FloatCounters::new(),
            answers: Counters::new(),
        }
    }

    pub(crate) fn add(&self, identity: &str, c: &EgressCounters) {
        let lb = l(&[("identity", identity)]);
        self.response.add(lb.clone(), c.payload);
        self.ttfb_seconds
            .add(lb.clone(), c.ttfb_sum_ns as f64 / 1e9);
        self.answers.add(lb, c.ttfb_count);
    }

    pub(crate) fn register(self, reg: &mut Registry) {
        reg.register(
            "tollgate_top_identity_response_bytes",
            "Payload bytes the node sent to the top-K identities (the same K as \
             tollgate_top_identity_packets)",
            self.response.0,
        );
        reg.register(
            "tollgate_top_identity_ttfb_seconds",
            "Sum of the times to first byte measured on the top-K identities' flows; \
             divided by the increase of tollgate_top_identity_ttfb_answers, the mean",
            self.ttfb_seconds.0,
        );
        reg.register(
            "tollgate_top_identity_ttfb_answers",
            "Times to first byte measured on the top-K identities' flows",
            self.answers.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use tollgate_common::Counter as Packets;

    use super::*;

    fn text(reg: &Registry) -> String {
        let mut om = String::new();
        encode(&mut om, reg).unwrap();
        super::super::to_text_format(&om)
    }

    /// 3 answers at 3 ms, 2 at 40 ms, 1 at 45 s: per bucket in the kernel.
    fn hist() -> TtfbHist {
        let mut h = TtfbHist::default();
        h.buckets[0] = 3; // <= 5 ms
        h.buckets[3] = 2; // (25, 50] ms
        h.buckets[TTFB_BUCKETS - 1] = 1; // > 30 s
        h.count = 6;
        h.sum_ns = 3 * 3_000_000 + 2 * 40_000_000 + 45_000_000_000;
        h
    }

    #[test]
    fn per_bucket_counts_become_cumulative_seconds() {
        let s = TtfbSeries::of(&hist());
        assert_eq!(s.count, 6);
        assert!((s.sum_s - 45.089).abs() < 1e-9, "{}", s.sum_s);
        let expect: [(f64, u64); TTFB_BUCKETS] = [
            (0.005, 3),
            (0.01, 3),
            (0.025, 3),
            (0.05, 5),
            (0.1, 5),
            (0.25, 5),
            (0.5, 5),
            (1.0, 5),
            (2.5, 5),
            (5.0, 5),
            (10.0, 5),
            (30.0, 5),
            (f64::INFINITY, 6),
        ];
        assert_eq!(s.cumulative, expect);
        // The count is the buckets' sum, so +Inf and _count agree even when the kernel's
        // count was read ahead of its bucket.
        let mut skewed = hist();
        skewed.count = 7;
        assert_eq!(TtfbSeries::of(&skewed).count, 6);
    }

    fn readings() -> Readings {
        let mut endpoints = vec![EgressCounters::default(); 3];
        endpoints[1] = EgressCounters {
            sent: Packets {
                packets: 10,
                bytes: 15_000,
            },
            payload: 14_000,
            ttfb_sum_ns: 0,
            ttfb_count: 0,
        };
        let mut ttfb = vec![TtfbHist::default(); 16];
        ttfb[ttfb_index(1, Class::Customer as u8) as usize] = hist();
        let mut flows = [0; FLOW_COUNTER_SLOTS as usize];
        flows[FLOW_CREATED as usize] = 4;
        flows[FLOW_ANSWERS as usize] = 6;
        flows[FLOW_CUTS as usize] = 1;
        flows[7] = 99; // a slot no event names: not exported
        Readings {
            endpoints,
            ttfb,
            flows,
            tracked: 3,
            capacity: 65536,
        }
    }

    #[test]
    fn the_exposition_has_cumulative_buckets_and_bounded_labels() {
        let mut reg = Registry::default();
        register(&mut reg, &["model", "embed"], &readings());
        let t = text(&reg);
        for line in [
            "# TYPE tollgate_egress_packets_total counter",
            "tollgate_egress_packets_total{endpoint=\"model\"} 10",
            "tollgate_egress_packets_total{endpoint=\"embed\"} 0",
            "tollgate_egress_bytes_total{endpoint=\"model\"} 15000",
            "tollgate_response_bytes_total{endpoint=\"model\"} 14000",
            "# TYPE tollgate_ttfb_seconds histogram",
            "tollgate_ttfb_seconds_sum{endpoint=\"model\",class=\"customer\"} 45.089",
            "tollgate_ttfb_seconds_count{endpoint=\"model\",class=\"customer\"} 6",
            "tollgate_ttfb_seconds_bucket{le=\"0.005\",endpoint=\"model\",class=\"customer\"} 3",
            "tollgate_ttfb_seconds_bucket{le=\"0.01\",endpoint=\"model\",class=\"customer\"} 3",
            "tollgate_ttfb_seconds_bucket{le=\"0.05\",endpoint=\"model\",class=\"customer\"} 5",
            "tollgate_ttfb_seconds_bucket{le=\"30.0\",endpoint=\"model\",class=\"customer\"} 5",
            "tollgate_ttfb_seconds_bucket{le=\"+Inf\",endpoint=\"model\",class=\"customer\"} 6",
            "tollgate_flows_total{event=\"created\"} 4",
            "tollgate_flows_total{event=\"midstream\"} 0",
            "tollgate_flows_total{event=\"answers\"} 6",
            "tollgate_flows_total{event=\"cuts\"} 1",
            "tollgate_flows_tracked 3.0",
            "tollgate_flows_capacity 65536.0",
        ] {
            assert!(t.contains(line), "no {line} in:\n{t}");
        }
        // 13 buckets, one series: the classes and endpoints that never answered have none.
        assert_eq!(
            t.matches("tollgate_ttfb_seconds_bucket").count(),
            TTFB_BUCKETS,
            "{t}"
        );
        assert!(
            !t.contains("99"),
            "an unnamed flow slot is not exported:\n{t}"
        );
    }

    #[test]
    fn missing_slots_read_as_zero() {
        // An agent on pins older than the egress maps reads empty tables: zeros, no panic.
        let mut reg = Registry::default();
        register(&mut reg, &["model"], &Readings::default());
        let t = text(&reg);
        assert!(
            t.contains("tollgate_egress_bytes_total{endpoint=\"model\"} 0"),
            "{t}"
        );
        assert!(!t.contains("tollgate_ttfb_seconds_bucket"), "{t}");
    }

    #[test]
    fn top_identities_get_response_bytes_and_ttfb_sums() {
        let top = TopEgress::new();
        top.add(
            "acme",
            &EgressCounters {
                payload: 5000,
                ttfb_sum_ns: 250_000_000,
                ttfb_count: 2,
                ..Default::default()
            },
        );
        let mut reg = Registry::default();
        top.register(&mut reg);
        let t = text(&reg);
        for line in [
            "tollgate_top_identity_response_bytes_total{identity=\"acme\"} 5000",
            "tollgate_top_identity_ttfb_seconds_total{identity=\"acme\"} 0.25",
            "tollgate_top_identity_ttfb_answers_total{identity=\"acme\"} 2",
        ] {
            assert!(t.contains(line), "no {line} in:\n{t}");
        }
    }
}
