//! The one bounded request reader the servers share, and the one way they answer over HTTP.
//! A request is read into a `BytesMut` that never holds more than its limit (plus one byte,
//! to tell "at the limit" from "over it"), within its time limit: a slow or endless client
//! costs a connection a bounded buffer for a bounded time, nothing more.

use std::time::Duration;

use bytes::{BufMut as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How much and for how long a server reads one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("request over {0} bytes")]
    TooLarge(usize),
    #[error("no request within {} s", .0.as_secs())]
    TimedOut(Duration),
    /// The peer closed before the request was complete (what arrived is in the buffer).
    #[error("the connection closed before the request was complete")]
    Closed,
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads from `s` into `buf` until `complete` finds a whole request in it.
pub async fn read_bounded<S, T>(
    s: &mut S,
    buf: &mut BytesMut,
    limits: Limits,
    mut complete: impl FnMut(&[u8]) -> Option<T>,
) -> Result<T, ReadError>
where
    S: AsyncRead + Unpin,
{
    let read = async {
        loop {
            let room = limits.max_bytes + 1 - buf.len().min(limits.max_bytes);
            buf.reserve(room.min(4096));
            let n = (&mut *s).take(room as u64).read_buf(buf).await?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            if buf.len() > limits.max_bytes {
                return Err(ReadError::TooLarge(limits.max_bytes));
            }
            if let Some(t) = complete(buf) {
                return Ok(t);
            }
        }
    };
    tokio::time::timeout(limits.timeout, read)
        .await
        .map_err(|_| ReadError::TimedOut(limits.timeout))?
}

/// An HTTP request head, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// The first header called `name` (any case), if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("malformed request: {0}")]
    Malformed(httparse::Error),
}

/// Reads one request head (a body, if any, is not read).
pub async fn read_head<S>(s: &mut S, limits: Limits) -> Result<Head, HeadError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let parsed = read_bounded(s, &mut buf, limits, |b| {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(b) {
            Ok(httparse::Status::Partial) => None,
            Err(e) => Some(Err(e)),
            Ok(httparse::Status::Complete(_)) => Some(Ok(head_of(&req))),
        }
    })
    .await?;
    parsed.map_err(HeadError::Malformed)
}

/// The owned head of a parsed request.
fn head_of(req: &httparse::Request<'_, '_>) -> Head {
    Head {
        method: req.method.unwrap_or_default().to_owned(),
        path: req.path.unwrap_or_default().to_owned(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
    }
}

/// The reason phrase of every status the listeners answer with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A JSON answer that no cache keeps (the bind and usage listeners' one shape of answer).
pub async fn respond_json<S>(s: &mut S, status: u16, body: &str) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    respond(
        s,
        status,
        reason_phrase(status),
        "application/json",
        &[("cache-control", "no-store")],
        body.as_bytes(),
    )
    .await
}

/// Why a request with a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Head(#[from] HeadError),
    /// The head announced more than the body limit: refused before reading it.
    #[error("body of {0} bytes over the limit")]
    TooLarge(usize),
    /// No `content-length` (chunked bodies are not taken: a fixed length is the bound).
    #[error("a request body needs a content-length")]
    NoLength,
}

/// Reads one request head and its `content-length` body of at most `max_body` bytes (the
/// head within `limits`; the whole read within `limits.timeout`).
pub async fn read_request<S>(
    s: &mut S,
    limits: Limits,
    max_body: usize,
) -> Result<(Head, Vec<u8>), BodyError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let all = Limits {
        max_bytes: limits.max_bytes + max_body,
        timeout: limits.timeout,
    };
    read_bounded(s, &mut buf, all, |b| {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(b) {
            Ok(httparse::Status::Partial) => None,
            Err(e) => Some(Err(BodyError::Head(HeadError::Malformed(e)))),
            Ok(httparse::Status::Complete(at)) => {
                let head = head_of(&req);
                let len = match head
                    .header("content-length")
                    .map(|v| v.trim().parse::<usize>())
                {
                    Some(Ok(n)) => n,
                    _ => return Some(Err(BodyError::NoLength)),
                };
                if len > max_body {
                    return Some(Err(BodyError::TooLarge(len)));
                }
                (b.len() >= at + len).then(|| Ok((head, b[at..at + len].to_vec())))
            }
        }
    })
    .await
    .map_err(HeadError::from)?
}

