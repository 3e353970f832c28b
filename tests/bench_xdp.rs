//! `cargo xtask bench`: ns per packet through BPF_PROG_TEST_RUN for the program's main paths,
//! next to a no-op XDP program measured in the same run, and the verifier's processed
//! instruction count per program. Not a test: the numbers are written up in BENCHMARKS.md.

use std::{net::IpAddr, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use tollgate::{
    loader,
    tables::{EndpointSpec, KernelTables, PlanLimits, Proto, identity_record},
};
use tollgate_common::{Reason, Verdict, packet::PacketBuilder, policy::Class, program_names};

/// Runs per BPF_PROG_TEST_RUN call; the kernel reports the mean per run.
const REPEAT: u32 = 1_000_000;
/// Calls per path; the median is reported.
const ROUNDS: usize = 11;

const SERVER: [u8; 4] = [198, 19, 0, 1];
const BOUND: [u8; 4] = [198, 18, 0, 10];
const LIMITED: [u8; 4] = [198, 18, 0, 11];
const STRANGER: [u8; 4] = [198, 18, 0, 12];

fn frame(src: [u8; 4], dport: u16) -> Vec<u8> {
    PacketBuilder::v4(src, SERVER)
        .tcp(40000, dport)
        .payload(200)
        .build()
}

fn setup(tables: &mut KernelTables) {
    tables
        .set_endpoint(
            1,
            &EndpointSpec {
                proto: Proto::Tcp,
                ports: 8000..=8000,
                v4_prefix: None,
                v6_prefix: None,
                weight: 1.0,
                allowed_classes: vec![Class::Customer],
                roles: 0,
                anonymous: false,
            },
        )
        .expect("endpoint");
    // Rates so high that millions of back-to-back packets stay in budget, yet finite: the
    // limiter's compare-and-swap runs on every packet.
    let roomy = PlanLimits {
        packets_per_s: Some(1_000_000_000_000),
        packet_burst: 1_000_000_000_000,
        bytes_per_s: Some(1_000_000_000_000_000),
        byte_burst: 1_000_000_000_000_000,
    };
    let tight = PlanLimits {
        packets_per_s: Some(1),
        packet_burst: 1,
        bytes_per_s: None,
        byte_burst: 0,
    };
    tables
        .set_identity(1, &identity_record(Class::Customer, 1, 0, &roomy))
        .expect("identity");
    tables
        .set_identity(2, &identity_record(Class::Customer, 1, 0, &tight))
        .expect("identity");
    tables.bind(IpAddr::from(BOUND), 32, 1, 0).expect("bind");
    tables.bind(IpAddr::from(LIMITED), 32, 2, 0).expect("bind");
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

struct Path {
    name: &'static str,
    program: &'static str,
    packet: Vec<u8>,
    verdict: Verdict,
}

fn path(name: &'static str, program: &'static str, packet: Vec<u8>, verdict: Verdict) -> Path {
    Path {
        name,
        program,
        packet,
        verdict,
    }
}

fn main() {
    tollgate_tests::require_root();
    let mut ebpf = loader::load_with_bench_components().expect("loading the program");
    let mut tables = KernelTables::from_ebpf(&mut ebpf).expect("policy maps");
    setup(&mut tables);

    let [parse, clock, lookup] = program_names::BENCH_COMPONENTS;
    let pass = Verdict::Pass;
    let paths = [
        path(
            "no-op XDP program (baseline)",
            program_names::NOOP,
            frame(BOUND, 8000),
            pass,
        ),
        path(
            "unprotected pass (tcp/22)",
            program_names::XDP,
            frame(STRANGER, 22),
            Reason::Unprotected.verdict(),
        ),
        path(
            "bound pass (in budget)",
            program_names::XDP,
            frame(BOUND, 8000),
            Reason::Bound.verdict(),
        ),
        path(
            "over-limit drop",
            program_names::XDP,
            frame(LIMITED, 8000),
            Reason::PacketRate.verdict(),
        ),
        path(
            "unbound drop",
            program_names::XDP,
            frame(STRANGER, 8000),
            Reason::Unbound.verdict(),
        ),
        path("component: parser only", parse, frame(BOUND, 8000), pass),
        path(
            "component: parser + clock read",
            clock,
            frame(BOUND, 8000),
            pass,
        ),
        path(
            "component: parser + binding lookup",
            lookup,
            frame(BOUND, 8000),
            pass,
        ),
    ];
    // Warm-up, which also checks that each path takes the branch it is named for.
    for p in &paths {
        let prog = loader::xdp_program(&mut ebpf, p.program).expect("program");
        let mut out = vec![0u8; p.packet.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&p.packet),
                data_out: Some(&mut out),
                repeat: 1000,
                ..Default::default()
            })
            .expect("test run");
        assert_eq!(
            r.return_value, p.verdict as u32,
            "{}: wrong verdict",
            p.name
        );
    }
    // Rounds interleave the paths, and each path's ratio to the baseline is taken within its
    // round: drift in the machine's speed (a shared 2-core VM) then cancels out.
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut ratio: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..ROUNDS {
        let mut this_round = Vec::new();
        for p in &paths {
            let prog = loader::xdp_program(&mut ebpf, p.program).expect("program");
            let mut out = vec![0u8; p.packet.len() + 256];
            let d: Duration = prog
                .test_run(TestRunOptions {
                    data_in: Some(&p.packet),
                    data_out: Some(&mut out),
                    repeat: REPEAT,
                    ..Default::default()
                })
                .expect("test run")
                .duration;
            this_round.push(d.as_nanos() as f64);
        }
        for (i, t) in this_round.iter().enumerate() {
            ns[i].push(*t);
            ratio[i].push(t / this_round[0].max(1.0));
        }
    }
    println!("| path | ns/packet | × no-op (same round) |");
    println!("|---|---:|---:|");
    for (i, p) in paths.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2} |",
            p.name,
            median(ns[i].clone()),
            median(ratio[i].clone())
        );
    }
    println!();
    println!(
        "Medians of {ROUNDS} rounds; each measurement is one BPF_PROG_TEST_RUN of {REPEAT} runs."
    );
    println!();
    println!("| program | verifier: processed instructions | translated size (bytes) |");
    println!("|---|---:|---:|");
    for name in [program_names::XDP, program_names::NOOP] {
        let info = loader::xdp_program(&mut ebpf, name)
            .expect("program")
            .info()
            .expect("program info");
        println!(
            "| {name} | {} | {} |",
            info.verified_instruction_count().unwrap_or(0),
            info.size_translated().unwrap_or(0)
        );
    }
}
