//! [`verify`]: the checks, in the order the module documentation lists.

use std::{borrow::ToOwned, string::String, vec::Vec};

use base64::Engine as _;
use serde_json::{Map, Value};

use super::{Alg, Claims, KeySet, Mapping, Policy, Refusal, b64url, json, mapping::Typed};

/// What a token says about itself before anything is verified: enough to pick the issuer
/// (`iss`) and its key (`kid`). **Unauthenticated**: never act on it beyond choosing keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peek {
    /// The header's algorithm (one tollgate verifies).
    pub alg: Alg,
    /// The header's key id (non-empty).
    pub kid: String,
    /// The payload's `iss`, when it is a string.
    pub iss: Option<String>,
}

/// The cheap unauthenticated checks, steps 1 to 5 and the `kid`'s presence (step 6) of the
/// [module](super) list: size, shape, base64url, JSON, algorithm, `crit`, `kid`. [`verify`]
/// starts with the same checks, so a token refused here is refused there the same way.
pub fn peek(token: &str, max_bytes: usize) -> Result<Peek, Refusal> {
    let p = parse(token, max_bytes)?;
    Ok(Peek {
        alg: p.alg,
        iss: p
            .payload
            .get("iss")
            .and_then(Value::as_str)
            .map(str::to_owned),
        kid: p.kid,
    })
}

/// A token through steps 1 to 5 and the `kid`'s presence.
struct Parsed<'t> {
    /// `header_b64 "." payload_b64`, exactly as sent.
    signed: &'t [u8],
    payload: Map<String, Value>,
    signature: Vec<u8>,
    alg: Alg,
    kid: String,
}

fn parse(token: &str, max_bytes: usize) -> Result<Parsed<'_>, Refusal> {
    // 1. Size, before any work.
    if token.len() > max_bytes {
        return Err(Refusal::Oversized);
    }
    // 2. Shape.
    if !token.is_ascii() {
        return Err(Refusal::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed);
    };
    if header_b64.is_empty() || payload_b64.is_empty() {
        return Err(Refusal::Malformed);
    }
    // 3. Encoding.
    let header = decode(header_b64)?;
    let payload = decode(payload_b64)?;
    let signature = decode(sig_b64)?;
    // 4. JSON syntax (the payload is not looked at until the signature verifies, but for
    //    `peek`'s unauthenticated `iss`).
    let header = json::object(&header).map_err(|_| Refusal::BadJson)?;
    let payload = json::object(&payload).map_err(|_| Refusal::BadJson)?;
    // 5. Header algorithm.
    let alg = header_alg(&header)?;
    if header.contains_key("crit") {
        return Err(Refusal::CritUnsupported);
    }
    // 6, first half: a kid to look up.
    let kid = match header.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        _ => return Err(Refusal::MissingKid),
    };
    Ok(Parsed {
        signed: &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()],
        payload,
        signature,
        alg,
        kid,
    })
}

/// Verifies `token` against `keys` and `policy` at `now_s` (unix seconds). Returns the
/// claims, or the first refusal in the order documented on the [module](super).
pub fn verify(token: &str, keys: &KeySet, policy: &Policy, now_s: u64) -> Result<Claims, Refusal> {
    // 1 to 5, and the kid's presence.
    let Parsed {
        signed,
        payload,
        signature,
        alg,
        kid,
    } = parse(token, policy.max_token_bytes)?;
    // 6. Key.
    let key = match keys.get(&kid) {
        Some(k) => k,
        None if keys.is_skipped_kid(&kid) => return Err(Refusal::KeyUnusable),
        None => return Err(Refusal::UnknownKid),
    };
    if key.alg != alg {
        return Err(Refusal::AlgMismatch);
    }
    if !key.valid_at(now_s, policy.skew_s) {
        return Err(Refusal::KeyOutsideWindow);
    }
    // 7, 8. Signature over the first two parts exactly as sent.
    if signature.len() != key.signature_len() {
        return Err(Refusal::TruncatedSignature);
    }
    if !key.verify(signed, &signature) {
        return Err(Refusal::BadSignature);
    }
    // 9. Claims, now trusted, typed (the mapped ones too).
    let (mut claims, typed) = claims(&payload, signed, &policy.mapping, kid, alg)?;
    // 10. Time.
    let skew = policy.skew_s;
    if now_s > claims.exp.saturating_add(skew) {
        return Err(Refusal::Expired);
    }
    let early = now_s.saturating_add(skew);
    if claims.nbf.is_some_and(|nbf| early < nbf) || early < claims.iat {
        return Err(Refusal::NotYetValid);
    }
    if claims.exp - claims.iat > policy.max_ttl_s {
        return Err(Refusal::LifetimeTooLong);
    }
    // 11. Issuer, exactly.
    if let Some(issuer) = &policy.issuer
        && claims.issuer.as_ref() != Some(issuer)
    {
        return Err(Refusal::WrongIssuer);
    }
    // 12. Audience.
    if !policy.audiences.iter().any(|a| claims.audience.contains(a)) {
        return Err(Refusal::WrongAudience);
    }
    // 13. Mapping.
    let mapped = policy.mapping.resolve(typed)?;
    claims.roles = mapped.roles;
    claims.class = mapped.class;
    claims.plan = mapped.plan;
    Ok(claims)
}

