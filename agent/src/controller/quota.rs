//! Quotas per plan over minute, day and month windows, in bytes and in cost units, and the
//! book of what each identity has spent, persisted in the state directory so a restart loses
//! nothing (`quota.json`, written like `state.json`: temporary file, fsync, rename, fsync of
//! the directory).
//!
//! Windows are UTC calendar periods, not sliding ones: a day quota is for the UTC date, a month
//! quota for the UTC calendar month, as billing counts them. The civil-date arithmetic is done
//! here (days since the epoch <-> proleptic Gregorian date) rather than with a date crate; it
//! is a few lines and needs no time zone data.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const QUOTA_FILE: &str = "quota.json";
/// Format version of `quota.json` this build writes. Version 2 added the response bytes of
/// each window (`response_bytes`, response caps: `response`); version 3 the tokens and money
/// the usage feed reported (`tokens`, `money_nano`). An older file reads as the same book with
/// nothing spent in the newer fields, so an upgrade keeps every quota spent.
pub const QUOTA_VERSION: u32 = 3;
/// The oldest format version this build still reads.
pub const QUOTA_VERSION_MIN: u32 = 1;

const DAY_S: u64 = 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Minute,
    Day,
    Month,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::Minute, Window::Day, Window::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// Unix second at which the period of this window containing `t` began.
    pub fn period_start(self, t: u64) -> u64 {
        match self {
            Window::Minute => t - t % 60,
            Window::Day => t - t % DAY_S,
            Window::Month => {
                let (y, m, _) = civil_from_days(t / DAY_S);
                days_from_civil(y, m, 1) * DAY_S
            }
        }
    }

    /// Unix second at which the period that began at `start` ends (the next one's start).
    pub fn period_end(self, start: u64) -> u64 {
        match self {
            Window::Minute => Window::Minute.period_start(start) + 60,
            Window::Day => Window::Day.period_start(start) + DAY_S,
            Window::Month => {
                let (y, m, _) = civil_from_days(start / DAY_S);
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m, 1) * DAY_S
            }
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// (year, month 1..=12, day 1..=31) of a day counted from 1970-01-01.
///
/// Howard Hinnant's `civil_from_days`: shifting the year to start in March puts the leap day
/// last, so month lengths follow a fixed 153-days-per-5-months pattern and leap years only
/// matter through the era/year-of-era split. Only dates from 1970 on occur here, so unsigned
/// arithmetic suffices.
pub fn civil_from_days(days: u64) -> (u64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Days from 1970-01-01 to (year, month, day); the inverse of [`civil_from_days`] for years
/// from 1970 on.
pub fn days_from_civil(y: u64, m: u32, d: u32) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = u64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + u64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A plan's quotas; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QuotaLimits {
    pub minute_bytes: Option<u64>,
    pub day_bytes: Option<u64>,
    pub month_bytes: Option<u64>,
    pub minute_cost: Option<u64>,
    pub day_cost: Option<u64>,
    pub month_cost: Option<u64>,
    /// Tokens (prompt + completion, as the usage feed reports them).
    pub minute_tokens: Option<u64>,
    pub day_tokens: Option<u64>,
    pub month_tokens: Option<u64>,
    /// Money in nano-units of the price table's currency (`usage::NANO` per unit): integers,
    /// so that a month of reports sums exactly.
    pub minute_money: Option<u64>,
    pub day_money: Option<u64>,
    pub month_money: Option<u64>,
}

/// Why an identity's quota flag is set, by the kind of limit reached (`exhausted`'s second
/// element): the one place a kind becomes the reason shown in audit, `quota show`, `explain`,
/// `top` and `/metrics`. The kernel has one flag for all of them (`ID_QUOTA_EXHAUSTED`).
pub fn reason_of(kind: &str) -> &'static str {
    match kind {
        "tokens" => "token_quota_exhausted",
        "money" => "budget_exhausted",
        _ => "quota_exhausted",
    }
}

/// Every reason [`reason_of`] gives, for pre-registered metric labels.
pub const REASONS: [&str; 3] = [
    "quota_exhausted",
    "token_quota_exhausted",
    "budget_exhausted",
];

