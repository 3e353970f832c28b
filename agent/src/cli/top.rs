//! `tollgate top`: a live view of a running agent.
//!
//! It is built only from the read requests the agent already answers (`status`, `endpoints`,
//! `identities`), so it needs nothing new from the agent and works against any agent that
//! answers `tollgate status`. The agent reports totals; rates are the difference between two
//! polls divided by the time measured between them (not the nominal interval: a slow answer
//! or a stalled poll must not inflate the rate).

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ratatui::{
    Frame, Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor, event,
        event::{Event, KeyCode, KeyEventKind, KeyModifiers},
        execute, terminal,
    },
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, LineGauge, Paragraph, Row, Table},
};
use serde_json::{Value, json};
use tollgate::control::{
    client::{self, ClientError},
    protocol::{Request, Response},
};

use super::exit;

/// What `tollgate top` was asked for.
pub struct TopArgs {
    /// Time between polls; rates are measured over it.
    pub interval: Duration,
    /// Poll twice `interval` apart, print one snapshot, exit (no terminal needed).
    pub once: bool,
    /// With `once`: print JSON instead of a text table.
    pub json: bool,
    /// Most identities shown; 0 shows all.
    pub limit: usize,
}

/// Exit code for a command line that cannot work (no terminal, a zero interval). The same
/// code clap uses for usage errors, so scripts see one code for "called wrongly".
const USAGE: u8 = 2;

/// Bound on one request. Shorter than the other verbs' 30 s: a view refreshed every second
/// that waits half a minute for one answer is showing nothing useful, and the interactive
/// view keeps drawing (and shows the error) while a poll waits.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `tollgate top`. Exit codes are the other verbs': 3 when no agent answers, 4 when the
/// socket is refused, 2 for a usage error (no terminal without `--once`, a zero interval).
pub fn run(socket: &Path, args: &TopArgs) -> ExitCode {
    if args.interval.is_zero() {
        eprintln!("tollgate: --interval must be more than 0");
        return ExitCode::from(USAGE);
    }
    if !args.once && !std::io::stdout().is_terminal() {
        eprintln!(
            "tollgate: `tollgate top` draws on a terminal and stdout is not one; \
             use `tollgate top --once` (with `--output json` for scripts)"
        );
        return ExitCode::from(USAGE);
    }
    // The first poll happens before the terminal is taken over, so that "no agent" and
    // "permission denied" are printed and exit 3/4 exactly as for `tollgate status`.
    let first = match poll(socket) {
        Ok(s) => s,
        Err(f) => return f.report(),
    };
    if args.once {
        return once(socket, args, first);
    }
    match interactive(socket, args, first) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("tollgate: top: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A request that failed, with the exit code the other verbs would give it.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn report(self) -> ExitCode {
        eprintln!("tollgate: {}", self.message);
        ExitCode::from(self.code)
    }
}

/// One request, mapped to exit codes as `cli::call` maps them.
fn request(socket: &Path, req: &Request) -> Result<Value, Failure> {
    match client::call(socket, req, CALL_TIMEOUT) {
        Ok(Response {
            ok: true, result, ..
        }) => Ok(result.unwrap_or_default()),
        Ok(Response { error, .. }) => Err(match error {
            Some(e) => Failure {
                code: super::exit_code_for(e.kind),
                message: e.message,
            },
            None => Failure {
                code: exit::REFUSED,
                message: "refused".into(),
            },
        }),
        Err(e) => Err(Failure {
            code: match e {
                ClientError::PermissionDenied(_) => exit::PERMISSION,
                ClientError::NotRunning(_) | ClientError::Io { .. } => exit::NO_AGENT,
            },
            message: e.to_string(),
        }),
    }
}

/// The agent's answers at one moment.
#[derive(Clone, Debug)]
struct Snapshot {
    /// When the poll started: the three answers are read one after another, and taking the
    /// same point of every poll keeps that offset out of the differences.
    at: Instant,
    unix_ms: u64,
    status: Value,
    endpoints: Value,
    identities: Value,
}

fn poll(socket: &Path) -> Result<Snapshot, Failure> {
    let at = Instant::now();
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(Snapshot {
        at,
        unix_ms,
        status: request(socket, &Request::Status {})?,
        endpoints: request(socket, &Request::Endpoints {})?,
        identities: request(socket, &Request::Identities {})?,
    })
}

