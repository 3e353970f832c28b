//! The agent's configuration: one TOML file (`/etc/tollgate/tollgate.toml`), read and fully
//! validated before anything is touched. A refusal names the file, the line and the field, so
//! that an operator can fix it without guessing; `tollgate config check FILE` runs the same
//! code. docs/config.md describes every key and every refusal.
//!
//! Parsing goes in two steps: serde reads the file into [`raw`] structures that keep the spans
//! of their values (unknown keys and wrong types stop there), then [`check`] turns them into a
//! [`Config`], refusing impossible values and contradictions between sections.

mod check;
#[cfg(test)]
mod docs_tests;
mod raw;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    ops::{Range, RangeInclusive},
    path::{Path, PathBuf},
};

use tollgate_common::policy::Class;
use toml::de::{DeTable, DeValue};

// The controller's sections are the controller's types: each knob is defined (and given its
// default) once, where it is used.
pub use crate::controller::{
    Controller, GpuSourceKind,
    anomaly::{Anomaly, AnomalyMode},
};
use crate::{
    loader::{AttachMode, KernelLog},
    tables::{EndpointSpec, PlanLimits},
};

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it came from, or `"<embedded default>"`.
    pub source: String,
    pub node: Node,
    pub anonymous: Anonymous,
    pub drop_events: DropEvents,
    pub controller: Controller,
    pub listen: Listen,
    /// In file order; an identity's plan is its index here ([`Config::plan_index`]).
    pub plans: Vec<Plan>,
    /// In file order; endpoint id = index + 1 ([`Config::endpoint_id`]).
    pub endpoints: Vec<Endpoint>,
    pub identities: Vec<StaticIdentity>,
    /// Every role name, endpoints' first and then identities', in order of first appearance;
    /// role `roles[i]` is bit `1 << i`.
    pub roles: Vec<String>,
    /// Token binding (the HTTPS bind listener and `tollgate bind --token`); `None`: off.
    pub tokens: Option<Tokens>,
    pub anomaly: Anomaly,
    pub metrics: Metrics,
    /// `[fleet]`: the pool this node shares bindings, revocations and quarantines with
    /// (`crate::fleet`), and the fleet-wide plans' shares (`fleet::global`).
    pub fleet: Option<Fleet>,
    /// `[limits]`: the kernel tables' sizes (`crate::sizes`).
    pub limits: Limits,
    /// Identity name -> index in `identities`: lookups by name stay cheap with thousands
    /// of identities (the controller and /metrics look every one up on every pass).
    pub identity_index: std::collections::HashMap<String, usize>,
    /// `[[prices]]` and `[pricing]`: what the usage feed's tokens cost (`crate::usage`).
    pub prices: crate::usage::Prices,
    /// `[usage]`: the usage feed's HTTP listener and bounds.
    pub usage: crate::usage::UsageConfig,
}

/// `[limits]`, checked against the node: the sizes the agent loads the tables with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub sizes: crate::sizes::Sizes,
    /// What the tables take at these sizes (bytes, `crate::sizes::kernel_memory`).
    pub kernel_memory: u64,
    /// What they may take (`kernel_memory_mib`, or an eighth of the node's memory).
    pub allowance: u64,
    /// Whether the allowance is the operator's (`kernel_memory_mib`) or the default share.
    pub allowance_set: bool,
    /// Possible CPUs the per-CPU tables were costed for.
    pub cpus: u32,
}

/// What `/metrics` exposes beyond the fixed families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metrics {
    /// Identities in the top-K families (the only ones labelled by identity).
    pub top_k: usize,
    /// Label token identities by name; `false`: by slot (`slot-N`), since any local user
    /// can read `/metrics`. Configured identities keep their names.
    pub identity_names: bool,
}

