//! Enforcement verdicts through BPF_PROG_TEST_RUN: endpoints, bindings (exact, CIDR, expired),
//! isolation, quarantine, packet and byte budgets, cost weights, pressure, anonymous prefixes
//! and fragments, each case checking its verdict, its (reason, endpoint) counter and the
//! charged identity's counters.

use std::net::IpAddr;

use tollgate::tables::{EndpointSpec, PlanLimits, Proto, boot_ns, identity_record, to_q8};
use tollgate_common::{
    Reason::{self, *},
    limiter,
    packet::PacketBuilder,
    policy::{Class, ID_QUARANTINED, ID_THROTTLED, Q8_ONE, Settings},
};
use tollgate_tests::fixture::{Case, Harness};

const SERVER4: [u8; 4] = [198, 19, 0, 1];
const SERVER6: [u8; 16] = v6(0xff, 1);

const fn v4(third: u8, last: u8) -> [u8; 4] {
    [198, 18, third, last]
}

/// 2001:db8:<a>::<b>
const fn v6(a: u8, b: u8) -> [u8; 16] {
    [0x20, 0x01, 0x0d, 0xb8, 0, a, 0, 0, 0, 0, 0, 0, 0, 0, 0, b]
}

// Endpoints.
const INFER: u32 = 1; // TCP 8000-8001, internal/partner/customer with role 1
const ADMIN: u32 = 2; // TCP 9000, internal only
const GRPC: u32 = 3; // UDP 8001, weight 2.0
const BIND: u32 = 4; // TCP 8443, anonymous allowed
const SCOPED: u32 = 5; // TCP 8500, only destinations in 198.19.0.0/16 and 2001:db8:ff::/48

// Identities.
const INTERNAL: u32 = 1;
const CUSTOMER: u32 = 2;
const QUARANTINED: u32 = 3;
const PARTNER_NO_ROLE: u32 = 4;
const SLOW_PACKETS: u32 = 5; // 1 pps, burst 3
const SLOW_BYTES: u32 = 6; // 1000 B/s, burst 1000
const CIDR: u32 = 7;
const EXPIRED: u32 = 8;
const WEIGHTED: u32 = 9; // 1000 B/s, burst 1000, sends to GRPC (weight 2)
const UNWEIGHTED: u32 = 10; // same plan, sends to INFER
const PRESSURED: u32 = 11;
const PRESSURED_FRESH: u32 = 12;
const VACANT: u32 = 13; // bound, but its identity slot is empty
const THROTTLED: u32 = 14;

fn endpoints() -> Vec<(u32, EndpointSpec)> {
    let base = EndpointSpec {
        proto: Proto::Tcp,
        ports: 8000..=8001,
        v4_prefix: None,
        v6_prefix: None,
        weight: 1.0,
        allowed_classes: vec![Class::Internal, Class::Partner, Class::Customer],
        roles: 1,
        anonymous: false,
    };
    vec![
        (INFER, base.clone()),
        (
            ADMIN,
            EndpointSpec {
                ports: 9000..=9000,
                allowed_classes: vec![Class::Internal],
                roles: 0,
                ..base.clone()
            },
        ),
        (
            GRPC,
            EndpointSpec {
                proto: Proto::Udp,
                ports: 8001..=8001,
                weight: 2.0,
                ..base.clone()
            },
        ),
        (
            BIND,
            EndpointSpec {
                ports: 8443..=8443,
                roles: 0,
                anonymous: true,
                ..base.clone()
            },
        ),
        (
            SCOPED,
            EndpointSpec {
                ports: 8500..=8500,
                v4_prefix: Some(([198, 19, 0, 0].into(), 16)),
                v6_prefix: Some((SERVER6.into(), 48)),
                ..base
            },
        ),
    ]
}

