//! Issuing: signing keys (generated with `ring`, stored as a small JSON file) and [`issue`].

use core::fmt;
use std::{
    borrow::ToOwned,
    string::{String, ToString as _},
    vec::Vec,
};

use base64::Engine as _;
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _},
};
use serde_json::{Map, Value, json};

use super::{Alg, ClaimNames, ClaimNamesError, b64url};

/// A private key that signs tokens. Its `Debug` never shows the secret.
pub struct SigningKey {
    pub kid: String,
    pub alg: Alg,
    /// The PKCS#8 document the key was generated as or loaded from.
    pkcs8: Vec<u8>,
    pair: Pair,
}

enum Pair {
    Ed(Ed25519KeyPair),
    Ec(EcdsaKeyPair),
}

/// Why a signing key could not be made or read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a key id (kid) must not be empty")]
    EmptyKid,
    #[error("the system random number generator failed")]
    Random,
    #[error("the key file is not a JSON object {{\"kid\", \"alg\", \"pkcs8\"}}: {0}")]
    File(String),
    #[error("the key file's alg {0:?} is not supported: EdDSA or ES256")]
    UnknownAlg(String),
    #[error("tollgate does not sign with {0}: its own keys are EdDSA or ES256")]
    NotSignable(Alg),
    #[error("the key file's `pkcs8` is not standard base64")]
    Base64,
    #[error("the key file's `pkcs8` is not a valid {alg} private key: {why}")]
    Rejected { alg: Alg, why: String },
}

/// Why a token could not be issued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("{0}")]
    ClaimNames(#[from] ClaimNamesError),
    #[error("the token's {0} must not be empty")]
    Empty(&'static str),
    #[error("the token would expire ({exp}) before it is issued ({iat})")]
    ExpBeforeIat { iat: u64, exp: u64 },
    #[error("signing failed")]
    Signing,
}

/// The key file's members (see the module documentation).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    kid: String,
    alg: String,
    pkcs8: String,
}

impl SigningKey {
    /// A fresh key from the system's random number generator.
    pub fn generate(alg: Alg, kid: &str) -> Result<SigningKey, KeyError> {
        if kid.is_empty() {
            return Err(KeyError::EmptyKid);
        }
        let rng = SystemRandom::new();
        let pkcs8 = match alg {
            Alg::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng),
            Alg::ES256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
            other => return Err(KeyError::NotSignable(other)),
        }
        .map_err(|_| KeyError::Random)?;
        SigningKey::from_pkcs8(alg, kid, pkcs8.as_ref())
    }

    /// A key from a PKCS#8 DER document (v1 or v2 for Ed25519).
    pub fn from_pkcs8(alg: Alg, kid: &str, pkcs8: &[u8]) -> Result<SigningKey, KeyError> {
        if kid.is_empty() {
            return Err(KeyError::EmptyKid);
        }
        let rejected = |e: ring::error::KeyRejected| KeyError::Rejected {
            alg,
            why: std::format!("{e}"),
        };
        let pair = match alg {
            Alg::EdDSA => {
                Pair::Ed(Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(rejected)?)
            }
            Alg::ES256 => Pair::Ec(
                EcdsaKeyPair::from_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8,
                    &SystemRandom::new(),
                )
                .map_err(rejected)?,
            ),
            other => return Err(KeyError::NotSignable(other)),
        };
        Ok(SigningKey {
            kid: kid.to_owned(),
            alg,
            pkcs8: pkcs8.to_vec(),
            pair,
        })
    }

    /// The key file: `{"kid", "alg", "pkcs8"}`, pretty-printed, ending in a newline. A secret.
    pub fn to_file_json(&self) -> String {
        let pkcs8 = base64::engine::general_purpose::STANDARD.encode(&self.pkcs8);
        std::format!(
            "{:#}\n",
            json!({"kid": self.kid, "alg": self.alg.as_str(), "pkcs8": pkcs8})
        )
    }

    /// Reads a key file written by [`SigningKey::to_file_json`]. Unknown members are refused.
    pub fn from_file_json(s: &str) -> Result<SigningKey, KeyError> {
        let file: KeyFile =
            serde_json::from_str(s).map_err(|e| KeyError::File(std::format!("{e}")))?;
        let alg = Alg::from_jose(&file.alg)
            .filter(|a| a.is_signable())
            .ok_or(KeyError::UnknownAlg(file.alg))?;
        let pkcs8 = base64::engine::general_purpose::STANDARD
            .decode(file.pkcs8.trim())
            .map_err(|_| KeyError::Base64)?;
        SigningKey::from_pkcs8(alg, &file.kid, &pkcs8)
    }

    /// The public half as a JWK, with its `kid` and pinned `alg` and `"use": "sig"`. Add
    /// `nbf`/`exp` members (unix seconds) to bound its validity window.
    pub fn public_jwk(&self) -> Value {
        match &self.pair {
            Pair::Ed(p) => json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": b64url().encode(p.public_key().as_ref()),
                "kid": self.kid,
                "alg": self.alg.as_str(),
                "use": "sig",
            }),
            Pair::Ec(p) => {
                // The uncompressed point: 0x04 || x || y.
                let point = p.public_key().as_ref();
                json!({
                    "kty": "EC",
                    "crv": "P-256",
                    "x": b64url().encode(&point[1..33]),
                    "y": b64url().encode(&point[33..65]),
                    "kid": self.kid,
                    "alg": self.alg.as_str(),
                    "use": "sig",
                })
            }
        }
    }

    /// Signs arbitrary header and payload bytes as a compact JWS
    /// `b64(header).b64(payload).b64(signature)`. It checks nothing: for tests, fuzzing and
    /// tokens [`issue`] cannot express. The header should carry this key's `alg` and `kid`.
    pub fn sign_compact(&self, header: &[u8], payload: &[u8]) -> Result<String, IssueError> {
        let mut token = b64url().encode(header);
        token.push('.');
        b64url().encode_string(payload, &mut token);
        let signature = self.sign(token.as_bytes())?;
        token.push('.');
        b64url().encode_string(signature, &mut token);
        Ok(token)
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, IssueError> {
        match &self.pair {
            Pair::Ed(p) => Ok(p.sign(message).as_ref().to_vec()),
            Pair::Ec(p) => p
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| IssueError::Signing),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("pkcs8", &"<secret>")
            .finish()
    }
}

