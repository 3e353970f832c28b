//! Upgrades (#12): a new build of the same layout replaces the running program with no
//! moment without a program attached and every budget kept; a new program the verifier
//! refuses leaves the old one enforcing, the error reaches the CLI and the metrics, the
//! process exits non-zero, and a restart of the old build adopts everything. (Pins of an
//! incompatible layout are refused and left enforcing: `agent.rs`
//! `pins_from_an_incompatible_build_are_refused_and_left_enforcing`.)
//!
//! "A new build" is the agent loading its program from a file (`run --program-object`), the
//! way a rebuilt program is staged; the broken build is that object with the enforcing
//! program's first instruction patched to read a register the verifier knows is unset.
//! Patching costs nothing in CI; a cargo feature of the ebpf crate would be a second BPF
//! build of several minutes.

use std::{
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::{Agent, AgentDirs, tollgate_bin},
    config::{Identity, Plan},
    frames::FrameBlaster,
    lab::{Lab, NetNs},
    node::{World, config, frame, host4},
};

const METRICS: &str = "127.0.0.1:9472";

/// The node world plus a byte-limited identity (`trickler`, .15: 1 B/s, burst 1518 B, so
/// 14 frames spend it and each later frame waits ~2 minutes) and one with a day quota of 500 bytes (`daily`,
/// .16), both customers on vllm.
fn world() -> World {
    tollgate_tests::require_root();
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let h = |n| host4(&lab, n).to_string();
    let config = config(&lab)
        .listen_metrics(METRICS)
        .plan(Plan::new("trickle").bytes(1, 1518))
        .plan(Plan {
            quota_day_bytes: Some(500),
            ..Plan::new("daily")
        })
        .identity(Identity::new("trickler", "customer", "trickle", &[h(15)]).roles(&["inference"]))
        .identity(Identity::new("daily", "customer", "daily", &[h(16)]).roles(&["inference"]))
        .write(&dirs.state_dir.join("tollgate.toml"));
    World { lab, dirs, config }
}

fn args<'a>(w: &'a World, object: Option<&'a Path>) -> Vec<&'a str> {
    let mut a = vec![
        "--config",
        w.config.to_str().expect("utf-8 path"),
        "--mode",
        "native",
    ];
    if let Some(o) = object {
        a.extend(["--program-object", o.to_str().expect("utf-8 path")]);
    }
    a
}

/// Frames from each source until it is refused with `reason` (bounded).
fn spend(w: &World, src: IpAddr, reason: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if w.real_verdict(src, 8000, "tcp") == reason {
            return;
        }
        assert!(Instant::now() < deadline, "{src} never got {reason}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The budget-kept cases: (source, the reason it gets once spent).
fn spent_cases(w: &World) -> [(IpAddr, &'static str); 4] {
    let h = |n| host4(&w.lab, n);
    [
        (h(11), "bound"),           // acme: 1000/s, far from it
        (h(13), "quarantined"),     // suspect
        (h(15), "byte_rate"),       // trickler: its byte burst spent
        (h(16), "quota_exhausted"), // daily: its day quota spent
    ]
}

/// Every ~millisecond, the XDP program id on an interface as the kernel reports it over
/// rtnetlink (RTM_GETLINK, IFLA_XDP_PROG_ID): one socket, two syscalls a sample.
struct XdpSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Samples>>,
}

#[derive(Debug, Default)]
struct Samples {
    taken: u64,
    /// Samples that found no program attached.
    unattached: u64,
    /// Program ids in the order they were seen.
    ids: Vec<u32>,
    /// The longest time between two samples.
    max_gap: Duration,
}

impl XdpSampler {
    fn start(ns: &NetNs, ifname: &str) -> XdpSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let ifname = std::ffi::CString::new(ifname).expect("name");
        let thread = ns.spawn(move || {
            // SAFETY: a C string; returns 0 for an unknown name.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) } as i32;
            assert!(ifindex > 0, "no such interface");
            // SAFETY: plain socket creation.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            assert!(fd >= 0, "netlink socket");
            let mut s = Samples::default();
            let mut buf = vec![0u8; 64 * 1024];
            let mut last = Instant::now();
            let mut seq = 0;
            while !flag.load(Ordering::Relaxed) {
                seq += 1;
                let id = xdp_prog_id(fd, ifindex, seq, &mut buf);
                let now = Instant::now();
                s.max_gap = s.max_gap.max(now - last);
                last = now;
                s.taken += 1;
                if id == 0 {
                    s.unattached += 1;
                } else if s.ids.last() != Some(&id) {
                    s.ids.push(id);
                }
                std::thread::sleep(Duration::from_micros(900));
            }
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            s
        });
        XdpSampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("sampler")
    }
}

impl Drop for XdpSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The XDP program id attached to `ifindex` (0: none), from one RTM_GETLINK.
fn xdp_prog_id(fd: i32, ifindex: i32, seq: u32, buf: &mut [u8]) -> u32 {
    // struct nlmsghdr + struct ifinfomsg.
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    req[20..24].copy_from_slice(&ifindex.to_ne_bytes());
    // SAFETY: sending and receiving on our socket with buffers of the given lengths.
    let sent = unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) };
    assert_eq!(
        sent,
        32,
        "netlink send: {}",
        std::io::Error::last_os_error()
    );
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n > 0, "netlink recv: {}", std::io::Error::last_os_error());
    let u16_at = |b: &[u8], o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4"));
    let len = (u32_at(buf, 0) as usize).min(n as usize);
    assert_eq!(
        u16_at(buf, 4),
        libc::RTM_NEWLINK,
        "netlink answered type {}",
        u16_at(buf, 4)
    );
    // Attributes after the headers; IFLA_XDP (43) nests IFLA_XDP_PROG_ID (4).
    let attrs = |from: usize, to: usize| {
        let mut out = Vec::new();
        let mut o = from;
        while o + 4 <= to {
            let alen = u16_at(buf, o) as usize;
            if alen < 4 {
                break;
            }
            out.push((u16_at(buf, o + 2) & 0x3fff, o + 4, o + alen));
            o += alen.div_ceil(4) * 4;
        }
        out
    };
    for (ty, from, to) in attrs(32, len) {
        if ty == 43 {
            for (ty, from, _) in attrs(from, to) {
                if ty == 4 {
                    return u32_at(buf, from);
                }
            }
        }
    }
    0
}

