//! Host tests of the decision, over tables in plain memory: the shared case table
//! (`decide_cases.rs`, which the kernel fixtures run too), then what only the host can check
//! (the clock, CAS contention, limiter state, arithmetic swept over many configurations).

use core::cell::{Cell, RefCell, UnsafeCell};
use std::{boxed::Box, collections::HashMap, format, string::String, vec::Vec};

use crate::{
    Reason,
    decide::{AnonPrefix, Decision, Tables, decide},
    decide_cases::{self, Step, World},
    limiter,
    packet::PacketBuilder,
    parse::{Family, Frame, IpPacket, parse},
    policy::*,
};

const C4: [u8; 4] = [198, 18, 1, 10];
const S4: [u8; 4] = [198, 19, 0, 1];
const EP: u32 = 1;
const ID: u32 = 7;

/// Anonymous TATs by (prefix length, prefix), boxed so pointers survive rehashing.
type AnonTable = HashMap<(u32, [u8; 8]), Box<UnsafeCell<u64>>>;

#[derive(Default)]
struct Fake {
    ports: HashMap<u32, u32>,
    endpoints: HashMap<u32, Box<Endpoint>>,
    exact: HashMap<(u8, [u8; 16]), Box<Binding>>,
    cidr: Vec<(Family, [u8; 16], u8, Box<Binding>)>,
    identities: HashMap<u32, Box<Identity>>,
    buckets: HashMap<u32, Box<UnsafeCell<Bucket>>>,
    anon: RefCell<AnonTable>,
    settings: Settings,
    /// The precise clock.
    now: Cell<u64>,
    clock_reads: Cell<u32>,
    /// The coarse clock; `None` reads as `now` (most cases need one time only).
    coarse: Cell<Option<u64>>,
    coarse_reads: Cell<u32>,
    fail_cas: bool,
    hold_back: HashMap<(u32, u16), u16>,
}

fn addr4(a: [u8; 4]) -> [u8; 16] {
    let mut x = [0; 16];
    x[..4].copy_from_slice(&a);
    x
}

