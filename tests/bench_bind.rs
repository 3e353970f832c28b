//! `cargo xtask bench`, part three: from an HTTPS bind request to the first packet the kernel
//! admits. A client sends a TCP frame to the model port every 100 µs; an AF_PACKET socket on
//! the server's side of the veth sees only what XDP passed. Each try opens a TLS connection
//! from the client namespace, POSTs /v1/bind with a token, and waits for the first admitted
//! frame; then the binding is removed again (through the control socket).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    lab::NetNs,
    tokenlab::{BIND_PORT, MODEL_PORT, World},
};

const TRIES: usize = 50;

fn tls_config(ca_pem: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("ca") {
        roots.add(cert.expect("cert")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// One HTTPS POST /v1/bind; returns the HTTP status.
fn post_bind(cfg: &Arc<rustls::ClientConfig>, server: SocketAddr, token: &str) -> u16 {
    let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
    let conn = rustls::ClientConnection::new(Arc::clone(cfg), name).expect("tls");
    let tcp = TcpStream::connect_timeout(&server, Duration::from_secs(3)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = format!(
        "POST /v1/bind HTTP/1.1\r\nhost: {server}\r\nauthorization: Bearer {token}\r\ncontent-length: 0\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).expect("request");
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Receives every frame XDP passed on `ifname` and keeps the arrival time of those from
/// `src` to the model port.
fn capture(
    ns: &NetNs,
    ifname: &str,
    src: [u8; 4],
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Instant>>>,
) -> std::thread::JoinHandle<()> {
    let ifname = ifname.to_owned();
    ns.spawn(move || {
        let c = std::ffi::CString::new(ifname).expect("ifname");
        // SAFETY: plain socket syscalls on a socket this thread owns; buffers are local and
        // sized as passed.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            );
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = libc::if_nametoindex(c.as_ptr()) as i32;
            assert_eq!(
                libc::bind(
                    fd,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32
                ),
                0
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n < 38 {
                    continue;
                }
                let f = &buf[..n as usize];
                let at = Instant::now();
                if f[12..14] == [0x08, 0x00]
                    && f[23] == 6
                    && f[26..30] == src
                    && f[36..38] == MODEL_PORT.to_be_bytes()
                {
                    seen.lock().expect("lock").push(at);
                }
            }
            libc::close(fd);
        }
    })
}

fn main() {
    let w = World::new(None);
    let _agent = w.start();
    let token = w.issue("bench", "10m", "tok-bench");
    let cfg = tls_config(&w.ca);
    let server = SocketAddr::new(IpAddr::V4(w.lab.server_v4), BIND_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let cap = capture(
        &w.lab.server,
        &w.lab.server_if,
        w.lab.client_v4.octets(),
        Arc::clone(&stop),
        Arc::clone(&seen),
    );
    // The probe: one TCP frame to the model port every 100 µs, raw, so nothing but XDP
    // decides whether it gets through.
    let frame = PacketBuilder::v4(w.lab.client_v4.octets(), w.lab.server_v4.octets())
        .tcp(40001, MODEL_PORT)
        .build();
    let send_stop = Arc::clone(&stop);
    let client_if = w.lab.client_if.clone();
    let sender = w.lab.client.spawn(move || {
        let c = std::ffi::CString::new(client_if).expect("ifname");
        // SAFETY: as in `capture`.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = libc::if_nametoindex(c.as_ptr()) as i32;
            addr.sll_halen = 6;
            let start = Instant::now();
            let mut i = 0u32;
            while !send_stop.load(Ordering::Relaxed) {
                let deadline = start + Duration::from_micros(100) * i;
                while Instant::now() < deadline {
                    std::hint::spin_loop();
                }
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                i += 1;
            }
            libc::close(fd);
        }
    });
    let addr = w.lab.client_v4.to_string();
    let mut latencies = Vec::new();
    for _ in 0..TRIES {
        std::thread::sleep(Duration::from_millis(60));
        let t0 = Instant::now();
        let status = w.lab.client.run(|| post_bind(&cfg, server, &token));
        assert_eq!(status, 200, "bind failed");
        let deadline = Instant::now() + Duration::from_secs(2);
        let first = loop {
            if let Some(t) = seen.lock().expect("lock").iter().find(|t| **t >= t0) {
                break *t;
            }
            assert!(
                Instant::now() < deadline,
                "no packet admitted after the bind"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        latencies.push((first - t0).as_secs_f64() * 1e3);
        w.dirs.cli_ok(&["unbind", &addr]);
        // Frames admitted before the unbind took effect must not count for the next try.
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let _ = cap.join();
    latencies.sort_by(f64::total_cmp);
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "| HTTPS bind request → first packet admitted ({TRIES} tries, probe every 100 µs) | p50 (ms) | p99 (ms) |"
    );
    println!("|---|---:|---:|");
    println!(
        "| TCP connect + TLS handshake + POST /v1/bind + first admitted frame | {:.2} | {:.2} |",
        p(0.5),
        p(0.99)
    );
}
