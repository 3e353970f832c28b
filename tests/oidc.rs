//! Identity providers as operators run them (#13), against a real OpenID Provider: the npm
//! `oidc-provider` package serving discovery, JWKS and client-credentials JWT access tokens
//! over HTTPS from its own namespace (support/oidc.rs). Clients get tokens from it with curl
//! and bind with them; the agent finds the keys by discovery or a JWKS URL, maps the claims to
//! a plan, follows a key rotation, rides out an outage, and holds a flood of random `kid`s to
//! one fetch per cooldown. Refusals come from tokens the provider issues and from tokens
//! minted by `jose` (tests/oidc/mint.mjs), never by tollgate's own signer.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tollgate_tests::{
    agent::{Agent, AgentDirs, tollgate_bin},
    config::{Claims, Config, Endpoint, Fetch, Issuer, Plan, Tokens, ValueRule, Values},
    exhaust::{post_bind, tls_client},
    lab::{Lab, NetNs, SecondClient},
    oidc::{
        IdpClient, OidcLab, POOL_A, POOL_B, ProviderSpec, claims_of, header_of, mint, wait_for,
    },
    scrape::scrape_within,
    tokenlab::{BIND_CLASSES, BIND_PORT, MODEL_PORT, curl_bind, model_server},
};

const METRICS_PORT: u16 = 9464;

/// Plans the provider's `groups` claim maps to: gold's burst covers any probe here, silver's
/// is eight packets, so the same probe from both tells them apart by count, not by time.
fn plans() -> [Plan; 3] {
    [
        Plan::new("gold").packets(5000, 2000),
        Plan::new("silver").packets(1, 8),
        Plan::new("customer").packets(1000, 1000),
    ]
}

/// The provider's clients as the mapping tests need them: each access token carries `groups`
/// (Okta, Entra ID and Dex put group names there) and Keycloak's `realm_access.roles`.
fn clients() -> Vec<IdpClient> {
    let roles = json!({"roles": ["tollgate-bind"]});
    vec![
        IdpClient::new(
            "gold-svc",
            json!({"groups": ["staff", "gold"], "realm_access": roles}),
        ),
        IdpClient::new(
            "silver-svc",
            json!({"groups": ["silver"], "realm_access": roles}),
        ),
        IdpClient::new("nogroups-svc", json!({"realm_access": roles})),
        IdpClient::new(
            "bronze-svc",
            json!({"groups": ["bronze"], "realm_access": roles}),
        ),
        IdpClient::new("noroles-svc", json!({"groups": ["gold"]})),
    ]
}

/// Identity from `client_id`, the Keycloak roles path required, the plan from `groups` with
/// no default: an unknown group is refused, not quietly given a plan.
fn mapping() -> Claims {
    Claims {
        identity: Some("client_id".into()),
        roles: Some("realm_access.roles".into()),
        roles_format: Some("array".into()),
        roles_required: Some(true),
        plan: Some(ValueRule::Map {
            claim: "groups".into(),
            values: Values(vec![
                ("gold".into(), "gold".into()),
                ("silver".into(), "silver".into()),
            ]),
            default: None,
            unmapped: Some("refuse".into()),
        }),
        class: Some(class_customer()),
    }
}

/// Class `customer` unless the token says otherwise: an issuer's own class rule does not
/// fall back to `[tokens] default_class` (only an issuer without one does).
fn class_customer() -> ValueRule {
    ValueRule::Map {
        claim: "tollgate_class".into(),
        values: Values::default(),
        default: Some("customer".into()),
        unmapped: None,
    }
}

/// The lab's provider found by discovery, with [`mapping`] and `fetch`.
fn idp(o: &OidcLab, fetch: Fetch) -> Issuer {
    Issuer::discovery("idp", &o.issuer, POOL_A)
        .fetch(fetch)
        .claims(mapping())
}

struct World {
    o: OidcLab,
    dirs: AgentDirs,
    config: PathBuf,
    second: Option<SecondClient>,
    _model: std::thread::JoinHandle<()>,
}

/// The agent's configuration: the bind listener (certificate from the lab's CA), `/metrics`,
/// the model port for class customer, [`plans`], and `issuers` with no legacy `jwks`/
/// `audience` (so a token whose `iss` no issuer has is `wrong_issuer`).
fn agent_config(o: &OidcLab, ifaces: &[String], issuers: Vec<Issuer>) -> Config {
    let lab = &o.lab;
    let mut tokens = Tokens {
        max_ttl_s: Some(600),
        clock_skew_s: Some(2),
        max_token_bytes: Some(4096),
        default_class: Some("customer".into()),
        default_plan: Some("customer".into()),
        fetch: Fetch {
            ca_bundle: Some(o.ca.pem.clone()),
            ..Fetch::default()
        },
        ..Tokens::tls_only(&o.bind_cert, &o.bind_key)
    };
    for i in issuers {
        tokens = tokens.issuer(i);
    }
    let mut config = Config::new(ifaces)
        // The random-kid flood sends a thousand TLS handshakes from one /24 to the bind port.
        .anonymous(20_000, 40_000)
        .listen_bind(SocketAddr::new(IpAddr::V4(lab.server_v4), BIND_PORT))
        .listen_metrics(SocketAddr::new(IpAddr::V4(lab.server_v4), METRICS_PORT))
        .tokens(tokens)
        .endpoint(Endpoint::tcp("model", MODEL_PORT, &["customer"]))
        .endpoint(Endpoint::tcp("bind", BIND_PORT, &BIND_CLASSES).anonymous());
    for p in plans() {
        config = config.plan(p);
    }
    config
}

impl World {
    fn new(
        spec: ProviderSpec,
        second: bool,
        issuers: impl FnOnce(&OidcLab) -> Vec<Issuer>,
    ) -> World {
        let lab = Lab::new();
        let second = second.then(|| lab.add_client());
        let o = OidcLab::new(lab, spec);
        let mut ifaces = vec![o.lab.server_if.clone()];
        ifaces.extend(second.as_ref().map(|s| s.server_if.clone()));
        let dirs = AgentDirs::new();
        let mut config = agent_config(&o, &ifaces, issuers(&o));
        // The agent gets --state-dir; `tollgate token verify --config` reads it from here.
        config.node.state_dir = Some(dirs.state_dir.clone());
        let config = config.write(&dirs.state_dir.join("tollgate.toml"));
        let model = model_server(&o.lab);
        World {
            o,
            dirs,
            config,
            second,
            _model: model,
        }
    }

