//! The typed config builder (`tollgate_tests::config`): a configuration with every section
//! renders to TOML that the real agent accepts, so the builder cannot drift from the schema
//! unnoticed.

use std::net::Ipv4Addr;

use tollgate_tests::{
    agent::{AgentDirs, tollgate_bin},
    config::{
        Anomaly, Claims, Config, Controller, Endpoint, Fetch, Identity, Issuer, Plan, Port,
        Thresholds, Tokens, ValueRule,
    },
    tokenlab::{AUDIENCE, BIND_PORT, MODEL_PORT, TokenKit},
};

/// Every section and nearly every key, each set to a value the agent accepts.
fn every_section(dirs: &AgentDirs, kit: &TokenKit) -> Config {
    let server = Ipv4Addr::new(198, 18, 0, 2);
    let mut c = Config::new(&["tg-builder0"])
        .anonymous(20, 40)
        .drop_events(100)
        .controller(Controller {
            interval_ms: Some(250),
            pressure: Some(1.5),
            saturate_at: Some(0.9),
            recover_at: Some(0.75),
            recover_after: Some(4),
            hold_back_floor: Some(0.1),
            ..Controller::simulated(&dirs.state_dir.join("gpu.json"))
        })
        .listen_bind(std::net::SocketAddr::from((server, BIND_PORT)))
        .listen_metrics("127.0.0.1:9464")
        .tokens(Tokens {
            jwks: kit.jwks.clone(),
            audience: AUDIENCE.into(),
            tls_cert: kit.ca.clone(),
            tls_key: kit.tls_key.clone(),
            max_ttl_s: Some(600),
            clock_skew_s: Some(2),
            max_token_bytes: Some(4096),
            identity_claim: Some("sub".into()),
            class_claim: Some("class".into()),
            plan_claim: Some("plan".into()),
            roles_claim: Some("roles".into()),
            default_class: Some("customer".into()),
            default_plan: Some("customer".into()),
            issuer: Some("https://tollgate.example".into()),
            fetch: Fetch {
                ca_bundle: Some(kit.ca.clone()),
                jwks_max_bytes: Some(65536),
                fetch_timeout_ms: Some(2000),
                cache_min_s: Some(10),
                cache_max_s: Some(600),
                refetch_cooldown_s: Some(15),
                max_stale_s: Some(3600),
            },
            issuers: vec![
                Issuer::discovery("corp", "https://idp.example/realms/corp", AUDIENCE).claims(
                    Claims {
                        identity: Some("client_id".into()),
                        roles: Some("realm_access.roles".into()),
                        roles_format: Some("array".into()),
                        roles_required: Some(true),
                        class: Some(
                            ValueRule::map("groups", &[("staff", "internal")])
                                .or_default("customer", true),
                        ),
                        plan: Some(ValueRule::map(
                            "groups",
                            &[("staff", "internal"), ("paying", "customer")],
                        )),
                    },
                ),
                Issuer::jwks_url(
                    "partner",
                    "https://idp.partner.example/",
                    AUDIENCE,
                    "https://idp.partner.example/keys",
                )
                .ca_bundle(&kit.ca)
                .classes(&["partner", "customer"])
                .fetch(Fetch {
                    cache_max_s: Some(300),
                    max_stale_s: Some(600),
                    ..Fetch::default()
                })
                .claims(Claims {
                    roles: Some("scope".into()),
                    roles_format: Some("scope".into()),
                    class: Some(ValueRule::Path("tier".into())),
                    ..Claims::default()
                }),
                Issuer::jwks_file("files", "https://files.example", AUDIENCE, &kit.jwks),
            ],
        })
        .anomaly(Anomaly {
            internal: Some(Thresholds {
                throttle_score: Some(8.0),
                quarantine_score: Some(16.0),
            }),
            partner: Some(Thresholds {
                throttle_score: Some(6.0),
                quarantine_score: Some(12.0),
            }),
            customer: Some(Thresholds {
                throttle_score: Some(4.0),
                quarantine_score: Some(8.0),
            }),
            ..Anomaly::quick("shadow")
        })
        .top_k(10)
        .plan(Plan::new("internal").priority(100))
        .plan(
            Plan {
                quota_minute_bytes: Some(1_000_000),
                quota_day_bytes: Some(100_000_000),
                quota_month_bytes: Some(1_000_000_000),
                quota_minute_cost: Some(1_000_000),
                quota_day_cost: Some(100_000_000),
                quota_month_cost: Some(1_000_000_000),
                ..Plan::new("customer")
            }
            .priority(10)
            .packets(1000, 100)
            .bytes(1_000_000, 100_000),
        )
        .endpoint(
            Endpoint::new(
                "model",
                "tcp",
                vec![MODEL_PORT.into(), Port::range(8001, 8002)],
                &["internal", "customer"],
            )
            .roles(&["inference"])
            .weight(2.0)
            .gpus(&[0])
            .destinations(&["198.18.0.0/24", "2001:db8::/64"]),
        )
        .endpoint(
            Endpoint::tcp("bind", BIND_PORT, &tollgate_tests::tokenlab::BIND_CLASSES).anonymous(),
        )
        .identity(
            Identity::new(
                "ops",
                "internal",
                "internal",
                &["198.18.0.10", "2001:db8::10"],
            )
            .roles(&["inference"]),
        )
        .identity(Identity::new(
            "acme",
            "customer",
            "customer",
            &["198.18.1.0/24"],
        ));
    c.node.xdp_mode = Some("generic".into());
    c.node.pin_dir = Some(dirs.pin_dir.clone());
    c.node.state_dir = Some(dirs.state_dir.clone());
    c.node.control_socket = Some(dirs.socket.clone());
    c.node.control_group = Some("root".into());
    c.node.kernel_log = Some("warn".into());
    c.node.tunnels = Some("enforce".into());
    c
}

