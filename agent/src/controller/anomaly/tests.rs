//! The detector and the ladder, on synthetic series.
use super::*;

/// Recorded multiplicative noise, uniform in 0.9..=1.1 (both ends included), one value per
/// sample; each signal reads it at its own offset so the signals do not move in lockstep.
const NOISE: [f64; 240] = [
    0.965, 0.93, 1.03, 0.914, 1.007, 0.973, 0.912, 1.001, 0.907, 0.987, 0.914, 0.918, 0.985, 1.065,
    0.925, 0.945, 1.025, 1.1, 1.015, 0.979, 1.095, 0.909, 1.072, 0.958, 0.929, 0.924, 0.962, 1.063,
    0.936, 1.016, 1.028, 0.974, 1.01, 0.913, 0.912, 0.941, 1.036, 0.986, 0.963, 1.017, 0.9, 0.96,
    1.059, 1.04, 0.949, 1.015, 1.005, 1.075, 1.046, 0.958, 1.096, 0.924, 0.984, 1.051, 0.93, 0.998,
    0.908, 1.034, 1.053, 1.015, 1.075, 0.963, 1.039, 1.019, 1.016, 0.991, 1.068, 1.089, 0.995,
    1.033, 0.912, 1.04, 1.029, 1.099, 1.064, 0.957, 0.977, 1.034, 0.905, 0.992, 0.934, 0.923,
    0.912, 1.054, 0.926, 0.95, 0.978, 1.074, 1.1, 0.99, 1.01, 1.077, 1.064, 1.073, 0.956, 0.983,
    0.972, 1.077, 1.092, 0.93, 0.935, 0.946, 0.947, 0.997, 1.018, 0.953, 0.901, 0.984, 0.974,
    1.013, 1.091, 1.038, 1.003, 1.024, 1.035, 0.911, 1.08, 1.056, 1.075, 1.06, 0.978, 0.9, 0.921,
    1.027, 0.912, 0.913, 0.942, 0.932, 0.968, 0.911, 0.9, 0.93, 0.92, 0.973, 0.905, 1.075, 1.023,
    0.93, 0.95, 0.969, 0.973, 0.925, 1.07, 1.099, 0.993, 0.997, 0.917, 0.92, 0.969, 0.953, 1.1,
    0.932, 0.905, 1.09, 1.006, 0.929, 1.009, 0.905, 1.006, 1.096, 1.073, 1.039, 0.952, 0.973,
    0.933, 1.054, 1.007, 1.056, 0.966, 0.945, 1.062, 1.097, 1.071, 1.061, 1.064, 1.048, 0.945,
    1.004, 0.971, 0.906, 0.906, 0.956, 0.952, 1.039, 1.091, 0.989, 1.087, 1.098, 1.091, 0.973,
    0.944, 0.945, 0.939, 0.941, 1.025, 1.08, 1.068, 0.996, 1.031, 1.06, 0.9, 1.032, 1.082, 1.056,
    1.05, 0.996, 0.936, 1.058, 0.967, 1.06, 1.094, 0.979, 0.98, 1.089, 1.045, 0.934, 0.925, 0.93,
    1.081, 1.061, 0.929, 1.065, 1.096, 1.031, 0.97, 1.01, 0.926, 0.903, 1.094, 1.03, 1.005, 1.087,
    0.987, 1.074, 1.065, 0.942, 0.95, 0.959, 0.948, 1.017,
];

/// A ramp from 1x to 20x over 60 samples.
const RAMP_20X: [f64; 60] = [
    1.317, 1.633, 1.950, 2.267, 2.583, 2.900, 3.217, 3.533, 3.850, 4.167, 4.483, 4.800, 5.117,
    5.433, 5.750, 6.067, 6.383, 6.700, 7.017, 7.333, 7.650, 7.967, 8.283, 8.600, 8.917, 9.233,
    9.550, 9.867, 10.183, 10.500, 10.817, 11.133, 11.450, 11.767, 12.083, 12.400, 12.717, 13.033,
    13.350, 13.667, 13.983, 14.300, 14.617, 14.933, 15.250, 15.567, 15.883, 16.200, 16.517, 16.833,
    17.150, 17.467, 17.783, 18.100, 18.417, 18.733, 19.050, 19.367, 19.683, 20.000,
];

