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
    pub jwks: S<String>,
    pub audience: S<String>,
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
