//! Builds test frames byte by byte: the fixtures of the kernel tests and the host tests of the
//! parser share it, so a frame means the same thing in both.

use std::vec::Vec;

use crate::parse::{
    ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_FRAGMENT, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP,
};

/// The transport part of a frame.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP for IPv4, ICMPv6 for IPv6.
    Icmp {
        ty: u8,
        code: u8,
    },
    /// Any other protocol number with no header of its own.
    Raw(u8),
}

#[derive(Clone, Debug)]
enum Ip {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

/// A frame under construction; `build` lays it out.
#[derive(Clone, Debug)]
pub struct PacketBuilder {
    vlans: Vec<u16>,
    ip: Ip,
    ipv4_options: Vec<u8>,
    /// (offset in 8-byte units, more fragments)
    fragment: Option<(u16, bool)>,
    ipv6_ext: Vec<u8>,
    l4: L4,
    payload: usize,
    /// TCP flags byte; SYN unless set.
    tcp_flags: u8,
}

impl PacketBuilder {
    pub fn v4(src: [u8; 4], dst: [u8; 4]) -> Self {
        Self::new(Ip::V4 { src, dst })
    }

    pub fn v6(src: [u8; 16], dst: [u8; 16]) -> Self {
        Self::new(Ip::V6 { src, dst })
    }

    fn new(ip: Ip) -> Self {
        PacketBuilder {
            vlans: Vec::new(),
            ip,
            ipv4_options: Vec::new(),
            fragment: None,
            ipv6_ext: Vec::new(),
            l4: L4::Udp {
                sport: 40000,
                dport: 9,
            },
            payload: 0,
            tcp_flags: 0x02,
        }
    }

    /// Adds an 802.1Q tag (outermost first).
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlans.push(id);
        self
    }

    /// IPv4 options, padded with End-of-Options to a multiple of four bytes.
    pub fn ipv4_options(mut self, opts: &[u8]) -> Self {
        self.ipv4_options = opts.to_vec();
        while !self.ipv4_options.len().is_multiple_of(4) {
            self.ipv4_options.push(0);
        }
        self
    }

    /// Makes the packet a fragment: `offset` in 8-byte units, `more` the MF/M flag. For IPv6 a
    /// fragment header is appended after the other extension headers.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.fragment = Some((offset, more));
        self
    }

    /// Appends an 8-byte IPv6 extension header of type `kind` (hop-by-hop, routing, ...).
    pub fn ipv6_ext(mut self, kind: u8) -> Self {
        self.ipv6_ext.push(kind);
        self
    }

    pub fn l4(mut self, l4: L4) -> Self {
        self.l4 = l4;
        self
    }

    pub fn tcp(self, sport: u16, dport: u16) -> Self {
        self.l4(L4::Tcp { sport, dport })
    }

    pub fn udp(self, sport: u16, dport: u16) -> Self {
        self.l4(L4::Udp { sport, dport })
    }

    pub fn icmp(self, ty: u8, code: u8) -> Self {
        self.l4(L4::Icmp { ty, code })
    }

    /// The TCP flags byte (SYN by default): `0x10` ACK, `0x04` RST, ...
    pub fn tcp_flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    /// Bytes of payload after the transport header.
    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    fn l4_bytes(&self, v6: bool) -> (u8, Vec<u8>) {
        let mut b = Vec::new();
        let proto = match self.l4 {
            L4::Tcp { sport, dport } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
                b.extend_from_slice(&[0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]); // doff 5
                IPPROTO_TCP
            }
            L4::Udp { sport, dport } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                IPPROTO_UDP
            }
            L4::Icmp { ty, code } => {
                b.extend_from_slice(&[ty, code, 0, 0, 0, 1, 0, 1]);
                if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP }
            }
            L4::Raw(p) => p,
        };
        b.resize(b.len() + self.payload, 0xab);
        (proto, b)
    }

    /// Lays the frame out: Ethernet, tags, IP, extension headers, transport, payload.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        for id in &self.vlans {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
        }
        match &self.ip {
            Ip::V4 { src, dst } => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let (proto, l4) = self.l4_bytes(false);
                let hlen = 20 + self.ipv4_options.len();
                let total = (hlen + l4.len()) as u16;
                let frag = match self.fragment {
                    Some((off, more)) => (off & 0x1fff) | if more { 0x2000 } else { 0 },
                    None => 0x4000, // DF
                };
                let start = f.len();
                f.push(0x40 | (hlen / 4) as u8);
                f.push(0);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&frag.to_be_bytes());
                f.extend_from_slice(&[64, proto, 0, 0]);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                f.extend_from_slice(&self.ipv4_options);
                let csum = ipv4_checksum(&f[start..start + hlen]);
                f[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
                f.extend_from_slice(&l4);
            }
            Ip::V6 { src, dst } => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let (proto, l4) = self.l4_bytes(true);
                let mut chain: Vec<u8> = self.ipv6_ext.clone();
                if self.fragment.is_some() {
                    chain.push(IPPROTO_FRAGMENT);
                }
                let mut ext = Vec::new();
                for (i, kind) in chain.iter().enumerate() {
                    let next = chain.get(i + 1).copied().unwrap_or(proto);
                    if *kind == IPPROTO_FRAGMENT {
                        let (off, more) = self.fragment.unwrap_or((0, false));
                        let fo = (off << 3) | u16::from(more);
                        ext.extend_from_slice(&[next, 0]);
                        ext.extend_from_slice(&fo.to_be_bytes());
                        ext.extend_from_slice(&[0, 0, 0x56, 0x78]);
                    } else {
                        // 8 bytes: next, length 0, then PadN filling six bytes.
                        ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                    }
                }
                let first = chain.first().copied().unwrap_or(proto);
                let payload = (ext.len() + l4.len()) as u16;
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&payload.to_be_bytes());
                f.extend_from_slice(&[first, 64]);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                f.extend_from_slice(&ext);
                f.extend_from_slice(&l4);
            }
        }
        f
    }
}

/// The ones'-complement header checksum of RFC 791.
pub fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum = 0u32;
    for (i, pair) in h.chunks(2).enumerate() {
        if i == 5 {
            continue; // the checksum field itself
        }
        let hi = u32::from(pair[0]) << 8;
        let lo = u32::from(pair.get(1).copied().unwrap_or(0));
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Offset of the IP header in a frame built with `vlans` tags.
pub fn ip_offset(vlans: usize) -> usize {
    14 + 4 * vlans
}