impl Tables for Fake {
    fn port_endpoint(&self, slot: u32) -> u32 {
        self.ports.get(&slot).copied().unwrap_or(0)
    }
    fn endpoint(&self, id: u32) -> Option<*const Endpoint> {
        self.endpoints.get(&id).map(|b| &**b as *const _)
    }
    fn exact_binding(&self, family: Family, src: &[u8; 16]) -> Option<*const Binding> {
        self.exact
            .get(&(family as u8, *src))
            .map(|b| &**b as *const _)
    }
    fn cidr_binding(&self, family: Family, src: &[u8; 16]) -> Option<*const Binding> {
        self.cidr
            .iter()
            .filter(|(f, p, len, _)| *f == family && prefix_contains(p, *len, src))
            .max_by_key(|(_, _, len, _)| *len)
            .map(|(_, _, _, b)| &**b as *const _)
    }
    fn identity(&self, id: u32) -> Option<*const Identity> {
        self.identities.get(&id).map(|b| &**b as *const _)
    }
    fn bucket(&self, id: u32) -> Option<*mut Bucket> {
        self.buckets.get(&id).map(|b| b.get())
    }
    fn anon_tat(&self, prefix: &AnonPrefix) -> Option<*mut u64> {
        let key = match prefix {
            AnonPrefix::V4(p) => (24, [p[0], p[1], p[2], 0, 0, 0, 0, 0]),
            AnonPrefix::V6(k) => (k.prefix_len, k.prefix),
        };
        let mut anon = self.anon.borrow_mut();
        Some(
            anon.entry(key)
                .or_insert_with(|| Box::new(UnsafeCell::new(0)))
                .get(),
        )
    }
    fn settings(&self) -> Settings {
        self.settings
    }
    fn hold_back(&self, endpoint: u32, plan: u16) -> u16 {
        self.hold_back.get(&(endpoint, plan)).copied().unwrap_or(0)
    }
    fn now_ns(&self) -> u64 {
        self.clock_reads.set(self.clock_reads.get() + 1);
        self.now.get()
    }
    fn coarse_ns(&self) -> u64 {
        self.coarse_reads.set(self.coarse_reads.get() + 1);
        self.coarse.get().unwrap_or(self.now.get())
    }
    unsafe fn load(&self, p: *const u64) -> u64 {
        unsafe { *p }
    }
    unsafe fn cas(&self, p: *mut u64, old: u64, new: u64) -> bool {
        if self.fail_cas {
            return false;
        }
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

fn customer(pps: u64, burst: u64, bps: u64, bburst: u64) -> Identity {
    Identity {
        flags: ID_ACTIVE,
        class: Class::Customer as u8,
        throttle_q8: Q8_ONE,
        plan: 0,
        response_q8: 0,
        roles: 1,
        limits: Limits {
            pps,
            pkt_tau_ns: limiter::packet_tau_ns(pps, burst),
            bps,
            byte_tau_ns: limiter::byte_tau_ns(bps, bburst),
        },
    }
}

fn endpoint() -> Endpoint {
    Endpoint {
        flags: EP_ACTIVE,
        allowed_classes: Class::Internal.bit() | Class::Customer.bit(),
        weight_q8: Q8_ONE,
        roles: 1,
        ..Default::default()
    }
}

/// Endpoint 1 on TCP 8000; identity 7 (customer, 10 pps burst 5, unlimited bytes) bound to C4.
fn lab() -> Fake {
    let mut f = Fake {
        now: Cell::new(1_000 * limiter::NS_PER_S),
        ..Default::default()
    };
    f.ports.insert(port_slot(6, 8000).unwrap(), EP);
    f.endpoints.insert(EP, Box::new(endpoint()));
    f.identities
        .insert(ID, Box::new(customer(10, 5, UNLIMITED, 0)));
    f.buckets.insert(ID, Box::default());
    f.exact.insert(
        (4, addr4(C4)),
        Box::new(Binding {
            identity: ID,
            ..Default::default()
        }),
    );
    f
}

fn pkt(frame: &[u8]) -> IpPacket {
    match parse(frame) {
        Ok(Frame::Ip(p)) => p,
        other => panic!("{other:?}"),
    }
}

fn run(t: &Fake, frame: &[u8]) -> Decision {
    decide(t, &pkt(frame), frame.len() as u64)
}

fn tcp(src: [u8; 4], dport: u16) -> Vec<u8> {
    PacketBuilder::v4(src, S4)
        .tcp(40000, dport)
        .payload(46)
        .build()
}

/// Builds the host tables of a case world, as the agent installs the kernel's: ports then
/// endpoint records, identity records (a vacant slot reads as zeroes, as the kernel's array
/// does) with a bucket each, bindings against the fake clock, settings, hold-backs.
fn install(w: &World) -> Fake {
    let mut f = Fake {
        now: Cell::new(1_000 * limiter::NS_PER_S),
        settings: w.settings(),
        ..Default::default()
    };
    for ep in &w.endpoints {
        for port in ep.ports.clone() {
            f.ports.insert(port_slot(ep.proto, port).unwrap(), ep.id);
        }
        f.endpoints.insert(ep.id, Box::new(ep.record()));
    }
    for id in &w.identities {
        let rec = id.record().unwrap_or_default();
        f.identities.insert(id.id, Box::new(rec));
        f.buckets.insert(id.id, Box::default());
    }
    for b in &w.bindings {
        let binding = Box::new(Binding {
            identity: b.identity,
            _pad: 0,
            expires_ns: b.expiry.ns(f.now.get()),
        });
        let (family, addr, full) = match b.addr {
            core::net::IpAddr::V4(a) => (Family::V4, addr4(a.octets()), 32),
            core::net::IpAddr::V6(a) => (Family::V6, a.octets(), 128),
        };
        if b.len == full {
            f.exact.insert((family as u8, addr), binding);
        } else {
            f.cidr.push((family, addr, b.len, binding));
        }
    }
    for &(endpoint, plan, q8) in &w.hold_backs {
        f.hold_back.insert((endpoint, plan), q8);
    }
    f
}

/// The shared table through `decide`: each row's reason, endpoint and charged identity (a
/// row that charges nobody is decided for the anonymous identity). Parser verdicts come from
/// `parse`, as in the program. Every mismatch is collected, so one run shows all of them.
#[test]
fn the_shared_decision_table() {
    for table in decide_cases::tables() {
        let mut t = install(&table.world);
        let mut failures: Vec<String> = Vec::new();
        for step in &table.steps {
            let case = match step {
                Step::Pressure(q8) => {
                    t.settings.pressure_q8 = *q8;
                    continue;
                }
                Step::Expect(case) => case,
            };
            let got = match parse(&case.packet[..]) {
                Err(reason) => (reason, 0, ANONYMOUS_IDENTITY),
                Ok(Frame::NotIp(_)) => (crate::Reason::NotIp, 0, ANONYMOUS_IDENTITY),
                Ok(Frame::Ip(p)) => {
                    let d = decide(&t, &p, case.packet.len() as u64);
                    (d.reason, d.endpoint, d.identity)
                }
            };
            let want = (
                case.reason,
                case.endpoint,
                case.identity.unwrap_or(ANONYMOUS_IDENTITY),
            );
            if got != want {
                failures.push(format!(
                    "{}: {}: (reason, endpoint, identity) {got:?}, expected {want:?}",
                    table.name, case.desc
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n{}",
            failures.len(),
            table.cases().count(),
            failures.join("\n")
        );
        assert!(table.cases().count() >= 60, "{}: too few cases", table.name);
    }
}

#[test]
fn bound_source_passes_and_is_charged() {
    let t = lab();
    let d = run(&t, &tcp(C4, 8000));
    assert_eq!(
        d,
        Decision {
            reason: Reason::Bound,
            endpoint: EP,
            identity: ID,
            // 100-byte frame at weight 1.0, no pressure.
            cost: 100,
        }
    );
    assert_ne!(unsafe { (*t.buckets[&ID].get()).pkt_tat }, 0);
}

#[test]
fn unbound_and_expired_are_dropped() {
    let mut t = lab();
    assert_eq!(
        run(&t, &tcp([198, 18, 1, 11], 8000)).reason,
        Reason::Unbound
    );
    t.exact.get_mut(&(4, addr4(C4))).unwrap().expires_ns = t.now.get();
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Expired);
    t.exact.get_mut(&(4, addr4(C4))).unwrap().expires_ns = t.now.get() + 1;
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Bound);
}

#[test]
fn inactive_identity_slot_is_refused() {
    let mut t = lab();
    t.identities.get_mut(&ID).unwrap().flags = 0;
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::UnknownIdentity);
    t.identities.remove(&ID);
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::UnknownIdentity);
}

#[test]
fn packet_rate_burst_then_drop_then_refill() {
    let t = lab();
    let f = tcp(C4, 8000);
    let reasons: Vec<_> = (0..7).map(|_| run(&t, &f).reason).collect();
    assert_eq!(&reasons[..5], &[Reason::Bound; 5]);
    assert_eq!(&reasons[5..], &[Reason::PacketRate; 2]);
    t.now.set(t.now.get() + limiter::NS_PER_S / 10);
    assert_eq!(run(&t, &f).reason, Reason::Bound);
    assert_eq!(run(&t, &f).reason, Reason::PacketRate);
}

#[test]
fn byte_rate_weight_and_pressure() {
    // 1000 units/s with a 1000-unit burst; frames of 100 bytes.
    let frame = PacketBuilder::v4(C4, S4).tcp(1, 8000).payload(46).build();
    assert_eq!(frame.len(), 100);
    let count = |weight: u16, pressure: u16| {
        let mut t = lab();
        t.identities
            .insert(ID, Box::new(customer(UNLIMITED, 0, 1000, 1000)));
        t.endpoints.get_mut(&EP).unwrap().weight_q8 = weight;
        t.settings.pressure_q8 = pressure;
        (0..50)
            .take_while(|_| run(&t, &frame).reason == Reason::Bound)
            .count()
    };
    assert_eq!(count(256, 256), 10);
    assert_eq!(count(512, 256), 5, "weight 2.0 halves the burst");
    assert_eq!(
        count(256, 1024),
        2,
        "pressure 4.0 quarters it (2.5 rounds down)"
    );
    assert_eq!(count(128, 256), 20, "weight 0.5 doubles it");
    let mut t = lab();
    t.identities
        .insert(ID, Box::new(customer(UNLIMITED, 0, 1000, 1000)));
    let over = (0..20).map(|_| run(&t, &frame).reason).last();
    assert_eq!(over, Some(Reason::ByteRate));
}

#[test]
fn throttle_multiplies_cost_only_while_flagged() {
    let mut t = lab();
    let mut id = customer(UNLIMITED, 0, 1000, 1000);
    id.throttle_q8 = 4 * Q8_ONE;
    t.identities.insert(ID, Box::new(id));
    let frame = PacketBuilder::v4(C4, S4).tcp(1, 8000).payload(46).build();
    let admitted = |t: &Fake| {
        (0..50)
            .take_while(|_| run(t, &frame).reason == Reason::Bound)
            .count()
    };
    assert_eq!(admitted(&t), 10);
    let mut t = lab();
    id.flags |= ID_THROTTLED;
    t.identities.insert(ID, Box::new(id));
    assert_eq!(admitted(&t), 2);
}

#[test]
fn contention_is_a_defined_drop() {
    let mut t = lab();
    t.fail_cas = true;
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::LimiterContended);
}

