//! The usage feed: a trusted component (a gateway, a model server hook, a LiteLLM callback)
//! reports each request's tokens in the OpenAI `usage` object's shape, and the agent counts
//! them (and their price) against the identity's plan in tokens and money. This module holds
//! what a report is, the price table, money as exact integers, and the feed's own state (its
//! rate limit, its counters for `/metrics`, the HTTP secret); `ops::usage` applies a report
//! to the node and `servers::usage` is the optional HTTP listener.
//!
//! Money is kept in nano-units (1e-9 of the price table's currency), in `u64`: a plan's
//! budget and every report's price are integers, so a month of reports sums exactly and the
//! cut-off falls on the report that reaches the budget, never one rounding error later.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Nano-units in one unit of the currency.
pub const NANO: u64 = 1_000_000_000;
/// The most tokens one report may carry, per kind: far above any context window, low enough
/// that one report's price (at most 2e16 nano-units) leaves a `u64` room for hundreds of
/// them (sums saturate beyond). A report over it is refused.
pub const MAX_TOKENS_PER_REPORT: u64 = 10_000_000;
/// The highest price per million tokens accepted (a million units of the currency).
pub const MAX_PRICE_PER_MILLION: u64 = 1_000_000;
/// The highest budget accepted, in units (1e9 units = 1e18 nano, well inside a `u64`).
pub const MAX_BUDGET: u64 = 1_000_000_000;
/// `[usage] max_report_bytes`' default.
pub const DEFAULT_MAX_REPORT_BYTES: usize = 4096;
/// `[usage] max_reports_per_s`' default (also the burst: one second's worth).
pub const DEFAULT_MAX_REPORTS_PER_S: u32 = 2000;
/// The shortest secret `[usage] secret_file` may hold.
pub const MIN_SECRET_BYTES: usize = 16;
/// The header that carries the shared secret on the HTTP listener.
pub const SECRET_HEADER: &str = "X-Tollgate-Usage-Secret";

/// Whom a report is for: exactly one of the three.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Who {
    /// A token id (`jti`) a live token binding holds.
    TokenId(String),
    /// An identity by name.
    Identity(String),
    /// A client address: the identity its live binding names, as the kernel decides it.
    Client(IpAddr),
}

/// The OpenAI `usage` object (extra fields such as `prompt_tokens_details` are refused: a
/// sender should send what the feed reads, and a typo must not pass silently).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Optional; when present it must be the sum of the other two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
}

/// One usage report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    pub who: Who,
    pub model: String,
    pub usage: Usage,
}

/// Why a report was refused; each has its label (`/metrics`, the HTTP `error`, the control
/// socket's error `label`) and changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownIdentity(String),
    TooLarge(usize),
    BadReport(String),
    UnpricedModel { model: String, plan: String },
    NoSecret,
    BadSecret,
    RateLimited,
}

impl Refusal {
    pub const LABELS: [&'static str; 7] = [
        "unknown_identity",
        "too_large",
        "bad_report",
        "unpriced_model",
        "no_secret",
        "bad_secret",
        "rate_limited",
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Refusal::UnknownIdentity(_) => "unknown_identity",
            Refusal::TooLarge(_) => "too_large",
            Refusal::BadReport(_) => "bad_report",
            Refusal::UnpricedModel { .. } => "unpriced_model",
            Refusal::NoSecret => "no_secret",
            Refusal::BadSecret => "bad_secret",
            Refusal::RateLimited => "rate_limited",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::UnknownIdentity(m) => m.clone(),
            Refusal::TooLarge(max) => {
                format!("usage report over {max} bytes ([usage] max_report_bytes); nothing counted")
            }
            Refusal::BadReport(m) => format!("bad usage report: {m}; nothing counted"),
            Refusal::UnpricedModel { model, plan } => format!(
                "model {model:?} has no price and the price table has no \"*\" row, but plan \
                 {plan:?} has a money budget; nothing counted (add a [[prices]] row)"
            ),
            Refusal::NoSecret => format!("missing {SECRET_HEADER} header"),
            Refusal::BadSecret => format!("wrong {SECRET_HEADER}"),
            Refusal::RateLimited => {
                "over [usage] max_reports_per_s; nothing counted, send it again".into()
            }
        }
    }

    /// The HTTP listener's status for it.
    pub fn http_status(&self) -> u16 {
        status_of(self.label())
    }
}

