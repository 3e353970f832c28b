//! Tunnels (#12 finding 1): traffic wrapped in a tunnel to an unprotected port passes XDP on
//! the node's interface as its outer header, and arrives decapsulated on the tunnel device.
//! The agent covers such devices (generic XDP, `[node] tunnels`); these tests send real
//! tunnelled traffic through the real agent:
//!
//! - VXLAN (an Ethernet tunnel): an unbound client's TCP connect to the protected port through
//!   the tunnel gets nothing (no SYN reaches the server socket, `unbound` counts it), the same
//!   frame sent plainly is dropped as `unbound`, a bound client's connect through the tunnel is
//!   admitted as its inner address says; a VXLAN made after the agent started is covered
//!   within seconds; `tunnels = "refuse"` refuses to start naming it; `tunnels = "warn"`
//!   leaves the gap (the connect succeeds: the bypass is real in this lab) and says so.
//! - tun (a layer-3 device, as OpenVPN-style daemons write decapsulated packets into): a SYN
//!   written into it meets the layer-3 entry, and is dropped or answered as its source says.
//! - ipip, gre, gretap, geneve: the same VXLAN-style connect where the kernel offers the
//!   device type (skipped, and said so, where it does not).
//! - a covered VXLAN renamed and a new VXLAN given its name (both name orders): both devices
//!   run the program and an unbound SYN through the new one is dropped; a configured device
//!   renamed while the agent is down and its name reused gets a link of its own at restart
//!   (a link pin follows its device, not its name: `pins`).
//! - the layer-3 entry through BPF_PROG_TEST_RUN: bare packets and packets behind an NBMA
//!   GRE's outer headers get the verdict and reason the Ethernet entry gives the whole frame.
//!
//! Inner and outer addresses come from the lab's 198.18.0.0/15 /24 and 2001:db8::/32 /64.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _},
    process::Stdio,
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{Agent, AgentDirs, tollgate_bin},
    frames::with_tcp_checksum,
    lab::{Lab, NetNs},
    node::{config, host4},
};

/// The protected port: `vllm` (TCP 8000) in the agent-test world.
const PROTECTED: u16 = 8000;
/// `/metrics`, on the node namespace's own loopback.
const METRICS: &str = "127.0.0.1:9464";
/// Covered within this long of appearing (the agent looks every second).
const COVER_LIMIT: Duration = Duration::from_secs(10);

struct Node {
    lab: Lab,
    dirs: AgentDirs,
}

impl Node {
    fn new() -> Node {
        tollgate_tests::require_root();
        Node {
            lab: Lab::new(),
            dirs: AgentDirs::new(),
        }
    }

    fn write_config(&self, policy: &str) -> String {
        let path = config(&self.lab)
            .tunnels(policy)
            .listen_metrics(METRICS)
            .write(&self.dirs.state_dir.join("tollgate.toml"));
        path.to_str().expect("utf-8 path").to_owned()
    }

    fn start(&self, policy: &str) -> Agent {
        let config = self.write_config(policy);
        Agent::launch(
            &self.lab.server,
            &self.dirs,
            &["--config", &config, "--mode", "native"],
        )
    }

    fn status(&self) -> serde_json::Value {
        let out = self.dirs.cli_ok(&["status", "--output", "json"]);
        serde_json::from_str(&out).expect("status json")
    }

    fn covered(&self) -> Vec<String> {
        names(&self.status()["tunnels"]["covered"])
    }

    fn uncovered(&self) -> Vec<String> {
        names(&self.status()["tunnels"]["uncovered"])
    }

    /// Waits until `status` lists `dev` as covered; returns how long it took.
    fn wait_covered(&self, dev: &str) -> Duration {
        let t0 = Instant::now();
        loop {
            if self.covered().iter().any(|d| d == dev) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < COVER_LIMIT,
                "{dev} not covered within {COVER_LIMIT:?}: {}",
                self.status()["tunnels"]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `tollgate_tunnel_devices{state=...}` from a scrape.
    fn tunnel_gauge(&self, state: &str) -> f64 {
        let addr: SocketAddr = METRICS.parse().expect("addr");
        let body = self.lab.server.run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            write!(s, "GET /metrics HTTP/1.0\r\nhost: {addr}\r\n\r\n").expect("request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("response");
            out
        });
        let series = format!("tollgate_tunnel_devices{{state=\"{state}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series}in the scrape:\n{body}"))
    }

