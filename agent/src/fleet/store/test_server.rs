//! A real `redis-server` for the store's tests: 127.0.0.1 on a free port, its own temp dir,
//! no persistence, the default user off and one ACL user with a generated password (from a
//! generated ACL file). Killed and its directory removed on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use super::Credentials;

pub const USER: &str = "tollgate-node";

pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub password: String,
    /// The CA that signed the server's certificate, when it listens with TLS only.
    pub ca: Option<PathBuf>,
}

static N: AtomicU32 = AtomicU32::new(0);

/// `bytes` random bytes as hex: passwords.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl RedisServer {
    /// Starts a server; `extra` are further `redis-server` arguments.
    pub fn start(extra: &[&str]) -> RedisServer {
        RedisServer::launch(extra, Tls::Off, None)
    }

    /// Starts a server with the ACL file `acl` (whole; the default user's line included),
    /// in which [`USER`] has `password`: servers that replicate from each other (and the
    /// sentinels watching them) share one file.
    /// `certs`: TLS only, with the certificates [`write_certificates`] wrote there (servers
    /// that replicate over TLS share one CA).
    pub fn start_with_acl(
        acl: &str,
        password: &str,
        certs: Option<&std::path::Path>,
        extra: &[&str],
    ) -> RedisServer {
        let tls = certs.map_or(Tls::Off, Tls::In);
        RedisServer::launch(extra, tls, Some((acl, password)))
    }

    /// Starts a server that speaks TLS only, with a certificate for 127.0.0.1 from a CA made
    /// here (rcgen); `ca` is that CA's PEM.
    pub fn start_tls() -> RedisServer {
        RedisServer::launch(&[], Tls::Own, None)
    }

    fn launch(extra: &[&str], tls: Tls, acl: Option<(&str, &str)>) -> RedisServer {
        let dir = temp_dir("redis");
        let (acl_text, password) = match acl {
            Some((text, password)) => (text.to_string(), password.to_string()),
            None => {
                let password = random_hex(24);
                (
                    format!("user default off\nuser {USER} on >{password} ~tollgate:* &* +@all\n"),
                    password,
                )
            }
        };
        let acl = dir.join("users.acl");
        std::fs::write(&acl, acl_text).unwrap();
        let certs = match tls {
            Tls::Off => None,
            Tls::Own => {
                write_certificates(&dir);
                Some(dir.clone())
            }
            Tls::In(p) => Some(p.to_path_buf()),
        };
        let ca = certs.as_ref().map(|c| c.join("ca.pem"));
        // A free port: bind :0, read it, let go; a lost race shows as a failed start, retried.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new("redis-server");
            let port_text = port.to_string();
            if let Some(certs) = &certs {
                cmd.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port_text,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(certs.join("server.pem"))
                .arg("--tls-key-file")
                .arg(certs.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(certs.join("ca.pem"));
            } else {
                cmd.args(["--port", &port_text]);
            }
            cmd.args(["--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&dir)
                .arg("--aclfile")
                .arg(&acl)
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap());
            let child = cmd
                .spawn()
                .expect("redis-server (cargo xtask setup installs it)");
            let mut server = RedisServer {
                child,
                port,
                dir: dir.clone(),
                password: password.clone(),
                ca: ca.clone(),
            };
            if server.wait_ready() {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
            last_log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
                + &std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            // Dropping `server` would remove the directory the next try needs.
            server.dir = PathBuf::new();
        }
        panic!("redis-server did not start; log: {last_log}");
    }

    fn wait_ready(&mut self) -> bool {
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.cli(&["PING"]).trim() == "PONG" {
                return true;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        false
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn credentials(&self) -> Credentials {
        Credentials::new(USER, &self.password)
    }

    /// `redis-cli` as the ACL user (password through the environment, not argv); stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_as(USER, &self.password, args)
    }

    /// `redis-cli` as another ACL user; stdout.
    pub fn cli_as(&self, user: &str, password: &str, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        if let Some(ca) = &self.ca {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        let out = cmd
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--user",
                user,
            ])
            .args(args)
            .env("REDISCLI_AUTH", password)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("redis-cli (cargo xtask setup installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ends the server at once (SIGKILL): no goodbye to clients or replicas.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh empty directory under the temp dir, named for `what`, this process and a counter
/// (the caller removes it).
pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A free port on 127.0.0.1: bind :0, read it, let go (a lost race shows as a failed start,
/// which the callers retry).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where a server's TLS certificates come from.
enum Tls<'a> {
    Off,
    /// Made for it, in its own directory.
    Own,
    /// Shared, in this directory ([`write_certificates`]).
    In(&'a std::path::Path),
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files in `dir`
/// (`ca.pem`, `server.pem`, `server.key`); returns the CA's path.
pub fn write_certificates(dir: &std::path::Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: with rcgen's default name on both, OpenSSL (redis-cli) takes the
    // leaf for self-signed and refuses it.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tollgate fleet test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("server.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("server.key"), leaf_key.serialize_pem()).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    ca
}

/// Another CA's certificate (trusted by nobody here), for the wrong-CA test.
pub fn other_ca(dir: &std::path::Path) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let p = dir.join("other-ca.pem");
    std::fs::write(&p, params.self_signed(&key).unwrap().pem()).unwrap();
    p
}