/// The HTTP listener's status for a refusal label (`bad_report`, `unpriced_model`: 400).
pub fn status_of(label: &str) -> u16 {
    match label {
        "unknown_identity" => 404,
        "too_large" => 413,
        "no_secret" | "bad_secret" => 401,
        "rate_limited" => 429,
        _ => 400,
    }
}

impl UsageReport {
    /// The checks that need nothing but the report: a model name, token counts within
    /// [`MAX_TOKENS_PER_REPORT`], a `total_tokens` that adds up.
    pub fn check(&self) -> Result<(), Refusal> {
        let bad = |m: String| Err(Refusal::BadReport(m));
        if self.model.is_empty() || self.model.len() > 256 {
            return bad("model must be 1 to 256 bytes".into());
        }
        let u = &self.usage;
        for (what, n) in [
            ("prompt_tokens", u.prompt_tokens),
            ("completion_tokens", u.completion_tokens),
        ] {
            if n > MAX_TOKENS_PER_REPORT {
                return bad(format!(
                    "{what} = {n} is over {MAX_TOKENS_PER_REPORT} for one request"
                ));
            }
        }
        if let Some(t) = u.total_tokens
            && t != u.prompt_tokens + u.completion_tokens
        {
            return bad(format!(
                "total_tokens = {t} is not prompt_tokens + completion_tokens = {}",
                u.prompt_tokens + u.completion_tokens
            ));
        }
        match &self.who {
            Who::TokenId(s) | Who::Identity(s) if s.is_empty() || s.len() > 256 => {
                bad("who names an empty or overlong identity or token id".into())
            }
            _ => Ok(()),
        }
    }

    /// Tokens the report counts (prompt + completion).
    pub fn tokens(&self) -> u64 {
        self.usage.prompt_tokens + self.usage.completion_tokens
    }
}

/// A report parsed from a body (the HTTP listener's; the control socket's goes through
/// `Request`): any serde error is `bad_report`.
pub fn parse(body: &[u8]) -> Result<UsageReport, Refusal> {
    let r: UsageReport =
        serde_json::from_slice(body).map_err(|e| Refusal::BadReport(e.to_string()))?;
    r.check()?;
    Ok(r)
}

/// One `[[prices]]` row, in nano-units per token (the per-million price × 1000, exact: a
/// price with more precision than that is refused by the configuration check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Price {
    /// An exact model name, or `"*"` for any model without a row of its own.
    pub model: String,
    pub prompt_nano: u64,
    pub completion_nano: u64,
}

/// The price table and its currency (display only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prices {
    pub rows: Vec<Price>,
    pub currency: String,
}

impl Prices {
    /// The row for `model`: its own, else `"*"`.
    pub fn row(&self, model: &str) -> Option<&Price> {
        self.rows
            .iter()
            .find(|p| p.model == model)
            .or_else(|| self.rows.iter().find(|p| p.model == "*"))
    }

    /// What `prompt` and `completion` tokens of `model` cost, in nano-units (`None`:
    /// unpriced). Cannot overflow: both factors are bounded by the configuration and
    /// [`MAX_TOKENS_PER_REPORT`].
    pub fn cost(&self, model: &str, prompt: u64, completion: u64) -> Option<u64> {
        self.row(model)
            .map(|p| prompt * p.prompt_nano + completion * p.completion_nano)
    }
}

/// A non-negative decimal (`"0.15"`, `3`, `2.5`) as an integer count of `10^-decimals`
/// units, exactly; refused when negative, not a number, infinite, with more than `decimals`
/// significant decimal places, or above `max` whole units. `text` is a TOML string, or a
/// TOML number as Rust prints it (the shortest form that reads back as the same float, so
/// `0.15` arrives as "0.15", not 0.1499999...).
pub fn parse_decimal(text: &str, decimals: u32, max: u64) -> Result<u64, String> {
    let t = text.trim();
    if t.starts_with('-') && t != "-0" && t != "-0.0" {
        return Err(format!("{t} is negative"));
    }
    let t = t.trim_start_matches(['-', '+']);
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if int.is_empty() && frac.is_empty() || !digits(int) || !digits(frac) {
        return Err(format!(
            "{text:?} is not a decimal number (digits with an optional '.', e.g. \"0.15\")"
        ));
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > decimals as usize {
        return Err(format!(
            "{t} has more than {decimals} decimal places: finer than this can be counted exactly"
        ));
    }
    let int = int.trim_start_matches('0');
    // Only digits are left: a parse failure is a number too large for a u64.
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse::<u64>()
            .map_err(|_| format!("{t} is above the maximum of {max}"))?
    };
    if whole > max || whole == max && !frac.is_empty() {
        return Err(format!("{t} is above the maximum of {max}"));
    }
    let scale = 10u64.pow(decimals);
    let frac_units: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<u64>().map_err(|e| e.to_string())? * 10u64.pow(decimals - frac.len() as u32)
    };
    Ok(whole * scale + frac_units)
}

