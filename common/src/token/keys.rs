//! Public keys: parsing a JWKS into a [`KeySet`].

use std::{
    borrow::ToOwned,
    string::{String, ToString as _},
    vec::Vec,
};

use base64::Engine as _;
use serde_json::{Map, Value};

use super::{Alg, b64url, json};

/// One public key from a JWKS, pinned to one algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub kid: String,
    pub alg: Alg,
    /// Ed25519: the 32-byte key; ES256: the uncompressed point `0x04 || x || y` (65 bytes).
    key: Vec<u8>,
    /// The key's `nbf` (tollgate extension, unix seconds): not valid before.
    pub not_before: Option<u64>,
    /// The key's `exp` (tollgate extension, unix seconds): not valid after.
    pub not_after: Option<u64>,
}

impl PublicKey {
    /// Parses one public JWK (see the module documentation for what is accepted).
    pub fn from_jwk(jwk: &Value) -> Result<PublicKey, KeyProblem> {
        let m = jwk.as_object().ok_or(KeyProblem::NotAnObject)?;
        let kid = match m.get("kid") {
            Some(Value::String(k)) if !k.is_empty() => k.clone(),
            _ => return Err(KeyProblem::BadKid),
        };
        if let Some(private) = PRIVATE_MEMBERS.iter().find(|p| m.contains_key(**p)) {
            return Err(KeyProblem::PrivateMember(private));
        }
        let alg = match m.get("alg") {
            None => return Err(KeyProblem::MissingAlg),
            Some(Value::String(a)) => {
                Alg::from_jose(a).ok_or_else(|| KeyProblem::UnsupportedAlg(a.clone()))?
            }
            Some(_) => return Err(bad("alg", "is not a string")),
        };
        let (kty, crv) = match alg {
            Alg::EdDSA => ("OKP", "Ed25519"),
            Alg::ES256 => ("EC", "P-256"),
        };
        expect_str(m, "kty", kty, alg)?;
        expect_str(m, "crv", crv, alg)?;
        let key = match alg {
            Alg::EdDSA => coordinate(m, "x")?.to_vec(),
            Alg::ES256 => {
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&coordinate(m, "x")?);
                point.extend_from_slice(&coordinate(m, "y")?);
                point
            }
        };
        match m.get("use") {
            None => {}
            Some(Value::String(u)) if u == "sig" => {}
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
            key,
            not_before,
            not_after,
        })
    }

    /// The raw public key: Ed25519, 32 bytes; ES256, `0x04 || x || y`.
    pub fn key_bytes(&self) -> &[u8] {
        &self.key
    }

    /// Whether the key may be used at `now_s`, its window widened by `skew_s` on both sides.
    pub fn valid_at(&self, now_s: u64, skew_s: u64) -> bool {
        self.not_before
            .is_none_or(|nbf| now_s >= nbf.saturating_sub(skew_s))
            && self
                .not_after
                .is_none_or(|exp| now_s <= exp.saturating_add(skew_s))
    }

    /// Checks `signature` over `message`.
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(self.alg.verification(), &self.key)
            .verify(message, signature)
            .is_ok()
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

fn expect_str(
    m: &Map<String, Value>,
    member: &'static str,
    expected: &'static str,
    alg: Alg,
) -> Result<(), KeyProblem> {
    match m.get(member) {
        Some(Value::String(s)) if s == expected => Ok(()),
        found => Err(KeyProblem::WrongType {
            alg,
            member,
            expected,
            found: found.map_or_else(|| "nothing".into(), Value::to_string),
        }),
    }
}

/// A 32-byte base64url member (Ed25519 `x`, P-256 `x` and `y`).
fn coordinate(m: &Map<String, Value>, member: &'static str) -> Result<[u8; 32], KeyProblem> {
    let s = match m.get(member) {
        None => return Err(bad(member, "is missing")),
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad(member, "is not a string")),
    };
    let bytes = b64url()
        .decode(s)
        .map_err(|_| bad(member, "is not unpadded base64url"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyProblem::BadLength {
        member,
        found: bytes.len(),
    })
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

/// What is wrong with one key of a JWKS.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("it is not a JSON object")]
    NotAnObject,
    #[error("it has no `kid` (a non-empty string): every key needs an id")]
    BadKid,
    #[error(
        "it has no `alg`: every key must pin its algorithm (EdDSA or ES256), tollgate never guesses"
    )]
    MissingAlg,
    #[error("its alg {0:?} is not supported: EdDSA or ES256 only")]
    UnsupportedAlg(String),
    #[error(
        "it carries the private member `{0}`: a public JWKS must not hold private key material"
    )]
    PrivateMember(&'static str),
    #[error("alg {alg} needs `{member}` {expected:?}, found {found}")]
    WrongType {
        alg: Alg,
        member: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("`{member}` {why}")]
    BadMember { member: &'static str, why: String },
    #[error("`{member}` is {found} bytes long, expected 32")]
    BadLength { member: &'static str, found: usize },
    #[error("`use` is {0}, expected \"sig\"")]
    Use(String),
    #[error("`key_ops` does not include \"verify\"")]
    KeyOps,
    #[error("its window is empty: nbf {nbf} is after exp {exp}")]
    EmptyWindow { nbf: u64, exp: u64 },
}

/// Why a JWKS was refused as a whole. Nothing of a refused JWKS is used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is not valid JSON: {0}")]
    Json(String),
    #[error("the JWKS is not a JSON object with a `keys` array")]
    NoKeys,
    #[error("JWKS key #{index}{}: {problem}", kid_note(.kid.as_deref()))]
    Key {
        /// Position in `keys`, from 0.
        index: usize,
        /// The key's `kid`, when it has a usable one.
        kid: Option<String>,
        problem: KeyProblem,
    },
    #[error("JWKS keys #{first} and #{second} share the kid {kid:?}: key ids must be unique")]
    DuplicateKid {
        kid: String,
        first: usize,
        second: usize,
    },
}

fn kid_note(kid: Option<&str>) -> String {
    kid.map_or_else(String::new, |k| std::format!(" (kid {k:?})"))
}

/// The public keys a node accepts tokens from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: Vec<PublicKey>,
}

impl KeySet {
    /// Parses a JWKS (see the module documentation). Any bad key refuses the whole set, with
    /// its index and kid: a half-loaded key set would refuse tokens nobody can explain.
    pub fn from_jwks(json_text: &str) -> Result<KeySet, JwksError> {
        let top = json::value(json_text.as_bytes()).map_err(|e| JwksError::Json(e.to_string()))?;
        let list = top
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NoKeys)?;
        let mut keys: Vec<PublicKey> = Vec::with_capacity(list.len());
        for (index, jwk) in list.iter().enumerate() {
            let key = PublicKey::from_jwk(jwk).map_err(|problem| JwksError::Key {
                index,
                kid: jwk
                    .get("kid")
                    .and_then(Value::as_str)
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned),
                problem,
            })?;
            if let Some(first) = keys.iter().position(|k| k.kid == key.kid) {
                return Err(JwksError::DuplicateKid {
                    kid: key.kid,
                    first,
                    second: index,
                });
            }
            keys.push(key);
        }
        Ok(KeySet { keys })
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key (every token is then refused as `unknown_kid`).
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
}
