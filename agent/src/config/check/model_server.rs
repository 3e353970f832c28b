//! `[endpoints.model_server]`: where an endpoint's model server exports its metrics, which
//! server it is (so which names its queue and KV gauges have), and the thresholds of the
//! pressure formula (the types and defaults live in `crate::controller::scrape`).

use super::{Checker, Result};
use crate::{
    config::raw::{RawModelServer, S},
    controller::{
        model_server::{MetricNames, ServerKind},
        scrape::ModelServer,
    },
    issuers::source::HttpsUrl,
};

/// Signals a model server may feed its endpoint's pressure with.
const SIGNALS: [&str; 3] = ["queue", "kv_cache", "gpu_util"];

impl Checker<'_> {
    pub(super) fn model_server(
        &self,
        raw: &Option<S<RawModelServer>>,
        at: &dyn Fn(&str) -> String,
    ) -> Result<Option<ModelServer>> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let span = raw.span();
        let r = raw.get_ref();
        let at = |k: &str| at(&format!("model_server.{k}"));
        let url = HttpsUrl::parse_http_or_https(r.url.get_ref()).map_err(|e| {
            let msg = match e {
                crate::issuers::source::UrlError::NotHttps(u) => {
                    format!("{u:?} is not an http:// or https:// URL")
                }
                other => other.to_string(),
            };
            self.err(r.url.span(), at("url"), msg)
        })?;
        let kind = ServerKind::from_label(r.kind.get_ref()).ok_or_else(|| {
            let all: Vec<&str> = ServerKind::ALL.iter().map(|k| k.label()).collect();
            self.err(
                r.kind.span(),
                at("kind"),
                format!(
                    "{:?} is not a model server kind: {}",
                    r.kind.get_ref(),
                    all.join(", ")
                ),
            )
        })?;
        let metric = |v: &Option<S<String>>, key: &str| -> Result<Option<String>> {
            let Some(v) = v else { return Ok(None) };
            let name = v.get_ref();
            // The Prometheus name rule: [a-zA-Z_:][a-zA-Z0-9_:]*.
            let ok = name.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            });
            if name.is_empty() || name.len() > 200 || !ok {
                return Err(self.err(
                    v.span(),
                    at(key),
                    format!("{name:?} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"),
                ));
            }
            if kind != ServerKind::Custom {
                return Err(self.err(
                    v.span(),
                    at(key),
                    format!(
                        "metric names are set only with kind = \"custom\" (kind {:?} has its own)",
                        kind.label()
                    ),
                ));
            }
            Ok(Some(name.clone()))
        };
        let queue_metric = metric(&r.queue_metric, "queue_metric")?;
        let running_metric = metric(&r.running_metric, "running_metric")?;
        let kv_metric = metric(&r.kv_cache_metric, "kv_cache_metric")?;
        let kv_cache_scale = match &r.kv_cache_scale {
            None => 1.0,
            Some(v) if kind != ServerKind::Custom => {
                return Err(self.err(
                    v.span(),
                    at("kv_cache_scale"),
                    "kv_cache_scale is set only with kind = \"custom\"",
                ));
            }
            Some(v) if *v.get_ref() > 0.0 && *v.get_ref() <= 1.0 => *v.get_ref(),
            Some(v) => {
                return Err(self.err(
                    v.span(),
                    at("kv_cache_scale"),
                    format!(
                        "{} is out of range: above 0 and at most 1 (0.01 for a percentage)",
                        v.get_ref()
                    ),
                ));
            }
        };
        let names = match kind.names() {
            Some(n) => n,
            None => {
                if queue_metric.is_none() && kv_metric.is_none() {
                    return Err(self.err(
                        span,
                        at("kind"),
                        "kind = \"custom\" needs queue_metric or kv_cache_metric (or both)",
                    ));
                }
                MetricNames {
                    queue: queue_metric.into_iter().collect(),
                    running: running_metric.into_iter().collect(),
                    kv_cache: kv_metric.into_iter().collect(),
                    kv_cache_scale,
                }
            }
        };
        let mut signals = Vec::new();
        match &r.signals {
            None => signals.extend(SIGNALS),
            Some(list) => {
                for s in list.get_ref() {
                    let name = s.get_ref().as_str();
                    let Some(known) = SIGNALS.iter().find(|k| **k == name) else {
                        return Err(self.err(
                            s.span(),
                            at("signals"),
                            format!("{name:?} is not a signal: queue, kv_cache or gpu_util"),
                        ));
                    };
                    if signals.contains(known) {
                        return Err(self.err(
                            s.span(),
                            at("signals"),
                            format!("{name:?} is listed twice"),
                        ));
                    }
                    signals.push(*known);
                }
                if signals.is_empty() {
                    return Err(self.err(
                        list.span(),
                        at("signals"),
                        "at least one signal (queue, kv_cache, gpu_util)",
                    ));
                }
            }
        }
        let positive = |v: &Option<S<f64>>, key: &str, default: f64, max: f64| -> Result<f64> {
            match v {
                None => Ok(default),
                Some(v) if *v.get_ref() > 0.0 && *v.get_ref() <= max => Ok(*v.get_ref()),
                Some(v) => Err(self.err(
                    v.span(),
                    at(key),
                    format!("{} is out of range: above 0 and at most {max}", v.get_ref()),
                )),
            }
        };
        let queue_at = positive(&r.queue_at, "queue_at", ModelServer::DEFAULT_QUEUE_AT, 1e6)?;
        let kv_cache_at = positive(
            &r.kv_cache_at,
            "kv_cache_at",
            ModelServer::DEFAULT_KV_CACHE_AT,
            1.0,
        )?;
        let has_queue = !names.queue.is_empty();
        let has_kv = !names.kv_cache.is_empty();
        let queue_at = (signals.contains(&"queue") && has_queue).then_some(queue_at);
        let kv_cache_at = (signals.contains(&"kv_cache") && has_kv).then_some(kv_cache_at);
        let gpu_util = signals.contains(&"gpu_util");
        if queue_at.is_none() && kv_cache_at.is_none() {
            return Err(self.err(
                span,
                at("signals"),
                format!(
                    "none of the signals chosen is one a {} server exports (it has: {}{})",
                    kind.label(),
                    if has_queue { "queue" } else { "" },
                    if has_kv { " kv_cache" } else { "" }
                ),
            ));
        }
        let timeout_ms = self.int(
            &r.timeout_ms,
            &at("timeout_ms"),
            ModelServer::DEFAULT_TIMEOUT_MS as i64,
            10..=60_000,
        )?;
        let fallback_intervals = self.int(
            &r.fallback_intervals,
            &at("fallback_intervals"),
            i64::from(ModelServer::DEFAULT_FALLBACK_INTERVALS),
            0..=10_000,
        )?;
        Ok(Some(ModelServer {
            url,
            kind,
            names,
            queue_at,
            kv_cache_at,
            gpu_util,
            timeout_ms: timeout_ms as u64,
            fallback_intervals: fallback_intervals as u32,
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn with(server: &str) -> Result<Config, String> {
        let text = format!(
            "[node]\ninterfaces = [\"eth0\"]\n[[plans]]\nname = \"p\"\n[[endpoints]]\n\
             name = \"m\"\nprotocol = \"tcp\"\nports = [8000]\nclasses = [\"customer\"]\n\
             [endpoints.model_server]\n{server}\n"
        );
        Config::parse(&text, "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn a_vllm_server_with_defaults() {
        let c = with("url = \"http://127.0.0.1:8000/metrics\"\nkind = \"vllm\"").unwrap();
        let s = c.endpoints[0].model_server.as_ref().unwrap();
        assert_eq!(
            (s.queue_at, s.kv_cache_at, s.gpu_util),
            (Some(16.0), Some(0.95), true)
        );
        assert_eq!((s.timeout_ms, s.fallback_intervals), (1000, 8));
        assert!(!s.url.tls && s.url.port == 8000);
    }

    #[test]
    fn kinds_without_a_kv_gauge_leave_it_out() {
        let c = with("url = \"https://tgi.internal/metrics\"\nkind = \"tgi\"").unwrap();
        let s = c.endpoints[0].model_server.as_ref().unwrap();
        assert_eq!((s.queue_at, s.kv_cache_at), (Some(16.0), None));
        assert!(s.url.tls);
    }

    #[test]
    fn a_custom_mapping() {
        let c = with(
            "url = \"http://127.0.0.1:9000/metrics\"\nkind = \"custom\"\n\
             queue_metric = \"my:queue\"\nkv_cache_metric = \"kv_percent\"\n\
             kv_cache_scale = 0.01\nsignals = [\"queue\", \"kv_cache\"]",
        )
        .unwrap();
        let s = c.endpoints[0].model_server.as_ref().unwrap();
        assert_eq!(s.names.queue, ["my:queue"]);
        assert_eq!(s.names.kv_cache_scale, 0.01);
        assert!(!s.gpu_util);
    }

    #[test]
    fn refusals_name_the_field_and_say_why() {
        let url = "url = \"http://127.0.0.1:8000/metrics\"\n";
        for (server, field, why) in [
            (
                "url = \"ftp://x/metrics\"\nkind = \"vllm\"",
                "url",
                "not an http:// or https://",
            ),
            (
                "url = \"http://u:p@x/metrics\"\nkind = \"vllm\"",
                "url",
                "credentials",
            ),
            (
                &format!("{url}kind = \"ollama\"") as &str,
                "kind",
                "vllm, tgi, triton",
            ),
            (
                &format!("{url}kind = \"custom\""),
                "kind",
                "needs queue_metric",
            ),
            (
                &format!("{url}kind = \"vllm\"\nqueue_metric = \"q\""),
                "queue_metric",
                "only with kind = \"custom\"",
            ),
            (
                &format!("{url}kind = \"custom\"\nqueue_metric = \"9q\""),
                "queue_metric",
                "not a Prometheus metric name",
            ),
            (
                &format!("{url}kind = \"vllm\"\nsignals = [\"latency\"]"),
                "signals",
                "not a signal",
            ),
            (
                &format!("{url}kind = \"vllm\"\nsignals = []"),
                "signals",
                "at least one",
            ),
            (
                &format!("{url}kind = \"tgi\"\nsignals = [\"kv_cache\"]"),
                "signals",
                "none of the signals",
            ),
            (
                &format!("{url}kind = \"vllm\"\nqueue_at = 0"),
                "queue_at",
                "out of range",
            ),
            (
                &format!("{url}kind = \"vllm\"\nkv_cache_at = 1.5"),
                "kv_cache_at",
                "out of range",
            ),
            (
                &format!("{url}kind = \"vllm\"\ntimeout_ms = 0"),
                "timeout_ms",
                "",
            ),
            (
                &format!("{url}kind = \"vllm\"\nport = 1"),
                "model_server.port",
                "unknown key",
            ),
        ] {
            let e = with(server).unwrap_err();
            assert!(e.contains(field) && e.contains(why), "{server:?}: {e}");
        }
    }
}
