//! What the agent must not lose across restarts, kept in the state directory: which identity
//! name owns which kernel slot, bindings made at run time, quarantines, revocations.
//!
//! Two files: `state.json`, a snapshot written atomically (temporary file, fsync, rename,
//! fsync of the directory) so a crash leaves the old or the new one, never half of one; and
//! `state.journal` beside it, the changes made since, one record each ([`journal`]). A change
//! is one appended record ([`State::record`]); loading is the snapshot plus the records it
//! does not hold yet; when the journal has grown as large as the snapshot (and at a clean
//! stop) both are folded into a new snapshot ([`State::save`]).

pub mod journal;

use std::{
    collections::BTreeMap,
    fmt,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, Serialize};
use tracing::warn;

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

/// Format version of `state.json` while a journal may follow it. Builds before the journal
/// read only version 1, so after a crash they refuse the file instead of starting without
/// the journal's records (and rewriting the snapshot over them).
pub const STATE_VERSION: u32 = 2;

/// The version a clean stop writes, the journal folded in and emptied: an older build, which
/// reads only `state.json`, finds everything in it. Both versions load here.
pub const STATE_VERSION_FOLDED: u32 = 1;
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
    /// The last journal record this state holds: the snapshot stores it, so a replay skips
    /// the records it already holds (a crash between a compaction's two steps leaves them).
    #[serde(default)]
    pub journal_seq: u64,
    /// Where the files on disk stand (not persisted).
    #[serde(skip)]
    disk: Disk,
    /// Cache of the slots in `identity_ids` (not persisted).
    #[serde(skip)]
    used_ids: std::collections::BTreeSet<u32>,
    #[serde(skip)]
    free_hint: u32,
    /// Fleet-wide plans' shares and quota tracks (not persisted: the store holds the pool's
    /// spend; a restarted node starts at the floor).
    #[serde(skip)]
    pub fleet: crate::fleet::global::Global,
}

/// What the state on disk lacks, and how big its two files are.
#[derive(Clone, Debug, Default)]
struct Disk {
    /// Changes the agent made itself (expiries) that no record holds yet: the next record
    /// carries them first, a snapshot makes them moot.
    unrecorded: Vec<journal::Entry>,
    /// The disk may lack more than records say (a snapshot that failed): the next change
    /// writes a whole snapshot.
    stale: bool,
    /// The journal may end in part of a record (a failed append that could not be cut off,
    /// a torn tail that could not be): nothing is appended until a snapshot empties it.
    damaged: bool,
    journal_bytes: u64,
    snapshot_bytes: u64,
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
        "{path}: {message} (the file is left as it is; move state.json and state.journal away \
         together to start with empty state)"
    )]
    Corrupt { path: String, message: String },
}

