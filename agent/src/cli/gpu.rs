//! `tollgate gpu simulate`: writes the file the simulated GPU source reads.

use std::path::PathBuf;

use clap::Subcommand;
use tollgate::controller::gpu::{GpuReading, write_simulated};

use super::{Outcome, exit};

/// GPU readings: simulate them (for labs and demos without a GPU).
#[derive(clap::Args)]
pub struct GpuArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Write the file the simulated GPU source reads (`controller.gpu_source = "simulated"`):
    /// one or more GPUs at the given utilisation. The agent picks it up on its next interval.
    Simulate {
        /// Utilisation, 0 to 1 (0.95 = 95% busy).
        #[arg(long)]
        util: f64,
        /// How many GPUs (indices 0..N).
        #[arg(long, default_value_t = 1)]
        gpus: u32,
        /// Memory in use, fraction of 80 GiB.
        #[arg(long, default_value_t = 0.5)]
        memory: f64,
        #[arg(
            long,
            value_name = "FILE",
            default_value = tollgate::controller::DEFAULT_GPU_SIMULATED_FILE
        )]
        file: PathBuf,
    },
}

/// Memory of each simulated GPU: 80 GiB.
const TOTAL_BYTES: u64 = 80 << 30;

pub fn run(a: GpuArgs) -> Outcome {
    let Action::Simulate {
        util,
        gpus,
        memory,
        file,
    } = a.action;
    let readings: Vec<GpuReading> = (0..gpus)
        .map(|index| GpuReading {
            index,
            name: "simulated".into(),
            utilization: util,
            memory_used_bytes: (TOTAL_BYTES as f64 * memory.clamp(0.0, 1.0)) as u64,
            memory_total_bytes: TOTAL_BYTES,
            power_watts: Some(100.0 + 600.0 * util.clamp(0.0, 1.0)),
        })
        .collect();
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match write_simulated(&file, &readings) {
        Ok(()) => {
            println!(
                "ok: {} simulated GPU(s) at {util} in {}",
                gpus,
                file.display()
            );
            Ok(())
        }
        Err(e) => super::fail(exit::REFUSED, format!("{}: {e}", file.display())),
    }
}
