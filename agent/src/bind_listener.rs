//! The HTTPS bind listener: `POST /v1/bind` binds the TCP peer's address (never one the client
//! claims) to the identity of the bearer token; `DELETE /v1/bind` ends that binding. One
//! request per connection, bounded in size and time; the listener's port is itself an
//! anonymous endpoint, so the kernel limits how often an unbound prefix can even reach it.

use std::{cell::RefCell, net::SocketAddr, path::Path, rc::Rc, sync::Arc, time::Duration};

use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    },
};
use tracing::{info, warn};

use crate::{audit::Actor, daemon::Daemon};

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

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

/// Accepts connections until the daemon stops.
pub async fn serve(daemon: Rc<RefCell<Daemon>>, tcp: TcpListener, tls: TlsAcceptor) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("bind listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let d = Rc::clone(&daemon);
        let tls = tls.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = tokio::time::timeout(TIMEOUT, handle(&d, stream, peer, tls)).await {
                info!(%peer, "bind listener: connection timed out ({e})");
            }
        });
    }
}

async fn handle(daemon: &RefCell<Daemon>, stream: TcpStream, peer: SocketAddr, tls: TlsAcceptor) {
    let mut stream = match tls.accept(stream).await {
        Ok(s) => s,
        Err(e) => {
            info!(%peer, "bind listener: TLS handshake failed: {e}");
            return;
        }
    };
    let mut buf = Vec::with_capacity(1024);
    let (status, body) = loop {
        let mut chunk = [0u8; 2048];
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD {
            break (413, json!({"error": "request head too large"}));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Err(e) => break (400, json!({"error": format!("malformed request: {e}")})),
            Ok(httparse::Status::Complete(_)) => break respond(daemon, &req, peer),
        }
    };
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn respond(
    daemon: &RefCell<Daemon>,
    req: &httparse::Request,
    peer: SocketAddr,
) -> (u16, serde_json::Value) {
    if req.path != Some("/v1/bind") {
        return (
            404,
            json!({"error": "not found: the bind listener serves /v1/bind"}),
        );
    }
    let method = req.method.unwrap_or_default();
    if method != "POST" && method != "DELETE" {
        return (405, json!({"error": "use POST (bind) or DELETE (unbind)"}));
    }
    let auth = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
        .and_then(|h| std::str::from_utf8(h.value).ok());
    let Some(token) = auth.and_then(|a| {
        a.strip_prefix("Bearer ")
            .or_else(|| a.strip_prefix("bearer "))
    }) else {
        return (
            401,
            json!({"error": "missing Authorization: Bearer <token>"}),
        );
    };
    let who = Actor {
        via: "bind_listener",
        uid: None,
        gid: None,
        pid: None,
    };
    let mut d = daemon.borrow_mut();
    let result = if method == "POST" {
        d.bind_token(token.trim(), peer.ip(), &who)
    } else {
        d.unbind_token(token.trim(), peer.ip(), &who)
    };
    match result {
        Ok(detail) => (200, detail),
        Err(f) => (
            f.http_status(),
            json!({"error": f.message(), "reason": f.label()}),
        ),
    }
}
