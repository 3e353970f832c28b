//! Limiter accuracy with real traffic: a client namespace sends UDP through a veth pair into a
//! namespace where the XDP program enforces one identity's limits. Admitted traffic is read
//! from the kernel's per-identity counters.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use aya::Ebpf;
use tollgate::{
    loader::{self, AttachMode},
    tables::{EndpointSpec, KernelTables, PlanLimits, Proto, identity_record},
};
use tollgate_common::{policy::Class, program_names};
use tollgate_tests::lab::Lab;

const ENDPOINT: u32 = 1;
const ID: u32 = 1;
const PORT: u16 = 9000;
/// UDP payload giving a 500-byte IPv4 frame (14 + 20 + 8 + 458).
const PAYLOAD: usize = 458;
const FRAME: u64 = 500;
const SECONDS: f64 = 5.0;

/// The traffic tests measure rates against the clock on a 2-core machine: they take turns,
/// so that one test's sender never steals the CPU another test's pacing depends on.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The program attached in the lab's server namespace, with its tables.
struct Enforcer {
    _ebpf: Ebpf,
    tables: KernelTables,
}

impl Enforcer {
    fn attach(lab: &Lab, limits: PlanLimits) -> Enforcer {
        tollgate_tests::require_root();
        let mut ebpf = loader::load().expect("loading the program");
        let mut tables = KernelTables::from_ebpf(&mut ebpf).expect("policy maps");
        tables
            .set_endpoint(
                ENDPOINT,
                &EndpointSpec {
                    proto: Proto::Udp,
                    ports: PORT..=PORT,
                    v4_prefix: None,
                    v6_prefix: None,
                    weight: 1.0,
                    allowed_classes: vec![Class::Customer],
                    roles: 0,
                    anonymous: false,
                },
            )
            .expect("endpoint");
        tables
            .set_identity(ID, &identity_record(Class::Customer, 1, 0, &limits))
            .expect("identity");
        tables
            .bind(IpAddr::V4(lab.client_v4), 32, ID, 0)
            .expect("binding");
        // The interface name resolves in the namespace of the attaching thread.
        let iface = lab.server_if.clone();
        let prog = loader::xdp_program(&mut ebpf, program_names::XDP).expect("program");
        lab.server.run(|| {
            prog.attach(&iface, aya::programs::XdpMode::Driver)
                .unwrap_or_else(|e| {
                    panic!("attaching to {iface} ({}): {e}", AttachMode::Native.label())
                })
        });
        Enforcer {
            _ebpf: ebpf,
            tables,
        }
    }

    /// (passed packets, passed bytes, dropped packets) of the identity.
    fn counts(&self) -> (u64, u64, u64) {
        let c = self.tables.identity_counters(ID).expect("counters");
        (c.passed.packets, c.passed.bytes, c.dropped.packets)
    }
}

/// Sends `rate` datagrams/s for `seconds` from one socket, paced against absolute deadlines.
/// Returns how many were sent and the span from first to last send.
fn paced_send(sock: &UdpSocket, rate: f64, seconds: f64) -> (u64, Duration) {
    let payload = [0x5au8; PAYLOAD];
    let total = (rate * seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let hard_stop = start + Duration::from_secs_f64(seconds * 3.0);
    let mut sent = 0;
    for i in 0..total {
        let deadline = start + interval.mul_f64(i as f64);
        while Instant::now() < deadline {
            std::hint::spin_loop();
        }
        if sock.send(&payload).is_ok() {
            sent += 1;
        }
        if Instant::now() > hard_stop {
            break;
        }
    }
    (sent, start.elapsed())
}

fn client_socket(lab: &Lab, src_port: u16) -> UdpSocket {
    let dst = SocketAddr::new(IpAddr::V4(lab.server_v4), PORT);
    let src = SocketAddr::new(IpAddr::V4(lab.client_v4), src_port);
    lab.client.run(|| {
        let s = UdpSocket::bind(src).expect("bind client socket");
        s.connect(dst).expect("connect");
        s
    })
}

fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= expected * tolerance
}

