//! `GET /metrics` over plain HTTP: reads the request head (bounded), answers with
//! `metrics::render` of the node.

use std::{cell::RefCell, net::SocketAddr, rc::Rc, time::Duration};

use super::{
    http::{self, HeadError, Limits, ReadError},
    limit::{self, Backoff, Gate, Permit},
};
use crate::node::Node;
use tokio::net::{TcpListener, TcpStream};

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
/// At most `max` connections are held: at the cap the oldest that has not sent its request
/// is closed to make room, and if every one has, the newcomer is closed as soon as accepted. A
/// failed accept backs off.
pub async fn serve(node: Rc<RefCell<Node>>, tcp: TcpListener, max: u64) {
    let gate = Gate::new(&limit::METRICS, max, 0);
    let mut backoff = Backoff::new("metrics listener", &limit::METRICS);
    loop {
        let ((stream, _), permit) = backoff
            .admitted(&gate, async || tcp.accept().await, |_| None)
            .await;
        let n = Rc::clone(&node);
        tokio::task::spawn_local(async move {
            tokio::select! {
                r = tokio::time::timeout(LIMITS.timeout, handle(&n, stream, &permit)) => {
                    if r.is_err() {
                        limit::count_refusal("metrics", "timed_out");
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

async fn handle(node: &RefCell<Node>, mut stream: TcpStream, permit: &Permit) {
    let head = http::read_head(&mut stream, LIMITS).await;
    // The request is in: rendering and answering it are not cut by eviction.
    permit.settle();
    let (status, ctype, body) = match head {
        Err(HeadError::Read(ReadError::TooLarge(_))) => {
            limit::count_refusal("metrics", "too_large");
            (431, "text/plain", "request head too large\n".to_owned())
        }
        Err(HeadError::Read(ReadError::TimedOut(_))) => {
            limit::count_refusal("metrics", "timed_out");
            return;
        }
        Err(HeadError::Read(_)) => return,
        Err(HeadError::Malformed(_)) => {
            limit::count_refusal("metrics", "malformed");
            (400, "text/plain", "malformed request\n".to_owned())
        }
        Ok(head) if head.method != "GET" => {
            limit::count_refusal("metrics", "method");
            (405, "text/plain", "GET only\n".to_owned())
        }
        Ok(head) if head.path != "/metrics" => {
            limit::count_refusal("metrics", "not_found");
            (404, "text/plain", "see /metrics\n".to_owned())
        }
        Ok(_) => match crate::metrics::render(&node.borrow()) {
            Ok(text) => (200, "text/plain; version=0.0.4; charset=utf-8", text),
            Err(e) => (500, "text/plain", format!("{e}\n")),
        },
    };
    let reason = if status == 200 { "OK" } else { "Error" };
    let _ = http::respond(&mut stream, status, reason, ctype, &[], body.as_bytes()).await;
}
