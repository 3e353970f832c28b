//! A typed builder for the agent's configuration file: Rust structs that serde renders as
//! TOML with the `toml` crate, so that no test writes its configuration with `format!`.
//!
//! Each struct mirrors one section of docs/config.md. Every optional key is an `Option` that
//! is left out of the file when `None`, so a builder config says exactly what a test sets and
//! the agent's own defaults apply to the rest. `tests/config.rs` renders one with every
//! section and has the agent accept it.

use std::{
    fmt::Display,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// The whole file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Config {
    pub node: Node,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<Anonymous>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_events: Option<DropEvents>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<Controller>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<Listen>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Tokens>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<Anomaly>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Fleet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<Plan>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<Identity>,
    /// `[[prices]]` (the usage feed's price table).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prices: Vec<Price>,
    /// `[usage]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One `[[prices]]` row: money per million tokens, as decimal strings (exact).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Price {
    pub model: String,
    pub prompt_per_million: String,
    pub completion_per_million: String,
}

/// `[usage]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_report_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_reports_per_s: Option<u64>,
}

/// `[node]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Node {
    pub interfaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_log: Option<String>,
    /// `enforce`, `refuse` or `warn`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnels: Option<String>,
}

/// `[fleet]`: the pool this node shares bindings, revocations and quarantines with.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Fleet {
    /// One server (`redis://…`); or `sentinel`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<FleetSentinel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,
    pub pool_key: PathBuf,
    pub pool: String,
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_timeout_ms: Option<u64>,
}

/// `[fleet.sentinel]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FleetSentinel {
    pub service: String,
    pub nodes: Vec<String>,
}

/// `[anonymous]`: the allowance of unbound sources on `anonymous = true` endpoints.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Anonymous {
    pub packets_per_second: u64,
    pub burst: u64,
}

/// `[drop_events]`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DropEvents {
    pub interval_ms: u64,
}

/// `[controller]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Controller {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pressure: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulated_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saturate_at: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recover_at: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recover_after: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_back_floor: Option<f64>,
}

impl Controller {
    /// `gpu_source = "none"`: no GPU readings, nothing held back.
    pub fn no_gpu() -> Controller {
        Controller {
            gpu_source: Some("none".into()),
            ..Controller::default()
        }
    }

    /// The simulated GPU source reading `file` (`tollgate gpu simulate` writes it).
    pub fn simulated(file: &Path) -> Controller {
        Controller {
            gpu_source: Some("simulated".into()),
            simulated_file: Some(file.to_owned()),
            ..Controller::default()
        }
    }
}

/// `[listen]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Listen {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// `[tokens]`. `jwks` and `audience` are the legacy issuer `default`: left out of the file
/// when empty, for a node that trusts `[[tokens.issuers]]` only.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tokens {
    #[serde(skip_serializing_if = "path_is_empty")]
    pub jwks: PathBuf,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub audience: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ttl_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_skew_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_token_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_claim: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_claim: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_claim: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles_claim: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_plan: Option<String>,
    /// `[tokens]`' fetch settings: every issuer's defaults.
    #[serde(flatten)]
    pub fetch: Fetch,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<Issuer>,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl Tokens {
    /// `[tokens]` with the bind listener's TLS files and no legacy issuer: add issuers.
    pub fn tls_only(tls_cert: &Path, tls_key: &Path) -> Tokens {
        Tokens {
            tls_cert: tls_cert.to_owned(),
            tls_key: tls_key.to_owned(),
            ..Tokens::default()
        }
    }

    pub fn issuer(mut self, issuer: Issuer) -> Tokens {
        self.issuers.push(issuer);
        self
    }
}

/// How remote keys are fetched (keys of `[tokens]` and of each `[[tokens.issuers]]`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Fetch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_max_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_min_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_max_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refetch_cooldown_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_stale_s: Option<u64>,
}

/// One `[[tokens.issuers]]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Issuer {
    pub name: String,
    pub issuer: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<bool>,
    /// The classes its tokens may be placed in; `None`: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// The plans its tokens may be placed in; `None`: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plans: Option<Vec<String>>,
    #[serde(flatten)]
    pub fetch: Fetch,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<Claims>,
}

impl Issuer {
    /// An issuer whose keys come from OIDC discovery at `issuer`.
    pub fn discovery(name: &str, issuer: &str, audience: &str) -> Issuer {
        Issuer {
            name: name.into(),
            issuer: issuer.into(),
            audiences: vec![audience.into()],
            discovery: Some(true),
            ..Issuer::default()
        }
    }

