//! Network addresses and prefixes: host lengths, masking, coverage, and the operator's
//! "address or CIDR" targets. Every prefix the agent handles goes through here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The prefix length of a single address: 32 or 128.
pub fn host_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// `addr` with everything after the first `len` bits cleared.
pub fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::from(mask_v4(a, len.min(32))),
        IpAddr::V6(a) => IpAddr::from(mask_v6(a, len.min(128))),
    }
}

/// Whether `net/len` covers `addr` (same family).
pub fn prefix_covers(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    net.is_ipv4() == addr.is_ipv4() && mask(net, len) == mask(addr, len)
}

/// The first `len` bits of `a` (`len` at most 32), as the LPM tries key them.
pub fn mask_v4(a: Ipv4Addr, len: u8) -> [u8; 4] {
    let bits = u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    bits.to_be_bytes()
}

/// The first `len` bits of `a` (`len` at most 128), as the LPM tries key them.
pub fn mask_v6(a: Ipv6Addr, len: u8) -> [u8; 16] {
    let bits = u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    bits.to_be_bytes()
}

/// "198.18.0.5/32".
pub fn prefix_text(addr: IpAddr, len: u8) -> String {
    format!("{addr}/{len}")
}

/// "198.18.0.5" (a /32 or /128) or "198.18.0.0/24"; host bits must be zero.
pub fn parse_target(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = host_len(addr);
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
    };
    if mask(addr, len) != addr {
        return Err(format!(
            "{s:?} has host bits set (did you mean {}/{len}?)",
            mask(addr, len)
        ));
    }
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask_v4(Ipv4Addr::new(198, 18, 7, 9), 24), [198, 18, 7, 0]);
        assert_eq!(mask_v4(Ipv4Addr::new(198, 18, 7, 9), 0), [0; 4]);
        assert_eq!(mask_v4(Ipv4Addr::new(198, 18, 7, 9), 32), [198, 18, 7, 9]);
        let a: Ipv6Addr = "2001:db8:1:2::9".parse().unwrap();
        assert_eq!(
            Ipv6Addr::from(mask_v6(a, 48)),
            "2001:db8:1::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(mask_v6(a, 0), [0; 16]);
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("198.18.0.5"),
            Ok(("198.18.0.5".parse().unwrap(), 32))
        );
        assert_eq!(
            parse_target("198.18.0.0/24"),
            Ok(("198.18.0.0".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_target("2001:db8::/32"),
            Ok(("2001:db8::".parse().unwrap(), 32))
        );
        assert!(
            parse_target("198.18.0.5/24")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(
            parse_target("198.18.0.0/33")
                .unwrap_err()
                .contains("0..=32")
        );
        assert!(parse_target("batch").unwrap_err().contains("not an IP"));
    }
}
