//! GPU saturation to per-plan hold-back. An endpoint is saturated while one of its GPUs is at
//! or above `saturate_at`; it recovers only after `recover_after` readings in a row at or
//! below `recover_at` on all of them, so a GPU hovering around the threshold cannot make the
//! limits flap. While saturated, a plan keeps a share of its budget that grows with its
//! priority: `floor + (1 - floor) * priority / 100`; priority 100 (internal traffic) keeps it
//! all, the free tier shrinks first. The kernel gets the inverse of that share as a cost
//! multiplier per (endpoint, plan).
//!
//! What "saturated" reads is the endpoint's pressure ([`combine`]): the largest of its
//! signals (model-server queue depth, KV-cache usage, GPU utilisation), each divided by its
//! own threshold, so 1.0 is "at a threshold" whichever signal got there. The hysteresis runs
//! on that number with the thresholds normalised the same way ([`PressureConfig::normalised`]):
//! with GPU utilisation alone it decides exactly as on the raw utilisation.

use tollgate_common::policy::Q8_ONE;

/// What the hysteresis needs from the configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PressureConfig {
    pub saturate_at: f64,
    pub recover_at: f64,
    pub recover_after: u32,
    pub floor: f64,
}

impl PressureConfig {
    /// The same hysteresis over pressures normalised to their thresholds: saturated at 1.0,
    /// calm at or below `recover_at / saturate_at` (0.75 / 0.9: 83% of every threshold).
    pub fn normalised(&self) -> PressureConfig {
        PressureConfig {
            saturate_at: 1.0,
            recover_at: self.recover_at / self.saturate_at,
            ..*self
        }
    }
}

/// One input of an endpoint's pressure.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Signal {
    /// `queue`, `kv_cache` or `gpu_util`.
    pub name: &'static str,
    pub value: f64,
    /// The value at which this signal alone saturates the endpoint.
    pub at: f64,
}

impl Signal {
    pub fn level(&self) -> f64 {
        self.value / self.at
    }
}

/// The endpoint's pressure and the signal that set it: the largest `value / at`; `None`
/// without a signal (then the endpoint is never held back, as with no GPU reading).
pub fn combine(signals: &[Signal]) -> Option<(f64, &'static str)> {
    signals
        .iter()
        .filter(|s| s.at > 0.0 && s.value.is_finite())
        .map(|s| (s.level(), s.name))
        .fold(None, |best, (l, n)| match best {
            Some((b, _)) if b >= l => best,
            _ => Some((l, n)),
        })
}

/// One endpoint's saturation state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Saturation {
    saturated: bool,
    calm: u32,
}

impl Saturation {
    /// Feeds the highest utilisation (0..=1) among the endpoint's GPUs, or `None` when there
    /// is no reading (no GPU, NVML gone): then the endpoint is never held back. Returns
    /// whether the state changed.
    pub fn update(&mut self, util: Option<f64>, cfg: &PressureConfig) -> bool {
        let before = self.saturated;
        match util {
            None => {
                self.saturated = false;
                self.calm = 0;
            }
            Some(u) if u >= cfg.saturate_at => {
                self.saturated = true;
                self.calm = 0;
            }
            Some(u) if self.saturated && u <= cfg.recover_at => {
                self.calm += 1;
                if self.calm >= cfg.recover_after {
                    self.saturated = false;
                    self.calm = 0;
                }
            }
            Some(_) => self.calm = 0,
        }
        self.saturated != before
    }

    pub fn saturated(&self) -> bool {
        self.saturated
    }
}

/// Share of its budget a plan of `priority` keeps (1.0 when not saturated).
pub fn share(priority: u8, saturated: bool, floor: f64) -> f64 {
    if !saturated {
        return 1.0;
    }
    let p = f64::from(priority.min(100)) / 100.0;
    (floor + (1.0 - floor) * p).clamp(floor, 1.0)
}

