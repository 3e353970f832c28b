//! The two netlink questions the tunnel scan asks the kernel, in its own network namespace:
//! which links exist (RTM_GETLINK dump: name, index, ARPHRD type, IFLA_INFO_KIND) and how
//! many IPsec SAs exist (XFRM_MSG_GETSADINFO).
//!
//! Hand-written over `libc` rather than with netlink-packet-route + netlink-sys: two fixed
//! requests and four attributes read, against two crates (and their dependencies) to build on
//! a machine where builds are the bottleneck. The replies are parsed with explicit bounds
//! checks ([`parse_links`] is unit-tested on built bytes).

use std::{io, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

/// One link as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    /// `ifi_type`: ARPHRD_ETHER (1) for devices that deliver Ethernet frames.
    pub arphrd: u16,
    /// IFLA_INFO_KIND (`vxlan`, `ipip`, `wireguard` ...); empty for devices without one
    /// (physical NICs, loopback).
    pub kind: String,
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFINFOMSG_LEN: usize = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const NETLINK_XFRM: i32 = 6;
const XFRM_MSG_GETSADINFO: u16 = 35;
const XFRM_MSG_NEWSADINFO: u16 = 34;
const XFRMA_SAD_CNT: u16 = 1;
/// NLA_F_NESTED | NLA_F_NET_BYTEORDER: flag bits of an attribute type.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Replies read per request at most: a dump of even thousands of links is a few dozen.
const MAX_READS: usize = 4096;

fn socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The daemon's loop asks every second: a kernel that never answers must cost it a second,
    // not the loop.
    let limit = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: `limit` is a valid timeval for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&limit as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn request(msg_type: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + body.len()) as u32;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&msg_type.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

/// Sends `req` and hands each reply datagram to `each` until it returns `Ok(true)` (done).
fn exchange(
    fd: &OwnedFd,
    req: &[u8],
    mut each: impl FnMut(&[u8]) -> io::Result<bool>,
) -> io::Result<()> {
    // SAFETY: the buffer is valid for its length; the kernel is the destination (no address).
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAX_READS {
        // SAFETY: the buffer is valid and writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if each(&buf[..n as usize])? {
            return Ok(());
        }
    }
    Err(io::Error::other("netlink: no end to the reply"))
}

/// Walks the netlink messages of one datagram: (type, flags, payload).
fn messages(buf: &[u8]) -> io::Result<Vec<(u16, u16, &[u8])>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(bad("message length out of bounds"));
        }
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let flags = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]);
        out.push((ty, flags, &buf[off + NLMSG_HDRLEN..off + len]));
        off += (len + 3) & !3;
    }
    Ok(out)
}

/// Netlink attributes (type without flag bits, value) in `buf`.
fn attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > buf.len() {
            break;
        }
        out.push((ty, &buf[off + 4..off + len]));
        off += (len + 3) & !3;
    }
    out
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// What one datagram of a link dump says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkDatagram {
    pub links: Vec<Link>,
    pub done: bool,
    /// The dump changed while it was read (NLM_F_DUMP_INTR): read it again.
    pub interrupted: bool,
}

