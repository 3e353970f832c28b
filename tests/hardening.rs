//! Issue #12, findings 3 and 8: holes found by attacking a running node, one test each, with
//! the real agent in namespaces (tokens bound over HTTPS with curl, as in `tokens.rs`).

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use tollgate_tests::{
    agent::{AgentDirs, tollgate_bin},
    config::{Config, Endpoint, Plan, Tokens},
    lab::Lab,
    tokenlab::{AUDIENCE, BIND_CLASSES, BIND_PORT, MODEL_PORT, TokenKit, World, b64},
};

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A token signed with the key file's Ed25519 secret, with whatever claims the test needs.
fn forge(keyfile: &Path, claims: serde_json::Value) -> String {
    let key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(keyfile).expect("key")).expect("key json");
    let pkcs8 = base64::engine::general_purpose::STANDARD
        .decode(key["pkcs8"].as_str().expect("pkcs8"))
        .expect("pkcs8 base64");
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).expect("ed25519 key");
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": "k1"});
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = pair.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(sig.as_ref()))
}

/// The agent's state as it would load it: `state.json` and the journal of changes since.
fn state_json(w: &World) -> serde_json::Value {
    serde_json::to_value(tollgate::state::State::peek(&w.dirs.state_dir).expect("state"))
        .expect("state json")
}

fn identity(w: &World, name: &str) -> serde_json::Value {
    serde_json::from_str(
        &w.dirs
            .cli_ok(&["identities", "show", name, "--output", "json"]),
    )
    .expect("identity json")
}

/// Finding 3: a quarantine is removed only by a release or its own expiry, not because the
/// quarantined token identity's tokens expired while the agent was down.
#[test]
fn a_quarantine_outlives_its_identitys_tokens_expiring_while_the_agent_is_down() {
    let w = World::new(None);
    let agent = w.start();
    let client = &w.lab.client;
    let token = w.issue("mallory", "3s", "tok-q-1");
    assert_eq!(w.http(client, "POST", &token).0, 200);
    assert!(w.model_answers(client, Duration::from_secs(2)));
    w.dirs
        .cli_ok(&["quarantine", "mallory", "--reason", "hardening: abuse"]);
    assert!(!w.model_answers(client, Duration::from_millis(700)));
    let exit = agent.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    // The token (and with it the token identity) expires while nobody is running.
    std::thread::sleep(Duration::from_secs(4));
    let _agent = w.start();
    std::thread::sleep(Duration::from_millis(1500)); // a housekeeping pass
    let state = state_json(&w);
    assert!(
        state["quarantines"]["mallory"].is_object(),
        "the quarantine went with the expired identity: {state}"
    );
    assert!(
        !w.audit()
            .iter()
            .any(|l| l["action"] == "release" && l["detail"]["identity"] == "mallory"),
        "a release was audited"
    );
    // A fresh token gives the identity a slot again: still quarantined, in the kernel too.
    let fresh = w.issue("mallory", "5m", "tok-q-2");
    assert_eq!(w.http(client, "POST", &fresh).0, 200);
    assert!(
        !w.model_answers(client, Duration::from_millis(700)),
        "a fresh token got the quarantined client back in"
    );
    assert!(identity(&w, "mallory")["quarantined"].is_object());
    // Only an explicit release ends it.
    w.dirs
        .cli_ok(&["release", "mallory", "--reason", "hardening"]);
    assert!(w.model_answers(client, Duration::from_secs(2)));
}

