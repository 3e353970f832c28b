//! `top`'s model: the agent's answers at one poll, and what two polls give: rates per
//! second, rows sorted, the totals and refusals. No I/O and no drawing, so it is unit-tested.

use std::{collections::BTreeMap, time::Instant};

use tollgate::control::reply::{EgressTotals, EndpointRow, IdentityRow, Status};

/// The agent's answers at one moment.
#[derive(Clone, Debug)]
pub(super) struct Snapshot {
    /// When the poll started: the three answers are read one after another, and taking the
    /// same point of every poll keeps that offset out of the differences.
    pub(super) at: Instant,
    pub(super) unix_ms: u64,
    pub(super) status: Status,
    pub(super) endpoints: Vec<EndpointRow>,
    pub(super) identities: Vec<IdentityRow>,
}

/// Column the identities are sorted by; `s` cycles through them in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SortKey {
    /// Packets per second, passed and dropped together: "who is busy now".
    Rate,
    Pass,
    Drop,
    Passed,
    Dropped,
    Name,
}

impl SortKey {
    pub(super) fn next(self) -> SortKey {
        match self {
            SortKey::Rate => SortKey::Pass,
            SortKey::Pass => SortKey::Drop,
            SortKey::Drop => SortKey::Passed,
            SortKey::Passed => SortKey::Dropped,
            SortKey::Dropped => SortKey::Name,
            SortKey::Name => SortKey::Rate,
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            SortKey::Rate => "rate",
            SortKey::Pass => "pass/s",
            SortKey::Drop => "drop/s",
            SortKey::Passed => "passed",
            SortKey::Dropped => "dropped",
            SortKey::Name => "name",
        }
    }
}

/// A reply row with a name and packet totals: what rates are computed for.
pub(super) trait Counted {
    fn name(&self) -> &str;
    fn passed(&self) -> u64;
    fn dropped(&self) -> u64;
    /// What the node sent back to it; `None` for rows without the figures (endpoints, an
    /// agent older than them).
    fn egress(&self) -> Option<&EgressTotals> {
        None
    }
}

impl Counted for IdentityRow {
    fn name(&self) -> &str {
        &self.name
    }
    fn passed(&self) -> u64 {
        self.passed_packets
    }
    fn dropped(&self) -> u64 {
        self.dropped_packets
    }
    fn egress(&self) -> Option<&EgressTotals> {
        self.egress.as_ref()
    }
}

impl Counted for EndpointRow {
    fn name(&self) -> &str {
        &self.name
    }
    fn passed(&self) -> u64 {
        self.passed_packets
    }
    fn dropped(&self) -> u64 {
        self.dropped_packets
    }
}

/// An identity or an endpoint with its totals and rates.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RateRow<T> {
    pub(super) name: String,
    /// `None` without an earlier reading of the same name, or when the counter went
    /// backwards (counters re-created): "unknown", which is not "idle".
    pub(super) pass_per_s: Option<f64>,
    pub(super) drop_per_s: Option<f64>,
    pub(super) passed: u64,
    pub(super) dropped: u64,
    /// Payload bytes per second the node sent back to it (`None` as the packet rates, and
    /// for rows without egress figures).
    pub(super) response_per_s: Option<f64>,
    /// Mean time to first byte (ms) of the answers measured between the two polls; `None`
    /// when there was none (see [`ttfb_ms`]).
    pub(super) ttfb_ms: Option<f64>,
    /// The agent's row as it came, for the columns only some views show.
    pub(super) row: T,
}

impl<T> RateRow<T> {
    pub(super) fn rate(&self) -> f64 {
        self.pass_per_s.unwrap_or(0.0) + self.drop_per_s.unwrap_or(0.0)
    }
}

/// Per-second rate of a counter read twice, `secs` apart.
pub(super) fn per_second(prev: Option<u64>, cur: u64, secs: Option<f64>) -> Option<f64> {
    let (prev, secs) = (prev?, secs?);
    if cur < prev || secs <= 0.0 {
        return None;
    }
    Some((cur - prev) as f64 / secs)
}

