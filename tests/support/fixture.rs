//! Table-driven packet fixtures through BPF_PROG_TEST_RUN. A case passes only when the verdict
//! matches, exactly one packet of the frame's length moved into the expected (reason,
//! endpoint) counter and nowhere else, and the expected identity's passed or dropped counter
//! moved by that packet while no other watched identity's did.

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use std::net::{Ipv4Addr, Ipv6Addr};

use tollgate::{
    counter_read, kernel_clock, loader,
    tables::{EndpointSpec, KernelTables, PlanLimits, Proto, identity_record},
};
use tollgate_common::{
    Counter, Reason, Verdict,
    decide_cases::{self, Slot, Step, World},
    parse::IPPROTO_UDP,
    policy::IdentityCounters,
    program_names,
};

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

impl From<&decide_cases::Case> for Case {
    /// A row of the shared decision table (`tollgate_common::decide_cases`).
    fn from(c: &decide_cases::Case) -> Case {
        Case::expect(
            c.desc.clone(),
            c.packet.clone(),
            c.reason,
            c.endpoint,
            c.identity,
        )
    }
}

/// The loaded program and its tables.
pub struct Harness {
    pub ebpf: Ebpf,
    pub tables: KernelTables,
    /// Identities whose counters every case checks.
    pub watched: Vec<u32>,
}

impl Harness {
    pub fn new() -> Self {
        crate::require_root();
        let mut ebpf = loader::load().expect("loading the program");
        let tables = KernelTables::from_ebpf(&mut ebpf).expect("policy maps");
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
        counter_read::reason_endpoint_totals(self.tables.reason_counters()).expect("counters")
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

    /// Writes a shared-table world into the kernel's maps through the agent's own API
    /// (`EndpointSpec`, `identity_record`, `bind`), and watches every identity in it.
    pub fn install(&mut self, world: &World) {
        for ep in &world.endpoints {
            let spec = EndpointSpec {
                proto: if ep.proto == IPPROTO_UDP {
                    Proto::Udp
                } else {
                    Proto::Tcp
                },
                ports: ep.ports.clone(),
                v4_prefix: ep.v4_prefix.map(|(a, len)| (Ipv4Addr::from(a), len)),
                v6_prefix: ep.v6_prefix.map(|(a, len)| (Ipv6Addr::from(a), len)),
                weight: f64::from(ep.weight_q8) / 256.0,
                allowed_classes: ep.classes.clone(),
                roles: ep.roles,
                anonymous: ep.anonymous,
            };
            self.tables.set_endpoint(ep.id, &spec).expect("endpoint");
        }
        for id in &world.identities {
            let limits = PlanLimits {
                packets_per_s: id.limits.packets_per_s,
                packet_burst: id.limits.packet_burst,
                bytes_per_s: id.limits.bytes_per_s,
                byte_burst: id.limits.byte_burst,
            };
            let mut rec = identity_record(id.class, id.roles, id.plan, &limits);
            rec.throttle_q8 = id.throttle_q8;
            rec.response_q8 = id.response_q8;
            match id.slot {
                Slot::Active(flags) => rec.flags |= flags,
                Slot::Inactive => rec.flags = 0,
                Slot::Vacant => continue,
            }
            self.tables.set_identity(id.id, &rec).expect("identity");
        }
        let now = kernel_clock::now_ns();
        for b in &world.bindings {
            self.tables
                .bind(b.addr, b.len, b.identity, b.expiry.ns(now))
                .expect("binding");
        }
        for &(endpoint, plan, q8) in &world.hold_backs {
            self.tables
                .set_hold_back(endpoint, plan, q8)
                .expect("hold-back");
        }
        self.tables
            .set_settings(&world.settings())
            .expect("settings");
        self.watched = world.watched();
    }

    /// Runs a shared table's steps in order (pressure changes included), collecting every
    /// mismatch; returns how many cases ran.
    pub fn run_steps(&mut self, steps: &[Step]) -> usize {
        let mut failures = Vec::new();
        let (mut cases, mut failed_cases) = (0, 0);
        for step in steps {
            match step {
                Step::Pressure(q8) => {
                    let mut s = self.tables.settings().expect("settings");
                    s.pressure_q8 = *q8;
                    self.tables.set_settings(&s).expect("settings");
                }
                Step::Expect(case) => {
                    let n = failures.len();
                    self.check(&Case::from(case), &mut failures);
                    cases += 1;
                    if failures.len() > n {
                        failed_cases += 1;
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{failed_cases} of {cases} fixture cases failed:\n{}",
            failures.join("\n")
        );
        cases
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