#[test]
fn anonymous_v6_48_caps_its_64s() {
    let mut t = lab();
    t.ports.insert(port_slot(17, 443).unwrap(), EP);
    {
        let ep = t.endpoints.get_mut(&EP).unwrap();
        ep.flags |= EP_ANON_ALLOWED;
        ep.allowed_classes |= Class::Anonymous.bit();
    }
    t.settings.anon_pps = 1;
    t.settings.anon_tau_ns = limiter::packet_tau_ns(1, 4);
    let dst = [
        0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ];
    let mut admitted = 0;
    // Eight different /64s (and /56s) of one /48: the /48 allows four.
    for i in 0..8u8 {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 1, i, i, 0, 0, 0, 0, 0, 0, 0, 1];
        let f = PacketBuilder::v6(src, dst).udp(1, 443).build();
        if run(&t, &f).reason == Reason::Anonymous {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4);
}

#[test]
fn non_first_fragments_are_charged_to_bound_sources() {
    let mut t = lab();
    let frag = PacketBuilder::v4(C4, S4)
        .fragment(10, false)
        .udp(1, 8000)
        .payload(100)
        .build();
    let d = run(&t, &frag);
    assert_eq!(
        (d.reason, d.endpoint, d.identity),
        (Reason::NonFirstFragment, 0, ID)
    );
    assert_ne!(unsafe { (*t.buckets[&ID].get()).pkt_tat }, 0);
    let stranger = PacketBuilder::v4([203, 0, 113, 9], S4)
        .fragment(10, false)
        .build();
    assert_eq!(run(&t, &stranger).identity, ANONYMOUS_IDENTITY);
    t.identities.get_mut(&ID).unwrap().flags |= ID_QUARANTINED;
    assert_eq!(run(&t, &frag).reason, Reason::Quarantined);
}

