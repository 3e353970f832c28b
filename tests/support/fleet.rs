//! A fleet lab (#14): N node namespaces, each with its own agent, pin and state directories,
//! bind listener and model-server stand-in; one real `redis-server` (Debian's) in a store
//! namespace reached by all; client namespaces that reach every node with one address each,
//! as a load balancer that keeps the source address would. Everyone sits on one bridge (in
//! a fabric namespace of its own), on a /24 of 198.18.0.0/15 unique to the lab, with static
//! neighbours (ARP off, as in [`crate::lab::Lab`]).
//!
//! The nodes share a pool key, a credentials file for the store's ACL user, the token keys
//! and one certificate valid for every node's address. Everything made here is removed on
//! drop (namespaces, directories, the store process).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, AgentDirs, tollgate_bin},
    config::{Config, Endpoint, Fleet, FleetSentinel, Plan, Tokens},
    lab::{NetNs, next_id, veth_pair},
    tokenlab::{
        AUDIENCE, BIND_CLASSES, BIND_PORT, MODEL_PORT, curl_bind, generate_keys, self_signed,
    },
};

pub const STORE_PORT: u16 = 6379;
/// A UDP port of the `customer` class on every node, for probes that count datagrams.
pub const PROBE_PORT: u16 = 7000;
pub const STORE_USER: &str = "tollgate-node";
pub const POOL: &str = "lab";
const BRIDGE: &str = "br0";

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A real `redis-server` in `ns` on `addr`:`port`, no persistence (a restart comes back
/// empty), the default user off and the nodes' ACL user with a generated password (plus the
/// sentinels' and replicas' users in a Sentinel set). Killed on drop.
pub struct Redis {
    child: Option<Child>,
    ns_name: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub password: String,
    dir: PathBuf,
    extra: Vec<String>,
}

/// The nodes' rules: the pool's keys, reads, writes, transactions, `ROLE` and `WAIT`, nothing
/// dangerous (docs/fleet.md, Sentinel; the store client's Sentinel tests run under the same).
const NODE_RULES: &str = "~tollgate:* resetchannels -@all +@read +@write +@transaction \
                          +@connection -@dangerous +role +wait +time";
const SENTINEL_RULES: &str = "allchannels -@all +multi +slaveof +ping +exec +subscribe \
                              +config|rewrite +role +publish +info +client|setname \
                              +client|kill +script|kill";
const REPLICA_RULES: &str = "-@all +psync +replconf +ping";
pub const SERVICE: &str = "tollgate-store";

impl Redis {
    fn start(ns: &NetNs, addr: Ipv4Addr, dir: &Path) -> Redis {
        let password = random_hex(24);
        let acl = format!("user default off\nuser {STORE_USER} on >{password} {NODE_RULES}\n");
        Redis::start_with(ns, addr, STORE_PORT, dir, &acl, password, Vec::new())
    }

    fn start_with(
        ns: &NetNs,
        addr: Ipv4Addr,
        port: u16,
        dir: &Path,
        acl: &str,
        password: String,
        extra: Vec<String>,
    ) -> Redis {
        std::fs::create_dir_all(dir).expect("store dir");
        std::fs::write(dir.join("users.acl"), acl).expect("acl file");
        let mut r = Redis {
            child: None,
            ns_name: ns.name().to_owned(),
            addr,
            port,
            password,
            dir: dir.to_owned(),
            extra,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns_name, "redis-server"])
            .args(["--bind", &self.addr.to_string(), "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--aclfile")
            .arg(self.dir.join("users.acl"))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server on {}:{} did not answer", self.addr, self.port);
    }

    /// `redis-cli` as the nodes' ACL user; stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(
            &self.ns_name,
            self.addr,
            self.port,
            Some((STORE_USER, &self.password)),
            args,
        )
    }

    /// SIGKILL: a store that dies with everything in memory.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new server on the same address, empty (no persistence).
    pub fn restart_empty(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli` in namespace `ns` against `addr`:`port`, as `auth` (user, password) if given;
/// stdout.
fn redis_cli(
    ns: &str,
    addr: Ipv4Addr,
    port: u16,
    auth: Option<(&str, &str)>,
    args: &[&str],
) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "redis-cli", "-h"])
        .arg(addr.to_string())
        .args(["-p", &port.to_string()]);
    if let Some((user, password)) = auth {
        c.args(["--user", user, "--pass", password, "--no-auth-warning"]);
    }
    let out = c
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A primary (the lab's [`Redis`] on [`STORE_PORT`]), one replica and three sentinels (quorum
/// 2, a silent primary down after 1 s), Debian's binaries, all in the store namespace.
pub struct SentinelSet {
    pub replica: Redis,
    sentinels: Vec<Child>,
    pub ports: Vec<u16>,
    ns_name: String,
    addr: Ipv4Addr,
}

impl SentinelSet {
    pub const PORTS: [u16; 3] = [26379, 26380, 26381];
    const REPLICA_PORT: u16 = 6380;

    /// `redis-cli` against sentinel `i` (no auth: sentinels have none); stdout.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        redis_cli(&self.ns_name, self.addr, self.ports[i], None, args)
    }

    /// The primary the sentinels name now (`host:port`).
    pub fn primary(&self) -> String {
        let out = self.cli(0, &["SENTINEL", "get-master-addr-by-name", SERVICE]);
        out.split_whitespace().collect::<Vec<_>>().join(":")
    }

    /// `SENTINEL FAILOVER`: the replica is promoted, the old primary made its replica.
    pub fn failover(&self) {
        let out = self.cli(0, &["SENTINEL", "FAILOVER", SERVICE]);
        assert!(out.trim() == "OK", "SENTINEL FAILOVER: {out}");
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for c in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sentinel_set(ns: &NetNs, addr: Ipv4Addr, dir: &Path, primary: &mut Redis) -> SentinelSet {
    let (spw, rpw) = (random_hex(24), random_hex(24));
    let acl = format!(
        "user default off\nuser {STORE_USER} on >{} {NODE_RULES}\n\
         user tollgate-sentinel on >{spw} {SENTINEL_RULES}\n\
         user tollgate-replica on >{rpw} {REPLICA_RULES}\n",
        primary.password
    );
    // The primary too takes the replicas' user, to follow the new primary after a failover.
    let follow = vec![
        "--masteruser".to_owned(),
        "tollgate-replica".to_owned(),
        "--masterauth".to_owned(),
        rpw.clone(),
    ];
    std::fs::write(primary.dir.join("users.acl"), &acl).expect("acl");
    primary.extra = follow.clone();
    primary.restart_empty();
    let mut extra = follow;
    extra.extend([
        "--replicaof".to_owned(),
        addr.to_string(),
        STORE_PORT.to_string(),
    ]);
    let replica = Redis::start_with(
        ns,
        addr,
        SentinelSet::REPLICA_PORT,
        &dir.join("replica"),
        &acl,
        primary.password.clone(),
        extra,
    );
    let mut sentinels = Vec::new();
    for port in SentinelSet::PORTS {
        let sdir = dir.join(format!("sentinel-{port}"));
        std::fs::create_dir_all(&sdir).expect("sentinel dir");
        let conf = sdir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind {addr}\ndaemonize no\ndir {d}\n\
                 sentinel monitor {SERVICE} {addr} {STORE_PORT} 2\n\
                 sentinel down-after-milliseconds {SERVICE} 1000\n\
                 sentinel failover-timeout {SERVICE} 4000\n\
                 sentinel auth-user {SERVICE} tollgate-sentinel\n\
                 sentinel auth-pass {SERVICE} {spw}\n",
                d = sdir.display()
            ),
        )
        .expect("sentinel conf");
        sentinels.push(
            Command::new("ip")
                .args(["netns", "exec", ns.name(), "redis-sentinel"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-sentinel (cargo xtask setup installs it)"),
        );
    }
    let set = SentinelSet {
        replica,
        sentinels,
        ports: SentinelSet::PORTS.to_vec(),
        ns_name: ns.name().to_owned(),
        addr,
    };
    // Ready: the replica in sync, and every sentinel knowing the others and the replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let synced = set.replica.cli(&["ROLE"]).contains("connected");
        let known = (0..3).all(|i| {
            let m = set.cli(i, &["SENTINEL", "master", SERVICE]);
            let v: Vec<&str> = m.lines().map(str::trim).collect();
            let field = |k: &str| {
                v.iter()
                    .position(|l| *l == k)
                    .and_then(|p| v.get(p + 1))
                    .copied()
            };
            field("num-other-sentinels") == Some("2") && field("num-slaves") == Some("1")
        });
        if synced && known {
            return set;
        }
        assert!(
            Instant::now() < deadline,
            "the Sentinel set did not settle: replica ROLE {:?}; sentinel 0: {:?}",
            set.replica.cli(&["ROLE"]),
            set.cli(0, &["SENTINEL", "master", SERVICE])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A model-server stand-in on `addr`:MODEL_PORT in `ns`: "ok\n" to every connection.
fn model_server(ns: &NetNs, addr: Ipv4Addr) -> std::thread::JoinHandle<()> {
    let sa = SocketAddr::new(IpAddr::V4(addr), MODEL_PORT);
    let listener = ns.run(|| TcpListener::bind(sa).expect("model port"));
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"ok\n");
        }
    })
}

pub struct FleetNode {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub ifname: String,
    pub dirs: AgentDirs,
    pub config: PathBuf,
    pub agent: Option<Agent>,
    _model: std::thread::JoinHandle<()>,
}

pub struct Client {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
}

pub struct FleetLab {
    pub nodes: Vec<FleetNode>,
    pub clients: Vec<Client>,
    /// Declared before `redis`: sentinels stop before the primary they watch.
    pub sentinel: Option<SentinelSet>,
    pub redis: Redis,
    pub store: NetNs,
    _fabric: NetNs,
    /// Keys, certificate, pool key and credentials (shared by the nodes).
    pub shared: AgentDirs,
    pub keys: PathBuf,
    pub ca: PathBuf,
}

fn default_plan() -> Plan {
    Plan::new("customer").packets(1000, 1000)
}

impl FleetLab {
    /// `nodes` nodes and `clients` clients; agents not started ([`FleetLab::start_all`]).
    pub fn new(nodes: usize, clients: usize) -> FleetLab {
        FleetLab::build(nodes, clients, false, default_plan())
    }

    /// As [`FleetLab::new`], the nodes finding the primary through three sentinels, with
    /// one replica ([`SentinelSet`]).
    pub fn with_sentinel(nodes: usize, clients: usize) -> FleetLab {
        FleetLab::build(nodes, clients, true, default_plan())
    }

    /// Likewise, with `plan` (it must be named `customer`: the tokens' plan) in place of
    /// the default one: e.g. a fleet-wide plan.
    pub fn with_plan(nodes: usize, clients: usize, plan: Plan) -> FleetLab {
        FleetLab::build(nodes, clients, false, plan)
    }

    fn build(nodes: usize, clients: usize, with_sentinel: bool, plan: Plan) -> FleetLab {
        assert_eq!(plan.name, "customer", "tokens are placed on plan customer");
        crate::require_root();
        assert!((1..=8).contains(&nodes) && (1..=8).contains(&clients));
        let pid = std::process::id();
        let id = next_id();
        let subnet = (pid.wrapping_mul(37).wrapping_add(id * 7 + 3) % 512) as u16;
        let [hi, lo] = subnet.to_be_bytes();
        let ip = |host: u8| Ipv4Addr::new(198, 18 + hi, lo, host);
        let mac = |host: u8| format!("02:74:68:{hi:02x}:{lo:02x}:{host:02x}");
        let fabric = NetNs::new("fab");
        fabric.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        fabric.ip(&["link", "set", BRIDGE, "up"]);
        // (namespace, host number, interface name)
        let mut members: Vec<(NetNs, u8, String)> = Vec::new();
        let store = NetNs::new("store");
        members.push((store, 250, String::new()));
        for i in 0..clients {
            members.push((NetNs::new(&format!("c{i}")), 100 + i as u8, String::new()));
        }
        for i in 0..nodes {
            members.push((NetNs::new(&format!("n{i}")), 1 + i as u8, String::new()));
        }
        let hosts: Vec<u8> = members.iter().map(|m| m.1).collect();
        for (k, (ns, host, ifname)) in members.iter_mut().enumerate() {
            *ifname = format!("tg{pid:x}{id:x}m{k}");
            let fab_if = format!("tg{pid:x}{id:x}f{k}");
            veth_pair(ns, ifname, &fabric, &fab_if);
            fabric.ip(&["link", "set", &fab_if, "master", BRIDGE, "up"]);
            ns.ip(&["link", "set", ifname, "address", &mac(*host)]);
            ns.ip(&["link", "set", ifname, "arp", "off", "addrgenmode", "none"]);
            ns.ip(&["addr", "add", &format!("{}/24", ip(*host)), "dev", ifname]);
            ns.ip(&["link", "set", ifname, "up"]);
            for peer in hosts.iter().filter(|h| **h != *host) {
                ns.ip(&[
                    "neigh",
                    "replace",
                    &ip(*peer).to_string(),
                    "lladdr",
                    &mac(*peer),
                    "nud",
                    "permanent",
                    "dev",
                    ifname,
                ]);
            }
        }
        let shared = AgentDirs::new();
        let keys = shared.state_dir.join("keys");
        generate_keys(&keys);
        let node_ips: Vec<String> = (0..nodes).map(|i| ip(1 + i as u8).to_string()).collect();
        let (ca, tls_key) = self_signed(&shared.state_dir, node_ips);
        let pool_key = shared.state_dir.join("pool.key");
        write_private(&pool_key, &random_hex(32));
        let mut it = members.into_iter();
        let (store, _, _) = it.next().expect("store");
        let mut redis = Redis::start(&store, ip(250), &shared.state_dir.join("redis"));
        let sentinel = with_sentinel.then(|| {
            sentinel_set(
                &store,
                ip(250),
                &shared.state_dir.join("sentinel"),
                &mut redis,
            )
        });
        let creds = shared.state_dir.join("store.credentials");
        write_private(
            &creds,
            &format!(
                "user = \"{STORE_USER}\"\npassword = \"{}\"\n",
                redis.password
            ),
        );
        let mut client_list = Vec::new();
        let mut node_list = Vec::new();
        for (ns, host, ifname) in it {
            if host >= 100 {
                client_list.push(Client { ns, ip: ip(host) });
                continue;
            }
            let dirs = AgentDirs::new();
            let node_ip = ip(host);
            let config = Config::new(std::slice::from_ref(&ifname))
                .anonymous(200, 600)
                .listen_bind(SocketAddr::new(IpAddr::V4(node_ip), BIND_PORT))
                .tokens(Tokens {
                    jwks: keys.join("jwks.json"),
                    audience: AUDIENCE.into(),
                    tls_cert: ca.clone(),
                    tls_key: tls_key.clone(),
                    max_ttl_s: Some(600),
                    default_class: Some("customer".into()),
                    default_plan: Some("customer".into()),
                    clock_skew_s: Some(2),
                    ..Tokens::default()
                })
                .fleet(Fleet {
                    store: (!with_sentinel).then(|| format!("redis://{}:{STORE_PORT}", ip(250))),
                    sentinel: with_sentinel.then(|| FleetSentinel {
                        service: SERVICE.into(),
                        nodes: SentinelSet::PORTS
                            .iter()
                            .map(|p| format!("{}:{p}", ip(250)))
                            .collect(),
                    }),
                    credentials: Some(creds.clone()),
                    pool_key: pool_key.clone(),
                    pool: POOL.into(),
                    node: format!("node-{host}"),
                    sync_interval_ms: Some(250),
                    op_timeout_ms: Some(500),
                })
                .plan(plan.clone())
                .endpoint(Endpoint::tcp("model", MODEL_PORT, &["customer"]))
                .endpoint(Endpoint::udp("probe", PROBE_PORT, &["customer"]))
                .endpoint(Endpoint::tcp("bind", BIND_PORT, &BIND_CLASSES).anonymous())
                .write(&dirs.state_dir.join("tollgate.toml"));
            let model = model_server(&ns, node_ip);
            node_list.push(FleetNode {
                ns,
                ip: node_ip,
                ifname,
                dirs,
                config,
                agent: None,
                _model: model,
            });
        }
        FleetLab {
            nodes: node_list,
            clients: client_list,
            sentinel,
            redis,
            store,
            _fabric: fabric,
            shared,
            keys,
            ca,
        }
    }

    pub fn start(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let config = n.config.to_str().expect("path").to_owned();
        n.agent = Some(Agent::launch(
            &n.ns,
            &n.dirs,
            &["--config", &config, "--mode", "native"],
        ));
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// SIGTERM and wait: the program stays attached (pins), as after a node's restart.
    pub fn stop(&mut self, i: usize) {
        if let Some(a) = self.nodes[i].agent.take() {
            a.stop();
        }
    }

    /// `tollgate token issue` for `identity` (class and plan `customer`), with token id `id`.
    pub fn issue(&self, identity: &str, ttl: &str, id: &str) -> String {
        let out = Command::new(tollgate_bin())
            .args(["token", "issue", "--key"])
            .arg(self.keys.join("k1.key.json"))
            .args(["--identity", identity, "--audience", AUDIENCE])
            .args(["--ttl", ttl, "--id", id])
            .output()
            .expect("token issue");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// POST /v1/bind from client `c` on node `n`: (HTTP status, JSON body).
    pub fn bind(&self, c: usize, n: usize, token: &str) -> (u16, serde_json::Value) {
        curl_bind(
            &self.clients[c].ns,
            self.nodes[n].ip,
            &self.ca,
            "POST",
            token,
            5,
        )
    }

    /// Whether node `n`'s model server answers client `c` within `wait`.
    pub fn served(&self, c: usize, n: usize, wait: Duration) -> bool {
        let addr = SocketAddr::new(IpAddr::V4(self.nodes[n].ip), MODEL_PORT);
        self.clients[c]
            .ns
            .run(|| match TcpStream::connect_timeout(&addr, wait) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(wait));
                    let mut buf = [0u8; 3];
                    s.read_exact(&mut buf).is_ok() && &buf == b"ok\n"
                }
                Err(_) => false,
            })
    }

    /// Polls until `served(c, n)` is `want` on every node in `nodes`, at most `limit`;
    /// returns the nodes where it never was.
    pub fn wait_served(
        &self,
        c: usize,
        nodes: &[usize],
        want: bool,
        limit: Duration,
    ) -> Vec<usize> {
        let deadline = Instant::now() + limit;
        let mut left: Vec<usize> = nodes.to_vec();
        while !left.is_empty() && Instant::now() < deadline {
            left.retain(|n| self.served(c, *n, Duration::from_millis(300)) != want);
            if !left.is_empty() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        left
    }

    /// Client `c` sends `per_node` UDP datagrams to each node's probe port, evenly over
    /// `span` (round robin); returns how many each node's socket received. What the kernel
    /// admitted, counted by the server, not by the agent.
    pub fn probe(&self, c: usize, span: Duration, per_node: u32) -> Vec<u32> {
        // The receiving side is [`Probes`]; the sending side sends exactly `per_node` each
        // (a paced [`Senders`] sends what its slices owe, about that many).
        let probes = Probes::start(self);
        let targets: Vec<SocketAddr> = self
            .nodes
            .iter()
            .map(|n| SocketAddr::new(IpAddr::V4(n.ip), PROBE_PORT))
            .collect();
        let me = SocketAddr::new(IpAddr::V4(self.clients[c].ip), 0);
        let sender = self.clients[c]
            .ns
            .run(|| std::net::UdpSocket::bind(me).expect("client"));
        let total = per_node * targets.len() as u32;
        let start = Instant::now();
        for i in 0..total {
            let at = start + span.mul_f64(f64::from(i) / f64::from(total));
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = sender.send_to(&i.to_le_bytes(), targets[i as usize % targets.len()]);
        }
        // The last datagrams in flight.
        std::thread::sleep(Duration::from_millis(200));
        probes.counts().into_iter().map(|n| n as u32).collect()
    }

    /// Gives node `n` its own credentials file naming `password` (for its next start).
    pub fn set_store_password(&mut self, n: usize, password: &str) {
        let creds = self.nodes[n].dirs.state_dir.join("store.credentials");
        write_private(
            &creds,
            &format!("user = \"{STORE_USER}\"\npassword = \"{password}\"\n"),
        );
        let text = std::fs::read_to_string(&self.nodes[n].config).expect("config");
        let shared = self.shared.state_dir.join("store.credentials");
        let text = text.replace(&shared.display().to_string(), &creds.display().to_string());
        std::fs::write(&self.nodes[n].config, text).expect("config");
    }

    /// The CLI against node `n`'s agent; stdout (panics unless it exits 0).
    pub fn cli_ok(&self, n: usize, args: &[&str]) -> String {
        self.nodes[n].dirs.cli_ok(args)
    }

    pub fn fleet_status(&self, n: usize) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(n, &["fleet", "status", "--output", "json"]))
            .expect("fleet status JSON")
    }

    /// One scrape of node `n`'s /metrics (the default listener, inside its namespace).
    pub fn metrics(&self, n: usize) -> String {
        crate::scrape::scrape_within(
            &self.nodes[n].ns,
            "127.0.0.1:9464".parse().expect("addr"),
            Duration::from_secs(10),
        )
    }

    /// The value of the sample `series` (name and labels as printed) in node `n`'s scrape.
    pub fn metric(&self, n: usize, series: &str) -> Option<f64> {
        self.metrics(n).lines().find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok()).flatten()
        })
    }

    pub fn audit(&self, n: usize) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.nodes[n].dirs.state_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn stderr(&self, n: usize) -> String {
        self.nodes[n]
            .agent
            .as_ref()
            .map(|a| a.stderr())
            .unwrap_or_default()
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("private file");
    f.write_all(text.as_bytes()).expect("write");
}

/// Counts what reaches each node's [`PROBE_PORT`] (a UDP socket in the node's namespace:
/// after XDP, so only what the agent admitted), datagrams and frame bytes, by node.
pub struct Probes {
    stop: Arc<AtomicBool>,
    pub datagrams: Vec<Arc<AtomicU64>>,
    /// Frame bytes as the kernel counts them (payload + UDP, IPv4 and Ethernet headers).
    pub bytes: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Ethernet (14) + IPv4 (20) + UDP (8).
pub const UDP_FRAME_OVERHEAD: u64 = 42;

impl Probes {
    pub fn start(lab: &FleetLab) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let (mut datagrams, mut bytes, mut threads) = (Vec::new(), Vec::new(), Vec::new());
        for n in &lab.nodes {
            let addr = SocketAddr::new(IpAddr::V4(n.ip), PROBE_PORT);
            let s = n.ns.run(|| UdpSocket::bind(addr).expect("probe socket"));
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let (d, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            datagrams.push(Arc::clone(&d));
            bytes.push(Arc::clone(&b));
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(len) = s.recv(&mut buf) {
                        d.fetch_add(1, Ordering::Relaxed);
                        b.fetch_add(len as u64 + UDP_FRAME_OVERHEAD, Ordering::Relaxed);
                    }
                }
            }));
        }
        Probes {
            stop,
            datagrams,
            bytes,
            threads,
        }
    }

    /// Datagrams received so far, per node.
    pub fn counts(&self) -> Vec<u64> {
        self.datagrams
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect()
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Datagrams per second per node over `window` (sleeps it).
    pub fn rates_over(&self, window: Duration) -> Vec<f64> {
        let (a, t) = (self.counts(), Instant::now());
        std::thread::sleep(window);
        let (b, dt) = (self.counts(), t.elapsed().as_secs_f64());
        a.iter().zip(b).map(|(a, b)| (b - a) as f64 / dt).collect()
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Paced UDP senders from client `c` to every node's [`PROBE_PORT`], one thread each, at a
/// rate per node that can be changed while they run ([`Senders::set`]).
pub struct Senders {
    stop: Arc<AtomicBool>,
    rates: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

/// No sender runs longer than this, whatever its caller forgot.
const SEND_LIMIT: Duration = Duration::from_secs(300);

impl Senders {
    /// `payload` bytes per datagram; `rates[n]` datagrams per second to node `n`.
    pub fn start(lab: &FleetLab, c: usize, payload: usize, rates: &[u64]) -> Senders {
        assert_eq!(rates.len(), lab.nodes.len());
        let stop = Arc::new(AtomicBool::new(false));
        let (mut cells, mut threads) = (Vec::new(), Vec::new());
        let client_ip = lab.clients[c].ip;
        for (n, rate) in lab.nodes.iter().zip(rates) {
            let to = SocketAddr::new(IpAddr::V4(n.ip), PROBE_PORT);
            let s = lab.clients[c].ns.run(|| {
                UdpSocket::bind(SocketAddr::new(IpAddr::V4(client_ip), 0)).expect("client")
            });
            let cell = Arc::new(AtomicU64::new(*rate));
            cells.push(Arc::clone(&cell));
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let buf = vec![0x5au8; payload];
                let (start, mut sent) = (Instant::now(), 0u64);
                // Paced in 10 ms slices: each slice sends what the rate owes it, so a slow
                // slice is made up in the next one (bounded to one slice's worth).
                let slice = Duration::from_millis(10);
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < SEND_LIMIT {
                    let rate = cell.load(Ordering::Relaxed);
                    let owed = (rate as f64 * slice.as_secs_f64()).round() as u64;
                    for _ in 0..owed {
                        if s.send_to(&buf, to).is_ok() {
                            sent += 1;
                        }
                    }
                    next += slice;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                sent
            }));
        }
        Senders {
            stop,
            rates: cells,
            threads,
        }
    }

    /// New rates per node.
    pub fn set(&self, rates: &[u64]) {
        for (cell, r) in self.rates.iter().zip(rates) {
            cell.store(*r, Ordering::Relaxed);
        }
    }

    /// Stops; datagrams sent per node.
    pub fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .drain(..)
            .map(|t| t.join().unwrap_or(0))
            .collect()
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
