//! GPU readings for the controller, behind one trait so the control loop runs the same against
//! real GPUs (NVML) and against a simulated node (a JSON file that tests and
//! `tollgate gpu simulate` write).
//!
//! NVML is loaded with `dlopen` when [`NvmlSource::open`] runs, not linked: the agent builds
//! without CUDA and starts on a node without an NVIDIA driver, where `open` returns an error
//! the daemon reports once before running on without GPU pressure.

use std::{
    ffi::OsStr,
    io::Write as _,
    path::{Path, PathBuf},
};

use nvml_wrapper::{Nvml, error::NvmlError};
use serde::{Deserialize, Serialize};

/// One GPU at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    /// Fraction of the last sample period a kernel was running, 0..=1.
    pub utilization: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// `None` where the GPU does not report power draw.
    #[serde(default)]
    pub power_watts: Option<f64>,
}

impl GpuReading {
    /// Why this reading cannot be believed, if it cannot. Both sources check with this, so a
    /// simulated file is held to what real hardware can report.
    pub fn check(&self) -> Result<(), String> {
        let gpu = self.index;
        if !(self.utilization.is_finite() && (0.0..=1.0).contains(&self.utilization)) {
            return Err(format!(
                "gpu {gpu}: utilization {} is outside 0..=1",
                self.utilization
            ));
        }
        if self.memory_used_bytes > self.memory_total_bytes {
            return Err(format!(
                "gpu {gpu}: memory_used_bytes {} exceeds memory_total_bytes {}",
                self.memory_used_bytes, self.memory_total_bytes
            ));
        }
        if let Some(w) = self.power_watts
            && !(w.is_finite() && w >= 0.0)
        {
            return Err(format!(
                "gpu {gpu}: power_watts {w} is not a non-negative number"
            ));
        }
        Ok(())
    }

    /// Memory in use as a fraction of the total, 0 for a GPU that reports no memory.
    pub fn memory_fraction(&self) -> f64 {
        if self.memory_total_bytes == 0 {
            0.0
        } else {
            self.memory_used_bytes as f64 / self.memory_total_bytes as f64
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML is not available (no NVIDIA driver on this node?): {0}")]
    NvmlUnavailable(String),
    #[error("NVML found no GPU on this node")]
    NoGpu,
    #[error("NVML: {what}: {source}")]
    Nvml {
        what: String,
        #[source]
        source: NvmlError,
    },
    #[error("simulated GPU file {path}: {message}")]
    Simulated { path: String, message: String },
}

/// Where GPU readings come from.
///
/// `Send` so the control loop can own a `Box<dyn GpuSource>` inside a tokio task.
pub trait GpuSource: Send {
    /// A short name for logs and `/metrics` ("nvml", "simulated").
    fn name(&self) -> &'static str;
    /// Every GPU of the node, ordered by index.
    fn read(&mut self) -> Result<Vec<GpuReading>, GpuError>;
}

/// The driver's library installs as `libnvidia-ml.so.1`; the unversioned name (nvml-wrapper's
/// default) exists only where a development package added the symlink, so it comes second.
const NVML_LIBRARIES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// Real GPUs through NVML.
pub struct NvmlSource {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource").finish_non_exhaustive()
    }
}

impl NvmlSource {
    /// Loads NVML and checks it sees at least one GPU.
    pub fn open() -> Result<NvmlSource, GpuError> {
        let mut failures = Vec::new();
        let mut nvml = None;
        for lib in NVML_LIBRARIES {
            match Nvml::builder().lib_path(OsStr::new(lib)).init() {
                Ok(n) => {
                    nvml = Some(n);
                    break;
                }
                // libloading's message already names the file and says why it failed.
                Err(NvmlError::LibloadingError(e)) => failures.push(e.to_string()),
                Err(e) => failures.push(format!("{lib}: {e}")),
            }
        }
        let Some(nvml) = nvml else {
            return Err(GpuError::NvmlUnavailable(failures.join("; ")));
        };
        let count = nvml.device_count().map_err(|source| GpuError::Nvml {
            what: "counting GPUs".into(),
            source,
        })?;
        if count == 0 {
            return Err(GpuError::NoGpu);
        }
        Ok(NvmlSource { nvml })
    }

