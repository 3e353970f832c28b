//! `tollgate gpu read`: one reading of every load source the configuration names, without
//! the agent, and what the pressure formula makes of it. `tollgate gpu simulate`: writes the
//! file the simulated GPU source reads.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde::Serialize;
use tollgate::{
    config::{Config, GpuSourceKind},
    control::reply::EndpointLoad,
    controller::{
        gpu::{GpuReading, GpuSource, NvmlSource, SimulatedSource, write_simulated},
        pressure::combine,
        scrape,
    },
};

use super::{Ctx, Failure, Outcome, exit, print};

/// GPU and model-server load: read it as the controller would, or simulate GPUs (for labs
/// and demos without one).
#[derive(clap::Args)]
pub struct GpuArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Read every load source once, without the agent: NVML (every GPU's utilisation and
    /// memory), the simulated file when `controller.gpu_source = "simulated"`, and each
    /// endpoint's model server (`[endpoints.model_server]`); then each endpoint's pressure
    /// by the formula the controller runs (docs/controller.md). The first check on a new
    /// node. Exits 1 when a source the configuration relies on cannot be read.
    Read {
        /// The configuration [default: /etc/tollgate/tollgate.toml, or the embedded default
        /// when that file does not exist].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
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

pub fn run(a: GpuArgs, ctx: &Ctx) -> Outcome {
    match a.action {
        Action::Read { config } => read(config.as_deref(), ctx),
        Action::Simulate {
            util,
            gpus,
            memory,
            file,
        } => simulate(util, gpus, memory, &file),
    }
}

/// One source's answer.
#[derive(Serialize)]
struct SourceReading {
    /// `nvml` or `simulated`.
    source: &'static str,
    /// Whether the controller reads this one (`controller.gpu_source`).
    configured: bool,
    gpus: Vec<GpuReading>,
    error: Option<String>,
}

/// `gpu read`'s answer.
#[derive(Serialize)]
struct Reading {
    config: String,
    gpu_source: &'static str,
    sources: Vec<SourceReading>,
    /// Each endpoint's pressure from this one reading (`saturated`: at or above a threshold
    /// now; the agent also applies its hysteresis over several readings).
    endpoints: Vec<EndpointLoad>,
}

fn read(path: Option<&Path>, ctx: &Ctx) -> Outcome {
    let (config, from) = match path {
        Some(p) => (Config::load(p), p.display().to_string()),
        None if Path::new(Config::DEFAULT_PATH).exists() => (
            Config::load(Path::new(Config::DEFAULT_PATH)),
            Config::DEFAULT_PATH.to_owned(),
        ),
        None => (
            Ok(Config::embedded_default()),
            "embedded default".to_owned(),
        ),
    };
    let config = config.map_err(|e| Failure::bare(exit::CONFIG, e))?;
    let c = &config.controller;
    let mut sources = Vec::new();
    let nvml = NvmlSource::open().and_then(|mut s| s.read());
    sources.push(SourceReading {
        source: "nvml",
        configured: c.gpu_source == GpuSourceKind::Nvml,
        gpus: nvml.as_ref().map(Clone::clone).unwrap_or_default(),
        error: nvml.as_ref().err().map(ToString::to_string),
    });
    if c.gpu_source == GpuSourceKind::Simulated {
        let sim = SimulatedSource::new(&c.simulated_file).read();
        sources.push(SourceReading {
            source: "simulated",
            configured: true,
            gpus: sim.as_ref().map(Clone::clone).unwrap_or_default(),
            error: sim.as_ref().err().map(ToString::to_string),
        });
    }
    let gpus: Vec<GpuReading> = sources
        .iter()
        .find(|s| s.configured)
        .map(|s| s.gpus.clone())
        .unwrap_or_default();
    let servers: Vec<_> = config
        .endpoints
        .iter()
        .filter_map(|e| e.model_server.as_ref())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::REFUSED, format!("starting the runtime: {e}")))?;
    let client = scrape::client_for(&servers);
    let mut endpoints = Vec::new();
    for ep in &config.endpoints {
        let util = gpus
            .iter()
            .filter(|g| ep.gpus.contains(&g.index))
            .map(|g| g.utilization)
            .reduce(f64::max);
        let (reading, error) = match &ep.model_server {
            None => (None, None),
            Some(s) => {
                let r = rt.block_on(scrape::scrape(
                    client.as_ref(),
                    s,
                    // As the agent would: capped below the controller's interval.
                    s.timeout(c.interval_ms),
                ));
                match r {
                    Ok(r) => (Some(r), None),
                    Err(e) => (None, Some(e)),
                }
            }
        };
        let (signals, source) = scrape::signals(
            ep.model_server.as_ref(),
            reading
                .as_ref()
                .map_or(scrape::Use::Lost, |r| scrape::Use::Reading(r, 0)),
            util,
            c.saturate_at,
        );
        let saturated = combine(&signals).is_some_and(|p| p.0 >= 1.0);
        let model_server =
            ep.model_server
                .as_ref()
                .map(|s| tollgate::control::reply::ModelServerView {
                    url: s.url.to_string(),
                    kind: s.kind,
                    age_intervals: reading.as_ref().map(|_| 0),
                    reading: reading.clone(),
                    error: error
                        .as_ref()
                        .map(|e| format!("{} ({})", e.message, e.outcome)),
                    scrapes: [(
                        error
                            .as_ref()
                            .map_or("ok".to_owned(), |e| e.outcome.clone()),
                        1,
                    )]
                    .into(),
                });
        endpoints.push(EndpointLoad::new(
            &ep.name,
            source,
            &signals,
            saturated,
            model_server,
        ));
    }
    let failed: Vec<String> = sources
        .iter()
        .filter(|s| s.configured)
        .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.source)))
        .chain(endpoints.iter().filter_map(|e| {
            let ms = e.model_server.as_ref()?;
            ms.error
                .as_ref()
                .map(|err| format!("endpoint {} model server: {err}", e.endpoint))
        }))
        .collect();
    let reading = Reading {
        config: from,
        gpu_source: match c.gpu_source {
            GpuSourceKind::Nvml => "nvml",
            GpuSourceKind::Simulated => "simulated",
            GpuSourceKind::None => "none",
        },
        sources,
        endpoints,
    };
    if ctx.json() {
        print::json(&reading);
    } else {
        print_text(&reading);
    }
    if failed.is_empty() {
        Ok(())
    } else {
        super::fail(exit::REFUSED, failed.join("; "))
    }
}

