//! A streaming model-server stand-in and its client, for the egress tests (#16): plain
//! HTTP/1.1 over TCP, so that every byte the server sends is one the egress program sees and
//! every byte the client's socket reads is counted on this side.
//!
//! [`StreamServer`] listens in the lab's server namespace and answers each `POST` (keep-alive,
//! any path) with headers and a `text/event-stream` body of [`Answer::body_bytes`], sent as
//! server-sent events in HTTP chunks, after waiting [`Answer::first_byte_delay`] (and, when
//! the test holds a [`Gate`], until the test opens it). It records what each connection read
//! while it reads, so a flow the agent cuts mid-request shows how far it got.
//!
//! [`StreamClient`] connects from a chosen client address, sends requests with bodies of a
//! given size and records what its socket read (headers and body, chunk framing included) and
//! when the first byte came.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::FromRawFd as _,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::lab::NetNs;

/// How long a connection thread blocks in one read before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// The longest a request head may be (a test's request is a few lines).
const MAX_HEAD: usize = 16 * 1024;
/// The longest the server waits on a closed [`Gate`] before giving up on the request, so a
/// test that panics with the gate shut cannot leave a thread behind for long.
const GATE_LIMIT: Duration = Duration::from_secs(120);

/// What the server answers each request with.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Bytes of the event-stream body (the events' text, without HTTP chunk framing).
    pub body_bytes: usize,
    /// Bytes of each server-sent event (the last one takes the remainder).
    pub event_bytes: usize,
    /// Time between the end of the request (the server has read all of it) and the first byte
    /// of the answer: the model's time to first token.
    pub first_byte_delay: Duration,
    /// Pause between events after the first (generation speed); zero streams as fast as TCP
    /// takes them.
    pub event_gap: Duration,
}

impl Answer {
    /// `body_bytes` in events of 4 KiB, at once.
    pub fn bytes(body_bytes: usize) -> Answer {
        Answer {
            body_bytes,
            event_bytes: 4096,
            first_byte_delay: Duration::ZERO,
            event_gap: Duration::ZERO,
        }
    }

    pub fn delay(mut self, first_byte_delay: Duration) -> Answer {
        self.first_byte_delay = first_byte_delay;
        self
    }
}

/// A door the server waits at before its first byte, until the test opens it: for a test that
/// must do something (restart the agent) between a request and its answer.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    pub fn open(&self) {
        let (open, cv) = &*self.0;
        *open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// Waits until open or `stop` is set, at most [`GATE_LIMIT`]; whether it opened.
    fn wait(&self, stop: &AtomicBool) -> bool {
        let (open, cv) = &*self.0;
        let deadline = Instant::now() + GATE_LIMIT;
        let mut guard = open.lock().unwrap_or_else(|p| p.into_inner());
        while !*guard && !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            guard = cv
                .wait_timeout(guard, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *guard
    }
}

/// What one accepted connection did, updated while it runs.
#[derive(Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// Bytes read from the client (request heads and bodies).
    pub read: AtomicU64,
    /// Requests read whole.
    pub requests: AtomicU64,
    /// Answers sent whole.
    pub answered: AtomicU64,
    /// Bytes written to the client.
    pub written: AtomicU64,
}

