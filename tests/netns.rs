//! Network-namespace labs for tests that send real packets through the real agent.
//!
//! Every namespace, link and pin directory made here has a name unique to this process and
//! this lab, and a guard that removes it on drop (a panicking test included). Addresses come
//! only from 198.18.0.0/15 and 2001:db8::/32, and nothing is routed out of the lab.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Read as _,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Where `ip netns add` bind-mounts namespaces.
const NETNS_RUN_DIR: &str = "/var/run/netns";
/// The root bpffs; an agent started by [`Agent::start`] pins under it.
const BPFFS: &str = "/sys/fs/bpf";
/// IFNAMSIZ minus the terminating NUL.
const MAX_IFNAME: usize = 15;
/// What the agent logs once the program is attached (pinning happens before attaching, so the
/// pin alone does not say the program sees packets yet).
const AGENT_READY_LOG: &str = "attached; enforcing";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process; with the pid it names things no parallel test process
/// can be using.
fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Runs `cmd` to completion and returns its stdout; panics with its stderr if it fails, since a
/// lab that is half built cannot give a meaningful result.
fn checked(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Moves the calling thread into the network namespace bound at `path`. Only this thread
/// moves: the rest of the test process stays where it was.
fn enter_netns(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: setns only reads the descriptor, which `file` keeps open for the call; with
    // CLONE_NEWNET it changes the namespace of this thread alone.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns({}): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Deletes namespaces this module named (`tg-<pid>-<n>-<role>`) whose process is gone: a test
/// killed outright (SIGKILL from a harness timeout) runs no Drop. Only dead owners' namespaces
/// go, so parallel test processes never lose theirs.
fn sweep_orphans() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(NETNS_RUN_DIR) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('-');
            let (Some("tg"), Some(pid), Some(n), Some(_role), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            if n.parse::<u32>().is_err() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            eprintln!("note: deleting namespace {name} left by dead process {pid}");
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stdin(Stdio::null())
                .status();
        }
    });
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `tg-<pid>-<n>-<role>`.
    pub fn new(role: &str) -> NetNs {
        sweep_orphans();
        let name = format!("tg-{}-{}-{role}", std::process::id(), next_id());
        if !Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            // Only a killed run of a process that had this very pid can have left the name
            // behind (a live one would be this process), so it is safe to take it over.
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
            checked(Command::new("ip").args(["netns", "add", &name]));
        }
        // Loopback is down in a new namespace; servers in it (metrics, Prometheus) need it.
        checked(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        NetNs { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, for `setns` and `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// `ip -n NAME ARGS...`; panics if it fails; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` in this namespace. `nsenter --net` rather than
    /// `ip netns exec`: the latter remounts /sys, which hides the root bpffs from the program.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program ARGS...` in this namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args);
        cmd.stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result (a panic
    /// in `f` is resumed here). Sockets opened by `f` belong to the namespace for good, so
    /// they can be returned and used from any thread.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter_netns(&path);
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`NetNs::run`], without waiting: for servers that must run while the test sends.
    pub fn spawn<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> JoinHandle<T> {
        let path = self.path();
        std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                enter_netns(&path);
                f()
            })
            .expect("spawning a thread")
    }

    /// The kernel's counters for interface `ifname` in this namespace.
    pub fn link_stats(&self, ifname: &str) -> LinkStats {
        let json = self.ip(&["-j", "-s", "link", "show", "dev", ifname]);
        let v: serde_json::Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("parsing `ip -j -s link show dev {ifname}`: {e}: {json}"));
        let stats = &v[0]["stats64"];
        let field = |dir: &str, name: &str| {
            stats[dir][name]
                .as_u64()
                .unwrap_or_else(|| panic!("no stats64.{dir}.{name} for {ifname}: {json}"))
        };
        LinkStats {
            tx_packets: field("tx", "packets"),
            tx_bytes: field("tx", "bytes"),
            tx_dropped: field("tx", "dropped"),
            rx_packets: field("rx", "packets"),
            rx_bytes: field("rx", "bytes"),
            rx_dropped: field("rx", "dropped"),
        }
    }

    /// How an XDP program is attached to `ifname`, if one is.
    pub fn xdp_attach(&self, ifname: &str) -> Option<XdpAttach> {
        let json = self.ip(&["-j", "-d", "link", "show", "dev", ifname]);
        let v: serde_json::Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("parsing `ip -j -d link show dev {ifname}`: {e}: {json}"));
        // enum in include/uapi/linux/if_link.h: XDP_ATTACHED_{NONE,DRV,SKB,HW,MULTI}.
        match v[0]["xdp"]["mode"].as_u64()? {
            1 => Some(XdpAttach::Native),
            2 => Some(XdpAttach::Generic),
            3 => Some(XdpAttach::Offload),
            4 => Some(XdpAttach::Multi),
            _ => None,
        }
    }

    /// Polls `ifname`'s counters until neither tx nor rx has moved for `quiet`, at most `limit`;
    /// returns the last reading. Sockets return before their last packet (a FIN's ACK, a
    /// delayed ACK) has left, and the receiving side's NAPI poll lags the sender, so counters
    /// are only comparable once the link has settled.
    pub fn wait_link_quiet(&self, ifname: &str, quiet: Duration, limit: Duration) -> LinkStats {
        let start = Instant::now();
        let mut last = self.link_stats(ifname);
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            assert!(
                start.elapsed() < limit,
                "{ifname} in {} did not go quiet within {limit:?}: {last:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
            let now = self.link_stats(ifname);
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
        last
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the interfaces in it, veth peers included.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// How an XDP program is attached, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    Native,
    Generic,
    Offload,
    Multi,
}

/// An interface's counters (`stats64`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
}

