//! From the file's raw structures to a [`Config`]: every range, every reference between
//! sections, every contradiction the kernel could not hold (two endpoints on one port, one
//! prefix bound to two identities). The first refusal found stops the check.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::{Range, RangeInclusive},
    path::PathBuf,
};

use tollgate_common::policy::{
    Class, MAX_CIDR_BINDINGS, MAX_ENDPOINTS, MAX_EXACT_BINDINGS, MAX_IDENTITIES,
};

use super::{
    Anomaly, AnomalyMode, Anonymous, Config, ConfigError, Controller, DropEvents, Endpoint,
    GpuSourceKind, Listen, Metrics, Node, Plan, StaticIdentity, Tokens,
    raw::{
        List, PortItem, RawAnomaly, RawAnonymous, RawConfig, RawController, RawDropEvents,
        RawEndpoint, RawIdentity, RawListen, RawNode, RawPlan, RawTokens, S,
    },
};
use crate::{
    loader::AttachMode,
    tables::{EndpointSpec, PlanLimits, Proto},
};

type Result<T> = std::result::Result<T, ConfigError>;

/// The smallest byte burst: one full-size Ethernet frame (1500 bytes of payload, 14 of header,
/// 4 of FCS or of a VLAN tag, as XDP sees it). Below it a maximum-size packet could never
/// conform, however idle the budget.
const MIN_BYTE_BURST: i64 = 1518;
/// Cost factors are Q8 in the kernel (u16): 1/256 is the smallest step above zero, and 255
/// keeps clear of the u16 ceiling.
const MIN_FACTOR: f64 = 1.0 / 256.0;
const MAX_FACTOR: f64 = 255.0;
const MAX_ROLES: usize = 64;
/// Linux IFNAMSIZ (16) less the terminating NUL.
const MAX_IFNAME: usize = 15;
/// Keeps `interval_ms * 1e6` (ns) far from overflow; an hour between events is silence.
const MAX_DROP_EVENT_INTERVAL_MS: i64 = 3_600_000;
const CONTROLLER_INTERVAL_MS: RangeInclusive<i64> = 10..=60_000;

const DEFAULT_XDP_MODE: AttachMode = AttachMode::Auto;
const DEFAULT_PIN_DIR: &str = crate::paths::PIN_DIR;
const DEFAULT_STATE_DIR: &str = crate::paths::STATE_DIR;
const DEFAULT_CONTROL_SOCKET: &str = crate::paths::CONTROL_SOCKET;
const DEFAULT_CONTROL_GROUP: &str = "tollgate";
const DEFAULT_ANON_PPS: i64 = 20;
const DEFAULT_ANON_BURST: i64 = 40;
const DEFAULT_DROP_EVENT_INTERVAL_MS: i64 = 100;
const DEFAULT_CONTROLLER_INTERVAL_MS: i64 = 250;
const DEFAULT_PRESSURE: f64 = 1.0;
const DEFAULT_BIND: &str = "0.0.0.0:8443";
const DEFAULT_METRICS: &str = "127.0.0.1:9464";
const DEFAULT_PRIORITY: i64 = 50;
const DEFAULT_WEIGHT: f64 = 1.0;

/// The keys and the floor of one of a plan's two budgets.
struct Budget {
    rate: &'static str,
    burst: &'static str,
    min_burst: i64,
    /// Completes "a burst of N is below ...".
    below: &'static str,
}

const PACKETS: Budget = Budget {
    rate: "packets_per_second",
    burst: "packet_burst",
    min_burst: 1,
    below: "one packet: nothing could ever pass",
};

const BYTES: Budget = Budget {
    rate: "bytes_per_second",
    burst: "byte_burst",
    min_burst: MIN_BYTE_BURST,
    below: "one full Ethernet frame (1518 bytes): a maximum-size packet could never pass",
};

