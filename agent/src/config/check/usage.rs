//! Plans in tokens and money (`tokens_per_*`, `budget_per_*`), the price table
//! (`[[prices]]`, `[pricing]`) and the usage feed (`[usage]`).

use std::{net::SocketAddr, path::PathBuf};

use super::{Checker, Result};
use crate::config::raw::{List, RawDecimal, RawPlan, RawPrice, RawPricing, RawUsage, S};
use crate::controller::quota::QuotaLimits;
use crate::usage::{
    self, MAX_BUDGET, MAX_PRICE_PER_MILLION, MAX_TOKENS_PER_REPORT, Price, Prices, UsageConfig,
};

/// The most tokens a plan's window may allow: a billion times the largest report.
const MAX_PLAN_TOKENS: i64 = (MAX_TOKENS_PER_REPORT as i64) * 1_000_000_000;

impl Checker<'_> {
    /// A plan's token and money limits (the rest of `QuotaLimits` is the caller's).
    pub(super) fn usage_limits(&self, plan: usize, p: &RawPlan) -> Result<QuotaLimits> {
        let at = |key: &str| format!("plans[{plan}].{key}");
        let tokens = |v: &Option<S<i64>>, key: &str| -> Result<Option<u64>> {
            match v {
                None => Ok(None),
                Some(_) => Ok(Some(self.int(v, &at(key), 1, 1..=MAX_PLAN_TOKENS)? as u64)),
            }
        };
        let money = |v: &Option<S<RawDecimal>>, key: &str| -> Result<Option<u64>> {
            let Some(v) = v else { return Ok(None) };
            let nano = usage::parse_decimal(&v.get_ref().0, 9, MAX_BUDGET)
                .map_err(|e| self.err(v.span(), at(key), format!("{e} (a budget in the price table's currency, at most {MAX_BUDGET}, to 9 decimal places)")))?;
            if nano == 0 {
                return Err(self.err(
                    v.span(),
                    at(key),
                    "a budget of 0 cuts the identity off before its first request: give a \
                     budget above 0, or a byte quota of the plan for that",
                ));
            }
            Ok(Some(nano))
        };
        Ok(QuotaLimits {
            minute_tokens: tokens(&p.tokens_per_minute, "tokens_per_minute")?,
            day_tokens: tokens(&p.tokens_per_day, "tokens_per_day")?,
            month_tokens: tokens(&p.tokens_per_month, "tokens_per_month")?,
            minute_money: money(&p.budget_per_minute, "budget_per_minute")?,
            day_money: money(&p.budget_per_day, "budget_per_day")?,
            month_money: money(&p.budget_per_month, "budget_per_month")?,
            ..QuotaLimits::default()
        })
    }

    /// `[[prices]]` and `[pricing]`. `budget_plan`: the first plan with a money budget and
    /// the span of its `[[plans]]` table, which needs a price table.
    pub(super) fn prices(
        &self,
        raw: Option<List<RawPrice>>,
        pricing: Option<S<RawPricing>>,
        budget_plan: Option<(String, std::ops::Range<usize>)>,
    ) -> Result<Prices> {
        let mut rows: Vec<Price> = Vec::new();
        for (i, r) in raw
            .map(|l| l.into_inner())
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let at = |key: &str| format!("prices[{i}].{key}");
            let r = r.into_inner();
            let model = r.model.get_ref();
            if model.is_empty() || model.len() > 256 || model.chars().any(char::is_control) {
                return Err(self.err(
                    r.model.span(),
                    at("model"),
                    "a model name is 1 to 256 printable characters (\"*\": any other model)",
                ));
            }
            if let Some(j) = rows.iter().position(|p| &p.model == model) {
                return Err(self.err(
                    r.model.span(),
                    at("model"),
                    format!("model {model:?} is priced twice (also prices[{j}])"),
                ));
            }
            let price = |v: &S<RawDecimal>, key: &str| -> Result<u64> {
                // To 0.001 per million tokens: one nano-unit per token, so every report's
                // price is an exact integer.
                usage::parse_decimal(&v.get_ref().0, 3, MAX_PRICE_PER_MILLION).map_err(|e| {
                    self.err(
                        v.span(),
                        at(key),
                        format!(
                            "{e} (money per million tokens, from 0 to {MAX_PRICE_PER_MILLION}, \
                             to 3 decimal places: one nano-unit per token)"
                        ),
                    )
                })
            };
            rows.push(Price {
                model: model.clone(),
                prompt_nano: price(&r.prompt_per_million, "prompt_per_million")?,
                completion_nano: price(&r.completion_per_million, "completion_per_million")?,
            });
        }
        let currency = match pricing.as_ref().and_then(|p| p.get_ref().currency.as_ref()) {
            None => "USD".to_owned(),
            Some(c) => {
                let t = c.get_ref();
                if t.is_empty() || t.len() > 16 || !t.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(self.err(
                        c.span(),
                        "pricing.currency",
                        format!("{t:?} is not a currency code: 1 to 16 letters or digits (\"USD\", \"EUR\", \"credits\")"),
                    ));
                }
                t.clone()
            }
        };
        if rows.is_empty()
            && let Some((plan, span)) = budget_plan
        {
            return Err(self.err(
                span,
                format!("plans[{plan}]"),
                "a budget_per_* needs a price table: add [[prices]] rows (model, \
                 prompt_per_million, completion_per_million) or a \"*\" row for every model",
            ));
        }
        Ok(Prices { rows, currency })
    }

    /// `[usage]`.
    pub(super) fn usage(&self, raw: Option<S<RawUsage>>) -> Result<UsageConfig> {
        let d = UsageConfig::default();
        let Some(raw) = raw else { return Ok(d) };
        let span = raw.span();
        let raw = raw.into_inner();
        let listen: Option<SocketAddr> = match &raw.listen {
            None => None,
            Some(_) => Some(self.socket_addr(
                &raw.listen,
                "usage.listen",
                "127.0.0.1:9466".parse().expect("literal"),
            )?),
        };
        let allow_remote = raw.allow_remote.as_ref().is_some_and(|b| *b.get_ref());
        if let (Some(addr), Some(v)) = (listen, &raw.listen)
            && !addr.ip().is_loopback()
            && !allow_remote
        {
            return Err(self.err(
                v.span(),
                "usage.listen",
                format!(
                    "{addr} is not a loopback address: the usage feed spends identities' \
                     budgets, so it listens on 127.0.0.1 or ::1 unless allow_remote = true \
                     (then firewall it: the secret is sent in clear, there is no TLS)"
                ),
            ));
        }
        let secret_file = match &raw.secret_file {
            None => None,
            Some(_) => {
                Some(self.abs_path(&raw.secret_file, "usage.secret_file", PathBuf::new())?)
            }
        };
        if listen.is_some() && secret_file.is_none() {
            return Err(self.err(
                span,
                "usage.secret_file",
                "usage.listen needs a secret_file: the HTTP feed accepts only reports that \
                 carry its secret (X-Tollgate-Usage-Secret)",
            ));
        }
        let max_report_bytes = self.int(
            &raw.max_report_bytes,
            "usage.max_report_bytes",
            d.max_report_bytes as i64,
            256..=65_536,
        )? as usize;
        let max_reports_per_s = self.int(
            &raw.max_reports_per_s,
            "usage.max_reports_per_s",
            i64::from(d.max_reports_per_s),
            1..=1_000_000,
        )? as u32;
        Ok(UsageConfig {
            listen,
            allow_remote,
            secret_file,
            max_report_bytes,
            max_reports_per_s,
        })
    }
}