#[test]
fn non_first_fragments_cannot_exceed_the_budget() {
    let t = lab();
    let frag = PacketBuilder::v4(C4, S4).fragment(10, false).build();
    let got: Vec<_> = (0..6).map(|_| run(&t, &frag).reason).collect();
    assert_eq!(got[5], Reason::PacketRate);
}

#[test]
fn the_clock_is_read_at_most_once_and_only_when_needed() {
    let t = lab();
    // Unbound: no binding to expire, no budget to charge.
    run(&t, &tcp([198, 18, 1, 11], 8000));
    assert_eq!((t.clock_reads.get(), t.coarse_reads.get()), (0, 0));
    // Unprotected: nothing to decide.
    run(&t, &tcp(C4, 22));
    assert_eq!((t.clock_reads.get(), t.coarse_reads.get()), (0, 0));
    // Bound without expiry, coarse plan: the coarse clock once, for the limiter.
    run(&t, &tcp(C4, 8000));
    assert_eq!((t.clock_reads.get(), t.coarse_reads.get()), (0, 1));
}

#[test]
fn an_expiring_binding_reads_the_coarse_clock_once_for_expiry_and_limiter() {
    let mut t = lab();
    t.exact.get_mut(&(4, addr4(C4))).unwrap().expires_ns = t.now.get() + 10;
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Bound);
    assert_eq!((t.clock_reads.get(), t.coarse_reads.get()), (0, 1));
}

