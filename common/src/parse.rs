//! The packet parser, written once for the kernel and the host.
//!
//! The XDP program implements [`PacketView`] with bounds checks against `data_end`, which is
//! what the verifier needs to see; host tests implement it over byte slices. Every offset the
//! parser computes is bounded by construction (two VLAN tags, `ihl <= 15`, a fixed number of
//! IPv6 extension headers of at most 2 KiB each), so the verifier can follow it.

use crate::Reason;

/// Read access to a frame, starting at the Ethernet header.
pub trait PacketView {
    /// Length of the frame in bytes.
    fn len(&self) -> usize;

    /// Whether the frame is empty (never true for a frame XDP hands over).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `N` bytes at `off`, or `None` when they are not all inside the frame.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl PacketView for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        self.get(off..end)?.try_into().ok()
    }
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_MH: u8 = 135;
pub const IPPROTO_HIP: u8 = 139;
pub const IPPROTO_SHIM6: u8 = 140;

/// VLAN tags the parser walks (802.1Q and 802.1ad, QinQ included); a third is refused.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers the parser walks before it gives up on finding the transport header.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_MIN_HLEN: usize = 4;

/// IP family of a parsed packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4 = 4,
    V6 = 6,
}

/// Where a packet stands in IP fragmentation.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not a fragment (an IPv6 atomic fragment, offset 0 without M, counts as this).
    None = 0,
    /// Offset zero with more to come: carries the transport header.
    First = 1,
    /// Offset above zero: carries no transport header, so no ports.
    Later = 2,
}

/// An IPv4 or IPv6 address as 16 bytes in network order (IPv4 in the first four, the rest
/// zero), held in two words.
///
/// Words, not `[u8; 16]`: zeroing or copying a byte array compiles, on the BPF target, to a
/// call to a byte-at-a-time `memset` (a BPF-to-BPF call and a loop) for every IPv4 packet;
/// measured, that tripled the cost of the unprotected path. Two u64 stores do the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Addr([u64; 2]);

impl Addr {
    #[inline(always)]
    pub fn v4(b: [u8; 4]) -> Addr {
        Addr([u32::from_ne_bytes(b) as u64, 0])
    }

    #[inline(always)]
    pub fn v6(b: [u8; 16]) -> Addr {
        // SAFETY: same size, and every bit pattern is a valid [u64; 2]. A reinterpretation,
        // not a byte-by-byte assembly (which costs ~40 BPF instructions).
        Addr(unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(b) })
    }

    /// The 16 bytes, network order.
    #[inline(always)]
    pub fn bytes(&self) -> [u8; 16] {
        // SAFETY: same size, and every bit pattern is a valid [u8; 16].
        unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(self.0) }
    }

    /// The first four bytes (an IPv4 address).
    #[inline(always)]
    pub fn v4_bytes(&self) -> [u8; 4] {
        (self.0[0] as u32).to_ne_bytes()
    }
}

/// What the parser learnt of an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpPacket {
    pub src: Addr,
    pub dst: Addr,
    pub family: Family,
    /// Transport protocol (after the extension headers for IPv6).
    pub proto: u8,
    /// TCP/UDP ports; zero for other protocols and for non-first fragments.
    pub sport: u16,
    pub dport: u16,
    /// ICMP/ICMPv6 type and code; zero otherwise.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// TCP flags (byte 13 of the header); zero for other protocols.
    pub tcp_flags: u8,
    pub fragment: Fragment,
    pub vlan_tags: u8,
    /// Offset of the transport header from the start of the frame.
    pub l4_offset: u16,
    /// Where the IP datagram ends, from the start of the frame: its own length field, so link
    /// padding of a small frame never counts as payload (`flow::tcp_payload`).
    pub ip_end: u32,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

