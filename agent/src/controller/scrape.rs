//! Scraping the endpoints' model servers, and what the controller makes of a server that stops
//! answering.
//!
//! The control loop never waits on a model server: at each tick it takes the answer that came
//! in since the last one ([`Feed::collect`]) and starts the next scrape ([`Feed::launch`]) as
//! its own task, with a timeout below the interval. A server that hangs, answers garbage or
//! goes away costs that endpoint its fresh reading, never the loop its interval.
//!
//! A failed scrape starts an outage, reported once (a log line and an audit record) until a
//! scrape succeeds again. Through an outage the last good reading holds for
//! `fallback_intervals` intervals; after that the endpoint's pressure falls back to its GPUs'
//! utilisation (NVML or the simulated source), as if it had no model server.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    model_server::{self, MetricNames, ModelReading, ServerKind},
    pressure::Signal,
};
use crate::issuers::{
    Outcome,
    fetch::{self, Client},
    source::HttpsUrl,
};

/// A model server's metrics are a few hundred KiB with every histogram; more is not one.
pub const MAX_METRICS_BYTES: usize = 4 << 20;
/// What a scrape asks for: the classic text format (a server that speaks OpenMetrics too
/// would otherwise pick it, and its `# EOF` framing is not what is parsed here).
const ACCEPT: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";

/// An endpoint's model server, as configured (`[endpoints.model_server]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelServer {
    pub url: HttpsUrl,
    pub kind: ServerKind,
    pub names: MetricNames,
    /// Waiting requests at which the endpoint saturates (`queue_at`); `None`: not a signal.
    pub queue_at: Option<f64>,
    /// KV-cache usage (0..1) at which it saturates (`kv_cache_at`); `None`: not a signal.
    pub kv_cache_at: Option<f64>,
    /// Whether the GPUs' utilisation joins the model server's signals (`gpu_util`).
    pub gpu_util: bool,
    /// The longest one scrape may take (`timeout_ms`); the loop caps it below its interval.
    pub timeout_ms: u64,
    /// Intervals the last good reading holds through an outage (`fallback_intervals`).
    pub fallback_intervals: u32,
}

impl ModelServer {
    pub const DEFAULT_QUEUE_AT: f64 = 16.0;
    pub const DEFAULT_KV_CACHE_AT: f64 = 0.95;
    pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
    pub const DEFAULT_FALLBACK_INTERVALS: u32 = 8;

    /// One scrape's timeout under a loop of `interval_ms`: the configured one, at most 80% of
    /// the interval, so a scrape started at one tick has ended by the next.
    pub fn timeout(&self, interval_ms: u64) -> Duration {
        Duration::from_millis(self.timeout_ms.min(interval_ms * 4 / 5).max(1))
    }
}

/// Why a scrape failed: a bounded label (`tollgate_model_server_scrapes_total{outcome}`) and
/// what happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ScrapeError {
    pub outcome: String,
    pub message: String,
}

/// The outcome labels a scrape can end with, `ok` first.
pub const OUTCOMES: [&str; 8] = [
    "ok",
    "connect",
    "tls",
    "timeout",
    "http_status",
    "too_large",
    "io",
    "parse",
];

fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Connect => "connect",
        Outcome::Tls => "tls",
        Outcome::Timeout => "timeout",
        Outcome::HttpStatus => "http_status",
        Outcome::TooLarge => "too_large",
        _ => "io",
    }
}

/// One scrape: GET, then parse (on the blocking pool: a large exposition is milliseconds of
/// work the agent's one thread should not spend).
pub async fn scrape(
    client: Option<&Client>,
    server: &ModelServer,
    timeout: Duration,
) -> Result<ModelReading, ScrapeError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let doc = fetch::get(client, &server.url, ACCEPT, MAX_METRICS_BYTES, timeout)
        .await
        .map_err(|e| ScrapeError {
            outcome: outcome_label(e.outcome).to_owned(),
            message: e.message,
        })?;
    let parse_fail = |message: String| ScrapeError {
        outcome: "parse".to_owned(),
        message: format!("{}: {message}", server.url),
    };
    let text = String::from_utf8(doc.body).map_err(|_| parse_fail("not UTF-8 text".into()))?;
    let names = server.names.clone();
    // The parse counts against the same timeout: a reading that comes late is no reading of
    // now (the parse itself is bounded, `model_server::MAX_SERIES`).
    let parsed = tokio::time::timeout_at(
        deadline,
        tokio::task::spawn_blocking(move || model_server::parse(&text, &names)),
    )
    .await
    .map_err(|_| ScrapeError {
        outcome: "timeout".to_owned(),
        message: format!(
            "{}: not parsed within {} ms",
            server.url,
            timeout.as_millis()
        ),
    })?;
    parsed
        .map_err(|e| parse_fail(format!("the parser stopped: {e}")))?
        .map_err(|e| parse_fail(e.to_string()))
}

