//! Spend and demand against a real redis-server (test_server.rs): two `Store` clients as two
//! nodes, a store flushed under them, values written by hand.

use std::time::{Duration, Instant};

use super::super::{StoreConfig, Target, test_server::RedisServer};
use super::*;
use crate::fleet::{
    entry::PoolKey,
    share::{QuotaTrack, Seen},
};

const POOL: &str = "lab";
const WINDOW: &str = "minute-29410000";
/// An outer bound that only a hang reaches.
const HANG: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(120);

fn store(server: &RedisServer) -> Store {
    let cfg = StoreConfig {
        target: Target::Url(server.url()),
        ca_file: None,
        credentials: Some(server.credentials()),
        op_timeout: Duration::from_millis(2000),
        stream_max_len: 10_000,
    };
    Store::new(&cfg, PoolKey::from_bytes(&[0x5a; 32], POOL).unwrap()).unwrap()
}

fn spend(bytes: u64, cost: u64) -> Spend {
    Spend { bytes, cost }
}

fn report<'a>(identity: &'a str, own: Spend, seen: Option<Seen>) -> SpendReport<'a> {
    SpendReport {
        identity,
        own,
        seen,
    }
}

fn total(r: &SpendRound, i: usize) -> Spend {
    match r.totals[i] {
        FleetSpend::Total { total, .. } => total,
        FleetSpend::Unknown => panic!("identity {i} unknown: {:?}", r.refused),
    }
}

/// One node's cycle through `QuotaTrack`, as the wiring will run it.
async fn cycle(s: &mut Store, node: &str, t: &mut QuotaTrack, identity: &str) -> FleetSpend {
    let r = s
        .report_spend(WINDOW, node, &[report(identity, t.own, t.seen)], TTL)
        .await
        .unwrap();
    assert_eq!(r.refused, Refused::default(), "{node}");
    if let FleetSpend::Total { total, .. } = r.totals[0] {
        t.observe(t.own, total);
    }
    r.totals[0]
}