/// The two clocks disagree here (the coarse one 3 ms behind), so the TAT a charge leaves says
/// which one the limiter read: `now + inc` of that clock.
fn split_clocks(precise_flag: bool) -> Fake {
    let mut t = lab();
    t.coarse.set(Some(t.now.get() - 3_000_000));
    if precise_flag {
        t.identities.get_mut(&ID).unwrap().flags |= ID_PRECISE_CLOCK;
    }
    t
}

fn pkt_tat(t: &Fake) -> u64 {
    // SAFETY: the fake's bucket, not shared.
    unsafe { (*t.buckets[&ID].get()).pkt_tat }
}

#[test]
fn a_coarse_identity_is_charged_on_the_coarse_clock() {
    let t = split_clocks(false);
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Bound);
    let inc = limiter::packet_increment_ns(10, Q8_ONE as u64).unwrap();
    assert_eq!(pkt_tat(&t), t.coarse.get().unwrap() + inc);
    assert_eq!((t.clock_reads.get(), t.coarse_reads.get()), (0, 1));
}

#[test]
fn a_precise_identity_is_charged_on_the_precise_clock() {
    let t = split_clocks(true);
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Bound);
    let inc = limiter::packet_increment_ns(10, Q8_ONE as u64).unwrap();
    assert_eq!(pkt_tat(&t), t.now.get() + inc);
    // No expiry to judge: the coarse clock is not read at all.
    assert_eq!((t.clock_reads.get(), t.coarse_reads.get()), (1, 0));
    // A non-first fragment of the same source is charged on the same clock.
    let frag = PacketBuilder::v4(C4, S4).fragment(10, false).build();
    assert_eq!(run(&t, &frag).reason, Reason::NonFirstFragment);
    assert_eq!(pkt_tat(&t), t.now.get() + 2 * inc);
}

#[test]
fn a_precise_identity_with_an_expiring_binding_reads_each_clock_once() {
    let mut t = split_clocks(true);
    t.exact.get_mut(&(4, addr4(C4))).unwrap().expires_ns = t.now.get() + 10;
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Bound);
    assert_eq!((t.clock_reads.get(), t.coarse_reads.get()), (1, 1));
}

