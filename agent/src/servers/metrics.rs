//! `GET /metrics` over plain HTTP: reads the request head (bounded), answers with
//! `metrics::render` of the node.

use std::{cell::RefCell, net::SocketAddr, rc::Rc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::http::{self, HeadError, Limits, ReadError};
use crate::node::Node;

/// A scrape's request head: small, and quick.
const LIMITS: Limits = Limits {
    max_bytes: 8192,
    timeout: Duration::from_secs(10),
};

/// Binds the metrics listener (`listen.metrics`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` until the daemon stops.
pub async fn serve(node: Rc<RefCell<Node>>, tcp: TcpListener) {
    loop {
        let (stream, _) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let n = Rc::clone(&node);
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(LIMITS.timeout, handle(&n, stream)).await;
        });
    }
}

async fn handle(node: &RefCell<Node>, mut stream: TcpStream) {
    let (status, ctype, body) = match http::read_head(&mut stream, LIMITS).await {
        Err(HeadError::Read(ReadError::TooLarge(_))) => {
            (431, "text/plain", "request head too large\n".to_owned())
        }
        Err(HeadError::Read(_)) => return,
        Err(HeadError::Malformed(_)) => (400, "text/plain", "malformed request\n".to_owned()),
        Ok(head) if head.method != "GET" => (405, "text/plain", "GET only\n".to_owned()),
        Ok(head) if head.path != "/metrics" => (404, "text/plain", "see /metrics\n".to_owned()),
        Ok(_) => match crate::metrics::render(&node.borrow()) {
            Ok(text) => (200, "text/plain; version=0.0.4; charset=utf-8", text),
            Err(e) => (500, "text/plain", format!("{e}\n")),
        },
    };
    let reason = if status == 200 { "OK" } else { "Error" };
    let _ = http::respond(&mut stream, status, reason, ctype, &[], body.as_bytes()).await;
}
