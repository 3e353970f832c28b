//! Per-identity anomaly detection and the response ladder the controller drives with it.
//!
//! Each identity's traffic is summarised every control interval as a [`Sample`]. A
//! [`Tracker`] keeps an exponentially weighted mean and variance of each signal (the
//! baseline) and scores every sample by how far it rises above it:
//!
//! - Per signal, the deviation is `(x - mean) / scale` with `scale = max(std, 10% of mean,
//!   an absolute floor for the signal)`. The floors stop a perfectly steady baseline (std
//!   near 0) from turning a tiny change into a huge deviation, and stop a nearly idle identity
//!   from being "anomalous" at a handful of packets.
//! - Only rises count: falling traffic is not an attack on anyone.
//! - The score is the maximum over signals, not a sum: each signal catches a different
//!   attack (a SYN flood moves only new flows, a small-packet flood the ratio and packets
//!   but not bytes), and a sum would dilute a one-signal attack with the steady signals while
//!   double counting signals that move together in a legitimate surge (packets and bytes).
//!   The maximum also keeps the score in "deviations" so thresholds read plainly.
//!
//! The ladder, each step expiring by itself:
//!
//! - Observe → Throttle when the score reaches `throttle_score` (always Throttle first, even
//!   for a huge score: one odd sample must not cut a customer off; a real flood reaches
//!   Quarantine on the next sample).
//! - Throttle → Quarantine when the *quarantine score* reaches `quarantine_score`, or when
//!   the throttle expires and the quarantine score is still at `throttle_score` or above.
//!   The quarantine score leaves out what an off-path spoofer forges from a bound address
//!   without ever seeing a reply (#12 finding 5): SYNs (`new_flows_per_s`), the small-frame
//!   ratio, bytes (a SYN may carry any payload), and SYNs in the packet rate. It is the
//!   deviation of the non-SYN packet rate. A rise on forgeable signals alone may only
//!   throttle: at the throttle's expiry it is renewed, never escalated.
//!   A Quarantine decided here is a proposal: the control loop imposes it only with the
//!   kernel's evidence that the identity's own TCP connections carried its flood and under
//!   `max_auto_quarantines` (`controller::handshakes`); otherwise [`Tracker::withhold`] turns
//!   it into a renewed Throttle, retried only when that throttle expires.
//! - Quarantine at expiry: the quarantine score still anomalous → Quarantine again (a new
//!   decision, with a new `until`); otherwise → Release.
//! - Throttle at expiry, back to normal → Release.
//! - Release → Observe after `cooldown_s`, during which no new action is taken.
//!
//! The baseline learns only from samples taken as normal: never while throttled or
//! quarantined (it would learn the attack and release it), and during the cooldown only
//! samples below `throttle_score`. During warm-up it learns everything and acts on nothing.
//!
//! While throttled or quarantined the drop ratio leaves the score: it measures our own
//! response (a quarantined identity's drop ratio is 1 by construction), and counting it would
//! keep the identity from ever being released.

use serde::{Deserialize, Serialize};
use tollgate_common::policy::Class;

/// One identity's traffic over one control interval. Rates count what arrived, before the
/// verdict, so a throttled or quarantined identity's samples still show what it sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
    /// TCP SYNs.
    pub new_flows_per_s: f64,
    /// Fraction of packets that are small (headers and little payload), 0..=1.
    pub small_packet_ratio: f64,
    /// Fraction of packets dropped, 0..=1.
    pub drop_ratio: f64,
}

const SIGNALS: usize = 5;
const NAMES: [&str; SIGNALS] = [
    "packets_per_s",
    "bytes_per_s",
    "new_flows_per_s",
    "small_packet_ratio",
    "drop_ratio",
];
const DROP: usize = 4;
/// The least deviation scale per signal, in the signal's units: below these a change is too
/// small to act on whatever the baseline's variance.
const ABS_FLOOR: [f64; SIGNALS] = [50.0, 64.0 * 1024.0, 5.0, 0.05, 0.05];
/// The least deviation scale relative to the mean.
const REL_FLOOR: f64 = 0.10;

impl Sample {
    fn to_array(self) -> [f64; SIGNALS] {
        [
            self.packets_per_s,
            self.bytes_per_s,
            self.new_flows_per_s,
            self.small_packet_ratio,
            self.drop_ratio,
        ]
    }