/// Parses one datagram of an RTM_GETLINK dump.
pub fn parse_links(buf: &[u8]) -> io::Result<LinkDatagram> {
    let mut d = LinkDatagram::default();
    for (ty, flags, payload) in messages(buf)? {
        if flags & NLM_F_DUMP_INTR != 0 {
            d.interrupted = true;
        }
        match ty {
            NLMSG_DONE => d.done = true,
            NLMSG_ERROR => {
                let errno = payload
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            RTM_NEWLINK if payload.len() >= IFINFOMSG_LEN => {
                let arphrd = u16::from_ne_bytes([payload[2], payload[3]]);
                let ifindex = i32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes"));
                let mut link = Link {
                    name: String::new(),
                    ifindex: ifindex as u32,
                    arphrd,
                    kind: String::new(),
                };
                for (aty, value) in attrs(&payload[IFINFOMSG_LEN..]) {
                    match aty {
                        IFLA_IFNAME => link.name = c_string(value),
                        IFLA_LINKINFO => {
                            if let Some((_, k)) =
                                attrs(value).into_iter().find(|(t, _)| *t == IFLA_INFO_KIND)
                            {
                                link.kind = c_string(k);
                            }
                        }
                        _ => {}
                    }
                }
                d.links.push(link);
            }
            _ => {}
        }
    }
    Ok(d)
}

/// Every link in this network namespace.
pub fn links() -> io::Result<Vec<Link>> {
    // A dump the kernel marks interrupted (links changed meanwhile) is read again, a few times.
    for _ in 0..5 {
        let fd = socket(libc::NETLINK_ROUTE)?;
        let req = request(
            RTM_GETLINK,
            NLM_F_DUMP,
            1,
            &[0u8; IFINFOMSG_LEN], // AF_UNSPEC, every link
        );
        let mut all = Vec::new();
        let mut interrupted = false;
        exchange(&fd, &req, |buf| {
            let d = parse_links(buf)?;
            all.extend(d.links);
            interrupted |= d.interrupted;
            Ok(d.done)
        })?;
        if !interrupted {
            return Ok(all);
        }
    }
    Err(io::Error::other(
        "netlink: the link dump was interrupted by changes five times in a row",
    ))
}

/// How many IPsec SAs (xfrm states) this network namespace holds. A kernel without xfrm
/// netlink (no IPsec at all) holds none.
pub fn xfrm_states() -> io::Result<u32> {
    let fd = match socket(NETLINK_XFRM) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => return Ok(0),
        Err(e) => return Err(e),
    };
    let req = request(XFRM_MSG_GETSADINFO, 0, 1, &0u32.to_ne_bytes());
    let mut count = None;
    exchange(&fd, &req, |buf| {
        for (ty, _, payload) in messages(buf)? {
            match ty {
                NLMSG_ERROR => {
                    let errno = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                XFRM_MSG_NEWSADINFO if payload.len() >= 4 => {
                    count = attrs(&payload[4..])
                        .into_iter()
                        .find(|(t, v)| *t == XFRMA_SAD_CNT && v.len() >= 4)
                        .map(|(_, v)| u32::from_ne_bytes(v[..4].try_into().expect("4 bytes")));
                    return Ok(true);
                }
                _ => {}
            }
        }
        Ok(false)
    })?;
    Ok(count.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(value);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn newlink(name: &str, ifindex: i32, arphrd: u16, kind: Option<&str>) -> Vec<u8> {
        let mut body = vec![0u8, 0];
        body.extend_from_slice(&arphrd.to_ne_bytes());
        body.extend_from_slice(&ifindex.to_ne_bytes());
        body.extend_from_slice(&[0; 8]);
        body.extend(attr(IFLA_IFNAME, format!("{name}\0").as_bytes()));
        if let Some(k) = kind {
            // Nested, with the NLA_F_NESTED bit the kernel sets.
            let inner = attr(IFLA_INFO_KIND, format!("{k}\0").as_bytes());
            body.extend(attr(IFLA_LINKINFO | 0x8000, &inner));
        }
        request(RTM_NEWLINK, 0, 1, &body)
    }

    #[test]
    fn a_dump_datagram_gives_names_indexes_types_and_kinds() {
        let mut buf = newlink("lo", 1, 772, None);
        buf.extend(newlink("vx0", 7, 1, Some("vxlan")));
        buf.extend(newlink("tunl0", 9, 768, Some("ipip")));
        let d = parse_links(&buf).expect("parse");
        assert!(!d.done && !d.interrupted);
        assert_eq!(
            d.links,
            [
                Link {
                    name: "lo".into(),
                    ifindex: 1,
                    arphrd: 772,
                    kind: String::new()
                },
                Link {
                    name: "vx0".into(),
                    ifindex: 7,
                    arphrd: 1,
                    kind: "vxlan".into()
                },
                Link {
                    name: "tunl0".into(),
                    ifindex: 9,
                    arphrd: 768,
                    kind: "ipip".into()
                },
            ]
        );
        let done = request(NLMSG_DONE, 0, 1, &0u32.to_ne_bytes());
        assert!(parse_links(&done).expect("done").done);
    }

    /// The real kernel's answers in the test's namespace: loopback is a link without a kind,
    /// and the SA count comes back (0 on a test machine; root for the xfrm question:
    /// `cargo test -p tollgate --lib -- --ignored netlink`).
    #[test]
    fn the_kernel_answers_both_questions() {
        let links = links().expect("RTM_GETLINK dump");
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!((lo.arphrd, lo.kind.as_str()), (772, ""));
    }

    #[test]
    #[ignore = "needs root"]
    fn the_kernel_counts_sas() {
        assert!(xfrm_states().expect("XFRM_MSG_GETSADINFO") < 1_000_000);
    }

    #[test]
    fn errors_interruptions_and_bad_lengths_are_reported() {
        let err = request(NLMSG_ERROR, 0, 1, &(-libc::EPERM).to_ne_bytes());
        assert_eq!(
            parse_links(&err).expect_err("EPERM").raw_os_error(),
            Some(libc::EPERM)
        );
        let intr = request(NLMSG_DONE, NLM_F_DUMP_INTR, 1, &0u32.to_ne_bytes());
        assert!(parse_links(&intr).expect("intr").interrupted);
        let mut bad = newlink("x", 2, 1, Some("gre"));
        bad[0] = 255; // length past the datagram
        assert!(parse_links(&bad).is_err());
        // A truncated attribute ends the walk instead of reading past it.
        let mut cut = newlink("vx1", 3, 1, Some("vxlan"));
        let n = cut.len();
        cut.truncate(n - 4);
        cut[..4].copy_from_slice(&((n - 4) as u32).to_ne_bytes());
        let d = parse_links(&cut).expect("cut");
        assert_eq!(d.links[0].name, "vx1");
    }
}
