//! The fleet store client: a Redis (or Valkey) connection through the `redis` crate, every
//! operation bounded by one timeout, nothing unverified handed to the caller.
//!
//! Keys of a pool live under `tollgate:{<pool>}:` (the braces are a Redis Cluster hash tag,
//! so a pool's keys share one slot and MULTI over them works on a cluster too):
//! - `stream`: the change stream (XADD, trimmed with `MAXLEN ~`); each node reads from its
//!   last seen id, so a node that was cut off catches up instead of missing a change.
//! - `snapshot`: a hash, one field per subject (`<slot>:<subject>`, see
//!   [`Entry::snapshot_field`]) holding the latest signed entry; a node loads it at start
//!   and after a gap. XADD and HSET run in one MULTI, so the hash's last write and the
//!   stream's order agree.
//! - `claim:<token id>`: the address a token is bound to fleet-wide (SET NX PX … GET).
//! - `member:<node>` (value with a TTL) and `members` (a set of names): heartbeats.
//!
//! The connection is one multiplexed connection, made on first use and dropped after a
//! timeout or an I/O error, so the next operation reconnects; operations are not retried
//! here (the caller decides: an append retried after a lost reply is a duplicate, harmless
//! because entries are idempotent per subject, but it is the caller's call).
//!
//! The password comes from a credentials file, never from the URL (a URL with one is
//! refused), and nothing here prints it: [`Credentials`], [`StoreConfig`] and [`Store`]
//! redact it in Debug, and errors carry the server's message, which never echoes it.

use std::{
    fmt,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, Pipeline, Value};

use super::entry::{Entry, PoolKey, Refusal, Verified, name_rule, valid_name};

/// Longest credentials file read.
const MAX_CREDENTIALS_BYTES: u64 = 4096;
/// Most entries one HSCAN page asks for while loading the snapshot.
const SNAPSHOT_PAGE: usize = 512;
/// Most snapshot pages read: a bound on the loop (512 × 4096 ≈ 2 M subjects).
const MAX_SNAPSHOT_PAGES: usize = 4096;
/// Most members a pool lists; more is a misconfiguration or a store writer's flood.
pub const MAX_MEMBERS: usize = 1024;
/// Longest member info (JSON the caller chooses).
pub const MAX_MEMBER_INFO_BYTES: usize = 4096;

/// The ACL user and password, from a file. Debug and Display never show the password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    user: String,
    password: String,
}

impl Credentials {
    pub fn new(user: &str, password: &str) -> Credentials {
        Credentials {
            user: user.to_string(),
            password: password.to_string(),
        }
    }

    /// Loads `user = "…"` and `password = "…"` (TOML) from a file other users cannot read.
    /// Errors name the file and the problem, never the content.
    pub fn load(path: &Path) -> Result<Credentials, StoreError> {
        let bad = |why: String| StoreError::Credentials(format!("{}: {why}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(bad(format!(
                "accessible to other users (mode {mode:o}); chmod 600 or 640 it"
            )));
        }
        if meta.len() > MAX_CREDENTIALS_BYTES {
            return Err(bad(format!("larger than {MAX_CREDENTIALS_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        // toml's error would quote the offending line, which may be the password.
        let f: CredentialsFile = toml::from_str(&text).map_err(|_| {
            bad("not `user = \"…\"` and `password = \"…\"` (TOML, nothing else)".into())
        })?;
        if f.user.is_empty() || f.password.is_empty() {
            return Err(bad("user and password must not be empty".into()));
        }
        Ok(Credentials::new(&f.user, &f.password))
    }
}

/// How to reach the store.
#[derive(Clone)]
pub struct StoreConfig {
    /// One server by URL, or the primary the sentinels name ([`Target`]).
    pub target: Target,
    /// PEM roots for `rediss://` or a TLS Sentinel setup (else the system's roots).
    pub ca_file: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// Bound on every operation, connecting included.
    pub op_timeout: Duration,
    /// The stream is trimmed to about this many entries (`MAXLEN ~`).
    pub stream_max_len: u64,
}

/// Where the store is. [`StoreConfig::from_fleet`] builds it from `[fleet]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One server: `redis://host:port[/db]` or `rediss://host:port[/db]` ([`check_url`]);
    /// no user or password in it. Writes are acknowledged by that server alone.
    Url(String),
    /// The primary the sentinels name, found again on every reconnect; a write is reported
    /// done only once a replica has it too ([`Store::append`], `sentinel.rs`).
    Sentinel(SentinelTarget),
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("target", &self.target)
            .field("ca_file", &self.ca_file)
            .field("credentials", &self.credentials)
            .field("op_timeout", &self.op_timeout)
            .field("stream_max_len", &self.stream_max_len)
            .finish()
    }
}

