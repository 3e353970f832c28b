use aya_ebpf::{
    Global,
    bindings::{TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, map, xdp},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, lpm_trie::Key,
    },
    programs::{TcContext, XdpContext},
};
use tollgate_common::{
    Counter, REASON_COUNTER_SLOTS, Reason,
    decide::{AnonPrefix, Decision, Tables, decide},
    flow::{
        self, EgressCounters, FLOW_COUNTER_SLOTS, FP_TRACK, Flow, FlowKey, FlowPolicy, FlowTables,
        TTFB_SLOTS, TtfbHist, tcp_payload, ttfb_bucket, ttfb_index,
    },
    parse::{Family, Frame, PacketView, parse, parse_l3},
    policy::{
        AnonKey6, Binding, Bucket, DropEvent, Endpoint, HOLD_BACK_SLOTS, Identity,
        IdentityCounters, MAX_ANON_PREFIXES, MAX_CIDR_BINDINGS, MAX_ENDPOINTS, MAX_EXACT_BINDINGS,
        MAX_FLOWS, MAX_IDENTITIES, PORT_SLOTS, SMALL_FRAME, Settings, hold_back_index,
    },
    reason_counter_index,
};

// Map names are the statics' names; `tollgate_common::map_names` spells them for userspace.

/// The most verbose kernel log level on: 0 off (the object's own default, whatever loads
/// it), 1 error, 2 warn, 3 info, 4 debug (aya-log's numbering). The agent sets it at load
/// time from `[node] kernel_log`. It lives in `.rodata`, which the loader freezes, so the
/// verifier knows its value and prunes every log statement above it: with logging off the
/// program carries no logging code at all.
#[unsafe(no_mangle)]
static TOLLGATE_LOG_LEVEL: Global<u8> = Global::new(0);

/// Whether log statements at `level` run (see [`TOLLGATE_LOG_LEVEL`]).
#[inline(always)]
fn log_enabled(level: u8) -> bool {
    TOLLGATE_LOG_LEVEL.load() >= level
}

const LOG_WARN: u8 = 2;
const LOG_INFO: u8 = 3;

#[map]
static PORTS: Array<u32> = Array::with_max_entries(PORT_SLOTS, 0);
#[map]
static ENDPOINTS: Array<Endpoint> = Array::with_max_entries(MAX_ENDPOINTS, 0);
#[map]
static BIND_V4: HashMap<[u8; 4], Binding> = HashMap::with_max_entries(MAX_EXACT_BINDINGS, 0);
#[map]
static BIND_V6: HashMap<[u8; 16], Binding> = HashMap::with_max_entries(MAX_EXACT_BINDINGS, 0);
#[map]
static BIND_CIDR_V4: LpmTrie<[u8; 4], Binding> = LpmTrie::with_max_entries(MAX_CIDR_BINDINGS, 0);
#[map]
static BIND_CIDR_V6: LpmTrie<[u8; 16], Binding> = LpmTrie::with_max_entries(MAX_CIDR_BINDINGS, 0);
#[map]
static IDENTITIES: Array<Identity> = Array::with_max_entries(MAX_IDENTITIES, 0);
#[map]
static BUCKETS: Array<Bucket> = Array::with_max_entries(MAX_IDENTITIES, 0);
/// LRU: the packet path inserts here, so a flood of sources ages out other anonymous prefixes,
/// never a binding (bindings live in maps only userspace writes).
#[map]
static ANON_V4: LruHashMap<[u8; 4], u64> = LruHashMap::with_max_entries(MAX_ANON_PREFIXES, 0);
#[map]
static ANON_V6: LruHashMap<AnonKey6, u64> = LruHashMap::with_max_entries(MAX_ANON_PREFIXES, 0);
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
/// Per-CPU packets and bytes per (reason, endpoint).
#[map]
static REASON_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(REASON_COUNTER_SLOTS, 0);
#[map]
static IDENTITY_COUNTERS: PerCpuArray<IdentityCounters> =
    PerCpuArray::with_max_entries(MAX_IDENTITIES, 0);
