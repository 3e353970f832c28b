//! The HTTPS bind listener: `POST /v1/bind` binds the TCP peer's address (never one the client
//! claims) to the identity of the bearer token; `DELETE /v1/bind` ends that binding. One
//! request per connection, bounded in size and time; the listener's port is itself an
//! anonymous endpoint, so the kernel limits how often an unbound prefix can even reach it.

use std::{cell::RefCell, net::SocketAddr, path::Path, rc::Rc, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    },
};
use tracing::{debug, warn};

use super::{
    http::{self, Head, HeadError, Limits, ReadError},
    limit::{self, Backoff, Gate, Permit},
};
use crate::{
    audit::Actor,
    control::reply::HttpError,
    node::Node,
    ops::{self, tokens},
    token_bind::BindFailure,
};

/// One connection, TLS handshake included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The request head: a bearer token and little else.
const LIMITS: Limits = Limits {
    max_bytes: 16 * 1024,
    timeout: TIMEOUT,
};

#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct ListenerError {
    pub what: String,
    pub message: String,
}

fn err(what: impl Into<String>, e: impl std::fmt::Display) -> ListenerError {
    ListenerError {
        what: what.into(),
        message: e.to_string(),
    }
}

/// TLS server config from PEM files (certificate chain, private key).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ListenerError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert.display().to_string(), e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert.display().to_string(), e))?;
    if certs.is_empty() {
        return Err(err(
            cert.display().to_string(),
            "no certificate in the file",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key.display().to_string(), e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err("TLS", e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| err("TLS certificate and key", e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until the daemon stops: at most `max` at once and
/// [`limit::BIND_PER_SOURCE`] from one source (an IPv4 address, an IPv6 /64). Past a source's
/// cap the connection is closed as soon as accepted; at the listener's cap the oldest
/// connection that has not sent its request is closed to make room (`limit::Gate`). Each connection, TLS handshake included, has [`TIMEOUT`].
pub async fn serve(node: Rc<RefCell<Node>>, tcp: TcpListener, tls: TlsAcceptor, max: u64) {
    let gate = Gate::new(&limit::BIND, max, limit::BIND_PER_SOURCE);
    let mut backoff = Backoff::new("bind listener", &limit::BIND);
    loop {
        let ((stream, peer), permit) = backoff
            .admitted(
                &gate,
                async || tcp.accept().await,
                |(_, peer): &(TcpStream, SocketAddr)| Some(peer.ip()),
            )
            .await;
        let n = Rc::clone(&node);
        let tls = tls.clone();
        tokio::task::spawn_local(async move {
            tokio::select! {
                r = tokio::time::timeout(TIMEOUT, handle(&n, stream, peer, tls, &permit)) => {
                    if let Err(e) = r {
                        limit::count_refusal("bind", "timed_out");
                        debug!(%peer, "bind listener: connection timed out ({e})");
                    }
                }
                () = permit.evicted() => {}
            }
            drop(permit);
        });
        // An evicted connection's task closes it before the next accept.
        tokio::task::yield_now().await;
    }
}

fn refusal(error: impl Into<String>) -> HttpError {
    HttpError {
        error: error.into(),
        reason: None,
    }
}

async fn handle(
    node: &RefCell<Node>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: TlsAcceptor,
    permit: &Permit,
) {
    let mut stream = match tls.accept(stream).await {
        Ok(s) => s,
        Err(e) => {
            limit::count_refusal("bind", "tls_handshake");
            debug!(%peer, "bind listener: TLS handshake failed: {e}");
            return;
        }
    };
    let head = http::read_head(&mut stream, LIMITS).await;
    // The request is in: what is left is the agent's work, which eviction must not cut.
    permit.settle();
    let (status, body) = match head {
        Err(HeadError::Read(ReadError::TooLarge(_))) => {
            limit::count_refusal("bind", "too_large");
            (
                413,
                serde_json::to_string(&refusal("request head too large")),
            )
        }
        Err(HeadError::Read(ReadError::TimedOut(t))) => {
            limit::count_refusal("bind", "timed_out");
            debug!(%peer, "bind listener: connection timed out ({}s)", t.as_secs());
            return;
        }
        Err(HeadError::Read(_)) => return,
        Err(e @ HeadError::Malformed(_)) => {
            limit::count_refusal("bind", "malformed");
            (400, serde_json::to_string(&refusal(e.to_string())))
        }
        Ok(head) => respond(node, &head, peer).await,
    };
    let body = body.unwrap_or_default();
    let _ = http::respond_json(&mut stream, status, &body).await;
}

async fn respond(
    node: &RefCell<Node>,
    head: &Head,
    peer: SocketAddr,
) -> (u16, serde_json::Result<String>) {
    let refused = |status, e: HttpError| (status, serde_json::to_string(&e));
    if head.path != "/v1/bind" {
        limit::count_refusal("bind", "not_found");
        return refused(404, refusal("not found: the bind listener serves /v1/bind"));
    }
    let method = head.method.as_str();
    if method != "POST" && method != "DELETE" {
        limit::count_refusal("bind", "method");
        return refused(405, refusal("use POST (bind) or DELETE (unbind)"));
    }
    let Some(token) = head.header("authorization").and_then(|a| {
        a.strip_prefix("Bearer ")
            .or_else(|| a.strip_prefix("bearer "))
    }) else {
        limit::count_refusal("bind", "no_token");
        return refused(401, refusal("missing Authorization: Bearer <token>"));
    };
    // A remote issuer that lacks the token's key fetches its keys first (one fetch shared by
    // every waiter, at most one per cooldown; a token that does not parse never gets here).
    // No borrow of the node is held across the wait.
    let held_by = if method == "POST" {
        prepare_bind(node, token.trim(), peer.ip()).await
    } else {
        // An unbind claims nothing (it would hold the token for this address with no
        // binding); it still fetches an unknown kid first.
        refetch_if_unknown(node, token.trim()).await;
        None
    };
    let who = Actor {
        via: "bind_listener",
        uid: None,
        gid: None,
        pid: None,
    };
    let mut n = node.borrow_mut();
    let result = if method == "POST" {
        let r = tokens::bind_token(&mut n, token.trim(), peer.ip(), &who, held_by);
        ops::audited(&n, &who, r).map(|b| serde_json::to_string(&b))
    } else {
        let r = tokens::unbind_token(&mut n, token.trim(), peer.ip());
        ops::audited(&n, &who, r).map(|b| serde_json::to_string(&b))
    };
    match result {
        Ok(body) => (200, body),
        Err(f) => {
            if matches!(
                f,
                BindFailure::Kernel(_) | BindFailure::Unrecorded(_) | BindFailure::Unaudited(_)
            ) {
                warn!(%peer, "{} refused: {}", head.method, f.message());
            }
            refused(
                f.http_status(),
                HttpError {
                    error: f.public_message(),
                    reason: Some(f.label().to_owned()),
                },
            )
        }
    }
}

/// What a token bind awaits before the node is borrowed (never while): the refetch its
/// unknown `kid` calls for, then, on a fleet node and for a token that verifies, the pool's
/// claim of its token id for `addr` (one store round trip within the store timeout).
/// Returns the other address the claim names, if another holds it: the bind is a replay.
/// A token that does not verify costs no store operation: its refusal is made by the bind
/// itself, as on a single node.
pub async fn prepare_bind(
    node: &RefCell<Node>,
    token: &str,
    addr: std::net::IpAddr,
) -> Option<std::net::IpAddr> {
    refetch_if_unknown(node, token).await;
    let addr = addr.to_canonical();
    let verified = {
        let n = node.borrow();
        n.fleet.as_ref()?;
        let svc = n.tokens.as_ref()?;
        let (_, claims) = svc.verify(token, crate::clock::wall_ms() / 1000).ok()?;
        // Bound here already from this address (a renewal): the claim was made then.
        let now = crate::state::now_unix_ms();
        let renewal = n.state.bindings.iter().any(|b| {
            b.addr == addr && b.token_id.as_deref() == Some(claims.jti.as_str()) && !b.expired(now)
        });
        (!renewal).then_some(claims)
    };
    let claims = verified?;
    crate::fleet::link::claim(node, &claims.jti, addr, claims.exp).await
}

/// How long a bind waits on its unknown kid's refetch: less than the connection's
/// [`TIMEOUT`], so a slow identity provider gets the client an answer (`unknown_kid`, try
/// again) rather than a closed connection. The fetch goes on in its own task.
const REFETCH_WAIT: Duration = Duration::from_secs(3);

/// Waits (at most [`REFETCH_WAIT`]) for the refetch a token's unknown `kid` calls for, if it
/// calls for one (`TokenService::wants_refetch`); the node is borrowed only to ask.
pub async fn refetch_if_unknown(node: &RefCell<Node>, token: &str) {
    let keys = node
        .borrow()
        .tokens
        .as_ref()
        .and_then(|t| t.wants_refetch(token));
    if let Some(keys) = keys {
        let _ = tokio::time::timeout(REFETCH_WAIT, keys.refetch_unknown_kid()).await;
    }
}