impl IpPacket {
    /// A TCP SYN without ACK: a new flow.
    pub fn is_new_flow(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// Whether ports are known (TCP or UDP, not a later fragment).
    pub fn has_ports(&self) -> bool {
        self.fragment != Fragment::Later && (self.proto == IPPROTO_TCP || self.proto == IPPROTO_UDP)
    }
}

/// A frame the parser understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A well-formed Ethernet frame that is not IP; carries the EtherType.
    NotIp(u16),
    Ip(IpPacket),
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses a frame. `Err` carries the reason a malformed frame gets.
#[inline(always)]
pub fn parse<P: PacketView + ?Sized>(p: &P) -> Result<Frame, Reason> {
    let Some(et) = p.load::<2>(12) else {
        return Err(Reason::Truncated);
    };
    let mut ethertype = be16(et);
    let mut off = ETH_HLEN;
    let mut vlan_tags = 0u8;
    // A fixed trip count: the verifier sees a bounded loop (or LLVM unrolls it).
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // TCI (2 bytes) then the inner EtherType.
        let Some(tag) = p.load::<4>(off) else {
            return Err(Reason::Truncated);
        };
        ethertype = be16([tag[2], tag[3]]);
        off += 4;
        vlan_tags += 1;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(Reason::TooManyVlanTags);
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(p, off, vlan_tags).map(Frame::Ip),
        ETH_P_IPV6 => parse_ipv6(p, off, vlan_tags).map(Frame::Ip),
        other => Ok(Frame::NotIp(other)),
    }
}

/// GRE (RFC 2784/2890): the header an NBMA GRE device leaves in front of the inner packet.
pub const IPPROTO_GRE: u8 = 47;
const GRE_CSUM: u8 = 0x80;
const GRE_KEY: u8 = 0x20;
const GRE_SEQ: u8 = 0x10;
/// The version bits of the second byte: 0 plain GRE, 1 enhanced GRE (PPTP).
const GRE_VERSION: u8 = 0x07;
/// WCCP redirection over GRE, which the kernel decapsulates as IPv4.
const ETH_P_WCCP: u16 = 0x883e;

/// Parses a packet that starts at the network layer, as generic XDP hands it over on a
/// layer-3 tunnel device (ipip, sit, gre, ip6tnl, wireguard, xfrm: no Ethernet header). The
/// version nibble says the family; anything else is `BadVersion` (dropped).
///
/// A GRE device without a fixed remote (NBMA mode, the `gre0` fallback among them) keeps its
/// receive mac header on the *outer* IP header (`skb_pop_mac_header` in `__ipgre_rcv`, so
/// that `ipgre_header_parse` can read the peer), and generic XDP's data starts there: the
/// outer IPv4/IPv6 header, GRE, then the inner packet. So an outer header carrying GRE is
/// peeled once and the decision is made on the inner packet, which is what the device
/// delivers. `vlan_tags` is 0 and offsets count from the start of the packet.
#[inline(always)]
pub fn parse_l3<P: PacketView + ?Sized>(p: &P) -> Result<Frame, Reason> {
    // Four bytes, not one: a one-byte load at the start compiles to `data >= data_end`, a
    // comparison the verifier learns no packet range from. Any IP header is longer anyway.
    let Some(v) = p.load::<4>(0) else {
        return Err(Reason::Truncated);
    };
    let off: usize = gre_inner(p, v[0] >> 4)?.unwrap_or_default();
    let Some(v) = p.load::<4>(off) else {
        return Err(Reason::Truncated);
    };
    match v[0] >> 4 {
        4 => parse_ipv4(p, off, 0).map(Frame::Ip),
        6 => parse_ipv6(p, off, 0).map(Frame::Ip),
        _ => Err(Reason::BadVersion),
    }
}

