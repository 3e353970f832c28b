//! The enforcement table: one world with five endpoints and twenty-one identities, and the
//! packets sent into it.

use core::net::IpAddr;
use std::{format, vec, vec::Vec};

use super::{
    BindingDef, Case, EndpointDef, Expiry, IdentityDef, PlanLimits, Slot, Step, Table, World,
};
use crate::{
    Reason::*,
    packet::PacketBuilder,
    parse::{IPPROTO_TCP, IPPROTO_UDP},
    policy::{Class, ID_QUARANTINED, ID_QUOTA_EXHAUSTED, ID_RESPONSE_CAPPED, ID_THROTTLED, Q8_ONE},
};

/// The server every case sends to: 198.19.0.1 and 2001:db8:ff::1.
pub const SERVER4: [u8; 4] = [198, 19, 0, 1];
pub const SERVER6: [u8; 16] = v6(0xff, 1);

/// 198.18.<third>.<last>
pub const fn v4(third: u8, last: u8) -> [u8; 4] {
    [198, 18, third, last]
}

/// 2001:db8:<a>::<b>
pub const fn v6(a: u8, b: u8) -> [u8; 16] {
    [0x20, 0x01, 0x0d, 0xb8, 0, a, 0, 0, 0, 0, 0, 0, 0, 0, 0, b]
}

/// The endpoints of the enforcement world.
pub mod ep {
    /// TCP 8000-8001, internal/partner/customer with role 1.
    pub const INFER: u32 = 1;
    /// TCP 9000, internal only.
    pub const ADMIN: u32 = 2;
    /// UDP 8001, weight 2.0.
    pub const GRPC: u32 = 3;
    /// TCP 8443, anonymous allowed.
    pub const BIND: u32 = 4;
    /// TCP 8500, only destinations in 198.19.0.0/16 and 2001:db8:ff::/48.
    pub const SCOPED: u32 = 5;
}

/// The identities of the enforcement world; each is bound at 198.18.1.<id> (and most at
/// 2001:db8:1::<id>).
pub mod id {
    pub const INTERNAL: u32 = 1;
    pub const CUSTOMER: u32 = 2;
    pub const QUARANTINED: u32 = 3;
    pub const PARTNER_NO_ROLE: u32 = 4;
    /// 1 pps, burst 3.
    pub const SLOW_PACKETS: u32 = 5;
    /// 1000 B/s, burst 1000.
    pub const SLOW_BYTES: u32 = 6;
    /// Bound by 198.18.2.0/24 and 2001:db8:2::/48.
    pub const CIDR: u32 = 7;
    /// Its bindings have expired.
    pub const EXPIRED: u32 = 8;
    /// 1000 B/s, burst 1000, sends to GRPC (weight 2).
    pub const WEIGHTED: u32 = 9;
    /// Same plan, sends to INFER.
    pub const UNWEIGHTED: u32 = 10;
    pub const PRESSURED: u32 = 11;
    pub const PRESSURED_FRESH: u32 = 12;
    /// Bound, but its identity slot is empty.
    pub const VACANT: u32 = 13;
    pub const THROTTLED: u32 = 14;
    /// Its minute, day or month quota is spent.
    pub const QUOTA: u32 = 15;
    /// A packet rate of 0.
    pub const ZERO_PPS: u32 = 16;
    /// A byte rate of 0.
    pub const ZERO_BPS: u32 = 17;
    /// Bound, its record without `ID_ACTIVE`.
    pub const INACTIVE: u32 = 18;
    /// 1000 B/s, burst 1000, on plan 1, which is held back 5x on INFER.
    pub const HELD: u32 = 19;
    /// Over a response cap whose plan drops (`response_q8` 0).
    pub const RESPONSE_DROP: u32 = 20;
    /// 1000 B/s, burst 1000, over a response cap whose plan throttles 4x.
    pub const RESPONSE_THROTTLE: u32 = 21;
}

use ep::*;
use id::*;