#[tokio::test]
async fn two_nodes_report_spend_and_read_the_fleet_total() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let (mut a, mut b) = (store(&server), store(&server));
        let r = a
            .report_spend(
                WINDOW,
                "node-a",
                &[
                    report("alice", spend(100, 10), None),
                    report("bob", spend(7, 0), None),
                ],
                TTL,
            )
            .await
            .unwrap();
        assert_eq!((total(&r, 0), total(&r, 1)), (spend(100, 10), spend(7, 0)));
        // New fields: a second pipeline sets the TTL; after that one round trip a report.
        assert_eq!(r.round_trips, 2);
        let r = b
            .report_spend(
                WINDOW,
                "node-b",
                &[report("alice", spend(50, 5), None)],
                TTL,
            )
            .await
            .unwrap();
        assert_eq!(total(&r, 0), spend(150, 15));
        // Absolute values: a report sent again (a retry after a lost reply) counts once.
        for _ in 0..2 {
            let r = a
                .report_spend(
                    WINDOW,
                    "node-a",
                    &[report("alice", spend(120, 12), None)],
                    TTL,
                )
                .await
                .unwrap();
            assert_eq!(total(&r, 0), spend(170, 17));
            assert_eq!(r.round_trips, 1);
        }
        // The fields and the TTL, as the server holds them.
        let key = format!("tollgate:{{{POOL}}}:spend:{WINDOW}:alice");
        assert_eq!(server.cli(&["HGET", &key, "n:node-b"]).trim(), "50 5");
        let pttl: i64 = server.cli(&["PTTL", &key]).trim().parse().unwrap();
        assert!(pttl > 100_000 && pttl <= 120_000, "PTTL {pttl}");
        // Another window is another key.
        let r = b
            .report_spend(
                "day-20424",
                "node-b",
                &[report("alice", spend(1, 1), None)],
                TTL,
            )
            .await
            .unwrap();
        assert_eq!(total(&r, 0), spend(1, 1));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_store_that_comes_back_empty_is_reseeded_at_the_largest_spend_without_double_counting() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let (mut a, mut b, mut c) = (store(&server), store(&server), store(&server));
        let track = |bytes| QuotaTrack {
            own: spend(bytes, 1),
            ..QuotaTrack::default()
        };
        // a 100, b 50, c 30; a and b report again, so all saw 180.
        let (mut ta, mut tb, mut tc) = (track(100), track(50), track(30));
        cycle(&mut a, "node-a", &mut ta, "alice").await;
        cycle(&mut b, "node-b", &mut tb, "alice").await;
        cycle(&mut c, "node-c", &mut tc, "alice").await;
        cycle(&mut a, "node-a", &mut ta, "alice").await;
        cycle(&mut b, "node-b", &mut tb, "alice").await;
        assert_eq!(ta.view(), spend(180, 3));
        assert_eq!(tb.view(), spend(180, 3));

        // The store restarts without persistence; node-c never comes back.
        server.cli(&["FLUSHALL"]);
        ta.add(spend(10, 0));
        let r = cycle(&mut a, "node-a", &mut ta, "alice").await;
        assert_eq!(
            r,
            FleetSpend::Total {
                total: spend(190, 3),
                reseeded: true
            }
        );
        tb.add(spend(5, 0));
        let r = cycle(&mut b, "node-b", &mut tb, "alice").await;
        // 110 + 55 + c's 30: exact, nothing counted twice, c's spend not lost.
        assert_eq!(
            r,
            FleetSpend::Total {
                total: spend(195, 3),
                reseeded: true
            }
        );
        // Later reports are plain again, and go on from there.
        ta.add(spend(5, 0));
        let r = cycle(&mut a, "node-a", &mut ta, "alice").await;
        assert_eq!(
            r,
            FleetSpend::Total {
                total: spend(200, 3),
                reseeded: false
            }
        );
        // A writer that deletes the key only makes the nodes re-seed it.
        server.cli(&["DEL", &format!("tollgate:{{{POOL}}}:spend:{WINDOW}:alice")]);
        // node-b last saw 195 (before node-a's last 5): it re-seeds with that; node-a,
        // whose view was 200, brings the total back to exactly 200.
        let r = cycle(&mut b, "node-b", &mut tb, "alice").await;
        assert_eq!(
            r,
            FleetSpend::Total {
                total: spend(195, 3),
                reseeded: true
            }
        );
        let r = cycle(&mut a, "node-a", &mut ta, "alice").await;
        assert_eq!(
            r,
            FleetSpend::Total {
                total: spend(200, 3),
                reseeded: true
            }
        );
        cycle(&mut b, "node-b", &mut tb, "alice").await;
        assert_eq!((ta.view(), tb.view()), (spend(200, 3), spend(200, 3)));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn garbage_spend_values_are_refused_counted_and_bounded() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let mut a = store(&server);
        let key = format!("tollgate:{{{POOL}}}:spend:{WINDOW}:alice");
        server.cli(&[
            "HSET",
            &key,
            "n:node-b",
            "40 4",
            "n:evil",
            "lots",
            "n:wide",
            "99999999999999999999999 1",
            "n:neg",
            "-5 0",
            "n:huge",
            "72057594037927937 0",
            "n:bad name",
            "1 1",
            "x:node-c",
            "1 1",
            "s:node-d",
            "1 2",
        ]);
        // A key of another type for another identity.
        server.cli(&[
            "SET",
            &format!("tollgate:{{{POOL}}}:spend:{WINDOW}:mallory"),
            "x",
        ]);
        let r = a
            .report_spend(
                WINDOW,
                "node-a",
                &[
                    report("alice", spend(10, 1), None),
                    report("mallory", spend(1, 1), None),
                    report("with space", spend(1, 1), None),
                    report("carol", spend(3, 3), None),
                ],
                TTL,
            )
            .await
            .unwrap();
        // alice: node-a 10 + node-b 40 + the clamped 2^56; everything else refused.
        assert_eq!(total(&r, 0), spend(10 + 40 + MAX_SPEND, 5));
        assert_eq!(r.totals[1], FleetSpend::Unknown);
        assert_eq!(r.totals[2], FleetSpend::Unknown);
        assert_eq!(total(&r, 3), spend(3, 3));
        assert_eq!(
            r.refused,
            Refused {
                malformed: 6,
                clamped: 1,
                wrong_type: 1,
                bad_identity: 1,
                ..Refused::default()
            }
        );
        // A flooded hash is read to the bound only, and said so.
        let mut args = vec!["HSET".to_string(), key.clone()];
        for i in 0..MAX_FIELDS {
            args.push(format!("n:flood-{i}"));
            args.push("1 0".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        server.cli(&args);
        let r = a
            .report_spend(
                WINDOW,
                "node-a",
                &[report("alice", spend(10, 1), None)],
                TTL,
            )
            .await
            .unwrap();
        assert_eq!(r.refused.too_many, 1, "{:?}", r.refused);
        assert!(matches!(r.totals[0], FleetSpend::Total { .. }));
    })
    .await
    .unwrap();
}