    /// An issuer whose keys are at `url`.
    pub fn jwks_url(name: &str, issuer: &str, audience: &str, url: &str) -> Issuer {
        Issuer {
            name: name.into(),
            issuer: issuer.into(),
            audiences: vec![audience.into()],
            jwks_url: Some(url.into()),
            ..Issuer::default()
        }
    }

    /// An issuer whose keys are a local file.
    pub fn jwks_file(name: &str, issuer: &str, audience: &str, file: &Path) -> Issuer {
        Issuer {
            name: name.into(),
            issuer: issuer.into(),
            audiences: vec![audience.into()],
            jwks: Some(file.to_owned()),
            ..Issuer::default()
        }
    }

    pub fn ca_bundle(mut self, pem: &Path) -> Issuer {
        self.fetch.ca_bundle = Some(pem.to_owned());
        self
    }

    pub fn fetch(mut self, fetch: Fetch) -> Issuer {
        let ca = self.fetch.ca_bundle.take();
        self.fetch = fetch;
        self.fetch.ca_bundle = self.fetch.ca_bundle.take().or(ca);
        self
    }

    /// `classes`: the only classes its tokens may be placed in.
    pub fn classes(mut self, classes: &[&str]) -> Issuer {
        self.classes = Some(classes.iter().map(|c| (*c).to_owned()).collect());
        self
    }

    pub fn claims(mut self, claims: Claims) -> Issuer {
        self.claims = Some(claims);
        self
    }
}

/// `[tokens.issuers.claims]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<String>,
    /// `"array"` or `"scope"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles_required: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<ValueRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<ValueRule>,
}

/// `class` / `plan` of `[tokens.issuers.claims]`: a claim path, or a value map.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum ValueRule {
    Path(String),
    Map {
        claim: String,
        #[serde(skip_serializing_if = "Values::is_empty")]
        values: Values,
        #[serde(skip_serializing_if = "Option::is_none")]
        default: Option<String>,
        /// `"refuse"` or `"default"`.
        #[serde(skip_serializing_if = "Option::is_none")]
        unmapped: Option<String>,
    },
}

impl ValueRule {
    /// `{ claim, values = { <claim value> = <output>, ... } }` in the order given.
    pub fn map(claim: &str, values: &[(&str, &str)]) -> ValueRule {
        ValueRule::Map {
            claim: claim.into(),
            values: Values(
                values
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            default: None,
            unmapped: None,
        }
    }

    /// Sets `default` (and `unmapped = "default"` when `unmapped_too`).
    pub fn or_default(mut self, output: &str, unmapped_too: bool) -> ValueRule {
        if let ValueRule::Map {
            default, unmapped, ..
        } = &mut self
        {
            *default = Some(output.into());
            if unmapped_too {
                *unmapped = Some("default".into());
            }
        }
        self
    }
}

/// A value map's entries, written in this order (the agent keeps the file's order).
#[derive(Clone, Debug, Default)]
pub struct Values(pub Vec<(String, String)>);

impl Values {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Values {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// `[anomaly]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Anomaly {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_samples: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_factor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_for_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine_for_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_auto_quarantines: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_handshake: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal: Option<Thresholds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partner: Option<Thresholds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<Thresholds>,
}

impl Anomaly {
    /// The ladder in `mode` (`"enforce"`, `"shadow"`), quick enough for a test: five
    /// warm-up samples, seconds-long throttle, quarantine and cool-down. It judges scores
    /// alone (`require_handshake = false`: the tests' floods are raw frames with no
    /// connection behind them); tests/spoofing.rs turns the handshake rule back on.
    pub fn quick(mode: &str) -> Anomaly {
        Anomaly {
            mode: Some(mode.into()),
            alpha: Some(0.3),
            warmup_samples: Some(5),
            throttle_factor: Some(4.0),
            throttle_for_s: Some(3),
            quarantine_for_s: Some(4),
            cooldown_s: Some(2),
            require_handshake: Some(false),
            ..Anomaly::default()
        }
    }
}

/// `[anomaly.<class>]`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Thresholds {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine_score: Option<f64>,
}

/// `[limits]`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identities: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_bindings: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr_bindings: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anon_prefixes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_memory_mib: Option<u64>,
}

