//! The typed config builder (`tollgate_tests::config`): a configuration with every section
//! renders to TOML that the real agent accepts, so the builder cannot drift from the schema
//! unnoticed.

use std::net::Ipv4Addr;

use tollgate_tests::{
    agent::{AgentDirs, tollgate_bin},
    config::{Anomaly, Config, Controller, Endpoint, Identity, Plan, Port, Thresholds, Tokens},
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
    if let Err(e) = tollgate::config::Config::parse(&text, "builder") {
        panic!("the agent refused the builder's config: {e}\n{text}");
    }
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
