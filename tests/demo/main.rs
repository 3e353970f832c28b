//! `cargo xtask demo`: a GPU node in a lab of network namespaces, protected by the real
//! agent, with an internal service, a partner, a customer and an attacker as its clients.
//!
//! The GPU node runs a small OpenAI-style HTTP server that streams tokens (the model server
//! stand-in) on TCP 8000, and tollgate on the embedded XDP program with a demo configuration
//! and the simulated GPU source. The internal service is bound by its /24 in the
//! configuration; the partner and the customer bind with real tokens over HTTPS; the attacker
//! never binds. After 10 s of normal traffic the GPU saturates and the attacker floods for
//! 15 s, then the node recovers for 10 s. One line a second says what the kernel admitted and
//! dropped per identity; the end is a table per identity and checks of what must hold.
//!
//! Everything is bounded in time and torn down by the lab's guards, also on SIGINT/SIGTERM
//! (the handler only sets a flag: every loop stops, `main` returns, the guards run). Only
//! addresses inside the lab (198.18.0.0/15) are ever targets.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tollgate_common::{Reason, packet::PacketBuilder};
use tollgate_tests::{
    agent::{Agent, AgentDirs, Counters, identity_counters, reason_counter, tollgate_bin},
    frames::FrameBlaster,
    lab::{Lab, NetNs, SecondClient},
    tokenlab::{BIND_PORT, MODEL_PORT, TokenKit},
};

// The timeline.
const NORMAL: Duration = Duration::from_secs(10);
const SATURATED: Duration = Duration::from_secs(15);
const RECOVERED: Duration = Duration::from_secs(10);
/// No loop of the demo runs longer than this after the lab is up, whatever happens.
const HARD_LIMIT: Duration = Duration::from_secs(120);

// The demo configuration.
const INTERVAL_MS: u32 = 250;
const SATURATE_AT: f64 = 0.9;
const RECOVER_AT: f64 = 0.75;
const RECOVER_AFTER: u32 = 4;
const FLOOR: f64 = 0.1;
const GPU_CALM: f64 = 0.2;
const GPU_HOT: f64 = 0.97;
const ANON_PPS: u32 = 20;
const ANON_BURST: u32 = 40;
const METRICS: &str = "127.0.0.1:9464";
/// Endpoint ids: position in the configuration, from 1.
const EP_MODEL: u32 = 1;
const EP_BIND: u32 = 2;

// The traffic.
const REQUESTS_PER_SECOND: u32 = 16;
const ATTACKER_REQUESTS_PER_SECOND: u32 = 2;
const FLOOD_MODEL_PPS: u32 = 20_000;
const FLOOD_BIND_PPS: u32 = 500;
const CHUNKS: usize = 20;
const CHUNK_GAP: Duration = Duration::from_millis(3);
const MAX_CONNECTIONS: usize = 64;
/// Requests one client has in flight at most.
const MAX_IN_FLIGHT: usize = 8;

/// A plan of the demo configuration.
struct Plan {
    name: &'static str,
    priority: u32,
    pps: u32,
    burst: u32,
}

const PLANS: [Plan; 3] = [
    Plan {
        name: "internal",
        priority: 100,
        pps: 2000,
        burst: 500,
    },
    Plan {
        name: "partner",
        priority: 80,
        pps: 460,
        burst: 200,
    },
    Plan {
        name: "customer",
        priority: 40,
        pps: 460,
        burst: 200,
    },
];

/// Share of its budget a plan keeps while its endpoint is saturated (docs/controller.md).
fn share(priority: u32) -> f64 {
    FLOOR + (1.0 - FLOOR) * f64::from(priority) / 100.0
}

/// Who is who; the index into every per-client array.
const WHO: [&str; 4] = ["internal", "partner", "customer", "attacker"];
const INTERNAL: usize = 0;
const PARTNER: usize = 1;
const CUSTOMER: usize = 2;
const ATTACKER: usize = 3;
/// Identity names: a static one, and two that exist because their tokens name them.
const IDENTITY: [&str; 3] = ["internal-batch", "partner-acme", "customer-alice"];

const PHASES: [&str; 3] = ["normal", "saturated", "recovered"];

/// Set by SIGINT/SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Set when the timeline is over (or interrupted): every loop stops.
static FINISHED: AtomicBool = AtomicBool::new(false);
/// The phase the timeline is in (index into PHASES).
static PHASE: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe; `sa` is a
    // zeroed, then filled, sigaction that outlives the calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_RESTART;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn running() -> bool {
    !interrupted() && !FINISHED.load(Ordering::SeqCst)
}