    fn from_array(a: [f64; SIGNALS]) -> Sample {
        Sample {
            packets_per_s: a[0],
            bytes_per_s: a[1],
            new_flows_per_s: a[2],
            small_packet_ratio: a[3],
            drop_ratio: a[4],
        }
    }

    /// A NaN or infinity would poison the baseline for good, so they (and negative rates,
    /// from a counter reset) count as 0; ratios are held to 0..=1.
    fn sanitized(self) -> Sample {
        let mut a = self.to_array();
        for (i, v) in a.iter_mut().enumerate() {
            if !v.is_finite() || *v < 0.0 {
                *v = 0.0;
            }
            if i >= 3 {
                *v = v.min(1.0);
            }
        }
        Sample::from_array(a)
    }
}

/// The `[anomaly]` section of the configuration: the only definition of these knobs and,
/// in [`Anomaly::default`], of their defaults (docs/config.md's default column is checked
/// against it).
#[derive(Clone, Debug, PartialEq)]
pub struct Anomaly {
    pub mode: AnomalyMode,
    /// EWMA weight of a new sample, e.g. 0.05.
    pub alpha: f64,
    /// No action before this many samples are in the baseline.
    pub warmup_samples: u32,
    /// Cost multiplier while throttled.
    pub throttle_factor: f64,
    pub throttle_for_s: u64,
    pub quarantine_for_s: u64,
    /// After a release, before a new action.
    pub cooldown_s: u64,
    /// (throttle score, quarantine score) for internal, partner, customer.
    pub thresholds: [(f64, f64); 3],
    /// Automatic quarantines in force at once on this node; past it the ladder throttles
    /// only (`quarantine_capped`). Operator quarantines neither count nor are limited.
    pub max_auto_quarantines: u32,
    /// Quarantine automatically only an identity whose flood its own ESTABLISHED TCP
    /// connections carry (`controller::handshakes`); `false`: on the SYN-free packet score
    /// alone, for nodes where bound addresses cannot be spoofed (or UDP-only endpoints the
    /// operator wants quarantined).
    pub require_handshake: bool,
}

impl Default for Anomaly {
    fn default() -> Self {
        Anomaly {
            mode: AnomalyMode::Shadow,
            alpha: 0.05,
            // What the running agent has always used (the ladder's old `Default`, 120, was
            // only ever seen by a unit test).
            warmup_samples: 60,
            throttle_factor: 4.0,
            throttle_for_s: 60,
            quarantine_for_s: 300,
            cooldown_s: 120,
            thresholds: [(12.0, 24.0), (8.0, 16.0), (6.0, 12.0)],
            max_auto_quarantines: 16,
            require_handshake: true,
        }
    }
}