fn endpoints() -> Vec<EndpointDef> {
    let base = EndpointDef {
        id: INFER,
        proto: IPPROTO_TCP,
        ports: 8000..=8001,
        classes: vec![Class::Internal, Class::Partner, Class::Customer],
        roles: 1,
        weight_q8: Q8_ONE,
        anonymous: false,
        v4_prefix: None,
        v6_prefix: None,
    };
    let (ports, roles) = (9000..=9000, 0);
    let admin = EndpointDef {
        id: ADMIN,
        ports,
        roles,
        classes: vec![Class::Internal],
        ..base.clone()
    };
    let (proto, ports, weight_q8) = (IPPROTO_UDP, 8001..=8001, 2 * Q8_ONE);
    let grpc = EndpointDef {
        id: GRPC,
        proto,
        ports,
        weight_q8,
        ..base.clone()
    };
    let (ports, anonymous) = (8443..=8443, true);
    let bind = EndpointDef {
        id: BIND,
        ports,
        roles,
        anonymous,
        ..base.clone()
    };
    let (v4_prefix, v6_prefix) = (Some(([198, 19, 0, 0], 16)), Some((SERVER6, 48)));
    let ports = 8500..=8500;
    let scoped = EndpointDef {
        id: SCOPED,
        ports,
        v4_prefix,
        v6_prefix,
        ..base.clone()
    };
    vec![base, admin, grpc, bind, scoped]
}

fn identities() -> Vec<IdentityDef> {
    let roomy = PlanLimits {
        packets_per_s: Some(100_000),
        packet_burst: 1000,
        bytes_per_s: Some(100_000_000),
        byte_burst: 1_000_000,
    };
    let bytes_1k = PlanLimits {
        packets_per_s: None,
        packet_burst: 0,
        bytes_per_s: Some(1000),
        byte_burst: 1000,
    };
    let slow = PlanLimits {
        packets_per_s: Some(1),
        packet_burst: 3,
        ..PlanLimits::UNLIMITED
    };
    let zero_pps = PlanLimits {
        packets_per_s: Some(0),
        packet_burst: 10,
        ..PlanLimits::UNLIMITED
    };
    let zero_bps = PlanLimits {
        bytes_per_s: Some(0),
        byte_burst: 10,
        ..PlanLimits::UNLIMITED
    };
    use Class::{Customer as Cu, Internal as In, Partner as Pa};
    let on = Slot::Active(0);
    let rows = [
        (INTERNAL, In, PlanLimits::UNLIMITED, on),
        (CUSTOMER, Cu, roomy, on),
        (QUARANTINED, Cu, roomy, Slot::Active(ID_QUARANTINED)),
        (PARTNER_NO_ROLE, Pa, roomy, on),
        (SLOW_PACKETS, Cu, slow, on),
        (SLOW_BYTES, Cu, bytes_1k, on),
        (CIDR, Pa, roomy, on),
        (EXPIRED, Cu, roomy, on),
        (WEIGHTED, Cu, bytes_1k, on),
        (UNWEIGHTED, Cu, bytes_1k, on),
        (PRESSURED, Cu, bytes_1k, on),
        (PRESSURED_FRESH, Cu, bytes_1k, on),
        (VACANT, Cu, roomy, Slot::Vacant),
        (THROTTLED, Cu, bytes_1k, Slot::Active(ID_THROTTLED)),
        (QUOTA, Cu, roomy, Slot::Active(ID_QUOTA_EXHAUSTED)),
        (ZERO_PPS, Cu, zero_pps, on),
        (ZERO_BPS, Cu, zero_bps, on),
        (INACTIVE, Cu, roomy, Slot::Inactive),
        (HELD, Cu, bytes_1k, on),
        (RESPONSE_DROP, Cu, roomy, Slot::Active(ID_RESPONSE_CAPPED)),
        (
            RESPONSE_THROTTLE,
            Cu,
            bytes_1k,
            Slot::Active(ID_RESPONSE_CAPPED),
        ),
    ];
    rows.into_iter()
        .map(|(id, class, limits, slot)| IdentityDef {
            id,
            class,
            roles: if id == PARTNER_NO_ROLE { 2 } else { 1 },
            plan: if id == HELD { 1 } else { 0 },
            limits,
            // Only THROTTLED has the flag that makes this count.
            throttle_q8: 4 * Q8_ONE,
            response_q8: if id == RESPONSE_THROTTLE {
                4 * Q8_ONE
            } else {
                0
            },
            slot,
        })
        .collect()
}

