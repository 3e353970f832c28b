//! Layouts of the policy maps the agent writes and the XDP program reads. All `repr(C)`,
//! `Copy`, without implicit padding (sizes asserted), so the bytes mean the same on both sides.

/// Highest endpoint id + 1. Endpoint 0 means "no endpoint" (unprotected traffic).
pub const MAX_ENDPOINTS: u32 = 64;
/// Plans the kernel tells apart (an identity's `plan` indexes the hold-back table).
pub const MAX_PLANS: u32 = 16;
/// Slots of the hold-back table: one Q8 multiplier per (endpoint, plan).
pub const HOLD_BACK_SLOTS: u32 = MAX_ENDPOINTS * MAX_PLANS;

/// Index of the (endpoint, plan) hold-back multiplier.
#[inline(always)]
pub const fn hold_back_index(endpoint: u32, plan: u16) -> u32 {
    endpoint * MAX_PLANS + (plan as u32 & (MAX_PLANS - 1))
}

/// Identity slots. Identity 0 is reserved for "anonymous" (unbound sources).
pub const MAX_IDENTITIES: u32 = 16384;
/// Exact (/32, /128) bindings per family.
pub const MAX_EXACT_BINDINGS: u32 = 131072;
/// CIDR bindings per family.
pub const MAX_CIDR_BINDINGS: u32 = 16384;
/// Anonymous prefixes tracked per map (LRU: the packet path may insert, the oldest goes).
pub const MAX_ANON_PREFIXES: u32 = 65536;
/// Tracked flows (`flow::FlowKey` -> `flow::Flow`, LRU), the compiled default; `[limits]
/// flows` sizes it at load time.
pub const MAX_FLOWS: u32 = 65536;
/// Slots of the port table: one per (TCP|UDP, port).
pub const PORT_SLOTS: u32 = 2 * 65536;
/// The identity id of unbound sources in per-identity counters.
pub const ANONYMOUS_IDENTITY: u32 = 0;

/// Fixed point: 256 means 1.0 (cost weights, the pressure multiplier, throttle factors).
pub const Q8_ONE: u16 = 256;

/// Index into the port table for a transport protocol and destination port, or `None` for
/// protocols that have no ports (those are never protected by port).
#[inline(always)]
pub const fn port_slot(proto: u8, port: u16) -> Option<u32> {
    match proto {
        crate::parse::IPPROTO_TCP => Some(port as u32),
        crate::parse::IPPROTO_UDP => Some(65536 + port as u32),
        _ => None,
    }
}

/// Identity classes, as bits of an endpoint's `allowed_classes`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Internal = 0,
    Partner = 1,
    Customer = 2,
    Anonymous = 3,
}

impl Class {
    pub const ALL: [Class; 4] = [
        Class::Internal,
        Class::Partner,
        Class::Customer,
        Class::Anonymous,
    ];

    pub const fn bit(self) -> u8 {
        1 << self as u8
    }

    pub const fn from_u8(v: u8) -> Option<Class> {
        match v {
            0 => Some(Class::Internal),
            1 => Some(Class::Partner),
            2 => Some(Class::Customer),
            3 => Some(Class::Anonymous),
            _ => None,
        }
    }

    /// The class a label names ("internal", "partner", "customer", "anonymous").
    pub fn from_label(label: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.label() == label)
    }

    pub const fn label(self) -> &'static str {
        match self {
            Class::Internal => "internal",
            Class::Partner => "partner",
            Class::Customer => "customer",
            Class::Anonymous => "anonymous",
        }
    }
}

/// `Endpoint::flags`: the slot describes a protected endpoint.
pub const EP_ACTIVE: u8 = 1 << 0;
/// `Endpoint::flags`: unbound sources may reach it within the anonymous per-prefix limits
/// (the bind listener).
pub const EP_ANON_ALLOWED: u8 = 1 << 1;
/// `Endpoint::flags`: only IPv4 destinations inside `v4_prefix/v4_prefix_len` are protected.
pub const EP_V4_PREFIX: u8 = 1 << 2;
/// `Endpoint::flags`: only IPv6 destinations inside `v6_prefix/v6_prefix_len` are protected.
pub const EP_V6_PREFIX: u8 = 1 << 3;