/// Counts IPv4 frames from `src` that reach the server's stack (an AF_PACKET tap sees what
/// XDP passed, never what it dropped).
struct ServerTap {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl ServerTap {
    fn start(ns: &NetNs, ifname: &str, src: IpAddr) -> ServerTap {
        let IpAddr::V4(src) = src else {
            panic!("an IPv4 source")
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let ifname = std::ffi::CString::new(ifname).expect("name");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket, bind and setsockopt on our own descriptor with valid structs.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
            assert!(fd >= 0, "packet socket");
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) } as i32;
            let r = unsafe {
                libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            ready_tx.send(()).expect("ready");
            let mut seen = 0u64;
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n >= 34 && buf[12..14] == [0x08, 0x00] && buf[26..30] == src.octets() {
                    seen += 1;
                }
            }
            unsafe { libc::close(fd) };
            seen
        });
        ready_rx.recv().expect("the tap started");
        ServerTap {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("tap")
    }
}

impl Drop for ServerTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn scrape(ns: &NetNs) -> String {
    tollgate_tests::scrape::scrape_within(
        ns,
        METRICS.parse().expect("addr"),
        Duration::from_secs(10),
    )
}

/// The embedded object written to a file, as a rebuilt program would be staged.
fn staged_object(dir: &Path, name: &str, patch: impl FnOnce(&mut [u8])) -> PathBuf {
    let mut bytes = tollgate::object::embedded().to_vec();
    patch(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("writing the object");
    path
}

/// Where the code of ELF symbol `name` starts in the file (ELF64, little-endian).
fn symbol_offset(elf: &[u8], name: &str) -> usize {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().expect("4")) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8")) as usize;
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    for i in 0..shnum {
        let sh = section(i);
        if u32_at(sh + 4) != 2 {
            continue; // not SHT_SYMTAB
        }
        let (off, size, entsize) = (u64_at(sh + 0x18), u64_at(sh + 0x20), u64_at(sh + 0x38));
        let strtab = u64_at(section(u32_at(sh + 0x28)) + 0x18);
        for s in (off..off + size).step_by(entsize) {
            let at = strtab + u32_at(s);
            let end = at + elf[at..].iter().position(|b| *b == 0).expect("a C string");
            if &elf[at..end] == name.as_bytes() {
                let shndx = u16_at(s + 6);
                return u64_at(section(shndx) + 0x18) + u64_at(s + 8);
            }
        }
    }
    panic!("no symbol {name} in the object");
}

