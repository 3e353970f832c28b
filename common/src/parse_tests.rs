//! Host tests of the parser: the same code the XDP program runs, fed byte slices.

use crate::Reason;
use crate::packet::{L4, PacketBuilder, ip_offset};
use crate::parse::*;
use std::{vec, vec::Vec};

const A4: [u8; 4] = [198, 18, 0, 1];
const B4: [u8; 4] = [198, 18, 0, 2];
const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn ip(frame: &[u8]) -> IpPacket {
    match parse(frame) {
        Ok(Frame::Ip(p)) => p,
        other => panic!("expected an IP packet, got {other:?}"),
    }
}

fn v4_addr(a: [u8; 4]) -> [u8; 16] {
    let mut x = [0; 16];
    x[..4].copy_from_slice(&a);
    x
}

#[test]
fn ipv4_tcp_fields() {
    let p = ip(&PacketBuilder::v4(A4, B4)
        .tcp(1234, 8000)
        .payload(10)
        .build());
    assert_eq!(p.family, Family::V4);
    assert_eq!(p.src.bytes(), v4_addr(A4));
    assert_eq!(p.src.v4_bytes(), A4);
    assert_eq!(p.dst.bytes(), v4_addr(B4));
    assert_eq!((p.proto, p.sport, p.dport), (IPPROTO_TCP, 1234, 8000));
    assert_eq!(p.fragment, Fragment::None);
    assert_eq!(p.l4_offset, 34);
    assert!(p.has_ports());
}

#[test]
fn ipv6_udp_fields() {
    let p = ip(&PacketBuilder::v6(A6, B6).udp(5353, 53).build());
    assert_eq!(p.family, Family::V6);
    assert_eq!((p.src.bytes(), p.dst.bytes()), (A6, B6));
    assert_eq!((p.proto, p.sport, p.dport), (IPPROTO_UDP, 5353, 53));
    assert_eq!(p.l4_offset, 54);
}

#[test]
fn icmp_type_and_code_both_families() {
    let p = ip(&PacketBuilder::v4(A4, B4).icmp(8, 0).build());
    assert_eq!((p.proto, p.icmp_type, p.icmp_code), (IPPROTO_ICMP, 8, 0));
    assert!(!p.has_ports());
    let p = ip(&PacketBuilder::v6(A6, B6).icmp(128, 0).build());
    assert_eq!((p.proto, p.icmp_type), (IPPROTO_ICMPV6, 128));
}

#[test]
fn vlan_tags_shift_the_ip_header() {
    for tags in 0..=2usize {
        let mut b = PacketBuilder::v4(A4, B4).udp(1, 2);
        for t in 0..tags {
            b = b.vlan(100 + t as u16);
        }
        let p = ip(&b.build());
        assert_eq!(p.vlan_tags as usize, tags);
        assert_eq!(p.l4_offset as usize, ip_offset(tags) + 20);
        assert_eq!(p.dport, 2);
    }
}

#[test]
fn qinq_outer_tag_8021ad() {
    let mut f = PacketBuilder::v6(A6, B6)
        .vlan(10)
        .vlan(20)
        .tcp(1, 443)
        .build();
    f[12..14].copy_from_slice(&ETH_P_8021AD.to_be_bytes());
    assert_eq!(ip(&f).dport, 443);
}

#[test]
fn three_vlan_tags_are_refused() {
    let f = PacketBuilder::v4(A4, B4).vlan(1).vlan(2).vlan(3).build();
    assert_eq!(parse(&f[..]), Err(Reason::TooManyVlanTags));
}

#[test]
fn not_ip_carries_the_ethertype() {
    let mut f = [0u8; 60];
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(parse(&f[..]), Ok(Frame::NotIp(0x0806)));
}

#[test]
fn ipv4_options_are_skipped() {
    let f = PacketBuilder::v4(A4, B4)
        .ipv4_options(&[0x94, 0x04, 0, 0, 1, 1, 1, 0]) // router alert, NOPs
        .tcp(5, 6)
        .build();
    let p = ip(&f);
    assert_eq!(p.l4_offset, 14 + 28);
    assert_eq!((p.sport, p.dport), (5, 6));
}