/// Where the inner packet starts when the packet at 0 (IP version `version`) is an outer
/// header carrying GRE (version 0, what ip_gre decapsulates) with an IP payload; `None` when
/// it is not GRE, or enhanced GRE (version 1, PPTP: not ip_gre's). GRE version 0 carrying
/// anything the parser cannot judge is refused (`bad_version`), never decided on the outer
/// header: the kernel may still deliver it (WCCP as IPv4, MPLS), and an NBMA GRE device shows
/// the outer header only because it is about to decapsulate.
#[inline(always)]
fn gre_inner<P: PacketView + ?Sized>(p: &P, version: u8) -> Result<Option<usize>, Reason> {
    let gre = match version {
        4 => {
            let Some(h) = p.load::<10>(0) else {
                return Err(Reason::Truncated);
            };
            if h[9] != IPPROTO_GRE {
                return Ok(None);
            }
            let ihl = (h[0] & 0x0f) as usize * 4;
            if ihl < IPV4_MIN_HLEN {
                return Err(Reason::BadHeaderLength);
            }
            ihl
        }
        6 => {
            let Some(h) = p.load::<7>(0) else {
                return Err(Reason::Truncated);
            };
            if h[6] != IPPROTO_GRE {
                return Ok(None);
            }
            IPV6_HLEN
        }
        _ => return Err(Reason::BadVersion),
    };
    // Five bytes: the base header and the first byte after it (WCCP's check below). An inner
    // IP header is longer than one byte anyway.
    let Some(g) = p.load::<5>(gre) else {
        return Err(Reason::Truncated);
    };
    if g[1] & GRE_VERSION != 0 {
        return Ok(None);
    }
    let proto = be16([g[2], g[3]]);
    if proto == ETH_P_WCCP && g[0] == 0 && g[1] == 0 {
        // As the kernel's gre_parse_header: WCCP without flags carries IPv4, after a 4-byte
        // redirect header (WCCPv2) unless the next byte already starts an IPv4 header.
        let redirect = if g[4] & 0xf0 == 0x40 { 0 } else { 4 };
        return Ok(Some(gre + 4 + redirect));
    }
    if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        return Err(Reason::BadVersion);
    }
    // Base header 4 bytes; checksum (with its reserved half), key and sequence number add 4
    // each when their flag is set.
    let mut len = 4;
    for flag in [GRE_CSUM, GRE_KEY, GRE_SEQ] {
        if g[0] & flag != 0 {
            len += 4;
        }
    }
    Ok(Some(gre + len))
}