fn print_text(r: &Reading) {
    println!("config      {}", r.config);
    println!("gpu_source  {}", r.gpu_source);
    for s in &r.sources {
        let mark = if s.configured {
            " (controller reads this)"
        } else {
            ""
        };
        match &s.error {
            Some(e) => println!("{:<11} error: {e}{mark}", s.source),
            None => {
                println!("{:<11} {} GPU(s){mark}", s.source, s.gpus.len());
                for g in &s.gpus {
                    println!("  {}", print::gpu_label(g));
                }
            }
        }
    }
    for e in &r.endpoints {
        let pressure = e.pressure.map_or("-".to_owned(), |p| {
            format!("{p:.2} by {}", e.driver.as_deref().unwrap_or("-"))
        });
        let hot = if e.saturated { "  SATURATED" } else { "" };
        println!(
            "endpoint {}: pressure {pressure} (from {}){hot}",
            e.endpoint, e.source
        );
        if let Some(ms) = &e.model_server {
            println!("  model server {} ({})", ms.url, ms.kind.label());
            match (&ms.reading, &ms.error) {
                (_, Some(err)) => println!("    error: {err}"),
                (Some(r), None) => println!(
                    "    queue {}  running {}  kv_cache {}  (from {})",
                    print::opt(r.queue),
                    print::opt(r.running),
                    print::opt(r.kv_cache),
                    r.metrics.join(", ")
                ),
                (None, None) => {}
            }
        }
        for s in &e.signals {
            println!(
                "    {:<9} {:>10} / {:<8} = {:.2}",
                s.name,
                print::float(s.value),
                print::float(s.at),
                s.value / s.at
            );
        }
    }
}

fn simulate(util: f64, gpus: u32, memory: f64, file: &Path) -> Outcome {
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
    match write_simulated(file, &readings) {
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