#[test]
fn ipv4_bad_ihl_and_total_length() {
    let f = PacketBuilder::v4(A4, B4).tcp(1, 2).build();
    for ihl in 0..5u8 {
        let mut g = f.clone();
        g[14] = 0x40 | ihl;
        assert_eq!(parse(&g[..]), Err(Reason::BadHeaderLength), "ihl {ihl}");
    }
    // ihl 15 (60 bytes) on a 40-byte datagram: the total length is shorter than the header.
    let mut g = f.clone();
    g[14] = 0x4f;
    assert_eq!(parse(&g[..]), Err(Reason::BadHeaderLength));
    // Total length 19.
    let mut g = f.clone();
    g[16..18].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(parse(&g[..]), Err(Reason::BadHeaderLength));
    // Total length beyond the frame.
    let mut g = f.clone();
    g[16..18].copy_from_slice(&1500u16.to_be_bytes());
    assert_eq!(parse(&g[..]), Err(Reason::Truncated));
}

#[test]
fn link_padding_after_the_datagram_is_ignored() {
    let mut f = PacketBuilder::v4(A4, B4).udp(1, 2).build();
    f.resize(60, 0);
    assert_eq!(ip(&f).dport, 2);
}

#[test]
fn version_must_match_ethertype() {
    let mut f = PacketBuilder::v4(A4, B4).udp(1, 2).build();
    f[14] = 0x65;
    assert_eq!(parse(&f[..]), Err(Reason::BadVersion));
    let mut f = PacketBuilder::v6(A6, B6).udp(1, 2).build();
    f[14] = 0x45;
    assert_eq!(parse(&f[..]), Err(Reason::BadVersion));
}

#[test]
fn ipv4_fragments() {
    let first = ip(&PacketBuilder::v4(A4, B4)
        .fragment(0, true)
        .udp(7, 8)
        .payload(32)
        .build());
    assert_eq!(first.fragment, Fragment::First);
    assert_eq!(first.dport, 8);
    // A later fragment: the bytes after the IP header are payload, not ports.
    let later = ip(&PacketBuilder::v4(A4, B4)
        .fragment(5, false)
        .udp(7, 8)
        .build());
    assert_eq!(later.fragment, Fragment::Later);
    assert_eq!((later.sport, later.dport), (0, 0));
    assert!(!later.has_ports());
}

#[test]
fn ipv4_tiny_first_fragment_is_truncated() {
    // A first fragment whose TCP header is cut by the IP length (RFC 1858).
    let mut f = PacketBuilder::v4(A4, B4)
        .fragment(0, true)
        .tcp(1, 2)
        .build();
    let total = 20 + 8;
    f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
    assert_eq!(parse(&f[..]), Err(Reason::Truncated));
}

#[test]
fn ipv6_extension_headers_walked() {
    let p = ip(&PacketBuilder::v6(A6, B6)
        .ipv6_ext(IPPROTO_HOPOPTS)
        .ipv6_ext(IPPROTO_ROUTING)
        .ipv6_ext(IPPROTO_DSTOPTS)
        .tcp(9, 10)
        .build());
    assert_eq!((p.proto, p.dport), (IPPROTO_TCP, 10));
    assert_eq!(p.l4_offset, 54 + 24);
}

#[test]
fn ipv6_ext_header_limit() {
    let mut b = PacketBuilder::v6(A6, B6).udp(1, 2);
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        b = b.ipv6_ext(IPPROTO_DSTOPTS);
    }
    assert_eq!(ip(&b.clone().build()).dport, 2);
    let f = b.ipv6_ext(IPPROTO_DSTOPTS).build();
    assert_eq!(parse(&f[..]), Err(Reason::TooManyExtHeaders));
}

#[test]
fn ipv6_fragments() {
    let first = ip(&PacketBuilder::v6(A6, B6)
        .fragment(0, true)
        .tcp(3, 4)
        .build());
    assert_eq!((first.fragment, first.dport), (Fragment::First, 4));
    let atomic = ip(&PacketBuilder::v6(A6, B6)
        .fragment(0, false)
        .tcp(3, 4)
        .build());
    assert_eq!(atomic.fragment, Fragment::None);
    let later = ip(&PacketBuilder::v6(A6, B6)
        .fragment(100, true)
        .tcp(3, 4)
        .build());
    assert_eq!(
        (later.fragment, later.proto),
        (Fragment::Later, IPPROTO_TCP)
    );
    assert_eq!((later.sport, later.dport), (0, 0));
}

#[test]
fn ipv6_ah_uses_four_byte_units() {
    let mut f = PacketBuilder::v6(A6, B6)
        .ipv6_ext(IPPROTO_AH)
        .udp(1, 2)
        .payload(8)
        .build();
    // The builder wrote an 8-byte header with length 0; AH length 0 means (0 + 2) * 4 = 8.
    assert_eq!(ip(&f).dport, 2);
    // AH length 1 means 12 bytes: the walk must land 4 bytes further, inside the UDP header.
    f[54 + 1] = 1;
    let p = ip(&f);
    assert_eq!(p.l4_offset, 54 + 12);
}

