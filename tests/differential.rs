//! Differential testing: the compiled XDP program, through BPF_PROG_TEST_RUN, against the
//! plain reference model of `tollgate_tests::model`, on generated and mutated frames (valid
//! frames over the enforcement world's addresses, ports and protocols, with VLAN tags, IPv4
//! options, IPv6 extension headers and fragments; then truncations, byte flips and bad header
//! fields). Every frame's verdict must match the model's and none may be XDP_ABORTED; each
//! batch's (reason, endpoint) counters must move exactly as the model's reasons say.
//!
//! 50 000 frames by default; `TOLLGATE_LONG=1` sends 10 000 000. The PRNG is seeded from the
//! clock, printed on failure, and `TOLLGATE_SEED=<n>` replays a run.

use std::collections::BTreeMap;

use tollgate::counter_read;
use tollgate_common::{
    Reason, Verdict,
    decide_cases::{self, SERVER4, SERVER6, World},
    packet::{L4, PacketBuilder},
    parse::*,
};
use tollgate_tests::{
    fixture::Harness,
    model::{self, Judgement},
};

/// xorshift64*: tiny, seeded, good enough to pick packets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A source address: a bound one, one inside a bound prefix, a near miss or anything.
fn source(r: &mut Rng, world: &World, v6: bool) -> [u8; 16] {
    let mut a = [0u8; 16];
    let bound: Vec<[u8; 16]> = world
        .bindings
        .iter()
        .filter_map(|b| match (b.addr, v6) {
            (std::net::IpAddr::V4(x), false) => {
                let mut o = [0; 16];
                o[..4].copy_from_slice(&x.octets());
                Some(o)
            }
            (std::net::IpAddr::V6(x), true) => Some(x.octets()),
            _ => None,
        })
        .collect();
    let width = if v6 { 16 } else { 4 };
    match r.below(4) {
        0 | 1 if !bound.is_empty() => {
            a = *r.pick(&bound);
            if r.chance(40) {
                // Somewhere inside the prefix (or just past a /32's neighbour).
                a[width - 1] = r.below(256) as u8;
            }
        }
        2 => {
            let base = if v6 {
                decide_cases::v6(r.below(4) as u8, r.below(32) as u8)
            } else {
                let mut o = [0; 16];
                o[..4].copy_from_slice(&decide_cases::v4(r.below(4) as u8, r.below(32) as u8));
                o
            };
            a = base;
        }
        _ => {
            for b in a.iter_mut().take(width) {
                *b = r.next() as u8;
            }
        }
    }
    a
}

fn frame(r: &mut Rng, world: &World) -> Vec<u8> {
    let v6 = r.chance(50);
    let src = source(r, world, v6);
    let mut dst = if v6 {
        SERVER6
    } else {
        let mut o = [0; 16];
        o[..4].copy_from_slice(&SERVER4);
        o
    };
    if r.chance(15) {
        // Outside a scoped endpoint's prefix, or just another host.
        let at = if v6 {
            5 + r.below(11) as usize
        } else {
            1 + r.below(3) as usize
        };
        dst[at] ^= 1 << r.below(8);
    }
    let mut b = if v6 {
        PacketBuilder::v6(src, dst)
    } else {
        PacketBuilder::v4(src[..4].try_into().unwrap(), dst[..4].try_into().unwrap())
    };
    let ports: Vec<u16> = world
        .endpoints
        .iter()
        .flat_map(|e| {
            [
                *e.ports.start(),
                *e.ports.end(),
                e.ports.end().wrapping_add(1),
            ]
        })
        .collect();
    let dport = if r.chance(80) {
        *r.pick(&ports)
    } else {
        r.next() as u16
    };
    let sport = r.next() as u16;
    b = match r.below(10) {
        0..=4 => b.tcp(sport, dport),
        5..=7 => b.udp(sport, dport),
        8 => b.icmp(r.below(256) as u8, 0),
        _ => b.l4(L4::Raw(*r.pick(&[47, 50, 132, 59, 4, 41]))),
    };
    for _ in 0..*r.pick(&[0, 0, 0, 1, 1, 2, 3]) {
        b = b.vlan(r.below(4096) as u16);
    }
    if !v6 && r.chance(25) {
        let n = r.below(41) as usize;
        let opts: Vec<u8> = (0..n).map(|_| *r.pick(&[1u8, 1, 0, 7, 68])).collect();
        b = b.ipv4_options(&opts);
    }
    if v6 && r.chance(35) {
        for _ in 0..r.below(9) {
            b = b.ipv6_ext(*r.pick(&[
                IPPROTO_HOPOPTS,
                IPPROTO_ROUTING,
                IPPROTO_DSTOPTS,
                IPPROTO_MH,
                IPPROTO_HIP,
                IPPROTO_SHIM6,
                IPPROTO_AH,
            ]));
        }
    }
    if r.chance(15) {
        let offset = if r.chance(50) {
            0
        } else {
            1 + r.below(100) as u16
        };
        b = b.fragment(offset, r.chance(60));
    }
    b = b.payload(r.below(120) as usize);
    let mut f = b.build();
    mutate(r, &mut f);
    f
}

