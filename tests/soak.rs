//! A soak of the real agent (#12's suite): bind/unbind churn over every way in (the control
//! socket as the CLI speaks it, the CLI itself, gateway token binds, HTTPS token binds on the
//! bind listener) while a spoofed flood runs, and the agent's resident memory and descriptors
//! watched from /proc. After a warm-up its VmRSS may grow by at most 10%, and once the churn
//! stops its descriptor count must come back to where it was: a per-bind leak of either shows
//! within the default run's half a minute.
//!
//! `TOLLGATE_LONG=1` churns for ten minutes instead of about twenty seconds.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use tollgate::control::{
    client::call,
    protocol::{Request, Response},
};
use tollgate_common::{
    packet::PacketBuilder,
    token::{ClaimNames, NewToken, SigningKey, issue},
};
use tollgate_tests::{
    agent::{Agent, AgentDirs},
    config::{Config, Controller, Endpoint, Identity, Plan},
    exhaust::{connect_from, post_bind, tls_client},
    flood::{Flood, V4_SRC_OFFSET, XorShift, random_v4},
    lab::Lab,
    node::host4,
    tokenlab::{AUDIENCE, BIND_CLASSES, BIND_PORT, MODEL_PORT, TokenKit},
};

const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Socket binds after the warm-up: enough that a leak of 8 KiB per bind (2.4 MiB, the 10% of
/// an agent of about 24 MiB), or of one descriptor, shows.
const MIN_BINDS: u64 = 300;

/// The agent's resident set, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// How many descriptors the agent holds open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/<pid>/fd")
        .count()
}

fn ok(socket: &Path, req: &Request) -> serde_json::Value {
    match call(socket, req, CALL_LIMIT) {
        Ok(Response {
            ok: true, result, ..
        }) => result.unwrap_or_default(),
        other => panic!("{req:?}: {other:?}"),
    }
}

/// Signs a token in-process (what `tollgate token issue` does), so the churn is not paced by
/// process starts.
struct Issuer {
    key: SigningKey,
    serial: u64,
}

impl Issuer {
    fn new(kit: &TokenKit) -> Issuer {
        let text = std::fs::read_to_string(kit.keys.join("k1.key.json")).expect("key");
        Issuer {
            key: SigningKey::from_file_json(&text).expect("signing key"),
            serial: 0,
        }
    }

    fn token(&mut self, identity: &str) -> String {
        self.serial += 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs();
        let jti = format!("soak-{}", self.serial);
        let t = NewToken {
            jti: &jti,
            identity,
            class: Some("customer"),
            plan: Some("customer"),
            roles: &[],
            audience: AUDIENCE,
            iat: now,
            nbf: Some(now),
            exp: now + 300,
        };
        issue(&self.key, &t, &ClaimNames::default()).expect("issue")
    }
}

