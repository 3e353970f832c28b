//! Host tests of the flow logic (`flow::ingress`, `flow::egress`) over tables in plain memory:
//! request/answer boundaries, time to first byte, the request-size caps and what a forged
//! SYN or RST may not undo. The kernel fixtures (tests/egress.rs) run the same logic in the
//! programs.

use core::cell::{Cell, RefCell, UnsafeCell};
use std::{boxed::Box, collections::HashMap, vec::Vec};

use crate::{
    Reason,
    decide::{AnonPrefix, Decision, Tables},
    flow::*,
    packet::PacketBuilder,
    parse::{Family, Frame, IpPacket, parse},
    policy::*,
};

const CLIENT: [u8; 4] = [198, 18, 1, 10];
const OTHER: [u8; 4] = [198, 18, 1, 11];
const SERVER: [u8; 4] = [198, 19, 0, 1];
const EP: u32 = 3;
const ID: u32 = 7;
const PORT: u16 = 8000;

#[derive(Default)]
struct Lab {
    identity: Identity,
    endpoint: Endpoint,
    policy: Cell<FlowPolicy>,
    flows: RefCell<HashMap<FlowKey, Box<UnsafeCell<Flow>>>>,
    counters: RefCell<[u64; FLOW_COUNTER_SLOTS as usize]>,
    ttfb: RefCell<Vec<(u32, u8, u32, u64)>>,
    now: Cell<u64>,
}

fn addr4(a: [u8; 4]) -> [u8; 16] {
    let mut x = [0; 16];
    x[..4].copy_from_slice(&a);
    x
}

impl Tables for Lab {
    fn port_endpoint(&self, slot: u32) -> u32 {
        if slot == port_slot(6, PORT).unwrap() {
            EP
        } else {
            0
        }
    }
    fn endpoint(&self, id: u32) -> Option<*const Endpoint> {
        (id == EP).then_some(&self.endpoint as *const _)
    }
    fn exact_binding(&self, _: Family, addr: &[u8; 16]) -> Option<*const Binding> {
        static BOUND: Binding = Binding {
            identity: ID,
            _pad: 0,
            expires_ns: 0,
        };
        (*addr == addr4(CLIENT) || *addr == addr4(OTHER)).then_some(&BOUND as *const _)
    }
    fn cidr_binding(&self, _: Family, _: &[u8; 16]) -> Option<*const Binding> {
        None
    }
    fn identity(&self, id: u32) -> Option<*const Identity> {
        (id == ID).then_some(&self.identity as *const _)
    }
    fn bucket(&self, _: u32) -> Option<*mut Bucket> {
        None
    }
    fn anon_tat(&self, _: &AnonPrefix) -> Option<*mut u64> {
        None
    }
    fn settings(&self) -> Settings {
        Settings::default()
    }
    fn hold_back(&self, _: u32, _: u16) -> u16 {
        0
    }
    fn now_ns(&self) -> u64 {
        self.now.get()
    }
    fn coarse_ns(&self) -> u64 {
        self.now.get()
    }
    unsafe fn load(&self, p: *const u64) -> u64 {
        unsafe { *p }
    }
    unsafe fn cas(&self, _: *mut u64, _: u64, _: u64) -> bool {
        false
    }
}

impl FlowTables for Lab {
    fn flow(&self, key: &FlowKey) -> Option<*mut Flow> {
        self.flows.borrow().get(key).map(|f| f.get())
    }
    fn flow_insert(&self, key: &FlowKey, flow: &Flow) -> Option<*mut Flow> {
        let mut flows = self.flows.borrow_mut();
        flows.insert(*key, Box::new(UnsafeCell::new(*flow)));
        flows.get(key).map(|f| f.get())
    }
    fn flow_policy(&self, endpoint: u32) -> FlowPolicy {
        if endpoint == EP {
            self.policy.get()
        } else {
            FlowPolicy::default()
        }
    }
    fn flow_count(&self, slot: u32) {
        self.counters.borrow_mut()[slot as usize] += 1;
    }
    fn record_ttfb(&self, endpoint: u32, class: u8, identity: u32, ns: u64) {
        self.ttfb.borrow_mut().push((endpoint, class, identity, ns));
    }
}

