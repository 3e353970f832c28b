//! Loading the embedded object, attaching the XDP program and pinning what must outlive the
//! process.

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::{ProgramError, SchedClassifier, Xdp, XdpMode},
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
    #[error("reading the program's logs: {0}")]
    KernelLog(String),
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

/// How much the XDP program logs (`[node] kernel_log`): rare events only, never a line per
/// packet. The level is a constant of the loaded program, so `Off` leaves no logging code in
/// what the verifier accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelLog {
    #[default]
    Off,
    /// Nothing logs at error today; kept so the levels read as the usual ladder.
    Error,
    /// Decisions that point at a problem: limiter contention, a binding to an empty slot.
    Warn,
    /// Also frames the parser cannot classify (sampled like drop events).
    Info,
    Debug,
}

impl KernelLog {
    pub const ALL: [KernelLog; 5] = [
        KernelLog::Off,
        KernelLog::Error,
        KernelLog::Warn,
        KernelLog::Info,
        KernelLog::Debug,
    ];

    pub fn label(self) -> &'static str {
        match self {
            KernelLog::Off => "off",
            KernelLog::Error => "error",
            KernelLog::Warn => "warn",
            KernelLog::Info => "info",
            KernelLog::Debug => "debug",
        }
    }

    pub fn from_label(label: &str) -> Option<KernelLog> {
        KernelLog::ALL.into_iter().find(|l| l.label() == label)
    }

    /// The program's `TOLLGATE_LOG_LEVEL` (aya-log's numbering, 0 off).
    fn as_u8(self) -> u8 {
        self as u8
    }
}

/// The program's log level global (`ebpf/src/program.rs`).
const LOG_LEVEL_GLOBAL: &str = "TOLLGATE_LOG_LEVEL";

/// Sets the program's log level on a loader, before `load`. Every loader of the enforcing
/// program calls this (a loader that does not gets the object's default: off).
pub fn configure_kernel_log(loader: &mut EbpfLoader<'_>, level: KernelLog) {
    let value: &'static u8 = match level {
        KernelLog::Off => &0,
        KernelLog::Error => &1,
        KernelLog::Warn => &2,
        KernelLog::Info => &3,
        KernelLog::Debug => &4,
    };
    debug_assert_eq!(*value, level.as_u8());
    loader.override_global(LOG_LEVEL_GLOBAL, value, true);
}

/// Starts reading the program's log ring buffer into tracing (target `kernel`), on the current
/// tokio runtime, for as long as the process runs. Does nothing when `level` is `Off` (the map
/// stays in `ebpf`, unread and empty). Call it once, after loading with
/// [`configure_kernel_log`] at the same level.
pub fn spawn_kernel_log(ebpf: &mut Ebpf, level: KernelLog) -> Result<(), LoadError> {
    if level == KernelLog::Off {
        return Ok(());
    }
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, TracingLog::default())
        .map_err(|e| LoadError::KernelLog(e.to_string()))?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| LoadError::KernelLog(format!("no tokio runtime to read them on: {e}")))?;
    let _entered = runtime.enter();
    // SAFETY: the descriptor is the logger's ring buffer map's, which the logger owns and the
    // AsyncFd owns the logger: it stays open, and the same, for the AsyncFd's whole life.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| LoadError::KernelLog(e.to_string()))?;
    runtime.spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Most kernel log lines written per second; the rest of that second's are dropped (the
/// kernel side is sampled already: this is the journal's guard, as for drop events).
const KERNEL_LOG_LINES_PER_S: u64 = 20;

/// Hands aya-log's records to tracing, so the program's lines land where the agent's do.
#[derive(Default)]
struct TracingLog {
    /// The second (since the epoch) being counted, and the lines written in it.
    second: std::sync::atomic::AtomicU64,
    lines: std::sync::atomic::AtomicU64,
}