/// A store operation's failure. [`StoreError::label`] is the counter label.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("fleet store configuration: {0}")]
    Config(String),
    #[error("fleet store credentials file {0}")]
    Credentials(String),
    #[error("fleet store {op}: no answer within {ms} ms")]
    Timeout { op: &'static str, ms: u128 },
    #[error("fleet store {op}: connection: {msg}")]
    Connection { op: &'static str, msg: String },
    #[error("fleet store {op}: authentication refused: {msg}")]
    Auth { op: &'static str, msg: String },
    #[error("fleet store {op}: {msg}")]
    Server { op: &'static str, msg: String },
    #[error("fleet store {op}: unexpected reply: {msg}")]
    Reply { op: &'static str, msg: String },
    #[error("fleet entry not published: {0}")]
    Refused(Refusal),
    /// With Sentinel: the write reached the primary but no replica acknowledged it within
    /// the op timeout (`WAIT`), so a failover now could lose it. The caller keeps the entry
    /// queued and publishes it again (entries are idempotent per subject, so the copy that
    /// did land is harmless); the next operation asks the sentinels for the primary again.
    #[error("fleet store {op}: written to the primary, but no replica acknowledged it in time")]
    Unacknowledged { op: &'static str },
}

impl StoreError {
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Config(_) => "config",
            StoreError::Credentials(_) => "credentials",
            StoreError::Timeout { .. } => "timeout",
            StoreError::Connection { .. } => "connection",
            StoreError::Auth { .. } => "auth",
            StoreError::Server { .. } => "server",
            StoreError::Reply { .. } => "reply",
            StoreError::Refused(_) => "refused",
            StoreError::Unacknowledged { .. } => "unacknowledged",
        }
    }

    fn from_redis(op: &'static str, e: redis::RedisError) -> StoreError {
        let msg = e.to_string();
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || e.code()
                .is_some_and(|c| c == "WRONGPASS" || c == "NOPERM" || c == "NOAUTH")
        {
            StoreError::Auth { op, msg }
        } else if e.is_timeout() {
            // The crate's own response/connection timeout (set to op_timeout as well).
            StoreError::Timeout { op, ms: 0 }
        } else if sentinel::not_primary(&e) {
            StoreError::Connection {
                op,
                msg: format!("the node is no primary (demoted?), left: {msg}"),
            }
        } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            StoreError::Connection { op, msg }
        } else {
            StoreError::Server { op, msg }
        }
    }

    /// Whether the connection should be dropped and made again on the next operation.
    /// [`StoreError::Unacknowledged`] is one (it only happens with Sentinel): a primary whose
    /// replica stopped acknowledging is often one the sentinels have just replaced (a demoted
    /// primary keeps answering as one for seconds), so the next operation asks them again
    /// instead of writing on where nothing is kept.
    fn breaks_connection(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout { .. }
                | StoreError::Connection { .. }
                | StoreError::Auth { .. }
                | StoreError::Unacknowledged { .. }
        )
    }
}

/// A stream entry id (`<ms>-<seq>`), ordered as Redis orders them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamPos {
    pub ms: u64,
    pub seq: u64,
}

impl StreamPos {
    /// Before every entry: a node that has seen nothing reads from here.
    pub const ZERO: StreamPos = StreamPos { ms: 0, seq: 0 };
}

impl fmt::Display for StreamPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for StreamPos {
    type Err = ();
    fn from_str(s: &str) -> Result<StreamPos, ()> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        Ok(StreamPos {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// What [`Store::read_since`] found.
#[derive(Debug)]
pub enum Read {
    /// The entries after the position asked for (up to `max`), in stream order.
    Entries(Batch),
    /// Entries after the position were trimmed away (or the store lost the stream): the
    /// caller reloads [`Store::snapshot`] and reads on from its position.
    Gap,
}

/// Entries read from the stream, verified; refused ones with their label.
#[derive(Debug, Default)]
pub struct Batch {
    pub entries: Vec<(StreamPos, Verified)>,
    pub refused: Vec<(StreamPos, Refusal)>,
    /// The last id read (verified or refused); the position to read from next. Unchanged
    /// when nothing was read.
    pub last: StreamPos,
    /// The stream's newest id when it was read: how far behind `last` is.
    pub head: StreamPos,
}

/// The snapshot: the latest entry per subject, and the stream position it covers.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<Verified>,
    /// Fields whose value was refused, with the label (the field name is a store writer's
    /// text: bounded by the store, logged with care).
    pub refused: Vec<(String, Refusal)>,
    /// Read on from here: every change after it is in the stream (the position is read
    /// before the hash, so a change made while loading shows up in both, never in neither).
    pub position: StreamPos,
}

/// The outcome of a fleet-wide token claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The token is bound to this address fleet-wide (newly, or already by this address).
    Claimed,
    /// Another address holds it: a replay.
    HeldBy(IpAddr),
}

/// A pool member seen by its heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub info: String,
}