fn setup(h: &mut Harness) {
    for (id, spec) in endpoints() {
        h.tables.set_endpoint(id, &spec).expect("endpoint");
    }
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
    let idents = [
        (INTERNAL, Class::Internal, PlanLimits::UNLIMITED, 0),
        (CUSTOMER, Class::Customer, roomy, 0),
        (QUARANTINED, Class::Customer, roomy, ID_QUARANTINED),
        (PARTNER_NO_ROLE, Class::Partner, roomy, 0),
        (
            SLOW_PACKETS,
            Class::Customer,
            PlanLimits {
                packets_per_s: Some(1),
                packet_burst: 3,
                bytes_per_s: None,
                byte_burst: 0,
            },
            0,
        ),
        (SLOW_BYTES, Class::Customer, bytes_1k, 0),
        (CIDR, Class::Partner, roomy, 0),
        (EXPIRED, Class::Customer, roomy, 0),
        (WEIGHTED, Class::Customer, bytes_1k, 0),
        (UNWEIGHTED, Class::Customer, bytes_1k, 0),
        (PRESSURED, Class::Customer, bytes_1k, 0),
        (PRESSURED_FRESH, Class::Customer, bytes_1k, 0),
        (THROTTLED, Class::Customer, bytes_1k, ID_THROTTLED),
    ];
    for (id, class, limits, flags) in idents {
        let roles = if id == PARTNER_NO_ROLE { 2 } else { 1 };
        let mut rec = identity_record(class, roles, 0, &limits);
        rec.flags |= flags;
        rec.throttle_q8 = 4 * Q8_ONE;
        h.tables.set_identity(id, &rec).expect("identity");
    }
    let bind4 = |h: &mut Harness, a: [u8; 4], len: u8, id: u32, exp: u64| {
        h.tables
            .bind(IpAddr::from(a), len, id, exp)
            .expect("bind v4")
    };
    let bind6 = |h: &mut Harness, a: [u8; 16], len: u8, id: u32, exp: u64| {
        h.tables
            .bind(IpAddr::from(a), len, id, exp)
            .expect("bind v6")
    };
    // Expired: one nanosecond after boot.
    let past = 1;
    let future = boot_ns() + 3600 * limiter::NS_PER_S;
    for id in [
        INTERNAL,
        CUSTOMER,
        QUARANTINED,
        PARTNER_NO_ROLE,
        SLOW_PACKETS,
    ] {
        bind4(h, v4(1, id as u8), 32, id, 0);
        bind6(h, v6(1, id as u8), 128, id, future);
    }
    for id in [
        SLOW_BYTES,
        WEIGHTED,
        UNWEIGHTED,
        PRESSURED,
        PRESSURED_FRESH,
        VACANT,
        THROTTLED,
    ] {
        bind4(h, v4(1, id as u8), 32, id, future);
    }
    bind4(h, v4(1, EXPIRED as u8), 32, EXPIRED, past);
    bind6(h, v6(1, EXPIRED as u8), 128, EXPIRED, past);
    bind4(h, v4(2, 0), 24, CIDR, 0);
    bind6(h, v6(2, 0), 48, CIDR, future);
    // A /32 inside the /24 names another identity; another /32 inside it has expired.
    bind4(h, v4(2, 9), 32, CUSTOMER, 0);
    bind4(h, v4(2, 10), 32, CUSTOMER, past);
    let settings = Settings {
        anon_pps: 1,
        anon_tau_ns: limiter::packet_tau_ns(1, 2),
        ..Settings::default()
    };
    h.tables.set_settings(&settings).expect("settings");
    h.watched = (0..=THROTTLED).collect();
}

/// TCP of `size` bytes (frame) from `src` to the server.
fn tcp4(src: [u8; 4], dport: u16, size: usize) -> Vec<u8> {
    let f = PacketBuilder::v4(src, SERVER4)
        .tcp(40000, dport)
        .payload(size.saturating_sub(54))
        .build();
    assert_eq!(f.len(), size.max(54));
    f
}

fn tcp6(src: [u8; 16], dport: u16) -> Vec<u8> {
    PacketBuilder::v6(src, SERVER6)
        .tcp(40000, dport)
        .payload(32)
        .build()
}

fn udp4(src: [u8; 4], dport: u16, size: usize) -> Vec<u8> {
    PacketBuilder::v4(src, SERVER4)
        .udp(40000, dport)
        .payload(size.saturating_sub(42))
        .build()
}

fn udp6(src: [u8; 16], dport: u16) -> Vec<u8> {
    PacketBuilder::v6(src, SERVER6)
        .udp(40000, dport)
        .payload(32)
        .build()
}

fn c(desc: &str, p: Vec<u8>, r: Reason, ep: u32, id: Option<u32>) -> Case {
    Case::expect(desc, p, r, ep, id)
}