/// Replaces the enforcing program's first instruction with `r0 = r5`: R5 is not set at
/// entry, so the verifier refuses the program ("R5 !read_ok"); maps and relocations are
/// untouched, so the object still fits the pins.
fn break_the_program(elf: &mut [u8]) {
    let at = symbol_offset(elf, tollgate_common::program_names::XDP);
    // BPF_ALU64 | BPF_MOV | BPF_X (0xbf), dst r0, src r5, off 0, imm 0.
    elf[at..at + 8].copy_from_slice(&[0xbf, 0x50, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn a_new_build_takes_over_with_no_moment_unattached_and_every_budget_kept() {
    let w = world();
    let agent = w.start();
    w.dirs
        .cli_ok(&["quarantine", "suspect", "--reason", "upgrade test"]);
    let h = |n| host4(&w.lab, n);
    spend(&w, h(15), "byte_rate", Duration::from_secs(5));
    spend(&w, h(16), "quota_exhausted", Duration::from_secs(10));
    let cases = spent_cases(&w);
    for (src, want) in cases {
        assert_eq!(w.real_verdict(src, 8000, "tcp"), want, "{src} before");
    }
    let object = staged_object(&w.dirs.state_dir, "tollgate-new.o", |_| {});

    // A steady stream of unbound frames; none may reach the server while the program is
    // swapped, and a program must be attached at every sample.
    let unbound = h(199);
    let tap = ServerTap::start(&w.lab.server, &w.lab.server_if, unbound);
    let sampler = XdpSampler::start(&w.lab.server, &w.lab.server_if);
    let blaster = FrameBlaster::start(
        &w.lab.client,
        &w.lab.client_if,
        frame(unbound, w.dst(unbound), 8001, "udp"),
        2000,
    );
    std::thread::sleep(Duration::from_millis(200));
    let stopped = agent.stop();
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.stderr);
    let b = Agent::launch(&w.lab.server, &w.dirs, &args(&w, Some(&object)));
    std::thread::sleep(Duration::from_millis(200));
    // (Stopped before the verdicts below: they read the shared reason counters.)
    let sent = blaster.stop();
    // Right after the new program took over: the budgets are where they were.
    let after: Vec<&str> = cases
        .iter()
        .map(|(src, _)| w.real_verdict(*src, 8000, "tcp"))
        .collect();
    let samples = sampler.finish();
    let passed = tap.finish();
    eprintln!("unbound frames sent {sent}, reached the server {passed}; samples {samples:?}");
    assert_eq!(
        samples.unattached, 0,
        "no program attached in {} of {} samples",
        samples.unattached, samples.taken
    );
    assert_eq!(
        samples.ids.len(),
        2,
        "the program id should change once: {:?}",
        samples.ids
    );
    assert!(samples.taken > 100, "too few samples: {samples:?}");
    assert!(sent > 100, "the stream did not run: {sent}");
    assert_eq!(
        passed, 0,
        "unbound frames reached the server during the upgrade"
    );
    let want: Vec<&str> = cases.iter().map(|(_, r)| *r).collect();
    assert_eq!(after, want, "a budget was reset by the upgrade");
    let status: serde_json::Value =
        serde_json::from_str(&w.dirs.cli_ok(&["status", "--output", "json"])).expect("json");
    assert_eq!(status["adopted_pins"], true);
    assert_eq!(
        status["program"]["object"],
        object.display().to_string(),
        "{status}"
    );
    drop(b);
}

#[test]
fn a_program_the_verifier_refuses_leaves_the_old_one_enforcing_and_is_reported() {
    let w = world();
    let agent = w.start();
    w.dirs
        .cli_ok(&["quarantine", "suspect", "--reason", "upgrade test"]);
    let h = |n| host4(&w.lab, n);
    spend(&w, h(15), "byte_rate", Duration::from_secs(5));
    let cases = [
        (h(10), "bound"),
        (h(13), "quarantined"),
        (h(15), "byte_rate"),
        (h(199), "unbound"),
    ];
    for (src, want) in cases {
        assert_eq!(w.real_verdict(src, 8000, "tcp"), want, "{src} before");
    }
    let broken = staged_object(&w.dirs.state_dir, "tollgate-broken.o", break_the_program);
    let sampler = XdpSampler::start(&w.lab.server, &w.lab.server_if);
    let stopped = agent.stop();
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.stderr);

    // The upgrade: the new process fails, says why, and exits non-zero.
    let mut cmd = w.lab.server.command(tollgate_bin());
    cmd.arg("run")
        .arg("--pin-dir")
        .arg(&w.dirs.pin_dir)
        .arg("--state-dir")
        .arg(&w.dirs.state_dir)
        .arg("--control-socket")
        .arg(&w.dirs.socket)
        .args(args(&w, Some(&broken)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent with the broken program did not exit: it runs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(6), "{err}");
    assert!(
        err.contains("verifier") && err.contains("R5 !read_ok"),
        "the verifier's message is not on stderr:\n{err}"
    );
    // The old program never left and still enforces as before.
    let samples = sampler.finish();
    eprintln!("samples during the failed upgrade: {samples:?}");
    assert_eq!(
        (samples.unattached, samples.ids.len()),
        (0, 1),
        "the old program was detached or replaced: {samples:?}"
    );
    for (src, want) in cases {
        assert_eq!(
            w.real_verdict(src, 8000, "tcp"),
            want,
            "{src} with no agent"
        );
    }

    // systemd restarts the old build: it adopts everything and reports the failure.
    let _old = w.start();
    for (src, want) in cases {
        assert_eq!(
            w.real_verdict(src, 8000, "tcp"),
            want,
            "{src} after the restart"
        );
    }
    let status: serde_json::Value =
        serde_json::from_str(&w.dirs.cli_ok(&["status", "--output", "json"])).expect("json");
    assert_eq!(status["adopted_pins"], true, "{status}");
    assert_eq!(status["program"]["object"], "embedded", "{status}");
    assert_eq!(status["program"]["load_failures"], 1, "{status}");
    let last = status["program"]["last_load_failure"]
        .as_str()
        .unwrap_or_default();
    assert!(
        last.contains("tollgate-broken.o") && last.contains("R5 !read_ok"),
        "{status}"
    );
    let body = scrape(&w.lab.server);
    assert!(
        body.lines()
            .any(|l| l == "tollgate_program_load_failures_total 1"),
        "{}",
        body.lines()
            .filter(|l| l.contains("program_load"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
