//! `top`'s text: the `--once` snapshot as plain text or JSON, and the formatting of numbers,
//! names and header lines that the terminal view shares.

use serde::Serialize;
use serde_json::Value;
use tollgate::control::reply::{EndpointRow, IdentityRow, Status};

use super::model::{RateRow, Snapshot, SortKey, View, limited, view};
use crate::cli::print::{self, gpu_label, proto, table};

/// Rates in JSON keep three decimals: more is noise from the timer, and 1234.5678901234
/// helps no script.
pub(super) fn json_rate(r: Option<f64>) -> Option<f64> {
    r.map(|r| (r * 1000.0).round() / 1000.0)
}

/// A reply row with its rates: the row's own fields, then `pass_per_s` and `drop_per_s`.
#[derive(Serialize)]
struct WithRates<'a, T> {
    #[serde(flatten)]
    row: &'a T,
    pass_per_s: Option<f64>,
    drop_per_s: Option<f64>,
}

impl<'a, T> WithRates<'a, T> {
    fn of(r: &'a RateRow<T>) -> WithRates<'a, T> {
        WithRates {
            row: &r.row,
            pass_per_s: json_rate(r.pass_per_s),
            drop_per_s: json_rate(r.drop_per_s),
        }
    }
}

/// An identity row with its rates and what the node sent back to it over the interval:
/// payload bytes per second, and the mean time to first byte (ms) of the answers measured
/// between the two polls (`null` when there was none).
#[derive(Serialize)]
struct IdentityJson<'a> {
    #[serde(flatten)]
    rates: WithRates<'a, IdentityRow>,
    response_bytes_per_s: Option<f64>,
    ttfb_ms: Option<f64>,
}

impl<'a> IdentityJson<'a> {
    fn of(r: &'a RateRow<IdentityRow>) -> IdentityJson<'a> {
        IdentityJson {
            rates: WithRates::of(r),
            response_bytes_per_s: json_rate(r.response_per_s),
            ttfb_ms: json_rate(r.ttfb_ms),
        }
    }
}

/// The `--once --output json` object.
#[derive(Serialize)]
struct SnapshotJson<'a> {
    time_unix_ms: u64,
    interval_s: Option<f64>,
    status: &'a Status,
    identities: Vec<IdentityJson<'a>>,
    endpoints: Vec<WithRates<'a, EndpointRow>>,
}

/// The `--once --output json` object, as JSON (keys sorted, as `print::json` prints them).
pub(super) fn snapshot_json(prev: &Snapshot, cur: &Snapshot, limit: usize) -> Value {
    let v = view(Some(prev), cur, SortKey::Rate);
    let snapshot = SnapshotJson {
        time_unix_ms: cur.unix_ms,
        interval_s: json_rate(v.secs),
        status: &cur.status,
        identities: limited(&v.identities, limit)
            .iter()
            .map(IdentityJson::of)
            .collect(),
        endpoints: v.endpoints.iter().map(WithRates::of).collect(),
    };
    serde_json::to_value(&snapshot).unwrap_or_default()
}

/// Agent strings are shown as they are, less control characters: a name with an escape
/// sequence in it must not be able to move the cursor or recolour the terminal.
pub(super) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A list of agent strings as one cell, cleaned: comma-separated, `-` when empty.
pub(super) fn clean_list(items: &[String]) -> String {
    clean(&print::list(items))
}

/// "4567.8" below 100 000/s, then "123.5k", "7.8M": at most 7 characters, so it fits its
/// column, and exact to the tenth where the eye can still compare digits.
pub(super) fn fmt_rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r < 99_999.95 => format!("{r:.1}"),
        Some(r) => si(r),
    }
}

/// A time to first byte in ms: "52.5", "1234", "-" without one (no answer in the interval).
pub(super) fn fmt_ms(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000.0 => format!("{ms:.1}"),
        Some(ms) => format!("{ms:.0}"),
    }
}

