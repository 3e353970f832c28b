//! The demo's traffic: streaming completions requests from each client at a steady pace, and
//! the attacker's SYN frames.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::lab::NetNs;

use crate::{
    HARD_LIMIT, PHASE, running,
    world::{ATTACKER, World},
};

pub const REQUESTS_PER_SECOND: u32 = 16;
pub const ATTACKER_REQUESTS_PER_SECOND: u32 = 2;
pub const FLOOD_MODEL_PPS: u32 = 20_000;
pub const FLOOD_BIND_PPS: u32 = 500;
/// Requests one client has in flight at most.
const MAX_IN_FLIGHT: usize = 8;

/// Requests completed and failed per phase, for one client.
#[derive(Default)]
pub struct Tally {
    pub ok: [AtomicU64; 3],
    pub failed: [AtomicU64; 3],
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
pub fn client_loop(
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

/// The interface's MAC address in `ns`.
pub fn mac(ns: &NetNs, ifname: &str) -> anyhow::Result<[u8; 6]> {
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
pub fn syn_frame(w: &World, port: u16, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = PacketBuilder::v4(w.client_v4(ATTACKER).octets(), w.lab.server_v4.octets())
        .tcp(41000, port)
        .build();
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f
}