    /// Starts the agent and waits (bounded) until every issuer has tried its first fetch, so
    /// that a test's first bind is not the one that waits for the keys.
    fn start(&self) -> Agent {
        let config = self.config.to_str().expect("path");
        let agent = Agent::launch(
            &self.o.lab.server,
            &self.dirs,
            &["--config", config, "--mode", "native"],
        );
        let tried = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
            let all = self.issuers();
            let all = all.as_array()?;
            all.iter()
                .all(|i| i["source"] == "file" || !i["last_fetch"].is_null())
                .then_some(())
        });
        assert!(
            tried.is_some(),
            "an issuer made no first fetch: {}",
            self.issuers()
        );
        agent
    }

    fn client(&self) -> &NetNs {
        &self.o.lab.client
    }

    fn second(&self) -> &SecondClient {
        self.second.as_ref().expect("a second client")
    }

    /// POST /v1/bind with curl from `ns`: (HTTP status, JSON body).
    fn bind(&self, ns: &NetNs, token: &str) -> (u16, Value) {
        curl_bind(ns, self.o.lab.server_v4, &self.o.ca.pem, "POST", token, 15)
    }

    /// Binds and insists on 200; returns the body.
    fn bind_ok(&self, ns: &NetNs, token: &str, what: &str) -> Value {
        let (code, body) = self.bind(ns, token);
        assert_eq!(
            code,
            200,
            "{what}: the bind was refused: {body}\nissuers: {}",
            self.issuers()
        );
        body
    }

    /// The reason a bind was refused, with its HTTP status.
    fn refusal(&self, ns: &NetNs, token: &str) -> (u16, String) {
        let (code, body) = self.bind(ns, token);
        (code, body["reason"].as_str().unwrap_or("").to_owned())
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.dirs.cli_ok(&["status", "--output", "json"])).expect("status")
    }

    /// `tokens.issuers` of `tollgate status`.
    fn issuers(&self) -> Value {
        self.status()["tokens"]["issuers"].clone()
    }

    /// One issuer's row of `tokens.issuers`.
    fn issuer(&self, name: &str) -> Value {
        let all = self.issuers();
        all.as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no issuer {name} in status: {all}"))
    }

    fn identity(&self, name: &str) -> Value {
        serde_json::from_str(
            &self
                .dirs
                .cli_ok(&["identities", "show", name, "--output", "json"]),
        )
        .expect("identities show")
    }

    /// `tollgate token verify --config` run where the agent runs (the provider is reachable
    /// from the server's namespace only): its JSON on success, else the failure's stderr.
    fn token_verify(&self, token: &str) -> Result<Value, String> {
        let out = self
            .o
            .lab
            .server
            .command(tollgate_bin())
            .args(["token", "verify", "--config"])
            .arg(&self.config)
            .arg(token)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("tollgate token verify");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {stderr}"))
        } else {
            Err(stderr)
        }
    }

    fn metrics(&self) -> String {
        let addr = SocketAddr::new(IpAddr::V4(self.o.lab.server_v4), METRICS_PORT);
        scrape_within(&self.o.lab.server, addr, Duration::from_secs(10))
    }

    /// Whether the model server answers a TCP connection from `ns` within `wait`.
    fn model_answers(&self, ns: &NetNs, wait: Duration) -> bool {
        use std::io::Read as _;
        let addr = SocketAddr::new(IpAddr::V4(self.o.lab.server_v4), MODEL_PORT);
        ns.run(|| match TcpStream::connect_timeout(&addr, wait) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(wait));
                let mut buf = [0u8; 3];
                s.read_exact(&mut buf).is_ok() && &buf == b"ok\n"
            }
            Err(_) => false,
        })
    }

    /// `n` connection attempts to the model port from `ns`, each given 5 ms: a few packets
    /// each when the plan lets them through, one dropped SYN each when it does not.
    fn probe_model(&self, ns: &NetNs, n: usize) {
        let addr = SocketAddr::new(IpAddr::V4(self.o.lab.server_v4), MODEL_PORT);
        ns.run(|| {
            for _ in 0..n {
                let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(5));
            }
        });
    }
}

/// The sum of a metric family's samples whose labels include every pair of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (family, rest) = series.split_once('{').unwrap_or((series, "}"));
            if family != name {
                return None;
            }
            let have: BTreeMap<&str, &str> = rest
                .trim_end_matches('}')
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|(k, v)| have.get(k) == Some(v))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A client-credentials token of the lab's provider binds from the client: the model port
/// opens at the plan `groups` maps to; `identities show` says so. The identity is in issuer
/// `idp`'s namespace: `idp:<client_id>`.
fn bind_at_plan(w: &World, client: &str, ns: &NetNs, plan: &str) {
    let token = w.o.token(client, POOL_A);
    let body = w.bind_ok(ns, &token, client);
    let name = format!("idp:{client}");
    assert_eq!(body["identity"], name.as_str(), "{body}");
    let shown = w.identity(&name);
    assert_eq!(shown["plan"], plan, "{client}: {shown}");
    assert_eq!(shown["class"], "customer", "{client}: {shown}");
}