#[inline(always)]
fn parse_ipv4<P: PacketView + ?Sized>(
    p: &P,
    off: usize,
    vlan_tags: u8,
) -> Result<IpPacket, Reason> {
    let Some(h) = p.load::<IPV4_MIN_HLEN>(off) else {
        return Err(Reason::Truncated);
    };
    if h[0] >> 4 != 4 {
        return Err(Reason::BadVersion);
    }
    let ihl = (h[0] & 0x0f) as usize * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Reason::BadHeaderLength);
    }
    let total = be16([h[2], h[3]]) as usize;
    if total < ihl {
        return Err(Reason::BadHeaderLength);
    }
    // The IP datagram ends here; anything after it is link padding.
    let end = off + total;
    if end > p.len() {
        return Err(Reason::Truncated);
    }
    let frag = be16([h[6], h[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    let mut pkt = IpPacket {
        family: Family::V4,
        src: Addr::v4([h[12], h[13], h[14], h[15]]),
        dst: Addr::v4([h[16], h[17], h[18], h[19]]),
        proto: h[9],
        sport: 0,
        dport: 0,
        icmp_type: 0,
        icmp_code: 0,
        tcp_flags: 0,
        fragment: Fragment::None,
        vlan_tags,
        l4_offset: (off + ihl) as u16,
        ip_end: end as u32,
    };
    if frag_offset != 0 {
        pkt.fragment = Fragment::Later;
        return Ok(pkt);
    }
    if more_fragments {
        pkt.fragment = Fragment::First;
    }
    parse_l4(p, &mut pkt, off + ihl, end, IPPROTO_ICMP)?;
    Ok(pkt)
}

#[inline(always)]
fn parse_ipv6<P: PacketView + ?Sized>(
    p: &P,
    off: usize,
    vlan_tags: u8,
) -> Result<IpPacket, Reason> {
    let Some(h) = p.load::<IPV6_HLEN>(off) else {
        return Err(Reason::Truncated);
    };
    if h[0] >> 4 != 6 {
        return Err(Reason::BadVersion);
    }
    let payload = be16([h[4], h[5]]) as usize;
    // Payload length 0 announces a jumbogram (RFC 2675): the frame's length rules then.
    let end = if payload == 0 {
        p.len()
    } else {
        off + IPV6_HLEN + payload
    };
    if end > p.len() {
        return Err(Reason::Truncated);
    }
    let mut pkt = IpPacket {
        family: Family::V6,
        src: Addr::v6([
            h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19],
            h[20], h[21], h[22], h[23],
        ]),
        dst: Addr::v6([
            h[24], h[25], h[26], h[27], h[28], h[29], h[30], h[31], h[32], h[33], h[34], h[35],
            h[36], h[37], h[38], h[39],
        ]),
        proto: h[6],
        sport: 0,
        dport: 0,
        icmp_type: 0,
        icmp_code: 0,
        tcp_flags: 0,
        fragment: Fragment::None,
        vlan_tags,
        l4_offset: 0,
        ip_end: end as u32,
    };

    let mut cur = off + IPV6_HLEN;
    let mut next = h[6];
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH | IPPROTO_HIP
            | IPPROTO_SHIM6 => {
                let Some(eh) = p.load::<2>(cur) else {
                    return Err(Reason::Truncated);
                };
                next = eh[0];
                // Length in 8-octet units, not counting the first 8 (RFC 8200 4.3).
                cur += (eh[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let Some(eh) = p.load::<2>(cur) else {
                    return Err(Reason::Truncated);
                };
                next = eh[0];
                // AH counts 4-octet units, minus 2 (RFC 4302 2.2).
                cur += (eh[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(fh) = p.load::<8>(cur) else {
                    return Err(Reason::Truncated);
                };
                next = fh[0];
                cur += 8;
                let fo = be16([fh[2], fh[3]]);
                if fo >> 3 != 0 {
                    pkt.proto = next;
                    pkt.fragment = Fragment::Later;
                    pkt.l4_offset = cur as u16;
                    return Ok(pkt);
                }
                if fo & 1 != 0 {
                    pkt.fragment = Fragment::First;
                }
            }
            _ => break,
        }
        if cur > end {
            return Err(Reason::Truncated);
        }
    }
    if is_ipv6_ext_header(next) {
        return Err(Reason::TooManyExtHeaders);
    }
    pkt.proto = next;
    parse_l4(p, &mut pkt, cur, end, IPPROTO_ICMPV6)?;
    Ok(pkt)
}

/// Whether `proto` is an extension header the IPv6 walk steps over.
pub const fn is_ipv6_ext_header(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_HOPOPTS
            | IPPROTO_ROUTING
            | IPPROTO_FRAGMENT
            | IPPROTO_AH
            | IPPROTO_DSTOPTS
            | IPPROTO_MH
            | IPPROTO_HIP
            | IPPROTO_SHIM6
    )
}

/// Reads ports or ICMP type/code at `l4`; the header must end within the IP datagram.
#[inline(always)]
fn parse_l4<P: PacketView + ?Sized>(
    p: &P,
    pkt: &mut IpPacket,
    l4: usize,
    end: usize,
    icmp_proto: u8,
) -> Result<(), Reason> {
    pkt.l4_offset = l4 as u16;
    let need = match pkt.proto {
        IPPROTO_TCP => TCP_MIN_HLEN,
        IPPROTO_UDP => UDP_HLEN,
        x if x == icmp_proto => ICMP_MIN_HLEN,
        // ESP, GRE, SCTP, no-next-header ...: nothing more to read.
        _ => return Ok(()),
    };
    if l4 + need > end {
        return Err(Reason::Truncated);
    }
    let Some(h) = p.load::<4>(l4) else {
        return Err(Reason::Truncated);
    };
    if pkt.proto == icmp_proto {
        pkt.icmp_type = h[0];
        pkt.icmp_code = h[1];
    } else {
        pkt.sport = be16([h[0], h[1]]);
        pkt.dport = be16([h[2], h[3]]);
    }
    if pkt.proto == IPPROTO_TCP {
        // Inside the 20 bytes checked above.
        let Some(f) = p.load::<1>(l4 + 13) else {
            return Err(Reason::Truncated);
        };
        pkt.tcp_flags = f[0];
    }
    Ok(())
}
