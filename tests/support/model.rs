//! A reference model of the verdict logic, for the differential test (`tests/differential.rs`).
//!
//! Written plainly from docs/verdicts.md's decision order, over the decision tables' own
//! [`World`] (not the kernel's maps, not `tollgate_common::decide`'s `Tables`): parse with
//! slices and early returns, then endpoint, sender, permission, budget. It shares no code with
//! `parse` or `decide` beyond the constants (EtherTypes, protocol numbers) and the world's
//! types. Budgets are left out on purpose: it answers for a world whose rates are either
//! unlimited or zero (see [`stateless`]), where no verdict depends on the packets before.

use std::net::IpAddr;

use tollgate_common::{
    Reason,
    decide_cases::{Expiry, Slot, World},
    parse::*,
    policy::{ID_QUARANTINED, ID_QUOTA_EXHAUSTED, ID_RESPONSE_CAPPED, PlanLimits},
};

/// What the model says becomes of a frame: its reason and the endpoint it is counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Judgement {
    pub reason: Reason,
    pub endpoint: u32,
}

/// The world with every nonzero rate unlimited (zero rates stay: they refuse every packet
/// whatever came before) and the anonymous allowance unlimited, so that no verdict depends on
/// earlier packets.
pub fn stateless(mut world: World) -> World {
    for id in &mut world.identities {
        let l = id.limits;
        id.limits = PlanLimits {
            packets_per_s: if l.packets_per_s == Some(0) {
                Some(0)
            } else {
                None
            },
            packet_burst: l.packet_burst,
            bytes_per_s: if l.bytes_per_s == Some(0) {
                Some(0)
            } else {
                None
            },
            byte_burst: l.byte_burst,
        };
    }
    world.anon_pps = u64::MAX;
    world
}

/// What the parser finds in a frame the model can decide on.
struct Ip {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    dport: u16,
    later_fragment: bool,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Step 1 of docs/verdicts.md. `Ok(None)`: not IP.
fn parse(f: &[u8]) -> Result<Option<Ip>, Reason> {
    if f.len() < 14 {
        return Err(Reason::Truncated);
    }
    let mut ethertype = be16(f, 12);
    let mut off = 14;
    let mut tags = 0;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tags == 2 {
            return Err(Reason::TooManyVlanTags);
        }
        if f.len() < off + 4 {
            return Err(Reason::Truncated);
        }
        ethertype = be16(f, off + 2);
        off += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => ipv4(f, off).map(Some),
        ETH_P_IPV6 => ipv6(f, off).map(Some),
        _ => Ok(None),
    }
}

fn ipv4(f: &[u8], off: usize) -> Result<Ip, Reason> {
    if f.len() < off + 20 {
        return Err(Reason::Truncated);
    }
    let h = &f[off..];
    if h[0] >> 4 != 4 {
        return Err(Reason::BadVersion);
    }
    let ihl = usize::from(h[0] & 15) * 4;
    let total = usize::from(be16(h, 2));
    if ihl < 20 || total < ihl {
        return Err(Reason::BadHeaderLength);
    }
    if off + total > f.len() {
        return Err(Reason::Truncated);
    }
    let mut src = [0; 16];
    let mut dst = [0; 16];
    src[..4].copy_from_slice(&h[12..16]);
    dst[..4].copy_from_slice(&h[16..20]);
    let mut ip = Ip {
        v6: false,
        src,
        dst,
        proto: h[9],
        dport: 0,
        later_fragment: be16(h, 6) & 0x1fff != 0,
    };
    if !ip.later_fragment {
        ip.dport = transport(&f[..off + total], off + ihl, ip.proto, IPPROTO_ICMP)?;
    }
    Ok(ip)
}

