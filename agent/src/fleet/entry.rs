//! Authenticated store entries: what one node tells the others through the store (a binding
//! with its token, a revocation, a quarantine, a release), signed with HMAC-SHA256 under the
//! pool key. Anyone who can write to Redis can write an entry; only a holder of the pool key
//! can write one that verifies, so the store cannot inject or lift anything on its own.
//!
//! The MAC covers a canonical encoding of exactly the fields a node applies ([`Entry`]):
//! a fixed domain tag, then every field length-prefixed in a fixed order, integers as
//! big-endian u64. A verifier rebuilds that encoding from the fields it parsed and applies
//! those same parsed fields, so no field can be changed, moved into another or reinterpreted
//! without the MAC failing. Verification order keeps unauthenticated input cheap: shape and
//! size first (bounded), then the MAC (one HMAC over at most [`MAX_PAYLOAD_BYTES`] + a few
//! hundred bytes), then the payload's JSON.
//!
//! Not decided here ([`super::apply`]'s job): whether a verified entry is fresh (an old entry
//! re-added to the stream by a store writer verifies again; the applier orders entries per
//! subject by `(wall_ms, origin, seq)` and refuses older ones `stale`).

use std::{
    fmt,
    fs::File,
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use ring::hmac;

/// Largest payload accepted: a binding carries its token (the agent's token limit is a few
/// KiB), with room for the JSON around it.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// Shortest pool key: HMAC-SHA256 gains nothing from more than the hash's 32 bytes, and less
/// weakens it.
pub const MIN_KEY_BYTES: usize = 32;
/// Longest key file read (hex text); anything larger is not a key file.
const MAX_KEY_FILE_BYTES: u64 = 4096;
/// Names (pool, origin node): short, printable, usable inside a Redis key.
pub const MAX_NAME_BYTES: usize = 64;
/// The subject (token id, identity, address) is also part of a snapshot field name.
pub const MAX_SUBJECT_BYTES: usize = 512;
/// Domain separation: a MAC made for something else under the same key never verifies here.
const DOMAIN: &[u8] = b"tollgate-fleet-entry-v1";

/// What an entry changes. The label is the wire form and the counter label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A token bind; the payload carries the token so every node re-verifies it.
    Binding,
    /// A token id revoked.
    Revocation,
    /// Every token of an identity revoked.
    IdentityRevocation,
    /// An address quarantined.
    Quarantine,
    /// A quarantine lifted.
    Release,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Binding,
        Kind::Revocation,
        Kind::IdentityRevocation,
        Kind::Quarantine,
        Kind::Release,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Binding => "binding",
            Kind::Revocation => "revocation",
            Kind::IdentityRevocation => "identity_revocation",
            Kind::Quarantine => "quarantine",
            Kind::Release => "release",
        }
    }

    /// Exact label only: an unknown or differently spelled kind is refused, never guessed.
    pub fn from_label(s: &[u8]) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.label().as_bytes() == s)
    }

    /// The snapshot slot: entries for the same slot and subject replace each other, so a
    /// release overwrites the quarantine it lifts.
    pub fn slot(self) -> &'static str {
        match self {
            Kind::Quarantine | Kind::Release => "quarantine",
            k => k.label(),
        }
    }
}

/// One change, as applied. Every field is covered by the MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// The pool (key namespace) it was written for; another pool's entry is refused even
    /// under a shared key.
    pub pool: String,
    /// The node that made the change.
    pub origin: String,
    /// The origin's sequence number (increasing per origin).
    pub seq: u64,
    /// The origin's wall clock when the change was made (ms since the epoch); informational
    /// and for ordering per subject, never a deadline.
    pub wall_ms: u64,
    /// What the change is about: the token id, identity or address. Names the snapshot field.
    pub subject: String,
    /// The kind's details as JSON text; applied from exactly these bytes.
    pub payload: String,
}

impl Entry {
    /// The snapshot hash field this entry lives in.
    pub fn snapshot_field(&self) -> String {
        format!("{}:{}", self.kind.slot(), self.subject)
    }