#[map]
static DROP_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map]
static DROP_EVENT_CLOCK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Written by the agent only; the program never reads it (see `tollgate_common::LAYOUT_VERSION`).
#[map]
static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);
/// (endpoint, plan) -> Q8 hold-back multiplier, written by the controller.
#[map]
static HOLD_BACK: Array<u16> = Array::with_max_entries(HOLD_BACK_SLOTS, 0);
/// Bound identities' TCP flows, both directions (`tollgate_common::flow`). LRU: the packet
/// path inserts, so a flood of flows ages out the oldest (counted when one comes back).
#[map]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static FLOW_POLICY: Array<FlowPolicy> = Array::with_max_entries(MAX_ENDPOINTS, 0);
#[map]
static FLOW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FLOW_COUNTER_SLOTS, 0);
/// What the node sent to each identity and from each endpoint (the egress program).
#[map]
static EGRESS_IDENTITY: PerCpuArray<EgressCounters> =
    PerCpuArray::with_max_entries(MAX_IDENTITIES, 0);
#[map]
static EGRESS_ENDPOINT: PerCpuArray<EgressCounters> =
    PerCpuArray::with_max_entries(MAX_ENDPOINTS, 0);
#[map]
static TTFB: PerCpuArray<TtfbHist> = PerCpuArray::with_max_entries(TTFB_SLOTS, 0);

/// The frame between `data` and `data_end` (loads: [`load_between`]).
struct XdpFrame {
    start: usize,
    end: usize,
}

impl PacketView for XdpFrame {
    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        load_between(self.start, self.end, off)
    }
}

/// `N` bytes at `start + off`, if they lie before `end`: every packet load, bounds-checked
/// right before the access in the shape the verifier tracks (packet pointer + constant size
/// compared with `data_end`).
#[inline(always)]
fn load_between<const N: usize>(start: usize, end: usize, off: usize) -> Option<[u8; N]> {
    let p = start + off;
    if p + N > end {
        return None;
    }
    // SAFETY: [p, p + N) lies inside the packet data (checked above); the read is unaligned
    // because headers after VLAN tags or IP options have no alignment guarantee.
    Some(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) })
}

/// The linear head of an skb: loads are checked against `data_end`, while `len` is the whole
/// packet (`skb->len`: a GSO super-packet's payload lies past the linear part), so the
/// parser's length checks see the datagram the IP header describes.
struct TcFrame {
    start: usize,
    end: usize,
    len: usize,
}

impl PacketView for TcFrame {
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        load_between(self.start, self.end, off)
    }
}

/// The maps, as the decision sees them.
struct Maps;

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

impl Tables for Maps {
    #[inline(always)]
    fn port_endpoint(&self, slot: u32) -> u32 {
        PORTS.get(slot).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn endpoint(&self, id: u32) -> Option<*const Endpoint> {
        ENDPOINTS.get_ptr(id)
    }

    #[inline(always)]
    fn exact_binding(&self, family: Family, src: &[u8; 16]) -> Option<*const Binding> {
        match family {
            Family::V4 => BIND_V4.get_ptr(v4(src)),
            Family::V6 => BIND_V6.get_ptr(src),
        }
    }

    #[inline(always)]
    fn cidr_binding(&self, family: Family, src: &[u8; 16]) -> Option<*const Binding> {
        match family {
            Family::V4 => BIND_CIDR_V4
                .get(Key::new(32, v4(src)))
                .map(|b| b as *const _),
            Family::V6 => BIND_CIDR_V6.get(Key::new(128, *src)).map(|b| b as *const _),
        }
    }

    #[inline(always)]
    fn identity(&self, id: u32) -> Option<*const Identity> {
        IDENTITIES.get_ptr(id)
    }

    #[inline(always)]
    fn bucket(&self, id: u32) -> Option<*mut Bucket> {
        BUCKETS.get_ptr_mut(id)
    }

    #[inline(always)]
    fn anon_tat(&self, prefix: &AnonPrefix) -> Option<*mut u64> {
        match prefix {
            AnonPrefix::V4(key) => {
                if let Some(p) = ANON_V4.get_ptr_mut(key) {
                    return Some(p);
                }
                // BPF_NOEXIST: another CPU may have inserted it meanwhile; then use theirs.
                let _ = ANON_V4.insert(key, 0, 1);
                ANON_V4.get_ptr_mut(key)
            }
            AnonPrefix::V6(key) => {
                if let Some(p) = ANON_V6.get_ptr_mut(key) {
                    return Some(p);
                }
                let _ = ANON_V6.insert(key, 0, 1);
                ANON_V6.get_ptr_mut(key)
            }
        }
    }

    #[inline(always)]
    fn settings(&self) -> Settings {
        SETTINGS.get(0).copied().unwrap_or_default()
    }

    #[inline(always)]
    fn hold_back(&self, endpoint: u32, plan: u16) -> u16 {
        HOLD_BACK
            .get(hold_back_index(endpoint, plan))
            .copied()
            .unwrap_or(0)
    }

    #[inline(always)]
    fn now_ns(&self) -> u64 {
        // SAFETY: a helper with no arguments. CLOCK_MONOTONIC, the domain of the coarse clock
        // too, so a bucket's TAT means the same on either (`ID_PRECISE_CLOCK`). Before #15
        // this was BOOTTIME (MONOTONIC + time suspended): the same on a server that never
        // suspends.
        unsafe { bpf_ktime_get_ns() }
    }

    #[inline(always)]
    fn coarse_ns(&self) -> u64 {
        // SAFETY: a helper with no arguments. CLOCK_MONOTONIC_COARSE: the timekeeper's value
        // at the last tick, no clocksource read (~15 ns against ~35 here).
        unsafe { bpf_ktime_get_coarse_ns() }
    }

    #[inline(always)]
    unsafe fn load(&self, p: *const u64) -> u64 {
        // SAFETY: the caller passes a pointer into a live map value. A volatile read: an
        // atomic load does not lower on this target (shared/TOOLCHAIN.md), and an aligned
        // 8-byte load is single-copy atomic on every BPF JIT.
        unsafe { core::ptr::read_volatile(p) }
    }

    #[inline(always)]
    unsafe fn cas(&self, p: *mut u64, old: u64, new: u64) -> bool {
        use core::intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg};
        // SAFETY: the caller passes an 8-byte aligned pointer into a live map value.
        unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new).1 }
    }
}

