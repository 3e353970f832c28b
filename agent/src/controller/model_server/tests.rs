//! Each server's exposition as that server writes it. Where each text comes from:
//!
//! - `vllm.txt`: vLLM V1's PrometheusStatLogger (vllm/v1/metrics/loggers.py): gauges with
//!   `engine` and `model_name` labels, `.0` floats from prometheus_client, histograms, the
//!   `cache_config_info` info gauge, python_gc_* process metrics.
//! - `vllm-v0.txt`: vLLM before 0.10 (vllm/engine/metrics.py), whose KV gauge is
//!   `vllm:gpu_cache_usage_perc`, labels `model_name` only.
//! - `tgi.txt`: text-generation-inference's router through metrics-exporter-prometheus:
//!   `# TYPE` lines without `# HELP`, integer values, summaries with quantiles.
//! - `triton.txt`: Triton's docs/user_guide/metrics.md: per `model`/`version` series, an
//!   ensemble and its TensorRT-LLM model side by side, the `nv_gpu_utilization` GPU gauge.
//! - `sglang.txt`: sglang docs/references/production_metrics.md's example (`1e+06` floats,
//!   `model_name` label), with the queue and running gauges of srt/metrics/collector.py.
//! - `llamacpp.txt`: llama.cpp server's `GET /metrics` (tools/server/server.cpp): no labels.

use super::*;

fn names(kind: ServerKind) -> MetricNames {
    kind.names().expect("a known kind")
}

fn read(kind: ServerKind, text: &str) -> ModelReading {
    parse(text, &names(kind)).unwrap_or_else(|e| panic!("{kind:?}: {e}"))
}

#[test]
fn vllm_current_names() {
    let r = read(ServerKind::Vllm, include_str!("fixtures/vllm.txt"));
    assert_eq!(r.queue, Some(7.0));
    assert_eq!(r.running, Some(24.0));
    assert_eq!(r.kv_cache, Some(0.8125));
    assert!(r.metrics.contains(&"vllm:kv_cache_usage_perc".to_owned()));
}

#[test]
fn vllm_before_0_10_reads_the_old_kv_name() {
    let r = read(ServerKind::Vllm, include_str!("fixtures/vllm-v0.txt"));
    assert_eq!(
        (r.queue, r.running, r.kv_cache),
        (Some(2.0), Some(3.0), Some(0.37))
    );
    assert!(r.metrics.contains(&"vllm:gpu_cache_usage_perc".to_owned()));
}

#[test]
fn tgi_has_a_queue_and_no_kv_gauge() {
    let r = read(ServerKind::Tgi, include_str!("fixtures/tgi.txt"));
    assert_eq!(
        (r.queue, r.running, r.kv_cache),
        (Some(12.0), Some(32.0), None)
    );
}

#[test]
fn triton_sums_the_pending_requests_of_every_model() {
    let r = read(ServerKind::Triton, include_str!("fixtures/triton.txt"));
    assert_eq!(r.queue, Some(10.0));
    assert_eq!(r.kv_cache, None);
    assert_eq!(r.queue_duration_us, Some(921_947.0));
}

#[test]
fn sglang_queue_and_token_usage() {
    let r = read(ServerKind::Sglang, include_str!("fixtures/sglang.txt"));
    assert_eq!(
        (r.queue, r.running, r.kv_cache),
        (Some(31.0), Some(28.0), Some(0.28))
    );
}

#[test]
fn llamacpp_deferred_and_kv_ratio() {
    let r = read(ServerKind::Llamacpp, include_str!("fixtures/llamacpp.txt"));
    assert_eq!(
        (r.queue, r.running, r.kv_cache),
        (Some(3.0), Some(4.0), Some(0.640625))
    );
}

