//! Loading the embedded object, attaching the XDP program and pinning what must outlive the
//! process.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode},
};
use tollgate_common::{Counter, map_names, program_names};

use crate::object;

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
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
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
    pub fn xdp_mode(self) -> XdpMode {
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
