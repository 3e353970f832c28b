//! The verdict for an IP packet: which endpoint it targets, who sent it, whether that identity
//! may reach the endpoint and whether it is within budget. Written against [`Tables`], which
//! the XDP program implements with its maps and host tests with plain memory, so the whole
//! decision is tested on the host and the kernel fixtures test the binding to real maps.

use crate::{
    Reason,
    limiter::{self, Gcra},
    parse::{Family, Fragment, IpPacket},
    policy::{
        ANONYMOUS_IDENTITY, AnonKey6, Binding, Bucket, EP_ANON_ALLOWED, Endpoint, ID_ACTIVE,
        ID_PRECISE_CLOCK, ID_QUARANTINED, ID_QUOTA_EXHAUSTED, ID_RESPONSE_CAPPED, ID_THROTTLED,
        Identity, Q8_ONE, SET_ANON_PRECISE_CLOCK, Settings, port_slot,
    },
};

/// Compare-and-swap attempts per budget before the packet is refused as contended. The
/// verifier needs a bound; four is far more than two CPUs contending ever need.
pub const CAS_TRIES: usize = 4;

/// An anonymous prefix: IPv4 /24 (first three bytes, big-endian in a u32 with the last byte
/// zero) or an IPv6 /64, /56 or /48.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnonPrefix {
    V4([u8; 4]),
    V6(AnonKey6),
}

/// What the decision reads and writes. Pointers, not references: the kernel's map values are
/// shared with other CPUs and with userspace.
pub trait Tables {
    /// Endpoint id in the port table slot (see `policy::port_slot`); 0 if none.
    fn port_endpoint(&self, slot: u32) -> u32;
    fn endpoint(&self, id: u32) -> Option<*const Endpoint>;
    /// The /32 or /128 binding of `src`.
    fn exact_binding(&self, family: Family, src: &[u8; 16]) -> Option<*const Binding>;
    /// The longest-prefix CIDR binding covering `src`.
    fn cidr_binding(&self, family: Family, src: &[u8; 16]) -> Option<*const Binding>;
    fn identity(&self, id: u32) -> Option<*const Identity>;
    fn bucket(&self, id: u32) -> Option<*mut Bucket>;
    /// The TAT of an anonymous prefix, inserting a fresh one (TAT 0) when absent; `None`
    /// if it can be neither found nor inserted.
    fn anon_tat(&self, prefix: &AnonPrefix) -> Option<*mut u64>;
    fn settings(&self) -> Settings;
    /// The controller's Q8 hold-back multiplier for (endpoint, plan); 0 reads as 1.0.
    fn hold_back(&self, endpoint: u32, plan: u16) -> u16;
    /// CLOCK_MONOTONIC in ns, read precisely: the limiter's clock for identities flagged
    /// `ID_PRECISE_CLOCK` (and the anonymous allowance with `SET_ANON_PRECISE_CLOCK`).
    fn now_ns(&self) -> u64;
    /// CLOCK_MONOTONIC_COARSE in ns: the same clock as of the last tick (it lags `now_ns` by
    /// less than a tick, one jiffy) and cheaper to read. Binding expiry and every other
    /// budget use it.
    fn coarse_ns(&self) -> u64;
    /// Reads a u64 another CPU may be writing.
    ///
    /// # Safety
    /// `p` points into a live map value.
    unsafe fn load(&self, p: *const u64) -> u64;
    /// Atomically replaces `*p` with `new` if it still holds `old`.
    ///
    /// # Safety
    /// `p` points into a live map value, 8-byte aligned.
    unsafe fn cas(&self, p: *mut u64, old: u64, new: u64) -> bool;
}

/// The outcome: reason (hence verdict), the endpoint id for counters (0: none) and the
/// identity charged (`ANONYMOUS_IDENTITY` for unbound sources).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    pub endpoint: u32,
    pub identity: u32,
    /// Cost units charged to the identity's byte budget (0 when nothing was charged).
    pub cost: u64,
}

impl Decision {
    pub const fn new(reason: Reason, endpoint: u32, identity: u32) -> Self {
        Decision {
            reason,
            endpoint,
            identity,
            cost: 0,
        }
    }
}

/// The clocks, each read at most once per packet and only when needed: reading one costs more
/// than the parser on some machines (see BENCHMARKS.md), and an unbound source or a binding
/// that never expires needs no time at all until the limiter does. A bound packet of a coarse
/// plan reads only the coarse clock (expiry and limiter share it); a precise plan adds one
/// precise read for its budgets.
pub struct LazyNow {
    precise: Option<u64>,
    coarse: Option<u64>,
}

