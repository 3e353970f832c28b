//! The flow programs (`tollgate_flow`, `tollgate_flow_l3`): the enforcing XDP programs
//! tail-call them with a bound TCP packet (ebpf/src/program.rs, `hand_to_flow`), so the flow
//! logic is verified once instead of once per path through the decision. They are loaded
//! with the enforcing programs and put in the `FLOW_PROG` program array, which is pinned:
//! its slots (and so flow tracking) outlive the agent, and a restarted agent's programs
//! replace the old ones slot by slot, each write atomic.

use aya::{Ebpf, maps::ProgramArray};
use tollgate_common::{map_names, program_names};

use crate::loader::{LoadError, xdp_program};

/// Loads both flow programs and installs them in `FLOW_PROG` (slot 0 Ethernet, 1 layer 3).
pub fn install(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for name in [program_names::FLOW, program_names::FLOW_L3] {
        xdp_program(ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    let fds = [program_names::FLOW, program_names::FLOW_L3].map(|name| {
        xdp_program(ebpf, name).and_then(|p| {
            p.fd()
                .map_err(|source| LoadError::Program { name, source })?
                .try_clone()
                .map_err(|e| LoadError::Program {
                    name,
                    source: aya::programs::ProgramError::IOError(e),
                })
        })
    });
    let name = map_names::FLOW_PROG;
    let map = ebpf.map_mut(name).ok_or(LoadError::NoMap(name))?;
    let mut slots: ProgramArray<&mut aya::maps::MapData> =
        ProgramArray::try_from(map).map_err(|source| LoadError::Map { name, source })?;
    for (i, fd) in fds.into_iter().enumerate() {
        slots
            .set(i as u32, &fd?, 0)
            .map_err(|source| LoadError::Map { name, source })?;
    }
    Ok(())
}