const T0: u64 = 1_700_000_000;

fn n(i: usize) -> f64 {
    NOISE[i % NOISE.len()]
}

/// An identity's normal traffic at sample `i`.
fn normal(i: usize) -> Sample {
    Sample {
        packets_per_s: 2000.0 * n(i),
        bytes_per_s: 2.0e6 * n(i + 7),
        new_flows_per_s: 20.0 * n(i + 13),
        small_packet_ratio: 0.1 * n(i + 29),
        drop_ratio: 0.01 * n(i + 53),
    }
}

/// Packets and bytes at `f` times normal.
fn volume(i: usize, f: f64) -> Sample {
    let s = normal(i);
    Sample {
        packets_per_s: s.packets_per_s * f,
        bytes_per_s: s.bytes_per_s * f,
        ..s
    }
}

fn cfg() -> Ladder {
    Ladder {
        alpha: 0.05,
        warmup_samples: 30,
        throttle_score: 6.0,
        quarantine_score: 12.0,
        throttle_for_s: 30,
        quarantine_for_s: 120,
        cooldown_s: 60,
        shadow: false,
    }
}

/// Feeds `series`, one sample a second from `T0 + first`, and collects the decisions
/// with their times.
fn feed(t: &mut Tracker, series: &[Sample], first: u64, cfg: &Ladder) -> Vec<(u64, Decision)> {
    let mut out = Vec::new();
    for (k, s) in series.iter().enumerate() {
        let now = T0 + first + k as u64;
        if let Some(d) = t.observe(*s, now, cfg) {
            out.push((now, d));
        }
    }
    out
}

fn steps(ds: &[(u64, Decision)]) -> Vec<Step> {
    ds.iter().map(|(_, d)| d.step).collect()
}

/// 120 normal samples, the ramp, 40 at 20x, 200 normal.
fn ramp_series() -> Vec<Sample> {
    let mut v: Vec<Sample> = (0..120).map(normal).collect();
    v.extend(
        RAMP_20X
            .iter()
            .enumerate()
            .map(|(k, &f)| volume(120 + k, f)),
    );
    v.extend((180..220).map(|i| volume(i, 20.0)));
    v.extend((220..420).map(normal));
    v
}

/// Runs the ramp, making the drops our own enforcement would cause: everything while
/// quarantined, half while throttled.
fn run_ramp(cfg: &Ladder) -> (Tracker, Vec<(u64, Decision)>, Vec<Step>) {
    let mut t = Tracker::default();
    let mut out = Vec::new();
    let mut enforced = Vec::new();
    for (k, s) in ramp_series().into_iter().enumerate() {
        let now = T0 + k as u64;
        let drop_ratio = match t.step() {
            Step::Quarantine => 1.0,
            Step::Throttle => 0.5,
            _ => s.drop_ratio,
        };
        if let Some(d) = t.observe(Sample { drop_ratio, ..s }, now, cfg) {
            out.push((now, d));
        }
        enforced.push(t.step());
    }
    (t, out, enforced)
}

#[test]
fn steady_noisy_traffic_triggers_nothing() {
    let cfg = cfg();
    let mut t = Tracker::default();
    let mut max_score: f64 = 0.0;
    for i in 0..240 {
        let d = t.observe(normal(i), T0 + i as u64, &cfg);
        assert_eq!(d, None, "false positive at sample {i}");
        if i >= 30 {
            max_score = max_score.max(t.score());
        }
    }
    assert_eq!(t.step(), Step::Observe);
    assert!(max_score < 3.0, "±10% noise scored {max_score}");
    let b = t.baseline();
    assert!((b.packets_per_s / 2000.0 - 1.0).abs() < 0.05, "{b:?}");
    assert!((b.small_packet_ratio / 0.1 - 1.0).abs() < 0.05, "{b:?}");
}