/// Finding 3, the other way in: a configured identity left out of the configuration for one
/// reload keeps its quarantine, and is quarantined again when it comes back.
#[test]
fn a_quarantine_outlives_its_identity_leaving_the_configuration_for_one_reload() {
    let w = World::new(None);
    let _agent = w.start();
    let client = &w.lab.client;
    let without = std::fs::read_to_string(&w.config).expect("config");
    let with = format!(
        "{without}\n[[identities]]\nname = \"sam\"\nclass = \"customer\"\nplan = \"customer\"\n\
         bind = [\"{}\"]\n",
        w.lab.client_v4
    );
    std::fs::write(&w.config, &with).expect("config");
    w.dirs.cli_ok(&["reload"]);
    assert!(w.model_answers(client, Duration::from_secs(2)));
    w.dirs
        .cli_ok(&["quarantine", "sam", "--reason", "hardening: abuse"]);
    assert!(!w.model_answers(client, Duration::from_millis(700)));
    std::fs::write(&w.config, &without).expect("config");
    w.dirs.cli_ok(&["reload"]);
    let state = state_json(&w);
    assert!(
        state["quarantines"]["sam"].is_object(),
        "the quarantine went with the identity: {state}"
    );
    std::fs::write(&w.config, &with).expect("config");
    w.dirs.cli_ok(&["reload"]);
    assert!(
        !w.model_answers(client, Duration::from_millis(700)),
        "back in the configuration, no longer quarantined"
    );
    w.dirs.cli_ok(&["release", "sam", "--reason", "hardening"]);
    assert!(w.model_answers(client, Duration::from_secs(2)));
}

/// Finding 8: a token stamped by an issuer whose clock runs ahead of the node's (within the
/// accepted skew) is still "issued before" a revocation of its identity made just after.
#[test]
fn revoking_an_identity_covers_a_token_issued_just_before_on_a_clock_ahead_within_the_skew() {
    let w = World::new(None);
    let _agent = w.start();
    w.dirs.cli_ok(&[
        "token",
        "revoke",
        "--identity",
        "gina",
        "--reason",
        "offboarded",
    ]);
    // Issued just before the revocation on the issuer's clock, which is 1 s ahead of ours
    // (the lab accepts 2 s of skew).
    let now = now_s();
    let token = forge(
        &w.keys.join("k1.key.json"),
        serde_json::json!({"jti": "tok-skew", "sub": "gina", "aud": AUDIENCE,
            "iat": now + 1, "nbf": now.saturating_sub(1), "exp": now + 60}),
    );
    let (code, body) = w.http(&w.lab.client, "POST", &token);
    assert_eq!(
        (code, body["reason"].as_str()),
        (403, Some("revoked")),
        "{body}"
    );
    assert!(!w.model_answers(&w.lab.client, Duration::from_millis(700)));
}

/// Finding 8: the replay refusal does not tell the presenter (probably the thief) the address
/// the token is bound to; the audit log keeps it for the operator.
#[test]
fn the_replay_refusal_does_not_tell_the_thief_the_victims_address() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let second = lab.add_client();
    let w = World::with_lab(lab, Some(second.server_if.clone()));
    let _agent = w.start();
    let token = w.issue("victor", "5m", "tok-victim");
    assert_eq!(w.http(&w.lab.client, "POST", &token).0, 200);
    let (code, body) = w.http(&second.ns, "POST", &token);
    assert_eq!((code, body["reason"].as_str()), (403, Some("replay")));
    let victim = w.lab.client_v4.to_string();
    assert!(
        !body.to_string().contains(&victim),
        "the refusal names the victim's address: {body}"
    );
    let theft = w
        .audit()
        .into_iter()
        .find(|l| l["action"] == "token_theft")
        .expect("audit line");
    assert_eq!(theft["detail"]["bound_to"], victim.as_str(), "{theft}");
}