/// Exact below 100 000, then "123.4k": totals grow without bound and a column cannot.
pub(super) fn fmt_count(n: u64) -> String {
    if n < 100_000 {
        n.to_string()
    } else {
        si(n as f64)
    }
}

pub(super) fn si(x: f64) -> String {
    let mut x = x;
    for unit in ["", "k", "M", "G", "T"] {
        if x < 1000.0 {
            return format!("{x:.1}{unit}");
        }
        x /= 1000.0;
    }
    format!("{x:.1}P")
}

pub(super) fn fmt_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// "tcp/8000,8001-8003".
pub(super) fn proto_ports(endpoint: &EndpointRow) -> String {
    format!(
        "{}/{}",
        proto(endpoint.protocol),
        clean_list(&endpoint.ports)
    )
}

/// The lines both views put above the tables.
pub(super) fn header_lines(status: &Status) -> Vec<String> {
    let gpu = &status.gpu;
    let mut gpu_line = format!("gpu source {}", clean(&gpu.source));
    if let Some(e) = &gpu.error {
        gpu_line.push_str(&format!("  error: {}", clean(e)));
    }
    vec![
        format!(
            "interfaces {}  uptime {}  anomaly_mode {}  bindings {}  quarantined {}",
            clean_list(&status.interfaces),
            fmt_uptime(status.uptime_s),
            clean(&status.anomaly_mode),
            status.bindings,
            clean_list(&status.quarantined),
        ),
        gpu_line,
        format!(
            "saturated endpoints {}  pressure {}",
            clean_list(&gpu.saturated_endpoints),
            clean_list(&crate::cli::status::pressure_lines(&gpu.endpoints))
        ),
    ]
}

/// One GPU reading as a line, cleaned (the GPU's name comes from the driver).
pub(super) fn gpu_line(r: &tollgate::controller::gpu::GpuReading) -> String {
    clean(&gpu_label(r))
}

/// The drops panel: totals, then token refusals ([`total_lines`] and [`refusal_lines`]).
pub(super) fn drop_lines(v: &View, status: &Status) -> Vec<String> {
    let mut lines = total_lines(v, status);
    lines.extend(refusal_lines(v, status));
    lines
}

/// Packets passed and dropped per second, with the totals.
pub(super) fn total_lines(v: &View, status: &Status) -> Vec<String> {
    vec![
        format!(
            "passed/s {}  (total {})",
            fmt_rate(v.passed_per_s),
            status.passed_packets
        ),
        format!(
            "dropped/s {}  (total {})",
            fmt_rate(v.dropped_per_s),
            status.dropped_packets
        ),
    ]
}

/// Drops by reason as table rows (reason, drop/s, dropped), or the one line said instead
/// when nothing was dropped.
pub(super) fn reason_rows(v: &View) -> Result<Vec<Vec<String>>, &'static str> {
    if v.drops.is_empty() {
        return Err("drops by reason: none");
    }
    Ok(v.drops
        .iter()
        .map(|r| vec![clean(&r.label), fmt_rate(r.per_s), fmt_count(r.total)])
        .collect())
}

/// Token verifications refused, by label, and probable thefts.
pub(super) fn refusal_lines(v: &View, status: &Status) -> Vec<String> {
    let mut lines = Vec::new();
    match &v.refusals {
        None => lines.push("token refusals: tokens not configured".into()),
        Some(r) if r.iter().all(|r| r.total == 0) => lines.push("token refusals: none".into()),
        Some(r) => {
            lines.push("token refusals (total, per s):".into());
            for r in r.iter().filter(|r| r.total > 0) {
                lines.push(format!(
                    "  {}  {}  {}",
                    clean(&r.label),
                    r.total,
                    fmt_rate(r.per_s)
                ));
            }
        }
    }
    if let Some(t) = &status.tokens {
        lines.push(format!("probable token thefts {}", t.probable_thefts));
    }
    lines
}

