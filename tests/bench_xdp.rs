//! `cargo xtask bench`: ns per packet through BPF_PROG_TEST_RUN for the program's paths.
//!
//! Two tables, measured in the same interleaved rounds:
//! - *one key*: one IPv4 frame per path, next to the no-op program (as since #3);
//! - *spread*: IPv6 frames whose source a rotator steps over N bound addresses per run
//!   (ebpf/src/bench.rs), at N = 1, 10 000, 100 000 and 1 000 000 identities, next to the
//!   rotator tail-calling the no-op (the rotator's own cost cancels in the difference) and a
//!   bare hash lookup in the same table.
//!
//! Every path's verdict is checked through the reason counters before it is timed (all N
//! sources included), and the rotator's premise (the kernel reuses one buffer across
//! repeats) is checked on this kernel from the frame it hands back. Not a test: the figures
//! go to BENCHMARKS.md through target/bench/bench_xdp.json.

use std::{net::IpAddr, os::fd::AsFd as _, time::Instant};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions},
};
use tollgate::{
    counter_read,
    loader::{self, KernelLog},
    object,
    tables::{EndpointSpec, KernelTables, PlanLimits, Proto, boot_ns, identity_record},
};
use tollgate_common::{
    Reason, Verdict, map_names,
    packet::PacketBuilder,
    policy::{Binding, Bucket, Class, Identity},
    program_names,
};
use tollgate_tests::bench::{Figures, median, quartiles, quick, update_batch};

/// The component programs the spread rows use, by name (the list may grow: issue 15 adds a
/// coarse-clock component).
const PARSE: &str = "bench_parse";
const LOOKUP: &str = "bench_lookup";

/// Runs per BPF_PROG_TEST_RUN call; the kernel reports the mean per run.
const REPEAT: u32 = 1_000_000;

const SERVER: [u8; 4] = [198, 19, 0, 1];
const BOUND: [u8; 4] = [198, 18, 0, 10];
const LIMITED: [u8; 4] = [198, 18, 0, 11];
const STRANGER: [u8; 4] = [198, 18, 0, 12];

/// The protected endpoint every bound identity may use, and one only internal ones may.
const OPEN_PORT: u16 = 8000;
const INTERNAL_PORT: u16 = 9000;

/// Source sets of the spread rows, `2001:db8:0:<set>::<index>`.
const SET_BOUND: u8 = 1;
const SET_LIMITED: u8 = 2;
const SET_UNBOUND: u8 = 3;
const SERVER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];

fn frame(src: [u8; 4], dport: u16) -> Vec<u8> {
    PacketBuilder::v4(src, SERVER)
        .tcp(40000, dport)
        .payload(200)
        .build()
}

fn src6(set: u8, index: u32) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    a[5] = set;
    a[12..].copy_from_slice(&index.to_be_bytes());
    a
}

fn frame6(set: u8, dport: u16) -> Vec<u8> {
    PacketBuilder::v6(src6(set, 0), SERVER6)
        .tcp(40000, dport)
        .payload(200)
        .build()
}

/// Rates so high that millions of back-to-back packets stay in budget, yet finite: the
/// limiter's compare-and-swap runs on every packet.
const ROOMY: PlanLimits = PlanLimits {
    packets_per_s: Some(1_000_000_000_000),
    packet_burst: 1_000_000_000_000,
    bytes_per_s: Some(1_000_000_000_000_000),
    byte_burst: 1_000_000_000_000_000,
};
/// One packet a second and no burst; the bench also sets these identities' limiter state a
/// day ahead, so that every packet is over the limit however the rounds are paced.
const TIGHT: PlanLimits = PlanLimits {
    packets_per_s: Some(1),
    packet_burst: 1,
    bytes_per_s: None,
    byte_burst: 0,
};