#[test]
fn binding_expiry_is_judged_on_the_coarse_clock() {
    // Expired by the precise clock (1 ms ago), not yet by the coarse one (3 ms behind): live,
    // and for a precise identity too (expiry never reads the precise clock).
    for precise in [false, true] {
        let mut t = split_clocks(precise);
        let expires = t.now.get() - 1_000_000;
        t.exact.get_mut(&(4, addr4(C4))).unwrap().expires_ns = expires;
        assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Bound, "{precise}");
        // Once the coarse clock reaches it, expired.
        t.coarse.set(Some(expires));
        assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Expired, "{precise}");
    }
}

#[test]
fn the_anonymous_allowance_follows_its_settings_flag() {
    for precise in [false, true] {
        let mut t = lab();
        t.endpoints.get_mut(&EP).unwrap().flags |= EP_ANON_ALLOWED;
        t.settings.anon_pps = 10;
        t.settings.anon_tau_ns = limiter::packet_tau_ns(10, 5);
        if precise {
            t.settings.flags |= SET_ANON_PRECISE_CLOCK;
        }
        t.coarse.set(Some(t.now.get() - 3_000_000));
        let stranger = [198, 18, 1, 11];
        assert_eq!(run(&t, &tcp(stranger, 8000)).reason, Reason::Anonymous);
        let clock = if precise {
            t.now.get()
        } else {
            t.coarse.get().unwrap()
        };
        let inc = limiter::packet_increment_ns(10, Q8_ONE as u64).unwrap();
        let anon = t.anon.borrow();
        // SAFETY: the fake's cell, not shared.
        let tat = unsafe { *anon[&(24, [198, 18, 1, 0, 0, 0, 0, 0])].get() };
        assert_eq!(tat, clock + inc, "precise {precise}");
        let reads = (t.clock_reads.get(), t.coarse_reads.get());
        assert_eq!(reads, if precise { (1, 0) } else { (0, 1) });
    }
}

#[test]
fn hold_back_multiplies_one_plan_on_one_endpoint() {
    let frame = PacketBuilder::v4(C4, S4).tcp(1, 8000).payload(46).build();
    let admitted = |hold: Option<((u32, u16), u16)>| {
        let mut t = lab();
        t.identities
            .insert(ID, Box::new(customer(UNLIMITED, 0, 1000, 1000)));
        if let Some((k, v)) = hold {
            t.hold_back.insert(k, v);
        }
        (0..50)
            .take_while(|_| run(&t, &frame).reason == Reason::Bound)
            .count()
    };
    assert_eq!(admitted(None), 10);
    // Plan 0 on endpoint 1 held back 5x: 100-byte frames cost 500, two fit in 1000.
    assert_eq!(admitted(Some(((EP, 0), 5 * Q8_ONE))), 2);
    // Another plan's or another endpoint's hold-back changes nothing.
    assert_eq!(admitted(Some(((EP, 1), 5 * Q8_ONE))), 10);
    assert_eq!(admitted(Some(((2, 0), 5 * Q8_ONE))), 10);
}

#[test]
fn an_exhausted_quota_drops_after_isolation_and_before_the_limiter() {
    let mut t = lab();
    t.identities.get_mut(&ID).unwrap().flags |= ID_QUOTA_EXHAUSTED;
    let d = run(&t, &tcp(C4, 8000));
    assert_eq!((d.reason, d.identity), (Reason::QuotaExhausted, ID));
    assert_eq!(
        unsafe { (*t.buckets[&ID].get()).pkt_tat },
        0,
        "charged while over quota"
    );
    let frag = PacketBuilder::v4(C4, S4).fragment(10, false).build();
    assert_eq!(run(&t, &frag).reason, Reason::QuotaExhausted);
}

#[test]
fn a_passed_packet_reports_its_cost() {
    let mut t = lab();
    t.identities
        .insert(ID, Box::new(customer(UNLIMITED, 0, 1_000_000, 1_000_000)));
    t.endpoints.get_mut(&EP).unwrap().weight_q8 = 2 * Q8_ONE;
    let frame = PacketBuilder::v4(C4, S4).tcp(1, 8000).payload(46).build();
    assert_eq!(run(&t, &frame).cost, 200);
}