pub(super) fn identity_cells(r: &RateRow<IdentityRow>) -> Vec<String> {
    vec![
        clean(&r.name),
        r.row.class.label().into(),
        clean(&r.row.plan),
        fmt_rate(r.pass_per_s),
        fmt_rate(r.drop_per_s),
        r.passed.to_string(),
        r.dropped.to_string(),
        fmt_rate(r.response_per_s),
        fmt_ms(r.ttfb_ms),
        if r.row.quarantined.is_some() {
            "yes".into()
        } else {
            "-".into()
        },
        // Which response cap holds it (`quota show` has the figures).
        match &r.row.response_capped {
            Some(_) => "yes".into(),
            None => "-".into(),
        },
        // Which quota cut it off: bytes, the usage feed's tokens or its budget.
        r.row.quota_exhausted.clone().unwrap_or_else(|| "-".into()),
    ]
}

pub(super) fn endpoint_cells(r: &RateRow<EndpointRow>) -> Vec<String> {
    vec![
        clean(&r.name),
        proto_ports(&r.row),
        fmt_rate(r.pass_per_s),
        fmt_rate(r.drop_per_s),
        r.passed.to_string(),
        r.dropped.to_string(),
    ]
}

/// The `--once` text snapshot: plain text, no terminal control codes, so it can go to a file
/// or a pager.
pub(super) fn snapshot_text(prev: &Snapshot, cur: &Snapshot, limit: usize) -> String {
    let v = view(Some(prev), cur, SortKey::Rate);
    let mut out = String::new();
    out.push_str(&format!(
        "tollgate top: rates over {:.2} s\n",
        v.secs.unwrap_or(0.0)
    ));
    for l in header_lines(&cur.status) {
        out.push_str(&l);
        out.push('\n');
    }
    for r in &cur.status.gpu.readings {
        out.push_str(&format!("  {}\n", gpu_line(r)));
    }
    out.push('\n');
    let shown = limited(&v.identities, limit);
    out.push_str(&table(
        &[
            "identity",
            "class",
            "plan",
            "pass/s",
            "drop/s",
            "passed",
            "dropped",
            "resp B/s",
            "ttfb ms",
            "quarantined",
            "response capped",
            "quota",
        ],
        &shown.iter().map(identity_cells).collect::<Vec<_>>(),
    ));
    if shown.len() < v.identities.len() {
        out.push_str(&format!(
            "({} more identities; --limit 0 shows all)\n",
            v.identities.len() - shown.len()
        ));
    }
    out.push('\n');
    out.push_str(&table(
        &[
            "endpoint",
            "proto/ports",
            "pass/s",
            "drop/s",
            "passed",
            "dropped",
        ],
        &v.endpoints.iter().map(endpoint_cells).collect::<Vec<_>>(),
    ));
    out.push('\n');
    match reason_rows(&v) {
        Ok(rows) => out.push_str(&table(&["drop reason", "drop/s", "dropped"], &rows)),
        Err(line) => {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push('\n');
    for l in drop_lines(&v, &cur.status) {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cli::top::fixtures::*;

    #[test]
    fn json_shape() {
        let (a, b) = two_polls();
        let j = snapshot_json(&a, &b, 2);
        let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "endpoints",
                "identities",
                "interval_s",
                "status",
                "time_unix_ms"
            ]
        );
        assert_eq!(j["time_unix_ms"], 1_700_000_000_000u64);
        assert_eq!(j["interval_s"], 2.0);
        assert_eq!(j["status"], serde_json::to_value(&b.status).unwrap());
        let ids = j["identities"].as_array().unwrap();
        assert_eq!(ids.len(), 2, "limit applies");
        assert_eq!(ids[0]["name"], "busy");
        assert_eq!(ids[0]["pass_per_s"], 1000.0);
        assert_eq!(ids[0]["drop_per_s"], 5.0);
        // The agent's fields are all still there.
        assert_eq!(ids[0]["passed_bytes"], 300_000);
        assert_eq!(ids[0]["bindings"], json!(["198.19.7.0/24"]));
        assert_eq!(ids[0]["response_bytes_per_s"], 20_000.0);
        assert_eq!(ids[0]["ttfb_ms"], 52.5);
        assert_eq!(ids[0]["egress"]["ttfb_count"], 7);
        assert_eq!(ids[1]["name"], "idle");
        assert_eq!(ids[1]["pass_per_s"], 0.0);
        // No answer between the polls: null, and the key is there for scripts to read.
        assert_eq!(ids[1]["ttfb_ms"], Value::Null);
        assert_eq!(ids[1]["response_bytes_per_s"], 0.0);
        let all = snapshot_json(&a, &b, 0);
        assert_eq!(all["identities"].as_array().unwrap().len(), 4);
        assert_eq!(all["identities"][2]["pass_per_s"], Value::Null);
        assert_eq!(j["endpoints"][0]["name"], "model");
        assert_eq!(j["endpoints"][0]["pass_per_s"], 1000.0);
        assert_eq!(j["endpoints"][0]["ports"], json!(["8000", "8001-8003"]));
    }

    #[test]
    fn text_snapshot_is_plain() {
        let (a, mut b) = two_polls();
        b.identities[0].name = "evil\u{1b}[2J".into();
        let t = snapshot_text(&a, &b, 3);
        assert!(!t.contains('\u{1b}'), "no control codes: {t}");
        assert!(t.contains("tollgate top: rates over 2.00 s"));
        assert!(t.contains("uptime 1d 01:01:01"));
        assert!(t.contains("GPU0 H100  88%  mem 40.0/80.0 GiB  550 W"));
        assert!(t.contains("saturated endpoints model"));
        assert!(t.contains("(1 more identities; --limit 0 shows all)"));
        let busy = t.lines().find(|l| l.starts_with("busy")).unwrap();
        let cells: Vec<&str> = busy.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "busy", "partner", "partner", "1000.0", "5.0", "3000", "10", "20000.0", "52.5",
                "-", "-", "-"
            ]
        );
        // The quota column names the reason a cut-off identity has.
        let mut c = b.clone();
        for r in c.identities.iter_mut().filter(|r| r.name == "busy") {
            r.quota_exhausted = Some("token_quota_exhausted".into());
        }
        let t2 = snapshot_text(&a, &c, 3);
        let busy2 = t2.lines().find(|l| l.starts_with("busy")).unwrap();
        assert!(busy2.ends_with("token_quota_exhausted"), "{busy2}");
        assert!(t.contains("model     tcp/8000,8001-8003  1000.0  5.0"));
        assert!(t.contains("dropped/s 5.0  (total 110)"));
        assert!(t.contains("DROP REASON      DROP/S  DROPPED\nquota_exhausted  4.5     98\n"));
        assert!(t.contains("\nunbound          0.5     11\n"), "{t}");
        assert!(
            !t.contains("class_not_allowed"),
            "nothing dropped, not listed"
        );
        assert!(t.contains("  expired  5  2.0"));
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_rate(None), "-");
        assert_eq!(fmt_rate(Some(12.34)), "12.3");
        assert_eq!(fmt_rate(Some(4567.0)), "4567.0");
        assert_eq!(fmt_rate(Some(99_999.96)), "100.0k");
        assert_eq!(fmt_rate(Some(123_456.0)), "123.5k");
        assert_eq!(fmt_ms(None), "-");
        assert_eq!(fmt_ms(Some(52.46)), "52.5");
        assert_eq!(fmt_ms(Some(2500.4)), "2500");
        assert_eq!(fmt_count(99_999), "99999");
        assert_eq!(fmt_count(1_234_567), "1.2M");
        assert_eq!(fmt_uptime(59), "00:00:59");
        assert_eq!(fmt_uptime(90_061), "1d 01:01:01");
        assert_eq!(clean("a\tb\u{7}c"), "a?b?c");
    }
}