/// One HSCAN page: field and value pairs.
type HashPage = Vec<(Vec<u8>, Vec<u8>)>;

/// The stream's state, from XINFO STREAM.
#[derive(Debug)]
struct StreamInfo {
    last_generated: StreamPos,
    /// The oldest entry still in the stream (Redis keeps it when the stream is empty).
    first: StreamPos,
    length: u64,
    /// Entries ever added; more than `length` means some were trimmed.
    entries_added: u64,
    /// The newest id removed by XDEL (Redis 7.0 records XDEL here, not trims).
    max_deleted: StreamPos,
}

impl StreamInfo {
    /// Whether a reader that has seen up to `last` may have lost entries to trimming.
    /// Trimming removes from the head, so nothing after `last` is gone while `last` itself
    /// (or an older entry) is still there. Redis 7.0 does not record trims in
    /// max-deleted-entry-id (only XDEL), hence this test. Conservative: a reader whose own
    /// position was just trimmed reloads the snapshot even if the next entry survived (it
    /// was a stream's length behind, about to miss some anyway).
    fn gap_after(&self, last: StreamPos) -> bool {
        if last > self.last_generated {
            // The stream restarted behind us (the store lost it and ids began again).
            return true;
        }
        if self.max_deleted > last {
            // An entry after our position was deleted (XDEL: a store writer hiding a
            // revocation from the nodes that had not read it yet): the snapshot decides.
            return true;
        }
        let trimmed = self.entries_added > self.length;
        let oldest_kept = if self.length == 0 {
            self.last_generated
        } else {
            self.first
        };
        trimmed && last < oldest_kept
    }
}

#[derive(Clone)]
struct KeyNames {
    prefix: String,
    stream: String,
    snapshot: String,
    members: String,
    epoch: String,
}

impl KeyNames {
    fn new(pool: &str) -> KeyNames {
        let prefix = format!("tollgate:{{{pool}}}:");
        KeyNames {
            stream: format!("{prefix}stream"),
            snapshot: format!("{prefix}snapshot"),
            members: format!("{prefix}members"),
            epoch: format!("{prefix}epoch"),
            prefix,
        }
    }

    /// A token id is any string its issuer chose (spaces, non-ASCII, up to the token's
    /// size): the key holds its SHA-256, so every id has one, bounded and printable.
    fn claim(&self, token_id: &str) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, token_id.as_bytes());
        let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("{}claim:{hex}", self.prefix)
    }

    fn member(&self, node: &str) -> String {
        format!("{}member:{node}", self.prefix)
    }
}

/// The client. `&mut self` because the agent is single-threaded and the connection is remade
/// in place. A clone shares the connection (multiplexed: concurrent operations are
/// pipelined on it) until either side drops it after an error; a blocking read needs a
/// connection of its own ([`Store::waiter`]).
#[derive(Clone)]
pub struct Store {
    client: Dial,
    conn: Option<redis::aio::MultiplexedConnection>,
    /// Added to the bound of [`Store::wait_after`] and to the connection's response timeout:
    /// zero except on a waiter.
    block: Duration,
    /// The stream's `entries-added` at this client's last read: it never goes down on one
    /// stream, so a smaller one is a stream made again.
    entries_added: Option<u64>,
    key: PoolKey,
    keys: KeyNames,
    op_timeout: Duration,
    stream_max_len: u64,
    /// The URL, or `sentinel:<service>`: for Debug, never carries a password.
    url: String,
}

/// How a connection is made: one server, or the primary the sentinels name.
#[derive(Clone)]
enum Dial {
    Url(Client),
    Sentinel(sentinel::Dial),
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("pool", &self.key.pool())
            .field("connected", &self.conn.is_some())
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

impl Store {
    /// Builds the client for `key`'s pool. Does not connect: the first operation does, so a
    /// node starts while the store is down.
    pub fn new(cfg: &StoreConfig, key: PoolKey) -> Result<Store, StoreError> {
        if !valid_name(key.pool()) {
            return Err(StoreError::Config(format!(
                "pool name {:?}: {}",
                key.pool(),
                name_rule()
            )));
        }
        if cfg.op_timeout.is_zero() {
            return Err(StoreError::Config("op_timeout must be above zero".into()));
        }
        let (client, url) = match &cfg.target {
            Target::Url(url) => (Dial::Url(url_client(url, cfg)?), url.clone()),
            Target::Sentinel(t) => (
                Dial::Sentinel(sentinel::Dial::new(t, cfg)?),
                format!("sentinel:{}", t.service),
            ),
        };
        Ok(Store {
            client,
            conn: None,
            keys: KeyNames::new(key.pool()),
            key,
            op_timeout: cfg.op_timeout,
            block: Duration::ZERO,
            entries_added: None,
            stream_max_len: cfg.stream_max_len.max(1),
            url,
        })
    }

