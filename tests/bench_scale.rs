//! `cargo xtask bench`: the control plane at scale. For each size N, the real agent (release
//! build) starts cold with N configured identities, each bound to its own address: the time
//! from `tollgate run` to the program attached with all N bindings in the kernel; then bind
//! latency over the control socket (run-time bindings of one more identity, p50/p99) with N
//! bindings already there; `GET /metrics` at N identities; the agent's resident memory and the
//! kernel memory of its maps (`memlock` of each map fd in /proc/<pid>/fdinfo).
//!
//! Each size's tables are sized with `[limits]` (N + 2 identity slots, at least 16: the anonymous one and
//! the bind-latency identity's; N + 1 024 exact bindings). A size that does not come up within
//! its limit is reported as such, and the sizes before it keep their figures (each one is
//! written to the JSON as soon as it is measured).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use tollgate::control::{client, protocol::Request};
use tollgate_tests::{
    agent::{Agent, AgentDirs},
    bench::{Figures, median, process_map_memlock, quantile, quick, rss_bytes},
    config::{Config, Controller, Endpoint, Identity, Plan},
    lab::Lab,
    scrape::scrape_within,
};

/// How long one size may take to come up with all its bindings.
const COLD_LIMIT: Duration = Duration::from_secs(90);
const BINDS: usize = 200;
const SCRAPES: usize = 11;

/// Address `i` of the size's identities, `2001:db8:1::/96` (a million do not fit in
/// 198.18.0.0/15).
fn addr(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(0x2001_0db8_0001_0000_0000_0000_0000_0000u128 + u128::from(i))
}

struct Sized {
    n: u32,
    cold_s: f64,
    bind_p50_ms: f64,
    bind_p99_ms: f64,
    scrape_ms: f64,
    rss_mib: f64,
    maps_mib: f64,
    maps: usize,
}

fn measure(n: u32) -> Option<Sized> {
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let metrics: SocketAddr = "127.0.0.1:9464".parse().expect("addr");
    let config = Config::new(&[&lab.server_if])
        .limits((n + 2).max(16), n + 1024)
        .listen_metrics(metrics)
        .controller(Controller::no_gpu())
        .top_k(10)
        .plan(Plan::new("customer").packets(100, 10))
        .endpoint(Endpoint::udp("model", 7000, &["customer"]))
        .identity(Identity::new(
            "binder",
            "customer",
            "customer",
            &[Ipv4Addr::new(198, 19, 201, 1)],
        ))
        .numbered_identities(n, "customer", "customer", addr)
        .write(&dirs.state_dir.join("tollgate.toml"));
    let t = Instant::now();
    let agent = Agent::native(&lab.server, &dirs, &config);
    // Cold: until the kernel holds every binding (status counts the kernel's tables).
    let limit = t + COLD_LIMIT;
    loop {
        let bindings = client::call(&dirs.socket, &Request::Status {}, Duration::from_secs(10))
            .ok()
            .and_then(|s| s.result)
            .and_then(|r| r["bindings"].as_u64())
            .unwrap_or(0);
        if bindings >= u64::from(n) {
            break;
        }
        if Instant::now() > limit {
            eprintln!("[bench_scale] N={n}: {bindings} bindings after {COLD_LIMIT:?}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let cold_s = t.elapsed().as_secs_f64();

    // Bind latency: run-time bindings of one more identity, over the control socket, each
    // removed again so that the table's size stays N.
    let mut binds = Vec::with_capacity(BINDS);
    for i in 0..BINDS as u32 {
        let target = format!("{}/32", Ipv4Addr::new(198, 19, 200, (i % 250) as u8 + 1));
        let t = Instant::now();
        let r = client::call(
            &dirs.socket,
            &Request::Bind {
                target: target.clone(),
                identity: "binder".into(),
                for_secs: None,
            },
            Duration::from_secs(10),
        )
        .expect("bind");
        binds.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(r.ok, "bind {target}: {:?}", r.error);
        let r = client::call(
            &dirs.socket,
            &Request::Unbind { target },
            Duration::from_secs(10),
        )
        .expect("unbind");
        assert!(r.ok, "unbind: {:?}", r.error);
    }

    let mut scrapes = Vec::with_capacity(SCRAPES);
    for _ in 0..SCRAPES {
        let t = Instant::now();
        let body = scrape_within(&lab.server, metrics, Duration::from_secs(30));
        scrapes.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(body.contains("tollgate_"), "N={n}: an empty scrape");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = agent.pid();
    let rss = rss_bytes(pid).unwrap_or(0) as f64 / 1048576.0;
    let (memlock, maps) = process_map_memlock(pid);
    drop(agent);
    Some(Sized {
        n,
        cold_s,
        bind_p50_ms: median(&binds),
        bind_p99_ms: quantile(&binds, 0.99),
        scrape_ms: median(&scrapes),
        rss_mib: rss,
        maps_mib: memlock as f64 / 1048576.0,
        maps,
    })
}

fn main() {
    tollgate_tests::require_root();
    let wanted: &[u32] = if quick() {
        &[1, 10_000]
    } else {
        &[1, 10_000, 100_000, 1_000_000]
    };
    let mut figures = Figures::default();
    println!(
        "| N identities, each bound | cold start to N bindings in the kernel (s) | bind p50 (ms) | bind p99 (ms) | /metrics scrape p50 (ms) | agent RSS (MiB) | kernel map memory (MiB, maps) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut missed = Vec::new();
    for &n in wanted {
        eprintln!("[bench_scale] N = {n}");
        // The kit's launch gives up (panics) when the agent has not attached within its
        // start limit: at this size that is a figure, not a failure of the bench.
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(n)));
        let Ok(Some(s)) = got else {
            missed.push(n);
            // A larger size would take longer still.
            break;
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} ({}) |",
            s.n, s.cold_s, s.bind_p50_ms, s.bind_p99_ms, s.scrape_ms, s.rss_mib, s.maps_mib, s.maps
        );
        figures.set(format!("scale.bind_cold_s.{n}"), s.cold_s);
        figures.set(format!("scale.bind_p50_ms.{n}"), s.bind_p50_ms);
        figures.set(format!("scale.bind_p99_ms.{n}"), s.bind_p99_ms);
        figures.set(format!("scale.scrape_ms.{n}"), s.scrape_ms);
        figures.set(format!("scale.rss_mib.{n}"), s.rss_mib);
        figures.set(format!("scale.maps_mib.{n}"), s.maps_mib);
        figures.write("bench_scale");
    }
    println!();
    println!(
        "Bind latency: {BINDS} run-time bindings over the control socket (each removed again), \
         N = 1 standing for \"0 existing bindings\". Scrape: median of {SCRAPES}."
    );
    if let Some(n) = missed.first() {
        println!();
        println!(
            "N = {n}: the agent was not attached with all N bindings in the kernel within the \
             kit's start limit (60 s) or {} s of `tollgate run`; larger sizes were not tried.",
            COLD_LIMIT.as_secs()
        );
    }
    figures.write("bench_scale");
}
