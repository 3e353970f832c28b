//! The XDP object the agent loads: the one `build.rs` embedded in the binary, or one staged
//! from a file (`tollgate run --program-object PATH`, `TOLLGATE_PROGRAM_OBJECT`) to roll out
//! a rebuilt program without a new agent binary. Either is checked against the pins the same
//! way (`pins::check_compatible` reads its map definitions from [`bytes`]), and a program the
//! verifier refuses is recorded in the state directory ([`record_load_failure`]) so that the
//! agent that runs next shows it in `status` and `/metrics`.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use serde::{Deserialize, Serialize};

/// The object staged from a file for the life of the process, and where it came from.
static STAGED: OnceLock<(PathBuf, &'static [u8])> = OnceLock::new();

/// The embedded object.
pub fn embedded() -> &'static [u8] {
    // Aligned so that aya can parse the ELF in place.
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate"))
}

/// The ELF object holding the `tollgate` and `tollgate_noop` XDP programs and their maps:
/// the staged one if [`stage`] was called, else the embedded one.
pub fn bytes() -> &'static [u8] {
    STAGED.get().map_or_else(embedded, |(_, b)| b)
}

/// Where the program comes from: "embedded" or the staged file's path.
pub fn source() -> String {
    STAGED
        .get()
        .map_or_else(|| "embedded".to_owned(), |(p, _)| p.display().to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("program object {path}: {message}")]
    Read { path: String, message: String },
    #[error("program object {path} is not a BPF ELF object: {message}")]
    Parse { path: String, message: String },
    #[error("program object {path} has no XDP program `{program}`")]
    NoProgram { path: String, program: &'static str },
    #[error("a program object is already staged ({0}); it is set once, at start")]
    AlreadyStaged(String),
    #[error(
        "program object {path}: {why}; it is loaded with the agent's privileges, so it and its \
         directory must be owned by root (or the agent's user) and writable by no one else"
    )]
    Untrusted { path: String, why: String },
}

