//! Enforcement verdicts through BPF_PROG_TEST_RUN: the shared decision table
//! (`tollgate_common::decide_cases`: endpoints, bindings (exact, CIDR, expired), isolation,
//! quarantine, packet and byte budgets, cost weights, throttling, quotas, hold-back, pressure,
//! anonymous prefixes and fragments), each case checking its verdict, its (reason, endpoint)
//! counter and the charged identity's counters; then what only the kernel has: a full binding
//! map, the verifier's instruction count, sampled drop events.

use tollgate_common::{
    Reason::{self, *},
    decide_cases::{self, ep::INFER, id::*, tcp4, v4},
    limiter,
};
use tollgate_tests::fixture::{Case, Harness};

/// A harness with the shared enforcement world installed.
fn setup() -> Harness {
    let mut h = Harness::new();
    h.install(&decide_cases::enforcement().world);
    h
}

/// Every table of `tollgate_common::decide_cases` (which the host tests of `decide` run
/// too), each on a freshly loaded program.
#[test]
fn enforcement_verdicts_and_counters() {
    for table in decide_cases::tables() {
        let mut h = Harness::new();
        h.install(&table.world);
        let total = h.run_steps(&table.steps);
        assert!(total >= 60, "{}: only {total} cases", table.name);
    }
}