/// `[fleet]`: how this node reaches the pool's store and what it does while the store is out.
/// Every name and file is checked with the fleet module's own rules (`crate::fleet`), so a
/// configuration that passes is one the store client takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    pub store: FleetStore,
    /// PEM roots for a TLS store (else the system's roots); only with TLS.
    pub ca_file: Option<PathBuf>,
    /// The ACL user and password file (`fleet::store::Credentials::load`); `None`: no AUTH.
    pub credentials: Option<PathBuf>,
    /// The pool key file (`fleet::entry::PoolKey::load`).
    pub pool_key: PathBuf,
    /// The key namespace: every node of a pool names the same one.
    pub pool: String,
    /// This node's name in the pool: unique per node.
    pub node: String,
    pub sync_interval_ms: u64,
    /// Bound on one store operation, connecting included.
    pub op_timeout_ms: u64,
    /// The change stream is trimmed to about this many entries.
    pub stream_max_len: u64,
    pub outage: Outage,
    /// The line of the `[fleet]` table.
    pub line: usize,
}

/// Where the store is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetStore {
    /// `redis://` or `rediss://` (checked by `fleet::store::check_url`).
    Url { url: String, tls: bool },
    /// A primary found through Sentinel.
    Sentinel {
        /// The name the sentinels know the primary by (`sentinel monitor <service> …`).
        service: String,
        /// `host:port` of each sentinel, in file order, no duplicates.
        nodes: Vec<String>,
        /// Sentinels and the primary over TLS.
        tls: bool,
    },
}

impl FleetStore {
    pub fn tls(&self) -> bool {
        match self {
            FleetStore::Url { tls, .. } | FleetStore::Sentinel { tls, .. } => *tls,
        }
    }
}

/// What global quotas and global rates do while the store cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    pub quotas: OutageMode,
    pub rates: OutageMode,
}

/// How a fleet-wide budget is enforced by a node cut off from the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutageMode {
    /// 1/N of the budget, N the last known pool size: the fleet total stays within the
    /// budget if every node is cut off alike.
    Share,
    /// The full budget on every node: up to N times the budget fleet-wide, nobody cut short.
    Local,
    /// Nothing over what was already granted until the store returns.
    Closed,
}

impl OutageMode {
    pub const ALL: [OutageMode; 3] = [OutageMode::Share, OutageMode::Local, OutageMode::Closed];

    pub fn label(self) -> &'static str {
        match self {
            OutageMode::Share => "share",
            OutageMode::Local => "local",
            OutageMode::Closed => "closed",
        }
    }

    pub fn from_label(s: &str) -> Option<OutageMode> {
        OutageMode::ALL.into_iter().find(|m| m.label() == s)
    }
}

impl Fleet {
    pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 250;
    pub const SYNC_INTERVAL_MS: RangeInclusive<u64> = 50..=10_000;
    pub const DEFAULT_OP_TIMEOUT_MS: u64 = 500;
    pub const OP_TIMEOUT_MS: RangeInclusive<u64> = 50..=5_000;
    pub const DEFAULT_STREAM_MAX_LEN: u64 = 100_000;
    pub const STREAM_MAX_LEN: RangeInclusive<u64> = 1_000..=1_000_000;
    /// More sentinels than this is a typo or a list of every host; three or five is usual.
    pub const MAX_SENTINELS: usize = 16;
}

impl Default for Outage {
    fn default() -> Self {
        Outage {
            quotas: OutageMode::Share,
            rates: OutageMode::Share,
        }
    }
}

/// The class named by a label (`internal`, `partner`, `customer`); `anonymous` is not a
/// class an identity can have.
pub fn class_from_label(label: &str) -> Option<Class> {
    Class::from_label(label).filter(|c| *c != Class::Anonymous)
}

