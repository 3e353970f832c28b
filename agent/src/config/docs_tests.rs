//! docs/config.md against the code: every key the parser knows is in the key tables, no table
//! documents a key the parser does not know, and every default column says what the code's
//! defaults (one place per section) are.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::{controller::scrape::ModelServer, sizes::Sizes};

const DOC: &str = include_str!("../../../docs/config.md");

/// The text inside each pair of backticks.
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// A default cell as a bare value: no backticks, no quotes.
fn bare(cell: &str) -> String {
    cell.trim().trim_matches('`').trim_matches('"').to_owned()
}

/// (section, key) -> default cell, from every key table under a `### `[section]`` heading.
/// A row may name several keys; their defaults are then listed in the same order, separated
/// by ", " (or one default stands for all).
fn documented() -> BTreeMap<(String, String), String> {
    let mut section: Option<String> = None;
    let mut out = BTreeMap::new();
    for line in DOC.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            section = h
                .starts_with('`')
                .then(|| backticked(h)[0].trim_matches(['[', ']']).to_owned());
            continue;
        }
        if line.starts_with("## ") {
            section = None;
            continue;
        }
        let Some(sec) = &section else { continue };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 6 || !cells[1].starts_with('`') {
            continue;
        }
        let keys = backticked(cells[1]);
        let defaults: Vec<&str> = cells[3].split(", ").collect();
        for (i, key) in keys.iter().enumerate() {
            let default = if defaults.len() == keys.len() {
                defaults[i]
            } else {
                cells[3]
            };
            // `[anomaly.internal]`: a sub-table documented as one row.
            let (sec, key) = match key.strip_prefix('[') {
                Some(sub) => {
                    let sub = sub.trim_end_matches(']');
                    let (s, k) = sub.split_once('.').expect("a sub-table is section.name");
                    (s.to_owned(), k.to_owned())
                }
                None => (sec.clone(), (*key).to_owned()),
            };
            let dup = out.insert((sec.clone(), key.clone()), bare(default));
            assert!(dup.is_none(), "{sec}.{key} is documented twice");
        }
    }
    out
}

