//! Requests and responses on the control socket.

use serde::{Deserialize, Serialize};

use crate::explain::Probe;

/// Largest request accepted; anything longer is refused unread.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Empty braces, not unit variants: serde ignores unknown fields next to the tag of a
    // unit variant, and a request with a field we do not know must be refused.
    Status {},
    Endpoints {},
    FleetStatus {},
    Identities {},
    Identity {
        name: String,
    },
    Bind {
        /// An address or CIDR.
        target: String,
        identity: String,
        #[serde(default)]
        for_secs: Option<u64>,
    },
    Unbind {
        target: String,
    },
    Quarantine {
        /// An identity name, or an address whose binding names the identity.
        target: String,
        #[serde(default)]
        for_secs: Option<u64>,
        reason: String,
    },
    Release {
        target: String,
        #[serde(default)]
        reason: String,
    },
    Explain(Probe),
    /// A trusted gateway binds a client's address with the client's token.
    BindToken {
        token: String,
        addr: std::net::IpAddr,
    },
    /// Revokes a token id, or every token of an identity issued until now.
    Revoke {
        #[serde(default)]
        token_id: Option<String>,
        #[serde(default)]
        identity: Option<String>,
        reason: String,
    },
    Reload {},
    Uninstall {},
    QuotaShow {
        #[serde(default)]
        identity: Option<String>,
    },
    QuotaReset {
        #[serde(default)]
        identity: Option<String>,
    },
    /// A usage report from a trusted component (`crate::usage`).
    Usage(crate::usage::UsageReport),
}

impl Request {
    /// Whether the request changes state (and so is audited).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::Bind { .. }
                | Request::Unbind { .. }
                | Request::Quarantine { .. }
                | Request::Release { .. }
                | Request::Reload {}
                | Request::Uninstall {}
                | Request::BindToken { .. }
                | Request::Revoke { .. }
                | Request::QuotaReset { .. }
                | Request::Usage(_)
        )
    }
}

/// Why a request failed; decides the CLI's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed or impossible request (exit 1).
    BadRequest,
    /// Names something that does not exist (exit 1).
    NotFound,
    /// The peer may not use the socket (exit 4).
    Refused,
    /// The configuration file is invalid; nothing changed (exit 5).
    Config,
    /// The kernel refused an operation (exit 6).
    Kernel,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
    /// A refusal's own label where it has one (the usage feed's `unknown_identity`,
    /// `too_large`, ...); absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Response {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(ErrorBody {
                kind,
                message: message.into(),
                label: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(
            r#"{"verb":"quarantine","target":"batch","for_secs":60,"reason":"scraping"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Quarantine {
                target: "batch".into(),
                for_secs: Some(60),
                reason: "scraping".into()
            }
        );
        assert!(r.mutates());
        let e: Request = serde_json::from_str(
            r#"{"verb":"explain","src":"198.18.0.1","dst":"198.19.0.1","port":8000,"proto":"tcp"}"#,
        )
        .unwrap();
        assert!(matches!(e, Request::Explain(_)));
        assert!(!e.mutates());
    }

    #[test]
    fn unknown_verbs_and_fields_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"verb":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"status","extra":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"bind","target":"x"}"#).is_err());
    }
}
