//! The agent at scale, end to end: many configured identities, each bound to an address,
//! a few of them sending traffic; one `/metrics` scrape. What is asserted is the shape of
//! the scrape (series bounded whatever the number of identities, per-identity series only
//! for the top K, and the K busiest are the ones shown), never its speed: the time, the
//! start-up and the agent's resident memory are printed (`-- --nocapture`) for the report
//! and the benchmark (`cargo xtask bench` measures them against a baseline).
//!
//! `TOLLGATE_SCALE_IDENTITIES` overrides the number of identities (default 100 000, the
//! issue's acceptance size); `[limits]` sizes the kernel tables to fit (one address each
//! in 198.18.0.0/15, so at most 114 000 or so here).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{Agent, AgentDirs},
    config::{Config, Controller, Endpoint, Plan},
    frames::send_frames,
    lab::Lab,
    scrape::scrape_within,
};

const METRICS: &str = "127.0.0.1:9464";
const TOP_K: usize = 10;
/// Identities that send traffic: identity `i` of them sends `i + 1` frames, so the top K
/// are known (the last K senders).
const SENDERS: u32 = 40;

fn identities() -> u32 {
    std::env::var("TOLLGATE_SCALE_IDENTITIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Identity `i`'s address: 198.18.0.0/15 from 198.18.64.0 on (the lab's own /24s are lower).
fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i)
}

/// A process's resident memory, KiB (VmRSS in /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_scrape_with_many_identities_keeps_its_series_bounded() {
    tollgate_tests::require_root();
    let n = identities();
    assert!(n > SENDERS, "at least {SENDERS} identities");
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    // Slots 1..n need n + 1 identities; the exact map rounded up to what the suite uses.
    let base = Config::new(&[&lab.server_if])
        .limits(n + 1, (n + 1).next_power_of_two().max(131_072))
        .listen_metrics(METRICS)
        .controller(Controller::no_gpu())
        .top_k(TOP_K as u64)
        .plan(Plan::new("customer").packets(100_000, 1_000))
        .endpoint(Endpoint::udp("model", 7000, &["customer"]));
    let config = base
        .numbered_identities(n, "customer", "customer", addr)
        .write(&dirs.state_dir.join("tollgate.toml"));
    let started = Instant::now();
    let agent = Agent::native(&lab.server, &dirs, &config);
    let target: SocketAddr = METRICS.parse().expect("addr");
    let _ = scrape_within(&lab.server, target, Duration::from_secs(60));
    let start_s = started.elapsed().as_secs_f64();
    // Senders spread over the slots (the first, the middle, the last identities).
    let sender = |j: u32| j * (n / SENDERS);
    let frames: Vec<Vec<u8>> = (0..SENDERS)
        .flat_map(|j| {
            let f = PacketBuilder::v4(addr(sender(j)).octets(), lab.server_v4.octets())
                .udp(40000, 7000)
                .payload(60)
                .build();
            std::iter::repeat_n(f, j as usize + 1)
        })
        .collect();
    send_frames(&lab.client, &lab.client_if, &frames);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let text = scrape_within(&lab.server, target, Duration::from_secs(30));
    let scrape_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss = rss_kib(agent.pid());
    eprintln!(
        "{n} identities: start {start_s:.1} s, scrape {scrape_ms:.1} ms ({} bytes), agent RSS {:.1} MiB",
        text.len(),
        rss as f64 / 1024.0
    );

    let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    // The families labelled by identity have 2 series (pass, drop) per top-K identity.
    let top: Vec<&str> = series
        .iter()
        .filter(|l| l.starts_with("tollgate_top_identity_packets_total{"))
        .copied()
        .collect();
    assert_eq!(top.len(), 2 * TOP_K, "{top:?}");
    let shown: std::collections::BTreeSet<String> = top
        .iter()
        .filter_map(|l| l.split("identity=\"").nth(1))
        .filter_map(|r| r.split('"').next())
        .map(str::to_owned)
        .collect();
    let busiest: std::collections::BTreeSet<String> = (SENDERS - TOP_K as u32..SENDERS)
        .map(|j| format!("id{}", sender(j)))
        .collect();
    assert_eq!(shown, busiest, "the top K are the K busiest senders");
    // The busiest passed all its frames (burst 1 000).
    let busiest_line = format!(
        "tollgate_top_identity_packets_total{{identity=\"id{}\",verdict=\"pass\"}} {SENDERS}",
        sender(SENDERS - 1)
    );
    assert!(text.contains(&busiest_line), "no {busiest_line}");
    // No other family is labelled by identity, and no address appears.
    let labelled: Vec<&&str> = series
        .iter()
        .filter(|l| l.contains("identity=\"") && !l.starts_with("tollgate_top_identity_"))
        .collect();
    assert!(labelled.is_empty(), "{labelled:?}");
    assert!(!text.contains("198.18.64."), "an address in the scrape");
    // The whole scrape does not grow with the identities: what one endpoint, one plan and
    // the fixed families make (a few hundred series), far below one per identity.
    assert!(
        series.len() < 1_000,
        "{} series with {n} identities",
        series.len()
    );
    assert_eq!(
        series
            .iter()
            .find(|l| l.starts_with("tollgate_identities ")),
        Some(&format!("tollgate_identities {n}.0").as_str())
    );
}
