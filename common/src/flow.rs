//! Both directions of a bound identity's TCP flows, without reading content: what the node
//! sends back (the egress program counts it per identity and per endpoint), where one request
//! ends and its answer begins (time to first byte), and how much a client sends before the
//! server answers (the request-size caps). Shared by the XDP program (ingress), the TC egress
//! program and the host tests, like `decide`.
//!
//! A flow is keyed from the client's side: (client address, server address, client port,
//! server port). Only flows of bound identities to protected TCP endpoints are tracked, so an
//! unbound source never costs more than a counter; the table is an LRU map, so a flood of
//! flows ages out the oldest entries instead of failing, and a flow the table lost is counted
//! (`FLOW_MIDSTREAM`, `FLOW_UNTRACKED`), never given a wrong figure.

use crate::{
    Reason,
    decide::{Bound, Decision, LazyNow, Tables, find_binding},
    parse::{Family, Fragment, IPPROTO_TCP, IpPacket, PacketView},
    policy::{ANONYMOUS_IDENTITY, ID_ACTIVE, port_slot},
};

/// Upper bounds (ms) of the time-to-first-byte histogram's buckets; the last bucket is
/// everything above the last bound (+Inf). Prometheus-style, not cumulative in the kernel.
pub const TTFB_BOUNDS_MS: [u64; 12] =
    [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000];
/// Buckets of [`TtfbHist`]: one per bound and +Inf.
pub const TTFB_BUCKETS: usize = TTFB_BOUNDS_MS.len() + 1;
/// Histogram slots: one per (endpoint, class).
pub const TTFB_SLOTS: u32 = crate::policy::MAX_ENDPOINTS * 4;

/// Index of the (endpoint, class) histogram.
#[inline(always)]
pub const fn ttfb_index(endpoint: u32, class: u8) -> u32 {
    endpoint * 4 + (class as u32 & 3)
}

/// The bucket a time to first byte of `ns` falls in.
#[inline(always)]
pub fn ttfb_bucket(ns: u64) -> usize {
    let mut i = 0;
    while i < TTFB_BOUNDS_MS.len() {
        if ns <= TTFB_BOUNDS_MS[i] * 1_000_000 {
            return i;
        }
        i += 1;
    }
    TTFB_BOUNDS_MS.len()
}

/// Once the server has sent this many payload bytes since the client's last payload, the
/// client's `unanswered_bytes` start again; any server payload resets `request_bytes`. Small
/// answers a client can provoke at will (an HTTP/2 PING or SETTINGS acknowledgement, 17 bytes
/// plus a TLS record's 22) reset only the request count, so the unanswered cap is the one they
/// cannot undo one frame at a time; a streamed answer of small packets (tokens of a few hundred
/// bytes each) adds up and resets it, as a real answer should.
pub const ANSWER_BYTES: u64 = 512;

/// Key of the flow table, from the client's side. Addresses in the layout of `Addr::bytes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The flow of a packet from the client (ingress).
    #[inline(always)]
    pub fn from_client(p: &IpPacket) -> FlowKey {
        FlowKey {
            client: p.src.bytes(),
            server: p.dst.bytes(),
            client_port: p.sport,
            server_port: p.dport,
            family: p.family as u8,
            _pad: [0; 3],
        }
    }

    /// The flow of a packet from the server (egress).
    #[inline(always)]
    pub fn from_server(p: &IpPacket) -> FlowKey {
        FlowKey {
            client: p.dst.bytes(),
            server: p.src.bytes(),
            client_port: p.dport,
            server_port: p.sport,
            family: p.family as u8,
            _pad: [0; 3],
        }
    }
}

/// `Flow::flags`: the client sent payload the server has not answered yet (the time to
/// first byte runs from `last_request_ns`).
pub const FLOW_AWAITING: u8 = 1 << 0;
/// `Flow::flags`: the flow went over a request-size cap; every later client packet but a RST
/// is dropped (`request_size`). Sticky for the life of the entry: a forged SYN or RST must not
/// reopen a connection the server still holds.
pub const FLOW_CUT: u8 = 1 << 1;

/// One tracked flow. Written by both programs from any CPU without atomics: a race can lose
/// one packet's bytes or one reset, never corrupt the entry (every field is a plain integer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub identity: u32,
    pub endpoint: u16,
    /// The identity's class when the flow was first seen (histogram label).
    pub class: u8,
    pub flags: u8,
    /// Client payload bytes since the server last sent payload.
    pub request_bytes: u64,
    /// Client payload bytes since the server last answered with [`ANSWER_BYTES`] or more.
    pub unanswered_bytes: u64,
    /// Server payload bytes since the client's last payload (the answer so far).
    pub answer_bytes: u64,
    /// CLOCK_MONOTONIC ns of the client's last payload packet.
    pub last_request_ns: u64,
    /// Server payload bytes on this flow.
    pub response_bytes: u64,
    /// Requests answered (times to first byte measured) on this flow.
    pub answers: u64,
}

