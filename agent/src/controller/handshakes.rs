//! Evidence for an automatic quarantine that an off-path spoofer cannot forge (#12 finding
//! 5): the node's own ESTABLISHED TCP connections, read from the kernel with sock_diag
//! (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`, the dump filtered to ESTABLISHED by the
//! kernel, with each socket's `tcp_info`).
//!
//! Why sock_diag and not `/proc/net/tcp`: the kernel filters the dump by state (listening
//! and TIME_WAIT sockets never cross into the agent), the records are binary and fixed, and
//! only sock_diag carries `tcp_info`, whose counters are what makes the evidence hold: a
//! connection merely existing proves the identity once completed a handshake, not that the
//! flood now being scored is its own (a spoofer can flood from the address of a customer
//! who has a connection open). Of those counters only `bytes_received` is evidence against a
//! spoofer: it grows only when `rcv_nxt` advances, i.e. for payload at the exact next
//! sequence number (with an acceptable ACK), which a sender that never sees the
//! connection's segments cannot produce. `segs_in` is not: the kernel counts every segment
//! it matches to the socket's 4-tuple (`tcp_segs_in()` in `tcp_v4_rcv`/`tcp_v6_rcv`, after
//! the lookup and before any sequence or window check), so a spoofer who knows or guesses
//! the client's port (a fixed source port, a long-lived connection) moves it at will with
//! out-of-window ACKs. [`judge`] uses it only as a further condition, never as evidence.
//!
//! Read only when the anomaly ladder throttles an identity or is about to quarantine one
//! (once per tick for all of that tick's identities, never per packet), and bounded: at most
//! [`MAX_CONNECTIONS`] records are kept per read; past that the read says so and the caller
//! withholds the quarantine (fails toward throttling, never toward quarantining).
//!
//! The agent sees the connections of its own network namespace: a model server in another
//! namespace (a container with its own network) shows none, and every automatic quarantine
//! there is withheld unless `anomaly.require_handshake = false` (docs/controller.md).

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Records kept from one read (both families). Past it the read is incomplete.
pub const MAX_CONNECTIONS: usize = 262_144;

/// One ESTABLISHED TCP connection of this node, from its own side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    /// The kernel's socket cookie: tells a connection from a later one on the same 4-tuple.
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Segments received (`tcpi_segs_in`), 0 where the kernel reports no `tcp_info`.
    pub segs_in: u32,
    /// In-sequence bytes received (`tcpi_bytes_received`).
    pub bytes_received: u64,
}

/// What one read found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Established {
    pub conns: Vec<Conn>,
    /// More than [`MAX_CONNECTIONS`] were there: the list is not the whole table.
    pub truncated: bool,
}

