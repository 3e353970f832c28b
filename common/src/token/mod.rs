//! Short-lived API tokens: standard JWTs (RFC 7519) in the compact JWS serialization
//! (RFC 7515), verified with `ring`: EdDSA (Ed25519, RFC 8037), ES256 and ES384 (ECDSA P-256
//! and P-384, RFC 7518 §3.4), RS256/384/512 (RSASSA-PKCS1-v1_5, §3.3) and PS256/384/512
//! (RSASSA-PSS, §3.5), RSA keys of 2048 to 8192 bits. tollgate's own issuer ([`SigningKey`])
//! signs with EdDSA or ES256 only; RSA and ES384 keys come from an identity provider.
//! Host-side only (the `token` feature); the XDP program never sees a token, only the binding
//! the agent derives from one.
//!
//! Nodes hold only public keys, as a JWKS ([`KeySet::from_jwks`]); whoever issues tokens holds
//! the private keys. [`verify`] either returns the token's [`Claims`] or exactly one
//! [`Refusal`], whose [`Refusal::label`] is stable (metrics, audit log). [`peek`] makes the
//! cheap unauthenticated first checks alone, so that the agent can pick the issuer (by `iss`)
//! and its key set before verifying.
//!
//! # What `verify` checks, in this order
//!
//! The first failing check decides the refusal, so the same token always gets the same one.
//! Steps 1 to 5 and the `kid`'s presence are [`peek`]'s, which [`verify`] calls first.
//!
//! 1. Size: longer than [`Policy::max_token_bytes`] → `oversized` (before anything else).
//! 2. Shape: non-ASCII, not exactly three `.`-separated parts, or an empty header or payload
//!    → `malformed`. (An empty *signature* is not `malformed`: it is the shape of an
//!    `alg: none` token, reported as `alg_none`, or else as `truncated_signature`.)
//! 3. Encoding: header, payload, then signature, each must be unpadded base64url (RFC 7515
//!    §2, canonical: no `=`, no stray bits) → `bad_base64`.
//! 4. JSON: header, then payload, each must be one JSON object with no duplicate member at
//!    any depth (RFC 7515 §5.2 lets a verifier reject those; tollgate does) → `bad_json`.
//!    This is syntax only: nothing in the payload is trusted before step 9 (`peek` reads its
//!    `iss` unauthenticated, to choose keys, never to decide).
//! 5. Header algorithm: no `alg` string → `missing_alg`; `none` in any case → `alg_none`;
//!    `HS256`/`HS384`/`HS512` in any case → `alg_hmac` (refused by name so that a public key
//!    — an RSA modulus, a DER key, a JWK's text — can never be used as an HMAC secret);
//!    anything but the nine names of [`Alg`] (exact case) → `alg_unsupported`; a `crit`
//!    header (no extension is understood) → `crit_unsupported`. Key-carrying headers (`jwk`,
//!    `jku`, `x5u`, `x5c`) are ignored: keys come only from the issuer's JWKS.
//! 6. Key: no `kid` string (or an empty one) → `missing_kid`; a kid the key set does not
//!    hold → `unknown_kid`, or `key_unusable` when the JWKS had a key by that kid that this
//!    node skipped ([`KeySet::is_skipped_kid`]: fetching the JWKS again would not help); a
//!    header `alg` other than the one the key is pinned to → `alg_mismatch` (the key's
//!    algorithm is authoritative); `now` outside the key's window widened by the skew,
//!    `[nbf - skew, exp + skew]`, → `key_outside_window`.
//! 7. Signature length: not the one length the key makes → `truncated_signature`: 64 bytes
//!    for Ed25519 and ES256, 96 for ES384 (the fixed `r || s` of RFC 7518 §3.4, not DER),
//!    the modulus length for RSA (RFC 8017 §8.1.2, §8.2.2; a signature with a leading zero
//!    byte added or removed is refused, not normalised).
//! 8. Signature over the ASCII bytes `header_b64 "." payload_b64` → `bad_signature`.
//! 9. Claims, now trusted, one at a time: the token id ([`Mapping::token_id`], `jti` by
//!    default, Entra ID's `uti`) → `missing_jti` (absent or empty string; with
//!    [`Mapping::derive_token_id`] the id is then [`derived_token_id`], a hash of the signed
//!    bytes, never of the malleable signature), the identity claim
//!    ([`Mapping::identity`], `sub` by default) → `missing_identity` (absent or empty
//!    string); `iat` → `missing_iat`; `exp` → `missing_exp`; then a claim of the wrong JSON
//!    type — times not non-negative integers, `aud` neither a string nor an array of
//!    strings, `iss` not a string, the mapped roles, class and plan claims not of their
//!    rule's type ([`mapping`]) — or `exp` before `iat` → `bad_claim`. JSON `null` is a wrong
//!    type, not an absent claim.
//! 10. Time, with the skew: `now > exp + skew` → `expired`; `now + skew < nbf` or
//!     `now + skew < iat` → `not_yet_valid`; `exp - iat > max_ttl_s` → `lifetime_too_long`.
//! 11. Issuer: with [`Policy::issuer`] set, `iss` must equal it exactly (byte for byte: a
//!     trailing `/` or a change of case is another issuer); absent → `wrong_issuer`.
//! 12. Audience: `aud` (a string or an array of strings) must contain one of
//!     [`Policy::audiences`]; an absent `aud` does not → `wrong_audience`.
//! 13. Mapping ([`Mapping`]): a required roles claim absent → `missing_roles`; a class or
//!     plan claim absent with no default and required → `missing_claim`; a value its value
//!     map does not name, unless the rule says to take the default → `unmapped_value`.
//!
//! `revoked` and `keys_unavailable` are never returned by [`verify`]: they are there so that
//! the agent's revocation list and its key sources report through the same enum and labels.
//!
//! # JWKS
//!
//! A JSON object whose `keys` array holds public JWKs (RFC 7517), as identity providers
//! publish them:
//!
//! ```json
//! {"keys": [
//!   {"kty": "RSA", "kid": "r1", "use": "sig", "n": "<modulus, base64url>", "e": "AQAB",
//!    "x5c": ["..."]},
//!   {"kty": "RSA", "kid": "r2", "alg": "PS256", "n": "...", "e": "AQAB"},
//!   {"kty": "OKP", "crv": "Ed25519", "x": "<32 bytes>", "kid": "k1", "alg": "EdDSA"},
//!   {"kty": "EC", "crv": "P-256", "x": "<32 bytes>", "y": "<32 bytes>", "kid": "k2",
//!    "alg": "ES256", "nbf": 1767225600, "exp": 1769904000}
//! ]}
//! ```
//!
//! Each key is pinned to one algorithm: its `alg`, else the one its type admits — OKP
//! Ed25519 → EdDSA, EC P-256 → ES256, EC P-384 → ES384, RSA → RS256 (OIDC's default; Entra
//! ID publishes its RSA keys without `alg`, so a PS256 key must say so). A token whose header
//! names another algorithm is refused (`alg_mismatch`), whatever the key could compute.
//!
//! The document is taken **key by key**. Only a document that is not JSON or has no `keys`
//! array is an error ([`JwksError`]). A key tollgate cannot use is skipped and recorded
//! ([`KeySet::skipped`], each with a [`SkipReason`] label), and never costs the keys beside
//! it: `encryption_key` (`use` is `enc`, as Keycloak's RSA-OAEP key), `unknown_kty` (not RSA,
//! EC or OKP), `unsupported_alg` (an `alg` or curve tollgate does not verify: HS256, ES512,
//! P-521, X25519 ...), `rsa_key_size` (a modulus under 2048 or over 8192 bits, leading zero
//! bytes not counted), `private_member` (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth` or `k`: a
//! public JWKS must not carry a secret, and an `oct` key is nothing but one), `bad_key` (a
//! member missing, mistyped, not canonical unpadded base64url, of the wrong length, an RSA
//! exponent that is not odd from 3 to 2^33 - 1, a `use` other than `sig`/`enc`, or an `alg`
//! its `kty`/`crv` contradicts), `missing_kid`, `key_ops` (present without `verify`),
//! `empty_window` (`nbf` after `exp`), `duplicate_kid` (two otherwise usable keys under one
//! kid: both are skipped, since a token naming it could mean either). A token naming a
//! skipped key's kid is refused `key_unusable`.
//!
//! `nbf` and `exp` on a key are **tollgate extensions** (not in RFC 7517): unix seconds
//! bounding the key's validity for rotation with overlap. Both are optional; a token signed
//! by the key is refused (`key_outside_window`) outside `[nbf - skew, exp + skew]`. Other
//! members (`x5c`, `x5t`, `x5t#S256`, Entra ID's `issuer`, ...) are ignored: the key is `n`
//! and `e`, or `x` and `y`, never a certificate.
//!
//! # Key files
//!
//! [`SigningKey::to_file_json`] writes a small JSON object, **a secret** (keep it mode 0600):
//!
//! ```json
//! {"kid": "k1", "alg": "EdDSA", "pkcs8": "<PKCS#8 v1 or v2 DER, standard base64 with padding>"}
//! ```
//!
//! The `pkcs8` member is what `openssl pkey -inform DER` reads once base64-decoded.

