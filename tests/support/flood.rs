//! Floods and what reaches the server: a thread that sends frames as fast as it can (or at a
//! ceiling), rewriting each one's source address, and a tap on the server's interface that
//! counts what the XDP program let through, by source address.
//!
//! The tap is an AF_PACKET socket on the server end of the veth. Packet taps run after XDP, so
//! a frame the program dropped never reaches it: its count is what the server host received,
//! independent of the agent and its counters (which a dead agent cannot be asked for, and
//! which a bug in the program could get wrong in the same way as its verdict).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::lab::NetNs;

/// Where the source address starts in an untagged frame: Ethernet (14) + its IPv4 (12) or
/// IPv6 (8) offset.
pub const V4_SRC_OFFSET: usize = 14 + 12;
pub const V6_SRC_OFFSET: usize = 14 + 8;

/// No flood runs longer than this, whatever its caller forgot.
const FLOOD_LIMIT: Duration = Duration::from_secs(900);

/// An AF_PACKET socket bound to `ifname` in the calling thread's namespace.
fn packet_socket(ifname: &str) -> (i32, libc::sockaddr_ll) {
    let c = std::ffi::CString::new(ifname).expect("ifname");
    // SAFETY: plain socket syscalls; every pointer is to a live local of the size passed.
    unsafe {
        let ifindex = libc::if_nametoindex(c.as_ptr());
        assert!(ifindex != 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        (fd, addr)
    }
}

/// What a flood did.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    /// Frames the kernel took (sendto succeeded).
    pub sent: u64,
    /// From just before the first frame to just after the last.
    pub elapsed: Duration,
}

/// A flood from its own thread in a namespace: frame `i` is `template` with `rewrite(i, frame)`
/// applied (typically a new source address), sent until `count` frames, `stop`, or
/// [`FLOOD_LIMIT`]. `per_second` caps the rate (paced per 1 000 frames); `None` sends flat out.
pub struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<FloodReport>>,
}

impl Flood {
    pub fn start<F>(
        ns: &NetNs,
        ifname: &str,
        template: Vec<u8>,
        count: Option<u64>,
        per_second: Option<u32>,
        mut rewrite: F,
    ) -> Flood
    where
        F: FnMut(u64, &mut [u8]) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let ifname = ifname.to_owned();
        let thread = ns.spawn(move || {
            let (fd, addr) = packet_socket(&ifname);
            let mut frame = template;
            let count = count.unwrap_or(u64::MAX);
            let start = Instant::now();
            let mut sent = 0u64;
            let mut i = 0u64;
            while i < count && start.elapsed() < FLOOD_LIMIT {
                // Checked every 256 frames: an atomic load per frame is cheap, but not free.
                if i.is_multiple_of(256) && s.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(rate) = per_second
                    && i.is_multiple_of(1000)
                {
                    let due = Duration::from_secs_f64(i as f64 / f64::from(rate.max(1)));
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                rewrite(i, &mut frame);
                // SAFETY: `fd` is this thread's socket; `frame` and `addr` are live locals.
                let n = unsafe {
                    libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&raw const addr).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if n > 0 {
                    sent += 1;
                }
                i += 1;
            }
            let elapsed = start.elapsed();
            // SAFETY: closing the descriptor this thread opened.
            unsafe { libc::close(fd) };
            FloodReport { sent, elapsed }
        });
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    /// Waits for the flood to end by itself (its `count`), and reports.
    pub fn join(mut self) -> FloodReport {
        self.thread
            .take()
            .expect("a running flood")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Stops the flood and reports.
    pub fn stop(self) -> FloodReport {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A small, fast, seedable generator (xorshift64*): flood sources need to be spread, not
/// unpredictable, and a test must be able to say which seed it ran.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A random address in 198.18.0.0/15.
pub fn random_v4(rng: &mut XorShift) -> Ipv4Addr {
    let r = rng.next_u64() as u32;
    Ipv4Addr::from(0xc612_0000 | (r & 0x0001_ffff))
}

/// A random address in 2001:db8::/32.
pub fn random_v6(rng: &mut XorShift) -> Ipv6Addr {
    let hi = (0x2001_0db8u128 << 96) | (u128::from(rng.next_u64() as u32) << 64);
    Ipv6Addr::from(hi | u128::from(rng.next_u64()))
}

/// Frames the server's interface received, counted by IP source address and TCP/UDP source
/// port (0 for other protocols), from a thread in the server's namespace until dropped. The
/// port tells a client's own frames from frames spoofed with its address.
pub struct Tap {
    counts: Arc<Mutex<HashMap<(IpAddr, u16), u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u32>>,
}

impl Tap {
    /// Starts counting on `ifname` in `ns`; returns once the socket is bound, so nothing sent
    /// after this returns is missed.
    pub fn start(ns: &NetNs, ifname: &str) -> Tap {
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&counts), Arc::clone(&stop));
        let ifname = ifname.to_owned();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let (fd, addr) = packet_socket(&ifname);
            // SAFETY: socket options and recv on this thread's socket; pointers are to live
            // locals of the sizes passed.
            unsafe {
                let rc = libc::bind(
                    fd,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                // Room for seconds of the traffic that passes, so a busy machine that
                // schedules this thread late loses nothing (checked below anyway).
                let buf: i32 = 32 << 20;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const buf).cast(),
                    4,
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            let _ = ready_tx.send(());
            let mut buf = [0u8; 256];
            loop {
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: as above.
                let n = unsafe {
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&raw mut from).cast(),
                        &mut len,
                    )
                };
                if n < 0 {
                    // The timeout: a chance to see the stop flag once the queue is empty.
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                // The server's own replies (RSTs, ICMP errors) are not what the client sent.
                if from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                if let Some(src) = source_of(&buf[..n as usize]) {
                    *c.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(src)
                        .or_default() += 1;
                }
            }
            let mut stats = libc::tpacket_stats {
                tp_packets: 0,
                tp_drops: 0,
            };
            let mut len = std::mem::size_of::<libc::tpacket_stats>() as u32;
            // SAFETY: as above; the descriptor is closed once.
            unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_PACKET,
                    libc::PACKET_STATISTICS,
                    (&raw mut stats).cast(),
                    &mut len,
                );
                libc::close(fd);
            }
            stats.tp_drops
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the tap did not start");
        Tap {
            counts,
            stop,
            thread: Some(thread),
        }
    }

