//! `/metrics` end to end: a real Prometheus server scrapes the agent in a namespace lab and
//! its stored drop counters match the kernel's; promtool checks a scrape and the alert rules;
//! 10 000 identities keep per-identity series bounded; no token or key ever shows.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{Agent, AgentDirs},
    config::{Config, Controller, Endpoint, Identity, Plan},
    frames::send_frames,
    lab::{Lab, NetNs},
    tokenlab,
};

const METRICS: &str = "127.0.0.1:9464";

fn host(lab: &Lab, n: u8) -> [u8; 4] {
    let o = lab.client_v4.octets();
    [o[0], o[1], o[2], n]
}

/// A plain HTTP GET from inside `ns`; returns the body.
fn http_get(ns: &NetNs, addr: SocketAddr, path: &str) -> String {
    let path = path.to_owned();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
        )
        .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
        // Chunked encoding (Prometheus' API): keep only the JSON.
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            let mut json = String::new();
            let mut rest = body;
            while let Some((len, tail)) = rest.split_once("\r\n") {
                let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
                if n == 0 {
                    break;
                }
                json.push_str(&tail[..n]);
                rest = &tail[n + 2..];
            }
            return json;
        }
        body.to_owned()
    })
}

fn scrape(lab: &Lab) -> String {
    http_get(&lab.server, METRICS.parse().expect("addr"), "/metrics")
}

/// Metrics on [`METRICS`], no GPU source, plan `customer` (100 packets/s, burst 10) and an
/// endpoint on UDP 7000; `more` adds what a test needs.
fn write_config(dirs: &AgentDirs, lab: &Lab, more: impl FnOnce(Config) -> Config) -> PathBuf {
    let config = Config::new(&[&lab.server_if])
        .listen_metrics(METRICS)
        .controller(Controller::no_gpu())
        .plan(Plan::new("customer").packets(100, 10))
        .endpoint(Endpoint::udp("model", 7000, &["customer"]));
    more(config).write(&dirs.state_dir.join("tollgate.toml"))
}

