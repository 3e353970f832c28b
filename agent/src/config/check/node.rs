//! `[node]`, `[anonymous]`, `[drop_events]`, `[listen]` and the bind listener's coverage.

use std::ops::Range;

use tollgate_common::policy::Class;

use super::{Checker, Result};
use crate::config::{
    Anonymous, DropEvents, Endpoint, Listen, Node,
    raw::{RawAnonymous, RawDropEvents, RawListen, RawNode, S},
};
use crate::loader::{AttachMode, KernelLog};
use crate::tables::Proto;
use crate::tunnels::TunnelPolicy;

/// Linux IFNAMSIZ (16) less the terminating NUL.
const MAX_IFNAME: usize = 15;
/// Keeps `interval_ms * 1e6` (ns) far from overflow; an hour between events is silence.
const MAX_DROP_EVENT_INTERVAL_MS: i64 = 3_600_000;
/// An audit log smaller than this would rotate away the record it has just written.
const MIN_AUDIT_BYTES: i64 = 65_536;

impl Checker<'_> {
    pub(super) fn node(&self, raw: S<RawNode>) -> Result<Node> {
        let raw = raw.into_inner();
        let defaults = Node::with_defaults(Vec::new());
        let list = &raw.interfaces;
        if list.get_ref().is_empty() {
            return Err(self.err(
                list.span(),
                "node.interfaces",
                "at least one interface is required",
            ));
        }
        let mut interfaces: Vec<String> = Vec::new();
        for i in list.get_ref() {
            let name = i.get_ref();
            if let Some(why) = ifname_problem(name) {
                return Err(self.err(
                    i.span(),
                    "node.interfaces",
                    format!("{name:?} is not a valid interface name: {why}"),
                ));
            }
            if interfaces.contains(name) {
                return Err(self.err(
                    i.span(),
                    "node.interfaces",
                    format!("interface {name:?} is listed twice"),
                ));
            }
            interfaces.push(name.clone());
        }
        let xdp_mode = match &raw.xdp_mode {
            None => defaults.xdp_mode,
            Some(m) => match m.get_ref().as_str() {
                "auto" => AttachMode::Auto,
                "native" => AttachMode::Native,
                "generic" => AttachMode::Generic,
                other => {
                    return Err(self.err(
                        m.span(),
                        "node.xdp_mode",
                        format!("unknown XDP mode {other:?}: expected auto, native or generic"),
                    ));
                }
            },
        };
        let control_group = match &raw.control_group {
            None => defaults.control_group.clone(),
            Some(g) => {
                let name = g.get_ref();
                if let Some(why) = group_problem(name) {
                    return Err(self.err(
                        g.span(),
                        "node.control_group",
                        format!("{name:?} is not a valid group name: {why}"),
                    ));
                }
                name.clone()
            }
        };
        let kernel_log = match &raw.kernel_log {
            None => defaults.kernel_log,
            Some(v) => KernelLog::from_label(v.get_ref()).ok_or_else(|| {
                self.err(
                    v.span(),
                    "node.kernel_log",
                    format!(
                        "unknown kernel log level {:?}: expected off, error, warn, info or debug",
                        v.get_ref()
                    ),
                )
            })?,
        };
        let tunnels = match &raw.tunnels {
            None => defaults.tunnels,
            Some(v) => TunnelPolicy::from_label(v.get_ref()).ok_or_else(|| {
                self.err(
                    v.span(),
                    "node.tunnels",
                    format!(
                        "unknown tunnel policy {:?}: expected enforce (cover every \
                         decapsulating device), refuse (refuse to start while one exists) or \
                         warn (enforce nothing on them)",
                        v.get_ref()
                    ),
                )
            })?,
        };
        let audit_max_bytes = self.int(
            &raw.audit_max_bytes,
            "node.audit_max_bytes",
            defaults.audit_max_bytes as i64,
            MIN_AUDIT_BYTES..=i64::MAX,
        )? as u64;
        Ok(Node {
            interfaces,
            kernel_log,
            tunnels,
            audit_max_bytes,
            xdp_mode,
            pin_dir: self.abs_path(&raw.pin_dir, "node.pin_dir", &defaults.pin_dir)?,
            state_dir: self.abs_path(&raw.state_dir, "node.state_dir", &defaults.state_dir)?,
            control_socket: self.abs_path(
                &raw.control_socket,
                "node.control_socket",
                &defaults.control_socket,
            )?,
            control_group,
        })
    }

    pub(super) fn anonymous(&self, raw: Option<RawAnonymous>) -> Result<Anonymous> {
        let d = Anonymous::default();
        let raw = raw.unwrap_or_default();
        let pps = self.int(
            &raw.packets_per_second,
            "anonymous.packets_per_second",
            d.packets_per_second as i64,
            0..=i64::MAX,
        )?;
        let burst = self.int(&raw.burst, "anonymous.burst", d.burst as i64, 0..=i64::MAX)?;
        if pps > 0 && burst < 1 {
            let span = raw.burst.as_ref().map(|b| b.span()).unwrap_or(0..0);
            return Err(self.err(
                span,
                "anonymous.burst",
                "a burst below one packet admits nothing: burst must be at least 1 while \
                 packets_per_second is above 0",
            ));
        }
        Ok(Anonymous {
            packets_per_second: pps as u64,
            burst: burst as u64,
        })
    }

    pub(super) fn drop_events(&self, raw: Option<RawDropEvents>) -> Result<DropEvents> {
        let d = DropEvents::default();
        let raw = raw.unwrap_or_default();
        let ms = self.int(
            &raw.interval_ms,
            "drop_events.interval_ms",
            d.interval_ms as i64,
            0..=MAX_DROP_EVENT_INTERVAL_MS,
        )?;
        Ok(DropEvents {
            interval_ms: ms as u64,
        })
    }

    pub(super) fn listen(&self, raw: Option<RawListen>) -> Result<Listen> {
        let d = Listen::default();
        let raw = raw.unwrap_or_default();
        let bind = self.socket_addr(&raw.bind, "listen.bind", d.bind)?;
        let metrics = self.socket_addr(&raw.metrics, "listen.metrics", d.metrics)?;
        let clash = bind.port() == metrics.port()
            && (bind.ip() == metrics.ip()
                || bind.ip().is_unspecified()
                || metrics.ip().is_unspecified());
        if clash {
            // Point at whichever of the two the file sets (the metrics one when both).
            let (field, span) = match (&raw.metrics, &raw.bind) {
                (Some(m), _) => ("listen.metrics", m.span()),
                (None, Some(b)) => ("listen.bind", b.span()),
                (None, None) => ("listen.metrics", 0..0),
            };
            return Err(self.err(
                span,
                field,
                format!(
                    "listen.bind ({bind}) and listen.metrics ({metrics}) cannot both listen there"
                ),
            ));
        }
        Ok(Listen { bind, metrics })
    }

    /// With tokens on, the bind listener's port must be an endpoint that unbound clients may
    /// reach (`anonymous = true`: the per-prefix allowance is all that limits them there; no
    /// endpoint at all is no limit; `anonymous = false` is no bind ever) and that admits every
    /// class a token can place an identity in (a token's class claim may name any of them;
    /// a bound client renews and unbinds on the same port).
    pub(super) fn bind_listener_coverage(
        &self,
        span: Range<usize>,
        listen: &Listen,
        endpoints: &[Endpoint],
    ) -> Result<()> {
        let port = listen.bind.port();
        let field = "listen.bind";
        let Some(ep) = endpoints.iter().find(|e| {
            e.spec.proto == Proto::Tcp && e.port_ranges.iter().any(|r| r.contains(&port))
        }) else {
            return Err(self.err(
                span,
                field,
                format!(
                    "the token bind listener ({}) is on tcp port {port}, which no endpoint \
                     covers: unbound clients would reach it with no per-prefix limit at all; \
                     add an endpoint for tcp {port} with anonymous = true",
                    listen.bind
                ),
            ));
        };
        if !ep.spec.anonymous {
            return Err(self.err(
                span,
                field,
                format!(
                    "the token bind listener's port (tcp {port}) is endpoint {:?}, which has \
                     anonymous = false: no unbound client could ever reach it to bind; set \
                     anonymous = true there",
                    ep.name
                ),
            ));
        }
        let missing: Vec<&str> = [Class::Internal, Class::Partner, Class::Customer]
            .into_iter()
            .filter(|c| !ep.spec.allowed_classes.contains(c))
            .map(|c| c.label())
            .collect();
        if !missing.is_empty() {
            return Err(self.err(
                span,
                field,
                format!(
                    "the token bind listener's endpoint {:?} (tcp {port}) does not admit class \
                     {}: a bound client of that class (tokens may carry any class) could not \
                     renew or unbind; use classes = [\"internal\", \"partner\", \"customer\"]",
                    ep.name,
                    missing.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// Why `name` is not a name the kernel would accept for an interface (dev_valid_name), if it
/// is not.
fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_IFNAME {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are not interface names")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Some("it contains '/', ':', a NUL or whitespace")
    } else {
        None
    }
}

/// Why `name` could not be a group in /etc/group, if it could not.
fn group_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 32 {
        Some("longer than 32 characters")
    } else if name.starts_with('-') {
        Some("it starts with '-'")
    } else if name
        .chars()
        .any(|c| c == ':' || c == ',' || c == '/' || c.is_whitespace() || c.is_control())
    {
        Some("it contains ':', ',', '/', whitespace or a control character")
    } else {
        None
    }
}
