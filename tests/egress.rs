//! Egress end to end (#16), in a namespace lab with the streaming model-server stand-in
//! (support/stream.rs): the bytes the TC egress program counts per identity are what the
//! client's socket read; the time to first byte lands in the histogram bucket of the delay the
//! stand-in injects and its mean is the delay plus the lab's round trip; a request over its
//! endpoint's cap has its flow cut at the cap while others on the endpoint pass; and an agent
//! killed with SIGKILL and restarted over its pins keeps the flow table and the egress
//! counters.
//!
//! The kernel's figures are read from the pinned maps (summed over CPUs), the agent's own
//! figures from `tollgate top --once --output json`.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray};
use tollgate_common::{
    Reason,
    flow::{
        EgressCounters, FLOW_ANSWERS, FLOW_CUTS, FLOW_UNTRACKED, TTFB_BOUNDS_MS, TTFB_BUCKETS,
        TtfbHist, ttfb_index,
    },
    map_names,
    policy::Class,
};
use tollgate_tests::{
    agent::{Agent, AgentDirs, reason_counter, tollgate_bin},
    config::{Config, Endpoint, Identity, Plan},
    lab::Lab,
    stream::{Answer, Gate, StreamClient, StreamServer},
};

const PORT: u16 = 8000;
/// The only endpoint, first in the file.
const ENDPOINT: u32 = 1;
const CLASS: Class = Class::Customer;
/// One socket call (a connect, a send, a read) never blocks longer than this.
const IO_LIMIT: Duration = Duration::from_secs(10);

/// The traffic tests compare times and byte counts on a shared machine: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A lab with the agent's directories, the stand-in on the server, and identities of class
/// customer on an unlimited plan, each bound to its own client host.
struct World {
    lab: Lab,
    dirs: AgentDirs,
    config: PathBuf,
    server: StreamServer,
    /// (name, address) in the order given.
    hosts: Vec<(String, IpAddr)>,
}

impl World {
    /// Identities `names` on client hosts .11, .12, ...; the endpoint's `max_request_bytes`
    /// when `request_cap` is given.
    fn new(names: &[&str], request_cap: Option<u64>) -> World {
        tollgate_tests::require_root();
        let lab = Lab::new();
        let dirs = AgentDirs::new();
        let hosts: Vec<(String, IpAddr)> = names
            .iter()
            .zip(11u8..)
            .map(|(name, n)| ((*name).to_owned(), IpAddr::V4(lab.add_client_address(n))))
            .collect();
        let mut config = Config::new(&[&lab.server_if])
            .plan(Plan::new("open"))
            .endpoint(Endpoint::tcp("model", PORT, &[CLASS.label()]));
        for (name, addr) in &hosts {
            config = config.identity(Identity::new(name, CLASS.label(), "open", &[addr]));
        }
        let config = write_config(&config, request_cap, &dirs.state_dir.join("tollgate.toml"));
        let server = StreamServer::start(
            &lab.server,
            SocketAddr::new(IpAddr::V4(lab.server_v4), PORT),
            Answer::bytes(4096),
        );
        World {
            lab,
            dirs,
            config,
            server,
            hosts,
        }
    }

    fn start(&self) -> Agent {
        Agent::native(&self.lab.server, &self.dirs, &self.config)
    }

    fn host(&self, name: &str) -> IpAddr {
        self.hosts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// A connection from identity `name`'s host to the stand-in.
    fn client(&self, name: &str) -> StreamClient {
        StreamClient::connect(
            &self.lab.client,
            Some(self.host(name)),
            self.server.addr,
            IO_LIMIT,
        )
        .unwrap_or_else(|e| panic!("connecting as {name}: {e}"))
    }

    /// Identity `name`'s egress counters, from the pins.
    fn egress(&self, name: &str) -> EgressCounters {
        egress_identity(&self.dirs, self.dirs.identity_slot(name))
    }
}

/// Renders `config`, with `max_request_bytes` on the first endpoint when given, to `path`.
// The typed builder has no field for the key yet; tests/support/config.rs's `Endpoint` gains
// `max_request_bytes` (and the other #16 keys) when its owner adds them.
fn write_config(config: &Config, request_cap: Option<u64>, path: &std::path::Path) -> PathBuf {
    let mut table: toml::Table = config.render().parse().expect("the builder's TOML");
    if let Some(cap) = request_cap {
        let endpoint = table
            .get_mut("endpoints")
            .and_then(|e| e.as_array_mut())
            .and_then(|e| e.first_mut())
            .and_then(|e| e.as_table_mut())
            .expect("an endpoint");
        endpoint.insert(
            "max_request_bytes".into(),
            toml::Value::Integer(i64::try_from(cap).expect("a cap that fits TOML")),
        );
    }
    let text = toml::to_string(&table).expect("TOML");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_owned()
}

/// Slot `index` of the pinned per-CPU array `map`, one value per CPU.
fn per_cpu<T: aya::Pod>(dirs: &AgentDirs, map: &str, index: u32) -> Vec<T> {
    let path = tollgate::pins::maps_dir(&dirs.pin_dir).join(map);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("pin {}: {e}", path.display()));
    let array: PerCpuArray<MapData, T> =
        PerCpuArray::try_from(Map::from_map_data(data).expect("map")).expect("per-cpu array");
    array
        .get(&index, 0)
        .unwrap_or_else(|e| panic!("{map}[{index}]: {e}"))
        .iter()
        .copied()
        .collect()
}