pub(super) struct Checker<'a> {
    text: &'a str,
    source: &'a str,
    /// Role names in order of first appearance (bit i = 1 << i).
    roles: Vec<String>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(text: &'a str, source: &'a str) -> Self {
        Checker {
            text,
            source,
            roles: Vec::new(),
        }
    }

    fn err(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.source.to_owned(),
            line: Some(super::line_of(self.text, span.start)),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(super) fn config(mut self, raw: RawConfig) -> Result<Config> {
        let node = self.node(raw.node)?;
        let anonymous = self.anonymous(raw.anonymous)?;
        let drop_events = self.drop_events(raw.drop_events)?;
        let controller = self.controller(raw.controller)?;
        let listen = self.listen(raw.listen)?;
        let plans = self.plans(raw.plans)?;
        let endpoints = self.endpoints(raw.endpoints)?;
        let identities = self.identities(raw.identities, &plans)?;
        let identity_index = identities
            .iter()
            .enumerate()
            .map(|(i, id)| (id.name.clone(), i))
            .collect();
        let anomaly = self.anomaly(raw.anomaly)?;
        let metrics = Metrics {
            top_k: self.int(
                &raw.metrics.unwrap_or_default().top_k,
                "metrics.top_k",
                10,
                0..=1000,
            )? as usize,
        };
        let tokens = match raw.tokens {
            Some(t) => Some(self.tokens(t, &plans)?),
            None => None,
        };
        Ok(Config {
            source: self.source.to_owned(),
            node,
            anonymous,
            drop_events,
            controller,
            listen,
            plans,
            endpoints,
            identities,
            roles: self.roles,
            tokens,
            anomaly,
            metrics,
            identity_index,
        })
    }

    fn tokens(&self, raw: S<RawTokens>, plans: &[Plan]) -> Result<Tokens> {
        let raw = raw.into_inner();
        let jwks = self.abs_path(&Some(raw.jwks), "tokens.jwks", "")?;
        let tls_cert = self.abs_path(&Some(raw.tls_cert), "tokens.tls_cert", "")?;
        let tls_key = self.abs_path(&Some(raw.tls_key), "tokens.tls_key", "")?;
        let audience = raw.audience.get_ref().trim().to_owned();
        if audience.is_empty() {
            return Err(self.err(
                raw.audience.span(),
                "tokens.audience",
                "the audience must not be empty",
            ));
        }
        let max_ttl_s = self.int(&raw.max_ttl_s, "tokens.max_ttl_s", 3600, 1..=7 * 86400)? as u64;
        let clock_skew_s = self.int(&raw.clock_skew_s, "tokens.clock_skew_s", 30, 0..=600)? as u64;
        let max_token_bytes = self.int(
            &raw.max_token_bytes,
            "tokens.max_token_bytes",
            8192,
            256..=65536,
        )? as usize;
        let claim = |v: &Option<S<String>>, field: &str, default: &str| -> Result<String> {
            match v {
                None => Ok(default.to_owned()),
                Some(v) if v.get_ref().is_empty() || v.get_ref().len() > 64 => {
                    Err(self.err(v.span(), field, "a claim name must be 1 to 64 characters"))
                }
                Some(v) => Ok(v.get_ref().clone()),
            }
        };
        let default_class = match &raw.default_class {
            None => None,
            Some(v) => Some(self.class(v, "tokens.default_class")?),
        };
        let default_plan = match &raw.default_plan {
            None => None,
            Some(v) => {
                if !plans.iter().any(|p| &p.name == v.get_ref()) {
                    return Err(self.err(
                        v.span(),
                        "tokens.default_plan",
                        format!("unknown plan {:?}", v.get_ref()),
                    ));
                }
                Some(v.get_ref().clone())
            }
        };
        Ok(Tokens {
            jwks,
            audience,
            tls_cert,
            tls_key,
            max_ttl_s,
            clock_skew_s,
            max_token_bytes,
            identity_claim: claim(&raw.identity_claim, "tokens.identity_claim", "sub")?,
            class_claim: claim(&raw.class_claim, "tokens.class_claim", "tollgate_class")?,
            plan_claim: claim(&raw.plan_claim, "tokens.plan_claim", "tollgate_plan")?,
            roles_claim: claim(&raw.roles_claim, "tokens.roles_claim", "tollgate_roles")?,
            default_class,
            default_plan,
        })
    }

    fn node(&self, raw: S<RawNode>) -> Result<Node> {
        let raw = raw.into_inner();
        let list = &raw.interfaces;
        if list.get_ref().is_empty() {
            return Err(self.err(
                list.span(),
                "node.interfaces",
                "at least one interface is required",
            ));
        }
        let mut interfaces: Vec<String> = Vec::new();
        for i in list.get_ref() {
            let name = i.get_ref();
            if let Some(why) = ifname_problem(name) {
                return Err(self.err(
                    i.span(),
                    "node.interfaces",
                    format!("{name:?} is not a valid interface name: {why}"),
                ));
            }
            if interfaces.contains(name) {
                return Err(self.err(
                    i.span(),
                    "node.interfaces",
                    format!("interface {name:?} is listed twice"),
                ));
            }
            interfaces.push(name.clone());
        }
        let xdp_mode = match &raw.xdp_mode {
            None => DEFAULT_XDP_MODE,
            Some(m) => match m.get_ref().as_str() {
                "auto" => AttachMode::Auto,
                "native" => AttachMode::Native,
                "generic" => AttachMode::Generic,
                other => {
                    return Err(self.err(
                        m.span(),
                        "node.xdp_mode",
                        format!("unknown XDP mode {other:?}: expected auto, native or generic"),
                    ));
                }
            },
        };
        let control_group = match &raw.control_group {
            None => DEFAULT_CONTROL_GROUP.to_owned(),
            Some(g) => {
                let name = g.get_ref();
                if let Some(why) = group_problem(name) {
                    return Err(self.err(
                        g.span(),
                        "node.control_group",
                        format!("{name:?} is not a valid group name: {why}"),
                    ));
                }
                name.clone()
            }
        };
        Ok(Node {
            interfaces,
            xdp_mode,
            pin_dir: self.abs_path(&raw.pin_dir, "node.pin_dir", DEFAULT_PIN_DIR)?,
            state_dir: self.abs_path(&raw.state_dir, "node.state_dir", DEFAULT_STATE_DIR)?,
            control_socket: self.abs_path(
                &raw.control_socket,
                "node.control_socket",
                DEFAULT_CONTROL_SOCKET,
            )?,
            control_group,
        })
    }

    /// The agent runs from systemd with an unspecified working directory: a relative path
    /// would land wherever that happens to be.
    fn abs_path(&self, v: &Option<S<String>>, field: &str, default: &str) -> Result<PathBuf> {
        let Some(v) = v else {
            return Ok(PathBuf::from(default));
        };
        let p = v.get_ref();
        if p.is_empty() || !p.starts_with('/') {
            return Err(self.err(
                v.span(),
                field,
                format!("{p:?} is not an absolute path (it must start with '/')"),
            ));
        }
        Ok(PathBuf::from(p))
    }

    fn anonymous(&self, raw: Option<RawAnonymous>) -> Result<Anonymous> {
        let raw = raw.unwrap_or_default();
        let pps = self.int(
            &raw.packets_per_second,
            "anonymous.packets_per_second",
            DEFAULT_ANON_PPS,
            0..=i64::MAX,
        )?;
        let burst = self.int(
            &raw.burst,
            "anonymous.burst",
            DEFAULT_ANON_BURST,
            0..=i64::MAX,
        )?;
        if pps > 0 && burst < 1 {
            let span = raw.burst.as_ref().map(|b| b.span()).unwrap_or(0..0);
            return Err(self.err(
                span,
                "anonymous.burst",
                "a burst below one packet admits nothing: burst must be at least 1 while \
                 packets_per_second is above 0",
            ));
        }
        Ok(Anonymous {
            packets_per_second: pps as u64,
            burst: burst as u64,
        })
    }

    fn drop_events(&self, raw: Option<RawDropEvents>) -> Result<DropEvents> {
        let raw = raw.unwrap_or_default();
        let ms = self.int(
            &raw.interval_ms,
            "drop_events.interval_ms",
            DEFAULT_DROP_EVENT_INTERVAL_MS,
            0..=MAX_DROP_EVENT_INTERVAL_MS,
        )?;
        Ok(DropEvents {
            interval_ms: ms as u64,
        })
    }

    fn controller(&self, raw: Option<RawController>) -> Result<Controller> {
        let raw = raw.unwrap_or_default();
        let interval_ms = self.int(
            &raw.interval_ms,
            "controller.interval_ms",
            DEFAULT_CONTROLLER_INTERVAL_MS,
            CONTROLLER_INTERVAL_MS,
        )?;
        let pressure = self.factor(&raw.pressure, "controller.pressure", DEFAULT_PRESSURE)?;
        let gpu_source = match raw.gpu_source.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "nvml")) => GpuSourceKind::Nvml,
            Some((_, "simulated")) => GpuSourceKind::Simulated,
            Some((_, "none")) => GpuSourceKind::None,
            Some((v, other)) => {
                return Err(self.err(
                    v.span(),
                    "controller.gpu_source",
                    format!("{other:?} is not a GPU source: nvml, simulated or none"),
                ));
            }
        };
        let simulated_file = self.abs_path(
            &raw.simulated_file,
            "controller.simulated_file",
            "/run/tollgate/gpu-simulated.json",
        )?;
        let share = |v: &Option<S<f64>>, field: &str, default: f64, lo: f64| -> Result<f64> {
            match v {
                None => Ok(default),
                Some(v) if (lo..=1.0).contains(v.get_ref()) => Ok(*v.get_ref()),
                Some(v) => Err(self.err(
                    v.span(),
                    field,
                    format!(
                        "{} is out of range: it must be between {lo} and 1",
                        v.get_ref()
                    ),
                )),
            }
        };
        let saturate_at = share(&raw.saturate_at, "controller.saturate_at", 0.9, 0.01)?;
        let recover_at = share(&raw.recover_at, "controller.recover_at", 0.75, 0.0)?;
        if recover_at >= saturate_at {
            let span = raw.recover_at.as_ref().map(|v| v.span()).unwrap_or(0..0);
            return Err(self.err(
                span,
                "controller.recover_at",
                format!(
                    "recover_at ({recover_at}) must be below saturate_at ({saturate_at}), or \
                     the pressure would flap"
                ),
            ));
        }
        let recover_after =
            self.int(&raw.recover_after, "controller.recover_after", 4, 1..=1000)?;
        let hold_back_floor = share(
            &raw.hold_back_floor,
            "controller.hold_back_floor",
            0.1,
            0.01,
        )?;
        Ok(Controller {
            interval_ms: interval_ms as u64,
            pressure,
            gpu_source,
            simulated_file,
            saturate_at,
            recover_at,
            recover_after: recover_after as u32,
            hold_back_floor,
        })
    }

    fn anomaly(&self, raw: Option<RawAnomaly>) -> Result<Anomaly> {
        let raw = raw.unwrap_or_default();
        let mode = match raw.mode.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "shadow")) => AnomalyMode::Shadow,
            Some((_, "enforce")) => AnomalyMode::Enforce,
            Some((_, "off")) => AnomalyMode::Off,
            Some((v, other)) => {
                return Err(self.err(
                    v.span(),
                    "anomaly.mode",
                    format!("{other:?} is not a mode: off, shadow or enforce"),
                ));
            }
        };
        let alpha = match &raw.alpha {
            None => 0.05,
            Some(v) if *v.get_ref() > 0.0 && *v.get_ref() <= 1.0 => *v.get_ref(),
            Some(v) => {
                return Err(self.err(
                    v.span(),
                    "anomaly.alpha",
                    format!("{} is out of range: 0 < alpha <= 1", v.get_ref()),
                ));
            }
        };
        let secs = |v: &Option<S<i64>>, f: &str, d: i64| self.int(v, f, d, 1..=86400 * 30);
        let mut thresholds = [(12.0, 24.0), (8.0, 16.0), (6.0, 12.0)];
        for (i, (name, t)) in [
            ("internal", &raw.internal),
            ("partner", &raw.partner),
            ("customer", &raw.customer),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(t) = t else { continue };
            let score = |v: &Option<S<f64>>, key: &str, d: f64| -> Result<f64> {
                match v {
                    None => Ok(d),
                    Some(v) if *v.get_ref() > 0.0 && v.get_ref().is_finite() => Ok(*v.get_ref()),
                    Some(v) => Err(self.err(
                        v.span(),
                        format!("anomaly.{name}.{key}"),
                        "a score must be a positive number",
                    )),
                }
            };
            let th = score(&t.throttle_score, "throttle_score", thresholds[i].0)?;
            let q = score(&t.quarantine_score, "quarantine_score", thresholds[i].1)?;
            if q < th {
                let span = t
                    .quarantine_score
                    .as_ref()
                    .map(|v| v.span())
                    .unwrap_or(0..0);
                return Err(self.err(
                    span,
                    format!("anomaly.{name}.quarantine_score"),
                    "the quarantine score must not be below the throttle score",
                ));
            }
            thresholds[i] = (th, q);
        }
        Ok(Anomaly {
            mode,
            alpha,
            warmup_samples: self.int(
                &raw.warmup_samples,
                "anomaly.warmup_samples",
                60,
                1..=100_000,
            )? as u32,
            throttle_factor: self.factor(&raw.throttle_factor, "anomaly.throttle_factor", 4.0)?,
            throttle_for_s: secs(&raw.throttle_for_s, "anomaly.throttle_for_s", 60)? as u64,
            quarantine_for_s: secs(&raw.quarantine_for_s, "anomaly.quarantine_for_s", 300)? as u64,
            cooldown_s: secs(&raw.cooldown_s, "anomaly.cooldown_s", 120)? as u64,
            thresholds,
        })
    }

    fn listen(&self, raw: Option<RawListen>) -> Result<Listen> {
        let raw = raw.unwrap_or_default();
        let bind = self.socket_addr(&raw.bind, "listen.bind", DEFAULT_BIND)?;
        let metrics = self.socket_addr(&raw.metrics, "listen.metrics", DEFAULT_METRICS)?;
        let clash = bind.port() == metrics.port()
            && (bind.ip() == metrics.ip()
                || bind.ip().is_unspecified()
                || metrics.ip().is_unspecified());
        if clash {
            // Point at whichever of the two the file sets (the metrics one when both).
            let (field, span) = match (&raw.metrics, &raw.bind) {
                (Some(m), _) => ("listen.metrics", m.span()),
                (None, Some(b)) => ("listen.bind", b.span()),
                (None, None) => ("listen.metrics", 0..0),
            };
            return Err(self.err(
                span,
                field,
                format!(
                    "listen.bind ({bind}) and listen.metrics ({metrics}) cannot both listen there"
                ),
            ));
        }
        Ok(Listen { bind, metrics })
    }

    fn socket_addr(&self, v: &Option<S<String>>, field: &str, default: &str) -> Result<SocketAddr> {
        let Some(v) = v else {
            return Ok(default.parse().expect("default listen addresses parse"));
        };
        let text = v.get_ref();
        let addr: SocketAddr = text.parse().map_err(|_| {
            self.err(
                v.span(),
                field,
                format!(
                    "{text:?} is not an address and port (e.g. \"0.0.0.0:8443\" or \
                     \"[::]:8443\")"
                ),
            )
        })?;
        if addr.port() == 0 {
            return Err(self.err(
                v.span(),
                field,
                format!("{text:?}: port 0 would listen on a random port"),
            ));
        }
        Ok(addr)
    }

    fn plans(&self, raw: Option<List<RawPlan>>) -> Result<Vec<Plan>> {
        // An absent key has no line of its own: the document's first line stands for it.
        let span = raw.as_ref().map(|l| l.span()).unwrap_or(0..0);
        let Some(list) = raw.filter(|l| !l.get_ref().is_empty()) else {
            return Err(self.err(
                span,
                "plans",
                "at least one [[plans]] table is required (identities name their plan)",
            ));
        };
        let mut plans: Vec<Plan> = Vec::new();
        for (i, p) in list.into_inner().into_iter().enumerate() {
            let at = |key: &str| format!("plans[{i}].{key}");
            if i >= tollgate_common::policy::MAX_PLANS as usize {
                return Err(self.err(
                    p.span(),
                    format!("plans[{i}]"),
                    format!(
                        "too many plans: the kernel tells {} apart",
                        tollgate_common::policy::MAX_PLANS
                    ),
                ));
            }
            let p = p.into_inner();
            let name = self.name(&p.name, &at("name"), 32, false)?;
            if let Some(j) = plans.iter().position(|q| q.name == name) {
                return Err(self.err(
                    p.name.span(),
                    at("name"),
                    format!("plan {name:?} is defined twice (also plans[{j}])"),
                ));
            }
            let priority = self.int(&p.priority, &at("priority"), DEFAULT_PRIORITY, 0..=100)?;
            let (packets_per_s, packet_burst) =
                self.rate(i, &p.packets_per_second, &p.packet_burst, &PACKETS)?;
            let (bytes_per_s, byte_burst) =
                self.rate(i, &p.bytes_per_second, &p.byte_burst, &BYTES)?;
            let q = |v: &Option<S<i64>>, key: &str| -> Result<Option<u64>> {
                match v {
                    None => Ok(None),
                    Some(_) => Ok(Some(self.int(v, &at(key), 1, 1..=i64::MAX)? as u64)),
                }
            };
            let quota = crate::controller::quota::QuotaLimits {
                minute_bytes: q(&p.quota_minute_bytes, "quota_minute_bytes")?,
                day_bytes: q(&p.quota_day_bytes, "quota_day_bytes")?,
                month_bytes: q(&p.quota_month_bytes, "quota_month_bytes")?,
                minute_cost: q(&p.quota_minute_cost, "quota_minute_cost")?,
                day_cost: q(&p.quota_day_cost, "quota_day_cost")?,
                month_cost: q(&p.quota_month_cost, "quota_month_cost")?,
            };
            plans.push(Plan {
                name,
                priority: priority as u8,
                limits: PlanLimits {
                    packets_per_s,
                    packet_burst,
                    bytes_per_s,
                    byte_burst,
                },
                quota,
            });
        }
        Ok(plans)
    }

    /// A rate and its burst: both or neither. A rate of 0 would silently refuse all traffic of
    /// the plan, which is what a quarantine is for, so it is refused here.
    fn rate(
        &self,
        plan: usize,
        rate: &Option<S<i64>>,
        burst: &Option<S<i64>>,
        b: &Budget,
    ) -> Result<(Option<u64>, u64)> {
        let (rate_field, burst_field) = (
            format!("plans[{plan}].{}", b.rate),
            format!("plans[{plan}].{}", b.burst),
        );
        if let Some(r) = rate.as_ref().filter(|r| *r.get_ref() < 1) {
            return Err(self.err(
                r.span(),
                rate_field,
                format!(
                    "{} is refused: leave {} out for unlimited, or quarantine the identity to \
                     stop it",
                    r.get_ref(),
                    b.rate
                ),
            ));
        }
        match (rate, burst) {
            (None, None) => Ok((None, 0)),
            (None, Some(x)) => Err(self.err(
                x.span(),
                burst_field,
                format!(
                    "{} without {}: set the rate too, or remove the burst for an unlimited plan",
                    b.burst, b.rate
                ),
            )),
            (Some(r), None) => Err(self.err(
                r.span(),
                burst_field,
                format!("{} is required when {} is set", b.burst, b.rate),
            )),
            (Some(r), Some(x)) => {
                let burst = *x.get_ref();
                if burst < b.min_burst {
                    return Err(self.err(
                        x.span(),
                        burst_field,
                        format!("a burst of {burst} is below {}", b.below),
                    ));
                }
                Ok((Some(*r.get_ref() as u64), burst as u64))
            }
        }
    }

    fn endpoints(&mut self, raw: Option<List<RawEndpoint>>) -> Result<Vec<Endpoint>> {
        let Some(list) = raw else {
            return Ok(Vec::new());
        };
        let mut endpoints: Vec<Endpoint> = Vec::new();
        // Each (protocol, port) maps to one endpoint in the kernel's port table.
        let mut taken: Vec<(Proto, RangeInclusive<u16>, usize)> = Vec::new();
        for (i, e) in list.into_inner().into_iter().enumerate() {
            let at = |key: &str| format!("endpoints[{i}].{key}");
            if i + 1 >= MAX_ENDPOINTS as usize {
                return Err(self.err(
                    e.span(),
                    format!("endpoints[{i}]"),
                    format!(
                        "at most {} endpoints (the kernel's endpoint table has {MAX_ENDPOINTS} \
                         slots and slot 0 means none)",
                        MAX_ENDPOINTS - 1
                    ),
                ));
            }
            let e: RawEndpoint = e.into_inner();
            let name = self.name(&e.name, &at("name"), 32, false)?;
            if let Some(j) = endpoints.iter().position(|x| x.name == name) {
                return Err(self.err(
                    e.name.span(),
                    at("name"),
                    format!("endpoint {name:?} is defined twice (also endpoints[{j}])"),
                ));
            }
            let proto = match e.protocol.get_ref().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                other => {
                    return Err(self.err(
                        e.protocol.span(),
                        at("protocol"),
                        format!("unknown protocol {other:?}: expected tcp or udp"),
                    ));
                }
            };

            if e.ports.get_ref().is_empty() {
                return Err(self.err(e.ports.span(), at("ports"), "at least one port is required"));
            }
            let mut port_ranges: Vec<RangeInclusive<u16>> = Vec::new();
            for p in e.ports.get_ref() {
                let r = port_range(p.get_ref()).map_err(|m| self.err(p.span(), at("ports"), m))?;
                if let Some(prev) = port_ranges.iter().find(|q| overlap(q, &r)) {
                    return Err(self.err(
                        p.span(),
                        at("ports"),
                        format!("{} overlaps {} listed before it", show(&r), show(prev)),
                    ));
                }
                if let Some((_, other, j)) = taken
                    .iter()
                    .find(|(pr, q, _)| *pr == proto && overlap(q, &r))
                {
                    return Err(self.err(
                        p.span(),
                        at("ports"),
                        format!(
                            "{} {} of endpoint {name:?} overlaps endpoint {:?} (endpoints[{j}], \
                             {} {}): a port belongs to one endpoint",
                            proto_label(proto),
                            show(&r),
                            endpoints[*j].name,
                            proto_label(proto),
                            show(other),
                        ),
                    ));
                }
                port_ranges.push(r);
            }

            let (mut v4_prefix, mut v6_prefix) = (None, None);
            if let Some(list) = &e.destinations {
                for d in list.get_ref() {
                    let field = at("destinations");
                    let (addr, len) = self.prefix(d, &field)?;
                    match addr {
                        IpAddr::V4(a) if v4_prefix.is_none() => v4_prefix = Some((a, len)),
                        IpAddr::V6(a) if v6_prefix.is_none() => v6_prefix = Some((a, len)),
                        _ => {
                            let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                            return Err(self.err(
                                d.span(),
                                field,
                                format!(
                                    "a second {family} destination ({addr}/{len}): an endpoint \
                                     has at most one IPv4 and one IPv6 prefix"
                                ),
                            ));
                        }
                    }
                }
            }

            let weight = self.factor(&e.weight, &at("weight"), DEFAULT_WEIGHT)?;

            if e.classes.get_ref().is_empty() {
                return Err(self.err(
                    e.classes.span(),
                    at("classes"),
                    "at least one class is required (internal, partner, customer)",
                ));
            }
            let mut allowed_classes = Vec::new();
            for c in e.classes.get_ref() {
                let class = self.class(c, &at("classes"))?;
                if allowed_classes.contains(&class) {
                    return Err(self.err(
                        c.span(),
                        at("classes"),
                        format!("class {:?} is listed twice", class.label()),
                    ));
                }
                allowed_classes.push(class);
            }

            let (roles, role_names) = self.roles(&e.roles, &at("roles"))?;
            let mut gpus = Vec::new();
            for g in e.gpus.iter().flat_map(|l| l.get_ref().iter()) {
                let idx = *g.get_ref();
                if !(0..=255).contains(&idx) {
                    return Err(self.err(
                        g.span(),
                        at("gpus"),
                        format!("{idx} is not a GPU index (0 to 255)"),
                    ));
                }
                if gpus.contains(&(idx as u32)) {
                    return Err(self.err(
                        g.span(),
                        at("gpus"),
                        format!("GPU {idx} is listed twice"),
                    ));
                }
                gpus.push(idx as u32);
            }
            let first = port_ranges[0].clone();
            endpoints.push(Endpoint {
                name,
                spec: EndpointSpec {
                    proto,
                    ports: first,
                    v4_prefix,
                    v6_prefix,
                    weight,
                    allowed_classes,
                    roles,
                    anonymous: e.anonymous.map(|a| a.into_inner()).unwrap_or(false),
                },
                port_ranges: port_ranges.clone(),
                role_names,
                gpus,
            });
            taken.extend(port_ranges.into_iter().map(|r| (proto, r, i)));
        }
        Ok(endpoints)
    }

    fn identities(
        &mut self,
        raw: Option<List<RawIdentity>>,
        plans: &[Plan],
    ) -> Result<Vec<StaticIdentity>> {
        let Some(list) = raw else {
            return Ok(Vec::new());
        };
        let mut identities: Vec<StaticIdentity> = Vec::new();
        let mut bound: HashMap<(IpAddr, u8), usize> = HashMap::new();
        // Per family: (exact, CIDR) bindings, against the kernel maps' sizes.
        let (mut v4, mut v6) = ((0u32, 0u32), (0u32, 0u32));
        for (i, s) in list.into_inner().into_iter().enumerate() {
            let at = |key: &str| format!("identities[{i}].{key}");
            if i + 1 >= MAX_IDENTITIES as usize {
                return Err(self.err(
                    s.span(),
                    format!("identities[{i}]"),
                    format!("at most {} identities", MAX_IDENTITIES - 1),
                ));
            }
            let s: RawIdentity = s.into_inner();
            let name = self.name(&s.name, &at("name"), 64, true)?;
            if let Some(j) = identities.iter().position(|x| x.name == name) {
                return Err(self.err(
                    s.name.span(),
                    at("name"),
                    format!("identity {name:?} is defined twice (also identities[{j}])"),
                ));
            }
            let class = self.class(&s.class, &at("class"))?;
            let plan = s.plan.get_ref();
            if !plans.iter().any(|p| &p.name == plan) {
                let known: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
                return Err(self.err(
                    s.plan.span(),
                    at("plan"),
                    format!("unknown plan {plan:?} (plans: {})", known.join(", ")),
                ));
            }
            let (roles, role_names) = self.roles(&s.roles, &at("roles"))?;

            if s.bind.get_ref().is_empty() {
                return Err(self.err(
                    s.bind.span(),
                    at("bind"),
                    "at least one address or prefix is required",
                ));
            }
            let mut bind = Vec::new();
            for b in s.bind.get_ref() {
                let (addr, len) = self.prefix(b, &at("bind"))?;
                if let Some(&j) = bound.get(&(addr, len)) {
                    let owner = if j == i {
                        "this identity already".to_owned()
                    } else {
                        format!("identity {:?} (identities[{j}])", identities[j].name)
                    };
                    return Err(self.err(
                        b.span(),
                        at("bind"),
                        format!("{addr}/{len} is already bound to {owner}"),
                    ));
                }
                let (count, limit, kind) = match (addr, len) {
                    (IpAddr::V4(_), 32) => (&mut v4.0, MAX_EXACT_BINDINGS, "IPv4 exact"),
                    (IpAddr::V4(_), _) => (&mut v4.1, MAX_CIDR_BINDINGS, "IPv4 CIDR"),
                    (IpAddr::V6(_), 128) => (&mut v6.0, MAX_EXACT_BINDINGS, "IPv6 exact"),
                    (IpAddr::V6(_), _) => (&mut v6.1, MAX_CIDR_BINDINGS, "IPv6 CIDR"),
                };
                *count += 1;
                if *count > limit {
                    return Err(self.err(
                        b.span(),
                        at("bind"),
                        format!("more than {limit} {kind} bindings: the kernel map holds no more"),
                    ));
                }
                bound.insert((addr, len), i);
                bind.push((addr, len));
            }
            identities.push(StaticIdentity {
                name,
                class,
                plan: plan.clone(),
                roles,
                role_names,
                bind,
            });
        }
        Ok(identities)
    }

    /// Role names to their bits, registering new names in order of first appearance.
    fn roles(&mut self, raw: &Option<List<String>>, field: &str) -> Result<(u64, Vec<String>)> {
        let (mut bits, mut names) = (0u64, Vec::new());
        let Some(list) = raw else {
            return Ok((bits, names));
        };
        for r in list.get_ref() {
            let name = self.name(r, field, 32, false)?;
            if names.contains(&name) {
                return Err(self.err(r.span(), field, format!("role {name:?} is listed twice")));
            }
            let i = match self.roles.iter().position(|x| *x == name) {
                Some(i) => i,
                None if self.roles.len() == MAX_ROLES => {
                    return Err(self.err(
                        r.span(),
                        field,
                        format!(
                            "role {name:?} is the {}th distinct role: at most {MAX_ROLES} (the \
                             kernel's role mask has {MAX_ROLES} bits)",
                            MAX_ROLES + 1
                        ),
                    ));
                }
                None => {
                    self.roles.push(name.clone());
                    self.roles.len() - 1
                }
            };
            bits |= 1 << i;
            names.push(name);
        }
        Ok((bits, names))
    }

    fn class(&self, v: &S<String>, field: &str) -> Result<Class> {
        match v.get_ref().as_str() {
            "internal" => Ok(Class::Internal),
            "partner" => Ok(Class::Partner),
            "customer" => Ok(Class::Customer),
            "anonymous" => Err(self.err(
                v.span(),
                field,
                "\"anonymous\" is not a class to name here: unbound sources are governed by \
                 [anonymous] and an endpoint's `anonymous = true`",
            )),
            other => Err(self.err(
                v.span(),
                field,
                format!("unknown class {other:?}: expected internal, partner or customer"),
            )),
        }
    }

    /// A name of 1..=`max` characters from a-z, 0-9, '_', '-' (and '.' when `dots`): names
    /// end up in metric labels, log lines and CLI arguments, where anything else needs quoting.
    fn name(&self, v: &S<String>, field: &str, max: usize, dots: bool) -> Result<String> {
        let name = v.get_ref();
        let ok_char = |c: char| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || c == '_'
                || c == '-'
                || (dots && c == '.')
        };
        if name.is_empty() || name.len() > max || !name.chars().all(ok_char) {
            let extra = if dots { ", '.'" } else { "" };
            return Err(self.err(
                v.span(),
                field,
                format!(
                    "{name:?} is not a valid name: use 1 to {max} characters of a-z, 0-9, '_', \
                     '-'{extra}"
                ),
            ));
        }
        Ok(name.clone())
    }

    /// An integer key with its default and allowed range.
    fn int(
        &self,
        v: &Option<S<i64>>,
        field: &str,
        default: i64,
        range: RangeInclusive<i64>,
    ) -> Result<i64> {
        let Some(v) = v else {
            return Ok(default);
        };
        let x = *v.get_ref();
        if range.contains(&x) {
            return Ok(x);
        }
        let message = if *range.end() == i64::MAX {
            format!("{x} is below the minimum of {}", range.start())
        } else {
            format!(
                "{x} is out of range: it must be between {} and {}",
                range.start(),
                range.end()
            )
        };
        Err(self.err(v.span(), field, message))
    }

    /// A Q8 cost factor (weight, pressure).
    fn factor(&self, v: &Option<S<f64>>, field: &str, default: f64) -> Result<f64> {
        let Some(v) = v else {
            return Ok(default);
        };
        let x = *v.get_ref();
        // Written so that NaN fails too.
        if !(MIN_FACTOR..=MAX_FACTOR).contains(&x) {
            return Err(self.err(
                v.span(),
                field,
                format!("{x} is out of range: it must be between 1/256 (0.00390625) and 255"),
            ));
        }
        Ok(x)
    }

    /// An address or a prefix (`198.18.0.0/15`, `2001:db8::/32`, a bare address for /32 or
    /// /128), refused when it has host bits set: the kernel would match the masked prefix, not
    /// what the operator wrote.
    fn prefix(&self, v: &S<String>, field: &str) -> Result<(IpAddr, u8)> {
        let text = v.get_ref();
        let bad = |m: String| self.err(v.span(), field, m);
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text.as_str(), None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            bad(format!(
                "{text:?} is not an address or prefix (e.g. \"198.18.0.0/15\", \"2001:db8::/32\")"
            ))
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max && !l.starts_with('+') => n,
                _ => {
                    return Err(bad(format!(
                        "{text:?}: prefix length {l:?} is not a number from 0 to {max}"
                    )));
                }
            },
        };
        let masked = mask(addr, len);
        if masked != addr {
            return Err(bad(format!(
                "{text} has host bits set (did you mean {masked}/{len}?)"
            )));
        }
        Ok((addr, len))
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// Why `name` is not a name the kernel would accept for an interface (dev_valid_name), if it
/// is not.
fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_IFNAME {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are not interface names")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Some("it contains '/', ':', a NUL or whitespace")
    } else {
        None
    }
}

