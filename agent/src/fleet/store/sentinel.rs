//! The store through Redis Sentinel: the primary is whatever the sentinels name now, asked
//! again on every (re)connect, and only ever written to once it answers `ROLE` as a primary.
//!
//! - Lookup: the `redis` crate's [`SentinelClient`] asks the sentinels in the configured
//!   order (up to three at once) for the service's primary, skipping one that is down or
//!   flagged down, and checks with `ROLE` that the node it names is a primary; a sentinel
//!   with a stale answer (a demoted node) is passed over for the next one.
//! - On the connection the store then uses, `ROLE` is asked once more: the node may have been
//!   demoted between the lookup and the connect. A replica is refused, nothing is sent to it,
//!   and the next operation asks the sentinels again.
//! - A node demoted under an open connection answers writes with `READONLY` (or `WAIT` with
//!   an error, when the replica is writable): [`not_primary`] makes both connection-breaking,
//!   so the next operation reconnects through the sentinels.
//! - Acknowledged writes: [`wait_replica`] after each append (`WAIT 1`); see
//!   [`super::Store::append`].
//!
//! Credentials: the ACL user and password go to the data nodes (primary and replicas), not
//! to the sentinels; sentinels are reached without AUTH (Sentinel's own `requirepass` /
//! ACL is not supported yet: the configuration has no field for it, and sending the data
//! nodes' password to the sentinels would fail against sentinels without one). TLS
//! (`tls = true`) is used to the sentinels and to the data nodes alike, with the same CA file;
//! the data node's certificate must name the address the sentinels announce.
//!
//! Every step runs inside the calling operation's `op_timeout` (the caller's
//! `tokio::time::timeout`; the crate's lookups are cancellation-safe).

use std::time::Duration;

use redis::{
    AsyncConnectionConfig, ConnectionAddr, TlsCertificates, TlsMode, Value,
    aio::MultiplexedConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};

use super::{Credentials, StoreConfig, StoreError, Target, check_sentinel_node, read_ca_file};
use crate::fleet::entry::valid_name;

/// The primary of a Sentinel-monitored service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelTarget {
    /// The name the sentinels monitor the primary by (`sentinel monitor <service> …`).
    pub service: String,
    /// `host:port` of each sentinel ([`check_sentinel_node`]), asked in this order.
    pub nodes: Vec<String>,
    /// TLS to the sentinels and to the data nodes.
    pub tls: bool,
}

impl StoreConfig {
    /// The store configuration for `[fleet]` (a URL or Sentinel), with the credentials the
    /// caller loaded from the file `f.credentials` names (`Credentials::load`). Values are
    /// taken as config check passed them; [`super::Store::new`] checks them again.
    pub fn from_fleet(
        f: &crate::config::Fleet,
        credentials: Option<Credentials>,
    ) -> Result<StoreConfig, StoreError> {
        let target = match &f.store {
            crate::config::FleetStore::Url { url, .. } => Target::Url(url.clone()),
            crate::config::FleetStore::Sentinel {
                service,
                nodes,
                tls,
            } => Target::Sentinel(SentinelTarget {
                service: service.clone(),
                nodes: nodes.clone(),
                tls: *tls,
            }),
        };
        if f.op_timeout_ms == 0 {
            return Err(StoreError::Config(
                "op_timeout_ms must be above zero".into(),
            ));
        }
        Ok(StoreConfig {
            target,
            ca_file: f.ca_file.clone(),
            credentials,
            op_timeout: Duration::from_millis(f.op_timeout_ms),
            stream_max_len: f.stream_max_len,
        })
    }
}

/// What a connect through the sentinels needs; cheap to clone (the crate's client is built
/// afresh on each connect, so no sentinel connection outlives the lookup it served).
#[derive(Clone)]
pub(super) struct Dial {
    service: String,
    nodes: Vec<(String, u16)>,
    tls: bool,
    root_cert: Option<Vec<u8>>,
    credentials: Option<Credentials>,
    /// `host:port` of the primary the last connection went to.
    pub(super) primary: Option<String>,
}

impl Dial {
    pub(super) fn new(t: &SentinelTarget, cfg: &StoreConfig) -> Result<Dial, StoreError> {
        let bad = |m: String| StoreError::Config(format!("sentinel: {m}"));
        if !valid_name(&t.service) {
            return Err(bad(format!(
                "service name {:?}: {}",
                t.service,
                crate::fleet::entry::name_rule()
            )));
        }
        if t.nodes.is_empty() {
            return Err(bad("no sentinel address".into()));
        }
        let mut nodes = Vec::with_capacity(t.nodes.len());
        for n in &t.nodes {
            check_sentinel_node(n).map_err(bad)?;
            nodes.push(split_node(n));
        }
        let root_cert = match (&cfg.ca_file, t.tls) {
            (Some(p), true) => Some(read_ca_file(p).map_err(StoreError::Config)?),
            (Some(_), false) => {
                return Err(bad(
                    "a CA file is set but the sentinels are plain TCP; set tls = true".into(),
                ));
            }
            (None, _) => None,
        };
        let d = Dial {
            service: t.service.clone(),
            nodes,
            tls: t.tls,
            root_cert,
            credentials: cfg.credentials.clone(),
            primary: None,
        };
        // Built once here so a setting the crate refuses is found at start.
        d.client().map_err(|e| bad(e.to_string()))?;
        Ok(d)
    }