/// The kernel's Q8 multiplier for a share (cost grows as the share shrinks).
pub fn hold_back_q8(share: f64) -> u16 {
    if share >= 1.0 {
        return Q8_ONE;
    }
    crate::tables::to_q8(1.0 / share.max(1.0 / 255.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: PressureConfig = PressureConfig {
        saturate_at: 0.9,
        recover_at: 0.75,
        recover_after: 4,
        floor: 0.1,
    };

    /// Runs a recorded utilisation series; returns the saturation after each reading.
    fn run(series: &[f64]) -> Vec<bool> {
        let mut s = Saturation::default();
        series
            .iter()
            .map(|u| {
                s.update(Some(*u), &CFG);
                s.saturated()
            })
            .collect()
    }

    #[test]
    fn saturates_at_once_and_recovers_only_after_a_calm_stretch() {
        let got = run(&[0.5, 0.95, 0.7, 0.7, 0.7, 0.7, 0.7]);
        assert_eq!(got, [false, true, true, true, true, false, false]);
    }

    #[test]
    fn hovering_around_the_threshold_does_not_flap() {
        // A GPU at 85-95% for a minute of 250 ms readings: it saturates once and stays.
        let series: Vec<f64> = (0..240)
            .map(|i| if i % 3 == 0 { 0.95 } else { 0.85 })
            .collect();
        let got = run(&series);
        let changes = got.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 0, "flapped {changes} times");
        assert!(got[1..].iter().all(|s| *s));
    }

    #[test]
    fn a_single_calm_reading_does_not_release() {
        let got = run(&[0.95, 0.7, 0.95, 0.7, 0.7, 0.7, 0.95]);
        assert!(got.iter().all(|s| *s));
    }

    #[test]
    fn recorded_busy_day() {
        // Ramp up, a busy plateau with dips that do not last, then a real recovery.
        let mut series = vec![0.2, 0.4, 0.6, 0.8, 0.92];
        series.extend([0.96, 0.88, 0.78, 0.74, 0.91, 0.97, 0.8, 0.7, 0.72]);
        series.extend([0.6, 0.5, 0.4, 0.4, 0.3]);
        let got = run(&series);
        let first = got.iter().position(|s| *s).unwrap();
        let last = got.iter().rposition(|s| *s).unwrap();
        assert_eq!(first, 4);
        // Saturated from the first 0.92 until four readings at or below 0.75 in a row.
        assert!(got[first..=last].iter().all(|s| *s));
        assert_eq!(last, 14);
    }

    #[test]
    fn no_reading_means_no_hold_back() {
        let mut s = Saturation::default();
        s.update(Some(0.99), &CFG);
        assert!(s.update(None, &CFG));
        assert!(!s.saturated());
    }

    #[test]
    fn the_largest_signal_over_its_threshold_is_the_pressure() {
        // The worked example of docs/controller.md: 12 waiting against 16, KV at 0.93
        // against 0.95, GPU at 0.99 against 0.9: the GPU sets it, at 1.1.
        let s = |name, value, at| Signal { name, value, at };
        let (p, by) = combine(&[
            s("queue", 12.0, 16.0),
            s("kv_cache", 0.93, 0.95),
            s("gpu_util", 0.99, 0.9),
        ])
        .unwrap();
        assert!((p - 1.1).abs() < 1e-9 && by == "gpu_util", "{p} {by}");
        let (p, by) = combine(&[s("queue", 40.0, 16.0), s("gpu_util", 0.99, 0.9)]).unwrap();
        assert_eq!((p, by), (2.5, "queue"));
        assert_eq!(combine(&[]), None);
        assert_eq!(combine(&[s("queue", f64::NAN, 16.0)]), None);
    }

    #[test]
    fn normalised_hysteresis_decides_as_the_raw_utilisation_did() {
        // Every utilisation series decides the same whether fed raw against CFG or divided
        // by saturate_at against CFG.normalised().
        let series: Vec<f64> = (0..500).map(|i| ((i * 37) % 101) as f64 / 100.0).collect();
        let (mut raw, mut norm) = (Saturation::default(), Saturation::default());
        let n = CFG.normalised();
        for u in series {
            raw.update(Some(u), &CFG);
            norm.update(Some(u / CFG.saturate_at), &n);
            assert_eq!(raw.saturated(), norm.saturated(), "at {u}");
        }
    }

    #[test]
    fn shares_and_multipliers_by_priority() {
        assert_eq!(share(10, false, 0.1), 1.0);
        assert_eq!(share(100, true, 0.1), 1.0);
        assert!((share(0, true, 0.1) - 0.1).abs() < 1e-9);
        assert!((share(50, true, 0.1) - 0.55).abs() < 1e-9);
        assert_eq!(hold_back_q8(1.0), 256);
        assert_eq!(hold_back_q8(0.5), 512);
        assert_eq!(hold_back_q8(0.1), 2560);
        // Internal (100) keeps its rate; free (10) drops to 19%.
        assert_eq!(hold_back_q8(share(100, true, 0.1)), 256);
        assert_eq!(
            hold_back_q8(share(10, true, 0.1)),
            crate::tables::to_q8(1.0 / 0.19)
        );
    }
}
