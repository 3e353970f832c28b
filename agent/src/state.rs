//! What the agent must not lose across restarts, kept in the state directory: which identity
//! name owns which kernel slot, bindings made at run time, quarantines. Written atomically
//! (temporary file, fsync, rename, fsync of the directory) so a crash leaves the old or the
//! new file, never half of one.

use std::{
    collections::BTreeMap,
    fmt,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, Serialize};

/// Writes `dir/name` so that a crash leaves the old or the new file, never half of one:
/// a temporary file, fsync, rename, fsync of the directory. The error names the path.
pub fn write_atomically(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), (PathBuf, std::io::Error)> {
    std::fs::create_dir_all(dir).map_err(|e| (dir.to_owned(), e))?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let at = |p: &Path| {
        let p = p.to_owned();
        move |e| (p, e)
    };
    {
        let mut f = std::fs::File::create(&tmp).map_err(at(&tmp))?;
        f.write_all(bytes).map_err(at(&tmp))?;
        f.sync_all().map_err(at(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(at(&path))?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at(dir))
}

/// Format version of `state.json`.
pub const STATE_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";

use crate::clock;

/// Agent time in milliseconds since the Unix epoch: the boot clock, anchored to the wall
/// clock once (see [`clock`]). Every deadline in the state is on this clock; a wall-clock
/// step does not move it. Token times (`exp`, `iat`, `nbf`) use [`clock::wall_ms`].
pub fn now_unix_ms() -> u64 {
    clock::now_ms()
}

/// A binding made at run time (CLI, tokens), as opposed to the config's static ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DynBinding {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub identity: String,
    /// Wall-clock expiry; `None` never expires.
    pub expires_unix_ms: Option<u64>,
    pub created_unix_ms: u64,
    pub by: String,
    /// The token (`jti`) that made it, for revocation and replay detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

impl DynBinding {
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_unix_ms.is_some_and(|e| e <= now_ms)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// `None`: until released.
    pub until_unix_ms: Option<u64>,
    pub since_unix_ms: u64,
    pub reason: String,
    /// Who put it there. `state.json` files that hold the old description strings
    /// ("controller", "uid 0 (pid 42) via control") still load.
    pub by: QuarantineOwner,
}

/// Who put an identity in quarantine.
///
/// Serialised as `"controller"` or `{"operator": {"uid": 0, "gid": 0, "pid": 42}}`; the
/// description strings state files used to hold (`"controller"`, `"uid 0 (pid 42) via
/// control"`) are read as well.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuarantineOwner {
    /// An operator on the control socket, by peer credentials.
    Operator {
        uid: u32,
        gid: Option<u32>,
        pid: Option<i32>,
    },
    /// The controller's anomaly ladder.
    Controller,
    /// A description this agent does not recognise (from an older state file), kept as it was.
    Other(String),
}

impl QuarantineOwner {
    /// The description older agents wrote (`Actor::describe` of the operator).
    pub fn from_description(s: &str) -> QuarantineOwner {
        if s == "controller" {
            return QuarantineOwner::Controller;
        }
        let parse = || -> Option<QuarantineOwner> {
            let rest = s.strip_prefix("uid ")?.strip_suffix(" via control")?;
            let (uid, pid) = match rest.split_once(" (pid ") {
                Some((u, p)) => (u, Some(p.strip_suffix(')')?.parse().ok()?)),
                None => (rest, None),
            };
            Some(QuarantineOwner::Operator {
                uid: uid.parse().ok()?,
                gid: None,
                pid,
            })
        };
        parse().unwrap_or_else(|| QuarantineOwner::Other(s.to_owned()))
    }
}

impl fmt::Display for QuarantineOwner {
    /// The words older agents stored: "controller", "uid 0 (pid 42) via control".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuarantineOwner::Operator {
                uid, pid: Some(p), ..
            } => write!(f, "uid {uid} (pid {p}) via control"),
            QuarantineOwner::Operator { uid, pid: None, .. } => write!(f, "uid {uid} via control"),
            QuarantineOwner::Controller => f.write_str("controller"),
            QuarantineOwner::Other(s) => f.write_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for QuarantineOwner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Tagged {
            Operator {
                uid: u32,
                #[serde(default)]
                gid: Option<u32>,
                #[serde(default)]
                pid: Option<i32>,
            },
            Controller,
            Other(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Tagged(Tagged),
            Text(String),
        }
        Ok(match Wire::deserialize(d)? {
            Wire::Tagged(Tagged::Operator { uid, gid, pid }) => {
                QuarantineOwner::Operator { uid, gid, pid }
            }
            Wire::Tagged(Tagged::Controller) => QuarantineOwner::Controller,
            Wire::Tagged(Tagged::Other(s)) => QuarantineOwner::Other(s),
            Wire::Text(s) => QuarantineOwner::from_description(&s),
        })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Identity name -> kernel slot.
    pub identity_ids: BTreeMap<String, u32>,
    pub bindings: Vec<DynBinding>,
    /// Identity name -> quarantine.
    pub quarantines: BTreeMap<String, Quarantine>,
    /// Identities that exist because a token named them (not in the configuration).
    #[serde(default)]
    pub token_identities: BTreeMap<String, TokenIdentity>,
    /// Revoked token ids -> when the token expires anyway (then the entry can go).
    #[serde(default)]
    pub revoked_tokens: BTreeMap<String, u64>,
    /// Identity name -> revocation cut-off (ms): tokens of that identity issued (`iat`) at or
    /// before it are refused. The cut-off is the revocation time plus `tokens.clock_skew_s`,
    /// so a token stamped by an issuer whose clock runs ahead is covered too.
    #[serde(default)]
    pub revoked_identities: BTreeMap<String, u64>,
    /// The deadline clock's anchor when the file was written (written by [`State::save`];
    /// files without one load, and take a fresh anchor).
    #[serde(default, skip_serializing)]
    pub clock: Option<clock::Anchor>,
    /// Cache of the slots in `identity_ids` (not persisted).
    #[serde(skip)]
    used_ids: std::collections::BTreeSet<u32>,
    #[serde(skip)]
    free_hint: u32,
}

impl PartialEq for State {
    /// What is persisted; the slot cache is not part of the state.
    fn eq(&self, o: &State) -> bool {
        self.version == o.version
            && self.identity_ids == o.identity_ids
            && self.bindings == o.bindings
            && self.quarantines == o.quarantines
            && self.token_identities == o.token_identities
            && self.revoked_tokens == o.revoked_tokens
            && self.revoked_identities == o.revoked_identities
    }
}

impl Eq for State {}

/// What a token said about an identity the configuration does not know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIdentity {
    pub class: String,
    pub plan: String,
    pub roles: Vec<String>,
    /// The latest expiry of a token seen for it (ms); the slot is freed after it.
    pub expires_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error(
        "{path}: {message} (the file is left as it is; move it away to start with empty state)"
    )]
    Corrupt { path: String, message: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> StateError {
    StateError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads the state; a missing file is an empty state, an unreadable one an error (never
    /// silently replaced: it holds bindings and quarantines someone made).
    pub fn load(dir: &Path) -> Result<State, StateError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: STATE_VERSION,
                    ..State::default()
                });
            }
            Err(e) => return Err(io(&path, e)),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path: path.display().to_string(),
                message: format!(
                    "state format version {}, this build reads version {STATE_VERSION}",
                    state.version
                ),
            });
        }
        // Same boot: keep the clock the deadlines were written on. Older files have none.
        if let Some(a) = &state.clock {
            clock::adopt(a);
        }
        Ok(state)
    }

    /// Writes the state atomically, with the deadline clock's anchor.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let mut value = serde_json::to_value(self).map_err(|e| io(&Self::path(dir), e))?;
        if let (Some(o), Ok(a)) = (value.as_object_mut(), serde_json::to_value(clock::anchor())) {
            o.insert("clock".into(), a);
        }
        let text = serde_json::to_vec_pretty(&value).map_err(|e| io(&Self::path(dir), e))?;
        write_atomically(dir, STATE_FILE, &text).map_err(|(p, e)| io(&p, e))
    }

    /// The slot of `name`, allocating the lowest free one (1-based) if it has none.
    pub fn identity_id(&mut self, name: &str, max: u32) -> Option<u32> {
        if let Some(id) = self.identity_ids.get(name) {
            return Some(*id);
        }
        // The used set is rebuilt only when the map changed behind its back (removals,
        // loading): allocating 10 000 identities stays linear, not quadratic.
        if self.used_ids.len() != self.identity_ids.len() {
            self.used_ids = self.identity_ids.values().copied().collect();
            self.free_hint = 1;
        }
        let start = self.free_hint.max(1);
        let id = (start..max).find(|i| !self.used_ids.contains(i))?;
        self.identity_ids.insert(name.to_owned(), id);
        self.used_ids.insert(id);
        self.free_hint = id + 1;
        Some(id)
    }

    /// Whether `name` is quarantined at `now_ms`.
    pub fn quarantined(&self, name: &str, now_ms: u64) -> bool {
        self.quarantines
            .get(name)
            .is_some_and(|q| q.until_unix_ms.is_none_or(|u| u > now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tollgate-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_clock_anchor_is_saved_with_the_boot_id_and_files_without_one_load() {
        let d = tmpdir("clock");
        let st = State {
            version: STATE_VERSION,
            ..State::default()
        };
        st.save(&d).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(v["clock"]["boot_id"], clock::boot_id());
        let back = State::load(&d).unwrap();
        assert_eq!(
            back.clock.as_ref().map(|a| &a.boot_id),
            Some(&clock::boot_id())
        );
        assert_eq!(back, st);
        // An older file, without the anchor, still loads.
        std::fs::write(
            d.join(STATE_FILE),
            r#"{"version":1,"identity_ids":{},"bindings":[],"quarantines":{}}"#,
        )
        .unwrap();
        assert_eq!(State::load(&d).unwrap().clock, None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tmpdir("rt");
        assert_eq!(State::load(&dir).unwrap().identity_ids.len(), 0);
        let mut s = State::load(&dir).unwrap();
        assert_eq!(s.identity_id("a", 10), Some(1));
        assert_eq!(s.identity_id("b", 10), Some(2));
        assert_eq!(s.identity_id("a", 10), Some(1));
        s.quarantines.insert(
            "b".into(),
            Quarantine {
                until_unix_ms: Some(10),
                since_unix_ms: 1,
                reason: "test".into(),
                by: QuarantineOwner::Operator {
                    uid: 0,
                    gid: Some(0),
                    pid: Some(42),
                },
            },
        );
        s.save(&dir).unwrap();
        let back = State::load(&dir).unwrap();
        assert_eq!(back, s);
        assert!(back.quarantined("b", 9));
        assert!(!back.quarantined("b", 10));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quarantine_owners_written_as_strings_still_load() {
        let dir = tmpdir("owners");
        std::fs::create_dir_all(&dir).unwrap();
        let old = r#"{"version":VERSION,"identity_ids":{"a":1,"b":2},"bindings":[],
            "quarantines":{
              "a":{"until_unix_ms":null,"since_unix_ms":1,"reason":"x","by":"uid 0 (pid 42) via control"},
              "b":{"until_unix_ms":5,"since_unix_ms":1,"reason":"anomaly","by":"controller"}}}"#
            .replace("VERSION", &STATE_VERSION.to_string());
        std::fs::write(State::path(&dir), old).unwrap();
        let s = State::load(&dir).unwrap();
        assert_eq!(
            s.quarantines["a"].by,
            QuarantineOwner::Operator {
                uid: 0,
                gid: None,
                pid: Some(42)
            }
        );
        assert_eq!(s.quarantines["b"].by, QuarantineOwner::Controller);
        assert_eq!(s.quarantines["b"].by.to_string(), "controller");
        // Saved in the typed form, and read back the same.
        s.save(&dir).unwrap();
        assert_eq!(State::load(&dir).unwrap(), s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn slots_are_reused_lowest_first_and_bounded() {
        let mut s = State::default();
        for n in ["a", "b", "c"] {
            s.identity_id(n, 4);
        }
        assert_eq!(s.identity_id("d", 4), None, "slots 1..3 are all taken");
        s.identity_ids.remove("b");
        assert_eq!(s.identity_id("d", 4), Some(2));
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_reset() {
        let dir = tmpdir("bad");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(State::path(&dir), b"{ not json").unwrap();
        let e = State::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("state.json") && e.contains("left as it is"),
            "{e}"
        );
        assert_eq!(std::fs::read(State::path(&dir)).unwrap(), b"{ not json");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