fn endpoints(tables: &mut KernelTables) {
    for (id, port, classes) in [
        (1, OPEN_PORT, vec![Class::Customer]),
        (2, INTERNAL_PORT, vec![Class::Internal]),
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
                    allowed_classes: classes,
                    roles: 0,
                    anonymous: false,
                },
            )
            .expect("endpoint");
    }
}

fn one_key_setup(tables: &mut KernelTables) {
    endpoints(tables);
    tables
        .set_identity(1, &identity_record(Class::Customer, 1, 0, &ROOMY))
        .expect("identity");
    tables
        .set_identity(2, &identity_record(Class::Customer, 1, 0, &TIGHT))
        .expect("identity");
    tables.bind(IpAddr::from(BOUND), 32, 1, 0).expect("bind");
    tables.bind(IpAddr::from(LIMITED), 32, 2, 0).expect("bind");
}

/// A stride coprime to `n` near 0.618 n (consecutive runs land far apart in the table).
fn stride(n: u32) -> u32 {
    if n <= 1 {
        return 0;
    }
    let gcd = |mut a: u32, mut b: u32| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut p = ((f64::from(n) * 0.618) as u32).max(1);
    while gcd(p, n) != 1 {
        p += 1;
    }
    p
}

/// One loaded object whose tables hold `n` roomy and `n` tight identities, each with its own
/// IPv6 binding; the rotator steps over the `n` sources of a set.
struct Spread {
    n: u32,
    ebpf: Ebpf,
    tables: KernelTables,
    next: ProgramArray<MapData>,
    fill_s: f64,
}

impl Spread {
    fn new(n: u32) -> Spread {
        let identities = 2 * n + 1;
        let bindings = (2 * n).max(16);
        let mut l = EbpfLoader::new();
        loader::configure_kernel_log(&mut l, KernelLog::Off);
        l.map_max_entries(map_names::IDENTITIES, identities)
            .map_max_entries(map_names::BUCKETS, identities)
            .map_max_entries(map_names::IDENTITY_COUNTERS, identities)
            .map_max_entries(map_names::BIND_V6, bindings);
        let mut ebpf = l.load(object::bytes()).expect("loading the object");
        for name in [
            program_names::XDP,
            program_names::NOOP,
            PARSE,
            LOOKUP,
            program_names::BENCH_ROTATE,
        ] {
            loader::xdp_program(&mut ebpf, name)
                .expect("program")
                .load()
                .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        }
        let fd = |ebpf: &Ebpf, name: &str| {
            let data = match ebpf.map(name) {
                Some(Map::Array(d) | Map::HashMap(d)) => d,
                _ => panic!("no array or hash map {name}"),
            };
            data.fd().as_fd().try_clone_to_owned().expect("dup")
        };
        let (ids_fd, buckets_fd, bind_fd) = (
            fd(&ebpf, map_names::IDENTITIES),
            fd(&ebpf, map_names::BUCKETS),
            fd(&ebpf, map_names::BIND_V6),
        );
        let mut spread: aya::maps::Array<MapData, u32> = ebpf
            .take_map(program_names::BENCH_SPREAD)
            .expect("BENCH_SPREAD")
            .try_into()
            .expect("array");
        spread.set(0, n, 0).expect("N");
        spread.set(1, stride(n), 0).expect("P");
        let next: ProgramArray<MapData> = ebpf
            .take_map(program_names::BENCH_NEXT)
            .expect("BENCH_NEXT")
            .try_into()
            .expect("program array");
        let mut tables = KernelTables::from_ebpf(&mut ebpf).expect("policy maps");
        endpoints(&mut tables);

        let t = Instant::now();
        let roomy = identity_record(Class::Customer, 1, 0, &ROOMY);
        let tight = identity_record(Class::Customer, 1, 0, &TIGHT);
        let ids: Vec<(u32, Identity)> = (1..=n)
            .map(|i| (i, roomy))
            .chain((n + 1..=2 * n).map(|i| (i, tight)))
            .collect();
        update_batch(ids_fd.as_fd(), &ids).expect("identities");
        let ahead = boot_ns() + 86_400 * 1_000_000_000;
        let full: Vec<(u32, Bucket)> = (n + 1..=2 * n)
            .map(|i| {
                (
                    i,
                    Bucket {
                        pkt_tat: ahead,
                        byte_tat: 0,
                    },
                )
            })
            .collect();
        update_batch(buckets_fd.as_fd(), &full).expect("buckets");
        let binding = |identity| Binding {
            identity,
            _pad: 0,
            expires_ns: 0,
        };
        let binds: Vec<([u8; 16], Binding)> = (0..n)
            .map(|i| (src6(SET_BOUND, i), binding(1 + i)))
            .chain((0..n).map(|i| (src6(SET_LIMITED, i), binding(n + 1 + i))))
            .collect();
        update_batch(bind_fd.as_fd(), &binds).expect("bindings");
        let fill_s = t.elapsed().as_secs_f64();
        Spread {
            n,
            ebpf,
            tables,
            next,
            fill_s,
        }
    }