/// Why `name` could not be a group in /etc/group, if it could not.
fn group_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 32 {
        Some("longer than 32 characters")
    } else if name.starts_with('-') {
        Some("it starts with '-'")
    } else if name
        .chars()
        .any(|c| c == ':' || c == ',' || c == '/' || c.is_whitespace() || c.is_control())
    {
        Some("it contains ':', ',', '/', whitespace or a control character")
    } else {
        None
    }
}

fn port_range(p: &PortItem) -> std::result::Result<RangeInclusive<u16>, String> {
    fn port(x: i64) -> std::result::Result<u16, String> {
        match u16::try_from(x) {
            Ok(0) => Err("port 0 is not a port (ports are 1 to 65535)".to_owned()),
            Ok(p) => Ok(p),
            Err(_) => Err(format!("port {x} is out of range (ports are 1 to 65535)")),
        }
    }
    match p {
        PortItem::Number(n) => {
            let p = port(*n)?;
            Ok(p..=p)
        }
        PortItem::Text(t) => {
            let not_range =
                || format!("{t:?} is neither a port nor a range (write 8000 or \"8000-8010\")");
            let num = |s: &str| -> std::result::Result<i64, String> {
                let s = s.trim();
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(not_range());
                }
                Ok(s.parse::<i64>().unwrap_or(i64::MAX))
            };
            let (a, b) = match t.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let a = num(t)?;
                    (a, a)
                }
            };
            let (first, last) = (port(a)?, port(b)?);
            if first > last {
                return Err(format!("port range {first}-{last} is reversed"));
            }
            Ok(first..=last)
        }
    }
}

fn overlap(a: &RangeInclusive<u16>, b: &RangeInclusive<u16>) -> bool {
    a.start() <= b.end() && b.start() <= a.end()
}

fn show(r: &RangeInclusive<u16>) -> String {
    if r.start() == r.end() {
        r.start().to_string()
    } else {
        format!("{}-{}", r.start(), r.end())
    }
}

fn proto_label(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}
