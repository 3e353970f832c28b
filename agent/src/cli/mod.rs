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

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::ValueEnum;
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
}

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
    pub output: Output,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }

    /// `text` for `--output text`, the agent's JSON pretty-printed for `--output json`.
    pub fn print_with(
        &self,
        text: impl FnOnce(&serde_json::Value),
    ) -> impl FnOnce(&serde_json::Value) {
        let json = self.json();
        move |v| {
            if json { print::json(v) } else { text(v) }
        }
    }
}

/// Prints `tollgate: MSG` on stderr and returns `code`.
pub fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tollgate: {msg}");
    ExitCode::from(code)
}

pub fn exit_code_for(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::BadRequest | ErrorKind::NotFound => exit::REFUSED,
        ErrorKind::Refused => exit::PERMISSION,
        ErrorKind::Config => exit::CONFIG,
        ErrorKind::Kernel => exit::KERNEL,
    }
}

/// Sends `req`, prints the answer with `show`, and maps failures to exit codes.
pub fn call(socket: &Path, req: &Request, show: impl FnOnce(&serde_json::Value)) -> ExitCode {
    match client::call(socket, req, Duration::from_secs(30)) {
        Ok(Response {
            ok: true, result, ..
        }) => {
            show(&result.unwrap_or_default());
            ExitCode::from(exit::OK)
        }
        Ok(Response { error, .. }) => {
            let (kind, message) = error
                .map_or((ErrorKind::BadRequest, "refused".to_owned()), |e| {
                    (e.kind, e.message)
                });
            fail(exit_code_for(kind), message)
        }
        Err(e) => fail(
            match e {
                ClientError::NotRunning(_) => exit::NO_AGENT,
                ClientError::PermissionDenied(_) => exit::PERMISSION,
                ClientError::Io { .. } => exit::NO_AGENT,
            },
            e,
        ),
    }
}
