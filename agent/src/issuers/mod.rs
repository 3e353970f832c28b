//! An issuer's keys ([`Keys`]): read from a JWKS file, or fetched over HTTPS from a
//! `jwks_url` or through OIDC discovery, kept fresh in the background, refetched once when a
//! token names a key the node does not know, served while the provider is unreachable for
//! up to `max_stale`, and persisted so that a restart during an outage still verifies.
//!
//! How a fetch is bounded, so that a token's unauthenticated `kid` never costs more than a
//! counter: tokens with unknown kids share one fetch in flight and start at most one per
//! `refetch_cooldown_s` ([`cache::refetch_allowed`]); every GET has a byte limit and one
//! timeout (`fetch`); the background schedule fetches no more often than `cache_min_s`
//! ([`cache::lifetime_s`]). A fetch runs as its own local task, so a bind that gives up
//! waiting (its connection's timeout) cancels nothing the others wait on.
//!
//! What a failed fetch changes: only its outcome and counters. The keys in use stay, and
//! so does a JWKS that is refused (not JSON, no `keys` array, too large): the last good keys
//! serve until they are older than `max_stale_s`, then [`Keys::current`] answers
//! [`KeysUnavailable`] (the refusal `keys_unavailable`) until a fetch succeeds again. A JWKS
//! that parses but holds no usable key is not a failure: it replaces the keys (the provider
//! withdrew them; tokens then get `unknown_kid` or `key_unusable`), counted as `no_keys`.
//!
//! Single-threaded: the agent runs on a `LocalSet`; state is in `RefCell`/`Cell`, no borrow is
//! held across an await, and the async methods must run inside a `LocalSet`.

pub mod cache;
pub mod discovery;
pub mod fetch;
pub mod outcome;
pub mod persist;
pub mod source;
pub mod status;
#[cfg(test)]
mod tests;

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    path::Path,
    rc::Rc,
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;
use tollgate_common::token::{JwksError, KeySet, Refusal};
use tracing::{info, warn};

pub use outcome::{OUTCOMES, Outcome, TRIGGERS, Trigger};
pub use source::{SourceConfig, SourceKind, check_https_url};
pub use status::{FetchCount, KeysStatus, LastFetch, SkippedKey};

use crate::clock;
use fetch::{Client, FetchError, fail};
use source::HttpsUrl;

/// How often a key file's modification time is looked at.
const FILE_POLL: Duration = Duration::from_secs(2);
/// The background schedule never fetches more often than this, whatever the bounds say.
const MIN_INTERVAL_MS: u64 = 1_000;

/// [`Keys::current`] has no keys to give: none were ever had, or the last good fetch is
/// older than `max_stale_s`. The token refusal is `keys_unavailable` (`Refusal::from`); `why`
/// is for the operator (it may name an internal URL), not for the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the keys of issuer {issuer:?} are unavailable: {why}")]
pub struct KeysUnavailable {
    pub issuer: String,
    pub why: String,
}

impl From<KeysUnavailable> for Refusal {
    fn from(_: KeysUnavailable) -> Refusal {
        Refusal::KeysUnavailable
    }
}

/// One issuer's keys: a cheap handle (clones share the state).
#[derive(Clone)]
pub struct Keys(Rc<Inner>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("name", &self.0.cfg.name)
            .field("source", &self.0.cfg.describe())
            .finish_non_exhaustive()
    }
}

struct Inner {
    cfg: SourceConfig,
    remote: Option<Remote>,
    state: RefCell<State>,
    /// A fetch is running (as its own task); `done` wakes its waiters when it ends.
    in_flight: Cell<bool>,
    done: Notify,
    /// The next JWKS to persist (the newest wins: an older one is never written after it),
    /// a writer task running, and its end.
    persist_next: RefCell<Option<(persist::Saved, u64)>>,
    persisting: Cell<bool>,
    persist_done: Notify,
}

struct Remote {
    client: Client,
    /// `jwks_url`, or (discovery) the discovery document's URL.
    url: HttpsUrl,
}