fn start(lab: &Lab, dirs: &AgentDirs, config: &Path) -> Agent {
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

fn frame(src: [u8; 4], dst: Ipv4Addr, port: u16) -> Vec<u8> {
    PacketBuilder::v4(src, dst.octets())
        .udp(40000, port)
        .payload(60)
        .build()
}

/// Prometheus in the server namespace, scraping the agent every second; killed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    fn start(ns: &NetNs, dir: &Path) -> Prometheus {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tollgate\n    static_configs:\n      - targets: ['{METRICS}']\n"
            ),
        )
        .expect("prometheus.yml");
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:19090")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`, installed by cargo xtask setup)");
        // Ready when `/-/ready` says 200 (bounded): its port answers earlier, with 503 to
        // queries while the TSDB is still starting.
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr: SocketAddr = "127.0.0.1:19090".parse().expect("addr");
        let ready = move || -> Option<bool> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(
                s,
                "GET /-/ready HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
            )
            .ok()?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).ok()?;
            Some(&head == b"HTTP/1.1 200")
        };
        while ns.run(ready) != Some(true) {
            assert!(Instant::now() < deadline, "Prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        Prometheus { child, dir }
    }

    /// An instant query; returns the result vector as (labels, value).
    fn query(&self, ns: &NetNs, q: &str) -> Vec<(serde_json::Value, f64)> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = http_get(
            ns,
            "127.0.0.1:19090".parse().expect("addr"),
            &format!("/api/v1/query?query={enc}"),
        );
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        v["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_stores_the_drop_counters_the_kernel_has() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let bound = IpAddr::from(host(&lab, 10));
    let config = write_config(&dirs, &lab, |c| {
        c.identity(Identity::new("acme", "customer", "customer", &[bound]))
    });
    let _agent = start(&lab, &dirs, &config);
    let prom = Prometheus::start(&lab.server, &dirs.state_dir);
    // Drops of three kinds and some passes: unbound, over the rate, truncated.
    let mut frames = Vec::new();
    for _ in 0..40 {
        frames.push(frame(host(&lab, 99), lab.server_v4, 7000));
        frames.push(frame(host(&lab, 10), lab.server_v4, 7000));
    }
    let mut cut = frame(host(&lab, 98), lab.server_v4, 7000);
    cut.truncate(30);
    frames.extend(std::iter::repeat_n(cut, 7));
    send_frames(&lab.client, &lab.client_if, &frames);
    // Wait until Prometheus has scraped the settled counters.
    let kernel: Vec<(String, u64)> =
        tollgate::counter_read::reason_totals_from_pin(&dirs.counters_pin())
            .expect("counters")
            .into_iter()
            .filter(|(r, c)| r.verdict() == tollgate_common::Verdict::Drop && c.packets > 0)
            .map(|(r, c)| (r.label().to_owned(), c.packets))
            .collect();
    assert!(kernel.len() >= 3, "{kernel:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = prom.query(
            &lab.server,
            "sum by (reason) (tollgate_packets_total{verdict=\"drop\"})",
        );
        let got: Vec<(String, u64)> = kernel
            .iter()
            .map(|(reason, _)| {
                let v = stored
                    .iter()
                    .find(|(m, _)| m["reason"] == reason.as_str())
                    .map_or(-1.0, |(_, v)| *v);
                (reason.clone(), v as u64)
            })
            .collect();
        if got == kernel {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has {got:?}, the kernel {kernel:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut c = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    if let Some(text) = stdin {
        c.stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
    }
    drop(c.stdin.take());
    c.wait_with_output().expect("promtool")
}

#[test]
fn promtool_accepts_a_scrape_and_the_alert_rules() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let config = write_config(&dirs, &lab, |c| c);
    let _agent = start(&lab, &dirs, &config);
    send_frames(
        &lab.client,
        &lab.client_if,
        &[frame(host(&lab, 99), lab.server_v4, 7000)],
    );
    let text = scrape(&lab);
    assert!(text.contains("tollgate_packets_total{"), "{text}");
    // The egress and flow families are in every scrape, the endpoint counters at zero before
    // anything went out, and promtool reads them (the TTFB histogram's format included).
    for family in [
        "tollgate_egress_bytes_total{endpoint=",
        "tollgate_response_bytes_total{endpoint=",
        "tollgate_flows_total{event=\"created\"}",
        "# TYPE tollgate_ttfb_seconds histogram",
        "tollgate_flows_tracked ",
        "tollgate_flows_capacity ",
    ] {
        assert!(text.contains(family), "no {family} in:\n{text}");
    }
    let out = promtool(&["check", "metrics"], Some(&text));
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .join("deploy/prometheus");
    for args in [
        vec![
            "check",
            "rules",
            root.join("alerts.yml").to_str().expect("path"),
        ],
        vec![
            "test",
            "rules",
            root.join("alerts_test.yml").to_str().expect("path"),
        ],
    ] {
        let out = promtool(&args, None);
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn ten_thousand_identities_keep_per_identity_series_bounded() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    // 10 000 identities bound in 198.18.0.0/15 outside the lab's /24s: traffic from each,
    // sent as raw frames.
    let addr = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 128, 0)) + i);
    let config = write_config(&dirs, &lab, |c| {
        (0..10_000u32).fold(c.top_k(10), |c, i| {
            c.identity(Identity::new(
                &format!("id{i}"),
                "customer",
                "customer",
                &[addr(i)],
            ))
        })
    });
    let _agent = start(&lab, &dirs, &config);
    let frames: Vec<Vec<u8>> = (0..10_000u32)
        .map(|i| frame(addr(i).octets(), lab.server_v4, 7000))
        .collect();
    for chunk in frames.chunks(2000) {
        send_frames(&lab.client, &lab.client_if, chunk);
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let text = scrape(&lab);
    let took = t.elapsed();
    eprintln!(
        "scrape with 10000 identities: {:.1} ms, {} bytes",
        took.as_secs_f64() * 1e3,
        text.len()
    );
    let series = |family: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .count()
    };
    assert!(series("tollgate_top_identity_packets_total") <= 20);
    assert!(series("tollgate_top_identity_bytes_total") <= 20);
    assert!(
        series("tollgate_top_identity_packets_total") >= 10,
        "top-K missing"
    );
    // No other family is labelled by identity, and no address appears anywhere.
    let labelled: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("identity=\"") && !l.starts_with("tollgate_top_identity_"))
        .collect();
    assert!(labelled.is_empty(), "{labelled:?}");
    assert!(
        !text.contains("198.19.128."),
        "an address leaked into the scrape"
    );
    let total: usize = text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(total < 2000, "{total} series with 10 000 identities");
    assert_eq!(
        text.lines().find(|l| l.starts_with("tollgate_identities ")),
        Some("tollgate_identities 10000.0")
    );
}

#[test]
fn metrics_logs_and_audit_never_contain_a_token_or_a_key() {
    let w = tokenlab::World::new(None);
    let agent = w.start();
    let token = w.issue("secretive", "5m", "tok-secrets");
    assert_eq!(w.http(&w.lab.client, "POST", &token).0, 200);
    // A refused one too (tampered): refusals are logged and audited.
    // A different character well inside the signature (the last one carries padding bits).
    let mut chars: Vec<char> = token.chars().collect();
    let at = chars.len() - 10;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    let bad: String = chars.into_iter().collect();
    w.http(&w.lab.client, "POST", &bad);
    let text = scrape(&w.lab);
    assert!(
        text.contains("tollgate_token_verifications_total{result=\"ok\"} 1"),
        "{text}"
    );
    let key_file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.keys.join("k1.key.json")).expect("key"))
            .expect("json");
    let pkcs8 = key_file["pkcs8"].as_str().expect("pkcs8").to_owned();
    let sig = token.rsplit('.').next().expect("signature").to_owned();
    let payload = token.split('.').nth(1).expect("payload").to_owned();
    let logs = agent.stop().stderr;
    let audit = std::fs::read_to_string(w.dirs.state_dir.join("audit.log")).expect("audit");
    for (what, haystack) in [("metrics", &text), ("logs", &logs), ("audit log", &audit)] {
        for (secret, needle) in [
            ("token", &token),
            ("signature", &sig),
            ("claims", &payload),
            ("private key", &pkcs8),
            ("tampered token", &bad),
        ] {
            assert!(
                !haystack.contains(needle.as_str()),
                "the {what} contain the {secret}"
            );
        }
    }
}