// ---------------------------------------------------------------------------------------------
// Pure part: rates, sorting, the JSON and text snapshots. No I/O, so it is unit-tested.

/// Column the identities are sorted by; `s` cycles through them in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SortKey {
    /// Packets per second, passed and dropped together: "who is busy now".
    Rate,
    Pass,
    Drop,
    Passed,
    Dropped,
    Name,
}

impl SortKey {
    fn next(self) -> SortKey {
        match self {
            SortKey::Rate => SortKey::Pass,
            SortKey::Pass => SortKey::Drop,
            SortKey::Drop => SortKey::Passed,
            SortKey::Passed => SortKey::Dropped,
            SortKey::Dropped => SortKey::Name,
            SortKey::Name => SortKey::Rate,
        }
    }

    fn label(self) -> &'static str {
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

/// An identity or an endpoint with its totals and rates.
#[derive(Clone, Debug, PartialEq)]
struct RateRow {
    name: String,
    /// `None` without an earlier reading of the same name, or when the counter went
    /// backwards (counters re-created): "unknown", which is not "idle".
    pass_per_s: Option<f64>,
    drop_per_s: Option<f64>,
    passed: u64,
    dropped: u64,
    /// The agent's object as it came, for the columns only some views show.
    raw: Value,
}

impl RateRow {
    fn rate(&self) -> f64 {
        self.pass_per_s.unwrap_or(0.0) + self.drop_per_s.unwrap_or(0.0)
    }
}

/// Per-second rate of a counter read twice, `secs` apart.
fn per_second(prev: Option<u64>, cur: u64, secs: Option<f64>) -> Option<f64> {
    let (prev, secs) = (prev?, secs?);
    if cur < prev || secs <= 0.0 {
        return None;
    }
    Some((cur - prev) as f64 / secs)
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Rows of `cur` (an array of objects) with rates against `prev`. Rows are matched by name,
/// not id: endpoint ids are positions in the configuration and move when a reload inserts
/// one, and a row that matched the wrong counters would show a made-up rate.
fn rate_rows(
    prev: Option<&Value>,
    cur: &Value,
    secs: Option<f64>,
    passed_key: &str,
    dropped_key: &str,
) -> Vec<RateRow> {
    let earlier = |name: &str| {
        prev.and_then(Value::as_array)
            .and_then(|a| a.iter().find(|r| r["name"].as_str() == Some(name)))
    };
    cur.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap_or_default().to_owned();
            let before = earlier(&name);
            let passed = count(r, passed_key);
            let dropped = count(r, dropped_key);
            RateRow {
                pass_per_s: per_second(before.map(|b| count(b, passed_key)), passed, secs),
                drop_per_s: per_second(before.map(|b| count(b, dropped_key)), dropped, secs),
                passed,
                dropped,
                name,
                raw: r.clone(),
            }
        })
        .collect()
}

