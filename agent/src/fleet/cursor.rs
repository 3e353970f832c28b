//! The node's durable sync position, `fleet.json` in its state directory: the last stream id
//! it took, the next sequence number it publishes under, and the store epoch it last saw.
//! A restart resumes reading where the node stopped (nothing re-applied out of order, nothing
//! skipped) and never publishes two entries under one `(origin, seq)`: a seq is handed out
//! only after the counter past it is on disk ([`CursorFile::reserve_seq`]).
//!
//! Written atomically: a fresh temporary file (`create_new`, never a planted one or a link),
//! fsync, rename over `fleet.json`, fsync of the directory, so a crash leaves the old or the
//! new file. A file that is there but does not parse is an error naming the file, never a
//! silent reset: a reset would reuse seqs (other nodes would refuse the new entries as
//! stale) and hide a damaged state directory.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::store::StreamPos;

pub const CURSOR_FILE: &str = "fleet.json";
/// Larger than any honest cursor file: refused unread.
const MAX_CURSOR_BYTES: u64 = 4096;
const VERSION: u32 = 1;

/// The sync position. `Default` is a node that has never synced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The last stream id taken by the applier; read on after it.
    pub last: StreamPos,
    /// The seq the next published entry gets (seqs start at 1).
    pub next_seq: u64,
    /// The store's epoch when `last` was read; `None` before the first sync. Another epoch
    /// means the store was reset (restarted empty): `last` means nothing there.
    pub epoch: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    last: String,
    next_seq: u64,
    epoch: Option<String>,
}

/// Why the cursor file could not be read or written. Names the file.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("fleet cursor {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(
        "fleet cursor {path} is damaged ({why}); the node does not guess its position or its \
         next seq: restore the file, or remove it to start over (position from the snapshot, \
         seqs from 1)"
    )]
    Damaged { path: PathBuf, why: String },
}

/// `fleet.json` in a state directory, with the cursor it holds.
#[derive(Debug)]
pub struct CursorFile {
    dir: PathBuf,
    cursor: Cursor,
}

impl CursorFile {
    /// Loads `dir/fleet.json`; a missing file is a node that never synced (seq 1, no position).
    pub fn load(dir: &Path) -> Result<CursorFile, CursorError> {
        let path = dir.join(CURSOR_FILE);
        let cursor = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Cursor {
                next_seq: 1,
                ..Cursor::default()
            },
            Err(err) => return Err(CursorError::Io { path, err }),
            Ok(meta) => {
                if meta.len() > MAX_CURSOR_BYTES {
                    return Err(CursorError::Damaged {
                        path,
                        why: format!("larger than {MAX_CURSOR_BYTES} bytes"),
                    });
                }
                let bytes = std::fs::read(&path).map_err(|err| CursorError::Io {
                    path: path.clone(),
                    err,
                })?;
                parse(&bytes).map_err(|why| CursorError::Damaged { path, why })?
            }
        };
        remove_stale_temporaries(dir);
        Ok(CursorFile {
            dir: dir.to_owned(),
            cursor,
        })
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(CURSOR_FILE)
    }

    /// Replaces the position and epoch and writes the file; in memory only once on disk, so
    /// a failed write leaves both as they were (the next pass reads the same entries again;
    /// entries are idempotent per subject).
    pub fn advance(&mut self, last: StreamPos, epoch: Option<String>) -> Result<(), CursorError> {
        if self.cursor.last == last && self.cursor.epoch == epoch {
            return Ok(());
        }
        let next = Cursor {
            last,
            epoch,
            next_seq: self.cursor.next_seq,
        };
        self.write(&next)?;
        self.cursor = next;
        Ok(())
    }

    /// The seq for the next published entry. The counter past it is written first, so a
    /// crash after this call loses a seq (a hole, harmless) but never reuses one.
    pub fn reserve_seq(&mut self) -> Result<u64, CursorError> {
        let seq = self.cursor.next_seq;
        let next_seq = seq.checked_add(1).ok_or_else(|| CursorError::Damaged {
            path: self.path(),
            why: "seq counter exhausted".into(),
        })?;
        let next = Cursor {
            next_seq,
            ..self.cursor.clone()
        };
        self.write(&next)?;
        self.cursor = next;
        Ok(seq)
    }

    fn write(&self, c: &Cursor) -> Result<(), CursorError> {
        let text = serde_json::to_vec(&OnDisk {
            version: VERSION,
            last: c.last.to_string(),
            next_seq: c.next_seq,
            epoch: c.epoch.clone(),
        })
        .expect("cursor serializes");
        write_new_then_rename(&self.dir, CURSOR_FILE, &text)
            .map_err(|(path, err)| CursorError::Io { path, err })
    }
}