/// The keys the parser accepts in `section`, from its own refusal of an unknown key.
fn parser_keys(section: &str) -> BTreeSet<String> {
    let base = "[node]\ninterfaces = [\"eth0\"]\n\n[[plans]]\nname = \"free\"\n";
    let text = match section {
        "node" => {
            "[node]\ninterfaces = [\"eth0\"]\nzz_unknown = 1\n[[plans]]\nname = \"p\"\n".into()
        }
        "plans" => {
            "[node]\ninterfaces = [\"eth0\"]\n[[plans]]\nname = \"p\"\nzz_unknown = 1\n".into()
        }
        "endpoints" | "identities" | "tokens.issuers" | "prices" => {
            format!("{base}[[{section}]]\nzz_unknown = 1\n")
        }
        "endpoints.model_server" => {
            format!("{base}[[endpoints]]\n[endpoints.model_server]\nzz_unknown = 1\n")
        }
        "tokens.issuers.claims" => {
            format!("{base}[[tokens.issuers]]\n[tokens.issuers.claims]\nzz_unknown = 1\n")
        }
        "tokens.issuers.claims.plan" => format!(
            "{base}[[tokens.issuers]]\n[tokens.issuers.claims]\nplan = {{ zz_unknown = 1 }}\n"
        ),
        _ => format!("{base}[{section}]\nzz_unknown = 1\n"),
    };
    let e = Config::parse(&text, "t.toml").expect_err("an unknown key is refused");
    let expected = e
        .message
        .split_once("expected")
        .unwrap_or_else(|| panic!("{section}: {e}"))
        .1;
    backticked(expected)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

fn num(f: f64) -> String {
    f.to_string()
}

/// Every key of every section with the code's default (`None`: required, or absent means
/// something other than a value; the docs then say `required`, `absent: ...` or `none`).
fn code_defaults() -> Vec<(&'static str, &'static str, Option<String>)> {
    let node = Node::with_defaults(Vec::new());
    let anonymous = Anonymous::default();
    let controller = Controller::default();
    let listen = Listen::default();
    let anomaly = Anomaly::default();
    let fetch = Fetch::default();
    let path = |p: &std::path::Path| Some(p.display().to_string());
    let gpu_source = match controller.gpu_source {
        GpuSourceKind::Nvml => "nvml",
        GpuSourceKind::Simulated => "simulated",
        GpuSourceKind::None => "none",
    };
    let mode = match anomaly.mode {
        AnomalyMode::Off => "off",
        AnomalyMode::Shadow => "shadow",
        AnomalyMode::Enforce => "enforce",
    };
    let scores = |i: usize| {
        let (t, q) = anomaly.thresholds[i];
        Some(format!("{}/{}", num(t), num(q)))
    };
    vec![
        ("node", "interfaces", None),
        ("node", "xdp_mode", Some(node.xdp_mode.label().to_owned())),
        ("node", "pin_dir", path(&node.pin_dir)),
        ("node", "state_dir", path(&node.state_dir)),
        ("node", "control_socket", path(&node.control_socket)),
        ("node", "control_group", Some(node.control_group.clone())),
        (
            "node",
            "kernel_log",
            Some(node.kernel_log.label().to_owned()),
        ),
        (
            "node",
            "audit_max_bytes",
            Some(node.audit_max_bytes.to_string()),
        ),
        ("node", "tunnels", Some(node.tunnels.label().to_owned())),
        (
            "anonymous",
            "packets_per_second",
            Some(anonymous.packets_per_second.to_string()),
        ),
        ("anonymous", "burst", Some(anonymous.burst.to_string())),
        (
            "drop_events",
            "interval_ms",
            Some(DropEvents::default().interval_ms.to_string()),
        ),
        (
            "controller",
            "interval_ms",
            Some(controller.interval_ms.to_string()),
        ),
        ("controller", "pressure", Some(num(controller.pressure))),
        ("controller", "gpu_source", Some(gpu_source.to_owned())),
        (
            "controller",
            "simulated_file",
            path(&controller.simulated_file),
        ),
        (
            "controller",
            "saturate_at",
            Some(num(controller.saturate_at)),
        ),
        ("controller", "recover_at", Some(num(controller.recover_at))),
        (
            "controller",
            "recover_after",
            Some(controller.recover_after.to_string()),
        ),
        (
            "controller",
            "hold_back_floor",
            Some(num(controller.hold_back_floor)),
        ),
        ("listen", "bind", Some(listen.bind.to_string())),
        ("listen", "metrics", Some(listen.metrics.to_string())),
        ("plans", "name", None),
        (
            "plans",
            "priority",
            Some(Plan::DEFAULT_PRIORITY.to_string()),
        ),
        ("plans", "packets_per_second", None),
        ("plans", "packet_burst", None),
        ("plans", "bytes_per_second", None),
        ("plans", "byte_burst", None),
        (
            "plans",
            "scope",
            Some(Plan::DEFAULT_SCOPE.label().to_owned()),
        ),
        ("endpoints", "name", None),
        ("endpoints", "protocol", None),
        ("endpoints", "ports", None),
        ("endpoints", "destinations", None),
        ("endpoints", "weight", Some(num(Endpoint::DEFAULT_WEIGHT))),
        ("endpoints", "classes", None),
        ("endpoints", "roles", None),
        (
            "endpoints",
            "anonymous",
            Some(Endpoint::DEFAULT_ANONYMOUS.to_string()),
        ),
        ("endpoints", "gpus", None),
        ("endpoints", "max_request_bytes", None),
        ("endpoints", "max_unanswered_bytes", None),
        (
            "endpoints",
            "track_flows",
            Some(Endpoint::DEFAULT_TRACK_FLOWS.to_string()),
        ),
        ("endpoints", "model_server", None),
        ("endpoints.model_server", "url", None),
        ("endpoints.model_server", "kind", None),
        (
            "endpoints.model_server",
            "queue_at",
            Some(num(ModelServer::DEFAULT_QUEUE_AT)),
        ),
        (
            "endpoints.model_server",
            "kv_cache_at",
            Some(num(ModelServer::DEFAULT_KV_CACHE_AT)),
        ),
        ("endpoints.model_server", "signals", None),
        (
            "endpoints.model_server",
            "timeout_ms",
            Some(ModelServer::DEFAULT_TIMEOUT_MS.to_string()),
        ),
        (
            "endpoints.model_server",
            "fallback_intervals",
            Some(ModelServer::DEFAULT_FALLBACK_INTERVALS.to_string()),
        ),
        ("endpoints.model_server", "queue_metric", None),
        ("endpoints.model_server", "running_metric", None),
        ("endpoints.model_server", "kv_cache_metric", None),
        ("endpoints.model_server", "kv_cache_scale", Some(num(1.0))),
        ("identities", "name", None),
        ("identities", "class", None),
        ("identities", "plan", None),
        ("identities", "roles", None),
        ("identities", "bind", None),
        ("tokens", "jwks", None),
        ("tokens", "audience", None),
        ("tokens", "tls_cert", None),
        ("tokens", "tls_key", None),
        (
            "tokens",
            "max_ttl_s",
            Some(Tokens::DEFAULT_MAX_TTL_S.to_string()),
        ),
        (
            "tokens",
            "clock_skew_s",
            Some(Tokens::DEFAULT_CLOCK_SKEW_S.to_string()),
        ),
        (
            "tokens",
            "max_token_bytes",
            Some(Tokens::DEFAULT_MAX_TOKEN_BYTES.to_string()),
        ),
        (
            "tokens",
            "max_bindings_per_identity",
            Some(Tokens::DEFAULT_MAX_BINDINGS_PER_IDENTITY.to_string()),
        ),
        (
            "tokens",
            "identity_claim",
            Some(Tokens::DEFAULT_IDENTITY_CLAIM.to_owned()),
        ),
        (
            "tokens",
            "class_claim",
            Some(Tokens::DEFAULT_CLASS_CLAIM.to_owned()),
        ),
        (
            "tokens",
            "plan_claim",
            Some(Tokens::DEFAULT_PLAN_CLAIM.to_owned()),
        ),
        (
            "tokens",
            "roles_claim",
            Some(Tokens::DEFAULT_ROLES_CLAIM.to_owned()),
        ),
        ("tokens", "default_class", None),
        ("tokens", "default_plan", None),
        ("tokens", "issuer", None),
        ("tokens", "issuers", None),
        ("tokens", "ca_bundle", None),
        (
            "tokens",
            "jwks_max_bytes",
            Some(fetch.max_bytes.to_string()),
        ),
        (
            "tokens",
            "fetch_timeout_ms",
            Some(fetch.timeout_ms.to_string()),
        ),
        ("tokens", "cache_min_s", Some(fetch.cache_min_s.to_string())),
        ("tokens", "cache_max_s", Some(fetch.cache_max_s.to_string())),
        (
            "tokens",
            "refetch_cooldown_s",
            Some(fetch.refetch_cooldown_s.to_string()),
        ),
        ("tokens", "max_stale_s", Some(fetch.max_stale_s.to_string())),
        ("tokens.issuers", "name", None),
        ("tokens.issuers", "issuer", None),
        ("tokens.issuers", "audience", None),
        ("tokens.issuers", "audiences", None),
        ("tokens.issuers", "jwks", None),
        ("tokens.issuers", "jwks_url", None),
        ("tokens.issuers", "discovery", Some("false".to_owned())),
        ("tokens.issuers", "classes", None),
        ("tokens.issuers", "plans", None),
        // An issuer's fetch settings default to [tokens]' (the docs say so).
        ("tokens.issuers", "ca_bundle", None),
        ("tokens.issuers", "jwks_max_bytes", None),
        ("tokens.issuers", "fetch_timeout_ms", None),
        ("tokens.issuers", "cache_min_s", None),
        ("tokens.issuers", "cache_max_s", None),
        ("tokens.issuers", "refetch_cooldown_s", None),
        ("tokens.issuers", "max_stale_s", None),
        // Like the fetch settings: absent, [tokens]' max_ttl_s.
        ("tokens.issuers", "max_ttl_s", None),
        ("tokens.issuers", "claims", None),
        (
            "tokens.issuers.claims",
            "token_id",
            Some(Tokens::DEFAULT_TOKEN_ID_CLAIM.to_owned()),
        ),
        (
            "tokens.issuers.claims",
            "derive_token_id",
            Some("false".to_owned()),
        ),
        (
            "tokens.issuers.claims",
            "identity",
            Some(Tokens::DEFAULT_IDENTITY_CLAIM.to_owned()),
        ),
        (
            "tokens.issuers.claims",
            "roles",
            Some(Tokens::DEFAULT_ROLES_CLAIM.to_owned()),
        ),
        (
            "tokens.issuers.claims",
            "roles_format",
            Some("array".to_owned()),
        ),
        (
            "tokens.issuers.claims",
            "roles_required",
            Some("false".to_owned()),
        ),
        (
            "tokens.issuers.claims",
            "class",
            Some(Tokens::DEFAULT_CLASS_CLAIM.to_owned()),
        ),
        (
            "tokens.issuers.claims",
            "plan",
            Some(Tokens::DEFAULT_PLAN_CLAIM.to_owned()),
        ),
        ("tokens.issuers.claims.plan", "claim", None),
        ("tokens.issuers.claims.plan", "values", None),
        ("tokens.issuers.claims.plan", "default", None),
        (
            "tokens.issuers.claims.plan",
            "unmapped",
            Some("refuse".to_owned()),
        ),
        ("anomaly", "mode", Some(mode.to_owned())),
        ("anomaly", "alpha", Some(num(anomaly.alpha))),
        (
            "anomaly",
            "warmup_samples",
            Some(anomaly.warmup_samples.to_string()),
        ),
        (
            "anomaly",
            "throttle_factor",
            Some(num(anomaly.throttle_factor)),
        ),
        (
            "anomaly",
            "throttle_for_s",
            Some(anomaly.throttle_for_s.to_string()),
        ),
        (
            "anomaly",
            "quarantine_for_s",
            Some(anomaly.quarantine_for_s.to_string()),
        ),
        (
            "anomaly",
            "cooldown_s",
            Some(anomaly.cooldown_s.to_string()),
        ),
        (
            "anomaly",
            "max_auto_quarantines",
            Some(anomaly.max_auto_quarantines.to_string()),
        ),
        (
            "anomaly",
            "require_handshake",
            Some(anomaly.require_handshake.to_string()),
        ),
        ("anomaly", "internal", scores(0)),
        ("anomaly", "partner", scores(1)),
        ("anomaly", "customer", scores(2)),
        (
            "metrics",
            "top_k",
            Some(Metrics::default().top_k.to_string()),
        ),
        (
            "metrics",
            "identity_names",
            Some(Metrics::default().identity_names.to_string()),
        ),
        (
            "limits",
            "identities",
            Some(Sizes::DEFAULT.identities.to_string()),
        ),
        (
            "limits",
            "exact_bindings",
            Some(Sizes::DEFAULT.exact_bindings.to_string()),
        ),
        (
            "limits",
            "cidr_bindings",
            Some(Sizes::DEFAULT.cidr_bindings.to_string()),
        ),
        (
            "limits",
            "anon_prefixes",
            Some(Sizes::DEFAULT.anon_prefixes.to_string()),
        ),
        ("limits", "flows", Some(Sizes::DEFAULT.flows.to_string())),
        ("limits", "kernel_memory_mib", None),
        ("fleet", "store", None),
        ("fleet", "sentinel", None),
        ("fleet", "ca_file", None),
        ("fleet", "credentials", None),
        ("fleet", "pool_key", None),
        ("fleet", "pool", None),
        ("fleet", "node", None),
        (
            "fleet",
            "sync_interval_ms",
            Some(Fleet::DEFAULT_SYNC_INTERVAL_MS.to_string()),
        ),
        (
            "fleet",
            "op_timeout_ms",
            Some(Fleet::DEFAULT_OP_TIMEOUT_MS.to_string()),
        ),
        (
            "fleet",
            "stream_max_len",
            Some(Fleet::DEFAULT_STREAM_MAX_LEN.to_string()),
        ),
        ("fleet", "outage", None),
        ("fleet.sentinel", "service", None),
        ("fleet.sentinel", "nodes", None),
        ("fleet.sentinel", "tls", Some("false".to_owned())),
        (
            "fleet.outage",
            "quotas",
            Some(Outage::default().quotas.label().to_owned()),
        ),
        (
            "fleet.outage",
            "rates",
            Some(Outage::default().rates.label().to_owned()),
        ),
        ("prices", "model", None),
        ("prices", "prompt_per_million", None),
        ("prices", "completion_per_million", None),
        ("pricing", "currency", Some("USD".to_owned())),
        ("usage", "listen", None),
        (
            "usage",
            "allow_remote",
            Some(
                crate::usage::UsageConfig::default()
                    .allow_remote
                    .to_string(),
            ),
        ),
        ("usage", "secret_file", None),
        (
            "usage",
            "max_report_bytes",
            Some(crate::usage::DEFAULT_MAX_REPORT_BYTES.to_string()),
        ),
        (
            "usage",
            "max_reports_per_s",
            Some(crate::usage::DEFAULT_MAX_REPORTS_PER_S.to_string()),
        ),
    ]
}

/// Keys of `[[plans]]` documented in prose (the quota paragraphs) rather than the table.
const PLAN_QUOTA_KEYS: [&str; 12] = [
    "tokens_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "budget_per_minute",
    "budget_per_day",
    "budget_per_month",
    "quota_minute_bytes",
    "quota_day_bytes",
    "quota_month_bytes",
    "quota_minute_cost",
    "quota_day_cost",
    "quota_month_cost",
];

/// Keys of `[[plans]]` documented in prose (the response-cap paragraph), with their defaults
/// (`None`: absent means no cap).
fn plan_response_keys() -> [(&'static str, Option<String>); 6] {
    use crate::controller::response::ResponseLimits;
    let d = ResponseLimits::default();
    [
        ("response_bytes_per_second", None),
        ("response_quota_minute_bytes", None),
        ("response_quota_day_bytes", None),
        ("response_quota_month_bytes", None),
        ("response_over", Some(d.over.label().to_owned())),
        ("response_throttle", Some(format!("{:.1}", d.throttle))),
    ]
}

#[test]
fn the_default_list_here_covers_every_key_the_parser_knows() {
    let code = code_defaults();
    let sections: BTreeSet<&str> = code.iter().map(|(s, _, _)| *s).collect();
    for section in sections {
        let listed: BTreeSet<String> = code
            .iter()
            .filter(|(s, _, _)| *s == section)
            .map(|(_, k, _)| (*k).to_owned())
            .chain(
                (section == "plans")
                    .then_some(PLAN_QUOTA_KEYS.map(str::to_owned))
                    .into_iter()
                    .flatten(),
            )
            .chain(
                (section == "plans")
                    .then(|| plan_response_keys().map(|(k, _)| k.to_owned()))
                    .into_iter()
                    .flatten(),
            )
            .collect();
        assert_eq!(listed, parser_keys(section), "[{section}]");
    }
}

#[test]
fn config_md_documents_every_key_with_the_codes_default() {
    let doc = documented();
    let code = code_defaults();
    let mut problems = Vec::new();
    for (section, key, default) in &code {
        let Some(cell) = doc.get(&((*section).to_owned(), (*key).to_owned())) else {
            problems.push(format!(
                "{section}.{key} is not in docs/config.md's key tables"
            ));
            continue;
        };
        match default {
            Some(d) => {
                let same = match (d.parse::<f64>(), cell.parse::<f64>()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => d == cell,
                };
                if !same {
                    problems.push(format!(
                        "{section}.{key}: docs say the default is {cell:?}, the code {d:?}"
                    ));
                }
            }
            None => {
                if !["required", "absent", "none"]
                    .iter()
                    .any(|w| cell.starts_with(w))
                {
                    problems.push(format!(
                        "{section}.{key} has no default in the code, docs say {cell:?}"
                    ));
                }
            }
        }
    }
    for (section, key) in doc.keys() {
        if !code.iter().any(|(s, k, _)| s == section && k == key) {
            problems.push(format!(
                "docs/config.md documents {section}.{key}, no such key"
            ));
        }
    }
    for key in PLAN_QUOTA_KEYS {
        if !DOC.contains(&format!("`{key}`")) {
            problems.push(format!("plans.{key} is not documented"));
        }
    }
    // The response-cap paragraph names each key, and each default as "`key` ... (default `d`)".
    for (key, default) in plan_response_keys() {
        let Some(at) = DOC.find(&format!("`{key}`")) else {
            problems.push(format!("plans.{key} is not documented"));
            continue;
        };
        if let Some(d) = default {
            let said = format!("(default `{d}`)");
            let until_next = &DOC[at..];
            let end = until_next.find(". ").unwrap_or(until_next.len());
            if !until_next[..end].contains(&said) {
                problems.push(format!(
                    "plans.{key}: docs/config.md does not say {said} where it names the key"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
