//! What the agent answers on the control socket: one type per verb's `result`, serialised by
//! the agent and deserialised by the CLI and `tollgate top` (nobody reads a reply by string
//! key). One spelling per field across all replies: packet counts are `passed_packets` /
//! `dropped_packets` wherever they appear.
//!
//! The HTTPS bind listener answers with the same types (`TokenBound`, `TokenUnbound`) or
//! with [`HttpError`].

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};
use tollgate_common::policy::Class;

use crate::{controller::gpu::GpuReading, tables::Proto};
pub use crate::{identity::IdentitySource, state::QuarantineOwner};

/// `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Where the configuration came from (a path, or "embedded default").
    pub config: String,
    pub interfaces: Vec<String>,
    pub xdp_mode: String,
    pub pin_dir: PathBuf,
    /// Whether the agent adopted maps pinned by an earlier run.
    pub adopted_pins: bool,
    pub layout_version: u32,
    pub uptime_s: u64,
    /// Configured endpoints.
    pub endpoints: usize,
    /// Identities with a kernel slot (configured and token-made).
    pub identities: usize,
    /// Bindings in the kernel's tables (static and run-time).
    pub bindings: usize,
    /// Names of the quarantined identities.
    pub quarantined: Vec<String>,
    /// Names of the identities a response cap of their plan holds back now (`quota show` has
    /// the figures); absent from agents older than response caps.
    #[serde(default)]
    pub response_capped: Vec<String>,
    /// Totals over every reason since the maps were created.
    pub passed_packets: u64,
    pub dropped_packets: u64,
    /// Dropped packets by drop reason (the reason's label), since the maps were created;
    /// reasons that dropped nothing may be left out.
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
    pub gpu: GpuStatus,
    pub anomaly_mode: String,
    /// `None` when token binding is not configured.
    pub tokens: Option<TokenStatus>,
    /// Decapsulating devices and what covers them (`[node] tunnels`); absent from agents
    /// older than the field.
    #[serde(default)]
    pub tunnels: TunnelReport,
    /// The program object loaded and the failed program loads recorded on this node.
    #[serde(default)]
    pub program: ProgramStatus,
    /// The pool this node shares changes with; `None` on a node of its own (and from agents
    /// older than the field).
    #[serde(default)]
    pub fleet: Option<FleetScope>,
    /// The kernel tables' sizes and memory (`[limits]`); empty from agents older than it.
    #[serde(default)]
    pub tables: TablesStatus,
    /// The coarse clock's tick and which plans run on the precise clock; `None` from agents
    /// older than the field.
    #[serde(default)]
    pub clock: Option<ClockStatus>,
}

/// `status.tables`: what each sized table holds at most and what the kernel says it takes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TablesStatus {
    /// Sum of `maps[].bytes`.
    pub kernel_memory: u64,
    /// What `[limits]` allows them (bytes).
    pub allowance: u64,
    pub maps: Vec<TableStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableStatus {
    pub map: String,
    pub max_entries: u32,
    /// The kernel's own figure (`memlock` in the map's fdinfo).
    pub bytes: u64,
}

/// `status.clock`: the kernel clocks the limiter runs on (docs/policy.md, "Which clock").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockStatus {
    /// The coarse clock's tick as measured at start, ns.
    pub tick_ns: u64,
    /// How: `clock_getres`, `sampled` or `assumed`.
    pub tick_source: crate::kernel_clock::TickSource,
    /// Plans on the precise clock (their burst does not cover the tick); every other plan is
    /// on the coarse clock.
    pub precise_plans: Vec<String>,
    /// "coarse" or "precise": the anonymous allowance's clock.
    pub anonymous: crate::kernel_clock::Clock,
}

/// `status.fleet`: the pool in a line (`tollgate fleet status` has the rest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetScope {
    pub pool: String,
    pub node: String,
    pub store_up: bool,
    /// Changes made here not yet taken by the store.
    pub outbox: usize,
    pub members: usize,
}

