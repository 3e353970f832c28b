//! A token lab: the agent with a `[tokens]` section, keys from `tollgate keys generate`, a
//! self-signed certificate for the bind listener, a model server stand-in on the model port,
//! and helpers to bind with curl and probe the model port from a client namespace.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use base64::Engine as _;

use crate::{
    agent::{Agent, AgentDirs, tollgate_bin},
    config::{Config, Endpoint, Plan, Tokens},
    lab::{Lab, NetNs, SecondClient},
};

pub const AUDIENCE: &str = "pool-a";
pub const MODEL_PORT: u16 = 8000;
pub const BIND_PORT: u16 = 8443;
/// The classes the bind endpoint must admit (`config check` refuses fewer): every class a
/// token can carry, so a bound client of any class can renew and unbind.
pub const BIND_CLASSES: [&str; 3] = ["internal", "partner", "customer"];

pub struct World {
    pub lab: Lab,
    pub dirs: AgentDirs,
    pub config: PathBuf,
    pub keys: PathBuf,
    pub ca: PathBuf,
    extra_ifaces: Vec<String>,
    _model: std::thread::JoinHandle<()>,
}

/// A model server stand-in: answers "ok\n" to every TCP connection on MODEL_PORT.
pub fn model_server(lab: &Lab) -> std::thread::JoinHandle<()> {
    let addr = SocketAddr::new(IpAddr::V4(lab.server_v4), MODEL_PORT);
    let listener = lab
        .server
        .run(|| TcpListener::bind(addr).expect("model port"));
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"ok\n");
        }
    })
}

/// `method` /v1/bind on the bind listener at `server` with curl from `ns`, as a client does,
/// trusting `ca`, giving up after `max_time_s`: (HTTP status, JSON body); status 0 when curl
/// got no answer, body `null` when it is not JSON.
pub fn curl_bind(
    ns: &NetNs,
    server: std::net::Ipv4Addr,
    ca: &std::path::Path,
    method: &str,
    token: &str,
    max_time_s: u32,
) -> (u16, serde_json::Value) {
    let url = format!("https://{server}:{BIND_PORT}/v1/bind");
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", &max_time_s.to_string(), "--cacert"])
        .arg(ca)
        .args(["-X", method, "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-w", "\n%{http_code}", &url])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (code, json)
}

/// `tollgate keys generate` (EdDSA, kid `k1`) into `dir`: `k1.key.json` (the signing key)
/// and `jwks.json`.
pub fn generate_keys(dir: &std::path::Path) {
    let out = std::process::Command::new(tollgate_bin())
        .args([
            "keys",
            "generate",
            "--alg",
            "eddsa",
            "--kid",
            "k1",
            "--out-dir",
        ])
        .arg(dir)
        .output()
        .expect("keys generate");
    assert!(out.status.success(), "{out:?}");
}