impl Anomaly {
    /// The ladder of an identity of `class`: this section with the class's thresholds.
    pub fn ladder(&self, class: Class) -> Ladder {
        let i = match class {
            Class::Internal => 0,
            Class::Partner => 1,
            _ => 2,
        };
        let (throttle_score, quarantine_score) = self.thresholds[i];
        Ladder {
            alpha: self.alpha,
            warmup_samples: self.warmup_samples,
            throttle_score,
            quarantine_score,
            throttle_for_s: self.throttle_for_s,
            quarantine_for_s: self.quarantine_for_s,
            cooldown_s: self.cooldown_s,
            shadow: self.mode == AnomalyMode::Shadow,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnomalyMode {
    Off,
    /// Decide and report (audit log), act on nothing.
    Shadow,
    Enforce,
}

/// What a [`Tracker`] reads: the [`Anomaly`] section as one class sees it. Not a second set
/// of knobs: it has no defaults and is made only by [`Anomaly::ladder`] (and by tests).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ladder {
    pub alpha: f64,
    pub warmup_samples: u32,
    pub throttle_score: f64,
    pub quarantine_score: f64,
    pub throttle_for_s: u64,
    pub quarantine_for_s: u64,
    /// After a release, before a new action.
    pub cooldown_s: u64,
    /// Decide and report, but enforce nothing.
    pub shadow: bool,
}

impl Ladder {
    /// Why this configuration cannot work, if it cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(format!("alpha {} is outside (0, 1]", self.alpha));
        }
        if !(self.throttle_score.is_finite() && self.throttle_score > 0.0) {
            return Err(format!(
                "throttle_score {} is not a positive number",
                self.throttle_score
            ));
        }
        if !(self.quarantine_score.is_finite() && self.quarantine_score >= self.throttle_score) {
            return Err(format!(
                "quarantine_score {} is below throttle_score {}",
                self.quarantine_score, self.throttle_score
            ));
        }
        if self.throttle_for_s == 0 || self.quarantine_for_s == 0 {
            return Err("throttle_for_s and quarantine_for_s must be at least 1 s".into());
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    #[default]
    Observe,
    Throttle,
    Quarantine,
    Release,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Observe => "observe",
            Step::Throttle => "throttle",
            Step::Quarantine => "quarantine",
            Step::Release => "release",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of step, for the control loop to enforce (unless `shadow`) and audit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub step: Step,
    pub score: f64,
    /// Which signals deviated and by how much, or why the step ended.
    pub reason: String,
    pub inputs: Sample,
    pub baseline: Sample,
    /// Throttle, Quarantine: when it expires. Release: when the cooldown ends. Observe: none.
    pub until_unix_s: Option<u64>,
    /// Decided by a ladder in shadow mode: report it, enforce nothing.
    pub shadow: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Ewma {
    mean: f64,
    var: f64,
}

/// One identity's baseline and place on the ladder. Serializable so the daemon can keep it
/// across restarts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tracker {
    baseline: [Ewma; SIGNALS],
    /// Samples learned into the baseline.
    samples: u64,
    /// The ladder's step, shadow or not.
    step: Step,
    until_unix_s: Option<u64>,
    /// The ladder now under way began in shadow mode. A ladder keeps the mode it began in,
    /// so switching modes never leaves a real throttle unreported or enforces a shadow one;
    /// it expires in the mode it had, and the next ladder takes the new one.
    shadow: bool,
    last_release_unix_s: Option<u64>,
    score: f64,
    /// Why the quarantine this throttle escalated to was withheld, if it was: it is then
    /// retried only when the throttle expires (so the kernel's connections are read at most
    /// once per `throttle_for_s` per identity), and reported once per episode.
    #[serde(default)]
    held: Option<Hold>,
}

/// Why a quarantine the ladder decided was not imposed (the identity stays throttled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// No ESTABLISHED connection from its addresses to a protected TCP port.
    NoHandshake,
    /// Connections, but its passed packets are not theirs (a spoofer's flood from the
    /// address of a customer with a connection open looks like this).
    NotItsConnections,
    /// The kernel's connections could not be read (or not whole).
    Unreadable,
    /// `anomaly.max_auto_quarantines` are in force already.
    Capped,
}

impl Hold {
    pub const ALL: [Hold; 4] = [
        Hold::NoHandshake,
        Hold::NotItsConnections,
        Hold::Unreadable,
        Hold::Capped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Hold::NoHandshake => "no_handshake",
            Hold::NotItsConnections => "not_its_connections",
            Hold::Unreadable => "unreadable",
            Hold::Capped => "capped",
        }
    }
}

impl Tracker {
    /// Takes one interval's sample. Returns a decision only when the step changes (or a
    /// quarantine is renewed). Call it every interval for every tracked identity, or
    /// [`Tracker::expire`] for one that sent nothing, so steps expire on time.
    pub fn observe(&mut self, s: Sample, now_unix_s: u64, cfg: &Ladder) -> Option<Decision> {
        let s = s.sanitized();
        let x = s.to_array();
        let enforcing = matches!(self.step, Step::Throttle | Step::Quarantine);
        let devs = self.deviations(&x, !enforcing);
        let score = devs.iter().copied().fold(0.0, f64::max);
        let unforgeable = self.unforgeable_score(&s);
        self.score = score;
        let baseline = self.baseline();
        let warm = self.samples >= u64::from(cfg.warmup_samples);
        let anomalous = score >= cfg.throttle_score;

        let learn = match self.step {
            Step::Throttle | Step::Quarantine => false,
            Step::Observe if !warm => true,
            Step::Observe | Step::Release => !anomalous,
        };
        let decision = self.advance(
            (score, unforgeable),
            &devs,
            warm,
            s,
            baseline,
            now_unix_s,
            cfg,
        );
        if learn {
            self.learn(&x, cfg.alpha);
        }
        decision
    }

