//! `tollgate explain`: the verdict a packet would get, and why. The packet is built and parsed
//! exactly as the kernel parses it, and decided by the same `decide` the XDP program runs,
//! over a snapshot of the kernel's tables; the limiter is consulted but not charged, so
//! explaining changes nothing.

use std::{cell::UnsafeCell, net::IpAddr};

use serde::Serialize;
use tollgate_common::{
    Reason, Verdict,
    decide::{AnonPrefix, Tables as DecideTables, anon_prefix, decide},
    packet::{L4, PacketBuilder},
    parse::{Family, Frame, parse},
    policy::{Binding, Bucket, Class, Endpoint, ID_RESPONSE_CAPPED, Identity, Settings, port_slot},
};

use crate::{
    kernel_clock::{self, Clock},
    net::host_len,
    tables::{KernelTables, Proto, TableError},
};

/// The kernel state a decision about one packet can touch, copied out.
struct Snapshot {
    slot: Option<u32>,
    port_endpoint: u32,
    endpoint: Endpoint,
    exact: Option<Binding>,
    cidr: Option<Binding>,
    identities: Vec<(u32, Identity, UnsafeCell<Bucket>)>,
    /// The source's anonymous prefixes and their TATs as the kernel has them.
    anon: Vec<(AnonPrefix, UnsafeCell<u64>)>,
    settings: Settings,
    /// (endpoint, plan, Q8) for the identities this packet can involve.
    hold_back: Vec<(u32, u16, u16)>,
    /// The kernel's clocks (CLOCK_MONOTONIC precise and coarse), read once.
    now: u64,
    coarse: u64,
}

impl DecideTables for Snapshot {
    fn port_endpoint(&self, slot: u32) -> u32 {
        if Some(slot) == self.slot {
            self.port_endpoint
        } else {
            0
        }
    }
    fn endpoint(&self, id: u32) -> Option<*const Endpoint> {
        (id == self.port_endpoint).then_some(&self.endpoint as *const _)
    }
    fn exact_binding(&self, _: Family, _: &[u8; 16]) -> Option<*const Binding> {
        self.exact.as_ref().map(|b| b as *const _)
    }
    fn cidr_binding(&self, _: Family, _: &[u8; 16]) -> Option<*const Binding> {
        self.cidr.as_ref().map(|b| b as *const _)
    }
    fn identity(&self, id: u32) -> Option<*const Identity> {
        self.identities
            .iter()
            .find(|(i, _, _)| *i == id)
            .map(|(_, ident, _)| ident as *const _)
    }
    fn bucket(&self, id: u32) -> Option<*mut Bucket> {
        self.identities
            .iter()
            .find(|(i, _, _)| *i == id)
            .map(|(_, _, b)| b.get())
    }
    fn anon_tat(&self, prefix: &AnonPrefix) -> Option<*mut u64> {
        self.anon
            .iter()
            .find(|(p, _)| p == prefix)
            .map(|(_, t)| t.get())
    }
    fn settings(&self) -> Settings {
        self.settings
    }
    fn hold_back(&self, endpoint: u32, plan: u16) -> u16 {
        self.hold_back
            .iter()
            .find(|(e, p, _)| *e == endpoint && *p == plan)
            .map_or(0, |(_, _, h)| *h)
    }
    fn now_ns(&self) -> u64 {
        self.now
    }
    fn coarse_ns(&self) -> u64 {
        self.coarse
    }
    unsafe fn load(&self, p: *const u64) -> u64 {
        // SAFETY: `p` points into this snapshot, which only this thread touches.
        unsafe { *p }
    }
    unsafe fn cas(&self, p: *mut u64, old: u64, new: u64) -> bool {
        // SAFETY: as above; the copy is charged, never the kernel's budget.
        unsafe {
            if *p == old {
                *p = new;
                true
            } else {
                false
            }
        }
    }
}

/// The answer, for humans (`why`) and scripts (the rest).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub endpoint_id: u32,
    pub endpoint: Option<String>,
    pub identity_id: Option<u32>,
    pub identity: Option<String>,
    pub class: Option<&'static str>,
    pub binding: Option<String>,
    /// The clock the identity's budgets run on in the kernel ("coarse" or "precise"; the
    /// anonymous allowance's for an unbound source it charges); `None` when no budget applies.
    pub clock: Option<&'static str>,
    pub why: String,
}

/// A packet to explain.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub proto: Proto,
    /// Frame size to weigh against the byte budget (default 100).
    #[serde(default)]
    pub bytes: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("source {0} and destination {1} are of different IP families")]
    MixedFamilies(IpAddr, IpAddr),
    #[error("{0}")]
    Tables(#[from] TableError),
}