#[test]
fn ramp_throttles_then_quarantines_then_releases() {
    let cfg = cfg();
    let (t, ds, _) = run_ramp(&cfg);
    assert_eq!(
        steps(&ds),
        [
            Step::Throttle,
            Step::Quarantine,
            Step::Release,
            Step::Observe
        ],
        "{ds:#?}"
    );
    let (t_thr, thr) = &ds[0];
    assert!(
        (120..125).contains(&(t_thr - T0)),
        "throttled at {}",
        t_thr - T0
    );
    assert_eq!(thr.until_unix_s, Some(t_thr + cfg.throttle_for_s));
    assert!(thr.score >= cfg.throttle_score && thr.score < cfg.quarantine_score);
    assert!(thr.reason.contains("packets_per_s"), "{}", thr.reason);
    assert!(!thr.shadow);

    let (t_q, q) = &ds[1];
    assert!(
        *t_q < t_thr + cfg.throttle_for_s,
        "quarantined by score, before expiry"
    );
    assert!(q.score >= cfg.quarantine_score);
    assert!(q.reason.contains("while throttled"), "{}", q.reason);
    assert_eq!(q.until_unix_s, Some(t_q + cfg.quarantine_for_s));

    // Released exactly at expiry: traffic was back to normal, and the quarantine's own
    // drops (ratio 1) did not count against it.
    let (t_rel, rel) = &ds[2];
    assert_eq!(*t_rel, t_q + cfg.quarantine_for_s);
    assert_eq!(rel.inputs.drop_ratio, 1.0);
    assert!(rel.score < cfg.throttle_score);
    assert_eq!(rel.until_unix_s, Some(t_rel + cfg.cooldown_s));
    assert_eq!(t.last_release(), Some(*t_rel));

    let (t_obs, obs) = &ds[3];
    assert_eq!(*t_obs, t_rel + cfg.cooldown_s);
    assert_eq!(obs.until_unix_s, None);
    assert_eq!(t.step(), Step::Observe);
}

#[test]
fn shadow_reports_the_same_decisions_and_enforces_nothing() {
    let (_, real, _) = run_ramp(&cfg());
    let shadow_cfg = Ladder {
        shadow: true,
        ..cfg()
    };
    let (t, shadow, enforced) = run_ramp(&shadow_cfg);
    assert!(enforced.iter().all(|&s| s == Step::Observe), "{enforced:?}");
    assert_eq!(t.step(), Step::Observe);
    assert_eq!(real.len(), shadow.len());
    for ((tr, r), (ts, s)) in real.iter().zip(&shadow) {
        assert_eq!(tr, ts);
        assert!(!r.shadow && s.shadow);
        // Shadow mode causes no drops, so only the inputs' drop ratio may differ.
        assert_eq!(
            (r.step, r.until_unix_s, r.score, &r.reason, r.baseline),
            (s.step, s.until_unix_s, s.score, &s.reason, s.baseline)
        );
    }
}

#[test]
fn a_ladder_keeps_the_mode_it_began_in() {
    let mut t = Tracker::default();
    feed(&mut t, &(0..60).map(normal).collect::<Vec<_>>(), 0, &cfg());
    let shadow_cfg = Ladder {
        shadow: true,
        ..cfg()
    };
    let d = t.observe(volume(60, 5.0), T0 + 60, &cfg()).unwrap();
    assert_eq!((d.step, d.shadow), (Step::Throttle, false));
    // Turning shadow on does not hide the throttle in force, nor its end.
    assert_eq!(t.step(), Step::Throttle);
    let d = t.observe(normal(61), T0 + 90, &shadow_cfg).unwrap();
    assert_eq!((d.step, d.shadow), (Step::Release, false));
    let d = t.observe(normal(62), T0 + 150, &shadow_cfg).unwrap();
    assert_eq!((d.step, d.shadow), (Step::Observe, false));
    // The next ladder is a shadow one.
    let d = t.observe(volume(63, 5.0), T0 + 151, &shadow_cfg).unwrap();
    assert_eq!((d.step, d.shadow), (Step::Throttle, true));
    assert_eq!(t.step(), Step::Observe);
    assert_eq!(t.decided_step(), Step::Throttle);
}