impl LazyNow {
    #[inline(always)]
    pub fn new() -> Self {
        LazyNow {
            precise: None,
            coarse: None,
        }
    }

    /// The coarse clock (`Tables::coarse_ns`).
    #[inline(always)]
    pub fn coarse<T: Tables>(&mut self, t: &T) -> u64 {
        *self.coarse.get_or_insert_with(|| t.coarse_ns())
    }

    /// The precise clock (`Tables::now_ns`).
    #[inline(always)]
    pub fn precise<T: Tables>(&mut self, t: &T) -> u64 {
        *self.precise.get_or_insert_with(|| t.now_ns())
    }

    /// The clock a budget runs on: the precise one if `precise`, else the coarse one.
    #[inline(always)]
    pub fn get<T: Tables>(&mut self, t: &T, precise: bool) -> u64 {
        if precise {
            self.precise(t)
        } else {
            self.coarse(t)
        }
    }
}

impl Default for LazyNow {
    fn default() -> Self {
        Self::new()
    }
}

#[inline(always)]
fn live<T: Tables>(t: &T, b: &Binding, now: &mut LazyNow) -> bool {
    // Expiry on the coarse clock: a binding lives at most one tick longer, and a bound packet
    // of a coarse plan then reads no other clock.
    b.expires_ns == 0 || b.live_at(now.coarse(t))
}

/// A binding lookup: exact first (it beats any CIDR), then the longest CIDR. An expired
/// binding is skipped; whether one was seen decides `expired` vs `unbound`.
pub(crate) enum Bound {
    Live(u32),
    Expired,
    None,
}

#[inline(always)]
pub(crate) fn find_binding<T: Tables>(
    t: &T,
    family: Family,
    src: &[u8; 16],
    now: &mut LazyNow,
) -> Bound {
    let mut expired = false;
    if let Some(b) = t.exact_binding(family, src) {
        // SAFETY: the pointer came from a map lookup and is valid for this program run.
        let b = unsafe { *b };
        if live(t, &b, now) {
            return Bound::Live(b.identity);
        }
        expired = true;
    }
    if let Some(b) = t.cidr_binding(family, src) {
        // SAFETY: as above.
        let b = unsafe { *b };
        if live(t, &b, now) {
            return Bound::Live(b.identity);
        }
        expired = true;
    }
    if expired { Bound::Expired } else { Bound::None }
}

