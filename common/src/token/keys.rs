//! Public keys: parsing a JWKS into a [`KeySet`], key by key. A key tollgate cannot use is
//! skipped and recorded ([`KeySet::skipped`]), never a reason to drop the keys that do verify:
//! identity providers publish encryption keys and algorithms tollgate does not verify beside
//! their signing keys (Keycloak's `use: enc` RSA-OAEP key, for one).

use core::fmt;
use std::{
    borrow::ToOwned,
    string::{String, ToString as _},
    vec::Vec,
};

use base64::Engine as _;
use serde_json::{Map, Value};

use super::{Alg, b64url, json};

/// The RSA modulus sizes tollgate accepts, in bits: 2048 is the floor of every current
/// recommendation (NIST SP 800-57, RFC 7518 §3.3), 8192 the most ring verifies.
pub const RSA_BITS: core::ops::RangeInclusive<usize> = 2048..=8192;

/// One public key from a JWKS, pinned to one algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub kid: String,
    pub alg: Alg,
    material: Material,
    /// The key's `nbf` (tollgate extension, unix seconds): not valid before.
    pub not_before: Option<u64>,
    /// The key's `exp` (tollgate extension, unix seconds): not valid after.
    pub not_after: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Material {
    /// Ed25519: the 32-byte key; EC: the uncompressed point `0x04 || x || y`.
    Raw(Vec<u8>),
    /// Big-endian, leading zero bytes stripped (as ring requires).
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

impl PublicKey {
    /// Parses one public JWK (see the module documentation for what is accepted).
    pub fn from_jwk(jwk: &Value) -> Result<PublicKey, KeyProblem> {
        let m = jwk.as_object().ok_or(KeyProblem::NotAnObject)?;
        if let Some(private) = PRIVATE_MEMBERS.iter().find(|p| m.contains_key(**p)) {
            return Err(KeyProblem::PrivateMember(private));
        }
        match m.get("use") {
            None => {}
            Some(Value::String(u)) if u == "sig" => {}
            Some(Value::String(u)) if u == "enc" => return Err(KeyProblem::Encryption),
            Some(other) => return Err(KeyProblem::Use(other.to_string())),
        }
        if let Some(ops) = m.get("key_ops") {
            let ops = ops
                .as_array()
                .ok_or_else(|| bad("key_ops", "is not an array"))?;
            if !ops.iter().any(|o| o.as_str() == Some("verify")) {
                return Err(KeyProblem::KeyOps);
            }
        }
        let kid = match m.get("kid") {
            Some(Value::String(k)) if !k.is_empty() => k.clone(),
            _ => return Err(KeyProblem::BadKid),
        };
        let kty = string(m, "kty")?;
        if !["RSA", "EC", "OKP"].contains(&kty) {
            return Err(KeyProblem::UnknownKty(kty.to_owned()));
        }
        let stated = match m.get("alg") {
            None => None,
            Some(Value::String(a)) => {
                Some(Alg::from_jose(a).ok_or_else(|| KeyProblem::UnsupportedAlg(a.clone()))?)
            }
            Some(_) => return Err(bad("alg", "is not a string")),
        };
        let crv = if kty == "RSA" {
            None
        } else {
            Some(string(m, "crv")?)
        };
        // The algorithm the key type admits; a stated `alg` must agree with it.
        let admitted = match (kty, crv) {
            ("RSA", _) => stated.filter(|a| a.is_rsa()).or(Some(Alg::RS256)),
            ("EC", Some("P-256")) => Some(Alg::ES256),
            ("EC", Some("P-384")) => Some(Alg::ES384),
            ("OKP", Some("Ed25519")) => Some(Alg::EdDSA),
            _ => None,
        };
        let alg = match (admitted, stated) {
            (Some(a), None) => a,
            (Some(a), Some(s)) if a == s => a,
            (None, None) => {
                return Err(KeyProblem::UnsupportedCurve(crv.unwrap_or("").to_owned()));
            }
            // Ed448 is an EdDSA curve (RFC 8037) that ring does not verify: an unsupported
            // curve, not a key contradicting its `alg`.
            (None, Some(Alg::EdDSA)) if crv == Some("Ed448") => {
                return Err(KeyProblem::UnsupportedCurve("Ed448".to_owned()));
            }
            (_, Some(s)) => {
                return Err(KeyProblem::Contradiction {
                    alg: s,
                    kty: kty.to_owned(),
                    crv: crv.map(str::to_owned),
                });
            }
        };
        let material = match alg {
            Alg::EdDSA => Material::Raw(fixed(m, "x", 32)?),
            Alg::ES256 | Alg::ES384 => {
                let len = if alg == Alg::ES256 { 32 } else { 48 };
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                point.extend_from_slice(&fixed(m, "x", len)?);
                point.extend_from_slice(&fixed(m, "y", len)?);
                Material::Raw(point)
            }
            _ => rsa(m)?,
        };
        let not_before = time(m, "nbf")?;
        let not_after = time(m, "exp")?;
        if let (Some(nbf), Some(exp)) = (not_before, not_after)
            && nbf > exp
        {
            return Err(KeyProblem::EmptyWindow { nbf, exp });
        }
        Ok(PublicKey {
            kid,
            alg,
            material,
            not_before,
            not_after,
        })
    }

    /// The raw public key: Ed25519, 32 bytes; EC, `0x04 || x || y`; RSA, the modulus `n`
    /// (big-endian, no leading zero byte).
    pub fn key_bytes(&self) -> &[u8] {
        match &self.material {
            Material::Raw(k) => k,
            Material::Rsa { n, .. } => n,
        }
    }

    /// An RSA key's modulus size in bits; `None` for the others.
    pub fn rsa_bits(&self) -> Option<usize> {
        match &self.material {
            Material::Rsa { n, .. } => Some(bit_len(n)),
            Material::Raw(_) => None,
        }
    }

    /// Whether the key may be used at `now_s`, its window widened by `skew_s` on both sides.
    pub fn valid_at(&self, now_s: u64, skew_s: u64) -> bool {
        self.not_before
            .is_none_or(|nbf| now_s >= nbf.saturating_sub(skew_s))
            && self
                .not_after
                .is_none_or(|exp| now_s <= exp.saturating_add(skew_s))
    }

    /// The only signature length this key can have made: 64 (Ed25519, ES256), 96 (ES384),
    /// the modulus length in bytes (RSA, RFC 8017 §8.1.2 and §8.2.2).
    pub fn signature_len(&self) -> usize {
        match (&self.material, self.alg) {
            (Material::Rsa { n, .. }, _) => n.len(),
            (_, Alg::ES384) => 96,
            _ => 64,
        }
    }

    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Raw(key) => self.alg.verification().is_some_and(|alg| {
                ring::signature::UnparsedPublicKey::new(alg, key)
                    .verify(message, signature)
                    .is_ok()
            }),
            Material::Rsa { n, e } => self.alg.rsa_parameters().is_some_and(|params| {
                ring::signature::RsaPublicKeyComponents { n, e }
                    .verify(params, message, signature)
                    .is_ok()
            }),
        }
    }
}