impl TracingLog {
    /// Whether one more line fits in this second's allowance.
    fn admit(&self, now_s: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        // One reader task calls this: the two counters need no joint atomicity.
        if self.second.swap(now_s, Relaxed) != now_s {
            self.lines.store(0, Relaxed);
        }
        self.lines.fetch_add(1, Relaxed) < KERNEL_LOG_LINES_PER_S
    }
}

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if !self.admit(now_s) {
            return;
        }
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "kernel", "{msg}"),
            log::Level::Info => tracing::info!(target: "kernel", "{msg}"),
            log::Level::Debug | log::Level::Trace => tracing::debug!(target: "kernel", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Parses the embedded object and loads (verifies) the enforcing programs (Ethernet and
/// layer-3), the TC egress program and the no-ops, kernel logging off.
pub fn load() -> Result<Ebpf, LoadError> {
    load_with_kernel_log(KernelLog::Off)
}

/// [`load`] with the program's log level set to `level` (nothing reads the logs: see
/// [`spawn_kernel_log`]).
pub fn load_with_kernel_log(level: KernelLog) -> Result<Ebpf, LoadError> {
    load_configured(level, None)
}

/// [`load`] with the tables at `sizes` (`[limits]`) instead of the object's compiled ones.
pub fn load_sized(sizes: &crate::sizes::Sizes) -> Result<Ebpf, LoadError> {
    load_configured(KernelLog::Off, Some(sizes))
}

fn load_configured(
    level: KernelLog,
    sizes: Option<&crate::sizes::Sizes>,
) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    configure_kernel_log(&mut loader, level);
    if let Some(s) = sizes {
        s.configure(&mut loader);
    }
    let mut ebpf = loader.load(object::bytes())?;
    for name in [
        program_names::XDP,
        program_names::XDP_L3,
        program_names::NOOP,
    ] {
        xdp_program(&mut ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    for name in [
        program_names::EGRESS,
        program_names::EGRESS_L3,
        program_names::TC_NOOP,
    ] {
        tc_program(&mut ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    crate::flow_programs::install(&mut ebpf)?;
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

/// The TC classifier `name` of a loaded object (`program_names::EGRESS`, `TC_NOOP`).
pub fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_log_lines_are_limited_per_second() {
        let t = TracingLog::default();
        let first: usize = (0..30).filter(|_| t.admit(100)).count();
        assert_eq!(first as u64, KERNEL_LOG_LINES_PER_S);
        assert!(t.admit(101), "a new second, a new allowance");
    }

    #[test]
    fn kernel_log_levels_are_aya_logs_numbering() {
        // aya-log-common: Error = 1 ... Debug = 4; 0 is ours: off.
        let n: Vec<u8> = KernelLog::ALL.iter().map(|l| l.as_u8()).collect();
        assert_eq!(n, [0, 1, 2, 3, 4]);
        for l in KernelLog::ALL {
            assert_eq!(KernelLog::from_label(l.label()), Some(l));
        }
        assert_eq!(KernelLog::from_label("loud"), None);
    }

    /// Loads the program at every log level (root and a BPF-capable kernel:
    /// `cargo test -p tollgate --lib -- --ignored kernel_log`): each verifies within the
    /// fixtures' budget, and with logging off the program the kernel keeps is no larger than
    /// with it on (the log statements are dead code the verifier removes). The verifier's
    /// processed-instruction count is printed but not compared: it follows state pruning,
    /// not code size.
    #[test]
    #[ignore = "needs root"]
    fn every_kernel_log_level_verifies_and_off_costs_nothing() {
        let mut sizes = Vec::new();
        for level in KernelLog::ALL {
            let mut ebpf = load_with_kernel_log(level).expect("loading");
            let info = xdp_program(&mut ebpf, program_names::XDP)
                .expect("program")
                .info()
                .expect("info");
            let n = info.verified_instruction_count().expect("5.16+");
            let size = info.size_translated().expect("translated size");
            eprintln!(
                "kernel_log = {}: verifier processed {n}, translated {size} bytes",
                level.label()
            );
            assert!(n <= 150_000, "{n}");
            sizes.push(size);
        }
        assert!(sizes.iter().all(|s| *s >= sizes[0]), "{sizes:?}");
        assert!(sizes[4] > sizes[0], "logging on adds code: {sizes:?}");
    }

    /// Collects aya-log's records.
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<(log::Level, String)>>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            self.0
                .lock()
                .expect("lock")
                .push((r.level(), r.args().to_string()));
        }
        fn flush(&self) {}
    }

    /// Runs a frame the parser cannot classify (an IPv4 EtherType and no IP header) through
    /// the program at `level`, with drop-event sampling on, and returns what it logged.
    fn log_of_a_truncated_frame(level: KernelLog) -> Vec<(log::Level, String)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut ebpf = load_with_kernel_log(level).expect("loading");
        let mut tables = crate::tables::KernelTables::from_ebpf(&mut ebpf).expect("tables");
        let settings = tollgate_common::policy::Settings {
            drop_event_interval_ns: 1,
            ..Default::default()
        };
        tables.set_settings(&settings).expect("settings");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut logger =
            aya_log::EbpfLogger::init_with_logger(&mut ebpf, Capture(lines.clone())).expect("log");
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut out = vec![0u8; 256];
        let ret = xdp_program(&mut ebpf, program_names::XDP)
            .expect("program")
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN")
            .return_value;
        assert_eq!(ret, 1, "XDP_DROP");
        logger.flush();
        lines.lock().expect("lock").clone()
    }

    /// The program's lines reach a `log` logger at `info` and nothing comes at `warn` or off
    /// (root: `cargo test -p tollgate --lib -- --ignored kernel_log`).
    #[test]
    #[ignore = "needs root"]
    fn kernel_log_lines_reach_userspace_at_their_level_only() {
        let info = log_of_a_truncated_frame(KernelLog::Info);
        assert_eq!(info.len(), 1, "{info:?}");
        assert_eq!(info[0].0, log::Level::Info);
        assert!(
            info[0].1.contains("cannot classify") && info[0].1.contains("truncated"),
            "{info:?}"
        );
        assert_eq!(log_of_a_truncated_frame(KernelLog::Warn), []);
        assert_eq!(log_of_a_truncated_frame(KernelLog::Off), []);
    }
}
