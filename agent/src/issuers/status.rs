//! What `tollgate status` and `/metrics` show of one issuer's keys ([`super::Keys::status`]):
//! typed on both ends of the control socket, so it is `Serialize` and `Deserialize`.

use serde::{Deserialize, Serialize};

/// The state of one issuer's keys, for `tollgate status` and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysStatus {
    pub name: String,
    /// `file`, `jwks_url` or `discovery`.
    pub source: String,
    /// The file, the `jwks_url`, or the discovery URL.
    pub location: String,
    /// Discovery: the `jwks_uri` last used.
    pub jwks_uri: Option<String>,
    /// The usable keys' ids.
    pub kids: Vec<String>,
    /// Keys of the JWKS that are not used, and why.
    pub skipped: Vec<SkippedKey>,
    /// Seconds since the keys in use were last fetched (or read); `None`: no keys.
    pub age_s: Option<u64>,
    pub last_fetch: Option<LastFetch>,
    /// Fetches by trigger and outcome (pairs that happened).
    pub fetches: Vec<FetchCount>,
    /// Unknown-kid refetches not made because one was made within the cooldown.
    pub refetches_suppressed: u64,
    /// Remote keys that the last fetch could not renew (served until `max_stale_s`).
    pub stale: bool,
    /// Tokens of this issuer are refused `keys_unavailable` now.
    pub unavailable: bool,
    /// Why `unavailable` (for the operator: it may name an internal URL); `None` when usable.
    #[serde(default)]
    pub unavailable_why: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedKey {
    /// Position in the JWKS's `keys`, from 0.
    pub index: usize,
    pub kid: Option<String>,
    /// A stable label (`encryption_key`, `unsupported_alg`, ...).
    pub reason: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastFetch {
    pub trigger: String,
    pub outcome: String,
    pub error: Option<String>,
    /// Wall time (ms) the fetch ended.
    pub at_wall_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchCount {
    pub trigger: String,
    pub outcome: String,
    pub count: u64,
}
