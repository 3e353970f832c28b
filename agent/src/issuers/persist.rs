//! The last good JWKS of a remote source, kept in `state_dir/jwks/<name>.json` so that a node
//! restarted while its identity provider is unreachable still verifies tokens (up to
//! `max_stale` after the fetch). Written atomically (a temporary file, fsync, rename, fsync of
//! the directory): a crash leaves the old file or the new one, never half of one. Used on
//! start only when the name and the source are the same: another URL's keys are not this
//! source's keys.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

/// 2: the fetch's instant is also kept on the boot clock (`boot_id`, `fetched_boot_ns`).
const VERSION: u32 = 2;

/// When a fetch happened, on the two clocks that mean something after a restart: the boot
/// clock within the same boot (it does not step), the wall clock across a reboot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetched {
    /// Wall time of the fetch (ms).
    pub wall_ms: u64,
    /// `/proc/sys/kernel/random/boot_id` of the boot it happened in (empty: unknown).
    pub boot_id: String,
    /// CLOCK_BOOTTIME at the fetch (ns): what agent time runs on.
    pub boot_ns: u64,
}

impl Fetched {
    /// Now.
    pub fn now() -> Fetched {
        Fetched {
            wall_ms: crate::clock::wall_ms(),
            boot_id: crate::clock::boot_id(),
            boot_ns: crate::tables::boot_ns(),
        }
    }
}

/// What is kept of a good fetch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub name: String,
    /// [`super::SourceConfig::describe`] of the source it was fetched for.
    pub source: String,
    /// Discovery: the `jwks_uri` the JWKS came from.
    pub jwks_uri: Option<String>,
    pub fetched: Fetched,
    /// The JWKS as fetched.
    pub jwks: String,
}

impl Saved {
    pub fn new(
        name: &str,
        source: &str,
        jwks_uri: Option<String>,
        fetched: Fetched,
        jwks: String,
    ) -> Saved {
        Saved {
            version: VERSION,
            name: name.to_owned(),
            source: source.to_owned(),
            jwks_uri,
            fetched,
            jwks,
        }
    }
}

pub fn path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("jwks").join(format!("{name}.json"))
}

/// Temporary file names taken by this process (with its pid: unique among writers).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new temporary file beside `name`'s, created exclusively (`O_EXCL`: never a file, or a
/// link, someone else made): the daemon and `tollgate token verify` may both write.
fn create_tmp(dir: &Path, name: &str, counter: &AtomicU64) -> io::Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..8 {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.json.{}.{n}.tmp", std::process::id()));
        match File::options().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary file name free")))
}

#[cfg(test)]
pub(super) static SAVES: std::sync::Mutex<Vec<(PathBuf, std::thread::ThreadId)>> =
    std::sync::Mutex::new(Vec::new());

/// Replaces the saved JWKS of `saved.name`. Blocking (fsync): not for the agent's thread.
pub fn save(state_dir: &Path, saved: &Saved) -> io::Result<()> {
    #[cfg(test)]
    SAVES
        .lock()
        .unwrap()
        .push((state_dir.to_owned(), std::thread::current().id()));
    let dir = state_dir.join("jwks");
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_vec(saved).map_err(io::Error::other)?;
    let (tmp, mut f) = create_tmp(&dir, &saved.name, &TMP_COUNTER)?;
    let written = f
        .write_all(&text)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path(state_dir, &saved.name)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    File::open(&dir)?.sync_all()
}

/// The saved JWKS for this name and source: `Ok(None)` when there is none, `Err` (why it is
/// not used) when there is one that cannot be read, is larger than a JWKS of `max_bytes`
/// could make, or belongs to another source.
pub fn load(
    state_dir: &Path,
    name: &str,
    source: &str,
    max_bytes: usize,
) -> Result<Option<Saved>, String> {
    let p = path(state_dir, name);
    let f = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", p.display())),
    };
    // JSON string escaping grows a JWKS at most sixfold (`\u00XX`), plus the other members.
    let limit = max_bytes.saturating_mul(6).saturating_add(64 * 1024);
    let mut text = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    if text.len() > limit {
        return Err(format!("{}: larger than {limit} bytes", p.display()));
    }
    let saved: Saved =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))?;
    if saved.version != VERSION || saved.name != name || saved.source != source {
        return Err(format!(
            "{}: saved for {:?} from {:?} (version {}), not for {name:?} from {source:?}",
            p.display(),
            saved.name,
            saved.source,
            saved.version
        ));
    }
    Ok(Some(saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tollgate-persist-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_saved_jwks_loads_back_for_the_same_name_and_source_only() {
        let d = dir("roundtrip");
        let saved = Saved::new(
            "idp",
            "https://idp.example/certs",
            None,
            Fetched::now(),
            r#"{"keys":[]}"#.into(),
        );
        assert_eq!(load(&d, "idp", "https://idp.example/certs", 1024), Ok(None));
        save(&d, &saved).unwrap();
        assert_eq!(
            load(&d, "idp", "https://idp.example/certs", 1024),
            Ok(Some(saved.clone()))
        );
        // Replaced whole; no temporary file left behind.
        let newer = Saved {
            fetched: Fetched {
                wall_ms: 5_678,
                ..saved.fetched.clone()
            },
            ..saved
        };
        save(&d, &newer).unwrap();
        assert_eq!(
            load(&d, "idp", "https://idp.example/certs", 1024).unwrap(),
            Some(newer)
        );
        let names: Vec<_> = std::fs::read_dir(d.join("jwks"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["idp.json"]);
        // Another source's keys, another name's file: not used.
        assert!(
            load(&d, "idp", "https://other.example/certs", 1024)
                .unwrap_err()
                .contains("not for")
        );
        assert_eq!(
            load(&d, "other", "https://idp.example/certs", 1024),
            Ok(None)
        );
        std::fs::write(path(&d, "idp"), "{").unwrap();
        assert!(load(&d, "idp", "https://idp.example/certs", 1024).is_err());
        std::fs::write(path(&d, "idp"), vec![b' '; 80 * 1024]).unwrap();
        assert!(
            load(&d, "idp", "https://idp.example/certs", 1024)
                .unwrap_err()
                .contains("larger than")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_temporary_file_someone_made_is_never_written_through() {
        let d = dir("tmp");
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join("target");
        std::fs::write(&target, "untouched").unwrap();
        let counter = AtomicU64::new(0);
        let first = d.join(format!(".idp.json.{}.0.tmp", std::process::id()));
        std::os::unix::fs::symlink(&target, &first).unwrap();
        let (tmp, mut f) = create_tmp(&d, "idp", &counter).unwrap();
        f.write_all(b"new").unwrap();
        assert_ne!(tmp, first, "the taken name was skipped");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