    /// A client with a connection of its own for [`Store::wait_after`] with up to `block`:
    /// a blocked XREAD holds its connection, so it must not share the one binds claim on.
    pub fn waiter(&self, block: Duration) -> Store {
        Store {
            conn: None,
            block,
            ..self.clone()
        }
    }

    pub fn pool(&self) -> &str {
        self.key.pool()
    }

    /// `entry` signed and verified under this pool's key, as any node would hold it: what
    /// the publishing node offers its own applier.
    pub fn seal(&self, entry: Entry) -> Result<Verified, Refusal> {
        self.key.verify(self.key.sign(entry)?)
    }

    /// What the store is, for `fleet status`: its URL or `sentinel:<service>` (never a
    /// password: a URL with one is refused).
    pub fn target(&self) -> &str {
        &self.url
    }

    /// Connects now (the operations connect on their own; this is for a check at start).
    pub async fn ping(&mut self) -> Result<(), StoreError> {
        let _: String = self.query("ping", &redis::cmd("PING")).await?;
        Ok(())
    }

    async fn connection(
        &mut self,
        op: &'static str,
    ) -> Result<redis::aio::MultiplexedConnection, StoreError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.op_timeout))
            .set_response_timeout(Some(self.op_timeout + self.block));
        let c = match &mut self.client {
            Dial::Url(client) => client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map_err(|e| StoreError::from_redis(op, e))?,
            // Asks the sentinels on every (re)connect and checks the node's role.
            Dial::Sentinel(d) => d.connect(op, &cfg).await?,
        };
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// One command or pipeline, connecting first if needed, all within `op_timeout`.
    async fn run<T, F, Fut>(&mut self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_within(op, self.op_timeout, f).await
    }

    async fn run_within<T, F, Fut>(
        &mut self,
        op: &'static str,
        t: Duration,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let r = tokio::time::timeout(t, async {
            let c = self.connection(op).await?;
            f(c).await.map_err(|e| StoreError::from_redis(op, e))
        })
        .await;
        // Ours or the crate's (it is given the same bound): one error, naming the bound.
        let r = match r {
            Ok(Err(StoreError::Timeout { .. })) | Err(_) => Err(StoreError::Timeout {
                op,
                ms: t.as_millis(),
            }),
            Ok(r) => r,
        };
        if let Err(e) = &r
            && e.breaks_connection()
        {
            self.conn = None;
        }
        r
    }

    async fn query<T: FromRedisValue>(
        &mut self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.run(op, |mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    async fn query_pipe<T: FromRedisValue>(
        &mut self,
        op: &'static str,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        self.run(op, |mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    /// Signs `entry` and publishes it: XADD to the stream (trimmed to about
    /// `stream_max_len`) and HSET into the snapshot, in one MULTI. Returns its stream id.
    ///
    /// With Sentinel, success also means the write reached a replica: after the MULTI,
    /// `WAIT 1` within what is left of the op timeout; no replica in time is
    /// [`StoreError::Unacknowledged`] (the caller keeps the entry and publishes it again),
    /// so an entry reported published survives a failover to that replica. One server by
    /// URL has no replica to wait for: there, success means the server has it.
    pub async fn append(&mut self, entry: Entry) -> Result<StreamPos, StoreError> {
        let signed = self.key.sign(entry).map_err(StoreError::Refused)?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let xadd = pipe
            .cmd("XADD")
            .arg(&self.keys.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.stream_max_len)
            .arg("*");
        for (name, value) in signed.to_fields() {
            xadd.arg(name).arg(value);
        }
        pipe.cmd("HSET")
            .arg(&self.keys.snapshot)
            .arg(signed.entry.snapshot_field())
            .arg(signed.to_snapshot_value())
            .ignore();
        let replicated = matches!(self.client, Dial::Sentinel(_));
        let bound = self.op_timeout;
        let (id, acked) = self
            .run("append", |mut c| async move {
                let started = tokio::time::Instant::now();
                let (id,): (String,) = pipe.query_async(&mut c).await?;
                // A single server has nobody to wait for: its answer is the acknowledgement.
                let acked = !replicated || sentinel::wait_replica(&mut c, bound, started).await?;
                Ok((id, acked))
            })
            .await?;
        if !acked {
            let e = StoreError::Unacknowledged { op: "append" };
            if e.breaks_connection() {
                self.conn = None;
            }
            return Err(e);
        }
        id.parse().map_err(|_| StoreError::Reply {
            op: "append",
            msg: format!("XADD returned id {id:?}"),
        })
    }

    /// The entries after `last` (at most `max`), each verified; or [`Read::Gap`] when some
    /// after `last` are gone (trimmed, or the store came back without the stream), so the
    /// caller must reload the snapshot. The stream's state and the entries are read in one
    /// MULTI, so a trim between them cannot hide a gap.
    pub async fn read_since(&mut self, last: StreamPos, max: usize) -> Result<Read, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        pipe.cmd("XINFO").arg("STREAM").arg(&self.keys.stream);
        pipe.cmd("XREAD")
            .arg("COUNT")
            .arg(max.max(1))
            .arg("STREAMS")
            .arg(&self.keys.stream)
            .arg(last.to_string());
        let mut replies: Vec<redis::RedisResult<Value>> =
            self.query_pipe("read_since", &pipe).await?;
        if replies.len() != 2 {
            return Err(reply("read_since", "MULTI reply of the wrong length"));
        }
        let read = replies.pop().unwrap_or(Ok(Value::Nil));
        let info = replies.pop().unwrap_or(Ok(Value::Nil));
        let Some(info) = stream_info(info, "read_since")? else {
            // No stream: a pool nothing was written to, or a store that lost it.
            return Ok(if last == StreamPos::ZERO {
                Read::Entries(Batch {
                    last,
                    ..Batch::default()
                })
            } else {
                Read::Gap
            });
        };
        // A stream deleted and made again with ids above every cursor (a store writer's way
        // round the checks above) has added fewer entries than this client saw before.
        let recreated = self
            .entries_added
            .is_some_and(|seen| info.entries_added < seen);
        self.entries_added = Some(info.entries_added);
        if recreated || info.gap_after(last) {
            return Ok(Read::Gap);
        }
        let read = read.map_err(|e| StoreError::from_redis("read_since", e))?;
        let mut batch = Batch {
            last,
            head: info.last_generated,
            ..Batch::default()
        };
        for (pos, fields) in xread_entries(read)? {
            batch.last = pos;
            match fields.and_then(|f| self.verify_stream_entry(&f)) {
                Ok(v) => batch.entries.push((pos, v)),
                Err(r) => batch.refused.push((pos, r)),
            }
        }
        Ok(Read::Entries(batch))
    }

    fn verify_stream_entry(&self, fields: &[(Vec<u8>, Vec<u8>)]) -> Result<Verified, Refusal> {
        let mut named = Vec::with_capacity(fields.len());
        for (k, v) in fields {
            let k = std::str::from_utf8(k).map_err(|_| Refusal::Malformed)?;
            named.push((k, v.as_slice()));
        }
        self.key.verify_fields(named)
    }

    /// Waits until the stream holds an entry after `last`, at most the `block` this client
    /// was made with ([`Store::waiter`]); `true` when one is there. Only a wake-up for the
    /// sync: nothing read here is used but the entry's id (the sync pass reads and
    /// verifies), so a store writer's entry costs one early pass, no more. Returns the id of
    /// the entry after `last`, if one came.
    pub async fn wait_after(&mut self, last: StreamPos) -> Result<Option<StreamPos>, StoreError> {
        let ms = self.block.as_millis().max(1) as u64;
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(ms)
            .arg("STREAMS")
            .arg(&self.keys.stream)
            .arg(last.to_string());
        let bound = self.op_timeout + self.block;
        let v: Value = self
            .run_within("wait", bound, |mut c| async move {
                cmd.query_async(&mut c).await
            })
            .await?;
        Ok(xread_entries(v)?.last().map(|(p, _)| *p))
    }

    /// The snapshot: the stream position first, then the hash in bounded HSCAN pages, each
    /// value verified (and checked to sit under its own field).
    pub async fn snapshot(&mut self) -> Result<Snapshot, StoreError> {
        let info: Value = match self
            .query(
                "snapshot",
                redis::cmd("XINFO").arg("STREAM").arg(&self.keys.stream),
            )
            .await
        {
            Ok(v) => v,
            Err(StoreError::Server { msg, .. }) if msg.contains("no such key") => Value::Nil,
            Err(e) => return Err(e),
        };
        let position = stream_info(Ok(info), "snapshot")?
            .map(|i| i.last_generated)
            .unwrap_or(StreamPos::ZERO);
        let mut snap = Snapshot {
            position,
            ..Snapshot::default()
        };
        let mut cursor = 0u64;
        for _ in 0..MAX_SNAPSHOT_PAGES {
            let (next, page): (u64, HashPage) = self
                .query(
                    "snapshot",
                    redis::cmd("HSCAN")
                        .arg(&self.keys.snapshot)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(SNAPSHOT_PAGE),
                )
                .await?;
            for (field, value) in page {
                match self.key.verify_snapshot(&field, &value) {
                    Ok(v) => snap.entries.push(v),
                    Err(r) => snap.refused.push((
                        String::from_utf8_lossy(&field[..field.len().min(200)]).into_owned(),
                        r,
                    )),
                }
            }
            if next == 0 {
                return Ok(snap);
            }
            cursor = next;
        }
        Err(reply(
            "snapshot",
            &format!("more than {} entries", SNAPSHOT_PAGE * MAX_SNAPSHOT_PAGES),
        ))
    }

    /// The store's epoch: a random name the first node to ask sets (`SET NX GET`), so it
    /// lives exactly as long as the store's data. Another epoch than the one a node saw means
    /// the store was reset (restarted without persistence, or flushed): the node reloads the
    /// snapshot and re-seeds it. A store writer can change it too; that costs a reload and a
    /// re-seed, never a grant.
    pub async fn epoch(&mut self) -> Result<String, StoreError> {
        let mut rnd = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd)
            .map_err(|_| StoreError::Config("no randomness".into()))?;
        let ours: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let held: Option<Vec<u8>> = self
            .query(
                "epoch",
                redis::cmd("SET")
                    .arg(&self.keys.epoch)
                    .arg(&ours)
                    .arg("NX")
                    .arg("GET"),
            )
            .await?;
        match held {
            None => Ok(ours),
            Some(h) if !h.is_empty() && h.len() <= 64 && h.iter().all(u8::is_ascii_graphic) => {
                Ok(String::from_utf8_lossy(&h).into_owned())
            }
            Some(_) => Err(reply("epoch", "epoch is not 1 to 64 printable characters")),
        }
    }

    /// Binds `token_id` to `addr` fleet-wide for `ttl` (the token's remaining lifetime):
    /// one `SET NX PX … GET`, so of two nodes claiming at once exactly one wins.
    pub async fn claim_token(
        &mut self,
        token_id: &str,
        addr: IpAddr,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        if token_id.is_empty() {
            return Err(StoreError::Config(
                "an empty token id cannot be claimed".into(),
            ));
        }
        let ms = ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        let held: Option<String> = self
            .query(
                "claim_token",
                redis::cmd("SET")
                    .arg(self.keys.claim(token_id))
                    .arg(addr.to_string())
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .arg("GET"),
            )
            .await?;
        match held {
            None => Ok(Claim::Claimed),
            Some(h) => match h.parse::<IpAddr>() {
                Ok(a) if a == addr => Ok(Claim::Claimed),
                Ok(a) => Ok(Claim::HeldBy(a)),
                Err(_) => Err(reply("claim_token", "claim holds something not an address")),
            },
        }
    }

    /// Announces `node` for `ttl`: its member key (expiring on the server's clock, so nodes'
    /// clocks do not matter) and its name in the members set.
    pub async fn heartbeat(
        &mut self,
        node: &str,
        info: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if !valid_name(node) {
            return Err(StoreError::Config(format!("node name {node:?}")));
        }
        if info.len() > MAX_MEMBER_INFO_BYTES {
            return Err(StoreError::Config(format!(
                "member info over {MAX_MEMBER_INFO_BYTES} bytes"
            )));
        }
        let ms = ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.keys.member(node))
            .arg(info)
            .arg("PX")
            .arg(ms)
            .ignore()
            .cmd("SADD")
            .arg(&self.keys.members)
            .arg(node)
            .ignore();
        let () = self.query_pipe("heartbeat", &pipe).await?;
        Ok(())
    }

    /// The members whose heartbeat has not expired, sorted by name. Names whose key expired
    /// are removed from the set on the way.
    pub async fn members(&mut self) -> Result<Vec<Member>, StoreError> {
        // Bytes, not String: a binary name or info (a store writer's) is skipped, it does
        // not fail the listing.
        let raw: Vec<Vec<u8>> = self
            .query(
                "members",
                redis::cmd("SRANDMEMBER")
                    .arg(&self.keys.members)
                    .arg(MAX_MEMBERS),
            )
            .await?;
        // Names no node can have are removed with the expired ones, so they cannot crowd
        // real members out of the bounded listing.
        let mut gone: Vec<Vec<u8>> = Vec::new();
        let mut names = Vec::new();
        for n in raw {
            match String::from_utf8(n) {
                Ok(n) if valid_name(&n) => names.push(n),
                Ok(n) => gone.push(n.into_bytes()),
                Err(e) => gone.push(e.into_bytes()),
            }
        }
        names.sort();
        // Each info's length, then at most MAX_MEMBER_INFO_BYTES of it: a member key a store
        // writer made huge is not read whole every second by every node.
        let infos: Vec<(u64, Vec<u8>)> = if names.is_empty() {
            Vec::new()
        } else {
            let mut pipe = redis::pipe();
            for n in &names {
                let key = self.keys.member(n);
                pipe.cmd("STRLEN").arg(&key);
                pipe.cmd("GETRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(MAX_MEMBER_INFO_BYTES - 1);
            }
            let flat: Vec<Value> = self.query_pipe("members", &pipe).await?;
            flat.chunks(2)
                .map(|p| {
                    let len = redis::from_redis_value::<u64>(p[0].clone()).unwrap_or(0);
                    let info = redis::from_redis_value::<Vec<u8>>(p[1].clone()).unwrap_or_default();
                    (len, info)
                })
                .collect()
        };
        let mut out = Vec::new();
        for (node, (len, info)) in names.into_iter().zip(infos) {
            match len {
                // No key (it expired): the member is gone. An honest heartbeat is never empty.
                0 => gone.push(node.into_bytes()),
                // Larger than any node writes: a store writer's; shown as nothing, not read.
                l if l > MAX_MEMBER_INFO_BYTES as u64 => out.push(Member {
                    node,
                    info: String::new(),
                }),
                _ => {
                    if let Ok(info) = String::from_utf8(info) {
                        out.push(Member { node, info });
                    }
                }
            }
        }
        if !gone.is_empty() {
            let _: i64 = self
                .query(
                    "members",
                    redis::cmd("SREM").arg(&self.keys.members).arg(&gone),
                )
                .await?;
        }
        Ok(out)
    }
}