/// `tollgate fleet status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub pool: String,
    pub node: String,
    /// The store's URL or `sentinel:<service>`.
    pub store: String,
    /// With Sentinel: the primary last reached (`host:port`).
    pub primary: Option<String>,
    pub store_up: bool,
    /// The last store error (label: message); never a credential.
    pub last_error: Option<String>,
    /// How long the store has been unreachable, if it is.
    pub down_for_ms: Option<u64>,
    /// Since the last sync pass that succeeded (`None`: none yet).
    pub sync_age_ms: Option<u64>,
    pub sync_interval_ms: u64,
    /// The stream id this node has read up to.
    pub position: String,
    /// How far the stream's newest entry was ahead of it at the last pass (ms).
    #[serde(default)]
    pub stream_lag_ms: u64,
    /// Entries the node holds (one per subject: bindings, revocations, quarantines).
    pub held: usize,
    pub outbox: usize,
    pub members: Vec<FleetMember>,
    /// Entries refused (not signed with the pool key, malformed, stale …), by label.
    pub refused: BTreeMap<String, u64>,
    /// Entries published by this node, by kind.
    pub published: BTreeMap<String, u64>,
    /// Other nodes' entries installed here, by `kind/outcome`.
    pub installs: BTreeMap<String, u64>,
    /// Token claims by outcome (`claimed`, `replay`, `fallback`).
    pub claims: BTreeMap<String, u64>,
    /// Changes made here that could not be shared (a name or payload no entry can carry, or
    /// the outbox's disk): in force on this node only.
    #[serde(default)]
    pub unshared: u64,
    /// Queued bindings dropped past the outbox's bound (their clients bind again).
    #[serde(default)]
    pub outbox_dropped: u64,
    /// Snapshot loads by reason (`first`, `gap`, `store_reset`, `restart`: a restart or the
    /// periodic reconciliation), and re-seeds.
    #[serde(default)]
    pub reloads: BTreeMap<String, u64>,
    #[serde(default)]
    pub reseeded: u64,
    /// Fleet-wide plans: the identities with the most demand here, with this node's
    /// share (at most [`FLEET_TOP_SHARES`]).
    #[serde(default)]
    pub shares: Vec<crate::fleet::global::ShareView>,
    /// Identities on fleet-wide plans this node tracks, and whether they run by the outage
    /// modes.
    #[serde(default)]
    pub global_identities: usize,
    #[serde(default)]
    pub global_outage: bool,
    #[serde(default)]
    pub pool_size: usize,
}

/// Shares shown by `tollgate fleet status`.
pub const FLEET_TOP_SHARES: usize = 10;

/// A member of the pool as its last heartbeat said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetMember {
    pub node: String,
    /// This node's wall clock minus the member's at its last beat (the member's clock may
    /// be off; negative means ahead).
    pub heartbeat_age_ms: Option<i64>,
    pub outbox: Option<u64>,
    pub bindings: Option<u64>,
}

/// `status.tunnels`: devices where decapsulated or decrypted packets arrive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelReport {
    /// `enforce`, `refuse` or `warn`.
    pub policy: String,
    /// Devices with the enforcing program attached (generic XDP).
    pub covered: Vec<CoveredTunnel>,
    /// Decapsulation points nothing enforces on (an IPsec SA count among them).
    pub uncovered: Vec<UncoveredTunnel>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoveredTunnel {
    pub device: String,
    /// rtnetlink kind (`vxlan`, `ipip` ...).
    pub kind: String,
    /// The program entry attached: `tollgate` (Ethernet) or `tollgate_l3`.
    pub program: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UncoveredTunnel {
    pub device: String,
    pub kind: String,
    pub why: String,
}

/// `status.program`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgramStatus {
    /// "embedded", or the file given to `run --program-object`.
    pub object: String,
    /// Program loads that failed (the verifier refused, the maps did not fit) with this
    /// state directory, this agent's start included if it was one.
    pub load_failures: u64,
    /// The last of them: when, which object, and the error's end.
    pub last_load_failure: Option<String>,
}

/// `status.gpu`: the controller's view of the GPUs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuStatus {
    /// `nvml`, `simulated` or `none`.
    pub source: String,
    /// Why the last reading failed, if it did.
    pub error: Option<String>,
    pub readings: Vec<GpuReading>,
    /// Names of the endpoints the controller holds back.
    pub saturated_endpoints: Vec<String>,
    /// Every endpoint's pressure and what it was made of (an older agent sends none).
    #[serde(default)]
    pub endpoints: Vec<EndpointLoad>,
}

