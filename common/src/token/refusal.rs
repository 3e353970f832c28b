//! Why a token is refused: one variant per reason, each with a stable label.

/// Why a token was refused. [`Refusal::label`] is stable (a metric label value and an audit
/// log field); `Display` is a one-sentence reason for people.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the token is longer than this node accepts")]
    Oversized,
    #[error("the token is not three non-empty, dot-separated ASCII parts")]
    Malformed,
    #[error("a part of the token is not unpadded base64url")]
    BadBase64,
    #[error("the token header or payload is not a JSON object (or repeats a member)")]
    BadJson,
    #[error("the token header names no algorithm")]
    MissingAlg,
    #[error("the token is unsigned (alg \"none\")")]
    AlgNone,
    #[error("the token claims an HMAC algorithm, which tollgate never accepts")]
    AlgHmac,
    #[error(
        "the token's algorithm is not supported (EdDSA, ES256, ES384, RS256/384/512, PS256/384/512)"
    )]
    AlgUnsupported,
    #[error("the token header has a `crit` extension this node does not understand")]
    CritUnsupported,
    #[error("the token header names no key id (kid)")]
    MissingKid,
    #[error("the token was signed by a key this node does not know")]
    UnknownKid,
    #[error("the token was signed by a key this node skipped when it loaded the key set")]
    KeyUnusable,
    #[error("the token's algorithm differs from the one its key is pinned to")]
    AlgMismatch,
    #[error("the token's signing key is outside its validity window")]
    KeyOutsideWindow,
    #[error("the token's signature has the wrong length for its algorithm")]
    TruncatedSignature,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has no token id (jti)")]
    MissingJti,
    #[error("the token names no identity")]
    MissingIdentity,
    #[error("the token has no issue time (iat)")]
    MissingIat,
    #[error("the token has no expiry (exp)")]
    MissingExp,
    #[error("a token claim has the wrong type or an impossible value")]
    BadClaim,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's lifetime is longer than this node accepts")]
    LifetimeTooLong,
    #[error("the token's issuer (iss) is absent or not exactly this issuer's")]
    WrongIssuer,
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("a claim the issuer's mapping needs is absent")]
    MissingClaim,
    #[error("a mapped claim's value is not in the issuer's value map")]
    UnmappedValue,
    #[error("the token has no roles claim and the issuer's mapping requires one")]
    MissingRoles,
    #[error("the issuer's keys are unknown or too old to trust")]
    KeysUnavailable,
    #[error("the token has been revoked")]
    Revoked,
}

/// Every refusal, in check order, then the two the agent applies itself: `KeysUnavailable`
/// (before [`verify`](super::verify), when an issuer has no usable key set) and `Revoked`
/// (after it). For pre-registering metric label values.
pub const REFUSALS: &[Refusal] = &[
    Refusal::Oversized,
    Refusal::Malformed,
    Refusal::BadBase64,
    Refusal::BadJson,
    Refusal::MissingAlg,
    Refusal::AlgNone,
    Refusal::AlgHmac,
    Refusal::AlgUnsupported,
    Refusal::CritUnsupported,
    Refusal::MissingKid,
    Refusal::UnknownKid,
    Refusal::KeyUnusable,
    Refusal::AlgMismatch,
    Refusal::KeyOutsideWindow,
    Refusal::TruncatedSignature,
    Refusal::BadSignature,
    Refusal::MissingJti,
    Refusal::MissingIdentity,
    Refusal::MissingIat,
    Refusal::MissingExp,
    Refusal::BadClaim,
    Refusal::Expired,
    Refusal::NotYetValid,
    Refusal::LifetimeTooLong,
    Refusal::WrongIssuer,
    Refusal::WrongAudience,
    Refusal::MissingClaim,
    Refusal::UnmappedValue,
    Refusal::MissingRoles,
    Refusal::KeysUnavailable,
    Refusal::Revoked,
];

impl Refusal {
    /// The stable snake_case name: a metric label value and an audit log field. Never
    /// renamed.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Oversized => "oversized",
            Refusal::Malformed => "malformed",
            Refusal::BadBase64 => "bad_base64",
            Refusal::BadJson => "bad_json",
            Refusal::MissingAlg => "missing_alg",
            Refusal::AlgNone => "alg_none",
            Refusal::AlgHmac => "alg_hmac",
            Refusal::AlgUnsupported => "alg_unsupported",
            Refusal::CritUnsupported => "crit_unsupported",
            Refusal::MissingKid => "missing_kid",
            Refusal::UnknownKid => "unknown_kid",
            Refusal::KeyUnusable => "key_unusable",
            Refusal::AlgMismatch => "alg_mismatch",
            Refusal::KeyOutsideWindow => "key_outside_window",
            Refusal::TruncatedSignature => "truncated_signature",
            Refusal::BadSignature => "bad_signature",
            Refusal::MissingJti => "missing_jti",
            Refusal::MissingIdentity => "missing_identity",
            Refusal::MissingIat => "missing_iat",
            Refusal::MissingExp => "missing_exp",
            Refusal::BadClaim => "bad_claim",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::LifetimeTooLong => "lifetime_too_long",
            Refusal::WrongIssuer => "wrong_issuer",
            Refusal::WrongAudience => "wrong_audience",
            Refusal::MissingClaim => "missing_claim",
            Refusal::UnmappedValue => "unmapped_value",
            Refusal::MissingRoles => "missing_roles",
            Refusal::KeysUnavailable => "keys_unavailable",
            Refusal::Revoked => "revoked",
        }
    }

    /// The refusal with this label.
    pub fn from_label(label: &str) -> Option<Refusal> {
        REFUSALS.iter().copied().find(|r| r.label() == label)
    }
}