/// One GCRA budget, updated with a bounded compare-and-swap loop.
#[inline(always)]
fn charge_one<T: Tables>(t: &T, p: *mut u64, now: u64, inc: u64, tau: u64) -> Charge {
    for _ in 0..CAS_TRIES {
        // SAFETY: `p` points into a bucket from the map, valid for this run, 8-byte aligned.
        let old = unsafe { t.load(p) };
        match limiter::gcra(old, now, inc, tau) {
            Gcra::Exceed => return Charge::Exceed,
            // SAFETY: as above.
            Gcra::Conform(new) => {
                if unsafe { t.cas(p, old, new) } {
                    return Charge::Ok;
                }
            }
        }
    }
    Charge::Contended
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Charge {
    Ok,
    Exceed,
    Contended,
}

/// Charges a packet to an identity's budgets; returns the refusing reason if any.
#[inline(always)]
fn charge_identity<T: Tables>(
    t: &T,
    id: u32,
    ident: &Identity,
    endpoint: u32,
    weight_q8: u16,
    frame_len: u64,
    now: u64,
) -> Result<u64, Reason> {
    let settings = t.settings();
    let throttle = if ident.flags & ID_THROTTLED != 0 {
        Some(ident.throttle_q8)
    } else {
        None
    };
    let mult = limiter::scale_q8(
        limiter::multiplier_q8(settings.pressure_q8, throttle),
        t.hold_back(endpoint, ident.plan),
    );
    // Over a response cap in throttle mode (the drop mode never gets here).
    let mult = if ident.flags & ID_RESPONSE_CAPPED != 0 {
        limiter::scale_q8(mult, ident.response_q8)
    } else {
        mult
    };
    let Some(pkt_inc) = limiter::packet_increment_ns(ident.limits.pps, mult) else {
        return Err(Reason::PacketRate);
    };
    let units = limiter::byte_units(frame_len, weight_q8, mult);
    let Some(byte_inc) = limiter::byte_increment_ns(ident.limits.bps, units) else {
        return Err(Reason::ByteRate);
    };
    let Some(bucket) = t.bucket(id) else {
        return Err(Reason::UnknownIdentity);
    };
    // SAFETY: `bucket` is a valid map value pointer; the fields are 8-byte aligned (repr(C)).
    let (pkt_tat, byte_tat) = unsafe { (&raw mut (*bucket).pkt_tat, &raw mut (*bucket).byte_tat) };
    // Check both before charging either, so a packet refused by its bytes does not spend a
    // packet token (apart from races, which the CAS loop then resolves).
    // SAFETY: valid pointers, as above.
    let (p_now, b_now) = unsafe { (t.load(pkt_tat), t.load(byte_tat)) };
    if limiter::gcra(p_now, now, pkt_inc, ident.limits.pkt_tau_ns) == Gcra::Exceed {
        return Err(Reason::PacketRate);
    }
    if limiter::gcra(b_now, now, byte_inc, ident.limits.byte_tau_ns) == Gcra::Exceed {
        return Err(Reason::ByteRate);
    }
    if pkt_inc != 0 {
        match charge_one(t, pkt_tat, now, pkt_inc, ident.limits.pkt_tau_ns) {
            Charge::Ok => {}
            Charge::Exceed => return Err(Reason::PacketRate),
            Charge::Contended => return Err(Reason::LimiterContended),
        }
    }
    if byte_inc != 0 {
        match charge_one(t, byte_tat, now, byte_inc, ident.limits.byte_tau_ns) {
            Charge::Ok => {}
            Charge::Exceed => return Err(Reason::ByteRate),
            Charge::Contended => return Err(Reason::LimiterContended),
        }
    }
    Ok(units)
}

/// Over a response cap whose plan says drop (`response_q8` 0).
#[inline(always)]
fn response_capped_drop(ident: &Identity) -> bool {
    ident.flags & ID_RESPONSE_CAPPED != 0 && ident.response_q8 == 0
}

/// What a budget's refusal is counted as: over a response cap in throttle mode, the refusal is
/// the cap's doing (its multiplier shrank the budget), so it is counted as `response_cap`;
/// contention and a missing bucket stay what they are.
#[inline(always)]
fn response_cap_reason(ident: &Identity, reason: Reason) -> Reason {
    let over_budget = matches!(reason, Reason::PacketRate | Reason::ByteRate);
    if over_budget && ident.flags & ID_RESPONSE_CAPPED != 0 {
        Reason::ResponseCap
    } else {
        reason
    }
}

/// The anonymous prefixes of a source: IPv4 /24; IPv6 /64, /56, /48 (all three must conform,
/// so a /48 cannot multiply its allowance by spreading over its /64s).
#[inline(always)]
pub fn anon_prefix(family: Family, src: &[u8; 16], level: usize) -> Option<AnonPrefix> {
    match family {
        Family::V4 => {
            if level == 0 {
                Some(AnonPrefix::V4([src[0], src[1], src[2], 0]))
            } else {
                None
            }
        }
        Family::V6 => {
            let (len, keep) = match level {
                0 => (64u32, 8usize),
                1 => (56, 7),
                2 => (48, 6),
                _ => return None,
            };
            let mut key = AnonKey6 {
                prefix_len: len,
                _pad: 0,
                prefix: [0; 8],
            };
            let mut i = 0;
            while i < keep {
                key.prefix[i] = src[i];
                i += 1;
            }
            Some(AnonPrefix::V6(key))
        }
    }
}

#[inline(always)]
fn charge_anonymous<T: Tables>(t: &T, family: Family, src: &[u8; 16], now: &mut LazyNow) -> bool {
    let s = t.settings();
    let now = now.get(t, s.flags & SET_ANON_PRECISE_CLOCK != 0);
    let Some(inc) =
        limiter::packet_increment_ns(s.anon_pps, limiter::multiplier_q8(s.pressure_q8, None))
    else {
        return false;
    };
    let mut level = 0;
    while level < 3 {
        let Some(prefix) = anon_prefix(family, src, level) else {
            break;
        };
        let Some(tat) = t.anon_tat(&prefix) else {
            return false;
        };
        if charge_one(t, tat, now, inc, s.anon_tau_ns) != Charge::Ok {
            return false;
        }
        level += 1;
    }
    true
}

/// Decides the fate of a parsed IP packet of `frame_len` bytes.
#[inline(always)]
pub fn decide<T: Tables>(t: &T, pkt: &IpPacket, frame_len: u64) -> Decision {
    if pkt.fragment == Fragment::Later {
        return decide_later_fragment(t, pkt, frame_len);
    }
    let Some(slot) = port_slot(pkt.proto, pkt.dport) else {
        return Decision::new(Reason::Unprotected, 0, ANONYMOUS_IDENTITY);
    };
    let ep_id = t.port_endpoint(slot);
    if ep_id == 0 {
        return Decision::new(Reason::Unprotected, 0, ANONYMOUS_IDENTITY);
    }
    let Some(ep) = t.endpoint(ep_id) else {
        return Decision::new(Reason::Unprotected, 0, ANONYMOUS_IDENTITY);
    };
    // SAFETY: a valid map value pointer for this run.
    let ep = unsafe { &*ep };
    if !ep.covers(pkt.family == Family::V6, &pkt.dst.bytes()) {
        return Decision::new(Reason::Unprotected, 0, ANONYMOUS_IDENTITY);
    }
    let mut now = LazyNow::new();
    let src = pkt.src.bytes();
    let id = match find_binding(t, pkt.family, &src, &mut now) {
        Bound::Live(id) => id,
        unbound => {
            // Roles mean nothing for a caller with no identity: the flag alone opens an endpoint.
            let anon_ok = ep.flags & EP_ANON_ALLOWED != 0;
            let reason = if anon_ok {
                if charge_anonymous(t, pkt.family, &src, &mut now) {
                    Reason::Anonymous
                } else {
                    Reason::AnonymousRate
                }
            } else if matches!(unbound, Bound::Expired) {
                Reason::Expired
            } else {
                Reason::Unbound
            };
            return Decision::new(reason, ep_id, ANONYMOUS_IDENTITY);
        }
    };
    let Some(ident) = t.identity(id) else {
        return Decision::new(Reason::UnknownIdentity, ep_id, ANONYMOUS_IDENTITY);
    };
    // SAFETY: a valid map value pointer for this run.
    let ident = unsafe { &*ident };
    if ident.flags & ID_ACTIVE == 0 {
        return Decision::new(Reason::UnknownIdentity, ep_id, id);
    }
    if ident.flags & ID_QUARANTINED != 0 {
        return Decision::new(Reason::Quarantined, ep_id, id);
    }
    if !ep.admits(ident.class, ident.roles) {
        return Decision::new(Reason::Isolation, ep_id, id);
    }
    if ident.flags & ID_QUOTA_EXHAUSTED != 0 {
        return Decision::new(Reason::QuotaExhausted, ep_id, id);
    }
    if response_capped_drop(ident) {
        return Decision::new(Reason::ResponseCap, ep_id, id);
    }
    let now = now.get(t, ident.flags & ID_PRECISE_CLOCK != 0);
    match charge_identity(t, id, ident, ep_id, ep.weight_q8, frame_len, now) {
        Err(reason) => Decision::new(response_cap_reason(ident, reason), ep_id, id),
        Ok(cost) => Decision {
            cost,
            ..Decision::new(Reason::Bound, ep_id, id)
        },
    }
}

/// A non-first fragment has no ports, so it matches no endpoint; it is still charged to a
/// bound source (weight 1.0) so that fragments are no way around a budget or a quarantine.
#[inline(always)]
fn decide_later_fragment<T: Tables>(t: &T, pkt: &IpPacket, frame_len: u64) -> Decision {
    let mut now = LazyNow::new();
    let Bound::Live(id) = find_binding(t, pkt.family, &pkt.src.bytes(), &mut now) else {
        return Decision::new(Reason::NonFirstFragment, 0, ANONYMOUS_IDENTITY);
    };
    let Some(ident) = t.identity(id) else {
        return Decision::new(Reason::NonFirstFragment, 0, ANONYMOUS_IDENTITY);
    };
    // SAFETY: a valid map value pointer for this run.
    let ident = unsafe { &*ident };
    if ident.flags & ID_ACTIVE == 0 {
        return Decision::new(Reason::NonFirstFragment, 0, ANONYMOUS_IDENTITY);
    }
    if ident.flags & ID_QUARANTINED != 0 {
        return Decision::new(Reason::Quarantined, 0, id);
    }
    if ident.flags & ID_QUOTA_EXHAUSTED != 0 {
        return Decision::new(Reason::QuotaExhausted, 0, id);
    }
    if response_capped_drop(ident) {
        return Decision::new(Reason::ResponseCap, 0, id);
    }
    let now = now.get(t, ident.flags & ID_PRECISE_CLOCK != 0);
    match charge_identity(t, id, ident, 0, Q8_ONE, frame_len, now) {
        Err(reason) => Decision::new(response_cap_reason(ident, reason), 0, id),
        Ok(cost) => Decision {
            cost,
            ..Decision::new(Reason::NonFirstFragment, 0, id)
        },
    }
}