/// Reads every ESTABLISHED TCP connection of this network namespace, IPv4 and IPv6.
pub fn established() -> io::Result<Established> {
    let mut out = Established::default();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, &mut out)?;
        if out.truncated {
            break;
        }
    }
    Ok(out)
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_ESTABLISHED: u32 = 1;
const INET_DIAG_INFO: u16 = 2;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg`.
const DIAG_MSG: usize = 72;
/// Offsets in `struct tcp_info` (linux/tcp.h, stable ABI: fields are only ever appended).
const TCPI_BYTES_RECEIVED: usize = 128;
const TCPI_SEGS_IN: usize = 140;

/// `nlmsghdr` + `inet_diag_req_v2` asking for every ESTABLISHED TCP socket of `family`
/// with its `tcp_info`.
fn request(family: u8) -> Vec<u8> {
    let len = NLMSG_HDR + 56;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel's
    b.push(family);
    b.push(libc::IPPROTO_TCP as u8);
    b.push(1 << (INET_DIAG_INFO - 1)); // idiag_ext
    b.push(0);
    b.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes()); // idiag_states
    b.resize(len, 0); // inet_diag_sockid: all zero, no filter
    b
}

fn dump(family: u8, out: &mut Established) -> io::Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A dump that stalls must not stall the control loop for long.
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: `tv` is a valid timeval for the length given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let req = request(family);
    // SAFETY: a sockaddr_nl addressed to the kernel (pid 0), zeroed otherwise.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `req` and `kernel` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag dump ended without NLMSG_DONE",
            ));
        }
        if parse(&buf[..n as usize], out)? || out.truncated {
            return Ok(());
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Parses one datagram of a dump into `out`. Returns whether the dump is complete.
pub(crate) fn parse(mut b: &[u8], out: &mut Established) -> io::Result<bool> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0) as usize;
        if len < NLMSG_HDR || len > b.len() {
            return Err(bad("a message length past the datagram"));
        }
        let body = &b[NLMSG_HDR..len];
        match u16_at(b, 4) {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if body.len() >= 4 {
                    -(u32_at(body, 0) as i32)
                } else {
                    0
                };
                return Err(io::Error::from_raw_os_error(errno));
            }
            SOCK_DIAG_BY_FAMILY => {
                if out.conns.len() >= MAX_CONNECTIONS {
                    out.truncated = true;
                    return Ok(false);
                }
                if let Some(c) = conn(body) {
                    out.conns.push(c);
                }
            }
            _ => {}
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok(false)
}

/// One `inet_diag_msg` with its attributes; `None` for a record too short to read.
fn conn(m: &[u8]) -> Option<Conn> {
    if m.len() < DIAG_MSG {
        return None;
    }
    let family = i32::from(m[0]);
    // inet_diag_sockid at 4: sport, dport (network order), src[16], dst[16], if, cookie[2].
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let dport = u16::from_be_bytes([m[6], m[7]]);
    let addr = |at: usize| -> Option<IpAddr> {
        match family {
            libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                m[at],
                m[at + 1],
                m[at + 2],
                m[at + 3],
            ))),
            // A v4 client of a dual-stack listener is ::ffff:a.b.c.d: the v4 address.
            libc::AF_INET6 => {
                let a: [u8; 16] = m[at..at + 16].try_into().ok()?;
                Some(Ipv6Addr::from(a).to_canonical())
            }
            _ => None,
        }
    };
    let local = SocketAddr::new(addr(8)?, sport);
    let remote = SocketAddr::new(addr(24)?, dport);
    let cookie = u64::from(u32_at(m, 44)) | (u64::from(u32_at(m, 48)) << 32);
    let (mut segs_in, mut bytes_received) = (0, 0);
    let mut attrs = &m[DIAG_MSG..];
    while attrs.len() >= 4 {
        let alen = usize::from(u16_at(attrs, 0));
        if alen < 4 || alen > attrs.len() {
            break;
        }
        if u16_at(attrs, 2) == INET_DIAG_INFO {
            let info = &attrs[4..alen];
            if info.len() >= TCPI_SEGS_IN + 4 {
                bytes_received = u64::from_ne_bytes(
                    info[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8]
                        .try_into()
                        .ok()?,
                );
                segs_in = u32_at(info, TCPI_SEGS_IN);
            }
        }
        attrs = &attrs[alen.next_multiple_of(4).min(attrs.len())..];
    }
    Some(Conn {
        cookie,
        local,
        remote,
        segs_in,
        bytes_received,
    })
}

/// An identity's connections at one reading: counters by socket cookie.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    by_cookie: BTreeMap<u64, (u32, u64)>,
}

impl Snapshot {
    /// The connections in `conns` that `belongs` accepts (its bound addresses to a protected
    /// TCP port).
    pub fn of<'a>(
        conns: impl IntoIterator<Item = &'a Conn>,
        belongs: impl Fn(&Conn) -> bool,
    ) -> Snapshot {
        Snapshot {
            by_cookie: conns
                .into_iter()
                .filter(|c| belongs(c))
                .map(|c| (c.cookie, (c.segs_in, c.bytes_received)))
                .collect(),
        }
    }

    pub fn connections(&self) -> usize {
        self.by_cookie.len()
    }

    /// Segments and in-sequence bytes received on these connections since `earlier`: a
    /// connection new since then counts whole, one gone since then counts nothing (which
    /// errs toward withholding).
    pub fn since(&self, earlier: &Snapshot) -> (u64, u64) {
        let mut segs = 0u64;
        let mut bytes = 0u64;
        for (cookie, &(s, b)) in &self.by_cookie {
            let (s0, b0) = earlier.by_cookie.get(cookie).copied().unwrap_or((0, 0));
            segs += u64::from(s.wrapping_sub(s0));
            bytes += b.saturating_sub(b0);
        }
        (segs, bytes)
    }
}

/// What the ladder holds for a throttled identity: its connections when the throttle began
/// and what the kernel passed from it since (packets, and bytes as XDP counts them: whole
/// frames, headers included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    pub start: Snapshot,
    pub passed_packets: u64,
    pub passed_bytes: u64,
}

impl Evidence {
    /// Evidence starting at `start`, nothing passed yet.
    pub fn starting(start: Snapshot) -> Evidence {
        Evidence {
            start,
            ..Evidence::default()
        }
    }
}

/// The least share of the bytes passed from an identity since the throttle began that its
/// own connections must have accepted as in-sequence payload (`bytes_received`) for the
/// flood to count as its own.
///
/// Measured against whole frames, with no allowance for headers, on purpose: a spoofed frame
/// then counts in full against the identity and adds nothing for it, whatever it carries.
/// Subtracting a header allowance (54 bytes a packet for IPv4) would make a header-only
/// spoof (bare ACKs, 54 bytes each) weigh nothing, and the customer's own small requests
/// would then "prove" a flood that is all spoof. Half keeps a real flood provable as long
/// as its segments carry about as much payload as headers: 100-byte requests are 100 of 166
/// bytes on the wire (Ethernet 14, IPv4 20, TCP with timestamps 32), 60 %; over IPv6, 100
/// of 186, 54 %. Floods of smaller segments, or of bare ACKs, are throttled only: the rule
/// errs toward withholding. Beside such a 100-byte flow, spoofed bare ACKs at more than
/// 0.63 per real segment withhold the quarantine.
pub const OWN_SHARE: f64 = 0.5;

/// The least share of an identity's passed packets its connections must have counted in
/// `segs_in`. Necessary, never sufficient (anyone with the 4-tuple moves `segs_in`, see the
/// module comment): it is the only per-packet count there is, and without it small spoofed
/// frames beside a customer that sends full segments would be cheap against
/// [`OWN_SHARE`]: next to 1448-byte segments (95 % payload) it takes 25 bare ACKs per real
/// segment to bring the byte share under half, while a spoofer who does not know the
/// connection's port moves no `segs_in` at all and is held here from one spoofed frame per
/// real one.
pub const OWN_SEGMENTS: f64 = 0.5;

/// Whether `now` (the identity's connections at the escalation) proves the flood is the
/// identity's own: it has a connection, its connections accepted in-sequence payload of at
/// least [`OWN_SHARE`] of the bytes passed from it since the throttle began, and (a further
/// condition a spoofer with the 4-tuple can meet, see [`OWN_SEGMENTS`]) they counted at least
/// that share of its passed packets. `Ok` says what was seen (for the audit), `Err` why the
/// quarantine is withheld.
pub fn judge(now: &Snapshot, ev: &Evidence) -> Result<String, (super::anomaly::Hold, String)> {
    use super::anomaly::Hold;
    if now.connections() == 0 {
        return Err((
            Hold::NoHandshake,
            "no ESTABLISHED TCP connection from its addresses to a protected port".into(),
        ));
    }
    let (segs, bytes) = now.since(&ev.start);
    let seen = format!(
        "its {} connection(s) received {bytes} bytes in sequence of the {} bytes passed from it since the throttle began ({segs} segments of {} packets)",
        now.connections(),
        ev.passed_bytes,
        ev.passed_packets
    );
    let carried = bytes > 0 && bytes as f64 >= OWN_SHARE * ev.passed_bytes as f64;
    let matched = segs as f64 >= OWN_SEGMENTS * ev.passed_packets as f64;
    if carried && matched {
        Ok(seen)
    } else {
        Err((Hold::NotItsConnections, seen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One SOCK_DIAG_BY_FAMILY message as the kernel lays it out.
    fn message(
        family: u8,
        local: SocketAddr,
        remote: SocketAddr,
        cookie: u64,
        info: Option<(u64, u32)>,
    ) -> Vec<u8> {
        let mut m = vec![0u8; DIAG_MSG];
        m[0] = family;
        m[1] = TCP_ESTABLISHED as u8;
        m[4..6].copy_from_slice(&local.port().to_be_bytes());
        m[6..8].copy_from_slice(&remote.port().to_be_bytes());
        let put = |m: &mut Vec<u8>, at: usize, a: IpAddr| match a {
            IpAddr::V4(a) => m[at..at + 4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => m[at..at + 16].copy_from_slice(&a.octets()),
        };
        put(&mut m, 8, local.ip());
        put(&mut m, 24, remote.ip());
        m[44..48].copy_from_slice(&(cookie as u32).to_ne_bytes());
        m[48..52].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        if let Some((bytes, segs)) = info {
            let mut tcpi = vec![0u8; 232];
            tcpi[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8]
                .copy_from_slice(&bytes.to_ne_bytes());
            tcpi[TCPI_SEGS_IN..TCPI_SEGS_IN + 4].copy_from_slice(&segs.to_ne_bytes());
            m.extend_from_slice(&((tcpi.len() + 4) as u16).to_ne_bytes());
            m.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
            m.extend_from_slice(&tcpi);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDR + m.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&m);
        out
    }

    fn done() -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&20u32.to_ne_bytes());
        out.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        out.extend_from_slice(&[0; 14]);
        out
    }

    #[test]
    fn parses_v4_and_mapped_v6_records_with_their_counters() {
        let l4: SocketAddr = "198.18.0.2:8000".parse().unwrap();
        let r4: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let l6: SocketAddr = "[::ffff:198.18.0.2]:8000".parse().unwrap();
        let r6: SocketAddr = "[::ffff:198.18.0.9]:40001".parse().unwrap();
        let r6b: SocketAddr = "[2001:db8::9]:40002".parse().unwrap();
        let mut dgram = message(libc::AF_INET as u8, l4, r4, 7, Some((1234, 56)));
        dgram.extend(message(libc::AF_INET6 as u8, l6, r6, 1 << 40, None));
        dgram.extend(message(libc::AF_INET6 as u8, l6, r6b, 9, Some((1, 2))));
        let mut out = Established::default();
        assert!(!parse(&dgram, &mut out).unwrap());
        assert!(parse(&done(), &mut out).unwrap());
        assert_eq!(out.conns.len(), 3);
        assert_eq!(
            out.conns[0],
            Conn {
                cookie: 7,
                local: l4,
                remote: r4,
                segs_in: 56,
                bytes_received: 1234
            }
        );
        // The mapped address reads as the v4 one; no tcp_info reads as no evidence.
        assert_eq!(
            out.conns[1].remote,
            "198.18.0.9:40001".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            out.conns[1].local.ip(),
            "198.18.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!((out.conns[1].cookie, out.conns[1].segs_in), (1 << 40, 0));
        assert_eq!(out.conns[2].remote, r6b);
    }

    #[test]
    fn an_error_or_a_bad_length_is_refused_not_guessed() {
        let mut err = Vec::new();
        err.extend_from_slice(&20u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-(libc::EPERM)).to_ne_bytes());
        let e = parse(&err, &mut Established::default()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let mut long = done();
        long[0..4].copy_from_slice(&999u32.to_ne_bytes());
        assert!(parse(&long, &mut Established::default()).is_err());
    }

    #[test]
    fn a_read_past_the_bound_says_it_is_truncated() {
        let l: SocketAddr = "198.18.0.2:8000".parse().unwrap();
        let r: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let one = message(libc::AF_INET as u8, l, r, 1, None);
        let mut out = Established {
            conns: vec![out_conn(); MAX_CONNECTIONS],
            truncated: false,
        };
        assert!(!parse(&one, &mut out).unwrap());
        assert!(out.truncated);
    }

    fn out_conn() -> Conn {
        Conn {
            cookie: 0,
            local: "198.18.0.2:1".parse().unwrap(),
            remote: "198.18.0.1:1".parse().unwrap(),
            segs_in: 0,
            bytes_received: 0,
        }
    }

    #[test]
    fn snapshots_count_only_what_arrived_between_them() {
        let c = |cookie, segs_in, bytes_received| Conn {
            cookie,
            segs_in,
            bytes_received,
            ..out_conn()
        };
        let before = Snapshot::of(&[c(1, 100, 1000), c(2, 5, 50)], |_| true);
        // 1 grew, 2 closed, 3 is new; 4 is not the identity's.
        let now = [c(1, 160, 1600), c(3, 10, 90), c(4, 1000, 1000)];
        let after = Snapshot::of(&now, |c| c.cookie != 4);
        assert_eq!(after.connections(), 2);
        assert_eq!(after.since(&before), (70, 690));
        assert_eq!(Snapshot::default().since(&before), (0, 0));
    }

    #[test]
    fn a_flood_its_connections_did_not_carry_is_not_its_own() {
        use crate::controller::anomaly::Hold;
        let c = |segs_in, bytes_received| Conn {
            cookie: 1,
            segs_in,
            bytes_received,
            ..out_conn()
        };
        let start = Snapshot::of(&[c(100, 1000)], |_| true);
        let ev = |passed_packets, passed_bytes| Evidence {
            passed_packets,
            passed_bytes,
            ..Evidence::starting(start.clone())
        };
        let grew = |segs: u32, bytes: u64| Snapshot::of(&[c(100 + segs, 1000 + bytes)], |_| true);
        // No connection at all.
        let none = Snapshot::default();
        assert_eq!(
            judge(&none, &ev(10, 1660)).unwrap_err().0,
            Hold::NoHandshake
        );
        // A real client's flood of 100-byte requests (166-byte IPv4 frames): its connection
        // took 1000 of 1000 passed packets, 100 000 in-sequence bytes of 166 000 passed.
        let carried = grew(1000, 100_000);
        let seen = judge(&carried, &ev(1000, 166_000)).unwrap();
        assert!(seen.contains("100000 bytes in sequence"), "{seen}");
        // The same over IPv6 (186-byte frames) still holds: 54 %.
        assert!(judge(&carried, &ev(1000, 186_000)).is_ok());
        // Bare spoofed ACKs (54 bytes) to the connection's exact 4-tuple: every one counted
        // in segs_in, none of them in sequence; the customer's own 50 requests went through.
        // Bytes say 5 000 of 275 300: not its flood (the segments alone would have said so).
        let four_tuple = grew(5050, 5000);
        let (why, detail) = judge(&four_tuple, &ev(5050, 50 * 166 + 5000 * 54)).unwrap_err();
        assert_eq!(why, Hold::NotItsConnections);
        assert!(detail.contains("5000 bytes in sequence"), "{detail}");
        // A spoofed flood beside a customer's idle connection: 20 of 5000 packets.
        let idle = grew(20, 2000);
        let (why, detail) = judge(&idle, &ev(5000, 5000 * 154)).unwrap_err();
        assert_eq!(why, Hold::NotItsConnections);
        assert!(detail.contains("(20 segments of 5000 packets)"), "{detail}");
        // Segments matched to its 4-tuple but no in-sequence data at all.
        let guessed = grew(5000, 0);
        assert_eq!(
            judge(&guessed, &ev(5000, 5000 * 54)).unwrap_err().0,
            Hold::NotItsConnections
        );
        // Beside a customer uploading full segments, 5 bare ACKs spoofed (to other ports) per
        // real segment leave the bytes at 81 %; the segments (1000 of 6000) withhold it.
        let bulk = grew(1000, 1000 * 1448);
        let passed = 1000 * 1514 + 5000 * 54;
        assert!(1000.0 * 1448.0 >= OWN_SHARE * passed as f64);
        assert_eq!(
            judge(&bulk, &ev(6000, passed)).unwrap_err().0,
            Hold::NotItsConnections
        );
        // The same upload alone is its own.
        assert!(judge(&bulk, &ev(1000, 1000 * 1514)).is_ok());
    }

    /// The real kernel: a loopback connection that carried 3 writes shows them, from the
    /// accepting side, with the bytes and at least the segments sent.
    #[test]
    fn reads_a_real_loopback_connection() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_nodelay(true).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            client.write_all(&[7u8; 10]).unwrap();
            server.read_exact(&mut buf[..10]).unwrap();
        }
        let table = established().unwrap();
        let mine = table
            .conns
            .iter()
            .find(|c| {
                c.local == server.local_addr().unwrap() && c.remote == client.local_addr().unwrap()
            })
            .unwrap_or_else(|| panic!("not found in {} connections", table.conns.len()));
        assert_eq!(mine.bytes_received, 30, "{mine:?}");
        assert!(mine.segs_in >= 3, "{mine:?}");
        assert_ne!(mine.cookie, 0);
    }
}