/// Busiest first for the numeric keys, A to Z for names; ties by name so that rows do not
/// swap places between refreshes when their numbers are equal (all zero, say).
fn sort_rows(rows: &mut [RateRow], key: SortKey) {
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

/// Token verifications that did not succeed, by the agent's label.
#[derive(Clone, Debug, PartialEq)]
struct Refusal {
    label: String,
    total: u64,
    per_s: Option<f64>,
}

/// Everything one screen (or one `--once` snapshot) shows, computed from two polls.
#[derive(Debug)]
struct View {
    /// Seconds between the two polls; `None` before the second poll.
    secs: Option<f64>,
    identities: Vec<RateRow>,
    endpoints: Vec<RateRow>,
    passed_per_s: Option<f64>,
    dropped_per_s: Option<f64>,
    /// `None` when the agent has no token verification configured.
    refusals: Option<Vec<Refusal>>,
}

fn view(prev: Option<&Snapshot>, cur: &Snapshot, sort: SortKey) -> View {
    let secs = prev
        .map(|p| cur.at.saturating_duration_since(p.at).as_secs_f64())
        .filter(|s| *s > 0.0);
    let mut identities = rate_rows(
        prev.map(|p| &p.identities),
        &cur.identities,
        secs,
        "passed_packets",
        "dropped_packets",
    );
    sort_rows(&mut identities, sort);
    let mut endpoints = rate_rows(
        prev.map(|p| &p.endpoints),
        &cur.endpoints,
        secs,
        "packets_passed",
        "packets_dropped",
    );
    // Endpoints are few (they come from the configuration): always busiest first.
    sort_rows(&mut endpoints, SortKey::Rate);
    let status_rate = |key: &str| {
        per_second(
            prev.map(|p| count(&p.status, key)),
            count(&cur.status, key),
            secs,
        )
    };
    let refusals = cur.status["tokens"]["verifications"].as_object().map(|m| {
        m.iter()
            // "ok" is the one success label; everything else is a refusal reason.
            .filter(|(label, _)| label.as_str() != "ok")
            .map(|(label, total)| {
                let before = prev.map(|p| {
                    p.status["tokens"]["verifications"][label]
                        .as_u64()
                        .unwrap_or(0)
                });
                let total = total.as_u64().unwrap_or(0);
                Refusal {
                    label: label.clone(),
                    total,
                    per_s: per_second(before, total, secs),
                }
            })
            .collect()
    });
    View {
        secs,
        identities,
        endpoints,
        passed_per_s: status_rate("packets_passed"),
        dropped_per_s: status_rate("packets_dropped"),
        refusals,
    }
}

/// The rows the view shows: the first `limit`, or all with 0.
fn limited(rows: &[RateRow], limit: usize) -> &[RateRow] {
    if limit == 0 {
        rows
    } else {
        &rows[..rows.len().min(limit)]
    }
}

/// Rates in JSON keep three decimals: more is noise from the timer, and 1234.5678901234
/// helps no script.
fn json_rate(r: Option<f64>) -> Value {
    r.map_or(Value::Null, |r| json!((r * 1000.0).round() / 1000.0))
}

fn with_rates(row: &RateRow) -> Value {
    let mut v = row.raw.clone();
    if let Value::Object(m) = &mut v {
        m.insert("pass_per_s".into(), json_rate(row.pass_per_s));
        m.insert("drop_per_s".into(), json_rate(row.drop_per_s));
    }
    v
}

/// The `--once --output json` object.
fn snapshot_json(prev: &Snapshot, cur: &Snapshot, limit: usize) -> Value {
    let v = view(Some(prev), cur, SortKey::Rate);
    json!({
        "time_unix_ms": cur.unix_ms,
        "interval_s": json_rate(v.secs),
        "status": cur.status,
        "identities": limited(&v.identities, limit).iter().map(with_rates).collect::<Vec<_>>(),
        "endpoints": v.endpoints.iter().map(with_rates).collect::<Vec<_>>(),
    })
}

/// Agent strings are shown as they are, less control characters: a name with an escape
/// sequence in it must not be able to move the cursor or recolour the terminal.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => clean(s),
        Value::Null => "-".into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// "4567.8" below 100 000/s, then "123.5k", "7.8M": at most 7 characters, so it fits its
/// column, and exact to the tenth where the eye can still compare digits.
fn fmt_rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r < 99_999.95 => format!("{r:.1}"),
        Some(r) => si(r),
    }
}

/// Exact below 100 000, then "123.4k": totals grow without bound and a column cannot.
fn fmt_count(n: u64) -> String {
    if n < 100_000 {
        n.to_string()
    } else {
        si(n as f64)
    }
}

fn si(x: f64) -> String {
    let mut x = x;
    for unit in ["", "k", "M", "G", "T"] {
        if x < 1000.0 {
            return format!("{x:.1}{unit}");
        }
        x /= 1000.0;
    }
    format!("{x:.1}P")
}

fn fmt_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// "tcp/8000,8001-8003".
fn proto_ports(endpoint: &Value) -> String {
    format!(
        "{}/{}",
        text(&endpoint["protocol"]),
        text(&endpoint["ports"])
    )
}

/// One GPU reading as a line of text (utilisation is a fraction 0..=1 in the agent's JSON).
fn gpu_label(r: &Value) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    let util = r["utilization"].as_f64().unwrap_or(0.0) * 100.0;
    let used = r["memory_used_bytes"].as_f64().unwrap_or(0.0) / GIB;
    let total = r["memory_total_bytes"].as_f64().unwrap_or(0.0) / GIB;
    let mut s = format!(
        "GPU{} {} {util:>3.0}%  mem {used:.1}/{total:.1} GiB",
        text(&r["index"]),
        text(&r["name"]),
    );
    if let Some(w) = r["power_watts"].as_f64() {
        s.push_str(&format!("  {w:.0} W"));
    }
    s
}

