//! The state's journal: an append-only file of changes beside the snapshot (`state.json`),
//! so that a change costs one small write and one `fdatasync`, not a rewrite of the whole
//! state (#12 finding 7).
//!
//! One record per line: `<crc32 of the JSON, 8 hex digits> <JSON>\n`, the JSON a [`Record`]:
//! a sequence number and the entries of one change, each the value a key now has (or that it
//! has none). Replaying a record is setting those keys, so a record can be replayed over a
//! snapshot that already holds it without harm; the sequence number says which ones the
//! snapshot holds (it stores the last it includes) and catches a lost record.
//!
//! What a crash leaves: a record is complete (its line, newline included, checks) or it is
//! the last line and torn (a crash mid-append), which loading ignores and cuts off with a
//! warning. A record that fails its check with a good one after it is not a crash: loading
//! refuses, the files are left as they are.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    net::IpAddr,
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::{DynBinding, Quarantine, TokenIdentity};

pub const JOURNAL_FILE: &str = "state.journal";

/// The journal may grow to this before it is folded into the snapshot, however small the
/// snapshot: a small state is not rewritten every few changes.
pub const MIN_COMPACT_BYTES: u64 = 4 << 20;

/// Whether a journal of `journal_bytes` over a snapshot of `snapshot_bytes` is folded into
/// a new snapshot now. The bound grows with the snapshot, so a compaction (which writes the
/// whole state) comes after at least as many journal bytes as it writes: amortised, each
/// change costs its record plus at most as much again, never the whole state.
pub fn due(journal_bytes: u64, snapshot_bytes: u64) -> bool {
    journal_bytes >= MIN_COMPACT_BYTES.max(snapshot_bytes)
}

/// The value one key of the state now has; `None`: the key is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// `identity_ids[name]`.
    Slot { name: String, slot: Option<u32> },
    /// The run-time binding of exactly `addr/prefix_len`.
    Binding {
        addr: IpAddr,
        prefix_len: u8,
        binding: Option<DynBinding>,
    },
    Quarantine {
        name: String,
        quarantine: Option<Quarantine>,
    },
    TokenIdentity {
        name: String,
        identity: Option<TokenIdentity>,
    },
    /// `revoked_tokens[id]`: until when the revocation is kept.
    RevokedToken { id: String, until: Option<u64> },
    /// `revoked_identities[name]`: the cut-off.
    RevokedIdentity { name: String, cutoff: Option<u64> },
}

/// One change: everything it set, written and replayed as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub entries: Vec<Entry>,
}

/// CRC-32 (IEEE, as zlib): a torn or damaged line is told from a whole one.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The line of `record`, newline included.
pub fn encode(record: &Record) -> Vec<u8> {
    // Serialising plain data into a Vec does not fail.
    let json = serde_json::to_vec(record).unwrap_or_default();
    let mut line = format!("{:08x} ", crc32(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

/// The record of one line (without its newline).
pub fn decode(line: &[u8]) -> Result<Record, String> {
    let (crc, json) = match (line.get(..8), line.get(8), line.get(9..)) {
        (Some(c), Some(b' '), Some(j)) => (c, j),
        _ => return Err("not a journal record".into()),
    };
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .ok_or("not a journal record (no checksum)")?;
    if crc32(json) != crc {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("checksum good but not a record: {e}"))
}

/// What a journal file holds.
#[derive(Debug, Default)]
pub struct Read {
    pub records: Vec<Record>,
    /// Bytes of whole records; a torn tail starts here.
    pub valid_len: u64,
    /// Why the bytes after `valid_len` are not a record (a crash mid-append).
    pub torn: Option<String>,
}

/// A damaged record that is not the last: not something a crash leaves.
#[derive(Debug, PartialEq, Eq)]
pub struct Corrupt {
    pub line: usize,
    pub offset: u64,
    pub message: String,
}

/// Splits `bytes` into records: every line must check, except a last one that may be torn.
pub fn parse(bytes: &[u8]) -> Result<Read, Corrupt> {
    let mut read = Read::default();
    let mut at = 0usize;
    let mut line_no = 0;
    while at < bytes.len() {
        line_no += 1;
        let rest = &bytes[at..];
        let (line, next) = match rest.iter().position(|b| *b == b'\n') {
            Some(n) => (&rest[..n], at + n + 1),
            None => (rest, bytes.len()),
        };
        let whole = next <= bytes.len() && bytes.get(next - 1) == Some(&b'\n');
        match decode(line) {
            Ok(r) if whole => {
                read.records.push(r);
                read.valid_len = next as u64;
            }
            outcome => {
                let why = match outcome {
                    Ok(_) => "no newline: the last append did not finish".to_owned(),
                    Err(e) => e,
                };
                // Only the end of the file may be torn: anything after a bad line means the
                // file was damaged, not cut short by a crash.
                if bytes[next..]
                    .iter()
                    .any(|b| !b.is_ascii_whitespace() && *b != 0)
                {
                    return Err(Corrupt {
                        line: line_no,
                        offset: at as u64,
                        message: why,
                    });
                }
                read.torn = Some(format!(
                    "{} bytes at offset {at} (line {line_no}): {why}",
                    bytes.len() - at
                ));
                return Ok(read);
            }
        }
        at = next;
    }
    Ok(read)
}

/// Reads the journal at `path`; a missing file is an empty journal.
pub fn read(path: &Path) -> std::io::Result<Result<Read, Corrupt>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(parse(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ok(Read::default())),
        Err(e) => Err(e),
    }
}

/// Why an append failed, and whether the journal is still whole.
#[derive(Debug)]
pub struct AppendError {
    pub error: std::io::Error,
    /// The partial write could not be cut off again: the journal must not be appended to
    /// until it is reset (after a new snapshot).
    pub damaged: bool,
}

/// Appends `line` to the journal at `path` and makes it durable (one write, one
/// `fdatasync`). A failed append is cut off again, so the journal holds whole records only.
/// The directory is synced only when the file is created.
pub fn append(path: &Path, line: &[u8]) -> Result<(), AppendError> {
    let fresh = !path.exists();
    let plain = |error| AppendError {
        error,
        damaged: false,
    };
    let open = || OpenOptions::new().append(true).create(true).open(path);
    let mut f = match open() {
        // A state directory not made yet (no snapshot written so far).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(plain)?;
            }
            open()
        }
        r => r,
    }
    .map_err(plain)?;
    if fresh && let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(plain)?;
    }
    let before = f.metadata().map_err(plain)?.len();
    let written = f.write_all(line).and_then(|()| f.sync_data());
    if let Err(error) = written {
        // ENOSPC mid-line leaves part of it: take it back (shrinking needs no space).
        let damaged = f.set_len(before).and_then(|()| f.sync_data()).is_err();
        return Err(AppendError { error, damaged });
    }
    Ok(())
}