impl LinkStats {
    /// What moved since `before`.
    pub fn since(&self, before: &LinkStats) -> LinkStats {
        LinkStats {
            tx_packets: self.tx_packets - before.tx_packets,
            tx_bytes: self.tx_bytes - before.tx_bytes,
            tx_dropped: self.tx_dropped - before.tx_dropped,
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            rx_dropped: self.rx_dropped - before.rx_dropped,
        }
    }
}

/// Two hosts, each in its own namespace, joined by one veth pair:
/// `client_if` (`198.18.x.1`, `2001:db8:x::1`) to `server_if` (`.2`, `::2`).
///
/// The link carries only what a test sends. Neighbours are static, so there is no ARP or
/// neighbour discovery; the interfaces are NOARP, which keeps IPv6 from joining solicited-node
/// groups (and so from sending MLD reports for them); they get no link-local address, so there
/// is no DAD, router solicitation or MLD from one; the global addresses skip DAD.
pub struct Lab {
    pub client: NetNs,
    pub server: NetNs,
    pub client_if: String,
    pub server_if: String,
    pub client_mac: String,
    pub server_mac: String,
    pub client_v4: Ipv4Addr,
    pub server_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub server_v6: Ipv6Addr,
}

impl Lab {
    pub fn new() -> Lab {
        Lab::with_queues(1)
    }

