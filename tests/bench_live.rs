//! `cargo xtask bench`: what a flood costs the node, against the kernel's own filters.
//!
//! Live frames: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES injects frames as if
//! received on a namespace's interface (its ifindex in `ctx_in`); an `XDP_PASS` frame really
//! goes through the stack (skb, netfilter, socket). Every program run this way is attached
//! (an unattached one waits for an RCU grace period per run): tollgate natively on the lab's
//! interface, the empty drop and pass programs in generic mode on a veth that stays down.
//! Rows, interleaved in rounds: empty XDP drop; tollgate dropping an unbound flood; XDP pass +
//! an nftables allow-list set at prerouting −300; XDP pass + an iptables (nft backend) raw
//! `hashlimit`; the pass path: tollgate passing a bound frame vs the empty pass program, both
//! into a UDP socket. Outcomes are checked with counters (the run returns 0 in this mode).
//!
//! End to end: `hping3 --flood --rand-source` from an attacker namespace into the node while
//! a bound client sends as fast as it can: the client's delivered rate with and without it.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::xdp::XdpMode;
use aya_obj::generated::{BPF_F_TEST_XDP_LIVE_FRAMES, bpf_attr, bpf_cmd};
use tollgate::{
    counter_read, loader,
    tables::{EndpointSpec, KernelTables, PlanLimits, Proto, identity_record},
};
use tollgate_common::{Reason, packet::PacketBuilder, policy::Class, program_names};
use tollgate_tests::{
    bench::{Figures, median, quartiles, quick},
    lab::{Lab, NetNs, veth_pair},
};

const PORT: u16 = 7000;

fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, b) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(b, 16).expect("mac");
    }
    m
}

/// A 64-byte UDP frame (60 + FCS on the wire) from `src` to the lab's server, addressed to
/// its interface's MAC (the stack drops frames for another host before netfilter).
fn frame(lab: &Lab, src: Ipv4Addr) -> Vec<u8> {
    let mut f = PacketBuilder::v4(src.octets(), lab.server_v4.octets())
        .udp(40000, PORT)
        .payload(18)
        .build();
    f[..6].copy_from_slice(&mac(&lab.server_mac));
    f[6..12].copy_from_slice(&mac(&lab.client_mac));
    f
}

/// One live-frames BPF_PROG_TEST_RUN of `prog` in the calling thread's namespace: `repeat`
/// copies of `frame` received on `ifindex`. The mean ns per frame.
fn live_run(prog: BorrowedFd<'_>, frame: &[u8], ifindex: u32, repeat: u32) -> f64 {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex; data_end must be the frame's length.
    let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    // SAFETY: an all-zero bpf_attr is valid; the test fields are set below.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain integers into the union's test member.
    unsafe {
        let t = &mut attr.test;
        t.prog_fd = prog.as_raw_fd() as u32;
        t.data_in = frame.as_ptr() as u64;
        t.data_size_in = frame.len() as u32;
        t.ctx_in = ctx.as_ptr() as u64;
        t.ctx_size_in = std::mem::size_of_val(&ctx) as u32;
        t.repeat = repeat;
        t.flags = BPF_F_TEST_XDP_LIVE_FRAMES;
    }
    // SAFETY: the frame and context outlive the call; nothing is written back but the attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_TEST_RUN as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    assert!(
        r == 0,
        "live-frames test run: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the duration the kernel wrote back (mean ns per frame).
    f64::from(unsafe { attr.test.duration })
}

fn ifindex(ns: &NetNs, ifname: &str) -> u32 {
    let name = std::ffi::CString::new(ifname).expect("ifname");
    // SAFETY: a NUL-terminated name.
    let i = ns.run(move || unsafe { libc::if_nametoindex(name.as_ptr()) });
    assert!(i != 0, "no interface {ifname}");
    i
}

