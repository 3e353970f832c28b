//! The real agent as a process: its directories (pins, state, control socket), `tollgate run`
//! in a namespace with a guard that stops it, its CLI, and its kernel counters read from the
//! pins.

use std::{
    collections::BTreeMap,
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::lab::{NetNs, checked, next_id, owner_is_dead};

/// The root bpffs; an agent started by [`Agent::start`] pins under it.
const BPFFS: &str = "/sys/fs/bpf";
/// What the agent logs once the program is attached (pinning happens before attaching, so the
/// pin alone does not say the program sees packets yet).
const AGENT_READY_LOG: &str = "attached; enforcing";

/// The tollgate binary the tests run: `TOLLGATE_BIN`, else the one Cargo built next to this
/// test (`target/<profile>/deps/<test>` → `target/<profile>/tollgate`).
pub fn tollgate_bin() -> PathBuf {
    let bin = match std::env::var_os("TOLLGATE_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("locating the test executable");
            exe.parent()
                .and_then(Path::parent)
                .expect("the test executable lives in target/<profile>/deps")
                .join("tollgate")
        }
    };
    assert!(
        bin.is_file(),
        "the tollgate binary is not at {}: run `cargo build -p tollgate` first or use \
         `cargo xtask test` (or set TOLLGATE_BIN)",
        bin.display()
    );
    bin
}

/// One reason's row of `tollgate counters --output json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReasonCount {
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters by reason label, as the CLI prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<String, ReasonCount>);

impl Counters {
    /// Parses the JSON array `tollgate counters --output json` prints.
    pub fn from_json(json: &str) -> Counters {
        let rows: Vec<serde_json::Value> = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("parsing `tollgate counters` output: {e}: {json}"));
        let mut map = BTreeMap::new();
        for row in rows {
            let text = |k: &str| {
                row[k]
                    .as_str()
                    .unwrap_or_else(|| panic!("counter row without {k}: {row}"))
                    .to_owned()
            };
            let num = |k: &str| {
                row[k]
                    .as_u64()
                    .unwrap_or_else(|| panic!("counter row without {k}: {row}"))
            };
            let reason = text("reason");
            let count = ReasonCount {
                verdict: text("verdict"),
                packets: num("packets"),
                bytes: num("bytes"),
            };
            assert!(
                map.insert(reason.clone(), count).is_none(),
                "reason {reason} printed twice: {json}"
            );
        }
        Counters(map)
    }

    pub fn get(&self, reason: &str) -> &ReasonCount {
        self.0
            .get(reason)
            .unwrap_or_else(|| panic!("no counter for reason {reason}: {self:?}"))
    }

    /// What moved since `before`, reason by reason.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(reason, now)| {
                    let then = before.get(reason);
                    let moved = ReasonCount {
                        verdict: now.verdict.clone(),
                        packets: now.packets - then.packets,
                        bytes: now.bytes - then.bytes,
                    };
                    (reason.clone(), moved)
                })
                .collect(),
        )
    }

    /// Packets and bytes over every reason.
    pub fn total(&self) -> (u64, u64) {
        self.0
            .values()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    }
}

/// How a stopped agent ended.
#[derive(Debug)]
pub struct AgentExit {
    pub status: ExitStatus,
    pub stderr: String,
    /// Whether the agent removed its pin directory itself.
    pub pins_removed: bool,
}

/// Where one agent keeps its pins, state and control socket: unique per test, removed on
/// drop (unlinking the pins detaches the program, so nothing outlives the test). Separate from
/// [`Agent`] so that a test can kill an agent and start another on the same state.
pub struct AgentDirs {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
}

