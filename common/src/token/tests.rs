//! Round trips, a table of forged and broken tokens each with its exact refusal, the check
//! order, skew boundaries, JWKS errors.

use std::{
    borrow::ToOwned,
    format,
    string::{String, ToString as _},
    vec,
    vec::Vec,
};

use base64::Engine as _;
use serde_json::{Value, json};

use super::*;

const NOW: u64 = 1_800_000_000;
const SKEW: u64 = 30;
const TTL: u64 = 3600;

/// Refusals the legacy policy of `bad_tokens` cannot produce: those of an issuer's own
/// policy (tested in `issuer_and_mapping`) and the two the agent applies.
const AFTER_LEGACY: &[Refusal] = &[
    Refusal::WrongIssuer,
    Refusal::MissingClaim,
    Refusal::UnmappedValue,
    Refusal::MissingRoles,
    Refusal::KeysUnavailable,
    Refusal::Revoked,
];

fn policy() -> Policy {
    Policy {
        issuer: None,
        audiences: vec!["inference".into()],
        max_ttl_s: TTL,
        skew_s: SKEW,
        max_token_bytes: 4096,
        mapping: Mapping::default(),
    }
}

fn b64(bytes: &[u8]) -> String {
    b64url().encode(bytes)
}

/// The keys every test uses: one per algorithm, a retired one, a future one, and one that
/// signs but is not in the JWKS.
struct Fixture {
    ed: SigningKey,
    ec: SigningKey,
    retired: SigningKey,
    future: SigningKey,
    ghost: SigningKey,
    keys: KeySet,
}

fn fixture() -> Fixture {
    let ed = SigningKey::generate(Alg::EdDSA, "ed1").unwrap();
    let ec = SigningKey::generate(Alg::ES256, "ec1").unwrap();
    let retired = SigningKey::generate(Alg::EdDSA, "retired").unwrap();
    let future = SigningKey::generate(Alg::ES256, "future").unwrap();
    let ghost = SigningKey::generate(Alg::EdDSA, "ghost").unwrap();
    let mut retired_jwk = retired.public_jwk();
    retired_jwk["nbf"] = json!(NOW - 100_000);
    retired_jwk["exp"] = json!(NOW - 1000);
    let mut future_jwk = future.public_jwk();
    future_jwk["nbf"] = json!(NOW + 1000);
    // An encryption key beside the signing keys: skipped, its kid refused as key_unusable.
    let mut enc_jwk = SigningKey::generate(Alg::ES256, "enc1")
        .unwrap()
        .public_jwk();
    enc_jwk["use"] = json!("enc");
    let keys = KeySet::from_jwks(&jwks(&[
        ed.public_jwk(),
        ec.public_jwk(),
        retired_jwk,
        future_jwk,
        enc_jwk,
    ]))
    .unwrap();
    Fixture {
        ed,
        ec,
        retired,
        future,
        ghost,
        keys,
    }
}

fn claims_json() -> Value {
    json!({
        "jti": "t-1",
        "sub": "alice",
        "aud": "inference",
        "iat": NOW - 10,
        "exp": NOW + 600,
        "tollgate_class": "batch",
        "tollgate_plan": "pro",
        "tollgate_roles": ["reader", "writer"],
    })
}

fn header(key: &SigningKey) -> Value {
    json!({"alg": key.alg.as_str(), "kid": key.kid, "typ": "JWT"})
}

/// A token signed by `key` over any header and payload JSON.
fn forge(key: &SigningKey, header: &Value, payload: &Value) -> String {
    key.sign_compact(
        header.to_string().as_bytes(),
        payload.to_string().as_bytes(),
    )
    .unwrap()
}

/// A good token from `key` with `edit` applied to its claims.
fn with_claims(key: &SigningKey, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut c = claims_json();
    edit(c.as_object_mut().unwrap());
    forge(key, &header(key), &c)
}