/// What the node sent identity `id`, summed over CPUs.
fn egress_identity(dirs: &AgentDirs, id: u32) -> EgressCounters {
    EgressCounters::sum(&per_cpu::<EgressCounters>(
        dirs,
        map_names::EGRESS_IDENTITY,
        id,
    ))
}

/// The (endpoint, class) time-to-first-byte histogram, summed over CPUs.
fn ttfb_hist(dirs: &AgentDirs) -> TtfbHist {
    let mut total = TtfbHist::default();
    for h in per_cpu::<TtfbHist>(dirs, map_names::TTFB, ttfb_index(ENDPOINT, CLASS as u8)) {
        total.accumulate(&h);
    }
    total
}

/// Flow-tracking counter `slot`, summed over CPUs.
fn flow_counter(dirs: &AgentDirs, slot: u32) -> u64 {
    per_cpu::<u64>(dirs, map_names::FLOW_COUNTERS, slot)
        .iter()
        .sum()
}

/// Whether `got` is within `fraction` of `want`.
fn within(got: u64, want: u64, fraction: f64) -> bool {
    got.abs_diff(want) as f64 <= want as f64 * fraction
}

/// The stand-in and its client agree, with no agent in the way: every byte the server wrote
/// is one the client's socket read, answers are whole, and the injected delay holds back the
/// first byte. The egress figures below are compared with what this client counts.
#[test]
fn the_stand_in_sends_what_its_client_reads() {
    let _turn = serial();
    let w = World::new(&["alice"], None);
    w.server
        .set_answer(Answer::bytes(1 << 20).delay(Duration::from_millis(30)));
    let mut client = w.client("alice");
    for i in 0..3 {
        let ex = client.request(20_000);
        assert!(ex.complete, "answer {i}: {ex:?}");
        assert!(ex.first_byte >= Some(Duration::from_millis(30)), "{ex:?}");
    }
    let conn = w.server.connection_from(client.local, IO_LIMIT);
    // The server counts an answer once its last write returned, which can be after the
    // client read it.
    let deadline = Instant::now() + IO_LIMIT;
    while conn.answered.load(std::sync::atomic::Ordering::Relaxed) < 3 {
        assert!(
            Instant::now() < deadline,
            "the server never finished its answers"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let written = conn.written.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(written, client.received);
    assert!(client.received > 3 << 20, "{}", client.received);
}

#[test]
fn egress_bytes_per_identity_are_what_each_client_received() {
    let _turn = serial();
    let w = World::new(&["alice", "bob"], None);
    let _agent = w.start();
    let (a0, b0) = (w.egress("alice"), w.egress("bob"));
    // alice: three 2 MB answers on one connection; bob: five of 300 kB, each on a new one.
    w.server.set_answer(Answer::bytes(2 << 20));
    let mut alice = w.client("alice");
    for i in 0..3 {
        let ex = alice.request(512);
        assert!(ex.complete, "alice's answer {i} did not come whole: {ex:?}");
    }
    w.server.set_answer(Answer::bytes(300_000));
    let mut bob_received = 0;
    for i in 0..5 {
        let mut bob = w.client("bob");
        let ex = bob.request(512);
        assert!(ex.complete, "bob's answer {i} did not come whole: {ex:?}");
        bob_received += bob.received;
    }
    // The egress program counts a packet before it leaves, so by the time the client has read
    // an answer, its bytes are counted: no wait needed.
    let (a, b) = (w.egress("alice").since(&a0), w.egress("bob").since(&b0));
    eprintln!(
        "alice received {} bytes, counted {a:?}; bob received {bob_received}, counted {b:?}",
        alice.received
    );
    assert!(
        within(a.payload, alice.received, 0.01),
        "alice: {} payload bytes counted, {} received",
        a.payload,
        alice.received
    );
    assert!(
        within(b.payload, bob_received, 0.01),
        "bob: {} payload bytes counted, {bob_received} received",
        b.payload
    );
    // What went on the wire is the payload plus every packet's headers.
    assert!(a.sent.bytes > a.payload && a.sent.packets > 0, "{a:?}");
    // Each answer's first byte closed one request.
    assert_eq!(a.ttfb_count, 3, "{a:?}");
    assert_eq!(b.ttfb_count, 5, "{b:?}");
    // The agent reports the kernel's figure as it is (nothing was sent since it was read).
    for name in ["alice", "bob"] {
        let shown: serde_json::Value =
            serde_json::from_str(
                &w.dirs
                    .cli_ok(&["identities", "show", name, "--output", "json"]),
            )
            .expect("identities show: json");
        assert_eq!(
            shown["egress"]["response_bytes"].as_u64(),
            Some(w.egress(name).payload),
            "{name}: {shown}"
        );
    }
}

/// The lab's round trip: the median of a few TCP handshakes from `name`'s host (SYN out,
/// SYN-ACK back), on the path the requests take.
fn round_trip(w: &World, name: &str) -> Duration {
    let mut times: Vec<Duration> = (0..7).map(|_| w.client(name).connect_time).collect();
    times.sort();
    times[times.len() / 2]
}

/// The bucket a time of `ns` belongs in: the first bound at or above it (+Inf past the last).
fn bucket_of(ns: u64) -> usize {
    TTFB_BOUNDS_MS
        .iter()
        .position(|&ms| ms * 1_000_000 >= ns)
        .unwrap_or(TTFB_BUCKETS - 1)
}

/// `tollgate top --once --output json` with polls `interval` apart, started now; joined with
/// [`top_result`].
fn top_start(dirs: &AgentDirs, interval: Duration) -> std::process::Child {
    Command::new(tollgate_bin())
        .arg("--socket")
        .arg(&dirs.socket)
        .args([
            "top",
            "--once",
            "--output",
            "json",
            "--limit",
            "0",
            "--interval",
        ])
        .arg(format!("{:.3}", interval.as_secs_f64()))
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running tollgate top")
}

fn top_result(top: std::process::Child) -> serde_json::Value {
    let out = top.wait_with_output().expect("tollgate top");
    assert!(
        out.status.success(),
        "tollgate top failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("top json")
}

/// Identity `name`'s row of a `top` snapshot.
fn top_identity<'a>(top: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    top["identities"]
        .as_array()
        .expect("top: identities")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in top: {top}"))
}

#[test]
fn time_to_first_byte_lands_in_the_delays_bucket_and_its_mean_is_the_delay_plus_the_round_trip() {
    let _turn = serial();
    // One identity per run, so that whatever window `top` averages over, it holds that run.
    let delays = [50u64, 200, 1000];
    let names: Vec<String> = delays.iter().map(|d| format!("wait{d}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let w = World::new(&name_refs, None);
    let _agent = w.start();
    const REQUESTS: u64 = 3;
    let mut failures = Vec::new();
    for (&delay_ms, name) in delays.iter().zip(&names) {
        let rtt = round_trip(&w, name);
        let delay = Duration::from_millis(delay_ms);
        let expected = delay + rtt;
        w.server.set_answer(Answer::bytes(16 * 1024).delay(delay));
        let h0 = ttfb_hist(&w.dirs);
        let e0 = w.egress(name);
        // top's two polls bracket the run: the first before the first request, the second
        // after the last answer.
        let run_time = (delay + Duration::from_millis(50)) * REQUESTS as u32;
        let top = top_start(&w.dirs, run_time + Duration::from_millis(700));
        std::thread::sleep(Duration::from_millis(300));
        let mut client = w.client(name);
        let mut seen = Vec::new();
        for i in 0..REQUESTS {
            let ex = client.request(1024);
            assert!(ex.complete, "{name}: answer {i} did not come whole: {ex:?}");
            seen.push(ex.first_byte.expect("a first byte"));
        }
        let top = top_result(top);
        let h = ttfb_hist(&w.dirs);
        let e = w.egress(name).since(&e0);
        let want = bucket_of(expected.as_nanos() as u64);
        let moved: Vec<(usize, u64)> = (0..TTFB_BUCKETS)
            .map(|i| (i, h.buckets[i] - h0.buckets[i]))
            .filter(|&(_, n)| n > 0)
            .collect();
        let mean_ns = e.ttfb_sum_ns.checked_div(e.ttfb_count).unwrap_or(0);
        let hist_mean_ns = (h.sum_ns - h0.sum_ns)
            .checked_div(h.count - h0.count)
            .unwrap_or(0);
        eprintln!(
            "delay {delay_ms} ms, rtt {rtt:?}: client saw {seen:?}; buckets moved {moved:?} \
             (want {want}, <= {} ms); identity mean {:.3} ms, histogram mean {:.3} ms",
            TTFB_BOUNDS_MS
                .get(want)
                .map_or("+Inf".into(), |b| b.to_string()),
            mean_ns as f64 / 1e6,
            hist_mean_ns as f64 / 1e6,
        );
        assert_eq!(h.count - h0.count, REQUESTS, "{name}: histogram count");
        assert_eq!(moved, vec![(want, REQUESTS)], "{name}: buckets");
        assert_eq!(e.ttfb_count, REQUESTS, "{name}: identity's count");
        let off = |ns: u64| ns.abs_diff(expected.as_nanos() as u64);
        assert!(
            off(mean_ns) <= 5_000_000,
            "{name}: identity mean {mean_ns} ns, expected {expected:?} +- 5 ms"
        );
        assert!(
            off(hist_mean_ns) <= 5_000_000,
            "{name}: histogram mean {hist_mean_ns} ns, expected {expected:?} +- 5 ms"
        );
        // The agent's own figure. Checked last, and collected rather than asserted at once,
        // so that all three runs' kernel figures are checked first.
        let row = top_identity(&top, name);
        match row["ttfb_ms"].as_f64() {
            Some(ms) if (ms - expected.as_secs_f64() * 1e3).abs() <= 5.0 => {}
            _ => failures.push(format!(
                "{name}: top's ttfb_ms is not within 5 ms of {expected:?}: {row}"
            )),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_request_over_the_endpoints_cap_is_cut_at_the_cap_and_others_pass() {
    let _turn = serial();
    const CAP: u64 = 65536;
    // A full-size TCP segment on the lab's 1500-byte MTU (IPv4, timestamps on).
    const SEGMENT: u64 = 1448;
    let w = World::new(&["big", "small"], Some(CAP));
    let _agent = w.start();
    w.server.set_answer(Answer::bytes(4096));
    let small_round = |small: &mut StreamClient, round: &str| {
        for i in 0..8 {
            let ex = small.request(16 * 1024);
            assert!(
                ex.complete,
                "small's {round} request {i} went unanswered: {ex:?}"
            );
        }
    };
    let dropped0 = reason_counter(&w.dirs, Reason::RequestSize, ENDPOINT);
    let cuts0 = flow_counter(&w.dirs, FLOW_CUTS);

    // Under the cap, many times over on one flow: each answer starts the count again.
    let mut small = w.client("small");
    small_round(&mut small, "first");

    // 1 MB in one request: the flow is cut at 64 KiB. The socket may take the whole body into
    // its send buffer; either way the server never gets it and never answers.
    let mut big = w.client("big");
    big.set_timeout(Duration::from_secs(2)).expect("timeouts");
    let sent = big.send(1 << 20);
    let ex = big.receive();
    assert!(!ex.complete && ex.received == 0, "big was answered: {ex:?}");
    let conn = w.server.connection_from(big.local, IO_LIMIT);
    let read = conn.read.load(std::sync::atomic::Ordering::Relaxed);
    let dropped = reason_counter(&w.dirs, Reason::RequestSize, ENDPOINT).delta(&dropped0);
    let cuts = flow_counter(&w.dirs, FLOW_CUTS) - cuts0;
    eprintln!(
        "big: send {sent:?}, the server read {read} bytes; request_size dropped {dropped:?}, \
         {cuts} flow(s) cut"
    );
    assert!(
        read <= CAP + SEGMENT,
        "the server read {read} bytes of a flow capped at {CAP}"
    );
    assert!(
        read + 4 * SEGMENT >= CAP,
        "the flow was cut at {read} bytes, well before its cap of {CAP}"
    );
    assert_eq!(conn.requests.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(dropped.packets > 0, "nothing counted as request_size");
    assert_eq!(cuts, 1, "flows cut");
    drop(big);

    // The small client, on its same flow, and the big one's next flow are untouched.
    small_round(&mut small, "second");
    let mut again = w.client("big");
    let ex = again.request(16 * 1024);
    assert!(ex.complete, "big's next flow went unanswered: {ex:?}");
    assert_eq!(
        flow_counter(&w.dirs, FLOW_CUTS) - cuts0,
        1,
        "a flow under the cap was cut"
    );
}

#[test]
fn an_agent_killed_mid_request_and_restarted_keeps_the_flow_and_the_egress_counters() {
    let _turn = serial();
    let w = World::new(&["alice"], None);
    let agent = w.start();
    w.server.set_answer(Answer::bytes(64 * 1024));
    let mut client = w.client("alice");
    // Something counted before the kill, to see it is still there after.
    let warm = client.request(1024);
    assert!(warm.complete, "{warm:?}");
    let e0 = w.egress("alice");
    assert!(e0.payload >= warm.received && e0.ttfb_count == 1, "{e0:?}");
    let h0 = ttfb_hist(&w.dirs);
    let (answers0, untracked0) = (
        flow_counter(&w.dirs, FLOW_ANSWERS),
        flow_counter(&w.dirs, FLOW_UNTRACKED),
    );

    // A request the server holds its answer to until the agent is back.
    let gate = Gate::new();
    w.server.set_gate(Some(gate.clone()));
    client
        .set_timeout(Duration::from_secs(90))
        .expect("timeouts");
    client.send(1024).expect("the request");
    let conn = w.server.connection_from(client.local, IO_LIMIT);
    let deadline = Instant::now() + IO_LIMIT;
    while conn.requests.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < deadline,
            "the server never read the request"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let held = Instant::now();
    let log = agent.kill9();
    let agent = w.start();
    let mid = w.egress("alice");
    let status: serde_json::Value =
        serde_json::from_str(&w.dirs.cli_ok(&["status", "--output", "json"])).expect("json");
    assert_eq!(status["adopted_pins"], true, "{status}");
    let held_for = held.elapsed();
    gate.open();
    let ex = client.receive();
    assert!(ex.complete, "the held answer did not come: {ex:?}");
    let e1 = w.egress("alice");
    let h1 = ttfb_hist(&w.dirs);
    eprintln!(
        "held {held_for:?} over the restart; before {e0:?}, after restart {mid:?}, after the \
         answer {e1:?}; client: {ex:?}"
    );

    // The counters did not go back over the restart, and carried on from there.
    for (what, before, after) in [
        ("packets", e0.sent.packets, mid.sent.packets),
        ("bytes", e0.sent.bytes, mid.sent.bytes),
        ("payload", e0.payload, mid.payload),
        ("ttfb_count", e0.ttfb_count, mid.ttfb_count),
    ] {
        assert!(
            after >= before,
            "{what} went back over the restart: {before} -> {after}\n{log}"
        );
    }
    assert!(
        within(e1.payload - e0.payload, ex.received, 0.01),
        "{} payload bytes counted for an answer of {}",
        e1.payload - e0.payload,
        ex.received
    );
    // The flow's state survived: its answer closed the request sent before the kill, and was
    // timed from it.
    assert_eq!(e1.ttfb_count, e0.ttfb_count + 1, "{e1:?}");
    assert_eq!(h1.count, h0.count + 1, "histogram count");
    assert_eq!(flow_counter(&w.dirs, FLOW_ANSWERS), answers0 + 1);
    assert_eq!(flow_counter(&w.dirs, FLOW_UNTRACKED), untracked0);
    let ttfb = Duration::from_nanos(e1.ttfb_sum_ns - e0.ttfb_sum_ns);
    let client_saw = ex.first_byte.expect("a first byte");
    assert!(
        ttfb >= held_for && ttfb <= client_saw + Duration::from_millis(5),
        "measured {ttfb:?}: the answer was held {held_for:?}, the client waited {client_saw:?}"
    );
    drop(agent);
}