/// Removes pin and state directories (`tollgate-test-<pid>-<n>`) whose test process is gone,
/// once per process, as [`crate::lab`] does for namespaces: a test killed outright runs no
/// Drop, and its pins would keep a program attached to a deleted lab's maps.
fn sweep_orphan_dirs() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        for parent in [PathBuf::from(BPFFS), std::env::temp_dir()] {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(tag) = name.strip_prefix("tollgate-test-") else {
                    continue;
                };
                let (Some((pid, n)), true) = (tag.split_once('-'), entry.path().is_dir()) else {
                    continue;
                };
                if n.parse::<u32>().is_err() || !owner_is_dead(pid) {
                    continue;
                }
                eprintln!(
                    "note: removing {} left by dead process {pid}",
                    entry.path().display()
                );
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

impl AgentDirs {
    pub fn new() -> AgentDirs {
        sweep_orphan_dirs();
        let tag = format!("{}-{}", std::process::id(), next_id());
        let state_dir = std::env::temp_dir().join(format!("tollgate-test-{tag}"));
        std::fs::create_dir_all(&state_dir).expect("state dir");
        AgentDirs {
            pin_dir: Path::new(BPFFS).join(format!("tollgate-test-{tag}")),
            socket: state_dir.join("control.sock"),
            state_dir,
        }
    }

    /// The pinned (reason, endpoint) counter map.
    /// The audit log's lines, parsed (a line that is not JSON is skipped).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn counters_pin(&self) -> PathBuf {
        tollgate::pins::maps_dir(&self.pin_dir).join(tollgate_common::map_names::REASON_COUNTERS)
    }

    /// Runs a CLI verb against this agent's socket (from the test's own namespace: the
    /// socket is a file, the pins are in the root bpffs).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(tollgate_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("running the tollgate CLI")
    }

    /// Like [`AgentDirs::cli`], panicking with the output unless it exits 0; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tollgate {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The kernel slot of identity `name`, as `tollgate identities show` reports it.
    pub fn identity_slot(&self, name: &str) -> u32 {
        let shown: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["identities", "show", name, "--output", "json"]))
                .expect("identities show: json");
        let id = shown["id"].as_u64().expect("identities show: an id");
        u32::try_from(id).expect("a slot number")
    }
}

impl Default for AgentDirs {
    fn default() -> Self {
        AgentDirs::new()
    }
}

