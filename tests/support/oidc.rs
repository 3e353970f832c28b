//! A real OpenID Provider in the lab: the npm `oidc-provider` package (tests/oidc/provider.mjs)
//! serving discovery, JWKS and client-credentials tokens over HTTPS from a namespace of its
//! own, with a certificate from a test CA; and the independent minter (tests/oidc/mint.mjs,
//! `jose`) for tokens no provider would issue.
//!
//! The provider's namespace is joined by one veth to the lab's server namespace (where the
//! agent fetches keys) and by another to the lab's client namespace (where clients get
//! tokens); neither link is one the agent enforces on, and nothing is forwarded. Its address
//! is on its loopback, in the /24 the lab would give its extra client 6
//! ([`Lab::add_nth_client`]), so a test using this lab must not add client 6.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    agent::AgentDirs,
    lab::{Lab, NetNs, next_id, veth_pair},
};

/// The lab's node project (package.json, its lock, the scripts).
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// Panics with the fix unless `cargo xtask setup` installed the lab's node modules.
pub fn require_node_modules() {
    let dir = oidc_dir().join("node_modules/oidc-provider");
    assert!(
        dir.is_dir(),
        "{} is missing: run `cargo xtask setup` (it runs `npm ci` in tests/oidc)",
        dir.display()
    );
}

/// A certificate authority of the test's own: the provider's and the bind listener's
/// certificates are issued by it, and clients (curl, the agent) trust only it.
pub struct TestCa {
    /// The CA certificate (PEM): what `ca_bundle` and `curl --cacert` name.
    pub pem: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tollgate test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, cert.pem()).expect("ca.pem");
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
            dir: dir.to_owned(),
        }
    }

    /// A server certificate for `ip`: (certificate PEM, key PEM) files named `<name>.*.pem`.
    pub fn issue(&self, ip: Ipv4Addr, name: &str) -> (PathBuf, PathBuf) {
        let params = rcgen::CertificateParams::new(vec![ip.to_string()]).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        let cert_path = self.dir.join(format!("{name}.cert.pem"));
        let key_path = self.dir.join(format!("{name}.key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("key");
        (cert_path, key_path)
    }
}

/// One client of the provider: its credentials and the extra claims its access tokens carry.
#[derive(Clone, Debug, Serialize)]
pub struct IdpClient {
    pub client_id: String,
    pub client_secret: String,
    pub claims: Value,
}

impl IdpClient {
    pub fn new(id: &str, claims: Value) -> IdpClient {
        IdpClient {
            client_id: id.to_owned(),
            client_secret: format!("{id}-secret"),
            claims,
        }
    }
}

/// How the provider runs (tests/oidc/provider.mjs says what each key does).
#[derive(Clone, Debug, Serialize)]
pub struct ProviderSpec {
    /// RS256, PS256 or ES256.
    pub alg: String,
    /// Whether the published keys carry `alg` (Entra ID's do not).
    pub jwk_alg: bool,
    pub ttl_s: u64,
    /// Resource indicator (the tokens' `aud`) → the scope granted for it.
    pub resources: serde_json::Map<String, Value>,
    pub clients: Vec<IdpClient>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_max_age: Option<u64>,
}

/// The audience of the agent's pool, and one of another pool.
pub const POOL_A: &str = "https://pool-a.example";
pub const POOL_B: &str = "https://pool-b.example";

impl ProviderSpec {
    /// `alg` keys, tokens for [`POOL_A`] and [`POOL_B`] (scope `bind`), five minutes.
    pub fn new(alg: &str, clients: Vec<IdpClient>) -> ProviderSpec {
        let mut resources = serde_json::Map::new();
        resources.insert(POOL_A.into(), json!("bind"));
        resources.insert(POOL_B.into(), json!("bind"));
        ProviderSpec {
            alg: alg.to_owned(),
            jwk_alg: true,
            ttl_s: 300,
            resources,
            clients,
            jwks_max_age: None,
        }
    }
}

/// The provider's counters (`GET /__counts`): requests since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Counts {
    pub jwks: u64,
    pub discovery: u64,
    pub token: u64,
}