fn parts(token: &str) -> (String, String, String) {
    let mut p = token.split('.').map(str::to_owned);
    (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
}

fn check(token: &str, keys: &KeySet) -> Result<Claims, Refusal> {
    verify(token, keys, &policy(), NOW)
}

#[test]
fn round_trip_both_algorithms() {
    let f = fixture();
    let roles = vec!["reader".to_string(), "writer".to_string()];
    for key in [&f.ed, &f.ec] {
        let t = NewToken {
            jti: "t-42",
            identity: "alice",
            class: Some("batch"),
            plan: Some("pro"),
            roles: &roles,
            audience: "inference",
            iat: NOW,
            nbf: Some(NOW),
            exp: NOW + 300,
        };
        let token = issue(key, &t, &ClaimNames::default()).unwrap();
        let claims = check(&token, &f.keys).unwrap();
        assert_eq!(
            claims,
            Claims {
                jti: "t-42".into(),
                identity: "alice".into(),
                class: Some("batch".into()),
                plan: Some("pro".into()),
                roles: roles.clone(),
                audience: vec!["inference".into()],
                issuer: None,
                iat: NOW,
                nbf: Some(NOW),
                exp: NOW + 300,
                kid: key.kid.clone(),
                alg: key.alg,
            }
        );
        // Minimal: no class, plan, roles or nbf.
        let t = NewToken {
            class: None,
            plan: None,
            roles: &[],
            nbf: None,
            ..t
        };
        let claims = check(&issue(key, &t, &ClaimNames::default()).unwrap(), &f.keys).unwrap();
        assert_eq!((claims.class, claims.plan, claims.nbf), (None, None, None));
        assert!(claims.roles.is_empty());
    }
}

#[test]
fn key_file_round_trip() {
    for &alg in Alg::signable() {
        let key = SigningKey::generate(alg, "k").unwrap();
        let file = key.to_file_json();
        let back = SigningKey::from_file_json(&file).unwrap();
        assert_eq!((back.kid.as_str(), back.alg), ("k", alg));
        assert_eq!(back.public_jwk(), key.public_jwk());
        // A token from the reloaded key verifies with the original's public key.
        let keys = KeySet::from_jwks(&jwks(&[key.public_jwk()])).unwrap();
        let token = with_claims(&back, |_| {});
        assert_eq!(check(&token, &keys).unwrap().kid, "k");
        assert!(!format!("{key:?}").contains(&key.to_file_json()[40..60]));
    }
    assert!(matches!(
        SigningKey::from_file_json("{}"),
        Err(KeyError::File(_))
    ));
    assert!(matches!(
        SigningKey::from_file_json(r#"{"kid":"k","alg":"RS256","pkcs8":""}"#),
        Err(KeyError::UnknownAlg(a)) if a == "RS256"
    ));
    assert_eq!(
        SigningKey::from_file_json(r#"{"kid":"k","alg":"EdDSA","pkcs8":"!!"}"#).unwrap_err(),
        KeyError::Base64
    );
    assert!(matches!(
        SigningKey::from_file_json(r#"{"kid":"k","alg":"EdDSA","pkcs8":"AAAA"}"#),
        Err(KeyError::Rejected {
            alg: Alg::EdDSA,
            ..
        })
    ));
    assert!(matches!(
        SigningKey::from_file_json(r#"{"kid":"k","alg":"EdDSA","pkcs8":"","d":"x"}"#),
        Err(KeyError::File(_))
    ));
    // An ES256 key file read as EdDSA is refused, not misused.
    let ec = SigningKey::generate(Alg::ES256, "k").unwrap();
    let swapped = ec.to_file_json().replace("ES256", "EdDSA");
    assert!(matches!(
        SigningKey::from_file_json(&swapped),
        Err(KeyError::Rejected { .. })
    ));
    assert_eq!(
        SigningKey::generate(Alg::EdDSA, "").unwrap_err(),
        KeyError::EmptyKid
    );
}

#[test]
fn public_jwk_shape() {
    let f = fixture();
    let ed = f.ed.public_jwk();
    assert_eq!(
        (ed["kty"].as_str(), ed["crv"].as_str()),
        (Some("OKP"), Some("Ed25519"))
    );
    assert_eq!(ed["alg"], "EdDSA");
    assert!(ed.get("d").is_none() && ed.get("y").is_none());
    let ec = f.ec.public_jwk();
    assert_eq!(
        (ec["kty"].as_str(), ec["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    assert_eq!(ec["alg"], "ES256");
    let x = b64url().decode(ec["x"].as_str().unwrap()).unwrap();
    let y = b64url().decode(ec["y"].as_str().unwrap()).unwrap();
    assert_eq!((x.len(), y.len()), (32, 32));
    let key = f.keys.get("ec1").unwrap();
    assert_eq!(key.key_bytes()[0], 0x04);
    assert_eq!(&key.key_bytes()[1..33], x.as_slice());
    assert_eq!(f.keys.len(), 4);
    assert_eq!(f.keys.kids(), ["ed1", "ec1", "retired", "future"]);
    let doc: Value = serde_json::from_str(&jwks(core::slice::from_ref(&ed))).unwrap();
    assert_eq!(doc, json!({"keys": [ed]}));
}

#[test]
fn issue_refuses_bad_input() {
    let f = fixture();
    let t = NewToken {
        jti: "j",
        identity: "alice",
        class: None,
        plan: None,
        roles: &[],
        audience: "inference",
        iat: NOW,
        nbf: None,
        exp: NOW + 1,
    };
    let names = ClaimNames::default();
    assert_eq!(
        issue(&f.ed, &NewToken { jti: "", ..t }, &names).unwrap_err(),
        IssueError::Empty("jti")
    );
    assert_eq!(
        issue(&f.ed, &NewToken { identity: "", ..t }, &names).unwrap_err(),
        IssueError::Empty("identity")
    );
    assert_eq!(
        issue(&f.ed, &NewToken { exp: NOW - 1, ..t }, &names).unwrap_err(),
        IssueError::ExpBeforeIat {
            iat: NOW,
            exp: NOW - 1
        }
    );
    let clash = ClaimNames {
        plan: "tollgate_class".into(),
        ..ClaimNames::default()
    };
    assert!(matches!(
        issue(&f.ed, &t, &clash),
        Err(IssueError::ClaimNames(ClaimNamesError::Clash {
            first: "class",
            second: "plan",
            ..
        }))
    ));
    let registered = ClaimNames {
        identity: "exp".into(),
        ..ClaimNames::default()
    };
    assert!(matches!(
        registered.check(),
        Err(ClaimNamesError::Registered {
            role: "identity",
            ..
        })
    ));
}

#[test]
fn custom_claim_names() {
    let f = fixture();
    let names = ClaimNames {
        identity: "email".into(),
        class: "tier".into(),
        plan: "sku".into(),
        roles: "groups".into(),
    };
    let roles = vec!["ops".to_string()];
    let t = NewToken {
        jti: "j",
        identity: "a@example.com",
        class: Some("internal"),
        plan: Some("enterprise"),
        roles: &roles,
        audience: "inference",
        iat: NOW,
        nbf: None,
        exp: NOW + 60,
    };
    let token = issue(&f.ec, &t, &names).unwrap();
    let p = Policy {
        mapping: Mapping::legacy(&names, None, None),
        ..policy()
    };
    let c = verify(&token, &f.keys, &p, NOW).unwrap();
    assert_eq!(c.identity, "a@example.com");
    assert_eq!(c.class.as_deref(), Some("internal"));
    assert_eq!(c.plan.as_deref(), Some("enterprise"));
    assert_eq!(c.roles, roles);
    // Under the default names the same token has no `sub`.
    assert_eq!(check(&token, &f.keys), Err(Refusal::MissingIdentity));
}

#[test]
fn audience_string_or_array() {
    let f = fixture();
    let ok = |aud: Value| {
        let token = with_claims(&f.ed, |c| {
            c.insert("aud".into(), aud);
        });
        check(&token, &f.keys).map(|c| c.audience)
    };
    assert_eq!(ok(json!("inference")), Ok(vec!["inference".to_string()]));
    assert_eq!(
        ok(json!(["billing", "inference"])),
        Ok(vec!["billing".to_string(), "inference".to_string()])
    );
    assert_eq!(ok(json!("billing")), Err(Refusal::WrongAudience));
    assert_eq!(
        ok(json!(["billing", "Inference"])),
        Err(Refusal::WrongAudience)
    );
    assert_eq!(ok(json!([])), Err(Refusal::WrongAudience));
    assert_eq!(ok(json!(["inference", 7])), Err(Refusal::BadClaim));
    assert_eq!(ok(json!({"aud": "inference"})), Err(Refusal::BadClaim));
    let absent = with_claims(&f.ed, |c| {
        c.remove("aud");
    });
    assert_eq!(check(&absent, &f.keys), Err(Refusal::WrongAudience));
}

#[test]
fn skew_boundaries() {
    let f = fixture();
    let at = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        check(&with_claims(&f.ed, edit), &f.keys).map(|_| ())
    };
    // exp: exactly at exp + skew is accepted, one second later refused.
    assert_eq!(
        at(&|c| {
            c.insert("iat".into(), json!(NOW - 100));
            c.insert("exp".into(), json!(NOW - SKEW));
        }),
        Ok(())
    );
    assert_eq!(
        at(&|c| {
            c.insert("iat".into(), json!(NOW - 100));
            c.insert("exp".into(), json!(NOW - SKEW - 1));
        }),
        Err(Refusal::Expired)
    );
    // nbf: now + skew == nbf is accepted, one second short refused.
    assert_eq!(
        at(&|c| {
            c.insert("nbf".into(), json!(NOW + SKEW));
        }),
        Ok(())
    );
    assert_eq!(
        at(&|c| {
            c.insert("nbf".into(), json!(NOW + SKEW + 1));
        }),
        Err(Refusal::NotYetValid)
    );
    // iat in the future counts the same way.
    assert_eq!(
        at(&|c| {
            c.insert("iat".into(), json!(NOW + SKEW));
        }),
        Ok(())
    );
    assert_eq!(
        at(&|c| {
            c.insert("iat".into(), json!(NOW + SKEW + 1));
        }),
        Err(Refusal::NotYetValid)
    );
    // Lifetime: exactly max_ttl_s is accepted, one second more refused.
    assert_eq!(
        at(&|c| {
            c.insert("iat".into(), json!(NOW));
            c.insert("exp".into(), json!(NOW + TTL));
        }),
        Ok(())
    );
    assert_eq!(
        at(&|c| {
            c.insert("iat".into(), json!(NOW));
            c.insert("exp".into(), json!(NOW + TTL + 1));
        }),
        Err(Refusal::LifetimeTooLong)
    );
    // The key window widens by the skew too.
    let key_at = |key: &SigningKey, now: u64| {
        let token = with_claims(key, |c| {
            c.insert("iat".into(), json!(now));
            c.insert("exp".into(), json!(now + 60));
        });
        verify(&token, &f.keys, &policy(), now).map(|_| ())
    };
    assert_eq!(key_at(&f.retired, NOW - 1000 + SKEW), Ok(()));
    assert_eq!(
        key_at(&f.retired, NOW - 1000 + SKEW + 1),
        Err(Refusal::KeyOutsideWindow)
    );
    assert_eq!(key_at(&f.future, NOW + 1000 - SKEW), Ok(()));
    assert_eq!(
        key_at(&f.future, NOW + 1000 - SKEW - 1),
        Err(Refusal::KeyOutsideWindow)
    );
}

/// The table: every token is built by hand and gets exactly one refusal.
#[test]
fn bad_tokens() {
    let f = fixture();
    let good = with_claims(&f.ed, |_| {});
    assert!(check(&good, &f.keys).is_ok());
    let (h, p, s) = parts(&good);
    let good_ec = with_claims(&f.ec, |c| {
        c.insert("jti".into(), json!("t-ec"));
    });
    let (hc, pc, sc) = parts(&good_ec);
    let sig = b64url().decode(&s).unwrap();
    let e30 = b64(b"{}");

    // An ES256 signature in DER (ASN.1) form instead of the fixed r || s.
    let der = {
        let pkcs8 = base64::engine::general_purpose::STANDARD
            .decode(
                serde_json::from_str::<Value>(&f.ec.to_file_json()).unwrap()["pkcs8"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &pkcs8,
            &rng,
        )
        .unwrap();
        let sig = pair.sign(&rng, format!("{hc}.{pc}").as_bytes()).unwrap();
        format!("{hc}.{pc}.{}", b64(sig.as_ref()))
    };
    // Algorithm confusion: HS256 keyed with the Ed25519 public key, as an attacker would.
    let hmac = {
        let hh = b64(json!({"alg": "HS256", "kid": "ed1"}).to_string().as_bytes());
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            f.keys.get("ed1").unwrap().key_bytes(),
        );
        let tag = ring::hmac::sign(&key, format!("{hh}.{p}").as_bytes());
        format!("{hh}.{p}.{}", b64(tag.as_ref()))
    };
    let unsigned = |alg: &str| {
        format!(
            "{}.{p}.",
            b64(json!({"alg": alg, "kid": "ed1"}).to_string().as_bytes())
        )
    };
    let hdr = |v: Value| forge(&f.ed, &v, &claims_json());
    let mut flipped = sig.clone();
    flipped[10] ^= 1;
    let tampered_payload = {
        let mut c = claims_json();
        c["sub"] = json!("mallory");
        b64(c.to_string().as_bytes())
    };
    let remove = |name: &'static str| {
        with_claims(&f.ed, move |c| {
            c.remove(name);
        })
    };
    let set = |name: &'static str, v: Value| {
        with_claims(&f.ed, move |c| {
            c.insert(name.into(), v);
        })
    };

    let table: Vec<(&str, String, Refusal)> = vec![
        (
            "longer than max_token_bytes",
            "a".repeat(4097),
            Refusal::Oversized,
        ),
        (
            "long and malformed: size first",
            format!("{good}.{}", "x".repeat(4096)),
            Refusal::Oversized,
        ),
        ("one part", "abc".into(), Refusal::Malformed),
        ("two parts", format!("{h}.{p}"), Refusal::Malformed),
        ("four parts", format!("{good}.{s}"), Refusal::Malformed),
        ("empty header", format!(".{p}.{s}"), Refusal::Malformed),
        ("empty payload", format!("{h}..{s}"), Refusal::Malformed),
        ("empty token", String::new(), Refusal::Malformed),
        ("non-ASCII", format!("{h}.{p}.{s}é"), Refusal::Malformed),
        (
            "header with padding",
            format!("{h}=.{p}.{s}"),
            Refusal::BadBase64,
        ),
        (
            "payload in standard base64 alphabet",
            format!("{h}.{}+.{s}", &p[..p.len() - 1]),
            Refusal::BadBase64,
        ),
        (
            "signature with a space",
            format!("{h}.{p}.{} ", &s),
            Refusal::BadBase64,
        ),
        (
            "header one char long",
            format!("a.{p}.{s}"),
            Refusal::BadBase64,
        ),
        (
            "header not JSON",
            format!("{}.{p}.{s}", b64(b"alg:EdDSA")),
            Refusal::BadJson,
        ),
        (
            "header a JSON array",
            format!("{}.{p}.{s}", b64(b"[1]")),
            Refusal::BadJson,
        ),
        (
            "header with a duplicate alg",
            format!(
                "{}.{p}.{s}",
                b64(br#"{"alg":"EdDSA","kid":"ed1","alg":"none"}"#)
            ),
            Refusal::BadJson,
        ),
        (
            "payload a JSON string, validly signed",
            f.ed.sign_compact(header(&f.ed).to_string().as_bytes(), b"\"hi\"")
                .unwrap(),
            Refusal::BadJson,
        ),
        (
            "payload with a duplicate sub, validly signed",
            f.ed.sign_compact(
                header(&f.ed).to_string().as_bytes(),
                br#"{"jti":"j","sub":"alice","sub":"root","iat":1,"exp":2}"#,
            )
            .unwrap(),
            Refusal::BadJson,
        ),
        (
            "payload not base64, unsigned: base64 before the signature",
            format!("{h}.***.{s}"),
            Refusal::BadBase64,
        ),
        ("no alg", hdr(json!({"kid": "ed1"})), Refusal::MissingAlg),
        (
            "alg not a string",
            hdr(json!({"alg": 1, "kid": "ed1"})),
            Refusal::MissingAlg,
        ),
        (
            "alg none, empty signature",
            unsigned("none"),
            Refusal::AlgNone,
        ),
        ("alg NoNe", unsigned("NoNe"), Refusal::AlgNone),
        (
            "alg none with a stolen signature",
            format!("{}{s}", unsigned("none")),
            Refusal::AlgNone,
        ),
        ("HS256 keyed with the public key", hmac, Refusal::AlgHmac),
        ("alg hs512", unsigned("hs512"), Refusal::AlgHmac),
        ("alg ES512", unsigned("ES512"), Refusal::AlgUnsupported),
        (
            "alg RS256 on the Ed25519 key",
            unsigned("RS256"),
            Refusal::AlgMismatch,
        ),
        (
            "kid of a key the node skipped",
            forge(
                &f.ed,
                &json!({"alg": "EdDSA", "kid": "enc1"}),
                &claims_json(),
            ),
            Refusal::KeyUnusable,
        ),
        (
            "alg eddsa (case matters)",
            unsigned("eddsa"),
            Refusal::AlgUnsupported,
        ),
        ("alg ES512", unsigned("ES512"), Refusal::AlgUnsupported),
        (
            "crit header",
            hdr(json!({"alg": "EdDSA", "kid": "ed1", "crit": ["exp"], "exp": 1})),
            Refusal::CritUnsupported,
        ),
        ("no kid", hdr(json!({"alg": "EdDSA"})), Refusal::MissingKid),
        (
            "empty kid",
            hdr(json!({"alg": "EdDSA", "kid": ""})),
            Refusal::MissingKid,
        ),
        (
            "kid a number",
            hdr(json!({"alg": "EdDSA", "kid": 1})),
            Refusal::MissingKid,
        ),
        (
            "signed by a key not in the JWKS",
            with_claims(&f.ghost, |_| {}),
            Refusal::UnknownKid,
        ),
        (
            "jwk header is ignored: keys only come from the JWKS",
            forge(
                &f.ghost,
                &json!({"alg": "EdDSA", "kid": "ghost", "jwk": f.ghost.public_jwk()}),
                &claims_json(),
            ),
            Refusal::UnknownKid,
        ),
        (
            "header says ES256, the key pins EdDSA",
            hdr(json!({"alg": "ES256", "kid": "ed1"})),
            Refusal::AlgMismatch,
        ),
        (
            "header says EdDSA, the key pins ES256",
            forge(
                &f.ed,
                &json!({"alg": "EdDSA", "kid": "ec1"}),
                &claims_json(),
            ),
            Refusal::AlgMismatch,
        ),
        (
            "key retired",
            with_claims(&f.retired, |_| {}),
            Refusal::KeyOutsideWindow,
        ),
        (
            "key not yet valid",
            with_claims(&f.future, |_| {}),
            Refusal::KeyOutsideWindow,
        ),
        (
            "signature truncated by one byte",
            format!("{h}.{p}.{}", b64(&sig[..63])),
            Refusal::TruncatedSignature,
        ),
        (
            "signature cut in half",
            format!("{h}.{p}.{}", &s[..44]),
            Refusal::TruncatedSignature,
        ),
        (
            "empty signature",
            format!("{h}.{p}."),
            Refusal::TruncatedSignature,
        ),
        ("ES256 signature in DER", der, Refusal::TruncatedSignature),
        (
            "one signature bit flipped",
            format!("{h}.{p}.{}", b64(&flipped)),
            Refusal::BadSignature,
        ),
        (
            "payload changed",
            format!("{h}.{tampered_payload}.{s}"),
            Refusal::BadSignature,
        ),
        (
            "payload swapped with another token's",
            format!("{h}.{pc}.{s}"),
            Refusal::BadSignature,
        ),
        (
            "ES256 token carrying an Ed25519 signature",
            format!("{hc}.{pc}.{s}"),
            Refusal::BadSignature,
        ),
        (
            "ES256 signature of another message",
            format!("{hc}.{e30}.{sc}"),
            Refusal::BadSignature,
        ),
        (
            "kid of ed1, signed by ghost",
            forge(&f.ghost, &header(&f.ed), &claims_json()),
            Refusal::BadSignature,
        ),
        ("no jti", remove("jti"), Refusal::MissingJti),
        ("empty jti", set("jti", json!("")), Refusal::MissingJti),
        ("no sub", remove("sub"), Refusal::MissingIdentity),
        ("empty sub", set("sub", json!("")), Refusal::MissingIdentity),
        ("no iat", remove("iat"), Refusal::MissingIat),
        ("no exp", remove("exp"), Refusal::MissingExp),
        (
            "signed empty object",
            forge(&f.ed, &header(&f.ed), &json!({})),
            Refusal::MissingJti,
        ),
        ("jti a number", set("jti", json!(7)), Refusal::BadClaim),
        ("sub null", set("sub", Value::Null), Refusal::BadClaim),
        (
            "exp a string",
            set("exp", json!("1800000600")),
            Refusal::BadClaim,
        ),
        (
            "exp fractional",
            set("exp", json!(1_800_000_600.5)),
            Refusal::BadClaim,
        ),
        ("iat negative", set("iat", json!(-1)), Refusal::BadClaim),
        ("nbf a bool", set("nbf", json!(true)), Refusal::BadClaim),
        (
            "roles a string",
            set("tollgate_roles", json!("admin")),
            Refusal::BadClaim,
        ),
        (
            "roles with a number",
            set("tollgate_roles", json!(["a", 1])),
            Refusal::BadClaim,
        ),
        (
            "class a number",
            set("tollgate_class", json!(1)),
            Refusal::BadClaim,
        ),
        (
            "plan an object",
            set("tollgate_plan", json!({})),
            Refusal::BadClaim,
        ),
        ("aud a number", set("aud", json!(1)), Refusal::BadClaim),
        (
            "exp before iat",
            set("exp", json!(NOW - 20)),
            Refusal::BadClaim,
        ),
        (
            "expired",
            with_claims(&f.ed, |c| {
                c.insert("iat".into(), json!(NOW - 1000));
                c.insert("exp".into(), json!(NOW - 100));
            }),
            Refusal::Expired,
        ),
        (
            "not valid yet (nbf)",
            set("nbf", json!(NOW + 300)),
            Refusal::NotYetValid,
        ),
        (
            "issued in the future",
            with_claims(&f.ed, |c| {
                c.insert("iat".into(), json!(NOW + 300));
                c.insert("exp".into(), json!(NOW + 600));
            }),
            Refusal::NotYetValid,
        ),
        (
            "lives a day",
            set("exp", json!(NOW + 86_400)),
            Refusal::LifetimeTooLong,
        ),
        (
            "other audience",
            set("aud", json!("billing")),
            Refusal::WrongAudience,
        ),
        (
            "other audiences",
            set("aud", json!(["billing", "search"])),
            Refusal::WrongAudience,
        ),
        ("no audience", remove("aud"), Refusal::WrongAudience),
        // Order: the first failing check wins.
        (
            "expired and wrong audience: time first",
            with_claims(&f.ed, |c| {
                c.insert("iat".into(), json!(NOW - 1000));
                c.insert("exp".into(), json!(NOW - 100));
                c.insert("aud".into(), json!("billing"));
            }),
            Refusal::Expired,
        ),
        (
            "bad signature over missing claims: claims never read",
            format!("{h}.{e30}.{s}"),
            Refusal::BadSignature,
        ),
        (
            "alg none with an unknown kid: alg first",
            format!("{}.{p}.", b64(br#"{"alg":"none","kid":"nobody"}"#)),
            Refusal::AlgNone,
        ),
        (
            "unknown kid with a truncated signature: key first",
            format!("{}.{p}.AAAA", b64(br#"{"alg":"EdDSA","kid":"nobody"}"#)),
            Refusal::UnknownKid,
        ),
    ];
    assert!(table.len() >= 18);
    let mut seen = std::collections::HashSet::new();
    for (what, token, want) in &table {
        assert_eq!(check(token, &f.keys), Err(*want), "{what}: {token}");
        seen.insert(*want);
    }
    // Every refusal `verify` can return is in the table.
    for r in REFUSALS {
        assert!(
            seen.contains(r) || AFTER_LEGACY.contains(r),
            "no table entry for {}",
            r.label()
        );
    }
    // A tight size limit refuses even a good token.
    let tight = Policy {
        max_token_bytes: good.len() - 1,
        ..policy()
    };
    assert_eq!(verify(&good, &f.keys, &tight, NOW), Err(Refusal::Oversized));
    assert!(
        verify(
            &good,
            &f.keys,
            &Policy {
                max_token_bytes: good.len(),
                ..policy()
            },
            NOW
        )
        .is_ok()
    );
    // An empty key set knows no kid.
    assert_eq!(check(&good, &KeySet::default()), Err(Refusal::UnknownKid));
}

#[test]
fn refusal_labels() {
    assert_eq!(REFUSALS.len(), 31);
    let mut labels = std::collections::HashSet::new();
    for r in REFUSALS {
        let l = r.label();
        assert!(labels.insert(l), "duplicate label {l}");
        assert!(
            l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "label {l} is not snake_case"
        );
        assert_eq!(Refusal::from_label(l), Some(*r));
        let text = r.to_string();
        assert!(text.ends_with(|c: char| c != '.') && !text.is_empty());
    }
    for l in [
        "oversized",
        "malformed",
        "bad_base64",
        "bad_json",
        "alg_none",
        "alg_hmac",
        "alg_unsupported",
        "missing_kid",
        "unknown_kid",
        "alg_mismatch",
        "key_outside_window",
        "truncated_signature",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "lifetime_too_long",
        "wrong_audience",
        "missing_identity",
        "missing_exp",
        "missing_iat",
        "missing_jti",
        "bad_claim",
        "revoked",
    ] {
        assert!(Refusal::from_label(l).is_some(), "{l}");
    }
}

#[test]
fn alg_names() {
    assert_eq!(Alg::EdDSA.as_str(), "EdDSA");
    assert_eq!(Alg::ES256.to_string(), "ES256");
    assert_eq!("es256".parse::<Alg>(), Ok(Alg::ES256));
    assert_eq!("EDDSA".parse::<Alg>(), Ok(Alg::EdDSA));
    assert_eq!("rs256".parse::<Alg>(), Ok(Alg::RS256));
    assert_eq!("Ps512".parse::<Alg>(), Ok(Alg::PS512));
    assert!("HS256".parse::<Alg>().is_err());
    assert!("ES512".parse::<Alg>().is_err());
    assert_eq!(Alg::from_jose("rs256"), None);
    for alg in Alg::ALL {
        assert_eq!(Alg::from_jose(alg.as_str()), Some(alg));
    }
    assert_eq!(Alg::signable(), [Alg::EdDSA, Alg::ES256]);
    assert_eq!(Alg::from_jose("eddsa"), None);
}

fn jwks_err(doc: &str) -> JwksError {
    KeySet::from_jwks(doc).unwrap_err()
}

/// A JWKS of one key: a fresh Ed25519 or P-256 public JWK with `edit` applied.
fn one_key(alg: Alg, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut jwk = SigningKey::generate(alg, "k1").unwrap().public_jwk();
    edit(jwk.as_object_mut().unwrap());
    jwks(&[jwk])
}

/// The one skip record of a JWKS that loads no key.
fn skipped_one(doc: &str) -> Skipped {
    let set = KeySet::from_jwks(doc).unwrap();
    assert!(set.is_empty(), "{doc}");
    assert_eq!(set.skipped().len(), 1, "{doc}");
    set.skipped()[0].clone()
}

#[test]
fn jwks_errors() {
    assert!(matches!(jwks_err("{"), JwksError::Json(_)));
    let dup = jwks_err(r#"{"keys":[],"keys":[]}"#);
    assert!(
        matches!(&dup, JwksError::Json(m) if m.contains("duplicate")),
        "{dup}"
    );
    assert_eq!(jwks_err("[]"), JwksError::NoKeys);
    assert_eq!(jwks_err("{}"), JwksError::NoKeys);
    assert_eq!(jwks_err(r#"{"keys":{}}"#), JwksError::NoKeys);
    assert!(KeySet::from_jwks(r#"{"keys":[]}"#).unwrap().is_empty());

    let cases: Vec<(&str, String, KeyProblem)> = vec![
        (
            "RS256 on an Ed25519 key",
            one_key(Alg::EdDSA, |k| {
                k.insert("alg".into(), json!("RS256"));
            }),
            KeyProblem::Contradiction {
                alg: Alg::RS256,
                kty: "OKP".into(),
                crv: Some("Ed25519".into()),
            },
        ),
        (
            "an algorithm tollgate does not know",
            one_key(Alg::EdDSA, |k| {
                k.insert("alg".into(), json!("ES512"));
            }),
            KeyProblem::UnsupportedAlg("ES512".into()),
        ),
        (
            "private d",
            one_key(Alg::EdDSA, |k| {
                k.insert("d".into(), json!("AAAA"));
            }),
            KeyProblem::PrivateMember("d"),
        ),
        (
            "symmetric key",
            one_key(Alg::EdDSA, |k| {
                k.insert("kty".into(), json!("oct"));
                k.insert("alg".into(), json!("HS256"));
                k.insert("k".into(), json!("c2VjcmV0"));
            }),
            KeyProblem::PrivateMember("k"),
        ),
        (
            "unknown kty",
            one_key(Alg::EdDSA, |k| {
                k.insert("kty".into(), json!("AKP"));
            }),
            KeyProblem::UnknownKty("AKP".into()),
        ),
        (
            "no kty",
            one_key(Alg::EdDSA, |k| {
                k.remove("kty");
            }),
            KeyProblem::BadMember {
                member: "kty",
                why: "is missing".into(),
            },
        ),
        (
            "wrong kty",
            one_key(Alg::ES256, |k| {
                k.insert("kty".into(), json!("OKP"));
            }),
            KeyProblem::Contradiction {
                alg: Alg::ES256,
                kty: "OKP".into(),
                crv: Some("P-256".into()),
            },
        ),
        (
            "wrong crv",
            one_key(Alg::EdDSA, |k| {
                k.insert("crv".into(), json!("X25519"));
            }),
            KeyProblem::Contradiction {
                alg: Alg::EdDSA,
                kty: "OKP".into(),
                crv: Some("X25519".into()),
            },
        ),
        (
            "an unsupported curve, no alg",
            one_key(Alg::EdDSA, |k| {
                k.remove("alg");
                k.insert("crv".into(), json!("Ed448"));
            }),
            KeyProblem::UnsupportedCurve("Ed448".into()),
        ),
        (
            "ES384 on a P-256 key",
            one_key(Alg::ES256, |k| {
                k.insert("alg".into(), json!("ES384"));
            }),
            KeyProblem::Contradiction {
                alg: Alg::ES384,
                kty: "EC".into(),
                crv: Some("P-256".into()),
            },
        ),
        (
            "x too short",
            one_key(Alg::EdDSA, |k| {
                k.insert("x".into(), json!(b64(&[1; 31])));
            }),
            KeyProblem::BadLength {
                member: "x",
                found: 31,
                expected: 32,
            },
        ),
        (
            "y missing",
            one_key(Alg::ES256, |k| {
                k.remove("y");
            }),
            KeyProblem::BadMember {
                member: "y",
                why: "is missing".into(),
            },
        ),
        (
            "x padded",
            one_key(Alg::EdDSA, |k| {
                let x = format!("{}=", k["x"].as_str().unwrap());
                k.insert("x".into(), json!(x));
            }),
            KeyProblem::BadMember {
                member: "x",
                why: "is not unpadded base64url".into(),
            },
        ),
        (
            "use enc",
            one_key(Alg::EdDSA, |k| {
                k.insert("use".into(), json!("enc"));
            }),
            KeyProblem::Encryption,
        ),
        (
            "use something else",
            one_key(Alg::EdDSA, |k| {
                k.insert("use".into(), json!("tls"));
            }),
            KeyProblem::Use("\"tls\"".into()),
        ),
        (
            "key_ops without verify",
            one_key(Alg::EdDSA, |k| {
                k.insert("key_ops".into(), json!(["sign"]));
            }),
            KeyProblem::KeyOps,
        ),
        (
            "nbf after exp",
            one_key(Alg::EdDSA, |k| {
                k.insert("nbf".into(), json!(20));
                k.insert("exp".into(), json!(10));
            }),
            KeyProblem::EmptyWindow { nbf: 20, exp: 10 },
        ),
        (
            "exp a string",
            one_key(Alg::EdDSA, |k| {
                k.insert("exp".into(), json!("tomorrow"));
            }),
            KeyProblem::BadMember {
                member: "exp",
                why: "is not a non-negative integer (unix seconds)".into(),
            },
        ),
    ];
    for (what, doc, want) in cases {
        let s = skipped_one(&doc);
        assert_eq!(
            (s.index, s.kid.as_deref(), &s.problem, s.reason),
            (0, Some("k1"), &want, want.reason()),
            "{what}"
        );
        let text = s.to_string();
        assert!(
            text.starts_with(&format!(
                "JWKS key #0 (kid \"k1\") skipped ({}): ",
                s.reason.label()
            )),
            "{what}: {text}"
        );
        let set = KeySet::from_jwks(&doc).unwrap();
        assert!(
            set.is_skipped_kid("k1") && !set.is_skipped_kid("k2"),
            "{what}"
        );
    }

    // No kid, or a non-object: named by index alone; the good key beside them is kept.
    let mut jwk = SigningKey::generate(Alg::EdDSA, "k").unwrap().public_jwk();
    jwk.as_object_mut().unwrap().remove("kid");
    let good = SigningKey::generate(Alg::EdDSA, "good")
        .unwrap()
        .public_jwk();
    let set = KeySet::from_jwks(&jwks(&[good.clone(), jwk, json!("k")])).unwrap();
    assert_eq!(set.kids(), ["good"]);
    let s = set.skipped();
    assert_eq!(
        (s[0].index, s[0].kid.as_deref(), s[0].reason),
        (1, None, SkipReason::MissingKid)
    );
    assert!(
        s[0].to_string()
            .starts_with("JWKS key #1 skipped (missing_kid): ")
    );
    assert_eq!(
        (s[1].index, &s[1].problem, s[1].reason),
        (2, &KeyProblem::NotAnObject, SkipReason::BadKey)
    );
    // Duplicate kid: both usable keys are skipped, the third key is kept.
    let other = SigningKey::generate(Alg::ES256, "good")
        .unwrap()
        .public_jwk();
    let third = SigningKey::generate(Alg::ES256, "third")
        .unwrap()
        .public_jwk();
    let set = KeySet::from_jwks(&jwks(&[good.clone(), third, other])).unwrap();
    assert_eq!(set.kids(), ["third"]);
    assert_eq!(
        set.skipped()
            .iter()
            .map(|s| (s.index, s.reason, s.problem.clone()))
            .collect::<Vec<_>>(),
        [
            (
                0,
                SkipReason::DuplicateKid,
                KeyProblem::DuplicateKid {
                    first: 0,
                    second: 2
                }
            ),
            (
                2,
                SkipReason::DuplicateKid,
                KeyProblem::DuplicateKid {
                    first: 0,
                    second: 2
                }
            ),
        ]
    );
    assert!(set.is_skipped_kid("good"));
    // A skipped key sharing a usable key's kid does not take the usable one down.
    let mut enc = good.clone();
    enc["use"] = json!("enc");
    let set = KeySet::from_jwks(&jwks(&[good.clone(), enc])).unwrap();
    assert_eq!(set.kids(), ["good"]);
    assert_eq!(set.skipped()[0].reason, SkipReason::EncryptionKey);
    // The error text says what is wrong.
    let text = skipped_one(&one_key(Alg::EdDSA, |k| {
        k.insert("d".into(), json!("AAAA"));
    }))
    .to_string();
    assert!(text.contains("private member `d`"), "{text}");
    // No `alg`: the one the key type admits.
    let set = KeySet::from_jwks(&one_key(Alg::EdDSA, |k| {
        k.remove("alg");
    }))
    .unwrap();
    assert_eq!(set.get("k1").map(|k| k.alg), Some(Alg::EdDSA));
    let set = KeySet::from_jwks(&one_key(Alg::ES256, |k| {
        k.remove("alg");
    }))
    .unwrap();
    assert_eq!(set.get("k1").map(|k| k.alg), Some(Alg::ES256));
    // Window members parse.
    let doc = one_key(Alg::EdDSA, |k| {
        k.insert("nbf".into(), json!(10));
        k.insert("exp".into(), json!(20));
        k.insert("key_ops".into(), json!(["verify"]));
        k.insert("x5t".into(), json!("ignored"));
    });
    let set = KeySet::from_jwks(&doc).unwrap();
    let key = set.get("k1").unwrap();
    assert_eq!((key.not_before, key.not_after), (Some(10), Some(20)));
    assert!(key.valid_at(10, 0) && key.valid_at(20, 0) && !key.valid_at(21, 0));
    assert!(!key.valid_at(9, 0) && key.valid_at(5, 5));
}

#[test]
fn skip_reason_labels() {
    let mut labels = std::collections::HashSet::new();
    for r in SKIP_REASONS {
        assert!(labels.insert(r.label()), "duplicate {}", r.label());
        assert_eq!(SkipReason::from_label(r.label()), Some(*r));
        assert!(!r.to_string().is_empty());
    }
    assert_eq!(SKIP_REASONS.len(), 10);
}
