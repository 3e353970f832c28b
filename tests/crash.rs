//! `kill -9` of the agent in the middle of a mixed flood (#12's suite): a bound client within
//! its limit (one address from the configuration, one bound at run time), a bound client far
//! over its limit, a quarantined one and unbound sources, all real frames through the lab's
//! veth, counted at the server by a tap that does not depend on the agent. While the agent is
//! dead and while its successor starts, the program must stay attached (sampled throughout),
//! the quarantined and unbound sources must get nothing through and the greedy client no more
//! than its rate; the successor must adopt the pins, the run-time binding and the quarantine,
//! and must not refill the greedy client's budget.
//!
//! tests/agent.rs kills an idle agent between batches; this one kills it under load and
//! watches every second of the gap.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::{Agent, AgentDirs},
    config::{Config, Controller, Endpoint, Identity, Plan},
    flood::{Tap, by_source},
    frames::FrameBlaster,
    lab::{Lab, XdpAttach},
    node::{frame, host4, host6},
};

const PORT: u16 = 8000;
/// The greedy client's plan: a burst of five seconds of its rate, so that a budget refilled
/// by a restart would show as hundreds of extra frames in the second after it.
const GREEDY_RATE: f64 = 100.0;
const GREEDY_BURST: f64 = 500.0;

fn launch(lab: &Lab, dirs: &AgentDirs, config: &str) -> Agent {
    Agent::launch(&lab.server, dirs, &["--config", config, "--mode", "native"])
}

/// When, and what the tap had counted by then.
type Snapshot = (Instant, HashMap<IpAddr, u64>);

fn passed(tap: &HashMap<IpAddr, u64>, src: IpAddr) -> u64 {
    tap.get(&src).copied().unwrap_or(0)
}

fn status(dirs: &AgentDirs) -> serde_json::Value {
    serde_json::from_str(&dirs.cli_ok(&["status", "--output", "json"])).expect("status json")
}