#[test]
fn no_action_during_warmup() {
    let cfg = cfg();
    // A flood inside warm-up is learned, not acted on.
    let mut t = Tracker::default();
    let mut series: Vec<Sample> = (0..10).map(normal).collect();
    series.extend((10..30).map(|i| volume(i, 20.0)));
    assert!(feed(&mut t, &series, 0, &cfg).is_empty());
    assert_eq!(t.samples(), 30);
    assert_eq!(t.step(), Step::Observe);

    // The 30th sample is still warm-up; the 31st may act.
    let mut t = Tracker::default();
    feed(&mut t, &(0..29).map(normal).collect::<Vec<_>>(), 0, &cfg);
    assert_eq!(t.observe(volume(29, 20.0), T0 + 29, &cfg), None);
    let mut t = Tracker::default();
    feed(&mut t, &(0..30).map(normal).collect::<Vec<_>>(), 0, &cfg);
    let d = t.observe(volume(30, 20.0), T0 + 30, &cfg).unwrap();
    assert_eq!(d.step, Step::Throttle);
}

#[test]
fn baseline_does_not_learn_during_throttle_or_quarantine() {
    let cfg = cfg();
    let mut t = Tracker::default();
    let series = ramp_series();
    let mut frozen: Option<(Sample, u64)> = None;
    for (k, s) in series.iter().enumerate() {
        let d = t.observe(*s, T0 + k as u64, &cfg);
        if let Some(d) = &d
            && d.step == Step::Throttle
        {
            assert_eq!(
                d.baseline,
                t.baseline(),
                "the triggering sample is not learned"
            );
            frozen = Some((t.baseline(), t.samples()));
        }
        if matches!(t.step(), Step::Throttle | Step::Quarantine) {
            assert_eq!(Some((t.baseline(), t.samples())), frozen, "sample {k}");
        }
        if d.is_some_and(|d| d.step == Step::Release) {
            break;
        }
    }
    let (before, _) = frozen.expect("throttled");
    assert!(
        (before.packets_per_s / 2000.0 - 1.0).abs() < 0.1,
        "{before:?}"
    );
}

#[test]
fn cooldown_takes_no_action_and_learns_no_attack() {
    let cfg = cfg();
    let (mut t, ds, _) = run_ramp(&cfg);
    let (t_rel, _) = ds[2];
    let mut t2 = Tracker::default();
    // Replay up to and including the release, then attack during the cooldown.
    let series = ramp_series();
    for (k, s) in series.iter().enumerate().take((t_rel - T0) as usize + 1) {
        t2.observe(*s, T0 + k as u64, &cfg);
    }
    assert_eq!(t2.step(), Step::Release);
    let before = (t2.baseline(), t2.samples());
    for k in 1..cfg.cooldown_s {
        assert_eq!(t2.observe(volume(k as usize, 20.0), t_rel + k, &cfg), None);
    }
    assert_eq!((t2.baseline(), t2.samples()), before);
    let d = t2
        .observe(volume(0, 20.0), t_rel + cfg.cooldown_s, &cfg)
        .unwrap();
    assert_eq!(d.step, Step::Observe);
    let d = t2
        .observe(volume(1, 20.0), t_rel + cfg.cooldown_s + 1, &cfg)
        .unwrap();
    assert_eq!(d.step, Step::Throttle);
    // The first run ended in Observe and stays quiet on normal traffic.
    assert!(
        feed(
            &mut t,
            &(0..100).map(normal).collect::<Vec<_>>(),
            1000,
            &cfg
        )
        .is_empty()
    );
}

