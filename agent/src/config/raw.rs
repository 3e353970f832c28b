//! The file as serde reads it: every key the schema knows, nothing more (`deny_unknown_fields`),
//! with spans kept on whatever a later check may have to point at. Values stay in their TOML
//! types (i64, f64, strings) so that range checks can say what is wrong in the operator's terms
//! rather than serde's ("invalid value: integer `-1`, expected u64").

use std::fmt;

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

pub(super) type S<T> = Spanned<T>;
pub(super) type List<T> = S<Vec<S<T>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub node: S<RawNode>,
    pub anonymous: Option<RawAnonymous>,
    pub drop_events: Option<RawDropEvents>,
    pub controller: Option<RawController>,
    pub listen: Option<RawListen>,
    pub plans: Option<List<RawPlan>>,
    pub endpoints: Option<List<RawEndpoint>>,
    pub identities: Option<List<RawIdentity>>,
    pub tokens: Option<S<RawTokens>>,
    pub anomaly: Option<RawAnomaly>,
    pub metrics: Option<RawMetrics>,
    pub fleet: Option<S<RawFleet>>,
    pub limits: Option<S<RawLimits>>,
    pub prices: Option<List<RawPrice>>,
    pub pricing: Option<S<RawPricing>>,
    pub usage: Option<S<RawUsage>>,
}

/// One `[[prices]]` row.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub model: S<String>,
    pub prompt_per_million: S<RawDecimal>,
    pub completion_per_million: S<RawDecimal>,
}

/// `[pricing]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPricing {
    pub currency: Option<S<String>>,
}

/// `[usage]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUsage {
    pub listen: Option<S<String>>,
    pub allow_remote: Option<S<bool>>,
    pub secret_file: Option<S<String>>,
    pub max_report_bytes: Option<S<i64>>,
    pub max_reports_per_s: Option<S<i64>>,
}

/// An amount of money: a TOML string (`"0.15"`, exact) or number (`0.15`, read back as the
/// shortest decimal that is the same float), kept as text for `usage::parse_decimal`.
pub(super) struct RawDecimal(pub String);

