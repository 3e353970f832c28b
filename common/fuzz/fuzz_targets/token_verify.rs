//! `verify` must never panic, whatever it is given, and must never accept a token that breaks
//! its own rules. Each input is tried twice:
//!
//! - as the token itself (lossy UTF-8), against a fixed key set: this reaches everything up
//!   to the signature check;
//! - split at the first `\n` into header and payload JSON (no `\n`: a fixed good header and
//!   the whole input as payload), signed with a key of the set: this reaches the claim
//!   checks behind the signature, which random bytes never would.
//!
//! `peek` must refuse exactly as `verify` does where it refuses, and agree with what a
//! verified token says.
//!
//! The keys below are test keys, public in this repository: never use them anywhere else.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tollgate_common::token::{KeySet, Mapping, Policy, SigningKey, peek, verify};

const NOW: u64 = 1_800_000_000;

const ED_KEY: &str = r#"{"kid": "fuzz-ed", "alg": "EdDSA", "pkcs8": "MFECAQEwBQYDK2VwBCIEIH7SOsSMIpjLdJ8mC29BeANQh/cJHbo/vV6BUrAE4EbngSEAYMyj6vIFMJeC47p/8I64lQYdgO6FGjXRKUVBGbR/DpM="}"#;

const JWKS: &str = r#"{"keys": [
  {"alg":"EdDSA","crv":"Ed25519","kid":"fuzz-ed","kty":"OKP","use":"sig","x":"YMyj6vIFMJeC47p_8I64lQYdgO6FGjXRKUVBGbR_DpM"},
  {"alg":"ES256","crv":"P-256","kid":"fuzz-ec","kty":"EC","use":"sig","x":"bCQ1cqY9e00GAUtYYrrtTjmJ5dfL6jfkv_4MRkQEpG4","y":"_dYjJu7aBPPIU4YDnMkUaHwbiI4LUfvnwwPrs6At6oY"},
  {"alg":"EdDSA","crv":"Ed25519","kid":"fuzz-old","kty":"OKP","x":"YMyj6vIFMJeC47p_8I64lQYdgO6FGjXRKUVBGbR_DpM","nbf":1700000000,"exp":1799990000}
]}"#;

const HEADER: &[u8] = br#"{"alg":"EdDSA","kid":"fuzz-ed","typ":"JWT"}"#;

struct Fixture {
    keys: KeySet,
    policy: Policy,
    signer: SigningKey,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        keys: KeySet::from_jwks(JWKS).expect("the fuzz JWKS parses"),
        policy: Policy {
            issuer: None,
            audiences: vec!["inference".into()],
            max_ttl_s: 3600,
            skew_s: 60,
            max_token_bytes: 4096,
            mapping: Mapping::default(),
        },
        signer: SigningKey::from_file_json(ED_KEY).expect("the fuzz key parses"),
    })
}

fn check(f: &Fixture, token: &str) {
    // `peek` is verify's first steps: what it refuses, verify refuses the same way.
    let peeked = peek(token, f.policy.max_token_bytes);
    let verified = verify(token, &f.keys, &f.policy, NOW);
    if let Err(r) = &peeked {
        assert_eq!(verified.as_ref().err(), Some(r));
    }
    let Ok(c) = verified else {
        return;
    };
    let p = peeked.expect("a verified token peeks");
    assert!(p.kid == c.kid && p.alg == c.alg && p.iss == c.issuer);
    let skew = f.policy.skew_s;
    assert!(token.len() <= f.policy.max_token_bytes);
    assert!(!c.jti.is_empty() && !c.identity.is_empty());
    assert!(c.iat <= c.exp && c.exp - c.iat <= f.policy.max_ttl_s);
    assert!(NOW <= c.exp + skew && c.iat <= NOW + skew);
    assert!(c.nbf.is_none_or(|nbf| nbf <= NOW + skew));
    assert!(f.policy.audiences.iter().any(|a| c.audience.contains(a)));
    assert!(f.keys.get(&c.kid).is_some_and(|k| k.alg == c.alg));
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    check(f, &String::from_utf8_lossy(data));
    let (header, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (HEADER, data),
    };
    if let Ok(token) = f.signer.sign_compact(header, payload) {
        check(f, &token);
    }
});