#[test]
fn persistent_anomaly_escalates_at_expiry_and_renews_quarantine() {
    let cfg = cfg();
    let mut t = Tracker::default();
    feed(&mut t, &(0..100).map(normal).collect::<Vec<_>>(), 0, &cfg);
    // 1.9x packets and bytes: above throttle_score, below quarantine_score.
    let high: Vec<Sample> = (100..400).map(|i| volume(i, 1.9)).collect();
    let ds = feed(&mut t, &high, 100, &cfg);
    let s = steps(&ds);
    assert_eq!(
        s[..3],
        [Step::Throttle, Step::Quarantine, Step::Quarantine],
        "{ds:#?}"
    );
    let (t_thr, _) = ds[0];
    assert_eq!(t_thr, T0 + 100);
    assert_eq!(ds[1].0, t_thr + cfg.throttle_for_s);
    assert!(
        ds[1]
            .1
            .reason
            .contains("still anomalous when the throttle expired")
    );
    assert_eq!(ds[2].0, ds[1].0 + cfg.quarantine_for_s);
    assert!(ds[2].1.reason.contains("quarantine expired"));
    assert_eq!(ds[2].1.until_unix_s, Some(ds[2].0 + cfg.quarantine_for_s));
    // Back to normal: released at the next expiry.
    let until = t.until().unwrap();
    let ds = feed(&mut t, &(0..200).map(normal).collect::<Vec<_>>(), 400, &cfg);
    assert_eq!(ds[0].1.step, Step::Release);
    assert_eq!(ds[0].0, until);
}

#[test]
fn syn_flood_is_detected() {
    let cfg = cfg();
    let mut t = Tracker::default();
    feed(&mut t, &(0..120).map(normal).collect::<Vec<_>>(), 0, &cfg);
    // New flows x50 with bytes and packets as usual.
    let flood: Vec<Sample> = (120..130)
        .map(|i| Sample {
            new_flows_per_s: 20.0 * 50.0 * n(i),
            ..normal(i)
        })
        .collect();
    let ds = feed(&mut t, &flood, 120, &cfg);
    // SYNs are what an off-path spoofer forges from a bound address (#12 finding 5): they
    // throttle, and the throttle is renewed while they last, but never quarantine.
    assert_eq!(ds[0].1.step, Step::Throttle, "{ds:#?}");
    assert!(
        ds.iter().all(|(_, d)| d.step == Step::Throttle),
        "a SYN flood must never quarantine: {ds:#?}"
    );
    assert_eq!(ds[0].0, T0 + 120, "detected on the first sample");
    assert!(
        ds[0].1.reason.contains("new_flows_per_s"),
        "{}",
        ds[0].1.reason
    );
    assert!(
        !ds[0].1.reason.contains("bytes_per_s"),
        "{}",
        ds[0].1.reason
    );
}

#[test]
fn small_packet_flood_is_detected() {
    let cfg = cfg();
    let mut t = Tracker::default();
    feed(&mut t, &(0..120).map(normal).collect::<Vec<_>>(), 0, &cfg);
    let flood: Vec<Sample> = (120..130)
        .map(|i| Sample {
            small_packet_ratio: 0.9,
            ..normal(i)
        })
        .collect();
    let ds = feed(&mut t, &flood, 120, &cfg);
    assert_eq!(ds[0].0, T0 + 120);
    assert_eq!(ds[0].1.step, Step::Throttle);
    assert!(ds[0].1.reason.starts_with("score"), "{}", ds[0].1.reason);
    assert!(
        ds[0]
            .1
            .reason
            .contains("small_packet_ratio 0.900 vs baseline 0.09"),
        "{}",
        ds[0].1.reason
    );
}

