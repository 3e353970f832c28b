//! What can be done to a node, grouped by what it changes: bindings, quarantine, quotas,
//! tokens; `status` holds the read verbs. Every operation is a function over [`Node`] with a
//! typed result (the `control::reply` types) and a typed error; a mutating one also says
//! what to write to the audit log ([`Change`]), and [`audited`] is the one place that writes
//! it. The servers are adapters: the control socket goes through [`dispatch`], the HTTPS bind
//! listener through `tokens::bind_token` / `tokens::unbind_token` and [`audited`].

pub mod bindings;
pub mod quarantine;
pub mod quotas;
pub mod status;
pub mod tokens;
pub mod usage;

use serde::Serialize;
use tracing::warn;

use crate::{
    audit::Actor,
    control::{
        protocol::{ErrorKind, Request, Response},
        reply::{Reloaded, Uninstalled},
    },
    node::Node,
};

/// Why an operation failed; the kind decides the CLI's exit code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Kernel(String),
    /// A refusal with its own label for scripts (the usage feed's `unknown_identity`, ...),
    /// answered as `kind` with the label beside the message.
    #[error("{label}: {message}")]
    Labelled {
        kind: ErrorKind,
        label: &'static str,
        message: String,
    },
}

impl OpError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            OpError::BadRequest(_) => ErrorKind::BadRequest,
            OpError::NotFound(_) => ErrorKind::NotFound,
            OpError::Config(_) => ErrorKind::Config,
            OpError::Kernel(_) => ErrorKind::Kernel,
            OpError::Labelled { kind, .. } => *kind,
        }
    }

    pub fn no_identity(name: &str) -> OpError {
        OpError::NotFound(format!("no identity named {name:?}"))
    }
}

impl From<OpError> for Response {
    fn from(e: OpError) -> Response {
        let mut r = Response::err(e.kind(), e.to_string());
        if let (OpError::Labelled { label, .. }, Some(body)) = (&e, r.error.as_mut()) {
            body.label = Some((*label).to_owned());
        }
        r
    }
}

impl From<crate::tables::TableError> for OpError {
    fn from(e: crate::tables::TableError) -> OpError {
        OpError::Kernel(e.to_string())
    }
}

/// A change refused because its journal record could not be written (a full or read-only
/// state disk): nothing of it was made, in the kernel or the state.
pub fn not_recorded(e: crate::state::StateError) -> OpError {
    OpError::Kernel(format!(
        "not done: the change cannot be recorded ({e}); nothing was changed"
    ))
}

impl From<crate::state::StateError> for OpError {
    fn from(e: crate::state::StateError) -> OpError {
        OpError::Kernel(e.to_string())
    }
}

/// An audit record an operation asks for: `action`, `reason` and `detail` as the audit log
/// has always spelt them (docs/operations.md).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub action: &'static str,
    pub reason: String,
    pub detail: serde_json::Value,
}

impl Change {
    pub fn new(action: &'static str, reason: impl Into<String>, detail: impl Serialize) -> Change {
        Change {
            action,
            reason: reason.into(),
            detail: serde_json::to_value(detail).unwrap_or_default(),
        }
    }
}

/// A finished operation: its reply and, for a change of state, its audit record.
#[derive(Debug)]
pub struct Done<T> {
    pub reply: T,
    pub change: Option<Change>,
}

impl<T> Done<T> {
    /// A read: nothing to audit.
    pub fn read(reply: T) -> Done<T> {
        Done {
            reply,
            change: None,
        }
    }

    pub fn changed(reply: T, change: Change) -> Done<T> {
        Done {
            reply,
            change: Some(change),
        }
    }
}

/// A failed operation, and the audit record a refusal gets (token refusals, refused
/// reloads), if it gets one.
#[derive(Debug)]
pub struct Failed<E = OpError> {
    pub error: E,
    pub change: Option<Change>,
}

impl<E> Failed<E> {
    pub fn audited(error: E, change: Change) -> Failed<E> {
        Failed {
            error,
            change: Some(change),
        }
    }
}

impl From<OpError> for Failed {
    fn from(error: OpError) -> Failed {
        Failed {
            error,
            change: None,
        }
    }
}

impl From<crate::tables::TableError> for Failed {
    fn from(e: crate::tables::TableError) -> Failed {
        OpError::from(e).into()
    }
}

impl From<crate::state::StateError> for Failed {
    fn from(e: crate::state::StateError) -> Failed {
        OpError::from(e).into()
    }
}

/// An audit record that could not be written, after the change it records was made.
pub struct AuditFailed(pub String);

impl From<AuditFailed> for OpError {
    fn from(e: AuditFailed) -> OpError {
        OpError::Kernel(format!(
            "done, but its audit record could not be written: audit log: {}",
            e.0
        ))
    }
}

/// Writes the operation's audit record, if it has one: the one place requests are audited.
/// A change whose record cannot be written is answered with an error (it was made, but an
/// unaudited change must not look like a success); a refusal's record is rate-limited
/// (`Audit::record_refusal`), and a refusal whose record cannot be written is still the
/// refusal.
pub fn audited<T, E: From<AuditFailed>>(
    node: &Node,
    who: &Actor,
    r: Result<Done<T>, Failed<E>>,
) -> Result<T, E> {
    match r {
        Ok(Done { reply, change }) => {
            if let Some(c) = change {
                node.audit
                    .record(who, c.action, &c.reason, c.detail)
                    .map_err(|e| E::from(AuditFailed(e.to_string())))?;
            }
            Ok(reply)
        }
        // Refusals change nothing and anyone may cause them: rate-limited (the rest are
        // counted and summed up), never synced one by one.
        Err(Failed { error, change }) => {
            if let Some(c) = change
                && let Err(e) = node
                    .audit
                    .record_refusal(who, c.action, &c.reason, c.detail)
            {
                warn!("audit log: {e}");
            }
            Err(error)
        }
    }
}

