//! The control socket: a Unix socket, one JSON request line in, one JSON response line out.
//! The peer is judged by SO_PEERCRED, the request read bounded in size and time, and the
//! request handed to `ops::dispatch`.

use std::{cell::RefCell, path::Path, rc::Rc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::AsyncWriteExt as _,
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use super::{
    http::{Limits, ReadError, read_bounded},
    limit::{self, Backoff, Gate},
};
use crate::{
    control::{
        peer::{self, Peer},
        protocol::{ErrorKind, MAX_REQUEST_BYTES, Request, Response},
    },
    node::Node,
    ops::{self, Lifecycle},
};

const LIMITS: Limits = Limits {
    max_bytes: MAX_REQUEST_BYTES,
    timeout: Duration::from_secs(5),
};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SocketError {
    pub path: String,
    pub message: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> SocketError {
    SocketError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Binds the control socket at `path`: mode 0660, group `group` (root-only if the group
/// does not exist).
pub fn bind(path: &Path, group: &str) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    }
    // A socket left by a killed agent: nobody answers on it, so it can go.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(
            path,
            "another agent is already serving this control socket",
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| err(path, e))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(path, e))?;
    if let Some(gid) = peer::group_gid(group) {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| err(path, e))?;
    } else {
        warn!("group {group} does not exist: the control socket is root-only");
    }
    Ok(listener)
}

/// Accepts connections until the daemon stops: at most `max` at once (the rest are closed
/// as soon as accepted), a failed accept backing off. `stopped` is told when a request
/// uninstalled the node.
pub async fn serve(
    node: Rc<RefCell<Node>>,
    life: Rc<dyn Lifecycle>,
    listener: UnixListener,
    max: u64,
    stopped: Rc<tokio::sync::Notify>,
) {
    let gate = Gate::new(&limit::CONTROL, max, 0);
    let mut backoff = Backoff::new("control socket", &limit::CONTROL);
    loop {
        let ((stream, _), permit) = backoff
            .admitted(&gate, async || listener.accept().await, |_| None)
            .await;
        // Local, and judged by its credentials: the control socket evicts no one.
        permit.settle();
        let n = Rc::clone(&node);
        let life = Rc::clone(&life);
        let stopped = Rc::clone(&stopped);
        tokio::task::spawn_local(async move {
            serve_connection(&n, life.as_ref(), stream).await;
            drop(permit);
            if n.borrow().uninstalled {
                stopped.notify_one();
            }
        });
    }
}

/// Serves one connection: one request, one response.
pub async fn serve_connection(node: &RefCell<Node>, life: &dyn Lifecycle, mut stream: UnixStream) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(e) => {
            warn!("control socket: no peer credentials: {e}");
            return;
        }
    };
    // The request is read (bounded in size and time) before the peer is judged, so that a
    // refused client reads its refusal instead of a reset connection.
    let mut buf = BytesMut::with_capacity(1024);
    let read = read_bounded(&mut stream, &mut buf, LIMITS, |b| {
        b.iter().position(|c| *c == b'\n')
    })
    .await;
    let line = match read {
        Ok(end) => Ok(&buf[..end]),
        // A last line without its newline is still a request.
        Err(ReadError::Closed) => Ok(&buf[..]),
        Err(e) => Err(e),
    };
    let group = node.borrow().config.node.control_group.clone();
    let answer = match peer::authorize(&peer, &group) {
        Err(why) => {
            warn!("{why}");
            Response::err(ErrorKind::Refused, why)
        }
        Ok(()) => match line {
            Err(e) => Response::err(ErrorKind::BadRequest, e.to_string()),
            Ok(line) => match serde_json::from_slice::<Request>(line.trim_ascii_end()) {
                // The report's own bound, on the line it came in (the socket's limit is
                // the larger one for every request).
                Ok(Request::Usage(_))
                    if line.len() > node.borrow().config.usage.max_report_bytes =>
                {
                    let max = node.borrow().config.usage.max_report_bytes;
                    ops::usage::refused(
                        &mut node.borrow_mut(),
                        crate::usage::Refusal::TooLarge(max),
                    )
                    .into()
                }
                Ok(req) => {
                    // As on the bind listener: an unknown key of a remote issuer is fetched
                    // before the node is borrowed, never while.
                    let held_by = match &req {
                        Request::BindToken { token, addr } => {
                            super::bind::prepare_bind(node, token.trim(), *addr).await
                        }
                        _ => None,
                    };
                    ops::dispatch_claimed(&mut node.borrow_mut(), life, req, &peer.actor(), held_by)
                }
                // A usage report that does not parse is the feed's `bad_report` (counted),
                // any other request a malformed one.
                Err(e) if is_usage(line) => ops::usage::refused(
                    &mut node.borrow_mut(),
                    crate::usage::Refusal::BadReport(e.to_string()),
                )
                .into(),
                Err(e) => Response::err(ErrorKind::BadRequest, format!("malformed request: {e}")),
            },
        },
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    let _ = tokio::time::timeout(LIMITS.timeout, stream.write_all(&out)).await;
}

/// Whether a request line that did not parse is a usage report (its `verb` says so).
fn is_usage(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(line.trim_ascii_end())
        .is_ok_and(|v| v.get("verb").and_then(|v| v.as_str()) == Some("usage"))
}