fn matrix() -> Vec<Case> {
    let mut cases = Vec::new();
    let sources: [(&str, u8, Reason, Option<u32>); 4] = [
        ("bound", CUSTOMER as u8, Bound, Some(CUSTOMER)),
        ("unbound", 77, Unbound, Some(0)),
        ("expired", EXPIRED as u8, Expired, Some(0)),
        (
            "quarantined",
            QUARANTINED as u8,
            Quarantined,
            Some(QUARANTINED),
        ),
    ];
    for (name, last, reason, id) in sources {
        cases.push(c(
            &format!("{name} v4 tcp"),
            tcp4(v4(1, last), 8000, 100),
            reason,
            INFER,
            id,
        ));
        cases.push(c(
            &format!("{name} v6 tcp"),
            tcp6(v6(1, last), 8001),
            reason,
            INFER,
            id,
        ));
        cases.push(c(
            &format!("{name} v4 udp"),
            udp4(v4(1, last), 8001, 100),
            reason,
            GRPC,
            id,
        ));
        cases.push(c(
            &format!("{name} v6 udp"),
            udp6(v6(1, last), 8001),
            reason,
            GRPC,
            id,
        ));
    }
    cases
}

fn isolation_and_scope() -> Vec<Case> {
    let p = PARTNER_NO_ROLE as u8;
    let cu = CUSTOMER as u8;
    let i = INTERNAL as u8;
    vec![
        c(
            "partner without role v4",
            tcp4(v4(1, p), 8000, 80),
            Isolation,
            INFER,
            Some(PARTNER_NO_ROLE),
        ),
        c(
            "partner without role v6",
            tcp6(v6(1, p), 8000),
            Isolation,
            INFER,
            Some(PARTNER_NO_ROLE),
        ),
        c(
            "customer to admin v4",
            tcp4(v4(1, cu), 9000, 80),
            Isolation,
            ADMIN,
            Some(CUSTOMER),
        ),
        c(
            "customer to admin v6",
            tcp6(v6(1, cu), 9000),
            Isolation,
            ADMIN,
            Some(CUSTOMER),
        ),
        c(
            "internal to admin v4",
            tcp4(v4(1, i), 9000, 80),
            Bound,
            ADMIN,
            Some(INTERNAL),
        ),
        c(
            "internal to admin v6",
            tcp6(v6(1, i), 9000),
            Bound,
            ADMIN,
            Some(INTERNAL),
        ),
        c(
            "internal to inference",
            tcp4(v4(1, i), 8001, 1500),
            Bound,
            INFER,
            Some(INTERNAL),
        ),
        c(
            "bound to ssh v4",
            tcp4(v4(1, cu), 22, 80),
            Unprotected,
            0,
            None,
        ),
        c("bound to ssh v6", tcp6(v6(1, cu), 22), Unprotected, 0, None),
        c(
            "unbound to ssh",
            tcp4(v4(9, 9), 22, 80),
            Unprotected,
            0,
            None,
        ),
        c(
            "unbound udp dns",
            udp4(v4(9, 9), 53, 80),
            Unprotected,
            0,
            None,
        ),
        c(
            "unbound icmp to the server",
            PacketBuilder::v4(v4(9, 9), SERVER4).icmp(8, 0).build(),
            Unprotected,
            0,
            None,
        ),
        c(
            "unbound tcp 8000 over udp",
            udp4(v4(9, 9), 8000, 80),
            Unprotected,
            0,
            None,
        ),
        c(
            "scoped endpoint, destination inside",
            tcp4(v4(9, 9), 8500, 80),
            Unbound,
            SCOPED,
            Some(0),
        ),
        c(
            "scoped endpoint, destination outside",
            PacketBuilder::v4(v4(9, 9), [198, 18, 0, 1])
                .tcp(1, 8500)
                .build(),
            Unprotected,
            0,
            None,
        ),
        c(
            "scoped endpoint v6 inside",
            tcp6(v6(9, 9), 8500),
            Unbound,
            SCOPED,
            Some(0),
        ),
        c(
            "scoped endpoint v6 outside",
            PacketBuilder::v6(v6(9, 9), v6(0xfe, 1))
                .tcp(1, 8500)
                .build(),
            Unprotected,
            0,
            None,
        ),
        c(
            "vacant identity slot",
            tcp4(v4(1, VACANT as u8), 8000, 80),
            UnknownIdentity,
            INFER,
            Some(VACANT),
        ),
    ]
}