struct Shared {
    answer: Mutex<Answer>,
    gate: Mutex<Option<Gate>>,
    stop: AtomicBool,
    connections: Mutex<Vec<Arc<Connection>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The stand-in, listening on `addr` in the server namespace until dropped.
pub struct StreamServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl StreamServer {
    /// Listens on `addr` inside `ns` and answers every request with `answer`.
    pub fn start(ns: &NetNs, addr: SocketAddr, answer: Answer) -> StreamServer {
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listening on {addr} in {}: {e}", ns.name()));
        listener
            .set_nonblocking(true)
            .expect("a nonblocking listener");
        let shared = Arc::new(Shared {
            answer: Mutex::new(answer),
            gate: Mutex::new(None),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let record = Arc::new(Connection {
                            peer,
                            read: AtomicU64::new(0),
                            requests: AtomicU64::new(0),
                            answered: AtomicU64::new(0),
                            written: AtomicU64::new(0),
                        });
                        lock(&s.connections).push(Arc::clone(&record));
                        let shared = Arc::clone(&s);
                        let t = std::thread::spawn(move || serve(conn, &record, &shared));
                        lock(&s.threads).push(t);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        StreamServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// What later requests are answered with.
    pub fn set_answer(&self, answer: Answer) {
        *lock(&self.shared.answer) = answer;
    }

    /// Later answers wait for `gate` (or, with `None`, no longer wait) before their first
    /// byte.
    pub fn set_gate(&self, gate: Option<Gate>) {
        *lock(&self.shared.gate) = gate;
    }

    /// The connections accepted so far, in order.
    pub fn connections(&self) -> Vec<Arc<Connection>> {
        lock(&self.shared.connections).clone()
    }

    /// The connection from `peer`, once accepted (waits up to `limit`).
    pub fn connection_from(&self, peer: SocketAddr, limit: Duration) -> Arc<Connection> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(c) = self.connections().into_iter().find(|c| c.peer == peer) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "the server never accepted {peer}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves requests on one connection until the client closes it, an error, or the stop flag.
fn serve(mut s: TcpStream, record: &Connection, shared: &Shared) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(POLL));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(body_len) = read_request(&mut s, &mut buf, record, shared) else {
            return;
        };
        record.requests.fetch_add(1, Ordering::Relaxed);
        buf.drain(..body_len);
        let answer = lock(&shared.answer).clone();
        let gate = lock(&shared.gate).clone();
        std::thread::sleep(answer.first_byte_delay);
        if let Some(gate) = gate
            && !gate.wait(&shared.stop)
        {
            return;
        }
        if write_answer(&mut s, &answer, record, &shared.stop).is_err() {
            return;
        }
        record.answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads one request (head and `content-length` body) into `buf`; returns how many bytes of
/// `buf` it took, or `None` when the connection is done.
fn read_request(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    record: &Connection,
    shared: &Shared,
) -> Option<usize> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut fill = |s: &mut TcpStream, buf: &mut Vec<u8>| -> Option<()> {
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return None;
            }
            match s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => {
                    record.read.fetch_add(n as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&chunk[..n]);
                    return Some(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
    };
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        fill(s, buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("post ") {
        return None;
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        fill(s, buf)?;
    }
    Some(head_end + length)
}

/// The answer's headers, then its events as HTTP chunks, then the last chunk.
fn write_answer(
    s: &mut TcpStream,
    answer: &Answer,
    record: &Connection,
    stop: &AtomicBool,
) -> io::Result<()> {
    let put = |s: &mut TcpStream, bytes: &[u8]| -> io::Result<()> {
        s.write_all(bytes)?;
        record
            .written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    };
    put(
        s,
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          transfer-encoding: chunked\r\n\r\n",
    )?;
    for (i, event) in events(answer.body_bytes, answer.event_bytes).enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        if i > 0 && !answer.event_gap.is_zero() {
            std::thread::sleep(answer.event_gap);
        }
        let mut framed = format!("{:x}\r\n", event.len()).into_bytes();
        framed.extend_from_slice(&event);
        framed.extend_from_slice(b"\r\n");
        put(s, &framed)?;
    }
    put(s, b"0\r\n\r\n")
}

/// Server-sent events (`data: ...\n\n`) whose lengths add up to `total`, each `size` bytes
/// but the last (which also holds the remainder); the smallest event is `data: \n\n`.
fn events(total: usize, size: usize) -> impl Iterator<Item = Vec<u8>> {
    const FRAME: usize = b"data: \n\n".len();
    let size = size.max(FRAME + 1);
    let mut left = total;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        // Never leave a tail too short to be an event of its own.
        let n = if left < size + FRAME { left } else { size };
        left -= n;
        let mut e = b"data: ".to_vec();
        e.resize(n.saturating_sub(2).max(6), b'x');
        e.extend_from_slice(b"\n\n");
        e.truncate(n.max(FRAME));
        Some(e)
    })
}

/// One request and its answer, as the client saw them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Exchange {
    /// Request bytes the socket took (head and body); short of the whole request when a send
    /// timed out.
    pub sent: u64,
    /// Bytes the socket read for this answer (headers, chunk framing and events).
    pub received: u64,
    /// Whether the whole answer (up to its last chunk) came.
    pub complete: bool,
    /// From the request's last byte handed to the socket to the answer's first byte read.
    pub first_byte: Option<Duration>,
    /// From the request's last byte to the answer's end.
    pub total: Option<Duration>,
}

/// A keep-alive HTTP/1.1 client on one TCP connection.
pub struct StreamClient {
    stream: TcpStream,
    pub local: SocketAddr,
    /// How long `connect` took: one round trip (SYN, SYN-ACK) and the syscalls.
    pub connect_time: Duration,
    /// Bytes this connection's socket has read, over all exchanges.
    pub received: u64,
    buf: Vec<u8>,
    sent_at: Option<Instant>,
    pending_sent: u64,
}

impl StreamClient {
    /// Connects from `from` (an address of the client namespace; `None`: the kernel's choice)
    /// to `to`, inside `ns`, within `timeout`.
    pub fn connect(
        ns: &NetNs,
        from: Option<IpAddr>,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<StreamClient> {
        let (stream, connect_time) = ns.run(move || connect_from(from, to, timeout))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(StreamClient {
            local: stream.local_addr()?,
            stream,
            connect_time,
            received: 0,
            buf: Vec::new(),
            sent_at: None,
            pending_sent: 0,
        })
    }

    /// Sets how long one send or read may block.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))
    }

