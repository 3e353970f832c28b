//! The audit log: one JSON line per change of state, saying who (by peer credentials), what
//! and why. Appended to `audit.log` in the state directory and synced, so an accepted change
//! is on disk before the caller hears it was made.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::Serialize;

use crate::state::QuarantineOwner;

pub const AUDIT_FILE: &str = "audit.log";

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
    file: Mutex<std::fs::File>,
}

impl Audit {
    pub fn open(state_dir: &Path) -> std::io::Result<Audit> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(AUDIT_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(Audit {
            path,
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        let line = Line {
            time_unix_ms: crate::state::now_unix_ms(),
            who,
            action,
            reason,
            detail: &detail,
        };
        let mut text = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let mut f = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f.write_all(&text)?;
        f.sync_data()?;
        tracing::info!(target: "audit", action, reason, who = %who.describe(), "{detail}");
        Ok(())
    }
}

impl From<&Actor> for QuarantineOwner {
    /// An operator by peer credentials; an actor without them (never one that quarantines
    /// today) by its description.
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
}
