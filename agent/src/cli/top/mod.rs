//! `tollgate top`: a live view of a running agent.
//!
//! It is built only from the read requests the agent already answers (`status`, `endpoints`,
//! `identities`), so it needs nothing new from the agent and works against any agent that
//! answers `tollgate status`. The agent reports totals; rates are the difference between two
//! polls divided by the time measured between them (not the nominal interval: a slow answer
//! or a stalled poll must not inflate the rate).
//!
//! Four parts: [`model`] (the polls and what is computed from them: rates, sorting),
//! [`text`] (the `--once` snapshot as text or JSON, and the formatting both views share),
//! [`tui`] (the interactive terminal view), and [`input`] (the terminal under it: keys, a
//! terminal that went away, writes a signal can stop).

mod input;
mod model;
mod text;
mod tui;

#[cfg(test)]
pub(super) mod fixtures;

use std::{
    io::{IsTerminal as _, Write as _},
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tollgate::control::protocol::Request;

use self::model::Snapshot;
use super::{Ctx, Failure, Outcome, exit, request};

/// A live view of identities, endpoints, drops and GPU pressure (q quits, s sorts);
/// `--once` prints one snapshot (with `--output json` for scripts).
///
/// Per identity, RESP B/S (`response_bytes_per_s`) is the payload bytes sent back to it per
/// second, and TTFB MS (`ttfb_ms`) the mean time to first byte of the answers the kernel
/// measured between the two polls: the growth of its TTFB sum over the growth of its TTFB
/// count. `-` (null) when no answer was measured in the interval.
#[derive(clap::Args)]
pub struct TopArgs {
    /// Seconds between polls (rates are measured over the real time between them).
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print one snapshot (two polls `interval` apart) and exit: rates and `ttfb_ms` cover
    /// what happened between the two polls.
    #[arg(long)]
    once: bool,
    /// Identities shown at most (0: all).
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

/// What `tollgate top` was asked for, checked.
struct Settings {
    /// Time between polls; rates are measured over it.
    interval: Duration,
    /// Poll twice `interval` apart, print one snapshot, exit (no terminal needed).
    once: bool,
    /// With `once`: print JSON instead of a text table.
    json: bool,
    /// Most identities shown; 0 shows all.
    limit: usize,
}

/// Bound on one request. Shorter than the other verbs' 30 s: a view refreshed every second
/// that waits half a minute for one answer is showing nothing useful, and the interactive
/// view keeps drawing (and shows the error) while a poll waits.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `tollgate top`. Exit codes are the other verbs': 3 when no agent answers, 4 when the
/// socket is refused, 2 for a usage error (no terminal without `--once`, a zero interval).
pub fn run(a: TopArgs, ctx: &Ctx) -> Outcome {
    if !(a.interval.is_finite() && a.interval > 0.0) {
        return super::fail(
            exit::USAGE,
            "--interval must be a positive number of seconds",
        );
    }
    let args = Settings {
        interval: Duration::from_secs_f64(a.interval),
        once: a.once,
        json: ctx.json(),
        limit: a.limit,
    };
    let socket = ctx.socket.as_path();
    if args.interval.is_zero() {
        return super::fail(exit::USAGE, "--interval must be more than 0");
    }
    if !args.once && !std::io::stdout().is_terminal() {
        return super::fail(
            exit::USAGE,
            "`tollgate top` draws on a terminal and stdout is not one; \
             use `tollgate top --once` (with `--output json` for scripts)",
        );
    }
    // The first poll happens before the terminal is taken over, so that "no agent" and
    // "permission denied" are printed and exit 3/4 exactly as for `tollgate status`.
    let first = poll(socket)?;
    if args.once {
        return once(socket, &args, first);
    }
    tui::interactive(socket, args.interval, args.limit, first)
        .map_err(|e| Failure::new(exit::FAILURE, format!("top: {e}")))
}

/// The three read requests, one after another.
fn poll(socket: &Path) -> Result<Snapshot, Failure> {
    let at = Instant::now();
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(Snapshot {
        at,
        unix_ms,
        status: request(socket, &Request::Status {}, CALL_TIMEOUT)?,
        endpoints: request(socket, &Request::Endpoints {}, CALL_TIMEOUT)?,
        identities: request(socket, &Request::Identities {}, CALL_TIMEOUT)?,
    })
}

/// `--once`: a second poll `interval` after the first, one snapshot printed.
fn once(socket: &Path, args: &Settings, first: Snapshot) -> Outcome {
    std::thread::sleep(args.interval);
    let second = poll(socket)?;
    if args.json {
        super::print::json(&text::snapshot_json(&first, &second, args.limit));
    } else {
        print!("{}", text::snapshot_text(&first, &second, args.limit));
        let _ = std::io::stdout().flush();
    }
    Ok(())
}
