//! The labels of a fetch: why it happened ([`Trigger`]) and how it ended ([`Outcome`]), for
//! status, logs and the `tollgate_issuer_fetches_total{trigger,outcome}` metric.

/// How a fetch (or a file read) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    /// The name did not resolve or no address took the connection.
    Connect,
    /// The TLS handshake failed (an untrusted certificate, a wrong name) or a TLS record did.
    Tls,
    /// No complete response within the timeout.
    Timeout,
    /// A status other than 200 (a redirect included: it is not followed).
    HttpStatus,
    /// The body (or head) is larger than allowed.
    TooLarge,
    /// The document is not JSON of the expected shape.
    NotJson,
    /// A JWKS without a usable key.
    NoKeys,
    /// The discovery document names another issuer.
    IssuerMismatch,
    /// The discovery document's `jwks_uri` is not HTTPS.
    InsecureJwksUri,
    /// Reading (a file, a malformed response, a connection closed early).
    Io,
}

pub const OUTCOMES: &[Outcome] = &[
    Outcome::Ok,
    Outcome::Connect,
    Outcome::Tls,
    Outcome::Timeout,
    Outcome::HttpStatus,
    Outcome::TooLarge,
    Outcome::NotJson,
    Outcome::NoKeys,
    Outcome::IssuerMismatch,
    Outcome::InsecureJwksUri,
    Outcome::Io,
];

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Connect => "connect",
            Outcome::Tls => "tls",
            Outcome::Timeout => "timeout",
            Outcome::HttpStatus => "http_status",
            Outcome::TooLarge => "too_large",
            Outcome::NotJson => "not_json",
            Outcome::NoKeys => "no_keys",
            Outcome::IssuerMismatch => "issuer_mismatch",
            Outcome::InsecureJwksUri => "insecure_jwks_uri",
            Outcome::Io => "io",
        }
    }
}

/// Why a fetch (or read) happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Trigger {
    Start,
    Schedule,
    UnknownKid,
    FileChanged,
}

pub const TRIGGERS: &[Trigger] = &[
    Trigger::Start,
    Trigger::Schedule,
    Trigger::UnknownKid,
    Trigger::FileChanged,
];

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Schedule => "schedule",
            Trigger::UnknownKid => "unknown_kid",
            Trigger::FileChanged => "file_changed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_snake_case() {
        let labels: Vec<&str> = OUTCOMES
            .iter()
            .map(|o| o.label())
            .chain(TRIGGERS.iter().map(|t| t.label()))
            .collect();
        let mut unique = labels.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), labels.len());
        assert!(
            labels
                .iter()
                .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
        assert_eq!(OUTCOMES.len(), 11);
    }
}