/// One endpoint's load as the pressure formula sees it (`status.gpu.endpoints`, and
/// `tollgate gpu read`'s answer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointLoad {
    pub endpoint: String,
    /// `model_server`, `model_server_held` (its last good reading, through an outage),
    /// `model_server_pending` (its first answer has not come: no signal yet), `gpus` (no
    /// model server) or `gpus_fallback` (the model server failed for longer than
    /// `fallback_intervals`).
    pub source: String,
    /// The largest signal over its threshold (1.0: at a threshold); `None`: no signal, never
    /// held back.
    pub pressure: Option<f64>,
    /// The signal that set `pressure`.
    pub driver: Option<String>,
    pub signals: Vec<LoadSignal>,
    pub saturated: bool,
    pub model_server: Option<ModelServerView>,
}

impl EndpointLoad {
    /// An endpoint's row from its signals: the pressure and its driver are the formula's
    /// (`pressure::combine`), never kept beside them.
    pub fn new(
        endpoint: &str,
        source: &str,
        signals: &[crate::controller::pressure::Signal],
        saturated: bool,
        model_server: Option<ModelServerView>,
    ) -> EndpointLoad {
        let pressure = crate::controller::pressure::combine(signals);
        EndpointLoad {
            endpoint: endpoint.to_owned(),
            source: source.to_owned(),
            pressure: pressure.map(|p| p.0),
            driver: pressure.map(|p| p.1.to_owned()),
            signals: signals.iter().map(Into::into).collect(),
            saturated,
            model_server,
        }
    }
}

/// One input of the pressure formula: `value / at` is its level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadSignal {
    /// `queue`, `kv_cache` or `gpu_util`.
    pub name: String,
    pub value: f64,
    pub at: f64,
}

impl From<&crate::controller::pressure::Signal> for LoadSignal {
    fn from(s: &crate::controller::pressure::Signal) -> Self {
        LoadSignal {
            name: s.name.to_owned(),
            value: s.value,
            at: s.at,
        }
    }
}

/// An endpoint's model server as the controller last read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelServerView {
    pub url: String,
    pub kind: crate::controller::model_server::ServerKind,
    /// The reading in use (fresh or held); `None` before the first good scrape or after
    /// `fallback_intervals` without one.
    pub reading: Option<crate::controller::model_server::ModelReading>,
    /// Intervals since that reading came (0: this interval).
    pub age_intervals: Option<u32>,
    /// The outage under way: its first error.
    pub error: Option<String>,
    /// Scrapes by outcome (`ok`, `timeout`, `connect`, `parse` ...).
    #[serde(default)]
    pub scrapes: BTreeMap<String, u64>,
}

/// `status.tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStatus {
    /// Key ids in use, of every issuer.
    pub keys: Vec<String>,
    /// Verifications by result: `ok` or a refusal label.
    pub verifications: BTreeMap<String, u64>,
    /// Tokens presented from a second address while bound.
    pub probable_thefts: u64,
    /// Each trusted issuer: its keys' state and its refusals.
    #[serde(default)]
    pub issuers: Vec<IssuerStatus>,
    /// Refusals before an issuer was chosen (a token that does not parse, an `iss` no
    /// issuer has), by label; nonzero ones only.
    #[serde(default)]
    pub unselected_refusals: BTreeMap<String, u64>,
}

/// One row of `status.tokens.issuers`: the keys' state (`issuers::KeysStatus`: source, key
/// ids, skipped keys, age, last fetch, fetch counts) with the issuer's `iss` and its tallies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerStatus {
    /// The `iss` its tokens carry; `None`: the legacy issuer without `tokens.issuer`.
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    #[serde(flatten)]
    pub keys: crate::issuers::KeysStatus,
    /// Verifications that passed.
    pub verified: u64,
    /// Refusals by label; nonzero ones only.
    pub refusals: BTreeMap<String, u64>,
}

/// One row of `endpoints`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointRow {
    pub id: u32,
    pub name: String,
    pub protocol: Proto,
    /// "8000" or "8000-8010", one per range.
    pub ports: Vec<String>,
    pub weight: f64,
    #[serde(with = "class_labels")]
    pub classes: Vec<Class>,
    pub roles: Vec<String>,
    pub anonymous: bool,
    pub passed_packets: u64,
    pub dropped_packets: u64,
}

/// `endpoints`.
pub type Endpoints = Vec<EndpointRow>;