/// The lines both views put above the tables.
fn header_lines(status: &Value) -> Vec<String> {
    let gpu = &status["gpu"];
    let mut gpu_line = format!("gpu source {}", text(&gpu["source"]));
    if !gpu["error"].is_null() {
        gpu_line.push_str(&format!("  error: {}", text(&gpu["error"])));
    }
    vec![
        format!(
            "interfaces {}  uptime {}  anomaly_mode {}  bindings {}  quarantined {}",
            text(&status["interfaces"]),
            fmt_uptime(count(status, "uptime_s")),
            text(&status["anomaly_mode"]),
            text(&status["bindings"]),
            text(&status["quarantined"]),
        ),
        gpu_line,
        format!("saturated endpoints {}", text(&gpu["saturated_endpoints"])),
    ]
}

fn drop_lines(v: &View, status: &Value) -> Vec<String> {
    let mut lines = vec![
        format!(
            "passed/s {}  (total {})",
            fmt_rate(v.passed_per_s),
            count(status, "packets_passed")
        ),
        format!(
            "dropped/s {}  (total {})",
            fmt_rate(v.dropped_per_s),
            count(status, "packets_dropped")
        ),
    ];
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
    if let Some(t) = status["tokens"]["probable_thefts"].as_u64() {
        lines.push(format!("probable token thefts {t}"));
    }
    lines
}

/// Left-aligned text columns, two spaces apart, headers upper-cased: the layout of the
/// other verbs' tables (cli::print::table).
fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&headers.iter().map(|h| h.to_uppercase()).collect::<Vec<_>>());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

fn identity_cells(r: &RateRow) -> Vec<String> {
    vec![
        clean(&r.name),
        text(&r.raw["class"]),
        text(&r.raw["plan"]),
        fmt_rate(r.pass_per_s),
        fmt_rate(r.drop_per_s),
        r.passed.to_string(),
        r.dropped.to_string(),
        if r.raw["quarantined"].is_null() {
            "-".into()
        } else {
            "yes".into()
        },
    ]
}

fn endpoint_cells(r: &RateRow) -> Vec<String> {
    vec![
        clean(&r.name),
        proto_ports(&r.raw),
        fmt_rate(r.pass_per_s),
        fmt_rate(r.drop_per_s),
        r.passed.to_string(),
        r.dropped.to_string(),
    ]
}