fn ipv6(f: &[u8], off: usize) -> Result<Ip, Reason> {
    if f.len() < off + 40 {
        return Err(Reason::Truncated);
    }
    let h = &f[off..];
    if h[0] >> 4 != 6 {
        return Err(Reason::BadVersion);
    }
    let payload = usize::from(be16(h, 4));
    // 0: a jumbogram; the frame is the datagram.
    let end = if payload == 0 {
        f.len()
    } else {
        off + 40 + payload
    };
    if end > f.len() {
        return Err(Reason::Truncated);
    }
    let mut ip = Ip {
        v6: true,
        src: h[8..24].try_into().unwrap(),
        dst: h[24..40].try_into().unwrap(),
        proto: h[6],
        dport: 0,
        later_fragment: false,
    };
    let mut at = off + 40;
    let mut seen = 0;
    loop {
        let is_ext = matches!(
            ip.proto,
            IPPROTO_HOPOPTS
                | IPPROTO_ROUTING
                | IPPROTO_DSTOPTS
                | IPPROTO_MH
                | IPPROTO_HIP
                | IPPROTO_SHIM6
                | IPPROTO_AH
                | IPPROTO_FRAGMENT
        );
        // A seventh extension header is too many as soon as the sixth one's next-header
        // field names it, whether or not the seventh fits in the frame (verdicts.md).
        if is_ext && seen == 6 {
            return Err(Reason::TooManyExtHeaders);
        }
        let header_len = match ip.proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH | IPPROTO_HIP
            | IPPROTO_SHIM6 => 8 * (usize::from(*f.get(at + 1).ok_or(Reason::Truncated)?) + 1),
            IPPROTO_AH => 4 * (usize::from(*f.get(at + 1).ok_or(Reason::Truncated)?) + 2),
            IPPROTO_FRAGMENT => {
                if f.len() < at + 8 {
                    return Err(Reason::Truncated);
                }
                8
            }
            _ => break,
        };
        seen += 1;
        let kind = ip.proto;
        ip.proto = f[at];
        if kind == IPPROTO_FRAGMENT && be16(f, at + 2) >> 3 != 0 {
            // A later fragment: no transport header to look for.
            ip.later_fragment = true;
            return Ok(ip);
        }
        at += header_len;
        if at > end {
            return Err(Reason::Truncated);
        }
    }
    ip.dport = transport(&f[..end], at, ip.proto, IPPROTO_ICMPV6)?;
    Ok(ip)
}

/// The transport header must fit inside the datagram `d`; returns the destination port (0
/// for protocols without ports).
fn transport(d: &[u8], at: usize, proto: u8, icmp: u8) -> Result<u16, Reason> {
    let need = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        p if p == icmp => 4,
        _ => return Ok(0),
    };
    if d.len() < at + need {
        return Err(Reason::Truncated);
    }
    Ok(if need == 4 { 0 } else { be16(d, at + 2) })
}

fn in_prefix(prefix: &[u8], len: u8, addr: &[u8]) -> bool {
    (0..usize::from(len).min(prefix.len() * 8))
        .all(|bit| (prefix[bit / 8] ^ addr[bit / 8]) & (0x80 >> (bit % 8)) == 0)
}

enum Sender {
    Identity(u32),
    Expired,
    Nobody,
}

/// Step 3: the exact binding, then the longest CIDR binding.
fn sender(world: &World, ip: &Ip) -> Sender {
    let full = if ip.v6 { 128 } else { 32 };
    let mine = |addr: &IpAddr, len: u8| match addr {
        IpAddr::V4(a) => !ip.v6 && in_prefix(&a.octets(), len, &ip.src),
        IpAddr::V6(a) => ip.v6 && in_prefix(&a.octets(), len, &ip.src),
    };
    let exact = world
        .bindings
        .iter()
        .find(|b| b.len == full && mine(&b.addr, b.len));
    let cidr = world
        .bindings
        .iter()
        .filter(|b| b.len < full && mine(&b.addr, b.len))
        .max_by_key(|b| b.len);
    let mut seen = false;
    for b in exact.into_iter().chain(cidr) {
        if b.expiry != Expiry::Past {
            return Sender::Identity(b.identity);
        }
        seen = true;
    }
    if seen {
        Sender::Expired
    } else {
        Sender::Nobody
    }
}

