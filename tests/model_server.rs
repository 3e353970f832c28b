//! The controller on model-server load (#17), end to end: a model-server stand-in whose vLLM
//! metrics follow its real in-flight requests, the real agent scraping it every interval, and
//! the kernel's hold-back and identity counters as the evidence.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tollgate_tests::{
    agent::{Agent, AgentDirs, hold_back, identity_counters},
    config::{Config, Controller, Endpoint, Identity, ModelServer as ServerConfig, Plan},
    lab::Lab,
    model_server::{LoadGen, MetricsMode, ModelServer},
};

const PORT: u16 = 8000;
const METRICS_PORT: u16 = 9400;
const INTERVAL_MS: u64 = 250;
/// Waiting requests at which the endpoint saturates.
const QUEUE_AT: u32 = 4;
/// Hold-back multiplier of no hold-back (Q8 1.0).
const NONE: u16 = 256;

/// One at a time: these measure traffic on a 2-core machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

struct World {
    lab: Lab,
    dirs: AgentDirs,
    config: PathBuf,
    gpu_file: PathBuf,
    ops: Ipv4Addr,
    customer: Ipv4Addr,
    /// Plan indices in file order.
    internal: u16,
    free: u16,
}

impl World {
    /// Plans `internal` (priority 100, 1000 packets/s) and `free` (priority 10, 200/s), a TCP
    /// endpoint on 8000 served by GPU 0 and the vLLM stand-in's metrics, `ops` (internal) and
    /// `customer` (free) at their own client addresses.
    fn new(server: ServerConfig) -> World {
        tollgate_tests::require_root();
        let lab = Lab::new();
        let dirs = AgentDirs::new();
        let gpu_file = dirs.state_dir.join("gpu.json");
        let ops = lab.add_client_address(10);
        let customer = lab.add_client_address(11);
        let config = Config::new(&[&lab.server_if])
            .controller(Controller {
                interval_ms: Some(INTERVAL_MS),
                saturate_at: Some(0.9),
                recover_at: Some(0.75),
                recover_after: Some(4),
                hold_back_floor: Some(0.1),
                ..Controller::simulated(&gpu_file)
            })
            .plan(Plan::new("internal").priority(100).packets(1000, 100))
            .plan(Plan::new("free").priority(10).packets(200, 50))
            .endpoint(
                Endpoint::tcp("model", PORT, &["internal", "customer"])
                    .gpus(&[0])
                    .model_server(server),
            )
            .identity(Identity::new(
                "ops",
                "internal",
                "internal",
                &[IpAddr::V4(ops)],
            ))
            .identity(Identity::new(
                "customer",
                "customer",
                "free",
                &[IpAddr::V4(customer)],
            ));
        let index = |name: &str| config.plans.iter().position(|p| p.name == name).unwrap() as u16;
        let (internal, free) = (index("internal"), index("free"));
        let config = config.write(&dirs.state_dir.join("tollgate.toml"));
        let w = World {
            lab,
            dirs,
            config,
            gpu_file,
            ops,
            customer,
            internal,
            free,
        };
        w.gpu(0.2);
        w
    }

    fn start(&self) -> Agent {
        Agent::launch(
            &self.lab.server,
            &self.dirs,
            &[
                "--config",
                self.config.to_str().unwrap(),
                "--mode",
                "native",
            ],
        )
    }

    fn gpu(&self, util: f64) {
        tollgate_tests::agent::simulate_gpu(&self.gpu_file, util);
    }

    fn stand_in(&self) -> ModelServer {
        ModelServer::start(
            &self.lab.server,
            SocketAddr::new(self.lab.server_v4.into(), PORT),
            SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)),
            2,
            Duration::from_millis(100),
        )
    }

    fn load(&self, from: Ipv4Addr, concurrency: usize) -> LoadGen {
        LoadGen::start(
            &self.lab.client,
            from.into(),
            SocketAddr::new(self.lab.server_v4.into(), PORT),
            concurrency,
        )
    }

    fn slot(&self, name: &str) -> u32 {
        self.dirs.identity_slot(name)
    }

    /// `status.gpu.endpoints[0]` as JSON.
    fn load_status(&self) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.dirs.cli_ok(&["status", "--output", "json"])).unwrap();
        v["gpu"]["endpoints"][0].clone()
    }

    /// The first `status.gpu.endpoints[0]` within `limit` for which `ok` holds.
    fn load_status_when(
        &self,
        limit: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        within(limit, || Some(self.load_status()).filter(|s| ok(s)))
    }

    fn records(&self, action: &str) -> Vec<serde_json::Value> {
        self.dirs
            .audit()
            .into_iter()
            .filter(|r| r["action"] == action)
            .collect()
    }
}