    fn target(&mut self, program: &'static str) -> ProgramFd {
        loader::xdp_program(&mut self.ebpf, program)
            .expect("program")
            .fd()
            .expect("fd")
            .try_clone()
            .expect("dup")
    }

    /// One BPF_PROG_TEST_RUN of the rotator handing `frame` to `program`; the frame it
    /// hands back and the mean ns per run.
    fn run(&mut self, program: &'static str, frame: &[u8], repeat: u32) -> (Vec<u8>, f64, u32) {
        let fd = self.target(program);
        self.next.set(0, &fd, 0).expect("BENCH_NEXT");
        let rot = loader::xdp_program(&mut self.ebpf, program_names::BENCH_ROTATE).expect("rot");
        let mut out = vec![0u8; frame.len() + 256];
        let r = rot
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .expect("test run");
        out.truncate(r.data_size_out as usize);
        (out, r.duration.as_nanos() as f64, r.return_value)
    }

    fn reason_packets(&self, reason: Reason) -> u64 {
        counter_read::reason_endpoint_totals(self.tables.reason_counters())
            .expect("counters")
            .iter()
            .filter(|(r, _, _)| *r == reason)
            .map(|(_, _, c)| c.packets)
            .sum()
    }
}

/// How a path is checked before it is timed.
#[derive(Clone, Copy)]
enum Expect {
    /// Every run counted under this reason.
    Reason(Reason),
    /// A program that counts nothing: its verdict.
    Verdict(Verdict),
}

struct OneKeyPath {
    name: String,
    key: String,
    program: &'static str,
    packet: Vec<u8>,
    verdict: Verdict,
}

struct SpreadPath {
    name: &'static str,
    key: &'static str,
    program: &'static str,
    set: u8,
    port: u16,
    expect: Expect,
}

const SPREAD_PATHS: [SpreadPath; 8] = [
    SpreadPath {
        name: "rotator + no-op (baseline)",
        key: "noop",
        program: program_names::NOOP,
        set: SET_BOUND,
        port: OPEN_PORT,
        expect: Expect::Verdict(Verdict::Pass),
    },
    SpreadPath {
        name: "unprotected pass (tcp/22)",
        key: "unprotected",
        program: program_names::XDP,
        set: SET_BOUND,
        port: 22,
        expect: Expect::Reason(Reason::Unprotected),
    },
    SpreadPath {
        name: "bound pass (in budget)",
        key: "bound",
        program: program_names::XDP,
        set: SET_BOUND,
        port: OPEN_PORT,
        expect: Expect::Reason(Reason::Bound),
    },
    SpreadPath {
        name: "over-limit drop",
        key: "over_limit",
        program: program_names::XDP,
        set: SET_LIMITED,
        port: OPEN_PORT,
        expect: Expect::Reason(Reason::PacketRate),
    },
    SpreadPath {
        name: "unbound drop",
        key: "unbound",
        program: program_names::XDP,
        set: SET_UNBOUND,
        port: OPEN_PORT,
        expect: Expect::Reason(Reason::Unbound),
    },
    SpreadPath {
        name: "isolation drop (class not allowed)",
        key: "isolation",
        program: program_names::XDP,
        set: SET_BOUND,
        port: INTERNAL_PORT,
        expect: Expect::Reason(Reason::Isolation),
    },
    SpreadPath {
        name: "component: parser only",
        key: "parse",
        program: PARSE,
        set: SET_BOUND,
        port: OPEN_PORT,
        expect: Expect::Reason(Reason::Unprotected),
    },
    SpreadPath {
        // bench_lookup counts Unprotected only when the lookup finds the binding.
        name: "component: parser + hash lookup (BIND_V6)",
        key: "lookup",
        program: LOOKUP,
        set: SET_BOUND,
        port: OPEN_PORT,
        expect: Expect::Reason(Reason::Unprotected),
    },
];