/// Nano-units as a decimal amount of the currency ("0.000123"), for display.
pub fn money_text(nano: u64) -> String {
    let frac = format!("{:09}", nano % NANO);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{}", nano / NANO)
    } else {
        format!("{}.{frac}", nano / NANO)
    }
}

/// `[usage]`: the HTTP listener and the feed's bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageConfig {
    /// The HTTP listener (`None`: the control socket only).
    pub listen: Option<std::net::SocketAddr>,
    /// Whether `listen` may be a non-loopback address.
    pub allow_remote: bool,
    /// The shared secret's file; required with `listen`.
    pub secret_file: Option<PathBuf>,
    pub max_report_bytes: usize,
    pub max_reports_per_s: u32,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            listen: None,
            allow_remote: false,
            secret_file: None,
            max_report_bytes: DEFAULT_MAX_REPORT_BYTES,
            max_reports_per_s: DEFAULT_MAX_REPORTS_PER_S,
        }
    }
}

/// Reads and checks a secret file: at least [`MIN_SECRET_BYTES`] once trimmed of the
/// trailing newline an editor adds.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let s = raw.trim_ascii().to_vec();
    if s.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{}: the usage secret is {} bytes; at least {MIN_SECRET_BYTES} are required",
            path.display(),
            s.len()
        ));
    }
    Ok(s)
}

