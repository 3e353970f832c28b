//! The time decisions of a key source, as pure functions of explicit instants (agent time,
//! ms): how long a fetched document is used (`Cache-Control: max-age` within the configured
//! bounds), whether keys are too old to use, whether an unknown-kid refetch may start, and the
//! age of keys persisted by an earlier run.

/// The freshness lifetime a response gives itself (RFC 9111 §4.2.1, §5.2.2): its `max-age`
/// less its `Age`; `no-store` or `no-cache` count as 0 (refetch as soon as the bounds allow).
/// `None` when no header says, or it cannot be read: the caller then uses its upper bound.
/// Several `max-age`s (a response that contradicts itself) give the smallest.
pub fn max_age_s<'a>(
    cache_control: impl IntoIterator<Item = &'a str>,
    age: Option<&str>,
) -> Option<u64> {
    let mut found: Option<u64> = None;
    for value in cache_control {
        for directive in value.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            let secs = if name.eq_ignore_ascii_case("max-age") {
                match arg.and_then(delta_seconds) {
                    Some(s) => s,
                    None => continue,
                }
            } else if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache")
            {
                0
            } else {
                continue;
            };
            found = Some(found.map_or(secs, |f| f.min(secs)));
        }
    }
    let age = age.and_then(|a| delta_seconds(a.trim())).unwrap_or(0);
    found.map(|s| s.saturating_sub(age))
}

/// RFC 9111 §1.2.2 delta-seconds: digits only; too large for u64 is "very large".
fn delta_seconds(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

/// How long to use a document before fetching it again: its own lifetime within
/// `[min_s, max_s]`, `max_s` when it states none. (`min_s > max_s` is refused by the
/// configuration check; here the lower bound then wins rather than a panic.)
pub fn lifetime_s(max_age_s: Option<u64>, min_s: u64, max_s: u64) -> u64 {
    max_age_s.unwrap_or(max_s).min(max_s).max(min_s)
}

/// Keys last fetched at `fetched_ms` may still be used at `now_ms`.
pub fn usable(fetched_ms: u64, now_ms: u64, max_stale_s: u64) -> bool {
    now_ms.saturating_sub(fetched_ms) <= max_stale_s.saturating_mul(1000)
}

/// An unknown-kid refetch may start at `now_ms` when none started within the cooldown.
pub fn refetch_allowed(last_start_ms: Option<u64>, now_ms: u64, cooldown_s: u64) -> bool {
    last_start_ms.is_none_or(|t| now_ms.saturating_sub(t) >= cooldown_s.saturating_mul(1000))
}

/// The age of keys persisted at wall time `fetched_wall_ms`, read at wall time `wall_now_ms`,
/// never negative. The only place a wall time crosses a restart: a wall-clock step between
/// the fetch and now moves this age by the step (a step back makes keys look younger, at
/// most as young as new; the next good fetch makes the age exact again).
pub fn persisted_age_ms(fetched_wall_ms: u64, wall_now_ms: u64) -> u64 {
    wall_now_ms.saturating_sub(fetched_wall_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control_less_age() {
        assert_eq!(max_age_s(["public, max-age=300"], None), Some(300));
        assert_eq!(max_age_s(["Max-Age=\"60\""], None), Some(60));
        assert_eq!(max_age_s(["max-age=300"], Some("100")), Some(200));
        assert_eq!(max_age_s(["max-age=300"], Some("900")), Some(0));
        assert_eq!(
            max_age_s(["public", "max-age=30, max-age=90"], None),
            Some(30)
        );
        assert_eq!(max_age_s(["no-cache"], None), Some(0));
        assert_eq!(max_age_s(["no-store, max-age=600"], None), Some(0));
        assert_eq!(
            max_age_s(["max-age=99999999999999999999999"], None),
            Some(u64::MAX)
        );
        // Nothing usable: the caller's upper bound applies.
        assert_eq!(max_age_s([], None), None);
        assert_eq!(max_age_s(["public, s-maxage=10"], None), None);
        assert_eq!(
            max_age_s(["max-age=-5", "max-age=1e3", "max-age="], None),
            None
        );
    }

    #[test]
    fn lifetime_stays_within_the_bounds() {
        assert_eq!(lifetime_s(Some(300), 30, 3600), 300);
        assert_eq!(lifetime_s(Some(0), 30, 3600), 30);
        assert_eq!(lifetime_s(Some(u64::MAX), 30, 3600), 3600);
        assert_eq!(lifetime_s(None, 30, 3600), 3600);
        assert_eq!(lifetime_s(Some(10), 50, 40), 50);
    }

    #[test]
    fn keys_are_usable_up_to_max_stale_and_not_after() {
        let fetched = 1_000_000;
        assert!(usable(fetched, fetched, 60));
        assert!(usable(fetched, fetched + 60_000, 60));
        assert!(!usable(fetched, fetched + 60_001, 60));
        // Agent time never runs back, but a persisted instant from a later anchor must not
        // make keys unusable.
        assert!(usable(fetched, fetched - 5_000, 60));
    }

    #[test]
    fn one_refetch_per_cooldown() {
        assert!(refetch_allowed(None, 5, 30));
        let t = 1_000_000;
        assert!(!refetch_allowed(Some(t), t, 30));
        assert!(!refetch_allowed(Some(t), t + 29_999, 30));
        assert!(refetch_allowed(Some(t), t + 30_000, 30));
        assert!(refetch_allowed(Some(t), t, 0));
    }

    #[test]
    fn persisted_age_is_never_negative() {
        assert_eq!(persisted_age_ms(10_000, 70_000), 60_000);
        assert_eq!(persisted_age_ms(70_000, 10_000), 0);
    }
}
