//! Parsers for CLI arguments: durations and `DST:PORT/PROTO`.

use std::net::{IpAddr, SocketAddr};

use tollgate::tables::Proto;

/// "90", "90s", "15m", "2h", "7d" → seconds.
pub fn duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 90s, 15m, 2h, 7d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?} (use s, m, h or d)"
            ));
        }
    };
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    if secs == 0 {
        return Err("a duration must be at least 1s".into());
    }
    Ok(secs)
}

/// "198.19.0.1:8000/tcp" or "[2001:db8::1]:443/udp" (protocol defaults to tcp).
pub fn destination(s: &str) -> Result<(IpAddr, u16, Proto), String> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p),
        None => (s, "tcp"),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => return Err(format!("unknown protocol {other:?}: tcp or udp")),
    };
    let sa: SocketAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not ADDR:PORT (IPv6 as [ADDR]:PORT)"))?;
    if sa.port() == 0 {
        return Err("port 0 is not a destination".into());
    }
    Ok((sa.ip(), sa.port(), proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_secs("90"), Ok(90));
        assert_eq!(duration_secs("15m"), Ok(900));
        assert_eq!(duration_secs("2h"), Ok(7200));
        assert_eq!(duration_secs("7d"), Ok(604800));
        assert!(duration_secs("0s").is_err());
        assert!(duration_secs("5w").unwrap_err().contains("unit"));
        assert!(duration_secs("soon").is_err());
        assert!(duration_secs("99999999999999999999d").is_err());
    }

    #[test]
    fn destinations() {
        assert_eq!(
            destination("198.19.0.1:8000/udp"),
            Ok(("198.19.0.1".parse().unwrap(), 8000, Proto::Udp))
        );
        assert_eq!(
            destination("[2001:db8::1]:443"),
            Ok(("2001:db8::1".parse().unwrap(), 443, Proto::Tcp))
        );
        assert!(destination("198.19.0.1/tcp").is_err());
        assert!(destination("198.19.0.1:0/tcp").is_err());
        assert!(
            destination("198.19.0.1:80/sctp")
                .unwrap_err()
                .contains("sctp")
        );
    }
}