/// One row of `identities`; `identity` answers with one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdentityRow {
    pub id: u32,
    pub name: String,
    #[serde(with = "class_label")]
    pub class: Class,
    pub plan: String,
    pub roles: Vec<String>,
    pub source: IdentitySource,
    /// "198.18.0.0/24", "198.18.0.5/32 (expires in 30s)" or "... (expired)".
    pub bindings: Vec<String>,
    pub quarantined: Option<QuarantineInfo>,
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// "coarse" or "precise": the kernel clock its budgets run on, from its kernel record;
    /// absent from agents older than the field.
    #[serde(default)]
    pub clock: Option<crate::kernel_clock::Clock>,
    /// What the node sent back to it (`EGRESS_IDENTITY`); absent from agents older than the
    /// field.
    #[serde(default)]
    pub egress: Option<EgressTotals>,
    /// The response cap it is held by ("response day cap: 1200 of 1000 bytes, rolls at unix
    /// ..."); `None` when not capped (and from agents older than response caps).
    #[serde(default)]
    pub response_capped: Option<String>,
    /// Why its quota flag is set (`quota_exhausted`, `token_quota_exhausted`,
    /// `budget_exhausted`); `None` when it is not (and from older agents).
    #[serde(default)]
    pub quota_exhausted: Option<String>,
}

/// Totals of what the node sent from its protected endpoints to one identity, since the
/// identity's slot was created (the kernel's `EgressCounters`, summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressTotals {
    /// Packets and bytes as the egress hook sees them (skb length: L2 included, a GSO
    /// super-packet once).
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// TCP/UDP payload bytes: what the client's socket received.
    pub response_bytes: u64,
    /// Sum (ns) and number of the times to first byte measured on its flows: the mean over
    /// an interval is the difference of the sums over the difference of the counts.
    pub ttfb_sum_ns: u64,
    pub ttfb_count: u64,
}

impl From<tollgate_common::flow::EgressCounters> for EgressTotals {
    fn from(c: tollgate_common::flow::EgressCounters) -> EgressTotals {
        EgressTotals {
            sent_packets: c.sent.packets,
            sent_bytes: c.sent.bytes,
            response_bytes: c.payload,
            ttfb_sum_ns: c.ttfb_sum_ns,
            ttfb_count: c.ttfb_count,
        }
    }
}

/// `identities`.
pub type Identities = Vec<IdentityRow>;

/// `identity`.
pub type Identity = IdentityRow;

/// Why and until when an identity is quarantined, and by whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineInfo {
    pub reason: String,
    /// `None`: until released.
    pub until_unix_ms: Option<u64>,
    pub by: QuarantineOwner,
}

/// `bind` (an operator's binding).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    /// "198.18.0.5/32".
    pub target: String,
    pub identity: String,
    /// `None`: until unbound.
    pub expires_unix_ms: Option<u64>,
}

/// `unbind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbound {
    pub target: String,
}

/// `quarantine`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub identity: String,
    /// `None`: until released.
    pub until_unix_ms: Option<u64>,
}

/// `release`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub identity: String,
}

/// `explain`: what the kernel would decide for a packet, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explained {
    /// `pass`, `drop` or `aborted`.
    pub verdict: String,
    /// The reason's label (`docs/verdicts.md`).
    pub reason: String,
    pub endpoint_id: u32,
    pub endpoint: Option<String>,
    pub identity_id: Option<u32>,
    pub identity: Option<String>,
    #[serde(with = "opt_class_label")]
    pub class: Option<Class>,
    pub binding: Option<String>,
    /// "coarse" or "precise": the kernel clock the charged budgets run on (docs/policy.md);
    /// absent when no budget applies (and from agents older than the field).
    #[serde(default)]
    pub clock: Option<String>,
    /// The sentence for humans.
    pub why: String,
    /// For a `quota_exhausted` drop, what was spent: `quota_exhausted` (bytes or cost),
    /// `token_quota_exhausted` or `budget_exhausted` (the usage feed's); the kernel has one
    /// flag for all three. Absent otherwise and from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_reason: Option<String>,
}

/// `reload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    pub config: String,
    pub applied: Applied,
    /// Interfaces no longer configured, detached by this reload.
    pub detached: Vec<String>,
}

