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
}

static N: AtomicU32 = AtomicU32::new(0);

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl RedisServer {
    /// Starts a server; `extra` are further `redis-server` arguments.
    pub fn start(extra: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-redis-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let password = random_hex(24);
        let acl = dir.join("users.acl");
        std::fs::write(
            &acl,
            format!("user default off\nuser {USER} on >{password} ~tollgate:* &* +@all\n"),
        )
        .unwrap();
        // A free port: bind :0, read it, let go; a lost race shows as a failed start, retried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
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
                .stderr(Stdio::null());
            let child = cmd
                .spawn()
                .expect("redis-server (cargo xtask setup installs it)");
            let mut server = RedisServer {
                child,
                port,
                dir: dir.clone(),
                password: password.clone(),
            };
            if server.wait_ready() {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!(
            "redis-server did not start; log: {}",
            std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
        );
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
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn credentials(&self) -> Credentials {
        Credentials::new(USER, &self.password)
    }

    /// `redis-cli` as the ACL user (password through the environment, not argv); stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--user",
                USER,
            ])
            .args(args)
            .env("REDISCLI_AUTH", &self.password)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("redis-cli (cargo xtask setup installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
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