fn bindings() -> Vec<BindingDef> {
    let b = |addr: IpAddr, len, identity, expiry| BindingDef {
        addr,
        len,
        identity,
        expiry,
    };
    let mut v = Vec::new();
    for id in [
        INTERNAL,
        CUSTOMER,
        QUARANTINED,
        PARTNER_NO_ROLE,
        SLOW_PACKETS,
    ] {
        v.push(b(v4(1, id as u8).into(), 32, id, Expiry::Never));
        v.push(b(v6(1, id as u8).into(), 128, id, Expiry::Future));
    }
    for id in [
        SLOW_BYTES,
        WEIGHTED,
        UNWEIGHTED,
        PRESSURED,
        PRESSURED_FRESH,
        VACANT,
        THROTTLED,
    ]
    .into_iter()
    .chain(QUOTA..=RESPONSE_THROTTLE)
    {
        v.push(b(v4(1, id as u8).into(), 32, id, Expiry::Future));
    }
    v.push(b(v4(1, EXPIRED as u8).into(), 32, EXPIRED, Expiry::Past));
    v.push(b(v6(1, EXPIRED as u8).into(), 128, EXPIRED, Expiry::Past));
    v.push(b(v4(2, 0).into(), 24, CIDR, Expiry::Never));
    v.push(b(v6(2, 0).into(), 48, CIDR, Expiry::Future));
    // A /32 inside the /24 names another identity; another /32 inside it has expired.
    v.push(b(v4(2, 9).into(), 32, CUSTOMER, Expiry::Never));
    v.push(b(v4(2, 10).into(), 32, CUSTOMER, Expiry::Past));
    v
}

/// TCP of `size` bytes (frame) from `src` to the server.
pub fn tcp4(src: [u8; 4], dport: u16, size: usize) -> Vec<u8> {
    let f = PacketBuilder::v4(src, SERVER4)
        .tcp(40000, dport)
        .payload(size.saturating_sub(54))
        .build();
    assert_eq!(f.len(), size.max(54));
    f
}

pub fn tcp6(src: [u8; 16], dport: u16) -> Vec<u8> {
    PacketBuilder::v6(src, SERVER6)
        .tcp(40000, dport)
        .payload(32)
        .build()
}

pub fn udp4(src: [u8; 4], dport: u16, size: usize) -> Vec<u8> {
    PacketBuilder::v4(src, SERVER4)
        .udp(40000, dport)
        .payload(size.saturating_sub(42))
        .build()
}

pub fn udp6(src: [u8; 16], dport: u16) -> Vec<u8> {
    PacketBuilder::v6(src, SERVER6)
        .udp(40000, dport)
        .payload(32)
        .build()
}

/// A fragment from `src` to the server: `offset` in 8-byte units, `more` fragments to come.
fn frag4(src: [u8; 4], offset: u16, more: bool) -> PacketBuilder {
    PacketBuilder::v4(src, SERVER4).fragment(offset, more)
}

fn frag6(src: [u8; 16], offset: u16, more: bool) -> PacketBuilder {
    PacketBuilder::v6(src, SERVER6).fragment(offset, more)
}