/// The mean time to first byte (ms) of the answers the kernel measured between two reads of
/// an identity's counters: the growth of the sum of the times over the growth of their
/// count. The interval is exactly the answers counted between the two reads, not a window of
/// the clock, so nothing is divided by time and the poll's own timing does not enter it.
/// `None` without an earlier read, when no answer was measured in between ("no answer" is
/// not "0 ms"), or when the counters went backwards (the slot was re-created).
pub(super) fn ttfb_ms(prev: Option<&EgressTotals>, cur: &EgressTotals) -> Option<f64> {
    let prev = prev?;
    if cur.ttfb_count <= prev.ttfb_count || cur.ttfb_sum_ns < prev.ttfb_sum_ns {
        return None;
    }
    let answers = cur.ttfb_count - prev.ttfb_count;
    Some((cur.ttfb_sum_ns - prev.ttfb_sum_ns) as f64 / answers as f64 / 1e6)
}

/// Rows of `cur` with rates against `prev`. Rows are matched by name, not id: endpoint ids
/// are positions in the configuration and move when a reload inserts one, and a row that
/// matched the wrong counters would show a made-up rate.
pub(super) fn rate_rows<T: Counted + Clone>(
    prev: Option<&[T]>,
    cur: &[T],
    secs: Option<f64>,
) -> Vec<RateRow<T>> {
    let earlier = |name: &str| prev.and_then(|p| p.iter().find(|r| r.name() == name));
    cur.iter()
        .map(|r| {
            let before = earlier(r.name());
            let (passed, dropped) = (r.passed(), r.dropped());
            let sent_before = before.and_then(Counted::egress);
            let sent = r.egress();
            RateRow {
                response_per_s: sent.and_then(|s| {
                    per_second(
                        sent_before.map(|b| b.response_bytes),
                        s.response_bytes,
                        secs,
                    )
                }),
                ttfb_ms: sent.and_then(|s| ttfb_ms(sent_before, s)),
                pass_per_s: per_second(before.map(Counted::passed), passed, secs),
                drop_per_s: per_second(before.map(Counted::dropped), dropped, secs),
                passed,
                dropped,
                name: r.name().to_owned(),
                row: r.clone(),
            }
        })
        .collect()
}

/// Busiest first for the numeric keys, A to Z for names; ties by name so that rows do not
/// swap places between refreshes when their numbers are equal (all zero, say).
pub(super) fn sort_rows<T>(rows: &mut [RateRow<T>], key: SortKey) {
    rows.sort_by(|a, b| {
        let by = match key {
            SortKey::Rate => b.rate().total_cmp(&a.rate()),
            SortKey::Pass => b
                .pass_per_s
                .unwrap_or(0.0)
                .total_cmp(&a.pass_per_s.unwrap_or(0.0)),
            SortKey::Drop => b
                .drop_per_s
                .unwrap_or(0.0)
                .total_cmp(&a.drop_per_s.unwrap_or(0.0)),
            SortKey::Passed => b.passed.cmp(&a.passed),
            SortKey::Dropped => b.dropped.cmp(&a.dropped),
            SortKey::Name => std::cmp::Ordering::Equal,
        };
        by.then_with(|| a.name.cmp(&b.name))
    });
}

/// A counter the agent reports by label (a token refusal, a drop reason), with its rate.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct LabelRate {
    pub(super) label: String,
    pub(super) total: u64,
    pub(super) per_s: Option<f64>,
}

/// Token verifications that did not succeed, by the agent's label.
pub(super) type Refusal = LabelRate;

/// Each label of `cur` with its rate against `prev`; a label `prev` lacks counts from 0 (it
/// appears the first time it is counted), and without `prev` there is no rate.
fn label_rates<'a>(
    prev: Option<Option<&BTreeMap<String, u64>>>,
    cur: impl Iterator<Item = (&'a String, &'a u64)>,
    secs: Option<f64>,
) -> Vec<LabelRate> {
    cur.map(|(label, total)| {
        let before = prev.map(|p| p.and_then(|m| m.get(label)).copied().unwrap_or(0));
        LabelRate {
            label: label.clone(),
            total: *total,
            per_s: per_second(before, *total, secs),
        }
    })
    .collect()
}

/// Everything one screen (or one `--once` snapshot) shows, computed from two polls.
#[derive(Debug)]
pub(super) struct View {
    /// Seconds between the two polls; `None` before the second poll.
    pub(super) secs: Option<f64>,
    pub(super) identities: Vec<RateRow<IdentityRow>>,
    pub(super) endpoints: Vec<RateRow<EndpointRow>>,
    pub(super) passed_per_s: Option<f64>,
    pub(super) dropped_per_s: Option<f64>,
    /// `None` when the agent has no token verification configured.
    pub(super) refusals: Option<Vec<Refusal>>,
    /// Drops by reason, busiest first; reasons that never dropped anything left out.
    pub(super) drops: Vec<LabelRate>,
}

