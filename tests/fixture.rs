//! Table-driven packet fixtures: each case is a frame, the verdict it must get and the counter
//! it must land in. A case passes only when the verdict matches and exactly one packet of the
//! frame's length moved into the expected reason's counter, and nothing else moved.

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use tollgate::{counters, loader};
use tollgate_common::{Counter, Reason, Verdict, program_names};

/// One row of a fixture table.
pub struct Case {
    pub desc: String,
    pub packet: Vec<u8>,
    pub verdict: Verdict,
    pub reason: Reason,
}

impl Case {
    pub fn new(desc: impl Into<String>, packet: Vec<u8>, verdict: Verdict, reason: Reason) -> Self {
        Case {
            desc: desc.into(),
            packet,
            verdict,
            reason,
        }
    }
}

fn totals(ebpf: &Ebpf) -> Vec<(Reason, Counter)> {
    let map = loader::reason_counters(ebpf).expect("counter map");
    counters::reason_totals(&map).expect("reading counters")
}

/// Runs one frame through the program once; returns the raw return value.
pub fn run_once(ebpf: &mut Ebpf, packet: &[u8]) -> u32 {
    let prog = loader::xdp_program(ebpf, program_names::XDP).expect("program");
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

/// Runs every case and collects every mismatch, so one run shows all failures.
pub fn run_table(ebpf: &mut Ebpf, cases: &[Case]) {
    let mut failures = Vec::new();
    let mut failed_cases = 0;
    for case in cases {
        let failures_before = failures.len();
        let before = totals(ebpf);
        let ret = run_once(ebpf, &case.packet);
        let after = totals(ebpf);
        if ret == Verdict::Aborted as u32 {
            failures.push(format!("{}: XDP_ABORTED", case.desc));
            failed_cases += 1;
            continue;
        }
        if ret != case.verdict as u32 {
            failures.push(format!(
                "{}: verdict {:?}, expected {:?}",
                case.desc,
                Verdict::from_u32(ret),
                case.verdict
            ));
        }
        for ((reason, b), (_, a)) in before.iter().zip(after.iter()) {
            let moved = (a.packets - b.packets, a.bytes - b.bytes);
            let expected = if *reason == case.reason {
                (1, case.packet.len() as u64)
            } else {
                (0, 0)
            };
            if moved != expected {
                failures.push(format!(
                    "{}: counter {} moved by {:?} (packets, bytes), expected {:?}",
                    case.desc,
                    reason.label(),
                    moved,
                    expected
                ));
            }
        }
        if failures.len() > failures_before {
            failed_cases += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixture cases failed:\n{}",
        failed_cases,
        cases.len(),
        failures.join("\n")
    );
}