/// One row: `row!(desc, packet => reason, endpoint, identity)`, where identity is an id, 0
/// for the anonymous identity or `-` for nobody.
macro_rules! row {
    ($desc:expr, $packet:expr => $reason:expr, $ep:expr, -) => {
        Step::Expect(Case {
            desc: $desc.into(),
            packet: $packet,
            reason: $reason,
            endpoint: $ep,
            identity: None,
        })
    };
    ($desc:expr, $packet:expr => $reason:expr, $ep:expr, $id:expr) => {
        Step::Expect(Case {
            desc: $desc.into(),
            packet: $packet,
            reason: $reason,
            endpoint: $ep,
            identity: Some($id),
        })
    };
}

/// Bound, unbound, expired and quarantined sources, each over both families and protocols.
fn matrix() -> Vec<Step> {
    let sources = [
        ("bound", CUSTOMER as u8, Bound, CUSTOMER),
        ("unbound", 77, Unbound, 0),
        ("expired", EXPIRED as u8, Expired, 0),
        ("quarantined", QUARANTINED as u8, Quarantined, QUARANTINED),
    ];
    let mut rows = Vec::new();
    for (name, last, reason, id) in sources {
        let d = |what: &str| [name, what].join(" ");
        rows.extend([
            row!(d("v4 tcp"), tcp4(v4(1, last), 8000, 100) => reason, INFER, id),
            row!(d("v6 tcp"), tcp6(v6(1, last), 8001) => reason, INFER, id),
            row!(d("v4 udp"), udp4(v4(1, last), 8001, 100) => reason, GRPC, id),
            row!(d("v6 udp"), udp6(v6(1, last), 8001) => reason, GRPC, id),
        ]);
    }
    rows
}

#[rustfmt::skip]
fn isolation_and_scope() -> Vec<Step> {
    let (p, cu, i) = (PARTNER_NO_ROLE as u8, CUSTOMER as u8, INTERNAL as u8);
    let outside4 = PacketBuilder::v4(v4(9, 9), [198, 18, 0, 1]).tcp(1, 8500).build();
    let outside6 = PacketBuilder::v6(v6(9, 9), v6(0xfe, 1)).tcp(1, 8500).build();
    let icmp = PacketBuilder::v4(v4(9, 9), SERVER4).icmp(8, 0).build();
    vec![
        row!("partner without role v4", tcp4(v4(1, p), 8000, 80) => Isolation, INFER, PARTNER_NO_ROLE),
        row!("partner without role v6", tcp6(v6(1, p), 8000) => Isolation, INFER, PARTNER_NO_ROLE),
        row!("customer to admin v4", tcp4(v4(1, cu), 9000, 80) => Isolation, ADMIN, CUSTOMER),
        row!("customer to admin v6", tcp6(v6(1, cu), 9000) => Isolation, ADMIN, CUSTOMER),
        row!("internal to admin v4", tcp4(v4(1, i), 9000, 80) => Bound, ADMIN, INTERNAL),
        row!("internal to admin v6", tcp6(v6(1, i), 9000) => Bound, ADMIN, INTERNAL),
        row!("internal to inference", tcp4(v4(1, i), 8001, 1500) => Bound, INFER, INTERNAL),
        row!("bound to ssh v4", tcp4(v4(1, cu), 22, 80) => Unprotected, 0, -),
        row!("bound to ssh v6", tcp6(v6(1, cu), 22) => Unprotected, 0, -),
        row!("bound udp to a tcp endpoint's port", udp4(v4(1, cu), 8000, 80) => Unprotected, 0, -),
        row!("unbound to ssh", tcp4(v4(9, 9), 22, 80) => Unprotected, 0, -),
        row!("unbound udp dns", udp4(v4(9, 9), 53, 80) => Unprotected, 0, -),
        row!("unbound icmp to the server", icmp => Unprotected, 0, -),
        row!("unbound tcp 8000 over udp", udp4(v4(9, 9), 8000, 80) => Unprotected, 0, -),
        row!("scoped endpoint, destination inside", tcp4(v4(9, 9), 8500, 80) => Unbound, SCOPED, 0),
        row!("scoped endpoint, destination outside", outside4 => Unprotected, 0, -),
        row!("scoped endpoint v6 inside", tcp6(v6(9, 9), 8500) => Unbound, SCOPED, 0),
        row!("scoped endpoint v6 outside", outside6 => Unprotected, 0, -),
        row!("vacant identity slot", tcp4(v4(1, VACANT as u8), 8000, 80) => UnknownIdentity, INFER, VACANT),
        row!("inactive identity record", tcp4(v4(1, INACTIVE as u8), 8000, 80) => UnknownIdentity, INFER, INACTIVE),
    ]
}