/// Damage some frames: truncate, flip bytes, break header fields, pad.
fn mutate(r: &mut Rng, f: &mut Vec<u8>) {
    let ip = (14..f.len().saturating_sub(1))
        .step_by(4)
        .find(|&o| {
            matches!(
                u16::from_be_bytes([f[o - 2], f[o - 1]]),
                ETH_P_IP | ETH_P_IPV6
            )
        })
        .unwrap_or(14);
    match r.below(12) {
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (EINVAL).
        0 => f.truncate(14 + r.below(f.len() as u64 - 13) as usize),
        1 | 2 => {
            for _ in 0..1 + r.below(3) {
                let at = r.below(f.len().min(120) as u64) as usize;
                f[at] ^= 1 << r.below(8);
            }
        }
        3 if f.len() > ip + 4 => {
            // Version/IHL, or a length field.
            let field = ip + *r.pick(&[0usize, 2, 3, 4, 5]);
            f[field] = r.next() as u8;
        }
        4 => f.extend((0..r.below(40)).map(|_| r.next() as u8)),
        _ => {}
    }
}

fn totals(h: &Harness) -> BTreeMap<(Reason, u32), (u64, u64)> {
    counter_read::reason_endpoint_totals(h.tables.reason_counters())
        .expect("counters")
        .into_iter()
        .map(|(r, ep, c)| ((r, ep), (c.packets, c.bytes)))
        .collect()
}

fn moved(
    before: &BTreeMap<(Reason, u32), (u64, u64)>,
    after: &BTreeMap<(Reason, u32), (u64, u64)>,
) -> BTreeMap<(Reason, u32), (u64, u64)> {
    after
        .iter()
        .filter_map(|(k, a)| {
            let b = before.get(k).copied().unwrap_or_default();
            (*a != b).then(|| (*k, (a.0 - b.0, a.1 - b.1)))
        })
        .collect()
}

#[test]
fn the_program_agrees_with_the_reference_model() {
    let long = std::env::var("TOLLGATE_LONG").is_ok_and(|v| v == "1");
    let total: u64 = if long { 10_000_000 } else { 50_000 };
    let seed = std::env::var("TOLLGATE_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("TOLLGATE_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    let world = model::stateless(decide_cases::enforcement().world);
    let mut h = Harness::new();
    h.install(&world);
    let mut r = Rng(seed);
    let started = std::time::Instant::now();
    const BATCH: u64 = 2_000;
    let mut failures: Vec<String> = Vec::new();
    let mut sent = 0;
    let mut seen: BTreeMap<Reason, u64> = BTreeMap::new();
    while sent < total && failures.len() < 20 {
        let frames: Vec<Vec<u8>> = (0..BATCH.min(total - sent))
            .map(|_| frame(&mut r, &world))
            .collect();
        let mut want: BTreeMap<(Reason, u32), (u64, u64)> = BTreeMap::new();
        let before = totals(&h);
        for f in &frames {
            let m = model::judge(&world, f);
            *seen.entry(m.reason).or_default() += 1;
            let e = want.entry((m.reason, m.endpoint)).or_default();
            e.0 += 1;
            e.1 += f.len() as u64;
            let ret = h.run(f);
            if ret != m.reason.verdict() as u32 {
                failures.push(format!(
                    "frame {}: kernel {:?}, model {:?} for {m:?}: {}",
                    sent,
                    Verdict::from_u32(ret),
                    m.reason.verdict(),
                    hex(f)
                ));
            }
            sent += 1;
        }
        let got = moved(&before, &totals(&h));
        if got != want && failures.is_empty() {
            // Find the frames: run the batch again one by one, comparing each counter move.
            for f in &frames {
                let m: Judgement = model::judge(&world, f);
                let before = totals(&h);
                h.run(f);
                let one = moved(&before, &totals(&h));
                let expect = BTreeMap::from([((m.reason, m.endpoint), (1, f.len() as u64))]);
                if one != expect {
                    failures.push(format!("kernel counted {one:?}, model {m:?}: {}", hex(f)));
                    if failures.len() >= 20 {
                        break;
                    }
                }
            }
            if failures.is_empty() {
                failures.push(format!("batch counters {got:?}, model {want:?}"));
            }
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "differential: {sent} frames in {:.1} s, seed {seed}; model reasons: {seen:?}",
        elapsed.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "the program and the model disagree (replay: TOLLGATE_SEED={seed}):\n{}",
        failures.join("\n")
    );
    // The generator reaches every corner the model knows.
    for reason in [
        Reason::NotIp,
        Reason::Unprotected,
        Reason::NonFirstFragment,
        Reason::Truncated,
        Reason::BadHeaderLength,
        Reason::BadVersion,
        Reason::TooManyVlanTags,
        Reason::TooManyExtHeaders,
        Reason::Bound,
        Reason::Anonymous,
        Reason::Unbound,
        Reason::Expired,
        Reason::Quarantined,
        Reason::Isolation,
        Reason::PacketRate,
        Reason::ByteRate,
        Reason::UnknownIdentity,
        Reason::QuotaExhausted,
    ] {
        assert!(
            seen.contains_key(&reason),
            "no frame was {reason:?} (seed {seed})"
        );
    }
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}