mod json;
mod keys;
pub mod mapping;
mod refusal;
mod sign;
mod verify;

#[cfg(test)]
mod tests;

use core::fmt;
use std::{string::String, vec::Vec};

pub use keys::{JwksError, KeyProblem, KeySet, PublicKey, SKIP_REASONS, SkipReason, Skipped};
pub use mapping::{ClaimPath, Mapping, MappingError, RolesFormat, RolesRule, Unmapped, ValueRule};
pub use refusal::{REFUSALS, Refusal};
pub use sign::{IssueError, KeyError, NewToken, SigningKey, issue, jwks};
pub use verify::{DERIVED_TOKEN_ID_PREFIX, Peek, derived_token_id, peek, verify};

/// A signature algorithm tollgate verifies. Every key pins exactly one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Alg {
    /// Ed25519 (RFC 8037): 32-byte public keys, 64-byte signatures.
    EdDSA,
    /// ECDSA on P-256 with SHA-256 (RFC 7518 §3.4): signatures are the fixed 64-byte `r || s`.
    ES256,
    /// ECDSA on P-384 with SHA-384: signatures are the fixed 96-byte `r || s`.
    ES384,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 §3.3): OIDC's default algorithm.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256 and MGF1-SHA-256, salt as long as the hash (RFC 7518 §3.5).
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
}