fn lab(max_request: u64, max_unanswered: u64) -> Lab {
    Lab {
        identity: Identity {
            flags: ID_ACTIVE,
            class: Class::Partner as u8,
            ..Default::default()
        },
        endpoint: Endpoint {
            flags: EP_ACTIVE,
            allowed_classes: 0xff,
            ..Default::default()
        },
        policy: Cell::new(FlowPolicy {
            flags: FP_TRACK,
            _pad: 0,
            max_request_bytes: max_request,
            max_unanswered_bytes: max_unanswered,
        }),
        now: Cell::new(5_000_000_000),
        ..Default::default()
    }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;

fn parsed(frame: &[u8]) -> IpPacket {
    match parse(frame) {
        Ok(Frame::Ip(p)) => p,
        other => panic!("{other:?}"),
    }
}

/// A client packet on client port `cport` with `payload` bytes and TCP `flags`, through the
/// ingress half as if the decision had passed it as bound.
fn client(t: &Lab, src: [u8; 4], cport: u16, flags: u8, payload: usize) -> Decision {
    let frame = PacketBuilder::v4(src, SERVER)
        .tcp(cport, PORT)
        .tcp_flags(flags)
        .payload(payload)
        .build();
    let p = parsed(&frame);
    assert_eq!(
        tcp_payload(frame.as_slice(), &p),
        payload as u64,
        "payload read"
    );
    ingress(t, &p, payload as u64, Decision::new(Reason::Bound, EP, ID))
}

fn server(t: &Lab, dst: [u8; 4], cport: u16, payload: usize) -> Egress {
    let frame = PacketBuilder::v4(SERVER, dst)
        .tcp(PORT, cport)
        .tcp_flags(ACK)
        .payload(payload)
        .build();
    let p = parsed(&frame);
    egress(t, &p, tcp_payload(frame.as_slice(), &p))
}

fn flow(t: &Lab, src: [u8; 4], cport: u16) -> Flow {
    let key = FlowKey {
        client: addr4(src),
        server: addr4(SERVER),
        client_port: cport,
        server_port: PORT,
        family: Family::V4 as u8,
        _pad: [0; 3],
    };
    let flows = t.flows.borrow();
    // SAFETY: test memory, no other reference alive.
    unsafe { *flows.get(&key).expect("flow tracked").get() }
}

#[test]
fn the_time_to_first_byte_runs_from_the_last_request_byte_to_the_first_answer_byte() {
    let t = lab(0, 0);
    assert_eq!(client(&t, CLIENT, 40000, SYN, 0).reason, Reason::Bound);
    assert_eq!(t.counters.borrow()[FLOW_CREATED as usize], 1);
    // The server's SYN-ACK carries no payload: nothing measured.
    server(&t, CLIENT, 40000, 0);
    client(&t, CLIENT, 40000, ACK, 600);
    t.now.set(t.now.get() + 3_000_000);
    client(&t, CLIENT, 40000, ACK, 400);
    t.now.set(t.now.get() + 50_000_000);
    let e = server(&t, CLIENT, 40000, 1200);
    assert_eq!((e.endpoint, e.identity), (EP, ID));
    // Streamed bytes after the first one are the same answer.
    t.now.set(t.now.get() + 10_000_000);
    server(&t, CLIENT, 40000, 100);
    assert_eq!(
        t.ttfb.borrow().as_slice(),
        &[(EP, Class::Partner as u8, ID, 50_000_000)]
    );
    let f = flow(&t, CLIENT, 40000);
    assert_eq!((f.answers, f.response_bytes, f.request_bytes), (1, 1300, 0));
    assert_eq!(f.flags & FLOW_AWAITING, 0);
    assert_eq!(ttfb_bucket(50_000_000), 3, "50 ms is the le=50 bucket");
    assert_eq!(ttfb_bucket(50_000_001), 4);
    assert_eq!(ttfb_bucket(u64::MAX), TTFB_BUCKETS - 1);
}

#[test]
fn a_request_over_the_cap_cuts_its_flow_and_nothing_else() {
    let t = lab(10_000, 0);
    client(&t, CLIENT, 40000, SYN, 0);
    client(&t, OTHER, 40001, SYN, 0);
    for _ in 0..6 {
        assert_eq!(client(&t, CLIENT, 40000, ACK, 1400).reason, Reason::Bound);
        assert_eq!(client(&t, OTHER, 40001, ACK, 1400).reason, Reason::Bound);
    }
    // The other flow's answer resets only its own count.
    server(&t, OTHER, 40001, 600);
    // 6 × 1400 = 8400; the next 1400 takes it to 9800, then 11 200 crosses the cap.
    assert_eq!(client(&t, CLIENT, 40000, ACK, 1400).reason, Reason::Bound);
    assert_eq!(
        client(&t, CLIENT, 40000, ACK, 1400).reason,
        Reason::RequestSize
    );
    assert_eq!(t.counters.borrow()[FLOW_CUTS as usize], 1);
    // Cut for good: a pure ACK, a SYN (port reuse or forgery) and an answer of the server
    // do not reopen it; a RST passes so the server can let go.
    assert_eq!(
        client(&t, CLIENT, 40000, ACK, 0).reason,
        Reason::RequestSize
    );
    assert_eq!(
        client(&t, CLIENT, 40000, SYN, 0).reason,
        Reason::RequestSize
    );
    server(&t, CLIENT, 40000, 2000);
    assert_eq!(
        client(&t, CLIENT, 40000, ACK, 100).reason,
        Reason::RequestSize
    );
    assert_eq!(client(&t, CLIENT, 40000, RST, 0).reason, Reason::Bound);
    // The other client on the same endpoint, and the same client's next flow, are untouched.
    for _ in 0..7 {
        assert_eq!(client(&t, OTHER, 40001, ACK, 1400).reason, Reason::Bound);
    }
    assert_eq!(client(&t, CLIENT, 40002, SYN, 0).reason, Reason::Bound);
    assert_eq!(client(&t, CLIENT, 40002, ACK, 9000).reason, Reason::Bound);
}

#[test]
fn each_answer_starts_a_new_request() {
    let t = lab(5_000, 0);
    client(&t, CLIENT, 40000, SYN, 0);
    for _ in 0..10 {
        assert_eq!(client(&t, CLIENT, 40000, ACK, 4_000).reason, Reason::Bound);
        server(&t, CLIENT, 40000, 200);
    }
    assert_eq!(flow(&t, CLIENT, 40000).answers, 10);
}

#[test]
fn small_answers_a_client_can_provoke_do_not_reset_the_unanswered_cap() {
    // An HTTP/2 client can make the server answer PINGs at will: each tiny answer resets the
    // request count, but not the unanswered one.
    let t = lab(5_000, 20_000);
    client(&t, CLIENT, 40000, SYN, 0);
    let mut sent = 0;
    let cut = loop {
        let d = client(&t, CLIENT, 40000, ACK, 4_000);
        sent += 4_000;
        if d.reason != Reason::Bound {
            break d;
        }
        server(&t, CLIENT, 40000, (ANSWER_BYTES - 1) as usize);
        assert!(sent < 100_000, "never cut");
    };
    assert_eq!(cut.reason, Reason::RequestSize);
    assert_eq!(sent, 24_000, "cut on the packet that crossed 20 000");
    // A real answer resets both.
    let t = lab(5_000, 20_000);
    client(&t, CLIENT, 40000, SYN, 0);
    for _ in 0..20 {
        assert_eq!(client(&t, CLIENT, 40000, ACK, 4_000).reason, Reason::Bound);
        server(&t, CLIENT, 40000, ANSWER_BYTES as usize);
    }
}

#[test]
fn a_flow_the_table_lost_is_counted_never_measured_wrong() {
    let t = lab(0, 0);
    // The server answers a flow nobody saw start: no time, one count.
    let e = server(&t, CLIENT, 40000, 800);
    assert_eq!((e.endpoint, e.identity), (EP, ID));
    assert!(t.ttfb.borrow().is_empty());
    assert_eq!(t.counters.borrow()[FLOW_UNTRACKED as usize], 1);
    // Client payload with no entry: tracked from here on, counted as mid-stream.
    client(&t, CLIENT, 40000, ACK, 300);
    assert_eq!(t.counters.borrow()[FLOW_MIDSTREAM as usize], 1);
    // A pure ACK of an unknown flow makes no entry.
    client(&t, CLIENT, 40009, ACK, 0);
    assert_eq!(t.flows.borrow().len(), 1);
}

#[test]
fn egress_classifies_by_source_port_and_bound_destination() {
    let t = lab(0, 0);
    assert_eq!(server(&t, CLIENT, 40000, 10).identity, ID);
    // Unbound destination: the endpoint's, nobody's.
    let e = server(&t, [198, 18, 9, 9], 40000, 10);
    assert_eq!((e.endpoint, e.identity), (EP, ANONYMOUS_IDENTITY));
    // Another source port: unprotected, counted nowhere.
    let frame = PacketBuilder::v4(SERVER, CLIENT)
        .tcp(9000, 40000)
        .payload(10)
        .build();
    let e = egress(&t, &parsed(&frame), 10);
    assert_eq!((e.endpoint, e.identity), (0, ANONYMOUS_IDENTITY));
}

#[test]
fn untracked_endpoints_and_non_bound_decisions_are_left_alone() {
    let t = lab(100, 0);
    t.policy.set(FlowPolicy::default());
    assert_eq!(client(&t, CLIENT, 40000, ACK, 5_000).reason, Reason::Bound);
    assert!(t.flows.borrow().is_empty());
    let t = lab(100, 0);
    let frame = PacketBuilder::v4(CLIENT, SERVER)
        .tcp(40000, PORT)
        .payload(5_000)
        .build();
    let d = Decision::new(Reason::PacketRate, EP, ID);
    assert_eq!(ingress(&t, &parsed(&frame), 5_000, d), d);
    assert!(t.flows.borrow().is_empty());
}

#[test]
fn link_padding_is_not_payload() {
    // A pure ACK is 54 bytes; Ethernet pads it to 60. The IP length says 40.
    let mut frame = PacketBuilder::v4(CLIENT, SERVER)
        .tcp(40000, PORT)
        .tcp_flags(ACK)
        .build();
    frame.resize(60, 0);
    let p = parsed(&frame);
    assert_eq!(tcp_payload(frame.as_slice(), &p), 0);
}

#[test]
fn a_streamed_answer_of_small_packets_resets_the_unanswered_count() {
    // Tokens streamed in packets of a few hundred bytes: together they are an answer.
    let t = lab(0, 10_000);
    client(&t, CLIENT, 40000, SYN, 0);
    for _ in 0..20 {
        assert_eq!(client(&t, CLIENT, 40000, ACK, 4_000).reason, Reason::Bound);
        for _ in 0..3 {
            server(&t, CLIENT, 40000, 200);
        }
    }
}

#[test]
fn fragments_to_a_capped_endpoint_are_refused() {
    let t = lab(10_000, 0);
    let frame = PacketBuilder::v4(CLIENT, SERVER)
        .fragment(0, true)
        .tcp(40000, PORT)
        .tcp_flags(ACK)
        .payload(1000)
        .build();
    let d = ingress(
        &t,
        &parsed(&frame),
        1000,
        Decision::new(Reason::Bound, EP, ID),
    );
    assert_eq!(d.reason, Reason::RequestSize);
    // Without a cap there is nothing to hide from: tracked as usual.
    let t = lab(0, 0);
    let d = ingress(
        &t,
        &parsed(&frame),
        1000,
        Decision::new(Reason::Bound, EP, ID),
    );
    assert_eq!(d.reason, Reason::Bound);
}

#[test]
fn a_syn_ack_from_the_server_reopens_a_cut_flow_and_egress_charges_the_flows_identity() {
    let t = lab(1_000, 0);
    client(&t, CLIENT, 40000, SYN, 0);
    assert_eq!(
        client(&t, CLIENT, 40000, ACK, 1_500).reason,
        Reason::RequestSize
    );
    assert_eq!(
        client(&t, CLIENT, 40000, SYN, 0).reason,
        Reason::RequestSize
    );
    let syn_ack = PacketBuilder::v4(SERVER, CLIENT)
        .tcp(PORT, 40000)
        .tcp_flags(0x12)
        .build();
    egress(&t, &parsed(&syn_ack), 0);
    assert_eq!(client(&t, CLIENT, 40000, ACK, 500).reason, Reason::Bound);
    // The flow names its identity; an answer goes to it even if the address's binding is
    // gone by then (here: a flow recorded for another slot).
    t.flows
        .borrow_mut()
        .values_mut()
        .for_each(|f| f.get_mut().identity = 99);
    assert_eq!(server(&t, CLIENT, 40000, 100).identity, 99);
}