/// Finding 8: `config check` refuses a bind listener that unbound clients reach with no
/// per-prefix limit (no endpoint on its port), one nobody can reach (`anonymous = false`),
/// and one a bound client of some class could not renew or unbind through.
#[test]
fn config_check_refuses_a_bind_listener_without_a_fitting_endpoint() {
    let dirs = AgentDirs::new();
    let server = Ipv4Addr::new(198, 18, 0, 2);
    let kit = TokenKit::new(&dirs, server);
    let base = || {
        Config::new(&["tg-hard0"])
            .listen_bind(std::net::SocketAddr::from((server, BIND_PORT)))
            .tokens(Tokens {
                jwks: kit.jwks.clone(),
                audience: AUDIENCE.into(),
                tls_cert: kit.ca.clone(),
                tls_key: kit.tls_key.clone(),
                default_class: Some("customer".into()),
                default_plan: Some("customer".into()),
                ..Tokens::default()
            })
            .plan(Plan::new("customer"))
            .endpoint(Endpoint::tcp("model", MODEL_PORT, &["customer"]))
    };
    let check = |name: &str, c: Config| {
        let path = c.write(&dirs.state_dir.join(name));
        let out = std::process::Command::new(tollgate_bin())
            .args(["config", "check"])
            .arg(&path)
            .output()
            .expect("tollgate config check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cases = [
        ("uncovered.toml", base(), "no endpoint"),
        (
            "closed.toml",
            base().endpoint(Endpoint::tcp("bind", BIND_PORT, &BIND_CLASSES)),
            "anonymous = false",
        ),
        (
            "narrow.toml",
            base().endpoint(Endpoint::tcp("bind", BIND_PORT, &["customer"]).anonymous()),
            "does not admit class internal, partner",
        ),
    ];
    for (name, config, fragment) in cases {
        let (code, msg) = check(name, config);
        assert_eq!(code, Some(5), "{name}: accepted ({msg})");
        assert!(
            msg.contains("listen.bind") && msg.contains(fragment),
            "{name}: {msg}"
        );
    }
    let good = base().endpoint(Endpoint::tcp("bind", BIND_PORT, &BIND_CLASSES).anonymous());
    let (code, msg) = check("good.toml", good);
    assert_eq!(code, Some(0), "{msg}");
}

/// Finding 8: any local user can read `/metrics`; token identities appear there by slot, not
/// by name, unless the operator sets `[metrics] identity_names = true`.
#[test]
fn metrics_do_not_show_token_identity_names_by_default() {
    let w = World::new(None);
    let _agent = w.start();
    let token = w.issue("zelda-private", "5m", "tok-metrics");
    assert_eq!(w.http(&w.lab.client, "POST", &token).0, 200);
    for _ in 0..3 {
        assert!(w.model_answers(&w.lab.client, Duration::from_secs(2)));
    }
    let slot = identity(&w, "zelda-private")["id"].as_u64().expect("slot");
    let out = w
        .lab
        .server
        .command("curl")
        .args(["-sS", "--max-time", "5", "http://127.0.0.1:9464/metrics"])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("tollgate_top_identity_packets"), "{text}");
    assert!(
        !text.contains("zelda-private"),
        "/metrics shows a token identity's name"
    );
    assert!(
        text.contains(&format!("identity=\"slot-{slot}\"")),
        "no slot label: {text}"
    );
}

/// Finding 8: a token identity slot freed and given to another identity starts with zero
/// counters and a fresh budget, not its previous occupant's.
#[test]
fn a_reused_identity_slot_does_not_inherit_its_previous_occupants_counters() {
    let w = World::new(None);
    let _agent = w.start();
    let client = &w.lab.client;
    let first = w.issue("olduser", "2s", "tok-old");
    assert_eq!(w.http(client, "POST", &first).0, 200);
    for _ in 0..5 {
        assert!(w.model_answers(client, Duration::from_secs(2)));
    }
    let old = identity(&w, "olduser");
    assert!(old["passed_packets"].as_u64() > Some(0), "{old}");
    let slot = old["id"].as_u64();
    // The token expires; housekeeping frees the identity and its slot.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        w.dirs
            .cli(&["identities", "show", "olduser", "--output", "json"])
            .status
            .code()
            != Some(0),
        "olduser still has a slot"
    );
    // A second client binds as a new identity: it gets the lowest free slot, the old one.
    let second = w.issue("newuser", "5m", "tok-new");
    assert_eq!(w.http(client, "POST", &second).0, 200);
    let new = identity(&w, "newuser");
    assert_eq!(new["id"].as_u64(), slot, "not the reused slot: {new}");
    // Only the bind's own handshake may have been counted since.
    assert!(
        new["passed_packets"].as_u64() < old["passed_packets"].as_u64(),
        "the new occupant inherited the old counters: {new} (old: {old})"
    );
}