const _: () = assert!(core::mem::size_of::<Flow>() == 56);

/// `FlowPolicy::flags`: track this endpoint's flows (time to first byte, request caps). On
/// for every TCP endpoint unless the operator turns it off (`track_flows = false`) to save
/// the lookup per packet.
pub const FP_TRACK: u32 = 1 << 0;

/// Per-endpoint flow settings, indexed by endpoint id (the agent writes them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowPolicy {
    pub flags: u32,
    pub _pad: u32,
    /// Most client payload bytes between two server payloads; 0: no cap.
    pub max_request_bytes: u64,
    /// Most client payload bytes between two server answers of [`ANSWER_BYTES`] or more; 0: no
    /// cap.
    pub max_unanswered_bytes: u64,
}

const _: () = assert!(core::mem::size_of::<FlowPolicy>() == 24);

/// What the node sent back, per identity and per endpoint (per CPU in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressCounters {
    /// Packets and bytes as the egress program sees them (`skb->len`: L2 header included; a
    /// GSO super-packet counts once, with all its bytes).
    pub sent: crate::Counter,
    /// Transport payload bytes (TCP or UDP data: what the client's socket receives, TLS
    /// records and HTTP headers included, IP and TCP headers not). Response caps count these.
    pub payload: u64,
    /// Sum and count of the times to first byte measured on this identity's flows (ns).
    pub ttfb_sum_ns: u64,
    pub ttfb_count: u64,
}

const _: () = assert!(core::mem::size_of::<EgressCounters>() == 40);

impl EgressCounters {
    /// Sums per-CPU slots; wraps like the kernel's counters.
    pub fn sum<'a>(slots: impl IntoIterator<Item = &'a EgressCounters>) -> EgressCounters {
        slots
            .into_iter()
            .fold(EgressCounters::default(), |mut acc, c| {
                acc.accumulate(c);
                acc
            })
    }

    pub fn accumulate(&mut self, c: &EgressCounters) {
        self.sent.accumulate(&c.sent);
        self.payload = self.payload.wrapping_add(c.payload);
        self.ttfb_sum_ns = self.ttfb_sum_ns.wrapping_add(c.ttfb_sum_ns);
        self.ttfb_count = self.ttfb_count.wrapping_add(c.ttfb_count);
    }

    /// What happened since `earlier`; a slot cleared in between (a reused identity slot)
    /// counts from zero, as `IdentityCounters::since` does.
    pub fn since(&self, earlier: &EgressCounters) -> EgressCounters {
        let reset = self.sent.packets < earlier.sent.packets
            || self.sent.bytes < earlier.sent.bytes
            || self.payload < earlier.payload
            || self.ttfb_sum_ns < earlier.ttfb_sum_ns
            || self.ttfb_count < earlier.ttfb_count;
        if reset {
            *self
        } else {
            EgressCounters {
                sent: self.sent.delta(&earlier.sent),
                payload: self.payload - earlier.payload,
                ttfb_sum_ns: self.ttfb_sum_ns - earlier.ttfb_sum_ns,
                ttfb_count: self.ttfb_count - earlier.ttfb_count,
            }
        }
    }
}

/// Time-to-first-byte histogram of one (endpoint, class), per CPU in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TtfbHist {
    pub count: u64,
    pub sum_ns: u64,
    /// Per bucket, not cumulative: `buckets[i]` counts times in (bound i-1, bound i].
    pub buckets: [u64; TTFB_BUCKETS],
}

const _: () = assert!(core::mem::size_of::<TtfbHist>() == 16 + 8 * TTFB_BUCKETS);

