//! The fleet (#14): nodes that share bindings, revocations and quarantines through a real
//! `redis-server`. Four node namespaces with their own agents, one store reached by all,
//! clients that reach every node with one address (`support/fleet.rs`).

use std::time::Duration;

use tollgate_tests::{
    config::Plan,
    fleet::{FleetLab, POOL, Probes, Senders},
    tokenlab::curl_bind,
};

const ALL: [usize; 4] = [0, 1, 2, 3];
/// Far more than a change needs (a store round trip or two, then the sync interval at most):
/// the bound for the polls, not a target (BENCHMARKS.md has the latencies).
const SPREAD: Duration = Duration::from_secs(10);

#[test]
fn a_bind_quarantine_release_and_revocation_on_one_node_hold_on_all_four() {
    let mut lab = FleetLab::new(4, 2);
    lab.start_all();
    assert!(
        !lab.served(0, 1, Duration::from_millis(500)),
        "an unbound client was served"
    );
    let token = lab.issue("acme", "5m", "tok-acme");
    let (code, body) = lab.bind(0, 0, &token);
    assert_eq!(code, 200, "{body}");
    // Node 1's bind admits the client on nodes 2–4, which verified the token themselves.
    assert_eq!(lab.wait_served(0, &ALL, true, SPREAD), Vec::<usize>::new());
    let installed = lab.audit(2);
    assert!(
        installed
            .iter()
            .any(|r| r["action"] == "bind" && r["detail"]["origin"] == "node-1"),
        "node 3's audit has no bind from node-1: {installed:?}"
    );
    // The same token from another address on node 3: a replay, fleet-wide.
    let (code, body) = lab.bind(1, 2, &token);
    assert_eq!(
        (code, body["reason"].as_str()),
        (403, Some("replay")),
        "{body}"
    );
    assert!(
        lab.audit(2).iter().any(|r| r["action"] == "token_theft"),
        "node 3 did not report the theft"
    );
    assert!(
        !lab.served(1, 2, Duration::from_millis(500)),
        "the thief was served"
    );
    // Node 3 forgets its copy of the binding (a token unbind is node-local), so only the
    // pool's claim knows the token is bound to the first address: still a replay.
    let (code, body) = curl_bind(
        &lab.clients[0].ns,
        lab.nodes[2].ip,
        &lab.ca,
        "DELETE",
        &token,
        5,
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = lab.bind(1, 2, &token);
    assert_eq!(
        (code, body["reason"].as_str()),
        (403, Some("replay")),
        "the claim did not decide: {body}"
    );
    assert!(
        lab.metric(2, r#"tollgate_fleet_claims_total{outcome="replay"}"#)
            .unwrap_or(0.0)
            >= 2.0
    );
    // The first address binds it there again: the claim is its own.
    let (code, body) = lab.bind(0, 2, &token);
    assert_eq!(code, 200, "{body}");
    // A quarantine on node 2 cuts it on all four; a release on node 3 lets it back.
    lab.cli_ok(1, &["quarantine", "acme", "--reason", "fleet test"]);
    assert_eq!(lab.wait_served(0, &ALL, false, SPREAD), Vec::<usize>::new());
    lab.cli_ok(2, &["release", "acme", "--reason", "fleet test over"]);
    assert_eq!(lab.wait_served(0, &ALL, true, SPREAD), Vec::<usize>::new());
    // A revocation on node 4 drops it on all four, and no node binds the token again.
    lab.cli_ok(
        3,
        &[
            "token",
            "revoke",
            "--token-id",
            "tok-acme",
            "--reason",
            "leaked",
        ],
    );
    assert_eq!(lab.wait_served(0, &ALL, false, SPREAD), Vec::<usize>::new());
    for n in ALL {
        let (code, body) = lab.bind(0, n, &token);
        assert_eq!(
            (code, body["reason"].as_str()),
            (403, Some("revoked")),
            "node {n}: {body}"
        );
    }
    let s = lab.fleet_status(0);
    assert_eq!(s["store_up"], true, "{s}");
    assert_eq!(s["members"].as_array().map(Vec::len), Some(4), "{s}");
    assert_eq!(s["outbox"], 0, "{s}");
}

#[test]
fn entries_without_the_pool_key_are_refused_everywhere_and_the_password_never_shows() {
    let mut lab = FleetLab::new(3, 1);
    lab.start_all();
    let token = lab.issue("acme", "5m", "tok-forge");
    assert_eq!(lab.bind(0, 0, &token).0, 200);
    assert_eq!(
        lab.wait_served(0, &[0, 1, 2], true, SPREAD),
        Vec::<usize>::new()
    );
    // A writer to the store without the key: a revocation of the bound token and a
    // quarantine of its identity, with a made-up MAC, in the stream and the snapshot.
    let stream = format!("tollgate:{{{POOL}}}:stream");
    for (kind, subject, payload) in [
        (
            "revocation",
            "tok-forge",
            r#"{"until_wall_ms":99999999999999,"reason":"x"}"#,
        ),
        (
            "quarantine",
            "acme",
            r#"{"until_wall_ms":null,"reason":"x"}"#,
        ),
    ] {
        let out = lab.redis.cli(&[
            "XADD",
            &stream,
            "*",
            "kind",
            kind,
            "pool",
            POOL,
            "origin",
            "node-1",
            "seq",
            "999999",
            "wall_ms",
            "99999999999999",
            "subject",
            subject,
            "payload",
            payload,
            "mac",
            &"ab".repeat(32),
        ]);
        assert!(out.contains('-'), "XADD: {out}");
    }
    let refused = r#"tollgate_fleet_refused_entries_total{reason="bad_mac"}"#;
    for n in [0, 1, 2] {
        let deadline = std::time::Instant::now() + SPREAD;
        while lab.metric(n, refused).unwrap_or(0.0) < 2.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            lab.metric(n, refused).unwrap_or(0.0) >= 2.0,
            "node {n}: {:?}",
            lab.metric(n, refused)
        );
    }
    // Nothing was lifted or imposed: the client is still served everywhere.
    assert_eq!(
        lab.wait_served(0, &[0, 1, 2], true, SPREAD),
        Vec::<usize>::new()
    );
    // The store's password is in no log, scrape, status or fleet status.
    let pw = lab.redis.password.clone();
    for n in [0, 1, 2] {
        let status = lab.cli_ok(n, &["status", "--output", "json"]);
        let fleet = lab.cli_ok(n, &["fleet", "status"]);
        for (what, text) in [
            ("stderr", lab.stderr(n)),
            ("metrics", lab.metrics(n)),
            ("status", status),
            ("fleet status", fleet),
        ] {
            assert!(
                !text.contains(&pw),
                "node {n}: the password is in its {what}"
            );
        }
    }
    // ... nor the one a store refuses: node 1 restarted with a wrong password says so by
    // label, and neither password shows.
    let wrong = "wrong-password-7f3a9c1e";
    lab.set_store_password(0, wrong);
    lab.stop(0);
    lab.start(0);
    std::thread::sleep(Duration::from_secs(2));
    let s = lab.fleet_status(0);
    assert_eq!(s["store_up"], false, "{s}");
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("auth")),
        "{s}"
    );
    for secret in [pw.as_str(), wrong] {
        assert!(!s.to_string().contains(secret), "{s}");
        assert!(!lab.stderr(0).contains(secret));
        assert!(!lab.metrics(0).contains(secret));
    }
}

