//! `cargo xtask bench`, part four: how long one `/metrics` scrape takes with 10 000 bound
//! identities that all sent traffic (target: under 100 ms), and how many series it has.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{Agent, AgentDirs},
    config::{Config, Controller, Endpoint, Plan},
    frames::send_frames,
    lab::Lab,
};

const IDENTITIES: u32 = 10_000;
const SCRAPES: usize = 21;

fn main() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let addr = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 128, 0)) + i);
    let config = Config::new(&[&lab.server_if])
        .listen_metrics("127.0.0.1:9464")
        .controller(Controller::no_gpu())
        .top_k(10)
        .plan(Plan::new("customer").packets(100, 10))
        .endpoint(Endpoint::udp("model", 7000, &["customer"]))
        .numbered_identities(IDENTITIES, "customer", "customer", addr)
        .write(&dirs.state_dir.join("tollgate.toml"));
    let _agent = Agent::native(&lab.server, &dirs, &config);
    let frames: Vec<Vec<u8>> = (0..IDENTITIES)
        .map(|i| {
            PacketBuilder::v4(addr(i).octets(), lab.server_v4.octets())
                .udp(4000, 7000)
                .build()
        })
        .collect();
    for chunk in frames.chunks(2000) {
        send_frames(&lab.client, &lab.client_if, chunk);
    }
    std::thread::sleep(Duration::from_millis(500));
    let target: SocketAddr = "127.0.0.1:9464".parse().expect("addr");
    let mut times = Vec::new();
    let mut series = 0;
    for _ in 0..SCRAPES {
        let (t, body) = lab.server.run(move || {
            let t = Instant::now();
            let mut s = TcpStream::connect(target).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .expect("request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("response");
            (t.elapsed(), out)
        });
        series = body.lines().filter(|l| l.starts_with("tollgate_")).count();
        times.push(t.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(100));
    }
    times.sort_by(f64::total_cmp);
    println!(
        "| /metrics scrape, {IDENTITIES} bound identities that sent traffic ({SCRAPES} scrapes) | p50 (ms) | max (ms) | series |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| GET /metrics over TCP, whole response | {:.1} | {:.1} | {series} |",
        times[SCRAPES / 2],
        times[SCRAPES - 1]
    );
}
