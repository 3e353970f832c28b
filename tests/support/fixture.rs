//! Table-driven packet fixtures through BPF_PROG_TEST_RUN. A case passes only when the verdict
//! matches, exactly one packet of the frame's length moved into the expected (reason,
//! endpoint) counter and nowhere else, and the expected identity's passed or dropped counter
//! moved by that packet while no other watched identity's did.

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use tollgate::{counters, loader, tables::Tables};
use tollgate_common::{Counter, Reason, Verdict, policy::IdentityCounters, program_names};

/// One row of a fixture table.
pub struct Case {
    pub desc: String,
    pub packet: Vec<u8>,
    pub verdict: Verdict,
    pub reason: Reason,
    /// Endpoint id the packet is counted under (0: none).
    pub endpoint: u32,
    /// Identity charged, if any (0: the anonymous identity).
    pub identity: Option<u32>,
}

impl Case {
    /// A case that touches no endpoint and no identity (parser-level verdicts).
    pub fn new(desc: impl Into<String>, packet: Vec<u8>, verdict: Verdict, reason: Reason) -> Self {
        Case {
            desc: desc.into(),
            packet,
            verdict,
            reason,
            endpoint: 0,
            identity: None,
        }
    }

    /// The verdict follows from the reason.
    pub fn expect(
        desc: impl Into<String>,
        packet: Vec<u8>,
        reason: Reason,
        endpoint: u32,
        identity: Option<u32>,
    ) -> Self {
        Case {
            desc: desc.into(),
            packet,
            verdict: reason.verdict(),
            reason,
            endpoint,
            identity,
        }
    }
}

/// The loaded program and its tables.
pub struct Harness {
    pub ebpf: Ebpf,
    pub tables: Tables,
    /// Identities whose counters every case checks.
    pub watched: Vec<u32>,
}

impl Harness {
    pub fn new() -> Self {
        crate::require_root();
        let mut ebpf = loader::load().expect("loading the program");
        let tables = Tables::from_ebpf(&mut ebpf).expect("policy maps");
        Harness {
            ebpf,
            tables,
            watched: vec![0],
        }
    }

    /// Runs one frame through the program `repeat` times; returns the raw return value.
    pub fn run(&mut self, packet: &[u8]) -> u32 {
        let prog = loader::xdp_program(&mut self.ebpf, program_names::XDP).expect("program");
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    fn reason_totals(&self) -> Vec<(Reason, u32, Counter)> {
        counters::reason_endpoint_totals(self.tables.reason_counters()).expect("counters")
    }

    fn identity_totals(&self) -> Vec<(u32, IdentityCounters)> {
        self.watched
            .iter()
            .map(|id| {
                (
                    *id,
                    self.tables
                        .identity_counters(*id)
                        .expect("identity counters"),
                )
            })
            .collect()
    }

    /// Runs every case and collects every mismatch, so one run shows all failures.
    pub fn run_table(&mut self, cases: &[Case]) {
        let mut failures = Vec::new();
        let mut failed_cases = 0;
        for case in cases {
            let n = failures.len();
            self.check(case, &mut failures);
            if failures.len() > n {
                failed_cases += 1;
            }
        }
        assert!(
            failures.is_empty(),
            "{failed_cases} of {} fixture cases failed:\n{}",
            cases.len(),
            failures.join("\n")
        );
    }

    fn check(&mut self, case: &Case, failures: &mut Vec<String>) {
        let len = case.packet.len() as u64;
        let before = self.reason_totals();
        let ids_before = self.identity_totals();
        let ret = self.run(&case.packet);
        let after = self.reason_totals();
        let ids_after = self.identity_totals();
        if ret == Verdict::Aborted as u32 {
            failures.push(format!("{}: XDP_ABORTED", case.desc));
            return;
        }
        if ret != case.verdict as u32 {
            failures.push(format!(
                "{}: verdict {:?}, expected {:?}",
                case.desc,
                Verdict::from_u32(ret),
                case.verdict
            ));
        }
        // Every (reason, endpoint) slot that moved, and by how much.
        let mut moved: Vec<(Reason, u32, u64, u64)> = Vec::new();
        for (r, ep, a) in &after {
            let b = before
                .iter()
                .find(|(br, bep, _)| br == r && bep == ep)
                .map(|(_, _, c)| *c)
                .unwrap_or_default();
            if a.packets != b.packets || a.bytes != b.bytes {
                moved.push((*r, *ep, a.packets - b.packets, a.bytes - b.bytes));
            }
        }
        let expected = vec![(case.reason, case.endpoint, 1, len)];
        if moved != expected {
            failures.push(format!(
                "{}: counters moved {:?} (reason, endpoint, packets, bytes), expected {:?}",
                case.desc, moved, expected
            ));
        }
        for ((id, b), (_, a)) in ids_before.iter().zip(ids_after.iter()) {
            let d = |x: &Counter, y: &Counter| (y.packets - x.packets, y.bytes - x.bytes);
            let got = (d(&b.passed, &a.passed), d(&b.dropped, &a.dropped));
            let want = match case.identity {
                Some(i) if i == *id && case.verdict == Verdict::Pass => ((1, len), (0, 0)),
                Some(i) if i == *id => ((0, 0), (1, len)),
                _ => ((0, 0), (0, 0)),
            };
            if got != want {
                failures.push(format!(
                    "{}: identity {id} counters moved (passed, dropped) {:?}, expected {:?}",
                    case.desc, got, want
                ));
            }
        }
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
