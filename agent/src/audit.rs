//! The audit log: one JSON line per change of state, saying who (by peer credentials), what
//! and why. Appended to `audit.log` in the state directory and synced, so an accepted change
//! is on disk before the caller hears it was made.
//!
//! Refusals (bad tokens, refused reloads) are not changes of state, and anyone who can reach
//! the bind listener can cause them: they are written (unsynced) at most
//! [`REFUSALS_PER_LABEL`] a second for one action and reason and [`REFUSALS_PER_SECOND`] in
//! all; the rest are counted and summed up in one `refusals_suppressed` line per second that
//! had any. The file is bounded: past [`MAX_BYTES`] it is renamed to `audit.log.1` (replacing
//! the previous one) and a new one begun, so the log holds at most twice that.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::Serialize;

use crate::state::QuarantineOwner;

pub const AUDIT_FILE: &str = "audit.log";
/// Where a full audit log goes when a new one is begun.
pub const ROTATED_FILE: &str = "audit.log.1";
/// The size at which the log is rotated.
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Refusal lines written in one second, in all and for one (action, reason).
pub const REFUSALS_PER_SECOND: u32 = 32;
pub const REFUSALS_PER_LABEL: u32 = 5;

/// Who asked for a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Actor {
    /// `control` (the socket), `signal`, `agent` (its own decisions: expiry, start-up).
    pub via: &'static str,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Actor {
    pub const AGENT: Actor = Actor {
        via: "agent",
        uid: None,
        gid: None,
        pid: None,
    };
    /// A change another node of the pool made, installed here (`fleet::install`).
    pub const FLEET: Actor = Actor {
        via: "fleet",
        uid: None,
        gid: None,
        pid: None,
    };
    pub const SIGNAL: Actor = Actor {
        via: "signal",
        uid: None,
        gid: None,
        pid: None,
    };

    pub fn describe(&self) -> String {
        match (self.uid, self.pid) {
            (Some(u), Some(p)) => format!("uid {u} (pid {p}) via {}", self.via),
            (Some(u), None) => format!("uid {u} via {}", self.via),
            _ => self.via.to_owned(),
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time_unix_ms: u64,
    who: &'a Actor,
    action: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    detail: &'a serde_json::Value,
}

pub struct Audit {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<Log>,
    /// Refusals counted but not written, ever (for `/metrics`).
    suppressed_total: std::sync::atomic::AtomicU64,
}

struct Log {
    file: std::fs::File,
    bytes: u64,
    window: Window,
}

/// The current second of refusal records.
#[derive(Default)]
struct Window {
    start_ms: u64,
    written: u32,
    by_label: std::collections::BTreeMap<String, u32>,
    suppressed: std::collections::BTreeMap<String, u64>,
}

impl Audit {
    pub fn open(state_dir: &Path) -> std::io::Result<Audit> {
        Audit::open_bounded(state_dir, MAX_BYTES)
    }

    /// An audit log rotated at `max_bytes`.
    pub fn open_bounded(state_dir: &Path, max_bytes: u64) -> std::io::Result<Audit> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(AUDIT_FILE);
        let file = open_append(&path)?;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Audit {
            path,
            max_bytes,
            file: Mutex::new(Log {
                file,
                bytes,
                window: Window::default(),
            }),
            suppressed_total: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refusals not written one line each since the start (each is in a summary line).
    pub fn suppressed_refusals(&self) -> u64 {
        self.suppressed_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends one line and syncs it. A failure to audit is returned: the caller must not
    /// report success for a change it could not record.
    pub fn record(
        &self,
        who: &Actor,
        action: &str,
        reason: &str,
        detail: serde_json::Value,
    ) -> std::io::Result<()> {
        let text = encode(who, action, reason, &detail)?;
        let mut log = self.lock();
        self.append(&mut log, &text)?;
        log.file.sync_data()?;
        tracing::info!(target: "audit", action, reason, who = %who.describe(), "{detail}");
        Ok(())
    }

    /// Records a refusal, within the rate limit: returns whether a line was written. Refusal
    /// lines are not synced (they record no change).
    pub fn record_refusal(
        &self,
        who: &Actor,
        action: &str,
        reason: &str,
        detail: serde_json::Value,
    ) -> std::io::Result<bool> {
        let now = crate::state::now_unix_ms();
        let mut log = self.lock();
        self.roll_window(&mut log, now)?;
        let label = format!("{action}/{reason}");
        let w = &mut log.window;
        let n = w.by_label.entry(label.clone()).or_default();
        if w.written >= REFUSALS_PER_SECOND || *n >= REFUSALS_PER_LABEL {
            *w.suppressed.entry(label).or_default() += 1;
            self.suppressed_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(false);
        }
        *n += 1;
        w.written += 1;
        let text = encode(who, action, reason, &detail)?;
        self.append(&mut log, &text)?;
        tracing::info!(target: "audit", action, reason, who = %who.describe(), "{detail}");
        Ok(true)
    }

    /// Writes the summary of the refusals suppressed in a second that has ended (called
    /// once a second; a refusal in a new second does it too).
    pub fn flush_suppressed(&self) -> std::io::Result<()> {
        let now = crate::state::now_unix_ms();
        let mut log = self.lock();
        self.roll_window(&mut log, now)
    }

    /// Starts a new window if `now` is past the current one, writing its summary first.
    fn roll_window(&self, log: &mut Log, now: u64) -> std::io::Result<()> {
        if now < log.window.start_ms.saturating_add(1000) && now >= log.window.start_ms {
            return Ok(());
        }
        let old = std::mem::take(&mut log.window);
        log.window.start_ms = now;
        if old.suppressed.is_empty() {
            return Ok(());
        }
        let count: u64 = old.suppressed.values().sum();
        let detail = serde_json::json!({
            "count": count,
            "since_unix_ms": old.start_ms,
            "by": old.suppressed,
        });
        let text = encode(&Actor::AGENT, "refusals_suppressed", "rate limit", &detail)?;
        self.append(log, &text)?;
        tracing::info!(target: "audit", count, "refusals suppressed: {detail}");
        Ok(())
    }

    /// Appends `text`, rotating first if it would take the file past its bound.
    fn append(&self, log: &mut Log, text: &[u8]) -> std::io::Result<()> {
        if log.bytes + text.len() as u64 > self.max_bytes {
            // Truncated behind our back (logrotate's copytruncate)? Then there is room.
            log.bytes = log.file.metadata().map_or(log.bytes, |m| m.len());
        }
        if log.bytes > 0 && log.bytes + text.len() as u64 > self.max_bytes {
            let rotated = self.path.with_file_name(ROTATED_FILE);
            log.file.sync_data()?;
            std::fs::rename(&self.path, &rotated)?;
            log.file = open_append(&self.path)?;
            log.bytes = 0;
        }
        log.file.write_all(text)?;
        log.bytes += text.len() as u64;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn encode(
    who: &Actor,
    action: &str,
    reason: &str,
    detail: &serde_json::Value,
) -> std::io::Result<Vec<u8>> {
    let line = Line {
        time_unix_ms: crate::state::now_unix_ms(),
        who,
        action,
        reason,
        detail,
    };
    let mut text = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
    text.push(b'\n');
    Ok(text)
}

impl From<&Actor> for QuarantineOwner {
    /// An operator by peer credentials; an actor without them (`fleet`: a quarantine another
    /// node of the pool made) by its description.
    fn from(a: &Actor) -> QuarantineOwner {
        match a.uid {
            Some(uid) => QuarantineOwner::Operator {
                uid,
                gid: a.gid,
                pid: a.pid,
            },
            None => QuarantineOwner::Other(a.describe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_who_what_why() {
        let dir = std::env::temp_dir().join(format!("tollgate-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Audit::open(&dir).unwrap();
        let who = Actor {
            via: "control",
            uid: Some(0),
            gid: Some(0),
            pid: Some(42),
        };
        a.record(
            &who,
            "quarantine",
            "scraping",
            serde_json::json!({"identity": "x"}),
        )
        .unwrap();
        a.record(&Actor::AGENT, "release", "expired", serde_json::json!({}))
            .unwrap();
        let text = std::fs::read_to_string(a.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["who"]["uid"], 0);
        assert_eq!(lines[0]["action"], "quarantine");
        assert_eq!(lines[0]["reason"], "scraping");
        assert_eq!(lines[0]["detail"]["identity"], "x");
        assert_eq!(lines[1]["who"]["via"], "agent");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refusals_are_rate_limited_and_summed_up() {
        let dir = std::env::temp_dir().join(format!("tollgate-audit-rl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Audit::open(&dir).unwrap();
        let mut written = 0;
        for i in 0..200 {
            let reason = if i % 2 == 0 { "bad_base64" } else { "expired" };
            if a.record_refusal(
                &Actor::AGENT,
                "token_refused",
                reason,
                serde_json::json!({}),
            )
            .unwrap()
            {
                written += 1;
            }
        }
        assert!(written <= 2 * REFUSALS_PER_LABEL, "{written}");
        assert!(written >= 2, "the first of each kind is written");
        // A change of state is always written.
        a.record(&Actor::AGENT, "release", "expired", serde_json::json!({}))
            .unwrap();
        // The next second's first refusal writes the summary of this one.
        a.lock().window.start_ms -= 2000;
        a.flush_suppressed().unwrap();
        let text = std::fs::read_to_string(a.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), written as usize + 2, "{text}");
        let summary = lines.last().unwrap();
        assert_eq!(summary["action"], "refusals_suppressed");
        assert_eq!(summary["detail"]["count"], 200 - written as u64);
        assert_eq!(a.suppressed_refusals(), 200 - written as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_log_is_rotated_at_its_bound() {
        let dir = std::env::temp_dir().join(format!("tollgate-audit-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Audit::open_bounded(&dir, 1000).unwrap();
        for _ in 0..50 {
            a.record(&Actor::AGENT, "release", "expired", serde_json::json!({}))
                .unwrap();
        }
        let len = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
        assert!(len(AUDIT_FILE) <= 1000 && len(ROTATED_FILE) <= 1000);
        assert!(
            len(ROTATED_FILE) > 500,
            "the rotated file holds the older lines"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
