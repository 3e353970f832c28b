//! Raw frames into a lab's veth: a batch at once, or a steady adjustable rate from a thread.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::lab::NetNs;

/// Sends raw Ethernet frames out of `ifname` in `ns` through an AF_PACKET socket: exact
/// frames (any source address, TCP or UDP, any port) into the veth, one `send` per frame.
pub fn send_frames(ns: &NetNs, ifname: &str, frames: &[Vec<u8>]) {
    let ifname = ifname.to_owned();
    ns.run(|| {
        let c = std::ffi::CString::new(ifname.as_str()).expect("ifname");
        // SAFETY: plain syscalls on a socket this closure owns; every pointer passed is to a
        // live, correctly sized local.
        unsafe {
            let ifindex = libc::if_nametoindex(c.as_ptr());
            assert!(ifindex != 0, "no interface {ifname}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            for f in frames {
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    f.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

/// Sends frames out of a namespace's interface at a steady, adjustable rate from its own
/// thread until dropped: the traffic of the controller tests.
pub struct FrameBlaster {
    stop: Arc<AtomicBool>,
    /// Frames per second, changeable while it runs.
    rate: Arc<AtomicU32>,
    thread: Option<JoinHandle<u64>>,
}

impl FrameBlaster {
    pub fn start(ns: &NetNs, ifname: &str, frame: Vec<u8>, per_second: u32) -> FrameBlaster {
        let stop = Arc::new(AtomicBool::new(false));
        let rate = Arc::new(AtomicU32::new(per_second));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&rate));
        let ifname = ifname.to_owned();
        let thread = ns.spawn(move || {
            let c = std::ffi::CString::new(ifname).expect("ifname");
            let mut sent = 0u64;
            // SAFETY: socket syscalls on a socket this thread owns; pointers are to locals
            // of the sizes passed.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = libc::if_nametoindex(c.as_ptr()) as i32;
                addr.sll_halen = 6;
                let mut next = Instant::now();
                // Bounded: a test that forgets to stop it still ends within ten minutes.
                let limit = Instant::now() + Duration::from_secs(600);
                while !s.load(Ordering::Relaxed) && Instant::now() < limit {
                    let per = r.load(Ordering::Relaxed).max(1);
                    next += Duration::from_secs(1) / per;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else if now - next > Duration::from_millis(50) {
                        // Fell behind (the machine was busy): do not burst to catch up.
                        next = now;
                    }
                    let n = libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&raw const addr).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if n > 0 {
                        sent += 1;
                    }
                }
                libc::close(fd);
            }
            sent
        });
        FrameBlaster {
            stop,
            rate,
            thread: Some(thread),
        }
    }

    pub fn set_rate(&self, per_second: u32) {
        self.rate.store(per_second, Ordering::Relaxed);
    }

    /// Stops and returns how many frames were sent.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for FrameBlaster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `packet` (IPv4 header first, then TCP) with its TCP checksum filled in. The kit's frames
/// carry a zero checksum, which XDP never looks at but the receiving stack checks before any
/// socket sees the segment (a veth or tun has no checksum offload to fill it in).
pub fn with_tcp_checksum(packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    p[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
    let tcp_len = u16::try_from(total - ihl).expect("a TCP segment under 64 KiB");
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for pair in b.chunks(2) {
            sum += u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
        }
    };
    add(&p[12..20]); // source and destination addresses
    add(&[0, 6]);
    add(&tcp_len.to_be_bytes());
    add(&p[ihl..total]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = u16::try_from(sum).expect("folded to 16 bits");
    p[ihl + 16..ihl + 18].copy_from_slice(&(!sum).to_be_bytes());
    p
}