impl QuotaLimits {
    /// (bytes, cost) limits of one window.
    pub fn get(&self, w: Window) -> (Option<u64>, Option<u64>) {
        match w {
            Window::Minute => (self.minute_bytes, self.minute_cost),
            Window::Day => (self.day_bytes, self.day_cost),
            Window::Month => (self.month_bytes, self.month_cost),
        }
    }

    /// (tokens, money) limits of one window.
    pub fn usage(&self, w: Window) -> (Option<u64>, Option<u64>) {
        match w {
            Window::Minute => (self.minute_tokens, self.minute_money),
            Window::Day => (self.day_tokens, self.day_money),
            Window::Month => (self.month_tokens, self.month_money),
        }
    }

    /// Whether any window has a money budget (a usage report then needs a price).
    pub fn has_money(&self) -> bool {
        Window::ALL.iter().any(|w| self.usage(*w).1.is_some())
    }

    /// Whether any window limits tokens or money (what only the usage feed spends).
    pub fn has_usage(&self) -> bool {
        Window::ALL.iter().any(|w| self.usage(*w) != (None, None))
    }

    pub fn is_unlimited(&self) -> bool {
        *self == QuotaLimits::default()
    }
}

/// What was spent in the current period of one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpent {
    /// Start of the period these counts belong to (unix s).
    pub start_unix_s: u64,
    pub bytes: u64,
    pub cost: u64,
    /// Bytes the node sent back to the identity (egress payload), for its plan's response
    /// caps. Absent from version 1 files: nothing was counted then.
    #[serde(default)]
    pub response_bytes: u64,
    /// Tokens (prompt + completion) the usage feed reported. Absent before version 3.
    #[serde(default)]
    pub tokens: u64,
    /// Money those tokens cost, in nano-units of the price table's currency.
    #[serde(default)]
    pub money_nano: u64,
}

/// What one identity has spent, per window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spent {
    pub minute: WindowSpent,
    pub day: WindowSpent,
    pub month: WindowSpent,
}

impl Spent {
    fn window(&self, w: Window) -> &WindowSpent {
        match w {
            Window::Minute => &self.minute,
            Window::Day => &self.day,
            Window::Month => &self.month,
        }
    }

    fn window_mut(&mut self, w: Window) -> &mut WindowSpent {
        match w {
            Window::Minute => &mut self.minute,
            Window::Day => &mut self.day,
            Window::Month => &mut self.month,
        }
    }

    /// Starts a new period, with nothing spent, in every window whose period has changed.
    ///
    /// Windows only roll forward: if the clock steps back into an earlier period the counts
    /// stay, since resetting them would hand out the quota a second time.
    pub fn roll(&mut self, now_unix_s: u64) {
        for w in Window::ALL {
            let start = w.period_start(now_unix_s);
            let cur = self.window_mut(w);
            if start > cur.start_unix_s {
                *cur = WindowSpent {
                    start_unix_s: start,
                    ..WindowSpent::default()
                };
            }
        }
    }

    /// Rolls, then counts `bytes` and `cost` against every window.
    pub fn add(&mut self, now_unix_s: u64, bytes: u64, cost: u64) {
        self.roll(now_unix_s);
        for w in Window::ALL {
            let cur = self.window_mut(w);
            cur.bytes = cur.bytes.saturating_add(bytes);
            cur.cost = cur.cost.saturating_add(cost);
        }
    }

    /// Rolls, then counts `bytes` sent back to the identity against every window.
    pub fn add_response(&mut self, now_unix_s: u64, bytes: u64) {
        self.roll(now_unix_s);
        for w in Window::ALL {
            let cur = self.window_mut(w);
            cur.response_bytes = cur.response_bytes.saturating_add(bytes);
        }
    }

    /// Rolls, then counts one usage report's `tokens` and `money_nano` against every window.
    pub fn add_usage(&mut self, now_unix_s: u64, tokens: u64, money_nano: u64) {
        self.roll(now_unix_s);
        for w in Window::ALL {
            let cur = self.window_mut(w);
            cur.tokens = cur.tokens.saturating_add(tokens);
            cur.money_nano = cur.money_nano.saturating_add(money_nano);
        }
    }