impl Limits {
    /// What the suite's agents get: the object's compiled sizes. The node's defaults (a
    /// million identity slots) cost seconds per agent start and stop (the kernel makes each
    /// per-CPU counter slot one by one), which a suite of a hundred agents cannot pay; the
    /// tests of the defaults and of size changes ask for them ([`Config::default_limits`]).
    pub fn suite() -> Limits {
        use tollgate_common::policy as p;
        Limits {
            identities: Some(p::MAX_IDENTITIES),
            exact_bindings: Some(p::MAX_EXACT_BINDINGS),
            cidr_bindings: Some(p::MAX_CIDR_BINDINGS),
            anon_prefixes: Some(p::MAX_ANON_PREFIXES),
            flows: Some(p::MAX_FLOWS),
            kernel_memory_mib: None,
        }
    }
}

/// `[metrics]`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Metrics {
    pub top_k: u64,
}

/// One `[[plans]]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Plan {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets_per_second: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_burst: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_burst: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_minute_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_day_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_month_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_minute_cost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_day_cost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_month_cost: Option<u64>,
    /// `"node"` or `"fleet"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Money, as a decimal string (exact).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_per_minute: Option<String>,
}

impl Plan {
    /// A plan with no limits of its own (unlimited).
    pub fn new(name: &str) -> Plan {
        Plan {
            name: name.into(),
            ..Plan::default()
        }
    }

    /// `packets_per_second` and `packet_burst`.
    pub fn packets(mut self, per_second: u64, burst: u64) -> Plan {
        self.packets_per_second = Some(per_second);
        self.packet_burst = Some(burst);
        self
    }

    /// `bytes_per_second` and `byte_burst`.
    pub fn bytes(mut self, per_second: u64, burst: u64) -> Plan {
        self.bytes_per_second = Some(per_second);
        self.byte_burst = Some(burst);
        self
    }

    pub fn priority(mut self, priority: u8) -> Plan {
        self.priority = Some(priority);
        self
    }

    /// `scope = "fleet"`: the rate and quotas hold across the pool.
    pub fn fleet_wide(mut self) -> Plan {
        self.scope = Some("fleet".into());
        self
    }

    /// `quota_minute_bytes`.
    pub fn minute_bytes(mut self, bytes: u64) -> Plan {
        self.quota_minute_bytes = Some(bytes);
        self
    }
}

/// One element of an endpoint's `ports`: a number or a `"first-last"` range.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Port {
    One(u16),
    Range(String),
}

impl Port {
    pub fn range(first: u16, last: u16) -> Port {
        Port::Range(format!("{first}-{last}"))
    }
}

impl From<u16> for Port {
    fn from(p: u16) -> Port {
        Port::One(p)
    }
}

/// One `[[endpoints]]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Endpoint {
    pub name: String,
    pub protocol: String,
    pub ports: Vec<Port>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destinations: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    pub classes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<u32>>,
    /// `[endpoints.model_server]` (a table: last, after the plain keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_server: Option<ModelServer>,
}

/// `[endpoints.model_server]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModelServer {
    pub url: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_at: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_at: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signals: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_intervals: Option<u32>,
}

impl ModelServer {
    /// A vLLM server's metrics at `url`.
    pub fn vllm(url: &str) -> ModelServer {
        ModelServer {
            url: url.into(),
            kind: "vllm".into(),
            ..ModelServer::default()
        }
    }
}

impl Endpoint {
    pub fn model_server(mut self, m: ModelServer) -> Endpoint {
        self.model_server = Some(m);
        self
    }

    /// An endpoint on `protocol` (`"tcp"`, `"udp"`) `ports`, open to `classes`.
    pub fn new(name: &str, protocol: &str, ports: Vec<Port>, classes: &[&str]) -> Endpoint {
        Endpoint {
            name: name.into(),
            protocol: protocol.into(),
            ports,
            classes: strings(classes),
            ..Endpoint::default()
        }
    }

    pub fn tcp(name: &str, port: u16, classes: &[&str]) -> Endpoint {
        Endpoint::new(name, "tcp", vec![port.into()], classes)
    }

    pub fn udp(name: &str, port: u16, classes: &[&str]) -> Endpoint {
        Endpoint::new(name, "udp", vec![port.into()], classes)
    }

    pub fn roles(mut self, roles: &[&str]) -> Endpoint {
        self.roles = Some(strings(roles));
        self
    }

    pub fn weight(mut self, weight: f64) -> Endpoint {
        self.weight = Some(weight);
        self
    }

    /// `anonymous = true`: unbound sources get the anonymous allowance here.
    pub fn anonymous(mut self) -> Endpoint {
        self.anonymous = Some(true);
        self
    }

    pub fn gpus(mut self, gpus: &[u32]) -> Endpoint {
        self.gpus = Some(gpus.to_vec());
        self
    }

