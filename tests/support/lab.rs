//! Network-namespace labs for tests that send real packets through the real agent.
//!
//! Every namespace, link and pin directory made here has a name unique to this process and
//! this lab, and a guard that removes it on drop (a panicking test included). Addresses come
//! only from 198.18.0.0/15 and 2001:db8::/32, and nothing is routed out of the lab.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Where `ip netns add` bind-mounts namespaces.
const NETNS_RUN_DIR: &str = "/var/run/netns";
/// IFNAMSIZ minus the terminating NUL.
const MAX_IFNAME: usize = 15;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process; with the pid it names things no parallel test process
/// can be using.
pub(crate) fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Runs `cmd` to completion and returns its stdout; panics with its stderr if it fails, since a
/// lab that is half built cannot give a meaningful result.
pub(crate) fn checked(cmd: &mut Command) -> String {
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
            if n.parse::<u32>().is_err() || !owner_is_dead(pid) {
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

/// Whether `pid`, the test process a namespace or directory is named after, is a number and no
/// longer runs: what it left can go (its Drop never ran: SIGKILL, or SIGTERM from a harness).
pub(crate) fn owner_is_dead(pid: &str) -> bool {
    pid.parse::<u32>()
        .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
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
        veth_pair(&ns, &client_if, &self.server, &server_if);
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

impl Lab {
    /// Adds host `n` of the lab's client /24 to the client's interface, and a static neighbour
    /// for it on the server (the lab runs without ARP), so a client socket can bind to it and
    /// the server's answers reach it.
    pub fn add_client_address(&self, n: u8) -> Ipv4Addr {
        let o = self.client_v4.octets();
        let addr = Ipv4Addr::new(o[0], o[1], o[2], n);
        self.client
            .ip(&["addr", "add", &format!("{addr}/24"), "dev", &self.client_if]);
        self.server.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &self.client_mac,
            "nud",
            "permanent",
            "dev",
            &self.server_if,
        ]);
        addr
    }
}

/// A veth pair between two namespaces: `a_if` in `a`, `b_if` in `b` (both down, unaddressed).
pub fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    checked(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]));
}