/// Sleeps `d`, or less if the demo is interrupted.
fn nap(d: Duration) {
    let end = Instant::now() + d;
    while !interrupted() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

fn main() -> ExitCode {
    install_signal_handlers();
    tollgate_tests::require_root();
    let started = Instant::now();
    let result = run();
    let took = started.elapsed().as_secs();
    match result {
        _ if interrupted() => {
            println!("\ninterrupted: the lab is torn down (namespaces, agent, pins)");
            ExitCode::from(130)
        }
        Ok(true) => {
            println!("\ndemo finished in {took} s; the lab is torn down");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("\ndemo finished in {took} s, but a check failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything that makes up the lab. Fields drop in declaration order: the pins and state
/// first (unlinking the pins detaches the program), the namespaces last. The agent, the model
/// server and the traffic are locals of `run` declared after the world, so they stop first.
struct World {
    dirs: AgentDirs,
    kit: TokenKit,
    gpu_file: std::path::PathBuf,
    clients: [SecondClient; 3],
    lab: Lab,
}

/// Ends every loop when dropped: on the way out of `run`, whichever way it leaves.
struct StopLoops;

impl Drop for StopLoops {
    fn drop(&mut self) {
        FINISHED.store(true, Ordering::SeqCst);
    }
}

impl World {
    fn client_ns(&self, who: usize) -> &NetNs {
        match who {
            CUSTOMER => &self.lab.client,
            INTERNAL => &self.clients[0].ns,
            PARTNER => &self.clients[1].ns,
            _ => &self.clients[2].ns,
        }
    }

    fn client_v4(&self, who: usize) -> Ipv4Addr {
        match who {
            CUSTOMER => self.lab.client_v4,
            INTERNAL => self.clients[0].client_v4,
            PARTNER => self.clients[1].client_v4,
            _ => self.clients[2].client_v4,
        }
    }

    fn model_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.lab.server_v4), MODEL_PORT)
    }

    fn gpu(&self, util: f64) -> anyhow::Result<()> {
        let out = Command::new(tollgate_bin())
            .args(["gpu", "simulate", "--util", &util.to_string(), "--file"])
            .arg(&self.gpu_file)
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success() || interrupted(),
            "tollgate gpu simulate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn interfaces(&self) -> Vec<&str> {
        let mut v = vec![self.lab.server_if.as_str()];
        v.extend(self.clients.iter().map(|c| c.server_if.as_str()));
        v
    }

    fn write_config(&self) -> anyhow::Result<std::path::PathBuf> {
        let internal_net = {
            let o = self.clients[0].client_v4.octets();
            Ipv4Addr::new(o[0], o[1], o[2], 0)
        };
        let mut plans = String::new();
        for p in &PLANS {
            plans.push_str(&format!(
                "\n[[plans]]\nname = \"{}\"\npriority = {}\npackets_per_second = {}\npacket_burst = {}\n",
                p.name, p.priority, p.pps, p.burst
            ));
        }
        let config = format!(
            r#"# tollgate demo: one GPU node, four client namespaces.
[node]
interfaces = [{ifaces}]
xdp_mode = "native"

[anonymous]
packets_per_second = {ANON_PPS}
burst = {ANON_BURST}

[drop_events]
interval_ms = 1000

[controller]
interval_ms = {INTERVAL_MS}
gpu_source = "simulated"
simulated_file = "{gpu}"
saturate_at = {SATURATE_AT}
recover_at = {RECOVER_AT}
recover_after = {RECOVER_AFTER}
hold_back_floor = {FLOOR}

[listen]
bind = "{server}:{BIND_PORT}"
metrics = "{METRICS}"

[tokens]
jwks = "{jwks}"
audience = "{audience}"
tls_cert = "{cert}"
tls_key = "{key}"
max_ttl_s = 3600
default_class = "customer"
default_plan = "customer"
{plans}
[[endpoints]]
name = "model"
protocol = "tcp"
ports = [{MODEL_PORT}]
classes = ["internal", "partner", "customer"]
gpus = [0]

[[endpoints]]
name = "bind"
protocol = "tcp"
ports = [{BIND_PORT}]
classes = ["internal", "partner", "customer"]
anonymous = true

[[identities]]
name = "{internal}"
class = "internal"
plan = "internal"
bind = ["{internal_net}/24"]
"#,
            ifaces = self
                .interfaces()
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", "),
            gpu = self.gpu_file.display(),
            server = self.lab.server_v4,
            jwks = self.kit.jwks.display(),
            audience = tollgate_tests::tokenlab::AUDIENCE,
            cert = self.kit.ca.display(),
            key = self.kit.tls_key.display(),
            internal = IDENTITY[INTERNAL],
        );
        let path = self.dirs.state_dir.join("tollgate-demo.toml");
        std::fs::write(&path, config)?;
        Ok(path)
    }
}

/// Requests completed and failed per phase, for one client.
#[derive(Default)]
struct Tally {
    ok: [AtomicU64; 3],
    failed: [AtomicU64; 3],
}

/// One completions request, read to the end of the stream: whether it completed.
fn completion(target: SocketAddr, connect_timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&target, connect_timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let body = r#"{"model":"demo-7b","prompt":"Say hello","max_tokens":20,"stream":true}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: gpu-node\r\ncontent-type: application/json\r\n\
         accept: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    if s.read_to_end(&mut response).is_err() {
        return false;
    }
    response.starts_with(b"HTTP/1.1 200") && response.ends_with(b"data: [DONE]\n\n")
}

/// A client that starts `per_second` completions requests from `ns` until the demo ends,
/// whether or not earlier ones have finished (as a pool of callers would), with at most
/// `MAX_IN_FLIGHT` at a time: a tick that finds them all busy counts as a failed request.
fn client_loop(
    ns: &NetNs,
    target: SocketAddr,
    per_second: u32,
    connect_timeout: Duration,
    tally: Arc<Tally>,
) -> JoinHandle<()> {
    let deadline = Instant::now() + HARD_LIMIT;
    ns.spawn(move || {
        let gap = Duration::from_secs(1) / per_second;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut next = Instant::now();
        while running() && Instant::now() < deadline {
            let now = Instant::now();
            if next > now {
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            // Late (a busy machine): carry on at the pace, without a burst to catch up.
            next = next.max(now - gap) + gap;
            let phase = PHASE.load(Ordering::SeqCst);
            if in_flight.load(Ordering::SeqCst) >= MAX_IN_FLIGHT {
                tally.failed[phase].fetch_add(1, Ordering::Relaxed);
                continue;
            }
            in_flight.fetch_add(1, Ordering::SeqCst);
            let (in_flight, tally) = (Arc::clone(&in_flight), Arc::clone(&tally));
            // A thread started here is in this thread's namespace.
            std::thread::spawn(move || {
                let ok = completion(target, connect_timeout);
                if running() {
                    let slot = if ok { &tally.ok } else { &tally.failed };
                    slot[phase].fetch_add(1, Ordering::Relaxed);
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        }
        // Requests in flight end within their timeouts.
        let until = Instant::now() + Duration::from_secs(6);
        while in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// The model server stand-in: `POST /v1/completions` streams `CHUNKS` server-sent events
/// (`text/event-stream`), then `data: [DONE]`. One thread per connection, at most
/// `MAX_CONNECTIONS` at a time. Counts completed streams per peer address.
struct ModelServer {
    thread: Option<JoinHandle<()>>,
    served: Arc<Mutex<BTreeMap<IpAddr, u64>>>,
}

impl ModelServer {
    fn start(server: &NetNs) -> anyhow::Result<ModelServer> {
        let listener = server.run(|| TcpListener::bind(("0.0.0.0", MODEL_PORT)))?;
        listener.set_nonblocking(true)?;
        let served = Arc::new(Mutex::new(BTreeMap::new()));
        let counts = Arc::clone(&served);
        let deadline = Instant::now() + HARD_LIMIT;
        let thread = std::thread::spawn(move || {
            let active = Arc::new(AtomicUsize::new(0));
            while running() && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                            continue; // dropped: closes the connection
                        }
                        active.fetch_add(1, Ordering::SeqCst);
                        let (active, counts) = (Arc::clone(&active), Arc::clone(&counts));
                        std::thread::spawn(move || {
                            if serve(conn) {
                                *counts
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .entry(peer.ip())
                                    .or_insert(0) += 1;
                            }
                            active.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            // Streams in flight end within a chunk once the demo is over.
            let until = Instant::now() + Duration::from_secs(3);
            while active.load(Ordering::SeqCst) > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Ok(ModelServer {
            thread: Some(thread),
            served,
        })
    }

    fn served_to(&self, addr: Ipv4Addr) -> u64 {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&IpAddr::V4(addr))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves one connection; true if a whole stream went out.
fn serve(mut s: TcpStream) -> bool {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 16 * 1024 {
            return false;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
        .min(64 * 1024);
    while buf.len() < head_end + length {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    if !head.starts_with("post /v1/completions ") {
        let _ = s
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return false;
    }
    if s.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
              connection: close\r\n\r\n",
    )
    .is_err()
    {
        return false;
    }
    for i in 0..CHUNKS {
        std::thread::sleep(CHUNK_GAP);
        let event = format!("data: {{\"choices\":[{{\"text\":\" tok{i}\"}}]}}\n\n");
        if s.write_all(event.as_bytes()).is_err() {
            return false;
        }
    }
    s.write_all(b"data: [DONE]\n\n").is_ok()
}

/// Packets the kernel passed and dropped.
#[derive(Clone, Copy, Debug, Default)]
struct Pd {
    pass: u64,
    drop: u64,
}

/// The attacker's verdicts: unbound sources, on the model and the bind endpoint.
#[derive(Clone, Copy, Debug, Default)]
struct Anon {
    model_unbound: u64,
    model_anonymous: u64,
    bind_anonymous: u64,
    bind_anonymous_rate: u64,
    bind_unbound: u64,
}

impl Anon {
    fn read(dirs: &AgentDirs) -> Anon {
        let c = |r, ep| reason_counter(dirs, r, ep).packets;
        Anon {
            model_unbound: c(Reason::Unbound, EP_MODEL),
            model_anonymous: c(Reason::Anonymous, EP_MODEL) + c(Reason::AnonymousRate, EP_MODEL),
            bind_anonymous: c(Reason::Anonymous, EP_BIND),
            bind_anonymous_rate: c(Reason::AnonymousRate, EP_BIND),
            bind_unbound: c(Reason::Unbound, EP_BIND),
        }
    }

    fn since(&self, b: &Anon) -> Anon {
        Anon {
            model_unbound: self.model_unbound - b.model_unbound,
            model_anonymous: self.model_anonymous - b.model_anonymous,
            bind_anonymous: self.bind_anonymous - b.bind_anonymous,
            bind_anonymous_rate: self.bind_anonymous_rate - b.bind_anonymous_rate,
            bind_unbound: self.bind_unbound - b.bind_unbound,
        }
    }

    fn pd(&self) -> Pd {
        Pd {
            pass: self.model_anonymous + self.bind_anonymous,
            drop: self.model_unbound + self.bind_anonymous_rate + self.bind_unbound,
        }
    }
}

/// Every counter the narration needs, at one moment.
#[derive(Clone, Copy, Debug)]
struct Snap {
    at: Instant,
    ids: [Pd; 3],
    anon: Anon,
}

impl Snap {
    fn read(dirs: &AgentDirs, ids: &[u32; 3]) -> Snap {
        let mut out = [Pd::default(); 3];
        for (o, id) in out.iter_mut().zip(ids) {
            let c = identity_counters(dirs, *id);
            *o = Pd {
                pass: c.passed.packets,
                drop: c.dropped.packets,
            };
        }
        Snap {
            at: Instant::now(),
            ids: out,
            anon: Anon::read(dirs),
        }
    }

    /// What moved since `b`, per client (the attacker last), and over how long.
    fn since(&self, b: &Snap) -> ([Pd; 4], f64) {
        let mut out = [Pd::default(); 4];
        for ((o, now), then) in out.iter_mut().zip(&self.ids).zip(&b.ids) {
            *o = Pd {
                pass: now.pass - then.pass,
                drop: now.drop - then.drop,
            };
        }
        out[ATTACKER] = self.anon.since(&b.anon).pd();
        (out, (self.at - b.at).as_secs_f64().max(1e-3))
    }
}

/// `12345` as `12,345`.
fn n(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The GPU utilisation and the saturated endpoints, as the agent reports them.
fn gpu_state(dirs: &AgentDirs) -> String {
    let out = dirs.cli(&["status", "--output", "json"]);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return "?".to_owned();
    };
    let util = v["gpu"]["readings"][0]["utilization"]
        .as_f64()
        .map_or("?".to_owned(), |u| format!("{:.0}%", u * 100.0));
    let saturated = v["gpu"]["saturated_endpoints"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    format!(
        "{util:>4} {}",
        if saturated { "saturated" } else { "ok       " }
    )
}

fn header() {
    println!(
        "  time  GPU 0           {:>15}  {:>15}  {:>15}  {:>17}",
        "internal", "partner", "customer", "attacker"
    );
    println!(
        "                        {:>15}  {:>15}  {:>15}  {:>17}",
        "pass/s drop/s", "pass/s drop/s", "pass/s drop/s", "pass/s  drop/s"
    );
}

/// The interface's MAC address in `ns`.
fn mac(ns: &NetNs, ifname: &str) -> anyhow::Result<[u8; 6]> {
    let v: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "link", "show", "dev", ifname]))?;
    let text = v[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no MAC for {ifname}"))?;
    let mut mac = [0u8; 6];
    for (m, part) in mac.iter_mut().zip(text.split(':')) {
        *m = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// A TCP SYN from the attacker's own address to `port` on the GPU node, as a frame for its
/// veth.
fn syn_frame(w: &World, port: u16, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = PacketBuilder::v4(w.client_v4(ATTACKER).octets(), w.lab.server_v4.octets())
        .tcp(41000, port)
        .build();
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f
}

/// Lines of /metrics, scraped from inside the GPU node's namespace: the GPU and hold-back
/// families (`controller`), or the traffic counters that moved.
fn metrics_excerpt(server: &NetNs, controller: bool) -> Vec<String> {
    let out = server.exec(
        "curl",
        &[
            "-s",
            "--max-time",
            "5",
            &format!("http://{METRICS}/metrics"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let nonzero = l.rsplit(' ').next().is_some_and(|v| v != "0");
            if controller {
                l.starts_with("tollgate_gpu_utilization_ratio")
                    || l.starts_with("tollgate_endpoint_saturated{endpoint=\"model\"")
                    || (l.starts_with("tollgate_hold_back_share{") && l.contains("\"model\""))
            } else {
                (l.starts_with("tollgate_class_packets_total{") && nonzero)
                    || (l.starts_with("tollgate_packets_total{")
                        && l.contains("verdict=\"drop\"")
                        && nonzero)
            }
        })
        .map(str::to_owned)
        .collect()
}

fn run() -> anyhow::Result<bool> {
    println!("== tollgate demo: identity-bound enforcement on a GPU node ==\n");
    println!("Building the lab: a GPU node and four clients, each in its own network namespace.");
    // The customer is the lab's own client; the others come in on their own veths and /24s.
    let lab = Lab::new();
    let clients = [
        lab.add_nth_client(1),
        lab.add_nth_client(2),
        lab.add_nth_client(3),
    ];
    let dirs = AgentDirs::new();
    let kit = TokenKit::new(&dirs, lab.server_v4);
    let gpu_file = dirs.state_dir.join("gpu-simulated.json");
    let w = World {
        dirs,
        kit,
        gpu_file,
        clients,
        lab,
    };
    let server = &w.lab.server;
    println!(
        "  GPU node   {:<22} model server on :{MODEL_PORT}, token bind listener on :{BIND_PORT}",
        server.name()
    );
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let what = match who {
            INTERNAL => "internal service: bound by its /24 in the configuration",
            PARTNER => "partner: binds with a token (class partner, plan partner)",
            CUSTOMER => "customer: binds with a token (class customer, plan customer)",
            _ => "attacker: no token, never bound",
        };
        println!(
            "  {:<10} {:<22} {:<14} {what}",
            WHO[who],
            w.client_ns(who).name(),
            w.client_v4(who).to_string()
        );
    }

    let model = ModelServer::start(server)?;
    // Dropped before the model server, which waits for the loops to end.
    let _stop_loops = StopLoops;
    w.gpu(GPU_CALM)?;
    let config = w.write_config()?;
    let check = Command::new(tollgate_bin())
        .args(["config", "check"])
        .arg(&config)
        .output()?;
    anyhow::ensure!(
        check.status.success(),
        "the demo configuration is refused: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    println!(
        "\nStarting tollgate on the GPU node (XDP, native mode, on {} interfaces), config {}",
        w.interfaces().len(),
        config.display()
    );
    let config_arg = config.to_str().unwrap_or_default().to_owned();
    let agent = Agent::launch(server, &w.dirs, &["--config", &config_arg]);
    println!("  attached; enforcing. Plans (packets/s per identity, burst):");
    for p in &PLANS {
        println!(
            "    {:<9} priority {:>3}  {:>5} pkt/s, burst {:>4}",
            p.name, p.priority, p.pps, p.burst
        );
    }
    println!(
        "  Unbound sources: dropped on :{MODEL_PORT}; on :{BIND_PORT} each /24 gets {ANON_PPS} pkt/s (burst {ANON_BURST})."
    );
    println!(
        "  Metrics, while the demo runs:  ip netns exec {} curl -s http://{METRICS}/metrics",
        server.name()
    );

    if interrupted() {
        return Ok(false);
    }
    // Binds, with real tokens over HTTPS, from the clients' own namespaces.
    println!(
        "\nBinding with tokens (tollgate token issue, then curl POST https://{}:{BIND_PORT}/v1/bind):",
        w.lab.server_v4
    );
    for (who, class) in [(PARTNER, "partner"), (CUSTOMER, "customer")] {
        let token = w.kit.issue(IDENTITY[who], class, class, "15m");
        let (code, body) = w.kit.bind(w.client_ns(who), &token);
        anyhow::ensure!(
            code == 200 || interrupted(),
            "{} could not bind: HTTP {code} {body}",
            WHO[who]
        );
        println!(
            "  {:<9} HTTP {code}: {} bound as {} until unix {}",
            WHO[who], body["address"], body["identity"], body["expires_unix"]
        );
    }
    if interrupted() {
        return Ok(false);
    }
    let listed: serde_json::Value =
        serde_json::from_str(&w.dirs.cli_ok(&["identities", "--output", "json"]))?;
    let mut ids = [0u32; 3];
    for (i, name) in IDENTITY.iter().enumerate() {
        ids[i] = listed
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == *name))
            .and_then(|r| r["id"].as_u64())
            .ok_or_else(|| anyhow::anyhow!("identity {name} is not listed: {listed}"))?
            as u32;
    }

    // The attacker's frames, addressed like real ones.
    let attacker_ns = w.client_ns(ATTACKER);
    let attacker_if = w.clients[2].client_if.clone();
    let src_mac = mac(attacker_ns, &attacker_if)?;
    let dst_mac = mac(server, &w.clients[2].server_if)?;
    let flood_model = syn_frame(&w, MODEL_PORT, src_mac, dst_mac);
    let flood_bind = syn_frame(&w, BIND_PORT, src_mac, dst_mac);

    // Traffic: every client sends completions requests for the whole timeline.
    let tallies: [Arc<Tally>; 4] = Default::default();
    let mut loops = Vec::new();
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let (pace, connect) = if who == ATTACKER {
            (ATTACKER_REQUESTS_PER_SECOND, Duration::from_millis(500))
        } else {
            (REQUESTS_PER_SECOND, Duration::from_secs(2))
        };
        loops.push(client_loop(
            w.client_ns(who),
            w.model_addr(),
            pace,
            connect,
            Arc::clone(&tallies[who]),
        ));
    }
    println!(
        "\nTraffic: internal, partner and customer each send {REQUESTS_PER_SECOND} streaming completions/s \
         (POST /v1/completions, {CHUNKS} tokens each); the attacker tries {ATTACKER_REQUESTS_PER_SECOND}/s without a token."
    );

    let durations = [NORMAL, SATURATED, RECOVERED];
    // A snapshot at the start of each phase, then one at the end.
    let mut marks: Vec<Snap> = Vec::new();
    let global_before = agent.counters();
    let mut flood: Vec<FrameBlaster> = Vec::new();
    let mut during = Vec::new();
    println!(
        "\nEvery second: packets per second the XDP program admitted (pass/s) and dropped (drop/s) \
         from each identity, read from the kernel's counters; the GPU as the agent sees it."
    );
    let timeline_start = Instant::now();
    for (phase, length) in durations.iter().enumerate() {
        if interrupted() {
            break;
        }
        match phase {
            0 => {
                println!(
                    "\n-- Phase 1/3: normal ({} s). GPU 0 at {:.0}%: every plan has its whole budget; the attacker's \
                     requests die in XDP (unbound).",
                    NORMAL.as_secs(),
                    GPU_CALM * 100.0
                );
            }
            1 => {
                w.gpu(GPU_HOT)?;
                println!(
                    "\n-- Phase 2/3: GPU saturated + attacker flood ({} s).\n   `tollgate gpu simulate --util {GPU_HOT}`: GPU 0 at {:.0}% (saturate_at {:.0}%). \
                     Within one controller interval ({INTERVAL_MS} ms) the model endpoint is held back:",
                    SATURATED.as_secs(),
                    GPU_HOT * 100.0,
                    SATURATE_AT * 100.0
                );
                for p in &PLANS {
                    let s = share(p.priority);
                    println!(
                        "     {:<9} (priority {:>3}) keeps {:>3.0}% of its budget: {:>5.0} pkt/s",
                        p.name,
                        p.priority,
                        s * 100.0,
                        s * f64::from(p.pps)
                    );
                }
                let forged = {
                    let a = w.kit.issue("mallory", "internal", "internal", "15m");
                    let b = w.kit.issue("someone-else", "customer", "customer", "15m");
                    let (head, _) = a.rsplit_once('.').unwrap_or((&a, ""));
                    let (_, sig) = b.rsplit_once('.').unwrap_or(("", &b));
                    format!("{head}.{sig}")
                };
                let (code, body) = w.kit.bind(attacker_ns, &forged);
                println!(
                    "   The attacker tries to bind with a forged token (claims class internal): HTTP {code}, reason {}.",
                    body["reason"]
                );
                flood.push(FrameBlaster::start(
                    attacker_ns,
                    &attacker_if,
                    flood_model.clone(),
                    FLOOD_MODEL_PPS,
                ));
                flood.push(FrameBlaster::start(
                    attacker_ns,
                    &attacker_if,
                    flood_bind.clone(),
                    FLOOD_BIND_PPS,
                ));
                println!(
                    "   Then it floods: {} SYN/s at :{MODEL_PORT} and {} SYN/s at :{BIND_PORT}, from {}. XDP drops them before \
                     the TCP stack sees them; on :{BIND_PORT} its /24 gets {ANON_PPS} pkt/s.",
                    n(u64::from(FLOOD_MODEL_PPS)),
                    n(u64::from(FLOOD_BIND_PPS)),
                    w.client_v4(ATTACKER)
                );
            }
            _ => {
                for f in flood.drain(..) {
                    f.stop();
                }
                w.gpu(GPU_CALM)?;
                println!(
                    "\n-- Phase 3/3: recovered ({} s). Flood stopped; GPU 0 back at {:.0}%. After {RECOVER_AFTER} readings at or \
                     below {:.0}% (hysteresis: {} ms) every plan has its whole budget again.",
                    RECOVERED.as_secs(),
                    GPU_CALM * 100.0,
                    RECOVER_AT * 100.0,
                    RECOVER_AFTER * INTERVAL_MS
                );
            }
        }
        PHASE.store(phase, Ordering::SeqCst);
        header();
        let phase_start = Instant::now();
        let mut last = Snap::read(&w.dirs, &ids);
        marks.push(last);
        for second in 1..=length.as_secs() {
            let tick = phase_start + Duration::from_secs(second);
            nap(tick.saturating_duration_since(Instant::now()));
            if interrupted() {
                break;
            }
            let now = Snap::read(&w.dirs, &ids);
            let (d, secs) = now.since(&last);
            last = now;
            let cell = |p: Pd| {
                format!(
                    "{:>6.0} {:>6.0}",
                    p.pass as f64 / secs,
                    p.drop as f64 / secs
                )
            };
            println!(
                "  {:>3}s  {:<14}  {:>15}  {:>15}  {:>15}  {:>8.0} {:>8.0}",
                timeline_start.elapsed().as_secs(),
                gpu_state(&w.dirs),
                cell(d[INTERNAL]),
                cell(d[PARTNER]),
                cell(d[CUSTOMER]),
                d[ATTACKER].pass as f64 / secs,
                d[ATTACKER].drop as f64 / secs,
            );
        }
        if phase == 1 && !interrupted() {
            during = metrics_excerpt(server, true);
        }
    }
    let end = Snap::read(&w.dirs, &ids);
    marks.push(end);
    FINISHED.store(true, Ordering::SeqCst);
    drop(flood);
    for l in loops {
        let _ = l.join();
    }
    if interrupted() {
        return Ok(false);
    }
    let global = agent.counters().since(&global_before);
    let metrics = [during, metrics_excerpt(server, false)];
    report(
        &w,
        &model,
        &tallies,
        &marks,
        &global,
        &metrics,
        server.name(),
    )
}

/// The final tables and the checks; true if every check holds.
fn report(
    w: &World,
    model: &ModelServer,
    tallies: &[Arc<Tally>; 4],
    marks: &[Snap],
    global: &Counters,
    metrics: &[Vec<String>; 2],
    server_ns: &str,
) -> anyhow::Result<bool> {
    anyhow::ensure!(marks.len() == 4, "the timeline did not complete");
    let bounds = [marks[0], marks[1], marks[2], marks[3]];
    let (total, total_secs) = bounds[3].since(&bounds[0]);
    let per_phase: Vec<([Pd; 4], f64)> = (0..3).map(|i| bounds[i + 1].since(&bounds[i])).collect();
    let anon = bounds[3].anon.since(&bounds[0].anon);
    let bound_reasons: Vec<(String, u64)> = global
        .0
        .iter()
        .filter(|(r, c)| {
            c.verdict == "drop"
                && c.packets > 0
                && !matches!(r.as_str(), "unbound" | "anonymous_rate")
        })
        .map(|(r, c)| (r.clone(), c.packets))
        .collect();
    let bound_label = if bound_reasons.is_empty() {
        "packet_rate".to_owned()
    } else {
        bound_reasons
            .iter()
            .map(|(r, _)| r.as_str())
            .collect::<Vec<_>>()
            .join("/")
    };

    println!(
        "\n== Per identity, over the {:.0} s of traffic: packets the XDP program saw from each (offered), admitted and dropped ==",
        total_secs
    );
    println!(
        "{:<10} {:<20} {:<20} {:>10} {:>10} {:>10}  dropped by reason",
        "identity", "source", "class/plan", "offered", "admitted", "dropped"
    );
    let internal_net = {
        let o = w.client_v4(INTERNAL).octets();
        format!("{}.{}.{}.0/24", o[0], o[1], o[2])
    };
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let p = total[who];
        let (source, plan, reasons) = match who {
            INTERNAL => (
                internal_net.clone(),
                "internal/internal",
                if p.drop == 0 {
                    "-".to_owned()
                } else {
                    format!("{bound_label} {}", n(p.drop))
                },
            ),
            ATTACKER => (
                w.client_v4(ATTACKER).to_string(),
                "anonymous (unbound)",
                format!(
                    "unbound {} (:{MODEL_PORT}), anonymous_rate {} (:{BIND_PORT})",
                    n(anon.model_unbound),
                    n(anon.bind_anonymous_rate + anon.bind_unbound)
                ),
            ),
            _ => (
                format!("{} (token)", w.client_v4(who)),
                if who == PARTNER {
                    "partner/partner"
                } else {
                    "customer/customer"
                },
                if p.drop == 0 {
                    "-".to_owned()
                } else {
                    format!("{bound_label} {}", n(p.drop))
                },
            ),
        };
        println!(
            "{:<10} {:<20} {:<20} {:>10} {:>10} {:>10}  {reasons}",
            WHO[who],
            source,
            plan,
            n(p.pass + p.drop),
            n(p.pass),
            n(p.drop)
        );
    }
    if !bound_reasons.is_empty() {
        println!(
            "  (kernel reason counters for bound sources over the run: {}; the identity rows above share them)",
            bound_reasons
                .iter()
                .map(|(r, c)| format!("{r} {}", n(*c)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "  attacker on :{MODEL_PORT}: {} offered, {} admitted; on :{BIND_PORT}: {} admitted within the anonymous allowance",
        n(anon.model_unbound + anon.model_anonymous),
        n(anon.model_anonymous),
        n(anon.bind_anonymous)
    );

    println!(
        "\n{:<26} {:>16} {:>16} {:>16}",
        "admitted packets/s", PHASES[0], PHASES[1], PHASES[2]
    );
    let rate = |who: usize, phase: usize| {
        let (d, secs) = per_phase[phase];
        d[who].pass as f64 / secs
    };
    let ratio = |who: usize| {
        let normal = rate(who, 0);
        if normal > 0.0 {
            rate(who, 1) / normal
        } else {
            0.0
        }
    };
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let sat = if who == ATTACKER {
            format!("{:.0}", rate(who, 1))
        } else {
            format!("{:.0} ({:.0}%)", rate(who, 1), ratio(who) * 100.0)
        };
        println!(
            "{:<26} {:>16.0} {:>16} {:>16.0}",
            WHO[who],
            rate(who, 0),
            sat,
            rate(who, 2)
        );
    }
    println!(
        "\n{:<26} {:>16} {:>16} {:>16}",
        "requests completed/failed", PHASES[0], PHASES[1], PHASES[2]
    );
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let t = &tallies[who];
        let cell = |i: usize| {
            format!(
                "{}/{}",
                t.ok[i].load(Ordering::Relaxed),
                t.failed[i].load(Ordering::Relaxed)
            )
        };
        println!(
            "{:<26} {:>16} {:>16} {:>16}",
            WHO[who],
            cell(0),
            cell(1),
            cell(2)
        );
    }

    println!("\n== Metrics ==");
    println!(
        "While the demo runs they are at http://{METRICS}/metrics inside the GPU node's namespace:\n  \
         ip netns exec {server_ns} curl -s http://{METRICS}/metrics\n(the namespace is gone now). \
         At the end of the saturated phase:"
    );
    for l in &metrics[0] {
        println!("  {l}");
    }
    println!("Just before teardown:");
    for l in &metrics[1] {
        println!("  {l}");
    }

    println!("\n== Checks ==");
    let served_attacker = model.served_to(w.client_v4(ATTACKER));
    let attacker_ok: u64 = tallies[ATTACKER]
        .ok
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum();
    let (c_ratio, p_ratio, i_ratio) = (ratio(CUSTOMER), ratio(PARTNER), ratio(INTERNAL));
    let checks = [
        (
            anon.model_anonymous == 0 && served_attacker == 0 && attacker_ok == 0,
            format!(
                "attacker admitted to the model port: {} packets, {} streams served, {} requests completed (want 0)",
                anon.model_anonymous, served_attacker, attacker_ok
            ),
        ),
        (
            anon.model_unbound > 0,
            format!(
                "attacker dropped as unbound: {} packets",
                n(anon.model_unbound)
            ),
        ),
        (
            total[INTERNAL].drop == 0 && total[INTERNAL].pass > 0,
            format!(
                "internal service untouched: {} packets admitted, {} dropped",
                n(total[INTERNAL].pass),
                total[INTERNAL].drop
            ),
        ),
        (
            c_ratio < 0.9 && per_phase[1].0[CUSTOMER].drop > 0,
            format!(
                "customer held back while the GPU was saturated: {:.0} -> {:.0} pkt/s admitted ({:.0}%), {} dropped",
                rate(CUSTOMER, 0),
                rate(CUSTOMER, 1),
                c_ratio * 100.0,
                n(per_phase[1].0[CUSTOMER].drop)
            ),
        ),
        (
            c_ratio < p_ratio && p_ratio <= i_ratio + 0.1,
            format!(
                "partner in between: kept {:.0}% of its normal rate (customer {:.0}%, internal {:.0}%)",
                p_ratio * 100.0,
                c_ratio * 100.0,
                i_ratio * 100.0
            ),
        ),
    ];
    let mut all = true;
    for (ok, what) in &checks {
        println!("  [{}] {what}", if *ok { " ok " } else { "FAIL" });
        all &= ok;
    }
    Ok(all)
}