#[test]
fn a_builder_config_with_every_section_is_accepted_by_the_agent() {
    let dirs = AgentDirs::new();
    let kit = TokenKit::new(&dirs, Ipv4Addr::new(198, 18, 0, 2));
    let config = every_section(&dirs, &kit);
    let text = config.render();
    for section in [
        "[node]",
        "[anonymous]",
        "[drop_events]",
        "[controller]",
        "[listen]",
        "[tokens]",
        "[[tokens.issuers]]",
        "[tokens.issuers.claims]",
        "[anomaly]",
        "[anomaly.internal]",
        "[anomaly.partner]",
        "[anomaly.customer]",
        "[metrics]",
        "[[plans]]",
        "[[endpoints]]",
        "[[identities]]",
    ] {
        assert!(text.contains(section), "no {section} in:\n{text}");
    }
    // The agent's own parser, as a library ...
    let parsed = match tollgate::config::Config::parse(&text, "builder") {
        Ok(c) => c,
        Err(e) => panic!("the agent refused the builder's config: {e}\n{text}"),
    };
    // ... which kept the issuers, and a value map's order, as the builder wrote them ...
    let t = parsed.tokens.expect("tokens");
    let names: Vec<&str> = t.issuers.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["default", "corp", "partner", "files"], "{text}");
    let plan = &t.issuer("corp").expect("corp").claims.plan.values;
    assert_eq!(
        plan.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["staff", "paying"],
        "{text}"
    );
    // ... and as `tollgate config check`, the operator's command.
    let path = config.write(&dirs.state_dir.join("every-section.toml"));
    let out = std::process::Command::new(tollgate_bin())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("tollgate config check");
    assert!(
        out.status.success(),
        "config check refused the builder's config ({}): {}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn optional_keys_left_unset_are_not_written() {
    let text = Config::new(&["eth0"])
        .plan(Plan::new("free"))
        .endpoint(Endpoint::udp("model", 7000, &["customer"]))
        .render();
    assert!(
        !text.contains("priority") && !text.contains("weight"),
        "{text}"
    );
    assert!(
        !text.contains("[controller]") && !text.contains("[[identities]]"),
        "{text}"
    );
    tollgate::config::Config::parse(&text, "builder").expect("a minimal config is valid");
}

/// `tollgate config check` refuses keys over plain HTTP with a sentence that says why, and
/// names the file, line and key.
#[test]
fn config_check_refuses_a_jwks_url_over_plain_http() {
    let dirs = AgentDirs::new();
    let kit = TokenKit::new(&dirs, Ipv4Addr::new(198, 18, 0, 2));
    let config = Config::new(&["tg-builder1"])
        .tokens(
            Tokens::tls_only(&kit.ca, &kit.tls_key).issuer(Issuer::jwks_url(
                "idp",
                "https://idp.example",
                AUDIENCE,
                "http://idp.example/keys",
            )),
        )
        .plan(Plan::new("customer"))
        .endpoint(Endpoint::tcp("bind", 8443, &tollgate_tests::tokenlab::BIND_CLASSES).anonymous());
    let path = config.write(&dirs.state_dir.join("plain-http.toml"));
    let out = std::process::Command::new(tollgate_bin())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("tollgate config check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted:\n{}", config.render());
    assert!(
        stderr.contains("tokens.issuers[0].jwks_url: \"http://idp.example/keys\" is plain HTTP"),
        "{stderr}"
    );
}