/// Busiest first (unknown rates as 0), then the most dropped, then by name: a stable order.
fn sort_labels(rows: &mut [LabelRate]) {
    rows.sort_by(|a, b| {
        b.per_s
            .unwrap_or(0.0)
            .total_cmp(&a.per_s.unwrap_or(0.0))
            .then(b.total.cmp(&a.total))
            .then_with(|| a.label.cmp(&b.label))
    });
}

pub(super) fn view(prev: Option<&Snapshot>, cur: &Snapshot, sort: SortKey) -> View {
    let secs = prev
        .map(|p| cur.at.saturating_duration_since(p.at).as_secs_f64())
        .filter(|s| *s > 0.0);
    let mut identities = rate_rows(prev.map(|p| &p.identities[..]), &cur.identities, secs);
    sort_rows(&mut identities, sort);
    let mut endpoints = rate_rows(prev.map(|p| &p.endpoints[..]), &cur.endpoints, secs);
    // Endpoints are few (they come from the configuration): always busiest first.
    sort_rows(&mut endpoints, SortKey::Rate);
    let status_rate = |count: fn(&Status) -> u64| {
        per_second(prev.map(|p| count(&p.status)), count(&cur.status), secs)
    };
    let refusals = cur.status.tokens.as_ref().map(|t| {
        label_rates(
            prev.map(|p| p.status.tokens.as_ref().map(|t| &t.verifications)),
            t.verifications
                .iter()
                // "ok" is the one success label; everything else is a refusal reason.
                .filter(|(label, _)| label.as_str() != "ok"),
            secs,
        )
    });
    let mut drops = label_rates(
        prev.map(|p| Some(&p.status.drops)),
        cur.status.drops.iter().filter(|(_, n)| **n > 0),
        secs,
    );
    sort_labels(&mut drops);
    View {
        secs,
        identities,
        endpoints,
        passed_per_s: status_rate(|s| s.passed_packets),
        dropped_per_s: status_rate(|s| s.dropped_packets),
        refusals,
        drops,
    }
}