    pub fn destinations(mut self, prefixes: &[&str]) -> Endpoint {
        self.destinations = Some(strings(prefixes));
        self
    }
}

/// One `[[identities]]`: an identity bound by configuration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Identity {
    pub name: String,
    pub class: String,
    pub plan: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    pub bind: Vec<String>,
}

impl Identity {
    /// `name` of `class` on `plan`, bound to `bind` (addresses or prefixes).
    pub fn new<A: Display>(name: &str, class: &str, plan: &str, bind: &[A]) -> Identity {
        Identity {
            name: name.into(),
            class: class.into(),
            plan: plan.into(),
            roles: None,
            bind: bind.iter().map(ToString::to_string).collect(),
        }
    }

    pub fn roles(mut self, roles: &[&str]) -> Identity {
        self.roles = Some(strings(roles));
        self
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

impl Config {
    /// A configuration enforcing on `interfaces`, with nothing else set.
    pub fn new<S: AsRef<str>>(interfaces: &[S]) -> Config {
        Config {
            node: Node {
                interfaces: interfaces.iter().map(|i| i.as_ref().to_owned()).collect(),
                ..Node::default()
            },
            limits: Some(Limits::suite()),
            ..Config::default()
        }
    }

    /// `[limits]` identity slots and exact bindings (the other sizes as [`Limits::suite`]).
    pub fn limits(mut self, identities: u32, exact_bindings: u32) -> Config {
        let l = self.limits.get_or_insert_with(Limits::suite);
        l.identities = Some(identities);
        l.exact_bindings = Some(exact_bindings);
        self
    }

    /// `[limits]` as written here, whole.
    pub fn with_limits(mut self, limits: Limits) -> Config {
        self.limits = Some(limits);
        self
    }

    /// No `[limits]`: the node's defaults.
    pub fn default_limits(mut self) -> Config {
        self.limits = None;
        self
    }

    /// `[node] tunnels`.
    pub fn tunnels(mut self, policy: &str) -> Config {
        self.node.tunnels = Some(policy.to_owned());
        self
    }

    pub fn anonymous(mut self, packets_per_second: u64, burst: u64) -> Config {
        self.anonymous = Some(Anonymous {
            packets_per_second,
            burst,
        });
        self
    }

    pub fn controller(mut self, controller: Controller) -> Config {
        self.controller = Some(controller);
        self
    }

    pub fn anomaly(mut self, anomaly: Anomaly) -> Config {
        self.anomaly = Some(anomaly);
        self
    }

    pub fn fleet(mut self, fleet: Fleet) -> Config {
        self.fleet = Some(fleet);
        self
    }

    pub fn tokens(mut self, tokens: Tokens) -> Config {
        self.tokens = Some(tokens);
        self
    }

    /// `[listen] bind`: the HTTPS bind listener.
    pub fn listen_bind(mut self, addr: impl Display) -> Config {
        self.listen.get_or_insert_with(Listen::default).bind = Some(addr.to_string());
        self
    }

    /// `[listen] metrics`: Prometheus `/metrics`.
    pub fn listen_metrics(mut self, addr: impl Display) -> Config {
        self.listen.get_or_insert_with(Listen::default).metrics = Some(addr.to_string());
        self
    }

    /// `[metrics] top_k`.
    pub fn top_k(mut self, k: u64) -> Config {
        self.metrics = Some(Metrics { top_k: k });
        self
    }

    pub fn drop_events(mut self, interval_ms: u64) -> Config {
        self.drop_events = Some(DropEvents { interval_ms });
        self
    }

    pub fn plan(mut self, plan: Plan) -> Config {
        self.plans.push(plan);
        self
    }

    pub fn endpoint(mut self, endpoint: Endpoint) -> Config {
        self.endpoints.push(endpoint);
        self
    }

    pub fn identity(mut self, identity: Identity) -> Config {
        self.identities.push(identity);
        self
    }

    /// `n` identities `id0`, `id1`, … of `class` on `plan`, identity `i` bound to `addr(i)`:
    /// the scale tests' and benches' populations.
    pub fn numbered_identities<A: Display>(
        mut self,
        n: u32,
        class: &str,
        plan: &str,
        addr: impl Fn(u32) -> A,
    ) -> Config {
        self.identities
            .extend((0..n).map(|i| Identity::new(&format!("id{i}"), class, plan, &[addr(i)])));
        self
    }

    /// The file's text.
    pub fn render(&self) -> String {
        toml::to_string(self).expect("a builder config renders as TOML")
    }

    /// Writes the file to `path` and returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.render())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.to_owned()
    }
}