fn component_label(name: &str) -> String {
    match name {
        "bench_parse" => "component: parser only".into(),
        "bench_clock" => "component: parser + precise clock read".into(),
        "bench_coarse_clock" => "component: parser + coarse clock read".into(),
        "bench_lookup" => "component: parser + binding lookup".into(),
        other => format!("component: {other}"),
    }
}

fn fmt_n(n: u32) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn main() {
    tollgate_tests::require_root();
    for c in [PARSE, LOOKUP] {
        assert!(
            program_names::BENCH_COMPONENTS.contains(&c),
            "{c} is no longer a component program"
        );
    }
    let quick = quick();
    let rounds = if quick { 4 } else { 5 };
    let sizes: &[u32] = if quick {
        &[1, 10_000]
    } else {
        &[1, 10_000, 100_000, 1_000_000]
    };
    let mut figures = Figures::default();

    // The one-key object: the object's own sizes, as the agent loads it.
    let mut ebpf = loader::load_with_bench_components().expect("loading the program");
    let mut tables = KernelTables::from_ebpf(&mut ebpf).expect("policy maps");
    one_key_setup(&mut tables);
    let pass = Verdict::Pass;
    let mut one_key = vec![
        OneKeyPath {
            name: "no-op XDP program (baseline)".into(),
            key: "noop".into(),
            program: program_names::NOOP,
            packet: frame(BOUND, OPEN_PORT),
            verdict: pass,
        },
        OneKeyPath {
            name: "unprotected pass (tcp/22)".into(),
            key: "unprotected".into(),
            program: program_names::XDP,
            packet: frame(STRANGER, 22),
            verdict: Reason::Unprotected.verdict(),
        },
        OneKeyPath {
            name: "bound pass (in budget)".into(),
            key: "bound".into(),
            program: program_names::XDP,
            packet: frame(BOUND, OPEN_PORT),
            verdict: Reason::Bound.verdict(),
        },
        OneKeyPath {
            name: "over-limit drop".into(),
            key: "over_limit".into(),
            program: program_names::XDP,
            packet: frame(LIMITED, OPEN_PORT),
            verdict: Reason::PacketRate.verdict(),
        },
        OneKeyPath {
            name: "unbound drop".into(),
            key: "unbound".into(),
            program: program_names::XDP,
            packet: frame(STRANGER, OPEN_PORT),
            verdict: Reason::Unbound.verdict(),
        },
        OneKeyPath {
            name: "isolation drop (class not allowed)".into(),
            key: "isolation".into(),
            program: program_names::XDP,
            packet: frame(BOUND, INTERNAL_PORT),
            verdict: Reason::Isolation.verdict(),
        },
    ];
    for name in program_names::BENCH_COMPONENTS {
        one_key.push(OneKeyPath {
            name: component_label(name),
            key: name.into(),
            program: name,
            packet: frame(BOUND, OPEN_PORT),
            verdict: pass,
        });
    }
    // Warm-up, which also checks that each path takes the branch it is named for.
    for p in &one_key {
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

    // The spread objects, one per size, all loaded at once so that the rounds interleave
    // every size too.
    let mut spreads: Vec<Spread> = sizes
        .iter()
        .map(|&n| {
            eprintln!("[bench_xdp] loading and filling the tables for {n} identities");
            Spread::new(n)
        })
        .collect();
    // The premise: the kernel runs every repeat on the same buffer, so the rotator's index
    // after R runs is R·P mod N (were it reset each run, it would be P).
    let mut reuse_checked = Vec::new();
    for s in &mut spreads {
        let (n, p) = (s.n, stride(s.n));
        let repeat = 1000u32;
        let (out, _, _) = s.run(program_names::NOOP, &frame6(SET_BOUND, OPEN_PORT), repeat);
        let got = u32::from_be_bytes(out[34..38].try_into().expect("4 bytes"));
        let want = ((u64::from(repeat) * u64::from(p)) % u64::from(n.max(1))) as u32;
        assert_eq!(
            got, want,
            "N={n}: the rotator's index after {repeat} runs is {got}, not {want}: the kernel \
             does not reuse the frame across repeats, so the spread rows would measure one key"
        );
        reuse_checked.push(n);
    }
    // Each path's verdict over all N sources (a full cycle of the rotation).
    for s in &mut spreads {
        let repeat = s.n.max(1000);
        for p in &SPREAD_PATHS {
            let before = match p.expect {
                Expect::Reason(r) => s.reason_packets(r),
                Expect::Verdict(_) => 0,
            };
            let (_, _, ret) = s.run(p.program, &frame6(p.set, p.port), repeat);
            match p.expect {
                Expect::Reason(r) => {
                    let moved = s.reason_packets(r) - before;
                    assert_eq!(
                        moved,
                        u64::from(repeat),
                        "N={}: {}: {moved} of {repeat} runs counted as {r:?}",
                        s.n,
                        p.name
                    );
                }
                Expect::Verdict(v) => assert_eq!(ret, v as u32, "N={}: {}", s.n, p.name),
            }
        }
    }

    // Rounds interleave every path of every table; each path's figure is taken against its
    // baseline within its round, so drift in the machine's speed cancels out.
    let mut ok_ns: Vec<Vec<f64>> = vec![Vec::new(); one_key.len()];
    let mut ok_ratio: Vec<Vec<f64>> = vec![Vec::new(); one_key.len()];
    let mut ok_added: Vec<Vec<f64>> = vec![Vec::new(); one_key.len()];
    let mut sp_ns = vec![vec![Vec::new(); SPREAD_PATHS.len()]; spreads.len()];
    let mut sp_added = vec![vec![Vec::new(); SPREAD_PATHS.len()]; spreads.len()];
    let started = Instant::now();
    for round in 0..rounds {
        let mut this = Vec::new();
        for p in &one_key {
            let prog = loader::xdp_program(&mut ebpf, p.program).expect("program");
            let mut out = vec![0u8; p.packet.len() + 256];
            let d = prog
                .test_run(TestRunOptions {
                    data_in: Some(&p.packet),
                    data_out: Some(&mut out),
                    repeat: REPEAT,
                    ..Default::default()
                })
                .expect("test run")
                .duration;
            this.push(d.as_nanos() as f64);
        }
        for (i, t) in this.iter().enumerate() {
            ok_ns[i].push(*t);
            ok_ratio[i].push(t / this[0].max(1.0));
            ok_added[i].push(t - this[0]);
        }
        for (si, s) in spreads.iter_mut().enumerate() {
            let mut this = Vec::new();
            for p in &SPREAD_PATHS {
                let (_, ns, _) = s.run(p.program, &frame6(p.set, p.port), REPEAT);
                this.push(ns);
            }
            for (i, t) in this.iter().enumerate() {
                sp_ns[si][i].push(*t);
                sp_added[si][i].push(t - this[0]);
            }
        }
        eprintln!(
            "[bench_xdp] round {}/{rounds} ({:.0} s)",
            round + 1,
            started.elapsed().as_secs_f64()
        );
    }

    println!("### One key (IPv4, one frame per path)");
    println!();
    println!("| path | ns/packet | IQR | + ns over no-op | × no-op (same round) |");
    println!("|---|---:|---:|---:|---:|");
    for (i, p) in one_key.iter().enumerate() {
        let (q1, q3) = quartiles(&ok_ns[i]);
        let (m, a, r) = (
            median(&ok_ns[i]),
            median(&ok_added[i]),
            median(&ok_ratio[i]),
        );
        println!(
            "| {} | {m:.0} | {q1:.0}–{q3:.0} | {a:+.0} | {r:.2} |",
            p.name
        );
        figures.set(format!("xdp.one.{}.ns", p.key), m);
        figures.set(format!("xdp.one.{}.added_ns", p.key), a);
        figures.set(format!("xdp.one.{}.ratio", p.key), r);
    }
    println!();
    println!(
        "Medians of {rounds} rounds; each measurement is one BPF_PROG_TEST_RUN of {REPEAT} runs; \
         IQR: the middle half of the rounds."
    );
    println!();

    println!("### Spread over N identities (IPv6, a different bound source every run)");
    println!();
    print!("| path |");
    for s in &spreads {
        print!(" N = {} |", fmt_n(s.n));
    }
    println!();
    print!("|---|");
    for _ in &spreads {
        print!("---:|");
    }
    println!();
    for (i, p) in SPREAD_PATHS.iter().enumerate() {
        print!("| {} |", p.name);
        for (si, s) in spreads.iter().enumerate() {
            let m = median(&sp_ns[si][i]);
            let a = median(&sp_added[si][i]);
            let (q1, q3) = quartiles(&sp_added[si][i]);
            if i == 0 {
                print!(" {m:.0} |");
            } else {
                print!(" {a:+.0} ({q1:+.0}…{q3:+.0}) |");
            }
            figures.set(format!("xdp.spread.{}.{}.ns", p.key, s.n), m);
            figures.set(format!("xdp.spread.{}.{}.added_ns", p.key, s.n), a);
        }
        println!();
    }
    println!();
    println!(
        "First row: ns/packet of the rotator tail-calling the no-op program. Other rows: ns per \
         packet added over that row in the same round (median, and the middle half of the \
         rounds in brackets): the path's own cost minus the no-op's. The bare hash lookup is \
         the last row minus the parser row. Medians of {rounds} rounds of {REPEAT} runs. The \
         kernel's reuse of one frame across repeats, which the rotation relies on, was checked \
         at every N ({}).",
        reuse_checked
            .iter()
            .map(|n| fmt_n(*n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    print!(
        "Filling the tables (2 N identities, N limiter states, 2 N bindings, BPF_MAP_UPDATE_BATCH):"
    );
    for s in &spreads {
        print!(" N = {}: {:.2} s;", fmt_n(s.n), s.fill_s);
        figures.set(format!("xdp.spread.fill_s.{}", s.n), s.fill_s);
    }
    println!();
    println!();

    println!("| program | verifier: processed instructions | translated size (bytes) |");
    println!("|---|---:|---:|");
    for name in [
        program_names::XDP,
        program_names::XDP_L3,
        program_names::NOOP,
    ] {
        let info = loader::xdp_program(&mut ebpf, name)
            .expect("program")
            .info()
            .expect("program info");
        let insns = info.verified_instruction_count().unwrap_or(0);
        println!(
            "| {name} | {insns} | {} |",
            info.size_translated().unwrap_or(0)
        );
        figures.set(format!("xdp.verifier.{name}"), f64::from(insns));
    }
    figures.set("xdp.rounds", rounds as f64);
    figures.write("bench_xdp");
}