fn demand(packets: u64, bytes: u64) -> Demand {
    Demand { packets, bytes }
}

#[tokio::test]
async fn two_nodes_report_demand_and_see_each_other_until_one_withdraws_or_goes_stale() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let (mut a, mut b) = (store(&server), store(&server));
        let ttl = Duration::from_secs(60);
        let r = a
            .report_demand("node-a", &[("alice", demand(700, 70_000))], ttl)
            .await
            .unwrap();
        assert_eq!(r.round_trips, 2);
        assert_eq!(
            r.views[0].as_deref(),
            Some(&[("node-a".to_string(), demand(700, 70_000))][..])
        );
        let r = b
            .report_demand(
                "node-b",
                &[("alice", demand(100, 10_000)), ("bob", demand(5, 5))],
                ttl,
            )
            .await
            .unwrap();
        assert_eq!(
            r.views[0].as_deref(),
            Some(
                &[
                    ("node-a".to_string(), demand(700, 70_000)),
                    ("node-b".to_string(), demand(100, 10_000))
                ][..]
            )
        );
        assert_eq!(r.refused, Refused::default());
        let key = format!("tollgate:{{{POOL}}}:demand:alice");
        let pttl: i64 = server.cli(&["PTTL", &key]).trim().parse().unwrap();
        assert!(pttl > 50_000 && pttl <= 60_000, "PTTL {pttl}");
        // node-a goes idle: its report is withdrawn.
        let r = a
            .report_demand("node-a", &[("alice", Demand::default())], ttl)
            .await
            .unwrap();
        assert_eq!(
            r.views[0].as_deref(),
            Some(&[("node-b".to_string(), demand(100, 10_000))][..])
        );
        // node-b's report ages; read with a ttl shorter than its age, it is stale.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = a
            .report_demand(
                "node-a",
                &[("alice", demand(2, 2))],
                Duration::from_millis(100),
            )
            .await
            .unwrap();
        assert_eq!(
            r.views[0].as_deref(),
            Some(&[("node-a".to_string(), demand(2, 2))][..])
        );
        assert_eq!(r.refused.stale, 1, "{:?}", r.refused);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn garbage_demand_values_are_refused_counted_and_bounded() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let mut a = store(&server);
        let now_ms: u64 = {
            let t = server.cli(&["TIME"]);
            let mut it = t.split_whitespace();
            let s: u64 = it.next().unwrap().parse().unwrap();
            let us: u64 = it.next().unwrap().parse().unwrap();
            s * 1000 + us / 1000
        };
        let key = format!("tollgate:{{{POOL}}}:demand:alice");
        let huge = format!("{} 1 {now_ms}", MAX_DEMAND + 1);
        let future = format!("1 1 {}", now_ms + 3_600_000);
        let fine = format!("10 10 {now_ms}");
        server.cli(&[
            "HSET", &key, "node-b", &fine, "short", "1 2", "old", "5 5 1000", "future", &future,
            "huge", &huge, "bad name", &fine, "text", "a b c",
        ]);
        server.cli(&["SET", &format!("tollgate:{{{POOL}}}:demand:mallory"), "x"]);
        let r = a
            .report_demand(
                "node-a",
                &[
                    ("alice", demand(3, 3)),
                    ("mallory", demand(1, 1)),
                    ("", demand(1, 1)),
                ],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(
            r.views[0].as_deref(),
            Some(
                &[
                    ("huge".to_string(), demand(MAX_DEMAND, 1)),
                    ("node-a".to_string(), demand(3, 3)),
                    ("node-b".to_string(), demand(10, 10)),
                ][..]
            )
        );
        assert_eq!(r.views[1], None);
        assert_eq!(r.views[2], None);
        assert_eq!(
            r.refused,
            Refused {
                malformed: 4,
                clamped: 1,
                stale: 1,
                wrong_type: 1,
                bad_identity: 1,
                ..Refused::default()
            }
        );
    })
    .await
    .unwrap();
}