#[rustfmt::skip]
fn budgets() -> Vec<Step> {
    let (sp, sb, w, u, t) = (SLOW_PACKETS as u8, SLOW_BYTES as u8, WEIGHTED as u8, UNWEIGHTED as u8, THROTTLED as u8);
    let mut rows = Vec::new();
    // 1 pps, burst 3: three pass, the rest are over, whichever family (one identity).
    for n in 1..=3 {
        rows.push(row!(format!("packet budget {n}/3"), tcp4(v4(1, sp), 8000, 60) => Bound, INFER, SLOW_PACKETS));
    }
    rows.extend([
        row!("over the packet rate v4", tcp4(v4(1, sp), 8000, 60) => PacketRate, INFER, SLOW_PACKETS),
        row!("over the packet rate v6", tcp6(v6(1, sp), 8000) => PacketRate, INFER, SLOW_PACKETS),
    ]);
    // 1000 B/s, burst 1000: three 300-byte frames fit, the fourth does not.
    for n in 1..=3 {
        rows.push(row!(format!("byte budget {n}/3"), tcp4(v4(1, sb), 8000, 300) => Bound, INFER, SLOW_BYTES));
    }
    rows.extend([
        row!("over the byte rate", tcp4(v4(1, sb), 8000, 300) => ByteRate, INFER, SLOW_BYTES),
        row!("over the byte rate, small frame", tcp4(v4(1, sb), 8000, 200) => ByteRate, INFER, SLOW_BYTES),
        // Weight 2.0: a 300-byte datagram costs 600, so the second one is over.
        row!("weighted 1/1", udp4(v4(1, w), 8001, 300) => Bound, GRPC, WEIGHTED),
        row!("weighted over", udp4(v4(1, w), 8001, 300) => ByteRate, GRPC, WEIGHTED),
    ]);
    // The same plan at weight 1.0 takes three.
    for n in 1..=3 {
        rows.push(row!(format!("unweighted {n}/3"), tcp4(v4(1, u), 8000, 300) => Bound, INFER, UNWEIGHTED));
    }
    rows.extend([
        row!("unweighted over", tcp4(v4(1, u), 8000, 300) => ByteRate, INFER, UNWEIGHTED),
        // Throttled x4: 300 bytes cost 1200, over a 1000 burst at once.
        row!("throttled", tcp4(v4(1, t), 8000, 300) => ByteRate, INFER, THROTTLED),
        row!("throttled, small frame fits", tcp4(v4(1, t), 8000, 200) => Bound, INFER, THROTTLED),
        // Pressure is 1.0 here: the pressured identity's first frame passes.
        row!("before pressure", tcp4(v4(1, PRESSURED as u8), 8000, 300) => Bound, INFER, PRESSURED),
        // Rates of zero admit nothing.
        row!("zero packet rate", tcp4(v4(1, ZERO_PPS as u8), 8000, 100) => PacketRate, INFER, ZERO_PPS),
        row!("zero byte rate", tcp4(v4(1, ZERO_BPS as u8), 8000, 100) => ByteRate, INFER, ZERO_BPS),
        // A spent quota drops after isolation and before the limiter.
        row!("quota exhausted", tcp4(v4(1, QUOTA as u8), 8000, 100) => QuotaExhausted, INFER, QUOTA),
        row!("quota exhausted, later fragment", frag4(v4(1, QUOTA as u8), 10, false).build() => QuotaExhausted, 0, QUOTA),
        row!("quota exhausted, no access anyway", tcp4(v4(1, QUOTA as u8), 9000, 100) => Isolation, ADMIN, QUOTA),
        // Plan 1 held back 5x on INFER: 100-byte frames cost 500, two fit in 1000.
        row!("held back 1/2", tcp4(v4(1, HELD as u8), 8000, 100) => Bound, INFER, HELD),
        row!("held back 2/2", tcp4(v4(1, HELD as u8), 8000, 100) => Bound, INFER, HELD),
        row!("held back over", tcp4(v4(1, HELD as u8), 8000, 100) => ByteRate, INFER, HELD),
    ]);
    rows.extend(response_caps());
    rows
}