#[test]
fn ipv6_payload_length_beyond_frame_is_truncated() {
    let mut f = PacketBuilder::v6(A6, B6).udp(1, 2).build();
    f[18..20].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(parse(&f[..]), Err(Reason::Truncated));
}

#[test]
fn ipv6_ext_header_running_past_the_payload_is_truncated() {
    let mut f = PacketBuilder::v6(A6, B6)
        .ipv6_ext(IPPROTO_HOPOPTS)
        .udp(1, 2)
        .build();
    f[54 + 1] = 200; // 1608 bytes of options in a 60-byte frame
    assert_eq!(parse(&f[..]), Err(Reason::Truncated));
}

#[test]
fn other_transport_protocols_pass_without_ports() {
    let p = ip(&PacketBuilder::v4(A4, B4).l4(L4::Raw(47)).build()); // GRE
    assert_eq!((p.proto, p.sport, p.dport), (47, 0, 0));
    let p = ip(&PacketBuilder::v6(A6, B6).l4(L4::Raw(IPPROTO_NONE)).build());
    assert_eq!(p.proto, IPPROTO_NONE);
}

#[test]
fn every_truncation_of_tcp_over_ipv6_is_refused() {
    let f = PacketBuilder::v6(A6, B6).tcp(1, 8000).build();
    assert_eq!(f.len(), 74);
    for cut in 0..f.len() {
        assert_eq!(parse(&f[..cut]), Err(Reason::Truncated), "cut at {cut}");
    }
    assert!(parse(&f[..]).is_ok());
}

#[test]
fn every_truncation_of_udp_over_ipv4_in_two_tags_is_refused() {
    let f = PacketBuilder::v4(A4, B4).vlan(1).vlan(2).udp(1, 2).build();
    for cut in 0..f.len() {
        assert_eq!(parse(&f[..cut]), Err(Reason::Truncated), "cut at {cut}");
    }
}

#[test]
fn tcp_flags_and_new_flows() {
    let syn = ip(&PacketBuilder::v4(A4, B4).tcp(1, 2).build());
    assert_eq!(syn.tcp_flags, TCP_SYN);
    assert!(syn.is_new_flow());
    let mut f = PacketBuilder::v4(A4, B4).tcp(1, 2).build();
    f[14 + 20 + 13] = TCP_SYN | TCP_ACK;
    assert!(!ip(&f).is_new_flow());
    assert!(!ip(&PacketBuilder::v4(A4, B4).udp(1, 2).build()).is_new_flow());
}

// The layer-3 entry (`parse_l3`): what generic XDP hands over on ipip, sit, gre, ip6tnl,
// wireguard and xfrm devices, a packet with no Ethernet header.

/// An Ethernet frame's packet, as a layer-3 tunnel device delivers it.
fn l3(frame: &[u8]) -> Vec<u8> {
    frame[ETH_HLEN..].to_vec()
}

fn ip_l3(packet: &[u8]) -> IpPacket {
    match parse_l3(packet) {
        Ok(Frame::Ip(p)) => p,
        other => panic!("expected an IP packet, got {other:?}"),
    }
}

/// `inner` behind an outer IPv4 header and a GRE header with `flags` (checksum, key,
/// sequence bits), the way an NBMA GRE device's generic XDP sees it.
fn gre_outer_v4(inner: &[u8], flags: u8) -> Vec<u8> {
    let proto = if inner[0] >> 4 == 6 {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    };
    let mut gre = vec![flags, 0];
    gre.extend_from_slice(&proto.to_be_bytes());
    for bit in [0x80u8, 0x20, 0x10] {
        if flags & bit != 0 {
            gre.extend_from_slice(&[0xaa; 4]);
        }
    }
    let total = (20 + gre.len() + inner.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_GRE, 0, 0]);
    p.extend_from_slice(&[198, 19, 0, 1]);
    p.extend_from_slice(&[198, 19, 0, 2]);
    p.extend_from_slice(&gre);
    p.extend_from_slice(inner);
    p
}

#[test]
fn l3_ipv4_and_ipv6_fields_match_the_ethernet_parse() {
    for frame in [
        PacketBuilder::v4(A4, B4)
            .tcp(1234, 8000)
            .payload(10)
            .build(),
        PacketBuilder::v6(A6, B6).udp(5353, 53).build(),
        PacketBuilder::v6(A6, B6)
            .ipv6_ext(IPPROTO_DSTOPTS)
            .tcp(1, 8000)
            .build(),
        PacketBuilder::v4(A4, B4)
            .fragment(8, false)
            .tcp(1, 2)
            .build(),
    ] {
        let eth = ip(&frame);
        let p = ip_l3(&l3(&frame));
        // Same packet, offsets shifted by the missing Ethernet header.
        assert_eq!(
            IpPacket {
                l4_offset: eth.l4_offset - ETH_HLEN as u16,
                ip_end: eth.ip_end - ETH_HLEN as u32,
                ..eth
            },
            p
        );
    }
}