fn budgets() -> Vec<Case> {
    let sp = SLOW_PACKETS as u8;
    let sb = SLOW_BYTES as u8;
    let w = WEIGHTED as u8;
    let u = UNWEIGHTED as u8;
    let t = THROTTLED as u8;
    let mut cases = Vec::new();
    // 1 pps, burst 3: three pass, the rest are over, whichever family (one identity).
    for n in 1..=3 {
        cases.push(c(
            &format!("packet budget {n}/3"),
            tcp4(v4(1, sp), 8000, 60),
            Bound,
            INFER,
            Some(SLOW_PACKETS),
        ));
    }
    cases.push(c(
        "over the packet rate v4",
        tcp4(v4(1, sp), 8000, 60),
        PacketRate,
        INFER,
        Some(SLOW_PACKETS),
    ));
    cases.push(c(
        "over the packet rate v6",
        tcp6(v6(1, sp), 8000),
        PacketRate,
        INFER,
        Some(SLOW_PACKETS),
    ));
    // 1000 B/s, burst 1000: three 300-byte frames fit, the fourth does not.
    for n in 1..=3 {
        cases.push(c(
            &format!("byte budget {n}/3"),
            tcp4(v4(1, sb), 8000, 300),
            Bound,
            INFER,
            Some(SLOW_BYTES),
        ));
    }
    cases.push(c(
        "over the byte rate",
        tcp4(v4(1, sb), 8000, 300),
        ByteRate,
        INFER,
        Some(SLOW_BYTES),
    ));
    cases.push(c(
        "over the byte rate, small frame",
        tcp4(v4(1, sb), 8000, 200),
        ByteRate,
        INFER,
        Some(SLOW_BYTES),
    ));
    // Weight 2.0: a 300-byte datagram costs 600, so the second one is over.
    cases.push(c(
        "weighted 1/1",
        udp4(v4(1, w), 8001, 300),
        Bound,
        GRPC,
        Some(WEIGHTED),
    ));
    cases.push(c(
        "weighted over",
        udp4(v4(1, w), 8001, 300),
        ByteRate,
        GRPC,
        Some(WEIGHTED),
    ));
    // The same plan at weight 1.0 takes three.
    for n in 1..=3 {
        cases.push(c(
            &format!("unweighted {n}/3"),
            tcp4(v4(1, u), 8000, 300),
            Bound,
            INFER,
            Some(UNWEIGHTED),
        ));
    }
    cases.push(c(
        "unweighted over",
        tcp4(v4(1, u), 8000, 300),
        ByteRate,
        INFER,
        Some(UNWEIGHTED),
    ));
    // Throttled x4: 300 bytes cost 1200, over a 1000 burst at once.
    cases.push(c(
        "throttled",
        tcp4(v4(1, t), 8000, 300),
        ByteRate,
        INFER,
        Some(THROTTLED),
    ));
    cases.push(c(
        "throttled, small frame fits",
        tcp4(v4(1, t), 8000, 200),
        Bound,
        INFER,
        Some(THROTTLED),
    ));
    // Pressure is 1.0 here: the pressured identity's first frame passes.
    cases.push(c(
        "before pressure",
        tcp4(v4(1, PRESSURED as u8), 8000, 300),
        Bound,
        INFER,
        Some(PRESSURED),
    ));
    cases
}

fn under_pressure() -> Vec<Case> {
    let p = PRESSURED as u8;
    let f = PRESSURED_FRESH as u8;
    vec![
        // Pressure 4.0: 300 bytes now cost 1200 > 1000.
        c(
            "pressure 4x refuses",
            tcp4(v4(1, p), 8000, 300),
            ByteRate,
            INFER,
            Some(PRESSURED),
        ),
        // A fresh identity: 200 bytes cost 800, then 800 more is over.
        c(
            "pressure 4x, fresh 1/1",
            tcp4(v4(1, f), 8000, 200),
            Bound,
            INFER,
            Some(PRESSURED_FRESH),
        ),
        c(
            "pressure 4x, fresh over",
            tcp4(v4(1, f), 8000, 200),
            ByteRate,
            INFER,
            Some(PRESSURED_FRESH),
        ),
        // Unlimited plans stay unlimited.
        c(
            "pressure 4x, internal",
            tcp4(v4(1, INTERNAL as u8), 8000, 1500),
            Bound,
            INFER,
            Some(INTERNAL),
        ),
    ]
}