/// Identities over a response cap: dropped (after isolation, before the limiter, later
/// fragments too), or throttled with the budgets' refusals counted as `response_cap`; an
/// identity on the same endpoint without the flag is untouched.
#[rustfmt::skip]
fn response_caps() -> Vec<Step> {
    let (d, t, cu) = (RESPONSE_DROP as u8, RESPONSE_THROTTLE as u8, CUSTOMER as u8);
    vec![
        row!("response cap, drop", tcp4(v4(1, d), 8000, 100) => ResponseCap, INFER, RESPONSE_DROP),
        row!("response cap, drop, udp", udp4(v4(1, d), 8001, 100) => ResponseCap, GRPC, RESPONSE_DROP),
        row!("response cap, drop, later fragment", frag4(v4(1, d), 10, false).build() => ResponseCap, 0, RESPONSE_DROP),
        row!("response cap, no access anyway", tcp4(v4(1, d), 9000, 100) => Isolation, ADMIN, RESPONSE_DROP),
        row!("response cap, same endpoint, another identity", tcp4(v4(1, cu), 8000, 100) => Bound, INFER, CUSTOMER),
        // Throttled 4x: 200 bytes cost 800 of the 1000 burst, the next 200 are over.
        row!("response cap, throttle 1/1", tcp4(v4(1, t), 8000, 200) => Bound, INFER, RESPONSE_THROTTLE),
        row!("response cap, throttle over", tcp4(v4(1, t), 8000, 200) => ResponseCap, INFER, RESPONSE_THROTTLE),
        row!("response cap, throttle over, later fragment", frag4(v4(1, t), 10, false).payload(100).build() => ResponseCap, 0, RESPONSE_THROTTLE),
    ]
}

#[rustfmt::skip]
fn under_pressure() -> Vec<Step> {
    let (p, f) = (PRESSURED as u8, PRESSURED_FRESH as u8);
    vec![
        // Pressure 4.0: 300 bytes now cost 1200 > 1000.
        row!("pressure 4x refuses", tcp4(v4(1, p), 8000, 300) => ByteRate, INFER, PRESSURED),
        // A fresh identity: 200 bytes cost 800, then 800 more is over.
        row!("pressure 4x, fresh 1/1", tcp4(v4(1, f), 8000, 200) => Bound, INFER, PRESSURED_FRESH),
        row!("pressure 4x, fresh over", tcp4(v4(1, f), 8000, 200) => ByteRate, INFER, PRESSURED_FRESH),
        // Unlimited plans stay unlimited.
        row!("pressure 4x, internal", tcp4(v4(1, INTERNAL as u8), 8000, 1500) => Bound, INFER, INTERNAL),
    ]
}