/// The client for one server by URL ([`check_url`]), with the credentials and CA of `cfg`.
fn url_client(url: &str, cfg: &StoreConfig) -> Result<Client, StoreError> {
    let parts = check_url(url).map_err(StoreError::Config)?;
    let mut info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| StoreError::Config(format!("url {url}: {e}")))?;
    if let Some(c) = &cfg.credentials {
        let r = info
            .redis_settings()
            .clone()
            .set_username(&c.user)
            .set_password(&c.password);
        info = info.set_redis_settings(r);
    }
    let client = if parts.tls {
        let root_cert = match &cfg.ca_file {
            Some(p) => Some(read_ca_file(p).map_err(StoreError::Config)?),
            None => None,
        };
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert,
        };
        Client::build_with_tls(info, certs)
            .map_err(|e| StoreError::Config(format!("TLS for {}: {e}", url)))?
    } else {
        if cfg.ca_file.is_some() {
            return Err(StoreError::Config(CA_FILE_WITHOUT_TLS.into()));
        }
        Client::open(info).map_err(|e| StoreError::Config(format!("url {}: {e}", url)))?
    };
    Ok(client)
}

/// A stream entry's fields, or `malformed` when a store writer gave it a shape the entry
/// format cannot have.
type EntryFields = Result<Vec<(Vec<u8>, Vec<u8>)>, Refusal>;

