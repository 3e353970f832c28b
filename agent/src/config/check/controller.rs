//! The controller's sections: `[controller]` and `[anomaly]` (their types and defaults
//! live in `crate::controller`).

use std::ops::RangeInclusive;

use super::{Checker, Result};
use crate::config::{
    Anomaly, AnomalyMode, Controller, GpuSourceKind,
    raw::{RawAnomaly, RawController, S},
};

const CONTROLLER_INTERVAL_MS: RangeInclusive<i64> = 10..=60_000;
/// More automatic quarantines than identity slots could never be in force.
const MAX_AUTO_QUARANTINES: RangeInclusive<i64> = 0..=crate::sizes::MAX_IDENTITY_SLOTS as i64;

impl Checker<'_> {
    pub(super) fn controller(&self, raw: Option<RawController>) -> Result<Controller> {
        let d = Controller::default();
        let raw = raw.unwrap_or_default();
        let interval_ms = self.int(
            &raw.interval_ms,
            "controller.interval_ms",
            d.interval_ms as i64,
            CONTROLLER_INTERVAL_MS,
        )?;
        let pressure = self.factor(&raw.pressure, "controller.pressure", d.pressure)?;
        let gpu_source = match raw.gpu_source.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None => d.gpu_source,
            Some((_, "nvml")) => GpuSourceKind::Nvml,
            Some((_, "simulated")) => GpuSourceKind::Simulated,
            Some((_, "none")) => GpuSourceKind::None,
            Some((v, other)) => {
                return Err(self.err(
                    v.span(),
                    "controller.gpu_source",
                    format!("{other:?} is not a GPU source: nvml, simulated or none"),
                ));
            }
        };
        let simulated_file = self.abs_path(
            &raw.simulated_file,
            "controller.simulated_file",
            &d.simulated_file,
        )?;
        let share = |v: &Option<S<f64>>, field: &str, default: f64, lo: f64| -> Result<f64> {
            match v {
                None => Ok(default),
                Some(v) if (lo..=1.0).contains(v.get_ref()) => Ok(*v.get_ref()),
                Some(v) => Err(self.err(
                    v.span(),
                    field,
                    format!(
                        "{} is out of range: it must be between {lo} and 1",
                        v.get_ref()
                    ),
                )),
            }
        };
        let saturate_at = share(
            &raw.saturate_at,
            "controller.saturate_at",
            d.saturate_at,
            0.01,
        )?;
        let recover_at = share(&raw.recover_at, "controller.recover_at", d.recover_at, 0.0)?;
        if recover_at >= saturate_at {
            let span = raw.recover_at.as_ref().map(|v| v.span()).unwrap_or(0..0);
            return Err(self.err(
                span,
                "controller.recover_at",
                format!(
                    "recover_at ({recover_at}) must be below saturate_at ({saturate_at}), or \
                     the pressure would flap"
                ),
            ));
        }
        let recover_after = self.int(
            &raw.recover_after,
            "controller.recover_after",
            i64::from(d.recover_after),
            1..=1000,
        )?;
        let hold_back_floor = share(
            &raw.hold_back_floor,
            "controller.hold_back_floor",
            d.hold_back_floor,
            0.01,
        )?;
        Ok(Controller {
            interval_ms: interval_ms as u64,
            pressure,
            gpu_source,
            simulated_file,
            saturate_at,
            recover_at,
            recover_after: recover_after as u32,
            hold_back_floor,
        })
    }

    pub(super) fn anomaly(&self, raw: Option<RawAnomaly>) -> Result<Anomaly> {
        let d = Anomaly::default();
        let raw = raw.unwrap_or_default();
        let mode = match raw.mode.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None => d.mode,
            Some((_, "shadow")) => AnomalyMode::Shadow,
            Some((_, "enforce")) => AnomalyMode::Enforce,
            Some((_, "off")) => AnomalyMode::Off,
            Some((v, other)) => {
                return Err(self.err(
                    v.span(),
                    "anomaly.mode",
                    format!("{other:?} is not a mode: off, shadow or enforce"),
                ));
            }
        };
        let alpha = match &raw.alpha {
            None => d.alpha,
            Some(v) if *v.get_ref() > 0.0 && *v.get_ref() <= 1.0 => *v.get_ref(),
            Some(v) => {
                return Err(self.err(
                    v.span(),
                    "anomaly.alpha",
                    format!("{} is out of range: 0 < alpha <= 1", v.get_ref()),
                ));
            }
        };
        let secs = |v: &Option<S<i64>>, f: &str, d: i64| self.int(v, f, d, 1..=86400 * 30);
        let mut thresholds = d.thresholds;
        for (i, (name, t)) in [
            ("internal", &raw.internal),
            ("partner", &raw.partner),
            ("customer", &raw.customer),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(t) = t else { continue };
            let score = |v: &Option<S<f64>>, key: &str, d: f64| -> Result<f64> {
                match v {
                    None => Ok(d),
                    Some(v) if *v.get_ref() > 0.0 && v.get_ref().is_finite() => Ok(*v.get_ref()),
                    Some(v) => Err(self.err(
                        v.span(),
                        format!("anomaly.{name}.{key}"),
                        "a score must be a positive number",
                    )),
                }
            };
            let th = score(&t.throttle_score, "throttle_score", thresholds[i].0)?;
            let q = score(&t.quarantine_score, "quarantine_score", thresholds[i].1)?;
            if q < th {
                let span = t
                    .quarantine_score
                    .as_ref()
                    .map(|v| v.span())
                    .unwrap_or(0..0);
                return Err(self.err(
                    span,
                    format!("anomaly.{name}.quarantine_score"),
                    "the quarantine score must not be below the throttle score",
                ));
            }
            thresholds[i] = (th, q);
        }
        Ok(Anomaly {
            mode,
            alpha,
            warmup_samples: self.int(
                &raw.warmup_samples,
                "anomaly.warmup_samples",
                i64::from(d.warmup_samples),
                1..=100_000,
            )? as u32,
            throttle_factor: self.factor(
                &raw.throttle_factor,
                "anomaly.throttle_factor",
                d.throttle_factor,
            )?,
            throttle_for_s: secs(
                &raw.throttle_for_s,
                "anomaly.throttle_for_s",
                d.throttle_for_s as i64,
            )? as u64,
            quarantine_for_s: secs(
                &raw.quarantine_for_s,
                "anomaly.quarantine_for_s",
                d.quarantine_for_s as i64,
            )? as u64,
            cooldown_s: secs(&raw.cooldown_s, "anomaly.cooldown_s", d.cooldown_s as i64)? as u64,
            thresholds,
            // 0: the ladder never quarantines by itself (throttles only).
            max_auto_quarantines: self.int(
                &raw.max_auto_quarantines,
                "anomaly.max_auto_quarantines",
                i64::from(d.max_auto_quarantines),
                MAX_AUTO_QUARANTINES,
            )? as u32,
            require_handshake: raw
                .require_handshake
                .map_or(d.require_handshake, |b| *b.get_ref()),
        })
    }
}