/// JWK members that only private or symmetric keys have (RFC 7518 §6).
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

fn bad(member: &'static str, why: &str) -> KeyProblem {
    KeyProblem::BadMember {
        member,
        why: why.to_owned(),
    }
}

fn string<'a>(m: &'a Map<String, Value>, member: &'static str) -> Result<&'a str, KeyProblem> {
    match m.get(member) {
        None => Err(bad(member, "is missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bad(member, "is not a string")),
    }
}

fn bytes(m: &Map<String, Value>, member: &'static str) -> Result<Vec<u8>, KeyProblem> {
    b64url()
        .decode(string(m, member)?)
        .map_err(|_| bad(member, "is not unpadded base64url"))
}

/// A fixed-length base64url member (Ed25519 `x`, EC `x` and `y`).
fn fixed(
    m: &Map<String, Value>,
    member: &'static str,
    expected: usize,
) -> Result<Vec<u8>, KeyProblem> {
    let b = bytes(m, member)?;
    if b.len() != expected {
        return Err(KeyProblem::BadLength {
            member,
            found: b.len(),
            expected,
        });
    }
    Ok(b)
}

fn strip_zeros(mut b: Vec<u8>) -> Vec<u8> {
    let zeros = b.iter().take_while(|&&x| x == 0).count();
    b.drain(..zeros);
    b
}

/// Bits of a big-endian number without leading zero bytes.
fn bit_len(n: &[u8]) -> usize {
    n.first()
        .map_or(0, |&top| n.len() * 8 - top.leading_zeros() as usize)
}

fn rsa(m: &Map<String, Value>) -> Result<Material, KeyProblem> {
    let n = strip_zeros(bytes(m, "n")?);
    let bits = bit_len(&n);
    if !RSA_BITS.contains(&bits) {
        return Err(KeyProblem::RsaKeySize { bits });
    }
    let e = strip_zeros(bytes(m, "e")?);
    // ring verifies with odd exponents from 3 up to 2^33 - 1 (5 bytes).
    let value = e.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b));
    if e.len() > 5 || value < 3 || value % 2 == 0 || value >= 1 << 33 {
        return Err(bad("e", "is not an odd public exponent from 3 to 2^33 - 1"));
    }
    Ok(Material::Rsa { n, e })
}