impl TtfbHist {
    pub fn accumulate(&mut self, o: &TtfbHist) {
        self.count = self.count.wrapping_add(o.count);
        self.sum_ns = self.sum_ns.wrapping_add(o.sum_ns);
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
}

/// Flow-tracking counters (per CPU), indexed by these slots.
pub const FLOW_CREATED: u32 = 0;
/// A flow first seen mid-stream (payload, no SYN): it began before tracking, or its entry was
/// evicted (the LRU table is full). Its request bytes count from here.
pub const FLOW_MIDSTREAM: u32 = 1;
/// A server payload packet on a tracked endpoint for a bound client with no flow entry: no
/// time to first byte is measured for it (evicted, or the flow is older than tracking).
pub const FLOW_UNTRACKED: u32 = 2;
/// Times to first byte measured.
pub const FLOW_ANSWERS: u32 = 3;
/// Flows cut by a request-size cap (once per flow; its packets count under `request_size`).
pub const FLOW_CUTS: u32 = 4;
/// Slots of the flow counter map.
pub const FLOW_COUNTER_SLOTS: u32 = 8;

/// What the flow logic reads and writes, beyond the decision's tables.
pub trait FlowTables: Tables {
    /// The tracked flow of `key`.
    fn flow(&self, key: &FlowKey) -> Option<*mut Flow>;
    /// Inserts `flow` under `key` (replacing any) and returns where it lives now; `None` when
    /// the table refuses.
    fn flow_insert(&self, key: &FlowKey, flow: &Flow) -> Option<*mut Flow>;
    fn flow_policy(&self, endpoint: u32) -> FlowPolicy;
    /// Adds one to the flow counter `slot`.
    fn flow_count(&self, slot: u32);
    /// Records a time to first byte of `ns` for (endpoint, class) and for `identity`.
    fn record_ttfb(&self, endpoint: u32, class: u8, identity: u32, ns: u64);
}

/// TCP payload bytes of a parsed packet: the IP datagram's end (its length field) minus the
/// transport header. `0` for anything that is not TCP or whose header cannot be read.
#[inline(always)]
pub fn tcp_payload<P: PacketView + ?Sized>(view: &P, pkt: &IpPacket) -> u64 {
    if pkt.proto != IPPROTO_TCP {
        return 0;
    }
    let l4 = pkt.l4_offset as u64;
    let Some(h) = view.load::<1>(pkt.l4_offset as usize + 12) else {
        return 0;
    };
    let doff = ((h[0] >> 4) as u64) * 4;
    (pkt.ip_end as u64).saturating_sub(l4 + doff)
}

const TCP_RST: u8 = 0x04;
const TCP_SYN_ACK: u8 = 0x12;

/// The ingress half, after the decision passed a bound packet: tracks its flow and applies the
/// endpoint's request-size caps. Returns the decision to count (the same one, or
/// `request_size` for a flow over its cap).
#[inline(always)]
pub fn ingress<T: FlowTables>(t: &T, pkt: &IpPacket, payload: u64, d: Decision) -> Decision {
    if d.reason != Reason::Bound || pkt.proto != IPPROTO_TCP || d.identity == ANONYMOUS_IDENTITY {
        return d;
    }
    let policy = t.flow_policy(d.endpoint);
    if policy.flags & FP_TRACK == 0 {
        return d;
    }
    let capped = policy.max_request_bytes != 0 || policy.max_unanswered_bytes != 0;
    // A first fragment carries only part of its segment: the later fragments pass without
    // ports (`non_first_fragment`) and would never be counted, so a segment sent in fragments
    // would count a fraction of its bytes. TCP sets DF and never needs this; to an endpoint
    // with a request cap it is refused.
    if capped && pkt.fragment != Fragment::None {
        t.flow_count(FLOW_CUTS);
        return Decision::new(Reason::RequestSize, d.endpoint, d.identity);
    }
    let key = FlowKey::from_client(pkt);
    let flow = match t.flow(&key) {
        Some(f) => f,
        None => {
            let syn = pkt.is_new_flow();
            // A pure ACK, FIN or RST of an unknown flow needs no entry: nothing to measure yet.
            if !syn && payload == 0 {
                return d;
            }
            let class = match t.identity(d.identity) {
                // SAFETY: a valid map value pointer for this run.
                Some(i) => unsafe { (*i).class },
                None => 0,
            };
            let fresh = Flow {
                identity: d.identity,
                endpoint: d.endpoint as u16,
                class,
                ..Flow::default()
            };
            t.flow_count(if syn { FLOW_CREATED } else { FLOW_MIDSTREAM });
            match t.flow_insert(&key, &fresh) {
                Some(f) => f,
                None => return d,
            }
        }
    };
    // SAFETY: a valid map value pointer for this run; see `Flow` for the races allowed.
    let flow = unsafe { &mut *flow };
    if flow.flags & FLOW_CUT != 0 {
        // Cut flows stay cut; a RST still reaches the server so it can let go.
        if pkt.tcp_flags & TCP_RST != 0 {
            return d;
        }
        return Decision::new(Reason::RequestSize, d.endpoint, d.identity);
    }
    if payload == 0 {
        return d;
    }
    flow.request_bytes = flow.request_bytes.wrapping_add(payload);
    flow.unanswered_bytes = flow.unanswered_bytes.wrapping_add(payload);
    flow.answer_bytes = 0;
    flow.last_request_ns = t.now_ns();
    flow.flags |= FLOW_AWAITING;
    let over_request =
        policy.max_request_bytes != 0 && flow.request_bytes > policy.max_request_bytes;
    let over_unanswered =
        policy.max_unanswered_bytes != 0 && flow.unanswered_bytes > policy.max_unanswered_bytes;
    if over_request || over_unanswered {
        flow.flags |= FLOW_CUT;
        t.flow_count(FLOW_CUTS);
        return Decision::new(Reason::RequestSize, d.endpoint, d.identity);
    }
    d
}

/// Where an egress packet goes, as far as tollgate cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Egress {
    /// The protected endpoint it comes from (by source port and address); 0: unprotected,
    /// counted nowhere.
    pub endpoint: u32,
    /// The bound identity it goes to; `ANONYMOUS_IDENTITY` for an unbound destination.
    pub identity: u32,
}

