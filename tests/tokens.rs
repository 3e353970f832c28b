//! Tokens end to end: keys from `tollgate keys generate`, tokens from `tollgate token issue`
//! (or forged by hand for the bad ones), binds over HTTPS with curl from a client namespace,
//! traffic to a model server, the kernel's verdicts.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use base64::Engine as _;
use tollgate_tests::{
    agent::tollgate_bin,
    lab::Lab,
    tokenlab::{AUDIENCE, World, b64},
};

#[test]
fn https_bind_opens_the_model_port_until_the_token_expires_even_with_the_agent_stopped() {
    let w = World::new(None);
    let agent = w.start();
    let client = &w.lab.client;
    assert!(
        !w.model_answers(client, Duration::from_millis(700)),
        "answered before any bind"
    );
    let token = w.issue("alice", "4s", "tok-expiry");
    let (code, body) = w.http(client, "POST", &token);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["identity"], "alice");
    assert_eq!(
        body["address"],
        w.lab.client_v4.to_string(),
        "bound a claimed address"
    );
    assert!(
        w.model_answers(client, Duration::from_secs(2)),
        "no answer after the bind"
    );
    // The agent goes away; the kernel alone must end the binding at the token's expiry.
    let exit = agent.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    let expires = body["expires_unix"].as_u64().expect("expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    std::thread::sleep(Duration::from_secs(expires.saturating_sub(now) + 1));
    assert!(
        !w.model_answers(client, Duration::from_millis(700)),
        "answered after expiry"
    );
}

#[test]
fn revocation_closes_within_a_second_and_survives_a_restart() {
    let w = World::new(None);
    let agent = w.start();
    let client = &w.lab.client;
    let token = w.issue("bob", "5m", "tok-revoke");
    assert_eq!(w.http(client, "POST", &token).0, 200);
    assert!(w.model_answers(client, Duration::from_secs(2)));
    let t0 = Instant::now();
    w.dirs.cli_ok(&[
        "token",
        "revoke",
        "--token-id",
        "tok-revoke",
        "--reason",
        "leaked",
    ]);
    // Within one second of the command, nothing passes.
    let left = Duration::from_secs(1).saturating_sub(t0.elapsed());
    std::thread::sleep(left);
    assert!(
        !w.model_answers(client, Duration::from_millis(700)),
        "passed after revoke"
    );
    let (code, body) = w.http(client, "POST", &token);
    assert_eq!(
        (code, body["reason"].as_str()),
        (403, Some("revoked")),
        "{body}"
    );
    // The revocation is persisted: a restarted agent still refuses the token.
    agent.kill9();
    let _agent = w.start();
    let (code, body) = w.http(client, "POST", &token);
    assert_eq!(
        (code, body["reason"].as_str()),
        (403, Some("revoked")),
        "{body}"
    );
    // Revoking an identity refuses its tokens issued until then.
    let t2 = w.issue("carol", "5m", "tok-carol");
    assert_eq!(w.http(client, "POST", &t2).0, 200);
    w.dirs.cli_ok(&[
        "token",
        "revoke",
        "--identity",
        "carol",
        "--reason",
        "offboarded",
    ]);
    assert!(!w.model_answers(client, Duration::from_millis(700)));
    assert_eq!(w.http(client, "POST", &t2).1["reason"], "revoked");
}

#[test]
fn a_token_replayed_from_a_second_namespace_is_refused_and_reported() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let second = lab.add_client();
    let w = World::with_lab(lab, Some(second.server_if.clone()));
    let _agent = w.start();
    let token = w.issue("dave", "5m", "tok-replay");
    assert_eq!(w.http(&w.lab.client, "POST", &token).0, 200);
    let (code, body) = w.http(&second.ns, "POST", &token);
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["reason"], "replay");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("theft"),
        "{body}"
    );
    // The first binding lives on; the thief gets nothing.
    assert!(w.model_answers(&w.lab.client, Duration::from_secs(2)));
    assert!(!w.model_answers(&second.ns, Duration::from_millis(700)));
    let theft = w
        .audit()
        .into_iter()
        .find(|l| l["action"] == "token_theft")
        .expect("audit line");
    assert_eq!(theft["detail"]["address"], second.client_v4.to_string());
    assert_eq!(w.status()["tokens"]["probable_thefts"], 1);
}