    fn client(&self) -> redis::RedisResult<SentinelClient> {
        let addrs = self.nodes.iter().map(|(host, port)| match self.tls {
            false => ConnectionAddr::Tcp(host.clone(), *port),
            true => ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            },
        });
        let mut b = SentinelClientBuilder::new(addrs, &self.service, SentinelServerType::Master)?;
        if self.tls {
            b = b
                .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                .set_client_to_redis_tls_mode(TlsMode::Secure);
            if let Some(pem) = &self.root_cert {
                let certs = || TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                };
                b = b
                    .set_client_to_sentinel_certificates(certs())
                    .set_client_to_redis_certificates(certs());
            }
        }
        if let Some(c) = &self.credentials {
            b = b
                .set_client_to_redis_username(&c.user)
                .set_client_to_redis_password(&c.password);
        }
        b.build()
    }

    /// Asks the sentinels for the primary, connects to it and checks it is one.
    pub(super) async fn connect(
        &mut self,
        op: &'static str,
        cfg: &AsyncConnectionConfig,
    ) -> Result<MultiplexedConnection, StoreError> {
        self.primary = None;
        let lookup = |e: redis::RedisError| match StoreError::from_redis(op, e) {
            e @ StoreError::Auth { .. } => e,
            e => StoreError::Connection {
                op,
                msg: format!(
                    "no sentinel named a reachable primary for {:?}: {e}",
                    self.service
                ),
            },
        };
        let mut sentinels = self.client().map_err(lookup)?;
        let client = sentinels.async_get_client().await.map_err(lookup)?;
        let addr = client.get_connection_info().addr().to_string();
        let mut conn = client
            .get_multiplexed_async_connection_with_config(cfg)
            .await
            .map_err(|e| StoreError::from_redis(op, e))?;
        ensure_primary(&mut conn, op, &addr, &self.service).await?;
        self.primary = Some(addr);
        Ok(conn)
    }
}

/// `ROLE` on the connection the store is about to use: anything but a primary is refused
/// (the crate checked at lookup, on another connection; the node may have been demoted
/// since).
pub(super) async fn ensure_primary(
    conn: &mut MultiplexedConnection,
    op: &'static str,
    addr: &str,
    service: &str,
) -> Result<(), StoreError> {
    let role: Value = redis::cmd("ROLE")
        .query_async(conn)
        .await
        .map_err(|e| StoreError::from_redis(op, e))?;
    if !is_primary(&role) {
        return Err(StoreError::Connection {
            op,
            msg: format!(
                "{addr}, named primary of {service:?} by the sentinels, answers as a replica; \
                 not written to, the sentinels are asked again on the next operation"
            ),
        });
    }
    Ok(())
}

/// `host:port` or `[v6]:port`, already checked, as the crate takes it.
fn split_node(n: &str) -> (String, u16) {
    let (host, port) = n.rsplit_once(':').unwrap_or((n, "0"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host.to_string(), port.parse().unwrap_or(0))
}

/// Whether a `ROLE` reply is a primary's (`["master", offset, replicas]`). By hand: the
/// crate's `Role` fails to parse a replica still connecting (offset -1), and any reply that
/// is not plainly a primary's is a refusal.
fn is_primary(role: &Value) -> bool {
    match role {
        Value::Array(a) => matches!(a.first(), Some(Value::BulkString(r)) if r == b"master"),
        _ => false,
    }
}

/// Whether a server error says the node is not (or no longer) a primary that can keep a
/// write: `READONLY` (a write to a replica), `WAIT` refused on a replica (a writable one),
/// `MASTERDOWN`, `NOREPLICAS` (a primary with `min-replicas-to-write` that lost its
/// replicas, as a primary the sentinels just replaced has). These break the connection, so
/// the next operation asks the sentinels again. In a MULTI the server aborts the whole
/// transaction (`EXECABORT`) and the crate keeps each command's error inside: those count.
pub(super) fn not_primary(e: &redis::RedisError) -> bool {
    let code = |c: &str| matches!(c, "READONLY" | "MASTERDOWN" | "NOREPLICAS");
    e.code().is_some_and(code)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errs| errs.iter().any(|(_, se)| code(se.code())))
        || e.to_string().contains("WAIT cannot be used with replica")
}

/// `WAIT 1` within what is left of `bound` since `started`; whether a replica acknowledged
/// every write made on this connection so far. Never `WAIT … 0` (that blocks forever).
pub(super) async fn wait_replica(
    c: &mut MultiplexedConnection,
    bound: Duration,
    started: tokio::time::Instant,
) -> redis::RedisResult<bool> {
    // Three quarters of what is left: the reply must arrive before the op's own bound.
    let left = bound.saturating_sub(started.elapsed());
    let ms = (left.as_millis() * 3 / 4).max(1) as u64;
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(ms).query_async(c).await?;
    Ok(acked >= 1)
}

impl super::Store {
    /// `host:port` of the primary the last connection through the sentinels went to, kept
    /// after that connection is dropped until the next connect (for status and logs);
    /// `None`: none made yet, the last attempt failed, or one server by URL.
    pub fn primary(&self) -> Option<&str> {
        match &self.client {
            super::Dial::Sentinel(d) => d.primary.as_deref(),
            super::Dial::Url(_) => None,
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn nodes_split_as_the_crate_takes_them() {
        assert_eq!(split_node("127.0.0.1:26379"), ("127.0.0.1".into(), 26379));
        assert_eq!(
            split_node("[2001:db8::1]:26380"),
            ("2001:db8::1".into(), 26380)
        );
        assert_eq!(split_node("s1.example:1"), ("s1.example".into(), 1));
    }

    #[test]
    fn only_a_masters_role_is_a_primary() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert!(is_primary(&Value::Array(vec![
            b("master"),
            Value::Int(0),
            Value::Array(vec![])
        ])));
        assert!(!is_primary(&Value::Array(vec![
            b("slave"),
            b("127.0.0.1"),
            Value::Int(1),
            b("connect"),
            Value::Int(-1)
        ])));
        assert!(!is_primary(&Value::Nil));
    }
}