/// The rows the view shows: the first `limit`, or all with 0.
pub(super) fn limited<T>(rows: &[T], limit: usize) -> &[T] {
    if limit == 0 {
        rows
    } else {
        &rows[..rows.len().min(limit)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::top::fixtures::*;

    #[test]
    fn rates_are_differences_over_measured_time() {
        assert_eq!(per_second(Some(100), 300, Some(2.0)), Some(100.0));
        assert_eq!(per_second(None, 300, Some(2.0)), None);
        assert_eq!(per_second(Some(100), 300, None), None);
        // A counter that went backwards was re-created: unknown, not negative.
        assert_eq!(per_second(Some(300), 100, Some(2.0)), None);
        assert_eq!(per_second(Some(1), 2, Some(0.0)), None);

        let (a, b) = two_polls();
        let v = view(Some(&a), &b, SortKey::Rate);
        assert_eq!(v.secs, Some(2.0));
        let busy = v.identities.iter().find(|r| r.name == "busy").unwrap();
        assert_eq!(busy.pass_per_s, Some(1000.0));
        assert_eq!(busy.drop_per_s, Some(5.0));
        assert_eq!((busy.passed, busy.dropped), (3000, 10));
        let new = v.identities.iter().find(|r| r.name == "new").unwrap();
        assert_eq!(new.pass_per_s, None);
        let reset = v.identities.iter().find(|r| r.name == "reset").unwrap();
        assert_eq!(reset.pass_per_s, None);
        assert_eq!(v.endpoints[0].pass_per_s, Some(1000.0));
        assert_eq!(v.endpoints[0].drop_per_s, Some(5.0));
        assert_eq!(v.passed_per_s, Some(1000.0));
        assert_eq!(v.dropped_per_s, Some(5.0));
        assert_eq!(
            v.refusals,
            Some(vec![Refusal {
                label: "expired".into(),
                total: 5,
                per_s: Some(2.0)
            }])
        );

        // Before the second poll there are totals but no rates.
        let first = view(None, &a, SortKey::Rate);
        assert_eq!(first.secs, None);
        assert!(first.identities.iter().all(|r| r.pass_per_s.is_none()));
        assert_eq!(first.passed_per_s, None);
    }

    /// Drops per second by reason, busiest first; a reason that never dropped is left out,
    /// one that stood still shows 0/s.
    #[test]
    fn drops_by_reason_have_rates() {
        let (a, b) = two_polls();
        let v = view(Some(&a), &b, SortKey::Rate);
        let rate = |label: &str, total, per_s| LabelRate {
            label: label.into(),
            total,
            per_s,
        };
        assert_eq!(
            v.drops,
            [
                rate("quota_exhausted", 98, Some(4.5)),
                rate("unbound", 11, Some(0.5)),
                rate("parse_error", 1, Some(0.0)),
            ]
        );
        // One poll: totals, no rates; ordered by total.
        let first = view(None, &b, SortKey::Rate);
        assert_eq!(
            first.drops,
            [
                rate("quota_exhausted", 98, None),
                rate("unbound", 11, None),
                rate("parse_error", 1, None),
            ]
        );
    }

    /// The mean time to first byte over the interval is the growth of the sum over the growth
    /// of the count: 4 answers, 210 ms in all, is 52.5 ms, whatever came before (3 answers at
    /// 100 ms) and however long the interval.
    #[test]
    fn ttfb_is_the_mean_of_the_answers_between_the_polls() {
        let totals = |sum_ms: u64, n: u64| EgressTotals {
            ttfb_sum_ns: sum_ms * 1_000_000,
            ttfb_count: n,
            ..Default::default()
        };
        assert_eq!(ttfb_ms(Some(&totals(300, 3)), &totals(510, 7)), Some(52.5));
        // Sub-millisecond precision survives: 3 answers of 1.5 ms.
        let ns = |sum_ns: u64, n: u64| EgressTotals {
            ttfb_sum_ns: sum_ns,
            ttfb_count: n,
            ..Default::default()
        };
        assert_eq!(ttfb_ms(Some(&ns(0, 0)), &ns(4_500_000, 3)), Some(1.5));
        // No answer in the interval: unknown, not 0 ms and not the lifetime mean.
        assert_eq!(ttfb_ms(Some(&totals(300, 3)), &totals(300, 3)), None);
        assert_eq!(ttfb_ms(None, &totals(300, 3)), None);
        // A re-created slot counts from scratch: no figure rather than a negative one.
        assert_eq!(ttfb_ms(Some(&totals(300, 3)), &totals(10, 1)), None);

        let (a, b) = two_polls();
        let v = view(Some(&a), &b, SortKey::Rate);
        let row = |name: &str| v.identities.iter().find(|r| r.name == name).unwrap();
        assert_eq!(row("busy").ttfb_ms, Some(52.5));
        assert_eq!(row("busy").response_per_s, Some(20_000.0));
        assert_eq!(row("idle").ttfb_ms, None);
        assert_eq!(row("idle").response_per_s, Some(0.0));
        // No egress figures (an older agent): nothing made up.
        assert_eq!(row("reset").response_per_s, None);
        assert_eq!(row("new").ttfb_ms, None);
        assert!(v.endpoints.iter().all(|r| r.ttfb_ms.is_none()));
    }

    #[test]
    fn rows_match_by_name_not_position() {
        let prev = [identity("a", 10, 0), identity("b", 100, 0)];
        let cur = [identity("b", 110, 0), identity("a", 30, 0)];
        let rows = rate_rows(Some(&prev[..]), &cur, Some(1.0));
        assert_eq!(rows[0].name, "b");
        assert_eq!(rows[0].pass_per_s, Some(10.0));
        assert_eq!(rows[1].pass_per_s, Some(20.0));
    }

    #[test]
    fn sorting() {
        let (a, b) = two_polls();
        let names = |k: SortKey| -> Vec<String> {
            view(Some(&a), &b, k)
                .identities
                .into_iter()
                .map(|r| r.name)
                .collect()
        };
        // Busiest first; equal rates (0 and unknown) by name, so the order is stable.
        assert_eq!(names(SortKey::Rate), ["busy", "idle", "new", "reset"]);
        assert_eq!(names(SortKey::Drop), ["busy", "idle", "new", "reset"]);
        assert_eq!(names(SortKey::Passed), ["busy", "new", "idle", "reset"]);
        assert_eq!(names(SortKey::Name), ["busy", "idle", "new", "reset"]);

        let mut k = SortKey::Rate;
        for _ in 0..6 {
            k = k.next();
        }
        assert_eq!(k, SortKey::Rate, "`s` cycles back to the start");
    }
}