impl FlowTables for Maps {
    #[inline(always)]
    fn flow(&self, key: &FlowKey) -> Option<*mut Flow> {
        FLOWS.get_ptr_mut(key)
    }

    #[inline(always)]
    fn flow_insert(&self, key: &FlowKey, flow: &Flow) -> Option<*mut Flow> {
        // BPF_ANY: a racing insert of the same flow on another CPU is as fresh as this one.
        FLOWS.insert(key, flow, 0).ok()?;
        FLOWS.get_ptr_mut(key)
    }

    #[inline(always)]
    fn flow_policy(&self, endpoint: u32) -> FlowPolicy {
        FLOW_POLICY.get(endpoint).copied().unwrap_or_default()
    }

    #[inline(always)]
    fn flow_count(&self, slot: u32) {
        if let Some(c) = FLOW_COUNTERS.get_ptr_mut(slot) {
            // SAFETY: a per-CPU slot, touched only by this CPU with preemption disabled.
            unsafe { *c = (*c).wrapping_add(1) };
        }
    }

    #[inline(always)]
    fn record_ttfb(&self, endpoint: u32, class: u8, identity: u32, ns: u64) {
        if let Some(h) = TTFB.get_ptr_mut(ttfb_index(endpoint, class)) {
            let b = ttfb_bucket(ns);
            // SAFETY: per-CPU slot, as above; `b` < TTFB_BUCKETS by construction, checked
            // again so the verifier sees the bound.
            unsafe {
                (*h).count = (*h).count.wrapping_add(1);
                (*h).sum_ns = (*h).sum_ns.wrapping_add(ns);
                if let Some(slot) = (*h).buckets.get_mut(b) {
                    *slot = slot.wrapping_add(1);
                }
            }
        }
        if let Some(c) = EGRESS_IDENTITY.get_ptr_mut(identity) {
            // SAFETY: per-CPU slot, as above.
            unsafe {
                (*c).ttfb_sum_ns = (*c).ttfb_sum_ns.wrapping_add(ns);
                (*c).ttfb_count = (*c).ttfb_count.wrapping_add(1);
            }
        }
    }
}

#[xdp]
pub fn tollgate(ctx: XdpContext) -> u32 {
    let frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    enforce(&ctx, &frame, false, parse(&frame))
}

/// What the node sends: counted per bound identity and per endpoint, and each answer closes
/// the request of its flow (time to first byte). Never drops: `TC_ACT_UNSPEC` (TCX "next") for
/// every packet, so programs after it on the hook still run and a bug here can cost a figure,
/// never a response.
#[classifier]
pub fn tollgate_egress(ctx: TcContext) -> i32 {
    egress(&ctx, false)
}

/// The same on layer-3 tunnel devices (where the agent attaches `tollgate_l3`): there the
/// answer to a decapsulated client leaves before encapsulation, starting at its IP header.
/// Without it a tunnel client's requests would never see an answer, and its flows would
/// only ever grow towards the request cap.
#[classifier]
pub fn tollgate_egress_l3(ctx: TcContext) -> i32 {
    egress(&ctx, true)
}

