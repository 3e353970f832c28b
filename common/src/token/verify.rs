//! [`verify`]: the checks, in the order the module documentation lists.

use std::{borrow::ToOwned, string::String, vec::Vec};

use base64::Engine as _;
use serde_json::{Map, Value};

use super::{Alg, Claims, KeySet, Policy, Refusal, b64url, json};

/// Verifies `token` against `keys` and `policy` at `now_s` (unix seconds). Returns the
/// claims, or the first refusal in the order documented on the [module](super).
pub fn verify(token: &str, keys: &KeySet, policy: &Policy, now_s: u64) -> Result<Claims, Refusal> {
    // 1. Size, before any work.
    if token.len() > policy.max_token_bytes {
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
    // 4. JSON syntax (the payload is not looked at until the signature verifies).
    let header = json::object(&header).map_err(|_| Refusal::BadJson)?;
    let payload = json::object(&payload).map_err(|_| Refusal::BadJson)?;
    // 5. Header algorithm.
    let alg = header_alg(&header)?;
    if header.contains_key("crit") {
        return Err(Refusal::CritUnsupported);
    }
    // 6. Key.
    let kid = match header.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k,
        _ => return Err(Refusal::MissingKid),
    };
    let key = keys.get(kid).ok_or(Refusal::UnknownKid)?;
    if key.alg != alg {
        return Err(Refusal::AlgMismatch);
    }
    if !key.valid_at(now_s, policy.skew_s) {
        return Err(Refusal::KeyOutsideWindow);
    }
    // 7, 8. Signature over the first two parts exactly as sent.
    if signature.len() != alg.signature_len() {
        return Err(Refusal::TruncatedSignature);
    }
    let signed = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
    if !key.verify(signed, &signature) {
        return Err(Refusal::BadSignature);
    }
    // 9. Claims, now trusted.
    let claims = claims(&payload, policy, kid, alg)?;
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
    // 11. Audience.
    if !claims.audience.contains(&policy.audience) {
        return Err(Refusal::WrongAudience);
    }
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

/// The claims of a payload whose signature verified (step 9), type-checked.
fn claims(
    payload: &Map<String, Value>,
    policy: &Policy,
    kid: &str,
    alg: Alg,
) -> Result<Claims, Refusal> {
    let names = &policy.claim_names;
    let jti = required_str(payload, "jti", Refusal::MissingJti)?;
    let identity = required_str(payload, &names.identity, Refusal::MissingIdentity)?;
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
    let class = optional_str(payload, &names.class)?;
    let plan = optional_str(payload, &names.plan)?;
    let roles = match payload.get(names.roles.as_str()) {
        None => Vec::new(),
        Some(Value::Array(list)) => strings(list)?,
        Some(_) => return Err(Refusal::BadClaim),
    };
    if exp < iat {
        return Err(Refusal::BadClaim);
    }
    Ok(Claims {
        jti,
        identity,
        class,
        plan,
        roles,
        audience,
        iat,
        nbf,
        exp,
        kid: kid.to_owned(),
        alg,
    })
}

fn required_str(
    payload: &Map<String, Value>,
    name: &str,
    missing: Refusal,
) -> Result<String, Refusal> {
    match payload.get(name) {
        None => Err(missing),
        Some(Value::String(s)) if s.is_empty() => Err(missing),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Refusal::BadClaim),
    }
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

fn optional_str(payload: &Map<String, Value>, name: &str) -> Result<Option<String>, Refusal> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Refusal::BadClaim),
    }
}

fn strings(list: &[Value]) -> Result<Vec<String>, Refusal> {
    list.iter()
        .map(|v| v.as_str().map(str::to_owned).ok_or(Refusal::BadClaim))
        .collect()
}
