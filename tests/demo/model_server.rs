//! The model server stand-in on the GPU node: an OpenAI-style `POST /v1/completions` that
//! streams tokens as server-sent events.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tollgate_tests::{lab::NetNs, tokenlab::MODEL_PORT};

use crate::{HARD_LIMIT, running};

pub const CHUNKS: usize = 20;
const CHUNK_GAP: Duration = Duration::from_millis(3);
const MAX_CONNECTIONS: usize = 64;

/// The model server stand-in: `POST /v1/completions` streams `CHUNKS` server-sent events
/// (`text/event-stream`), then `data: [DONE]`. One thread per connection, at most
/// `MAX_CONNECTIONS` at a time. Counts completed streams per peer address.
pub struct ModelServer {
    thread: Option<JoinHandle<()>>,
    served: Arc<Mutex<BTreeMap<IpAddr, u64>>>,
}

impl ModelServer {
    pub fn start(server: &NetNs) -> anyhow::Result<ModelServer> {
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

    pub fn served_to(&self, addr: Ipv4Addr) -> u64 {
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