fn cidr_and_fragments() -> Vec<Case> {
    let cu = CUSTOMER as u8;
    let q = QUARANTINED as u8;
    vec![
        c(
            "cidr v4",
            tcp4(v4(2, 50), 8000, 80),
            Bound,
            INFER,
            Some(CIDR),
        ),
        c(
            "cidr v6",
            tcp6(
                [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1],
                8000,
            ),
            Bound,
            INFER,
            Some(CIDR),
        ),
        c(
            "exact beats cidr",
            tcp4(v4(2, 9), 8000, 80),
            Bound,
            INFER,
            Some(CUSTOMER),
        ),
        c(
            "expired exact falls back to cidr",
            tcp4(v4(2, 10), 8000, 80),
            Bound,
            INFER,
            Some(CIDR),
        ),
        c(
            "v4 first fragment, bound",
            PacketBuilder::v4(v4(1, cu), SERVER4)
                .fragment(0, true)
                .tcp(1, 8000)
                .payload(64)
                .build(),
            Bound,
            INFER,
            Some(CUSTOMER),
        ),
        c(
            "v6 first fragment, bound",
            PacketBuilder::v6(v6(1, cu), SERVER6)
                .fragment(0, true)
                .udp(1, 8001)
                .payload(64)
                .build(),
            Bound,
            GRPC,
            Some(CUSTOMER),
        ),
        c(
            "v4 first fragment, unbound",
            PacketBuilder::v4(v4(9, 9), SERVER4)
                .fragment(0, true)
                .tcp(1, 8000)
                .build(),
            Unbound,
            INFER,
            Some(0),
        ),
        c(
            "v4 later fragment, bound: charged, no endpoint",
            PacketBuilder::v4(v4(1, cu), SERVER4)
                .fragment(100, false)
                .udp(1, 8000)
                .payload(64)
                .build(),
            NonFirstFragment,
            0,
            Some(CUSTOMER),
        ),
        c(
            "v6 later fragment, bound",
            PacketBuilder::v6(v6(1, cu), SERVER6)
                .fragment(100, true)
                .tcp(1, 8000)
                .build(),
            NonFirstFragment,
            0,
            Some(CUSTOMER),
        ),
        c(
            "v4 later fragment, unbound",
            PacketBuilder::v4(v4(9, 9), SERVER4)
                .fragment(8, false)
                .build(),
            NonFirstFragment,
            0,
            None,
        ),
        c(
            "v6 later fragment, unbound",
            PacketBuilder::v6(v6(9, 9), SERVER6)
                .fragment(8, false)
                .build(),
            NonFirstFragment,
            0,
            None,
        ),
        c(
            "v4 later fragment, quarantined",
            PacketBuilder::v4(v4(1, q), SERVER4)
                .fragment(8, false)
                .build(),
            Quarantined,
            0,
            Some(QUARANTINED),
        ),
        c(
            "v6 later fragment, quarantined",
            PacketBuilder::v6(v6(1, q), SERVER6)
                .fragment(8, false)
                .build(),
            Quarantined,
            0,
            Some(QUARANTINED),
        ),
        // The bind listener: anonymous, 1 pps with a burst of 2 per /24.
        c(
            "anonymous 1/2",
            tcp4(v4(20, 1), 8443, 80),
            Anonymous,
            BIND,
            Some(0),
        ),
        c(
            "anonymous 2/2, same /24",
            tcp4(v4(20, 2), 8443, 80),
            Anonymous,
            BIND,
            Some(0),
        ),
        c(
            "anonymous over, same /24",
            tcp4(v4(20, 3), 8443, 80),
            AnonymousRate,
            BIND,
            Some(0),
        ),
        c(
            "anonymous, another /24",
            tcp4(v4(21, 1), 8443, 80),
            Anonymous,
            BIND,
            Some(0),
        ),
        c(
            "anonymous v6",
            tcp6(v6(30, 1), 8443),
            Anonymous,
            BIND,
            Some(0),
        ),
        c(
            "bound to the bind listener",
            tcp4(v4(1, cu), 8443, 80),
            Bound,
            BIND,
            Some(CUSTOMER),
        ),
        c(
            "malformed stays a parser verdict",
            tcp4(v4(1, cu), 8000, 80)[..40].to_vec(),
            Truncated,
            0,
            None,
        ),
    ]
}

#[test]
fn enforcement_verdicts_and_counters() {
    let mut h = Harness::new();
    setup(&mut h);
    let before = matrix()
        .into_iter()
        .chain(isolation_and_scope())
        .chain(budgets())
        .collect::<Vec<_>>();
    h.run_table(&before);
    let mut s = h.tables.settings().expect("settings");
    s.pressure_q8 = to_q8(4.0);
    h.tables.set_settings(&s).expect("settings");
    let pressured = under_pressure();
    h.run_table(&pressured);
    s.pressure_q8 = Q8_ONE;
    h.tables.set_settings(&s).expect("settings");
    let rest = cidr_and_fragments();
    h.run_table(&rest);
    let total = before.len() + pressured.len() + rest.len();
    assert!(total >= 60, "only {total} cases");
}

