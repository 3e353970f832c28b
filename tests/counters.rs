//! Two namespaces joined by a veth pair, the real tollgate binary attached in one, real UDP and
//! TCP traffic from the other: the counters read back from the kernel must match what was
//! sent, packet for packet.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::{Agent, Counters},
    lab::{Lab, LinkStats, XdpAttach},
};

const UDP_DATAGRAMS: usize = 200;
const MAX_UDP_PAYLOAD: usize = 1400;
/// Bytes each TCP connection sends: a lone byte, about one segment, exactly one full segment
/// with timestamps, and transfers that need many segments and window updates.
const TCP_SIZES: [usize; 6] = [1, 1000, 1448, 10_000, 100_000, 400_000];
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_ACCEPT_LIMIT: Duration = Duration::from_secs(30);
const SETTLE_QUIET: Duration = Duration::from_millis(500);
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

const ETH_HLEN: u64 = 14;
const IPV4_HLEN: u64 = 20;
const IPV6_HLEN: u64 = 40;
const UDP_HLEN: u64 = 8;
const TCP_MIN_HLEN: u64 = 20;
const MTU: u64 = 1500;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Native,
    Generic,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        }
    }

    fn attach(self) -> XdpAttach {
        match self {
            Mode::Native => XdpAttach::Native,
            Mode::Generic => XdpAttach::Generic,
        }
    }

    /// What the client veth's tx_bytes grows by for `packets` frames totalling `frame_bytes`.
    ///
    /// With native XDP on the peer, veth hands frames to the peer's NAPI poll and stops
    /// counting its own tx; it reports the peer's XDP receive counters instead (veth_get_stats64
    /// adds the peer's xdp_packets/xdp_bytes to tx). veth_xdp_rcv counts those bytes as
    /// skb->len after veth_xmit's __dev_forward_skb has run eth_type_trans, which pulls the
    /// 14-byte Ethernet header, so tx_bytes misses exactly one header per packet. Without a
    /// native program the sender counts skb->len before forwarding, the header included.
    fn tx_bytes(self, packets: u64, frame_bytes: u64) -> u64 {
        match self {
            Mode::Native => frame_bytes - packets * ETH_HLEN,
            Mode::Generic => frame_bytes,
        }
    }
}

/// The client's link counters and the agent's counters, read once the link has settled.
struct Snapshot {
    link: LinkStats,
    xdp: Counters,
}

fn snapshot(lab: &Lab, agent: &Agent) -> Snapshot {
    let link = lab
        .client
        .wait_link_quiet(&lab.client_if, SETTLE_QUIET, SETTLE_LIMIT);
    Snapshot {
        link,
        xdp: agent.counters(),
    }
}

/// Checks that every packet the client put on the link reached the program and was counted
/// once, under "unprotected" (nothing in the lab is protected), with its full frame length.
/// Returns the counters' movement.
fn assert_accounted(phase: &str, mode: Mode, before: &Snapshot, after: &Snapshot) -> Counters {
    let link = after.link.since(&before.link);
    let xdp = after.xdp.since(&before.xdp);
    let (packets, bytes) = xdp.total();
    let ctx = format!(
        "{phase}, {} XDP: client tx moved by {link:?}; counters moved by {xdp:?}",
        mode.flag()
    );
    assert_eq!(link.tx_dropped, 0, "the veth dropped frames: {ctx}");
    assert_eq!(
        packets, link.tx_packets,
        "counted packets != client tx packets: {ctx}"
    );
    assert_eq!(
        mode.tx_bytes(packets, bytes),
        link.tx_bytes,
        "counted bytes do not match client tx bytes: {ctx}"
    );
    assert_eq!(xdp.get("not_ip").packets, 0, "non-IP frames crossed: {ctx}");
    let unprotected = xdp.get("unprotected");
    assert_eq!(
        (unprotected.packets, unprotected.bytes),
        (packets, bytes),
        "packets counted outside \"unprotected\": {ctx}"
    );
    assert_eq!(unprotected.verdict, "pass", "{ctx}");
    xdp
}