/// A signed token with arbitrary header and claims, using the key file's PKCS#8 secret.
fn forge(keyfile: &Path, header: serde_json::Value, claims: serde_json::Value) -> String {
    let key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(keyfile).expect("key")).expect("key json");
    let pkcs8 = base64::engine::general_purpose::STANDARD
        .decode(key["pkcs8"].as_str().expect("pkcs8"))
        .expect("pkcs8 base64");
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).expect("ed25519 key");
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = pair.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(sig.as_ref()))
}

#[test]
fn bad_tokens_are_refused_each_with_its_reason_in_audit_and_status() {
    let w = World::new(None);
    let _agent = w.start();
    let k1 = w.keys.join("k1.key.json");
    // A second key the nodes do not trust, and a third that they trust but whose rotation
    // window is over.
    let other = w.dirs.state_dir.join("other-keys");
    for (kid, dir) in [("rogue", &other), ("old", &w.keys)] {
        let out = std::process::Command::new(tollgate_bin())
            .args(["keys", "generate", "--kid", kid, "--out-dir"])
            .arg(dir)
            .output()
            .expect("keys generate");
        assert!(out.status.success(), "{out:?}");
    }
    let jwks_path = w.keys.join("jwks.json");
    let mut jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&jwks_path).expect("jwks")).expect("json");
    for k in jwks["keys"].as_array_mut().expect("keys") {
        if k["kid"] == "old" {
            k["exp"] = serde_json::json!(1_000_000_000u64);
        }
    }
    std::fs::write(&jwks_path, jwks.to_string()).expect("jwks");
    w.dirs.cli_ok(&["reload"]);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let hdr = |kid: &str| serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
    let claims = |sub: Option<&str>, iat: u64, exp: u64, aud: &str| {
        let mut c = serde_json::json!({"jti": format!("bad-{iat}-{exp}-{aud}"), "aud": aud, "iat": iat, "nbf": iat, "exp": exp});
        if let Some(s) = sub {
            c["sub"] = serde_json::json!(s);
        }
        c
    };
    let good = forge(&k1, hdr("k1"), claims(Some("eve"), now, now + 60, AUDIENCE));
    let tamper = |t: &str| {
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let payload = serde_json::json!({"jti": "x", "sub": "mallory", "aud": AUDIENCE, "iat": now, "exp": now + 60});
        parts[1] = b64(payload.to_string().as_bytes());
        parts.join(".")
    };
    let revoked = w.issue("frank", "5m", "tok-to-revoke");
    w.dirs.cli_ok(&[
        "token",
        "revoke",
        "--token-id",
        "tok-to-revoke",
        "--reason",
        "test",
    ]);
    let sig_of = |t: &str| t.rsplit('.').next().unwrap_or_default().to_owned();
    let head_body = |t: &str| {
        t.rsplit_once('.')
            .map(|(h, _)| h.to_owned())
            .unwrap_or_default()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad signature", tamper(&good), "bad_signature"),
        (
            "unknown kid",
            forge(
                &other.join("rogue.key.json"),
                hdr("rogue"),
                claims(Some("eve"), now, now + 60, AUDIENCE),
            ),
            "unknown_kid",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","kid":"k1"}"#),
                b64(claims(Some("eve"), now, now + 60, AUDIENCE)
                    .to_string()
                    .as_bytes())
            ),
            "alg_none",
        ),
        (
            "HS256",
            format!(
                "{}.{}.{}",
                b64(br#"{"alg":"HS256","kid":"k1"}"#),
                b64(claims(Some("eve"), now, now + 60, AUDIENCE)
                    .to_string()
                    .as_bytes()),
                sig_of(&good)
            ),
            "alg_hmac",
        ),
        (
            "expired",
            forge(
                &k1,
                hdr("k1"),
                claims(Some("eve"), now - 120, now - 60, AUDIENCE),
            ),
            "expired",
        ),
        (
            "not yet valid",
            forge(
                &k1,
                hdr("k1"),
                claims(Some("eve"), now + 60, now + 120, AUDIENCE),
            ),
            "not_yet_valid",
        ),
        (
            "lifetime over the maximum",
            forge(
                &k1,
                hdr("k1"),
                claims(Some("eve"), now, now + 3600, AUDIENCE),
            ),
            "lifetime_too_long",
        ),
        (
            "wrong audience",
            forge(&k1, hdr("k1"), claims(Some("eve"), now, now + 60, "pool-b")),
            "wrong_audience",
        ),
        (
            "missing identity claim",
            forge(&k1, hdr("k1"), claims(None, now, now + 60, AUDIENCE)),
            "missing_identity",
        ),
        (
            "oversized",
            forge(&k1, hdr("k1"), {
                let mut c = claims(Some("eve"), now, now + 60, AUDIENCE);
                c["pad"] = serde_json::json!("x".repeat(5000));
                c
            }),
            "oversized",
        ),
        (
            "malformed base64",
            format!(
                "{}.%%%.{}",
                b64(br#"{"alg":"EdDSA","kid":"k1"}"#),
                sig_of(&good)
            ),
            "bad_base64",
        ),
        (
            "malformed JSON",
            format!(
                "{}.{}.{}",
                b64(br#"{"alg":"EdDSA","kid":"k1"#),
                b64(b"{}"),
                sig_of(&good)
            ),
            "bad_json",
        ),
        (
            "truncated signature",
            format!("{}.{}", head_body(&good), &sig_of(&good)[..40]),
            "truncated_signature",
        ),
        ("revoked", revoked, "revoked"),
        (
            "key outside its rotation window",
            forge(
                &w.keys.join("old.key.json"),
                hdr("old"),
                claims(Some("eve"), now, now + 60, AUDIENCE),
            ),
            "key_outside_window",
        ),
    ];
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for (what, token, label) in &cases {
        let (code, body) = w.http(&w.lab.client, "POST", token);
        if !(code == 401 || code == 403) || body["reason"] != *label {
            failures.push(format!(
                "{what}: HTTP {code} {body}, expected reason {label}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing got bound, every refusal is in the audit log with its reason, and counted.
    assert!(!w.model_answers(&w.lab.client, Duration::from_millis(700)));
    let refused: Vec<String> = w
        .audit()
        .into_iter()
        .filter(|l| l["action"] == "token_refused")
        .filter_map(|l| l["reason"].as_str().map(str::to_owned))
        .collect();
    let status = w.status();
    for (what, _, label) in &cases {
        assert!(
            refused.iter().any(|r| r == label),
            "{what}: no audit line with reason {label}"
        );
        assert!(
            status["tokens"]["verifications"][label].as_u64() >= Some(1),
            "{what}: not counted under {label}: {}",
            status["tokens"]
        );
    }
    // The good token still works, for contrast.
    assert_eq!(w.http(&w.lab.client, "POST", &good).0, 200);
}

#[test]
fn a_gateway_binds_a_client_through_the_control_socket() {
    let w = World::new(None);
    let _agent = w.start();
    let token = w.issue("gina", "5m", "tok-gateway");
    let addr = w.lab.client_v4.to_string();
    let out = w.dirs.cli_ok(&["bind", "--token", &token, "--addr", &addr]);
    assert!(out.contains("gina"), "{out}");
    assert!(w.model_answers(&w.lab.client, Duration::from_secs(2)));
    let (code, _) = w.http(&w.lab.client, "DELETE", &token);
    assert_eq!(code, 200);
    assert!(!w.model_answers(&w.lab.client, Duration::from_millis(700)));
}
