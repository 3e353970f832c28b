//! Agent answers for the unit tests of `top`'s parts: two polls 2 s apart.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::model::Snapshot;

pub(super) fn identity(name: &str, passed: u64, dropped: u64) -> Value {
    json!({
        "id": 1, "name": name, "class": "partner", "plan": "partner", "roles": [],
        "bindings": ["198.19.7.0/24"], "quarantined": null,
        "passed_packets": passed, "passed_bytes": passed * 100,
        "dropped_packets": dropped, "dropped_bytes": dropped * 100,
    })
}

pub(super) fn endpoint(name: &str, passed: u64, dropped: u64) -> Value {
    json!({
        "id": 1, "name": name, "protocol": "tcp", "ports": ["8000", "8001-8003"],
        "weight": 1, "classes": ["internal"], "roles": [], "anonymous": false,
        "packets_passed": passed, "packets_dropped": dropped,
    })
}

pub(super) fn status(passed: u64, dropped: u64, expired: u64) -> Value {
    json!({
        "version": "0.1.0", "interfaces": ["eth0"], "uptime_s": 90_061, "bindings": 3,
        "quarantined": [], "packets_passed": passed, "packets_dropped": dropped,
        "anomaly_mode": "observe",
        "gpu": {
            "source": "simulated", "error": null, "saturated_endpoints": ["model"],
            "readings": [{"index": 0, "name": "H100", "utilization": 0.875,
                "memory_used_bytes": 40u64 << 30, "memory_total_bytes": 80u64 << 30,
                "power_watts": 550.0}],
        },
        "tokens": {"keys": ["k1"], "verifications": {"ok": 10, "expired": expired},
            "probable_thefts": 0},
    })
}

pub(super) fn snap(
    at: Instant,
    status: Value,
    identities: Vec<Value>,
    endpoints: Vec<Value>,
) -> Snapshot {
    Snapshot {
        at,
        unix_ms: 1_700_000_000_000,
        status,
        endpoints: json!(endpoints),
        identities: json!(identities),
    }
}

/// Two polls 2 s apart: "busy" passed 2000 and dropped 10 in between, "idle" nothing,
/// "new" appeared between them, "reset" had its counters re-created.
pub(super) fn two_polls() -> (Snapshot, Snapshot) {
    let t0 = Instant::now();
    let a = snap(
        t0,
        status(1000, 100, 1),
        vec![
            identity("idle", 5, 0),
            identity("busy", 1000, 0),
            identity("reset", 900, 0),
        ],
        vec![endpoint("model", 1000, 100)],
    );
    let b = snap(
        t0 + Duration::from_secs(2),
        status(3000, 110, 5),
        vec![
            identity("idle", 5, 0),
            identity("busy", 3000, 10),
            identity("reset", 4, 0),
            identity("new", 50, 0),
        ],
        vec![endpoint("model", 3000, 110)],
    );
    (a, b)
}
