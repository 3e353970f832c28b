//! A model-server stand-in whose load metrics follow its real in-flight requests (#17), and
//! the closed-loop clients that load it.
//!
//! [`ModelServer`] serves inference requests (plain HTTP/1.1 `POST`, one per connection) with
//! a fixed batch of `slots`: a request that finds every slot busy waits, counted in
//! `vllm:num_requests_waiting`, until one frees; a running one holds its slot for `service`,
//! counted in `vllm:num_requests_running`, and holds [`KV_PER_REQUEST`] of the KV cache
//! (`vllm:kv_cache_usage_perc`). Its `/metrics` (on a loopback port of the server namespace,
//! where the agent runs) is vLLM's exposition of those live numbers, or, by
//! [`MetricsMode`], a listener that hangs, answers garbage, or is gone.
//!
//! [`LoadGen`] runs `concurrency` clients from one address, each sending a request, reading
//! the answer and sending the next, over a fresh connection each time (so every request
//! starts with a SYN the XDP program judges). Every loop is bounded by the stop flag and by
//! socket timeouts.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::lab::NetNs;

/// How long a blocking call waits before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Share of the KV cache one running request holds.
pub const KV_PER_REQUEST: f64 = 0.2;
/// Connections served at once; more are closed at accept (the tests open far fewer).
const MAX_CONNECTIONS: usize = 256;

/// What `/metrics` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsMode {
    /// vLLM's exposition of the live queue, batch and KV cache.
    Live,
    /// Accepts and never answers.
    Hang,
    /// Answers 200 with an HTML error page.
    Garbage,
    /// The listener is closed: connections are refused.
    Gone,
}

#[derive(Default)]
struct Load {
    waiting: u32,
    running: u32,
}

struct Shared {
    load: Mutex<Load>,
    freed: Condvar,
    mode: Mutex<MetricsMode>,
    /// Each `/metrics` answered in Live mode: (unix ms, waiting it reported).
    scrapes: Mutex<Vec<(u64, u32)>>,
    stop: AtomicBool,
    served: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// The stand-in; dropping it stops its threads.
pub struct ModelServer {
    shared: Arc<Shared>,
    pub metrics_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl ModelServer {
    /// Serves inference on `addr` (in `ns`) with `slots` running at once, each for `service`;
    /// `/metrics` on `metrics_addr` (in `ns`).
    pub fn start(
        ns: &NetNs,
        addr: SocketAddr,
        metrics_addr: SocketAddr,
        slots: u32,
        service: Duration,
    ) -> ModelServer {
        let shared = Arc::new(Shared {
            load: Mutex::new(Load::default()),
            freed: Condvar::new(),
            mode: Mutex::new(MetricsMode::Live),
            scrapes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            served: AtomicU64::new(0),
        });
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .expect("bind inference");
        listener.set_nonblocking(true).expect("nonblocking");
        let s = Arc::clone(&shared);
        let inference = std::thread::spawn(move || accept_loop(&listener, &s, slots, service));
        let s = Arc::clone(&shared);
        // In the namespace for good: a listener closed for `Gone` is bound again there.
        let metrics = ns.spawn(move || metrics_loop(metrics_addr, &s));
        ModelServer {
            shared,
            metrics_addr,
            threads: vec![inference, metrics],
        }
    }

    pub fn set_mode(&self, mode: MetricsMode) {
        *lock(&self.shared.mode) = mode;
    }

    /// (waiting, running) now.
    pub fn load(&self) -> (u32, u32) {
        let l = lock(&self.shared.load);
        (l.waiting, l.running)
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Every Live `/metrics` answer so far: (unix ms, waiting reported).
    pub fn scrapes(&self) -> Vec<(u64, u32)> {
        lock(&self.shared.scrapes).clone()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.freed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, s: &Arc<Shared>, slots: u32, service: Duration) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                conns.retain(|h| !h.is_finished());
                if conns.len() >= MAX_CONNECTIONS {
                    continue;
                }
                let s = Arc::clone(s);
                conns.push(std::thread::spawn(move || {
                    serve_one(stream, &s, slots, service)
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

/// Reads a request head and its `content-length` body; `None` on a timeout or a close.
fn read_request(stream: &mut TcpStream, s: &Shared) -> Option<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if s.stop.load(Ordering::Relaxed) || std::time::Instant::now() > deadline {
            return None;
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(());
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    }
}

fn serve_one(mut stream: TcpStream, s: &Shared, slots: u32, service: Duration) {
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    if read_request(&mut stream, s).is_none() {
        return;
    }
    // Admission: wait for a slot, as a continuous-batching server's scheduler does.
    {
        let mut l = lock(&s.load);
        l.waiting += 1;
        while l.running >= slots && !s.stop.load(Ordering::Relaxed) {
            l = s
                .freed
                .wait_timeout(l, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        l.waiting -= 1;
        l.running += 1;
    }
    std::thread::sleep(service);
    {
        let mut l = lock(&s.load);
        l.running -= 1;
    }
    s.freed.notify_one();
    let body = r#"{"choices":[{"text":"ok"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.served.fetch_add(1, Ordering::Relaxed);
}

fn exposition(l: &Load) -> String {
    let labels = r#"{engine="0",model_name="stand-in"}"#;
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{labels} {}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{labels} {}.0\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{labels} {}\n",
        l.running,
        l.waiting,
        (f64::from(l.running) * KV_PER_REQUEST).min(1.0)
    )
}

fn metrics_loop(addr: SocketAddr, s: &Shared) {
    let mut listener: Option<TcpListener> = None;
    // Hanging connections are kept open until the mode changes.
    let mut hung: Vec<TcpStream> = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        let mode = *lock(&s.mode);
        if mode != MetricsMode::Hang {
            hung.clear();
        }
        if mode == MetricsMode::Gone {
            listener = None;
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if listener.is_none() {
            match TcpListener::bind(addr) {
                Ok(l) => {
                    l.set_nonblocking(true).expect("nonblocking");
                    listener = Some(l);
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let Some(l) = &listener else { continue };
        let Ok((mut stream, _)) = l.accept() else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(POLL));
        if read_request(&mut stream, s).is_none() {
            continue;
        }
        match mode {
            MetricsMode::Hang => hung.push(stream),
            MetricsMode::Garbage => {
                let body = "<html><body><h1>502 Bad Gateway</h1></body></html>";
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
            MetricsMode::Live | MetricsMode::Gone => {
                let (text, waiting) = {
                    let l = lock(&s.load);
                    (exposition(&l), l.waiting)
                };
                lock(&s.scrapes).push((now_ms(), waiting));
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n\r\n{text}",
                    text.len()
                );
            }
        }
    }
}

/// Closed-loop clients from one address; dropping it stops them.
pub struct LoadGen {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl LoadGen {
    pub fn start(ns: &NetNs, from: IpAddr, to: SocketAddr, concurrency: usize) -> LoadGen {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let threads = (0..concurrency)
            .map(|_| {
                let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
                ns.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if request(from, to).is_some() {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
            })
            .collect();
        LoadGen {
            stop,
            done,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One request over a fresh connection from `from`; `Some` when an answer came.
fn request(from: IpAddr, to: SocketAddr) -> Option<()> {
    let (mut stream, _) =
        crate::stream::connect_from(Some(from), to, Duration::from_secs(3)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let body = r#"{"model":"stand-in","prompt":"hello","max_tokens":3}"#;
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nhost: {to}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    answer.starts_with(b"HTTP/1.1 200").then_some(())
}
