//! `top`'s interactive view: the terminal taken over (and always given back), polls on
//! their own thread, and the screen drawn with ratatui.

use std::{
    path::{Path, PathBuf},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use ratatui::{
    Frame, Terminal,
    backend::CrosstermBackend,
    crossterm::{cursor, execute, queue, terminal},
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, LineGauge, Paragraph, Row, Table},
};
use tollgate::{
    control::reply::{EndpointRow, IdentityRow, Status},
    controller::gpu::GpuReading,
};

use super::{
    input::{self, Input, Key, Tty},
    model::{RateRow, Snapshot, SortKey, limited, view},
    poll,
    text::{
        clean, fmt_count, fmt_ms, fmt_rate, gpu_line, header_lines, proto_ports, reason_rows,
        refusal_lines, total_lines,
    },
};
use crate::cli::Failure;

/// Whether the terminal is in raw mode on the alternate screen, so that the guard, the panic
/// hook and a signal all restore it, and only the first of them does.
static TERMINAL_TAKEN: AtomicBool = AtomicBool::new(false);

/// Set by SIGTERM, SIGHUP and SIGINT: the loop sees it within one tick and leaves through
/// the guard, which restores the terminal (the default action would kill us with the
/// terminal left raw and on the alternate screen). A write the signal interrupts gives up
/// (see [`input::Screen`]), and [`watchdog`] ends the process if leaving takes longer.
pub(super) static STOP: AtomicBool = AtomicBool::new(false);

/// How long the way out may take after a signal before [`watchdog`] ends the process.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// How long restoring waits for the terminal to take its few bytes.
const RESTORE_WAIT: Duration = Duration::from_millis(200);

fn restore_terminal() {
    if TERMINAL_TAKEN.swap(false, Ordering::SeqCst) {
        // Terminal modes are set with an ioctl, which never waits for the output to drain.
        let _ = terminal::disable_raw_mode();
        // The screen and cursor are given back only if the terminal takes the bytes: one
        // that stopped reading (or went away) must not hold the process here.
        let mut bytes = Vec::new();
        let _ = queue!(bytes, terminal::LeaveAlternateScreen, cursor::Show);
        input::write_if_ready(&bytes, RESTORE_WAIT);
    }
}

