//! `cargo xtask bench`, part two: how long after `tollgate quarantine` returns does the
//! kernel drop the identity's packets? A client sends numbered UDP datagrams every 100 µs
//! through the lab; the server records which arrive; each of 100 tries quarantines the
//! client with the real CLI and finds the first datagram sent after the command started that
//! never arrived. Negative figures mean the kernel was already dropping before the command
//! returned (the agent sets the kernel flag before it answers).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::{Agent, AgentDirs},
    config::{Config, Endpoint, Identity, Plan},
    lab::Lab,
};

const TRIES: usize = 100;
const PORT: u16 = 7000;
const INTERVAL: Duration = Duration::from_micros(100);

fn main() {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let config = Config::new(&[&lab.server_if])
        .plan(Plan::new("internal"))
        .endpoint(Endpoint::udp("probe", PORT, &["internal"]))
        .identity(Identity::new(
            "client",
            "internal",
            "internal",
            &[lab.client_v4],
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

    let server_addr = SocketAddr::new(IpAddr::V4(lab.server_v4), PORT);
    let receiver = lab
        .server
        .run(|| UdpSocket::bind(server_addr).expect("server socket"));
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let client_addr = SocketAddr::new(IpAddr::V4(lab.client_v4), 0);
    let sender = lab.client.run(|| {
        let s = UdpSocket::bind(client_addr).expect("client socket");
        s.connect(server_addr).expect("connect");
        s
    });

    let stop = Arc::new(AtomicBool::new(false));
    let recv_stop = Arc::clone(&stop);
    let recv = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !recv_stop.load(Ordering::Relaxed) {
            if let Ok(8) = receiver.recv(&mut buf) {
                got.push(u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")));
            }
        }
        got
    });
    let send_stop = Arc::clone(&stop);
    let send = std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = Vec::new();
        let mut seq = 0u64;
        while !send_stop.load(Ordering::Relaxed) {
            let deadline = start + INTERVAL * seq as u32;
            while Instant::now() < deadline {
                std::hint::spin_loop();
            }
            let _ = sender.send(&seq.to_le_bytes());
            sent.push(Instant::now());
            seq += 1;
        }
        sent
    });

    let mut tries = Vec::new();
    for _ in 0..TRIES {
        std::thread::sleep(Duration::from_millis(40));
        let t0 = Instant::now();
        dirs.cli_ok(&["quarantine", "client", "--reason", "bench"]);
        let t_ret = Instant::now();
        std::thread::sleep(Duration::from_millis(40));
        dirs.cli_ok(&["release", "client", "--reason", "bench"]);
        tries.push((t0, t_ret));
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let sent = send.join().expect("sender");
    let mut got = recv.join().expect("receiver");
    got.sort_unstable();

    let arrived = |seq: usize| got.binary_search(&(seq as u64)).is_ok();
    let mut from_return = Vec::new();
    let mut from_start = Vec::new();
    for (t0, t_ret) in &tries {
        let first = sent.partition_point(|t| t < t0);
        let Some(dropped) = (first..sent.len()).find(|s| !arrived(*s)) else {
            panic!("no datagram was dropped after a quarantine");
        };
        let at = sent[dropped];
        let signed = |a: Instant, b: Instant| {
            if a >= b {
                (a - b).as_secs_f64() * 1e3
            } else {
                -((b - a).as_secs_f64() * 1e3)
            }
        };
        from_return.push(signed(at, *t_ret));
        from_start.push(signed(at, *t0));
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    println!(
        "| quarantine → first dropped datagram ({TRIES} tries, one every {} µs) | p50 (ms) | p99 (ms) |",
        INTERVAL.as_micros()
    );
    println!("|---|---:|---:|");
    println!(
        "| from `tollgate quarantine` returning | {:.2} | {:.2} |",
        pct(&mut from_return, 0.5),
        pct(&mut from_return, 0.99)
    );
    println!(
        "| from `tollgate quarantine` starting | {:.2} | {:.2} |",
        pct(&mut from_start, 0.5),
        pct(&mut from_start, 0.99)
    );
}