fn time(m: &Map<String, Value>, member: &'static str) -> Result<Option<u64>, KeyProblem> {
    match m.get(member) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(member, "is not a non-negative integer (unix seconds)")),
    }
}

/// What is wrong with one key of a JWKS (the detail behind its [`SkipReason`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("it is not a JSON object")]
    NotAnObject,
    #[error("it has no `kid` (a non-empty string): every key needs an id")]
    BadKid,
    #[error("its kty {0:?} is not one tollgate verifies with (RSA, EC, OKP)")]
    UnknownKty(String),
    #[error(
        "its alg {0:?} is not supported: EdDSA, ES256, ES384, RS256/384/512 or PS256/384/512 only"
    )]
    UnsupportedAlg(String),
    #[error("its curve {0:?} is not supported: P-256, P-384 or Ed25519 only")]
    UnsupportedCurve(String),
    #[error("its alg {alg} contradicts its kty {kty:?}{}", crv.as_deref().map_or_else(String::new, |c| std::format!(" and crv {c:?}")))]
    Contradiction {
        alg: Alg,
        kty: String,
        crv: Option<String>,
    },
    #[error("its RSA modulus is {bits} bits: tollgate accepts 2048 to 8192")]
    RsaKeySize { bits: usize },
    #[error(
        "it carries the private member `{0}`: a public JWKS must not hold private key material"
    )]
    PrivateMember(&'static str),
    #[error("`{member}` {why}")]
    BadMember { member: &'static str, why: String },
    #[error("`{member}` is {found} bytes long, expected {expected}")]
    BadLength {
        member: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("it is an encryption key (`use` \"enc\")")]
    Encryption,
    #[error("`use` is {0}, expected \"sig\"")]
    Use(String),
    #[error("`key_ops` does not include \"verify\"")]
    KeyOps,
    #[error("its window is empty: nbf {nbf} is after exp {exp}")]
    EmptyWindow { nbf: u64, exp: u64 },
    #[error("keys #{first} and #{second} share its kid: neither is used")]
    DuplicateKid { first: usize, second: usize },
}

impl KeyProblem {
    /// The label this problem is counted under.
    pub fn reason(&self) -> SkipReason {
        match self {
            KeyProblem::Encryption => SkipReason::EncryptionKey,
            KeyProblem::UnknownKty(_) => SkipReason::UnknownKty,
            KeyProblem::UnsupportedAlg(_) | KeyProblem::UnsupportedCurve(_) => {
                SkipReason::UnsupportedAlg
            }
            KeyProblem::RsaKeySize { .. } => SkipReason::RsaKeySize,
            KeyProblem::PrivateMember(_) => SkipReason::PrivateMember,
            KeyProblem::NotAnObject
            | KeyProblem::Contradiction { .. }
            | KeyProblem::BadMember { .. }
            | KeyProblem::BadLength { .. }
            | KeyProblem::Use(_) => SkipReason::BadKey,
            KeyProblem::DuplicateKid { .. } => SkipReason::DuplicateKid,
            KeyProblem::BadKid => SkipReason::MissingKid,
            KeyProblem::KeyOps => SkipReason::KeyOps,
            KeyProblem::EmptyWindow { .. } => SkipReason::EmptyWindow,
        }
    }
}

/// Why a key of a JWKS was skipped: [`SkipReason::label`] is stable (a metric label value),
/// `Display` a sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SkipReason {
    #[error("an encryption key (use \"enc\"), not a signing key")]
    EncryptionKey,
    #[error("a key type tollgate does not verify with")]
    UnknownKty,
    #[error("an algorithm or curve tollgate does not verify")]
    UnsupportedAlg,
    #[error("an RSA key smaller than 2048 or larger than 8192 bits")]
    RsaKeySize,
    #[error("a key carrying private key material")]
    PrivateMember,
    #[error(
        "a malformed key (a member missing, mistyped or of the wrong length, or an alg its type contradicts)"
    )]
    BadKey,
    #[error("a key whose kid another key shares")]
    DuplicateKid,
    #[error("a key without a kid")]
    MissingKid,
    #[error("a key whose key_ops exclude verify")]
    KeyOps,
    #[error("a key whose validity window is empty")]
    EmptyWindow,
}

