//! The usage feed end to end, against the real agent: a plan in tokens per minute is cut off
//! at the report whose sum passes it (not before, not a tick later), the kernel drops the
//! identity's packets with the quota flag, one audit record names `token_quota_exhausted`,
//! and the minute's roll lets it pass again; a money budget from a price table ends the same
//! way (`budget_exhausted`, cut off at the report that lands on it exactly); and reports for
//! nobody, oversized ones and HTTP ones without (or with the wrong) secret are refused with
//! their labels and change nothing.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{Agent, AgentDirs, identity_counters},
    config::{Config, Controller, Endpoint, Identity, Plan, Price, Usage},
    frames::FrameBlaster,
    lab::Lab,
};

const PORT: u16 = 7000;
const USAGE_ADDR: &str = "127.0.0.1:9466";
const SECRET: &str = "s3cret-usage-feed-0123456789";
const REPORTS: usize = 1000;
const TOKENS_PER_MINUTE: u64 = 50_000;
/// Prices per million tokens, and the same in nano-units per token.
const PROMPT_PER_M: &str = "0.15";
const COMPLETION_PER_M: &str = "0.6";
const PROMPT_NANO: u64 = 150;
const COMPLETION_NANO: u64 = 600;

/// Report `i`'s (prompt, completion) tokens: varied so that sums pass round figures between
/// reports.
fn tokens_of(i: usize) -> (u64, u64) {
    (20 + (i % 7) as u64, 35 + (i % 11) as u64)
}

/// The first report (index) whose running sum of `f` reaches `limit`, and the sums before
/// and at it.
fn crossing(f: impl Fn(usize) -> u64, limit: u64) -> (usize, u64, u64) {
    let mut sum = 0;
    for i in 0..REPORTS {
        let before = sum;
        sum += f(i);
        if sum >= limit {
            return (i, before, sum);
        }
    }
    panic!("{REPORTS} reports never reach {limit}");
}

struct World {
    lab: Lab,
    dirs: AgentDirs,
    config: PathBuf,
}

impl World {
    /// Identity `metered` (.12) on `plan`, an endpoint on UDP 7000, the price table, and the
    /// HTTP usage listener with its secret.
    fn new(plan: Plan) -> World {
        tollgate_tests::require_root();
        let lab = Lab::new();
        let dirs = AgentDirs::new();
        let secret = dirs.state_dir.join("usage.secret");
        std::fs::write(&secret, format!("{SECRET}\n")).expect("secret");
        let o = lab.client_v4.octets();
        let metered = IpAddr::from([o[0], o[1], o[2], 12]);
        let mut config = Config::new(&[&lab.server_if])
            .controller(Controller {
                interval_ms: Some(250),
                ..Controller::no_gpu()
            })
            .plan(plan)
            .endpoint(Endpoint::udp("model", PORT, &["customer"]))
            .identity(Identity::new("metered", "customer", "metered", &[metered]));
        config.prices = vec![Price {
            model: "llama-3.1-8b".into(),
            prompt_per_million: PROMPT_PER_M.into(),
            completion_per_million: COMPLETION_PER_M.into(),
        }];
        config.usage = Some(Usage {
            listen: Some(USAGE_ADDR.into()),
            secret_file: Some(secret),
            ..Usage::default()
        });
        let config = config.write(&dirs.state_dir.join("tollgate.toml"));
        World { lab, dirs, config }
    }

    fn start(&self) -> Agent {
        let config = self.config.to_str().expect("path");
        Agent::launch(
            &self.lab.server,
            &self.dirs,
            &["--config", config, "--mode", "native"],
        )
    }

    fn host(&self, n: u8) -> IpAddr {
        let o = self.lab.client_v4.octets();
        IpAddr::from([o[0], o[1], o[2], n])
    }

    fn blaster(&self, per_second: u32) -> FrameBlaster {
        let o = self.lab.client_v4.octets();
        let frame = PacketBuilder::v4([o[0], o[1], o[2], 12], self.lab.server_v4.octets())
            .udp(40000, PORT)
            .payload(58)
            .build();
        FrameBlaster::start(&self.lab.client, &self.lab.client_if, frame, per_second)
    }

