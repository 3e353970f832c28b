//! A real Sentinel setup for the store's tests: a primary and one replica (`redis-server`,
//! test_server.rs) and three `redis-sentinel` processes (quorum 2) on 127.0.0.1 free ports,
//! each with its config file in its own temp dir. The data nodes share one ACL file with
//! the three users docs/fleet.md documents, with exactly its rules ([`NODE_RULES`],
//! [`SENTINEL_RULES`], [`REPLICA_RULES`]), so the tests prove those rules suffice. Short timeouts (down after 1 s) so a failover
//! takes a few seconds. Everything is killed and every directory removed on drop, panic
//! included (each process is owned by a guard).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{
    SentinelTarget,
    test_server::{RedisServer, USER, free_port, random_hex, temp_dir, write_certificates},
};

/// The service name the sentinels monitor.
pub const SERVICE: &str = "tollgate-store";
/// Sentinels' `down-after-milliseconds`: how long a silent primary takes to be called down.
pub const DOWN_AFTER_MS: u64 = 1000;

/// The tollgate nodes' ACL rules: the pool's keys only, no pub/sub, reads, writes and
/// transactions, nothing dangerous (no KEYS, FLUSHALL, CONFIG, DEBUG…) except ROLE (the
/// primary check) and WAIT.
pub const NODE_RULES: &str = "~tollgate:* resetchannels -@all +@read +@write +@transaction \
                              +@connection -@dangerous +role +wait +time";
/// The sentinels' user on the data nodes (Redis's Sentinel documentation's list).
pub const SENTINEL_RULES: &str = "allchannels -@all +multi +slaveof +ping +exec +subscribe \
                                  +config|rewrite +role +publish +info +client|setname \
                                  +client|kill +script|kill";
/// The replicas' user on the primary.
pub const REPLICA_RULES: &str = "-@all +psync +replconf +ping";
pub const SENTINEL_USER: &str = "tollgate-sentinel";
pub const REPLICA_USER: &str = "tollgate-replica";

/// The passwords of the three users and the ACL file the data nodes share, and with TLS the
/// certificates every process shares (one CA, a certificate for 127.0.0.1).
pub struct Acl {
    /// [`USER`]'s (the tollgate nodes').
    pub node: String,
    pub sentinel: String,
    pub replica: String,
    /// The certificates' directory (`ca.pem`, `server.pem`, `server.key`), removed on drop.
    pub certs: Option<PathBuf>,
}