/// What applying the policy changed (`reload`, and the audit line of `start`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub endpoints: usize,
    pub port_slots_changed: usize,
    pub identities: usize,
    pub identities_removed: Vec<String>,
    pub bindings: usize,
    pub bindings_added: usize,
    pub bindings_removed: usize,
    /// Run-time bindings dropped because their identity left the configuration or expired.
    pub dropped_dynamic_bindings: Vec<String>,
}

/// One window of a quota row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaWindow {
    pub bytes: u64,
    /// `None`: the plan sets no byte limit for this window.
    pub bytes_limit: Option<u64>,
    pub cost: u64,
    pub cost_limit: Option<u64>,
    /// When the window ends (unix seconds).
    pub ends_unix: u64,
    /// Bytes the node sent back to the identity in this window (egress payload), and the
    /// plan's response cap for it (`None`: none); 0 and `None` from older agents.
    #[serde(default)]
    pub response_bytes: u64,
    #[serde(default)]
    pub response_bytes_limit: Option<u64>,
    /// Tokens the usage feed reported in this window, and the plan's `tokens_per_*` for
    /// it; 0 and `None` from older agents.
    #[serde(default)]
    pub tokens: u64,
    #[serde(default)]
    pub tokens_limit: Option<u64>,
    /// What they cost, and the plan's `budget_per_*`, in nano-units (1e-9) of the price
    /// table's currency.
    #[serde(default)]
    pub money_nano: u64,
    #[serde(default)]
    pub money_limit_nano: Option<u64>,
}

/// One row of `quota_show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaRow {
    pub identity: String,
    /// `None` when the identity has no plan any more.
    pub plan: Option<String>,
    pub minute: QuotaWindow,
    pub day: QuotaWindow,
    pub month: QuotaWindow,
    /// A fleet-wide plan's spend in the pool as this node sees it, by window
    /// (`minute`/`day`/`month` → (bytes, cost)); the windows above are this node's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<BTreeMap<String, (u64, u64)>>,
    /// The plan's `response_bytes_per_second` (`None`: no rate cap).
    #[serde(default)]
    pub response_bytes_per_second: Option<u64>,
    /// The response cap the identity is held by now, as `identities show` says it.
    #[serde(default)]
    pub response_capped: Option<String>,
    /// Why its quota flag is set now (`quota_exhausted`, `token_quota_exhausted`,
    /// `budget_exhausted`); `None` while it is not.
    #[serde(default)]
    pub exhausted: Option<String>,
    /// The price table's currency, for the money figures.
    #[serde(default)]
    pub currency: String,
}

/// `quota_show`.
pub type Quotas = Vec<QuotaRow>;

/// `quota_reset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaReset {
    /// `None`: every identity.
    pub identity: Option<String>,
    pub reset: bool,
}

/// `bind_token`, and the HTTPS listener's answer to POST /v1/bind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBound {
    pub address: IpAddr,
    pub identity: String,
    pub token_id: String,
    pub key_id: String,
    /// The token's `exp` (unix seconds): the binding ends then.
    pub expires_unix: u64,
}

/// The HTTPS listener's answer to DELETE /v1/bind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUnbound {
    pub address: IpAddr,
    pub identity: String,
    pub token_id: String,
}

/// `revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub token_id: Option<String>,
    pub identity: Option<String>,
    /// The bindings the revocation ended ("198.18.0.5/32").
    pub bindings_removed: Vec<String>,
}

/// `uninstall`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uninstalled {
    /// The pins removed.
    pub removed: Vec<PathBuf>,
}

/// The HTTPS listener's answer when it refuses (any status but 200).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpError {
    pub error: String,
    /// The refusal's label (`bad_signature`, `replay`, ...) when a token was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

mod class_label {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};
    use tollgate_common::policy::Class;

    pub fn serialize<S: Serializer>(c: &Class, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.label())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Class, D::Error> {
        let label = String::deserialize(d)?;
        Class::from_label(&label)
            .ok_or_else(|| D::Error::custom(format!("unknown class {label:?}")))
    }
}

mod opt_class_label {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};
    use tollgate_common::policy::Class;

    pub fn serialize<S: Serializer>(c: &Option<Class>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_str(c.label()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Class>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(label) => Class::from_label(&label)
                .map(Some)
                .ok_or_else(|| D::Error::custom(format!("unknown class {label:?}"))),
        }
    }
}