fn decode(part: &str) -> Result<Vec<u8>, Refusal> {
    b64url().decode(part).map_err(|_| Refusal::BadBase64)
}

fn header_alg(header: &Map<String, Value>) -> Result<Alg, Refusal> {
    let Some(Value::String(name)) = header.get("alg") else {
        return Err(Refusal::MissingAlg);
    };
    if name.eq_ignore_ascii_case("none") {
        return Err(Refusal::AlgNone);
    }
    if ["HS256", "HS384", "HS512"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
    {
        return Err(Refusal::AlgHmac);
    }
    Alg::from_jose(name).ok_or(Refusal::AlgUnsupported)
}

/// The id of a token that carries none ([`Mapping::derive_token_id`]): `sha256:` and the
/// unpadded base64url of the first 16 bytes of SHA-256 over the signed bytes,
/// `header_b64 "." payload_b64` exactly as sent. 128 bits: no two tokens an issuer signs
/// share one by chance.
///
/// Over the signed bytes, NOT over the signature: an ECDSA signature is malleable — if
/// `(r, s)` verifies, so does `(r, n - s)` — so anyone holding a stolen ES256/ES384 token
/// could present a second, equally valid token with another signature; an id hashed from the
/// signature would then be a new id, dodging replay detection and an operator's revocation.
/// The signed bytes are what the issuer vouched for; no one can change them without breaking
/// the signature.
pub fn derived_token_id(signed: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, signed);
    let mut id = String::from(DERIVED_TOKEN_ID_PREFIX);
    b64url().encode_string(&digest.as_ref()[..16], &mut id);
    id
}

/// What every [`derived_token_id`] starts with (a claim-carried id may too: the prefix says
/// how to read an id, it is not a namespace).
pub const DERIVED_TOKEN_ID_PREFIX: &str = "sha256:";

/// The registered claims of a payload whose signature verified (step 9), type-checked; the
/// mapped ones are left empty for step 13.
fn claims<'a>(
    payload: &'a Map<String, Value>,
    signed: &[u8],
    mapping: &Mapping,
    kid: String,
    alg: Alg,
) -> Result<(Claims, Typed<'a>), Refusal> {
    let jti = mapping.token_id_of(payload, signed)?;
    let identity = mapping.identity_of(payload)?;
    let iat = required_time(payload, "iat", Refusal::MissingIat)?;
    let exp = required_time(payload, "exp", Refusal::MissingExp)?;
    let nbf = match payload.get("nbf") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or(Refusal::BadClaim)?),
    };
    let audience = match payload.get("aud") {
        None => Vec::new(),
        Some(Value::String(a)) => std::vec![a.clone()],
        Some(Value::Array(list)) => strings(list)?,
        Some(_) => return Err(Refusal::BadClaim),
    };
    let issuer = match payload.get("iss") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(Refusal::BadClaim),
    };
    let typed = mapping.typed(payload)?;
    if exp < iat {
        return Err(Refusal::BadClaim);
    }
    let claims = Claims {
        jti,
        identity,
        class: None,
        plan: None,
        roles: Vec::new(),
        audience,
        issuer,
        iat,
        nbf,
        exp,
        kid,
        alg,
    };
    Ok((claims, typed))
}

fn required_time(
    payload: &Map<String, Value>,
    name: &str,
    missing: Refusal,
) -> Result<u64, Refusal> {
    payload
        .get(name)
        .ok_or(missing)?
        .as_u64()
        .ok_or(Refusal::BadClaim)
}

fn strings(list: &[Value]) -> Result<Vec<String>, Refusal> {
    list.iter()
        .map(|v| v.as_str().map(str::to_owned).ok_or(Refusal::BadClaim))
        .collect()
}