/// Parses an XREAD reply (RESP2: `[[key, [[id, [field, value, …]], …]]]`, or nil) by hand
/// rather than through the crate's typed reply, whose field names must be UTF-8: there, one
/// entry with a binary field name (anyone with write access can add one) would fail the
/// whole read, every interval, and stop the node's catch-up. Here it is one refused entry.
/// The ids are the server's own and always parse; a reply of another shape is an error.
fn xread_entries(v: Value) -> Result<Vec<(StreamPos, EntryFields)>, StoreError> {
    let bad = |what: &str| reply("read_since", &format!("XREAD reply: {what}"));
    let streams = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(a) => a,
        _ => return Err(bad("not an array")),
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(mut pair) = stream else {
            return Err(bad("stream not [key, entries]"));
        };
        let Some(Value::Array(entries)) = pair.pop() else {
            return Err(bad("stream not [key, entries]"));
        };
        for entry in entries {
            let Value::Array(mut e) = entry else {
                return Err(bad("entry not [id, fields]"));
            };
            let (Some(fields), Some(Value::BulkString(id))) = (e.pop(), e.pop()) else {
                return Err(bad("entry not [id, fields]"));
            };
            let pos: StreamPos = std::str::from_utf8(&id)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("id not <ms>-<seq>"))?;
            out.push((pos, entry_fields(fields)));
        }
    }
    Ok(out)
}