/// Datagram `i`'s payload: sizes spread over 1..=MAX_UDP_PAYLOAD with both ends included,
/// contents that differ between datagrams so a mixed-up echo shows.
fn udp_payload(i: usize) -> Vec<u8> {
    let len = match i {
        0 => 1,
        1 => MAX_UDP_PAYLOAD,
        _ => i * 613 % MAX_UDP_PAYLOAD + 1,
    };
    (0..len).map(|j| (i + j) as u8).collect()
}

/// Sends UDP_DATAGRAMS datagrams, alternating IPv4 and IPv6, each answered before the next
/// goes. Lock-step keeps the burst far below the veth's 256-frame ring and the socket buffers,
/// so a loss means a bug, not an overrun. Returns the frame bytes the link carried to the
/// server.
fn udp_traffic(lab: &Lab) -> u64 {
    let server = lab
        .server
        .run(|| UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)))
        .expect("binding the UDP server");
    server.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let port = server.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let mut received = Vec::new();
        let mut buf = vec![0u8; 2048];
        while received.len() < UDP_DATAGRAMS {
            // A timeout means the client gave up; the count shows how far it got.
            let Ok((n, from)) = server.recv_from(&mut buf) else {
                break;
            };
            received.push(n);
            server.send_to(&buf[..n], from).expect("echoing a datagram");
        }
        received
    });

    let (server_v4, server_v6) = (lab.server_v4, lab.server_v6);
    let frame_bytes = lab.client.run(move || {
        let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("binding UDP/IPv4");
        let v6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).expect("binding UDP/IPv6");
        v4.connect((server_v4, port)).unwrap();
        v6.connect((server_v6, port)).unwrap();
        let mut frame_bytes = 0;
        let mut buf = vec![0u8; 2048];
        for i in 0..UDP_DATAGRAMS {
            let (sock, ip_hlen) = if i % 2 == 0 {
                (&v4, IPV4_HLEN)
            } else {
                (&v6, IPV6_HLEN)
            };
            sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let payload = udp_payload(i);
            assert_eq!(sock.send(&payload).unwrap(), payload.len());
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no echo of datagram {i}: {e}"));
            assert_eq!(&buf[..n], &payload[..], "echo of datagram {i} differs");
            frame_bytes += ETH_HLEN + ip_hlen + UDP_HLEN + payload.len() as u64;
        }
        frame_bytes
    });

    let received = echo.join().expect("UDP server thread");
    let sent: Vec<usize> = (0..UDP_DATAGRAMS).map(|i| udp_payload(i).len()).collect();
    assert_eq!(received, sent, "the server did not receive every datagram");
    frame_bytes
}

/// Opens one connection per TCP_SIZES entry, alternating IPv4 and IPv6; each sends its bytes,
/// half-closes and waits for the server to confirm the count. Returns the payload bytes sent.
fn tcp_traffic(lab: &Lab) -> u64 {
    let listener = lab
        .server
        .run(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)))
        .expect("binding the TCP server");
    // Non-blocking so that the acceptor can give up at a deadline if the client never comes.
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = std::thread::spawn(move || {
        let deadline = Instant::now() + TCP_ACCEPT_LIMIT;
        let mut received = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while received.len() < TCP_SIZES.len() && Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("accepting: {e}"),
            };
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut n = 0u64;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => n += k as u64,
                    Err(e) => panic!("reading connection {}: {e}", received.len()),
                }
            }
            stream.write_all(&n.to_be_bytes()).expect("answering");
            received.push(n);
        }
        received
    });

    let (server_v4, server_v6) = (lab.server_v4, lab.server_v6);
    lab.client.run(move || {
        for (i, &size) in TCP_SIZES.iter().enumerate() {
            let addr: SocketAddr = if i % 2 == 0 {
                (server_v4, port).into()
            } else {
                (server_v6, port).into()
            };
            let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let data: Vec<u8> = (0..size).map(|j| (j % 251) as u8).collect();
            stream
                .write_all(&data)
                .unwrap_or_else(|e| panic!("sending {size} bytes to {addr}: {e}"));
            stream.shutdown(Shutdown::Write).unwrap();
            let mut answer = Vec::new();
            stream
                .read_to_end(&mut answer)
                .unwrap_or_else(|e| panic!("reading the answer from {addr}: {e}"));
            assert_eq!(
                answer,
                (size as u64).to_be_bytes(),
                "the server got a different byte count from {addr}"
            );
        }
    });

    let received = acceptor.join().expect("TCP server thread");
    let sent: Vec<u64> = TCP_SIZES.iter().map(|&s| s as u64).collect();
    assert_eq!(received, sent, "the server did not receive every byte");
    sent.iter().sum()
}