    /// (tokens, money in nano-units) spent in the current period of `w`.
    pub fn usage(&self, w: Window) -> (u64, u64) {
        let cur = self.window(w);
        (cur.tokens, cur.money_nano)
    }

    /// Response bytes spent in the current period of `w`.
    pub fn response(&self, w: Window) -> u64 {
        self.window(w).response_bytes
    }

    /// The first window (minute, then day, then month; bytes, cost, tokens, money) whose spending has
    /// reached its limit. A limit of 0 is exhausted from the start. This reads the counts as
    /// of the last `add` or `roll`: roll to now first.
    pub fn exhausted(&self, limits: &QuotaLimits) -> Option<(Window, &'static str)> {
        Window::ALL
            .into_iter()
            .find_map(|w| self.exhausted_in(w, limits).map(|what| (w, what)))
    }

    /// Of the exhausted windows, the one that ends last, with its end: how long the identity
    /// stays over quota even as shorter windows roll.
    pub fn blocked_until(&self, limits: &QuotaLimits) -> Option<(Window, &'static str, u64)> {
        Window::ALL.into_iter().rev().find_map(|w| {
            self.exhausted_in(w, limits)
                .map(|what| (w, what, self.window_ends(w)))
        })
    }

    fn exhausted_in(&self, w: Window, limits: &QuotaLimits) -> Option<&'static str> {
        let cur = self.window(w);
        let (bytes, cost) = limits.get(w);
        let (tokens, money) = limits.usage(w);
        // Reached at the limit (>=), as bytes always were: the report that brings the sum to
        // the plan's figure is the one that cuts off.
        if bytes.is_some_and(|l| cur.bytes >= l) {
            Some("bytes")
        } else if cost.is_some_and(|l| cur.cost >= l) {
            Some("cost")
        } else if tokens.is_some_and(|l| cur.tokens >= l) {
            Some("tokens")
        } else if money.is_some_and(|l| cur.money_nano >= l) {
            Some("money")
        } else {
            None
        }
    }

    /// Unix second at which the current period of `w` ends.
    pub fn window_ends(&self, w: Window) -> u64 {
        w.period_end(self.window(w).start_unix_s)
    }

    /// (bytes, cost) spent in the current period of `w`.
    pub fn get(&self, w: Window) -> (u64, u64) {
        let cur = self.window(w);
        (cur.bytes, cur.cost)
    }

    /// Whether nothing is spent in any window (after a roll: nothing this month).
    pub fn is_empty(&self) -> bool {
        Window::ALL
            .iter()
            .all(|&w| self.get(w) == (0, 0) && self.response(w) == 0 && self.usage(w) == (0, 0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error(
        "{path}: {message} (the file is left as it is: quota spent is never silently reset; \
         move it away to start from nothing spent)"
    )]
    Corrupt { path: String, message: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> QuotaError {
    QuotaError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// What every identity has spent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaBook {
    pub spent: BTreeMap<String, Spent>,
}

/// `quota.json` as written: the book with a format version, so a later format is refused
/// rather than misread.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaFile {
    version: u32,
    spent: BTreeMap<String, Spent>,
}

#[derive(Serialize)]
struct QuotaFileRef<'a> {
    version: u32,
    spent: &'a BTreeMap<String, Spent>,
}

impl QuotaBook {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(QUOTA_FILE)
    }

    /// Reads the book; a missing file is an empty book, an unreadable one an error (a reset
    /// would hand every identity its quota again).
    pub fn load(dir: &Path) -> Result<QuotaBook, QuotaError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(QuotaBook::default()),
            Err(e) => return Err(io(&path, e)),
        };
        let corrupt = |message: String| QuotaError::Corrupt {
            path: path.display().to_string(),
            message,
        };
        let file: QuotaFile = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if !(QUOTA_VERSION_MIN..=QUOTA_VERSION).contains(&file.version) {
            return Err(corrupt(format!(
                "quota format version {}, this build reads versions {QUOTA_VERSION_MIN} to \
                 {QUOTA_VERSION}",
                file.version
            )));
        }
        Ok(QuotaBook { spent: file.spent })
    }

    /// Writes the book atomically.
    pub fn save(&self, dir: &Path) -> Result<(), QuotaError> {
        let text = serde_json::to_vec_pretty(&QuotaFileRef {
            version: QUOTA_VERSION,
            spent: &self.spent,
        })
        .map_err(|e| io(&Self::path(dir), e))?;
        crate::state::write_atomically(dir, QUOTA_FILE, &text).map_err(|(p, e)| io(&p, e))
    }

    /// Forgets what `identity` spent, or what everyone spent with `None`.
    pub fn reset(&mut self, identity: Option<&str>) {
        match identity {
            Some(id) => {
                self.spent.remove(id);
            }
            None => self.spent.clear(),
        }
    }

    /// Counts spending against `identity`.
    pub fn add(&mut self, identity: &str, now_unix_s: u64, bytes: u64, cost: u64) {
        match self.spent.get_mut(identity) {
            Some(s) => s.add(now_unix_s, bytes, cost),
            None => {
                let mut s = Spent::default();
                s.add(now_unix_s, bytes, cost);
                self.spent.insert(identity.to_owned(), s);
            }
        }
    }

    /// Rolls every identity to `now` and drops those with nothing spent even this month, so
    /// the book holds only identities that have been active lately.
    pub fn roll_all(&mut self, now_unix_s: u64) {
        self.spent.retain(|_, s| {
            s.roll(now_unix_s);
            !s.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Unix seconds of UTC instants, from Python's calendar.timegm.
    const JAN31_2024_235959: u64 = 1_706_745_599;
    const FEB01_2024: u64 = 1_706_745_600;
    const JAN31_2024: u64 = 1_706_659_200;
    const FEB29_2024: u64 = 1_709_164_800;
    const MAR01_2024: u64 = 1_709_251_200;
    const FEB01_2023: u64 = 1_675_209_600;
    const FEB28_2023_NOON: u64 = 1_677_585_600;
    const MAR01_2023: u64 = 1_677_628_800;
    const DEC01_2023: u64 = 1_701_388_800;
    const DEC31_2023_235959: u64 = 1_704_067_199;
    const JAN01_2024: u64 = 1_704_067_200;
    const FEB01_2100: u64 = 4_105_123_200;
    const FEB28_2100: u64 = 4_107_456_000;
    const MAR01_2100: u64 = 4_107_542_400;
    const FEB29_2000: u64 = 951_782_400;
    const MAR01_2000: u64 = 951_868_800;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tollgate-quota-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        for (t, ymd) in [
            (JAN31_2024, (2024, 1, 31)),
            (FEB29_2024, (2024, 2, 29)),
            (MAR01_2024, (2024, 3, 1)),
            (FEB28_2023_NOON, (2023, 2, 28)),
            (DEC31_2023_235959, (2023, 12, 31)),
            (JAN01_2024, (2024, 1, 1)),
            (FEB28_2100, (2100, 2, 28)),
            (MAR01_2100, (2100, 3, 1)),
            (FEB29_2000, (2000, 2, 29)),
        ] {
            assert_eq!(civil_from_days(t / DAY_S), ymd, "{t}");
            assert_eq!(days_from_civil(ymd.0, ymd.1, ymd.2), t / DAY_S, "{ymd:?}");
        }
        // Every day for ~200 years converts there and back, one day after the other.
        let mut prev = civil_from_days(0);
        for day in 1..(200 * 366) {
            let ymd = civil_from_days(day);
            assert_eq!(days_from_civil(ymd.0, ymd.1, ymd.2), day);
            assert!(
                ymd > prev && (ymd.2 == prev.2 + 1 || ymd.2 == 1),
                "{prev:?} {ymd:?}"
            );
            prev = ymd;
        }
    }

    #[test]
    fn month_periods() {
        let m = Window::Month;
        // Jan 31 -> Feb 1.
        assert_eq!(m.period_start(JAN31_2024_235959), JAN01_2024);
        assert_eq!(m.period_end(JAN01_2024), FEB01_2024);
        assert_eq!(m.period_start(FEB01_2024), FEB01_2024);
        // Leap February ends after the 29th, a common one after the 28th, 2100 is not leap
        // and 2000 is.
        assert_eq!(m.period_start(FEB29_2024), FEB01_2024);
        assert_eq!(m.period_end(FEB01_2024), MAR01_2024);
        assert_eq!(m.period_start(FEB28_2023_NOON), FEB01_2023);
        assert_eq!(m.period_end(FEB01_2023), MAR01_2023);
        assert_eq!(m.period_end(FEB01_2100), MAR01_2100);
        assert_eq!(m.period_start(FEB28_2100), FEB01_2100);
        assert_eq!(m.period_start(MAR01_2000 - 1), m.period_start(FEB29_2000));
        assert_eq!(m.period_start(MAR01_2000), MAR01_2000);
        // Dec 31 -> Jan 1 of the next year.
        assert_eq!(m.period_start(DEC31_2023_235959), DEC01_2023);
        assert_eq!(m.period_end(DEC01_2023), JAN01_2024);
    }

    #[test]
    fn windows_roll_exactly_at_the_boundary() {
        let mut s = Spent::default();
        // One second before midnight on Jan 31: every window is on its last second.
        s.add(JAN31_2024_235959, 100, 1);
        assert_eq!(s.window_ends(Window::Minute), FEB01_2024);
        assert_eq!(s.window_ends(Window::Day), FEB01_2024);
        assert_eq!(s.window_ends(Window::Month), FEB01_2024);
        s.roll(FEB01_2024 - 1);
        for w in Window::ALL {
            assert_eq!(s.get(w), (100, 1), "{w} still open");
        }
        s.add(FEB01_2024, 5, 2);
        for w in Window::ALL {
            assert_eq!(s.get(w), (5, 2), "{w} rolled at the boundary");
        }
        assert_eq!(s.window_ends(Window::Month), MAR01_2024);

        // Minute rolls alone within a day; day within a month.
        s.add(FEB01_2024 + 60, 1, 0);
        assert_eq!(s.get(Window::Minute), (1, 0));
        assert_eq!(s.get(Window::Day), (6, 2));
        s.add(FEB01_2024 + DAY_S, 1, 0);
        assert_eq!(s.get(Window::Day), (1, 0));
        assert_eq!(s.get(Window::Month), (7, 2));

        // Leap day: Feb 29 is still February; Mar 1 is not.
        s.add(FEB29_2024 + 3600, 10, 0);
        assert_eq!(s.get(Window::Month), (17, 2));
        s.add(MAR01_2024, 1, 0);
        assert_eq!(s.get(Window::Month), (1, 0));

        // Dec 31 -> Jan 1.
        let mut s = Spent::default();
        s.add(DEC31_2023_235959, 7, 7);
        s.add(JAN01_2024, 1, 1);
        assert_eq!(s.get(Window::Month), (1, 1));
        assert_eq!(s.month.start_unix_s, JAN01_2024);
    }

    #[test]
    fn clock_stepping_back_keeps_the_counts() {
        let mut s = Spent::default();
        s.add(FEB01_2024 + 120, 10, 0);
        s.add(FEB01_2024 - 3600, 1, 0);
        assert_eq!(s.get(Window::Minute), (11, 0));
        assert_eq!(s.get(Window::Month), (11, 0));
        assert_eq!(s.month.start_unix_s, FEB01_2024);
    }

    #[test]
    fn exhausted_at_the_limit() {
        let limits = QuotaLimits {
            minute_bytes: Some(1000),
            month_cost: Some(50),
            ..QuotaLimits::default()
        };
        let mut s = Spent::default();
        s.add(FEB01_2024, 999, 49);
        assert_eq!(s.exhausted(&limits), None);
        s.add(FEB01_2024 + 1, 1, 0);
        assert_eq!(s.exhausted(&limits), Some((Window::Minute, "bytes")));
        assert_eq!(
            s.blocked_until(&limits),
            Some((Window::Minute, "bytes", FEB01_2024 + 60))
        );
        s.add(FEB01_2024 + 2, 0, 1);
        assert_eq!(s.exhausted(&limits), Some((Window::Minute, "bytes")));
        assert_eq!(
            s.blocked_until(&limits),
            Some((Window::Month, "cost", MAR01_2024))
        );
        s.roll(FEB01_2024 + 60);
        assert_eq!(s.exhausted(&limits), Some((Window::Month, "cost")));
        s.roll(MAR01_2024);
        assert_eq!(s.exhausted(&limits), None);

        assert_eq!(Spent::default().exhausted(&QuotaLimits::default()), None);
        let zero = QuotaLimits {
            day_bytes: Some(0),
            ..QuotaLimits::default()
        };
        assert_eq!(
            Spent::default().exhausted(&zero),
            Some((Window::Day, "bytes"))
        );
    }

    #[test]
    fn save_load_round_trip_missing_and_reset() {
        let dir = tmpdir("rt");
        assert_eq!(QuotaBook::load(&dir).unwrap(), QuotaBook::default());
        let mut book = QuotaBook::default();
        book.add("alice", FEB01_2024, 1 << 40, 7);
        book.add("alice", FEB01_2024 + 61, 5, 1);
        book.add("bob", JAN31_2024, 3, 3);
        book.save(&dir).unwrap();
        assert!(!dir.join("quota.json.tmp").exists());
        let back = QuotaBook::load(&dir).unwrap();
        assert_eq!(back, book);
        assert_eq!(back.spent["alice"].get(Window::Month), ((1 << 40) + 5, 8));

        // bob spent nothing in February: rolling to it drops him.
        let mut rolled = back.clone();
        rolled.roll_all(FEB01_2024 + 120);
        assert_eq!(rolled.spent.keys().collect::<Vec<_>>(), ["alice"]);

        let mut b = back.clone();
        b.reset(Some("alice"));
        assert_eq!(b.spent.keys().collect::<Vec<_>>(), ["bob"]);
        b.reset(Some("nobody"));
        assert_eq!(b.spent.len(), 1);
        b.reset(None);
        assert!(b.spent.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_file_loads_with_no_response_bytes_and_saves_as_version_3() {
        let dir = tmpdir("v1");
        std::fs::create_dir_all(&dir).unwrap();
        // What a build before response caps wrote.
        let w = |start: u64| format!("{{\"start_unix_s\":{start},\"bytes\":500,\"cost\":5}}");
        let v1 = format!(
            "{{\"version\":1,\"spent\":{{\"alice\":{{\"minute\":{},\"day\":{},\"month\":{}}}}}}}",
            w(FEB01_2024),
            w(FEB01_2024),
            w(FEB01_2024)
        );
        std::fs::write(QuotaBook::path(&dir), v1).unwrap();
        let book = QuotaBook::load(&dir).unwrap();
        let alice = &book.spent["alice"];
        assert_eq!(alice.get(Window::Day), (500, 5));
        assert_eq!(alice.response(Window::Day), 0);
        let mut book = book;
        book.spent
            .get_mut("alice")
            .unwrap()
            .add_response(FEB01_2024 + 1, 70);
        book.save(&dir).unwrap();
        let text = std::fs::read_to_string(QuotaBook::path(&dir)).unwrap();
        assert!(text.contains("\"version\": 3"), "{text}");
        let back = QuotaBook::load(&dir).unwrap();
        assert_eq!(back, book);
        assert_eq!(back.spent["alice"].response(Window::Month), 70);
        assert_eq!(back.spent["alice"].get(Window::Month), (500, 5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn response_bytes_roll_with_their_window_and_keep_an_entry_alive() {
        let mut s = Spent::default();
        s.add_response(JAN31_2024_235959, 9);
        assert!(!s.is_empty());
        s.add_response(FEB01_2024, 4);
        for w in Window::ALL {
            assert_eq!(s.response(w), 4, "{w}");
            assert_eq!(s.get(w), (0, 0), "{w}");
        }
        s.add_response(FEB01_2024 + 60, 1);
        assert_eq!(s.response(Window::Minute), 1);
        assert_eq!(s.response(Window::Day), 5);
        let mut book = QuotaBook::default();
        book.spent.insert("r".into(), s);
        book.roll_all(FEB01_2024 + 120);
        assert!(book.spent.contains_key("r"), "response bytes this month");
        book.roll_all(MAR01_2024);
        assert!(book.spent.is_empty());
    }

    #[test]
    fn tokens_and_money_are_reached_at_the_limit_and_roll_with_their_window() {
        let limits = QuotaLimits {
            minute_tokens: Some(50_000),
            day_money: Some(1_000),
            ..QuotaLimits::default()
        };
        assert!(limits.has_money() && limits.has_usage());
        let mut s = Spent::default();
        s.add_usage(FEB01_2024, 49_999, 999);
        assert_eq!(s.exhausted(&limits), None, "one token and one nano short");
        s.add_usage(FEB01_2024 + 1, 1, 0);
        assert_eq!(s.exhausted(&limits), Some((Window::Minute, "tokens")));
        assert_eq!(reason_of("tokens"), "token_quota_exhausted");
        s.roll(FEB01_2024 + 60);
        assert_eq!(s.exhausted(&limits), None, "the minute rolled");
        assert_eq!(s.usage(Window::Day), (50_000, 999));
        s.add_usage(FEB01_2024 + 61, 0, 1);
        assert_eq!(s.exhausted(&limits), Some((Window::Day, "money")));
        assert_eq!(reason_of("money"), "budget_exhausted");
        assert_eq!(reason_of("bytes"), "quota_exhausted");
        assert_eq!(reason_of("cost"), "quota_exhausted");
        // Usage alone keeps an entry in the book.
        let mut book = QuotaBook::default();
        book.spent.insert("u".into(), s);
        book.roll_all(FEB01_2024 + DAY_S);
        assert!(book.spent.contains_key("u"), "money spent this month");
        book.roll_all(MAR01_2024);
        assert!(book.spent.is_empty());
    }

    #[test]
    fn a_version_2_file_loads_with_no_tokens_spent() {
        let dir = tmpdir("v2");
        std::fs::create_dir_all(&dir).unwrap();
        let w = |start: u64| {
            format!("{{\"start_unix_s\":{start},\"bytes\":5,\"cost\":1,\"response_bytes\":3}}")
        };
        let v2 = format!(
            "{{\"version\":2,\"spent\":{{\"a\":{{\"minute\":{},\"day\":{},\"month\":{}}}}}}}",
            w(FEB01_2024),
            w(FEB01_2024),
            w(FEB01_2024)
        );
        std::fs::write(QuotaBook::path(&dir), v2).unwrap();
        let mut book = QuotaBook::load(&dir).unwrap();
        assert_eq!(book.spent["a"].usage(Window::Month), (0, 0));
        assert_eq!(book.spent["a"].response(Window::Month), 3);
        book.spent
            .get_mut("a")
            .unwrap()
            .add_usage(FEB01_2024 + 2, 52, 7_800);
        book.save(&dir).unwrap();
        let back = QuotaBook::load(&dir).unwrap();
        assert_eq!(back.spent["a"].usage(Window::Day), (52, 7_800));
        assert_eq!(back.spent["a"].get(Window::Day), (5, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_file_is_refused_and_left_alone() {
        let dir = tmpdir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        let path = QuotaBook::path(&dir);
        for (text, what) in [
            ("{\"version\":1,\"spent\":{\"a\":", "EOF"),
            (
                "{\"version\":1,\"spent\":{\"a\":{\"minute\":7}}}",
                "invalid type",
            ),
            ("{\"version\":4,\"spent\":{}}", "version 4"),
            ("", "EOF"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = QuotaBook::load(&dir).unwrap_err();
            assert!(matches!(e, QuotaError::Corrupt { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("quota.json") && msg.contains(what), "{msg}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