fn entry_fields(v: Value) -> EntryFields {
    let Value::Array(flat) = v else {
        return Err(Refusal::Malformed);
    };
    // More fields than an entry has is refused before anything is copied.
    if !flat.len().is_multiple_of(2) || flat.len() > 2 * super::entry::field::ALL.len() {
        return Err(Refusal::Malformed);
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let Some(k) = it.next() {
        let (Value::BulkString(k), Some(Value::BulkString(v))) = (k, it.next()) else {
            return Err(Refusal::Malformed);
        };
        out.push((k, v));
    }
    Ok(out)
}

fn reply(op: &'static str, msg: &str) -> StoreError {
    StoreError::Reply {
        op,
        msg: msg.to_string(),
    }
}

/// Parses XINFO STREAM; `None` when the stream does not exist.
fn stream_info(
    v: redis::RedisResult<Value>,
    op: &'static str,
) -> Result<Option<StreamInfo>, StoreError> {
    let v = match v {
        Ok(Value::Nil) => return Ok(None),
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(StoreError::from_redis(op, e)),
    };
    let map: std::collections::HashMap<String, Value> =
        redis::from_redis_value(v).map_err(|e| reply(op, &e.to_string()))?;
    let pos = |name: &str| -> Result<StreamPos, StoreError> {
        let v = map
            .get(name)
            .ok_or_else(|| reply(op, &format!("XINFO STREAM without {name} (Redis 7 needed)")))?;
        let s: String =
            redis::from_redis_value(v.clone()).map_err(|e| reply(op, &e.to_string()))?;
        s.parse()
            .map_err(|_| reply(op, &format!("XINFO STREAM {name} {s:?}")))
    };
    let count = |name: &str| -> Result<u64, StoreError> {
        let v = map
            .get(name)
            .ok_or_else(|| reply(op, &format!("XINFO STREAM without {name} (Redis 7 needed)")))?;
        redis::from_redis_value(v.clone()).map_err(|e| reply(op, &e.to_string()))
    };
    Ok(Some(StreamInfo {
        last_generated: pos("last-generated-id")?,
        first: pos("recorded-first-entry-id")?,
        length: count("length")?,
        entries_added: count("entries-added")?,
        max_deleted: pos("max-deleted-entry-id")?,
    }))
}

/// A store URL, checked ([`check_url`]).
pub struct UrlParts {
    /// `rediss://`.
    pub tls: bool,
}

/// Why a CA file beside a plain `redis://` store is refused (the store and config check say
/// it alike): roots without TLS would protect nothing, and the operator meant TLS.
pub const CA_FILE_WITHOUT_TLS: &str =
    "a CA file is set but the store is plain TCP (redis://); use rediss:// for TLS";

/// Longest CA file read: a bundle of a few hundred certificates.
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// Checks a store URL as [`Store::new`] takes it (config check calls it too): `redis://` or
/// `rediss://`; no user or password (they belong in the credentials file, where no log shows
/// them with the URL; the part before '@' is never echoed); no query or fragment (the
/// crate's `#insecure` would turn certificate checks off, `?protocol=` would change the
/// replies this client parses); a host and port the crate accepts. The error is a sentence.
pub fn check_url(url: &str) -> Result<UrlParts, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "{url:?} is not a store URL: redis://host:port or rediss://host:port (TLS)"
        ));
    };
    let tls = match scheme {
        "redis" => false,
        "rediss" => true,
        "http" | "https" | "ws" | "wss" => {
            return Err(format!(
                "scheme {scheme}://: the store speaks the Redis protocol, not HTTP; use \
                 redis://host:port or rediss://host:port (TLS)"
            ));
        }
        _ => {
            return Err(format!(
                "scheme {scheme}://: use redis://host:port or rediss://host:port (TLS)"
            ));
        }
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(
            "the URL carries a user or password; put them in the credentials file \
             (`credentials`), where no log shows them"
                .into(),
        );
    }
    if rest.contains(['?', '#']) {
        return Err(
            "the URL has a query or fragment; only redis[s]://host:port[/db] is \
             taken (`#insecure` would turn certificate checks off)"
                .into(),
        );
    }
    redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| format!("{url}: {e}"))?;
    Ok(UrlParts { tls })
}