/// How tokens are verified and what their claims mean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// `tokens.jwks`: the legacy single issuer's key file (the issuer named `default`).
    pub jwks: Option<PathBuf>,
    /// `tokens.audience`: the legacy issuer's audience (`aud` must contain it).
    pub audience: Option<String>,
    /// `tokens.issuer`: the legacy issuer's `iss`; `None`: `iss` is not checked.
    pub issuer: Option<String>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub max_ttl_s: u64,
    pub clock_skew_s: u64,
    pub max_token_bytes: usize,
    pub identity_claim: String,
    pub class_claim: String,
    pub plan_claim: String,
    pub roles_claim: String,
    /// Class of a token without a class claim; `None`: such tokens are refused.
    pub default_class: Option<Class>,
    /// Plan of a token without a plan claim (a configured plan); `None`: refused.
    pub default_plan: Option<String>,
    /// The most live token bindings one identity may hold: past it a bind from a new address
    /// is refused (`binding_cap`, 429), so one customer cannot fill the binding table.
    pub max_bindings_per_identity: usize,
    /// `[tokens]`' fetch settings: the defaults of every issuer.
    pub fetch: Fetch,
    /// Every trusted issuer: the legacy `default` (from `tokens.jwks`) first when there is
    /// one, then `[[tokens.issuers]]` in file order. Never empty.
    pub issuers: Vec<Issuer>,
}

/// The name of the issuer `tokens.jwks` + `tokens.audience` make.
pub const LEGACY_ISSUER: &str = "default";

/// How an issuer's remote keys are fetched and how long they serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetch {
    /// PEM roots to trust instead of the system's.
    pub ca_bundle: Option<PathBuf>,
    /// A larger JWKS (or discovery document) is refused (`too_large`).
    pub max_bytes: usize,
    /// One fetch, connect to last byte.
    pub timeout_ms: u64,
    /// Bounds on the refresh interval `Cache-Control: max-age` sets (no max-age: the max).
    pub cache_min_s: u64,
    pub cache_max_s: u64,
    /// At most one fetch for unknown `kid`s per this many seconds.
    pub refetch_cooldown_s: u64,
    /// The last good keys serve this long after their fetch; then `keys_unavailable`.
    pub max_stale_s: u64,
}

/// One trusted issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    /// `[a-z0-9_-]{1,32}`, unique: metric labels and status name it.
    pub name: String,
    /// `iss` must equal it exactly; `None` only for the legacy issuer without
    /// `tokens.issuer`.
    pub issuer: Option<String>,
    /// `aud` must contain one of them.
    pub audiences: Vec<String>,
    pub source: KeySource,
    /// `[tokens]`' fetch settings with this issuer's overrides.
    pub fetch: Fetch,
    pub claims: ClaimRules,
    /// The classes its tokens may be placed in (labels); `None`: any.
    pub classes: Option<Vec<String>>,
    /// The plans its tokens may be placed in; `None`: any.
    pub plans: Option<Vec<String>>,
    /// Longest lifetime (`exp - iat`) of its tokens; `[tokens] max_ttl_s` unless the issuer
    /// sets its own (Dex's 24 h ID-token lifetime need not lengthen every issuer's).
    pub max_ttl_s: u64,
}

/// Where an issuer's keys come from: the fetcher's own type, so the configuration and the
/// fetcher name the sources once.
pub use crate::issuers::SourceKind as KeySource;

impl KeySource {
    pub fn is_remote(&self) -> bool {
        !matches!(self, KeySource::File(_))
    }
}

/// What an issuer's claims mean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRules {
    /// Claim path of the token's id (`jti`; Entra ID: `uti`): what replay detection and
    /// `tollgate token revoke --token-id` key on.
    pub token_id: String,
    /// With that claim absent, the id is `sha256:` + a hash of the token's signed bytes
    /// instead of the refusal `missing_jti` (Dex, Auth0's default profile).
    pub derive_token_id: bool,
    /// Dotted claim path of the identity.
    pub identity: String,
    /// Dotted claim path of the roles.
    pub roles: String,
    /// `scope`: one space-separated string; `array`: an array of strings.
    pub roles_scope: bool,
    /// A token without the roles claim is refused (`missing_roles`).
    pub roles_required: bool,
    pub class: ValueMap,
    pub plan: ValueMap,
}