#[inline(always)]
fn egress(ctx: &TcContext, l3: bool) -> i32 {
    let len = ctx.len() as usize;
    let mut frame = TcFrame {
        start: ctx.data(),
        end: ctx.data_end(),
        len,
    };
    // Headers usually sit in the linear part; pull them in when they do not (64 bytes of
    // Ethernet + IPv6 + TCP without options, more where there is more).
    if frame.end - frame.start < len && frame.end - frame.start < 128 {
        let want = if len < 128 { len } else { 128 };
        // Whatever it returns, the helper may have moved the data: every packet pointer is
        // read afresh (the verifier invalidates the old ones either way).
        let _ = ctx.pull_data(want as u32);
        frame.start = ctx.data();
        frame.end = ctx.data_end();
    }
    let parsed = if l3 { parse_l3(&frame) } else { parse(&frame) };
    if let Ok(Frame::Ip(p)) = parsed {
        let payload = if p.has_ports() {
            tcp_or_udp_payload(&frame, &p)
        } else {
            0
        };
        let e = flow::egress(&Maps, &p, payload);
        if e.endpoint != 0 {
            count_egress(&EGRESS_ENDPOINT, e.endpoint, len as u64, payload);
            if e.identity != 0 {
                count_egress(&EGRESS_IDENTITY, e.identity, len as u64, payload);
            }
        }
    }
    TC_ACT_UNSPEC
}

/// Transport payload: TCP from its data offset, UDP after its 8-byte header.
#[inline(always)]
fn tcp_or_udp_payload(frame: &TcFrame, p: &tollgate_common::parse::IpPacket) -> u64 {
    if p.proto == tollgate_common::parse::IPPROTO_UDP {
        (p.ip_end as u64).saturating_sub(p.l4_offset as u64 + 8)
    } else {
        tcp_payload(frame, p)
    }
}

#[inline(always)]
fn count_egress(map: &PerCpuArray<EgressCounters>, slot: u32, bytes: u64, payload: u64) {
    if let Some(c) = map.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, touched only by this CPU (TC runs with preemption disabled
        // for the program's run).
        unsafe {
            (*c).sent.add(bytes);
            (*c).payload = (*c).payload.wrapping_add(payload);
        }
    }
}

/// Passes everything: the egress benchmark's baseline.
#[classifier]
pub fn tollgate_tc_noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// The same enforcement for layer-3 tunnel devices (ipip, sit, gre, ip6tnl, wireguard, xfrm),
/// where generic XDP's data starts at the IP header: the agent attaches it to them as they
/// appear, so decapsulated packets meet the same maps and the same decision.
#[xdp]
pub fn tollgate_l3(ctx: XdpContext) -> u32 {
    let frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    enforce(&ctx, &frame, true, parse_l3(&frame))
}

/// The flow step of a bound TCP packet, in a function of its own: a BPF-to-BPF call, so the
/// verifier walks the flow logic once per distinct state at the call instead of once per path
/// through the parser and the decision (inlined, it multiplied the program's verification
/// work by six).
/// A bound TCP packet's decision, handed from the enforcing program to the flow program
/// (one per CPU: XDP runs a packet to completion on its CPU, tail call included).
#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    endpoint: u32,
    identity: u32,
    cost: u64,
}

/// Slot 0: the flow program for Ethernet frames, 1: for layer-3 tunnel devices. The agent
/// fills it at load (`flow_programs::install`); pinned, so the slots outlive the agent.
#[map]
static FLOW_PROG: ProgramArray = ProgramArray::with_max_entries(2, 0);
#[map]
static FLOW_PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// Tail-calls the flow program with the decision. A tail call, not a function: the flow logic
/// inlined after the decision was verified once per path through parser and decision (six
/// times the whole program's work), and a BPF-to-BPF call ran out of the 512-byte stack the
/// two frames share. The flow program re-parses the frame (the parser is the cheap part) and
/// starts with a stack of its own.
#[inline(always)]
fn hand_to_flow(ctx: &XdpContext, l3: bool, d: &Decision) {
    let Some(slot) = FLOW_PENDING.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU slot, used only by this CPU's run of this packet.
    unsafe {
        *slot = Pending {
            endpoint: d.endpoint,
            identity: d.identity,
            cost: d.cost,
        };
        FLOW_PROG.tail_call(ctx, if l3 { 1 } else { 0 });
    }
}