/// Reads a PEM file of CA certificates for `rediss://` (every certificate in it must be
/// usable, and there must be one: a broken bundle is found now, not at the first connect).
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let bad = |why: String| format!("CA file {}: {why}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > MAX_CA_FILE_BYTES {
        return Err(bad(format!("larger than {MAX_CA_FILE_BYTES} bytes")));
    }
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| bad(format!("certificate #{} cannot be used: {e}", i + 1)))?;
    }
    Ok(pem)
}

/// Checks one Sentinel address, `host:port` (`[v6]:port` for IPv6): a port from 1 to 65535,
/// a host that is an address (not a wildcard) or a DNS name.
pub fn check_sentinel_node(node: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{node:?} is not host:port ({why}); e.g. \"sentinel-1.example:26379\" or \
             \"[2001:db8::1]:26379\""
        ))
    };
    let (host, port) = match node.strip_prefix('[') {
        Some(r) => match r.split_once("]:") {
            Some((h, p)) if h.parse::<std::net::Ipv6Addr>().is_ok() => (h, p),
            _ => return bad("an IPv6 address in brackets"),
        },
        None => match node.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, p),
            Some(_) => return bad("an IPv6 address goes in brackets"),
            None => return bad("no port"),
        },
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
        _ => return bad("the port must be 1 to 65535"),
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => bad("a wildcard address is not a server"),
        Ok(_) => Ok(()),
        Err(_) => {
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            };
            if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
                return bad("the host must be an address or a DNS name");
            }
            Ok(())
        }
    }
}

mod sentinel;
pub use sentinel::SentinelTarget;

#[cfg(test)]
mod sentinel_tests;
pub mod spend;
#[cfg(test)]
pub(crate) mod test_sentinel;
#[cfg(test)]
pub(crate) mod test_server;
#[cfg(test)]
mod tests;