#[rustfmt::skip]
fn cidr_and_fragments() -> Vec<Step> {
    let (cu, q) = (CUSTOMER as u8, QUARANTINED as u8);
    let cidr6 = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1];
    vec![
        row!("cidr v4", tcp4(v4(2, 50), 8000, 80) => Bound, INFER, CIDR),
        row!("cidr v6", tcp6(cidr6, 8000) => Bound, INFER, CIDR),
        row!("exact beats cidr", tcp4(v4(2, 9), 8000, 80) => Bound, INFER, CUSTOMER),
        row!("expired exact falls back to cidr", tcp4(v4(2, 10), 8000, 80) => Bound, INFER, CIDR),
        row!("v4 first fragment, bound", frag4(v4(1, cu), 0, true).tcp(1, 8000).payload(64).build() => Bound, INFER, CUSTOMER),
        row!("v6 first fragment, bound", frag6(v6(1, cu), 0, true).udp(1, 8001).payload(64).build() => Bound, GRPC, CUSTOMER),
        row!("v4 first fragment, unbound", frag4(v4(9, 9), 0, true).tcp(1, 8000).build() => Unbound, INFER, 0),
        row!("v4 later fragment, bound: charged, no endpoint", frag4(v4(1, cu), 100, false).udp(1, 8000).payload(64).build() => NonFirstFragment, 0, CUSTOMER),
        row!("v6 later fragment, bound", frag6(v6(1, cu), 100, true).tcp(1, 8000).build() => NonFirstFragment, 0, CUSTOMER),
        row!("v4 later fragment, unbound", frag4(v4(9, 9), 8, false).build() => NonFirstFragment, 0, -),
        row!("v6 later fragment, unbound", frag6(v6(9, 9), 8, false).build() => NonFirstFragment, 0, -),
        row!("v4 later fragment, quarantined", frag4(v4(1, q), 8, false).build() => Quarantined, 0, QUARANTINED),
        row!("v6 later fragment, quarantined", frag6(v6(1, q), 8, false).build() => Quarantined, 0, QUARANTINED),
        // The bind listener: anonymous, 1 pps with a burst of 2 per /24.
        row!("anonymous 1/2", tcp4(v4(20, 1), 8443, 80) => Anonymous, BIND, 0),
        row!("anonymous 2/2, same /24", tcp4(v4(20, 2), 8443, 80) => Anonymous, BIND, 0),
        row!("anonymous over, same /24", tcp4(v4(20, 3), 8443, 80) => AnonymousRate, BIND, 0),
        row!("anonymous, another /24", tcp4(v4(21, 1), 8443, 80) => Anonymous, BIND, 0),
        row!("anonymous v6", tcp6(v6(30, 1), 8443) => Anonymous, BIND, 0),
        row!("bound to the bind listener", tcp4(v4(1, cu), 8443, 80) => Bound, BIND, CUSTOMER),
        row!("malformed stays a parser verdict", tcp4(v4(1, cu), 8000, 80)[..40].to_vec() => Truncated, 0, -),
    ]
}

/// Eight /64s (and /56s) of one /48, 2001:db8:40::/48: the /48's allowance (burst 2) caps
/// them all, however many /64s the sender spreads over.
fn anonymous_v6_48() -> Vec<Step> {
    (0..8u8)
        .map(|i| {
            let src = [
                0x20, 0x01, 0x0d, 0xb8, 0, 0x40, i, i, 0, 0, 0, 0, 0, 0, 0, 1,
            ];
            let reason = if i < 2 { Anonymous } else { AnonymousRate };
            let desc = format!("anonymous v6, /64 number {i} of one /48");
            row!(desc, tcp6(src, 8443) => reason, BIND, 0)
        })
        .collect()
}

/// Endpoints, bindings (exact, CIDR, expired), isolation, quarantine, packet and byte
/// budgets, cost weights, throttling, quotas, hold-back, pressure, anonymous prefixes and
/// fragments.
pub fn enforcement() -> Table {
    let world = World {
        endpoints: endpoints(),
        identities: identities(),
        bindings: bindings(),
        hold_backs: vec![(INFER, 1, 5 * Q8_ONE)],
        anon_pps: 1,
        anon_burst: 2,
    };
    let mut steps = matrix();
    steps.extend(isolation_and_scope());
    steps.extend(budgets());
    steps.push(Step::Pressure(4 * Q8_ONE));
    steps.extend(under_pressure());
    steps.push(Step::Pressure(Q8_ONE));
    steps.extend(cidr_and_fragments());
    steps.extend(anonymous_v6_48());
    Table {
        name: "enforcement",
        world,
        steps,
    }
}