/// Polls `f` every 10 ms for at most `limit`; the first `Some`.
fn within<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(t) = f() {
            return Some(t);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn a_queue_past_its_threshold_holds_the_customer_back_and_spares_internal_traffic() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let w = World::new(ServerConfig {
        queue_at: Some(f64::from(QUEUE_AT)),
        timeout_ms: Some(200),
        ..ServerConfig::vllm(&format!("http://127.0.0.1:{METRICS_PORT}/metrics"))
    });
    let server = w.stand_in();
    let _agent = w.start();
    let (ops, cust) = (w.slot("ops"), w.slot("customer"));

    // Calm: internal traffic and a light customer; nothing is held back.
    let internal = w.load(w.ops, 1);
    let light = w.load(w.customer, 1);
    std::thread::sleep(Duration::from_millis(1500));
    let calm = w.load_status();
    assert_eq!(calm["source"], "model_server", "{calm}");
    assert_eq!(
        hold_back(&w.dirs, 1, w.free),
        NONE,
        "held back while calm: {calm}"
    );
    drop(light);
    let ops0 = identity_counters(&w.dirs, ops);
    let cust0 = identity_counters(&w.dirs, cust);
    let internal0 = internal.done();

    // The ramp: twelve customers in a closed loop against two slots.
    let ramp = w.load(w.customer, 12);
    let held_at = within(Duration::from_secs(15), || {
        (hold_back(&w.dirs, 1, w.free) > NONE).then(now_ms)
    })
    .unwrap_or_else(|| panic!("never held back; status {}", w.load_status()));
    let passed_at = server
        .scrapes()
        .into_iter()
        .find(|(_, waiting)| *waiting >= QUEUE_AT)
        .map(|(t, _)| t)
        .expect("the hold-back came without a scrape that saw the queue past its threshold");
    let delay = held_at.saturating_sub(passed_at);
    eprintln!(
        "first scrape with the queue at {QUEUE_AT}+ to the kernel's hold-back: {delay} ms \
         (interval {INTERVAL_MS} ms)"
    );
    // The scrape's answer is taken at the next tick and written at once: one interval, with
    // one more of slack for a loaded 2-core machine.
    assert!(
        delay <= 2 * INTERVAL_MS,
        "{delay} ms from the scrape to the kernel"
    );
    assert_eq!(
        hold_back(&w.dirs, 1, w.internal),
        NONE,
        "internal was held back"
    );

    // Held back, the customer's offered load no longer fits its budget and the queue drains
    // while the ramp goes on.
    let drained = within(Duration::from_secs(10), || {
        let (waiting, _) = server.load();
        (waiting < QUEUE_AT && hold_back(&w.dirs, 1, w.free) > NONE).then_some(waiting)
    });
    assert!(
        drained.is_some(),
        "the queue did not drain under hold-back: {:?}, status {}",
        server.load(),
        w.load_status()
    );
    let ops1 = identity_counters(&w.dirs, ops);
    let cust1 = identity_counters(&w.dirs, cust);
    let internal1 = internal.done();
    eprintln!(
        "saturated: customer passed {} dropped {} packets; internal passed {} dropped {}, {} requests",
        cust1.passed.packets - cust0.passed.packets,
        cust1.dropped.packets - cust0.dropped.packets,
        ops1.passed.packets - ops0.passed.packets,
        ops1.dropped.packets - ops0.dropped.packets,
        internal1 - internal0
    );
    assert!(
        cust1.dropped.packets > cust0.dropped.packets,
        "the kernel dropped nothing of the customer's"
    );
    assert_eq!(
        ops1.dropped.packets, ops0.dropped.packets,
        "internal packets dropped"
    );
    assert!(
        internal1 > internal0,
        "no internal request completed while saturated"
    );

    // The ramp ends; after the calm readings every plan has its whole budget again.
    drop(ramp);
    let recovered = within(Duration::from_secs(10), || {
        (hold_back(&w.dirs, 1, w.free) == NONE && hold_back(&w.dirs, 1, w.internal) == NONE)
            .then_some(())
    });
    assert!(recovered.is_some(), "not recovered: {}", w.load_status());
    let light = w.load(w.customer, 1);
    let cust2 = identity_counters(&w.dirs, cust);
    std::thread::sleep(Duration::from_secs(2));
    let cust3 = identity_counters(&w.dirs, cust);
    drop(light);
    assert!(
        cust3.passed.packets > cust2.passed.packets,
        "no customer traffic after recovery"
    );
    assert_eq!(
        cust3.dropped.packets, cust2.dropped.packets,
        "the customer is still held back after recovery"
    );
    assert_eq!(
        identity_counters(&w.dirs, ops).dropped.packets,
        ops0.dropped.packets
    );

    let saturated = w.records("gpu_saturated");
    let first = saturated.first().expect("no gpu_saturated record");
    assert_eq!(first["detail"]["source"], "model_server", "{first}");
    assert_eq!(first["detail"]["driver"], "queue", "{first}");
    assert!(!w.records("gpu_recovered").is_empty());
}