/// Refuses an object that someone other than root or the agent's own user could have
/// written: the file (symbolic links resolved) and the directory holding it must be owned by
/// one of them and not writable by group or others, as sshd's StrictModes asks of keys. A
/// pass-all program with the right map layout would otherwise be one write away.
fn check_trusted(path: &Path) -> Result<(), StageError> {
    use std::os::unix::fs::MetadataExt as _;
    let untrusted = |why: String| StageError::Untrusted {
        path: path.display().to_string(),
        why,
    };
    let real = std::fs::canonicalize(path).map_err(|e| StageError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let dir = real.parent().unwrap_or(Path::new("/"));
    for (what, p) in [("the file", real.as_path()), ("its directory", dir)] {
        let m = std::fs::metadata(p).map_err(|e| untrusted(format!("{}: {e}", p.display())))?;
        if m.uid() != 0 && m.uid() != me {
            return Err(untrusted(format!(
                "{what} ({}) is owned by uid {}",
                p.display(),
                m.uid()
            )));
        }
        if m.mode() & 0o022 != 0 {
            return Err(untrusted(format!(
                "{what} ({}) is writable by group or others (mode {:o})",
                p.display(),
                m.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

/// Stages the object in `path` for every later [`bytes`] (once per process, before the
/// pins are opened). It must parse as a BPF object and carry the enforcing program; whether
/// its maps fit the pins and whether the verifier takes it is checked when it is loaded.
pub fn stage(path: &Path) -> Result<(), StageError> {
    let shown = path.display().to_string();
    check_trusted(path)?;
    let data = std::fs::read(path).map_err(|e| StageError::Read {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    // Copied into u64s and leaked: aligned like the embedded object, alive for the process.
    let mut words = vec![0u64; data.len().div_ceil(8)];
    // SAFETY: `words` holds at least `data.len()` bytes; u8 has no alignment.
    let buf: &mut [u8] =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), data.len()) };
    buf.copy_from_slice(&data);
    let leaked: &'static [u8] = {
        let words: &'static mut [u64] = Box::leak(words.into_boxed_slice());
        // SAFETY: as above, over the leaked (never freed) allocation.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), data.len()) }
    };
    let obj = aya_obj::Object::parse(leaked).map_err(|e| StageError::Parse {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    // Both entries: a staged object without the layer-3 one (an older build) would only
    // fail later, when the pins are opened, and read as a verifier refusal.
    for program in [
        tollgate_common::program_names::XDP,
        tollgate_common::program_names::XDP_L3,
    ] {
        if !obj.programs.contains_key(program) {
            return Err(StageError::NoProgram {
                path: shown,
                program,
            });
        }
    }
    STAGED
        .set((path.to_owned(), leaked))
        .map_err(|_| StageError::AlreadyStaged(source()))
}

/// The record of program loads that failed on this node (`program-load-failures.json` in
/// the state directory): kept across restarts, so that the agent started after a failed
/// upgrade says so in `status` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadFailures {
    /// Failed loads recorded in this state directory.
    pub total: u64,
    /// The last one.
    pub last: Option<LoadFailure>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadFailure {
    pub at_unix_ms: u64,
    /// "embedded" or the staged file.
    pub object: String,
    /// The error, the verifier's last lines included (cut to [`ERROR_MAX`] bytes).
    pub error: String,
}

const FAILURES_FILE: &str = "program-load-failures.json";

/// The verifier's log can run to megabytes; the record keeps its end, where the reason is.
pub const ERROR_MAX: usize = 4096;

/// What `state_dir` records (nothing when there is no record or it cannot be read).
pub fn load_failures(state_dir: &Path) -> LoadFailures {
    std::fs::read(state_dir.join(FAILURES_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Adds a failed load of [`source`]'s program to the record in `state_dir`.
pub fn record_load_failure(
    state_dir: &Path,
    error: &str,
    now_unix_ms: u64,
) -> std::io::Result<LoadFailures> {
    let mut r = load_failures(state_dir);
    let mut cut = error.len().saturating_sub(ERROR_MAX);
    while !error.is_char_boundary(cut) {
        cut += 1;
    }
    r.total += 1;
    r.last = Some(LoadFailure {
        at_unix_ms: now_unix_ms,
        object: source(),
        error: error[cut..].to_owned(),
    });
    let bytes = serde_json::to_vec_pretty(&r).map_err(std::io::Error::other)?;
    crate::state::write_atomically(state_dir, FAILURES_FILE, &bytes).map_err(|(_, e)| e)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_record_keeps_the_end_of_a_long_error_and_counts() {
        let dir = std::env::temp_dir().join(format!("tollgate-object-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load_failures(&dir), LoadFailures::default());
        let long = format!("{}R5 !read_ok", "é".repeat(ERROR_MAX));
        record_load_failure(&dir, "first", 1).unwrap();
        let r = record_load_failure(&dir, &long, 2).unwrap();
        assert_eq!(r.total, 2);
        let last = r.last.unwrap();
        assert!(last.error.ends_with("R5 !read_ok") && last.error.len() <= ERROR_MAX);
        assert_eq!(load_failures(&dir).total, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fresh directory of mode `mode` under the temporary directory.
    fn private_dir(tag: &str, mode: u32) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("tollgate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        dir
    }

    #[test]
    fn staging_refuses_what_is_not_a_program_object() {
        let dir = private_dir("notelf", 0o700);
        let f = dir.join("tollgate.o");
        std::fs::write(&f, b"not an object").unwrap();
        let e = stage(&f).unwrap_err();
        assert!(matches!(e, StageError::Parse { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let e = stage(Path::new("/nonexistent/tollgate.o")).unwrap_err();
        assert!(matches!(e, StageError::Read { .. }), "{e}");
    }

    #[test]
    fn staging_refuses_an_object_others_could_have_written() {
        use std::os::unix::fs::PermissionsExt as _;
        // A directory anyone may write to (the temporary directory itself is one).
        let open = private_dir("openobj", 0o777);
        let f = open.join("tollgate.o");
        std::fs::write(&f, b"x").unwrap();
        let e = stage(&f).unwrap_err();
        assert!(
            matches!(&e, StageError::Untrusted { why, .. } if why.contains("its directory")),
            "{e}"
        );
        // A file others may write, in a private directory.
        let dir = private_dir("wobj", 0o700);
        let f = dir.join("tollgate.o");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = stage(&f).unwrap_err();
        assert!(
            matches!(&e, StageError::Untrusted { why, .. } if why.contains("the file")),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&open);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