/// A claim whose value is mapped to a class or a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueMap {
    /// Dotted claim path.
    pub claim: String,
    /// claim value -> output, in file order; empty: the claim's value is the output.
    pub values: Vec<(String, String)>,
    /// When the claim is absent (and, with `unmapped_default`, when its value is not in
    /// `values`). Checked: a class label or a configured plan.
    pub default: Option<String>,
    /// `unmapped = "default"`: a value not in `values` takes `default` instead of the
    /// refusal `unmapped_value`.
    pub unmapped_default: bool,
    /// `default` is `[tokens]`' (`default_class`/`default_plan`): the issuer has no rule of
    /// its own.
    pub from_tokens_default: bool,
}

impl Tokens {
    /// The issuer named `name`.
    pub fn issuer(&self, name: &str) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.name == name)
    }

    /// The longest lifetime any issuer's token may have: what a revoked token id must be
    /// remembered for (a shorter memory would let a token of the longest-lived issuer bind
    /// again once its id is forgotten).
    pub fn longest_ttl_s(&self) -> u64 {
        self.issuers
            .iter()
            .map(|i| i.max_ttl_s)
            .fold(self.max_ttl_s, u64::max)
    }
}

impl Default for Fetch {
    fn default() -> Self {
        Fetch {
            ca_bundle: None,
            max_bytes: 256 * 1024,
            timeout_ms: 5000,
            cache_min_s: 30,
            cache_max_s: 3600,
            refetch_cooldown_s: 30,
            max_stale_s: 86400,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub interfaces: Vec<String>,
    pub xdp_mode: AttachMode,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub control_group: String,
    /// How much the XDP program logs (rare events only); off by default.
    pub kernel_log: KernelLog,
    /// The size at which `audit.log` is rotated to `audit.log.1`.
    pub audit_max_bytes: u64,
    /// What to do about decapsulating devices (`tunnels`): cover them (default), refuse to
    /// start, or only warn.
    pub tunnels: crate::tunnels::TunnelPolicy,
}

/// The allowance of unbound sources, per IPv4 /24 and per IPv6 /64, /56 and /48, on endpoints
/// with `anonymous = true`. Everywhere else unbound sources are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Anonymous {
    /// 0: no anonymous traffic at all.
    pub packets_per_second: u64,
    pub burst: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvents {
    /// Minimum ms between two sampled drop events on one CPU; 0: no events.
    pub interval_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen {
    /// The token bind listener.
    pub bind: SocketAddr,
    /// Prometheus `/metrics`.
    pub metrics: SocketAddr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub name: String,
    /// 0..=100; higher tiers are held back later as GPUs saturate.
    pub priority: u8,
    pub limits: PlanLimits,
    pub quota: crate::controller::quota::QuotaLimits,
    /// `response_*`: caps on the bytes the node sends back (node scope whatever `scope` says).
    pub response: crate::controller::response::ResponseLimits,
    /// `scope`: where the rate and quotas hold: per identity on this node, or per identity
    /// across the pool (`[fleet]`: each node enforces its share, `fleet::global`).
    pub scope: PlanScope,
}

/// Where a plan's rate and quotas hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlanScope {
    /// Each node grants the whole rate and quotas (an identity served by N nodes gets N×).
    #[default]
    Node,
    /// The rate and quotas hold across the pool: each node enforces its share of the rate,
    /// and a quota is spent when the pool's total reaches it.
    Fleet,
}

impl PlanScope {
    pub fn label(self) -> &'static str {
        match self {
            PlanScope::Node => "node",
            PlanScope::Fleet => "fleet",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub name: String,
    /// `spec.ports` is the first of `port_ranges`; the kernel record is the same for all.
    pub spec: EndpointSpec,
    /// Every port range, in file order, never overlapping each other or another endpoint's
    /// ranges of the same protocol. Install the endpoint once per range.
    pub port_ranges: Vec<RangeInclusive<u16>>,
    pub role_names: Vec<String>,
    /// GPUs (NVML indices) serving this endpoint: their saturation holds it back.
    pub gpus: Vec<u32>,
    /// Flow tracking and the request-size caps (`track_flows`, `max_request_bytes`,
    /// `max_unanswered_bytes`), as the kernel's `FLOW_POLICY` holds them.
    pub flow: tollgate_common::flow::FlowPolicy,
    /// `[endpoints.model_server]`: the model server whose queue and KV cache join this
    /// endpoint's pressure (`controller::scrape`).
    pub model_server: Option<crate::controller::scrape::ModelServer>,
}

/// An identity bound by configuration (an internal service, a partner's range), not by token.
#[derive(Clone, Debug, PartialEq)]
pub struct StaticIdentity {
    pub name: String,
    pub class: Class,
    /// The name of one of [`Config::plans`].
    pub plan: String,
    /// OR of the role bits of `role_names`.
    pub roles: u64,
    pub role_names: Vec<String>,
    /// Prefixes with their host bits zero; a bare address is /32 or /128.
    pub bind: Vec<(IpAddr, u8)>,
}

// Defaults, one place per section (the controller's sections keep theirs in `controller`).
// docs/config.md's default column is checked against these (config/tests.rs).

impl Node {
    /// `[node]` with every key but the required `interfaces` at its default.
    pub fn with_defaults(interfaces: Vec<String>) -> Node {
        Node {
            interfaces,
            xdp_mode: AttachMode::Auto,
            pin_dir: PathBuf::from(crate::paths::PIN_DIR),
            state_dir: PathBuf::from(crate::paths::STATE_DIR),
            control_socket: PathBuf::from(crate::paths::CONTROL_SOCKET),
            control_group: "tollgate".to_owned(),
            kernel_log: KernelLog::Off,
            audit_max_bytes: crate::audit::MAX_BYTES,
            tunnels: crate::tunnels::TunnelPolicy::Enforce,
        }
    }
}

impl Default for Anonymous {
    fn default() -> Self {
        Anonymous {
            packets_per_second: 20,
            burst: 40,
        }
    }
}

impl Default for DropEvents {
    fn default() -> Self {
        DropEvents { interval_ms: 100 }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            bind: SocketAddr::from(([0, 0, 0, 0], 8443)),
            metrics: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            top_k: 10,
            identity_names: false,
        }
    }
}

impl Tokens {
    pub const DEFAULT_MAX_TTL_S: u64 = 3600;
    pub const DEFAULT_CLOCK_SKEW_S: u64 = 30;
    pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8192;
    pub const DEFAULT_MAX_BINDINGS_PER_IDENTITY: usize = 64;
    pub const DEFAULT_IDENTITY_CLAIM: &'static str = "sub";
    pub const DEFAULT_TOKEN_ID_CLAIM: &'static str = "jti";
    pub const DEFAULT_CLASS_CLAIM: &'static str = "tollgate_class";
    pub const DEFAULT_PLAN_CLAIM: &'static str = "tollgate_plan";
    pub const DEFAULT_ROLES_CLAIM: &'static str = "tollgate_roles";
    /// More would make every status and scrape long for no use: a node trusts a handful.
    pub const MAX_ISSUERS: usize = 32;
}

impl Plan {
    pub const DEFAULT_PRIORITY: u8 = 50;
    pub const DEFAULT_SCOPE: PlanScope = PlanScope::Node;

    /// Whether this plan's rate and quotas hold across the pool.
    pub fn fleet_wide(&self) -> bool {
        self.scope == PlanScope::Fleet
    }
}

impl Endpoint {
    pub const DEFAULT_WEIGHT: f64 = 1.0;
    pub const DEFAULT_ANONYMOUS: bool = false;
    /// TCP endpoints' flows are tracked unless `track_flows = false` (UDP has no flows).
    pub const DEFAULT_TRACK_FLOWS: bool = true;
    /// The smallest request cap (`max_request_bytes`, `max_unanswered_bytes`) other than 0:
    /// below it a TLS handshake or an HTTP request's headers alone would be cut.
    pub const MIN_REQUEST_CAP: i64 = 4096;
    /// The largest: 1 TiB, far beyond any request and well inside the kernel's u64.
    pub const MAX_REQUEST_CAP: i64 = 1 << 40;
}

/// A refusal: the file, the line (when there is one) and the field it is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// 1-based. `None` only when the file could not be read at all.
    pub line: Option<usize>,
    /// A path such as `endpoints[1].ports` (indices count from 0); empty when the error is
    /// about the file as a whole (unreadable).
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

const EMBEDDED: &str = include_str!("../../config/tollgate.toml");
const EMBEDDED_SOURCE: &str = "<embedded default>";

impl Config {
    pub const DEFAULT_PATH: &'static str = "/etc/tollgate/tollgate.toml";

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: source.clone(),
            line: None,
            field: String::new(),
            message: format!("cannot read the configuration: {e}"),
        })?;
        Self::parse(&text, &source)
    }

    /// Validates `text`; `source` names it in errors (a path, `"<embedded default>"`).
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| toml_error(&e, text, source))?;
        check::Checker::new(text, source).config(raw)
    }

    /// The configuration shipped in the binary, for a first run without a file.
    pub fn embedded_default() -> Config {
        // A unit test parses it, so this cannot fail in a built binary.
        Self::parse(EMBEDDED, EMBEDDED_SOURCE).expect("the embedded default config is valid")
    }

    /// The text of the embedded default (for `tollgate config default`, or to write a first
    /// file from).
    pub fn embedded_default_text() -> &'static str {
        EMBEDDED
    }

    /// Index of plan `name` in [`Config::plans`]: the plan number kept in identity records.
    /// The configured identity named `name`.
    pub fn identity(&self, name: &str) -> Option<&StaticIdentity> {
        self.identity_index
            .get(name)
            .and_then(|i| self.identities.get(*i))
    }

    pub fn plan_index(&self, name: &str) -> Option<u16> {
        let i = self.plans.iter().position(|p| p.name == name)?;
        u16::try_from(i).ok()
    }

    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.name == name)
    }

    /// The bit of role `name` (`1 << i`).
    pub fn role_bit(&self, name: &str) -> Option<u64> {
        let i = self.roles.iter().position(|r| r == name)?;
        1u64.checked_shl(u32::try_from(i).ok()?)
    }

    /// The kernel id of endpoint `name`: 1-based, in file order (0 means "no endpoint").
    pub fn endpoint_id(&self, name: &str) -> Option<u32> {
        let i = self.endpoints.iter().position(|e| e.name == name)?;
        u32::try_from(i + 1).ok()
    }
}