#[test]
fn churn_and_flood_leak_neither_memory_nor_descriptors() {
    tollgate_tests::require_root();
    let long = std::env::var_os("TOLLGATE_LONG").is_some();
    let (warm_up, soak) = if long {
        (Duration::from_secs(30), Duration::from_secs(600))
    } else {
        (Duration::from_secs(6), Duration::from_secs(16))
    };
    let soak_limit = soak + Duration::from_secs(24);
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let kit = TokenKit::new(&dirs, lab.server_v4);
    let bind_addr = SocketAddr::new(IpAddr::V4(lab.server_v4), BIND_PORT);
    let config = Config::new(&[&lab.server_if])
        .controller(Controller::no_gpu())
        // Room for the HTTPS binds' handshakes from the client's /24.
        .anonymous(2000, 4000)
        .listen_bind(bind_addr)
        .tokens(kit.tokens())
        .plan(Plan::new("customer").packets(1000, 1000))
        .endpoint(Endpoint::tcp("model", MODEL_PORT, &["customer"]))
        .endpoint(Endpoint::tcp("bind", BIND_PORT, &BIND_CLASSES).anonymous())
        .identity(Identity::new(
            "churner",
            "customer",
            "customer",
            &[host4(&lab, 10)],
        ))
        .write(&dirs.state_dir.join("tollgate.toml"));
    let agent = Agent::launch(
        &lab.server,
        &dirs,
        &[
            "--config",
            config.to_str().expect("utf-8"),
            "--mode",
            "native",
        ],
    );
    let pid = agent.pid();

    // A spoofed flood throughout, half to the model port (unbound), half to the bind port
    // (anonymous: a new per-prefix limiter entry for most frames).
    let mut rng = XorShift::new(0x50a6);
    let template = PacketBuilder::v4(random_v4(&mut rng).octets(), lab.server_v4.octets())
        .tcp(40000, MODEL_PORT)
        .payload(20)
        .build();
    let flood = Flood::start(
        &lab.client,
        &lab.client_if,
        template,
        None,
        Some(20_000),
        move |i, f| {
            f[V4_SRC_OFFSET..V4_SRC_OFFSET + 4].copy_from_slice(&random_v4(&mut rng).octets());
            let port = if i.is_multiple_of(2) {
                MODEL_PORT
            } else {
                BIND_PORT
            };
            // TCP destination port: after the 20-byte IPv4 header and the source port.
            f[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&port.to_be_bytes());
        },
    );

    let mut issuer = Issuer::new(&kit);
    let tls = tls_client(&kit.ca);
    let s = lab.client_v6.segments();
    let v6 = |i: u64| Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0x5eed, (i % 4096) as u16 + 1);
    let o = lab.client_v4.octets();
    let v4 = |i: u64| IpAddr::from([o[0], o[1], o[2], 100 + (i % 100) as u8]);
    let mut counts = [0u64; 4];
    let mut round = |i: u64, counts: &mut [u64; 4]| {
        // The control socket, as the CLI speaks it: a run-time bind and its unbind.
        let target = if i.is_multiple_of(2) {
            v4(i)
        } else {
            IpAddr::V6(v6(i))
        }
        .to_string();
        ok(
            &dirs.socket,
            &Request::Bind {
                target: target.clone(),
                identity: "churner".into(),
                for_secs: Some(3600),
            },
        );
        ok(&dirs.socket, &Request::Unbind { target });
        counts[0] += 1;
        // A gateway token bind (a new token identity now and then) and its unbind.
        if i.is_multiple_of(4) {
            let addr = IpAddr::V6(v6(i + 2048));
            let token = issuer.token(&format!("tok-{}", i % 5));
            ok(&dirs.socket, &Request::BindToken { token, addr });
            ok(
                &dirs.socket,
                &Request::Unbind {
                    target: addr.to_string(),
                },
            );
            counts[1] += 1;
        }
        // An HTTPS bind on the listener from the client's own address, and its unbind.
        if i.is_multiple_of(10) {
            let token = issuer.token("tok-https");
            let src = IpAddr::V4(lab.client_v4);
            let tcp = lab
                .client
                .run(|| connect_from(src, bind_addr, Duration::from_secs(5)))
                .expect("connecting to the bind listener");
            let code = post_bind(&tls, tcp, IpAddr::V4(lab.server_v4), &token);
            assert_eq!(code, 200, "HTTPS bind {i}");
            ok(
                &dirs.socket,
                &Request::Unbind {
                    target: src.to_string(),
                },
            );
            counts[2] += 1;
        }
        // The CLI itself, now and then (a process start each).
        if i.is_multiple_of(50) {
            let target = host4(&lab, 250).to_string();
            dirs.cli_ok(&["bind", &target, "--identity", "churner", "--for", "10m"]);
            dirs.cli_ok(&["unbind", &target]);
            counts[3] += 1;
        }
    };

    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < warm_up {
        round(i, &mut counts);
        i += 1;
    }
    let warm_counts = counts;
    let rss0 = vm_rss_kib(pid);
    let fds0 = open_fds(pid);
    let mut peak = rss0;
    let mut samples = Vec::new();
    let soak_start = Instant::now();
    let mut next_sample = Instant::now();
    // At least `soak`, and on until enough binds for a leak to show (each bind is a state save
    // with fsyncs, so a busy disk sets the pace), at most `soak_limit`.
    while soak_start.elapsed() < soak
        || (counts[0] - warm_counts[0] < MIN_BINDS && soak_start.elapsed() < soak_limit)
    {
        round(i, &mut counts);
        i += 1;
        if Instant::now() >= next_sample {
            let rss = vm_rss_kib(pid);
            peak = peak.max(rss);
            samples.push((soak_start.elapsed().as_secs(), rss, open_fds(pid)));
            next_sample += Duration::from_secs(if long { 10 } else { 1 });
        }
    }
    let churned = soak_start.elapsed();
    let flood = flood.stop();
    // Connections the agent has just closed, a state save in flight: give them a moment.
    let mut fds1 = open_fds(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds1 > fds0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        fds1 = open_fds(pid);
    }
    let rss1 = vm_rss_kib(pid);
    let status: serde_json::Value =
        serde_json::from_str(&dirs.cli_ok(&["status", "--output", "json"])).expect("status");
    eprintln!(
        "{i} rounds ({} socket binds, {} gateway token binds, {} HTTPS binds, {} CLI binds; \
         {:.0} binds/s), {} flood frames; VmRSS {rss0} KiB after the warm-up, peak {peak}, \
         {rss1} at the end; descriptors {fds0} -> {fds1}; (s, rss, fds): {samples:?}",
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        (counts[0] + counts[1] + counts[2] + counts[3]) as f64 / (warm_up + churned).as_secs_f64(),
        flood.sent
    );

    let mut failures = Vec::new();
    let soaked = counts[0] - warm_counts[0];
    if soaked < MIN_BINDS {
        failures.push(format!(
            "only {soaked} socket binds after the warm-up (at least {MIN_BINDS} were wanted): \
             too few for a leak to show"
        ));
    }
    if rss1 as f64 > rss0 as f64 * 1.10 {
        failures.push(format!(
            "VmRSS grew from {rss0} KiB after the warm-up to {rss1} KiB (> 10%) over {} binds",
            counts.iter().sum::<u64>() - warm_counts.iter().sum::<u64>()
        ));
    }
    if fds1 > fds0 {
        failures.push(format!(
            "the agent held {fds0} descriptors after the warm-up and {fds1} after the churn"
        ));
    }
    // Everything churned is gone again: only the static binding is left.
    if status["bindings"] != 1 {
        failures.push(format!(
            "{} bindings left after the churn",
            status["bindings"]
        ));
    }
    drop(agent);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