    /// The bytes the MAC covers.
    fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            DOMAIN.len()
                + 64
                + self.pool.len()
                + self.origin.len()
                + self.subject.len()
                + self.payload.len(),
        );
        let mut field = |b: &[u8]| {
            out.extend_from_slice(&(b.len() as u64).to_be_bytes());
            out.extend_from_slice(b);
        };
        field(DOMAIN);
        field(self.kind.label().as_bytes());
        field(self.pool.as_bytes());
        field(self.origin.as_bytes());
        field(&self.seq.to_be_bytes());
        field(&self.wall_ms.to_be_bytes());
        field(self.subject.as_bytes());
        field(self.payload.as_bytes());
        out
    }
}

/// Why a stored entry was not applied. Labels are stable (counter labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A field missing, repeated, not UTF-8, not a number, or a name/subject out of bounds.
    Malformed,
    /// A kind this node does not know.
    UnknownKind,
    /// The payload is larger than [`MAX_PAYLOAD_BYTES`].
    PayloadTooLarge,
    /// Written for another pool.
    OtherPool,
    /// The MAC does not match (written without the pool key, or altered).
    BadMac,
    /// The MAC matches but the payload is not a JSON object.
    BadPayload,
    /// A snapshot entry stored under a field other than its own.
    Misplaced,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Malformed,
        Refusal::UnknownKind,
        Refusal::PayloadTooLarge,
        Refusal::OtherPool,
        Refusal::BadMac,
        Refusal::BadPayload,
        Refusal::Misplaced,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::UnknownKind => "unknown_kind",
            Refusal::PayloadTooLarge => "payload_too_large",
            Refusal::OtherPool => "other_pool",
            Refusal::BadMac => "bad_mac",
            Refusal::BadPayload => "bad_payload",
            Refusal::Misplaced => "misplaced",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Malformed => "entry malformed (field missing, repeated or out of bounds)",
            Refusal::UnknownKind => "entry of an unknown kind",
            Refusal::PayloadTooLarge => "entry payload larger than the limit",
            Refusal::OtherPool => "entry written for another pool",
            Refusal::BadMac => "entry MAC does not verify under the pool key",
            Refusal::BadPayload => "entry payload is not a JSON object",
            Refusal::Misplaced => "snapshot entry stored under another entry's field",
        })
    }
}

impl std::error::Error for Refusal {}

/// An entry whose MAC verified under this pool's key, for this pool. Only [`PoolKey::verify`]
/// makes one, so code that applies entries can demand this type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified(Entry);

impl Verified {
    pub fn entry(&self) -> &Entry {
        &self.0
    }

    pub fn into_entry(self) -> Entry {
        self.0
    }
}

/// Field names of an entry as stored (a stream entry's fields, or a snapshot value's).
pub mod field {
    pub const KIND: &str = "kind";
    pub const POOL: &str = "pool";
    pub const ORIGIN: &str = "origin";
    pub const SEQ: &str = "seq";
    pub const WALL_MS: &str = "wall_ms";
    pub const SUBJECT: &str = "subject";
    pub const PAYLOAD: &str = "payload";
    pub const MAC: &str = "mac";
    pub const ALL: [&str; 8] = [KIND, POOL, ORIGIN, SEQ, WALL_MS, SUBJECT, PAYLOAD, MAC];
}

/// An entry with its MAC, in stored form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub entry: Entry,
    pub mac: [u8; 32],
}