/// A protected endpoint, indexed by endpoint id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub flags: u8,
    /// Bit set of [`Class::bit`] allowed to reach it.
    pub allowed_classes: u8,
    pub v4_prefix_len: u8,
    pub v6_prefix_len: u8,
    /// Cost weight in Q8 (256 = 1.0): bytes to this endpoint count this many times.
    pub weight_q8: u16,
    pub _pad: u16,
    /// Roles that may reach it; an identity needs one of them. 0: any role.
    pub roles: u64,
    pub v4_prefix: [u8; 4],
    pub v6_prefix: [u8; 16],
    pub _pad2: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 40);

/// Whether `addr` falls inside `prefix/len` (a `len` beyond the address means all of it).
///
/// Written with a per-byte mask and no index computed from `len`, so the verifier sees only
/// constant offsets into the map value.
#[inline(always)]
pub fn prefix_contains<const N: usize>(prefix: &[u8; N], len: u8, addr: &[u8; 16]) -> bool {
    let len = len as usize;
    let mut i = 0;
    while i < N && i < 16 {
        let before = i * 8;
        let mask: u8 = if len >= before + 8 {
            0xff
        } else if len <= before {
            0
        } else {
            0xffu8 << (8 - (len - before))
        };
        if (prefix[i] ^ addr[i]) & mask != 0 {
            return false;
        }
        i += 1;
    }
    true
}

impl Endpoint {
    /// Whether a packet to `dst` (layout of `IpPacket::dst`) is covered by this endpoint.
    #[inline(always)]
    pub fn covers(&self, v6: bool, dst: &[u8; 16]) -> bool {
        if self.flags & EP_ACTIVE == 0 {
            return false;
        }
        if v6 {
            self.flags & EP_V6_PREFIX == 0
                || prefix_contains(&self.v6_prefix, self.v6_prefix_len, dst)
        } else {
            self.flags & EP_V4_PREFIX == 0
                || prefix_contains(&self.v4_prefix, self.v4_prefix_len, dst)
        }
    }

    /// Whether an identity of `class` with `roles` may reach this endpoint.
    #[inline(always)]
    pub fn admits(&self, class: u8, roles: u64) -> bool {
        let class_ok = class < 8 && self.allowed_classes & (1 << class) != 0;
        class_ok && (self.roles == 0 || self.roles & roles != 0)
    }
}

/// `Identity::flags`: the slot holds an identity.
pub const ID_ACTIVE: u8 = 1 << 0;
/// `Identity::flags`: quarantined: every packet to a protected endpoint is dropped.
pub const ID_QUARANTINED: u8 = 1 << 1;
/// `Identity::flags`: throttled: costs are multiplied by `throttle_q8`.
pub const ID_THROTTLED: u8 = 1 << 2;
/// `Identity::flags`: a quota window is spent: everything to protected endpoints is dropped
/// until the controller clears it when the window rolls.
pub const ID_QUOTA_EXHAUSTED: u8 = 1 << 3;
/// `Identity::flags`: charge this identity's budgets on the precise clock
/// (`bpf_ktime_get_ns`) instead of the coarse one (`bpf_ktime_get_coarse_ns`, one tick per
/// jiffy). The agent sets it for plans whose burst tolerance does not cover a tick (see
/// `limiter::needs_precise_clock`); both clocks are CLOCK_MONOTONIC, so a bucket's TAT means
/// the same on either and a plan moving between them needs no conversion (the coarse clock
/// only lags the precise one, by less than a tick).
pub const ID_PRECISE_CLOCK: u8 = 1 << 4;
/// `Identity::flags`: over a response cap of its plan (bytes sent back to it, counted by the
/// egress program; the controller sets and clears it). With `response_q8` 0 its packets to
/// protected endpoints are dropped; otherwise its costs are multiplied by `response_q8` and
/// what its budgets then refuse is counted as `response_cap`.
pub const ID_RESPONSE_CAPPED: u8 = 1 << 5;

/// Rate value meaning "no limit".
pub const UNLIMITED: u64 = u64::MAX;

/// A token-backed or static identity, indexed by identity id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub flags: u8,
    /// [`Class`] as u8.
    pub class: u8,
    /// Cost multiplier while throttled, Q8.
    pub throttle_q8: u16,
    /// Plan index (for metrics and quotas; the kernel does not read it).
    pub plan: u16,
    /// Cost multiplier while [`ID_RESPONSE_CAPPED`], Q8; 0 drops instead. Was padding before
    /// #16 (always 0), and is only read under the flag, which older builds never set.
    pub response_q8: u16,
    /// Roles this identity holds (bit set matched against `Endpoint::roles`).
    pub roles: u64,
    pub limits: Limits,
}

