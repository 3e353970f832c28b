//! The node's durable queue of changes to publish: `fleet-outbox.log` in its state directory.
//! A bind, revocation, quarantine or release accepted on this node is queued here in the
//! same request that made it (after its journal record), and the fleet task publishes the
//! queue in order, removing an entry only once the store took it. So a change made while
//! the store is out, or just before a crash or a restart, is published when the store is
//! back: nothing accepted is lost.
//!
//! An append-only log of JSON lines, each written with one `write` and an fsync: `push` (an
//! entry), `seq` (the seq reserved for the first entry, so a retry after an unknown outcome
//! republishes the same `(origin, seq)`: a duplicate, never a second change) and `pop`. The
//! file is emptied when the queue is. Loading replays it; a crash mid-write can only tear
//! the last line, which is dropped (its change was not reported done: the write is before
//! the reply). Any other line that does not parse is an error naming the file.
//!
//! Bounded: past [`MAX_ENTRIES`] the oldest queued bindings are dropped (counted), since a
//! client whose bind was not published binds again on the node it reaches with the token it
//! holds; revocations, quarantines and releases are never dropped.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read as _, Write as _},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::entry::Kind;

pub const OUTBOX_FILE: &str = "fleet-outbox.log";
/// Queued entries kept before the oldest bindings go.
pub const MAX_ENTRIES: usize = 10_000;
/// Longest line read back (an entry's payload is at most 16 KiB, plus its fields; a change
/// that cannot be an entry is never queued, `Link::publish`).
const MAX_LINE_BYTES: usize = 64 * 1024;
/// Largest outbox file read: 10 000 bindings of 16 KiB and room for revocations.
const MAX_FILE_BYTES: u64 = 512 * 1024 * 1024;

/// One change waiting to be published. `seq` is 0 until the fleet task reserves one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    #[serde(with = "kind_label")]
    pub kind: Kind,
    pub subject: String,
    pub payload: String,
    pub wall_ms: u64,
    #[serde(default)]
    pub seq: u64,
}

mod kind_label {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::fleet::entry::Kind;