/// The running provider process (`node provider.mjs` in the provider's namespace); SIGTERM on
/// drop.
struct ProviderProcess {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Drop for ProviderProcess {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects; the pid is our own child's, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// A [`Lab`] with a real OpenID Provider beside it.
pub struct OidcLab {
    pub lab: Lab,
    /// The provider's namespace.
    pub idp: NetNs,
    /// The provider's address (on its loopback).
    pub addr: Ipv4Addr,
    /// `https://<addr>`: `iss` of its tokens and `issuer` of its discovery document.
    pub issuer: String,
    pub ca: TestCa,
    /// The bind listener's certificate and key, issued by [`OidcLab::ca`].
    pub bind_cert: PathBuf,
    pub bind_key: PathBuf,
    /// Where the provider's files live (a directory of the kit's, removed on drop).
    files: AgentDirs,
    conf: PathBuf,
    spec: ProviderSpec,
    provider: Option<ProviderProcess>,
}

/// An address in the provider's /24 (see the module doc).
fn idp_net(lab: &Lab, host: u8) -> Ipv4Addr {
    let o = lab.client_v4.octets();
    Ipv4Addr::new(o[0], o[1], o[2] ^ (6 << 5), host)
}

/// Joins `ns` to the provider's namespace by a veth: `ns` gets `own` on its end and a route to
/// `idp_addr` over it; the provider's end gets the route back to `own`.
fn link_to_idp(ns: &NetNs, idp: &NetNs, own: Ipv4Addr, idp_addr: Ipv4Addr, tag: char) {
    let id = next_id();
    let pid = std::process::id();
    let near = format!("tg{pid:x}{id:x}{tag}");
    let far = format!("tg{pid:x}{id:x}p");
    veth_pair(ns, &near, idp, &far);
    ns.ip(&["addr", "add", &format!("{own}/32"), "dev", &near]);
    ns.ip(&["link", "set", &near, "up"]);
    ns.ip(&[
        "route",
        "add",
        &format!("{idp_addr}/32"),
        "dev",
        &near,
        "src",
        &own.to_string(),
    ]);
    idp.ip(&["link", "set", &far, "up"]);
    idp.ip(&["route", "add", &format!("{own}/32"), "dev", &far]);
}

impl OidcLab {
    /// Builds the provider's namespace and links beside `lab`, a CA, the provider's
    /// certificate and the bind listener's (for the lab's server address), and starts the
    /// provider.
    pub fn new(lab: Lab, spec: ProviderSpec) -> OidcLab {
        crate::require_root();
        require_node_modules();
        let idp = NetNs::new("idp");
        let addr = idp_net(&lab, 100);
        idp.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        link_to_idp(&lab.server, &idp, idp_net(&lab, 1), addr, 'j');
        link_to_idp(&lab.client, &idp, idp_net(&lab, 5), addr, 'k');
        // The kit's temporary directory (its pin directory is never made): removed on drop,
        // and swept if a killed test leaves it.
        let files = AgentDirs::new();
        let dir = files.state_dir.clone();
        let ca = TestCa::new(&dir);
        let (cert, key) = ca.issue(addr, "idp");
        let (bind_cert, bind_key) = ca.issue(lab.server_v4, "bind");
        let issuer = format!("https://{addr}");
        let conf = dir.join("provider.json");
        let mut lab = OidcLab {
            lab,
            idp,
            addr,
            issuer,
            ca,
            bind_cert,
            bind_key,
            files,
            conf,
            spec,
            provider: None,
        };
        lab.write_conf(&cert, &key);
        lab.start_provider();
        lab
    }

    fn write_conf(&self, cert: &Path, key: &Path) {
        let mut conf = serde_json::to_value(&self.spec).expect("spec");
        conf["issuer"] = json!(self.issuer);
        conf["host"] = json!(self.addr.to_string());
        conf["port"] = json!(443);
        conf["cert"] = json!(cert);
        conf["key"] = json!(key);
        conf["keys"] = json!(self.files.state_dir.join("provider-keys.json"));
        std::fs::write(&self.conf, conf.to_string()).expect("provider.json");
    }