/// The lab itself: the provider serves discovery and JWKS over HTTPS to the server's
/// namespace (verified against the test CA), and client-credentials JWT access tokens to the
/// client's, with the claims the other tests map; its counters, rotation and broken-JWKS
/// modes do what the other tests rely on.
#[test]
fn the_lab_provider_serves_discovery_jwks_and_client_credentials_tokens() {
    let o = OidcLab::new(Lab::new(), ProviderSpec::new("RS256", clients()));
    let get = |path: &str| {
        let out = o
            .lab
            .server
            .command("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&o.ca.pem)
            .arg(format!("{}{path}", o.issuer))
            .output()
            .expect("curl");
        assert!(out.status.success(), "GET {path}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let discovery: Value =
        serde_json::from_str(&get("/.well-known/openid-configuration")).expect("discovery");
    assert_eq!(discovery["issuer"], o.issuer);
    assert_eq!(discovery["jwks_uri"], format!("{}/jwks", o.issuer));
    let token = o.token("gold-svc", POOL_A);
    let (header, claims) = (header_of(&token), claims_of(&token));
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["kid"], "rs256-1");
    for (claim, want) in [
        ("iss", json!(o.issuer)),
        ("aud", json!(POOL_A)),
        ("client_id", json!("gold-svc")),
        ("sub", json!("gold-svc")),
        ("scope", json!("bind")),
        ("groups", json!(["staff", "gold"])),
        ("realm_access", json!({"roles": ["tollgate-bind"]})),
    ] {
        assert_eq!(claims[claim], want, "{claim} in {claims}");
    }
    assert!(
        claims["jti"].as_str().is_some_and(|j| j.len() >= 20),
        "{claims}"
    );
    assert_eq!(
        claims["exp"]
            .as_u64()
            .zip(claims["iat"].as_u64())
            .map(|(e, i)| e - i),
        Some(300)
    );
    let before = o.counts();
    let _ = get("/jwks");
    assert_eq!(o.counts().jwks, before.jwks + 1, "the JWKS counter");
    let kid = o.rotate();
    let kids: Vec<Value> = o.jwks()["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].clone())
        .collect();
    assert_eq!(
        kids,
        [json!(kid), json!("rs256-1")],
        "the new key first, the old kept"
    );
    assert_eq!(header_of(&o.token("gold-svc", POOL_A))["kid"], kid.as_str());
    assert!(get("/jwks?pad=1").len() > 1 << 20, "the padded JWKS");
    o.jwks_mode("not_json");
    assert!(
        serde_json::from_str::<Value>(&get("/jwks")).is_err(),
        "not_json mode"
    );
    o.jwks_mode("normal");
    o.jwks_max_age(7);
    let out = o
        .lab
        .server
        .command("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "--cacert"])
        .arg(&o.ca.pem)
        .arg(format!("{}/jwks", o.issuer))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.contains("cache-control: public, max-age=7"), "{head}");
}

/// The RS256 run, end to end: discovery finds the provider's keys (published without `alg`,
/// as Entra ID does: RS256 is what an RSA key admits by default), a client-credentials token
/// binds, the traffic passes at the plan its `groups` claim maps to (gold passes a probe that
/// silver's burst of eight cuts short), and the same provider's token for another pool is
/// refused.
#[test]
fn rs256_tokens_from_the_provider_bind_at_the_plan_their_groups_map_to() {
    let mut spec = ProviderSpec::new("RS256", clients());
    spec.jwk_alg = false;
    let w = World::new(spec, true, |o| vec![idp(o, Fetch::default())]);
    let _agent = w.start();
    let jwks = w.o.jwks();
    assert!(
        jwks["keys"][0].get("alg").is_none(),
        "the provider should publish its RSA key without alg: {jwks}"
    );
    assert!(
        !w.model_answers(w.client(), Duration::from_millis(500)),
        "the model port answered before any bind"
    );
    let gold = w.o.token("gold-svc", POOL_A);
    assert_eq!(header_of(&gold)["alg"], "RS256");
    assert_eq!(claims_of(&gold)["iss"], w.o.issuer);
    bind_at_plan(&w, "gold-svc", w.client(), "gold");
    bind_at_plan(&w, "silver-svc", &w.second().ns, "silver");
    assert!(
        w.model_answers(w.client(), Duration::from_secs(2)),
        "the gold client's model port stayed shut"
    );
    // The same probe from each: gold's budget passes it all, silver's drops most of it.
    let before = |name: &str| {
        w.identity(&format!("idp:{name}"))["dropped_packets"]
            .as_u64()
            .expect("dropped")
    };
    let (gold0, silver0) = (before("gold-svc"), before("silver-svc"));
    w.probe_model(w.client(), 60);
    w.probe_model(&w.second().ns, 60);
    let gold_dropped = before("gold-svc") - gold0;
    let silver_dropped = before("silver-svc") - silver0;
    assert_eq!(gold_dropped, 0, "gold dropped packets of the probe");
    assert!(
        silver_dropped >= 40,
        "silver (burst 8) dropped only {silver_dropped} of 60 SYNs"
    );
    // A token of the same provider for another pool.
    let other = w.o.token("gold-svc", POOL_B);
    assert_eq!(claims_of(&other)["aud"], POOL_B);
    assert_eq!(
        w.refusal(w.client(), &other),
        (401, "wrong_audience".into())
    );
    let idp = w.issuer("idp");
    assert_eq!(idp["source"], "discovery", "{idp}");
    assert_eq!(idp["kids"], json!(["rs256-1"]), "{idp}");
    assert_eq!(idp["last_fetch"]["outcome"], "ok", "{idp}");
    assert_eq!(idp["jwks_uri"], format!("{}/jwks", w.o.issuer), "{idp}");
    // The operator's check of a token resolves keys as the node does and says what applied.
    let shown = w
        .token_verify(&gold)
        .expect("token verify of the gold token");
    for (field, want) in [
        ("issuer", json!("idp")),
        ("iss", json!(w.o.issuer)),
        ("key_id", json!("rs256-1")),
        ("alg", json!("RS256")),
        ("identity", json!("idp:gold-svc")),
        ("class", json!("customer")),
        ("plan", json!("gold")),
        ("roles", json!(["tollgate-bind"])),
    ] {
        assert_eq!(shown[field], want, "token verify: {field} in {shown}");
    }
    let refused = w
        .token_verify(&other)
        .expect_err("token verify of another pool's token");
    assert!(
        refused.contains("wrong_audience"),
        "token verify: {refused}"
    );
    let counts = w.o.counts();
    assert!(
        counts.discovery >= 1 && counts.jwks >= 1,
        "the provider saw no discovery/JWKS fetch: {counts:?}"
    );
}

/// A shorter run for another algorithm: a token from the provider signing with `alg`, found
/// through `source`, binds at its mapped plan; another audience is refused.
fn short_run(alg: &str, jwks_url: bool) {
    let w = World::new(ProviderSpec::new(alg, clients()), false, |o| {
        let mut i = idp(o, Fetch::default());
        if jwks_url {
            i = Issuer::jwks_url("idp", &o.issuer, POOL_A, &format!("{}/jwks", o.issuer))
                .claims(mapping());
        }
        vec![i]
    });
    let _agent = w.start();
    let token = w.o.token("gold-svc", POOL_A);
    assert_eq!(header_of(&token)["alg"], alg);
    bind_at_plan(&w, "gold-svc", w.client(), "gold");
    assert!(w.model_answers(w.client(), Duration::from_secs(2)));
    let other = w.o.token("silver-svc", POOL_B);
    assert_eq!(
        w.refusal(w.client(), &other),
        (401, "wrong_audience".into())
    );
    if jwks_url {
        assert_eq!(w.o.counts().discovery, 0, "a jwks_url issuer ran discovery");
    }
}

#[test]
fn ps256_tokens_bind_with_keys_from_a_jwks_url() {
    short_run("PS256", true);
}

#[test]
fn es256_tokens_bind_with_keys_from_discovery() {
    short_run("ES256", false);
}

/// The provider rotates to a new key; the next token (new kid) binds with no action on the
/// node: one refetch, in the agent's metrics (trigger `unknown_kid`) and at the provider.
#[test]
fn a_rotated_key_is_picked_up_with_one_refetch() {
    let w = World::new(ProviderSpec::new("RS256", clients()), false, |o| {
        // No scheduled refresh during the test: only the unknown kid can fetch.
        vec![idp(
            o,
            Fetch {
                cache_min_s: Some(3600),
                cache_max_s: Some(3600),
                ..Fetch::default()
            },
        )]
    });
    let _agent = w.start();
    bind_at_plan(&w, "gold-svc", w.client(), "gold");
    let before = w.o.counts();
    let fetches = |w: &World| {
        metric(
            &w.metrics(),
            "tollgate_issuer_fetches_total",
            &[("issuer", "idp"), ("trigger", "unknown_kid")],
        )
    };
    assert_eq!(fetches(&w), 0.0, "an unknown_kid fetch before the rotation");
    let kid = w.o.rotate();
    let rotated = w.o.token("gold-svc", POOL_A);
    assert_eq!(header_of(&rotated)["kid"], kid.as_str());
    w.bind_ok(w.client(), &rotated, "the first token of the new key");
    // A second token of the new key needs no fetch: the kid is known now.
    w.bind_ok(
        w.client(),
        &w.o.token("gold-svc", POOL_A),
        "the second token of the new key",
    );
    let after = w.o.counts();
    assert_eq!(
        after.jwks - before.jwks,
        1,
        "JWKS fetches the provider served for the rotation: {before:?} → {after:?}"
    );
    let text = w.metrics();
    assert_eq!(
        metric(
            &text,
            "tollgate_issuer_fetches_total",
            &[
                ("issuer", "idp"),
                ("trigger", "unknown_kid"),
                ("outcome", "ok")
            ]
        ),
        1.0,
        "{}",
        text.lines()
            .filter(|l| l.contains("tollgate_issuer_fetches_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let idp = w.issuer("idp");
    let kids = idp["kids"].as_array().expect("kids");
    assert!(
        kids.contains(&json!(kid)) && kids.contains(&json!("rs256-1")),
        "status should show the new kid {kid} and the old one: {idp}"
    );
}

/// The provider stops: a token of a key the node has still binds; after `max_stale` the
/// issuer fails closed with `keys_unavailable` (HTTP 503); the provider comes back and binds
/// work again with no restart.
#[test]
fn an_outage_serves_known_keys_until_max_stale_then_fails_closed_and_recovers() {
    const MAX_STALE_S: u64 = 6;
    const CACHE_MAX_S: u64 = 2;
    let mut w = World::new(ProviderSpec::new("RS256", clients()), false, |o| {
        vec![idp(
            o,
            Fetch {
                cache_min_s: Some(1),
                cache_max_s: Some(CACHE_MAX_S),
                refetch_cooldown_s: Some(1),
                max_stale_s: Some(MAX_STALE_S),
                ..Fetch::default()
            },
        )]
    });
    let _agent = w.start();
    let tokens: Vec<String> = (0..3).map(|_| w.o.token("gold-svc", POOL_A)).collect();
    w.bind_ok(w.client(), &tokens[0], "before the outage");
    w.o.stop_provider();
    let stopped = Instant::now();
    w.bind_ok(w.client(), &tokens[1], "a known key during the outage");
    // Polled, bounded: the issuer must turn unavailable, and not before its keys are
    // max_stale old (they were fetched at most cache_max_s before the stop).
    let refused = wait_for(
        Duration::from_secs(MAX_STALE_S + 15),
        Duration::from_millis(500),
        || {
            let (code, reason) = w.refusal(w.client(), &tokens[2]);
            (code != 200).then_some((code, reason, stopped.elapsed()))
        },
    );
    let (code, reason, after) = refused.expect("still binding long after max_stale");
    assert_eq!((code, reason.as_str()), (503, "keys_unavailable"));
    let idp = w.issuer("idp");
    assert_eq!(
        (&idp["stale"], &idp["unavailable"]),
        (&json!(true), &json!(true)),
        "{idp}"
    );
    assert!(
        after >= Duration::from_secs(MAX_STALE_S - CACHE_MAX_S),
        "refused {after:?} after the stop, before the keys can be {MAX_STALE_S} s old"
    );
    let text = w.metrics();
    assert!(
        metric(
            &text,
            "tollgate_issuer_fetches_total",
            &[("issuer", "idp"), ("outcome", "connect")]
        ) >= 1.0,
        "no failed fetch counted during the outage"
    );
    w.o.start_provider();
    let back = wait_for(Duration::from_secs(20), Duration::from_millis(500), || {
        (w.bind(w.client(), &tokens[2]).0 == 200).then_some(())
    });
    assert!(
        back.is_some(),
        "binds did not work again after the provider came back: {}",
        w.issuers()
    );
    w.bind_ok(
        w.client(),
        &w.o.token("silver-svc", POOL_A),
        "a fresh token after the outage",
    );
}

/// A node restarted while the provider is down verifies from the JWKS it persisted.
#[test]
fn a_node_restarted_during_an_outage_verifies_from_persisted_keys() {
    let mut w = World::new(ProviderSpec::new("RS256", clients()), false, |o| {
        vec![idp(o, Fetch::default())]
    });
    let agent = w.start();
    let later = w.o.token("gold-svc", POOL_A);
    bind_at_plan(&w, "silver-svc", w.client(), "silver");
    let persisted = w.dirs.state_dir.join("jwks/idp.json");
    assert!(
        persisted.is_file(),
        "no persisted JWKS at {}",
        persisted.display()
    );
    w.o.stop_provider();
    let exit = agent.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    let _agent = w.start();
    w.bind_ok(w.client(), &later, "after a restart during the outage");
    // `token verify` falls back on the same persisted keys, and says so.
    let shown = w
        .token_verify(&later)
        .expect("token verify during the outage");
    assert_eq!(shown["plan"], "gold", "{shown}");
    assert_eq!(w.identity("idp:gold-svc")["plan"], "gold");
}

/// 1 000 tokens with random kids cause at most one JWKS fetch per cooldown (counted at the
/// provider), and good tokens bind meanwhile from another client.
#[test]
fn random_kids_cost_at_most_one_fetch_per_cooldown() {
    const COOLDOWN_S: u64 = 2;
    const THREADS: usize = 8;
    // TOLLGATE_LONG=1: ten times as many, over more cooldowns.
    let long = std::env::var_os("TOLLGATE_LONG").is_some_and(|v| v == "1");
    let flood_n: usize = if long { 10_000 } else { 1000 };
    let w = World::new(ProviderSpec::new("RS256", clients()), true, |o| {
        vec![idp(
            o,
            Fetch {
                cache_min_s: Some(3600),
                cache_max_s: Some(3600),
                refetch_cooldown_s: Some(COOLDOWN_S),
                ..Fetch::default()
            },
        )]
    });
    let _agent = w.start();
    bind_at_plan(&w, "gold-svc", &w.second().ns, "gold");
    let key =
        mint(&json!({"keys": [{"kid": "flood", "alg": "RS256"}]}))["private"]["flood"].clone();
    let now = now_s();
    let flood = mint(
        &json!({"flood": {"key": key, "alg": "RS256", "count": flood_n, "claims": {
            "iss": w.o.issuer, "aud": POOL_A, "client_id": "gold-svc", "sub": "gold-svc",
            "groups": ["gold"], "realm_access": {"roles": ["tollgate-bind"]},
            "iat": now, "exp": now + 300,
        }}}),
    );
    let flood: Vec<String> = flood["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token").to_owned())
        .collect();
    let good: Vec<String> = (0..if long { 40 } else { 6 })
        .map(|_| w.o.token("gold-svc", POOL_A))
        .collect();
    let before = w.o.counts();
    let t0 = Instant::now();
    let cfg = tls_client(&w.o.ca.pem);
    let server = IpAddr::V4(w.o.lab.server_v4);
    let chunks: Vec<Vec<String>> = flood
        .chunks(flood_n / THREADS)
        .map(<[String]>::to_vec)
        .collect();
    let senders: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let cfg = Arc::clone(&cfg);
            w.client().spawn(move || {
                let mut codes = BTreeMap::<u16, usize>::new();
                for token in &chunk {
                    let addr = SocketAddr::new(server, BIND_PORT);
                    let code = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .map_or(0, |tcp| post_bind(&cfg, tcp, server, token));
                    *codes.entry(code).or_default() += 1;
                }
                codes
            })
        })
        .collect();
    // Good binds while the flood runs, from the second client: each must succeed. At least
    // three, then until the flood is over or the tokens are.
    let mut good_codes = Vec::new();
    for token in &good {
        if good_codes.len() >= 3 && senders.iter().all(std::thread::JoinHandle::is_finished) {
            break;
        }
        good_codes.push(w.bind(&w.second().ns, token));
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut codes = BTreeMap::<u16, usize>::new();
    for s in senders {
        for (code, n) in s.join().expect("flood thread") {
            *codes.entry(code).or_default() += n;
        }
    }
    let elapsed = t0.elapsed();
    let after = w.o.counts();
    let fetched = after.jwks - before.jwks;
    let bound = elapsed.as_secs() / COOLDOWN_S + 1;
    eprintln!(
        "{flood_n} random kids in {elapsed:?}: {codes:?}; JWKS fetches at the provider: {fetched}"
    );
    assert!(
        fetched <= bound,
        "{fetched} JWKS fetches for {flood_n} random kids in {elapsed:?}: more than one per \
         {COOLDOWN_S} s cooldown (at most {bound})"
    );
    assert!(fetched >= 1, "the first unknown kid fetched nothing");
    assert_eq!(codes.get(&200), None, "a random-kid token bound: {codes:?}");
    assert_eq!(
        codes.get(&401).copied().unwrap_or(0),
        flood_n,
        "every random-kid token refused (401): {codes:?}"
    );
    for (code, body) in &good_codes {
        assert_eq!(*code, 200, "a good bind during the flood failed: {body}");
    }
    let idp = w.issuer("idp");
    assert!(
        // Each fetch may be joined by every sender's request in flight instead.
        idp["refetches_suppressed"].as_u64() >= Some(flood_n as u64 - bound * (THREADS as u64 + 1)),
        "status counts too few refetches held back by the cooldown: {idp}"
    );
    let text = w.metrics();
    let agent_fetches = metric(
        &text,
        "tollgate_issuer_fetches_total",
        &[("issuer", "idp"), ("trigger", "unknown_kid")],
    );
    assert!(
        agent_fetches <= bound as f64,
        "the agent counts {agent_fetches} unknown_kid fetches (at most {bound})"
    );
    assert!(
        metric(
            &text,
            "tollgate_issuer_refusals_total",
            &[("issuer", "idp"), ("reason", "unknown_kid")]
        ) >= flood_n as f64,
        "the random kids are not counted as refusals of issuer idp"
    );
}

/// Tokens minted by `jose` (and node:crypto for the RSA key jose will not make): one request
/// for the minter, its answer by index.
fn mint_tokens(specs: Vec<Value>) -> Vec<String> {
    mint(&json!({ "tokens": specs }))["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token").to_owned())
        .collect()
}

/// `tollgate config check` on a copy of the config with `edit` applied to its first issuer:
/// (exit status success, stderr).
fn config_check(config: &Path, edit: impl FnOnce(&mut toml::Table)) -> (bool, String) {
    let mut table: toml::Table = std::fs::read_to_string(config)
        .expect("config")
        .parse()
        .expect("toml");
    let first = table["tokens"]["issuers"]
        .as_array_mut()
        .and_then(|a| a.first_mut())
        .and_then(toml::Value::as_table_mut)
        .expect("an issuer");
    edit(first);
    let path = config.with_file_name("edited.toml");
    std::fs::write(&path, toml::to_string(&table).expect("toml")).expect("edited config");
    let out = std::process::Command::new(tollgate_bin())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("config check");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// At least fifteen refusals, each with its label: tokens of the provider whose claims do not
/// map, tokens minted by `jose` against a second issuer with a JWKS file of minted keys (an
/// RSA key of 1024 bits, an EC key, an encryption key, a key whose window is over), and key
/// sources that fail: JWKS over plain HTTP (config check), a JWKS over its size limit, a JWKS
/// that is not JSON (the old keys kept), a discovery document naming another issuer.
#[test]
fn refusals_from_independently_minted_tokens_each_carry_their_label() {
    let now = now_s();
    let minted = mint(&json!({"keys": [
        {"kid": "rs-good", "alg": "RS256"},
        {"kid": "rs-1024", "alg": "RS256", "bits": 1024},
        {"kid": "ec-1", "alg": "ES256"},
        {"kid": "enc-1", "alg": "RS256", "use": "enc"},
        {"kid": "rs-old", "alg": "RS256", "exp": 1_000_000_000u64},
    ]}));
    let rogue =
        mint(&json!({"keys": [{"kid": "rs-good", "alg": "RS256"}]}))["private"]["rs-good"].clone();
    let key = |kid: &str| minted["private"][kid].clone();
    let w = World::new(ProviderSpec::new("RS256", clients()), false, |o| {
        let jwks = o.dir().join("minted-jwks.json");
        std::fs::write(&jwks, minted["jwks"].to_string()).expect("minted jwks");
        vec![
            idp(
                o,
                Fetch {
                    refetch_cooldown_s: Some(1),
                    ..Fetch::default()
                },
            ),
            Issuer::jwks_file("minted", &format!("{}/minted", o.issuer), POOL_A, &jwks).claims(
                Claims {
                    identity: Some("sub".into()),
                    class: Some(class_customer()),
                    plan: Some(ValueRule::Map {
                        claim: "plan".into(),
                        values: Values::default(),
                        default: Some("customer".into()),
                        unmapped: None,
                    }),
                    ..Claims::default()
                },
            ),
            // The provider's JWKS padded past 1 MiB: over the 256 KiB default limit.
            Issuer::jwks_url(
                "big",
                &format!("{}/big", o.issuer),
                POOL_A,
                &format!("{}/jwks?pad=1", o.issuer),
            ),
            // Configured with a trailing slash, which the provider's discovery does not have.
            Issuer::discovery("slash", &format!("{}/", o.issuer), POOL_A),
        ]
    });
    let _agent = w.start();
    let iss_minted = format!("{}/minted", w.o.issuer);
    let claims = |iss: &str| {
        json!({"iss": iss, "aud": POOL_A, "sub": "minted-svc", "jti": format!("m-{iss}-{now}"),
               "iat": now, "exp": now + 120})
    };
    let good = claims(&iss_minted);
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().expect("patch") {
            c[k] = v.clone();
        }
        c
    };
    let specs: Vec<(&str, Value, &str)> = vec![
        (
            "RSA key of 1024 bits",
            json!({"key": key("rs-1024"), "claims": good}),
            "key_unusable",
        ),
        (
            "alg the key does not pin (PS256 on an RS256 key)",
            json!({"key": key("rs-good"), "alg": "PS256", "claims": good}),
            "alg_mismatch",
        ),
        (
            "RS256 against the EC key's kid",
            json!({"key": key("rs-good"), "header": {"kid": "ec-1"}, "claims": good}),
            "alg_mismatch",
        ),
        (
            "iss of another issuer",
            json!({"key": key("rs-good"), "claims": claims(&format!("{}/partner", w.o.issuer))}),
            "wrong_issuer",
        ),
        (
            "iss with a trailing slash",
            json!({"key": key("rs-good"), "claims": claims(&format!("{iss_minted}/"))}),
            "wrong_issuer",
        ),
        (
            "aud of another pool",
            json!({"key": key("rs-good"), "claims": with(json!({"aud": POOL_B}))}),
            "wrong_audience",
        ),
        (
            "larger than max_token_bytes",
            json!({"key": key("rs-good"), "claims": with(json!({"pad": "x".repeat(5000)}))}),
            "oversized",
        ),
        (
            "key whose window is over",
            json!({"key": key("rs-old"), "claims": good}),
            "key_outside_window",
        ),
        (
            "encryption key's kid",
            json!({"key": key("enc-1"), "claims": good}),
            "key_unusable",
        ),
        (
            "alg none",
            json!({"key": null, "alg": "none", "header": {"kid": "rs-good"}, "claims": good}),
            "alg_none",
        ),
        (
            "HS256 keyed with the public modulus",
            json!({"key": null, "alg": "HS256", "header": {"kid": "rs-good"},
                   "hmac_secret": minted["jwks"]["keys"][0]["n"], "claims": good}),
            "alg_hmac",
        ),
        (
            "signed by another key under a trusted kid",
            json!({"key": rogue, "claims": good}),
            "bad_signature",
        ),
        (
            "expired",
            json!({"key": key("rs-good"), "claims": with(json!({"iat": now - 600, "exp": now - 300}))}),
            "expired",
        ),
        (
            "kid no key of a file issuer has",
            json!({"key": key("rs-good"), "header": {"kid": "nope"}, "claims": good}),
            "unknown_kid",
        ),
        (
            "issuer whose discovery names another issuer",
            json!({"key": key("rs-good"), "claims": claims(&format!("{}/", w.o.issuer))}),
            "keys_unavailable",
        ),
    ];
    let tokens = mint_tokens(specs.iter().map(|(_, s, _)| s.clone()).collect());
    let mut cases: Vec<(String, String, &str)> = specs
        .iter()
        .zip(tokens)
        .map(|((what, _, label), t)| ((*what).to_owned(), t, *label))
        .collect();
    // The provider's own tokens whose claims do not map.
    for (client, what, label) in [
        (
            "nogroups-svc",
            "mapped claim (groups) missing",
            "missing_claim",
        ),
        (
            "bronze-svc",
            "mapped value (bronze) unknown",
            "unmapped_value",
        ),
        ("noroles-svc", "nested roles path absent", "missing_roles"),
    ] {
        cases.push((what.into(), w.o.token(client, POOL_A), label));
    }
    let mut failures = Vec::new();
    for (what, token, label) in &cases {
        let (code, reason) = w.refusal(w.client(), token);
        let want = if *label == "keys_unavailable" {
            503
        } else {
            401
        };
        if (code, reason.as_str()) != (want, *label) {
            failures.push(format!(
                "{what}: HTTP {code} {reason:?}, expected {want} {label}"
            ));
        }
    }
    // The same minter's good tokens bind, so the refusals are about what each case changed.
    let goods = mint_tokens(vec![
        json!({"key": key("rs-good"), "claims": with(json!({"sub": "minted-rsa"}))}),
        json!({"key": key("ec-1"), "claims": with(json!({"sub": "minted-ec"}))}),
    ]);
    for (t, what) in goods.iter().zip(["minted RS256", "minted ES256"]) {
        let (code, body) = w.bind(w.client(), t);
        if code != 200 {
            failures.push(format!("{what} good token: HTTP {code} {body}"));
        }
    }
    // Key sources that fail, each with its fetch outcome; the keys that do verify stay.
    let minted_status = w.issuer("minted");
    let skipped: Vec<(String, String)> = minted_status["skipped"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|k| {
                    let s = |f: &str| k[f].as_str().unwrap_or("").to_owned();
                    (s("kid"), s("reason"))
                })
                .collect()
        })
        .unwrap_or_default();
    for (kid, reason) in [("rs-1024", "rsa_key_size"), ("enc-1", "encryption_key")] {
        if !skipped.contains(&(kid.into(), reason.into())) {
            failures.push(format!(
                "minted: {kid} not skipped as {reason}: {minted_status}"
            ));
        }
    }
    let mut usable = minted_status["kids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    usable.sort_by_key(ToString::to_string);
    if usable != [json!("ec-1"), json!("rs-good"), json!("rs-old")] {
        failures.push(format!("minted: usable kids {usable:?}"));
    }
    let outcome = |name: &str| w.issuer(name)["last_fetch"]["outcome"].clone();
    for (name, want) in [("big", "too_large"), ("slash", "issuer_mismatch")] {
        if outcome(name) != want {
            failures.push(format!(
                "{name}: last fetch outcome {}, expected {want}: {}",
                outcome(name),
                w.issuer(name)
            ));
        }
    }
    // A JWKS that is not JSON: the refetch an unknown kid triggers fails, the old keys stay.
    w.o.jwks_mode("not_json");
    std::thread::sleep(Duration::from_millis(1100)); // past the 1 s cooldown of the start fetch
    let random = mint_tokens(vec![
        json!({"key": key("rs-good"), "header": {"kid": "not-published"},
               "claims": with(json!({"iss": w.o.issuer, "client_id": "gold-svc"}))}),
    ]);
    let (code, reason) = w.refusal(w.client(), &random[0]);
    if (code, reason.as_str()) != (401, "unknown_kid") {
        failures.push(format!("unknown kid at the provider: HTTP {code} {reason}"));
    }
    if outcome("idp") != "not_json" {
        failures.push(format!(
            "idp: last fetch outcome {}, expected not_json",
            outcome("idp")
        ));
    }
    let (code, body) = w.bind(w.client(), &w.o.token("gold-svc", POOL_A));
    if code != 200 {
        failures.push(format!(
            "idp after a not-JSON JWKS: old keys not kept: {code} {body}"
        ));
    }
    w.o.jwks_mode("normal");
    // A request head over the listener's 16 KiB (a 17 KiB bearer token): 413 before any
    // token check, whatever tokens.max_token_bytes says.
    let (code, body) = w.bind(w.client(), &"x".repeat(17 * 1024));
    if code != 413 || body["error"] != "request head too large" || body.get("reason").is_some() {
        failures.push(format!("oversized request head: HTTP {code} {body}"));
    }
    // JWKS over plain HTTP: refused at config check, naming the key.
    let (ok, text) = config_check(&w.config, |i| {
        i.remove("discovery");
        i.insert(
            "jwks_url".into(),
            format!("http://{}/jwks", w.o.addr).into(),
        );
    });
    if ok || !text.contains("https") || !text.contains("jwks_url") {
        failures.push(format!(
            "config check with an http jwks_url: ok={ok}: {text}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The token refusals, and the config check, too_large, issuer_mismatch, not_json and 413.
    let labelled = cases.len() + 5;
    assert!(labelled >= 15, "only {labelled} refusals");
    // Every token refusal is counted under its label and in the audit log.
    let text = w.metrics();
    assert!(
        metric(
            &text,
            "tollgate_listener_refusals_total",
            &[("listener", "bind"), ("reason", "too_large")]
        ) >= 1.0,
        "the 413 is not counted in tollgate_listener_refusals_total"
    );
    let audit = std::fs::read_to_string(w.dirs.state_dir.join("audit.log")).unwrap_or_default();
    for (what, _, label) in &cases {
        assert!(
            metric(
                &text,
                "tollgate_issuer_refusals_total",
                &[("reason", label)]
            ) >= 1.0,
            "{what}: tollgate_issuer_refusals_total{{reason=\"{label}\"}} missing"
        );
        assert!(
            audit.contains(&format!("\"reason\":\"{label}\"")),
            "{what}: no audit line with reason {label}"
        );
    }
}

/// `n - s` for a 32-byte big-endian `s` below P-256's group order `n`: the other half of an
/// ECDSA signature's malleable pair.
fn p256_negate(s: &[u8]) -> Vec<u8> {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        out[i] = (d + 256 * borrow) as u8;
    }
    out
}

/// Sets `key = value` in `[tokens.issuers.claims]` of the issuer `name` in the written config.
fn set_claim_rule(config: &Path, name: &str, key: &str, value: toml::Value) {
    let mut table: toml::Table = std::fs::read_to_string(config)
        .expect("config")
        .parse()
        .expect("toml");
    let issuer = table["tokens"]["issuers"]
        .as_array_mut()
        .and_then(|a| a.iter_mut().find(|i| i["name"].as_str() == Some(name)))
        .and_then(toml::Value::as_table_mut)
        .expect("the issuer");
    let claims = issuer
        .entry("claims")
        .or_insert_with(|| toml::Table::new().into());
    claims
        .as_table_mut()
        .expect("claims table")
        .insert(key.into(), value);
    std::fs::write(config, toml::to_string(&table).expect("toml")).expect("config");
}

/// Tokens without `jti`, minted by `jose`: Entra ID-shaped (its id is `uti`) against an issuer
/// with `token_id = "uti"`, Dex-shaped (no id at all) against one with `derive_token_id =
/// true`. Both bind (with no class or plan rule: `[tokens]`' defaults place them); replay
/// detection and revocation key on their ids: the uti token and the Dex token with its ECDSA
/// signature malleated to `(r, n - s)` are refused `replay` from a second address, and
/// `tollgate token revoke --token-id dex:sha256:…` (the id in issuer dex's namespace) removes
/// the derived id's binding.
#[test]
fn tokens_without_jti_bind_by_uti_or_a_derived_id() {
    let now = now_s();
    let minted = mint(&json!({"keys": [{"kid": "ec-1", "alg": "ES256"}]}));
    let w = World::new(ProviderSpec::new("RS256", clients()), true, |o| {
        let jwks = o.dir().join("minted-jwks.json");
        std::fs::write(&jwks, minted["jwks"].to_string()).expect("minted jwks");
        ["entra", "dex"]
            .iter()
            .map(|n| Issuer::jwks_file(n, &format!("{}/{n}", o.issuer), POOL_A, &jwks))
            .collect()
    });
    set_claim_rule(&w.config, "entra", "token_id", "uti".into());
    set_claim_rule(&w.config, "dex", "derive_token_id", true.into());
    let _agent = w.start();
    let claims = |issuer: &str, sub: &str, extra: Value| {
        let mut c = json!({"iss": format!("{}/{issuer}", w.o.issuer), "aud": POOL_A,
                           "sub": sub, "iat": now, "exp": now + 120});
        for (k, v) in extra.as_object().expect("extra") {
            c[k] = v.clone();
        }
        json!({"key": minted["private"]["ec-1"], "claims": c})
    };
    let uti = format!("uti-{now}");
    let tokens = mint_tokens(vec![
        claims("entra", "entra-svc", json!({"uti": uti})),
        claims("entra", "entra-none", json!({})),
        claims("dex", "dex-svc", json!({"groups": ["gold"]})),
    ]);
    let (entra, entra_none, dex) = (&tokens[0], &tokens[1], &tokens[2]);
    assert!(claims_of(entra).get("jti").is_none() && claims_of(dex).get("jti").is_none());

    let body = w.bind_ok(w.client(), entra, "uti token");
    assert_eq!(body["token_id"], format!("entra:{uti}"), "{body}");
    assert_eq!(
        w.identity("entra:entra-svc")["plan"],
        "customer",
        "[tokens] default_plan"
    );
    assert_eq!(w.refusal(&w.second().ns, entra), (403, "replay".into()));
    assert_eq!(
        w.refusal(w.client(), entra_none),
        (401, "missing_jti".into())
    );

    let body = w.bind_ok(w.client(), dex, "id-less token");
    let id = body["token_id"].as_str().expect("token_id").to_owned();
    assert!(id.starts_with("dex:sha256:") && id.len() == 33, "{body}");
    // The same token, the same id: a rebind from its address is not a new token.
    assert_eq!(w.bind_ok(w.client(), dex, "again")["token_id"], id.as_str());
    // Its malleated twin verifies too, and has the same id: replay from another address.
    let (signed, sig) = dex.rsplit_once('.').expect("jws");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let sig = b64.decode(sig).expect("signature");
    let mut twin_sig = sig[..32].to_vec();
    twin_sig.extend(p256_negate(&sig[32..]));
    let twin = format!("{signed}.{}", b64.encode(&twin_sig));
    assert_eq!(w.refusal(&w.second().ns, &twin), (403, "replay".into()));
    // The derived id is what revocation takes.
    let out = w.dirs.cli_ok(&[
        "token",
        "revoke",
        "--token-id",
        &id,
        "--reason",
        "derived id",
    ]);
    assert!(
        out.contains(&format!("bindings_removed={}/32", w.o.lab.client_v4)),
        "{out}"
    );
    assert_eq!(w.refusal(w.client(), dex), (403, "revoked".into()));
}

/// Appends a static `[[identities]]` entry to the written config.
fn add_identity(config: &Path, name: &str, class: &str, plan: &str, bind: &str) {
    let mut table: toml::Table = std::fs::read_to_string(config)
        .expect("config")
        .parse()
        .expect("toml");
    let mut entry = toml::Table::new();
    for (k, v) in [("name", name), ("class", class), ("plan", plan)] {
        entry.insert(k.into(), v.into());
    }
    entry.insert("bind".into(), toml::Value::Array(vec![bind.into()]));
    table
        .entry("identities")
        .or_insert_with(|| toml::Value::Array(Vec::new()))
        .as_array_mut()
        .expect("identities")
        .push(entry.into());
    std::fs::write(config, toml::to_string(&table).expect("toml")).expect("config");
}

/// Identities are namespaced by issuer (review 13b, must-fix 1). A partner issuer (limited
/// to class customer) whose token names the static internal identity `batch-cluster` gets
/// `partner:batch-cluster`, placed by the partner's rules, not the internal identity; the
/// static `partner:trusted` (internal) it may name is refused `unplaceable`, outside its
/// classes. Two issuers minting `sub = trainer` are two identities, revoked one at a time
/// (`--identity partner:trainer`), and token ids are namespaced too (`--token-id corp:…`).
#[test]
fn a_partner_issuer_cannot_name_a_static_or_another_issuers_identity() {
    let now = now_s();
    let minted = mint(&json!({"keys": [{"kid": "ec-1", "alg": "ES256"}]}));
    let w = World::new(ProviderSpec::new("RS256", clients()), true, |o| {
        let jwks = o.dir().join("minted-jwks.json");
        std::fs::write(&jwks, minted["jwks"].to_string()).expect("minted jwks");
        vec![
            Issuer::jwks_file("corp", &format!("{}/corp", o.issuer), POOL_A, &jwks),
            Issuer::jwks_file("partner", &format!("{}/partner", o.issuer), POOL_A, &jwks)
                .classes(&["customer"]),
        ]
    });
    add_identity(
        &w.config,
        "batch-cluster",
        "internal",
        "gold",
        "198.19.200.10",
    );
    add_identity(
        &w.config,
        "partner:trusted",
        "internal",
        "gold",
        "198.19.200.11",
    );
    let _agent = w.start();
    let token = |issuer: &str, sub: &str| {
        json!({"key": minted["private"]["ec-1"], "claims": {
            "iss": format!("{}/{issuer}", w.o.issuer), "aud": POOL_A, "sub": sub,
            "jti": format!("{issuer}-{sub}-{now}"), "iat": now, "exp": now + 120}})
    };
    let tokens = mint_tokens(vec![
        token("partner", "batch-cluster"),
        token("partner", "trusted"),
        token("corp", "trainer"),
        token("partner", "trainer"),
    ]);
    let (takeover, trusted, corp, partner) = (&tokens[0], &tokens[1], &tokens[2], &tokens[3]);

    let body = w.bind_ok(w.client(), takeover, "a partner token naming batch-cluster");
    assert_eq!(body["identity"], "partner:batch-cluster", "{body}");
    let shown = w.identity("partner:batch-cluster");
    assert_eq!(
        (shown["class"].as_str(), shown["plan"].as_str()),
        (Some("customer"), Some("customer")),
        "placed by the partner's rules: {shown}"
    );
    let statik = w.identity("batch-cluster");
    assert_eq!(statik["class"], "internal", "{statik}");
    assert!(
        !statik.to_string().contains(&w.o.lab.client_v4.to_string()),
        "the static identity gained the partner's address: {statik}"
    );
    assert_eq!(w.refusal(w.client(), trusted), (422, "unplaceable".into()));

    // One sub, two issuers: two identities, each with its own binding.
    let c = w.bind_ok(w.client(), corp, "corp's trainer");
    let p = w.bind_ok(&w.second().ns, partner, "partner's trainer");
    assert_eq!(
        [
            &c["identity"],
            &c["token_id"],
            &p["identity"],
            &p["token_id"]
        ],
        [
            &json!("corp:trainer"),
            &json!(format!("corp:corp-trainer-{now}")),
            &json!("partner:trainer"),
            &json!(format!("partner:partner-trainer-{now}")),
        ]
    );
    assert_eq!(w.identity("corp:trainer")["class"], "customer");
    // Revoking partner:trainer leaves corp:trainer bound.
    let out = w.dirs.cli_ok(&[
        "token",
        "revoke",
        "--identity",
        "partner:trainer",
        "--reason",
        "partner client compromised",
    ]);
    let second = w.second().client_v4;
    assert!(
        out.contains(&format!("bindings_removed={second}/32")),
        "{out}"
    );
    assert_eq!(w.refusal(&w.second().ns, partner), (403, "revoked".into()));
    w.bind_ok(w.client(), corp, "corp's trainer again");
    // Token ids are revoked by their namespaced form.
    let out = w.dirs.cli_ok(&[
        "token",
        "revoke",
        "--token-id",
        &format!("corp:corp-trainer-{now}"),
        "--reason",
        "rotated",
    ]);
    assert!(
        out.contains(&format!("bindings_removed={}/32", w.o.lab.client_v4)),
        "{out}"
    );
    assert_eq!(w.refusal(w.client(), corp), (403, "revoked".into()));
}