/// The flow step of a bound TCP packet (`flow::ingress`): counts the decision as the
/// enforcing program would have, with `request_size` for a flow over its cap.
#[inline(always)]
fn flow_step(ctx: &XdpContext, l3: bool) -> u32 {
    let frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let len = frame.len() as u64;
    let Some(pending) = FLOW_PENDING.get(0).copied() else {
        return xdp_action::XDP_ABORTED;
    };
    let parsed = if l3 { parse_l3(&frame) } else { parse(&frame) };
    // The same frame the enforcing program parsed a moment ago: anything else is impossible,
    // and aborting makes it visible (xdp:xdp_exception) instead of guessing.
    let Ok(Frame::Ip(p)) = parsed else {
        return xdp_action::XDP_ABORTED;
    };
    let d = Decision {
        cost: pending.cost,
        ..Decision::new(Reason::Bound, pending.endpoint, pending.identity)
    };
    let d = flow::ingress(&Maps, &p, tcp_payload(&frame, &p), d);
    count(&d, len, p.is_new_flow());
    d.reason.verdict() as u32
}

/// The flow program for Ethernet frames (slot 0 of `FLOW_PROG`).
#[xdp]
pub fn tollgate_flow(ctx: XdpContext) -> u32 {
    flow_step(&ctx, false)
}

/// The flow program for layer-3 tunnel devices (slot 1 of `FLOW_PROG`).
#[xdp]
pub fn tollgate_flow_l3(ctx: XdpContext) -> u32 {
    flow_step(&ctx, true)
}

/// Decides, counts and samples one parsed frame; returns the XDP action.
#[inline(always)]
fn enforce(ctx: &XdpContext, frame: &XdpFrame, l3: bool, parsed: Result<Frame, Reason>) -> u32 {
    let len = frame.len() as u64;
    let mut new_flow = false;
    let decision = match parsed {
        Ok(Frame::Ip(p)) => {
            let d = decide(&Maps, &p, len);
            if d.reason == Reason::Bound
                && p.proto == tollgate_common::parse::IPPROTO_TCP
                && Maps.flow_policy(d.endpoint).flags & FP_TRACK != 0
            {
                hand_to_flow(ctx, l3, &d);
                // Back here only if the flow program is not installed: counted untracked.
            }
            if d.reason.verdict() == tollgate_common::Verdict::Drop {
                // The odd decisions' log lines ride on the drop event's sample, so they are
                // as bounded as the events (and off with them).
                if drop_event(&d, &p, len) && log_enabled(LOG_WARN) {
                    log_odd_decision(ctx, &d);
                }
            }
            new_flow = p.is_new_flow();
            d
        }
        Ok(Frame::NotIp(_)) => Decision::new(Reason::NotIp, 0, 0),
        Err(reason) => {
            if log_enabled(LOG_INFO) && sample_due().is_some() {
                aya_log_ebpf::info!(
                    ctx,
                    "dropped a {}-byte frame the parser cannot classify: {}",
                    len,
                    reason.label()
                );
            }
            Decision::new(reason, 0, 0)
        }
    };
    count(&decision, len, new_flow);
    decision.reason.verdict() as u32
}

#[inline(always)]
fn count(d: &Decision, bytes: u64, new_flow: bool) {
    if let Some(c) = REASON_COUNTERS.get_ptr_mut(reason_counter_index(d.reason, d.endpoint)) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and XDP runs with preemption
        // disabled, so the plain read-modify-write cannot race.
        unsafe { (*c).add(bytes) };
    }
    // Unprotected and non-IP traffic is nobody's: only the reason counter moves.
    if d.endpoint == 0 && d.identity == 0 {
        return;
    }
    if let Some(c) = IDENTITY_COUNTERS.get_ptr_mut(d.identity) {
        // SAFETY: as above.
        unsafe {
            if d.reason.verdict() == tollgate_common::Verdict::Pass {
                (*c).passed.add(bytes);
                (*c).cost = (*c).cost.wrapping_add(d.cost);
            } else {
                (*c).dropped.add(bytes);
            }
            if new_flow {
                (*c).syn = (*c).syn.wrapping_add(1);
            }
            if bytes < SMALL_FRAME {
                (*c).small = (*c).small.wrapping_add(1);
            }
        }
    }
}