/// A crash between creating a temporary file and its rename leaves it behind (each write
/// picks a fresh name); the next start removes them. Best effort: they are never read.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{CURSOR_FILE}.");
    for e in entries.flatten().take(10_000) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn parse(bytes: &[u8]) -> Result<Cursor, String> {
    let d: OnDisk = serde_json::from_slice(bytes).map_err(|e| format!("not its JSON: {e}"))?;
    if d.version != VERSION {
        return Err(format!(
            "version {} (this build reads {VERSION})",
            d.version
        ));
    }
    let last = d
        .last
        .parse()
        .map_err(|()| format!("last {:?} is not a stream id", d.last))?;
    if d.next_seq == 0 {
        return Err("next_seq 0 (seqs start at 1)".into());
    }
    Ok(Cursor {
        last,
        next_seq: d.next_seq,
        epoch: d.epoch,
    })
}

/// A temporary file made fresh (`create_new`, mode 0600: not one another process planted,
/// not a symlink), fsync, rename over `name`, fsync of the directory. A temporary file left
/// by a failed write is removed.
pub(super) fn write_new_then_rename(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), (PathBuf, std::io::Error)> {
    let mut rnd = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd)
        .map_err(|_| (dir.to_owned(), std::io::Error::other("no randomness")))?;
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", u64::from_be_bytes(rnd)));
    let path = dir.join(name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err((tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err((path, e));
    }
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| (dir.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "tollgate-cursor-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    #[test]
    fn round_trip_resumes_position_and_never_reuses_a_seq() {
        let d = dir("rt");
        let mut f = CursorFile::load(&d.0).unwrap();
        assert_eq!(f.cursor().next_seq, 1);
        assert_eq!(f.cursor().last, StreamPos::ZERO);
        assert_eq!(f.reserve_seq().unwrap(), 1);
        assert_eq!(f.reserve_seq().unwrap(), 2);
        let pos = StreamPos { ms: 17, seq: 3 };
        f.advance(pos, Some("e1".into())).unwrap();
        // A restart: the same position, epoch and the next seq after the last handed out.
        let mut g = CursorFile::load(&d.0).unwrap();
        assert_eq!(
            g.cursor(),
            &Cursor {
                last: pos,
                next_seq: 3,
                epoch: Some("e1".into())
            }
        );
        assert_eq!(g.reserve_seq().unwrap(), 3);
        // A temporary file left by a crash before its rename is removed at the next start.
        std::fs::write(d.0.join(".fleet.json.00000000000000aa.tmp"), b"{").unwrap();
        CursorFile::load(&d.0).unwrap();
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [CURSOR_FILE]);
    }

    #[test]
    fn a_torn_or_garbage_file_is_a_clear_error_not_a_reset() {
        let d = dir("bad");
        let mut f = CursorFile::load(&d.0).unwrap();
        f.reserve_seq().unwrap();
        f.advance(StreamPos { ms: 5, seq: 0 }, Some("e".into()))
            .unwrap();
        let good = std::fs::read(f.path()).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("torn", good[..good.len() / 2].to_vec()),
            ("empty", Vec::new()),
            ("garbage", b"\x00\xffnot json".to_vec()),
            (
                "bad position",
                br#"{"version":1,"last":"x-1","next_seq":2,"epoch":null}"#.to_vec(),
            ),
            (
                "seq zero",
                br#"{"version":1,"last":"0-0","next_seq":0,"epoch":null}"#.to_vec(),
            ),
            (
                "other version",
                br#"{"version":9,"last":"0-0","next_seq":2,"epoch":null}"#.to_vec(),
            ),
            ("too large", vec![b' '; 5000]),
        ];
        for (what, bytes) in cases {
            std::fs::write(f.path(), &bytes).unwrap();
            let e = CursorFile::load(&d.0).expect_err(what);
            let msg = e.to_string();
            assert!(
                matches!(e, CursorError::Damaged { .. })
                    && msg.contains("fleet.json")
                    && msg.contains("damaged"),
                "{what}: {msg}"
            );
            // The damaged file is left as it was (for the operator), not overwritten.
            assert_eq!(std::fs::read(f.path()).unwrap(), bytes, "{what}");
        }
    }

    #[test]
    fn a_failed_write_leaves_the_cursor_as_it_was() {
        let d = dir("ro");
        let mut f = CursorFile::load(&d.0).unwrap();
        f.reserve_seq().unwrap();
        // The directory gone: the write fails, the cursor in memory stays where it was.
        std::fs::remove_dir_all(&d.0).unwrap();
        let before = f.cursor().clone();
        assert!(f.reserve_seq().is_err());
        assert!(f.advance(StreamPos { ms: 1, seq: 1 }, None).is_err());
        assert_eq!(f.cursor(), &before);
    }
}