/// Every skip reason, for pre-registering metric label values.
pub const SKIP_REASONS: &[SkipReason] = &[
    SkipReason::EncryptionKey,
    SkipReason::UnknownKty,
    SkipReason::UnsupportedAlg,
    SkipReason::RsaKeySize,
    SkipReason::PrivateMember,
    SkipReason::BadKey,
    SkipReason::DuplicateKid,
    SkipReason::MissingKid,
    SkipReason::KeyOps,
    SkipReason::EmptyWindow,
];

impl SkipReason {
    /// The stable snake_case name. Never renamed.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::EncryptionKey => "encryption_key",
            SkipReason::UnknownKty => "unknown_kty",
            SkipReason::UnsupportedAlg => "unsupported_alg",
            SkipReason::RsaKeySize => "rsa_key_size",
            SkipReason::PrivateMember => "private_member",
            SkipReason::BadKey => "bad_key",
            SkipReason::DuplicateKid => "duplicate_kid",
            SkipReason::MissingKid => "missing_kid",
            SkipReason::KeyOps => "key_ops",
            SkipReason::EmptyWindow => "empty_window",
        }
    }

    /// The reason with this label.
    pub fn from_label(label: &str) -> Option<SkipReason> {
        SKIP_REASONS.iter().copied().find(|r| r.label() == label)
    }
}

/// A key of a JWKS that was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Position in `keys`, from 0.
    pub index: usize,
    /// The key's `kid`, when it has a non-empty string one.
    pub kid: Option<String>,
    pub reason: SkipReason,
    /// The detail, for the operator.
    pub problem: KeyProblem,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JWKS key #{}", self.index)?;
        if let Some(k) = &self.kid {
            write!(f, " (kid {k:?})")?;
        }
        write!(f, " skipped ({}): {}", self.reason.label(), self.problem)
    }
}

/// Why a JWKS document was refused as a whole. Only the document: a bad key is skipped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is not valid JSON: {0}")]
    Json(String),
    #[error("the JWKS is not a JSON object with a `keys` array")]
    NoKeys,
}

/// The public keys a node accepts tokens from, and the keys of the same JWKS it skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: Vec<PublicKey>,
    skipped: Vec<Skipped>,
}

impl KeySet {
    /// Parses a JWKS (see the module documentation), key by key: a key tollgate cannot use is
    /// skipped and recorded in [`KeySet::skipped`]; only a document that is not JSON or has no
    /// `keys` array is an error.
    pub fn from_jwks(json_text: &str) -> Result<KeySet, JwksError> {
        let top = json::value(json_text.as_bytes()).map_err(|e| JwksError::Json(e.to_string()))?;
        let list = top
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NoKeys)?;
        let kid_of = |jwk: &Value| {
            jwk.get("kid")
                .and_then(Value::as_str)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
        };
        let parsed: Vec<(usize, Result<PublicKey, KeyProblem>)> =
            list.iter().map(PublicKey::from_jwk).enumerate().collect();
        // Usable keys by kid: two under one kid means a token naming it could mean either, so
        // neither is used. (A skipped key sharing a usable key's kid is no such ambiguity:
        // only one of them can verify anything.) A map keeps a large JWKS linear.
        let mut by_kid: std::collections::HashMap<&str, Vec<usize>> =
            std::collections::HashMap::new();
        for (index, result) in &parsed {
            if let Ok(key) = result {
                by_kid.entry(key.kid.as_str()).or_default().push(*index);
            }
        }
        let mut set = KeySet::default();
        for (index, result) in &parsed {
            let problem = match result {
                Ok(key) => match by_kid[key.kid.as_str()].as_slice() {
                    [_] => {
                        set.keys.push(key.clone());
                        continue;
                    }
                    twins => KeyProblem::DuplicateKid {
                        first: twins[0],
                        second: if twins[0] == *index { twins[1] } else { *index },
                    },
                },
                Err(p) => p.clone(),
            };
            set.skipped.push(Skipped {
                index: *index,
                kid: kid_of(&list[*index]),
                reason: problem.reason(),
                problem,
            });
        }
        Ok(set)
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key (every token is then refused as `unknown_kid` or
    /// `key_unusable`).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, in JWKS order.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// The key with this id.
    pub fn get(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The keys, in JWKS order.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The keys of the JWKS that were not taken, in JWKS order.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Whether a skipped key had this kid: a token naming it is refused as `key_unusable`,
    /// and fetching the JWKS again would not help.
    pub fn is_skipped_kid(&self, kid: &str) -> bool {
        self.skipped.iter().any(|s| s.kid.as_deref() == Some(kid))
    }
}