impl Drop for AgentDirs {
    fn drop(&mut self) {
        if self.pin_dir.exists() {
            // Unlinking the pins detaches the program and releases the maps.
            if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
                eprintln!("warning: removing {}: {e}", self.pin_dir.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The real `tollgate run` inside a namespace. On drop it gets SIGTERM (SIGKILL if it does
/// not exit in time); its [`AgentDirs`] (owned here or by the test) removes what it pinned.
pub struct Agent {
    child: Option<Child>,
    dirs: Option<AgentDirs>,
    pin_dir: PathBuf,
    counters_pin: PathBuf,
    socket: PathBuf,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<JoinHandle<()>>,
}

impl Agent {
    const START_LIMIT: Duration = Duration::from_secs(60);
    const STOP_LIMIT: Duration = Duration::from_secs(10);

    /// Starts `tollgate run --iface IFACE --mode MODE --detach-on-exit` in `ns` on the
    /// embedded default config with directories of its own, and returns once the program is
    /// attached and its counters are pinned.
    pub fn start(ns: &NetNs, iface: &str, mode: &str) -> Agent {
        let dirs = AgentDirs::new();
        let mut agent = Agent::launch(
            ns,
            &dirs,
            &["--iface", iface, "--mode", mode, "--detach-on-exit"],
        );
        agent.dirs = Some(dirs);
        agent
    }

    /// Starts `tollgate run ARGS` in `ns` using `dirs` (the test keeps them, so a second
    /// agent can adopt what the first left).
    pub fn launch(ns: &NetNs, dirs: &AgentDirs, args: &[&str]) -> Agent {
        Agent::launch_limited(ns, dirs, "--control-socket", args, None)
    }

    /// Like [`Agent::launch`], with the control socket given by `socket_flag` (the global
    /// `--socket` instead of `run --control-socket`, say).
    pub fn launch_socket_by(
        ns: &NetNs,
        dirs: &AgentDirs,
        socket_flag: &str,
        args: &[&str],
    ) -> Agent {
        Agent::launch_limited(ns, dirs, socket_flag, args, None)
    }

    /// Like [`Agent::launch`], with RLIMIT_NOFILE set to (`soft`, `hard`) for the agent, as
    /// a unit's `LimitNOFILE=` or a shell's `ulimit -n` would.
    pub fn launch_with_nofile(
        ns: &NetNs,
        dirs: &AgentDirs,
        args: &[&str],
        soft: u64,
        hard: u64,
    ) -> Agent {
        Agent::launch_limited(ns, dirs, "--control-socket", args, Some((soft, hard)))
    }

    /// Starts `tollgate run --config CONFIG --mode native` in `ns` using `dirs`: what most
    /// namespace tests run.
    pub fn native(ns: &NetNs, dirs: &AgentDirs, config: &Path) -> Agent {
        let config = config.to_str().expect("a UTF-8 config path");
        Agent::launch(ns, dirs, &["--config", config, "--mode", "native"])
    }

    /// `tollgate run` in `ns` on `dirs` (pins, state, control socket), not started: for a
    /// start that is expected to fail, or to be run with `output()`.
    pub fn command(ns: &NetNs, dirs: &AgentDirs) -> Command {
        Agent::command_with(ns, dirs, "--control-socket")
    }

    fn command_with(ns: &NetNs, dirs: &AgentDirs, socket_flag: &str) -> Command {
        let mut cmd = ns.command(tollgate_bin());
        cmd.arg("run")
            .arg("--pin-dir")
            .arg(&dirs.pin_dir)
            .arg("--state-dir")
            .arg(&dirs.state_dir)
            .arg(socket_flag)
            .arg(&dirs.socket);
        cmd
    }

    fn launch_limited(
        ns: &NetNs,
        dirs: &AgentDirs,
        socket_flag: &str,
        args: &[&str],
        nofile: Option<(u64, u64)>,
    ) -> Agent {
        let mut cmd = Agent::command_with(ns, dirs, socket_flag);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // If the test process is killed outright (a harness timeout), no Drop runs; the agent
        // then gets SIGTERM from the kernel. The signal is tied to the thread that spawns the
        // agent, so the guard must not outlive that thread (tests keep it on their own).
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((soft, hard)) = nofile {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        // Drained continuously so the agent can never block on a full pipe while it logs.
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        // Built before waiting, so that a failed start still cleans up through Drop.
        let mut agent = Agent {
            child: Some(child),
            dirs: None,
            pin_dir: dirs.pin_dir.clone(),
            counters_pin: dirs.counters_pin(),
            socket: dirs.socket.clone(),
            stderr,
            stderr_reader: Some(stderr_reader),
        };
        let deadline = Instant::now() + Self::START_LIMIT;
        loop {
            let child = agent.child.as_mut().expect("running agent");
            if let Some(status) = child.try_wait().expect("polling the agent") {
                agent.join_stderr();
                panic!(
                    "tollgate run {args:?} in {} exited before attaching ({status}):\n{}",
                    ns.name(),
                    agent.stderr()
                );
            }
            if agent.stderr().contains(AGENT_READY_LOG)
                && agent.counters_pin.exists()
                && agent.socket.exists()
            {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate run {args:?} in {} did not attach within {:?}:\n{}",
                ns.name(),
                Self::START_LIMIT,
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The agent's pid (nsenter execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running agent").id()
    }

    /// Waits up to `limit` for the agent to exit by itself; whether it did.
    pub fn exits_within(&mut self, limit: Duration) -> bool {
        let child = self.child.as_mut().expect("a running agent");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The pinned per-reason counter map.
    pub fn counters_pin(&self) -> PathBuf {
        self.counters_pin.clone()
    }

    /// What the agent has logged so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The counters as `tollgate counters --output json` reads them from the pin. It runs in
    /// the test's own namespace: the pin is in the root bpffs, not tied to any namespace.
    pub fn counters(&self) -> Counters {
        let json = checked(
            Command::new(tollgate_bin())
                .args(["counters", "--output", "json", "--pin-dir"])
                .arg(&self.pin_dir),
        );
        Counters::from_json(&json)
    }

    /// SIGTERMs the agent and waits for it, as a service manager would.
    pub fn stop(mut self) -> AgentExit {
        let status = self.terminate();
        AgentExit {
            status,
            stderr: self.stderr(),
            pins_removed: !self.pin_dir.exists(),
        }
    }

    /// SIGKILL: the agent gets no chance to clean up (what `kill -9` or an OOM kill does).
    pub fn kill9(mut self) -> String {
        let mut child = self.child.take().expect("a running agent");
        let _ = child.kill();
        let _ = child.wait();
        self.join_stderr();
        self.stderr()
    }

    /// SIGTERM, a bounded wait, then SIGKILL; returns how the agent ended.
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent is stopped once");
        if let Ok(None) = child.try_wait() {
            // nsenter execs the agent (no fork without --pid), so this pid is the agent's.
            let pid = child.id() as libc::pid_t;
            // SAFETY: kill has no memory-safety preconditions; `child` has not been reaped,
            // so the pid still names our child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Self::STOP_LIMIT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            _ => {
                eprintln!(
                    "warning: tollgate run ignored SIGTERM for {:?}; killing it",
                    Self::STOP_LIMIT
                );
                let _ = child.kill();
                child.wait().expect("reaping the agent")
            }
        };
        self.join_stderr();
        status
    }

    fn join_stderr(&mut self) {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        // `dirs` (if this agent owns them) drops next and removes the pins.
    }
}

/// An identity's kernel counters, read from an agent's pins (no agent needed).
pub fn identity_counters(dirs: &AgentDirs, id: u32) -> tollgate_common::policy::IdentityCounters {
    use aya::maps::{Map, MapData, PerCpuArray};
    let path =
        tollgate::pins::maps_dir(&dirs.pin_dir).join(tollgate_common::map_names::IDENTITY_COUNTERS);
    let data = MapData::from_pin(&path).expect("identity counters pin");
    let map: PerCpuArray<MapData, tollgate_common::policy::IdentityCounters> =
        PerCpuArray::try_from(Map::from_map_data(data).expect("map")).expect("per-cpu array");
    let slots = map.get(&id, 0).expect("counters");
    let mut total = tollgate_common::policy::IdentityCounters::default();
    for s in slots.iter() {
        total.passed.packets += s.passed.packets;
        total.passed.bytes += s.passed.bytes;
        total.dropped.packets += s.dropped.packets;
        total.dropped.bytes += s.dropped.bytes;
        total.cost += s.cost;
        total.syn += s.syn;
        total.small += s.small;
    }
    total
}

/// One (reason, endpoint) slot of the kernel's verdict counters, summed over CPUs, read from
/// an agent's pins (no agent needed). Endpoint 0 is "no endpoint"; configured endpoints count
/// from 1 in file order.
pub fn reason_counter(
    dirs: &AgentDirs,
    reason: tollgate_common::Reason,
    endpoint: u32,
) -> tollgate_common::Counter {
    use aya::maps::{Map, MapData, PerCpuArray};
    let data = MapData::from_pin(dirs.counters_pin()).expect("reason counters pin");
    let map: PerCpuArray<MapData, tollgate_common::Counter> =
        PerCpuArray::try_from(Map::from_map_data(data).expect("map")).expect("per-cpu array");
    let slots = map
        .get(&tollgate_common::reason_counter_index(reason, endpoint), 0)
        .expect("counters");
    tollgate_common::Counter::sum(slots.iter())
}

/// The cost multiplier (Q8: 256 is none) the kernel holds back (endpoint, plan) with, read
/// from an agent's pins (no agent needed). Endpoints count from 1, plans from 0, in file order.
pub fn hold_back(dirs: &AgentDirs, endpoint: u32, plan: u16) -> u16 {
    use aya::maps::{Array, Map, MapData};
    let path = tollgate::pins::maps_dir(&dirs.pin_dir).join(tollgate_common::map_names::HOLD_BACK);
    let data = MapData::from_pin(&path).expect("hold-back pin");
    let map: Array<MapData, u16> =
        Array::try_from(Map::from_map_data(data).expect("map")).expect("array");
    map.get(&tollgate_common::policy::hold_back_index(endpoint, plan), 0)
        .expect("hold-back slot")
}

/// Writes the simulated GPU source's `file` with `tollgate gpu simulate`: one GPU at `util`.
pub fn simulate_gpu(file: &Path, util: f64) {
    let out = Command::new(tollgate_bin())
        .args(["gpu", "simulate", "--util", &util.to_string(), "--file"])
        .arg(file)
        .output()
        .expect("gpu simulate");
    assert!(out.status.success(), "{out:?}");
}