#[test]
fn falling_traffic_is_not_an_anomaly() {
    let cfg = cfg();
    let mut t = Tracker::default();
    feed(&mut t, &(0..120).map(normal).collect::<Vec<_>>(), 0, &cfg);
    assert_eq!(t.observe(Sample::default(), T0 + 120, &cfg), None);
    assert_eq!(t.score(), 0.0);
}

#[test]
fn silent_identity_expires_without_learning() {
    let cfg = cfg();
    let mut t = Tracker::default();
    feed(&mut t, &(0..60).map(normal).collect::<Vec<_>>(), 0, &cfg);
    let d = t.observe(volume(60, 5.0), T0 + 60, &cfg).unwrap();
    assert_eq!(d.step, Step::Throttle);
    let before = (t.baseline(), t.samples());
    assert_eq!(t.expire(T0 + 89, &cfg), None);
    let d = t.expire(T0 + 90, &cfg).unwrap();
    assert_eq!((d.step, d.until_unix_s), (Step::Release, Some(T0 + 150)));
    assert_eq!(t.expire(T0 + 149, &cfg), None);
    assert_eq!(t.expire(T0 + 150, &cfg).unwrap().step, Step::Observe);
    assert_eq!(t.expire(T0 + 151, &cfg), None);
    assert_eq!((t.baseline(), t.samples()), before);
}

#[test]
fn bad_numbers_do_not_poison_the_baseline() {
    let cfg = cfg();
    let mut t = Tracker::default();
    feed(&mut t, &(0..60).map(normal).collect::<Vec<_>>(), 0, &cfg);
    let bad = Sample {
        packets_per_s: f64::NAN,
        bytes_per_s: f64::INFINITY,
        new_flows_per_s: -5.0,
        small_packet_ratio: 7.0,
        drop_ratio: f64::NEG_INFINITY,
    };
    let d = t.observe(bad, T0 + 60, &cfg).unwrap();
    // The ratio, held to 1, is a real rise; the rest count as 0.
    assert_eq!(
        d.inputs,
        Sample {
            small_packet_ratio: 1.0,
            ..Sample::default()
        }
    );
    assert!(t.score().is_finite());
    let b = t.baseline();
    assert!(b.to_array().iter().all(|v| v.is_finite()), "{b:?}");
}

#[test]
fn tracker_survives_serialization() {
    let cfg = cfg();
    let (_, ds, _) = run_ramp(&cfg);
    let mut t = Tracker::default();
    let series = ramp_series();
    let t_q = ds[1].0;
    for (k, s) in series.iter().enumerate().take((t_q - T0) as usize + 1) {
        t.observe(*s, T0 + k as u64, &cfg);
    }
    assert_eq!(t.step(), Step::Quarantine);
    let json = serde_json::to_string(&t).unwrap();
    let mut back: Tracker = serde_json::from_str(&json).unwrap();
    // JSON may move a float by its last bit; the ladder and the baseline come back.
    assert_eq!(
        (
            back.step(),
            back.until(),
            back.samples(),
            back.last_release()
        ),
        (t.step(), t.until(), t.samples(), t.last_release())
    );
    let (x, y) = (t.baseline().to_array(), back.baseline().to_array());
    for (x, y) in x.iter().zip(&y) {
        assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{x} {y}");
    }
    let rest = &series[(t_q - T0) as usize + 1..];
    let when = |ds: Vec<(u64, Decision)>| -> Vec<(u64, Step, Option<u64>)> {
        ds.into_iter()
            .map(|(t, d)| (t, d.step, d.until_unix_s))
            .collect()
    };
    let a = when(feed(&mut t, rest, t_q - T0 + 1, &cfg));
    let b = when(feed(&mut back, rest, t_q - T0 + 1, &cfg));
    assert_eq!(a, b);
    assert_eq!(
        a.iter().map(|x| x.1).collect::<Vec<_>>(),
        [Step::Release, Step::Observe]
    );
}

