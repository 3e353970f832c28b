//! The policy: `[[plans]]`, `[[endpoints]]`, `[[identities]]` and the roles they name.

use std::{collections::HashMap, net::IpAddr, ops::RangeInclusive};

use tollgate_common::{
    flow::{FP_TRACK, FlowPolicy},
    policy::MAX_ENDPOINTS,
};

use super::{Checker, Result};
use crate::config::{
    Endpoint, Plan, PlanScope, StaticIdentity,
    raw::{List, PortItem, RawEndpoint, RawIdentity, RawPlan, S},
};
use crate::controller::response::{ResponseLimits, ResponseOver};
use crate::tables::{EndpointSpec, PlanLimits, Proto};

/// The smallest byte burst: one full-size Ethernet frame (1500 bytes of payload, 14 of header,
/// 4 of FCS or of a VLAN tag, as XDP sees it). Below it a maximum-size packet could never
/// conform, however idle the budget.
const MIN_BYTE_BURST: i64 = 1518;
const MAX_ROLES: usize = 64;

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

impl Checker<'_> {
    /// `fleet`: whether the file has a `[fleet]` (a fleet-wide plan needs one).
    pub(super) fn plans(&self, raw: Option<List<RawPlan>>, fleet: bool) -> Result<Vec<Plan>> {
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
            let priority = self.int(
                &p.priority,
                &at("priority"),
                i64::from(Plan::DEFAULT_PRIORITY),
                0..=100,
            )?;
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
                ..self.usage_limits(i, &p)?
            };
            let response = self.response(i, &p)?;
            let scope = match &p.scope {
                None => Plan::DEFAULT_SCOPE,
                Some(v) => match v.get_ref().as_str() {
                    "node" => PlanScope::Node,
                    "fleet" => PlanScope::Fleet,
                    other => {
                        return Err(self.err(
                            v.span(),
                            at("scope"),
                            format!(
                                "{other:?} is not a scope: \"node\" (each node grants the whole \
                                 rate and quotas) or \"fleet\" (they hold across the pool)"
                            ),
                        ));
                    }
                },
            };
            if scope == PlanScope::Fleet
                && !fleet
                && let Some(v) = &p.scope
            {
                return Err(self.err(
                    v.span(),
                    at("scope"),
                    "scope = \"fleet\" needs a [fleet] table: without a pool to share it with, \
                     each node would grant the whole rate and quotas; add [fleet] or leave scope \
                     out",
                ));
            }
            // Tokens and money are counted on the node the feed reports to; the pool's spend
            // carries bytes and cost only, so a fleet-wide token plan would grant each node
            // the whole budget. Refused rather than half-shared.
            if scope == PlanScope::Fleet
                && quota.has_usage()
                && let Some(v) = &p.scope
            {
                return Err(self.err(
                    v.span(),
                    at("scope"),
                    "scope = \"fleet\" with tokens_per_* or budget_per_*: token and money \
                     plans are counted per node (the pool shares bytes and cost only); leave \
                     scope out",
                ));
            }
            if scope == PlanScope::Fleet
                && packets_per_s.is_none()
                && bytes_per_s.is_none()
                && quota.is_unlimited()
                && let Some(v) = &p.scope
            {
                return Err(self.err(
                    v.span(),
                    at("scope"),
                    "scope = \"fleet\" on a plan without a rate or a quota shares nothing: \
                     give the plan a rate or quota, or leave scope out",
                ));
            }
            plans.push(Plan {
                name,
                scope,
                priority: priority as u8,
                limits: PlanLimits {
                    packets_per_s,
                    packet_burst,
                    bytes_per_s,
                    byte_burst,
                },
                quota,
                response,
            });
        }
        Ok(plans)
    }

    /// A plan's response caps (`response_*`). Limits are at least 1 byte like the quotas';
    /// the mode and factor without a cap are refused: they would silently do nothing.
    fn response(&self, plan: usize, p: &RawPlan) -> Result<ResponseLimits> {
        let at = |key: &str| format!("plans[{plan}].{key}");
        let q = |v: &Option<S<i64>>, key: &str| -> Result<Option<u64>> {
            match v {
                None => Ok(None),
                Some(_) => Ok(Some(self.int(v, &at(key), 1, 1..=i64::MAX)? as u64)),
            }
        };
        let d = ResponseLimits::default();
        let over = match &p.response_over {
            None => d.over,
            Some(v) => match v.get_ref().as_str() {
                "drop" => ResponseOver::Drop,
                "throttle" => ResponseOver::Throttle,
                other => {
                    return Err(self.err(
                        v.span(),
                        at("response_over"),
                        format!(
                            "{other:?} is not a response_over: \"drop\" (ingress dropped while \
                             over a response cap) or \"throttle\" (its costs multiplied by \
                             response_throttle)"
                        ),
                    ));
                }
            },
        };
        let throttle = match &p.response_throttle {
            None => d.throttle,
            Some(v) => {
                let x = *v.get_ref();
                // Written so that NaN fails too; 255 keeps the Q8 factor in a u16.
                if !(x > 1.0 && x <= 255.0) {
                    return Err(self.err(
                        v.span(),
                        at("response_throttle"),
                        format!(
                            "{x} is out of range: a throttle multiplies costs, so it must be \
                             above 1 and at most 255"
                        ),
                    ));
                }
                x
            }
        };
        let r = ResponseLimits {
            bytes_per_second: q(&p.response_bytes_per_second, "response_bytes_per_second")?,
            minute_bytes: q(
                &p.response_quota_minute_bytes,
                "response_quota_minute_bytes",
            )?,
            day_bytes: q(&p.response_quota_day_bytes, "response_quota_day_bytes")?,
            month_bytes: q(&p.response_quota_month_bytes, "response_quota_month_bytes")?,
            over,
            throttle,
        };
        if r.is_unlimited() {
            let stray = [
                (p.response_over.as_ref().map(|v| v.span()), "response_over"),
                (
                    p.response_throttle.as_ref().map(|v| v.span()),
                    "response_throttle",
                ),
            ];
            if let Some((Some(span), key)) = stray.into_iter().find(|(s, _)| s.is_some()) {
                return Err(self.err(
                    span,
                    at(key),
                    format!(
                        "{key} without a response cap does nothing: set \
                         response_bytes_per_second or a response_quota_*_bytes, or remove it"
                    ),
                ));
            }
        }
        if r.over == ResponseOver::Drop
            && let Some(v) = &p.response_throttle
        {
            return Err(self.err(
                v.span(),
                at("response_throttle"),
                "response_throttle applies only with response_over = \"throttle\": set that, \
                 or remove response_throttle",
            ));
        }
        Ok(r)
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

    pub(super) fn endpoints(&mut self, raw: Option<List<RawEndpoint>>) -> Result<Vec<Endpoint>> {
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

            let weight = self.factor(&e.weight, &at("weight"), Endpoint::DEFAULT_WEIGHT)?;

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
            let flow = self.flow_policy(&e, proto, &at)?;
            let model_server = self.model_server(&e.model_server, &at)?;
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
                    anonymous: e
                        .anonymous
                        .map(|a| a.into_inner())
                        .unwrap_or(Endpoint::DEFAULT_ANONYMOUS),
                },
                port_ranges: port_ranges.clone(),
                role_names,
                gpus,
                flow,
                model_server,
            });
            taken.extend(port_ranges.into_iter().map(|r| (proto, r, i)));
        }
        Ok(endpoints)
    }

    /// `track_flows`, `max_request_bytes`, `max_unanswered_bytes`: what the kernel's
    /// `FLOW_POLICY` holds for this endpoint. A cap needs tracking (it is counted per flow),
    /// and flows are TCP's only.
    fn flow_policy(
        &self,
        e: &RawEndpoint,
        proto: Proto,
        at: &dyn Fn(&str) -> String,
    ) -> Result<FlowPolicy> {
        let cap = |v: &Option<S<i64>>, key: &str| -> Result<u64> {
            let n = self.int(v, &at(key), 0, 0..=Endpoint::MAX_REQUEST_CAP)?;
            if n != 0 && n < Endpoint::MIN_REQUEST_CAP {
                let span = v.as_ref().map_or(0..0, |v| v.span());
                return Err(self.err(
                    span,
                    at(key),
                    format!(
                        "{n} bytes would cut a TLS handshake or a request's headers: 0 (no cap) or at least {}",
                        Endpoint::MIN_REQUEST_CAP
                    ),
                ));
            }
            Ok(n as u64)
        };
        let max_request_bytes = cap(&e.max_request_bytes, "max_request_bytes")?;
        let max_unanswered_bytes = cap(&e.max_unanswered_bytes, "max_unanswered_bytes")?;
        let capped = max_request_bytes != 0 || max_unanswered_bytes != 0;
        let track = match (&e.track_flows, proto) {
            (Some(t), Proto::Udp) if *t.get_ref() => {
                return Err(self.err(
                    t.span(),
                    at("track_flows"),
                    "flows are tracked for TCP endpoints only",
                ));
            }
            (Some(t), Proto::Tcp) => {
                if !*t.get_ref() && capped {
                    return Err(self.err(
                        t.span(),
                        at("track_flows"),
                        "track_flows = false with max_request_bytes or max_unanswered_bytes set: the caps are counted per tracked flow; drop the cap or the track_flows line",
                    ));
                }
                *t.get_ref()
            }
            (_, Proto::Udp) => false,
            (None, Proto::Tcp) => Endpoint::DEFAULT_TRACK_FLOWS,
        };
        if proto == Proto::Udp && capped {
            let v = e
                .max_request_bytes
                .as_ref()
                .or(e.max_unanswered_bytes.as_ref());
            let span = v.map_or(0..0, |v| v.span());
            return Err(self.err(
                span,
                at(if e.max_request_bytes.is_some() {
                    "max_request_bytes"
                } else {
                    "max_unanswered_bytes"
                }),
                "request caps apply to TCP endpoints only (UDP has no flows)",
            ));
        }
        if max_request_bytes != 0
            && max_unanswered_bytes != 0
            && max_unanswered_bytes < max_request_bytes
        {
            let span = e.max_unanswered_bytes.as_ref().map_or(0..0, |v| v.span());
            return Err(self.err(
                span,
                at("max_unanswered_bytes"),
                format!(
                    "{max_unanswered_bytes} is below max_request_bytes ({max_request_bytes}): what is unanswered only grows faster than a request, so the request cap would never be reached; make it at least max_request_bytes"
                ),
            ));
        }
        Ok(FlowPolicy {
            flags: if track { FP_TRACK } else { 0 },
            _pad: 0,
            max_request_bytes,
            max_unanswered_bytes,
        })
    }

    pub(super) fn identities(
        &mut self,
        raw: Option<List<RawIdentity>>,
        plans: &[Plan],
        sizes: &crate::sizes::Sizes,
    ) -> Result<Vec<StaticIdentity>> {
        let Some(list) = raw else {
            return Ok(Vec::new());
        };
        let mut identities: Vec<StaticIdentity> = Vec::new();
        let mut bound: HashMap<(IpAddr, u8), usize> = HashMap::new();
        // Name -> index: a duplicate is found without comparing every pair (100 000
        // identities were minutes of string compares).
        let mut names: HashMap<String, usize> = HashMap::new();
        // Per family: (exact, CIDR) bindings, against the kernel maps' sizes.
        let (mut v4, mut v6) = ((0u32, 0u32), (0u32, 0u32));
        for (i, s) in list.into_inner().into_iter().enumerate() {
            let at = |key: &str| format!("identities[{i}].{key}");
            if i + 1 >= sizes.identities as usize {
                return Err(self.err(
                    s.span(),
                    format!("identities[{i}]"),
                    format!(
                        "at most {} identities (limits.identities is {}, slot 0 is the \
                         anonymous one)",
                        sizes.identities - 1,
                        sizes.identities
                    ),
                ));
            }
            let s: RawIdentity = s.into_inner();
            let name = self.identity_name(&s.name, &at("name"))?;
            if let Some(&j) = names.get(&name) {
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
                    (IpAddr::V4(_), 32) => (&mut v4.0, sizes.exact_bindings, "IPv4 exact"),
                    (IpAddr::V4(_), _) => (&mut v4.1, sizes.cidr_bindings, "IPv4 CIDR"),
                    (IpAddr::V6(_), 128) => (&mut v6.0, sizes.exact_bindings, "IPv6 exact"),
                    (IpAddr::V6(_), _) => (&mut v6.1, sizes.cidr_bindings, "IPv6 CIDR"),
                };
                *count += 1;
                if *count > limit {
                    return Err(self.err(
                        b.span(),
                        at("bind"),
                        format!(
                            "more than {limit} {kind} bindings: the kernel map holds no more \
                             (limits.{})",
                            if kind.ends_with("exact") {
                                "exact_bindings"
                            } else {
                                "cidr_bindings"
                            }
                        ),
                    ));
                }
                bound.insert((addr, len), i);
                bind.push((addr, len));
            }
            names.insert(name.clone(), i);
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
    pub(super) fn roles(
        &mut self,
        raw: &Option<List<String>>,
        field: &str,
    ) -> Result<(u64, Vec<String>)> {
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