/// The TLS client for `https` model servers (the system's roots), made once; `None` where no
/// server needs one or the roots cannot be loaded (its scrapes then fail as `tls`, reported).
pub fn client_for(servers: &[&ModelServer]) -> Option<Client> {
    if !servers.iter().any(|s| s.url.tls) {
        return None;
    }
    match Client::new(None) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("model servers over https: {e}");
            None
        }
    }
}

/// An outage of one model server: from the first failed scrape to the next good one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    pub since_unix_ms: u64,
    /// The first failure (the one reported).
    pub error: ScrapeError,
    pub failed_scrapes: u64,
}

/// What changed at a [`Feed::collect`]: said once per outage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Down(Outage),
    Up(Outage),
}

/// What the scrape task hands the loop.
#[derive(Default)]
struct Slot {
    in_flight: bool,
    result: Option<Result<ModelReading, ScrapeError>>,
}

/// One endpoint's model-server feed, kept by the control loop.
#[derive(Default)]
pub struct Feed {
    /// The configuration it was made for: a reload that changes it starts a new feed (a
    /// reading of the old URL, or under the old kind's names, is no reading of the new one).
    made_for: Option<ModelServer>,
    slot: Arc<Mutex<Slot>>,
    last_ok: Option<ModelReading>,
    /// Intervals since `last_ok` arrived (0: this one).
    age: u32,
    pub outage: Option<Outage>,
    /// Scrapes by outcome label, for metrics.
    pub scrapes: BTreeMap<String, u64>,
}

impl Feed {
    pub fn new(server: &ModelServer) -> Feed {
        Feed {
            made_for: Some(server.clone()),
            ..Feed::default()
        }
    }

