//! `cargo xtask bench`: ns per packet of the egress program and of flow tracking on ingress,
//! through BPF_PROG_TEST_RUN, each next to its baseline measured in the same rounds:
//! - egress: the empty TC program, then `tollgate_egress` on an unprotected packet, on an
//!   answer to a bound client on an endpoint without flow tracking, and on one with tracking
//!   (flow lookup, request reset);
//! - ingress: the no-op XDP program, then the enforcing program on a bound TCP packet to an
//!   endpoint without tracking (the program as before #16) and with tracking (the tail call
//!   into the flow program and its lookup).
//!
//! Each path's verdict and counters are checked before it is timed. Not a test: the figures
//! go to BENCHMARKS.md through target/bench/bench_egress.json.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use tollgate::{
    loader,
    tables::{EndpointSpec, KernelTables, PlanLimits, Proto, identity_record},
};
use tollgate_common::{
    flow::{FLOW_ANSWERS, FP_TRACK, FlowPolicy},
    packet::PacketBuilder,
    policy::Class,
    program_names,
};
use tollgate_tests::bench::{Figures, median, quick};

const REPEAT: u32 = 1_000_000;
const CLIENT: [u8; 4] = [198, 18, 0, 10];
const SERVER: [u8; 4] = [198, 19, 0, 1];
const TRACKED: u16 = 8000;
const UNTRACKED: u16 = 8001;
const EP_TRACKED: u32 = 1;
const EP_UNTRACKED: u32 = 2;
const ID: u32 = 3;
const ACK: u8 = 0x10;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Xdp,
    Tc,
}

struct Path {
    name: &'static str,
    key: &'static str,
    kind: Kind,
    program: &'static str,
    frame: Vec<u8>,
    /// The baseline it is compared with (an index into the paths), itself for a baseline.
    base: usize,
}

fn client_frame(port: u16) -> Vec<u8> {
    PacketBuilder::v4(CLIENT, SERVER)
        .tcp(40000, port)
        .tcp_flags(ACK)
        .payload(512)
        .build()
}

fn server_frame(port: u16) -> Vec<u8> {
    PacketBuilder::v4(SERVER, CLIENT)
        .tcp(port, 40000)
        .tcp_flags(ACK)
        .payload(1400)
        .build()
}

fn setup(tables: &mut KernelTables) {
    for (id, port, flags) in [
        (EP_TRACKED, TRACKED, FP_TRACK),
        (EP_UNTRACKED, UNTRACKED, 0),
    ] {
        tables
            .set_endpoint(
                id,
                &EndpointSpec {
                    proto: Proto::Tcp,
                    ports: port..=port,
                    v4_prefix: None,
                    v6_prefix: None,
                    weight: 1.0,
                    allowed_classes: vec![Class::Customer],
                    roles: 0,
                    anonymous: false,
                },
            )
            .expect("endpoint");
        tables
            .set_flow_policy(
                id,
                &FlowPolicy {
                    flags,
                    ..Default::default()
                },
            )
            .expect("flow policy");
    }
    let rec = identity_record(Class::Customer, 0, 0, &PlanLimits::UNLIMITED);
    tables.set_identity(ID, &rec).expect("identity");
    tables
        .bind(Ipv4Addr::from(CLIENT).into(), 32, ID, 0)
        .expect("bind");
}

