//! #12 finding 5: packets spoofed from a bound customer's address (no replies needed) must
//! not get the customer quarantined in `anomaly.mode = "enforce"`. The ladder may throttle on
//! them; it quarantines only on what a spoofer cannot forge off-path: SYN-free traffic
//! (first test, the score alone) that the identity's own ESTABLISHED TCP connections carried
//! as in-sequence payload (the others, `anomaly.require_handshake`; segments matched to a
//! connection prove nothing: a spoofer who knows the 4-tuple adds them), and no more than
//! `anomaly.max_auto_quarantines` at once.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{Agent, AgentDirs, identity_counters},
    config::{Anomaly, Config, Controller, Endpoint, Identity, Plan},
    frames::{FrameBlaster, with_tcp_checksum},
    lab::{Lab, NetNs},
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
    // The score rule on its own (the handshake rule has the tests below).
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
    let id = dirs.identity_slot("victim");
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
    assert_never_quarantined_on_disk(&dirs, "victim");
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

/// The server stand-in: accepts up to four connections on the lab's server namespace and
/// reads them to the end, counting the bytes (what the customer's requests are).
struct Server {
    received: Arc<AtomicU64>,
}

impl Server {
    fn start(ns: &NetNs) -> Server {
        let listener = ns.run(|| TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("listen"));
        let received = Arc::new(AtomicU64::new(0));
        let r = Arc::clone(&received);
        std::thread::spawn(move || {
            for conn in listener.incoming().take(4) {
                let Ok(mut conn) = conn else { break };
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        r.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Server { received }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A real client: one TCP connection (a completed handshake) writing 100-byte requests at a
/// settable rate, each its own segment (`TCP_NODELAY`), for at most a minute.
struct Talker {
    rate: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    /// Writes that failed other than by timing out (a reset or closed connection).
    broken: Arc<AtomicBool>,
    /// The connection's own port (what a spoofer who knows the 4-tuple knows).
    port: u16,
    thread: Option<JoinHandle<u64>>,
}

impl Talker {
    fn start(ns: &NetNs, server: Ipv4Addr, per_second: u32) -> Talker {
        let mut conn = ns.run(move || TcpStream::connect((server, TCP_PORT)).expect("connect"));
        conn.set_nodelay(true).expect("nodelay");
        // A quarantined connection stalls: a blocked write must not hold the thread.
        conn.set_write_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let port = conn.local_addr().expect("local address").port();
        let rate = Arc::new(AtomicU32::new(per_second));
        let stop = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(AtomicBool::new(false));
        let (r, s, b) = (Arc::clone(&rate), Arc::clone(&stop), Arc::clone(&broken));
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(60);
            let mut written = 0u64;
            // Writes in 10 ms rounds: rate / 100 of them each round.
            let mut owed = 0.0f64;
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                owed += f64::from(r.load(Ordering::Relaxed)) / 100.0;
                while owed >= 1.0 {
                    owed -= 1.0;
                    match conn.write(&[b'x'; 100]) {
                        Ok(_) => written += 1,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            owed = 0.0;
                        }
                        Err(_) => {
                            b.store(true, Ordering::Relaxed);
                            return written;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            written
        });
        Talker {
            rate,
            stop,
            broken,
            port,
            thread: Some(thread),
        }
    }

    fn set_rate(&self, per_second: u32) {
        self.rate.store(per_second, Ordering::Relaxed);
    }

    fn broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

impl Drop for Talker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The handshake rule's world: a TCP endpoint, a plan generous enough that throttling drops
/// nothing (the ladder, not the plan, is under test), the quick ladder in enforce mode with
/// the handshake rule at its default, and `identities` bound as customers.
fn handshake_world(
    lab: &Lab,
    dirs: &AgentDirs,
    interfaces: &[&str],
    identities: &[(&str, IpAddr)],
    max_auto_quarantines: Option<u32>,
) -> Agent {
    let mut config = Config::new(interfaces)
        .controller(Controller {
            interval_ms: Some(250),
            ..Controller::simulated(&dirs.state_dir.join("gpu.json"))
        })
        .anomaly(Anomaly {
            require_handshake: None,
            max_auto_quarantines,
            ..Anomaly::quick("enforce")
        })
        .plan(Plan::new("free").priority(10).packets(50_000, 5_000))
        .endpoint(Endpoint::tcp("api", TCP_PORT, &["customer"]))
        .listen_metrics(METRICS);
    for (name, addr) in identities {
        config = config.identity(Identity::new(name, "customer", "free", &[*addr]));
    }
    let config = config.write(&dirs.state_dir.join("tollgate.toml"));
    Agent::launch(
        &lab.server,
        dirs,
        &[
            "--config",
            config.to_str().expect("path"),
            "--mode",
            "native",
        ],
    )
}

/// `/metrics` in the server namespace (where the agent runs).
const METRICS: &str = "127.0.0.1:9464";

/// The value of `tollgate_anomaly_quarantines_withheld_total{reason=...}`, from a scrape.
fn withheld_metric(ns: &NetNs, reason: &str) -> u64 {
    let text = ns.run(|| {
        let mut c = TcpStream::connect(METRICS).expect("metrics");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        let _ = c.read_to_string(&mut text);
        text
    });
    let series = format!("tollgate_anomaly_quarantines_withheld_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics: {text}")) as u64
}

/// The anomaly steps audited for `identity`, in order.
fn steps_of(audit: &[serde_json::Value], identity: &str) -> Vec<String> {
    audit
        .iter()
        .filter(|l| l["action"] == "anomaly" && l["detail"]["identity"] == identity)
        .filter_map(|l| l["detail"]["decision"]["step"].as_str().map(str::to_owned))
        .collect()
}

/// Waits (bounded) until `identity` has an audited step `step`.
fn wait_for_step(dirs: &AgentDirs, identity: &str, step: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if steps_of(&dirs.audit(), identity).iter().any(|s| s == step) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A SYN-free flood (ACK+PSH segments with data, the kind a spoofer sends without seeing a
/// reply) spoofed from a bound customer's own address while its real connection works: the
/// customer is throttled, never quarantined (`not_its_connections`: its connection did not
/// carry the flood), and its connection keeps working.
#[test]
fn a_spoofed_syn_free_flood_from_a_connected_customer_never_quarantines_it() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let victim = IpAddr::V4(lab.client_v4);
    let server = Server::start(&lab.server);
    let _agent = handshake_world(&lab, &dirs, &[&lab.server_if], &[("victim", victim)], None);
    let talker = Talker::start(&lab.client, lab.server_v4, 50);
    std::thread::sleep(Duration::from_secs(8));
    // Not the talker's port: a source port below the ephemeral range.
    let mut ack = PacketBuilder::v4(lab.client_v4.octets(), lab.server_v4.octets())
        .tcp(1023, TCP_PORT)
        .payload(100)
        .build();
    // Ethernet 14 + IPv4 20, then the TCP flags byte at 13: ACK|PSH instead of SYN.
    ack[14 + 20 + 13] = 0x18;
    let spoof = FrameBlaster::start(&lab.client, &lab.client_if, ack, 1500);
    let throttled = wait_for_step(&dirs, "victim", "throttle", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(6));
    let sent = spoof.stop();
    let log = dirs.audit();
    let steps = steps_of(&log, "victim");
    assert!(
        throttled,
        "the spoof was never even throttled ({sent} sent): {steps:?}"
    );
    assert!(
        !steps.iter().any(|s| s == "quarantine"),
        "the spoof quarantined the customer: {steps:?}"
    );
    let withheld: Vec<_> = log
        .iter()
        .filter(|l| l["action"] == "quarantine_withheld")
        .collect();
    assert_eq!(withheld.len(), 1, "once per episode: {withheld:?}");
    assert_eq!(withheld[0]["detail"]["identity"], "victim");
    assert_eq!(
        withheld[0]["reason"], "not_its_connections",
        "{}",
        withheld[0]
    );
    assert!(withheld_metric(&lab.server, "not_its_connections") >= 1);
    // The customer's own connection still carries its requests.
    let before = server.received();
    std::thread::sleep(Duration::from_secs(1));
    assert!(!talker.broken(), "the customer's connection broke");
    assert!(
        server.received() > before + 2_000,
        "the customer's connection stalled: {before} -> {}",
        server.received()
    );
    assert_never_quarantined_on_disk(&dirs, "victim");
}

/// A real hostile client floods over its own connection (a completed handshake): the
/// ladder still quarantines it, saying what its connection carried.
#[test]
fn a_flood_over_the_clients_own_connection_is_still_quarantined() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let hostile = IpAddr::V4(lab.client_v4);
    let _server = Server::start(&lab.server);
    let _agent = handshake_world(
        &lab,
        &dirs,
        &[&lab.server_if],
        &[("hostile", hostile)],
        None,
    );
    let talker = Talker::start(&lab.client, lab.server_v4, 50);
    std::thread::sleep(Duration::from_secs(8));
    talker.set_rate(2000);
    let quarantined = wait_for_step(&dirs, "hostile", "quarantine", Duration::from_secs(8));
    drop(talker);
    let log = dirs.audit();
    assert!(
        quarantined,
        "not quarantined: {:?}",
        steps_of(&log, "hostile")
    );
    let q = log
        .iter()
        .find(|l| l["action"] == "anomaly" && l["detail"]["decision"]["step"] == "quarantine")
        .expect("the quarantine's line");
    let reason = q["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("connection(s) received"), "{reason}");
    assert!(
        !log.iter().any(|l| l["action"] == "quarantine_withheld"),
        "{log:?}"
    );
}

/// `frame` (Ethernet, IPv4, TCP) addressed to `lab`'s server as the client's kernel would
/// address it (its MACs) and with its TCP checksum filled in: unlike the frames above, which
/// the server's stack discards before any socket, this one reaches the connection it names.
fn for_the_servers_socket(lab: &Lab, frame: &[u8]) -> Vec<u8> {
    let mac = |m: &str| -> Vec<u8> {
        m.split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("mac"))
            .collect()
    };
    let mut f = frame[..14].to_vec();
    f[0..6].copy_from_slice(&mac(&lab.server_mac));
    f[6..12].copy_from_slice(&mac(&lab.client_mac));
    f.extend(with_tcp_checksum(&frame[14..]));
    f
}

/// The numbers in a withheld quarantine's detail: (in-sequence bytes, passed bytes,
/// segments, passed packets).
fn carried(detail: &str) -> Option<(u64, u64, u64, u64)> {
    let n: Vec<u64> = detail
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // "its N connection(s) received B bytes in sequence of the P bytes ... (S segments of K packets)"
    match n[..] {
        [_, b, p, s, k] => Some((b, p, s, k)),
        _ => None,
    }
}

/// Bare ACKs spoofed to the exact 4-tuple of the customer's own connection (its address and
/// port, the server's), out of window: the kernel counts every one in the connection's
/// `segs_in` (before any sequence check) but accepts none in sequence, while the customer's
/// own small requests keep `bytes_received` growing. Segment counts would call that flood the
/// customer's own; the in-sequence bytes do not: throttled, never quarantined.
#[test]
fn spoofed_acks_to_the_customers_own_connection_never_quarantine_it() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let victim = IpAddr::V4(lab.client_v4);
    let server = Server::start(&lab.server);
    let _agent = handshake_world(&lab, &dirs, &[&lab.server_if], &[("victim", victim)], None);
    let talker = Talker::start(&lab.client, lab.server_v4, 50);
    std::thread::sleep(Duration::from_secs(8));
    // seq 1, ack 0: out of the connection's windows (its sequence numbers start at random).
    let mut ack = PacketBuilder::v4(lab.client_v4.octets(), lab.server_v4.octets())
        .tcp(talker.port, TCP_PORT)
        .build();
    // Ethernet 14 + IPv4 20, then the TCP flags byte at 13: a bare ACK.
    ack[14 + 20 + 13] = 0x10;
    let ack = for_the_servers_socket(&lab, &ack);
    let spoof = FrameBlaster::start(&lab.client, &lab.client_if, ack, 1500);
    let throttled = wait_for_step(&dirs, "victim", "throttle", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(6));
    let sent = spoof.stop();
    let log = dirs.audit();
    let steps = steps_of(&log, "victim");
    assert!(
        throttled,
        "the spoof was never even throttled ({sent} sent): {steps:?}"
    );
    assert!(
        !steps.iter().any(|s| s == "quarantine"),
        "the spoof quarantined the customer: {steps:?}"
    );
    let withheld: Vec<_> = log
        .iter()
        .filter(|l| l["action"] == "quarantine_withheld")
        .collect();
    assert_eq!(withheld.len(), 1, "once per episode: {withheld:?}");
    assert_eq!(
        withheld[0]["reason"], "not_its_connections",
        "{}",
        withheld[0]
    );
    let detail = withheld[0]["detail"]["detail"].as_str().unwrap_or_default();
    let (bytes, passed_bytes, segs, packets) =
        carried(detail).unwrap_or_else(|| panic!("unexpected detail: {detail}"));
    // The spoof reached the connection: it counted at least half the passed packets (what
    // a rule on segments would have taken as proof) ...
    assert!(
        2 * segs >= packets,
        "the spoofed ACKs never reached the connection: {detail}"
    );
    // ... and the customer's requests arrived in sequence, but far under half the bytes.
    assert!(bytes > 0 && 2 * bytes < passed_bytes, "{detail}");
    // The customer's own connection still carries its requests.
    let before = server.received();
    std::thread::sleep(Duration::from_secs(1));
    assert!(!talker.broken(), "the customer's connection broke");
    assert!(
        server.received() > before + 2_000,
        "the customer's connection stalled: {before} -> {}",
        server.received()
    );
    assert_never_quarantined_on_disk(&dirs, "victim");
}

/// With `max_auto_quarantines = 1`, two hostile identities flooding over their own
/// connections: one is quarantined, the other stays throttled and `quarantine_capped` is
/// audited; never two at once.
#[test]
fn past_max_auto_quarantines_the_ladder_throttles_only() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let second = lab.add_nth_client(1);
    let dirs = AgentDirs::new();
    let _server = Server::start(&lab.server);
    let _agent = handshake_world(
        &lab,
        &dirs,
        &[&lab.server_if, &second.server_if],
        &[
            ("hostile-a", IpAddr::V4(lab.client_v4)),
            ("hostile-b", IpAddr::V4(second.client_v4)),
        ],
        Some(1),
    );
    let a = Talker::start(&lab.client, lab.server_v4, 50);
    let b = Talker::start(&second.ns, second.server_v4, 50);
    std::thread::sleep(Duration::from_secs(8));
    a.set_rate(2000);
    b.set_rate(2000);
    let end = Instant::now() + Duration::from_secs(8);
    let capped = |log: &[serde_json::Value]| {
        log.iter()
            .find(|l| l["action"] == "quarantine_capped")
            .cloned()
    };
    while capped(&dirs.audit()).is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    // One more second: a second quarantine, if the cap let one through, would show now.
    std::thread::sleep(Duration::from_secs(1));
    drop((a, b));
    let log = dirs.audit();
    let (sa, sb) = (steps_of(&log, "hostile-a"), steps_of(&log, "hostile-b"));
    let quarantined: Vec<&str> = [("hostile-a", &sa), ("hostile-b", &sb)]
        .iter()
        .filter(|(_, s)| s.iter().any(|s| s == "quarantine"))
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(
        quarantined.len(),
        1,
        "with the cap at 1: a {sa:?}, b {sb:?}"
    );
    let capped = capped(&log).unwrap_or_else(|| panic!("no quarantine_capped: a {sa:?}, b {sb:?}"));
    let other = if quarantined[0] == "hostile-a" {
        "hostile-b"
    } else {
        "hostile-a"
    };
    assert_eq!(capped["detail"]["identity"], other, "{capped}");
    assert!(
        steps_of(&log, other)
            .iter()
            .all(|s| s == "throttle" || s == "release")
    );
    assert!(withheld_metric(&lab.server, "capped") >= 1);
    assert_eq!(withheld_metric(&lab.server, "no_handshake"), 0);
}

/// `name` has no quarantine in the state as a restart would load it: `state.json` and the
/// journal after it (a quarantine is a journal record until the next compaction).
fn assert_never_quarantined_on_disk(dirs: &AgentDirs, name: &str) {
    let state = tollgate::state::State::peek(&dirs.state_dir).expect("the saved state");
    assert!(
        !state.quarantines.contains_key(name),
        "{:?}",
        state.quarantines
    );
}
