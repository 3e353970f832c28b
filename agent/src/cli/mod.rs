//! The CLI verbs, one module per verb: each owns its clap arguments and its `run` function.
//! All but `run`, `config`, `counters`, `gpu`, `keys`, `token issue|verify`, `completions`
//! and `man` talk to the agent over the control socket.

pub mod args;
pub mod print;

pub mod bind;
pub mod completions;
pub mod config;
pub mod counters;
pub mod endpoints;
pub mod explain;
pub mod fleet;
pub mod gpu;
pub mod identities;
pub mod keys;
pub mod man;
pub mod quarantine;
pub mod quota;
pub mod release;
pub mod reload;
pub mod run;
pub mod status;
pub mod token;
pub mod top;
pub mod unbind;
pub mod uninstall;
pub mod usage;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::ValueEnum;
use serde::{Serialize, de::DeserializeOwned};
use tollgate::control::{
    client::{self, ClientError},
    protocol::{ErrorKind, Request, Response},
};

/// Documented exit codes (see `tollgate --help` and docs/cli.md).
pub mod exit {
    pub const OK: u8 = 0;
    /// The agent refused the request (bad input, unknown name).
    pub const REFUSED: u8 = 1;
    /// Command-line usage error: clap's own code, also used for a command line that cannot
    /// work (`tollgate top` without a terminal), so scripts see one code for "called wrongly".
    pub const USAGE: u8 = 2;
    /// No agent answers on the control socket.
    pub const NO_AGENT: u8 = 3;
    /// Not allowed on the control socket.
    pub const PERMISSION: u8 = 4;
    /// The configuration is invalid; nothing changed.
    pub const CONFIG: u8 = 5;
    /// The kernel refused an operation (load, attach, map update).
    pub const KERNEL: u8 = 6;
    /// Anything else that went wrong (writing the man page, the terminal under `top`).
    pub const FAILURE: u8 = 1;
}

/// What a verb's `run` returns; `main` turns it into the exit status.
pub type Outcome = Result<(), Failure>;

/// The `--help` epilogue: the exit codes above, in words.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the agent refused the request (bad input, unknown name)
  2  command-line usage error
  3  no agent answers on the control socket
  4  not allowed on the control socket (root and the tollgate group only)
  5  the configuration is invalid (nothing was changed)
  6  the kernel refused an operation (load, attach, map update)";

/// Output format of the read verbs (the global `--output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// What every verb gets from the global options.
pub struct Ctx {
    /// The agent's control socket.
    pub socket: PathBuf,
    /// Where `socket` came from.
    pub socket_from: Given,
    pub output: Output,
}

/// Where a global option's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Given {
    /// The built-in default.
    Default,
    /// Its environment variable.
    Env,
    /// The command line.
    CommandLine,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }

    /// `text` for `--output text`; for `--output json`, the reply re-serialised.
    pub fn print_with<R: Serialize>(&self, text: impl FnOnce(&R)) -> impl FnOnce(R) {
        let json = self.json();
        move |r| {
            if json { print::json(&r) } else { text(&r) }
        }
    }
}

/// A failed [`Outcome`]: exits `code` after `tollgate: MSG` on stderr.
pub fn fail(code: u8, msg: impl std::fmt::Display) -> Outcome {
    Err(Failure::new(code, msg))
}

pub fn exit_code_for(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::BadRequest | ErrorKind::NotFound => exit::REFUSED,
        ErrorKind::Refused => exit::PERMISSION,
        ErrorKind::Config => exit::CONFIG,
        ErrorKind::Kernel => exit::KERNEL,
    }
}

/// Sends `req`, reads the answer as the verb's reply type `R`, prints it with `show`, and
/// maps failures to exit codes.
pub fn call<R: DeserializeOwned>(socket: &Path, req: &Request, show: impl FnOnce(R)) -> Outcome {
    show(request(socket, req, Duration::from_secs(30))?);
    Ok(())
}

