//! #12 finding 5: SYNs spoofed from a bound customer's address (no replies needed) must not
//! get the customer quarantined in `anomaly.mode = "enforce"`. The ladder may throttle on
//! them; it quarantines only on what a spoofer cannot forge off-path.

use std::{net::IpAddr, time::Duration};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{Agent, AgentDirs, identity_counters},
    config::{Anomaly, Config, Controller, Endpoint, Identity, Plan},
    frames::FrameBlaster,
    lab::Lab,
};

const UDP_PORT: u16 = 7000;
const TCP_PORT: u16 = 8000;

#[test]
fn spoofed_syns_from_a_bound_customer_never_quarantine_it() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let o = lab.client_v4.octets();
    let victim = [o[0], o[1], o[2], 11];
    let config = Config::new(&[&lab.server_if]).controller(Controller {
        interval_ms: Some(250),
        ..Controller::simulated(&dirs.state_dir.join("gpu.json"))
    });
    let mut config = config;
    config.anomaly = Some(Anomaly::quick("enforce"));
    let config = config
        .plan(Plan::new("free").priority(10).packets(2000, 100))
        .endpoint(Endpoint::udp("model", UDP_PORT, &["customer"]))
        .endpoint(Endpoint::tcp("api", TCP_PORT, &["customer"]))
        .identity(Identity::new(
            "victim",
            "customer",
            "free",
            &[IpAddr::from(victim)],
        ))
        .write(&dirs.state_dir.join("tollgate.toml"));
    let _agent = Agent::launch(
        &lab.server,
        &dirs,
        &[
            "--config",
            config.to_str().expect("path"),
            "--mode",
            "native",
        ],
    );
    let id: serde_json::Value =
        serde_json::from_str(&dirs.cli_ok(&["identities", "show", "victim", "--output", "json"]))
            .expect("json");
    let id = id["id"].as_u64().expect("id") as u32;
    let real = |per_second| {
        let frame = PacketBuilder::v4(victim, lab.server_v4.octets())
            .udp(40000, UDP_PORT)
            .payload(158)
            .build();
        FrameBlaster::start(&lab.client, &lab.client_if, frame, per_second)
    };
    // The customer's own traffic, long enough to warm the baseline up.
    let baseline = real(50);
    std::thread::sleep(Duration::from_secs(8));
    // 6 s of SYNs spoofed from its address, 20x its packet rate.
    let syn = PacketBuilder::v4(victim, lab.server_v4.octets())
        .tcp(40001, TCP_PORT)
        .build();
    let spoof = FrameBlaster::start(&lab.client, &lab.client_if, syn, 1000);
    std::thread::sleep(Duration::from_secs(6));
    spoof.stop();
    // Past the quick ladder's throttle and quarantine times.
    std::thread::sleep(Duration::from_secs(3));
    let audit: Vec<serde_json::Value> = std::fs::read_to_string(dirs.state_dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let steps: Vec<&str> = audit
        .iter()
        .filter(|l| l["action"] == "anomaly")
        .filter_map(|l| l["detail"]["decision"]["step"].as_str())
        .collect();
    // The spoof was seen (the ladder is live in this test) ...
    assert!(steps.contains(&"throttle"), "no anomaly seen: {steps:?}");
    // ... and never quarantined the customer.
    assert!(
        !steps.contains(&"quarantine"),
        "spoof quarantined: {steps:?}"
    );
    let state = std::fs::read_to_string(dirs.state_dir.join("state.json")).expect("state");
    let state: serde_json::Value = serde_json::from_str(&state).expect("state json");
    assert!(
        state["quarantines"].get("victim").is_none(),
        "{}",
        state["quarantines"]
    );
    // Its real traffic afterwards passes, and nothing was dropped as quarantined.
    let before = identity_counters(&dirs, id);
    std::thread::sleep(Duration::from_secs(2));
    let sent = baseline.stop();
    let after = identity_counters(&dirs, id);
    assert!(
        after.passed.packets > before.passed.packets + 50,
        "the customer's traffic did not pass: sent {sent}, {before:?} -> {after:?}"
    );
    let quarantined = tollgate::counter_read::reason_totals_from_pin(&dirs.counters_pin())
        .expect("counters")
        .into_iter()
        .find(|(r, _)| *r == tollgate_common::Reason::Quarantined)
        .map(|(_, c)| c.packets);
    assert_eq!(quarantined, Some(0));
}
