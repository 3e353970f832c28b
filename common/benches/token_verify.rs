//! Token verifications per second on one core, per algorithm and key size: the full
//! `verify` (size, decode, parse, key lookup, signature, claims, issuer, audience, mapping)
//! next to ring's bare signature check of the same token's signing input and signature, in
//! the same run, so the ratio says what tollgate adds around the cryptography. The two loops
//! alternate in [`ROUNDS`] rounds of [`RUN`] each and the medians are reported, so a change
//! in the machine's load during the run shifts both alike (on a shared VM two back-to-back
//! two-second loops gave ratios above 1, which no wrapper can have). The RSA keys are the
//! test keys of `src/token/testdata`.
//! Prints a markdown table; `cargo xtask bench` keeps it in target/bench/token_verify.md.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use base64::Engine as _;
use ring::{
    rand::SystemRandom,
    signature::{
        self, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RsaKeyPair,
        RsaPublicKeyComponents,
    },
};
use serde_json::{Value, json};
use tollgate_common::token::{Alg, KeySet, Mapping, Policy, SigningKey, jwks, verify};

const RUN: Duration = Duration::from_millis(300);
/// Rounds of (full `verify`, ring alone) per case; the median of each is reported.
const ROUNDS: usize = 7;
const NOW: u64 = 1_800_000_000;
const ISSUER: &str = "https://idp.example.com/realms/tollgate";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// How a case signs, and how ring alone checks the result.
enum Signer {
    Own(SigningKey),
    Es384(EcdsaKeyPair),
    Rsa(RsaKeyPair, Alg),
}

impl Signer {
    fn alg(&self) -> Alg {
        match self {
            Signer::Own(k) => k.alg,
            Signer::Es384(_) => Alg::ES384,
            Signer::Rsa(_, alg) => *alg,
        }
    }

    fn jwk(&self) -> Value {
        match self {
            Signer::Own(k) => k.public_jwk(),
            Signer::Es384(p) => {
                let pt = p.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-384", "kid": "bench", "alg": "ES384",
                       "x": b64(&pt[1..49]), "y": b64(&pt[49..97])})
            }
            Signer::Rsa(p, alg) => {
                let c: RsaPublicKeyComponents<Vec<u8>> = p.public().into();
                json!({"kty": "RSA", "kid": "bench", "alg": alg.as_str(), "use": "sig",
                       "n": b64(&c.n), "e": b64(&c.e)})
            }
        }
    }

    fn sign(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Signer::Own(k) => {
                // sign_compact over the already-encoded parts would encode them again: sign
                // the decoded header and payload instead and keep its signature.
                let (h, p) = std::str::from_utf8(input)
                    .expect("ascii")
                    .split_once('.')
                    .expect("two parts");
                let d = |s: &str| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(s)
                        .expect("b64")
                };
                let t = k.sign_compact(&d(h), &d(p)).expect("sign");
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t.rsplit('.').next().expect("sig"))
                    .expect("b64")
            }
            Signer::Es384(p) => p.sign(&rng, input).expect("sign").as_ref().to_vec(),
            Signer::Rsa(p, alg) => {
                let padding: &'static dyn signature::RsaEncoding = match alg {
                    Alg::RS256 => &signature::RSA_PKCS1_SHA256,
                    Alg::PS256 => &signature::RSA_PSS_SHA256,
                    other => panic!("no bench padding for {other}"),
                };
                let mut sig = vec![0; p.public().modulus_len()];
                p.sign(padding, &rng, input, &mut sig).expect("sign");
                sig
            }
        }
    }

    /// ring alone: the same verification `verify` ends in, with nothing around it.
    fn bare_check(&self, jwk: &Value, input: &[u8], sig: &[u8]) -> bool {
        let d = |m: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jwk[m].as_str().expect("member"))
                .expect("b64")
        };
        match self {
            Signer::Rsa(_, alg) => {
                let (n, e) = (d("n"), d("e"));
                let params = match alg {
                    Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    _ => &signature::RSA_PSS_2048_8192_SHA256,
                };
                let mut ok = true;
                timed_loop(|| {
                    ok &= RsaPublicKeyComponents {
                        n: black_box(&n[..]),
                        e: &e[..],
                    }
                    .verify(params, black_box(input), black_box(sig))
                    .is_ok();
                });
                ok
            }
            _ => {
                let (alg, key): (&'static dyn signature::VerificationAlgorithm, Vec<u8>) =
                    match self.alg() {
                        Alg::EdDSA => (&signature::ED25519, d("x")),
                        a => {
                            let mut pt = vec![4];
                            pt.extend(d("x"));
                            pt.extend(d("y"));
                            if a == Alg::ES256 {
                                (&signature::ECDSA_P256_SHA256_FIXED, pt)
                            } else {
                                (&signature::ECDSA_P384_SHA384_FIXED, pt)
                            }
                        }
                    };
                let mut ok = true;
                timed_loop(|| {
                    ok &= signature::UnparsedPublicKey::new(alg, black_box(&key[..]))
                        .verify(black_box(input), black_box(sig))
                        .is_ok();
                });
                ok
            }
        }
    }
}