fn frame(p: &Probe) -> Result<Vec<u8>, ExplainError> {
    let b = match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::v4(s.octets(), d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::v6(s.octets(), d.octets()),
        (s, d) => return Err(ExplainError::MixedFamilies(s, d)),
    };
    let b = match p.proto {
        Proto::Tcp => b.l4(L4::Tcp {
            sport: 40000,
            dport: p.port,
        }),
        Proto::Udp => b.l4(L4::Udp {
            sport: 40000,
            dport: p.port,
        }),
    };
    let mut f = b.build();
    let want = p.bytes.unwrap_or(100) as usize;
    if want > f.len() {
        f = b.payload(want - f.len()).build();
    }
    Ok(f)
}

/// Names for ids, from the configuration and the state.
pub trait Names {
    fn endpoint(&self, id: u32) -> Option<String>;
    fn identity(&self, id: u32) -> Option<String>;
    /// Which response cap identity `name` is over and when it rolls, as the controller has
    /// it ("response day cap: ..."); `None` when it is not capped.
    fn response_cap(&self, _name: &str) -> Option<String> {
        None
    }
}

pub fn explain(
    tables: &KernelTables,
    names: &dyn Names,
    probe: &Probe,
) -> Result<Explanation, ExplainError> {
    let bytes = frame(probe)?;
    let Ok(Frame::Ip(pkt)) = parse(&bytes[..]) else {
        unreachable!("the builder makes well-formed IP frames");
    };
    let slot = port_slot(pkt.proto, pkt.dport);
    let port_endpoint = match slot {
        Some(s) => tables.ports.get(&s, 0).map_err(|source| TableError::Map {
            name: tollgate_common::map_names::PORTS,
            source,
        })?,
        None => 0,
    };
    let endpoint = tables.endpoint_record(port_endpoint)?;
    // The same two lookups the kernel makes: exact first, then the longest prefix (which
    // applies when the exact binding has expired).
    let exact = tables.exact_binding(probe.src)?;
    let cidr_hit = tables.cidr_binding(probe.src)?;
    let cidr = cidr_hit.map(|(_, b)| b);
    let mut identities = Vec::new();
    for b in exact.iter().chain(cidr.iter()) {
        let ident = tables.identity(b.identity)?;
        let bucket = tables.bucket(b.identity)?;
        identities.push((b.identity, ident, UnsafeCell::new(bucket)));
    }
    let src_bytes = pkt.src.bytes();
    let mut anon = Vec::new();
    for level in 0..3 {
        if let Some(prefix) = anon_prefix(pkt.family, &src_bytes, level) {
            let tat = tables.anon_tat(&prefix)?.unwrap_or(0);
            anon.push((prefix, UnsafeCell::new(tat)));
        }
    }
    let mut hold_back = Vec::new();
    for (_, ident, _) in &identities {
        for ep in [0, port_endpoint] {
            hold_back.push((ep, ident.plan, tables.hold_back(ep, ident.plan)?));
        }
    }
    let snap = Snapshot {
        slot,
        port_endpoint,
        endpoint,
        exact,
        cidr,
        identities,
        anon,
        settings: tables.settings()?,
        hold_back,
        now: kernel_clock::now_ns(),
        coarse: kernel_clock::coarse_ns(),
    };
    let d = decide(&snap, &pkt, bytes.len() as u64);
    let ident = snap
        .identities
        .iter()
        .find(|(i, _, _)| *i == d.identity && d.identity != 0)
        .map(|(_, ident, _)| *ident);
    // The clock the limiter charged on (or would have): the identity's, or for an unbound
    // source the anonymous allowance's.
    let clock = match (ident, d.reason) {
        (Some(i), _) => Some(Clock::of_identity(&i)),
        (None, Reason::Anonymous | Reason::AnonymousRate) => {
            Some(Clock::of_anonymous(&snap.settings))
        }
        _ => None,
    };
    let class = ident
        .and_then(|i| Class::from_u8(i.class))
        .map(Class::label);
    let endpoint_name = (d.endpoint != 0)
        .then(|| names.endpoint(d.endpoint))
        .flatten();
    let identity_name = (d.identity != 0)
        .then(|| names.identity(d.identity))
        .flatten();
    let binding = snap
        .exact
        .filter(|b| b.identity == d.identity)
        .map(|b| describe_binding(probe.src, host_len(probe.src), &b, snap.coarse))
        .or_else(|| {
            cidr_hit
                .filter(|(_, b)| b.identity == d.identity)
                .map(|(len, b)| describe_binding(probe.src, len, &b, snap.coarse))
        });
    let why = why(
        &d.reason,
        probe,
        endpoint_name.as_deref(),
        identity_name.as_deref(),
        class,
        binding.as_deref(),
    );
    // The kernel knows only the flag; which cap and when it rolls are the controller's. Said
    // whenever the flag is on: in throttle mode a packet that still passes is capped too.
    let capped = ident.is_some_and(|i| i.flags & ID_RESPONSE_CAPPED != 0);
    let why = match identity_name.as_deref().filter(|_| capped) {
        Some(n) => with_response_cap(why, ident, names.response_cap(n)),
        None => why,
    };
    Ok(Explanation {
        verdict: match d.reason.verdict() {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
            Verdict::Aborted => "aborted",
        },
        reason: d.reason.label(),
        endpoint_id: d.endpoint,
        endpoint: endpoint_name,
        identity_id: (d.identity != 0).then_some(d.identity),
        identity: identity_name,
        class,
        binding,
        clock: clock.map(Clock::label),
        why,
    })
}