    /// Whether this feed reads what `server` names: the same URL, kind and metric names
    /// (new thresholds or timeouts apply to the same readings).
    pub fn serves(&self, server: &ModelServer) -> bool {
        self.made_for.as_ref().is_some_and(|m| {
            m.url == server.url && m.kind == server.kind && m.names == server.names
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        // A panicking scrape task leaves a slot that is still a valid answer.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the answer that came in since the last tick (if any), at `now_ms`.
    pub fn collect(&mut self, now_ms: u64) -> Option<Change> {
        let result = self.slot().result.take();
        match result {
            None => {
                self.age = self.age.saturating_add(1);
                None
            }
            Some(Ok(reading)) => {
                *self.scrapes.entry("ok".into()).or_default() += 1;
                self.last_ok = Some(reading);
                self.age = 0;
                self.outage.take().map(Change::Up)
            }
            Some(Err(error)) => {
                *self.scrapes.entry(error.outcome.clone()).or_default() += 1;
                self.age = self.age.saturating_add(1);
                match &mut self.outage {
                    Some(o) => {
                        o.failed_scrapes += 1;
                        None
                    }
                    None => {
                        let o = Outage {
                            since_unix_ms: now_ms,
                            error,
                            failed_scrapes: 1,
                        };
                        self.outage = Some(o.clone());
                        Some(Change::Down(o))
                    }
                }
            }
        }
    }

    /// Starts the next scrape unless the last one is still running (it cannot be, with the
    /// timeout below the interval, unless the runtime is starved: then one is skipped).
    pub fn launch(&self, client: Option<Client>, server: ModelServer, timeout: Duration) {
        {
            let mut s = self.slot();
            if s.in_flight {
                return;
            }
            s.in_flight = true;
        }
        let slot = Arc::clone(&self.slot);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            let mut s = self.slot();
            s.in_flight = false;
            s.result = Some(Err(ScrapeError {
                outcome: "io".into(),
                message: "no runtime to scrape from".into(),
            }));
            return;
        };
        rt.spawn(async move {
            let r = scrape(client.as_ref(), &server, timeout).await;
            let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
            s.in_flight = false;
            s.result = Some(r);
        });
    }

    /// The reading the pressure uses: the last good one while it is at most `hold`
    /// intervals old; `None`: fall back to the GPUs.
    pub fn current(&self, hold: u32) -> Option<(&ModelReading, u32)> {
        self.last_ok
            .as_ref()
            .filter(|_| self.age <= hold)
            .map(|r| (r, self.age))
    }

    /// What the pressure formula gets from this feed (see [`Use`]).
    pub fn usable(&self, hold: u32) -> Use<'_> {
        match self.current(hold) {
            Some((r, age)) => Use::Reading(r, age),
            // The first answer is on its way (the agent just started, or the endpoint just
            // got its model server): a GPU busy as LLM serving makes it must not saturate the
            // endpoint before its queue has been read once.
            // At least two intervals: the first scrape starts at the first tick and is
            // taken at the second, whatever `fallback_intervals` says.
            None if self.last_ok.is_none() && self.outage.is_none() && self.age <= hold.max(2) => {
                Use::Pending
            }
            None => Use::Lost,
        }
    }
}

/// A model server's part in its endpoint's pressure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Use<'a> {
    /// A reading, and how many intervals old it is (0: fresh; more: held through an outage).
    Reading(&'a ModelReading, u32),
    /// Not answered yet, no failure yet: no signal; the endpoint's saturation stays as it
    /// was (not held back at start; a reload that changed the server keeps the hold-back).
    Pending,
    /// Failed past `fallback_intervals`, or never answered within them: the GPUs decide.
    Lost,
}

/// Where an endpoint's pressure came from (`status`, `gpu read`, the audit records).
pub const SOURCE_MODEL_SERVER: &str = "model_server";
/// The model server's last good reading, held through an outage.
pub const SOURCE_HELD: &str = "model_server_held";
/// The GPUs' utilisation: no model server configured.
pub const SOURCE_GPUS: &str = "gpus";
/// The GPUs' utilisation because the model server has failed past `fallback_intervals`.
pub const SOURCE_FALLBACK: &str = "gpus_fallback";
/// No signal yet: the model server's first answer has not come.
pub const SOURCE_PENDING: &str = "model_server_pending";

/// The pressure formula's inputs for one endpoint: its model server's part ([`Use`]) and its
/// GPUs' highest utilisation, against their thresholds (`saturate_at` for utilisation).
/// Returns the signals and where they came from.
pub fn signals(
    server: Option<&ModelServer>,
    reading: Use<'_>,
    util: Option<f64>,
    saturate_at: f64,
) -> (Vec<Signal>, &'static str) {
    let gpu = util.map(|u| Signal {
        name: "gpu_util",
        value: u,
        at: saturate_at,
    });
    let Some(server) = server else {
        return (gpu.into_iter().collect(), SOURCE_GPUS);
    };
    let (r, age) = match reading {
        Use::Reading(r, age) => (r, age),
        Use::Pending => return (Vec::new(), SOURCE_PENDING),
        Use::Lost => return (gpu.into_iter().collect(), SOURCE_FALLBACK),
    };
    let mut out = Vec::new();
    if let (Some(q), Some(at)) = (r.queue, server.queue_at) {
        out.push(Signal {
            name: "queue",
            value: q,
            at,
        });
    }
    if let (Some(kv), Some(at)) = (r.kv_cache, server.kv_cache_at) {
        out.push(Signal {
            name: "kv_cache",
            value: kv,
            at,
        });
    }
    if server.gpu_util {
        out.extend(gpu);
    }
    (
        out,
        if age == 0 {
            SOURCE_MODEL_SERVER
        } else {
            SOURCE_HELD
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(queue: f64) -> ModelReading {
        ModelReading {
            queue: Some(queue),
            ..ModelReading::default()
        }
    }

    fn answer(f: &Feed, r: Result<ModelReading, ScrapeError>) {
        f.slot().result = Some(r);
    }

    fn down(outcome: &str) -> Result<ModelReading, ScrapeError> {
        Err(ScrapeError {
            outcome: outcome.into(),
            message: format!("{outcome} failure"),
        })
    }

    #[test]
    fn an_outage_is_reported_once_and_its_end_once() {
        let mut f = Feed::default();
        answer(&f, Ok(reading(3.0)));
        assert_eq!(f.collect(1), None);
        let mut changes = Vec::new();
        for (t, outcome) in ["timeout", "timeout", "parse", "connect"]
            .iter()
            .enumerate()
        {
            answer(&f, down(outcome));
            changes.extend(f.collect(10 + t as u64));
        }
        assert_eq!(changes.len(), 1, "{changes:?}");
        let Change::Down(o) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!((o.since_unix_ms, o.error.outcome.as_str()), (10, "timeout"));
        answer(&f, Ok(reading(1.0)));
        let Some(Change::Up(o)) = f.collect(20) else {
            panic!("no end of outage")
        };
        assert_eq!(o.failed_scrapes, 4);
        assert_eq!(f.scrapes.get("timeout"), Some(&2));
        assert_eq!(f.scrapes.get("ok"), Some(&2));
        assert_eq!(f.collect(21), None);
    }

    #[test]
    fn the_last_reading_holds_for_its_intervals_then_the_gpus_decide() {
        let mut f = Feed::default();
        assert_eq!(f.current(2), None, "nothing read yet");
        answer(&f, Ok(reading(30.0)));
        f.collect(0);
        assert_eq!(
            f.current(2).map(|(r, age)| (r.queue, age)),
            Some((Some(30.0), 0))
        );
        answer(&f, down("timeout"));
        f.collect(1);
        // A tick with no answer at all (a scrape still out) ages it as well.
        f.collect(2);
        assert_eq!(f.current(2).map(|(_, age)| age), Some(2));
        answer(&f, down("timeout"));
        f.collect(3);
        assert_eq!(f.current(2), None, "held past fallback_intervals");
        answer(&f, Ok(reading(1.0)));
        f.collect(4);
        assert_eq!(f.current(2).map(|(r, _)| r.queue), Some(Some(1.0)));
    }

    #[test]
    fn before_the_first_answer_nothing_saturates_and_a_first_failure_falls_back() {
        let mut f = Feed::default();
        assert_eq!(f.usable(4), Use::Pending);
        fn s(u: Use<'_>) -> (Vec<Signal>, &'static str) {
            signals(Some(&server()), u, Some(0.99), 0.9)
        }
        assert_eq!(s(f.usable(4)), (Vec::new(), SOURCE_PENDING));
        // Silent past the hold (a scrape that never returns): the GPUs decide.
        for t in 0..5 {
            f.collect(t);
        }
        assert_eq!(f.usable(4), Use::Lost);
        assert_eq!(s(f.usable(4)).1, SOURCE_FALLBACK);
        // A failure before any answer: nothing to hold.
        let mut f = Feed::default();
        answer(&f, down("connect"));
        f.collect(0);
        assert_eq!(f.usable(4), Use::Lost);
        let (sig, src) = s(f.usable(4));
        assert_eq!((sig[0].name, src), ("gpu_util", SOURCE_FALLBACK));
    }

    #[test]
    fn a_reload_keeps_the_feed_for_new_thresholds_not_for_a_new_server() {
        let f = Feed::new(&server());
        let mut s = server();
        s.queue_at = Some(4.0);
        s.timeout_ms = 100;
        assert!(f.serves(&s));
        s.kind = ServerKind::Sglang;
        s.names = ServerKind::Sglang.names().unwrap();
        assert!(!f.serves(&s));
        let mut s = server();
        s.url = HttpsUrl::parse_http_or_https("http://127.0.0.1:8001/metrics").unwrap();
        assert!(!f.serves(&s));
    }

    fn server() -> ModelServer {
        ModelServer {
            url: HttpsUrl::parse_http_or_https("http://127.0.0.1:8000/metrics").unwrap(),
            kind: ServerKind::Vllm,
            names: ServerKind::Vllm.names().unwrap(),
            queue_at: Some(16.0),
            kv_cache_at: Some(0.95),
            gpu_util: true,
            timeout_ms: 1000,
            fallback_intervals: 8,
        }
    }

    #[test]
    fn the_timeout_stays_below_the_interval() {
        let s = server();
        assert_eq!(s.timeout(250), Duration::from_millis(200));
        assert_eq!(s.timeout(5000), Duration::from_millis(1000));
    }

    /// Against a real socket: a server that accepts and never answers times out within the
    /// timeout; one that answers HTML is a parse failure; a closed port is `connect`.
    #[tokio::test(flavor = "current_thread")]
    async fn hanging_garbage_and_absent_servers_fail_with_their_labels() {
        use tokio::{io::AsyncWriteExt as _, net::TcpListener};
        let server = |port: u16| ModelServer {
            url: HttpsUrl::parse_http_or_https(&format!("http://127.0.0.1:{port}/metrics"))
                .unwrap(),
            kind: ServerKind::Vllm,
            names: ServerKind::Vllm.names().unwrap(),
            queue_at: Some(16.0),
            kv_cache_at: None,
            gpu_util: false,
            timeout_ms: 200,
            fallback_intervals: 1,
        };
        let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hang_port = hang.local_addr().unwrap().port();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = hang.accept().await {
                open.push(s);
            }
        });
        let t = std::time::Instant::now();
        let e = scrape(None, &server(hang_port), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(e.outcome, "timeout", "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));

        let html = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let html_port = html.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = html.accept().await {
                let body = "<html>oops</html>";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let e = scrape(None, &server(html_port), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.outcome, "parse", "{e}");

        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone_port = gone.local_addr().unwrap().port();
        drop(gone);
        let e = scrape(None, &server(gone_port), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.outcome, "connect", "{e}");
    }
}