fn counters_match_traffic(mode: Mode) {
    tollgate_tests::require_root();
    // Declared before the agent so that it is dropped after it: the agent detaches from an
    // interface that still exists.
    let lab = Lab::new();
    let agent = Agent::start(&lab.server, &lab.server_if, mode.flag());
    assert_eq!(
        lab.server.xdp_attach(&lab.server_if),
        Some(mode.attach()),
        "the program is not attached in {} mode",
        mode.flag()
    );

    let start = snapshot(&lab, &agent);
    assert_eq!(
        start.link.tx_packets, 0,
        "the client sent frames nobody asked for (ARP/NDP/MLD suppression failed): {:?}",
        start.link
    );
    assert_eq!(
        start.xdp.total(),
        (0, 0),
        "counted before any traffic: {:?}",
        start.xdp
    );

    let udp_frame_bytes = udp_traffic(&lab);
    let after_udp = snapshot(&lab, &agent);
    let udp = assert_accounted("UDP", mode, &start, &after_udp);
    // The link is silent but for the test's datagrams, so these are exact.
    assert_eq!(
        udp.total(),
        (UDP_DATAGRAMS as u64, udp_frame_bytes),
        "UDP: counters do not match the datagrams sent: {udp:?}"
    );

    let tcp_payload = tcp_traffic(&lab);
    let after_tcp = snapshot(&lab, &agent);
    let tcp = assert_accounted("TCP", mode, &after_udp, &after_tcp);
    let (packets, bytes) = tcp.total();
    // TCP decides its own segmentation and ACKs, so only bounds are known: every frame holds at
    // least the headers, and all frames together hold the payload.
    assert!(
        bytes >= tcp_payload + packets * (ETH_HLEN + IPV4_HLEN + TCP_MIN_HLEN),
        "TCP: {bytes} bytes in {packets} frames cannot carry {tcp_payload} payload bytes"
    );
    if let Mode::Native = mode {
        // veth stops offering GSO to a sender whose peer runs a native program that cannot
        // take multi-buffer frames, so what the program sees is wire-sized.
        assert!(
            bytes <= packets * (ETH_HLEN + MTU),
            "TCP: {bytes} bytes in {packets} frames: frames larger than the MTU reached XDP"
        );
    }
    eprintln!(
        "{} XDP: UDP {:?} (packets, bytes), TCP {:?} for {tcp_payload} payload bytes",
        mode.flag(),
        udp.total(),
        tcp.total()
    );

    // The CLI and the library read the same pinned map the same way.
    let from_lib = tollgate::counter_read::to_rows(
        &tollgate::counter_read::reason_totals_from_pin(&agent.counters_pin())
            .expect("reading the pin through the library"),
    );
    let cli = agent.counters();
    for row in &from_lib {
        let c = cli.get(row.reason);
        assert_eq!(
            (c.verdict.as_str(), c.packets, c.bytes),
            (row.verdict, row.packets, row.bytes),
            "CLI and library disagree on {}",
            row.reason
        );
    }
    assert_eq!(
        cli.0.len(),
        from_lib.len(),
        "CLI and library list other reasons"
    );

    let exit = agent.stop();
    assert!(
        exit.status.success(),
        "tollgate run exited with {} on SIGTERM:\n{}",
        exit.status,
        exit.stderr
    );
    assert!(
        exit.pins_removed,
        "tollgate run left its pins behind:\n{}",
        exit.stderr
    );
    assert_eq!(
        lab.server.xdp_attach(&lab.server_if),
        None,
        "the program is still attached after the agent stopped"
    );
}

#[test]
fn native_xdp_counts_every_packet_sent() {
    counters_match_traffic(Mode::Native);
}

#[test]
fn generic_xdp_counts_every_packet_sent() {
    counters_match_traffic(Mode::Generic);
}