/// The egress half: classifies a packet the node sends (source = a protected endpoint,
/// destination = a client) and, for a bound client's TCP payload, closes the request it
/// answers: the time to first byte, the request counters' reset. The caller counts bytes.
#[inline(always)]
pub fn egress<T: FlowTables>(t: &T, pkt: &IpPacket, payload: u64) -> Egress {
    let none = Egress {
        endpoint: 0,
        identity: ANONYMOUS_IDENTITY,
    };
    if !pkt.has_ports() {
        return none;
    }
    let Some(slot) = port_slot(pkt.proto, pkt.sport) else {
        return none;
    };
    let ep_id = t.port_endpoint(slot);
    if ep_id == 0 {
        return none;
    }
    let Some(ep) = t.endpoint(ep_id) else {
        return none;
    };
    // SAFETY: a valid map value pointer for this run.
    if !unsafe { &*ep }.covers(pkt.family == Family::V6, &pkt.src.bytes()) {
        return none;
    }
    let identity = bound_identity(t, pkt.family, &pkt.dst.bytes());
    let mut out = Egress {
        endpoint: ep_id,
        identity,
    };
    if pkt.proto != IPPROTO_TCP || t.flow_policy(ep_id).flags & FP_TRACK == 0 {
        return out;
    }
    // The server's SYN-ACK: it accepted a new connection on this 4-tuple (an established one
    // answers a SYN with a plain ACK), so whatever the entry held belongs to an old one,
    // a cut included. Only the server can say so; a client's SYN never reopens a cut flow.
    if pkt.tcp_flags & TCP_SYN_ACK == TCP_SYN_ACK {
        if let Some(flow) = t.flow(&FlowKey::from_server(pkt)) {
            // SAFETY: a valid map value pointer for this run.
            let flow = unsafe { &mut *flow };
            let (identity, endpoint, class) = (flow.identity, flow.endpoint, flow.class);
            *flow = Flow {
                identity,
                endpoint,
                class,
                ..Flow::default()
            };
        }
        return out;
    }
    if payload == 0 {
        return out;
    }
    let Some(flow) = t.flow(&FlowKey::from_server(pkt)) else {
        if identity != ANONYMOUS_IDENTITY {
            t.flow_count(FLOW_UNTRACKED);
        }
        return out;
    };
    // SAFETY: a valid map value pointer for this run.
    let flow = unsafe { &mut *flow };
    // The flow's identity, not whoever the address is bound to now: a binding that expires
    // or moves mid-answer must not make the rest of the answer free of its caps.
    out.identity = flow.identity;
    if flow.flags & FLOW_AWAITING != 0 {
        let now = t.now_ns();
        let ns = now.saturating_sub(flow.last_request_ns);
        flow.flags &= !FLOW_AWAITING;
        flow.answers = flow.answers.wrapping_add(1);
        t.record_ttfb(ep_id, flow.class, flow.identity, ns);
        t.flow_count(FLOW_ANSWERS);
    }
    flow.request_bytes = 0;
    flow.answer_bytes = flow.answer_bytes.wrapping_add(payload);
    if flow.answer_bytes >= ANSWER_BYTES {
        flow.unanswered_bytes = 0;
    }
    flow.response_bytes = flow.response_bytes.wrapping_add(payload);
    out
}

/// The identity bound to `addr`, or anonymous: the decision's own lookup (exact first, then
/// CIDR; expiry on the coarse clock), and an inactive slot counts as nobody's.
#[inline(always)]
fn bound_identity<T: Tables>(t: &T, family: Family, addr: &[u8; 16]) -> u32 {
    let Bound::Live(id) = find_binding(t, family, addr, &mut LazyNow::new()) else {
        return ANONYMOUS_IDENTITY;
    };
    match t.identity(id) {
        // SAFETY: a valid map value pointer for this run.
        Some(i) if unsafe { (*i).flags } & ID_ACTIVE != 0 => id,
        _ => ANONYMOUS_IDENTITY,
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), Copy, explicit padding only (sizes asserted), every bit pattern
    // valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowPolicy {}
    unsafe impl aya::Pod for super::EgressCounters {}
    unsafe impl aya::Pod for super::TtfbHist {}
}