/// Empties the journal at `path` (after a snapshot that holds all its records), or cuts off
/// a torn tail at `len`.
pub fn truncate(path: &Path, len: u64) -> std::io::Result<()> {
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => {
            f.set_len(len)?;
            f.sync_data()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> Record {
        Record {
            seq,
            entries: vec![Entry::RevokedToken {
                id: format!("t{seq}"),
                until: Some(seq * 10),
            }],
        }
    }

    #[test]
    fn crc32_is_the_zlib_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_round_trip_and_each_line_checks() {
        let mut bytes = Vec::new();
        for s in 1..=3 {
            bytes.extend(encode(&rec(s)));
        }
        let r = parse(&bytes).unwrap();
        assert_eq!(r.records, vec![rec(1), rec(2), rec(3)]);
        assert_eq!(r.valid_len, bytes.len() as u64);
        assert!(r.torn.is_none());
    }

    #[test]
    fn a_torn_last_line_is_reported_and_left_out() {
        let whole = [encode(&rec(1)), encode(&rec(2))].concat();
        let third = encode(&rec(3));
        // Every cut of the last record: it is left out, the first two are kept.
        for cut in 1..third.len() {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(&third[..cut]);
            let r = parse(&bytes).unwrap_or_else(|e| panic!("cut at {cut}: {e:?}"));
            assert_eq!(r.records, vec![rec(1), rec(2)], "cut at {cut}");
            assert_eq!(r.valid_len, whole.len() as u64);
            assert!(r.torn.is_some(), "cut at {cut}");
        }
        // Zeros where the file was extended but the data never landed: torn too.
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&[0; 64]);
        assert!(parse(&bytes).unwrap().torn.is_some());
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_an_error() {
        let mut bytes = [encode(&rec(1)), encode(&rec(2)), encode(&rec(3))].concat();
        let second = encode(&rec(1)).len() + 20;
        bytes[second] ^= 0x01;
        let e = parse(&bytes).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("checksum"), "{e:?}");
    }

    #[test]
    fn a_failed_append_leaves_whole_records_and_truncate_empties() {
        let dir = std::env::temp_dir().join(format!("tollgate-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(JOURNAL_FILE);
        append(&path, &encode(&rec(1))).unwrap();
        append(&path, &encode(&rec(2))).unwrap();
        let r = read(&path).unwrap().unwrap();
        assert_eq!(r.records.len(), 2);
        truncate(&path, 0).unwrap();
        assert_eq!(read(&path).unwrap().unwrap().records, vec![]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_bound_grows_with_the_snapshot() {
        assert!(!due(1 << 20, 100));
        assert!(due(MIN_COMPACT_BYTES, 100));
        assert!(!due(MIN_COMPACT_BYTES, 40 << 20));
        assert!(due(40 << 20, 40 << 20));
    }
}