    fn reason(&self, label: &str) -> u64 {
        tollgate::counter_read::reason_totals_from_pin(&self.dirs.counters_pin())
            .expect("counters")
            .into_iter()
            .find(|(r, _)| r.label() == label)
            .map_or(0, |(_, c)| c.packets)
    }
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["device"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn short_name(prefix: &str) -> String {
    // Unique per process and call, within IFNAMSIZ.
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id() & 0xffff)
}

/// One tunnel between the lab's client and server: a device of the same name in each,
/// the outer packets over the lab's veth, an inner /32 on each end routed through it.
struct Tunnel {
    dev: String,
    client_in: Ipv4Addr,
    server_in: Ipv4Addr,
}

/// How to make a device of one kind: `ip link add DEV` + these arguments, given (local,
/// remote) outer addresses. Kinds a kernel lacks are skipped.
fn link_args(kind: &str, local: Ipv4Addr, remote: Ipv4Addr) -> Vec<String> {
    let (l, r) = (local.to_string(), remote.to_string());
    let v: Vec<&str> = match kind {
        "vxlan" => vec![
            "type", "vxlan", "id", "42", "local", &l, "remote", &r, "dstport", "4789",
        ],
        "geneve" => vec!["type", "geneve", "id", "42", "remote", &r],
        "gretap" => vec!["type", "gretap", "local", &l, "remote", &r],
        "ipip" | "gre" => vec!["type", kind, "local", &l, "remote", &r],
        other => panic!("no recipe for {other}"),
    };
    v.into_iter().map(str::to_owned).collect()
}

/// Whether the kernel offers device type `kind` (tried in a scratch namespace).
fn kernel_has(kind: &str) -> bool {
    let ns = NetNs::new("probe");
    let a = Ipv4Addr::new(198, 18, 255, 1);
    let args = link_args(kind, a, a);
    let mut all = vec!["link", "add", "probe0"];
    all.extend(args.iter().map(String::as_str));
    let out = ns.command("ip").args(&all).stdin(Stdio::null()).output();
    out.is_ok_and(|o| o.status.success())
}

impl Tunnel {
    /// Makes a `kind` tunnel; the client end's inner address is `client_in`.
    fn new(node: &Node, kind: &str, client_in: Ipv4Addr) -> Tunnel {
        let lab = &node.lab;
        let dev = short_name(&kind[..2]);
        let server_in = Ipv4Addr::new(
            lab.client_v4.octets()[0],
            lab.client_v4.octets()[1],
            lab.client_v4.octets()[2],
            250,
        );
        for (ns, local, remote, own, peer) in [
            (
                &lab.client,
                lab.client_v4,
                lab.server_v4,
                client_in,
                server_in,
            ),
            (
                &lab.server,
                lab.server_v4,
                lab.client_v4,
                server_in,
                client_in,
            ),
        ] {
            let args = link_args(kind, local, remote);
            let mut all = vec!["link", "add", dev.as_str()];
            all.extend(args.iter().map(String::as_str));
            ns.ip(&all);
            ns.ip(&["link", "set", &dev, "addrgenmode", "none"]);
            ns.ip(&["addr", "add", &format!("{own}/32"), "dev", &dev]);
            ns.ip(&["link", "set", &dev, "up"]);
            ns.ip(&[
                "route",
                "add",
                &format!("{peer}/32"),
                "dev",
                &dev,
                "src",
                &own.to_string(),
            ]);
        }
        Tunnel {
            dev,
            client_in,
            server_in,
        }
    }
}

/// A listener on the server's inner address; a connect from the client's through the tunnel.
/// Returns whether the connect completed and whether the listener saw a connection (from
/// which address).
fn connect_through(node: &Node, t: &Tunnel) -> (bool, Option<IpAddr>) {
    let addr = SocketAddr::new(IpAddr::V4(t.server_in), PROTECTED);
    let listener = node.lab.server.run(move || {
        let l = TcpListener::bind(addr).expect("listening on the inner address");
        l.set_nonblocking(true).expect("nonblocking");
        l
    });
    let src = t.client_in;
    let connected = node.lab.client.run(move || {
        let sock = socket2_connect(src, addr);
        sock.is_some()
    });
    // A SYN that got through and was answered is in the accept queue by now.
    let accepted = listener.accept().ok().map(|(_, peer)| peer.ip());
    (connected, accepted)
}

/// Connects from `src` to `dst` with a 3 s limit (one SYN and its first retransmits).
fn socket2_connect(src: Ipv4Addr, dst: SocketAddr) -> Option<TcpStream> {
    // std has no bind-before-connect: a raw socket, owned at once by a TcpStream.
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(src.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sa` is a valid sockaddr_in for the call.
    let rc = unsafe {
        libc::bind(
            stream.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind {src}: {}", std::io::Error::last_os_error());
    connect_with_timeout(stream, dst, Duration::from_secs(3))
}

/// connect(2) in non-blocking mode with a poll for `limit`.
fn connect_with_timeout(s: TcpStream, dst: SocketAddr, limit: Duration) -> Option<TcpStream> {
    let SocketAddr::V4(d) = dst else {
        panic!("v4 only")
    };
    s.set_nonblocking(true).expect("nonblocking");
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: d.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(d.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sa` is a valid sockaddr_in for the call.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        return None;
    }
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as i32) };
    if n != 1 {
        return None;
    }
    match s.take_error() {
        Ok(None) => Some(s),
        _ => None,
    }
}

