//! The usage feed's HTTP listener (`[usage] listen`): `POST /v1/usage` with a usage report
//! as its JSON body and the shared secret in `X-Tollgate-Usage-Secret`. Plain HTTP on a
//! loopback address by default (the gateway or sidecar runs on the node); one request per
//! connection, bounded in size and time by the servers' one reader (`http`), connections
//! capped as the metrics listener's (`limit`). Answers `{"ok": {...}}` or
//! `{"error": label, "message": ...}`.

use std::{cell::RefCell, rc::Rc, time::Duration};

use tokio::net::TcpListener;

use super::{
    http::{self, BodyError, HeadError, Limits, ReadError},
    limit::{self, Backoff, Gate, Permit},
};
use crate::{
    node::Node,
    ops::{self, OpError},
    usage::{self, Refusal},
};

/// One connection: a sender on the same node answers at once.
const LIMITS: Limits = Limits {
    max_bytes: 8192,
    timeout: Duration::from_secs(5),
};

/// Serves `POST /v1/usage` until the daemon stops; at most `max` connections at once.
pub async fn serve(node: Rc<RefCell<Node>>, tcp: TcpListener, max: u64) {
    let gate = Gate::new(&limit::USAGE, max, 0);
    let mut backoff = Backoff::new("usage listener", &limit::USAGE);
    loop {
        let ((mut stream, _), permit) = backoff
            .admitted(&gate, async || tcp.accept().await, |_| None)
            .await;
        let n = Rc::clone(&node);
        tokio::task::spawn_local(async move {
            tokio::select! {
                r = tokio::time::timeout(LIMITS.timeout, handle(&n, &mut stream, &permit)) => {
                    if r.is_err() {
                        limit::count_refusal("usage", "timed_out");
                    }
                }
                () = permit.evicted() => {}
            }
            drop(permit);
        });
        tokio::task::yield_now().await;
    }
}

fn error_body(label: &str, message: &str) -> String {
    serde_json::json!({"error": label, "message": message}).to_string()
}

async fn handle(node: &RefCell<Node>, stream: &mut tokio::net::TcpStream, permit: &Permit) {
    let max_body = node.borrow().config.usage.max_report_bytes;
    let read = http::read_request(stream, LIMITS, max_body).await;
    permit.settle();
    let (status, body) = match read {
        Err(BodyError::Head(HeadError::Read(ReadError::TimedOut(_)))) => {
            limit::count_refusal("usage", "timed_out");
            return;
        }
        Err(BodyError::Head(HeadError::Read(ReadError::TooLarge(_))))
        | Err(BodyError::TooLarge(_)) => refusal(node, Refusal::TooLarge(max_body)),
        Err(BodyError::Head(HeadError::Read(_))) => return,
        Err(BodyError::Head(e @ HeadError::Malformed(_))) => {
            refusal(node, Refusal::BadReport(e.to_string()))
        }
        Err(e @ BodyError::NoLength) => refusal(node, Refusal::BadReport(e.to_string())),
        Ok((head, body)) => respond(node, &head, &body),
    };
    let _ = http::respond_json(stream, status, &body).await;
}

/// A refusal made here, before the report reached `ops::usage::report`: counted there too.
fn refusal(node: &RefCell<Node>, r: Refusal) -> (u16, String) {
    let status = r.http_status();
    let body = error_body(r.label(), &r.message());
    let _ = ops::usage::refused(&mut node.borrow_mut(), r);
    (status, body)
}

fn respond(node: &RefCell<Node>, head: &http::Head, body: &[u8]) -> (u16, String) {
    if head.path != "/v1/usage" {
        limit::count_refusal("usage", "not_found");
        return (
            404,
            error_body("not_found", "the usage listener serves POST /v1/usage"),
        );
    }
    if head.method != "POST" {
        limit::count_refusal("usage", "method");
        return (405, error_body("method", "use POST"));
    }
    // The secret before the body is even parsed: without it, nothing about the report
    // (not whether its identity exists) is answered.
    let presented = head
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(usage::SECRET_HEADER))
        .map(|(_, v)| v.trim_ascii().to_vec());
    let ok = {
        let n = node.borrow();
        match (&n.usage.secret, &presented) {
            (_, None) => Err(Refusal::NoSecret),
            (Some(s), Some(p)) if usage::secret_matches(s, p) => Ok(()),
            _ => Err(Refusal::BadSecret),
        }
    };
    if let Err(r) = ok {
        return refusal(node, r);
    }
    let report = match usage::parse(body) {
        Ok(r) => r,
        Err(r) => return refusal(node, r),
    };
    let mut n = node.borrow_mut();
    match ops::usage::report(&mut n, &report, body.len()) {
        Ok(done) => (200, serde_json::json!({"ok": done.reply}).to_string()),
        Err(f) => match f.error {
            OpError::Labelled { label, message, .. } => {
                (usage::status_of(label), error_body(label, &message))
            }
            e => (500, error_body("internal", &e.to_string())),
        },
    }
}
