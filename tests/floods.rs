//! Floods against the real agent, counted where they land (#12's suite): a spoofed flood from
//! random sources across the lab's ranges leaves bound clients their configured rate, and a
//! flood rotating a million IPv6 sources inside one /64 gets no more than that /64's
//! anonymous allowance.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tollgate_common::{Reason, packet::PacketBuilder};
use tollgate_tests::{
    agent::{Agent, AgentDirs, reason_counter},
    config::{Config, Controller, Endpoint, Identity, Plan},
    flood::{Flood, Tap, V4_SRC_OFFSET, V6_SRC_OFFSET, XorShift, random_v4, random_v6},
    frames::FrameBlaster,
    lab::Lab,
    node::{frame, host4, host6},
};

const PROTECTED: u16 = 8000;
/// Source ports: the bound clients' own frames (`node::frame`'s) and the flood's, so the tap
/// counts a client's own frames even where the flood spoofs its address.
const CLIENT_PORT: u16 = 40000;
const FLOOD_PORT: u16 = 40001;
const BIND_PORT: u16 = 8443;

/// The two floods each take a core: run side by side (cargo's default of one thread per core)
/// they would measure each other, not the agent.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn long() -> bool {
    std::env::var_os("TOLLGATE_LONG").is_some()
}

fn seed() -> u64 {
    std::env::var("TOLLGATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

fn start_agent(lab: &Lab, dirs: &AgentDirs, config: &Config) -> Agent {
    let path = config.write(&dirs.state_dir.join("tollgate.toml"));
    Agent::launch(
        &lab.server,
        dirs,
        &[
            "--config",
            path.to_str().expect("utf-8"),
            "--mode",
            "native",
        ],
    )
}

/// The bound clients' plan: a rate any loaded machine sends, with a burst of a fifth of a
/// second, so the window below measures the rate rather than the burst.
const CLIENT_RATE: u64 = 500;
const CLIENT_BURST: u64 = 100;
/// What each client offers: over its rate, so the limiter, not the sender, sets what passes.
const CLIENT_OFFER: u32 = 750;
/// The flood's ceiling per family: well past anything the clients send, yet below what one
/// core can push through a veth, so the clients' own senders still get the CPU they need
/// (a sender starved by the test machine would say nothing about the agent).
const FLOOD_PER_FAMILY: u32 = 40_000;

#[test]
fn bound_clients_keep_their_rate_through_a_random_source_flood() {
    tollgate_tests::require_root();
    let _serial = one_at_a_time();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let clients: Vec<(&str, IpAddr)> = vec![
        ("alpha", host4(&lab, 11)),
        ("beta", host4(&lab, 12)),
        ("gamma", host6(&lab, 11)),
    ];
    let mut config = Config::new(&[&lab.server_if])
        .controller(Controller::no_gpu())
        .plan(Plan::new("customer").packets(CLIENT_RATE, CLIENT_BURST))
        .endpoint(Endpoint::tcp("vllm", PROTECTED, &["customer"]));
    for (name, addr) in &clients {
        config = config.identity(Identity::new(name, "customer", "customer", &[addr]));
    }
    let _agent = start_agent(&lab, &dirs, &config);
    let tap = Tap::start(&lab.server, &lab.server_if);
    let dst = |src: IpAddr| match src {
        IpAddr::V4(_) => IpAddr::V4(lab.server_v4),
        IpAddr::V6(_) => IpAddr::V6(lab.server_v6),
    };
    let blasters: Vec<FrameBlaster> = clients
        .iter()
        .map(|(_, src)| {
            FrameBlaster::start(
                &lab.client,
                &lab.client_if,
                frame(*src, dst(*src), PROTECTED, "tcp"),
                CLIENT_OFFER,
            )
        })
        .collect();
    // Long enough to spend each client's burst: from here on only the rate passes.
    std::thread::sleep(Duration::from_secs(2));

    let bound: HashSet<IpAddr> = clients.iter().map(|(_, a)| *a).collect();
    let seed = seed();
    let spoofed = |v6: bool, seed: u64| {
        let bound = bound.clone();
        let mut rng = XorShift::new(seed);
        let template = if v6 {
            PacketBuilder::v6(random_v6(&mut rng).octets(), lab.server_v6.octets())
        } else {
            PacketBuilder::v4(random_v4(&mut rng).octets(), lab.server_v4.octets())
        }
        .tcp(FLOOD_PORT, PROTECTED)
        .payload(60)
        .build();
        Flood::start(
            &lab.client,
            &lab.client_if,
            template,
            None,
            Some(FLOOD_PER_FAMILY),
            move |_, f| loop {
                // Any source of the lab's ranges except the bound clients' own: those are
                // the spoofing of finding 5, not this flood.
                let (src, at, len) = if v6 {
                    let a = random_v6(&mut rng);
                    (IpAddr::V6(a), V6_SRC_OFFSET, 16)
                } else {
                    let a = random_v4(&mut rng);
                    (IpAddr::V4(a), V4_SRC_OFFSET, 4)
                };
                if bound.contains(&src) {
                    continue;
                }
                match src {
                    IpAddr::V4(a) => f[at..at + len].copy_from_slice(&a.octets()),
                    IpAddr::V6(a) => f[at..at + len].copy_from_slice(&a.octets()),
                }
                break;
            },
        )
    };
    let unbound_before = reason_counter(&dirs, Reason::Unbound, 1).packets;
    let before = tap.flows();
    let t0 = Instant::now();
    let floods = [spoofed(false, seed), spoofed(true, seed ^ 0x5eed)];
    std::thread::sleep(Duration::from_secs(if long() { 60 } else { 10 }));
    let during = tap.flows();
    let window = t0.elapsed().as_secs_f64();
    let flood_sent: u64 = floods.into_iter().map(|f| f.stop().sent).sum();
    let offered: Vec<u64> = blasters.into_iter().map(FrameBlaster::stop).collect();
    let unbound = reason_counter(&dirs, Reason::Unbound, 1).packets - unbound_before;
    let after = tap.stop();
    eprintln!(
        "seed {seed} (TOLLGATE_SEED replays it): {flood_sent} spoofed frames in {window:.1}s \
         ({:.0}/s), {unbound} counted unbound; clients offered {offered:?} in all",
        flood_sent as f64 / window
    );

    // The flood was one (a quarter of its ceiling is still 13× the clients' traffic), every
    // frame of it judged and dropped.
    assert!(
        flood_sent as f64 >= f64::from(FLOOD_PER_FAMILY) * 2.0 * window / 4.0,
        "the flood sent only {flood_sent} frames in {window:.1}s"
    );
    assert!(
        unbound >= flood_sent * 95 / 100,
        "of {flood_sent} spoofed frames only {unbound} were counted unbound"
    );
    let leaked: u64 = after
        .iter()
        .filter(|((src, _), _)| !bound.contains(src))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(leaked, 0, "spoofed frames reached the server: {leaked}");

    // Each client got its rate while the flood ran. Its sender may fall behind on a busy
    // machine; then what it offered (over its rate, so at least the rate) is the bar.
    let owed = CLIENT_RATE as f64 * window;
    let mut failures = Vec::new();
    for (name, src) in &clients {
        let own = (*src, CLIENT_PORT);
        let passed =
            during.get(&own).copied().unwrap_or(0) - before.get(&own).copied().unwrap_or(0);
        eprintln!(
            "{name} ({src}): {passed} passed in {window:.1}s ({:.0}/s of {CLIENT_RATE}/s)",
            passed as f64 / window
        );
        if (passed as f64) < owed * 0.95 {
            failures.push(format!(
                "{name} ({src}) got {passed} frames through in {window:.1}s of flood: below \
                 95% of its {CLIENT_RATE}/s ({owed:.0})"
            ));
        }
        // Nor more: the flood did not open the limiter either.
        if (passed as f64) > owed * 1.05 + CLIENT_BURST as f64 {
            failures.push(format!(
                "{name} ({src}) got {passed} frames through in {window:.1}s: over its \
                 {CLIENT_RATE}/s and burst {CLIENT_BURST}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The anonymous allowance of `anonymous = true` endpoints: per IPv4 /24 and per IPv6 /64,
/// /56 and /48, so rotating sources inside one /64 buys nothing.
const ANON_RATE: u64 = 20;
const ANON_BURST: u64 = 40;

#[test]
fn a_million_sources_in_one_v6_64_get_only_its_anonymous_allowance() {
    tollgate_tests::require_root();
    let _serial = one_at_a_time();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let config = Config::new(&[&lab.server_if])
        .controller(Controller::no_gpu())
        .anonymous(ANON_RATE, ANON_BURST)
        .plan(Plan::new("customer"))
        .endpoint(Endpoint::tcp("bind", BIND_PORT, &["customer"]).anonymous());
    let _agent = start_agent(&lab, &dirs, &config);
    let tap = Tap::start(&lab.server, &lab.server_if);
    let sources: u64 = if long() { 10_000_000 } else { 1_000_000 };
    let s = lab.client_v6.segments();
    let prefix = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
    let template = PacketBuilder::v6(prefix.octets(), lab.server_v6.octets())
        .tcp(40000, BIND_PORT)
        .payload(20)
        .build();
    let (anon0, over0) = (
        reason_counter(&dirs, Reason::Anonymous, 1).packets,
        reason_counter(&dirs, Reason::AnonymousRate, 1).packets,
    );
    let t0 = Instant::now();
    // Interface identifier i × an odd constant: a bijection of the 64-bit space, so every
    // frame has a source of its own, spread over the whole /64, never the prefix's ::0.
    let flood = Flood::start(
        &lab.client,
        &lab.client_if,
        template,
        Some(sources),
        None,
        |i, f| {
            let iid = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            f[V6_SRC_OFFSET + 8..V6_SRC_OFFSET + 16].copy_from_slice(&iid.to_be_bytes());
        },
    );
    let report = flood.join();
    // The program runs as each frame is sent (veth), so once the sender is done the
    // verdicts are in; this bound covers every frame the allowance could have admitted.
    let elapsed = t0.elapsed().as_secs_f64();
    let anon = reason_counter(&dirs, Reason::Anonymous, 1).packets - anon0;
    let over = reason_counter(&dirs, Reason::AnonymousRate, 1).packets - over0;
    std::thread::sleep(Duration::from_millis(200));
    // Read before the tap stops: a tap that lost frames (because far too many passed) must
    // not hide the allowance's own failure message below.
    let arrived: u64 = tap
        .flows()
        .iter()
        .filter(|((src, _), _)| match src {
            IpAddr::V6(a) => a.segments()[..4] == s[..4] && *src != IpAddr::V6(lab.client_v6),
            IpAddr::V4(_) => false,
        })
        .map(|(_, n)| n)
        .sum();
    let allowance = ANON_BURST as f64 + ANON_RATE as f64 * elapsed;
    eprintln!(
        "{} frames from {sources} sources in {elapsed:.1}s ({:.0}/s): {anon} anonymous, \
         {over} anonymous_rate, {arrived} at the server; allowance {allowance:.0}",
        report.sent,
        report.sent as f64 / elapsed
    );
    // burst + rate × elapsed, with `elapsed` taken around the whole flood, so an upper bound;
    // one packet of rounding in the limiter's arithmetic.
    assert!(
        (anon as f64) <= allowance + 1.0,
        "the /64 got {anon} frames through as anonymous in {elapsed:.1}s: its allowance is \
         {ANON_BURST} + {ANON_RATE}/s × {elapsed:.1}s = {allowance:.0}"
    );
    assert!(
        (arrived as f64) <= allowance + 1.0,
        "{arrived} frames of the /64 reached the server; allowance {allowance:.0}"
    );
    assert_eq!(report.sent, sources, "the sender did not send every frame");
    assert!(
        anon + over >= sources * 95 / 100,
        "only {} of {sources} frames reached the program",
        anon + over
    );
    // And the allowance was given: a quiet /64 gets its burst at once.
    assert!(
        anon >= ANON_BURST,
        "the /64 got only {anon} frames through, under its burst {ANON_BURST}"
    );
    tap.stop();
}