    /// A lab whose veth ends have `queues` rx/tx queues, so that traffic from senders on
    /// different CPUs is received (and runs XDP) on different CPUs.
    pub fn with_queues(queues: u32) -> Lab {
        let queues = queues.to_string();
        let client = NetNs::new("cli");
        let server = NetNs::new("srv");
        let id = next_id();
        let pid = std::process::id();
        // The two ends live only inside the lab's namespaces, so the names cannot collide with
        // anything; they are unique anyway so that a leak is traceable to its process.
        let client_if = format!("tg{pid:x}{id:x}c");
        let server_if = format!("tg{pid:x}{id:x}s");
        assert!(
            client_if.len() <= MAX_IFNAME,
            "interface name {client_if} is too long"
        );
        // One /24 (and /64) of 198.18.0.0/15 per lab, so parallel labs also differ in their
        // addresses and a stray packet says which lab sent it.
        let subnet = (pid.wrapping_mul(31).wrapping_add(id) % 512) as u16;
        let [hi, lo] = subnet.to_be_bytes();
        let v4 = |host| Ipv4Addr::new(198, 18 + hi, lo, host);
        let v6 = |host| Ipv6Addr::new(0x2001, 0xdb8, subnet, 0, 0, 0, 0, host);
        let mac = |host: u8| format!("02:74:67:{hi:02x}:{lo:02x}:{host:02x}");
        let lab = Lab {
            client_mac: mac(1),
            server_mac: mac(2),
            client_v4: v4(1),
            server_v4: v4(2),
            client_v6: v6(1),
            server_v6: v6(2),
            client,
            server,
            client_if,
            server_if,
        };
        // Both ends are created inside their namespaces, so they never appear in the root one.
        checked(Command::new("ip").args([
            "link",
            "add",
            &lab.client_if,
            "netns",
            lab.client.name(),
            "address",
            &lab.client_mac,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "type",
            "veth",
            "peer",
            "name",
            &lab.server_if,
            "netns",
            lab.server.name(),
            "address",
            &lab.server_mac,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
        ]));
        let sides = [
            (
                &lab.client,
                &lab.client_if,
                lab.client_v4,
                lab.client_v6,
                lab.server_v4,
                lab.server_v6,
                &lab.server_mac,
            ),
            (
                &lab.server,
                &lab.server_if,
                lab.server_v4,
                lab.server_v6,
                lab.client_v4,
                lab.client_v6,
                &lab.client_mac,
            ),
        ];
        for (ns, ifname, own4, own6, peer4, peer6, peer_mac) in sides {
            let ifname = ifname.as_str();
            ns.ip(&["link", "set", ifname, "arp", "off", "addrgenmode", "none"]);
            ns.ip(&["addr", "add", &format!("{own4}/24"), "dev", ifname]);
            ns.ip(&["addr", "add", &format!("{own6}/64"), "dev", ifname, "nodad"]);
            ns.ip(&["link", "set", ifname, "up"]);
            for peer in [peer4.to_string(), peer6.to_string()] {
                ns.ip(&[
                    "neigh",
                    "replace",
                    &peer,
                    "lladdr",
                    peer_mac,
                    "nud",
                    "permanent",
                    "dev",
                    ifname,
                ]);
            }
        }
        lab
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

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

impl AgentDirs {
    pub fn new() -> AgentDirs {
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
        let mut cmd = ns.command(tollgate_bin());
        cmd.arg("run")
            .arg("--pin-dir")
            .arg(&dirs.pin_dir)
            .arg("--state-dir")
            .arg(&dirs.state_dir)
            .arg("--control-socket")
            .arg(&dirs.socket)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // If the test process is killed outright (a harness timeout), no Drop runs; the agent
        // then gets SIGTERM from the kernel. The signal is tied to the thread that spawns the
        // agent, so the guard must not outlive that thread (tests keep it on their own).
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
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

/// Sends raw Ethernet frames out of `ifname` in `ns` through an AF_PACKET socket: exact
/// frames (any source address, TCP or UDP, any port) into the veth, one `send` per frame.
pub fn send_frames(ns: &NetNs, ifname: &str, frames: &[Vec<u8>]) {
    let ifname = ifname.to_owned();
    ns.run(|| {
        let c = std::ffi::CString::new(ifname.as_str()).expect("ifname");
        // SAFETY: plain syscalls on a socket this closure owns; every pointer passed is to a
        // live, correctly sized local.
        unsafe {
            let ifindex = libc::if_nametoindex(c.as_ptr());
            assert!(ifindex != 0, "no interface {ifname}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            for f in frames {
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    f.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

/// A second client host: its own namespace and veth pair into the lab's server namespace,
/// with its own /24 (198.19.x.0/24 counterpart of the lab's) and routes both ways. The agent
/// must be told to enforce on `server_if` too.
pub struct SecondClient {
    pub ns: NetNs,
    pub client_if: String,
    pub server_if: String,
    pub client_v4: Ipv4Addr,
    pub server_v4: Ipv4Addr,
}

impl Lab {
    pub fn add_client(&self) -> SecondClient {
        // The lab's /24 moved to its twin with the top bit of the third octet flipped.
        self.add_nth_client(4)
    }
}

/// Sends frames out of a namespace's interface at a steady, adjustable rate from its own
/// thread until dropped: the traffic of the controller tests.
pub struct FrameBlaster {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Frames per second, changeable while it runs.
    rate: Arc<AtomicU32>,
    thread: Option<JoinHandle<u64>>,
}

impl FrameBlaster {
    pub fn start(ns: &NetNs, ifname: &str, frame: Vec<u8>, per_second: u32) -> FrameBlaster {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rate = Arc::new(AtomicU32::new(per_second));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&rate));
        let ifname = ifname.to_owned();
        let thread = ns.spawn(move || {
            let c = std::ffi::CString::new(ifname).expect("ifname");
            let mut sent = 0u64;
            // SAFETY: socket syscalls on a socket this thread owns; pointers are to locals
            // of the sizes passed.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = libc::if_nametoindex(c.as_ptr()) as i32;
                addr.sll_halen = 6;
                let mut next = Instant::now();
                // Bounded: a test that forgets to stop it still ends within ten minutes.
                let limit = Instant::now() + Duration::from_secs(600);
                while !s.load(Ordering::Relaxed) && Instant::now() < limit {
                    let per = r.load(Ordering::Relaxed).max(1);
                    next += Duration::from_secs(1) / per;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else if now - next > Duration::from_millis(50) {
                        // Fell behind (the machine was busy): do not burst to catch up.
                        next = now;
                    }
                    let n = libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&raw const addr).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if n > 0 {
                        sent += 1;
                    }
                }
                libc::close(fd);
            }
            sent
        });
        FrameBlaster {
            stop,
            rate,
            thread: Some(thread),
        }
    }

    pub fn set_rate(&self, per_second: u32) {
        self.rate.store(per_second, Ordering::Relaxed);
    }

    /// Stops and returns how many frames were sent.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for FrameBlaster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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

impl Lab {
    /// An extra client: client `n` (1 to 7) gets the /24 whose third octet is the lab's XOR
    /// `n × 0x20`, so extra clients never share a /24 with each other or with the lab's
    /// client (the anonymous allowance is per /24). `add_client` is client 4.
    pub fn add_nth_client(&self, n: u8) -> SecondClient {
        assert!((1..=7).contains(&n), "extra client {n}: 1 to 7");
        let ns = NetNs::new("cl2");
        let id = next_id();
        let pid = std::process::id();
        let client_if = format!("tg{pid:x}{id:x}d");
        let server_if = format!("tg{pid:x}{id:x}t");
        assert!(
            client_if.len() <= MAX_IFNAME,
            "interface name {client_if} is too long"
        );
        let o = self.client_v4.octets();
        let third = o[2] ^ (n << 5);
        let client_v4 = Ipv4Addr::new(o[0], o[1], third, 1);
        let server_v4 = Ipv4Addr::new(o[0], o[1], third, 2);
        checked(Command::new("ip").args([
            "link",
            "add",
            &client_if,
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &server_if,
            "netns",
            self.server.name(),
        ]));
        ns.ip(&["addr", "add", &format!("{client_v4}/24"), "dev", &client_if]);
        ns.ip(&["link", "set", &client_if, "up"]);
        ns.ip(&["route", "add", "default", "via", &server_v4.to_string()]);
        self.server
            .ip(&["addr", "add", &format!("{server_v4}/24"), "dev", &server_if]);
        self.server.ip(&["link", "set", &server_if, "up"]);
        SecondClient {
            ns,
            client_if,
            server_if,
            client_v4,
            server_v4,
        }
    }
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