/// An unbound client (inner source .200 of the client's /24) through `kind` gets nothing
/// from the protected port, and the kernel counts it `unbound`; the same frame sent plainly
/// over the veth is dropped as `unbound` too, and `explain` says so.
fn unbound_gets_nothing_through(kind: &str) {
    if !kernel_has(kind) {
        eprintln!("skipped: this kernel offers no {kind} devices");
        return;
    }
    let node = Node::new();
    let t = Tunnel::new(&node, kind, host4_v4(&node.lab, 200));
    let _agent = node.start("enforce");
    node.wait_covered(&t.dev);
    let before = node.reason("unbound");
    let (connected, accepted) = connect_through(&node, &t);
    assert!(
        !connected && accepted.is_none(),
        "{kind}: an unbound client reached the protected port through the tunnel \
         (connected {connected}, accepted from {accepted:?})"
    );
    assert_eq!(node.tunnel_gauge("covered"), 1.0);
    let dropped = node.reason("unbound") - before;
    assert!(
        dropped >= 1,
        "{kind}: the tunnelled SYN was not counted unbound"
    );
    // The same inner frame on the plain path, and what `explain` says of it.
    let (verdict, reason) = explain(&node, IpAddr::V4(t.client_in));
    assert_eq!((verdict.as_str(), reason.as_str()), ("drop", "unbound"));
    let plain = plain_verdict(&node, IpAddr::V4(t.client_in));
    assert_eq!(plain, "unbound", "{kind}: the plain path");
    eprintln!("{kind}: tunnelled SYNs dropped as unbound: {dropped}; plain frame: {plain}");
}

fn host4_v4(lab: &Lab, n: u8) -> Ipv4Addr {
    match host4(lab, n) {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    }
}