#[test]
fn a_full_binding_map_refuses_and_keeps_what_it_has() {
    // Fill the IPv4 CIDR trie (the smallest binding map) and check that one more is refused
    // with a clear error while the first binding still works.
    let mut h = Harness::new();
    setup(&mut h);
    let cap = tollgate_common::policy::MAX_CIDR_BINDINGS;
    let mut added = 1; // the /24 from setup
    let mut refused = None;
    for i in 0..cap + 1 {
        let a = std::net::Ipv4Addr::from(0x0a00_0000u32 + (i << 8));
        match h.tables.bind(a.into(), 24, CUSTOMER, 0) {
            Ok(()) => added += 1,
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let msg = refused.expect("the map never filled");
    assert_eq!(added, cap, "refused before the map was full: {msg}");
    assert!(
        msg.contains("full") && msg.contains("never evicted"),
        "{msg}"
    );
    h.watched = vec![CIDR];
    h.run_table(&[c(
        "cidr still bound",
        tcp4(v4(2, 77), 8000, 80),
        Bound,
        INFER,
        Some(CIDR),
    )]);
}

/// The verifier's work per program, recorded so that a change that bloats the program shows
/// up here (cilium's habit). The ceiling leaves room to grow; the current figure is in
/// BENCHMARKS.md.
#[test]
fn verifier_instruction_budget() {
    tollgate_tests::require_root();
    let mut ebpf = tollgate::loader::load().expect("loading the program");
    for (name, ceiling) in [
        (tollgate_common::program_names::XDP, 150_000),
        (tollgate_common::program_names::NOOP, 10),
    ] {
        let info = tollgate::loader::xdp_program(&mut ebpf, name)
            .expect("program")
            .info()
            .expect("program info");
        let processed = info
            .verified_instruction_count()
            .expect("the kernel reports verified instructions (5.16+)");
        eprintln!("{name}: verifier processed {processed} instructions");
        assert!(
            processed > 0 && processed <= ceiling,
            "{name}: {processed} > {ceiling}"
        );
    }
}

/// Drops are sampled into the ring buffer: at most one event per CPU per interval, none when
/// the interval is 0, and each event says who was dropped where and why.
#[test]
fn drop_events_are_sampled() {
    let mut h = Harness::new();
    setup(&mut h);
    let mut rb = aya::maps::RingBuf::try_from(
        h.ebpf
            .take_map(tollgate_common::map_names::DROP_EVENTS)
            .expect("drop event map"),
    )
    .expect("ring buffer");
    let drain = |rb: &mut aya::maps::RingBuf<aya::maps::MapData>| {
        let mut events = Vec::new();
        while let Some(item) = rb.next() {
            assert_eq!(
                item.len(),
                std::mem::size_of::<tollgate_common::policy::DropEvent>()
            );
            // SAFETY: the size matches and DropEvent is plain old data.
            events.push(unsafe {
                std::ptr::read_unaligned(item.as_ptr() as *const tollgate_common::policy::DropEvent)
            });
        }
        events
    };
    let stranger = tcp4(v4(9, 9), 8000, 100);
    // Interval 0 (the default): no events at all.
    for _ in 0..5 {
        h.run(&stranger);
    }
    assert!(drain(&mut rb).is_empty(), "events sent with sampling off");
    // One per CPU per hour: five drops give one event per CPU that ran them.
    let mut s = h.tables.settings().expect("settings");
    s.drop_event_interval_ns = 3600 * limiter::NS_PER_S;
    h.tables.set_settings(&s).expect("settings");
    for _ in 0..5 {
        h.run(&stranger);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let events = drain(&mut rb);
    assert!(
        !events.is_empty() && events.len() <= cpus,
        "{} events",
        events.len()
    );
    let e = events[0];
    assert_eq!(e.reason, Reason::Unbound as u32);
    assert_eq!(
        (e.endpoint, e.identity, e.dport, e.proto),
        (INFER as u16, 0, 8000, 6)
    );
    assert_eq!(&e.src[..4], &v4(9, 9));
    assert_eq!(e.bytes, 100);
    // Passes never produce events.
    for _ in 0..5 {
        h.run(&tcp4(v4(1, CUSTOMER as u8), 8000, 100));
    }
    assert!(drain(&mut rb).is_empty());
}