    /// Sends a `POST` whose body is `body_bytes` long. Returns the bytes the socket took;
    /// an error (a send timeout: the flow stalled) still leaves the count for
    /// [`StreamClient::receive`].
    pub fn send(&mut self, body_bytes: usize) -> io::Result<u64> {
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: model\r\ncontent-type: application/json\r\n\
             accept: text/event-stream\r\ncontent-length: {body_bytes}\r\n\r\n"
        );
        let mut request = head.into_bytes();
        request.resize(request.len() + body_bytes, b'p');
        self.pending_sent = 0;
        let mut rest = &request[..];
        while !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending_sent += n as u64;
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.sent_at = Some(Instant::now());
        Ok(self.pending_sent)
    }

    /// Reads one answer to the request [`StreamClient::send`] sent; a timeout or a closed
    /// connection gives an incomplete exchange.
    pub fn receive(&mut self) -> Exchange {
        let sent_at = self.sent_at.take().unwrap_or_else(Instant::now);
        let mut ex = Exchange {
            sent: self.pending_sent,
            ..Exchange::default()
        };
        let mut chunk = vec![0u8; 256 * 1024];
        let mut at = 0usize;
        // Parse as bytes arrive: the head, then chunks up to the last one.
        let mut state = Parse::Head;
        loop {
            if let Some(done) = state.advance(&self.buf, &mut at) {
                if done {
                    ex.complete = true;
                    ex.total = Some(sent_at.elapsed());
                    self.buf.drain(..at);
                    return ex;
                }
                continue;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return ex,
                Ok(n) => {
                    if ex.first_byte.is_none() {
                        ex.first_byte = Some(sent_at.elapsed());
                    }
                    ex.received += n as u64;
                    self.received += n as u64;
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// [`StreamClient::send`] then [`StreamClient::receive`].
    pub fn request(&mut self, body_bytes: usize) -> Exchange {
        match self.send(body_bytes) {
            Ok(_) => self.receive(),
            Err(_) => Exchange {
                sent: self.pending_sent,
                ..Exchange::default()
            },
        }
    }
}

/// Where the answer parser is.
#[derive(Clone, Copy)]
enum Parse {
    Head,
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes and its CRLF to come.
    Data(usize),
    /// After the last chunk: the final CRLF.
    Trailer,
}

impl Parse {
    /// Moves over what `buf[*at..]` holds: `Some(true)` at the answer's end, `Some(false)`
    /// after a step, `None` when it needs more bytes.
    fn advance(&mut self, buf: &[u8], at: &mut usize) -> Option<bool> {
        let rest = &buf[*at..];
        let line = |r: &[u8]| r.windows(2).position(|w| w == b"\r\n");
        match *self {
            Parse::Head => {
                let p = rest.windows(4).position(|w| w == b"\r\n\r\n")?;
                *at += p + 4;
                *self = Parse::Size;
            }
            Parse::Size => {
                let p = line(rest)?;
                let text = String::from_utf8_lossy(&rest[..p]);
                let n = usize::from_str_radix(text.trim(), 16).unwrap_or(0);
                *at += p + 2;
                *self = if n == 0 {
                    Parse::Trailer
                } else {
                    Parse::Data(n)
                };
            }
            Parse::Data(n) => {
                if rest.len() < n + 2 {
                    return None;
                }
                *at += n + 2;
                *self = Parse::Size;
            }
            Parse::Trailer => {
                if rest.len() < 2 {
                    return None;
                }
                *at += 2;
                return Some(true);
            }
        }
        Some(false)
    }
}

/// A blocking TCP connect from `from` (bound first, so the packets carry the identity's
/// address) to `to`; `SO_SNDTIMEO` bounds the handshake. Returns the stream and how long the
/// connect took.
pub(crate) fn connect_from(
    from: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> io::Result<(TcpStream, Duration)> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket has no memory preconditions; the descriptor is owned by `stream` below
    // before anything can fail.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    stream.set_write_timeout(Some(timeout))?;
    if let Some(from) = from {
        let (addr, len) = sockaddr(SocketAddr::new(from, 0));
        // SAFETY: `addr` is a sockaddr_storage holding a sockaddr of `len` bytes.
        let rc = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (addr, len) = sockaddr(to);
    let start = Instant::now();
    // SAFETY: as above.
    let rc = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stream, start.elapsed()))
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_add_up_to_the_body_size() {
        for total in [0usize, 1, 7, 8, 9, 100, 4095, 4096, 4097, 2 << 20, 123_457] {
            for size in [16usize, 4096] {
                let evs: Vec<Vec<u8>> = events(total, size).collect();
                let sum: usize = evs.iter().map(Vec::len).sum();
                // A body shorter than one event's frame is sent as one bare frame.
                let want = if total > 0 && total < 8 { 8 } else { total };
                assert_eq!(sum, want, "total {total} size {size}");
                assert!(evs.iter().all(|e| e.starts_with(b"data: ")));
                assert!(evs.iter().all(|e| e.ends_with(b"\n\n")));
            }
        }
    }
}