impl Alg {
    /// Every algorithm tollgate verifies.
    pub const ALL: [Alg; 9] = [
        Alg::EdDSA,
        Alg::ES256,
        Alg::ES384,
        Alg::RS256,
        Alg::RS384,
        Alg::RS512,
        Alg::PS256,
        Alg::PS384,
        Alg::PS512,
    ];

    /// The algorithms tollgate's own issuer signs with ([`SigningKey`]). RSA keys come from an
    /// identity provider; tollgate never makes them.
    pub const fn signable() -> &'static [Alg] {
        &[Alg::EdDSA, Alg::ES256]
    }

    /// Whether [`SigningKey`] can make and use keys of this algorithm.
    pub fn is_signable(self) -> bool {
        Alg::signable().contains(&self)
    }

    /// The JOSE name, as in a JWT header or a JWK `alg`: `EdDSA`, `ES256`, `RS256`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::EdDSA => "EdDSA",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
        }
    }

    /// The algorithm with this exact JOSE name (case-sensitive, as RFC 7515 §4.1.1 requires).
    pub fn from_jose(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// Whether the algorithm takes an RSA key (`kty` `RSA`).
    pub fn is_rsa(self) -> bool {
        !matches!(self, Alg::EdDSA | Alg::ES256 | Alg::ES384)
    }

    /// The ring algorithm for a raw public key (Ed25519, or an EC point), `None` for RSA,
    /// which is checked from its components with [`Alg::rsa_parameters`].
    pub(crate) fn verification(
        self,
    ) -> Option<&'static dyn ring::signature::VerificationAlgorithm> {
        use ring::signature as s;
        Some(match self {
            Alg::EdDSA => &s::ED25519,
            Alg::ES256 => &s::ECDSA_P256_SHA256_FIXED,
            Alg::ES384 => &s::ECDSA_P384_SHA384_FIXED,
            _ => return None,
        })
    }

    /// The RSA parameters (for `RsaPublicKeyComponents::verify`), `None` for the others:
    /// moduli of 2048 to 8192 bits, the range tollgate accepts at load time too.
    pub(crate) fn rsa_parameters(self) -> Option<&'static ring::signature::RsaParameters> {
        use ring::signature as s;
        Some(match self {
            Alg::RS256 => &s::RSA_PKCS1_2048_8192_SHA256,
            Alg::RS384 => &s::RSA_PKCS1_2048_8192_SHA384,
            Alg::RS512 => &s::RSA_PKCS1_2048_8192_SHA512,
            Alg::PS256 => &s::RSA_PSS_2048_8192_SHA256,
            Alg::PS384 => &s::RSA_PSS_2048_8192_SHA384,
            Alg::PS512 => &s::RSA_PSS_2048_8192_SHA512,
            Alg::EdDSA | Alg::ES256 | Alg::ES384 => return None,
        })
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An algorithm name tollgate does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown algorithm {0:?}: expected EdDSA, ES256, ES384, RS256, RS384, RS512, PS256, PS384 or PS512"
)]
pub struct UnknownAlg(pub String);

impl core::str::FromStr for Alg {
    type Err = UnknownAlg;

    /// For operator input (CLI, config): the JOSE names in any case (`eddsa`, `es256`).
    /// Token headers and JWKs are matched exactly, with [`Alg::from_jose`].
    fn from_str(s: &str) -> Result<Alg, UnknownAlg> {
        Alg::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownAlg(s.into()))
    }
}

