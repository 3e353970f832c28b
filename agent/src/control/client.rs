//! The CLI's side of the control socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::protocol::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent is listening on {0} (is `tollgate run` up? `systemctl status tollgate`)")]
    NotRunning(String),
    #[error("permission denied on {0}: the control socket is for root and the tollgate group")]
    PermissionDenied(String),
    #[error("talking to the agent on {path}: {message}")]
    Io { path: String, message: String },
}

/// Sends one request and waits (bounded) for its response.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(path.clone())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.clone()),
        _ => ClientError::Io {
            path: path.clone(),
            message: e.to_string(),
        },
    })?;
    let io = |e: std::io::Error| ClientError::Io {
        path: path.clone(),
        message: e.to_string(),
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Io {
            path,
            message: "the agent closed the connection without answering".into(),
        });
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Io {
        path,
        message: format!("unreadable answer: {e}"),
    })
}