/// Writes one response (`connection: close`) and shuts the stream down.
pub async fn respond<S>(
    s: &mut S,
    status: u16,
    reason: &str,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(256 + body.len());
    out.put_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    for (name, value) in extra_headers {
        out.put_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.put_slice(b"connection: close\r\n\r\n");
    out.put_slice(body);
    s.write_all(&out).await?;
    s.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 64,
        timeout: Duration::from_secs(1),
    };

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn reads_a_head_in_pieces() {
        rt().block_on(async {
            let (mut client, mut server) = tokio::io::duplex(16);
            let send = async {
                for part in ["GET /met", "rics HTTP/1.1\r\nHost: x\r\n", "\r\n"] {
                    client.write_all(part.as_bytes()).await.unwrap();
                }
            };
            let (head, ()) = tokio::join!(read_head(&mut server, LIMITS), send);
            let head = head.unwrap();
            assert_eq!(
                (head.method.as_str(), head.path.as_str()),
                ("GET", "/metrics")
            );
            assert_eq!(head.header("host"), Some("x"));
        });
    }

    #[test]
    fn size_and_time_are_bounded() {
        rt().block_on(async {
            let (mut client, mut server) = tokio::io::duplex(1024);
            client.write_all(&[b'a'; 200]).await.unwrap();
            let mut buf = BytesMut::new();
            let r = read_bounded(&mut server, &mut buf, LIMITS, |_| None::<()>).await;
            assert!(matches!(r, Err(ReadError::TooLarge(64))), "{r:?}");
            assert!(buf.len() <= 65, "the buffer stays within the limit");

            let (_client, mut server) = tokio::io::duplex(1024);
            let quick = Limits {
                max_bytes: 64,
                timeout: Duration::from_millis(20),
            };
            let r = read_head(&mut server, quick).await;
            assert!(
                matches!(r, Err(HeadError::Read(ReadError::TimedOut(_)))),
                "{r:?}"
            );
        });
    }

    #[test]
    fn a_body_is_read_to_its_length_and_bounded() {
        rt().block_on(async {
            let (mut client, mut server) = tokio::io::duplex(1024);
            let send = async {
                for part in [
                    "POST /v1/usage HTTP/1.1\r\ncontent-length: 5\r\n\r\nhe",
                    "llo",
                ] {
                    client.write_all(part.as_bytes()).await.unwrap();
                }
            };
            let (r, ()) = tokio::join!(read_request(&mut server, LIMITS, 16), send);
            let (head, body) = r.unwrap();
            assert_eq!(
                (head.path.as_str(), body.as_slice()),
                ("/v1/usage", &b"hello"[..])
            );

            // Announced over the limit: refused before the body is read.
            let (mut client, mut server) = tokio::io::duplex(1024);
            client
                .write_all(b"POST / HTTP/1.1\r\ncontent-length: 17\r\n\r\n")
                .await
                .unwrap();
            let r = read_request(&mut server, LIMITS, 16).await;
            assert!(matches!(r, Err(BodyError::TooLarge(17))), "{r:?}");
            // No length: refused (a chunked body has no bound to read it to).
            let (mut client, mut server) = tokio::io::duplex(1024);
            client
                .write_all(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            let r = read_request(&mut server, LIMITS, 16).await;
            assert!(matches!(r, Err(BodyError::NoLength)), "{r:?}");
        });
    }

    #[test]
    fn answers_with_length_and_close() {
        rt().block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1024);
            respond(
                &mut a,
                200,
                "OK",
                "text/plain",
                &[("cache-control", "no-store")],
                b"hi",
            )
            .await
            .unwrap();
            drop(a);
            let mut text = String::new();
            b.read_to_string(&mut text).await.unwrap();
            assert_eq!(
                text,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\
                 cache-control: no-store\r\nconnection: close\r\n\r\nhi"
            );
        });
    }
}
