//! `cargo xtask bench`: the fleet (#14). Four nodes and a real `redis-server`
//! (`support/fleet.rs`). A client sends a UDP datagram to each node's probe port in turn,
//! one every 200 µs (so each node gets one every 0.8 ms); a receiver in each node's
//! namespace records when each arrives (what XDP passed). Each of 100 tries binds a fresh
//! token on node 1 (HTTPS, curl) and finds, on nodes 2–4, the first datagram that arrives
//! after the bind's reply; then revokes the token on node 4 (`tollgate token revoke`) and
//! finds the last datagram that arrives at any node after the command started.
//!
//! Then the global-rate accuracy (a second lab, plan `customer` at 1000 datagrams/s
//! fleet-wide): one identity offers 4× the rate, 70/10/10/10 across the nodes, for 8 s, then
//! all of it to node 2 for 6 s; every node's probe counts what XDP admitted, sampled every
//! 250 ms. Reported: the error of the fleet's total over every 1 s window from the 2nd second
//! on, and how long node 2 took after the shift to admit ≥ 90 % of the rate over a 1 s window.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tollgate_tests::{
    config::Plan,
    fleet::{FleetLab, PROBE_PORT, Probes, Senders},
};

const TRIES: usize = 100;
/// Store outages (each a kill, a revocation, a restart of the store, empty).
const OUTAGE_TRIES: usize = 10;
const NODES: usize = 4;
const INTERVAL: Duration = Duration::from_micros(200);
/// A try whose change has not spread by then is reported as lost (and fails the run).
const LIMIT: Duration = Duration::from_secs(5);

type Arrivals = Arc<Mutex<Vec<Vec<Instant>>>>;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    bind_and_revoke();
    global_rate();
}

const FLEET_RATE: f64 = 1000.0;
const SAMPLE: Duration = Duration::from_millis(250);

/// Samples every node's admitted count every [`SAMPLE`] for `samples` samples.
fn sample(probes: &Probes, samples: usize) -> Vec<Vec<u64>> {
    let start = Instant::now();
    (1..=samples)
        .map(|i| {
            let at = start + SAMPLE * i as u32;
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            probes.counts()
        })
        .collect()
}

fn global_rate() {
    let mut lab = FleetLab::with_plan(
        NODES,
        1,
        Plan::new("customer")
            .packets(FLEET_RATE as u64, 100)
            .fleet_wide(),
    );
    lab.start_all();
    let token = lab.issue("acme", "10m", "tok-acme");
    assert_eq!(lab.bind(0, 0, &token).0, 200);
    let left = lab.wait_served(0, &[0, 1, 2, 3], true, LIMIT);
    assert!(left.is_empty(), "not served on {left:?}");
    let probes = Probes::start(&lab);
    let senders = Senders::start(&lab, 0, 64, &[2800, 400, 400, 400]);
    let mut series = vec![probes.counts()];
    series.extend(sample(&probes, 32));
    senders.set(&[0, 4000, 0, 0]);
    let shift_at = series.len() - 1;
    series.extend(sample(&probes, 24));
    senders.stop();
    let per_s = 1.0 / SAMPLE.as_secs_f64();
    let window = per_s as usize; // samples per second
    let total = |i: usize, j: usize| -> f64 {
        (0..NODES)
            .map(|n| (series[j][n] - series[i][n]) as f64)
            .sum::<f64>()
            / ((j - i) as f64 * SAMPLE.as_secs_f64())
    };
    let mut errors: Vec<f64> = (2 * window..series.len() - window)
        .filter(|i| !(shift_at.saturating_sub(window)..shift_at + 2 * window).contains(i))
        .map(|i| (total(i, i + window) - FLEET_RATE).abs() / FLEET_RATE * 100.0)
        .collect();
    let node2 = |i: usize| {
        (series[i + window][1] - series[i][1]) as f64 / (window as f64 * SAMPLE.as_secs_f64())
    };
    let reached = (shift_at..series.len() - window)
        .find(|i| node2(*i) >= 0.9 * FLEET_RATE)
        .map(|i| (i + window - shift_at) as f64 * SAMPLE.as_secs_f64());
    println!();
    println!("| global rate, 4 nodes, {FLEET_RATE:.0}/s fleet-wide, 4× offered | value |");
    println!("|---|---:|");
    println!(
        "| fleet total over 1 s windows (70/10/10/10, and all on one node), error p50 / max | {:.1} % / {:.1} % |",
        pct(&mut errors, 0.5),
        errors.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "| 70/10/10/10, seconds 4–8: per node | {:?} /s |",
        (0..NODES)
            .map(|n| ((series[32][n] - series[16][n]) as f64 / 4.0).round())
            .collect::<Vec<_>>()
    );
    println!(
        "| all demand moved to node 2: a 1 s window of ≥ 90 % of the rate there ends after | {} |",
        reached.map_or("never (in 6 s)".to_owned(), |s| format!("{s:.2} s"))
    );
}