    /// Lets steps expire for an identity that sent nothing this interval, without teaching
    /// the baseline an idle interval (which would make its return look like a flood).
    pub fn expire(&mut self, now_unix_s: u64, cfg: &Ladder) -> Option<Decision> {
        self.score = 0.0;
        let baseline = self.baseline();
        self.advance(
            (0.0, 0.0),
            &[0.0; SIGNALS],
            false,
            Sample::default(),
            baseline,
            now_unix_s,
            cfg,
        )
    }

    /// The step to enforce: Observe while the ladder under way is a shadow one.
    pub fn step(&self) -> Step {
        if self.shadow {
            Step::Observe
        } else {
            self.step
        }
    }

    /// The ladder's step even when it is a shadow one.
    pub fn decided_step(&self) -> Step {
        self.step
    }

    /// When the current step expires (Release: when the cooldown ends).
    pub fn until(&self) -> Option<u64> {
        self.until_unix_s
    }

    /// The last sample's deviation score.
    pub fn score(&self) -> f64 {
        self.score
    }

    /// The baseline's means.
    pub fn baseline(&self) -> Sample {
        let mut a = [0.0; SIGNALS];
        for (v, e) in a.iter_mut().zip(&self.baseline) {
            *v = e.mean;
        }
        Sample::from_array(a)
    }