impl<'de> Deserialize<'de> for RawDecimal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = RawDecimal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount: a number or a decimal string such as \"0.15\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDecimal, E> {
                Ok(RawDecimal(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDecimal, E> {
                Ok(RawDecimal(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawDecimal, E> {
                Ok(RawDecimal(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDecimal, E> {
                Ok(RawDecimal(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[limits]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub identities: Option<S<i64>>,
    pub exact_bindings: Option<S<i64>>,
    pub cidr_bindings: Option<S<i64>>,
    pub anon_prefixes: Option<S<i64>>,
    pub flows: Option<S<i64>>,
    pub kernel_memory_mib: Option<S<i64>>,
}

/// `[fleet]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub store: Option<S<String>>,
    pub sentinel: Option<S<RawSentinel>>,
    pub ca_file: Option<S<String>>,
    pub credentials: Option<S<String>>,
    pub pool_key: S<String>,
    pub pool: S<String>,
    pub node: S<String>,
    pub sync_interval_ms: Option<S<i64>>,
    pub op_timeout_ms: Option<S<i64>>,
    pub stream_max_len: Option<S<i64>>,
    pub outage: Option<S<RawOutage>>,
}

/// `[fleet.sentinel]` (or `sentinel = { … }`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSentinel {
    pub service: S<String>,
    pub nodes: List<String>,
    pub tls: Option<S<bool>>,
}

/// `[fleet.outage]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutage {
    pub quotas: Option<S<String>>,
    pub rates: Option<S<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub top_k: Option<S<i64>>,
    pub identity_names: Option<S<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    pub jwks: Option<S<String>>,
    pub audience: Option<S<String>>,
    pub issuer: Option<S<String>>,
    pub tls_cert: S<String>,
    pub tls_key: S<String>,
    pub max_ttl_s: Option<S<i64>>,
    pub clock_skew_s: Option<S<i64>>,
    pub max_token_bytes: Option<S<i64>>,
    pub identity_claim: Option<S<String>>,
    pub class_claim: Option<S<String>>,
    pub plan_claim: Option<S<String>>,
    pub roles_claim: Option<S<String>>,
    pub default_class: Option<S<String>>,
    pub default_plan: Option<S<String>>,
    pub max_bindings_per_identity: Option<S<i64>>,
    pub ca_bundle: Option<S<String>>,
    pub jwks_max_bytes: Option<S<i64>>,
    pub fetch_timeout_ms: Option<S<i64>>,
    pub cache_min_s: Option<S<i64>>,
    pub cache_max_s: Option<S<i64>>,
    pub refetch_cooldown_s: Option<S<i64>>,
    pub max_stale_s: Option<S<i64>>,
    pub issuers: Option<List<RawIssuer>>,
}

/// How remote keys are fetched: `[tokens]`' defaults, each overridable per issuer. (Not
/// `#[serde(flatten)]`ed into both: flatten loses the spans and `deny_unknown_fields`.)
#[derive(Default)]
pub(super) struct RawFetch {
    pub ca_bundle: Option<S<String>>,
    pub jwks_max_bytes: Option<S<i64>>,
    pub fetch_timeout_ms: Option<S<i64>>,
    pub cache_min_s: Option<S<i64>>,
    pub cache_max_s: Option<S<i64>>,
    pub refetch_cooldown_s: Option<S<i64>>,
    pub max_stale_s: Option<S<i64>>,
}

macro_rules! take_fetch {
    ($raw:expr) => {
        RawFetch {
            ca_bundle: $raw.ca_bundle.take(),
            jwks_max_bytes: $raw.jwks_max_bytes.take(),
            fetch_timeout_ms: $raw.fetch_timeout_ms.take(),
            cache_min_s: $raw.cache_min_s.take(),
            cache_max_s: $raw.cache_max_s.take(),
            refetch_cooldown_s: $raw.refetch_cooldown_s.take(),
            max_stale_s: $raw.max_stale_s.take(),
        }
    };
}

impl RawTokens {
    pub fn take_fetch(&mut self) -> RawFetch {
        take_fetch!(self)
    }
}

impl RawIssuer {
    pub fn take_fetch(&mut self) -> RawFetch {
        take_fetch!(self)
    }
}

/// One `[[tokens.issuers]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    pub name: S<String>,
    pub issuer: S<String>,
    pub audience: Option<S<String>>,
    pub audiences: Option<List<String>>,
    pub jwks: Option<S<String>>,
    pub jwks_url: Option<S<String>>,
    pub discovery: Option<S<bool>>,
    pub classes: Option<List<String>>,
    pub plans: Option<List<String>>,
    pub ca_bundle: Option<S<String>>,
    pub jwks_max_bytes: Option<S<i64>>,
    pub fetch_timeout_ms: Option<S<i64>>,
    pub cache_min_s: Option<S<i64>>,
    pub cache_max_s: Option<S<i64>>,
    pub refetch_cooldown_s: Option<S<i64>>,
    pub max_stale_s: Option<S<i64>>,
    pub max_ttl_s: Option<S<i64>>,
    pub claims: Option<S<RawClaims>>,
}

/// `[tokens.issuers.claims]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClaims {
    pub token_id: Option<S<String>>,
    pub derive_token_id: Option<S<bool>>,
    pub identity: Option<S<String>>,
    pub roles: Option<S<String>>,
    pub roles_format: Option<S<String>>,
    pub roles_required: Option<S<bool>>,
    pub class: Option<S<RawValueRule>>,
    pub plan: Option<S<RawValueRule>>,
}

/// `class` / `plan` of `[tokens.issuers.claims]`: a claim path, or a table with a value map.
pub(super) enum RawValueRule {
    Path(String),
    Map(RawValueMap),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawValueMap {
    pub claim: S<String>,
    pub values: Option<S<RawValues>>,
    pub default: Option<S<String>>,
    pub unmapped: Option<S<String>>,
}

/// `values = { <claim value> = "<output>", ... }` in the order the file has them (an array
/// claim maps to the first configured value it contains, so the order is the operator's
/// precedence). The order comes from the values' spans: a TOML table's keys are not ordered.
pub(super) struct RawValues(pub Vec<(String, S<String>)>);

impl<'de> Deserialize<'de> for RawValueRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawValueRule;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a claim path or a table { claim, values, default, unmapped }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValueRule, E> {
                Ok(RawValueRule::Path(v.to_owned()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawValueRule, A::Error> {
                RawValueMap::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawValueRule::Map)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawValues;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of claim value = \"output\"")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawValues, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, S<String>>()? {
                    out.push((k, v));
                }
                out.sort_by_key(|(_, v)| v.span().start);
                Ok(RawValues(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub interfaces: List<String>,
    pub xdp_mode: Option<S<String>>,
    pub pin_dir: Option<S<String>>,
    pub state_dir: Option<S<String>>,
    pub control_socket: Option<S<String>>,
    pub control_group: Option<S<String>>,
    pub kernel_log: Option<S<String>>,
    pub audit_max_bytes: Option<S<i64>>,
    pub tunnels: Option<S<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnonymous {
    pub packets_per_second: Option<S<i64>>,
    pub burst: Option<S<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDropEvents {
    pub interval_ms: Option<S<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawController {
    pub interval_ms: Option<S<i64>>,
    pub pressure: Option<S<f64>>,
    pub gpu_source: Option<S<String>>,
    pub simulated_file: Option<S<String>>,
    pub saturate_at: Option<S<f64>>,
    pub recover_at: Option<S<f64>>,
    pub recover_after: Option<S<i64>>,
    pub hold_back_floor: Option<S<f64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnomaly {
    pub mode: Option<S<String>>,
    pub alpha: Option<S<f64>>,
    pub warmup_samples: Option<S<i64>>,
    pub throttle_factor: Option<S<f64>>,
    pub throttle_for_s: Option<S<i64>>,
    pub quarantine_for_s: Option<S<i64>>,
    pub cooldown_s: Option<S<i64>>,
    pub max_auto_quarantines: Option<S<i64>>,
    pub require_handshake: Option<S<bool>>,
    pub internal: Option<RawThresholds>,
    pub partner: Option<RawThresholds>,
    pub customer: Option<RawThresholds>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawThresholds {
    pub throttle_score: Option<S<f64>>,
    pub quarantine_score: Option<S<f64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub bind: Option<S<String>>,
    pub metrics: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    pub name: S<String>,
    pub priority: Option<S<i64>>,
    pub packets_per_second: Option<S<i64>>,
    pub packet_burst: Option<S<i64>>,
    pub bytes_per_second: Option<S<i64>>,
    pub byte_burst: Option<S<i64>>,
    pub quota_minute_bytes: Option<S<i64>>,
    pub quota_day_bytes: Option<S<i64>>,
    pub quota_month_bytes: Option<S<i64>>,
    pub quota_minute_cost: Option<S<i64>>,
    pub quota_day_cost: Option<S<i64>>,
    pub quota_month_cost: Option<S<i64>>,
    pub response_bytes_per_second: Option<S<i64>>,
    pub response_quota_minute_bytes: Option<S<i64>>,
    pub response_quota_day_bytes: Option<S<i64>>,
    pub response_quota_month_bytes: Option<S<i64>>,
    pub response_over: Option<S<String>>,
    pub response_throttle: Option<S<f64>>,
    pub scope: Option<S<String>>,
    pub tokens_per_minute: Option<S<i64>>,
    pub tokens_per_day: Option<S<i64>>,
    pub tokens_per_month: Option<S<i64>>,
    pub budget_per_minute: Option<S<RawDecimal>>,
    pub budget_per_day: Option<S<RawDecimal>>,
    pub budget_per_month: Option<S<RawDecimal>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub name: S<String>,
    pub protocol: S<String>,
    pub ports: List<PortItem>,
    pub destinations: Option<List<String>>,
    pub weight: Option<S<f64>>,
    pub classes: List<String>,
    pub roles: Option<List<String>>,
    pub anonymous: Option<S<bool>>,
    pub gpus: Option<List<i64>>,
    pub max_request_bytes: Option<S<i64>>,
    pub max_unanswered_bytes: Option<S<i64>>,
    pub track_flows: Option<S<bool>>,
    pub model_server: Option<S<RawModelServer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelServer {
    pub url: S<String>,
    pub kind: S<String>,
    pub queue_at: Option<S<f64>>,
    pub kv_cache_at: Option<S<f64>>,
    pub signals: Option<List<String>>,
    pub timeout_ms: Option<S<i64>>,
    pub fallback_intervals: Option<S<i64>>,
    pub queue_metric: Option<S<String>>,
    pub running_metric: Option<S<String>>,
    pub kv_cache_metric: Option<S<String>>,
    pub kv_cache_scale: Option<S<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub name: S<String>,
    pub class: S<String>,
    pub plan: S<String>,
    pub roles: Option<List<String>>,
    pub bind: List<String>,
}

/// One element of `ports`: a number or a `"first-last"` string. Ranges are checked later,
/// where the error can name the endpoint's field.
pub(super) enum PortItem {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for PortItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a \"first-last\" range")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortItem, E> {
                Ok(PortItem::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortItem, E> {
                Ok(PortItem::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortItem, E> {
                Ok(PortItem::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}