impl Drop for Acl {
    fn drop(&mut self) {
        if let Some(d) = &self.certs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Acl {
    fn new(tls: bool) -> Acl {
        let certs = tls.then(|| {
            let d = temp_dir("sentinel-certs");
            write_certificates(&d);
            d
        });
        Acl {
            node: random_hex(24),
            sentinel: random_hex(24),
            replica: random_hex(24),
            certs,
        }
    }

    /// The CA's file, with TLS.
    pub fn ca(&self) -> Option<PathBuf> {
        self.certs.as_ref().map(|d| d.join("ca.pem"))
    }

    fn text(&self) -> String {
        format!(
            "user default off\nuser {USER} on >{} {NODE_RULES}\n\
             user {SENTINEL_USER} on >{} {SENTINEL_RULES}\n\
             user {REPLICA_USER} on >{} {REPLICA_RULES}\n",
            self.node, self.sentinel, self.replica
        )
    }

    /// A data node; `replica_of`: the primary's port it follows. Every node can follow
    /// another (masteruser/masterauth), as an old primary must after a failover.
    pub fn server(&self, replica_of: Option<u16>, extra: &[&str]) -> RedisServer {
        let port = replica_of.map(|p| p.to_string());
        let mut args = vec!["--masteruser", REPLICA_USER, "--masterauth", &self.replica];
        if let Some(p) = &port {
            args.extend(["--replicaof", "127.0.0.1", p.as_str()]);
        }
        if self.certs.is_some() {
            // Replicas reach their primary over TLS too.
            args.extend(["--tls-replication", "yes"]);
        }
        args.extend(extra);
        RedisServer::start_with_acl(&self.text(), &self.node, self.certs.as_deref(), &args)
    }
}

/// Whether the node on `server` is a replica in sync with its primary (`ROLE`).
pub fn replica_in_sync(server: &RedisServer) -> bool {
    let role = server.cli(&["ROLE"]);
    let lines: Vec<&str> = role.lines().collect();
    lines.first() == Some(&"slave") && lines.get(3) == Some(&"connected")
}

/// One `redis-sentinel` process.
pub struct SentinelProc {
    child: Child,
    pub port: u16,
    dir: PathBuf,
    /// With TLS, the CA's file (the sentinel listens with TLS only).
    ca: Option<PathBuf>,
}

impl SentinelProc {
    /// A sentinel monitoring `127.0.0.1:<primary>` as [`SERVICE`] with `quorum`, reaching the
    /// data nodes as [`SENTINEL_USER`] with `acl.sentinel` (over TLS with `acl.certs`).
    pub fn start(primary: u16, quorum: u32, acl: &Acl, down_after_ms: u64) -> SentinelProc {
        let dir = temp_dir("sentinel");
        let password = &acl.sentinel;
        let mut log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.join("sentinel.conf");
            let listen = match &acl.certs {
                None => format!("port {port}\n"),
                Some(c) => format!(
                    "port 0\ntls-port {port}\ntls-cert-file {c}/server.pem\n\
                     tls-key-file {c}/server.key\ntls-ca-cert-file {c}/ca.pem\n\
                     tls-auth-clients no\ntls-replication yes\n",
                    c = c.display()
                ),
            };
            // Sentinel rewrites its file (it records what it learns), so it is ours, not shared.
            std::fs::write(
                &conf,
                format!(
                    "{listen}bind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                     logfile {dir}/sentinel.log\n\
                     sentinel monitor {SERVICE} 127.0.0.1 {primary} {quorum}\n\
                     sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n\
                     sentinel failover-timeout {SERVICE} 4000\n\
                     sentinel parallel-syncs {SERVICE} 1\n\
                     sentinel auth-user {SERVICE} {SENTINEL_USER}\n\
                     sentinel auth-pass {SERVICE} {password}\n",
                    dir = dir.display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
                .spawn()
                .expect("redis-sentinel (cargo xtask setup installs it)");
            let mut s = SentinelProc {
                child,
                port,
                dir: dir.clone(),
                ca: acl.ca(),
            };
            for _ in 0..100 {
                if let Ok(Some(_)) = s.child.try_wait() {
                    break;
                }
                if s.cli(&["PING"]).trim() == "PONG" {
                    return s;
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            let _ = s.child.kill();
            let _ = s.child.wait();
            log = std::fs::read_to_string(dir.join("sentinel.log")).unwrap_or_default()
                + &std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            // Dropping `s` would remove the directory the next try needs.
            s.dir = PathBuf::new();
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("redis-sentinel did not start; log: {log}");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis-cli` to this sentinel (no AUTH: the test sentinels have none); stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        if let Some(ca) = &self.ca {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        let out = cmd
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The port this sentinel names as the primary now.
    pub fn primary_port(&self) -> Option<u16> {
        let out = self.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE]);
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// A numeric field of `SENTINEL MASTER <service>` (e.g. `num-other-sentinels`).
    fn master_field(&self, name: &str) -> Option<u64> {
        let out = self.cli(&["SENTINEL", "MASTER", SERVICE]);
        let mut lines = out.lines();
        lines.by_ref().find(|l| l.trim() == name)?;
        lines.next()?.trim().parse().ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for SentinelProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The primary, the replica and three sentinels. Sentinels come first so they die first
/// (none reconfigures a node while the others are being killed).
pub struct SentinelSet {
    pub sentinels: Vec<SentinelProc>,
    /// The node that started as the primary (after a failover, the replica's role).
    pub first: RedisServer,
    /// The node that started as the replica.
    pub second: RedisServer,
    pub acl: Acl,
    /// The tollgate nodes' password (`acl.node`).
    pub password: String,
}

impl SentinelSet {
    /// Starts the set and waits until the replica is in sync and every sentinel knows the
    /// replica and the two other sentinels (needed for an agreed failover).
    pub fn start() -> SentinelSet {
        SentinelSet::start_with(false)
    }

    /// The same, every process speaking TLS only (clients, replication, sentinels).
    pub fn start_tls() -> SentinelSet {
        SentinelSet::start_with(true)
    }

    fn start_with(tls: bool) -> SentinelSet {
        let acl = Acl::new(tls);
        let first = acl.server(None, &[]);
        let second = acl.server(Some(first.port), &[]);
        wait_for("the replica to sync", 200, || replica_in_sync(&second));
        let sentinels: Vec<SentinelProc> = (0..3)
            .map(|_| SentinelProc::start(first.port, 2, &acl, DOWN_AFTER_MS))
            .collect();
        let set = SentinelSet {
            sentinels,
            first,
            second,
            password: acl.node.clone(),
            acl,
        };
        // Sentinels find replicas by INFO (every 10 s at first, sooner once connected) and
        // each other by hello messages every 2 s: bounded at 20 s.
        wait_for(
            "the sentinels to know each other and the replica",
            400,
            || {
                set.sentinels.iter().all(|s| {
                    s.master_field("num-other-sentinels") == Some(2)
                        && s.master_field("num-slaves") == Some(1)
                })
            },
        );
        set
    }

    pub fn target(&self) -> SentinelTarget {
        SentinelTarget {
            service: SERVICE.into(),
            nodes: self.sentinels.iter().map(SentinelProc::addr).collect(),
            tls: self.acl.certs.is_some(),
        }
    }

    /// The primary's port if all sentinels name the same one.
    pub fn agreed_primary(&self) -> Option<u16> {
        let first = self.sentinels[0].primary_port()?;
        self.sentinels[1..]
            .iter()
            .all(|s| s.primary_port() == Some(first))
            .then_some(first)
    }

    /// `SENTINEL FAILOVER`: the replica promoted without waiting for agreement (the old
    /// primary stays up and is turned into a replica).
    pub fn failover(&self) {
        let out = self.sentinels[0].cli(&["SENTINEL", "FAILOVER", SERVICE]);
        assert_eq!(out.trim(), "OK", "SENTINEL FAILOVER: {out}");
    }

    /// Waits (bounded, 20 s) until every sentinel names a primary other than `old`, and
    /// that node answers as a primary; its port.
    pub fn wait_new_primary(&self, old: u16) -> u16 {
        let mut new = 0;
        wait_for(
            "the sentinels to agree on a new primary",
            400,
            || match self.agreed_primary() {
                Some(p) if p != old && self.node(p).cli(&["ROLE"]).starts_with("master") => {
                    new = p;
                    true
                }
                _ => false,
            },
        );
        new
    }

    /// The data node on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        if self.first.port == port {
            &self.first
        } else {
            assert_eq!(self.second.port, port, "no data node on {port}");
            &self.second
        }
    }

    pub fn logs(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("--- sentinel {}\n{}", s.port, s.log()))
            .collect()
    }
}

/// Polls `ok` every 50 ms, at most `tries` times; panics naming `what`.
pub fn wait_for(what: &str, tries: u32, mut ok: impl FnMut() -> bool) {
    for _ in 0..tries {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

impl SentinelSet {
    /// Brings a node back after [`RedisServer::kill`] of `first`: a fresh server (new port,
    /// same password) replicating from the primary on `primary`, so writes can be
    /// acknowledged again; the sentinels find it through the primary's INFO.
    pub fn replace_first(&mut self, primary: u16) {
        self.first = self.acl.server(Some(primary), &[]);
    }

    /// A stale answer on purpose: a writable replica (of a port nobody listens on) and a
    /// sentinel of its own that monitors it as [`SERVICE`] (quorum 1, down after a minute,
    /// so within a test it keeps naming the replica as the primary).
    pub fn rogue(&self) -> (RedisServer, SentinelProc) {
        let nobody = free_port().to_string();
        let replica = self.acl.server(
            None,
            &[
                "--replicaof",
                "127.0.0.1",
                &nobody,
                "--replica-read-only",
                "no",
            ],
        );
        let sentinel = SentinelProc::start(replica.port, 1, &self.acl, 60_000);
        wait_for("the stale sentinel to name the replica", 200, || {
            sentinel.primary_port() == Some(replica.port)
        });
        (replica, sentinel)
    }
}