/// Which payload members carry tollgate's claims. `jti`, `iat`, `exp`, `nbf` and `aud` are
/// always the registered claims of RFC 7519.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimNames {
    /// The identity the token stands for (required). Default `sub`.
    pub identity: String,
    /// Traffic class (optional string). Default `tollgate_class`.
    pub class: String,
    /// Plan (optional string). Default `tollgate_plan`.
    pub plan: String,
    /// Roles (optional array of strings). Default `tollgate_roles`.
    pub roles: String,
}

impl Default for ClaimNames {
    fn default() -> ClaimNames {
        ClaimNames {
            identity: "sub".into(),
            class: "tollgate_class".into(),
            plan: "tollgate_plan".into(),
            roles: "tollgate_roles".into(),
        }
    }
}

/// The registered claims `verify` reads itself: no [`ClaimNames`] member may reuse one.
pub const REGISTERED_CLAIMS: &[&str] = &["jti", "iat", "exp", "nbf", "aud"];

/// A [`ClaimNames`] that cannot work: an empty name, two roles under one name, or a
/// registered claim's name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimNamesError {
    #[error("the {0} claim name is empty")]
    Empty(&'static str),
    #[error("the {first} and {second} claims are both named {name:?}: each needs its own name")]
    Clash {
        name: String,
        first: &'static str,
        second: &'static str,
    },
    #[error("the {role} claim cannot be named {name:?}: that is a registered JWT claim")]
    Registered { role: &'static str, name: String },
}

impl ClaimNames {
    /// Checks that the names are usable (non-empty, distinct, not a registered claim). The
    /// agent calls this when it loads its configuration; [`issue`] calls it too.
    pub fn check(&self) -> Result<(), ClaimNamesError> {
        let named = [
            ("identity", &self.identity),
            ("class", &self.class),
            ("plan", &self.plan),
            ("roles", &self.roles),
        ];
        for (i, (role, name)) in named.iter().enumerate() {
            if name.is_empty() {
                return Err(ClaimNamesError::Empty(role));
            }
            if REGISTERED_CLAIMS.contains(&name.as_str()) {
                return Err(ClaimNamesError::Registered {
                    role,
                    name: (*name).clone(),
                });
            }
            if let Some((first, _)) = named[..i].iter().find(|(_, n)| n == name) {
                return Err(ClaimNamesError::Clash {
                    name: (*name).clone(),
                    first,
                    second: role,
                });
            }
        }
        Ok(())
    }
}

/// What a node accepts from one issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The issuer: `Some` → a token's `iss` must equal it exactly (no trailing-slash or case
    /// folding), else `wrong_issuer`; `None` → `iss` is not checked (the legacy single
    /// `[tokens]` section).
    pub issuer: Option<String>,
    /// The audiences this node serves: a token's `aud` must contain one of them. Empty refuses
    /// every token.
    pub audiences: Vec<String>,
    /// Longest accepted lifetime, `exp - iat`, in seconds.
    pub max_ttl_s: u64,
    /// Clock skew tolerated on every time comparison, in seconds.
    pub skew_s: u64,
    /// Longest accepted token, in bytes; checked before anything else.
    pub max_token_bytes: usize,
    /// Where identity, roles, class and plan come from, and how values map.
    pub mapping: Mapping,
}

/// A verified token's claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The token's id (non-empty): the [`Mapping::token_id`] claim (`jti` by default), or
    /// [`derived_token_id`] when the mapping derives one; what revocation and replay
    /// detection key on.
    pub jti: String,
    /// The identity claim (non-empty), from [`Mapping::identity`].
    pub identity: String,
    /// The mapped class ([`Mapping::class`]); `None` when the claim is absent, optional and
    /// without a default.
    pub class: Option<String>,
    /// The mapped plan ([`Mapping::plan`]), as `class`.
    pub plan: Option<String>,
    /// The mapped roles; empty when the roles claim is absent (and not required).
    pub roles: Vec<String>,
    /// `aud`, always as a list (a string `aud` is a one-element list).
    pub audience: Vec<String>,
    /// `iss`, when the token has one.
    pub issuer: Option<String>,
    pub iat: u64,
    pub nbf: Option<u64>,
    pub exp: u64,
    /// The key that signed the token.
    pub kid: String,
    /// Its algorithm (the key's, which the header matched).
    pub alg: Alg,
}

/// Unpadded base64url, canonical (RFC 7515 §2).
pub(crate) fn b64url() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::URL_SAFE_NO_PAD
}