    pub fn serialize<S: Serializer>(k: &Kind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.label())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Kind, D::Error> {
        let s = String::deserialize(d)?;
        Kind::from_label(s.as_bytes()).ok_or_else(|| D::Error::custom(format!("kind {s:?}")))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Push { entry: Pending },
    Seq { seq: u64 },
    Pop,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("fleet outbox {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(
        "fleet outbox {path} is damaged at line {line} ({why}); the changes it queues may not \
         have been published: restore the file, or remove it (and republish by hand what it held)"
    )]
    Damaged {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    path: PathBuf,
    queue: VecDeque<Pending>,
    /// Lines in the file; past twice the queue (and a margin) it is rewritten compact.
    lines: usize,
    max_entries: usize,
    compact_margin: usize,
    /// Bindings dropped past [`MAX_ENTRIES`].
    pub dropped: u64,
}

/// Lines a log may hold beyond two per queued entry before it is rewritten.
const COMPACT_MARGIN: usize = 1024;

impl Outbox {
    /// Loads (replays) `dir/fleet-outbox.log`; a missing file is an empty queue.
    pub fn load(dir: &Path) -> Result<Outbox, OutboxError> {
        let path = dir.join(OUTBOX_FILE);
        let mut out = Outbox {
            dir: dir.to_owned(),
            path,
            queue: VecDeque::new(),
            lines: 0,
            max_entries: MAX_ENTRIES,
            compact_margin: COMPACT_MARGIN,
            dropped: 0,
        };
        let file = match File::open(&out.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(err) => return Err(out.io(err)),
        };
        let mut lines = Vec::new();
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        // A line longer than any entry is damage, not something to buffer. Bounded by bytes, never by a line count (revocations are never dropped, so the
        // queue has no fixed length): a file past the bound is an error naming it.
        let size = reader.get_ref().metadata().map_err(|e| out.io(e))?.len();
        if size > MAX_FILE_BYTES {
            return Err(out.damaged(
                0,
                format!("{size} bytes, more than the {MAX_FILE_BYTES} an outbox may hold"),
            ));
        }
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| out.io(e))?;
            if n == 0 {
                break;
            }
            lines.push(buf.clone());
        }
        let count = lines.len();
        for (i, line) in lines.into_iter().enumerate() {
            let last = i + 1 == count;
            let parsed = line
                .strip_suffix(b"\n")
                .ok_or("no end of line")
                .and_then(|l| serde_json::from_slice::<Line>(l).map_err(|_| "not an outbox line"));
            match parsed {
                Ok(l) => out.replay(l).map_err(|why| out.damaged(i + 1, why))?,
                // Only the last line can be torn by a crash, and what it held was not
                // reported done.
                Err(_) if last => {}
                Err(why) => return Err(out.damaged(i + 1, why.into())),
            }
        }
        out.lines = count;
        Ok(out)
    }

    fn io(&self, err: std::io::Error) -> OutboxError {
        OutboxError::Io {
            path: self.path.clone(),
            err,
        }
    }

    fn damaged(&self, line: usize, why: String) -> OutboxError {
        OutboxError::Damaged {
            path: self.path.clone(),
            line,
            why,
        }
    }

    fn replay(&mut self, l: Line) -> Result<(), String> {
        match l {
            Line::Push { entry } => {
                self.queue.push_back(entry);
                self.bound();
            }
            Line::Seq { seq } => match self.queue.front_mut() {
                Some(p) => p.seq = seq,
                None => return Err("a seq with nothing queued".into()),
            },
            Line::Pop => {
                if self.queue.pop_front().is_none() {
                    return Err("a pop with nothing queued".into());
                }
            }
        }
        Ok(())
    }

    fn bound(&mut self) {
        while self.queue.len() > self.max_entries {
            match self.queue.iter().position(|p| p.kind == Kind::Binding) {
                Some(i) => {
                    self.queue.remove(i);
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    fn append(&mut self, l: &Line) -> Result<(), OutboxError> {
        let mut text = serde_json::to_vec(l).expect("outbox lines serialize");
        text.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        f.write_all(&text)
            .and_then(|()| f.sync_data())
            .map_err(|e| self.io(e))?;
        self.lines += 1;
        Ok(())
    }

    /// Rewrites the log as the queue alone once pops and seqs dominate it (a queue that never
    /// empties under steady churn would otherwise grow the file for ever). Best effort: the
    /// long log is as good, only longer.
    fn compact(&mut self) {
        if self.lines <= 2 * self.queue.len() + self.compact_margin {
            return;
        }
        let mut text = Vec::new();
        let mut lines = 0;
        for (i, p) in self.queue.iter().enumerate() {
            let seq = p.seq;
            let entry = Pending {
                seq: 0,
                ..p.clone()
            };
            text.extend(serde_json::to_vec(&Line::Push { entry }).expect("serializes"));
            text.push(b'\n');
            lines += 1;
            if i == 0 && seq != 0 {
                text.extend(serde_json::to_vec(&Line::Seq { seq }).expect("serializes"));
                text.push(b'\n');
                lines += 1;
            }
        }
        match super::cursor::write_new_then_rename(&self.dir, OUTBOX_FILE, &text) {
            Ok(()) => self.lines = lines,
            Err((path, e)) => tracing::warn!("compacting {}: {e}", path.display()),
        }
    }

    /// Queues `p` (on disk before it is in the queue: an error queues nothing).
    pub fn push(&mut self, p: Pending) -> Result<(), OutboxError> {
        self.append(&Line::Push { entry: p.clone() })?;
        self.queue.push_back(p);
        self.bound();
        Ok(())
    }

    pub fn front(&self) -> Option<&Pending> {
        self.queue.front()
    }

    /// Records the seq reserved for the first entry.
    pub fn set_front_seq(&mut self, seq: u64) -> Result<(), OutboxError> {
        if self.queue.is_empty() {
            return Ok(());
        }
        self.append(&Line::Seq { seq })?;
        if let Some(p) = self.queue.front_mut() {
            p.seq = seq;
        }
        Ok(())
    }

    /// Removes the first entry (the store took it); the file is emptied with the queue.
    pub fn pop_front(&mut self) -> Result<(), OutboxError> {
        if self.queue.len() == 1 {
            // Empty: start the log afresh rather than let it grow for ever.
            let f = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&self.path)
                .map_err(|e| self.io(e))?;
            f.sync_data().map_err(|e| self.io(e))?;
            self.lines = 0;
        } else {
            self.append(&Line::Pop)?;
        }
        self.queue.pop_front();
        self.compact();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::Dir;

    fn pending(kind: Kind, subject: &str) -> Pending {
        Pending {
            kind,
            subject: subject.into(),
            payload: "{}".into(),
            wall_ms: 1,
            seq: 0,
        }
    }

    #[test]
    fn survives_a_restart_in_order_with_the_reserved_seq() {
        let d = Dir::new("outbox", "restart");
        let mut o = Outbox::load(&d.0).unwrap();
        o.push(pending(Kind::Revocation, "t1")).unwrap();
        o.push(pending(Kind::Quarantine, "alice")).unwrap();
        o.push(pending(Kind::Release, "alice")).unwrap();
        o.set_front_seq(7).unwrap();
        o.pop_front().unwrap();
        o.set_front_seq(8).unwrap();
        let o = Outbox::load(&d.0).unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(o.front().unwrap().subject, "alice");
        assert_eq!(o.front().unwrap().seq, 8);
        assert_eq!(o.queue[1].kind, Kind::Release);
        assert_eq!(o.queue[1].seq, 0);
    }

    #[test]
    fn an_emptied_queue_empties_the_file() {
        let d = Dir::new("outbox", "empty");
        let mut o = Outbox::load(&d.0).unwrap();
        o.push(pending(Kind::Revocation, "t1")).unwrap();
        o.pop_front().unwrap();
        assert_eq!(std::fs::metadata(d.0.join(OUTBOX_FILE)).unwrap().len(), 0);
        assert!(Outbox::load(&d.0).unwrap().is_empty());
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_damage_elsewhere_is_an_error() {
        let d = Dir::new("outbox", "torn");
        let mut o = Outbox::load(&d.0).unwrap();
        o.push(pending(Kind::Revocation, "t1")).unwrap();
        let path = d.0.join(OUTBOX_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"push","entry":{"kind":"revo"#)
            .unwrap();
        let o = Outbox::load(&d.0).unwrap();
        assert_eq!(o.len(), 1);
        // The torn line followed by a good one: the torn one is not the last, so damage.
        f.write_all(b"\n{\"op\":\"pop\"}\n").unwrap();
        let e = Outbox::load(&d.0).unwrap_err().to_string();
        assert!(e.contains("damaged at line 2"), "{e}");
        // An unknown kind is damage too, never a guess.
        std::fs::write(
            &path,
            "{\"op\":\"push\",\"entry\":{\"kind\":\"grant\",\"subject\":\"x\",\"payload\":\"{}\",\"wall_ms\":1}}\n{\"op\":\"pop\"}\n",
        )
        .unwrap();
        assert!(Outbox::load(&d.0).is_err());
    }

    #[test]
    fn a_churning_log_is_compacted_and_reads_back_the_same() {
        let d = Dir::new("outbox", "compact");
        let mut o = Outbox::load(&d.0).unwrap();
        o.compact_margin = 8;
        o.push(pending(Kind::Revocation, "first")).unwrap();
        for i in 0..20 {
            o.push(pending(Kind::Quarantine, &format!("q{i}"))).unwrap();
            o.set_front_seq(i as u64 + 1).unwrap();
            o.pop_front().unwrap();
        }
        assert!(o.lines <= 2 * o.len() + 8, "{}", o.lines);
        let back = Outbox::load(&d.0).unwrap();
        assert_eq!(back.queue, o.queue);
    }

    #[test]
    fn past_the_bound_old_bindings_go_and_revocations_stay() {
        let d = Dir::new("outbox", "bound");
        let mut o = Outbox::load(&d.0).unwrap();
        o.max_entries = 4;
        o.push(pending(Kind::Revocation, "keep")).unwrap();
        for i in 0..4 {
            o.push(pending(Kind::Binding, &format!("b{i}"))).unwrap();
        }
        assert_eq!(o.len(), 4);
        assert_eq!(o.dropped, 1);
        assert_eq!(o.front().unwrap().subject, "keep");
        assert_eq!(o.queue[1].subject, "b1");
    }
}