    /// Frames from each source address so far, over all its ports.
    pub fn counts(&self) -> HashMap<IpAddr, u64> {
        by_source(&self.flows())
    }

    /// Frames from each (source address, source port) so far.
    pub fn flows(&self) -> HashMap<(IpAddr, u16), u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops, and returns the final counts by (source, port); panics if the socket dropped
    /// anything (a count that missed frames could hide a leak).
    pub fn stop(mut self) -> HashMap<(IpAddr, u16), u64> {
        self.stop.store(true, Ordering::Relaxed);
        let drops = self
            .thread
            .take()
            .expect("a running tap")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        assert_eq!(drops, 0, "the tap's socket dropped {drops} frames");
        self.flows()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counts by (source, port) summed by source.
pub fn by_source(flows: &HashMap<(IpAddr, u16), u64>) -> HashMap<IpAddr, u64> {
    let mut sums = HashMap::new();
    for ((src, _), n) in flows {
        *sums.entry(*src).or_default() += n;
    }
    sums
}

/// The IP source address of an untagged Ethernet frame, and its TCP or UDP source port (0
/// for other protocols, or behind IPv6 extension headers).
fn source_of(frame: &[u8]) -> Option<(IpAddr, u16)> {
    let port = |at: usize, proto: u8| match proto {
        6 | 17 => frame
            .get(at..at + 2)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]])),
        _ => 0,
    };
    match frame.get(12..14)? {
        [0x08, 0x00] => {
            let b: [u8; 4] = frame
                .get(V4_SRC_OFFSET..V4_SRC_OFFSET + 4)?
                .try_into()
                .ok()?;
            let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
            Some((IpAddr::from(b), port(14 + ihl, *frame.get(14 + 9)?)))
        }
        [0x86, 0xdd] => {
            let b: [u8; 16] = frame
                .get(V6_SRC_OFFSET..V6_SRC_OFFSET + 16)?
                .try_into()
                .ok()?;
            Some((IpAddr::from(b), port(14 + 40, *frame.get(14 + 6)?)))
        }
        _ => None,
    }
}