/// The model's verdict on one frame.
pub fn judge(world: &World, frame: &[u8]) -> Judgement {
    let j = |reason, endpoint| Judgement { reason, endpoint };
    let ip = match parse(frame) {
        Err(reason) => return j(reason, 0),
        Ok(None) => return j(Reason::NotIp, 0),
        Ok(Some(ip)) => ip,
    };
    // Step 6: later fragments are charged to a bound sender only.
    if ip.later_fragment {
        let Sender::Identity(id) = sender(world, &ip) else {
            return j(Reason::NonFirstFragment, 0);
        };
        let Some(ident) = world.identities.iter().find(|i| i.id == id) else {
            return j(Reason::NonFirstFragment, 0);
        };
        let Slot::Active(flags) = ident.slot else {
            return j(Reason::NonFirstFragment, 0);
        };
        if flags & ID_QUARANTINED != 0 {
            return j(Reason::Quarantined, 0);
        }
        if flags & ID_QUOTA_EXHAUSTED != 0 {
            return j(Reason::QuotaExhausted, 0);
        }
        if let Some(r) = response_cap(flags, ident.response_q8, &ident.limits) {
            return j(r, 0);
        }
        return j(budget(&ident.limits).unwrap_or(Reason::NonFirstFragment), 0);
    }
    // Step 2: the endpoint.
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return j(Reason::Unprotected, 0);
    }
    let Some(ep) = world
        .endpoints
        .iter()
        .find(|e| e.proto == ip.proto && e.ports.contains(&ip.dport))
    else {
        return j(Reason::Unprotected, 0);
    };
    let covered = if ip.v6 {
        ep.v6_prefix
            .is_none_or(|(p, len)| in_prefix(&p, len, &ip.dst))
    } else {
        ep.v4_prefix
            .is_none_or(|(p, len)| in_prefix(&p, len, &ip.dst))
    };
    if !covered {
        return j(Reason::Unprotected, 0);
    }
    // Step 3: who sent it.
    let id = match sender(world, &ip) {
        Sender::Identity(id) => id,
        _ if ep.anonymous => return j(Reason::Anonymous, ep.id),
        Sender::Expired => return j(Reason::Expired, ep.id),
        Sender::Nobody => return j(Reason::Unbound, ep.id),
    };
    // Step 4: may it.
    let ident = world.identities.iter().find(|i| i.id == id);
    let Some((ident, flags)) = ident.and_then(|i| match i.slot {
        Slot::Active(flags) => Some((i, flags)),
        _ => None,
    }) else {
        return j(Reason::UnknownIdentity, ep.id);
    };
    if flags & ID_QUARANTINED != 0 {
        return j(Reason::Quarantined, ep.id);
    }
    let class_ok = ep.classes.contains(&ident.class);
    let role_ok = ep.roles == 0 || ep.roles & ident.roles != 0;
    if !(class_ok && role_ok) {
        return j(Reason::Isolation, ep.id);
    }
    if flags & ID_QUOTA_EXHAUSTED != 0 {
        return j(Reason::QuotaExhausted, ep.id);
    }
    if let Some(r) = response_cap(flags, ident.response_q8, &ident.limits) {
        return j(r, ep.id);
    }
    // Step 5: budgets (zero or unlimited in a stateless world).
    j(budget(&ident.limits).unwrap_or(Reason::Bound), ep.id)
}

/// Over a response cap: dropped when the plan drops (`response_q8` 0); when it throttles, a
/// budget's refusal is the cap's (`response_cap`), and passing is passing.
fn response_cap(flags: u8, response_q8: u16, l: &PlanLimits) -> Option<Reason> {
    if flags & ID_RESPONSE_CAPPED == 0 {
        return None;
    }
    if response_q8 == 0 {
        return Some(Reason::ResponseCap);
    }
    budget(l).map(|_| Reason::ResponseCap)
}

/// A zero rate refuses everything; anything else is unlimited here.
fn budget(l: &PlanLimits) -> Option<Reason> {
    if l.packets_per_s == Some(0) {
        Some(Reason::PacketRate)
    } else if l.bytes_per_s == Some(0) {
        Some(Reason::ByteRate)
    } else {
        None
    }
}