/// 1-based line of byte offset `pos`.
fn line_of(text: &str, pos: usize) -> usize {
    let end = pos.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Turns a TOML syntax or serde error into a refusal with a line and a field path. toml's
/// own error carries the span but not the path with array indices, so the path comes from a
/// spanned parse of the same text (a recovering one: a syntax error still leaves a tree).
fn toml_error(e: &toml::de::Error, text: &str, source: &str) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let mut message = e.message().trim().replace('\n', "; ");
    // The root table's span is empty; any other table's is its header or its braces.
    let root = span.is_empty() && message.starts_with("missing field");
    let mut field = if root {
        String::new()
    } else {
        locate(text, span.start).unwrap_or_default()
    };
    if let Some(key) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        field = join_key(&field, key);
        message = "this key is required".to_owned();
    } else if let Some(rest) = message.strip_prefix("unknown field") {
        message = format!("unknown key{rest}");
    } else if field.is_empty() && message == "duplicate key" {
        // The second key is not in the tree; it sits in the table of the key before it.
        let key = text.get(span.clone()).unwrap_or_default();
        let key = key.rsplit('.').next().unwrap_or_default().trim();
        if let Some(parent) = parent_of_key_before(text, span.start) {
            field = join_key(&parent, key.trim_matches(['"', '\'']));
        }
    }
    if let Some(at) = message.find("expected struct ") {
        message.replace_range(at.., "expected a table");
    }
    // serde names Rust types; the operator wrote TOML.
    for (rust, toml) in [
        ("expected f64", "expected a number"),
        ("expected i64", "expected an integer"),
        ("expected a sequence", "expected an array"),
        ("expected a boolean", "expected true or false"),
        ("invalid type: map", "invalid type: table"),
        ("invalid type: sequence", "invalid type: array"),
    ] {
        message = message.replace(rust, toml);
    }
    if field.is_empty() {
        field = "(document)".to_owned();
    }
    ConfigError {
        file: source.to_owned(),
        line: Some(line_of(text, span.start)),
        field,
        message,
    }
}

fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The path (`endpoints[1].ports`) of the innermost key or value at byte `pos`. Elements of an
/// array of scalars are reported as the array, as semantic errors are, with the line saying
/// which element.
fn locate(text: &str, pos: usize) -> Option<String> {
    let (tree, _) = DeTable::parse_recoverable(text);
    // A syntax error often sits just past the value it broke (an unclosed array at the end of
    // its text), so a second pass counts a span's end as inside it.
    [false, true].into_iter().find_map(|inclusive| {
        let mut path = String::new();
        find_in_table(tree.get_ref(), pos, inclusive, &mut path).then_some(path)
    })
}

fn inside(span: Range<usize>, pos: usize, inclusive: bool) -> bool {
    span.start <= pos && (pos < span.end || (inclusive && pos == span.end))
}

fn find_in_table(t: &DeTable<'_>, pos: usize, inclusive: bool, path: &mut String) -> bool {
    for (k, v) in t.iter() {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(k.get_ref());
        // A table's own span is only its header, so its children are searched whatever it
        // covers.
        if find_in_value(v, pos, inclusive, path) || inside(k.span(), pos, inclusive) {
            return true;
        }
        path.truncate(len);
    }
    false
}

fn find_in_value(
    v: &toml::Spanned<DeValue<'_>>,
    pos: usize,
    inclusive: bool,
    path: &mut String,
) -> bool {
    match v.get_ref() {
        DeValue::Table(t) if find_in_table(t, pos, inclusive, path) => return true,
        DeValue::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                if matches!(e.get_ref(), DeValue::Table(_) | DeValue::Array(_)) {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    if find_in_value(e, pos, inclusive, path) {
                        return true;
                    }
                    path.truncate(len);
                } else if inside(e.span(), pos, inclusive) {
                    return true;
                }
            }
        }
        _ => {}
    }
    inside(v.span(), pos, inclusive)
}

/// The path of the table holding the last key that starts before `pos`.
fn parent_of_key_before(text: &str, pos: usize) -> Option<String> {
    fn walk(t: &DeTable<'_>, pos: usize, path: &str, best: &mut Option<(usize, String)>) {
        for (k, v) in t.iter() {
            let start = k.span().start;
            if start < pos && best.as_ref().is_none_or(|(b, _)| start > *b) {
                *best = Some((start, path.to_owned()));
            }
            let child = join_key(path, k.get_ref());
            match v.get_ref() {
                DeValue::Table(t) => walk(t, pos, &child, best),
                DeValue::Array(a) => {
                    for (i, e) in a.iter().enumerate() {
                        if let DeValue::Table(t) = e.get_ref() {
                            walk(t, pos, &format!("{child}[{i}]"), best);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let (tree, _) = DeTable::parse_recoverable(text);
    let mut best = None;
    walk(tree.get_ref(), pos, "", &mut best);
    best.map(|(_, path)| path)
}