/// Runs `f` for about [`RUN`] after a warm-up, reading the clock every 20 calls; the rate
/// lands in `LAST_RATE`.
fn timed_loop(mut f: impl FnMut()) {
    for _ in 0..20 {
        f();
    }
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < RUN {
        for _ in 0..20 {
            f();
        }
        n += 20;
    }
    LAST_RATE.with(|r| r.set(n as f64 / start.elapsed().as_secs_f64()));
}

thread_local! {
    static LAST_RATE: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

fn rate() -> f64 {
    LAST_RATE.with(std::cell::Cell::get)
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    let rsa = |der: &[u8]| RsaKeyPair::from_pkcs8(der).expect("the test RSA key");
    let rsa2048: &[u8] = include_bytes!("../src/token/testdata/rsa2048.pk8");
    let rsa4096: &[u8] = include_bytes!("../src/token/testdata/rsa4096.pk8");
    let rng = SystemRandom::new();
    let p384 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).expect("p384");
    let cases: Vec<(&str, Signer)> = vec![
        ("RS256, 2048-bit", Signer::Rsa(rsa(rsa2048), Alg::RS256)),
        ("RS256, 4096-bit", Signer::Rsa(rsa(rsa4096), Alg::RS256)),
        ("PS256, 2048-bit", Signer::Rsa(rsa(rsa2048), Alg::PS256)),
        (
            "ES256",
            Signer::Own(SigningKey::generate(Alg::ES256, "bench").expect("key")),
        ),
        (
            "ES384",
            Signer::Es384(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, p384.as_ref(), &rng)
                    .expect("p384"),
            ),
        ),
        (
            "EdDSA",
            Signer::Own(SigningKey::generate(Alg::EdDSA, "bench").expect("key")),
        ),
    ];
    // An identity provider's token under an issuer's policy: iss checked, two audiences,
    // the legacy claim mapping.
    let policy = Policy {
        issuer: Some(ISSUER.into()),
        audiences: vec!["inference".into(), "billing".into()],
        max_ttl_s: 3600,
        skew_s: 30,
        max_token_bytes: 8192,
        mapping: Mapping::default(),
    };
    let payload = json!({
        "jti": "0123456789abcdef0123456789abcdef",
        "iss": ISSUER,
        "sub": "tenant-42/service-a",
        "aud": ["account", "inference"],
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 900,
        "tollgate_class": "batch",
        "tollgate_plan": "pro",
        "tollgate_roles": ["reader"],
    });
    println!(
        "| algorithm | token bytes | `verify` /s (one core) | µs/`verify` | ring alone /s | µs ring alone | `verify` / ring |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, signer) in cases {
        let jwk = signer.jwk();
        let keys = KeySet::from_jwks(&jwks(std::slice::from_ref(&jwk))).expect("JWKS");
        assert!(keys.skipped().is_empty(), "{name}: {:?}", keys.skipped());
        let header = json!({"alg": signer.alg().as_str(), "kid": "bench", "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let sig = signer.sign(input.as_bytes());
        let token = format!("{input}.{}", b64(&sig));
        verify(&token, &keys, &policy, NOW).expect("the benchmark token verifies");
        let (mut fulls, mut bares) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let mut ok = true;
            timed_loop(|| {
                ok &= verify(black_box(&token), black_box(&keys), &policy, NOW).is_ok();
            });
            assert!(ok);
            fulls.push(rate());
            assert!(signer.bare_check(&jwk, input.as_bytes(), &sig));
            bares.push(rate());
        }
        let (full, bare) = (median(fulls), median(bares));
        println!(
            "| {name} | {} | {full:.0} | {:.1} | {bare:.0} | {:.1} | {:.2} |",
            token.len(),
            1e6 / full,
            1e6 / bare,
            full / bare
        );
    }
}