fn bind_and_revoke() {
    let mut lab = FleetLab::new(NODES, 1);
    lab.start_all();
    let stop = Arc::new(AtomicBool::new(false));
    let arrivals: Arrivals = Arc::new(Mutex::new(vec![Vec::new(); NODES]));
    let mut receivers = Vec::new();
    for n in 0..NODES {
        let addr = SocketAddr::new(IpAddr::V4(lab.nodes[n].ip), PROBE_PORT);
        let (stop, arrivals) = (Arc::clone(&stop), Arc::clone(&arrivals));
        receivers.push(lab.nodes[n].ns.spawn(move || {
            let s = UdpSocket::bind(addr).expect("probe socket");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                if s.recv(&mut buf).is_ok() {
                    arrivals.lock().expect("lock")[n].push(Instant::now());
                }
            }
        }));
    }
    let targets: Vec<SocketAddr> = lab
        .nodes
        .iter()
        .map(|n| SocketAddr::new(IpAddr::V4(n.ip), PROBE_PORT))
        .collect();
    let client_ip = lab.clients[0].ip;
    let send_stop = Arc::clone(&stop);
    let sender = lab.clients[0].ns.spawn(move || {
        let s = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client_ip), 0)).expect("client");
        let start = Instant::now();
        let mut i = 0u32;
        while !send_stop.load(Ordering::Relaxed) {
            let deadline = start + INTERVAL * i;
            while Instant::now() < deadline {
                std::hint::spin_loop();
            }
            let _ = s.send_to(&i.to_le_bytes(), targets[i as usize % NODES]);
            i += 1;
        }
    });
    let first_after = |n: usize, t: Instant| {
        arrivals.lock().expect("lock")[n]
            .iter()
            .find(|a| **a >= t)
            .copied()
    };
    let last = |n: usize| arrivals.lock().expect("lock")[n].last().copied();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (mut admitted, mut dropped, mut quarantined) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..TRIES {
        let token = lab.issue("bench", "10m", &format!("tok-{i}"));
        let (code, body) = lab.bind(0, 0, &token);
        assert_eq!(code, 200, "{body}");
        let t_bind = Instant::now();
        let deadline = t_bind + LIMIT;
        for n in 1..NODES {
            let at = loop {
                if let Some(a) = first_after(n, t_bind) {
                    break a;
                }
                assert!(
                    Instant::now() < deadline,
                    "try {i}: node {} never admitted",
                    n + 1
                );
                std::thread::sleep(Duration::from_micros(200));
            };
            admitted.push(ms(at - t_bind));
        }
        // Dropped everywhere once no node has seen a datagram for 50 ms (the probe period is
        // 0.8 ms per node): the figure is the last arrival at any node after the command
        // returned.
        let dropped_everywhere = |what: &str, t_ret: Instant| -> f64 {
            let deadline = t_ret + LIMIT;
            loop {
                let newest = (0..NODES).filter_map(last).max().unwrap_or(t_ret);
                if newest < Instant::now() - Duration::from_millis(50) {
                    return ms(newest.saturating_duration_since(t_ret));
                }
                assert!(
                    Instant::now() < deadline,
                    "try {i}: {what}: not dropped everywhere"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // A quarantine on node 3, then its release on node 2 (admitted again everywhere).
        std::thread::sleep(Duration::from_millis(20));
        lab.cli_ok(2, &["quarantine", "bench", "--reason", "bench"]);
        quarantined.push(dropped_everywhere("quarantine", Instant::now()));
        lab.cli_ok(1, &["release", "bench", "--reason", "bench"]);
        let t_rel = Instant::now();
        for n in 0..NODES {
            while first_after(n, t_rel).is_none() {
                assert!(
                    Instant::now() < t_rel + LIMIT,
                    "try {i}: not released on node {}",
                    n + 1
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        lab.cli_ok(
            3,
            &[
                "token",
                "revoke",
                "--token-id",
                &format!("tok-{i}"),
                "--reason",
                "bench",
            ],
        );
        dropped.push(dropped_everywhere("revoke", Instant::now()));
    }
    // The store killed, a revocation on node 2 during the outage, the store back empty: how
    // long after it answers again is the revoked client dropped everywhere?
    let mut caught_up = Vec::new();
    for i in 0..OUTAGE_TRIES {
        let id = format!("tok-outage-{i}");
        let token = lab.issue("bench", "10m", &id);
        assert_eq!(lab.bind(0, 0, &token).0, 200);
        let t_bind = Instant::now();
        for n in 0..NODES {
            while first_after(n, t_bind).is_none() {
                assert!(
                    Instant::now() < t_bind + LIMIT,
                    "outage try {i}: not admitted"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        lab.redis.kill();
        lab.cli_ok(
            1,
            &["token", "revoke", "--token-id", &id, "--reason", "bench"],
        );
        std::thread::sleep(Duration::from_millis(500));
        lab.redis.restart_empty();
        let t_up = Instant::now();
        let deadline = t_up + LIMIT;
        loop {
            let newest = (0..NODES).filter_map(last).max().unwrap_or(t_up);
            if newest < Instant::now() - Duration::from_millis(50) {
                caught_up.push(ms(newest.saturating_duration_since(t_up)));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "outage try {i}: not dropped everywhere"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender");
    for r in receivers {
        r.join().expect("receiver");
    }
    println!(
        "| fleet of {NODES} nodes, one store ({TRIES} tries, probe every {:.1} ms per node) | p50 (ms) | p99 (ms) |",
        ms(INTERVAL) * NODES as f64
    );
    println!("|---|---:|---:|");
    println!(
        "| bind on node 1 (its HTTPS reply) → first datagram admitted on nodes 2–4 | {:.2} | {:.2} |",
        pct(&mut admitted, 0.5),
        pct(&mut admitted, 0.99)
    );
    println!(
        "| `tollgate quarantine` on node 3 returning → last datagram admitted anywhere | {:.2} | {:.2} |",
        pct(&mut quarantined, 0.5),
        pct(&mut quarantined, 0.99)
    );
    println!(
        "| store back (empty) after a revocation on node 2 during its outage → last datagram admitted anywhere ({OUTAGE_TRIES} outages; p99 = max) | {:.2} | {:.2} |",
        pct(&mut caught_up, 0.5),
        pct(&mut caught_up, 1.0)
    );
    println!(
        "| `tollgate token revoke` on node 4 returning → last datagram admitted anywhere | {:.2} | {:.2} |",
        pct(&mut dropped, 0.5),
        pct(&mut dropped, 0.99)
    );
}
