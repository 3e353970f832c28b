//! Token verifications per second on one core, per algorithm: one token issued, then
//! `verify` (decode, parse, signature, claims) in a loop for about two seconds each.
//! Prints a markdown table; `cargo xtask bench` keeps it in target/bench/token_verify.md.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use tollgate_common::token::{
    Alg, ClaimNames, KeySet, Mapping, NewToken, Policy, SigningKey, issue, jwks, verify,
};

const RUN: Duration = Duration::from_secs(2);
const NOW: u64 = 1_800_000_000;

fn main() {
    let policy = Policy {
        issuer: None,
        audiences: vec!["inference".into()],
        max_ttl_s: 3600,
        skew_s: 30,
        max_token_bytes: 4096,
        mapping: Mapping::default(),
    };
    let roles = vec!["reader".to_string()];
    println!("| algorithm | token bytes | verifications/s (one core) | µs/verification |");
    println!("|---|---:|---:|---:|");
    for &alg in Alg::signable() {
        let key = SigningKey::generate(alg, "bench").expect("key generation");
        let keys = KeySet::from_jwks(&jwks(&[key.public_jwk()])).expect("JWKS");
        let t = NewToken {
            jti: "0123456789abcdef0123456789abcdef",
            identity: "tenant-42/service-a",
            class: Some("batch"),
            plan: Some("pro"),
            roles: &roles,
            audience: "inference",
            iat: NOW,
            nbf: Some(NOW),
            exp: NOW + 900,
        };
        let token = issue(&key, &t, &ClaimNames::default()).expect("issue");
        verify(&token, &keys, &policy, NOW).expect("the benchmark token verifies");
        // Warm-up, then the timed loop in batches so the clock is read rarely.
        for _ in 0..200 {
            black_box(verify(black_box(&token), &keys, &policy, NOW).is_ok());
        }
        let start = Instant::now();
        let mut n: u64 = 0;
        while start.elapsed() < RUN {
            for _ in 0..100 {
                let ok = verify(black_box(&token), black_box(&keys), &policy, NOW).is_ok();
                assert!(black_box(ok));
            }
            n += 100;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "| {} | {} | {:.0} | {:.1} |",
            alg.as_str(),
            token.len(),
            n as f64 / secs,
            secs * 1e6 / n as f64
        );
    }
}
