//! The controller: GPU-aware hold-back, quotas per plan, anomaly responses. Its sections of
//! the configuration (`[controller]`, `[anomaly]`, the plans' quotas) are defined here, with
//! their defaults; `config` parses and checks them.

use std::path::PathBuf;

use self::pressure::PressureConfig;

/// The simulated GPU source's file (`tollgate gpu simulate` writes it).
pub const DEFAULT_GPU_SIMULATED_FILE: &str = "/run/tollgate/gpu-simulated.json";

pub mod anomaly;
pub mod gpu;
pub mod handshakes;
pub mod model_server;
pub mod pressure;
pub mod quota;
pub mod response;
pub mod scrape;

/// The `[controller]` section: the loop's interval, the static pressure and the GPU
/// hold-back's hysteresis. [`Controller::default`] holds every default.
#[derive(Clone, Debug, PartialEq)]
pub struct Controller {
    pub interval_ms: u64,
    /// A static cost multiplier on every packet (1.0: none); the GPU hold-back comes on top.
    pub pressure: f64,
    pub gpu_source: GpuSourceKind,
    /// The file the simulated source reads (`tollgate gpu simulate` writes it).
    pub simulated_file: PathBuf,
    /// A GPU at or above this utilisation (0..1) saturates its endpoints ...
    pub saturate_at: f64,
    /// ... until it has been at or below this for `recover_after` readings in a row.
    pub recover_at: f64,
    pub recover_after: u32,
    /// Share of its budget a priority-0 plan keeps while saturated; priority 100 keeps all.
    pub hold_back_floor: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuSourceKind {
    Nvml,
    Simulated,
    None,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            interval_ms: 250,
            pressure: 1.0,
            gpu_source: GpuSourceKind::Nvml,
            simulated_file: PathBuf::from(DEFAULT_GPU_SIMULATED_FILE),
            saturate_at: 0.9,
            recover_at: 0.75,
            recover_after: 4,
            hold_back_floor: 0.1,
        }
    }
}

impl Controller {
    /// What the saturation hysteresis reads.
    pub fn pressure_config(&self) -> PressureConfig {
        PressureConfig {
            saturate_at: self.saturate_at,
            recover_at: self.recover_at,
            recover_after: self.recover_after,
            floor: self.hold_back_floor,
        }
    }
}