impl Signed {
    /// The stored fields, in [`field::ALL`] order; the MAC as lowercase hex.
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let e = &self.entry;
        vec![
            (field::KIND, e.kind.label().as_bytes().to_vec()),
            (field::POOL, e.pool.as_bytes().to_vec()),
            (field::ORIGIN, e.origin.as_bytes().to_vec()),
            (field::SEQ, e.seq.to_string().into_bytes()),
            (field::WALL_MS, e.wall_ms.to_string().into_bytes()),
            (field::SUBJECT, e.subject.as_bytes().to_vec()),
            (field::PAYLOAD, e.payload.as_bytes().to_vec()),
            (field::MAC, hex(&self.mac).into_bytes()),
        ]
    }

    /// One byte string for a snapshot hash value: the fields as a JSON object of strings
    /// (names and payload are UTF-8 by construction).
    pub fn to_snapshot_value(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .to_fields()
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    serde_json::Value::String(String::from_utf8_lossy(&v).into_owned()),
                )
            })
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    /// Parses stored fields. Cheap and bounded: sizes are checked before anything is copied.
    /// Unknown extra fields are refused (`malformed`) so what is stored is exactly what is
    /// signed.
    pub fn from_fields<'a, I>(fields: I) -> Result<Signed, Refusal>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let mut got: [Option<&[u8]>; 8] = [None; 8];
        for (name, value) in fields {
            let i = field::ALL
                .iter()
                .position(|f| *f == name)
                .ok_or(Refusal::Malformed)?;
            if got[i].replace(value).is_some() {
                return Err(Refusal::Malformed);
            }
        }
        let [kind, pool, origin, seq, wall_ms, subject, payload, mac] = got;
        let (Some(kind), Some(pool), Some(origin), Some(seq), Some(wall_ms)) =
            (kind, pool, origin, seq, wall_ms)
        else {
            return Err(Refusal::Malformed);
        };
        let (Some(subject), Some(payload), Some(mac)) = (subject, payload, mac) else {
            return Err(Refusal::Malformed);
        };
        let kind = Kind::from_label(kind).ok_or(Refusal::UnknownKind)?;
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Refusal::PayloadTooLarge);
        }
        let entry = Entry {
            kind,
            pool: name(pool)?,
            origin: name(origin)?,
            seq: number(seq)?,
            wall_ms: number(wall_ms)?,
            subject: subject_text(subject)?,
            payload: String::from_utf8(payload.to_vec()).map_err(|_| Refusal::Malformed)?,
        };
        let mac = unhex32(mac).ok_or(Refusal::Malformed)?;
        Ok(Signed { entry, mac })
    }

    /// Parses a snapshot hash value ([`Signed::to_snapshot_value`]).
    pub fn from_snapshot_value(value: &[u8]) -> Result<Signed, Refusal> {
        // The largest honest value: the payload (JSON-escaped, at most 6 bytes per byte) and
        // the other fields; anything longer is refused before parsing.
        if value.len() > 6 * MAX_PAYLOAD_BYTES + 4096 {
            return Err(Refusal::PayloadTooLarge);
        }
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(value).map_err(|_| Refusal::Malformed)?;
        let mut fields = Vec::with_capacity(map.len());
        for (k, v) in &map {
            let serde_json::Value::String(s) = v else {
                return Err(Refusal::Malformed);
            };
            fields.push((k.as_str(), s.as_bytes()));
        }
        Signed::from_fields(fields)
    }
}

/// Whether `s` is usable as a pool or node name (1 to [`MAX_NAME_BYTES`] of
/// `[A-Za-z0-9._-]`): short, printable, safe inside a Redis key.
pub fn valid_name(s: &str) -> bool {
    name(s.as_bytes()).is_ok()
}

/// [`valid_name`]'s rule in words, for the refusals that quote it (config check, the store).
pub fn name_rule() -> String {
    format!("1 to {MAX_NAME_BYTES} characters of A-Z, a-z, 0-9, '.', '_', '-'")
}

fn name(b: &[u8]) -> Result<String, Refusal> {
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME_BYTES
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !ok {
        return Err(Refusal::Malformed);
    }
    String::from_utf8(b.to_vec()).map_err(|_| Refusal::Malformed)
}

/// Subjects are token ids, identities and addresses: printable ASCII without spaces.
fn subject_text(b: &[u8]) -> Result<String, Refusal> {
    let ok =
        !b.is_empty() && b.len() <= MAX_SUBJECT_BYTES && b.iter().all(|c| c.is_ascii_graphic());
    if !ok {
        return Err(Refusal::Malformed);
    }
    String::from_utf8(b.to_vec()).map_err(|_| Refusal::Malformed)
}

fn number(b: &[u8]) -> Result<u64, Refusal> {
    // Digits only (no sign, no spaces) and no leading zero: one spelling per number.
    if b.is_empty()
        || b.len() > 20
        || !b.iter().all(u8::is_ascii_digit)
        || (b.len() > 1 && b[0] == b'0')
    {
        return Err(Refusal::Malformed);
    }
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Refusal::Malformed)
}

/// Checks an entry's own fields before it is signed: what a node publishes must be what
/// every other node would accept.
pub fn check_entry(e: &Entry) -> Result<(), Refusal> {
    name(e.pool.as_bytes())?;
    name(e.origin.as_bytes())?;
    subject_text(e.subject.as_bytes())?;
    if e.payload.len() > MAX_PAYLOAD_BYTES {
        return Err(Refusal::PayloadTooLarge);
    }
    json_object(&e.payload)
}