#[test]
fn a_response_cap_in_drop_mode_drops_uncharged_until_the_flag_is_cleared() {
    let mut t = lab();
    t.identities.get_mut(&ID).unwrap().flags |= ID_RESPONSE_CAPPED;
    let d = run(&t, &tcp(C4, 8000));
    assert_eq!(
        (d.reason, d.endpoint, d.identity),
        (Reason::ResponseCap, EP, ID)
    );
    assert_eq!(
        unsafe { (*t.buckets[&ID].get()).pkt_tat },
        0,
        "charged while dropped"
    );
    let frag = PacketBuilder::v4(C4, S4).fragment(10, false).build();
    let d = run(&t, &frag);
    assert_eq!(
        (d.reason, d.endpoint, d.identity),
        (Reason::ResponseCap, 0, ID)
    );
    // A quarantine or a spent quota is said first.
    t.identities.get_mut(&ID).unwrap().flags |= ID_QUOTA_EXHAUSTED;
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::QuotaExhausted);
    // The controller clears the flag (the window rolled): bound again, charged again.
    t.identities.get_mut(&ID).unwrap().flags &= !(ID_RESPONSE_CAPPED | ID_QUOTA_EXHAUSTED);
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::Bound);
    assert_eq!(run(&t, &frag).reason, Reason::NonFirstFragment);
    assert_ne!(unsafe { (*t.buckets[&ID].get()).pkt_tat }, 0);
}

#[test]
fn a_response_cap_in_throttle_mode_shrinks_the_budgets_and_counts_their_refusals() {
    let frame = PacketBuilder::v4(C4, S4).tcp(1, 8000).payload(46).build();
    // (admitted, what the first refusal is counted as)
    let outcome = |flags: u8, q8: u16, id: Identity| {
        let mut t = lab();
        let mut id = id;
        id.flags |= flags;
        id.response_q8 = q8;
        t.identities.insert(ID, Box::new(id));
        let got: Vec<Reason> = (0..50).map(|_| run(&t, &frame).reason).collect();
        let admitted = got.iter().take_while(|r| **r == Reason::Bound).count();
        (admitted, got[admitted])
    };
    let bytes = customer(UNLIMITED, 0, 1000, 1000);
    assert_eq!(outcome(0, 0, bytes), (10, Reason::ByteRate));
    assert_eq!(
        outcome(0, 4 * Q8_ONE, bytes),
        (10, Reason::ByteRate),
        "q8 unflagged"
    );
    assert_eq!(
        outcome(ID_RESPONSE_CAPPED, 4 * Q8_ONE, bytes),
        (2, Reason::ResponseCap)
    );
    // Packet budgets too: burst 5 at 4x is one packet.
    let packets = customer(10, 5, UNLIMITED, 0);
    assert_eq!(outcome(0, 0, packets), (5, Reason::PacketRate));
    assert_eq!(
        outcome(ID_RESPONSE_CAPPED, 4 * Q8_ONE, packets),
        (1, Reason::ResponseCap)
    );
    // On top of an anomaly throttle: 4x and 4x, 16x.
    let mut both = customer(UNLIMITED, 0, 1000, 1000);
    both.flags |= ID_THROTTLED;
    both.throttle_q8 = 4 * Q8_ONE;
    assert_eq!(
        outcome(ID_RESPONSE_CAPPED, 4 * Q8_ONE, both).0,
        0,
        "100 bytes cost 1600"
    );
    // Contention is not the cap's doing.
    let mut t = lab();
    t.fail_cas = true;
    let id = t.identities.get_mut(&ID).unwrap();
    id.flags |= ID_RESPONSE_CAPPED;
    id.response_q8 = 4 * Q8_ONE;
    assert_eq!(run(&t, &tcp(C4, 8000)).reason, Reason::LimiterContended);
}