    /// Starts the provider (again, after [`OidcLab::stop_provider`]: same issuer, same keys)
    /// and returns once it accepts connections.
    pub fn start_provider(&mut self) {
        assert!(self.provider.is_none(), "the provider is already running");
        let mut cmd = self.idp.command("node");
        cmd.arg(oidc_dir().join("provider.mjs"))
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A test killed outright runs no Drop: the provider goes with it.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting node provider.mjs");
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("listening ") {
                    let _ = tx.send(());
                }
                sink.lock().expect("log").push_str(&format!("{line}\n"));
            }
        });
        let sink = Arc::clone(&output);
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            sink.lock().expect("log").push_str(&text);
        });
        let process = ProviderProcess { child, output };
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let out = process.output.lock().expect("log").clone();
            panic!("the OpenID Provider did not start within 30 s:\n{out}");
        }
        self.provider = Some(process);
    }

    /// Stops the provider (SIGTERM): its address then refuses connections.
    pub fn stop_provider(&mut self) {
        assert!(
            self.provider.take().is_some(),
            "the provider is not running"
        );
    }

    /// What the provider printed (warnings, errors), for failure messages.
    pub fn provider_output(&self) -> String {
        self.provider
            .as_ref()
            .map(|p| p.output.lock().expect("log").clone())
            .unwrap_or_default()
    }

    /// curl from `ns` (the client, or the provider's own namespace for its control
    /// endpoints): (HTTP status, body).
    fn curl(&self, ns: &NetNs, args: &[&str], path: &str) -> (u16, String) {
        let url = format!("{}{path}", self.issuer);
        let out = ns
            .command("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&self.ca.pem)
            .args(args)
            .args(["-w", "\n%{http_code}", &url])
            .stdin(Stdio::null())
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// A client-credentials access token for `client` and `resource`, fetched by curl from the
    /// lab's client namespace as a client of the provider would.
    pub fn token(&self, client: &str, resource: &str) -> String {
        let c = self
            .spec
            .clients
            .iter()
            .find(|c| c.client_id == client)
            .unwrap_or_else(|| panic!("no client {client} in the provider's spec"));
        let user = format!("{}:{}", c.client_id, c.client_secret);
        let resource = format!("resource={resource}");
        let (code, body) = self.curl(
            &self.lab.client,
            &[
                "-u",
                &user,
                "-d",
                "grant_type=client_credentials",
                "-d",
                &resource,
                "-d",
                "scope=bind",
            ],
            "/token",
        );
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(
            code,
            200,
            "token request for {client}: {body}\n{}",
            self.provider_output()
        );
        v["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {body}"))
            .to_owned()
    }

    fn control(&self, method: &str, path: &str) -> Value {
        let (code, body) = self.curl(&self.idp, &["-X", method], path);
        assert_eq!(code, 200, "{method} {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// JWKS, discovery and token requests the provider has served since it (re)started.
    pub fn counts(&self) -> Counts {
        serde_json::from_value(self.control("GET", "/__counts")).expect("counts")
    }

    /// A new signing key (a new kid) first in the JWKS; returns the kid.
    pub fn rotate(&self) -> String {
        self.control("POST", "/__rotate")["kid"]
            .as_str()
            .expect("kid")
            .to_owned()
    }

    /// `normal`, `not_json` or `large` (a JWKS over 1 MiB).
    pub fn jwks_mode(&self, mode: &str) {
        self.control("POST", &format!("/__jwks_mode?mode={mode}"));
    }

    /// `Cache-Control: max-age=<s>` on the JWKS from now.
    pub fn jwks_max_age(&self, s: u64) {
        self.control("POST", &format!("/__jwks_max_age?s={s}"));
    }

    /// The JWKS as the provider publishes it.
    pub fn jwks(&self) -> Value {
        let (code, body) = self.curl(&self.idp, &[], "/jwks");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("jwks")
    }

    /// The directory for files a test writes beside the provider's (JWKS files, configs).
    pub fn dir(&self) -> &Path {
        &self.files.state_dir
    }
}

/// Runs the independent minter (tests/oidc/mint.mjs) on `request`; its JSON answer.
pub fn mint(request: &Value) -> Value {
    require_node_modules();
    let dir = std::env::temp_dir().join(format!(
        "tollgate-mint-{}-{}.json",
        std::process::id(),
        next_id()
    ));
    std::fs::write(&dir, request.to_string()).expect("mint request");
    let out = Command::new("node")
        .arg(oidc_dir().join("mint.mjs"))
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("node mint.mjs");
    let _ = std::fs::remove_file(&dir);
    assert!(
        out.status.success(),
        "mint.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("mint.mjs prints JSON")
}

/// The claims of a token (unverified: for the test's own checks).
pub fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).expect("a JWS has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON payload")
}

/// The header of a token (unverified).
pub fn header_of(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').next().expect("a JWS has a header");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url header");
    serde_json::from_slice(&bytes).expect("JSON header")
}

/// Waits up to `limit` for `f` to give `Some`, polling every `every`.
pub fn wait_for<T>(
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}
