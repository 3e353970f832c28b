//! Model-server load: what an LLM server's own Prometheus endpoint says about its queue and
//! its KV cache, the signals an inference platform watches (a GPU running any batch reads
//! near 100% utilisation whether ten requests wait or ten thousand).
//!
//! Each server kind names its metrics differently; [`ServerKind::names`] holds them, with the
//! source each name was taken from. The exposition text is parsed by `openmetrics-parser`
//! (a maintained parser of the Prometheus text format and OpenMetrics: metric names with
//! colons, quoted label values with escapes, histograms and summaries), never by hand.
//! A server that runs several models or engines exports one series per label set: queue
//! depths are summed (every waiting request is waiting on this endpoint's GPUs), KV-cache
//! usage is the highest (the fullest cache is the one that starts preempting).

use std::collections::{BTreeMap, BTreeSet};

use openmetrics_parser::{PrometheusValue, prometheus::parse_prometheus};
use serde::{Deserialize, Serialize};

/// The model servers tollgate knows the metric names of, or `Custom` (names from the
/// configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    Vllm,
    Tgi,
    Triton,
    Sglang,
    Llamacpp,
    Custom,
}

impl ServerKind {
    pub const ALL: [ServerKind; 6] = [
        ServerKind::Vllm,
        ServerKind::Tgi,
        ServerKind::Triton,
        ServerKind::Sglang,
        ServerKind::Llamacpp,
        ServerKind::Custom,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ServerKind::Vllm => "vllm",
            ServerKind::Tgi => "tgi",
            ServerKind::Triton => "triton",
            ServerKind::Sglang => "sglang",
            ServerKind::Llamacpp => "llamacpp",
            ServerKind::Custom => "custom",
        }
    }

    pub fn from_label(s: &str) -> Option<ServerKind> {
        Self::ALL.into_iter().find(|k| k.label() == s)
    }

    /// The metric names of a known kind (`None` for `Custom`). Where a server renamed a
    /// metric, both names are listed, the current one first.
    pub fn names(self) -> Option<MetricNames> {
        let v = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect();
        let n = |queue: &[&str], running: &[&str], kv_cache: &[&str]| MetricNames {
            queue: v(queue),
            running: v(running),
            kv_cache: v(kv_cache),
            kv_cache_scale: 1.0,
        };
        Some(match self {
            // vllm/v1/metrics/loggers.py (PrometheusStatLogger); releases before 0.10 call the
            // KV gauge vllm:gpu_cache_usage_perc (vllm/engine/metrics.py). Both are 0..1.
            ServerKind::Vllm => n(
                &["vllm:num_requests_waiting"],
                &["vllm:num_requests_running"],
                &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
            ),
            // text-generation-inference router (router/src/infer, router/src/queue.rs): gauges
            // through the `metrics` crate's Prometheus exporter. TGI exports no KV gauge.
            ServerKind::Tgi => n(&["tgi_queue_size"], &["tgi_batch_current_size"], &[]),
            // Triton's docs/user_guide/metrics.md ("Pending Request Count", per model and
            // version). Its queue time (nv_inference_queue_duration_us) is a counter, read
            // for `gpu read` but not a level; Triton exports no KV gauge.
            ServerKind::Triton => n(&["nv_inference_pending_request_count"], &[], &[]),
            // sglang python/sglang/srt/metrics/collector.py and docs/references/
            // production_metrics.md: sglang:token_usage is the KV pool's used share, 0..1.
            ServerKind::Sglang => n(
                &["sglang:num_queue_reqs"],
                &["sglang:num_running_reqs"],
                &["sglang:token_usage"],
            ),
            // llama.cpp tools/server/server.cpp, `GET /metrics` with --metrics.
            ServerKind::Llamacpp => n(
                &["llamacpp:requests_deferred"],
                &["llamacpp:requests_processing"],
                &["llamacpp:kv_cache_usage_ratio"],
            ),
            ServerKind::Custom => return None,
        })
    }
}

/// Triton's cumulative queue time, shown by `gpu read` beside the levels.
pub const TRITON_QUEUE_DURATION: &str = "nv_inference_queue_duration_us";

/// Which metrics carry which signal: each a list of names, the first one present wins.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricNames {
    /// Requests waiting for a place in a batch.
    pub queue: Vec<String>,
    /// Requests in the running batch (shown, not a signal: a full batch is the goal).
    pub running: Vec<String>,
    /// KV-cache usage.
    pub kv_cache: Vec<String>,
    /// Multiplier taking the KV metric to 0..1 (0.01 for a percentage).
    pub kv_cache_scale: f64,
}

/// One reading of a model server.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelReading {
    /// Waiting requests, summed over the server's series; `None`: the server exports none.
    pub queue: Option<f64>,
    pub running: Option<f64>,
    /// KV-cache usage 0..=1, the highest of the server's series.
    pub kv_cache: Option<f64>,
    /// Triton only: cumulative microseconds requests spent queued (a counter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_duration_us: Option<f64>,
    /// Which metric each signal came from (vLLM: which of its two KV names).
    pub metrics: Vec<String>,
}

/// Why an exposition cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not Prometheus text: {0}")]
    NotPrometheus(String),
    #[error("none of {0} is in the exposition (is the kind right?)")]
    NoMetric(String),
    #[error("{0} has more than {max} series", max = MAX_SERIES)]
    TooManySeries(String),
    #[error("{metric} = {value}: {why}")]
    BadValue {
        metric: String,
        value: String,
        why: &'static str,
    },
}