    fn read_one(&self, index: u32) -> Result<GpuReading, GpuError> {
        let err = |what: &str| {
            let what = format!("gpu {index}: {what}");
            move |source| GpuError::Nvml { what, source }
        };
        let dev = self
            .nvml
            .device_by_index(index)
            .map_err(err("opening the device"))?;
        let name = dev.name().map_err(err("reading the name"))?;
        let util = dev
            .utilization_rates()
            .map_err(err("reading utilization"))?;
        let mem = dev.memory_info().map_err(err("reading memory"))?;
        // Power is a nice-to-have: many boards (and MIG instances) do not report it, and a
        // missing power reading must not cost the utilization and memory ones.
        let power_watts = dev.power_usage().ok().map(|mw| f64::from(mw) / 1000.0);
        let reading = GpuReading {
            index,
            name,
            utilization: (f64::from(util.gpu) / 100.0).clamp(0.0, 1.0),
            memory_used_bytes: mem.used.min(mem.total),
            memory_total_bytes: mem.total,
            power_watts,
        };
        Ok(reading)
    }
}

impl GpuSource for NvmlSource {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn read(&mut self) -> Result<Vec<GpuReading>, GpuError> {
        let count = self.nvml.device_count().map_err(|source| GpuError::Nvml {
            what: "counting GPUs".into(),
            source,
        })?;
        (0..count).map(|i| self.read_one(i)).collect()
    }
}

/// The file format of a simulated node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulatedFile {
    gpus: Vec<GpuReading>,
}

/// A simulated node: the readings in a JSON file, read afresh on every `read` so a test or an
/// operator can change the "GPUs" under a running daemon.
#[derive(Clone, Debug)]
pub struct SimulatedSource {
    path: PathBuf,
}

impl SimulatedSource {
    pub fn new(path: &Path) -> Self {
        SimulatedSource {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, message: impl std::fmt::Display) -> GpuError {
        GpuError::Simulated {
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }
}

impl GpuSource for SimulatedSource {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn read(&mut self) -> Result<Vec<GpuReading>, GpuError> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| self.error(e))?;
        let file: SimulatedFile = serde_json::from_str(&text).map_err(|e| self.error(e))?;
        let mut gpus = file.gpus;
        check_all(&gpus).map_err(|e| self.error(e))?;
        gpus.sort_by_key(|g| g.index);
        Ok(gpus)
    }
}

fn check_all(gpus: &[GpuReading]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for g in gpus {
        g.check()?;
        if !seen.insert(g.index) {
            return Err(format!("gpu index {} appears twice", g.index));
        }
    }
    Ok(())
}