/// Sends at most one drop event per CPU per `drop_event_interval_ns`, so a flood costs the
/// ring buffer (and the agent's logs) a bounded rate. Returns whether this packet was the
/// sample.
#[inline(always)]
fn drop_event(d: &Decision, p: &tollgate_common::parse::IpPacket, bytes: u64) -> bool {
    let Some(now) = sample_due() else {
        return false;
    };
    let event = DropEvent {
        reason: d.reason as u32,
        identity: d.identity,
        endpoint: d.endpoint as u16,
        family: p.family as u8,
        proto: p.proto,
        dport: p.dport,
        _pad: 0,
        src: p.src.bytes(),
        bytes: bytes as u32,
        _pad2: 0,
        time_ns: now,
    };
    let _ = DROP_EVENTS.output::<DropEvent>(&event, 0);
    true
}

/// Whether this CPU may send a sample now (at most one per `drop_event_interval_ns`; never
/// when it is 0), and the time, which it records as this CPU's last sample. Drop events and
/// the parser's log lines share it, so a flood costs the ring buffers a bounded rate.
#[inline(always)]
fn sample_due() -> Option<u64> {
    let interval = Maps.settings().drop_event_interval_ns;
    if interval == 0 {
        return None;
    }
    let last = DROP_EVENT_CLOCK.get_ptr_mut(0)?;
    // Sampling needs no precision (intervals are tens of ms), and every dropped packet of a
    // flood comes through here: the coarse clock (jiffies) costs a fraction of the precise one
    // the limiter needs.
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: per-CPU slot, see `count`.
    unsafe {
        // 0: this CPU never sent one (a machine up for less than `interval` must still get
        // its first event).
        if *last != 0 && now.wrapping_sub(*last) < interval {
            return None;
        }
        *last = now;
    }
    Some(now)
}

/// Decisions that point at a problem rather than at traffic: they should not happen, so each
/// one is worth a line (at `warn`).
#[inline(always)]
fn log_odd_decision(ctx: &XdpContext, d: &Decision) {
    match d.reason {
        Reason::LimiterContended => aya_log_ebpf::warn!(
            ctx,
            "limiter contended: identity {} lost every compare-and-swap try to other CPUs",
            d.identity
        ),
        Reason::UnknownIdentity => aya_log_ebpf::warn!(
            ctx,
            "a binding names identity slot {}, which holds no identity",
            d.identity
        ),
        _ => {}
    }
}

// Component programs for `cargo xtask bench`: each adds one piece of the enforcing path to
// the parser, so BENCHMARKS.md can say where the time goes. The agent never loads them.

/// Benchmark component: the parser alone (and the reason counter every path has).
#[xdp]
pub fn bench_parse(ctx: XdpContext) -> u32 {
    bench_component(&ctx, |_| true)
}

/// Benchmark component: the parser and one read of the precise clock (what a precise plan's
/// budgets add).
#[xdp]
pub fn bench_clock(ctx: XdpContext) -> u32 {
    bench_component(&ctx, |_| Maps.now_ns() != 0)
}

/// Benchmark component: the parser and one read of the coarse clock (the only clock a bound
/// packet of a coarse plan reads).
#[xdp]
pub fn bench_coarse_clock(ctx: XdpContext) -> u32 {
    bench_component(&ctx, |_| Maps.coarse_ns() != 0)
}

/// Benchmark component: the parser and the exact binding lookup.
#[xdp]
pub fn bench_lookup(ctx: XdpContext) -> u32 {
    bench_component(&ctx, |p| {
        Maps.exact_binding(p.family, &p.src.bytes()).is_some()
    })
}

/// Parses, runs `step` on an IP packet and counts the outcome like the real program does.
#[inline(always)]
fn bench_component(
    ctx: &XdpContext,
    step: impl FnOnce(&tollgate_common::parse::IpPacket) -> bool,
) -> u32 {
    let frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let len = frame.len() as u64;
    let reason = match parse(&frame) {
        Ok(Frame::Ip(p)) => {
            if step(&p) {
                Reason::Unprotected
            } else {
                Reason::NotIp
            }
        }
        Ok(Frame::NotIp(_)) => Reason::NotIp,
        Err(r) => r,
    };
    count(&Decision::new(reason, 0, 0), len, false);
    reason.verdict() as u32
}

/// Passes everything: the baseline the benchmark compares the real program against.
#[xdp]
pub fn tollgate_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: there is no unwinding in BPF, and a reachable panic
    // would have to call this, which the verifier refuses as an infinite loop.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