/// Why a verb failed, and the exit code that says so.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
    /// Printed after `tollgate: ` (the usual), or as it is (a message that names its own
    /// source, such as a configuration error with file and line).
    prefixed: bool,
}

impl Failure {
    pub fn new(code: u8, message: impl std::fmt::Display) -> Failure {
        Failure {
            code,
            message: message.to_string(),
            prefixed: true,
        }
    }

    /// A failure whose message is printed without the `tollgate: ` prefix.
    pub fn bare(code: u8, message: impl std::fmt::Display) -> Failure {
        Failure {
            prefixed: false,
            ..Failure::new(code, message)
        }
    }

    /// Prints the message on stderr and returns the exit code.
    pub fn report(self) -> ExitCode {
        if self.prefixed {
            eprintln!("tollgate: {}", self.message);
        } else {
            eprintln!("{}", self.message);
        }
        ExitCode::from(self.code)
    }
}

/// One request, its answer read as `R`, failures mapped to the documented exit codes.
pub fn request<R: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<R, Failure> {
    match client::call(socket, req, timeout) {
        Ok(Response {
            ok: true, result, ..
        }) => serde_json::from_value(result.unwrap_or_default()).map_err(|e| {
            Failure::new(
                exit::REFUSED,
                format!(
                    "the agent's answer could not be read ({e}): is it the same version as this \
                     CLI?"
                ),
            )
        }),
        Ok(Response { error, .. }) => Err(match error {
            Some(e) => Failure::new(exit_code_for(e.kind), e.message),
            None => Failure::new(exit::REFUSED, "refused"),
        }),
        Err(e) => Err(Failure::new(
            match e {
                ClientError::PermissionDenied(_) => exit::PERMISSION,
                ClientError::NotRunning(_) | ClientError::Io { .. } => exit::NO_AGENT,
            },
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        os::unix::net::UnixListener,
    };

    use tollgate::control::{
        protocol::ErrorBody,
        reply::{Bound, Status},
    };

    use super::*;

    /// An agent that answers one request with `answer` on a fresh socket.
    fn fake_agent(name: &str, answer: Response) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tollgate-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("control.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let mut out = serde_json::to_vec(&answer).unwrap();
            out.push(b'\n');
            (&stream).write_all(&out).unwrap();
        });
        socket
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn replies_are_read_as_their_type_and_failures_keep_their_exit_codes() {
        let bound = Bound {
            target: "198.18.0.5/32".into(),
            identity: "acme".into(),
            expires_unix_ms: None,
        };
        let socket = fake_agent("ok", Response::ok(serde_json::to_value(&bound).unwrap()));
        let req = Request::Status {};
        assert_eq!(request::<Bound>(&socket, &req, T).unwrap(), bound);

        // An answer that is not the verb's reply (an agent of another version) is refused
        // with a message that says so, not shown half-read.
        let socket = fake_agent("odd", Response::ok(serde_json::json!({"packets": 1})));
        let f = request::<Status>(&socket, &req, T).unwrap_err();
        assert_eq!(f.code, exit::REFUSED);
        assert!(f.message.contains("could not be read"), "{}", f.message);

        let socket = fake_agent(
            "config",
            Response {
                ok: false,
                result: None,
                error: Some(ErrorBody {
                    kind: ErrorKind::Config,
                    message: "line 3: unknown key".into(),
                    label: None,
                }),
            },
        );
        let f = request::<Status>(&socket, &req, T).unwrap_err();
        assert_eq!(
            (f.code, f.message.as_str()),
            (exit::CONFIG, "line 3: unknown key")
        );

        let gone = std::env::temp_dir().join("tollgate-cli-no-such-dir/control.sock");
        assert_eq!(
            request::<Status>(&gone, &req, T).unwrap_err().code,
            exit::NO_AGENT
        );
        for name in ["ok", "odd", "config"] {
            let dir =
                std::env::temp_dir().join(format!("tollgate-cli-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