/// Whether `presented` is `secret`, in time that does not depend on where they differ (or
/// on their lengths: both are hashed first, and the digests compared in full).
pub fn secret_matches(secret: &[u8], presented: &[u8]) -> bool {
    let a = ring::digest::digest(&ring::digest::SHA256, secret);
    let b = ring::digest::digest(&ring::digest::SHA256, presented);
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The feed's state in the node: its rate limit, its counters, the secret in force.
#[derive(Debug, Default)]
pub struct Feed {
    /// The HTTP listener's secret (read at start and at every reload).
    pub secret: Option<Vec<u8>>,
    /// Reports by outcome: `accepted` or a refusal label.
    pub outcomes: BTreeMap<&'static str, u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub money_nano: u64,
    /// The rate limit's theoretical arrival time (ns of the agent's monotonic clock): the
    /// kernel's own GCRA (`tollgate_common::limiter`), one report a packet.
    tat_ns: u64,
}

impl Feed {
    pub fn with_secret(secret: Option<Vec<u8>>) -> Feed {
        Feed {
            secret,
            ..Feed::default()
        }
    }

    pub fn count(&mut self, outcome: &'static str) {
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    /// Admits one report at `rate` a second with a burst of one second's worth; `false`:
    /// over the rate.
    pub fn admit(&mut self, rate: u32, now_ms: u64) -> bool {
        use tollgate_common::{
            limiter::{Gcra, gcra, packet_increment_ns, packet_tau_ns},
            policy::Q8_ONE,
        };
        let rate = u64::from(rate.max(1));
        let inc = packet_increment_ns(rate, u64::from(Q8_ONE)).unwrap_or(u64::MAX);
        let now = now_ms.saturating_mul(1_000_000);
        match gcra(self.tat_ns, now, inc, packet_tau_ns(rate, rate)) {
            Gcra::Conform(tat) => {
                self.tat_ns = tat;
                true
            }
            Gcra::Exceed => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_or_refused() {
        // Prices: per million tokens, to 0.001 (one nano-unit per token).
        assert_eq!(parse_decimal("0.15", 3, MAX_PRICE_PER_MILLION), Ok(150));
        assert_eq!(parse_decimal("3", 3, MAX_PRICE_PER_MILLION), Ok(3000));
        assert_eq!(parse_decimal("2.500", 3, MAX_PRICE_PER_MILLION), Ok(2500));
        assert_eq!(parse_decimal(".5", 3, MAX_PRICE_PER_MILLION), Ok(500));
        assert_eq!(parse_decimal("0", 3, MAX_PRICE_PER_MILLION), Ok(0));
        assert_eq!(parse_decimal("007.1", 3, MAX_PRICE_PER_MILLION), Ok(7100));
        // Budgets: to the nano-unit.
        assert_eq!(parse_decimal("0.000000001", 9, MAX_BUDGET), Ok(1));
        assert_eq!(parse_decimal("12.5", 9, MAX_BUDGET), Ok(12_500_000_000));
        assert_eq!(
            parse_decimal("1000000000", 9, MAX_BUDGET),
            Ok(MAX_BUDGET * NANO)
        );
        for (bad, what) in [
            ("-1", "negative"),
            ("-0.01", "negative"),
            ("NaN", "not a decimal"),
            ("inf", "not a decimal"),
            ("1e3", "not a decimal"),
            ("", "not a decimal"),
            (".", "not a decimal"),
            ("1.2.3", "not a decimal"),
            ("0.0001", "more than 3 decimal places"),
            ("1000001", "above the maximum"),
            ("1000000.5", "above the maximum"),
            ("99999999999999999999999", "above the maximum"),
        ] {
            let e = parse_decimal(bad, 3, MAX_PRICE_PER_MILLION).unwrap_err();
            assert!(e.contains(what), "{bad}: {e}");
        }
        assert_eq!(money_text(7_800), "0.0000078");
        assert_eq!(money_text(3 * NANO), "3");
        assert_eq!(money_text(12_500_000_000), "12.5");
    }

    #[test]
    fn prices_fall_back_to_the_star_row() {
        let p = Prices {
            rows: vec![
                Price {
                    model: "llama-3.1-8b".into(),
                    prompt_nano: 150,
                    completion_nano: 600,
                },
                Price {
                    model: "*".into(),
                    prompt_nano: 1000,
                    completion_nano: 2000,
                },
            ],
            currency: "USD".into(),
        };
        assert_eq!(p.cost("llama-3.1-8b", 12, 40), Some(12 * 150 + 40 * 600));
        assert_eq!(p.cost("other", 1, 1), Some(3000));
        let no_star = Prices {
            rows: p.rows[..1].to_vec(),
            currency: String::new(),
        };
        assert_eq!(no_star.cost("other", 1, 1), None);
        // The largest report at the largest price fits a u64 with room for hundreds more.
        let max = MAX_TOKENS_PER_REPORT * MAX_PRICE_PER_MILLION * 1000 * 2;
        assert!(max < u64::MAX / 100);
    }

    #[test]
    fn reports_parse_in_the_openai_shape_and_bad_ones_are_refused() {
        let r = parse(
            br#"{"who":{"client":"198.18.0.10"},"model":"m","usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52}}"#,
        )
        .unwrap();
        assert_eq!(r.who, Who::Client("198.18.0.10".parse().unwrap()));
        assert_eq!(r.tokens(), 52);
        let r = parse(
            br#"{"who":{"token_id":"t-1"},"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        )
        .unwrap();
        assert_eq!(r.who, Who::TokenId("t-1".into()));
        for (body, what) in [
            (&br#"{"who":{"identity":"a"},"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":4}}"#[..], "total_tokens = 4"),
            (br#"{"who":{"identity":"a"},"model":"m","usage":{"prompt_tokens":-1,"completion_tokens":2}}"#, "invalid value"),
            (br#"{"who":{"identity":"a"},"model":"m","usage":{"prompt_tokens":10000001,"completion_tokens":2}}"#, "over 10000000"),
            (br#"{"who":{"identity":"a"},"model":"","usage":{"prompt_tokens":1,"completion_tokens":2}}"#, "model"),
            (br#"{"who":{"identity":"a","client":"1.2.3.4"},"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#, ""),
            (br#"{"who":{"nobody":"a"},"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#, "unknown variant"),
            (br#"{"who":{"identity":"a"},"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2},"x":1}"#, "unknown field"),
            (br#"{"who":{"client":"not-an-ip"},"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#, "address"),
            (b"not json", "expected"),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.label(), "bad_report", "{}", String::from_utf8_lossy(body));
            assert!(e.message().contains(what), "{}: {}", what, e.message());
        }
    }

    #[test]
    fn secrets_compare_whole_and_the_bucket_holds_the_rate() {
        assert!(secret_matches(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!secret_matches(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!secret_matches(b"0123456789abcdef", b"0123456789abcdef0"));
        assert!(!secret_matches(b"0123456789abcdef", b""));
        let mut f = Feed::default();
        let admitted = (0..15).filter(|_| f.admit(10, 1000)).count();
        assert_eq!(admitted, 10, "a burst of one second's worth");
        assert!(!f.admit(10, 1050), "half a report back after 50 ms");
        assert!(f.admit(10, 1100));
        assert!(!f.admit(10, 1100));
        assert!(f.admit(10, 5000), "refilled");
    }
}
