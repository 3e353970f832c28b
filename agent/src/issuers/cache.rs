//! The time decisions of a key source, as pure functions of explicit instants (agent time,
//! ms): how long a fetched document is used (`Cache-Control: max-age` within the configured
//! bounds), whether keys are too old to use, whether an unknown-kid refetch may start, and the
//! age of keys persisted by an earlier run (boot clock within a boot, wall clock across one).

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

/// A persisted fetch whose wall time is further ahead of the wall clock than this was not
/// made at that time: the clock was stepped back since, or ran ahead then.
pub const PERSISTED_FUTURE_BOUND_MS: u64 = 5 * 60 * 1000;

/// The age (ms) at `now` of keys persisted by an earlier run at `then`, or why it cannot be
/// known (the keys are then taken as older than max_stale: not used). Within one boot the boot
/// clock says, and the wall clock is not read: a wall-clock step cannot make keys look
/// younger. Across a reboot only the wall clock spans the gap: a fetch time in the past is
/// taken as it is (a step forward errs towards staleness), one more than
/// [`PERSISTED_FUTURE_BOUND_MS`] in the future is refused — taking it as "just now" would
/// renew old keys for a full max_stale on every restart until the clock caught up.
pub fn persisted_age_ms(
    then: &super::persist::Fetched,
    now: &super::persist::Fetched,
) -> Result<u64, String> {
    if !then.boot_id.is_empty() && then.boot_id == now.boot_id {
        return now
            .boot_ns
            .checked_sub(then.boot_ns)
            .map(|ns| ns / 1_000_000)
            .ok_or_else(|| "saved in this boot at a boot-clock time still to come".to_owned());
    }
    match then.wall_ms.checked_sub(now.wall_ms) {
        Some(ahead) if ahead > PERSISTED_FUTURE_BOUND_MS => Err(format!(
            "saved before a reboot at a wall time {} s in the future: the wall clock was \
             stepped back since (or was ahead then), so their age is unknown and they are \
             taken as older than max_stale_s",
            ahead / 1000
        )),
        Some(_) => Ok(0),
        None => Ok(now.wall_ms - then.wall_ms),
    }
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
    fn persisted_age_reads_the_boot_clock_within_a_boot_and_refuses_a_future_wall_time() {
        use super::super::persist::Fetched;
        let at = |wall_ms, boot_id: &str, boot_ns| Fetched {
            wall_ms,
            boot_id: boot_id.into(),
            boot_ns,
        };
        let now = at(1_000_000_000, "b1", 900_000_000_000);
        // Same boot: the boot clock, whatever the wall clock says (it was 1 h ahead then).
        let then = at(1_003_600_000, "b1", 300_000_000_000);
        assert_eq!(persisted_age_ms(&then, &now), Ok(600_000));
        assert!(persisted_age_ms(&at(0, "b1", 900_000_000_001), &now).is_err());
        // Another boot (or none known): the wall clock; up to 5 min ahead counts as now.
        assert_eq!(
            persisted_age_ms(&at(999_940_000, "b0", 5), &now),
            Ok(60_000)
        );
        assert_eq!(persisted_age_ms(&at(1_000_300_000, "", 5), &now), Ok(0));
        let e = persisted_age_ms(&at(1_000_300_001, "b0", 5), &now).unwrap_err();
        assert!(e.contains("300 s in the future"), "{e}");
    }
}