#[test]
fn a_full_binding_map_refuses_and_keeps_what_it_has() {
    // Fill the IPv4 CIDR trie (the smallest binding map) and check that one more is refused
    // with a clear error while the first binding still works.
    let mut h = setup();
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
    h.run_table(&[Case::expect(
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
        (tollgate_common::program_names::XDP_L3, 150_000),
        (tollgate_common::program_names::FLOW, 150_000),
        (tollgate_common::program_names::FLOW_L3, 150_000),
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
    // The egress classifiers (`loader::load` loads them with the XDP programs).
    for name in [
        tollgate_common::program_names::EGRESS,
        tollgate_common::program_names::EGRESS_L3,
    ] {
        let tc: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(name)
            .expect("egress program")
            .try_into()
            .expect("a classifier");
        let processed = tc
            .info()
            .expect("program info")
            .verified_instruction_count()
            .expect("verified instructions");
        eprintln!("{name}: verifier processed {processed} instructions");
        assert!(processed > 0 && processed <= 150_000, "{name}: {processed}");
    }
}

/// Drops are sampled into the ring buffer: at most one event per CPU per interval, none when
/// the interval is 0, and each event says who was dropped where and why.
#[test]
fn drop_events_are_sampled() {
    let mut h = setup();
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

/// Runs `frame` `repeat` times through the enforcing program for an identity charging
/// 1 000 000 packets/s with a one-packet burst (1 µs per packet, 1 µs tolerance: a plan the
/// agent would put on the precise clock), with or without `ID_PRECISE_CLOCK`; returns the
/// packets it passed and the CLOCK_MONOTONIC time the whole run spanned.
fn charge_a_tight_plan(precise: bool, repeat: u32) -> (u64, u64) {
    use aya::programs::{TestRun as _, TestRunOptions};
    use tollgate::{kernel_clock, loader};
    use tollgate_common::{
        policy::{ID_PRECISE_CLOCK, PlanLimits},
        program_names,
    };

    let mut h = setup();
    let limits = PlanLimits {
        packets_per_s: Some(1_000_000),
        packet_burst: 1,
        bytes_per_s: None,
        byte_burst: 0,
    };
    let mut rec = h.tables.identity(CUSTOMER).expect("identity");
    rec.limits = limits.to_kernel();
    if precise {
        rec.flags |= ID_PRECISE_CLOCK;
    } else {
        rec.flags &= !ID_PRECISE_CLOCK;
    }
    h.tables.set_identity(CUSTOMER, &rec).expect("identity");
    let before = h.tables.identity_counters(CUSTOMER).expect("counters");
    let frame = tcp4(v4(1, CUSTOMER as u8), 8000, 80);
    let prog = loader::xdp_program(&mut h.ebpf, program_names::XDP).expect("program");
    let mut out = vec![0u8; frame.len() + 256];
    let start = kernel_clock::now_ns();
    prog.test_run(TestRunOptions {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })
    .expect("BPF_PROG_TEST_RUN");
    let spanned = kernel_clock::now_ns() - start;
    let after = h.tables.identity_counters(CUSTOMER).expect("counters");
    (after.passed.packets - before.passed.packets, spanned)
}

/// Which clock the program reads, seen in what it admits. A 1 µs budget with a 1 µs
/// tolerance admits one packet per distinct reading of its clock at most (the reading must
/// reach the TAT): on the coarse clock, which moves once per tick, that is at most one per
/// tick the run spanned (+2 for the ticks it starts and ends in); on the precise clock, one
/// per microsecond of the run, far more. The tick is the agent's own measurement.
#[test]
fn a_coarse_identity_reads_the_coarse_clock_and_a_flagged_one_the_precise_clock() {
    let tick = tollgate::kernel_clock::tick().ns;
    // 200 000 runs of a bound packet take milliseconds: several ticks, thousands of µs.
    let repeat = 200_000;
    let (coarse, spanned) = charge_a_tight_plan(false, repeat);
    let ticks = spanned / tick + 2;
    eprintln!("coarse: {coarse} passed over {spanned} ns ({ticks} ticks at most)");
    assert!(coarse >= 1, "the first packet conforms");
    assert!(
        coarse <= ticks,
        "coarse identity passed {coarse} in {spanned} ns: more than one per {tick} ns tick"
    );
    let (precise, spanned) = charge_a_tight_plan(true, repeat);
    let ticks = spanned / tick + 2;
    eprintln!("precise: {precise} passed over {spanned} ns ({ticks} ticks)");
    assert!(
        precise > 4 * ticks && precise >= 100,
        "precise identity passed only {precise} in {spanned} ns: the coarse clock's count"
    );
    assert!(
        precise <= spanned / 1000 + 2,
        "more than one per µs: {precise}"
    );
}

/// Pins made before #15 hold CLOCK_BOOTTIME TATs: adopted on a machine that has been
/// suspended, they move back by the time suspended, once, idle ones stay idle, and the
/// settings then say so (`SET_MONOTONIC_TATS`), so a second adoption moves nothing.
#[test]
fn boottime_tats_of_older_pins_move_back_once() {
    use tollgate::kernel_clock;
    use tollgate_common::{
        decide::AnonPrefix,
        policy::{SET_MONOTONIC_TATS, Settings},
    };

    let mut h = setup();
    // Charge a bound identity and an anonymous /24, so both kinds of TAT are set.
    h.run(&tcp4(v4(1, CUSTOMER as u8), 8000, 80));
    h.run(&tcp4(v4(20, 1), 8443, 80));
    let prefix = AnonPrefix::V4([198, 18, 20, 0]);
    let bucket = h.tables.bucket(CUSTOMER).expect("bucket");
    let anon = h.tables.anon_tat(&prefix).expect("anon").expect("charged");
    assert!(bucket.pkt_tat > 0 && anon > 0, "{bucket:?} {anon}");
    let idle = h.tables.bucket(PARTNER_NO_ROLE).expect("bucket");
    assert_eq!(idle.pkt_tat, 0);

    let second = 1_000_000_000;
    let moved = h.tables.shift_tats_back(second).expect("shift");
    assert!(moved >= 2, "moved {moved}");
    assert_eq!(
        h.tables.bucket(CUSTOMER).unwrap().pkt_tat,
        bucket.pkt_tat - second
    );
    assert_eq!(
        h.tables.anon_tat(&prefix).unwrap(),
        Some(anon - second),
        "anonymous TAT"
    );
    assert_eq!(
        h.tables.bucket(PARTNER_NO_ROLE).unwrap(),
        idle,
        "an idle bucket stays idle"
    );

    // The settings step: this machine has not been suspended (or the offset is tiny), so
    // nothing moves, and the flag is set either way.
    let mut s = Settings::default();
    kernel_clock::settle_settings(&mut h.tables, &mut s).expect("settle");
    assert_ne!(s.flags & SET_MONOTONIC_TATS, 0);
    let offset = tollgate::tables::boot_ns().saturating_sub(kernel_clock::now_ns());
    if offset < 1_000_000 {
        assert_eq!(
            h.tables.bucket(CUSTOMER).unwrap().pkt_tat,
            bucket.pkt_tat - second
        );
    }
    // Flagged settings never shift again.
    let before = h.tables.bucket(CUSTOMER).unwrap();
    kernel_clock::settle_settings(&mut h.tables, &mut s).expect("settle");
    assert_eq!(h.tables.bucket(CUSTOMER).unwrap(), before);
}
