//! Round trips, a table of forged and broken tokens each with its exact refusal, the check
//! order, skew boundaries, JWKS errors and skips; RSA (ring-signed with the test keys in
//! `testdata/`, and OpenSSL-signed tokens there), ES384, identity providers' JWKS shapes,
//! `peek`, the issuer check and claim mapping.

use std::{
    borrow::ToOwned,
    boxed::Box,
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

/// The last refusal (index in `REFUSALS`) `peek` can return: `missing_kid`.
const PEEK_LAST: usize = 9;

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
        // `peek` makes the same unauthenticated checks, with the same refusals, and no other.
        match REFUSALS.iter().position(|r| r == want) {
            Some(i) if i <= PEEK_LAST => assert_eq!(peek(token, 4096), Err(*want), "{what}"),
            _ => assert!(peek(token, 4096).is_ok(), "{what}: {:?}", peek(token, 4096)),
        }
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
    assert_eq!(REFUSALS[PEEK_LAST], Refusal::MissingKid);
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
        "wrong_issuer",
        "key_unusable",
        "keys_unavailable",
        "missing_claim",
        "unmapped_value",
        "missing_roles",
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
            "Ed448 with alg EdDSA (an EdDSA curve ring does not verify)",
            one_key(Alg::EdDSA, |k| {
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

// ---------------------------------------------------------------------------------------
// RSA, ES384, identity providers' JWKS documents, peek, issuer and claim mapping.

const RSA2048: &[u8] = include_bytes!("testdata/rsa2048.pk8");
const RSA4096: &[u8] = include_bytes!("testdata/rsa4096.pk8");

fn rsa_pair(pkcs8: &[u8]) -> ring::signature::RsaKeyPair {
    ring::signature::RsaKeyPair::from_pkcs8(pkcs8).unwrap()
}

/// The public half of a ring RSA key pair as a JWK (no `alg` unless given).
fn rsa_jwk(pair: &ring::signature::RsaKeyPair, kid: &str, alg: Option<Alg>) -> Value {
    let c: ring::signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
    let mut jwk = json!({"kty": "RSA", "kid": kid, "n": b64(&c.n), "e": b64(&c.e)});
    if let Some(a) = alg {
        jwk["alg"] = json!(a.as_str());
    }
    jwk
}

fn rsa_padding(alg: Alg) -> &'static dyn ring::signature::RsaEncoding {
    use ring::signature as s;
    match alg {
        Alg::RS256 => &s::RSA_PKCS1_SHA256,
        Alg::RS384 => &s::RSA_PKCS1_SHA384,
        Alg::RS512 => &s::RSA_PKCS1_SHA512,
        Alg::PS256 => &s::RSA_PSS_SHA256,
        Alg::PS384 => &s::RSA_PSS_SHA384,
        Alg::PS512 => &s::RSA_PSS_SHA512,
        other => panic!("{other} is not RSA"),
    }
}

/// A token signed with ring's RSA signer under `padding_of` (usually the header's alg).
fn rsa_token(
    pair: &ring::signature::RsaKeyPair,
    padding_of: Alg,
    header: &Value,
    payload: &Value,
) -> String {
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(
        rsa_padding(padding_of),
        &ring::rand::SystemRandom::new(),
        signed.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{signed}.{}", b64(&sig))
}

fn hdr_of(alg: Alg, kid: &str) -> Value {
    json!({"alg": alg.as_str(), "kid": kid, "typ": "JWT"})
}

fn set_of(keys: &[Value]) -> KeySet {
    KeySet::from_jwks(&jwks(keys)).unwrap()
}

const RSA_ALGS: [Alg; 6] = [
    Alg::RS256,
    Alg::RS384,
    Alg::RS512,
    Alg::PS256,
    Alg::PS384,
    Alg::PS512,
];

#[test]
fn rsa_round_trip_every_algorithm_and_size() {
    for (pkcs8, bits) in [(RSA2048, 2048), (RSA4096, 4096)] {
        let pair = rsa_pair(pkcs8);
        for alg in RSA_ALGS {
            let keys = set_of(&[rsa_jwk(&pair, "r1", Some(alg))]);
            let key = keys.get("r1").unwrap();
            assert_eq!((key.alg, key.rsa_bits()), (alg, Some(bits)));
            assert_eq!(key.signature_len(), bits / 8);
            let token = rsa_token(&pair, alg, &hdr_of(alg, "r1"), &claims_json());
            let c = check(&token, &keys).unwrap_or_else(|r| panic!("{alg} {bits}: {r}"));
            assert_eq!(
                (c.alg, c.kid.as_str(), c.identity.as_str()),
                (alg, "r1", "alice")
            );
            // The signature alone is tied to the key's pinned algorithm: the same key pinned
            // to another algorithm refuses the header, and a signature made with another
            // padding or hash over a header naming the pinned one does not verify.
            for other in RSA_ALGS.into_iter().filter(|o| *o != alg) {
                let t = rsa_token(&pair, alg, &hdr_of(other, "r1"), &claims_json());
                assert_eq!(check(&t, &keys), Err(Refusal::AlgMismatch), "{alg}/{other}");
                let t = rsa_token(&pair, other, &hdr_of(alg, "r1"), &claims_json());
                assert_eq!(
                    check(&t, &keys),
                    Err(Refusal::BadSignature),
                    "{alg}/{other}"
                );
            }
        }
    }
}

#[test]
fn rsa_without_alg_is_rs256() {
    let pair = rsa_pair(RSA2048);
    let keys = set_of(&[rsa_jwk(&pair, "r1", None)]);
    assert_eq!(keys.get("r1").map(|k| k.alg), Some(Alg::RS256));
    let rs = rsa_token(&pair, Alg::RS256, &hdr_of(Alg::RS256, "r1"), &claims_json());
    assert!(check(&rs, &keys).is_ok());
    // A PS256 token needs a key that says PS256: an alg-less RSA key is RS256 only.
    let ps = rsa_token(&pair, Alg::PS256, &hdr_of(Alg::PS256, "r1"), &claims_json());
    assert_eq!(check(&ps, &keys), Err(Refusal::AlgMismatch));
}

#[test]
fn rsa_signature_length_is_the_modulus_length() {
    let small = rsa_pair(RSA2048);
    let big = rsa_pair(RSA4096);
    let keys = set_of(&[rsa_jwk(&small, "r1", Some(Alg::RS256))]);
    let good = rsa_token(
        &small,
        Alg::RS256,
        &hdr_of(Alg::RS256, "r1"),
        &claims_json(),
    );
    let (h, p, s) = parts(&good);
    let sig = b64url().decode(&s).unwrap();
    assert_eq!(sig.len(), 256);
    let with_sig = |sig: &[u8]| format!("{h}.{p}.{}", b64(sig));
    assert_eq!(
        check(&with_sig(&sig[..255]), &keys),
        Err(Refusal::TruncatedSignature)
    );
    let mut padded = vec![0];
    padded.extend_from_slice(&sig);
    assert_eq!(
        check(&with_sig(&padded), &keys),
        Err(Refusal::TruncatedSignature)
    );
    // A 4096-bit key's signature over the same bytes, presented for the 2048-bit kid.
    let other = rsa_token(&big, Alg::RS256, &hdr_of(Alg::RS256, "r1"), &claims_json());
    assert_eq!(check(&other, &keys), Err(Refusal::TruncatedSignature));
    let mut flipped = sig.clone();
    flipped[100] ^= 0x10;
    assert_eq!(
        check(&with_sig(&flipped), &keys),
        Err(Refusal::BadSignature)
    );
    assert_eq!(
        check(&with_sig(&[0; 256]), &keys),
        Err(Refusal::BadSignature)
    );
    // The signature as a number not below the modulus: ring refuses it, not a panic.
    assert_eq!(
        check(&with_sig(&[0xff; 256]), &keys),
        Err(Refusal::BadSignature)
    );
}

/// A copy of `jwk` with its `n` replaced.
fn with_n(jwk: &Value, n: &[u8]) -> Value {
    let mut j = jwk.clone();
    j["n"] = json!(b64(n));
    j
}

#[test]
fn rsa_key_sizes_and_members() {
    let pair = rsa_pair(RSA2048);
    let jwk = rsa_jwk(&pair, "r1", None);
    let n = b64url().decode(jwk["n"].as_str().unwrap()).unwrap();
    assert_eq!((n.len(), n[0] >= 0x80), (256, true));
    // Leading zero bytes do not count: the key is still 2048 bits and verifies.
    let mut zeros = vec![0, 0];
    zeros.extend_from_slice(&n);
    let keys = set_of(&[with_n(&jwk, &zeros)]);
    assert_eq!(keys.get("r1").and_then(PublicKey::rsa_bits), Some(2048));
    assert_eq!(keys.get("r1").unwrap().signature_len(), 256);
    let token = rsa_token(&pair, Alg::RS256, &hdr_of(Alg::RS256, "r1"), &claims_json());
    assert!(check(&token, &keys).is_ok());
    // Bits, not bytes: 256 bytes whose top bit is clear are a 2047-bit modulus.
    let mut short = n.clone();
    short[0] = 0x7f;
    let size = |n: &[u8]| skipped_one(&jwks(&[with_n(&jwk, n)])).problem;
    assert_eq!(size(&short), KeyProblem::RsaKeySize { bits: 2047 });
    short[0] = 0x01;
    assert_eq!(size(&short), KeyProblem::RsaKeySize { bits: 2041 });
    let mut zero_then_short = vec![0];
    zero_then_short.extend_from_slice(&short);
    assert_eq!(
        size(&zero_then_short),
        KeyProblem::RsaKeySize { bits: 2041 }
    );
    assert_eq!(size(&[0xff; 1025]), KeyProblem::RsaKeySize { bits: 8200 });
    assert_eq!(size(&[0; 300]), KeyProblem::RsaKeySize { bits: 0 });
    assert_eq!(
        skipped_one(&jwks(&[with_n(&jwk, &[0x80; 128])])).reason,
        SkipReason::RsaKeySize
    );
    // Exactly 8192 bits is accepted (a shape test: not a real modulus).
    let mut top = vec![0x80];
    top.extend_from_slice(&[0x11; 1023]);
    assert_eq!(
        set_of(&[with_n(&jwk, &top)])
            .get("r1")
            .and_then(PublicKey::rsa_bits),
        Some(8192)
    );
    // The exponent: odd, from 3 up to 2^33 - 1.
    for e in [
        &[1u8][..],
        &[2],
        &[0],
        &[1, 0, 0],
        &[2, 0, 0, 0, 1],
        &[1, 0, 0, 0, 0, 1],
    ] {
        let mut j = jwk.clone();
        j["e"] = json!(b64(e));
        assert_eq!(
            skipped_one(&jwks(&[j])).reason,
            SkipReason::BadKey,
            "e = {e:?}"
        );
    }
    let mut j = jwk.clone();
    j["e"] = json!(b64(&[0, 3]));
    assert_eq!(set_of(&[j]).len(), 1);
    for (member, edit) in [("n", json!(7)), ("e", json!("AQAB="))] {
        let mut j = jwk.clone();
        j[member] = edit;
        assert_eq!(
            skipped_one(&jwks(&[j])).reason,
            SkipReason::BadKey,
            "{member}"
        );
    }
    let mut j = jwk.clone();
    j.as_object_mut().unwrap().remove("n");
    assert_eq!(
        skipped_one(&jwks(&[j])).problem,
        KeyProblem::BadMember {
            member: "n",
            why: "is missing".into()
        }
    );
    // An RSA key claiming an EC algorithm.
    let mut j = jwk.clone();
    j["alg"] = json!("ES256");
    assert_eq!(
        skipped_one(&jwks(&[j])).problem,
        KeyProblem::Contradiction {
            alg: Alg::ES256,
            kty: "RSA".into(),
            crv: None
        }
    );
}

fn testdata(name: &str) -> String {
    let path = format!("{}/src/token/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_owned()
}

/// Keys and tokens OpenSSL made (testdata/gen.sh): an implementation other than ring's signer.
#[test]
fn rsa_tokens_from_openssl() {
    // 1024 bits: the key is skipped, a token naming it refused as key_unusable (no refetch).
    let small = testdata("rsa1024-rs256.jwk.json");
    let pair = rsa_pair(RSA2048);
    let keys = KeySet::from_jwks(&jwks(&[
        serde_json::from_str(&small).unwrap(),
        rsa_jwk(&pair, "r1", None),
    ]))
    .unwrap();
    assert_eq!(keys.kids(), ["r1"]);
    let s = &keys.skipped()[0];
    assert_eq!(
        (s.index, s.kid.as_deref(), s.reason, &s.problem),
        (
            0,
            Some("rsa1024-rs256"),
            SkipReason::RsaKeySize,
            &KeyProblem::RsaKeySize { bits: 1024 }
        )
    );
    assert!(keys.is_skipped_kid("rsa1024-rs256"));
    let token = testdata("rsa1024-rs256.jwt");
    assert_eq!(check(&token, &keys), Err(Refusal::KeyUnusable));
    assert_eq!(check(&token, &KeySet::default()), Err(Refusal::UnknownKid));
    // 8192 bits: accepted.
    let big = KeySet::from_jwks(&format!(
        "{{\"keys\":[{}]}}",
        testdata("rsa8192-rs256.jwk.json")
    ))
    .unwrap();
    assert_eq!(
        big.get("rsa8192-rs256").and_then(PublicKey::rsa_bits),
        Some(8192)
    );
    let c = check(&testdata("rsa8192-rs256.jwt"), &big).unwrap();
    assert_eq!((c.alg, c.jti.as_str()), (Alg::RS256, "t-1"));
    // PS256 from OpenSSL, once the JWK says PS256.
    let mut ps: Value = serde_json::from_str(&testdata("rsa2048-ps256.jwk.json")).unwrap();
    let token = testdata("rsa2048-ps256.jwt");
    assert_eq!(
        check(&token, &set_of(&[ps.clone()])),
        Err(Refusal::AlgMismatch)
    );
    ps["alg"] = json!("PS256");
    let c = check(&token, &set_of(&[ps])).unwrap();
    assert_eq!((c.alg, c.roles.len()), (Alg::PS256, 2));
}

/// The classic confusion: an HMAC token keyed with the RSA public key, as a library that
/// takes "the key" for any algorithm would check it. Refused by name, whatever the key.
#[test]
fn hmac_keyed_with_the_rsa_public_key() {
    let pair = rsa_pair(RSA2048);
    let jwk = rsa_jwk(&pair, "r1", Some(Alg::RS256));
    let keys = set_of(std::slice::from_ref(&jwk));
    let p = b64(claims_json().to_string().as_bytes());
    // The secrets an attacker would try: the modulus, the DER public key, the JWK text.
    let der = pair.public().as_ref().to_vec();
    let secrets: [Vec<u8>; 3] = [
        keys.get("r1").unwrap().key_bytes().to_vec(),
        der,
        jwk.to_string().into_bytes(),
    ];
    for (name, alg) in [
        ("HS256", ring::hmac::HMAC_SHA256),
        ("HS384", ring::hmac::HMAC_SHA384),
        ("HS512", ring::hmac::HMAC_SHA512),
        ("hs256", ring::hmac::HMAC_SHA256),
    ] {
        for secret in &secrets {
            let h = b64(json!({"alg": name, "kid": "r1"}).to_string().as_bytes());
            let tag = ring::hmac::sign(
                &ring::hmac::Key::new(alg, secret),
                format!("{h}.{p}").as_bytes(),
            );
            let token = format!("{h}.{p}.{}", b64(tag.as_ref()));
            assert_eq!(check(&token, &keys), Err(Refusal::AlgHmac), "{name}");
            assert_eq!(peek(&token, 4096), Err(Refusal::AlgHmac), "{name}");
        }
    }
    // `none` too, and an RSA JWK pinned to HS256 is not a key.
    let none = format!("{}.{p}.", b64(br#"{"alg":"none","kid":"r1"}"#));
    assert_eq!(check(&none, &keys), Err(Refusal::AlgNone));
    let mut hs = jwk.clone();
    hs["alg"] = json!("HS256");
    assert_eq!(
        skipped_one(&jwks(&[hs])).problem,
        KeyProblem::UnsupportedAlg("HS256".into())
    );
}

#[test]
fn es384_round_trip() {
    use ring::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 97);
    let jwk = json!({"kty": "EC", "crv": "P-384", "kid": "p384",
        "x": b64(&point[1..49]), "y": b64(&point[49..97])});
    let sign = |header: &Value| {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims_json().to_string().as_bytes())
        );
        let sig = pair.sign(&rng, signed.as_bytes()).unwrap();
        assert_eq!(sig.as_ref().len(), 96);
        format!("{signed}.{}", b64(sig.as_ref()))
    };
    // No alg: P-384 admits ES384 only; with alg ES384 the same.
    for jwk in [jwk.clone(), {
        let mut j = jwk.clone();
        j["alg"] = json!("ES384");
        j
    }] {
        let keys = set_of(&[jwk]);
        assert_eq!(
            keys.get("p384").map(|k| (k.alg, k.signature_len())),
            Some((Alg::ES384, 96))
        );
        let good = sign(&hdr_of(Alg::ES384, "p384"));
        assert_eq!(check(&good, &keys).map(|c| c.alg), Ok(Alg::ES384));
        assert_eq!(
            check(&sign(&hdr_of(Alg::ES256, "p384")), &keys),
            Err(Refusal::AlgMismatch)
        );
        let (h, p, s) = parts(&good);
        let sig = b64url().decode(&s).unwrap();
        assert_eq!(
            check(&format!("{h}.{p}.{}", b64(&sig[..64])), &keys),
            Err(Refusal::TruncatedSignature)
        );
        let mut flipped = sig.clone();
        flipped[50] ^= 1;
        assert_eq!(
            check(&format!("{h}.{p}.{}", b64(&flipped)), &keys),
            Err(Refusal::BadSignature)
        );
    }
    // Coordinates of P-256 length on a P-384 key.
    let mut short = jwk.clone();
    short["x"] = json!(b64(&[1; 32]));
    assert_eq!(
        skipped_one(&jwks(&[short])).problem,
        KeyProblem::BadLength {
            member: "x",
            found: 32,
            expected: 48
        }
    );
    // A P-521 key: a curve tollgate does not verify.
    let mut p521 = jwk.clone();
    p521["crv"] = json!("P-521");
    assert_eq!(
        skipped_one(&jwks(&[p521])).reason,
        SkipReason::UnsupportedAlg
    );
}

/// (provider, JWKS, the signing kid, the kids skipped with their reasons).
type IdpDocument = (
    &'static str,
    String,
    &'static str,
    Vec<(&'static str, SkipReason)>,
);

/// What identity providers publish, reshaped around this test's key (members, order and
/// oddities as their JWKS endpoints serve them; base64 certificate members are stand-ins:
/// tollgate ignores `x5c`/`x5t`).
fn idp_documents(n: &str, e: &str) -> Vec<IdpDocument> {
    let x5c = "MIICmzCCAYMCBgGQ...stand-in...";
    vec![
        (
            // Keycloak /realms/<realm>/protocol/openid-connect/certs: an RSA-OAEP encryption
            // key beside the RS256 signing key, both with certificates.
            "keycloak",
            json!({"keys": [
                {"kid": "Wb9Jm7kc-enc", "kty": "RSA", "alg": "RSA-OAEP", "use": "enc",
                 "n": n, "e": e, "x5c": [x5c], "x5t": "aBcD", "x5t#S256": "eFgH"},
                {"kid": "kc-sig-1", "kty": "RSA", "alg": "RS256", "use": "sig",
                 "n": n, "e": e, "x5c": [x5c], "x5t": "iJkL", "x5t#S256": "mNoP"},
            ]})
            .to_string(),
            "kc-sig-1",
            vec![("Wb9Jm7kc-enc", SkipReason::EncryptionKey)],
        ),
        (
            // Okta /oauth2/default/v1/keys: RS256 keys, the next one already published.
            "okta",
            json!({"keys": [
                {"kty": "RSA", "alg": "RS256", "kid": "okta-current", "use": "sig", "e": e, "n": n},
                {"kty": "RSA", "alg": "RS256", "kid": "okta-next", "use": "sig", "e": e, "n": n},
            ]})
            .to_string(),
            "okta-current",
            vec![],
        ),
        (
            // Entra ID /discovery/v2.0/keys: no `alg` on its RSA keys, an `issuer` member per
            // key (with the tenant placeholder), certificates.
            "entra",
            json!({"keys": [
                {"kty": "RSA", "use": "sig", "kid": "entra-1", "x5t": "entra-1", "n": n, "e": e,
                 "x5c": [x5c], "cloud_instance_name": "microsoftonline.com",
                 "issuer": "https://login.microsoftonline.com/{tenantid}/v2.0"},
            ]})
            .to_string(),
            "entra-1",
            vec![],
        ),
        (
            // Google https://www.googleapis.com/oauth2/v3/certs: members in its order.
            "google",
            json!({"keys": [
                {"e": e, "use": "sig", "kty": "RSA", "alg": "RS256", "n": n, "kid": "g-1"},
            ]})
            .to_string(),
            "g-1",
            vec![],
        ),
        (
            // Dex /keys: the signing key and the previous one, kept for verification.
            "dex",
            json!({"keys": [
                {"use": "sig", "kty": "RSA", "kid": "dex-now", "alg": "RS256", "n": n, "e": e},
                {"use": "sig", "kty": "RSA", "kid": "dex-before", "alg": "RS256", "n": n, "e": e},
            ]})
            .to_string(),
            "dex-now",
            vec![],
        ),
        (
            // Auth0 /.well-known/jwks.json: certificates and thumbprints on every key.
            "auth0",
            json!({"keys": [
                {"kty": "RSA", "use": "sig", "n": n, "e": e, "kid": "a0-1", "x5t": "a0-1",
                 "x5c": [x5c], "alg": "RS256"},
                {"kty": "RSA", "use": "sig", "n": n, "e": e, "kid": "a0-2", "x5t": "a0-2",
                 "x5c": [x5c], "alg": "RS256"},
            ]})
            .to_string(),
            "a0-1",
            vec![],
        ),
        (
            // A mixed document: what one unsupported key used to cost everything beside it.
            "mixed",
            json!({"keys": [
                {"kty": "RSA", "kid": "tiny", "alg": "RS256", "n": b64(&[0xc1; 128]), "e": e},
                {"kty": "EC", "kid": "p521", "crv": "P-521", "alg": "ES512", "x": "AA", "y": "AA"},
                {"kty": "oct", "kid": "sym", "alg": "HS256", "k": "c2VjcmV0"},
                {"kty": "OKP", "kid": "x25519", "crv": "X25519", "x": b64(&[9; 32])},
                {"kty": "RSA", "kid": "ops", "alg": "RS256", "n": n, "e": e, "key_ops": ["encrypt"]},
                {"kty": "AKP", "kid": "pq", "alg": "ML-DSA-44", "pub": "AA"},
                {"kty": "RSA", "kid": "ok", "alg": "RS256", "n": n, "e": e},
            ]})
            .to_string(),
            "ok",
            vec![
                ("tiny", SkipReason::RsaKeySize),
                ("p521", SkipReason::UnsupportedAlg),
                ("sym", SkipReason::PrivateMember),
                ("x25519", SkipReason::UnsupportedAlg),
                ("ops", SkipReason::KeyOps),
                ("pq", SkipReason::UnknownKty),
            ],
        ),
    ]
}

#[test]
fn identity_providers_jwks() {
    let pair = rsa_pair(RSA2048);
    let jwk = rsa_jwk(&pair, "x", None);
    let (n, e) = (jwk["n"].as_str().unwrap(), jwk["e"].as_str().unwrap());
    for (idp, doc, kid, skips) in idp_documents(n, e) {
        let keys = KeySet::from_jwks(&doc).unwrap_or_else(|e| panic!("{idp}: {e}"));
        assert!(keys.get(kid).is_some(), "{idp}: {:?}", keys.skipped());
        let got: Vec<(Option<&str>, SkipReason)> = keys
            .skipped()
            .iter()
            .map(|s| (s.kid.as_deref(), s.reason))
            .collect();
        let want: Vec<(Option<&str>, SkipReason)> =
            skips.iter().map(|(k, r)| (Some(*k), *r)).collect();
        assert_eq!(got, want, "{idp}");
        let token = rsa_token(&pair, Alg::RS256, &hdr_of(Alg::RS256, kid), &claims_json());
        assert_eq!(
            check(&token, &keys).map(|c| c.kid),
            Ok(kid.to_owned()),
            "{idp}"
        );
        for (skipped, _) in &skips {
            let t = rsa_token(
                &pair,
                Alg::RS256,
                &hdr_of(Alg::RS256, skipped),
                &claims_json(),
            );
            assert_eq!(
                check(&t, &keys),
                Err(Refusal::KeyUnusable),
                "{idp} {skipped}"
            );
        }
        let t = rsa_token(
            &pair,
            Alg::RS256,
            &hdr_of(Alg::RS256, "rotated-away"),
            &claims_json(),
        );
        assert_eq!(check(&t, &keys), Err(Refusal::UnknownKid), "{idp}");
    }
}

#[test]
fn peek_names_the_issuer_and_key() {
    let f = fixture();
    let token = with_claims(&f.ec, |c| {
        c.insert("iss".into(), json!("https://idp.example.com/realms/a"));
    });
    assert_eq!(
        peek(&token, 4096),
        Ok(Peek {
            alg: Alg::ES256,
            kid: "ec1".into(),
            iss: Some("https://idp.example.com/realms/a".into())
        })
    );
    // Unauthenticated: a kid nobody holds, a bad signature, a wrong-typed iss all peek fine.
    let (h, p, _) = parts(&token);
    let forged = format!("{h}.{p}.AAAA");
    assert_eq!(peek(&forged, 4096).map(|p| p.kid), Ok("ec1".into()));
    let odd_iss = with_claims(&f.ed, |c| {
        c.insert("iss".into(), json!(["a"]));
    });
    assert_eq!(peek(&odd_iss, 4096).map(|p| p.iss), Ok(None));
    assert_eq!(check(&odd_iss, &f.keys), Err(Refusal::BadClaim));
    assert_eq!(peek(&token, token.len() - 1), Err(Refusal::Oversized));
    assert_eq!(peek("a.b", 4096), Err(Refusal::Malformed));
}

/// A policy with an issuer, two audiences and a Keycloak-style mapping.
fn issuer_policy() -> Policy {
    let path = |p: &str| ClaimPath::parse(p).unwrap();
    Policy {
        issuer: Some("https://idp.example.com/realms/tollgate".into()),
        audiences: vec!["pool-a".into(), "pool-b".into()],
        mapping: Mapping {
            token_id: ClaimPath::parse_token_id("jti").unwrap(),
            derive_token_id: false,
            identity: path("azp"),
            roles: RolesRule {
                path: path("realm_access.roles"),
                format: RolesFormat::Array,
                required: true,
            },
            class: ValueRule {
                path: path("resource_access.tollgate.roles"),
                values: vec![
                    ("internal".into(), "interactive".into()),
                    ("partner".into(), "batch".into()),
                ],
                default: None,
                unmapped: Unmapped::Refuse,
                required: true,
            },
            plan: ValueRule {
                path: path("groups"),
                values: vec![
                    ("gold".into(), "gold".into()),
                    ("silver".into(), "silver".into()),
                ],
                default: Some("free".into()),
                unmapped: Unmapped::UseDefault,
                required: true,
            },
        },
        ..policy()
    }
}

fn idp_claims() -> Value {
    json!({
        "jti": "kc-1",
        "iss": "https://idp.example.com/realms/tollgate",
        "aud": ["account", "pool-b"],
        "azp": "svc-reports",
        "sub": "0b9f4c1e",
        "iat": NOW - 10,
        "exp": NOW + 290,
        "realm_access": {"roles": ["offline_access", "reader"]},
        "resource_access": {"tollgate": {"roles": ["partner", "internal"]}},
        "groups": ["staff", "silver", "gold"],
        "scope": "openid bind:write  bind:read",
    })
}

type Edit = dyn Fn(&mut serde_json::Map<String, Value>);

#[test]
fn issuer_and_mapping() {
    let f = fixture();
    let pol = issuer_policy();
    let run = |edit: &dyn Fn(&mut serde_json::Map<String, Value>), pol: &Policy| {
        let mut c = idp_claims();
        edit(c.as_object_mut().unwrap());
        verify(&forge(&f.ed, &header(&f.ed), &c), &f.keys, pol, NOW)
    };
    let c = run(&|_| {}, &pol).unwrap();
    assert_eq!(c.identity, "svc-reports");
    assert_eq!(c.roles, ["offline_access", "reader"]);
    // Config order decides, not the token's: "internal" is configured first.
    assert_eq!(c.class.as_deref(), Some("interactive"));
    assert_eq!(c.plan.as_deref(), Some("gold"));
    assert_eq!(
        c.issuer.as_deref(),
        Some("https://idp.example.com/realms/tollgate")
    );

    let set = |k: &'static str, v: Value| {
        move |c: &mut serde_json::Map<String, Value>| {
            c.insert(k.into(), v.clone());
        }
    };
    let del = |k: &'static str| {
        move |c: &mut serde_json::Map<String, Value>| {
            c.remove(k);
        }
    };
    let cases: Vec<(&str, Box<Edit>, Result<(), Refusal>)> = vec![
        (
            "iss absent",
            Box::new(del("iss")),
            Err(Refusal::WrongIssuer),
        ),
        (
            "iss with a trailing slash",
            Box::new(set(
                "iss",
                json!("https://idp.example.com/realms/tollgate/"),
            )),
            Err(Refusal::WrongIssuer),
        ),
        (
            "iss in another case",
            Box::new(set("iss", json!("https://IDP.example.com/realms/tollgate"))),
            Err(Refusal::WrongIssuer),
        ),
        (
            "iss of another realm",
            Box::new(set("iss", json!("https://idp.example.com/realms/other"))),
            Err(Refusal::WrongIssuer),
        ),
        (
            "iss a number",
            Box::new(set("iss", json!(1))),
            Err(Refusal::BadClaim),
        ),
        (
            "aud pool-a alone",
            Box::new(set("aud", json!("pool-a"))),
            Ok(()),
        ),
        (
            "aud of another pool",
            Box::new(set("aud", json!("pool-c"))),
            Err(Refusal::WrongAudience),
        ),
        (
            "identity absent",
            Box::new(del("azp")),
            Err(Refusal::MissingIdentity),
        ),
        (
            "roles path absent",
            Box::new(del("realm_access")),
            Err(Refusal::MissingRoles),
        ),
        (
            "roles path through a string",
            Box::new(set("realm_access", json!("roles"))),
            Err(Refusal::MissingRoles),
        ),
        (
            "roles not an array",
            Box::new(set("realm_access", json!({"roles": "reader"}))),
            Err(Refusal::BadClaim),
        ),
        (
            "class claim absent",
            Box::new(del("resource_access")),
            Err(Refusal::MissingClaim),
        ),
        (
            "class value unknown",
            Box::new(set(
                "resource_access",
                json!({"tollgate": {"roles": ["customer"]}}),
            )),
            Err(Refusal::UnmappedValue),
        ),
        (
            "class array holding a number",
            Box::new(set(
                "resource_access",
                json!({"tollgate": {"roles": ["partner", 7]}}),
            )),
            Err(Refusal::BadClaim),
        ),
        (
            "class a single string, mapped",
            Box::new(set(
                "resource_access",
                json!({"tollgate": {"roles": "partner"}}),
            )),
            Ok(()),
        ),
        ("plan absent: the default", Box::new(del("groups")), Ok(())),
        (
            "plan unmapped: the default",
            Box::new(set("groups", json!(["bronze"]))),
            Ok(()),
        ),
        (
            "plan an object",
            Box::new(set("groups", json!({"gold": true}))),
            Err(Refusal::BadClaim),
        ),
        // Order: types (step 9) before time, mapping (13) after issuer and audience.
        (
            "expired with a mistyped plan: the type first",
            Box::new(|c: &mut serde_json::Map<String, Value>| {
                c.insert("groups".into(), json!(1));
                c.insert("exp".into(), json!(NOW - 100));
                c.insert("iat".into(), json!(NOW - 200));
            }),
            Err(Refusal::BadClaim),
        ),
        (
            "expired with a missing class: time first",
            Box::new(|c: &mut serde_json::Map<String, Value>| {
                c.remove("resource_access");
                c.insert("exp".into(), json!(NOW - 100));
                c.insert("iat".into(), json!(NOW - 200));
            }),
            Err(Refusal::Expired),
        ),
        (
            "wrong issuer and wrong audience: issuer first",
            Box::new(|c: &mut serde_json::Map<String, Value>| {
                c.insert("iss".into(), json!("https://evil.example.com"));
                c.insert("aud".into(), json!("pool-c"));
            }),
            Err(Refusal::WrongIssuer),
        ),
        (
            "wrong audience and unmapped class: audience first",
            Box::new(|c: &mut serde_json::Map<String, Value>| {
                c.insert("aud".into(), json!("pool-c"));
                c.remove("resource_access");
            }),
            Err(Refusal::WrongAudience),
        ),
        (
            "missing roles and missing class: roles first",
            Box::new(|c: &mut serde_json::Map<String, Value>| {
                c.remove("realm_access");
                c.remove("resource_access");
            }),
            Err(Refusal::MissingRoles),
        ),
    ];
    let mut seen = std::collections::HashSet::new();
    for (what, edit, want) in &cases {
        assert_eq!(run(&**edit, &pol).map(|_| ()), *want, "{what}");
        if let Err(r) = want {
            seen.insert(*r);
        }
    }
    for r in AFTER_LEGACY {
        assert!(
            seen.contains(r) || [Refusal::KeysUnavailable, Refusal::Revoked].contains(r),
            "no case for {}",
            r.label()
        );
    }
    let plan = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| run(edit, &pol).unwrap().plan;
    assert_eq!(plan(&del("groups")).as_deref(), Some("free"));
    assert_eq!(
        plan(&set("groups", json!(["bronze"]))).as_deref(),
        Some("free")
    );
    assert_eq!(
        plan(&set("groups", json!("silver"))).as_deref(),
        Some("silver")
    );
    assert_eq!(plan(&set("groups", json!([]))).as_deref(), Some("free"));

    // No issuer configured (the legacy section): iss is not checked, even when present.
    let open = Policy {
        issuer: None,
        ..issuer_policy()
    };
    assert!(run(&set("iss", json!("https://anyone.example.com")), &open).is_ok());
    // No audience configured refuses everything.
    let none = Policy {
        audiences: vec![],
        ..issuer_policy()
    };
    assert_eq!(run(&|_| {}, &none).map(|_| ()), Err(Refusal::WrongAudience));

    // Scope-formatted roles, optional; an unmapped value refused when not defaulted.
    let mut scoped = issuer_policy();
    scoped.mapping.roles = RolesRule {
        path: ClaimPath::parse("scope").unwrap(),
        format: RolesFormat::Scope,
        required: false,
    };
    scoped.mapping.plan.unmapped = Unmapped::Refuse;
    assert_eq!(
        run(&|_| {}, &scoped).unwrap().roles,
        ["openid", "bind:write", "bind:read"]
    );
    assert_eq!(
        run(&del("scope"), &scoped).unwrap().roles,
        Vec::<String>::new()
    );
    assert_eq!(
        run(&set("scope", json!(["openid"])), &scoped).map(|_| ()),
        Err(Refusal::BadClaim)
    );
    assert_eq!(
        run(&set("groups", json!(["bronze"])), &scoped).map(|_| ()),
        Err(Refusal::UnmappedValue)
    );
    // Absent, with a default and Refuse: the default (absent is not unmapped).
    assert_eq!(
        run(&del("groups"), &scoped).unwrap().plan.as_deref(),
        Some("free")
    );
    // Not required and no default: absent leaves it unset.
    scoped.mapping.class.required = false;
    assert_eq!(run(&del("resource_access"), &scoped).unwrap().class, None);
}

#[test]
fn claim_paths() {
    let segs = |p: &str| ClaimPath::parse(p).map(|c| c.segments().to_vec());
    assert_eq!(segs("sub"), Ok(vec!["sub".to_string()]));
    assert_eq!(
        segs("resource_access.my-client.roles"),
        Ok(vec![
            "resource_access".into(),
            "my-client".into(),
            "roles".into()
        ])
    );
    assert_eq!(
        segs("\"https://example.com/roles\""),
        Ok(vec!["https://example.com/roles".to_string()])
    );
    assert_eq!(
        segs("ext.\"a.b\".c"),
        Ok(vec!["ext".into(), "a.b".into(), "c".into()])
    );
    for bad in ["", ".", "a.", ".a", "a..b", "\"\"", "a.\"\""] {
        assert!(
            matches!(
                ClaimPath::parse(bad),
                Err(MappingError::Empty | MappingError::EmptySegment(_))
            ),
            "{bad:?}: {:?}",
            ClaimPath::parse(bad)
        );
    }
    for bad in ["\"a", "a\"b", "\"a\"b", "\"a\".\"b"] {
        assert_eq!(
            ClaimPath::parse(bad),
            Err(MappingError::Quote(bad.into())),
            "{bad}"
        );
    }
    for reg in ["exp", "iat", "nbf", "jti", "aud", "iss", "exp.x"] {
        assert!(
            matches!(ClaimPath::parse(reg), Err(MappingError::Registered { .. })),
            "{reg}"
        );
    }
    assert!(ClaimPath::parse("x.exp").is_ok());
    let text = ClaimPath::parse("exp").unwrap_err().to_string();
    assert!(text.contains("registered claim"), "{text}");
    for p in ["a.b", "\"https://x.example/r\".y", "realm_access.roles"] {
        let c = ClaimPath::parse(p).unwrap();
        assert_eq!(ClaimPath::parse(&c.to_string()), Ok(c.clone()), "{p}");
    }
    // Lookup: nested objects only; a step through anything else is absent.
    let claims = json!({"a": {"b": {"c": 1}}, "s": "x", "l": [{"b": 1}], "d.e": 2});
    let m = claims.as_object().unwrap();
    let at = |p: &str| ClaimPath::parse(p).unwrap().lookup(m).cloned();
    assert_eq!(at("a.b.c"), Some(json!(1)));
    assert_eq!(at("a.b"), Some(json!({"c": 1})));
    assert_eq!(at("a.x"), None);
    assert_eq!(at("s.b"), None);
    assert_eq!(at("l.b"), None);
    assert_eq!(at("l.0"), None);
    assert_eq!(at("d.e"), None);
    assert_eq!(at("\"d.e\""), Some(json!(2)));
    assert_eq!(ClaimPath::member("d.e").lookup(m), Some(&json!(2)));

    // Mapping::check: the configuration-time problems.
    let mut bad = issuer_policy().mapping;
    assert_eq!(bad.check(), Ok(()));
    bad.plan.default = None;
    assert_eq!(bad.check(), Err(MappingError::NoDefault { rule: "plan" }));
    let mut bad = issuer_policy().mapping;
    bad.class
        .values
        .push(("partner".into(), "interactive".into()));
    assert_eq!(
        bad.check(),
        Err(MappingError::DuplicateValue {
            rule: "class",
            value: "partner".into()
        })
    );
    // The legacy mapping is today's: the default names, optional class and plan.
    let legacy = Mapping::legacy(&ClaimNames::default(), Some("batch".into()), None);
    assert_eq!(legacy.identity, ClaimPath::member("sub"));
    assert_eq!(legacy.class.default.as_deref(), Some("batch"));
    assert!(!legacy.class.required && !legacy.plan.required && !legacy.roles.required);
    assert_eq!(
        Mapping::default(),
        Mapping::legacy(&ClaimNames::default(), None, None)
    );
}

/// P-256's group order n, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// `n - s` for a 32-byte big-endian `s < n`.
fn p256_negate(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    assert_eq!(borrow, 0, "s < n");
    out
}

/// Entra ID's `uti`, Dex's id-less tokens: the token-id claim is configurable, and an absent
/// one can be derived from the signed bytes.
#[test]
fn token_id_claim_and_derived_id() {
    let f = fixture();
    let with = |token_id: &str, derive: bool| Policy {
        mapping: Mapping {
            token_id: ClaimPath::parse_token_id(token_id).unwrap(),
            derive_token_id: derive,
            ..Mapping::default()
        },
        ..policy()
    };
    let no_jti = |key: &SigningKey, edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        with_claims(key, |c| {
            c.remove("jti");
            edit(c);
        })
    };
    // The legacy mapping: jti, nothing derived (today's behaviour).
    let legacy = Mapping::legacy(&ClaimNames::default(), None, None);
    assert_eq!(legacy.token_id, ClaimPath::member("jti"));
    assert!(!legacy.derive_token_id);
    let entra = no_jti(&f.ed, &|c| {
        c.insert("uti".into(), json!("AbCdEf0123"));
    });
    assert_eq!(check(&entra, &f.keys), Err(Refusal::MissingJti));
    // token_id = "uti": the id is uti's; jti, if present too, is not looked at.
    let uti = with("uti", false);
    assert_eq!(
        verify(&entra, &f.keys, &uti, NOW).map(|c| c.jti),
        Ok("AbCdEf0123".into())
    );
    let both = with_claims(&f.ed, |c| {
        c.insert("uti".into(), json!("u-2"));
    });
    assert_eq!(
        verify(&both, &f.keys, &uti, NOW).map(|c| c.jti),
        Ok("u-2".into())
    );
    // Wrong type → bad_claim (derivation or not: a present id is never replaced).
    for derive in [false, true] {
        let bad = no_jti(&f.ed, &|c| {
            c.insert("uti".into(), json!(17));
        });
        assert_eq!(
            verify(&bad, &f.keys, &with("uti", derive), NOW),
            Err(Refusal::BadClaim)
        );
    }
    // Absent, or empty, without derivation → missing_jti.
    let dex = no_jti(&f.ed, &|_| {});
    assert_eq!(
        verify(&dex, &f.keys, &with("uti", false), NOW),
        Err(Refusal::MissingJti)
    );
    let empty = with_claims(&f.ed, |c| {
        c.insert("jti".into(), json!(""));
    });
    assert_eq!(check(&empty, &f.keys), Err(Refusal::MissingJti));
    // jti is a registered claim: only the token-id path may name it.
    assert!(ClaimPath::parse("jti").is_err());
    // Derived: sha256: + 22 base64url characters (16 bytes), over the signed bytes.
    let derive = with("jti", true);
    let id = verify(&dex, &f.keys, &derive, NOW).unwrap().jti;
    let (h, p, _) = parts(&dex);
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{h}.{p}").as_bytes());
    assert_eq!(id, format!("sha256:{}", b64(&digest.as_ref()[..16])));
    assert_eq!(id.len(), "sha256:".len() + 22);
    assert_eq!(derived_token_id(format!("{h}.{p}").as_bytes()), id);
    // Stable for the same token, different for another (here: the same claims, one second
    // later; and an empty jti is derived too).
    assert_eq!(verify(&dex, &f.keys, &derive, NOW).unwrap().jti, id);
    let later = no_jti(&f.ed, &|c| {
        c.insert("iat".into(), json!(NOW - 9));
    });
    let other = verify(&later, &f.keys, &derive, NOW).unwrap().jti;
    assert!(other.starts_with(DERIVED_TOKEN_ID_PREFIX));
    assert_ne!(other, id);
    let derived_empty = verify(&empty, &f.keys, &derive, NOW).unwrap().jti;
    assert!(derived_empty.starts_with("sha256:"), "{derived_empty}");
    // A present jti is the id even with derivation on.
    let good = with_claims(&f.ed, |_| {});
    assert_eq!(verify(&good, &f.keys, &derive, NOW).unwrap().jti, "t-1");

    // ECDSA malleability: (r, n - s) is a second valid signature of the same token. If the
    // verifier accepts it, the derived id must still be the same, because it hashes the
    // signed bytes, not the signature; hashed from the signature, a thief could present the
    // malleated token as a "new" one and dodge replay detection and revocation.
    let ec_token = no_jti(&f.ec, &|_| {});
    let (h, p, sig) = parts(&ec_token);
    let sig = b64url().decode(sig).unwrap();
    let mut malleated = sig[..32].to_vec();
    malleated.extend(p256_negate(&sig[32..]));
    assert_ne!(malleated, sig);
    let twin = format!("{h}.{p}.{}", b64(&malleated));
    let ec_id = verify(&ec_token, &f.keys, &derive, NOW).unwrap().jti;
    match verify(&twin, &f.keys, &derive, NOW) {
        // ring (0.17) accepts the high-s twin: it verifies, and gets the same id.
        Ok(c) => assert_eq!(c.jti, ec_id, "a malleated signature must not make a new id"),
        // Were ring ever to enforce low-s, the twin would not verify at all: equally safe.
        Err(r) => assert_eq!(r, Refusal::BadSignature),
    }
    assert!(
        verify(&twin, &f.keys, &derive, NOW).is_ok(),
        "ring 0.17 accepts (r, n - s); if this changes, the match above still holds, update          this line"
    );
}