/// What the control socket needs from the process around the node: `reload` re-reads the
/// configuration the process was started with, which the node does not know.
pub trait Lifecycle {
    fn reload(&self, node: &mut Node, who: &Actor) -> Result<Done<Reloaded>, Failed>;
}

/// Serves one control-socket request from `who`. Mutating requests
/// ([`Request::mutates`]) are audited here.
pub fn dispatch(node: &mut Node, life: &dyn Lifecycle, req: Request, who: &Actor) -> Response {
    dispatch_claimed(node, life, req, who, None)
}

/// [`dispatch`] for a token bind whose token the pool's claim names another address for
/// (`held_by`, from `fleet::link::claim`, made before the node was borrowed).
pub fn dispatch_claimed(
    node: &mut Node,
    life: &dyn Lifecycle,
    req: Request,
    who: &Actor,
    held_by: Option<std::net::IpAddr>,
) -> Response {
    let mutates = req.mutates();
    // A token rebind that changes nothing writes nothing (#12 finding 7); a usage report
    // is counted, not audited one by one (thousands a second): the cut-off it causes is.
    let may_be_noop = matches!(req, Request::BindToken { .. } | Request::Usage(_));
    let r = execute(node, life, req, who, held_by);
    let r = if mutates {
        debug_assert!(
            may_be_noop || r.as_ref().map_or(true, |d| d.change.is_some()),
            "a mutating request without an audit record"
        );
        audited(node, who, r)
    } else {
        r.map(|d| d.reply).map_err(|f| f.error)
    };
    match r {
        Ok(v) => Response::ok(v),
        Err(e) => e.into(),
    }
}

/// The reply as JSON, for the response line.
fn json<T: Serialize, E>(r: Result<Done<T>, Failed<E>>) -> Result<Done<serde_json::Value>, Failed>
where
    OpError: From<E>,
{
    match r {
        Ok(Done { reply, change }) => match serde_json::to_value(reply) {
            Ok(reply) => Ok(Done { reply, change }),
            Err(e) => Err(OpError::Kernel(format!("encoding the reply: {e}")).into()),
        },
        Err(Failed { error, change }) => Err(Failed {
            error: error.into(),
            change,
        }),
    }
}

fn read<T: Serialize>(r: Result<T, OpError>) -> Result<Done<serde_json::Value>, Failed> {
    json::<T, OpError>(r.map(Done::read).map_err(Failed::from))
}

fn execute(
    node: &mut Node,
    life: &dyn Lifecycle,
    req: Request,
    who: &Actor,
    held_by: Option<std::net::IpAddr>,
) -> Result<Done<serde_json::Value>, Failed> {
    match req {
        Request::Status {} => read(status::status(node)),
        Request::Endpoints {} => read(status::endpoints(node)),
        Request::FleetStatus {} => read(status::fleet(node)),
        Request::Identities {} => read(status::identities(node)),
        Request::Identity { name } => read(status::identity(node, &name)),
        Request::Explain(probe) => read(status::explain(node, &probe)),
        Request::QuotaShow { identity } => read(quotas::show(node, identity.as_deref())),
        Request::Bind {
            target,
            identity,
            for_secs,
        } => json(bindings::bind(node, who, &target, &identity, for_secs)),
        Request::Unbind { target } => json(bindings::unbind(node, &target)),
        Request::Quarantine {
            target,
            for_secs,
            reason,
        } => json(quarantine::quarantine(
            node, who, &target, for_secs, &reason,
        )),
        Request::Release { target, reason } => json(quarantine::release(node, &target, &reason)),
        Request::Reload {} => json(life.reload(node, who)),
        Request::QuotaReset { identity } => json(quotas::reset(node, identity.as_deref())),
        Request::BindToken { token, addr } => {
            json(tokens::bind_token(node, &token, addr, who, held_by))
        }
        Request::Revoke {
            token_id,
            identity,
            reason,
        } => json(tokens::revoke(
            node,
            token_id.as_deref(),
            identity.as_deref(),
            &reason,
        )),
        Request::Uninstall {} => json(uninstall(node)),
        Request::Usage(r) => {
            // The request's size is the server's to check (it has the line): serialised
            // again here, it is the same bound for a report sent by `dispatch` directly.
            let size = serde_json::to_vec(&r).map_or(0, |v| v.len());
            json(usage::report(node, &r, size))
        }
    }
}

/// Detaches everywhere and removes every pin; the daemon stops after answering.
pub fn uninstall(node: &mut Node) -> Result<Done<Uninstalled>, Failed> {
    let pin_dir = node.config.node.pin_dir.clone();
    let removed = crate::pins::uninstall(&pin_dir).map_err(|e| OpError::Kernel(e.to_string()))?;
    node.uninstalled = true;
    Ok(Done::changed(
        Uninstalled { removed },
        Change::new("uninstall", "", serde_json::json!({ "pin_dir": pin_dir })),
    ))
}