#[test]
fn a_model_server_that_hangs_answers_garbage_or_goes_away_is_reported_once_and_falls_back() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Queue and KV only: the GPU (simulated at 97%) decides only once the fallback starts.
    let w = World::new(ServerConfig {
        queue_at: Some(f64::from(QUEUE_AT)),
        signals: Some(vec!["queue".into(), "kv_cache".into()]),
        timeout_ms: Some(150),
        fallback_intervals: Some(8),
        ..ServerConfig::vllm(&format!("http://127.0.0.1:{METRICS_PORT}/metrics"))
    });
    w.gpu(0.97);
    let server = w.stand_in();
    let _agent = w.start();
    let status = w
        .load_status_when(Duration::from_secs(10), |s| s["source"] == "model_server")
        .expect("never read the model server");
    assert_eq!(status["saturated"], false, "{status}");
    let loops = |w: &World| -> u64 {
        let body = tollgate_tests::scrape::scrape_within(
            &w.lab.server,
            "127.0.0.1:9464".parse().unwrap(),
            Duration::from_secs(5),
        );
        body.lines()
            .find_map(|l| l.strip_prefix("tollgate_controller_loops_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("tollgate_controller_loops_total")
    };

    // Hang: every scrape times out; the loop keeps its interval.
    server.set_mode(MetricsMode::Hang);
    let (l0, t0) = (loops(&w), Instant::now());
    // The last reading holds for 8 intervals (2 s)...
    let held = w
        .load_status_when(Duration::from_secs(3), |s| {
            s["source"] == "model_server_held"
        })
        .expect("the last reading was not held");
    assert_eq!(held["saturated"], false, "{held}");
    // ... then the GPUs decide, and the simulated 97% saturates the endpoint.
    let fallback = w
        .load_status_when(Duration::from_secs(5), |s| {
            s["source"] == "gpus_fallback" && s["saturated"] == true
        })
        .expect("no fallback to the GPUs");
    assert_eq!(fallback["driver"], "gpu_util", "{fallback}");
    std::thread::sleep(Duration::from_secs(2));
    let (l1, secs) = (loops(&w), t0.elapsed().as_secs_f64());
    let per_s = (l1 - l0) as f64 / secs;
    eprintln!(
        "controller loops while the model server hangs: {per_s:.1}/s (interval {INTERVAL_MS} ms)"
    );
    // 4/s at 250 ms; a loop held up by the 150 ms timeouts would run far fewer.
    assert!(per_s >= 3.0, "the loop lost its interval: {per_s:.1}/s");

    // Garbage, then gone: the same outage, not reported again.
    server.set_mode(MetricsMode::Garbage);
    std::thread::sleep(Duration::from_millis(1000));
    server.set_mode(MetricsMode::Gone);
    std::thread::sleep(Duration::from_millis(1000));
    let down = w.records("model_server_down");
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0]["reason"], "timeout", "{down:?}");
    let s = w.load_status();
    assert_eq!(s["source"], "gpus_fallback", "{s}");
    let scrapes = &s["model_server"]["scrapes"];
    for outcome in ["timeout", "parse", "connect"] {
        assert!(
            scrapes[outcome].as_u64().unwrap_or(0) > 0,
            "{outcome}: {scrapes}"
        );
    }

    // Back: reported once, read again, and the endpoint recovers on its own signals.
    server.set_mode(MetricsMode::Live);
    let back = w.load_status_when(Duration::from_secs(5), |s| {
        s["source"] == "model_server" && s["saturated"] == false
    });
    assert!(back.is_some(), "not back: {}", w.load_status());
    assert_eq!(w.records("model_server_back").len(), 1);
    // A new outage is a new report.
    server.set_mode(MetricsMode::Garbage);
    let second = within(Duration::from_secs(3), || {
        let d = w.records("model_server_down");
        (d.len() == 2).then_some(d)
    })
    .expect("a second outage was not reported");
    assert_eq!(second[1]["reason"], "parse", "{second:?}");
    assert!(
        second[1]["detail"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not Prometheus text") || e.contains("is the kind right")),
        "{second:?}"
    );
}