fn json_object(payload: &str) -> Result<(), Refusal> {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        _ => Err(Refusal::BadPayload),
    }
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 15)] as char);
    }
    s
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

fn unhex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    unhex(s)?.try_into().ok()
}

/// Why the pool key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("pool key file {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error(
        "pool key file {path} is accessible to other users (mode {mode:o}); chmod 600 or 640 it"
    )]
    Permissions { path: String, mode: u32 },
    #[error("pool key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")]
    TooLarge { path: String },
    #[error("pool key file {path} is not hex text (one line, e.g. `openssl rand -hex 32`)")]
    NotHex { path: String },
    #[error("pool key file {path} holds {len} bytes; at least {MIN_KEY_BYTES} are needed")]
    TooShort { path: String, len: usize },
}

/// The pool key: every node of a pool holds the same one. Debug never shows it.
#[derive(Clone)]
pub struct PoolKey {
    key: hmac::Key,
    pool: String,
}

impl fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolKey")
            .field("pool", &self.pool)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PoolKey {
    /// Loads the key from a file holding it as hex text (whitespace around it ignored).
    /// Refuses a file other users can access (any "other" permission bit) and a key shorter
    /// than [`MIN_KEY_BYTES`].
    pub fn load(path: &Path, pool: &str) -> Result<PoolKey, KeyError> {
        let p = || path.display().to_string();
        let io = |err| KeyError::Io { path: p(), err };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(KeyError::Permissions { path: p(), mode });
        }
        if meta.size() > MAX_KEY_FILE_BYTES {
            return Err(KeyError::TooLarge { path: p() });
        }
        let mut text = Vec::new();
        file.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io)?;
        let key = unhex(text.trim_ascii()).ok_or_else(|| KeyError::NotHex { path: p() })?;
        PoolKey::from_bytes(&key, pool).map_err(|len| KeyError::TooShort { path: p(), len })
    }

    /// A key from raw bytes; `Err(len)` when shorter than [`MIN_KEY_BYTES`].
    pub fn from_bytes(key: &[u8], pool: &str) -> Result<PoolKey, usize> {
        if key.len() < MIN_KEY_BYTES {
            return Err(key.len());
        }
        Ok(PoolKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            pool: pool.to_string(),
        })
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Signs an entry of this pool. Refuses (with the label another node would give) an entry
    /// no node would accept, so a node never publishes what it would refuse itself.
    pub fn sign(&self, entry: Entry) -> Result<Signed, Refusal> {
        check_entry(&entry)?;
        if entry.pool != self.pool {
            return Err(Refusal::OtherPool);
        }
        let tag = hmac::sign(&self.key, &entry.canonical());
        let mut mac = [0u8; 32];
        mac.copy_from_slice(tag.as_ref());
        Ok(Signed { entry, mac })
    }

    /// Verifies a parsed entry: this pool's, MAC over its canonical encoding (constant-time
    /// comparison in ring), then the payload's JSON.
    pub fn verify(&self, signed: Signed) -> Result<Verified, Refusal> {
        if signed.entry.pool != self.pool {
            return Err(Refusal::OtherPool);
        }
        hmac::verify(&self.key, &signed.entry.canonical(), &signed.mac)
            .map_err(|_| Refusal::BadMac)?;
        json_object(&signed.entry.payload)?;
        Ok(Verified(signed.entry))
    }

    /// Parses and verifies stored fields in one step.
    pub fn verify_fields<'a, I>(&self, fields: I) -> Result<Verified, Refusal>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        self.verify(Signed::from_fields(fields)?)
    }

    /// Parses and verifies a snapshot value found under `field_name`; an entry stored under
    /// another entry's field (copied there by a store writer) is `misplaced`.
    pub fn verify_snapshot(&self, field_name: &[u8], value: &[u8]) -> Result<Verified, Refusal> {
        let v = self.verify(Signed::from_snapshot_value(value)?)?;
        if v.entry().snapshot_field().as_bytes() != field_name {
            return Err(Refusal::Misplaced);
        }
        Ok(v)
    }
}

/// Writes a fresh key file for tests and tools: 32 random bytes as hex, mode 0600.
pub fn write_key_file(path: &Path) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(hex(&key).as_bytes())?;
    f.write_all(b"\n")
}

#[cfg(test)]
mod tests;