#[test]
fn several_engines_sum_their_queues_and_the_fullest_cache_counts() {
    let text = "\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"a\"} 3.0
vllm:num_requests_waiting{engine=\"1\",model_name=\"a\"} 5.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"a\"} 0.5
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"a\"} 0.9
";
    let r = read(ServerKind::Vllm, text);
    assert_eq!((r.queue, r.kv_cache), (Some(8.0), Some(0.9)));
}

#[test]
fn a_kind_that_does_not_match_the_server_says_so() {
    let e = parse(include_str!("fixtures/tgi.txt"), &names(ServerKind::Vllm)).unwrap_err();
    assert!(matches!(e, ParseError::NoMetric(_)), "{e}");
    assert!(e.to_string().contains("vllm:num_requests_waiting"), "{e}");
    assert!(e.to_string().contains("is the kind right"), "{e}");
}

#[test]
fn garbage_is_refused_not_read_as_zero() {
    for text in [
        "<html><body>502 Bad Gateway</body></html>",
        "{\"queue\": 7}",
        "vllm:num_requests_waiting{engine=\"0\" 7.0",
        "vllm:num_requests_waiting seven",
        "\u{0}\u{1}\u{2}",
    ] {
        let e = parse(text, &names(ServerKind::Vllm)).unwrap_err();
        assert!(
            matches!(e, ParseError::NotPrometheus(_) | ParseError::NoMetric(_)),
            "{text:?}: {e}"
        );
    }
    // An error quoting a huge line is cut short.
    let huge = format!("vllm:num_requests_waiting{{x=\"{}", "a".repeat(100_000));
    let e = parse(&huge, &names(ServerKind::Vllm))
        .unwrap_err()
        .to_string();
    assert!(e.len() < 1000, "{} bytes", e.len());
}

#[test]
fn impossible_values_are_refused() {
    for (text, what) in [
        ("vllm:num_requests_waiting -1\n", "non-negative"),
        ("vllm:num_requests_waiting NaN\n", "finite"),
        ("vllm:num_requests_waiting +Inf\n", "finite"),
        ("vllm:kv_cache_usage_perc 81.25\n", "kv_cache_scale"),
        (
            "vllm:num_requests_waiting{e=\"0\"} 1e308\nvllm:num_requests_waiting{e=\"1\"} 1e308\n",
            "add up past any number",
        ),
        ("vllm:num_requests_waiting 1234", "cut short"),
    ] {
        let e = parse(text, &names(ServerKind::Vllm))
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{text:?}: {e}");
    }
}

#[test]
fn a_custom_mapping_with_a_percentage_scale() {
    let names = MetricNames {
        queue: vec!["my_server_queue_depth".into()],
        running: vec![],
        kv_cache: vec!["my_server_kv_percent".into()],
        kv_cache_scale: 0.01,
    };
    let text = "\
# HELP my_server_queue_depth Requests waiting
# TYPE my_server_queue_depth gauge
my_server_queue_depth{pool=\"a\"} 4
my_server_queue_depth{pool=\"b\"} 2
# TYPE my_server_kv_percent gauge
my_server_kv_percent 81.25
";
    let r = parse(text, &names).unwrap();
    assert_eq!((r.queue, r.kv_cache), (Some(6.0), Some(0.8125)));
}

#[test]
fn untyped_samples_and_escaped_labels_are_read() {
    // No # TYPE line (untyped), a label value with an escaped quote, brace and newline.
    let text = "sglang:num_queue_reqs{model_name=\"a \\\"b\\\" {c}\\n\"} 9\n";
    let r = read(ServerKind::Sglang, text);
    assert_eq!(r.queue, Some(9.0));
}

#[test]
fn kinds_round_trip_their_labels() {
    for k in ServerKind::ALL {
        assert_eq!(ServerKind::from_label(k.label()), Some(k));
        assert_eq!(k.names().is_none(), k == ServerKind::Custom);
    }
    assert_eq!(ServerKind::from_label("VLLM"), None);
}

#[test]
fn families_the_agent_does_not_read_cannot_spoil_the_reading() {
    // A malformed histogram, a duplicate series and an unknown type, all in families no
    // signal is read from.
    let text = "\
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\"} 3
vllm:e2e_request_latency_seconds_bucket{le=\"0.1\"} 9
# TYPE build_info info
build_info{version=\"1\"} 1
dup_total 1
dup_total 2
vllm:num_requests_waiting{engine=\"0\"} 5
vllm:num_requests_running{engine=\"0\"} NaN
";
    let r = read(ServerKind::Vllm, text);
    assert_eq!(r.queue, Some(5.0));
    assert_eq!(
        r.running, None,
        "a NaN in a shown-only metric is left out, not fatal"
    );
}

#[test]
fn an_exposition_with_a_huge_family_is_refused_in_linear_time() {
    // 4 MiB of one family: the parser's per-family cost is quadratic in its series, so the
    // series are counted (linearly) and refused before it runs.
    let mut text = String::with_capacity(4 << 20);
    let mut i = 0u64;
    while text.len() < (4 << 20) - 100 {
        text.push_str(&format!("vllm:num_requests_waiting{{engine=\"{i}\"}} 1\n"));
        i += 1;
    }
    let t = std::time::Instant::now();
    let e = parse(&text, &names(ServerKind::Vllm)).unwrap_err();
    assert!(matches!(e, ParseError::TooManySeries(_)), "{e}");
    assert!(e.to_string().contains("more than 1024 series"), "{e}");
    eprintln!("refused {i} series in {:?}", t.elapsed());
    // The same size in families nobody reads costs one pass and no parse.
    let other = text.replace("vllm:num_requests_waiting", "python_gc_objects_total");
    let e = parse(&other, &names(ServerKind::Vllm)).unwrap_err();
    assert!(matches!(e, ParseError::NoMetric(_)), "{e}");
}