fn checked(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packets an nft rule counter in `ns` has seen (`nft list table inet bench`).
fn nft_dropped(ns: &NetNs) -> u64 {
    let out = checked(ns.command("nft").args(["list", "table", "inet", "tgbench"]));
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The packets the hashlimit rule in `ns` dropped (`iptables -t raw -vnxL PREROUTING`).
fn ipt_dropped(ns: &NetNs) -> u64 {
    let out = checked(
        ns.command("iptables")
            .args(["-t", "raw", "-vnxL", "PREROUTING"]),
    );
    out.lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Row {
    name: &'static str,
    key: &'static str,
}

const ROWS: [Row; 6] = [
    Row {
        name: "empty XDP drop (baseline)",
        key: "empty_drop",
    },
    Row {
        name: "tollgate: unbound flood dropped",
        key: "tollgate_unbound",
    },
    Row {
        name: "XDP pass + nftables allow-list set (prerouting −300)",
        key: "nft",
    },
    Row {
        name: "XDP pass + iptables raw hashlimit (nft backend)",
        key: "iptables",
    },
    Row {
        name: "empty XDP pass into a UDP socket",
        key: "empty_pass",
    },
    Row {
        name: "tollgate: bound frame passed into a UDP socket",
        key: "tollgate_bound",
    },
];

fn main() {
    tollgate_tests::require_root();
    for tool in ["nft", "iptables", "hping3"] {
        assert!(
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "{tool} is not installed: run `sudo cargo xtask setup`"
        );
    }
    let quick = quick();
    let (rounds, repeat) = if quick { (3, 500_000) } else { (15, 3_000_000) };
    let mut figures = Figures::default();

    // The node: tollgate natively on the lab's server interface, one bound client.
    let lab = Lab::new();
    let mut ebpf = loader::load().expect("loading the program");
    loader::xdp_program(&mut ebpf, program_names::BENCH_DROP)
        .expect("program")
        .load()
        .expect("loading bench_drop");
    let mut tables = KernelTables::from_ebpf(&mut ebpf).expect("policy maps");
    tables
        .set_endpoint(
            1,
            &EndpointSpec {
                proto: Proto::Udp,
                ports: PORT..=PORT + 1,
                v4_prefix: None,
                v6_prefix: None,
                weight: 1.0,
                allowed_classes: vec![Class::Customer],
                roles: 0,
                anonymous: false,
            },
        )
        .expect("endpoint");
    let roomy = PlanLimits {
        packets_per_s: Some(1_000_000_000_000),
        packet_burst: 1_000_000_000_000,
        bytes_per_s: None,
        byte_burst: 0,
    };
    tables
        .set_identity(1, &identity_record(Class::Customer, 1, 0, &roomy))
        .expect("identity");
    tables
        .bind(lab.client_v4.into(), 32, 1, 0)
        .expect("bind the client");
    let server_if = lab.server_if.clone();
    let pid = std::process::id();
    let (down_a, down_b) = (format!("tgb{pid:x}a"), format!("tgb{pid:x}b"));
    veth_pair(&lab.server, &down_a, &lab.server, &down_b);
    {
        let ebpf = &mut ebpf;
        lab.server.run(move || {
            for (name, ifname, mode) in [
                (program_names::XDP, server_if.as_str(), XdpMode::Driver),
                (program_names::BENCH_DROP, down_a.as_str(), XdpMode::Skb),
                (program_names::NOOP, down_b.as_str(), XdpMode::Skb),
            ] {
                loader::xdp_program(ebpf, name)
                    .expect("program")
                    .attach(ifname, mode)
                    .unwrap_or_else(|e| panic!("attaching {name} to {ifname}: {e}"));
            }
        });
    }
    let fd = |ebpf: &mut aya::Ebpf, name: &'static str| {
        loader::xdp_program(ebpf, name)
            .expect("program")
            .fd()
            .expect("fd")
            .try_clone()
            .expect("dup")
    };
    let (tollgate, drop, pass) = (
        fd(&mut ebpf, program_names::XDP),
        fd(&mut ebpf, program_names::BENCH_DROP),
        fd(&mut ebpf, program_names::NOOP),
    );
    // A socket the passed frames land in, never read: each frame costs the full delivery
    // (lookup, enqueue or a full-buffer drop) the same way for both pass rows.
    let server_v4 = lab.server_v4;
    let _sink = lab
        .server
        .run(move || UdpSocket::bind(SocketAddrV4::new(server_v4, PORT)).expect("bind the sink"));

    // The comparison namespaces: same lab shape, no tollgate; the filter drops what XDP
    // passed. A stranger's address is the flood's source everywhere.
    let nft_lab = Lab::new();
    let nft_rules = format!(
        "table inet tgbench {{\n\
         \tset allow {{ type ipv4_addr; elements = {{ {} }}; }}\n\
         \tchain pre {{\n\
         \t\ttype filter hook prerouting priority -300; policy accept;\n\
         \t\tip saddr != @allow counter drop\n\
         \t}}\n\
         }}\n",
        nft_lab.client_v4
    );
    let rules = std::env::temp_dir().join(format!("tg-{}-bench.nft", std::process::id()));
    std::fs::write(&rules, nft_rules).expect("writing the nft rules");
    let loaded = nft_lab
        .server
        .command("nft")
        .arg("-f")
        .arg(&rules)
        .stdin(Stdio::null())
        .output()
        .expect("nft");
    let _ = std::fs::remove_file(&rules);
    assert!(
        loaded.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let ipt_lab = Lab::new();
    checked(ipt_lab.server.command("iptables").args([
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-m",
        "hashlimit",
        "--hashlimit-above",
        "1000/sec",
        "--hashlimit-burst",
        "100",
        "--hashlimit-mode",
        "srcip",
        "--hashlimit-name",
        "tgbench",
        "-j",
        "DROP",
    ]));
    let stranger = |l: &Lab| {
        let o = l.client_v4.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 200)
    };
    let jobs: Vec<(&NetNs, u32, Vec<u8>, &aya::programs::ProgramFd)> = vec![
        (
            &lab.server,
            ifindex(&lab.server, &lab.server_if),
            frame(&lab, stranger(&lab)),
            &drop,
        ),
        (
            &lab.server,
            ifindex(&lab.server, &lab.server_if),
            frame(&lab, stranger(&lab)),
            &tollgate,
        ),
        (
            &nft_lab.server,
            ifindex(&nft_lab.server, &nft_lab.server_if),
            frame(&nft_lab, stranger(&nft_lab)),
            &pass,
        ),
        (
            &ipt_lab.server,
            ifindex(&ipt_lab.server, &ipt_lab.server_if),
            frame(&ipt_lab, stranger(&ipt_lab)),
            &pass,
        ),
        (
            &lab.server,
            ifindex(&lab.server, &lab.server_if),
            frame(&lab, lab.client_v4),
            &pass,
        ),
        (
            &lab.server,
            ifindex(&lab.server, &lab.server_if),
            frame(&lab, lab.client_v4),
            &tollgate,
        ),
    ];
    let run = |j: &(&NetNs, u32, Vec<u8>, &aya::programs::ProgramFd), n: u32| {
        let (ns, ifi, f, p) = j;
        let p = p.as_fd();
        ns.run(move || live_run(p, f, *ifi, n))
    };

    // Check that each row does what it is named for before timing it.
    let reason = |r: Reason| -> u64 {
        counter_read::reason_endpoint_totals(tables.reason_counters())
            .expect("counters")
            .iter()
            .filter(|(x, _, _)| *x == r)
            .map(|(_, _, c)| c.packets)
            .sum()
    };
    let n = 10_000;
    let (u0, b0) = (reason(Reason::Unbound), reason(Reason::Bound));
    run(&jobs[1], n);
    run(&jobs[5], n);
    assert_eq!(
        reason(Reason::Unbound) - u0,
        u64::from(n),
        "tollgate unbound drops"
    );
    assert_eq!(
        reason(Reason::Bound) - b0,
        u64::from(n),
        "tollgate bound passes"
    );
    let nft0 = nft_dropped(&nft_lab.server);
    run(&jobs[2], n);
    assert!(
        nft_dropped(&nft_lab.server) - nft0 >= u64::from(n),
        "the nftables allow-list did not drop the flood"
    );
    let ipt0 = ipt_dropped(&ipt_lab.server);
    run(&jobs[3], n);
    assert!(
        ipt_dropped(&ipt_lab.server) - ipt0 >= u64::from(n) - 200,
        "the hashlimit rule did not drop the flood"
    );

    let mut ns_per = vec![Vec::new(); ROWS.len()];
    let started = Instant::now();
    for round in 0..rounds {
        let this: Vec<f64> = jobs.iter().map(|j| run(j, repeat)).collect();
        for (i, t) in this.iter().enumerate() {
            ns_per[i].push(*t);
        }
        eprintln!(
            "[bench_live] round {}/{rounds} ({:.0} s)",
            round + 1,
            started.elapsed().as_secs_f64()
        );
    }
    // Same-round ratios and differences.
    let per_round = |f: &dyn Fn(usize) -> f64| (0..rounds).map(f).collect::<Vec<f64>>();
    let unbound_vs_empty = per_round(&|r| ns_per[1][r] / ns_per[0][r]);
    let nft_vs_tollgate = per_round(&|r| ns_per[2][r] / ns_per[1][r]);
    let ipt_vs_tollgate = per_round(&|r| ns_per[3][r] / ns_per[1][r]);
    let pass_added = per_round(&|r| ns_per[5][r] - ns_per[4][r]);
    println!(
        "| live frames, 64-byte frames ({rounds} rounds × {repeat}) | ns/frame | IQR | × empty drop (same round) |"
    );
    println!("|---|---:|---:|---:|");
    for (i, row) in ROWS.iter().enumerate() {
        let m = median(&ns_per[i]);
        let (q1, q3) = quartiles(&ns_per[i]);
        let ratio = median(&per_round(&|r| ns_per[i][r] / ns_per[0][r]));
        println!("| {} | {m:.0} | {q1:.0}–{q3:.0} | {ratio:.2} |", row.name);
        figures.set(format!("live.{}.ns", row.key), m);
        figures.set(format!("live.{}.ratio_empty_drop", row.key), ratio);
    }
    let (a, b, c, d) = (
        median(&unbound_vs_empty),
        median(&nft_vs_tollgate),
        median(&ipt_vs_tollgate),
        median(&pass_added),
    );
    figures.set("live.unbound_vs_empty_drop", a);
    figures.set("live.nft_vs_tollgate", b);
    figures.set("live.iptables_vs_tollgate", c);
    figures.set("live.bound_pass_added_ns", d);
    println!();
    println!(
        "Same-round medians: tollgate's unbound drop = **{a:.2}×** the empty drop; the nftables \
         allow-list costs **{b:.2}×** tollgate's drop, iptables hashlimit **{c:.2}×**; a bound \
         frame through tollgate into the stack costs **{d:+.0} ns** over the same frame passed by \
         the empty program."
    );
    println!();

    // Written now too: a run cut short in the end-to-end part keeps the live-frames figures
    // (the Targets table reads them).
    figures.write("bench_live");
    end_to_end(&lab, &mut ebpf, quick, &mut figures, &tables);
    figures.write("bench_live");
}

/// The client's delivered rate over `secs`, with the attacker's flood running or not.
fn client_rate(lab: &Lab, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let server_v4 = lab.server_v4;
    let sock = lab.server.run(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(server_v4, PORT + 1)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        s
    });
    let (st, g) = (Arc::clone(&stop), Arc::clone(&got));
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        // Bounded: at most a minute even if the sender never stops.
        let limit = Instant::now() + Duration::from_secs(60);
        while !st.load(Ordering::Relaxed) && Instant::now() < limit {
            if sock.recv(&mut buf).is_ok() {
                g.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let target = SocketAddrV4::new(lab.server_v4, PORT + 1);
    let client_v4 = lab.client_v4;
    let dur = Duration::from_secs_f64(secs);
    let sent = lab.client.run(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(client_v4, 0)).expect("bind");
        let payload = [0u8; 64];
        let (t, mut sent) = (Instant::now(), 0u64);
        while t.elapsed() < dur {
            if s.send_to(&payload, target).is_ok() {
                sent += 1;
            }
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");
    let _ = sent;
    got.load(Ordering::Relaxed) as f64 / secs
}

fn end_to_end(
    lab: &Lab,
    ebpf: &mut aya::Ebpf,
    quick: bool,
    figures: &mut Figures,
    tables: &KernelTables,
) {
    let secs = if quick { 1.0 } else { 3.0 };
    // The client sends to the endpoint's second port (the first one's sink is full); the
    // attacker comes in on its own veth, where tollgate is attached too.
    let attacker = lab.add_client();
    let attacker_if = attacker.server_if.clone();
    lab.server.run(move || {
        loader::xdp_program(ebpf, program_names::XDP)
            .expect("program")
            .attach(&attacker_if, XdpMode::Driver)
            .unwrap_or_else(|e| panic!("attaching tollgate to {attacker_if}: {e}"));
    });
    let mut calm = Vec::new();
    let mut flooded = Vec::new();
    let mut flood_frames = Vec::new();
    let tries = if quick { 1 } else { 3 };
    let unbound = || -> u64 {
        counter_read::reason_endpoint_totals(tables.reason_counters())
            .expect("counters")
            .iter()
            .filter(|(r, _, _)| *r == Reason::Unbound)
            .map(|(_, _, c)| c.packets)
            .sum()
    };
    for _ in 0..tries {
        calm.push(client_rate(lab, secs));
        // hping3 floods for `secs` + 1 s (timeout bounds it), random sources, one destination:
        // the node's own 198.18.x address.
        let before = unbound();
        let mut flood = attacker
            .ns
            .command("timeout")
            .args([
                &format!("{}", secs as u64 + 1),
                "hping3",
                "--flood",
                "--rand-source",
                "-2",
                "-p",
                &(PORT + 1).to_string(),
                "-d",
                "18",
                &lab.server_v4.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("hping3");
        std::thread::sleep(Duration::from_millis(300));
        flooded.push(client_rate(lab, secs));
        let _ = flood.wait();
        flood_frames.push((unbound() - before) as f64 / (secs + 0.7));
    }
    let (c, f, x) = (median(&calm), median(&flooded), median(&flood_frames));
    figures.set("e2e.client_calm_pps", c);
    figures.set("e2e.client_flooded_pps", f);
    figures.set("e2e.flood_dropped_pps", x);
    figures.set("e2e.flooded_vs_calm", f / c.max(1.0));
    println!(
        "| end to end: a bound client sending UDP as fast as it can ({tries} × {secs:.0} s each) | datagrams delivered/s |"
    );
    println!("|---|---:|");
    println!("| no flood | {c:.0} |");
    println!(
        "| during `hping3 --flood --rand-source` from an attacker namespace (tollgate dropped {x:.0} frames/s of it) | {f:.0} |"
    );
    println!("| flooded / calm | {:.2} |", f / c.max(1.0));
    println!();
}