/// The `--once` text snapshot: plain text, no terminal control codes, so it can go to a file
/// or a pager.
fn snapshot_text(prev: &Snapshot, cur: &Snapshot, limit: usize) -> String {
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
    for r in cur.status["gpu"]["readings"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        out.push_str(&format!("  {}\n", gpu_label(r)));
    }
    out.push('\n');
    let shown = limited(&v.identities, limit);
    out.push_str(&text_table(
        &[
            "identity",
            "class",
            "plan",
            "pass/s",
            "drop/s",
            "passed",
            "dropped",
            "quarantined",
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
    out.push_str(&text_table(
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
    for l in drop_lines(&v, &cur.status) {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// `--once`.

fn once(socket: &Path, args: &TopArgs, first: Snapshot) -> ExitCode {
    std::thread::sleep(args.interval);
    let second = match poll(socket) {
        Ok(s) => s,
        Err(f) => return f.report(),
    };
    if args.json {
        super::print::json(&snapshot_json(&first, &second, args.limit));
    } else {
        print!("{}", snapshot_text(&first, &second, args.limit));
        let _ = std::io::stdout().flush();
    }
    ExitCode::from(exit::OK)
}

// ---------------------------------------------------------------------------------------------
// The interactive view.

/// Whether the terminal is in raw mode on the alternate screen, so that the guard, the panic
/// hook and a signal all restore it, and only the first of them does.
static TERMINAL_TAKEN: AtomicBool = AtomicBool::new(false);

/// Set by SIGTERM, SIGHUP and SIGINT: the loop sees it within one tick and leaves through
/// the guard, which restores the terminal (the default action would kill us with the
/// terminal left raw and on the alternate screen).
static STOP: AtomicBool = AtomicBool::new(false);

fn restore_terminal() {
    if TERMINAL_TAKEN.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(
            std::io::stdout(),
            terminal::LeaveAlternateScreen,
            cursor::Show
        );
    }
}

/// Restores the terminal when dropped: on return, on `?`, and on unwinding.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn take_terminal() -> std::io::Result<TerminalGuard> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // Restore before the previous hook prints: the message would otherwise be written to
        // the alternate screen and vanish with it, and the shell left in raw mode. A panic
        // with `panic = "abort"` does not unwind, so the guard alone would not be enough.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
    extern "C" fn on_signal(_: libc::c_int) {
        // Only an atomic store: the one kind of work that is safe in a signal handler.
        STOP.store(true, Ordering::SeqCst);
    }
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value, and the handler
        // is an `extern "C" fn(c_int)` that only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // Marked (and the guard made) before the first change, so a failure half-way through
    // still undoes what was done.
    TERMINAL_TAKEN.store(true, Ordering::SeqCst);
    let guard = TerminalGuard;
    terminal::enable_raw_mode()?;
    execute!(
        std::io::stdout(),
        terminal::EnterAlternateScreen,
        cursor::Hide
    )?;
    Ok(guard)
}

/// What the interactive view holds between frames.
struct Screen {
    prev: Option<Snapshot>,
    cur: Snapshot,
    sort: SortKey,
    limit: usize,
    interval: Duration,
    /// The last poll's failure, shown until a poll succeeds again; the last good numbers
    /// stay on screen meanwhile.
    error: Option<String>,
}

impl Screen {
    fn update(&mut self, polled: Result<Snapshot, Failure>) {
        match polled {
            Ok(s) => {
                self.prev = Some(std::mem::replace(&mut self.cur, s));
                self.error = None;
            }
            Err(f) => self.error = Some(f.message),
        }
    }
}

fn interactive(socket: &Path, args: &TopArgs, first: Snapshot) -> std::io::Result<()> {
    // Polls run on their own thread: an agent slow to answer (up to CALL_TIMEOUT) must not
    // stop `q` from working or the screen from redrawing.
    let (tx, rx) = mpsc::channel();
    let interval = args.interval;
    let socket: PathBuf = socket.to_path_buf();
    let mut next = first.at + interval;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            // A fixed schedule keeps the refresh steady; after a stall it restarts from now
            // rather than firing the missed polls back to back.
            next = (next + interval).max(Instant::now());
            if tx.send(poll(&socket)).is_err() {
                return;
            }
        }
    });

    let mut screen = Screen {
        prev: None,
        cur: first,
        sort: SortKey::Rate,
        limit: args.limit,
        interval,
        error: None,
    };
    let _guard = take_terminal()?;
    let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut dirty = true;
    loop {
        if STOP.load(Ordering::SeqCst) {
            return Ok(());
        }
        if dirty {
            term.draw(|f| draw(f, &screen))?;
            dirty = false;
        }
        // A short tick, so that keys, signals and new polls are seen within a tenth of a
        // second whatever the interval.
        match event::poll(Duration::from_millis(100)) {
            Ok(true) => match event::read()? {
                Event::Key(k) if k.kind == KeyEventKind::Press => {
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        // Raw mode turns Ctrl-C into a key instead of SIGINT.
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(());
                        }
                        KeyCode::Char('s') => screen.sort = screen.sort.next(),
                        _ => {}
                    }
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            },
            Ok(false) => {}
            // A signal can interrupt the wait; that is the way out, not an error.
            Err(_) if STOP.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => return Err(e),
        }
        loop {
            match rx.try_recv() {
                Ok(polled) => {
                    screen.update(polled);
                    dirty = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(std::io::Error::other("the polling thread stopped"));
                }
            }
        }
    }
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn draw(f: &mut Frame, screen: &Screen) {
    let v = view(screen.prev.as_ref(), &screen.cur, screen.sort);
    let status = &screen.cur.status;
    let gpus = status["gpu"]["readings"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let header = header_lines(status);
    let shown = limited(&v.identities, screen.limit);
    let drops = drop_lines(&v, status);
    // Two lines of border around each panel.
    let header_h = (header.len() + gpus.len() + 2) as u16;
    let bottom_h = (v.endpoints.len().max(drops.len().saturating_sub(1)) + 3) as u16;
    let [top, middle, bottom, hints] = Layout::vertical([
        Constraint::Length(header_h),
        Constraint::Min(4),
        Constraint::Length(bottom_h.min(14)),
        Constraint::Length(1),
    ])
    .areas(f.area());

    draw_header(f, top, status, &header, gpus);
    draw_identities(f, middle, screen, shown, v.identities.len());

    let [endpoints, drops_area] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(bottom);
    draw_endpoints(f, endpoints, &v.endpoints);
    f.render_widget(
        Paragraph::new(drops.into_iter().map(Line::from).collect::<Vec<_>>())
            .block(Block::bordered().title(" drops ")),
        drops_area,
    );

    let mut hint = vec![
        Span::styled(" q", bold()),
        Span::raw(" quit  "),
        Span::styled("s", bold()),
        Span::raw(format!(" sort ({})  ", screen.sort.label())),
        Span::raw(format!("every {:.1} s", screen.interval.as_secs_f64())),
    ];
    if let Some(e) = &screen.error {
        hint.push(Span::styled(
            format!("  last poll failed: {}", clean(e)),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    }
    f.render_widget(Paragraph::new(Line::from(hint)), hints);
}

fn draw_header(f: &mut Frame, area: Rect, status: &Value, lines: &[String], gpus: &[Value]) {
    let block = Block::bordered().title(format!(" tollgate {} ", text(&status["version"])));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let mut constraints = vec![Constraint::Length(lines.len() as u16)];
    constraints.extend(gpus.iter().map(|_| Constraint::Length(1)));
    let rows = Layout::vertical(constraints).split(inner);
    let mut text_lines: Vec<Line> = lines.iter().map(|l| Line::from(l.as_str())).collect();
    if !status["gpu"]["error"].is_null() {
        text_lines[1] = Line::styled(lines[1].as_str(), Style::default().fg(Color::Red));
    }
    if status["gpu"]["saturated_endpoints"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        text_lines[2] = Line::styled(lines[2].as_str(), Style::default().fg(Color::Yellow));
    }
    f.render_widget(Paragraph::new(text_lines), rows[0]);
    for (r, area) in gpus.iter().zip(rows.iter().skip(1)) {
        let util = r["utilization"].as_f64().unwrap_or(0.0).clamp(0.0, 1.0);
        // Colour only, at fixed marks: whether an endpoint is saturated is the agent's call
        // (its `saturate_at`), shown on the line above, not guessed here.
        let colour = if util >= 0.9 {
            Color::Red
        } else if util >= 0.7 {
            Color::Yellow
        } else {
            Color::Green
        };
        f.render_widget(
            LineGauge::default()
                .ratio(util)
                .label(gpu_label(r))
                .filled_style(Style::default().fg(colour))
                .unfilled_style(Style::default().fg(Color::DarkGray)),
            *area,
        );
    }
}

/// Numbers are right-aligned, so that magnitudes line up digit under digit.
fn num(s: String) -> Cell<'static> {
    Cell::from(Line::from(s).right_aligned())
}

fn num_header(label: &'static str) -> Cell<'static> {
    Cell::from(Line::from(label).right_aligned())
}

fn draw_identities(f: &mut Frame, area: Rect, screen: &Screen, shown: &[RateRow], all: usize) {
    // The sorted column's header is shown reversed, so the sort is visible where one looks
    // (a marker character would not fit the narrow columns). Sorting by rate lights both
    // rate columns: it is their sum.
    let col = |label: &'static str, keys: &[SortKey], numeric: bool| {
        let cell = if numeric {
            num_header(label)
        } else {
            Cell::from(label)
        };
        if keys.contains(&screen.sort) {
            cell.style(Style::default().add_modifier(Modifier::REVERSED))
        } else {
            cell
        }
    };
    let header = Row::new(vec![
        col("NAME", &[SortKey::Name], false),
        col("CLASS", &[], false),
        col("PLAN", &[], false),
        col("PASS/S", &[SortKey::Pass, SortKey::Rate], true),
        col("DROP/S", &[SortKey::Drop, SortKey::Rate], true),
        col("PASSED", &[SortKey::Passed], true),
        col("DROPPED", &[SortKey::Dropped], true),
        col("Q", &[], false),
    ])
    .style(bold());
    let rows = shown.iter().map(|r| {
        let quarantined = !r.raw["quarantined"].is_null();
        let row = Row::new(vec![
            Cell::from(clean(&r.name)),
            Cell::from(text(&r.raw["class"])),
            Cell::from(text(&r.raw["plan"])),
            num(fmt_rate(r.pass_per_s)),
            num(fmt_rate(r.drop_per_s)),
            num(fmt_count(r.passed)),
            num(fmt_count(r.dropped)),
            Cell::from(if quarantined { "Q" } else { "" }),
        ]);
        if quarantined {
            row.style(Style::default().fg(Color::Red))
        } else {
            row
        }
    });
    let title = if shown.len() < all {
        format!(
            " identities: {} of {all}, by {} ",
            shown.len(),
            screen.sort.label()
        )
    } else {
        format!(" identities: {all}, by {} ", screen.sort.label())
    };
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Min(14),
                Constraint::Length(9),
                Constraint::Length(12),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(1),
            ],
        )
        .header(header)
        .block(Block::bordered().title(title)),
        area,
    );
}

fn draw_endpoints(f: &mut Frame, area: Rect, rows: &[RateRow]) {
    let header = Row::new([
        Cell::from("NAME"),
        Cell::from("PROTO/PORTS"),
        num_header("PASS/S"),
        num_header("DROP/S"),
        num_header("PASSED"),
        num_header("DROPPED"),
    ])
    .style(bold());
    // Port lists are short and the whole point of the column: size it to fit them, and let
    // the name take what is left.
    let ports_w = rows
        .iter()
        .map(|r| proto_ports(&r.raw).chars().count())
        .chain(["PROTO/PORTS".len()])
        .max()
        .unwrap_or(0) as u16;
    let rows = rows.iter().map(|r| {
        Row::new(vec![
            Cell::from(clean(&r.name)),
            Cell::from(proto_ports(&r.raw)),
            num(fmt_rate(r.pass_per_s)),
            num(fmt_rate(r.drop_per_s)),
            num(fmt_count(r.passed)),
            num(fmt_count(r.dropped)),
        ])
    });
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Min(8),
                Constraint::Length(ports_w),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(7),
            ],
        )
        .header(header)
        .block(Block::bordered().title(" endpoints ")),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(name: &str, passed: u64, dropped: u64) -> Value {
        json!({
            "id": 1, "name": name, "class": "partner", "plan": "partner", "roles": [],
            "bindings": ["198.19.7.0/24"], "quarantined": null,
            "passed_packets": passed, "passed_bytes": passed * 100,
            "dropped_packets": dropped, "dropped_bytes": dropped * 100,
        })
    }

    fn endpoint(name: &str, passed: u64, dropped: u64) -> Value {
        json!({
            "id": 1, "name": name, "protocol": "tcp", "ports": ["8000", "8001-8003"],
            "weight": 1, "classes": ["internal"], "roles": [], "anonymous": false,
            "packets_passed": passed, "packets_dropped": dropped,
        })
    }

    fn status(passed: u64, dropped: u64, expired: u64) -> Value {
        json!({
            "version": "0.1.0", "interfaces": ["eth0"], "uptime_s": 90_061, "bindings": 3,
            "quarantined": [], "packets_passed": passed, "packets_dropped": dropped,
            "anomaly_mode": "observe",
            "gpu": {
                "source": "simulated", "error": null, "saturated_endpoints": ["model"],
                "readings": [{"index": 0, "name": "H100", "utilization": 0.875,
                    "memory_used_bytes": 40u64 << 30, "memory_total_bytes": 80u64 << 30,
                    "power_watts": 550.0}],
            },
            "tokens": {"keys": ["k1"], "verifications": {"ok": 10, "expired": expired},
                "probable_thefts": 0},
        })
    }

    fn snap(at: Instant, status: Value, identities: Vec<Value>, endpoints: Vec<Value>) -> Snapshot {
        Snapshot {
            at,
            unix_ms: 1_700_000_000_000,
            status,
            endpoints: json!(endpoints),
            identities: json!(identities),
        }
    }

    /// Two polls 2 s apart: "busy" passed 2000 and dropped 10 in between, "idle" nothing,
    /// "new" appeared between them, "reset" had its counters re-created.
    fn two_polls() -> (Snapshot, Snapshot) {
        let t0 = Instant::now();
        let a = snap(
            t0,
            status(1000, 100, 1),
            vec![
                identity("idle", 5, 0),
                identity("busy", 1000, 0),
                identity("reset", 900, 0),
            ],
            vec![endpoint("model", 1000, 100)],
        );
        let b = snap(
            t0 + Duration::from_secs(2),
            status(3000, 110, 5),
            vec![
                identity("idle", 5, 0),
                identity("busy", 3000, 10),
                identity("reset", 4, 0),
                identity("new", 50, 0),
            ],
            vec![endpoint("model", 3000, 110)],
        );
        (a, b)
    }

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

    #[test]
    fn rows_match_by_name_not_position() {
        let prev = json!([identity("a", 10, 0), identity("b", 100, 0)]);
        let cur = json!([identity("b", 110, 0), identity("a", 30, 0)]);
        let rows = rate_rows(
            Some(&prev),
            &cur,
            Some(1.0),
            "passed_packets",
            "dropped_packets",
        );
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
        assert_eq!(j["status"], b.status);
        let ids = j["identities"].as_array().unwrap();
        assert_eq!(ids.len(), 2, "limit applies");
        assert_eq!(ids[0]["name"], "busy");
        assert_eq!(ids[0]["pass_per_s"], 1000.0);
        assert_eq!(ids[0]["drop_per_s"], 5.0);
        // The agent's fields are all still there.
        assert_eq!(ids[0]["passed_bytes"], 300_000);
        assert_eq!(ids[0]["bindings"], json!(["198.19.7.0/24"]));
        assert_eq!(ids[1]["name"], "idle");
        assert_eq!(ids[1]["pass_per_s"], 0.0);
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
        b.identities[0]["name"] = json!("evil\u{1b}[2J");
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
                "busy", "partner", "partner", "1000.0", "5.0", "3000", "10", "-"
            ]
        );
        assert!(t.contains("model     tcp/8000,8001-8003  1000.0  5.0"));
        assert!(t.contains("dropped/s 5.0  (total 110)"));
        assert!(t.contains("  expired  5  2.0"));
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_rate(None), "-");
        assert_eq!(fmt_rate(Some(12.34)), "12.3");
        assert_eq!(fmt_rate(Some(4567.0)), "4567.0");
        assert_eq!(fmt_rate(Some(99_999.96)), "100.0k");
        assert_eq!(fmt_rate(Some(123_456.0)), "123.5k");
        assert_eq!(fmt_count(99_999), "99999");
        assert_eq!(fmt_count(1_234_567), "1.2M");
        assert_eq!(fmt_uptime(59), "00:00:59");
        assert_eq!(fmt_uptime(90_061), "1d 01:01:01");
        assert_eq!(clean("a\tb\u{7}c"), "a?b?c");
    }

    /// The whole screen, drawn into ratatui's test backend: every panel is there, the sort
    /// marker moves with `s`, and a failed poll is shown without losing the numbers.
    #[test]
    fn screen_draws() {
        let (a, b) = two_polls();
        let mut screen = Screen {
            prev: Some(a),
            cur: b,
            sort: SortKey::Rate,
            limit: 0,
            interval: Duration::from_secs(1),
            error: None,
        };
        let render = |screen: &Screen| {
            let mut term = Terminal::new(ratatui::backend::TestBackend::new(110, 30)).unwrap();
            term.draw(|f| draw(f, screen)).unwrap();
            let buf = term.backend().buffer().clone();
            (0..buf.area.height)
                .map(|y| {
                    (0..buf.area.width)
                        .map(|x| buf[(x, y)].symbol())
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let out = render(&screen);
        for want in [
            "interfaces eth0",
            "GPU0 H100",
            "identities: 4, by rate",
            "busy",
            "1000.0",
            "endpoints",
            "tcp/8000,8001-8003",
            "drops",
            "expired  5  2.0",
            "sort (rate)",
        ] {
            assert!(out.contains(want), "{want:?} missing from\n{out}");
        }
        screen.sort = screen.sort.next();
        screen.update(Err(Failure {
            code: exit::NO_AGENT,
            message: "no agent is listening on /x".into(),
        }));
        let out = render(&screen);
        assert!(out.contains("identities: 4, by pass/s"), "{out}");
        assert!(out.contains("last poll failed: no agent is listening on /x"));
        assert!(out.contains("busy"), "the last numbers stay");
    }
}
