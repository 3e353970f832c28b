//! Agent answers for the unit tests of `top`'s parts: two polls 2 s apart. Each answer goes
//! through the wire (serialised as the agent sends it, read as `top` reads it).

use std::time::{Duration, Instant};

use serde::{Serialize, de::DeserializeOwned};
use tollgate::{
    control::reply::{
        EgressTotals, EndpointRow, GpuStatus, IdentityRow, IdentitySource, Status, TokenStatus,
    },
    controller::gpu::GpuReading,
    tables::Proto,
};
use tollgate_common::policy::Class;

use super::model::Snapshot;

fn wire<T: Serialize + DeserializeOwned>(v: T) -> T {
    serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap()
}

pub(super) fn identity(name: &str, passed: u64, dropped: u64) -> IdentityRow {
    wire(IdentityRow {
        id: 1,
        name: name.into(),
        class: Class::Partner,
        plan: "partner".into(),
        roles: vec![],
        source: IdentitySource::Config,
        bindings: vec!["198.19.7.0/24".into()],
        quarantined: None,
        passed_packets: passed,
        passed_bytes: passed * 100,
        dropped_packets: dropped,
        dropped_bytes: dropped * 100,
        clock: None,
        egress: None,
        response_capped: None,
        quota_exhausted: None,
    })
}

/// `row` with egress totals: `response` payload bytes sent back, `answers` times to first
/// byte summing to `ttfb_sum_ms`.
pub(super) fn sent(
    mut row: IdentityRow,
    response: u64,
    ttfb_sum_ms: u64,
    answers: u64,
) -> IdentityRow {
    row.egress = Some(EgressTotals {
        sent_packets: response / 1000,
        sent_bytes: response + response / 20,
        response_bytes: response,
        ttfb_sum_ns: ttfb_sum_ms * 1_000_000,
        ttfb_count: answers,
    });
    wire(row)
}

pub(super) fn endpoint(name: &str, passed: u64, dropped: u64) -> EndpointRow {
    wire(EndpointRow {
        id: 1,
        name: name.into(),
        protocol: Proto::Tcp,
        ports: vec!["8000".into(), "8001-8003".into()],
        weight: 1.0,
        classes: vec![Class::Internal],
        roles: vec![],
        anonymous: false,
        passed_packets: passed,
        dropped_packets: dropped,
    })
}

/// One simulated H100 at 87.5 %, saturating endpoint `model` (also `status`'s example).
pub(in crate::cli) fn saturated_gpu() -> GpuStatus {
    GpuStatus {
        source: "simulated".into(),
        error: None,
        readings: vec![GpuReading {
            index: 0,
            name: "H100".into(),
            utilization: 0.875,
            memory_used_bytes: 40 << 30,
            memory_total_bytes: 80 << 30,
            power_watts: Some(550.0),
        }],
        saturated_endpoints: vec!["model".into()],
        endpoints: vec![tollgate::control::reply::EndpointLoad {
            endpoint: "model".into(),
            source: "gpus".into(),
            pressure: Some(1.1),
            driver: Some("gpu_util".into()),
            signals: vec![tollgate::control::reply::LoadSignal {
                name: "gpu_util".into(),
                value: 0.99,
                at: 0.9,
            }],
            saturated: true,
            model_server: None,
        }],
    }
}

/// `dropped` packets dropped in all, split over three reasons: a tenth `unbound`, the rest
/// `quota_exhausted`, and one `parse_error` that never moves.
pub(super) fn status(passed: u64, dropped: u64, expired: u64) -> Status {
    wire(Status {
        version: "0.1.0".into(),
        config: "/etc/tollgate/tollgate.toml".into(),
        interfaces: vec!["eth0".into()],
        xdp_mode: "auto".into(),
        pin_dir: "/sys/fs/bpf/tollgate".into(),
        adopted_pins: false,
        layout_version: 1,
        uptime_s: 90_061,
        endpoints: 1,
        identities: 4,
        bindings: 3,
        quarantined: vec![],
        response_capped: vec![],
        passed_packets: passed,
        dropped_packets: dropped,
        drops: [
            ("unbound".to_owned(), dropped / 10),
            ("quota_exhausted".to_owned(), dropped - dropped / 10 - 1),
            ("parse_error".to_owned(), 1),
            ("class_not_allowed".to_owned(), 0),
        ]
        .into(),
        gpu: saturated_gpu(),
        anomaly_mode: "observe".into(),
        program: Default::default(),
        fleet: None,
        tables: Default::default(),
        clock: None,
        tokens: Some(TokenStatus {
            keys: vec!["k1".into()],
            verifications: [("ok".to_owned(), 10), ("expired".to_owned(), expired)].into(),
            probable_thefts: 0,
            issuers: vec![],
            unselected_refusals: Default::default(),
        }),
        tunnels: Default::default(),
    })
}

pub(super) fn snap(
    at: Instant,
    status: Status,
    identities: Vec<IdentityRow>,
    endpoints: Vec<EndpointRow>,
) -> Snapshot {
    Snapshot {
        at,
        unix_ms: 1_700_000_000_000,
        status,
        endpoints,
        identities,
    }
}

/// Two polls 2 s apart: "busy" passed 2000 and dropped 10 in between, and was sent 40 000
/// payload bytes and 4 answers 210 ms in all (52.5 ms each); "idle" nothing (no answer:
/// no time to first byte); "new" appeared between them, "reset" had its counters
/// re-created.
pub(super) fn two_polls() -> (Snapshot, Snapshot) {
    let t0 = Instant::now();
    let a = snap(
        t0,
        status(1000, 100, 1),
        vec![
            sent(identity("idle", 5, 0), 700, 30, 1),
            sent(identity("busy", 1000, 0), 10_000, 300, 3),
            identity("reset", 900, 0),
        ],
        vec![endpoint("model", 1000, 100)],
    );
    let b = snap(
        t0 + Duration::from_secs(2),
        status(3000, 110, 5),
        vec![
            sent(identity("idle", 5, 0), 700, 30, 1),
            sent(identity("busy", 3000, 10), 50_000, 510, 7),
            identity("reset", 4, 0),
            identity("new", 50, 0),
        ],
        vec![endpoint("model", 3000, 110)],
    );
    (a, b)
}