/// A plan's rates as the limiter uses them. `UNLIMITED` disables a budget; 0 admits nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Packets per second.
    pub pps: u64,
    /// Burst tolerance of the packet budget, ns (burst packets × 1e9 / pps).
    pub pkt_tau_ns: u64,
    /// Cost units (bytes × weight × pressure) per second.
    pub bps: u64,
    /// Burst tolerance of the byte budget, ns.
    pub byte_tau_ns: u64,
}

/// A plan's limits as an operator states them; `None` means unlimited. The agent's tables
/// and the decision cases both turn it into [`Limits`] here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    pub packets_per_s: Option<u64>,
    pub packet_burst: u64,
    pub bytes_per_s: Option<u64>,
    pub byte_burst: u64,
}

impl PlanLimits {
    /// A packet rate and burst, bytes unlimited (the shape most limiter cases use).
    pub const fn packets(per_s: u64, burst: u64) -> PlanLimits {
        PlanLimits {
            packets_per_s: Some(per_s),
            packet_burst: burst,
            bytes_per_s: None,
            byte_burst: 0,
        }
    }

    pub const UNLIMITED: PlanLimits = PlanLimits {
        packets_per_s: None,
        packet_burst: 0,
        bytes_per_s: None,
        byte_burst: 0,
    };

    /// The limiter's form: rates and burst tolerances in ns, computed with the same
    /// arithmetic the kernel uses, so that exactly `packet_burst` packets conform from idle.
    pub fn to_kernel(&self) -> Limits {
        let pps = self.packets_per_s.unwrap_or(UNLIMITED);
        let bps = self.bytes_per_s.unwrap_or(UNLIMITED);
        Limits {
            pps,
            pkt_tau_ns: crate::limiter::packet_tau_ns(pps, self.packet_burst),
            bps,
            byte_tau_ns: crate::limiter::byte_tau_ns(bps, self.byte_burst),
        }
    }
}

const _: () = assert!(core::mem::size_of::<Identity>() == 48);

/// A binding of an address or prefix to an identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    pub identity: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC ns after which the kernel ignores it; 0 never expires. Judged on the
    /// coarse clock (so a bound packet of a coarse plan reads one clock, and the cheap one):
    /// a binding lives up to one tick past this. Builds before #15 wrote CLOCK_BOOTTIME here;
    /// BOOTTIME is MONOTONIC plus the time the machine spent suspended (0 on a server that
    /// never suspends), so such a value reads at most that much late, and the agent rewrites
    /// any binding whose expiry differs by a second or more when it adopts the pins.
    pub expires_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Binding>() == 16);

impl Binding {
    #[inline(always)]
    pub fn live_at(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || now_ns < self.expires_ns
    }
}

/// Limiter state of one identity: the theoretical arrival times of its two GCRA budgets.
/// Shared by all CPUs and updated with compare-and-swap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub pkt_tat: u64,
    pub byte_tat: u64,
}

/// Key of the IPv6 anonymous-prefix map: prefix length (64, 56, 48) and the masked prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AnonKey6 {
    pub prefix_len: u32,
    pub _pad: u32,
    pub prefix: [u8; 8],
}

/// `Settings::flags`: charge the anonymous allowance on the precise clock (as
/// [`ID_PRECISE_CLOCK`] does for an identity).
pub const SET_ANON_PRECISE_CLOCK: u8 = 1 << 0;

/// `Settings::flags`: the limiter's TATs in these maps are CLOCK_MONOTONIC. Written by agents
/// from #15 on, which moved the program from CLOCK_BOOTTIME; an agent adopting pins without
/// it moves their TATs back by the time the machine spent suspended, once
/// (`kernel_clock::settle_settings` in the agent). The program never reads it.
pub const SET_MONOTONIC_TATS: u8 = 1 << 1;