fn explain(node: &Node, src: IpAddr) -> (String, String) {
    let dst = format!("{}:{PROTECTED}/tcp", node.lab.server_v4);
    let out = node
        .dirs
        .cli_ok(&["explain", &src.to_string(), &dst, "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("explain json");
    (
        v["verdict"].as_str().unwrap_or_default().to_owned(),
        v["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// One TCP SYN from `src` to the protected port straight over the veth: the reason the
/// kernel counted it under.
fn plain_verdict(node: &Node, src: IpAddr) -> &'static str {
    let frame = tollgate_tests::node::frame(src, IpAddr::V4(node.lab.server_v4), PROTECTED, "tcp");
    let before = tollgate::counter_read::reason_totals_from_pin(&node.dirs.counters_pin())
        .expect("counters");
    tollgate_tests::frames::send_frames(&node.lab.client, &node.lab.client_if, &[frame]);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let after = tollgate::counter_read::reason_totals_from_pin(&node.dirs.counters_pin())
            .expect("counters");
        for ((r, a), (_, b)) in after.iter().zip(before.iter()) {
            if a.packets != b.packets {
                return r.label();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the plain frame never reached XDP"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn vxlan_unbound_client_gets_nothing_from_the_protected_port() {
    unbound_gets_nothing_through("vxlan");
}

#[test]
fn other_kinds_unbound_client_gets_nothing_where_the_kernel_has_them() {
    for kind in ["ipip", "gre", "gretap", "geneve"] {
        unbound_gets_nothing_through(kind);
    }
}

/// A bound client (acme, .11) through the tunnel is admitted: its inner address is what the
/// decision sees.
#[test]
fn vxlan_bound_client_is_admitted_by_its_inner_address() {
    let node = Node::new();
    let t = Tunnel::new(&node, "vxlan", host4_v4(&node.lab, 11));
    let _agent = node.start("enforce");
    node.wait_covered(&t.dev);
    let (connected, accepted) = connect_through(&node, &t);
    assert!(connected, "acme's connect through the tunnel failed");
    assert_eq!(accepted, Some(IpAddr::V4(t.client_in)));
}

/// A tunnel made after the agent started is covered within seconds, and enforced.
#[test]
fn vxlan_made_after_start_is_covered_within_seconds() {
    let node = Node::new();
    let _agent = node.start("enforce");
    let t = Tunnel::new(&node, "vxlan", host4_v4(&node.lab, 200));
    let took = node.wait_covered(&t.dev);
    eprintln!("covered {took:?} after it was made");
    let (connected, accepted) = connect_through(&node, &t);
    assert!(!connected && accepted.is_none(), "reached the port");
    // Gone again: the agent lets go of it and says so.
    node.lab.server.ip(&["link", "del", &t.dev]);
    let t0 = Instant::now();
    while node.covered().contains(&t.dev) {
        assert!(t0.elapsed() < COVER_LIMIT, "{} still listed", t.dev);
        std::thread::sleep(Duration::from_millis(100));
    }
    let audit = std::fs::read_to_string(node.dirs.state_dir.join("audit.log")).expect("audit");
    for action in ["\"tunnel_attached\"", "\"tunnel_gone\""] {
        assert!(
            audit.contains(action),
            "no {action} in the audit log:\n{audit}"
        );
    }
}

/// `tunnels = "refuse"` refuses to start while a VXLAN device exists, naming it.
#[test]
fn refuse_policy_refuses_to_start_naming_the_device() {
    let node = Node::new();
    let t = Tunnel::new(&node, "vxlan", host4_v4(&node.lab, 200));
    let config = node.write_config("refuse");
    let mut child = node
        .lab
        .server
        .command(tollgate_bin())
        .args(["run", "--config", &config, "--mode", "native", "--pin-dir"])
        .arg(&node.dirs.pin_dir)
        .arg("--state-dir")
        .arg(&node.dirs.state_dir)
        .arg("--control-socket")
        .arg(&node.dirs.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the agent");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the agent started with a vxlan device and tunnels = refuse");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("refuse") && stderr.contains(&format!("{} (vxlan)", t.dev)),
        "{stderr}"
    );
    eprintln!("refusal: {}", stderr.lines().last().unwrap_or_default());
}

/// `tunnels = "warn"` attaches nothing: the unbound client's connect through the tunnel
/// succeeds (so the bypass the other tests close is real here), and status and the metric say
/// the device is uncovered.
#[test]
fn warn_policy_leaves_the_gap_and_says_so() {
    let node = Node::new();
    let t = Tunnel::new(&node, "vxlan", host4_v4(&node.lab, 200));
    let agent = node.start("warn");
    assert!(node.uncovered().contains(&t.dev), "{}", node.status());
    assert!(node.covered().is_empty());
    let (connected, accepted) = connect_through(&node, &t);
    assert!(
        connected && accepted == Some(IpAddr::V4(t.client_in)),
        "with nothing attached the tunnel should pass"
    );
    assert!(
        agent.stderr().contains("NOT enforced"),
        "{}",
        agent.stderr()
    );
}

/// A layer-3 device: a tun device in the node's namespace, into which the test writes what a
/// VPN daemon writes after decapsulating, a bare IPv4 TCP SYN. The layer-3 entry drops the
/// unbound one (no SYN-ACK comes back out of the tun) and admits the bound one (the kernel
/// answers it).
#[test]
fn tun_device_gets_the_layer3_entry_and_enforces() {
    let node = Node::new();
    let lab = &node.lab;
    let dev = short_name("tn");
    let server_in = host4_v4(lab, 250);
    let name = dev.clone();
    let tun = lab.server.run(move || open_tun(&name));
    lab.server.ip(&["link", "set", &dev, "addrgenmode", "none"]);
    lab.server
        .ip(&["addr", "add", &format!("{server_in}/32"), "dev", &dev]);
    lab.server.ip(&["link", "set", &dev, "up"]);
    // Replies to the two sources go back out of the tun, as a VPN's routes would send them.
    for host in [200, 11] {
        let src = format!("{}/32", host4_v4(lab, host));
        lab.server.ip(&["route", "add", &src, "dev", &dev]);
    }
    let addr = SocketAddr::new(IpAddr::V4(server_in), PROTECTED);
    let _listener = lab
        .server
        .run(move || TcpListener::bind(addr).expect("listen"));
    let _agent = node.start("enforce");
    node.wait_covered(&dev);
    for (host, want_answer) in [(200u8, false), (11, true)] {
        let src = host4_v4(lab, host);
        let frame = PacketBuilder::v4(src.octets(), server_in.octets())
            .tcp(40000 + u16::from(host), PROTECTED)
            .build();
        let syn = with_tcp_checksum(&frame[14..]);
        let before = node.reason("unbound");
        let answered = write_and_wait_for_syn_ack(&tun, &syn, src);
        assert_eq!(
            answered, want_answer,
            "SYN from {src} written into the tun: answered {answered}"
        );
        if !want_answer {
            assert!(node.reason("unbound") > before, "not counted unbound");
        }
    }
    // The traffic first (what matters), then the reason: the layer-3 entry is attached.
    let st = node.status();
    let program = st["tunnels"]["covered"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["device"] == dev.as_str()))
        .map(|d| d["program"].clone());
    assert_eq!(program, Some("tollgate_l3".into()), "{st}");
}

/// Opens /dev/net/tun as `name` (IFF_TUN | IFF_NO_PI), non-blocking, in the calling
/// thread's namespace.
fn open_tun(name: &str) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is laid out as.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    f
}

/// Writes `packet` into the tun and reads what comes out for 1.5 s: whether a TCP SYN-ACK
/// to `src` came back.
fn write_and_wait_for_syn_ack(tun: &std::fs::File, packet: &[u8], src: Ipv4Addr) -> bool {
    let mut w = tun;
    w.write_all(packet).expect("writing into the tun");
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut buf = [0u8; 2048];
    let mut r = tun;
    while Instant::now() < deadline {
        match r.read(&mut buf) {
            Ok(n) if n >= 40 => {
                let p = &buf[..n];
                let ihl = usize::from(p[0] & 0x0f) * 4;
                if p[0] >> 4 == 4
                    && p[9] == 6
                    && p[16..20] == src.octets()
                    && p.len() > ihl + 13
                    && p[ihl + 13] & 0x12 == 0x12
                {
                    return true;
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("reading the tun: {e}"),
        }
    }
    false
}

/// The layer-3 entry in the kernel (BPF_PROG_TEST_RUN, the shared enforcement world): a
/// packet without its Ethernet header, bare or behind the outer IPv4 and GRE headers an NBMA
/// GRE device leaves in front (no kernel here has GRE to send real ones), gets the verdict
/// and reason the Ethernet entry gives the whole frame; what is not IP is dropped.
#[test]
fn layer3_entry_decides_like_the_ethernet_one_in_the_kernel() {
    use tollgate_common::{
        Reason::{self, *},
        decide_cases::{self, id::*, tcp4, tcp6, v4, v6},
        program_names,
    };
    tollgate_tests::require_root();
    let mut h = tollgate_tests::fixture::Harness::new();
    h.install(&decide_cases::enforcement().world);
    let mut run = |program: &'static str, packet: &[u8]| -> (u32, Reason) {
        use aya::programs::{TestRun as _, TestRunOptions};
        let before =
            tollgate::counter_read::reason_totals(h.tables.reason_counters()).expect("counters");
        let prog = tollgate::loader::xdp_program(&mut h.ebpf, program).expect("program");
        let mut out = vec![0u8; packet.len() + 256];
        let ret = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN")
            .return_value;
        let after =
            tollgate::counter_read::reason_totals(h.tables.reason_counters()).expect("counters");
        let moved: Vec<Reason> = after
            .iter()
            .zip(&before)
            .filter(|((_, a), (_, b))| a.packets != b.packets)
            .map(|((r, _), _)| *r)
            .collect();
        assert_eq!(moved.len(), 1, "{program}: one packet moved {moved:?}");
        (ret, moved[0])
    };
    let rows: [(&str, Vec<u8>, Reason); 5] = [
        ("unbound v4", tcp4(v4(1, 77), 8000, 100), Unbound),
        ("unbound v6", tcp6(v6(1, 77), 8001), Unbound),
        (
            "quarantined v4",
            tcp4(v4(1, QUARANTINED as u8), 8000, 100),
            Quarantined,
        ),
        ("bound v4", tcp4(v4(1, CUSTOMER as u8), 8000, 100), Bound),
        ("unprotected v4", tcp4(v4(1, 77), 7, 100), Unprotected),
    ];
    for (desc, frame, want) in rows {
        let (eth, eth_reason) = run(program_names::XDP, &frame);
        assert_eq!((eth, eth_reason), (want.verdict() as u32, want), "{desc}");
        let bare = frame[14..].to_vec();
        for (variant, packet) in [("bare", bare.clone()), ("behind GRE", gre_outer(&bare))] {
            assert_eq!(
                run(program_names::XDP_L3, &packet),
                (eth, eth_reason),
                "{desc}, {variant}: the layer-3 entry decides otherwise"
            );
        }
    }
    // An Ethernet frame handed to the layer-3 entry, and a runt: dropped, never passed.
    let (ret, reason) = run(program_names::XDP_L3, &tcp4(v4(1, 77), 8000, 100));
    assert_eq!((ret, reason), (BadVersion.verdict() as u32, BadVersion));
    // (BPF_PROG_TEST_RUN takes no XDP frame under 14 bytes: a 16-byte IPv4 header stub.)
    let mut stub = bare_v4_header();
    stub.truncate(16);
    let (ret, _) = run(program_names::XDP_L3, &stub);
    assert_eq!(ret, Truncated.verdict() as u32);
}

/// An unbound TCP SYN's IPv4 packet, without its Ethernet header.
fn bare_v4_header() -> Vec<u8> {
    tollgate_common::decide_cases::tcp4(tollgate_common::decide_cases::v4(1, 77), 8000, 100)[14..]
        .to_vec()
}

/// `inner` behind an outer IPv4 header (198.19.0.1 -> .2) and a GRE header with a key.
fn gre_outer(inner: &[u8]) -> Vec<u8> {
    let proto: u16 = if inner[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    let mut gre = vec![0x20, 0];
    gre.extend_from_slice(&proto.to_be_bytes());
    gre.extend_from_slice(&[0, 0, 0, 42]);
    let total = (20 + gre.len() + inner.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 47, 0, 0, 198, 19, 0, 1, 198, 19, 0, 2]);
    p.extend_from_slice(&gre);
    p.extend_from_slice(inner);
    p
}

/// One end of a VXLAN named `dev` with VNI `vni` (two VXLANs on one UDP port need distinct
/// VNIs), outer addresses `local` and `remote`: the device only, down.
fn vxlan_end(ns: &NetNs, dev: &str, vni: u32, local: Ipv4Addr, remote: Ipv4Addr) {
    let (l, r, id) = (local.to_string(), remote.to_string(), vni.to_string());
    ns.ip(&[
        "link", "add", dev, "type", "vxlan", "id", &id, "local", &l, "remote", &r, "dstport",
        "4789",
    ]);
}

/// Brings up a tunnel end made by [`vxlan_end`] with inner address `own` and a route to
/// `peer` through it, as [`Tunnel::new`] does.
fn inner_end(ns: &NetNs, dev: &str, own: Ipv4Addr, peer: Ipv4Addr) {
    ns.ip(&["link", "set", dev, "addrgenmode", "none"]);
    ns.ip(&["addr", "add", &format!("{own}/32"), "dev", dev]);
    ns.ip(&["link", "set", dev, "up"]);
    ns.ip(&[
        "route",
        "add",
        &format!("{peer}/32"),
        "dev",
        dev,
        "src",
        &own.to_string(),
    ]);
}

/// A covered VXLAN renamed, and a new VXLAN given its old name (#12 review, HIGH): the kernel's
/// link went along with the renamed device, so the pin named for the old name is on the wrong
/// device. Swapping the program into it would record the new device covered while it runs
/// nothing. Both devices must run the program, and an unbound SYN through the new one must be
/// dropped.
#[test]
fn vxlan_renamed_and_its_name_reused_leaves_both_devices_enforced() {
    // The agent deals with devices in name order: the renamed one first ("vr" < "vx"), and
    // last ("vz").
    for prefix in ["vr", "vz"] {
        renamed_and_name_reused(prefix);
    }
}

fn renamed_and_name_reused(prefix: &str) {
    let node = Node::new();
    let old = Tunnel::new(&node, "vxlan", host4_v4(&node.lab, 200));
    let agent = node.start("enforce");
    node.wait_covered(&old.dev);
    let renamed = short_name(prefix);
    let new = Tunnel {
        dev: old.dev.clone(),
        client_in: host4_v4(&node.lab, 201),
        server_in: host4_v4(&node.lab, 249),
    };
    let (lab, vni) = (&node.lab, 43);
    // The client's end first: the agent does not see it.
    lab.client.ip(&["link", "set", &old.dev, "down"]);
    lab.client.ip(&["link", "set", &old.dev, "name", &renamed]);
    vxlan_end(&lab.client, &new.dev, vni, lab.client_v4, lab.server_v4);
    inner_end(&lab.client, &new.dev, new.client_in, new.server_in);
    // The server's: the new device right after the rename (a VXLAN cannot be renamed while
    // up), so that the agent's next look finds both; one that fell between them would see the
    // old name gone, which is another path (a plain rename).
    lab.server.ip(&["link", "set", &old.dev, "down"]);
    lab.server.ip(&["link", "set", &old.dev, "name", &renamed]);
    vxlan_end(&lab.server, &new.dev, vni, lab.server_v4, lab.client_v4);
    lab.server.ip(&["link", "set", &renamed, "up"]);
    inner_end(&lab.server, &new.dev, new.server_in, new.client_in);
    // Settled once the agent has dealt with the renamed device (covered or not).
    let t0 = Instant::now();
    loop {
        let (covered, uncovered) = (node.covered(), node.uncovered());
        if covered.contains(&new.dev)
            && (covered.contains(&renamed) || uncovered.contains(&renamed))
        {
            break;
        }
        assert!(
            t0.elapsed() < COVER_LIMIT,
            "the agent did not settle on {} and {renamed} within {COVER_LIMIT:?}: {}",
            new.dev,
            node.status()["tunnels"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let server = &node.lab.server;
    for dev in [&new.dev, &renamed] {
        assert!(
            server.xdp_attach(dev).is_some(),
            "{dev} runs no XDP program after {} was renamed {renamed} and a new {} made; \
             status: {}; agent log:\n{}",
            old.dev,
            new.dev,
            node.status()["tunnels"],
            agent.stderr()
        );
    }
    assert_eq!(
        node.covered(),
        {
            let mut v = vec![new.dev.clone(), renamed.clone()];
            v.sort();
            v
        },
        "both devices covered; agent log:\n{}",
        agent.stderr()
    );
    // What the agent said of the pin (naming both ifindexes where the name's own pin was on
    // the renamed device).
    let log = agent.stderr();
    let moved = format!("its pin moves to {renamed}");
    for line in log.lines().filter(|l| l.contains(&moved)) {
        eprintln!("{prefix}: {line}");
    }
    let before = node.reason("unbound");
    let (connected, accepted) = connect_through(&node, &new);
    assert!(
        !connected && accepted.is_none(),
        "an unbound client reached the protected port through the new {} (connected \
         {connected}, accepted from {accepted:?})",
        new.dev
    );
    assert!(
        node.reason("unbound") > before,
        "the SYN through the new {} was not counted unbound",
        new.dev
    );
}

/// The same at start, for a configured interface (the daemon's start loop): a device named in
/// `[node] interfaces` is renamed while the agent is down and a new one given its name. The
/// restarted agent must attach to the new device, not swap its program into the link that
/// went along with the renamed one; the renamed device, configured under no name, is let go.
/// Veth devices (with their peers in the same namespace): no tunnel, so only the start loop
/// deals with them.
#[test]
fn configured_device_renamed_while_down_and_its_name_reused_gets_its_own_link() {
    let node = Node::new();
    let server = &node.lab.server;
    let (dev, renamed) = (short_name("dm"), short_name("dm"));
    let veth = |name: &str| {
        let peer = short_name("dp");
        server.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        server.ip(&["link", "set", name, "up"]);
    };
    veth(&dev);
    let mut c = config(&node.lab).tunnels("enforce").listen_metrics(METRICS);
    c.node.interfaces.push(dev.clone());
    let path = c.write(&node.dirs.state_dir.join("tollgate.toml"));
    let path = path.to_str().expect("utf-8 path");
    // Generic, as on tunnels: the same on every kind of device.
    let args = ["--config", path, "--mode", "generic"];
    let agent = Agent::launch(server, &node.dirs, &args);
    assert!(server.xdp_attach(&dev).is_some(), "{dev} not attached");
    agent.kill9();
    server.ip(&["link", "set", &dev, "down"]);
    server.ip(&["link", "set", &dev, "name", &renamed]);
    server.ip(&["link", "set", &renamed, "up"]);
    veth(&dev);
    let agent = Agent::launch(server, &node.dirs, &args);
    let log = agent.stderr();
    assert!(
        server.xdp_attach(&dev).is_some(),
        "the new {dev} runs no XDP program after the old one was renamed {renamed}; agent \
         log:\n{log}"
    );
    assert!(
        server.xdp_attach(&renamed).is_none(),
        "{renamed} (configured as {dev} before it was renamed) still runs the program; agent \
         log:\n{log}"
    );
    assert!(
        !tollgate::pins::link_path(&node.dirs.pin_dir, &renamed).exists(),
        "a link pin was left for {renamed}"
    );
    for line in log.lines().filter(|l| l.contains("tollgate::pins")) {
        eprintln!("{line}");
    }
}

/// A covered tunnel stays enforced while the agent is down (its link is pinned like an
/// interface's), and a restart adopts the pin.
#[test]
fn vxlan_stays_enforced_across_kill_dash_nine_and_a_restart_adopts_it() {
    let node = Node::new();
    let t = Tunnel::new(&node, "vxlan", host4_v4(&node.lab, 200));
    let agent = node.start("enforce");
    node.wait_covered(&t.dev);
    agent.kill9();
    assert!(
        tollgate::pins::link_path(&node.dirs.pin_dir, &t.dev).exists(),
        "no link pin for {}",
        t.dev
    );
    let (connected, accepted) = connect_through(&node, &t);
    assert!(
        !connected && accepted.is_none(),
        "reached the port with the agent down"
    );
    let _agent = node.start("enforce");
    node.wait_covered(&t.dev);
    let (connected, accepted) = connect_through(&node, &t);
    assert!(
        !connected && accepted.is_none(),
        "reached the port after the restart"
    );
}