#[derive(Default)]
struct State {
    keys: Option<Rc<KeySet>>,
    /// Agent time of the last good fetch (or read) of the keys in use.
    fetched_ms: Option<u64>,
    /// Discovery: the `jwks_uri`, and until when (agent time) it is used without asking again.
    jwks_uri: Option<String>,
    discovery_until_ms: u64,
    /// When the background schedule fetches next (agent time).
    next_due_ms: u64,
    last: Option<LastFetch>,
    last_outcome: Option<Outcome>,
    fetches: BTreeMap<(Trigger, Outcome), u64>,
    last_unknown_kid_ms: Option<u64>,
    suppressed: u64,
    file_mtime: Option<SystemTime>,
    /// The last fetch failed: the keys in use are from an earlier one.
    failed_since_good: bool,
    /// Why the persisted keys were not used (until a fetch succeeds, [`Keys::current`] says).
    persisted_refused: Option<String>,
    /// What was last persisted (JWKS text, jwks_uri) and the agent time of its fetch.
    persisted: Option<(String, Option<String>, u64)>,
}

/// A good fetch: the keys, the JWKS they came from, and how long to use it.
struct Good {
    keys: KeySet,
    text: String,
    max_age_s: Option<u64>,
    jwks_uri: Option<String>,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The keys of a JWKS document, or why the document is refused (and the old keys kept): not
/// UTF-8, not JSON, no `keys` array. A document that parses is the provider's word even when
/// none of its keys is usable: [`Keys::record`] adopts it (outcome `no_keys`).
fn key_set(body: Vec<u8>) -> Result<(KeySet, String), FetchError> {
    let text = String::from_utf8(body)
        .map_err(|_| fail(Outcome::NotJson, "the JWKS is not UTF-8 text"))?;
    let keys = KeySet::from_jwks(&text).map_err(|e| match e {
        JwksError::Json(_) => fail(Outcome::NotJson, e.to_string()),
        JwksError::NoKeys => fail(Outcome::NoKeys, e.to_string()),
    })?;
    Ok((keys, text))
}

/// Why a parsed JWKS gives no usable key, for the operator.
fn no_usable_key(keys: &KeySet) -> String {
    let first = keys
        .skipped()
        .first()
        .map_or_else(String::new, |s| format!("; the first: {s}"));
    format!(
        "the JWKS holds no usable key ({} skipped{first}): taken as it is, every token of this issuer is refused",
        keys.skipped().len()
    )
}

/// The keys a JWKS held that the set does not use.
fn skipped_of(keys: &KeySet) -> Vec<SkippedKey> {
    keys.skipped()
        .iter()
        .map(|s| SkippedKey {
            index: s.index,
            kid: s.kid.clone(),
            reason: s.reason.label().into(),
            message: s.to_string(),
        })
        .collect()
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Keys {
    /// A file source reads its file now (an error is a configuration error). A remote
    /// source loads its roots and the persisted last good JWKS (if it is this source's);
    /// it never waits on the network: [`Keys::run`] fetches.
    pub fn new(cfg: SourceConfig) -> Result<Keys, String> {
        if !valid_name(&cfg.name) {
            return Err(format!(
                "issuer name {:?}: 1 to 64 letters, digits, '_' or '-'",
                cfg.name
            ));
        }
        let mut state = State::default();
        let remote = match &cfg.kind {
            SourceKind::File(path) => {
                state.file_mtime = mtime(path);
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let keys =
                    KeySet::from_jwks(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                state.keys = Some(Rc::new(keys));
                state.fetched_ms = Some(clock::now_ms());
                None
            }
            SourceKind::JwksUrl(url) => Some(Remote {
                client: Client::new(cfg.fetch.ca_bundle.as_deref())?,
                url: HttpsUrl::parse(url).map_err(|e| format!("jwks_url {e}"))?,
            }),
            SourceKind::Discovery => {
                let url = cfg
                    .discovery_url()
                    .ok_or("discovery needs the issuer's URL (`issuer`)")?;
                Some(Remote {
                    client: Client::new(cfg.fetch.ca_bundle.as_deref())?,
                    url: HttpsUrl::parse(&url).map_err(|e| format!("issuer {e}"))?,
                })
            }
        };
        if remote.is_some() {
            load_persisted(&cfg, &mut state);
        }
        Ok(Keys(Rc::new(Inner {
            cfg,
            remote,
            state: RefCell::new(state),
            in_flight: Cell::new(false),
            done: Notify::new(),
            persist_next: RefCell::new(None),
            persisting: Cell::new(false),
            persist_done: Notify::new(),
        })))
    }

    pub fn name(&self) -> String {
        self.0.cfg.name.clone()
    }

    pub fn is_remote(&self) -> bool {
        self.0.remote.is_some()
    }

    /// The keys to verify with at `now_ms` (agent time).
    pub fn current(&self, now_ms: u64) -> Result<Rc<KeySet>, KeysUnavailable> {
        let st = self.0.state.borrow();
        let unavailable = |why: String| KeysUnavailable {
            issuer: self.0.cfg.name.clone(),
            why,
        };
        let last_error = || {
            st.last
                .as_ref()
                .and_then(|l| l.error.clone())
                .map_or_else(String::new, |e| format!("; last fetch: {e}"))
        };
        let (Some(keys), Some(fetched)) = (&st.keys, st.fetched_ms) else {
            let persisted = st
                .persisted_refused
                .as_ref()
                .map_or_else(String::new, |why| format!("; the persisted keys: {why}"));
            return Err(unavailable(format!(
                "no keys fetched yet{persisted}{}",
                last_error()
            )));
        };
        if self.is_remote() && !cache::usable(fetched, now_ms, self.0.cfg.fetch.max_stale_s) {
            return Err(unavailable(format!(
                "the last good fetch was {} s ago, more than max_stale_s = {}{}",
                now_ms.saturating_sub(fetched) / 1000,
                self.0.cfg.fetch.max_stale_s,
                last_error()
            )));
        }
        Ok(Rc::clone(keys))
    }

    /// Whether the keys in use (stale or not) have this kid.
    pub fn knows(&self, kid: &str) -> bool {
        self.0
            .state
            .borrow()
            .keys
            .as_ref()
            .is_some_and(|k| k.get(kid).is_some())
    }

    /// Whether the JWKS had a key with this kid that the node does not use: a refetch would
    /// not change that, so such a kid never triggers one.
    pub fn is_skipped(&self, kid: &str) -> bool {
        let st = self.0.state.borrow();
        st.keys.as_ref().is_some_and(|k| k.is_skipped_kid(kid))
    }

    /// A token named a kid the keys lack: wait for the fetch in flight, or start one unless
    /// one started within the cooldown (then return at once). File sources return at once.
    pub async fn refetch_unknown_kid(&self) {
        if !self.is_remote() {
            return;
        }
        if !self.0.in_flight.get() {
            let now = clock::now_ms();
            let mut st = self.0.state.borrow_mut();
            if !cache::refetch_allowed(
                st.last_unknown_kid_ms,
                now,
                self.0.cfg.fetch.refetch_cooldown_s,
            ) {
                st.suppressed += 1;
                return;
            }
            st.last_unknown_kid_ms = Some(now);
        }
        self.fetch_joined(Trigger::UnknownKid).await;
    }

    /// One fetch now (trigger `start`), or the one in flight; its outcome. File sources
    /// re-read the file if it changed.
    pub async fn fetch_now(&self) -> Outcome {
        if !self.is_remote() {
            let _ = self.check_file();
        } else {
            self.fetch_joined(Trigger::Start).await;
        }
        self.0.state.borrow().last_outcome.unwrap_or(Outcome::Ok)
    }

    /// The background refresh; never returns. Remote: a `start` fetch, then each next when
    /// due (trigger `schedule`). File: re-read when its modification time changes.
    pub async fn run(&self) {
        if !self.is_remote() {
            loop {
                tokio::time::sleep(FILE_POLL).await;
                let _ = self.check_file();
            }
        }
        self.fetch_joined(Trigger::Start).await;
        loop {
            let wait = self
                .0
                .state
                .borrow()
                .next_due_ms
                .saturating_sub(clock::now_ms());
            tokio::time::sleep(Duration::from_millis(wait.max(MIN_INTERVAL_MS))).await;
            // An unknown-kid fetch meanwhile may have moved the next fetch later.
            if clock::now_ms() >= self.0.state.borrow().next_due_ms {
                self.fetch_joined(Trigger::Schedule).await;
            }
        }
    }

    pub fn status(&self) -> KeysStatus {
        let now = clock::now_ms();
        let cfg = &self.0.cfg;
        let unavailable = self.current(now).err().map(|e| e.why);
        let st = self.0.state.borrow();
        KeysStatus {
            name: cfg.name.clone(),
            source: cfg.kind.label().into(),
            location: cfg.describe(),
            jwks_uri: st.jwks_uri.clone(),
            kids: st.keys.as_ref().map_or_else(Vec::new, |k| {
                k.kids().into_iter().map(str::to_owned).collect()
            }),
            skipped: st.keys.as_ref().map_or_else(Vec::new, |k| skipped_of(k)),
            age_s: st.fetched_ms.map(|f| now.saturating_sub(f) / 1000),
            last_fetch: st.last.clone(),
            fetches: st
                .fetches
                .iter()
                .map(|((t, o), n)| FetchCount {
                    trigger: t.label().into(),
                    outcome: o.label().into(),
                    count: *n,
                })
                .collect(),
            refetches_suppressed: st.suppressed,
            stale: self.is_remote() && st.keys.is_some() && st.failed_since_good,
            unavailable: unavailable.is_some(),
            unavailable_why: unavailable,
        }
    }

    /// Starts a fetch as its own task unless one is in flight, and waits for it to end.
    async fn fetch_joined(&self, trigger: Trigger) {
        let inner = &self.0;
        if !inner.in_flight.get() {
            inner.in_flight.set(true);
            let keys = self.clone();
            tokio::task::spawn_local(async move {
                // Ends the flight even if the task is dropped (the runtime stopping).
                let _flight = Flight(Rc::clone(&keys.0));
                let result = keys.fetch_remote().await;
                keys.record(trigger, result);
            });
        }
        // Registered before the task can run (nothing awaited since the check): its
        // `notify_waiters` reaches this waiter.
        inner.done.notified().await;
    }

    /// One fetch, discovery included, within one `timeout_ms`: a waiter on
    /// [`Keys::refetch_unknown_kid`] waits at most that long, however many GETs it takes.
    async fn fetch_remote(&self) -> Result<Good, FetchError> {
        let timeout = Duration::from_millis(self.0.cfg.fetch.timeout_ms);
        tokio::time::timeout(timeout, self.fetch_steps(timeout))
            .await
            .unwrap_or_else(|_| {
                Err(fail(
                    Outcome::Timeout,
                    format!(
                        "{}: the fetch did not end within timeout_ms = {}",
                        self.0.cfg.describe(),
                        self.0.cfg.fetch.timeout_ms
                    ),
                ))
            })
    }

    /// The GETs of one fetch (each also bounded by `timeout`, which the whole is too).
    async fn fetch_steps(&self, timeout: Duration) -> Result<Good, FetchError> {
        let Some(remote) = &self.0.remote else {
            return Err(fail(Outcome::Io, "not a remote source"));
        };
        let cfg = &self.0.cfg;
        let (url, jwks_uri) = match cfg.kind {
            SourceKind::Discovery => {
                let cached = {
                    let st = self.0.state.borrow();
                    st.jwks_uri
                        .clone()
                        .filter(|_| clock::now_ms() < st.discovery_until_ms)
                };
                let uri = match cached {
                    Some(uri) => uri,
                    None => {
                        let doc = remote
                            .client
                            .get(&remote.url, cfg.fetch.max_bytes, timeout)
                            .await?;
                        let issuer = cfg.issuer.as_deref().unwrap_or_default();
                        let uri = discovery::jwks_uri(&doc.body, issuer)
                            .map_err(|e| fail(e.outcome, format!("{}: {e}", remote.url)))?;
                        let life = cache::lifetime_s(
                            doc.max_age_s,
                            cfg.fetch.cache_min_s,
                            cfg.fetch.cache_max_s,
                        );
                        let mut st = self.0.state.borrow_mut();
                        st.jwks_uri = Some(uri.clone());
                        st.discovery_until_ms = clock::now_ms().saturating_add(life * 1000);
                        uri
                    }
                };
                let url = HttpsUrl::parse(&uri)
                    .map_err(|e| fail(Outcome::InsecureJwksUri, e.to_string()))?;
                (url, Some(uri))
            }
            _ => (remote.url.clone(), None),
        };
        let doc = remote
            .client
            .get(&url, cfg.fetch.max_bytes, timeout)
            .await?;
        let (keys, text) = key_set(doc.body).map_err(|e| fail(e.outcome, format!("{url}: {e}")))?;
        Ok(Good {
            keys,
            text,
            max_age_s: doc.max_age_s,
            jwks_uri,
        })
    }

    /// File sources: re-reads the file if its modification time changed (a broken file
    /// keeps the keys) and says how that went; `None` when unchanged or not a file source.
    pub fn check_file(&self) -> Option<Outcome> {
        let SourceKind::File(path) = &self.0.cfg.kind else {
            return None;
        };
        let now = mtime(path);
        if now == self.0.state.borrow().file_mtime {
            return None;
        }
        self.0.state.borrow_mut().file_mtime = now;
        let result = std::fs::read(path)
            .map_err(|e| fail(Outcome::Io, format!("{}: {e}", path.display())))
            .and_then(|body| {
                key_set(body).map_err(|e| fail(e.outcome, format!("{}: {e}", path.display())))
            })
            .map(|(keys, text)| Good {
                keys,
                text,
                max_age_s: None,
                jwks_uri: None,
            });
        Some(self.record(Trigger::FileChanged, result))
    }

    /// Counts a fetch; a good one replaces the keys (and, remote, is persisted). Its outcome.
    fn record(&self, trigger: Trigger, result: Result<Good, FetchError>) -> Outcome {
        let cfg = &self.0.cfg;
        let now = clock::now_ms();
        let wall = clock::wall_ms();
        // A JWKS of no usable key is adopted (the provider withdrew its keys: keeping them
        // until max_stale would trust what it no longer does) but counted as `no_keys`.
        let (outcome, error) = match &result {
            Err(e) => (e.outcome, Some(e.message.clone())),
            Ok(good) if good.keys.is_empty() => (Outcome::NoKeys, Some(no_usable_key(&good.keys))),
            Ok(_) => (Outcome::Ok, None),
        };
        let mut st = self.0.state.borrow_mut();
        *st.fetches.entry((trigger, outcome)).or_default() += 1;
        st.last_outcome = Some(outcome);
        st.failed_since_good = result.is_err();
        st.last = Some(LastFetch {
            trigger: trigger.label().into(),
            outcome: outcome.label().into(),
            error: error.clone(),
            at_wall_ms: wall,
        });
        match result {
            Err(e) => {
                // A JWKS URL that stopped answering 200 may have moved: ask discovery again.
                if e.outcome == Outcome::HttpStatus {
                    st.discovery_until_ms = 0;
                }
                st.next_due_ms = now.saturating_add(cfg.fetch.cache_min_s.saturating_mul(1000));
                let kept = if st.keys.is_some() {
                    "keeping the keys in use"
                } else {
                    "no keys yet"
                };
                drop(st);
                warn!(issuer = %cfg.name, trigger = trigger.label(), outcome = outcome.label(), "key fetch failed, {kept}: {e}");
            }
            Ok(good) => {
                let changed = st.keys.as_ref().is_none_or(|k| **k != good.keys);
                let life =
                    cache::lifetime_s(good.max_age_s, cfg.fetch.cache_min_s, cfg.fetch.cache_max_s);
                st.next_due_ms = now.saturating_add(life.saturating_mul(1000));
                st.fetched_ms = Some(now);
                if let (true, Some(e)) = (changed, &error) {
                    warn!(issuer = %cfg.name, trigger = trigger.label(), "keys replaced by an empty set: {e}");
                } else if changed {
                    info!(issuer = %cfg.name, trigger = trigger.label(), keys = good.keys.len(), "keys replaced");
                }
                st.keys = Some(Rc::new(good.keys));
                // The same JWKS persisted less than cache_min_s ago is not written again: the
                // saved fetch time then lags by less than that, which errs towards staleness.
                let recent = st.persisted.as_ref().is_some_and(|(text, uri, at)| {
                    *text == good.text
                        && *uri == good.jwks_uri
                        && now.saturating_sub(*at) < cfg.fetch.cache_min_s.saturating_mul(1000)
                });
                drop(st);
                if self.is_remote() && !recent {
                    let saved = persist::Saved::new(
                        &cfg.name,
                        &cfg.describe(),
                        good.jwks_uri,
                        persist::Fetched::now(),
                        good.text,
                    );
                    self.persist(saved, now);
                }
            }
        }
        outcome
    }
}

impl Keys {
    /// Persists `saved` (fetched at agent time `at`) off the agent's thread: create, write,
    /// fsync and rename block, and a slow or hung state_dir must not stall binds and control
    /// requests. One writer task per source, writing the newest pending JWKS until none is.
    fn persist(&self, saved: persist::Saved, at: u64) {
        *self.0.persist_next.borrow_mut() = Some((saved, at));
        if self.0.persisting.replace(true) {
            return;
        }
        let keys = self.clone();
        tokio::task::spawn_local(async move {
            let _writing = Writing(Rc::clone(&keys.0));
            let cfg = &keys.0.cfg;
            loop {
                let Some((saved, at)) = keys.0.persist_next.borrow_mut().take() else {
                    break;
                };
                let done = (saved.jwks.clone(), saved.jwks_uri.clone(), at);
                let dir = cfg.state_dir.clone();
                let written =
                    tokio::task::spawn_blocking(move || persist::save(&dir, &saved)).await;
                match written {
                    Ok(Ok(())) => keys.0.state.borrow_mut().persisted = Some(done),
                    Ok(Err(e)) => {
                        warn!(issuer = %cfg.name, "cannot persist the fetched keys ({}): {e}", persist::path(&cfg.state_dir, &cfg.name).display());
                    }
                    Err(e) => warn!(issuer = %cfg.name, "persisting the fetched keys stopped: {e}"),
                }
            }
        });
    }

    /// Waits until the fetched keys are persisted (none pending or being written): for a
    /// short-lived process (`tollgate token verify`) before it exits, and for tests.
    pub async fn persisted(&self) {
        loop {
            let done = self.0.persist_done.notified();
            if !self.0.persisting.get() {
                return;
            }
            done.await;
        }
    }
}

/// The persist writer task; its end (or drop) lets the next one start and wakes waiters.
struct Writing(Rc<Inner>);

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.persisting.set(false);
        self.0.persist_done.notify_waiters();
    }
}

/// The fetch in flight; its end (or its task's drop) wakes every waiter.
struct Flight(Rc<Inner>);

impl Drop for Flight {
    fn drop(&mut self) {
        self.0.in_flight.set(false);
        self.0.done.notify_waiters();
    }
}

/// The persisted last good keys of this source, if any (a problem is logged: the source
/// then starts without keys, as a new one would).
fn load_persisted(cfg: &SourceConfig, state: &mut State) {
    let saved = match persist::load(
        &cfg.state_dir,
        &cfg.name,
        &cfg.describe(),
        cfg.fetch.max_bytes,
    ) {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            warn!(issuer = %cfg.name, "not using the persisted keys: {e}");
            return;
        }
    };
    let age = match cache::persisted_age_ms(&saved.fetched, &persist::Fetched::now()) {
        Ok(age) => age,
        Err(why) => {
            warn!(issuer = %cfg.name, "not using the persisted keys: {why}");
            state.persisted_refused = Some(why);
            return;
        }
    };
    match key_set(saved.jwks.clone().into_bytes()) {
        Ok((keys, _)) => {
            info!(issuer = %cfg.name, keys = keys.len(), age_s = age / 1000, "loaded the persisted keys");
            let fetched = clock::now_ms().saturating_sub(age);
            state.keys = Some(Rc::new(keys));
            state.fetched_ms = Some(fetched);
            state.persisted = Some((saved.jwks, saved.jwks_uri.clone(), fetched));
            state.jwks_uri = saved.jwks_uri;
        }
        Err(e) => warn!(issuer = %cfg.name, "not using the persisted keys: {e}"),
    }
}