#[test]
fn enforcement_outlives_the_store_and_an_empty_store_is_reseeded() {
    let mut lab = FleetLab::new(4, 2);
    lab.start_all();
    let a = lab.issue("acme", "5m", "tok-a");
    let b = lab.issue("beta", "5m", "tok-b");
    assert_eq!(lab.bind(0, 0, &a).0, 200);
    assert_eq!(lab.bind(1, 0, &b).0, 200);
    assert_eq!(lab.wait_served(0, &ALL, true, SPREAD), Vec::<usize>::new());
    assert_eq!(lab.wait_served(1, &ALL, true, SPREAD), Vec::<usize>::new());
    // Revoked before the outage: every node drops beta.
    lab.cli_ok(
        1,
        &[
            "token",
            "revoke",
            "--token-id",
            "tok-b",
            "--reason",
            "leaked",
        ],
    );
    assert_eq!(lab.wait_served(1, &ALL, false, SPREAD), Vec::<usize>::new());

    // The store dies. Bound clients keep their admitted rate everywhere (200 datagrams/s
    // per node, under the plan's 1 000/s: all of it admitted before, ≥ 99% after).
    let before = lab.probe(0, Duration::from_secs(2), 400);
    lab.redis.kill();
    std::thread::sleep(Duration::from_millis(500));
    let after = lab.probe(0, Duration::from_secs(2), 400);
    for n in ALL {
        assert!(
            before[n] >= 396,
            "node {n} before the outage: {before:?} of 400"
        );
        assert!(
            f64::from(after[n]) >= 0.99 * f64::from(before[n]),
            "node {n} during the outage: {after:?} of 400 (before {before:?})"
        );
    }
    assert_eq!(lab.wait_served(0, &ALL, true, SPREAD), Vec::<usize>::new());
    // A revocation on node 2 during the outage applies there at once; the others cannot
    // know yet.
    lab.cli_ok(
        1,
        &[
            "token",
            "revoke",
            "--token-id",
            "tok-a",
            "--reason",
            "outage",
        ],
    );
    assert!(
        !lab.served(0, 1, Duration::from_millis(500)),
        "node 2 still serves tok-a"
    );
    assert!(
        lab.served(0, 0, Duration::from_secs(1)),
        "node 1 dropped tok-a without the store"
    );
    // A node restarted during the outage starts and enforces from its pins and state.
    lab.stop(2);
    lab.start(2);
    assert!(
        lab.served(0, 2, Duration::from_secs(2)),
        "the restarted node dropped tok-a"
    );
    assert!(
        !lab.served(1, 2, Duration::from_millis(500)),
        "the restarted node served tok-b"
    );
    let s = lab.fleet_status(2);
    assert_eq!(s["store_up"], false, "{s}");

    // The store comes back empty: node 2's queued revocation reaches every node, and the
    // nodes re-seed it with what they hold revoked.
    lab.redis.restart_empty();
    assert_eq!(lab.wait_served(0, &ALL, false, SPREAD), Vec::<usize>::new());
    let snapshot = format!("tollgate:{{{POOL}}}:snapshot");
    let deadline = std::time::Instant::now() + SPREAD;
    let held = |f: &str| lab.redis.cli(&["HEXISTS", &snapshot, f]).trim() == "1";
    while !(held("revocation:tok-a") && held("revocation:tok-b"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        held("revocation:tok-a"),
        "tok-a's revocation is not in the store"
    );
    assert!(
        held("revocation:tok-b"),
        "tok-b's revocation was not re-seeded"
    );
    for n in ALL {
        for (c, t) in [(0, &a), (1, &b)] {
            let (code, body) = lab.bind(c, n, t);
            assert_eq!(
                (code, body["reason"].as_str()),
                (403, Some("revoked")),
                "node {n}: {body}"
            );
        }
        // Joined again (one slow operation on a busy machine marks the store down until the
        // next one succeeds: polled, not sampled once).
        let deadline = std::time::Instant::now() + SPREAD;
        while lab.fleet_status(n)["store_up"] != true && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(lab.fleet_status(n)["store_up"], true, "node {n}");
    }
}

#[test]
fn through_sentinel_the_nodes_follow_a_failover_and_no_acknowledged_revocation_is_lost() {
    let mut lab = FleetLab::with_sentinel(3, 2);
    lab.start_all();
    let nodes = [0, 1, 2];
    let a = lab.issue("acme", "5m", "tok-s1");
    let b = lab.issue("beta", "5m", "tok-s2");
    assert_eq!(lab.bind(0, 0, &a).0, 200);
    assert_eq!(lab.bind(1, 0, &b).0, 200);
    assert_eq!(
        lab.wait_served(0, &nodes, true, SPREAD),
        Vec::<usize>::new()
    );
    assert_eq!(
        lab.wait_served(1, &nodes, true, SPREAD),
        Vec::<usize>::new()
    );
    // Acknowledged before the failover: published (a replica has it) and in force everywhere.
    lab.cli_ok(
        1,
        &[
            "token",
            "revoke",
            "--token-id",
            "tok-s1",
            "--reason",
            "before",
        ],
    );
    assert_eq!(
        lab.wait_served(0, &nodes, false, SPREAD),
        Vec::<usize>::new()
    );
    let set = lab.sentinel.as_ref().expect("sentinel set");
    let old = set.primary();
    assert_eq!(lab.fleet_status(1)["primary"].as_str(), Some(old.as_str()));
    set.failover();
    // During the failover: a revocation on node 3 applies there at once and reaches the
    // others through the new primary.
    lab.cli_ok(
        2,
        &[
            "token",
            "revoke",
            "--token-id",
            "tok-s2",
            "--reason",
            "during",
        ],
    );
    assert!(!lab.served(1, 2, Duration::from_millis(500)));
    let long = Duration::from_secs(40);
    assert_eq!(lab.wait_served(1, &nodes, false, long), Vec::<usize>::new());
    // Every node follows the new primary, and its queue empties: node 3's revocation was
    // acknowledged (a replica has it) once the old primary followed the new one.
    let new = lab.sentinel.as_ref().expect("set").primary();
    assert_ne!(new, old, "the sentinels did not fail over");
    let deadline = std::time::Instant::now() + long;
    let settled = |n: usize| {
        let s = lab.fleet_status(n);
        s["primary"].as_str() == Some(new.as_str()) && s["outbox"] == 0 && s["store_up"] == true
    };
    while !nodes.iter().all(|n| settled(*n)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    for n in nodes {
        assert!(settled(n), "node {n}: {}", lab.fleet_status(n));
    }
    // No acknowledged revocation lost: both are in the new primary's snapshot.
    let replica = &lab.sentinel.as_ref().expect("set").replica;
    assert!(new.ends_with(&format!(":{}", replica.port)), "{new}");
    let snapshot = format!("tollgate:{{{POOL}}}:snapshot");
    for tid in ["tok-s1", "tok-s2"] {
        let field = format!("revocation:{tid}");
        assert_eq!(
            replica.cli(&["HEXISTS", &snapshot, &field]).trim(),
            "1",
            "{tid}"
        );
    }
    // And the pool works on: a new bind on node 1 is served by all three.
    let c = lab.issue("acme", "5m", "tok-s3");
    assert_eq!(lab.bind(0, 0, &c).0, 200);
    assert_eq!(
        lab.wait_served(0, &nodes, true, SPREAD),
        Vec::<usize>::new()
    );
}

/// A plan whose rate holds across the pool: 1000 datagrams/s fleet-wide.
const FLEET_RATE: u64 = 1000;

/// Binds `identity` from client 0 on node 1 and waits until every node serves it.
fn bound_everywhere(lab: &FleetLab, identity: &str) {
    let token = lab.issue(identity, "10m", &format!("tok-{identity}"));
    let (code, body) = lab.bind(0, 0, &token);
    assert_eq!(code, 200, "{body}");
    assert_eq!(lab.wait_served(0, &ALL, true, SPREAD), Vec::<usize>::new());
}

/// Four nodes on a plan of [`FLEET_RATE`] datagrams/s fleet-wide, `acme` bound on all of
/// them, a probe on every node, and client 0 offering 4× the rate, 70/10/10/10 across the
/// nodes, for 3 s already.
fn fleet_rate_lab() -> (FleetLab, Probes, Senders) {
    let mut lab = FleetLab::with_plan(
        4,
        1,
        Plan::new("customer").packets(FLEET_RATE, 100).fleet_wide(),
    );
    lab.start_all();
    bound_everywhere(&lab, "acme");
    let probes = Probes::start(&lab);
    let senders = Senders::start(&lab, 0, 64, &[2800, 400, 400, 400]);
    std::thread::sleep(Duration::from_secs(3));
    (lab, probes, senders)
}

fn sum(v: &[f64]) -> f64 {
    v.iter().sum()
}

#[test]
fn a_fleet_wide_rate_holds_in_total_and_follows_the_demand() {
    let (lab, probes, senders) = fleet_rate_lab();
    let rates = probes.rates_over(Duration::from_secs(5));
    let total = sum(&rates);
    eprintln!("70/10/10/10: {total:.0}/s in total, per node {rates:.0?}");
    assert!(
        (total - FLEET_RATE as f64).abs() <= FLEET_RATE as f64 * 0.05,
        "the fleet admitted {total:.0}/s of a fleet-wide {FLEET_RATE}/s (per node {rates:.0?})"
    );
    // The shares follow the demand: the 70 % node has the most.
    assert!(
        rates[0] > rates[1] && rates[0] > rates[2] && rates[0] > rates[3],
        "per node {rates:.0?}"
    );
    let status = lab.fleet_status(0);
    let shares = status["shares"].as_array().cloned().unwrap_or_default();
    assert!(
        shares.iter().any(|s| s["identity"] == "acme"),
        "fleet status shows no share for acme: {status}"
    );
    assert_eq!(lab.metric(0, "tollgate_fleet_global_identities"), Some(1.0));
    // All of it moves to node 2 (a 10 % node): within 2 s it has ≥ 90 % of the rate.
    senders.set(&[0, 4000, 0, 0]);
    std::thread::sleep(Duration::from_secs(2));
    let rates = probes.rates_over(Duration::from_secs(2));
    eprintln!("2-4 s after the shift: per node {rates:.0?}");
    assert!(
        rates[1] >= FLEET_RATE as f64 * 0.9,
        "2 s after the shift node 2 admits {:.0}/s of {FLEET_RATE}/s (per node {rates:.0?})",
        rates[1]
    );
    let total = sum(&rates);
    assert!(
        total <= FLEET_RATE as f64 * 1.05,
        "after the shift the fleet admits {total:.0}/s (per node {rates:.0?})"
    );
    senders.stop();
}

#[test]
fn a_store_outage_falls_back_to_one_nth_of_a_fleet_wide_rate_per_node() {
    let (mut lab, probes, senders) = fleet_rate_lab();
    let before = probes.rates_over(Duration::from_secs(2));
    eprintln!("store up: per node {before:.0?}");
    // The store dies during the traffic. After the grace (3 intervals) every node runs the
    // default outage mode, `share`: 1/N of the rate, N = 4 the last known pool size.
    lab.redis.kill();
    std::thread::sleep(Duration::from_secs(2));
    let rates = probes.rates_over(Duration::from_secs(4));
    let total = sum(&rates);
    eprintln!("store out: {total:.0}/s in total, per node {rates:.0?}");
    assert!(
        total <= FLEET_RATE as f64 * 1.05,
        "during the outage the fleet admits {total:.0}/s of {FLEET_RATE}/s (per node {rates:.0?})"
    );
    let quarter = FLEET_RATE as f64 / 4.0;
    for (n, r) in rates.iter().enumerate() {
        assert!(
            (r - quarter).abs() <= quarter * 0.1,
            "node {} admits {r:.0}/s during the outage, not 1/4 of {FLEET_RATE}/s (per node {rates:.0?})",
            n + 1
        );
    }
    assert_eq!(lab.metric(0, "tollgate_fleet_global_outage"), Some(1.0));
    // The store returns (empty): the shares follow the demand again.
    lab.redis.restart_empty();
    std::thread::sleep(Duration::from_secs(4));
    let rates = probes.rates_over(Duration::from_secs(3));
    let total = sum(&rates);
    eprintln!("store back: {total:.0}/s in total, per node {rates:.0?}");
    assert!(
        (total - FLEET_RATE as f64).abs() <= FLEET_RATE as f64 * 0.05 && rates[0] > 2.0 * rates[1],
        "after the store returned the fleet admits {total:.0}/s (per node {rates:.0?})"
    );
    senders.stop();
}

/// 1 MB per minute, fleet-wide, with a fleet-wide cost rate of 400 kB/s (burst 64 KiB).
const QUOTA: u64 = 1_000_000;
const QUOTA_RATE: u64 = 400_000;
const QUOTA_BURST: u64 = 65_536;
/// docs/fleet.md: with the rate fleet-wide too, the fleet admits at most
/// quota + interval × rate + burst + nodes.
const QUOTA_BOUND: u64 = QUOTA + QUOTA_RATE / 4 + QUOTA_BURST + 4;
/// 958 payload bytes: 1000-byte frames.
const PAYLOAD: usize = 958;

/// Sleeps into the next UTC minute when fewer than `need` seconds of this one are left.
fn room_in_this_minute(need: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let left_ms = 60_000 - now % 60_000;
    if left_ms < need * 1000 {
        std::thread::sleep(Duration::from_millis(left_ms + 1000));
    }
}

#[test]
fn a_fleet_wide_quota_holds_across_four_nodes() {
    let mut lab = FleetLab::with_plan(
        4,
        1,
        Plan::new("customer")
            .bytes(QUOTA_RATE, QUOTA_BURST)
            .minute_bytes(QUOTA)
            .fleet_wide(),
    );
    lab.start_all();
    bound_everywhere(&lab, "acme");
    let probes = Probes::start(&lab);
    // The whole spend inside one minute window.
    room_in_this_minute(15);
    // 200 kB/s through every node: twice the fleet-wide rate, the quota spent in ~2.5 s.
    let senders = Senders::start(&lab, 0, PAYLOAD, &[200, 200, 200, 200]);
    std::thread::sleep(Duration::from_secs(8));
    let admitted = probes.total_bytes();
    let late = probes.rates_over(Duration::from_secs(2));
    senders.set(&[0, 0, 0, 0]);
    eprintln!(
        "quota {QUOTA} B, bound {QUOTA_BOUND} B: the fleet admitted {admitted} B, then {late:.0?} datagrams/s"
    );
    assert!(
        admitted <= QUOTA_BOUND,
        "the fleet admitted {admitted} B of a fleet-wide quota of {QUOTA} B (bound {QUOTA_BOUND} B)"
    );
    assert!(
        admitted >= QUOTA * 9 / 10,
        "the fleet admitted only {admitted} B of a {QUOTA} B quota"
    );
    assert!(
        sum(&late) < 1.0,
        "still admitting after the quota was spent: {late:.1?} datagrams/s"
    );
    let row = lab.cli_ok(0, &["quota", "show", "--identity", "acme"]);
    assert!(
        row.contains("\"fleet\""),
        "quota show lacks the fleet view: {row}"
    );
    // The window rolls and it passes again (a minute window: up to a minute's wait, so only
    // with TOLLGATE_LONG=1).
    if std::env::var_os("TOLLGATE_LONG").is_some() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        std::thread::sleep(Duration::from_millis(60_000 - now % 60_000 + 2000));
        senders.set(&[200, 200, 200, 200]);
        std::thread::sleep(Duration::from_secs(1));
        let rates = probes.rates_over(Duration::from_secs(2));
        eprintln!("after the roll: {rates:.0?} datagrams/s");
        assert!(
            sum(&rates) * 1000.0 >= QUOTA_RATE as f64 * 0.8,
            "after the window rolled the fleet admits {rates:.0?} datagrams/s"
        );
    }
    senders.stop();
}