/// Ends the process [`STOP_GRACE`] after a signal if the loop has not returned by then: a
/// signal that arrives just before a write starts does not interrupt it, and a terminal that
/// stopped reading would hold that write forever.
fn watchdog() {
    input::block_stop_signals_here();
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(STOP_GRACE);
    restore_terminal();
    // SAFETY: _exit ends the process without running anything else; nothing is left that
    // must be flushed (the screen is all `top` writes).
    unsafe { libc::_exit(0) };
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
            // No SA_RESTART: a blocked write or wait returns, so the loop sees STOP. Reset
            // to the default after the first: a second signal ends `top` at once.
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    static WATCHDOG: Once = Once::new();
    WATCHDOG.call_once(|| {
        std::thread::spawn(watchdog);
    });
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

/// Runs the view until `q`, Esc, Ctrl-C or a signal; `first` is the poll already made.
pub(super) fn interactive(
    socket: &Path,
    interval: Duration,
    limit: usize,
    first: Snapshot,
) -> std::io::Result<()> {
    // Polls run on their own thread: an agent slow to answer (up to CALL_TIMEOUT) must not
    // stop `q` from working or the screen from redrawing.
    let (tx, rx) = mpsc::channel();
    let socket: PathBuf = socket.to_path_buf();
    let mut next = first.at + interval;
    std::thread::spawn(move || {
        input::block_stop_signals_here();
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
        limit,
        interval,
        error: None,
    };
    let tty = Tty::open()?;
    let _guard = take_terminal()?;
    let mut term = Terminal::new(CrosstermBackend::new(std::io::BufWriter::new(
        input::Screen,
    )))?;
    let mut dirty = true;
    let mut size = tty.size();
    loop {
        if STOP.load(Ordering::SeqCst) {
            return Ok(());
        }
        if dirty {
            match term.draw(|f| draw(f, &screen)) {
                Ok(_) => dirty = false,
                // A signal stopped the write, or the terminal went away under it: both are
                // the way out, not an error to print on a terminal that is not there.
                Err(_) if STOP.load(Ordering::SeqCst) || tty.hung_up() => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // A short tick, so that keys, signals and new polls are seen within a tenth of a
        // second whatever the interval. Keys are read here, not by crossterm: see `input`.
        match tty.wait(Duration::from_millis(100))? {
            Input::Nothing => {}
            Input::Gone => return Ok(()),
            Input::Keys(keys) => {
                for k in keys {
                    match k {
                        Key::Quit => return Ok(()),
                        Key::Sort => screen.sort = screen.sort.next(),
                        Key::Other => {}
                    }
                }
                dirty = true;
            }
        }
        let now = tty.size();
        if now != size {
            size = now;
            dirty = true;
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
    let gpus = &status.gpu.readings;
    let header = header_lines(status);
    let shown = limited(&v.identities, screen.limit);
    let drops = Drops::of(&v, status);
    // Two lines of border around each panel; the endpoints table has a header line.
    let header_h = (header.len() + gpus.len() + 2) as u16;
    let bottom_h = (v.endpoints.len() + 3).max(drops.height() + 2) as u16;
    let [top, middle, bottom, hints] = Layout::vertical([
        Constraint::Length(header_h),
        Constraint::Min(4),
        Constraint::Length(bottom_h.min(18)),
        Constraint::Length(1),
    ])
    .areas(f.area());

    draw_header(f, top, status, &header, gpus);
    draw_identities(f, middle, screen, shown, v.identities.len());

    let [endpoints, drops_area] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(bottom);
    draw_endpoints(f, endpoints, &v.endpoints);
    drops.draw(f, drops_area);

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

/// The drops panel's parts: totals, drops by reason (a table, or the line said instead),
/// token refusals.
struct Drops {
    totals: Vec<String>,
    reasons: Result<Vec<Vec<String>>, &'static str>,
    refusals: Vec<String>,
}

impl Drops {
    fn of(v: &super::model::View, status: &Status) -> Drops {
        Drops {
            totals: total_lines(v, status),
            reasons: reason_rows(v),
            refusals: refusal_lines(v, status),
        }
    }

    /// Lines inside the border.
    fn reasons_height(&self) -> usize {
        self.reasons.as_ref().map_or(1, |r| r.len() + 1)
    }

    fn height(&self) -> usize {
        self.totals.len() + self.reasons_height() + self.refusals.len()
    }

    fn draw(self, f: &mut Frame, area: Rect) {
        let block = Block::bordered().title(" drops ");
        let inner = block.inner(area);
        f.render_widget(block, area);
        let [totals, reasons, refusals] = Layout::vertical([
            Constraint::Length(self.totals.len() as u16),
            Constraint::Length(self.reasons_height() as u16),
            Constraint::Min(0),
        ])
        .areas(inner);
        let lines =
            |l: Vec<String>| Paragraph::new(l.into_iter().map(Line::from).collect::<Vec<_>>());
        f.render_widget(lines(self.totals), totals);
        match self.reasons {
            Err(line) => f.render_widget(Paragraph::new(line), reasons),
            Ok(rows) => {
                // The reason labels are the point of the table: their column is as wide as
                // the longest, and the numbers keep their fixed width.
                let name_w = rows
                    .iter()
                    .map(|r| r[0].chars().count())
                    .chain(["NAME".len()])
                    .max()
                    .unwrap_or(0) as u16;
                let header = Row::new([
                    Cell::from("NAME"),
                    num_header("DROP/S"),
                    num_header("DROPPED"),
                ])
                .style(bold());
                let rows = rows.into_iter().map(|r| {
                    let mut r = r.into_iter();
                    let mut next = || r.next().unwrap_or_default();
                    Row::new([Cell::from(next()), num(next()), num(next())])
                });
                f.render_widget(
                    Table::new(
                        rows,
                        [
                            Constraint::Length(name_w),
                            Constraint::Length(7),
                            Constraint::Length(7),
                        ],
                    )
                    .header(header),
                    reasons,
                );
            }
        }
        f.render_widget(lines(self.refusals), refusals);
    }
}

fn draw_header(f: &mut Frame, area: Rect, status: &Status, lines: &[String], gpus: &[GpuReading]) {
    let block = Block::bordered().title(format!(" tollgate {} ", clean(&status.version)));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let mut constraints = vec![Constraint::Length(lines.len() as u16)];
    constraints.extend(gpus.iter().map(|_| Constraint::Length(1)));
    let rows = Layout::vertical(constraints).split(inner);
    let mut text_lines: Vec<Line> = lines.iter().map(|l| Line::from(l.as_str())).collect();
    if status.gpu.error.is_some() {
        text_lines[1] = Line::styled(lines[1].as_str(), Style::default().fg(Color::Red));
    }
    if !status.gpu.saturated_endpoints.is_empty() {
        text_lines[2] = Line::styled(lines[2].as_str(), Style::default().fg(Color::Yellow));
    }
    f.render_widget(Paragraph::new(text_lines), rows[0]);
    for (r, area) in gpus.iter().zip(rows.iter().skip(1)) {
        let util = r.utilization.clamp(0.0, 1.0);
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
                .label(gpu_line(r))
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

fn draw_identities(
    f: &mut Frame,
    area: Rect,
    screen: &Screen,
    shown: &[RateRow<IdentityRow>],
    all: usize,
) {
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
        col("RESP B/S", &[], true),
        col("TTFB MS", &[], true),
        col("Q", &[], false),
    ])
    .style(bold());
    let rows = shown.iter().map(|r| {
        let quarantined = r.row.quarantined.is_some();
        let row = Row::new(vec![
            Cell::from(clean(&r.name)),
            Cell::from(r.row.class.label()),
            Cell::from(clean(&r.row.plan)),
            num(fmt_rate(r.pass_per_s)),
            num(fmt_rate(r.drop_per_s)),
            num(fmt_count(r.passed)),
            num(fmt_count(r.dropped)),
            num(fmt_rate(r.response_per_s)),
            num(fmt_ms(r.ttfb_ms)),
            // Q: quarantined; R: held by a response cap of its plan; T, B, X: cut off by
            // its tokens, its budget, its byte or cost quota.
            Cell::from(if quarantined {
                "Q"
            } else if r.row.response_capped.is_some() {
                "R"
            } else {
                match r.row.quota_exhausted.as_deref() {
                    Some("token_quota_exhausted") => "T",
                    Some("budget_exhausted") => "B",
                    Some(_) => "X",
                    None => "",
                }
            }),
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
                Constraint::Length(8),
                Constraint::Length(7),
                Constraint::Length(1),
            ],
        )
        .header(header)
        .block(Block::bordered().title(title)),
        area,
    );
}

fn draw_endpoints(f: &mut Frame, area: Rect, rows: &[RateRow<EndpointRow>]) {
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
        .map(|r| proto_ports(&r.row).chars().count())
        .chain(["PROTO/PORTS".len()])
        .max()
        .unwrap_or(0) as u16;
    let rows = rows.iter().map(|r| {
        Row::new(vec![
            Cell::from(clean(&r.name)),
            Cell::from(proto_ports(&r.row)),
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
    use crate::cli::{exit, top::fixtures::*};

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
            "RESP B/S TTFB MS",
            "20000.0    52.5",
            "endpoints",
            "tcp/8000,8001-8003",
            "drops",
            "expired  5  2.0",
            "sort (rate)",
            // Drops by reason: NAME as wide as the longest label, then the two numbers.
            "NAME             DROP/S DROPPED",
            "quota_exhausted     4.5      98",
            "unbound             0.5      11",
        ] {
            assert!(out.contains(want), "{want:?} missing from\n{out}");
        }
        screen.sort = screen.sort.next();
        screen.update(Err(Failure::new(
            exit::NO_AGENT,
            "no agent is listening on /x",
        )));
        let out = render(&screen);
        assert!(out.contains("identities: 4, by pass/s"), "{out}");
        assert!(out.contains("last poll failed: no agent is listening on /x"));
        assert!(out.contains("busy"), "the last numbers stay");
    }
}