    /// One request line on the control socket; the answer.
    fn socket(&self, req: &Value) -> Value {
        let mut s = UnixStream::connect(&self.dirs.socket).expect("control socket");
        let mut line = serde_json::to_vec(req).expect("json");
        line.push(b'\n');
        s.write_all(&line).expect("write");
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).expect("read");
        serde_json::from_str(&answer).expect("answer json")
    }

    fn report(&self, who: Value, prompt: u64, completion: u64) -> Value {
        self.socket(
            &json!({"verb": "usage", "who": who, "model": "llama-3.1-8b",
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}),
        )
    }

    /// What `explain` says of a packet from the metered identity: the kernel's decision over
    /// its tables as they are now.
    fn explain(&self) -> Value {
        let dst = format!("{}:{PORT}/udp", self.lab.server_v4);
        let src = self.host(12).to_string();
        serde_json::from_str(
            &self
                .dirs
                .cli_ok(&["explain", &src, &dst, "--output", "json"]),
        )
        .expect("explain json")
    }

    fn quota(&self) -> Value {
        serde_json::from_str(&self.dirs.cli_ok(&["quota", "show", "--output", "json"]))
            .expect("quota json")
    }

    /// One HTTP request to the usage listener (from the agent's namespace, where it listens
    /// on loopback): (status, body).
    fn http(&self, secret: Option<&str>, body: &str) -> (u16, Value) {
        let head = match secret {
            Some(s) => format!("X-Tollgate-Usage-Secret: {s}\r\n"),
            None => String::new(),
        };
        let req = format!(
            "POST /v1/usage HTTP/1.1\r\nHost: x\r\n{head}content-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let text = self.lab.server.run(move || {
            let mut s = std::net::TcpStream::connect(USAGE_ADDR).expect("usage listener");
            s.write_all(req.as_bytes()).expect("write");
            let mut text = String::new();
            s.read_to_string(&mut text).expect("read");
            text
        });
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn metrics(&self) -> String {
        self.lab.server.run(|| {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("metrics");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let mut text = String::new();
            s.read_to_string(&mut text).expect("read");
            text
        })
    }
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until at most 20 s of the current UTC minute have gone, so that a run of reports
/// and its checks fit in one minute window.
fn early_in_a_minute() {
    let into = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        % 60;
    if into > 20 {
        std::thread::sleep(Duration::from_secs(61 - into));
    }
}

/// Packets the identity passed over `d`.
fn passed_over(w: &World, id: u32, d: Duration) -> u64 {
    let before = identity_counters(&w.dirs, id).passed.packets;
    std::thread::sleep(d);
    identity_counters(&w.dirs, id).passed.packets - before
}