/// Global settings the agent writes in the single-slot `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Pressure multiplier on every cost, Q8 (256 = 1.0); the controller raises it as GPUs
    /// saturate. 0 is read as 1.0 so that an unset map does not admit everything.
    pub pressure_q8: u16,
    /// `SET_*` bits. Was padding before #15 (always 0): pins of an older build read as "no
    /// flags", which is what that build meant.
    pub flags: u8,
    pub _pad: [u8; 5],
    /// Limits of each anonymous prefix (IPv4 /24, IPv6 /64, /56, /48), packets only.
    pub anon_pps: u64,
    pub anon_tau_ns: u64,
    /// Minimum ns between two drop events from one CPU (sampling); 0: no events.
    pub drop_event_interval_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Settings>() == 32);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pressure_q8: Q8_ONE,
            flags: 0,
            _pad: [0; 5],
            anon_pps: 0,
            anon_tau_ns: 0,
            drop_event_interval_ns: 0,
        }
    }
}

/// Per-identity counters (per CPU in the kernel): what the controller's quotas and anomaly
/// detection read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityCounters {
    pub passed: crate::Counter,
    pub dropped: crate::Counter,
    /// Cost units of passed packets (bytes x weight x multipliers), for cost quotas.
    pub cost: u64,
    /// TCP SYNs without ACK (new flows), passed or dropped.
    pub syn: u64,
    /// Frames under [`SMALL_FRAME`] bytes, passed or dropped.
    pub small: u64,
}

const _: () = assert!(core::mem::size_of::<IdentityCounters>() == 56);

impl IdentityCounters {
    /// Sums per-CPU slots (or any other set of readings); wraps like the kernel's counters.
    pub fn sum<'a>(slots: impl IntoIterator<Item = &'a IdentityCounters>) -> IdentityCounters {
        slots
            .into_iter()
            .fold(IdentityCounters::default(), |mut acc, c| {
                acc.accumulate(c);
                acc
            })
    }

    /// What was counted since `earlier` (a reading of the same identity).
    pub fn delta(&self, earlier: &IdentityCounters) -> IdentityCounters {
        IdentityCounters {
            passed: self.passed.delta(&earlier.passed),
            dropped: self.dropped.delta(&earlier.dropped),
            cost: self.cost.wrapping_sub(earlier.cost),
            syn: self.syn.wrapping_sub(earlier.syn),
            small: self.small.wrapping_sub(earlier.small),
        }
    }

    /// What happened since `earlier` was read from the same identity's slot. A slot that was
    /// cleared in between (the identity lost its slot and got a fresh one) counts from zero
    /// again: any counter below its earlier value means exactly that, and everything now in
    /// the counters is new. Without this check the wrapping difference would read as ~2^64
    /// packets and bytes, and spend a whole quota at once.
    pub fn since(&self, earlier: &IdentityCounters) -> IdentityCounters {
        let reset = self.passed.packets < earlier.passed.packets
            || self.passed.bytes < earlier.passed.bytes
            || self.dropped.packets < earlier.dropped.packets
            || self.dropped.bytes < earlier.dropped.bytes
            || self.cost < earlier.cost
            || self.syn < earlier.syn
            || self.small < earlier.small;
        if reset { *self } else { self.delta(earlier) }
    }

    /// Adds `other` in (a delta into a window's total).
    pub fn accumulate(&mut self, other: &IdentityCounters) {
        self.passed.accumulate(&other.passed);
        self.dropped.accumulate(&other.dropped);
        self.cost = self.cost.wrapping_add(other.cost);
        self.syn = self.syn.wrapping_add(other.syn);
        self.small = self.small.wrapping_add(other.small);
    }

    /// Packets passed and dropped.
    pub fn packets(&self) -> u64 {
        self.passed.packets.wrapping_add(self.dropped.packets)
    }
}

/// Frames below this size count as small (floods of tiny packets are an anomaly signal).
pub const SMALL_FRAME: u64 = 128;

/// A sampled drop, sent to the agent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub reason: u32,
    pub identity: u32,
    pub endpoint: u16,
    pub family: u8,
    pub proto: u8,
    pub dport: u16,
    pub _pad: u16,
    pub src: [u8; 16],
    pub bytes: u32,
    pub _pad2: u32,
    /// CLOCK_MONOTONIC_COARSE (jiffies resolution) when the event was sampled.
    pub time_ns: u64,
}

const _: () = assert!(core::mem::size_of::<DropEvent>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), Copy, no padding that is not an explicit field (sizes asserted
    // above), every bit pattern valid.
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Identity {}
    unsafe impl aya::Pod for super::Binding {}
    unsafe impl aya::Pod for super::Bucket {}
    unsafe impl aya::Pod for super::AnonKey6 {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::IdentityCounters {}
    unsafe impl aya::Pod for super::DropEvent {}
}