fn run(ebpf: &mut aya::Ebpf, p: &Path, repeat: u32) -> (u32, f64) {
    let mut out = vec![0u8; p.frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(&p.frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let r = match p.kind {
        Kind::Xdp => loader::xdp_program(ebpf, p.program)
            .expect("program")
            .test_run(opts),
        Kind::Tc => {
            let tc: &SchedClassifier = ebpf
                .program(p.program)
                .expect("program")
                .try_into()
                .expect("classifier");
            tc.test_run(opts)
        }
    }
    .expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration.as_nanos() as f64)
}

fn main() {
    tollgate_tests::require_root();
    let rounds = if quick() { 4 } else { 9 };
    let mut ebpf = loader::load().expect("loading the program");
    // `loader::load` loads the TC programs too (the egress program and the empty one).
    let mut tables = KernelTables::from_ebpf(&mut ebpf).expect("tables");
    setup(&mut tables);
    let paths = vec![
        Path {
            name: "empty TC program (egress baseline)",
            key: "tc_noop",
            kind: Kind::Tc,
            program: program_names::TC_NOOP,
            frame: server_frame(TRACKED),
            base: 0,
        },
        Path {
            name: "egress: unprotected packet (tcp/22)",
            key: "egress_unprotected",
            kind: Kind::Tc,
            program: program_names::EGRESS,
            frame: server_frame(22),
            base: 0,
        },
        Path {
            name: "egress: answer to a bound client, endpoint untracked",
            key: "egress_bound",
            kind: Kind::Tc,
            program: program_names::EGRESS,
            frame: server_frame(UNTRACKED),
            base: 0,
        },
        Path {
            name: "egress: answer to a bound client, flow tracked",
            key: "egress_tracked",
            kind: Kind::Tc,
            program: program_names::EGRESS,
            frame: server_frame(TRACKED),
            base: 0,
        },
        Path {
            name: "no-op XDP program (ingress baseline)",
            key: "xdp_noop",
            kind: Kind::Xdp,
            program: program_names::NOOP,
            frame: client_frame(TRACKED),
            base: 4,
        },
        Path {
            name: "ingress: bound TCP, endpoint untracked (the program before #16)",
            key: "ingress_untracked",
            kind: Kind::Xdp,
            program: program_names::XDP,
            frame: client_frame(UNTRACKED),
            base: 4,
        },
        Path {
            name: "ingress: bound TCP, flow tracked (tail call + flow lookup)",
            key: "ingress_tracked",
            kind: Kind::Xdp,
            program: program_names::XDP,
            frame: client_frame(TRACKED),
            base: 4,
        },
    ];
    // Warm-up and checks: the verdicts (XDP_PASS, TC_ACT_UNSPEC), the tracked flow exists and
    // its answers were counted, and the egress counters moved for the bound paths only.
    // Twice: the first pass's ingress opens the flow the second pass's egress answers.
    for _ in 0..2 {
        for p in &paths {
            let (ret, _) = run(&mut ebpf, p, 1000);
            let want = if p.kind == Kind::Xdp { 2 } else { u32::MAX };
            assert_eq!(ret, want, "{}: wrong verdict", p.name);
        }
    }
    let flows = tables.flow_entries().expect("flows");
    assert_eq!(flows.len(), 1, "one tracked flow: {flows:?}");
    assert!(
        tables.flow_counters().expect("flow counters")[FLOW_ANSWERS as usize] >= 1,
        "the tracked answers closed a request"
    );
    let e = tables.egress_identities_upto(ID + 1).expect("egress")[ID as usize];
    assert_eq!(
        e.sent.packets, 4000,
        "two bound egress paths × 1000 runs × 2 passes"
    );
    let eps = tables.egress_endpoints().expect("egress endpoints");
    assert_eq!(
        (
            eps[EP_TRACKED as usize].sent.packets,
            eps[EP_UNTRACKED as usize].sent.packets
        ),
        (2000, 2000),
        "the TC no-op and the unprotected path count nothing, each bound path its 2 × 1000"
    );

    let mut ns = vec![Vec::new(); paths.len()];
    let mut added = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        let this: Vec<f64> = paths.iter().map(|p| run(&mut ebpf, p, REPEAT).1).collect();
        for (i, p) in paths.iter().enumerate() {
            ns[i].push(this[i]);
            added[i].push(this[i] - this[p.base]);
        }
    }
    let mut figures = Figures::default();
    println!("| path | ns/packet (median of {rounds}) | over its baseline | ratio |");
    println!("|---|---:|---:|---:|");
    for (i, p) in paths.iter().enumerate() {
        let m = median(&ns[i]);
        let a = median(&added[i]);
        let base = median(&ns[p.base]);
        figures.set(format!("egress.{}.ns", p.key), m);
        figures.set(format!("egress.{}.added_ns", p.key), a);
        if i == p.base {
            println!("| {} | {m:.1} | (baseline) | 1.00× |", p.name);
        } else {
            println!("| {} | {m:.1} | +{a:.1} ns | {:.2}× |", p.name, m / base);
        }
    }
    let tracked = median(&added[6]) - median(&added[5]);
    figures.set("egress.flow_tracking_ingress_ns", tracked);
    println!();
    println!(
        "Flow tracking adds {tracked:+.1} ns to a bound TCP packet on ingress (tracked minus \
         untracked, each over the no-op in its round); on egress a tracked answer costs \
         {:+.1} ns over the empty TC program.",
        median(&added[3])
    );
    figures.write("bench_egress");
}