/// The micro-measure for sizing (not a timed assertion): one report cycle, spend and
/// demand, for 10 000 identities from one node against a local redis-server, with three
/// other nodes' reports already in the store. Run:
/// `cargo test -p tollgate --lib fleet::store::spend::tests::cycle_for_10000 -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement for BENCHMARKS.md, not a check"]
async fn cycle_for_10000_identities() {
    let server = RedisServer::start(&[]);
    let mut s = store(&server);
    let names: Vec<String> = (0..10_000).map(|i| format!("identity-{i:05}")).collect();
    let ttl = Duration::from_secs(60);
    for other in ["node-b", "node-c", "node-d"] {
        let spend_reports: Vec<SpendReport> = names
            .iter()
            .map(|n| report(n, spend(1000, 10), None))
            .collect();
        s.report_spend(WINDOW, other, &spend_reports, TTL)
            .await
            .unwrap();
        let demand_reports: Vec<(&str, Demand)> = names
            .iter()
            .map(|n| (n.as_str(), demand(100, 1000)))
            .collect();
        s.report_demand(other, &demand_reports, ttl).await.unwrap();
    }
    let mut samples = Vec::new();
    for round in 0..5u64 {
        let spend_reports: Vec<SpendReport> = names
            .iter()
            .map(|n| report(n, spend(round * 100, round), None))
            .collect();
        let demand_reports: Vec<(&str, Demand)> = names
            .iter()
            .map(|n| (n.as_str(), demand(50 + round, 500)))
            .collect();
        let t = Instant::now();
        let sr = s
            .report_spend(WINDOW, "node-a", &spend_reports, TTL)
            .await
            .unwrap();
        let t_spend = t.elapsed();
        let dr = s
            .report_demand("node-a", &demand_reports, ttl)
            .await
            .unwrap();
        let t_all = t.elapsed();
        assert!(
            sr.totals
                .iter()
                .all(|t| matches!(t, FleetSpend::Total { .. }))
        );
        assert!(
            dr.views
                .iter()
                .all(|v| v.as_ref().is_some_and(|v| v.len() == 4))
        );
        samples.push((sr.round_trips + dr.round_trips, t_spend, t_all));
    }
    // The server's own share of the time (commands' usec), to tell it from the client's.
    for line in server.cli(&["INFO", "commandstats"]).lines() {
        if ["hset", "hrandfield", "pexpire", "hdel", "time"]
            .iter()
            .any(|c| line.starts_with(&format!("cmdstat_{c}:")))
        {
            eprintln!("server: {line}");
        }
    }
    for (rt, ts, ta) in &samples {
        eprintln!(
            "10 000 identities, 4 nodes in the store: {rt} round trips, spend {:.1} ms, spend + demand {:.1} ms",
            ts.as_secs_f64() * 1000.0,
            ta.as_secs_f64() * 1000.0
        );
    }
}
