//! Loading the embedded object, attaching the XDP program and pinning what must outlive the
//! process.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode},
};
use tollgate_common::{Counter, map_names, program_names};

use crate::{object, paths};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("the object has no program named {0}")]
    NoProgram(&'static str),
    #[error("the object has no map named {0}")]
    NoMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching XDP to {iface} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How the program is attached to an interface, as the operator names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) XDP where the driver supports it, else the kernel's choice.
    Auto,
    /// Native XDP in the driver; fails on drivers without XDP support.
    Native,
    /// Generic XDP in the network stack: works on every interface, slower.
    Generic,
}

impl AttachMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Auto => XdpMode::Default,
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

/// Parses the embedded object and loads (verifies) both XDP programs.
pub fn load() -> Result<Ebpf, LoadError> {
    let mut ebpf = Ebpf::load(object::bytes())?;
    for name in [program_names::XDP, program_names::NOOP] {
        xdp_program(&mut ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(ebpf)
}

/// Loads the benchmark's component programs too (`program_names::BENCH_COMPONENTS`).
pub fn load_with_bench_components() -> Result<Ebpf, LoadError> {
    let mut ebpf = load()?;
    for name in program_names::BENCH_COMPONENTS {
        xdp_program(&mut ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(ebpf)
}

/// The XDP program `name` of a loaded object.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoadError> {
    ebpf.program_mut(name)
        .ok_or(LoadError::NoProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// The per-reason counter map of a loaded object.
pub fn reason_counters(ebpf: &Ebpf) -> Result<PerCpuArray<&MapData, Counter>, LoadError> {
    let name = map_names::REASON_COUNTERS;
    let map = ebpf.map(name).ok_or(LoadError::NoMap(name))?;
    PerCpuArray::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// A program attached to an interface, its counter map pinned; detaches and unpins on drop.
pub struct Attached {
    ebpf: Ebpf,
    link: Option<aya::programs::xdp::XdpLinkId>,
    pin_dir: PathBuf,
    pub iface: String,
    pub mode: AttachMode,
}

impl Attached {
    /// Loads the object, pins the counters under `pin_dir` and attaches to `iface`.
    pub fn start(iface: &str, mode: AttachMode, pin_dir: &Path) -> Result<Self, LoadError> {
        let mut ebpf = load()?;
        std::fs::create_dir_all(pin_dir).map_err(|e| LoadError::Pin {
            path: pin_dir.to_owned(),
            source: Box::new(e),
        })?;
        let counters_pin = pin_dir.join(paths::PIN_REASON_COUNTERS);
        // A pin left by a crashed run would make pinning fail; this run's map replaces it.
        let _ = std::fs::remove_file(&counters_pin);
        let name = map_names::REASON_COUNTERS;
        ebpf.map(name)
            .ok_or(LoadError::NoMap(name))?
            .pin(&counters_pin)
            .map_err(|e| LoadError::Pin {
                path: counters_pin.clone(),
                source: Box::new(e),
            })?;
        let link = xdp_program(&mut ebpf, program_names::XDP)?
            .attach(iface, mode.xdp_mode())
            .map_err(|source| LoadError::Attach {
                iface: iface.to_owned(),
                mode: mode.label(),
                source,
            })?;
        Ok(Attached {
            ebpf,
            link: Some(link),
            pin_dir: pin_dir.to_owned(),
            iface: iface.to_owned(),
            mode,
        })
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// Detaches the program and removes the pins; also what `Drop` does.
    pub fn stop(mut self) -> Result<(), LoadError> {
        self.detach()
    }

    fn detach(&mut self) -> Result<(), LoadError> {
        let _ = std::fs::remove_file(self.pin_dir.join(paths::PIN_REASON_COUNTERS));
        let _ = std::fs::remove_dir(&self.pin_dir);
        if let Some(link) = self.link.take() {
            xdp_program(&mut self.ebpf, program_names::XDP)?
                .detach(link)
                .map_err(|source| LoadError::Program {
                    name: program_names::XDP,
                    source,
                })?;
        }
        Ok(())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!("detaching: {e}");
        }
    }
}