#[test]
fn config_validation() {
    for class in [Class::Internal, Class::Partner, Class::Customer] {
        assert_eq!(Anomaly::default().ladder(class).validate(), Ok(()));
    }
    assert_eq!(cfg().validate(), Ok(()));
    for bad in [
        Ladder {
            alpha: 0.0,
            ..cfg()
        },
        Ladder {
            alpha: f64::NAN,
            ..cfg()
        },
        Ladder {
            throttle_score: -1.0,
            ..cfg()
        },
        Ladder {
            quarantine_score: 3.0,
            ..cfg()
        },
        Ladder {
            quarantine_for_s: 0,
            ..cfg()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// A withheld quarantine leaves the identity throttled, is not retried before the throttle
/// expires (so the kernel's connections are read at most once per `throttle_for_s`), is
/// retried then, reports news only when the reason changes, and is forgotten at release.
#[test]
fn a_withheld_quarantine_stays_a_throttle_until_its_expiry() {
    let cfg = cfg();
    let mut t = Tracker::default();
    feed(&mut t, &(0..60).map(normal).collect::<Vec<_>>(), 0, &cfg);
    let mut now = T0 + 60;
    let d = t.observe(volume(60, 20.0), now, &cfg).expect("throttle");
    assert_eq!(d.step, Step::Throttle);
    now += 1;
    let mut d = t.observe(volume(61, 20.0), now, &cfg).expect("escalation");
    assert_eq!(d.step, Step::Quarantine);
    assert!(t.withhold(&mut d, Hold::NotItsConnections, "20 of 5000", now, &cfg));
    assert_eq!(
        (d.step, t.step(), t.held()),
        (
            Step::Throttle,
            Step::Throttle,
            Some(Hold::NotItsConnections)
        )
    );
    assert_eq!(d.until_unix_s, Some(now + cfg.throttle_for_s));
    assert!(
        d.reason
            .starts_with("quarantine withheld (not_its_connections: 20 of 5000)"),
        "{}",
        d.reason
    );
    // Still flooding: no new escalation until the throttle it was given expires.
    let until = now + cfg.throttle_for_s;
    for k in 1..cfg.throttle_for_s {
        assert_eq!(
            t.observe(volume(61 + k as usize, 20.0), now + k, &cfg),
            None,
            "at +{k}"
        );
    }
    let mut d = t
        .observe(volume(200, 20.0), until, &cfg)
        .expect("retry at expiry");
    assert_eq!(d.step, Step::Quarantine);
    // The same reason again is no news; another is.
    assert!(!t.withhold(&mut d.clone(), Hold::NotItsConnections, "x", until, &cfg));
    assert!(t.withhold(&mut d, Hold::Capped, "16 in force", until, &cfg));
    // Back to normal: released at expiry, and the hold goes with the episode.
    let end = until + cfg.throttle_for_s;
    let d = t.observe(normal(300), end, &cfg).expect("release");
    assert_eq!(d.step, Step::Release);
    assert_eq!(t.held(), None);
}

#[test]
fn the_cap_and_the_handshake_rule_are_validated_and_default_on() {
    let d = Anomaly::default();
    assert_eq!((d.max_auto_quarantines, d.require_handshake), (16, true));
    let base = "[node]\ninterfaces = [\"eth0\"]\n\n[[plans]]\nname = \"free\"\n\n[anomaly]\n";
    let parse = |extra: &str| crate::config::Config::parse(&format!("{base}{extra}"), "t.toml");
    let c = parse("max_auto_quarantines = 0\nrequire_handshake = false\n").expect("valid");
    assert_eq!(
        (c.anomaly.max_auto_quarantines, c.anomaly.require_handshake),
        (0, false)
    );
    for (bad, says) in [
        (
            "max_auto_quarantines = -1\n",
            "anomaly.max_auto_quarantines",
        ),
        (
            "max_auto_quarantines = 20000000\n",
            "between 0 and 16777216",
        ),
        ("require_handshake = \"yes\"\n", "require_handshake"),
    ] {
        let e = parse(bad).expect_err(bad).to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
}
