//! The CLI verbs: all but `run`, `config check`, `counters`, `completions` and `man` talk to
//! the agent over the control socket.

pub mod args;
pub mod print;
pub mod token;
pub mod top;

use std::{path::Path, process::ExitCode, time::Duration};

use tollgate::control::{
    client::{self, ClientError},
    protocol::{ErrorKind, Request, Response},
};

/// Documented exit codes (see `tollgate --help` and docs/cli.md).
pub mod exit {
    pub const OK: u8 = 0;
    /// The agent refused the request (bad input, unknown name).
    pub const REFUSED: u8 = 1;
    // 2: command-line usage error, returned by clap itself.
    /// No agent answers on the control socket.
    pub const NO_AGENT: u8 = 3;
    /// Not allowed on the control socket.
    pub const PERMISSION: u8 = 4;
    /// The configuration is invalid; nothing changed.
    pub const CONFIG: u8 = 5;
    /// The kernel refused an operation (load, attach, map update).
    pub const KERNEL: u8 = 6;
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
            eprintln!("tollgate: {message}");
            ExitCode::from(exit_code_for(kind))
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::from(match e {
                ClientError::NotRunning(_) => exit::NO_AGENT,
                ClientError::PermissionDenied(_) => exit::PERMISSION,
                ClientError::Io { .. } => exit::NO_AGENT,
            })
        }
    }
}