/// `why` with the response cap the identity is held by, and the plan's mode as the kernel
/// record has it.
fn with_response_cap(why: String, ident: Option<Identity>, cap: Option<String>) -> String {
    let mode = match ident.map(|i| i.response_q8) {
        Some(0) | None => "dropped".to_owned(),
        Some(q8) => format!("costs x{}", f64::from(q8) / 256.0),
    };
    let cap = cap.unwrap_or_else(|| "response cap".to_owned());
    format!("{why} ({cap}; {mode} while it holds)")
}

fn describe_binding(src: IpAddr, len: u8, b: &Binding, now: u64) -> String {
    let net = crate::net::mask(src, len);
    if b.expires_ns == 0 {
        format!("{net}/{len}, no expiry")
    } else if b.expires_ns > now {
        format!(
            "{net}/{len}, expires in {}s",
            (b.expires_ns - now) / 1_000_000_000
        )
    } else {
        format!(
            "{net}/{len}, expired {}s ago",
            (now - b.expires_ns) / 1_000_000_000
        )
    }
}

fn why(
    reason: &Reason,
    p: &Probe,
    endpoint: Option<&str>,
    identity: Option<&str>,
    class: Option<&str>,
    binding: Option<&str>,
) -> String {
    let proto = match p.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    let ep = endpoint.map_or_else(String::new, |e| {
        format!("endpoint {e} ({proto}/{})", p.port)
    });
    let who = match (identity, class, binding) {
        (Some(i), Some(c), Some(b)) => format!("{} is bound to {i} ({c}) by {b}", p.src),
        (Some(i), _, _) => format!("{} is bound to {i}", p.src),
        _ => format!("{} has no live binding", p.src),
    };
    fill(
        reason.explanation(),
        &[
            ("src", &p.src.to_string()),
            ("dst", &p.dst.to_string()),
            ("proto", proto),
            ("port", &p.port.to_string()),
            ("ep", &ep),
            ("who", &who),
        ],
    )
}

/// Replaces each `{name}` of `template` (the reason table's explanation) with its value.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        match values.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => out.push_str(v),
            // The reason table's own test keeps unknown placeholders out; left visible.
            None => out.push_str(&rest[open..open + close + 2]),
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn probe() -> Probe {
        Probe {
            src: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 50)),
            dst: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            port: 8000,
            proto: Proto::Tcp,
            bytes: None,
        }
    }

    #[test]
    fn every_reason_is_explained_in_its_own_words() {
        let p = probe();
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            let text = why(
                r,
                &p,
                Some("model"),
                Some("acme"),
                Some("customer"),
                Some("203.0.113.50/32, no expiry"),
            );
            assert!(
                !text.contains('{'),
                "{r:?}: unfilled placeholder in {text:?}"
            );
            assert!(!text.contains("parser verdict"), "{r:?}: {text}");
            assert!(
                seen.insert(text.clone()),
                "{r:?} explained like another: {text}"
            );
        }
    }

    #[test]
    fn explanations_read_as_before() {
        // The sentences docs/cli.md shows.
        let p = probe();
        assert_eq!(
            why(&Reason::Unbound, &p, Some("model"), None, None, None),
            "203.0.113.50 has no binding, and endpoint model (tcp/8000) admits only bound \
             identities"
        );
        assert_eq!(
            why(
                &Reason::Bound,
                &p,
                Some("model"),
                Some("batch-cluster"),
                Some("internal"),
                Some("198.18.0.0/24, no expiry"),
            ),
            "203.0.113.50 is bound to batch-cluster (internal) by 198.18.0.0/24, no expiry; \
             endpoint model (tcp/8000) admits it, and it is within its budgets"
        );
        assert_eq!(
            why(&Reason::Unprotected, &p, None, None, None, None),
            "tcp/8000 on 198.18.0.1 is not a protected endpoint: tollgate passes it untouched"
        );
    }

    #[test]
    fn a_response_cap_says_which_cap_when_it_rolls_and_the_mode() {
        let ident = Identity {
            response_q8: 1024,
            ..Identity::default()
        };
        assert_eq!(
            with_response_cap(
                "over".into(),
                Some(ident),
                Some("response day cap: 20 of 10 bytes, rolls at unix 86400".into())
            ),
            "over (response day cap: 20 of 10 bytes, rolls at unix 86400; costs x4 while it holds)"
        );
        assert_eq!(
            with_response_cap("over".into(), Some(Identity::default()), None),
            "over (response cap; dropped while it holds)"
        );
    }

    #[test]
    fn fill_replaces_known_placeholders() {
        assert_eq!(fill("{a} and {b}", &[("a", "x"), ("b", "y")]), "x and y");
        assert_eq!(fill("{a} {zz} {", &[("a", "x")]), "x {zz} {");
    }
}