/// A JWKS document `{"keys": [...]}`, pretty-printed, ending in a newline.
pub fn jwks(keys: &[Value]) -> String {
    std::format!("{:#}\n", json!({ "keys": keys }))
}

/// What to put in a token.
#[derive(Clone, Copy, Debug)]
pub struct NewToken<'a> {
    pub jti: &'a str,
    pub identity: &'a str,
    pub class: Option<&'a str>,
    pub plan: Option<&'a str>,
    /// Left out of the token when empty.
    pub roles: &'a [String],
    /// One audience, written as a string `aud`.
    pub audience: &'a str,
    pub iat: u64,
    pub nbf: Option<u64>,
    pub exp: u64,
}

/// Signs a token: header `{"alg", "kid", "typ": "JWT"}`, the claims under `names`.
pub fn issue(key: &SigningKey, t: &NewToken, names: &ClaimNames) -> Result<String, IssueError> {
    names.check()?;
    for (what, value) in [
        ("jti", t.jti),
        ("identity", t.identity),
        ("audience", t.audience),
    ] {
        if value.is_empty() {
            return Err(IssueError::Empty(what));
        }
    }
    if t.exp < t.iat {
        return Err(IssueError::ExpBeforeIat {
            iat: t.iat,
            exp: t.exp,
        });
    }
    let header = json!({"alg": key.alg.as_str(), "kid": key.kid, "typ": "JWT"});
    let mut claims = Map::new();
    claims.insert("jti".into(), t.jti.into());
    claims.insert(names.identity.clone(), t.identity.into());
    claims.insert("aud".into(), t.audience.into());
    claims.insert("iat".into(), t.iat.into());
    claims.insert("exp".into(), t.exp.into());
    if let Some(nbf) = t.nbf {
        claims.insert("nbf".into(), nbf.into());
    }
    if let Some(class) = t.class {
        claims.insert(names.class.clone(), class.into());
    }
    if let Some(plan) = t.plan {
        claims.insert(names.plan.clone(), plan.into());
    }
    if !t.roles.is_empty() {
        claims.insert(names.roles.clone(), t.roles.into());
    }
    key.sign_compact(
        header.to_string().as_bytes(),
        Value::Object(claims).to_string().as_bytes(),
    )
}