/// Writes a simulated node's readings. The file is written beside its final name and renamed
/// over it, so a daemon reading it every loop sees the old readings or the new ones, never
/// half a file. Readings the simulated source would refuse are refused here, before writing.
pub fn write_simulated(path: &Path, readings: &[GpuReading]) -> std::io::Result<()> {
    check_all(readings).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let text = serde_json::to_vec_pretty(&SimulatedFile {
        gpus: readings.to_vec(),
    })
    .map_err(std::io::Error::other)?;
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        )
    })?;
    // The pid keeps two writers (say, two `tollgate gpu simulate` runs) off each other's
    // temporary file; the last rename wins whole.
    let mut tmp_name = file_name.to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tollgate-gpu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn h100(index: u32, utilization: f64) -> GpuReading {
        GpuReading {
            index,
            name: "sim-h100".into(),
            utilization,
            memory_used_bytes: 40 << 30,
            memory_total_bytes: 80 << 30,
            power_watts: Some(350.0),
        }
    }

    #[test]
    fn simulated_round_trip_and_reread() {
        let dir = tmpdir("rt");
        let path = dir.join("gpus.json");
        let mut src = SimulatedSource::new(&path);
        assert_eq!(src.name(), "simulated");

        let mut no_power = h100(0, 0.25);
        no_power.power_watts = None;
        let readings = vec![h100(1, 0.95), no_power];
        write_simulated(&path, &readings).unwrap();
        let got = src.read().unwrap();
        assert_eq!(got, vec![readings[1].clone(), readings[0].clone()]);

        // Every read sees the file as it is now.
        write_simulated(&path, &[h100(0, 0.5)]).unwrap();
        assert_eq!(src.read().unwrap(), vec![h100(0, 0.5)]);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("gpus.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn simulated_reads_the_documented_format() {
        let dir = tmpdir("fmt");
        let path = dir.join("gpus.json");
        std::fs::write(
            &path,
            r#"{"gpus":[{"index":0,"name":"sim-h100","utilization":0.95,
                "memory_used_bytes":1000,"memory_total_bytes":2000,"power_watts":350.0}]}"#,
        )
        .unwrap();
        let got = SimulatedSource::new(&path).read().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].utilization, 0.95);
        assert_eq!(got[0].memory_fraction(), 0.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn simulated_refuses_missing_and_invalid_files() {
        let dir = tmpdir("bad");
        let path = dir.join("gpus.json");
        let mut src = SimulatedSource::new(&path);

        let e = src.read().unwrap_err().to_string();
        assert!(e.contains("gpus.json") && e.contains("No such file"), "{e}");

        std::fs::write(&path, "{\"gpus\": [").unwrap();
        let e = src.read().unwrap_err().to_string();
        assert!(e.contains("gpus.json") && e.contains("EOF"), "{e}");

        std::fs::write(&path, r#"{"gpu": []}"#).unwrap();
        let e = src.read().unwrap_err().to_string();
        assert!(e.contains("unknown field `gpu`"), "{e}");

        for (util, what) in [("1.5", "1.5"), ("-0.1", "-0.1")] {
            std::fs::write(
                &path,
                format!(
                    r#"{{"gpus":[{{"index":3,"name":"x","utilization":{util},
                        "memory_used_bytes":0,"memory_total_bytes":1}}]}}"#
                ),
            )
            .unwrap();
            let e = src.read().unwrap_err().to_string();
            assert!(
                e.contains("gpus.json") && e.contains("gpu 3") && e.contains(what),
                "{e}"
            );
            assert!(e.contains("outside 0..=1"), "{e}");
        }

        std::fs::write(
            &path,
            r#"{"gpus":[{"index":0,"name":"x","utilization":0.1,
                "memory_used_bytes":5,"memory_total_bytes":1}]}"#,
        )
        .unwrap();
        let e = src.read().unwrap_err().to_string();
        assert!(e.contains("exceeds memory_total_bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_refuses_what_read_would_refuse() {
        let dir = tmpdir("wr");
        let path = dir.join("gpus.json");
        let e = write_simulated(&path, &[h100(0, 1.01)]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("outside 0..=1"), "{e}");
        let e = write_simulated(&path, &[h100(0, f64::NAN)]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let e = write_simulated(&path, &[h100(2, 0.1), h100(2, 0.2)]).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        assert!(!path.exists(), "nothing is written for refused readings");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// On a machine with no NVIDIA driver (this one and CI), opening NVML is an error that
    /// says what is missing, not a panic. On a GPU node it opens and reads.
    #[test]
    fn nvml_open_without_driver_is_a_clear_error() {
        match NvmlSource::open() {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("NVML"), "{msg}");
                if matches!(e, GpuError::NvmlUnavailable(_)) {
                    assert!(msg.contains("libnvidia-ml.so"), "{msg}");
                }
            }
            Ok(mut src) => {
                assert_eq!(src.name(), "nvml");
                for g in src.read().unwrap() {
                    g.check().unwrap();
                }
            }
        }
    }

    #[test]
    fn sources_are_send() {
        fn send<T: Send>() {}
        send::<NvmlSource>();
        send::<SimulatedSource>();
        send::<Box<dyn GpuSource>>();
    }
}