/// Offers `factor` × the limit for five seconds and checks what the kernel admitted.
fn accuracy(bytes_limit: bool, factor: f64) {
    let _turn = serial();
    let lab = Lab::new();
    // 2000 packets/s or 1 MB/s (2000 frames of 500 bytes), burst 1% of the run.
    let rate_pps = 2000.0;
    let limits = if bytes_limit {
        PlanLimits {
            packets_per_s: None,
            packet_burst: 0,
            bytes_per_s: Some(1_000_000),
            byte_burst: 50_000,
        }
    } else {
        PlanLimits {
            packets_per_s: Some(2000),
            packet_burst: 100,
            bytes_per_s: None,
            byte_burst: 0,
        }
    };
    let enforcer = Enforcer::attach(&lab, limits);
    let sock = client_socket(&lab, 40000);
    let (sent, span) = lab
        .client
        .run(|| paced_send(&sock, rate_pps * factor, SECONDS));
    std::thread::sleep(Duration::from_millis(200));
    let (passed, passed_bytes, dropped) = enforcer.counts();
    let offered = passed + dropped;
    assert!(
        offered <= sent && offered as f64 >= sent as f64 * 0.99,
        "sent {sent}, XDP saw {offered}"
    );
    let secs = span.as_secs_f64();
    let (admitted, offered_units, limit_units) = if bytes_limit {
        (
            passed_bytes as f64,
            (offered * FRAME) as f64,
            1_000_000.0 * secs + 50_000.0,
        )
    } else {
        (passed as f64, offered as f64, 2000.0 * secs + 100.0)
    };
    let expected = offered_units.min(limit_units);
    eprintln!(
        "{} limit, {factor}x: offered {offered_units} in {secs:.3}s, admitted {admitted}, \
         expected {expected:.0} ({:+.2}%)",
        if bytes_limit { "byte" } else { "packet" },
        (admitted / expected - 1.0) * 100.0
    );
    assert!(
        within(admitted, expected, 0.05),
        "admitted {admitted}, expected {expected:.0} ±5%"
    );
    assert!(
        admitted <= limit_units * 1.05,
        "admitted {admitted} over the limit {limit_units:.0}"
    );
}

#[test]
fn packet_limit_half_rate() {
    accuracy(false, 0.5);
}

#[test]
fn packet_limit_at_rate() {
    accuracy(false, 1.0);
}

#[test]
fn packet_limit_four_times_rate() {
    accuracy(false, 4.0);
}

#[test]
fn byte_limit_half_rate() {
    accuracy(true, 0.5);
}

#[test]
fn byte_limit_at_rate() {
    accuracy(true, 1.0);
}

#[test]
fn byte_limit_four_times_rate() {
    accuracy(true, 4.0);
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[test]
fn many_flows_on_every_cpu_share_one_budget() {
    let _turn = serial();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let lab = Lab::with_queues(cpus as u32);
    let enforcer = Enforcer::attach(
        &lab,
        PlanLimits {
            packets_per_s: Some(2000),
            packet_burst: 100,
            bytes_per_s: None,
            byte_burst: 0,
        },
    );
    // Eight flows per CPU, each CPU offering 2x the limit on its own.
    let socks: Vec<Vec<UdpSocket>> = (0..cpus)
        .map(|cpu| {
            (0..8)
                .map(|f| client_socket(&lab, 41000 + (cpu * 8 + f) as u16))
                .collect()
        })
        .collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for (cpu, flows) in socks.iter().enumerate() {
            let lab = &lab;
            s.spawn(move || {
                lab.client.run(|| {
                    pin_to_cpu(cpu);
                    let payload = [0u8; PAYLOAD];
                    let per_flow = Duration::from_secs_f64(1.0 / 4000.0 * 8.0);
                    let n = (4000.0 * SECONDS / 8.0) as u64;
                    for i in 0..n {
                        let deadline = start + per_flow.mul_f64(i as f64);
                        while Instant::now() < deadline {
                            std::hint::spin_loop();
                        }
                        for sock in flows {
                            let _ = sock.send(&payload);
                        }
                    }
                })
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let (passed, _, dropped) = enforcer.counts();
    let limit = 2000.0 * secs + 100.0;
    let per_cpu = enforcer
        .tables
        .identity_counters_per_cpu(ID)
        .expect("per-cpu counters");
    let busy_cpus = per_cpu
        .iter()
        .filter(|c| c.passed.packets + c.dropped.packets > 0)
        .count();
    eprintln!(
        "many flows: offered {} on {busy_cpus} CPUs in {secs:.3}s, admitted {passed}, limit {limit:.0}",
        passed + dropped
    );
    assert!(
        passed + dropped > (limit * 2.0) as u64,
        "the senders did not offer enough"
    );
    assert!(
        busy_cpus >= cpus.min(2),
        "traffic reached XDP on only {busy_cpus} CPU(s)"
    );
    assert!(
        (passed as f64) <= limit * 1.05,
        "admitted {passed} over limit {limit:.0} + 5%"
    );
    assert!(
        (passed as f64) >= limit * 0.95,
        "admitted {passed}, far under limit {limit:.0}"
    );
}

#[test]
fn first_burst_never_exceeds_burst_plus_one() {
    let _turn = serial();
    let lab = Lab::new();
    // 10 packets/s: refill during a few-millisecond burst is far below one packet.
    let burst = 50;
    let enforcer = Enforcer::attach(
        &lab,
        PlanLimits {
            packets_per_s: Some(10),
            packet_burst: burst,
            bytes_per_s: None,
            byte_burst: 0,
        },
    );
    let sock = client_socket(&lab, 40000);
    lab.client.run(|| {
        let payload = [0u8; 64];
        for _ in 0..300 {
            let _ = sock.send(&payload);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let (passed, _, dropped) = enforcer.counts();
    eprintln!(
        "first burst: offered {}, admitted {passed}",
        passed + dropped
    );
    assert!(passed + dropped >= 250, "the burst did not arrive");
    assert!(passed <= burst + 1, "admitted {passed} > burst {burst} + 1");
    assert!(passed >= burst, "admitted {passed} < burst {burst}");
}