#[test]
fn l3_version_nibble_decides_and_anything_else_is_refused() {
    let mut p = l3(&PacketBuilder::v4(A4, B4).tcp(1, 8000).build());
    p[0] = 0x55;
    assert_eq!(parse_l3(&p[..]), Err(Reason::BadVersion));
    assert_eq!(parse_l3(&[][..]), Err(Reason::Truncated));
    // An IPv6 header cut short is truncated, not passed.
    let v6 = l3(&PacketBuilder::v6(A6, B6).tcp(1, 8000).build());
    assert_eq!(parse_l3(&v6[..30]), Err(Reason::Truncated));
}

#[test]
fn l3_truncated_at_every_byte_is_never_an_ip_packet_with_ports() {
    let p = l3(&PacketBuilder::v4(A4, B4).tcp(1, 8000).build());
    for cut in 0..p.len() {
        assert!(parse_l3(&p[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn l3_gre_outer_header_is_peeled_to_the_inner_packet() {
    let inner = l3(&PacketBuilder::v4(A4, B4).tcp(4000, 8000).build());
    let want = ip_l3(&inner);
    for flags in [0u8, 0x80, 0x20, 0x10, 0xb0] {
        let outer = gre_outer_v4(&inner, flags);
        let p = ip_l3(&outer);
        assert_eq!(
            (p.src, p.dst, p.proto, p.dport),
            (want.src, want.dst, IPPROTO_TCP, 8000)
        );
        assert_eq!((p.sport, p.tcp_flags), (want.sport, want.tcp_flags));
    }
    let inner6 = l3(&PacketBuilder::v6(A6, B6).udp(1, 8001).build());
    let p = ip_l3(&gre_outer_v4(&inner6, 0x20));
    assert_eq!((p.family, p.src.bytes(), p.dport), (Family::V6, A6, 8001));
    // GRE carrying something the parser cannot judge is refused, not decided on the outer
    // header (the kernel may still decapsulate it: MPLS, or WCCP below).
    for proto in [0x6558u16, 0x8847, 0x1234] {
        let mut other = gre_outer_v4(&inner, 0);
        other[22..24].copy_from_slice(&proto.to_be_bytes());
        assert_eq!(parse_l3(&other[..]), Err(Reason::BadVersion), "{proto:#x}");
    }
    // Enhanced GRE (version 1, PPTP) is not ip_gre's: the outer packet, as it is.
    let mut pptp = gre_outer_v4(&inner, 0);
    pptp[21] = 1;
    pptp[22..24].copy_from_slice(&0x880bu16.to_be_bytes());
    assert_eq!(ip_l3(&pptp).proto, IPPROTO_GRE);
    // A GRE header cut short is truncated.
    assert_eq!(
        parse_l3(&gre_outer_v4(&inner, 0)[..22]),
        Err(Reason::Truncated)
    );
}

/// WCCP over GRE (protocol 0x883E, no flags), which the kernel decapsulates as IPv4: with
/// the inner header right after GRE (WCCPv1) or after a 4-byte redirect header (WCCPv2).
#[test]
fn l3_gre_wccp_is_peeled_as_the_kernel_does() {
    let inner = l3(&PacketBuilder::v4(A4, B4).tcp(4000, 8000).build());
    let want = ip_l3(&inner);
    let mut v1 = gre_outer_v4(&inner, 0);
    v1[22..24].copy_from_slice(&0x883eu16.to_be_bytes());
    let p = ip_l3(&v1);
    assert_eq!((p.src, p.dport), (want.src, 8000));
    let mut redirect = vec![0x00, 0x00, 0x00, 0x00];
    redirect.extend_from_slice(&inner);
    let mut v2 = gre_outer_v4(&redirect, 0);
    v2[22..24].copy_from_slice(&0x883eu16.to_be_bytes());
    let p = ip_l3(&v2);
    assert_eq!((p.src, p.dport, p.proto), (want.src, 8000, IPPROTO_TCP));
    // With a flag set it is not WCCP: refused as a non-IP payload.
    let mut flagged = gre_outer_v4(&inner, 0x20);
    flagged[22..24].copy_from_slice(&0x883eu16.to_be_bytes());
    assert_eq!(parse_l3(&flagged[..]), Err(Reason::BadVersion));
}