mod class_labels {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _, ser::SerializeSeq};
    use tollgate_common::policy::Class;

    pub fn serialize<S: Serializer>(cs: &[Class], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(cs.len()))?;
        for c in cs {
            seq.serialize_element(c.label())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Class>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|l| {
                Class::from_label(l).ok_or_else(|| D::Error::custom(format!("unknown class {l:?}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::Response;

    /// Serialises `v` as the agent does (inside a `Response`, one line), reads it back as the
    /// CLI does (`Response`, then the verb's type from `result`) and checks nothing changed.
    fn round_trip<T>(v: T) -> serde_json::Value
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let line = serde_json::to_string(&Response::ok(serde_json::to_value(&v).unwrap())).unwrap();
        let resp: Response = serde_json::from_str(&line).unwrap();
        let result = resp.result.expect("result");
        let back: T = serde_json::from_value(result.clone()).unwrap();
        assert_eq!(back, v);
        result
    }

    fn row(name: &str, by: QuarantineOwner) -> IdentityRow {
        IdentityRow {
            id: 3,
            name: name.into(),
            class: Class::Customer,
            plan: "pro".into(),
            roles: vec!["chat".into()],
            source: IdentitySource::Token,
            bindings: vec!["198.18.0.5/32 (expires in 30s)".into()],
            quarantined: Some(QuarantineInfo {
                reason: "scraping".into(),
                until_unix_ms: Some(1_700_000_000_000),
                by,
            }),
            passed_packets: 10,
            passed_bytes: 1000,
            dropped_packets: 2,
            dropped_bytes: 200,
            clock: None,
            egress: Some(EgressTotals {
                sent_packets: 4,
                sent_bytes: 6000,
                response_bytes: 5800,
                ttfb_sum_ns: 90_000_000,
                ttfb_count: 3,
            }),
            response_capped: Some("response minute cap: 20 of 10 bytes, rolls at unix 60".into()),
            quota_exhausted: Some("token_quota_exhausted".into()),
        }
    }

    #[test]
    fn status() {
        let v = round_trip(Status {
            version: "0.1.0".into(),
            config: "/etc/tollgate/tollgate.toml".into(),
            interfaces: vec!["eth0".into()],
            xdp_mode: "auto".into(),
            pin_dir: "/sys/fs/bpf/tollgate".into(),
            adopted_pins: true,
            layout_version: 2,
            uptime_s: 61,
            endpoints: 2,
            identities: 3,
            bindings: 4,
            quarantined: vec!["suspect".into()],
            response_capped: vec![],
            passed_packets: 100,
            dropped_packets: 7,
            drops: [
                ("class_not_allowed".to_owned(), 5),
                ("quarantined".to_owned(), 2),
            ]
            .into(),
            gpu: GpuStatus {
                source: "simulated".into(),
                error: None,
                readings: vec![GpuReading {
                    index: 0,
                    name: "simulated".into(),
                    utilization: 0.2,
                    memory_used_bytes: 1 << 30,
                    memory_total_bytes: 80 << 30,
                    power_watts: Some(220.0),
                }],
                saturated_endpoints: vec!["inference".into()],
                endpoints: Vec::new(),
            },
            anomaly_mode: "shadow".into(),
            program: ProgramStatus::default(),
            fleet: None,
            tables: Default::default(),
            clock: None,
            tokens: Some(TokenStatus {
                keys: vec!["k1".into()],
                verifications: [("ok".to_owned(), 3), ("expired".to_owned(), 1)].into(),
                probable_thefts: 1,
                issuers: vec![IssuerStatus {
                    issuer: Some("https://idp.example".into()),
                    audiences: vec!["pool-a".into()],
                    keys: crate::issuers::KeysStatus {
                        name: "idp".into(),
                        source: "discovery".into(),
                        location: "https://idp.example/.well-known/openid-configuration".into(),
                        jwks_uri: Some("https://idp.example/jwks".into()),
                        kids: vec!["k1".into()],
                        skipped: vec![],
                        age_s: Some(12),
                        last_fetch: None,
                        fetches: vec![],
                        refetches_suppressed: 0,
                        stale: false,
                        unavailable: false,
                        unavailable_why: None,
                    },
                    verified: 3,
                    refusals: [("wrong_issuer".to_owned(), 2)].into(),
                }],
                unselected_refusals: [("malformed".to_owned(), 1)].into(),
            }),
            tunnels: TunnelReport {
                policy: "enforce".into(),
                covered: vec![CoveredTunnel {
                    device: "vx0".into(),
                    kind: "vxlan".into(),
                    program: "tollgate".into(),
                }],
                uncovered: vec![UncoveredTunnel {
                    device: "xfrm-states".into(),
                    kind: "ipsec".into(),
                    why: "2 IPsec SA(s)".into(),
                }],
            },
        });
        assert_eq!(v["tunnels"]["covered"][0]["device"], "vx0");
        assert_eq!(v["tunnels"]["uncovered"][0]["kind"], "ipsec");
        // The field names scripts and tests read.
        assert_eq!(v["adopted_pins"], true);
        assert_eq!(v["gpu"]["readings"][0]["utilization"], 0.2);
        assert_eq!(v["tokens"]["verifications"]["ok"], 3);
        // An issuer's row: the keys' state flattened beside its `iss` and tallies.
        let idp = &v["tokens"]["issuers"][0];
        assert_eq!(
            (
                &idp["name"],
                &idp["issuer"],
                &idp["age_s"],
                &idp["refusals"]["wrong_issuer"]
            ),
            (
                &serde_json::json!("idp"),
                &serde_json::json!("https://idp.example"),
                &serde_json::json!(12),
                &serde_json::json!(2)
            )
        );
        assert_eq!(v["passed_packets"], 100);
        assert_eq!(v["drops"]["quarantined"], 2);
        let mut off = serde_json::from_value::<Status>(v).unwrap();
        off.tokens = None;
        round_trip(off);
    }

    #[test]
    fn endpoints() {
        let v = round_trip(vec![EndpointRow {
            id: 1,
            name: "inference".into(),
            protocol: Proto::Tcp,
            ports: vec!["8000".into(), "9000-9010".into()],
            weight: 1.5,
            classes: vec![Class::Internal, Class::Customer],
            roles: vec![],
            anonymous: false,
            passed_packets: 5,
            dropped_packets: 1,
        }]);
        assert_eq!(v[0]["protocol"], "tcp");
        assert_eq!(v[0]["classes"], serde_json::json!(["internal", "customer"]));
    }

    #[test]
    fn identities_and_identity() {
        let v = round_trip(vec![
            row(
                "acme",
                QuarantineOwner::Operator {
                    uid: 0,
                    gid: Some(0),
                    pid: Some(42),
                },
            ),
            row("batch", QuarantineOwner::Controller),
        ]);
        assert_eq!(v[0]["class"], "customer");
        assert_eq!(v[0]["source"], "token");
        assert_eq!(v[1]["quarantined"]["by"], "controller");
        assert_eq!(v[0]["egress"]["response_bytes"], 5800);
        assert_eq!(v[0]["egress"]["ttfb_count"], 3);
        // An agent older than the field: no egress, not zeros.
        let mut old = v[0].clone();
        old.as_object_mut().unwrap().remove("egress");
        assert_eq!(
            serde_json::from_value::<IdentityRow>(old).unwrap().egress,
            None
        );
        let mut one = row("x", QuarantineOwner::Other("someone".into()));
        one.quarantined = None;
        one.source = IdentitySource::Config;
        let v = round_trip(one);
        assert!(v["quarantined"].is_null());
    }

    #[test]
    fn quarantine_owner_reads_the_old_strings() {
        let read = |s: &str| serde_json::from_str::<QuarantineOwner>(s).unwrap();
        assert_eq!(read(r#""controller""#), QuarantineOwner::Controller);
        assert_eq!(
            read(r#""uid 0 (pid 42) via control""#),
            QuarantineOwner::Operator {
                uid: 0,
                gid: None,
                pid: Some(42)
            }
        );
        assert_eq!(
            read(r#""uid 1000 via control""#),
            QuarantineOwner::Operator {
                uid: 1000,
                gid: None,
                pid: None
            }
        );
        assert_eq!(
            read(r#""someone else""#),
            QuarantineOwner::Other("someone else".into())
        );
        for owner in [
            QuarantineOwner::Controller,
            QuarantineOwner::Operator {
                uid: 7,
                gid: Some(8),
                pid: None,
            },
            QuarantineOwner::Other("x".into()),
        ] {
            round_trip(owner);
        }
        assert_eq!(
            QuarantineOwner::Operator {
                uid: 0,
                gid: Some(0),
                pid: Some(42)
            }
            .to_string(),
            "uid 0 (pid 42) via control"
        );
    }

    #[test]
    fn bind_and_unbind() {
        round_trip(Bound {
            target: "198.18.0.5/32".into(),
            identity: "acme".into(),
            expires_unix_ms: Some(1_700_000_000_000),
        });
        round_trip(Bound {
            target: "198.18.0.0/24".into(),
            identity: "acme".into(),
            expires_unix_ms: None,
        });
        round_trip(Unbound {
            target: "198.18.0.5/32".into(),
        });
    }

    #[test]
    fn quarantine_and_release() {
        round_trip(Quarantined {
            identity: "suspect".into(),
            until_unix_ms: None,
        });
        round_trip(Released {
            identity: "suspect".into(),
        });
    }

    #[test]
    fn explain() {
        round_trip(Explained {
            verdict: "drop".into(),
            reason: "class_not_allowed".into(),
            endpoint_id: 1,
            endpoint: Some("inference".into()),
            identity_id: Some(2),
            identity: Some("acme".into()),
            class: Some(Class::Partner),
            binding: Some("198.18.0.5/32".into()),
            clock: Some("coarse".into()),
            why: "because".into(),
            quota_reason: None,
        });
        let v = round_trip(Explained {
            verdict: "pass".into(),
            reason: "unprotected".into(),
            endpoint_id: 0,
            endpoint: None,
            identity_id: None,
            identity: None,
            class: None,
            binding: None,
            clock: None,
            why: "not protected".into(),
            quota_reason: None,
        });
        assert!(v["class"].is_null());
        assert!(v["clock"].is_null());
    }

    #[test]
    fn reload() {
        round_trip(Reloaded {
            config: "/etc/tollgate/tollgate.toml".into(),
            applied: Applied {
                endpoints: 2,
                identities_removed: vec!["old".into()],
                ..Applied::default()
            },
            detached: vec!["eth1".into()],
        });
    }

    #[test]
    fn quotas() {
        let w = QuotaWindow {
            bytes: 30_000,
            bytes_limit: Some(100_000),
            cost: 300,
            cost_limit: None,
            ends_unix: 1_700_000_060,
            response_bytes: 5_000,
            response_bytes_limit: Some(4_000),
            tokens: 52_000,
            tokens_limit: Some(50_000),
            money_nano: 7_800,
            money_limit_nano: None,
        };
        let v = round_trip(vec![QuotaRow {
            identity: "acme".into(),
            plan: Some("pro".into()),
            minute: w,
            day: w,
            month: w,
            fleet: Some([("minute".to_owned(), (30_000, 300))].into()),
            response_bytes_per_second: Some(1_000),
            response_capped: Some("response minute cap: 5000 of 4000 bytes".into()),
            exhausted: Some("token_quota_exhausted".into()),
            currency: "USD".into(),
        }]);
        assert_eq!(v[0]["minute"]["bytes"], 30_000);
        assert_eq!(v[0]["minute"]["tokens_limit"], 50_000);
        assert_eq!(v[0]["exhausted"], "token_quota_exhausted");
        assert_eq!(v[0]["minute"]["response_bytes_limit"], 4_000);
        round_trip(QuotaReset {
            identity: Some("acme".into()),
            reset: true,
        });
        round_trip(QuotaReset {
            identity: None,
            reset: true,
        });
    }

    #[test]
    fn tokens() {
        round_trip(TokenBound {
            address: "198.18.0.5".parse().unwrap(),
            identity: "acme".into(),
            token_id: "t1".into(),
            key_id: "k1".into(),
            expires_unix: 1_700_000_000,
        });
        round_trip(TokenUnbound {
            address: "2001:db8::5".parse().unwrap(),
            identity: "acme".into(),
            token_id: "t1".into(),
        });
        round_trip(Revoked {
            token_id: Some("t1".into()),
            identity: None,
            bindings_removed: vec!["198.18.0.5/32".into()],
        });
        round_trip(HttpError {
            error: "token refused".into(),
            reason: Some("expired".into()),
        });
    }

    #[test]
    fn uninstall() {
        round_trip(Uninstalled {
            removed: vec!["/sys/fs/bpf/tollgate/maps/bindings".into()],
        });
    }
}