    /// Samples learned into the baseline.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn last_release(&self) -> Option<u64> {
        self.last_release_unix_s
    }

    /// Why the last escalation was withheld, while the episode lasts.
    pub fn held(&self) -> Option<Hold> {
        self.held
    }

    /// Turns the Quarantine `d` just returned into a renewed Throttle, because `why` (with
    /// `detail` for the reason text). Returns whether this is news for the episode (the
    /// first hold, or a different reason than the last), i.e. whether to report it.
    pub fn withhold(
        &mut self,
        d: &mut Decision,
        why: Hold,
        detail: &str,
        now_unix_s: u64,
        cfg: &Ladder,
    ) -> bool {
        debug_assert_eq!(d.step, Step::Quarantine);
        let until = Some(now_unix_s + cfg.throttle_for_s);
        self.step = Step::Throttle;
        self.until_unix_s = until;
        d.step = Step::Throttle;
        d.until_unix_s = until;
        d.reason = format!(
            "quarantine withheld ({}: {detail}), throttled instead; {}",
            why.as_str(),
            d.reason
        );
        self.held.replace(why) != Some(why)
    }

    fn deviations(&self, x: &[f64; SIGNALS], with_drops: bool) -> [f64; SIGNALS] {
        let mut d = [0.0; SIGNALS];
        if self.samples == 0 {
            return d;
        }
        for i in 0..SIGNALS {
            let e = self.baseline[i];
            let scale = e
                .var
                .max(0.0)
                .sqrt()
                .max(REL_FLOOR * e.mean.abs())
                .max(ABS_FLOOR[i]);
            d[i] = ((x[i] - e.mean) / scale).max(0.0);
        }
        if !with_drops {
            d[DROP] = 0.0;
        }
        d
    }

    /// The deviation of what a spoofer cannot forge without replies: the packet rate less
    /// the SYNs, against the packet baseline (which holds the usual SYNs, so this errs toward
    /// not quarantining).
    fn unforgeable_score(&self, s: &Sample) -> f64 {
        if self.samples == 0 {
            return 0.0;
        }
        let e = self.baseline[0];
        let scale = e
            .var
            .max(0.0)
            .sqrt()
            .max(REL_FLOOR * e.mean.abs())
            .max(ABS_FLOOR[0]);
        let x = (s.packets_per_s - s.new_flows_per_s).max(0.0);
        ((x - e.mean) / scale).max(0.0)
    }

    fn learn(&mut self, x: &[f64; SIGNALS], alpha: f64) {
        self.samples += 1;
        // The first samples weigh 1/n (a plain average) so the baseline starts from what was
        // seen rather than from a first sample weighted (1 - alpha)^n for ever after.
        let a = alpha.max(1.0 / self.samples as f64);
        for (e, &v) in self.baseline.iter_mut().zip(x) {
            let diff = v - e.mean;
            let incr = a * diff;
            e.mean += incr;
            e.var = (1.0 - a) * (e.var + diff * incr);
        }
    }

    /// Which signals deviated, worst first: those at `at_least` or above, or else the worst.
    fn describe(&self, devs: &[f64; SIGNALS], x: &Sample, at_least: f64) -> String {
        let x = x.to_array();
        let mut order: Vec<usize> = (0..SIGNALS).collect();
        order.sort_by(|&a, &b| devs[b].total_cmp(&devs[a]));
        let mut picked: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| devs[i] >= at_least)
            .collect();
        if picked.is_empty() {
            picked.push(order[0]);
        }
        picked
            .iter()
            .map(|&i| {
                format!(
                    "{} {} vs baseline {} (+{:.1} dev)",
                    NAMES[i],
                    fmt_num(x[i]),
                    fmt_num(self.baseline[i].mean),
                    devs[i]
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[allow(clippy::too_many_arguments)]
    fn advance(
        &mut self,
        (score, unforgeable): (f64, f64),
        devs: &[f64; SIGNALS],
        warm: bool,
        inputs: Sample,
        baseline: Sample,
        now: u64,
        cfg: &Ladder,
    ) -> Option<Decision> {
        let anomalous = score >= cfg.throttle_score;
        let proven = unforgeable >= cfg.throttle_score;
        let expired = self.until_unix_s.is_none_or(|u| now >= u);
        let signals = || self.describe(devs, &inputs, cfg.throttle_score);
        let (step, until, reason) = match self.step {
            Step::Observe if warm && anomalous => (
                Step::Throttle,
                Some(now + cfg.throttle_for_s),
                format!(
                    "score {score:.1} >= throttle_score {}: {}",
                    cfg.throttle_score,
                    signals()
                ),
            ),
            Step::Observe => return None,
            Step::Throttle if unforgeable >= cfg.quarantine_score && self.held.is_none() => (
                Step::Quarantine,
                Some(now + cfg.quarantine_for_s),
                format!(
                    "score {score:.1}, non-SYN packet score {unforgeable:.1} >= quarantine_score {} while throttled: {}",
                    cfg.quarantine_score,
                    signals()
                ),
            ),
            Step::Throttle | Step::Quarantine if expired && proven => (
                Step::Quarantine,
                Some(now + cfg.quarantine_for_s),
                format!(
                    "still anomalous when the {} expired, non-SYN packet score {unforgeable:.1} >= throttle_score {}: {}",
                    self.step,
                    cfg.throttle_score,
                    signals()
                ),
            ),
            Step::Throttle if expired && anomalous => (
                Step::Throttle,
                Some(now + cfg.throttle_for_s),
                format!(
                    "throttle renewed, not escalated: score {score:.1} >= throttle_score {} on signals a spoofer can forge (non-SYN packet score {unforgeable:.1}): {}",
                    cfg.throttle_score,
                    signals()
                ),
            ),
            Step::Throttle | Step::Quarantine if expired => (
                Step::Release,
                Some(now + cfg.cooldown_s),
                format!(
                    "the {} expired and the score {score:.1} is below throttle_score {}",
                    self.step, cfg.throttle_score
                ),
            ),
            Step::Release if expired => (
                Step::Observe,
                None,
                format!(
                    "the cooldown of {} s after the release ended",
                    cfg.cooldown_s
                ),
            ),
            Step::Throttle | Step::Quarantine | Step::Release => return None,
        };
        if self.step == Step::Observe {
            self.shadow = cfg.shadow;
        }
        if step == Step::Release {
            self.last_release_unix_s = Some(now);
        }
        if matches!(step, Step::Release | Step::Observe) {
            self.held = None;
        }
        let shadow = self.shadow;
        self.step = step;
        self.until_unix_s = until;
        if step == Step::Observe {
            self.shadow = false;
        }
        Some(Decision {
            step,
            score,
            reason,
            inputs,
            baseline,
            until_unix_s: until,
            shadow,
        })
    }
}

/// Rates are reported with sensible precision: whole numbers for large ones, three decimals
/// for ratios.
fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests;
