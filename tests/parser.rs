//! The parser's verdicts through BPF_PROG_TEST_RUN: the real program in the real kernel.

use tollgate_common::{
    Reason,
    packet::{L4, PacketBuilder},
    parse::{IPPROTO_DSTOPTS, IPPROTO_HOPOPTS, IPPROTO_ROUTING, MAX_IPV6_EXT_HEADERS},
};
use tollgate_tests::fixture::{Case, Harness};

const A4: [u8; 4] = [198, 18, 0, 1];
const B4: [u8; 4] = [198, 18, 0, 2];
const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// The verdict follows from the reason: malformed frames are dropped, the rest pass.
fn case(desc: &str, packet: Vec<u8>, reason: Reason) -> Case {
    Case::new(desc, packet, reason.verdict(), reason)
}

fn cases() -> Vec<Case> {
    use Reason::*;
    let v4 = || PacketBuilder::v4(A4, B4);
    let v6 = || PacketBuilder::v6(A6, B6);
    let mut c = vec![
        case(
            "ipv4 tcp",
            v4().tcp(40000, 8000).payload(64).build(),
            Unprotected,
        ),
        case(
            "ipv4 udp",
            v4().udp(40000, 8001).payload(64).build(),
            Unprotected,
        ),
        case(
            "ipv4 icmp echo",
            v4().icmp(8, 0).payload(56).build(),
            Unprotected,
        ),
        case(
            "ipv4 gre (no ports)",
            v4().l4(L4::Raw(47)).payload(20).build(),
            Unprotected,
        ),
        case(
            "ipv6 tcp",
            v6().tcp(40000, 8000).payload(64).build(),
            Unprotected,
        ),
        case("ipv6 udp", v6().udp(40000, 8001).build(), Unprotected),
        case(
            "ipv6 icmpv6 echo",
            v6().icmp(128, 0).payload(56).build(),
            Unprotected,
        ),
        case(
            "ipv4 tcp, one vlan",
            v4().vlan(10).tcp(1, 8000).build(),
            Unprotected,
        ),
        case(
            "ipv4 udp, two vlans",
            v4().vlan(10).vlan(20).udp(1, 53).build(),
            Unprotected,
        ),
        case(
            "ipv6 tcp, one vlan",
            v6().vlan(10).tcp(1, 8000).build(),
            Unprotected,
        ),
        case(
            "ipv6 udp, two vlans",
            v6().vlan(10).vlan(20).udp(1, 53).build(),
            Unprotected,
        ),
        case(
            "ipv4 icmp, two vlans",
            v4().vlan(1).vlan(2).icmp(0, 0).build(),
            Unprotected,
        ),
        case(
            "three vlans",
            v4().vlan(1).vlan(2).vlan(3).udp(1, 2).build(),
            TooManyVlanTags,
        ),
        case(
            "ipv4 tcp with options",
            v4().ipv4_options(&[0x94, 0x04, 0, 0]).tcp(1, 8000).build(),
            Unprotected,
        ),
        case(
            "ipv4 udp with 40 bytes of options",
            v4().ipv4_options(&[1; 40]).udp(1, 8000).build(),
            Unprotected,
        ),
        case(
            "ipv6 tcp, hop-by-hop",
            v6().ipv6_ext(IPPROTO_HOPOPTS).tcp(1, 8000).build(),
            Unprotected,
        ),
        case(
            "ipv6 udp, three ext headers",
            v6().ipv6_ext(IPPROTO_HOPOPTS)
                .ipv6_ext(IPPROTO_ROUTING)
                .ipv6_ext(IPPROTO_DSTOPTS)
                .udp(1, 8000)
                .build(),
            Unprotected,
        ),
        case(
            "ipv4 first fragment",
            v4().fragment(0, true).udp(1, 8000).payload(100).build(),
            Unprotected,
        ),
        case(
            "ipv4 non-first fragment",
            v4().fragment(10, true).udp(1, 8000).build(),
            NonFirstFragment,
        ),
        case(
            "ipv4 last fragment",
            v4().fragment(20, false).tcp(1, 8000).build(),
            NonFirstFragment,
        ),
        case(
            "ipv6 first fragment",
            v6().fragment(0, true).tcp(1, 8000).build(),
            Unprotected,
        ),
        case(
            "ipv6 non-first fragment",
            v6().fragment(100, false).udp(1, 8000).build(),
            NonFirstFragment,
        ),
        case(
            "ipv6 atomic fragment",
            v6().fragment(0, false).udp(1, 8000).build(),
            Unprotected,
        ),
    ];

    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    c.push(case("arp", arp, NotIp));

    let mut max_ext = v6().udp(1, 2);
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        max_ext = max_ext.ipv6_ext(IPPROTO_DSTOPTS);
    }
    c.push(case(
        "ipv6 at the ext-header limit",
        max_ext.clone().build(),
        Unprotected,
    ));
    let too_many = max_ext.ipv6_ext(IPPROTO_DSTOPTS).build();
    // The seventh header cut to its first byte (the IPv6 length says so too): the sixth's
    // next-header field is enough to know there are too many (found by the 10 M differential
    // run, where the reference model said `truncated`).
    let seventh = 14 + 40 + 8 * MAX_IPV6_EXT_HEADERS;
    let mut cut = too_many[..seventh + 1].to_vec();
    let payload = u16::try_from(cut.len() - 54).expect("short");
    cut[18..20].copy_from_slice(&payload.to_be_bytes());
    c.push(case(
        "ipv6 one ext header too many",
        too_many,
        TooManyExtHeaders,
    ));
    c.push(case(
        "ipv6 a seventh ext header cut short",
        cut,
        TooManyExtHeaders,
    ));

    let mut bad = v4().tcp(1, 8000).build();
    bad[14] = 0x44; // ihl 4
    c.push(case("ipv4 ihl 4", bad, BadHeaderLength));
    let mut bad = v4().tcp(1, 8000).build();
    bad[14] = 0x4f; // ihl 15 on a 40-byte datagram
    c.push(case("ipv4 ihl beyond total length", bad, BadHeaderLength));
    let mut bad = v4().udp(1, 8000).build();
    bad[16..18].copy_from_slice(&1400u16.to_be_bytes());
    c.push(case("ipv4 total length beyond frame", bad, Truncated));
    let mut bad = v4().udp(1, 8000).build();
    bad[14] = 0x65;
    c.push(case("version 6 under ethertype ipv4", bad, BadVersion));
    let mut bad = v6().udp(1, 8000).build();
    bad[14] = 0x45;
    c.push(case("version 4 under ethertype ipv6", bad, BadVersion));
    let mut padded = v4().udp(1, 8000).build();
    padded.resize(60, 0);
    c.push(case("ipv4 with link padding", padded, Unprotected));

    // TCP over IPv6, cut at every byte. Below 14 bytes the kernel refuses the test run itself
    // (bpf_prog_test_run_xdp requires a full Ethernet header), as no driver hands XDP a runt;
    // `runts_are_refused_by_the_kernel` checks that.
    let full = v6().tcp(40000, 8000).build();
    for cut in 14..full.len() {
        c.push(case(
            &format!("ipv6 tcp cut at {cut}"),
            full[..cut].to_vec(),
            Truncated,
        ));
    }
    c
}

#[test]
fn parser_verdicts_and_counters() {
    let mut h = Harness::new();
    let cases = cases();
    assert!(cases.len() >= 30);
    h.run_table(&cases);
}

#[test]
fn runts_are_refused_by_the_kernel() {
    tollgate_tests::require_root();
    let mut ebpf = tollgate::loader::load().expect("loading the program");
    let full = PacketBuilder::v6(A6, B6).tcp(40000, 8000).build();
    for cut in 1..14 {
        let prog = tollgate::loader::xdp_program(&mut ebpf, tollgate_common::program_names::XDP)
            .expect("program");
        use aya::programs::{TestRun, TestRunOptions};
        let r = prog.test_run(TestRunOptions {
            data_in: Some(&full[..cut]),
            ..Default::default()
        });
        assert!(r.is_err(), "the kernel ran a {cut}-byte frame");
    }
}