/// A self-signed certificate for `names` (the addresses a bind listener answers on), written
/// as `cert.pem` and `key.pem` in `dir`: (certificate, key). The certificate is its own CA.
pub fn self_signed(dir: &std::path::Path, names: Vec<String>) -> (PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(names).expect("cert");
    let (ca, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&ca, cert.cert.pem()).expect("cert");
    std::fs::write(&key, cert.signing_key.serialize_pem()).expect("key");
    (ca, key)
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl World {
    pub fn new(extra: Option<&SecondClient>) -> World {
        crate::require_root();
        let lab = Lab::new();
        World::with_lab(lab, extra.map(|c| c.server_if.clone()))
    }

    pub fn with_lab(lab: Lab, extra_iface: Option<String>) -> World {
        let dirs = AgentDirs::new();
        let kit = TokenKit::new(&dirs, lab.server_v4);
        let mut ifaces = vec![lab.server_if.clone()];
        ifaces.extend(extra_iface.clone());
        let config = Config::new(&ifaces)
            .anonymous(200, 600)
            .listen_bind(SocketAddr::new(IpAddr::V4(lab.server_v4), BIND_PORT))
            .tokens(Tokens {
                clock_skew_s: Some(2),
                max_token_bytes: Some(4096),
                ..kit.tokens()
            })
            .plan(Plan::new("customer").packets(1000, 1000))
            .endpoint(Endpoint::tcp("model", MODEL_PORT, &["customer"]))
            .endpoint(Endpoint::tcp("bind", BIND_PORT, &BIND_CLASSES).anonymous())
            .write(&dirs.state_dir.join("tollgate.toml"));
        let model = model_server(&lab);
        World {
            lab,
            dirs,
            config,
            keys: kit.keys,
            ca: kit.ca,
            extra_ifaces: extra_iface.into_iter().collect(),
            _model: model,
        }
    }

    pub fn start(&self) -> Agent {
        let config = self.config.to_str().expect("path");
        let _ = &self.extra_ifaces;
        Agent::launch(
            &self.lab.server,
            &self.dirs,
            &["--config", config, "--mode", "native"],
        )
    }

    pub fn issue(&self, identity: &str, ttl: &str, id: &str) -> String {
        let out = std::process::Command::new(tollgate_bin())
            .args(["token", "issue", "--key"])
            .arg(self.keys.join("k1.key.json"))
            .args([
                "--identity",
                identity,
                "--audience",
                AUDIENCE,
                "--ttl",
                ttl,
                "--id",
                id,
            ])
            .output()
            .expect("token issue");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// POST (or DELETE) /v1/bind with curl from `ns`: (HTTP status, JSON body).
    pub fn http(&self, ns: &NetNs, method: &str, token: &str) -> (u16, serde_json::Value) {
        curl_bind(ns, self.lab.server_v4, &self.ca, method, token, 5)
    }

    /// Whether the model server answers a TCP connection from `ns` within `wait`.
    pub fn model_answers(&self, ns: &NetNs, wait: Duration) -> bool {
        let addr = SocketAddr::new(IpAddr::V4(self.lab.server_v4), MODEL_PORT);
        ns.run(|| match TcpStream::connect_timeout(&addr, wait) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(wait));
                let mut buf = [0u8; 3];
                s.read_exact(&mut buf).is_ok() && &buf == b"ok\n"
            }
            Err(_) => false,
        })
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dirs.state_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line"))
            .collect()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.dirs.cli_ok(&["status", "--output", "json"])).expect("status")
    }
}

/// Token material for a lab that writes its own configuration (where [`World`]'s fixed one
/// does not fit): a signing key and its JWKS from `tollgate keys generate` (kid `k1`, audience
/// [`AUDIENCE`]), and a self-signed certificate for a bind listener at `server`, all in the
/// state directory of `dirs`.
pub struct TokenKit {
    pub keys: PathBuf,
    pub jwks: PathBuf,
    pub ca: PathBuf,
    pub tls_key: PathBuf,
    server: std::net::Ipv4Addr,
}

impl TokenKit {
    /// The `[tokens]` section for these keys and certificate: audience [`AUDIENCE`], tokens of
    /// at most 10 minutes, class and plan `customer` unless a token says otherwise.
    pub fn tokens(&self) -> Tokens {
        Tokens {
            jwks: self.jwks.clone(),
            audience: AUDIENCE.into(),
            tls_cert: self.ca.clone(),
            tls_key: self.tls_key.clone(),
            max_ttl_s: Some(600),
            default_class: Some("customer".into()),
            default_plan: Some("customer".into()),
            ..Tokens::default()
        }
    }

    pub fn new(dirs: &AgentDirs, server: std::net::Ipv4Addr) -> TokenKit {
        let keys = dirs.state_dir.join("keys");
        generate_keys(&keys);
        let (ca, tls_key) = self_signed(&dirs.state_dir, vec![server.to_string()]);
        TokenKit {
            jwks: keys.join("jwks.json"),
            keys,
            ca,
            tls_key,
            server,
        }
    }

    /// `tollgate token issue` for `identity` with class and plan claims.
    pub fn issue(&self, identity: &str, class: &str, plan: &str, ttl: &str) -> String {
        let out = std::process::Command::new(tollgate_bin())
            .args(["token", "issue", "--key"])
            .arg(self.keys.join("k1.key.json"))
            .args(["--identity", identity, "--class", class, "--plan", plan])
            .args(["--audience", AUDIENCE, "--ttl", ttl])
            .output()
            .expect("token issue");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// POST /v1/bind with curl from `ns`, as a client does: (HTTP status, JSON body).
    pub fn bind(&self, ns: &NetNs, token: &str) -> (u16, serde_json::Value) {
        curl_bind(ns, self.server, &self.ca, "POST", token, 5)
    }
}