/// Series one metric may have: a server exports one per model and engine, a few dozen at
/// most; more is a server (or an impostor on its port) costing the agent work.
pub const MAX_SERIES: usize = 1024;

/// The lines of `text` that belong to the families in `wanted` (their `# HELP`, `# TYPE` and
/// samples), and nothing else. Linear in the text: the parser (whose cost grows with the
/// square of a family's series) then sees only the few families a signal is read from, and a
/// family the agent never reads cannot make the exposition unreadable.
fn keep_families(text: &str, wanted: &BTreeSet<&str>) -> Result<String, ParseError> {
    let mut kept = String::new();
    let mut series: BTreeMap<&str, usize> = BTreeMap::new();
    // Families given a type already: the parser groups untyped samples of different names
    // into one family (and refuses it), so a family without `# TYPE` gets `untyped` here.
    let mut typed: BTreeSet<&str> = BTreeSet::new();
    for line in text.split_inclusive('\n') {
        let body = line.trim_start();
        let name = if let Some(comment) = body.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            match (words.next(), words.next()) {
                (Some("HELP"), Some(name)) => name,
                (Some("TYPE"), Some(name)) => {
                    if wanted.contains(name) && !typed.insert(name) {
                        continue;
                    }
                    name
                }
                _ => continue,
            }
        } else {
            let end = body.find(['{', ' ', '\t']).unwrap_or(body.len());
            let name = body[..end].trim_end();
            if name.is_empty() {
                continue;
            }
            let n = series.entry(name).or_default();
            *n += 1;
            if wanted.contains(name) && *n > MAX_SERIES {
                return Err(ParseError::TooManySeries(name.to_owned()));
            }
            if wanted.contains(name) && typed.insert(name) {
                kept.push_str(&format!("# TYPE {name} untyped\n"));
            }
            name
        };
        if wanted.contains(name) {
            kept.push_str(line);
        }
    }
    Ok(kept)
}

/// Reads the signals of `names` out of `text`.
pub fn parse(text: &str, names: &MetricNames) -> Result<ModelReading, ParseError> {
    // The format ends every line with a newline, the last one included; a body without it
    // was cut short, and its last number may be cut too ("12" of "1234").
    if !text.ends_with('\n') {
        return Err(ParseError::NotPrometheus(
            "the exposition does not end with a newline (cut short?)".into(),
        ));
    }
    let wanted: BTreeSet<&str> = names
        .queue
        .iter()
        .chain(&names.running)
        .chain(&names.kv_cache)
        .map(String::as_str)
        .chain([TRITON_QUEUE_DURATION])
        .collect();
    let kept = keep_families(text, &wanted)?;
    if kept.is_empty() {
        return Err(ParseError::NoMetric(list(names)));
    }
    let exposition =
        parse_prometheus(&kept).map_err(|e| ParseError::NotPrometheus(short(&format!("{e:?}"))))?;
    let mut reading = ModelReading::default();
    let mut found = false;
    // `strict`: a bad value of a signal fails the scrape; one of a metric only shown
    // (running, Triton's queue time) is left out.
    let mut pick = |list: &[String],
                    combine: fn(f64, f64) -> f64,
                    strict: bool|
     -> Result<Option<f64>, ParseError> {
        for name in list {
            let Some(family) = exposition.families.get(name) else {
                continue;
            };
            let mut total: Option<f64> = None;
            for sample in family.iter_samples() {
                let v = match &sample.value {
                    PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
                    PrometheusValue::Counter(c) => c.value.as_f64(),
                    // A histogram or summary is not a level.
                    _ => continue,
                };
                total = Some(total.map_or(v, |t| combine(t, v)));
                let bad = |why| {
                    if strict {
                        Err(ParseError::BadValue {
                            metric: name.clone(),
                            value: v.to_string(),
                            why,
                        })
                    } else {
                        Ok(None)
                    }
                };
                if !v.is_finite() || v < 0.0 {
                    return bad("not a finite non-negative number");
                }
                if total.is_some_and(|t| !t.is_finite()) {
                    return bad("its series add up past any number");
                }
            }
            if let Some(t) = total {
                if strict {
                    found = true;
                }
                reading.metrics.push(name.clone());
                return Ok(Some(t));
            }
        }
        Ok(None)
    };
    reading.queue = pick(&names.queue, |a, b| a + b, true)?;
    reading.running = pick(&names.running, |a, b| a + b, false)?;
    let kv = pick(&names.kv_cache, f64::max, true)?;
    reading.queue_duration_us = pick(&[TRITON_QUEUE_DURATION.to_owned()], |a, b| a + b, false)?;
    if let Some(kv) = kv {
        let scaled = kv * names.kv_cache_scale;
        if scaled > 1.0 + 1e-9 {
            return Err(ParseError::BadValue {
                metric: reading
                    .metrics
                    .iter()
                    .rfind(|m| names.kv_cache.contains(m))
                    .cloned()
                    .unwrap_or_default(),
                value: kv.to_string(),
                why: "KV-cache usage above 1 (set kv_cache_scale = 0.01 for a percentage)",
            });
        }
        reading.kv_cache = Some(scaled.min(1.0));
    }
    if !found {
        return Err(ParseError::NoMetric(list(names)));
    }
    Ok(reading)
}

/// The signals' metric names, for an error.
fn list(names: &MetricNames) -> String {
    let all: Vec<&str> = names
        .queue
        .iter()
        .chain(&names.kv_cache)
        .map(String::as_str)
        .collect();
    all.join(", ")
}

/// A parser's error can quote a whole line of attacker-sized text: keep the start.
fn short(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests;