#[test]
fn kill_dash_nine_under_a_mixed_flood_keeps_every_promise_and_a_restart_adopts_it_all() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let (h, h6) = (|n| host4(&lab, n), |n| host6(&lab, n));
    let (steady, steady_rt, greedy, suspect) = (h(11), h(21), h(14), h(13));
    let unbound = [h(199), h6(99)];
    let config = Config::new(&[&lab.server_if])
        .controller(Controller::no_gpu())
        .plan(Plan::new("customer").packets(1000, 1000))
        .plan(Plan::new("tight").packets(GREEDY_RATE as u64, GREEDY_BURST as u64))
        .endpoint(Endpoint::tcp("vllm", PORT, &["customer"]))
        .identity(Identity::new("steady", "customer", "customer", &[steady]))
        .identity(Identity::new("greedy", "customer", "tight", &[greedy]))
        .identity(Identity::new("suspect", "customer", "customer", &[suspect]))
        .write(&dirs.state_dir.join("tollgate.toml"));
    let config = config.to_str().expect("utf-8 path").to_owned();
    let agent = launch(&lab, &dirs, &config);
    dirs.cli_ok(&["quarantine", "suspect", "--reason", "crash test"]);
    dirs.cli_ok(&[
        "bind",
        &steady_rt.to_string(),
        "--identity",
        "steady",
        "--for",
        "1h",
    ]);
    let bindings_before = status(&dirs)["bindings"].clone();

    let tap = Tap::start(&lab.server, &lab.server_if);
    let dst = |src: IpAddr| match src {
        IpAddr::V4(_) => IpAddr::V4(lab.server_v4),
        IpAddr::V6(_) => IpAddr::V6(lab.server_v6),
    };
    let offers: Vec<(IpAddr, u32)> = vec![
        (steady, 200),
        (steady_rt, 200),
        (greedy, 1000),
        (suspect, 500),
        (unbound[0], 500),
        (unbound[1], 500),
    ];
    let blasting = Instant::now();
    let blasters: Vec<(IpAddr, FrameBlaster)> = offers
        .iter()
        .map(|&(src, rate)| {
            let f = frame(src, dst(src), PORT, "tcp");
            (
                src,
                FrameBlaster::start(&lab.client, &lab.client_if, f, rate),
            )
        })
        .collect();
    // The greedy client spends its burst (offering 10× its rate) well within this.
    std::thread::sleep(Duration::from_secs(2));

    let sampling = AtomicBool::new(true);
    let link_pin = tollgate::pins::link_path(&dirs.pin_dir, &lab.server_if);
    let (samples, gap, after_restart, agent) = std::thread::scope(|s| {
        // The attachment as the kernel reports it, as often as `ip` can ask, from the kill
        // until a second after the successor is up.
        let sampler = s.spawn(|| {
            let mut samples: Vec<Option<XdpAttach>> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(90);
            while sampling.load(Ordering::Relaxed) && Instant::now() < deadline {
                samples.push(lab.server.xdp_attach(&lab.server_if));
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        });
        let at_kill = (Instant::now(), tap.counts());
        let _ = agent.kill9();
        // Dead for three seconds: nothing in userspace enforces anything.
        std::thread::sleep(Duration::from_secs(3));
        let dead = (Instant::now(), tap.counts());
        let successor = launch(&lab, &dirs, &config);
        let up = (Instant::now(), tap.counts());
        std::thread::sleep(Duration::from_secs(1));
        let settled = (Instant::now(), tap.counts());
        sampling.store(false, Ordering::Relaxed);
        let samples = sampler.join().expect("sampler");
        eprintln!(
            "killed; dead {:.2}s, the successor took {:.2}s to attach",
            (dead.0 - at_kill.0).as_secs_f64(),
            (up.0 - dead.0).as_secs_f64()
        );
        (samples, (at_kill, up.clone()), (up, settled), successor)
    });
    std::thread::sleep(Duration::from_secs(1));
    let sent: HashMap<IpAddr, u64> = blasters.into_iter().map(|(a, b)| (a, b.stop())).collect();
    let run = blasting.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let total = by_source(&tap.stop());
    eprintln!("sent {sent:?}\nreceived {total:?}");

    let mut failures = Vec::new();
    // Attached at every sample, in the mode it was attached in: a pinned link outlives its
    // process, and the successor swaps its program onto it without detaching.
    let detached = samples
        .iter()
        .filter(|s| **s != Some(XdpAttach::Native))
        .count();
    assert!(
        samples.len() >= 50,
        "only {} samples of the attachment",
        samples.len()
    );
    if detached > 0 {
        failures.push(format!(
            "{detached} of {} samples of {}'s XDP attachment between the kill and a second \
             after the restart were not native: {:?}",
            samples.len(),
            lab.server_if,
            samples
                .iter()
                .filter(|s| **s != Some(XdpAttach::Native))
                .take(5)
                .collect::<Vec<_>>()
        ));
    }
    if !link_pin.exists() {
        failures.push(format!("the link's pin {} is gone", link_pin.display()));
    }
    // The quarantined and the unbound: nothing at all, across the kill and the restart.
    for src in [suspect, unbound[0], unbound[1]] {
        let n = passed(&total, src);
        if n > 0 {
            failures.push(format!(
                "{src} (quarantined or unbound) got {n} of {} frames through",
                sent[&src]
            ));
        }
    }
    // Within its limit: everything, from both of its addresses.
    for src in [steady, steady_rt] {
        let n = passed(&total, src);
        if (n as f64) < sent[&src] as f64 * 0.95 {
            failures.push(format!(
                "{src} (within its limit) got only {n} of {} frames through",
                sent[&src]
            ));
        }
    }
    // Over its limit: its rate while the agent was dead and starting...
    let window = |((t0, c0), (t1, c1)): &(Snapshot, Snapshot)| {
        (
            (*t1 - *t0).as_secs_f64(),
            passed(c1, greedy) - passed(c0, greedy),
        )
    };
    let (secs, n) = window(&gap);
    eprintln!("greedy: {n} frames in the {secs:.2}s without an agent (rate {GREEDY_RATE}/s)");
    // 10% and a few frames of slack: the tap is read a little after each instant.
    if n as f64 > GREEDY_RATE * secs * 1.1 + 20.0 {
        failures.push(format!(
            "greedy got {n} frames through in the {secs:.2}s without an agent: over its \
             {GREEDY_RATE}/s"
        ));
    }
    if (n as f64) < GREEDY_RATE * secs * 0.5 {
        failures.push(format!(
            "greedy got only {n} frames through in the {secs:.2}s without an agent: cut off, \
             not limited"
        ));
    }
    // ... and right after the restart: a refilled budget would let its burst through.
    let (secs, n) = window(&after_restart);
    eprintln!("greedy: {n} frames in the {secs:.2}s after the restart");
    if n as f64 > GREEDY_RATE * secs * 1.2 + 30.0 {
        failures.push(format!(
            "greedy got {n} frames through in the {secs:.2}s after the restart, over its \
             {GREEDY_RATE}/s: the restart refilled its budget (burst {GREEDY_BURST})"
        ));
    }
    let n = passed(&total, greedy);
    if n as f64 > GREEDY_BURST + GREEDY_RATE * run * 1.1 {
        failures.push(format!(
            "greedy got {n} frames through in {run:.1}s: over burst {GREEDY_BURST} + \
             {GREEDY_RATE}/s"
        ));
    }
    // The successor adopted everything.
    let st = status(&dirs);
    if st["adopted_pins"] != true {
        failures.push(format!(
            "status after the restart: adopted_pins {}",
            st["adopted_pins"]
        ));
    }
    if st["quarantined"] != serde_json::json!(["suspect"]) {
        failures.push(format!(
            "status after the restart: quarantined {}",
            st["quarantined"]
        ));
    }
    if st["bindings"] != bindings_before {
        failures.push(format!(
            "bindings {bindings_before} before the kill, {} after the restart",
            st["bindings"]
        ));
    }
    let (_, (_, up)) = &gap;
    if passed(&total, steady_rt) <= passed(up, steady_rt) {
        failures.push(format!(
            "the run-time binding of {steady_rt} passed nothing after the restart"
        ));
    }
    let audit = std::fs::read_to_string(dirs.state_dir.join("audit.log")).expect("audit log");
    let starts: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["action"] == "start")
        .collect();
    let adopted: Vec<&serde_json::Value> = starts
        .iter()
        .map(|l| &l["detail"]["adopted_pins"])
        .collect();
    if adopted != [&serde_json::json!(false), &serde_json::json!(true)] {
        failures.push(format!(
            "the audit's start lines say adopted_pins {adopted:?}"
        ));
    }
    drop(agent);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