#[test]
fn a_token_plan_is_cut_off_at_the_report_that_passes_it_and_passes_again_when_the_minute_rolls() {
    let _turn = serial();
    let w = World::new(Plan {
        tokens_per_minute: Some(TOKENS_PER_MINUTE),
        ..Plan::new("metered")
    });
    let (k, before, at) = crossing(
        |i| {
            let (p, c) = tokens_of(i);
            p + c
        },
        TOKENS_PER_MINUTE,
    );
    assert!(
        before < TOKENS_PER_MINUTE && at > TOKENS_PER_MINUTE && k < REPORTS - 100,
        "the reports pass the plan between two of them: {before} -> {at} at {k}"
    );
    let _agent = w.start();
    let id = w.dirs.identity_slot("metered");
    let _blast = w.blaster(200);
    early_in_a_minute();
    let who = json!({"identity": "metered"});
    for i in 0..k {
        let (p, c) = tokens_of(i);
        let r = w.report(who.clone(), p, c);
        assert_eq!(r["ok"], true, "report {i}: {r}");
        assert!(
            r["result"]["exhausted"].is_null(),
            "cut off early at {i}: {r}"
        );
    }
    // One report short of the plan: the kernel passes its packets.
    let e = w.explain();
    assert_eq!(e["verdict"], "pass", "{e}");
    assert!(passed_over(&w, id, Duration::from_millis(500)) > 50);
    let (p, c) = tokens_of(k);
    let r = w.report(who.clone(), p, c);
    assert_eq!(r["result"]["exhausted"], "token_quota_exhausted", "{r}");
    assert_eq!(r["result"]["minute_tokens"], at);
    // At once, not at the next controller tick: the flag is in the kernel when the report
    // is answered.
    let e = w.explain();
    assert_eq!(
        (&e["verdict"], &e["reason"], &e["quota_reason"]),
        (
            &json!("drop"),
            &json!("quota_exhausted"),
            &json!("token_quota_exhausted")
        ),
        "{e}"
    );
    // Reports for requests still in flight are accepted and counted.
    for i in k + 1..REPORTS {
        let (p, c) = tokens_of(i);
        assert_eq!(w.report(who.clone(), p, c)["ok"], true, "report {i}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        passed_over(&w, id, Duration::from_millis(600)),
        0,
        "packets passed while cut off"
    );
    let c = identity_counters(&w.dirs, id);
    assert!(c.dropped.packets > 50, "{c:?}");
    let shown = w.quota();
    let row = &shown[0];
    assert_eq!(row["exhausted"], "token_quota_exhausted", "{shown}");
    assert_eq!(row["minute"]["tokens_limit"], TOKENS_PER_MINUTE);
    let total: u64 = (0..REPORTS).map(|i| tokens_of(i).0 + tokens_of(i).1).sum();
    assert_eq!(row["minute"]["tokens"], total, "{shown}");
    let cut: Vec<Value> = w
        .dirs
        .audit()
        .into_iter()
        .filter(|l| l["action"] == "quota_exhausted")
        .collect();
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert_eq!(cut[0]["detail"]["reason"], "token_quota_exhausted");
    assert_eq!(cut[0]["detail"]["kind"], "tokens");
    assert_eq!(cut[0]["detail"]["spent_tokens"], at);
    let text = w.metrics();
    assert!(
        text.contains(&format!(
            "tollgate_usage_reports_total{{outcome=\"accepted\"}} {REPORTS}"
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "tollgate_quota_exhausted_identities{plan=\"metered\",reason=\"token_quota_exhausted\"} 1"
        ),
        "{text}"
    );
    // The minute rolls: the tick's pass lifts the flag and the packets pass again (bounded
    // wait: at most a minute and a bit).
    let ends = cut[0]["detail"]["until_unix"].as_u64().expect("until");
    let deadline = Instant::now() + Duration::from_secs(75);
    while w.explain()["verdict"] != "pass" {
        assert!(
            Instant::now() < deadline,
            "the minute ({ends}) rolled, still cut off"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(passed_over(&w, id, Duration::from_millis(500)) > 50);
    assert!(w.dirs.audit().iter().any(|l| l["action"] == "quota_reset"));
}

#[test]
fn a_money_budget_ends_the_same_way_at_the_report_that_lands_on_it() {
    let _turn = serial();
    let cost = |i: usize| {
        let (p, c) = tokens_of(i);
        p * PROMPT_NANO + c * COMPLETION_NANO
    };
    // The budget is exactly what the first 700 reports cost: the 700th lands on it, which
    // is reached (>=), not one report later.
    let k = 699;
    let budget: u64 = (0..=k).map(cost).sum();
    let w = World::new(Plan {
        budget_per_minute: Some(format!(
            "{}.{:09}",
            budget / 1_000_000_000,
            budget % 1_000_000_000
        )),
        ..Plan::new("metered")
    });
    assert_eq!(crossing(cost, budget).0, k);
    let _agent = w.start();
    let id = w.dirs.identity_slot("metered");
    let _blast = w.blaster(200);
    early_in_a_minute();
    // By the client address: the identity its live binding names.
    let who = json!({"client": w.host(12).to_string()});
    for i in 0..k {
        let (p, c) = tokens_of(i);
        let r = w.report(who.clone(), p, c);
        assert!(
            r["ok"] == true && r["result"]["exhausted"].is_null(),
            "report {i}: {r}"
        );
    }
    assert_eq!(w.explain()["verdict"], "pass");
    assert!(passed_over(&w, id, Duration::from_millis(500)) > 50);
    let (p, c) = tokens_of(k);
    let r = w.report(who.clone(), p, c);
    assert_eq!(r["result"]["exhausted"], "budget_exhausted", "{r}");
    assert_eq!(r["result"]["minute_money_nano"], budget);
    let e = w.explain();
    assert_eq!(
        (&e["verdict"], &e["quota_reason"]),
        (&json!("drop"), &json!("budget_exhausted")),
        "{e}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(passed_over(&w, id, Duration::from_millis(600)), 0);
    let cut: Vec<Value> = w
        .dirs
        .audit()
        .into_iter()
        .filter(|l| l["action"] == "quota_exhausted")
        .collect();
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert_eq!(cut[0]["detail"]["reason"], "budget_exhausted");
    assert_eq!(cut[0]["detail"]["spent_money_nano"], budget);
    let shown = w.quota();
    assert_eq!(shown[0]["exhausted"], "budget_exhausted", "{shown}");
    assert_eq!(shown[0]["minute"]["money_limit_nano"], budget);
}

#[test]
fn reports_for_nobody_oversized_ones_and_ones_without_the_secret_are_refused_and_change_nothing() {
    let _turn = serial();
    let w = World::new(Plan {
        tokens_per_minute: Some(TOKENS_PER_MINUTE),
        ..Plan::new("metered")
    });
    let _agent = w.start();
    let _blast = w.blaster(100);
    early_in_a_minute();
    // Something spent, so that "unchanged" has figures to compare.
    assert_eq!(w.report(json!({"identity": "metered"}), 10, 20)["ok"], true);
    let quota_before = w.quota();
    let flags_before = w.explain();
    assert_eq!(flags_before["verdict"], "pass");

    let label = |r: &Value| r["error"]["label"].as_str().unwrap_or_default().to_owned();
    let r = w.report(json!({"identity": "nobody"}), 10, 20);
    assert_eq!(
        (r["ok"].as_bool(), label(&r)),
        (Some(false), "unknown_identity".into()),
        "{r}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("nobody"),
        "{r}"
    );
    // An address nobody is bound at, and a token id no binding holds.
    let r = w.report(json!({"client": w.host(99).to_string()}), 10, 20);
    assert_eq!(label(&r), "unknown_identity", "{r}");
    let r = w.report(json!({"token_id": "no-such-jti"}), 10, 20);
    assert_eq!(label(&r), "unknown_identity", "{r}");
    // Over max_report_bytes (4096) on the socket: a long model name.
    let big = json!({"verb": "usage", "who": {"identity": "metered"}, "model": "m".repeat(5000),
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1}});
    let r = w.socket(&big);
    assert_eq!(label(&r), "too_large", "{r}");
    let r = w.report(json!({"identity": "metered"}), 10_000_001, 1);
    assert_eq!(label(&r), "bad_report", "{r}");
    let r = w.socket(&json!({"verb": "usage", "who": {"identity": "metered"}, "model": "m",
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 5}}));
    assert_eq!(label(&r), "bad_report", "{r}");

    // HTTP: without the secret, with a wrong one, then with it for nobody and oversized.
    let body = json!({"who": {"identity": "metered"}, "model": "llama-3.1-8b",
                      "usage": {"prompt_tokens": 10000, "completion_tokens": 30000}})
    .to_string();
    let (status, r) = w.http(None, &body);
    assert_eq!(
        (status, r["error"].as_str()),
        (401, Some("no_secret")),
        "{r}"
    );
    let (status, r) = w.http(Some("not-the-secret-0123456789"), &body);
    assert_eq!(
        (status, r["error"].as_str()),
        (401, Some("bad_secret")),
        "{r}"
    );
    let nobody = body.replace("\"metered\"", "\"nobody\"");
    let (status, r) = w.http(Some(SECRET), &nobody);
    assert_eq!(
        (status, r["error"].as_str()),
        (404, Some("unknown_identity")),
        "{r}"
    );
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000));
    let (status, r) = w.http(Some(SECRET), &huge);
    assert_eq!(
        (status, r["error"].as_str()),
        (413, Some("too_large")),
        "{r}"
    );

    // Nothing of it counted, no flag set.
    assert_eq!(w.quota(), quota_before);
    let flags = w.explain();
    assert_eq!(
        (&flags["verdict"], &flags["reason"]),
        (&flags_before["verdict"], &flags_before["reason"])
    );
    assert!(
        !w.dirs
            .audit()
            .iter()
            .any(|l| l["action"] == "quota_exhausted")
    );
    let text = w.metrics();
    for (outcome, n) in [
        ("accepted", 1),
        ("unknown_identity", 4),
        ("too_large", 2),
        ("bad_report", 2),
        ("no_secret", 1),
        ("bad_secret", 1),
    ] {
        let line = format!("tollgate_usage_reports_total{{outcome=\"{outcome}\"}} {n}");
        assert!(text.contains(&line), "no {line} in:\n{text}");
    }
    // With the secret, the same report is taken: the listener works, and 40 000 tokens count.
    let (status, r) = w.http(Some(SECRET), &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["ok"]["minute_tokens"], 40_030, "{r}");
    assert_eq!(w.quota()[0]["minute"]["tokens"], 40_030);
    // The CLI sends the same control request.
    let out = w.dirs.cli_ok(&[
        "usage",
        "report",
        "--identity",
        "metered",
        "--model",
        "llama-3.1-8b",
        "--prompt",
        "5",
        "--completion",
        "5",
    ]);
    assert!(out.contains("minute_tokens=40040"), "{out}");
}