impl StateError {
    /// The file the error is about.
    pub fn path(&self) -> &str {
        match self {
            StateError::Io { path, .. } | StateError::Corrupt { path, .. } => path,
        }
    }
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
                return Self::load_missing(dir);
            }
            Err(e) => return Err(io(&path, e)),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        if state.version != STATE_VERSION && state.version != STATE_VERSION_FOLDED {
            return Err(StateError::Corrupt {
                path: path.display().to_string(),
                message: format!(
                    "state format version {}, this build reads versions \
                     {STATE_VERSION_FOLDED} and {STATE_VERSION}",
                    state.version
                ),
            });
        }
        // Same boot: keep the clock the deadlines were written on. Older files have none.
        if let Some(a) = &state.clock {
            clock::adopt(a);
        }
        let mut state = state;
        // In memory it is this build's state, whichever version the file was written as.
        state.version = STATE_VERSION;
        state.disk.snapshot_bytes = text.len() as u64;
        state.replay(dir, true)?;
        Ok(state)
    }

    /// The state as a start would load it, for a reader beside a running agent (a test, a
    /// backup check): a torn last record is left out but not cut off, and the process's
    /// clock is not touched.
    pub fn peek(dir: &Path) -> Result<State, StateError> {
        let path = Self::path(dir);
        let mut state = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
                path: path.display().to_string(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                version: STATE_VERSION,
                ..State::default()
            },
            Err(e) => return Err(io(&path, e)),
        };
        state.replay(dir, false)?;
        Ok(state)
    }

    /// Like [`State::load`] when the snapshot is missing: an empty state, plus the journal.
    fn load_missing(dir: &Path) -> Result<State, StateError> {
        let mut state = State {
            version: STATE_VERSION,
            ..State::default()
        };
        state.replay(dir, true)?;
        Ok(state)
    }

    /// Applies the journal's records after the snapshot's; cuts off a torn last record if
    /// `repair`.
    fn replay(&mut self, dir: &Path, repair: bool) -> Result<(), StateError> {
        let path = Self::journal_path(dir);
        let corrupt = |message: String| StateError::Corrupt {
            path: path.display().to_string(),
            message,
        };
        let read = journal::read(&path)
            .map_err(|e| io(&path, e))?
            .map_err(|c| {
                corrupt(format!(
                    "record {} (byte {}) is damaged and not the last ({}); the snapshot \
                     {STATE_FILE} and the records before it are intact",
                    c.line, c.offset, c.message
                ))
            })?;
        for r in read.records {
            if r.seq <= self.journal_seq {
                continue; // already in the snapshot
            }
            if r.seq != self.journal_seq + 1 {
                return Err(corrupt(format!(
                    "record {} follows record {}: the records between are missing",
                    r.seq, self.journal_seq
                )));
            }
            for e in r.entries {
                self.set(e);
            }
            self.journal_seq = r.seq;
        }
        if let Some(why) = read.torn
            && repair
        {
            warn!(
                "{}: ignoring a torn last record ({why}); it was never reported as done",
                path.display()
            );
            if let Err(e) = journal::truncate(&path, read.valid_len) {
                // Appending after the torn bytes would bury them mid-file: the next change
                // writes a snapshot (and empties the journal) instead.
                warn!("{}: cutting off the torn record: {e}", path.display());
                self.disk.damaged = true;
            }
        }
        self.disk.journal_bytes = read.valid_len;
        Ok(())
    }

    pub fn journal_path(dir: &Path) -> PathBuf {
        dir.join(journal::JOURNAL_FILE)
    }

    /// Sets one key as a journal entry says.
    fn set(&mut self, e: journal::Entry) {
        use journal::Entry;
        match e {
            Entry::Slot { name, slot } => {
                match slot {
                    Some(s) => self.identity_ids.insert(name, s),
                    None => self.identity_ids.remove(&name),
                };
                // The slot cache is rebuilt on its next use.
                self.used_ids.clear();
            }
            Entry::Binding {
                addr,
                prefix_len,
                binding,
            } => {
                self.bindings
                    .retain(|b| !(b.addr == addr && b.prefix_len == prefix_len));
                self.bindings.extend(binding);
            }
            Entry::Quarantine { name, quarantine } => match quarantine {
                Some(q) => {
                    self.quarantines.insert(name, q);
                }
                None => {
                    self.quarantines.remove(&name);
                }
            },
            Entry::TokenIdentity { name, identity } => match identity {
                Some(t) => {
                    self.token_identities.insert(name, t);
                }
                None => {
                    self.token_identities.remove(&name);
                }
            },
            Entry::RevokedToken { id, until } => match until {
                Some(u) => {
                    self.revoked_tokens.insert(id, u);
                }
                None => {
                    self.revoked_tokens.remove(&id);
                }
            },
            Entry::RevokedIdentity { name, cutoff } => match cutoff {
                Some(c) => {
                    self.revoked_identities.insert(name, c);
                }
                None => {
                    self.revoked_identities.remove(&name);
                }
            },
        }
    }

    /// Writes a new snapshot (with the deadline clock's anchor) and empties the journal: a
    /// compaction. Crash-safe in any step: the snapshot names the last record it holds, so a
    /// journal not emptied yet replays as nothing new. On failure the next change writes a
    /// snapshot again (this state holds what the disk may not).
    pub fn save(&mut self, dir: &Path) -> Result<(), StateError> {
        let r = self.snapshot(dir);
        if r.is_err() {
            self.disk.stale = true;
        }
        r
    }

    /// [`State::save`] at a clean stop: the snapshot is written as
    /// [`STATE_VERSION_FOLDED`], which builds before the journal read, since the journal is
    /// folded into it. Any change after it writes a whole snapshot again (of this version),
    /// never a record behind a file an older build would read without it.
    pub fn save_folded(&mut self, dir: &Path) -> Result<(), StateError> {
        let r = self.snapshot_as(dir, STATE_VERSION_FOLDED);
        self.disk.stale = true;
        r
    }

    fn snapshot(&mut self, dir: &Path) -> Result<(), StateError> {
        self.snapshot_as(dir, STATE_VERSION)
    }

    fn snapshot_as(&mut self, dir: &Path, version: u32) -> Result<(), StateError> {
        let mut value = serde_json::to_value(&*self).map_err(|e| io(&Self::path(dir), e))?;
        if let (Some(o), Ok(a)) = (value.as_object_mut(), serde_json::to_value(clock::anchor())) {
            o.insert("clock".into(), a);
            o.insert("version".into(), version.into());
        }
        let text = serde_json::to_vec_pretty(&value).map_err(|e| io(&Self::path(dir), e))?;
        write_atomically(dir, STATE_FILE, &text).map_err(|(p, e)| io(&p, e))?;
        self.disk.snapshot_bytes = text.len() as u64;
        self.disk.unrecorded.clear();
        #[cfg(test)]
        if tests::STOP_AFTER_SNAPSHOT.with(|s| s.get()) {
            return Ok(());
        }
        // The snapshot holds every record: the journal may go. If emptying it fails its
        // records are still skipped on load; appending after them is fine, unless an
        // append left part of a record there.
        self.disk.stale = false;
        // Counted from here either way: a journal that could not be emptied holds only
        // records the snapshot has, and must not make every change compact again.
        self.disk.journal_bytes = 0;
        match journal::truncate(&Self::journal_path(dir), 0) {
            Ok(()) => self.disk.damaged = false,
            Err(e) => warn!("emptying the journal after a snapshot: {e}"),
        }
        Ok(())
    }

    /// Makes a change durable: one journal record of `entries` (each the value a key now
    /// has, see the `*_entry` methods), after any the agent made itself ([`State::note`]).
    /// Folds the journal into a new snapshot instead when it has grown as large as the
    /// snapshot, or when the disk may lack more than records say. On error nothing of
    /// `entries` is on disk: the caller puts the kernel and this state back.
    pub fn record(&mut self, dir: &Path, entries: Vec<journal::Entry>) -> Result<(), StateError> {
        if self.disk.stale || self.disk.damaged {
            return self.save(dir);
        }
        if journal::due(self.disk.journal_bytes, self.disk.snapshot_bytes) {
            match self.snapshot(dir) {
                Ok(()) => return Ok(()),
                // A near-full disk may take a record where it cannot take a snapshot.
                Err(e) => warn!("compacting the state: {e}; appending to the journal instead"),
            }
        }
        let mut all = self.disk.unrecorded.clone();
        all.extend(entries);
        let record = journal::Record {
            seq: self.journal_seq + 1,
            entries: all,
        };
        let line = journal::encode(&record);
        let path = Self::journal_path(dir);
        if let Err(e) = journal::append(&path, &line) {
            self.disk.damaged |= e.damaged;
            return Err(io(&path, e.error));
        }
        self.journal_seq = record.seq;
        self.disk.journal_bytes += line.len() as u64;
        self.disk.unrecorded.clear();
        Ok(())
    }

    /// Says the disk may lack what this state holds (a change undone here whose undoing could
    /// not be recorded): the next change writes a whole snapshot.
    pub fn mark_stale(&mut self) {
        self.disk.stale = true;
    }

    /// Takes over where `other` (a copy of this state a change was tried on, and dropped)
    /// left the files: a failed append it made may have left the journal damaged.
    pub fn keep_disk_of(&mut self, other: &State) {
        self.disk = other.disk.clone();
    }

    /// Notes a change the agent made itself (an expiry), for the next record to carry. After
    /// a crash before that record, a restart derives it again (from the stored deadlines).
    pub fn note(&mut self, entry: journal::Entry) {
        self.disk.unrecorded.push(entry);
    }

    /// Whether changes noted with [`State::note`] wait for a record.
    pub fn has_unrecorded(&self) -> bool {
        !self.disk.unrecorded.is_empty()
    }

    /// The journal entry of the binding of exactly `addr/len` as it now is.
    pub fn binding_entry(&self, addr: IpAddr, len: u8) -> journal::Entry {
        journal::Entry::Binding {
            addr,
            prefix_len: len,
            binding: self
                .bindings
                .iter()
                .find(|b| b.addr == addr && b.prefix_len == len)
                .cloned(),
        }
    }

    pub fn slot_entry(&self, name: &str) -> journal::Entry {
        journal::Entry::Slot {
            name: name.to_owned(),
            slot: self.identity_ids.get(name).copied(),
        }
    }

    pub fn quarantine_entry(&self, name: &str) -> journal::Entry {
        journal::Entry::Quarantine {
            name: name.to_owned(),
            quarantine: self.quarantines.get(name).cloned(),
        }
    }

    pub fn token_identity_entry(&self, name: &str) -> journal::Entry {
        journal::Entry::TokenIdentity {
            name: name.to_owned(),
            identity: self.token_identities.get(name).cloned(),
        }
    }

    pub fn revoked_token_entry(&self, id: &str) -> journal::Entry {
        journal::Entry::RevokedToken {
            id: id.to_owned(),
            until: self.revoked_tokens.get(id).copied(),
        }
    }

    pub fn revoked_identity_entry(&self, name: &str) -> journal::Entry {
        journal::Entry::RevokedIdentity {
            name: name.to_owned(),
            cutoff: self.revoked_identities.get(name).copied(),
        }
    }

    /// The entries that turn `self` into `to` (for changes too wide to list by hand: a
    /// reload). Linear in the state's size.
    pub fn entries_to(&self, to: &State) -> Vec<journal::Entry> {
        fn keys<'a, K: Ord + Clone + 'a, V: PartialEq + 'a>(
            a: &'a BTreeMap<K, V>,
            b: &'a BTreeMap<K, V>,
        ) -> Vec<K> {
            let mut ks: Vec<K> = a
                .iter()
                .filter(|(k, v)| b.get(k) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            ks.extend(b.keys().filter(|k| !a.contains_key(k)).cloned());
            ks
        }
        let mut out: Vec<journal::Entry> = Vec::new();
        out.extend(
            keys(&self.identity_ids, &to.identity_ids)
                .iter()
                .map(|k| to.slot_entry(k)),
        );
        out.extend(
            keys(&self.quarantines, &to.quarantines)
                .iter()
                .map(|k| to.quarantine_entry(k)),
        );
        out.extend(
            keys(&self.token_identities, &to.token_identities)
                .iter()
                .map(|k| to.token_identity_entry(k)),
        );
        out.extend(
            keys(&self.revoked_tokens, &to.revoked_tokens)
                .iter()
                .map(|k| to.revoked_token_entry(k)),
        );
        out.extend(
            keys(&self.revoked_identities, &to.revoked_identities)
                .iter()
                .map(|k| to.revoked_identity_entry(k)),
        );
        let by_prefix = |s: &State| -> BTreeMap<(IpAddr, u8), DynBinding> {
            s.bindings
                .iter()
                .map(|b| ((b.addr, b.prefix_len), b.clone()))
                .collect()
        };
        for (a, l) in keys(&by_prefix(self), &by_prefix(to)) {
            out.push(to.binding_entry(a, l));
        }
        out
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

    thread_local! {
        /// Stops a snapshot after its file is in place, before the journal is emptied: a
        /// crash between a compaction's two steps.
        pub(super) static STOP_AFTER_SNAPSHOT: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    fn binding(i: u32) -> DynBinding {
        DynBinding {
            addr: IpAddr::V4(std::net::Ipv4Addr::from(0xC612_0000 + i)),
            prefix_len: 32,
            identity: "a".into(),
            expires_unix_ms: Some(1_000 + u64::from(i)),
            created_unix_ms: 1,
            by: "test".into(),
            token_id: None,
        }
    }

    /// Binds `i` in `s` and records it, as `ops::bindings::bind` does.
    fn bind(s: &mut State, dir: &Path, i: u32) {
        let b = binding(i);
        s.bindings
            .retain(|x| !(x.addr == b.addr && x.prefix_len == b.prefix_len));
        s.bindings.push(b.clone());
        s.record(dir, vec![s.binding_entry(b.addr, 32)]).unwrap();
    }

    fn journal_len(dir: &Path) -> u64 {
        std::fs::metadata(State::journal_path(dir)).map_or(0, |m| m.len())
    }

    #[test]
    fn changes_are_appended_and_replayed_over_the_snapshot() {
        let dir = tmpdir("replay");
        let mut s = State::load(&dir).unwrap();
        s.identity_id("a", 10);
        s.save(&dir).unwrap();
        let snapshot = std::fs::read(State::path(&dir)).unwrap();
        for i in 0..50 {
            bind(&mut s, &dir, i);
        }
        // Unbind one, revoke something, quarantine: every kind of entry.
        let gone = binding(7);
        s.bindings.retain(|b| b.addr != gone.addr);
        s.revoked_tokens.insert("t".into(), 99);
        s.quarantines.insert(
            "a".into(),
            Quarantine {
                until_unix_ms: None,
                since_unix_ms: 1,
                reason: "r".into(),
                by: QuarantineOwner::Controller,
            },
        );
        let entries = vec![
            s.binding_entry(gone.addr, 32),
            s.revoked_token_entry("t"),
            s.quarantine_entry("a"),
        ];
        s.record(&dir, entries).unwrap();
        assert_eq!(
            std::fs::read(State::path(&dir)).unwrap(),
            snapshot,
            "a change rewrote the snapshot"
        );
        assert!(journal_len(&dir) < 51 * 400, "{} bytes", journal_len(&dir));
        let back = State::load(&dir).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.journal_seq, 51);
        // A snapshot folds it all in and empties the journal.
        let mut back = back;
        back.save(&dir).unwrap();
        assert_eq!(journal_len(&dir), 0);
        assert_eq!(State::load(&dir).unwrap(), s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_dropped_cut_off_and_the_next_append_is_clean() {
        let dir = tmpdir("torn");
        let mut s = State::load(&dir).unwrap();
        for i in 0..3 {
            bind(&mut s, &dir, i);
        }
        let whole = journal_len(&dir);
        let mut expect = s.clone();
        bind(&mut s, &dir, 3);
        // A crash mid-append: half of the fourth record.
        let full = journal_len(&dir);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(State::journal_path(&dir))
            .unwrap();
        f.set_len(whole + (full - whole) / 2).unwrap();
        drop(f);
        let back = State::load(&dir).unwrap();
        assert_eq!(back, expect);
        assert_eq!(journal_len(&dir), whole, "the torn record was not cut off");
        // The next change follows the whole records, and loads.
        let mut torn = std::fs::read(State::journal_path(&dir)).unwrap();
        torn.extend_from_slice(b"0badc0de {\"seq\":");
        std::fs::write(State::journal_path(&dir), &torn).unwrap();
        // A reader beside the agent sees the same state and leaves the torn bytes alone.
        assert_eq!(State::peek(&dir).unwrap(), expect);
        assert_eq!(std::fs::read(State::journal_path(&dir)).unwrap(), torn);
        let mut back = State::load(&dir).unwrap();
        assert_eq!(journal_len(&dir), whole);
        bind(&mut back, &dir, 9);
        bind(&mut expect, &dir, 9);
        assert_eq!(State::load(&dir).unwrap().bindings, expect.bindings);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_record_before_the_last_is_an_error_and_nothing_is_touched() {
        let dir = tmpdir("corrupt");
        let mut s = State::load(&dir).unwrap();
        for i in 0..3 {
            bind(&mut s, &dir, i);
        }
        let path = State::journal_path(&dir);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = bytes.iter().position(|b| *b == b'\n').unwrap() + 30;
        bytes[second] = b'X';
        std::fs::write(&path, &bytes).unwrap();
        let e = State::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("state.journal") && e.contains("record 2") && e.contains("left as it is"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the journal was changed"
        );
        // A lost record (a gap in the numbers) is an error too.
        let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
        std::fs::remove_file(&path).unwrap();
        let mut t = State::load(&dir).unwrap();
        for i in 0..3 {
            bind(&mut t, &dir, i);
        }
        let good = std::fs::read(&path).unwrap();
        let good: Vec<&[u8]> = good.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines.len(), good.len());
        std::fs::write(&path, [good[0], good[2]].concat()).unwrap();
        let e = State::load(&dir).unwrap_err().to_string();
        assert!(e.contains("record 3 follows record 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_crash_between_the_snapshot_and_emptying_the_journal_replays_nothing_twice() {
        let dir = tmpdir("compact");
        let mut s = State::load(&dir).unwrap();
        for i in 0..5 {
            bind(&mut s, &dir, i);
        }
        // Unbind 2 in the journal: replaying the old "bind 2" over the new snapshot would
        // bring it back if the snapshot did not say which records it holds.
        let two = binding(2);
        s.bindings.retain(|b| b.addr != two.addr);
        s.record(&dir, vec![s.binding_entry(two.addr, 32)]).unwrap();
        let before = journal_len(&dir);
        // Stop 1: the snapshot is in place, the journal not emptied.
        STOP_AFTER_SNAPSHOT.with(|x| x.set(true));
        s.save(&dir).unwrap();
        STOP_AFTER_SNAPSHOT.with(|x| x.set(false));
        assert_eq!(journal_len(&dir), before);
        let mut back = State::load(&dir).unwrap();
        assert_eq!(back, s);
        // Appending after the old records goes on from the snapshot's number.
        bind(&mut back, &dir, 20);
        bind(&mut s, &dir, 20);
        assert_eq!(State::load(&dir).unwrap(), s);
        // Stop 0: a crash while the new snapshot is written leaves `state.json.tmp` and the
        // old snapshot; the journal still holds every change.
        std::fs::write(dir.join("state.json.tmp"), b"{\"version\":1, \"ident").unwrap();
        assert_eq!(State::load(&dir).unwrap(), s);
        // Stop 2: done.
        s.save(&dir).unwrap();
        assert_eq!(journal_len(&dir), 0);
        assert_eq!(State::load(&dir).unwrap(), s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_journal_is_folded_in_once_it_outgrows_the_snapshot() {
        let dir = tmpdir("due");
        let mut s = State::load(&dir).unwrap();
        s.save(&dir).unwrap();
        // Pretend the journal is at its bound: the next change writes a snapshot instead.
        s.disk.journal_bytes = journal::MIN_COMPACT_BYTES;
        let ino = |d: &Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(State::path(d)).unwrap().ino()
        };
        let first = ino(&dir);
        bind(&mut s, &dir, 1);
        assert_ne!(ino(&dir), first, "no compaction at the bound");
        assert_eq!(journal_len(&dir), 0);
        let second = ino(&dir);
        bind(&mut s, &dir, 2);
        assert_eq!(ino(&dir), second, "compacted below the bound");
        assert_eq!(State::load(&dir).unwrap(), s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn noted_expiries_ride_on_the_next_record_and_a_failed_snapshot_forces_one() {
        let dir = tmpdir("noted");
        let mut s = State::load(&dir).unwrap();
        s.identity_id("a", 10);
        s.identity_id("b", 10);
        s.save(&dir).unwrap();
        // The agent frees b's slot by itself, then a bind reuses it for c: the record that
        // names c's slot must carry b's release first, or a replay has two names on slot 2.
        s.identity_ids.remove("b");
        s.note(s.slot_entry("b"));
        s.identity_id("c", 10);
        s.record(&dir, vec![s.slot_entry("c")]).unwrap();
        let back = State::load(&dir).unwrap();
        assert_eq!(back.identity_ids, s.identity_ids);
        assert!(!s.has_unrecorded());
        // A snapshot that fails (the directory is gone) leaves the next change to write one.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::write(&dir, b"not a directory").unwrap();
        assert!(s.save(&dir).is_err());
        assert!(s.disk.stale);
        std::fs::remove_file(&dir).unwrap();
        s.record(&dir, Vec::new()).unwrap();
        assert!(!s.disk.stale);
        assert!(State::path(&dir).exists());
        assert_eq!(State::load(&dir).unwrap(), s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// One bind's state write at 100 000 bindings: the old full rewrite against one journal
    /// record, same run, same disk. A measurement, not a test (no timed assertion):
    /// `TOLLGATE_STATE_BENCH_DIR=target/state-bench cargo test -p tollgate --lib --release \
    /// -- --ignored --nocapture bind_write_cost`.
    #[test]
    #[ignore = "a measurement; run by hand"]
    fn bind_write_cost_at_100k_bindings() {
        let dir = std::env::var_os("TOLLGATE_STATE_BENCH_DIR")
            .map_or_else(|| tmpdir("bench"), PathBuf::from);
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = State::load(&dir).unwrap();
        s.identity_id("a", 10);
        s.bindings.extend((0..100_000).map(binding));
        s.save(&dir).unwrap();
        let size = std::fs::metadata(State::path(&dir)).unwrap().len();
        let rounds = 5;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            s.save(&dir).unwrap();
        }
        let full = t.elapsed() / rounds;
        let t = std::time::Instant::now();
        let n = 200u32;
        for i in 0..n {
            bind(&mut s, &dir, 200_000 + i);
        }
        let append = t.elapsed() / n;
        let grown = journal_len(&dir) / u64::from(n);
        println!(
            "100000 bindings, state.json {size} bytes: full rewrite {full:?} per bind \
             (mean of {rounds}); journal append {append:?} per bind (mean of {n}, \
             {grown} bytes each)"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn entries_to_turns_one_state_into_another() {
        let mut a = State::default();
        a.identity_id("x", 10);
        a.identity_id("y", 10);
        a.bindings.extend((0..5).map(binding));
        a.revoked_tokens.insert("t".into(), 1);
        let mut b = a.clone();
        b.identity_ids.remove("y");
        b.identity_id("z", 10);
        b.bindings.retain(|x| x.addr != binding(3).addr);
        b.bindings[0].expires_unix_ms = None;
        b.revoked_tokens.clear();
        b.revoked_identities.insert("x".into(), 5);
        let mut c = a.clone();
        for e in a.entries_to(&b) {
            c.set(e);
        }
        c.bindings.sort_by_key(|x| x.addr);
        b.bindings.sort_by_key(|x| x.addr);
        assert_eq!(c, b);
        assert!(b.entries_to(&b).is_empty());
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tollgate-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn file_version(dir: &Path) -> u64 {
        let text = std::fs::read_to_string(State::path(dir)).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["version"]
            .as_u64()
            .unwrap()
    }

    /// A running agent's snapshot is version 2, which a build before the journal refuses
    /// (it would start without the journal's records); a clean stop's is version 1, which
    /// such a build reads, the journal folded in. Both load here, and a change after a
    /// folded snapshot writes version 2 again before anything is appended.
    #[test]
    fn only_a_folded_snapshot_is_written_for_builds_before_the_journal() {
        let dir = tmpdir("folded");
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = State::load(&dir).unwrap();
        s.save(&dir).unwrap();
        assert_eq!(file_version(&dir), u64::from(STATE_VERSION));
        s.quarantines.insert(
            "x".into(),
            Quarantine {
                reason: "r".into(),
                by: QuarantineOwner::Controller,
                since_unix_ms: 1,
                until_unix_ms: None,
            },
        );
        s.record(&dir, vec![s.quarantine_entry("x")]).unwrap();
        assert_eq!(
            file_version(&dir),
            u64::from(STATE_VERSION),
            "a record, no snapshot"
        );
        s.save_folded(&dir).unwrap();
        assert_eq!(file_version(&dir), u64::from(STATE_VERSION_FOLDED));
        let back = State::load(&dir).unwrap();
        assert_eq!(back.version, STATE_VERSION);
        assert!(back.quarantines.contains_key("x"));
        s.quarantines.clear();
        s.record(&dir, vec![s.quarantine_entry("x")]).unwrap();
        assert_eq!(file_version(&dir), u64::from(STATE_VERSION));
        assert!(State::load(&dir).unwrap().quarantines.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_clock_anchor_is_saved_with_the_boot_id_and_files_without_one_load() {
        let d = tmpdir("clock");
        let mut st = State {
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
        let mut s = State::load(&dir).unwrap();
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
