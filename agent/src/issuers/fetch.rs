//! One HTTP(S) GET: resolve, connect, TLS for `https` (rustls with ring; the configured CA
//! bundle or the system's roots), one HTTP/1.1 request with `Connection: close`, the response
//! read up to a byte limit, the whole within one timeout. Only `200` is a document: a
//! redirect is not followed (its target would be a source nobody configured), so any other
//! status is the outcome `http_status`. Bodies are framed by `Transfer-Encoding: chunked`, by
//! `Content-Length`, or by the connection's clean close (TLS `close_notify`; an unclean TLS
//! close could be a truncation, so it is an error). Keys are fetched over HTTPS only
//! ([`HttpsUrl::parse`]); a model server's metrics may be plain HTTP on the node
//! (`controller::scrape`).

use std::{io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    },
};

use super::{Outcome, cache, source::HttpsUrl};

/// The response head (status line and headers); an IdP's security headers fit many times.
const MAX_HEAD: usize = 32 * 1024;
/// Headers in a response head.
const MAX_HEADERS: usize = 100;
/// One read.
const READ: usize = 16 * 1024;

/// A failed GET: its outcome label and what happened, for the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    pub outcome: Outcome,
    pub message: String,
}

pub(super) fn fail(outcome: Outcome, message: impl Into<String>) -> FetchError {
    FetchError {
        outcome,
        message: message.into(),
    }
}

/// A `200` response's body and the lifetime it gives itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub body: Vec<u8>,
    /// `Cache-Control: max-age` less `Age` (see [`cache::max_age_s`]).
    pub max_age_s: Option<u64>,
}

/// The TLS client of one key source (its roots loaded once, when the source is made).
#[derive(Clone)]
pub struct Client {
    tls: TlsConnector,
}

impl Client {
    /// Trusts the certificates of the PEM file `ca_bundle`, or the system's roots.
    pub fn new(ca_bundle: Option<&Path>) -> Result<Client, String> {
        let mut roots = RootCertStore::empty();
        match ca_bundle {
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<_, _>>())
                    .map_err(|e| format!("ca_bundle {}: {e}", path.display()))?;
                // Every certificate or none: a bundle with one broken entry is a mistake the
                // operator should see now, not a missing root found at the first fetch.
                if certs.is_empty() {
                    return Err(format!(
                        "ca_bundle {}: no usable CA certificate in the file",
                        path.display()
                    ));
                }
                for (i, cert) in certs.into_iter().enumerate() {
                    roots.add(cert).map_err(|e| {
                        format!(
                            "ca_bundle {}: certificate #{} cannot be used: {e}",
                            path.display(),
                            i + 1
                        )
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::warn!("system CA certificates: {e}");
                }
                let (added, ignored) = roots.add_parsable_certificates(found.certs);
                if ignored > 0 {
                    tracing::warn!(
                        "system CA certificates: {ignored} cannot be parsed, not trusted"
                    );
                }
                if added == 0 {
                    return Err(
                        "no system CA certificates found (install the ca-certificates \
                                package or set ca_bundle)"
                            .into(),
                    );
                }
            }
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        // This client speaks HTTP/1.1 only; say so, so that an h2 server does not pick h2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Client {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// GET `url` (a JSON document): its body (at most `max_bytes`) and lifetime, all within
    /// `timeout`.
    pub async fn get(
        &self,
        url: &HttpsUrl,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Document, FetchError> {
        get(Some(self), url, "application/json", max_bytes, timeout).await
    }
}

/// GET `url` asking for `accept`, within `timeout`. `client` makes the TLS connection of an
/// `https` URL; a plain `http` one needs none (one without a client fails as `tls`).
pub async fn get(
    client: Option<&Client>,
    url: &HttpsUrl,
    accept: &str,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Document, FetchError> {
    tokio::time::timeout(timeout, get_within(client, url, accept, max_bytes))
        .await
        .unwrap_or_else(|_| {
            Err(fail(
                Outcome::Timeout,
                format!(
                    "{url}: no complete response within {} ms",
                    timeout.as_millis()
                ),
            ))
        })
}

async fn get_within(
    client: Option<&Client>,
    url: &HttpsUrl,
    accept: &str,
    max_bytes: usize,
) -> Result<Document, FetchError> {
    let at = |e: FetchError| fail(e.outcome, format!("{url}: {}", e.message));
    let tcp = connect(url).await.map_err(at)?;
    let mut stream: Box<dyn Stream> = if url.tls {
        let client =
            client.ok_or_else(|| at(fail(Outcome::Tls, "no TLS client for an https URL")))?;
        let name = ServerName::try_from(url.host.clone()).map_err(|e| {
            at(fail(
                Outcome::Tls,
                format!("{:?} as a TLS name: {e}", url.host),
            ))
        })?;
        Box::new(
            client
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| at(fail(Outcome::Tls, format!("TLS handshake: {e}"))))?,
        )
    } else {
        Box::new(tcp)
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: {accept}\r\n\
         Accept-Encoding: identity\r\nUser-Agent: tollgate/{}\r\nConnection: close\r\n\r\n",
        url.target,
        url.authority,
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| at(io_fail("sending the request", &e)))?;
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(READ),
        pos: 0,
    };
    read_response(&mut conn, max_bytes).await.map_err(at)
}

/// The connection under the HTTP: TLS over TCP, or TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(url: &HttpsUrl) -> Result<TcpStream, FetchError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| {
            fail(
                Outcome::Connect,
                format!("cannot resolve {:?}: {e}", url.host),
            )
        })?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(format!("connect to {addr}: {e}")),
        }
    }
    Err(fail(
        Outcome::Connect,
        last.unwrap_or_else(|| format!("{:?} resolves to no address", url.host)),
    ))
}

/// A read or write error: the TLS layer's (a bad record, an alert) or the connection's.
fn io_fail(doing: &str, e: &io::Error) -> FetchError {
    let tls = e
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    let outcome = if tls { Outcome::Tls } else { Outcome::Io };
    fail(outcome, format!("{doing}: {e}"))
}

/// The connection and what has been read from it but not yet consumed (`buf[pos..]`).
struct Conn {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    pos: usize,
}

impl Conn {
    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more; `Ok(0)` at a clean end (TLS close_notify, or TCP's end of stream).
    async fn fill(&mut self) -> Result<usize, FetchError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(READ);
        self.stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| io_fail("reading the response", &e))
    }

    /// Reads more, where the end of the stream would cut the response short.
    async fn fill_more(&mut self, what: &str) -> Result<(), FetchError> {
        match self.fill().await? {
            0 => Err(fail(
                Outcome::Io,
                format!("the connection closed within the {what}"),
            )),
            _ => Ok(()),
        }
    }
}

/// What the response head says about its body.
struct Head {
    status: u16,
    location: Option<String>,
    chunked: bool,
    length: Option<u64>,
    max_age_s: Option<u64>,
}

async fn read_response(conn: &mut Conn, max_bytes: usize) -> Result<Document, FetchError> {
    let head = read_head(conn).await?;
    if head.status != 200 {
        let redirect = head
            .location
            // A Location can be as long as the head: what is quoted is its start.
            .map(|l| {
                let l: String = l.chars().take(200).collect();
                format!(" (a redirect to {l:?}, not followed)")
            })
            .unwrap_or_default();
        return Err(fail(
            Outcome::HttpStatus,
            format!("HTTP status {}{redirect}", head.status),
        ));
    }
    let too_large = || {
        fail(
            Outcome::TooLarge,
            format!("the body exceeds {max_bytes} bytes"),
        )
    };
    let body = if head.chunked {
        read_chunked(conn, max_bytes).await?
    } else if let Some(len) = head.length {
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= max_bytes)
            .ok_or_else(|| {
                fail(
                    Outcome::TooLarge,
                    format!("Content-Length {len} exceeds {max_bytes} bytes"),
                )
            })?;
        while conn.pending().len() < len {
            conn.fill_more("body").await?;
        }
        conn.pending()[..len].to_vec()
    } else {
        // Close-delimited: the end is the server's clean close.
        loop {
            if conn.pending().len() > max_bytes {
                return Err(too_large());
            }
            if conn.fill().await? == 0 {
                break conn.pending().to_vec();
            }
        }
    };
    Ok(Document {
        body,
        max_age_s: head.max_age_s,
    })
}

#[cfg(test)]
thread_local! {
    /// Head parses on this thread (the tests' check that a trickled head is parsed once).
    pub(super) static HEAD_PARSES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Where the head's blank line ends in `buf`, searching from `from` (`\n\n` or `\n\r\n`:
/// httparse also takes bare LF line ends).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let tail = buf.get(from..)?;
    tail.iter().enumerate().find_map(|(i, &b)| {
        (b == b'\n').then_some(())?;
        match tail.get(i + 1..) {
            Some([b'\n', ..]) => Some(from + i + 2),
            Some([b'\r', b'\n', ..]) => Some(from + i + 3),
            _ => None,
        }
    })
}

/// Reads until the head is complete, then parses it once: each read searches only the new
/// bytes (and the 2 before, where a blank line may have begun), so a server trickling its head
/// a byte at a time costs linear work, not a re-parse from byte 0 per read.
async fn read_head(conn: &mut Conn) -> Result<Head, FetchError> {
    let mut searched: usize = 0;
    loop {
        if head_end(conn.pending(), searched.saturating_sub(2)).is_some() {
            #[cfg(test)]
            HEAD_PARSES.with(|n| n.set(n.get() + 1));
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            return match response.parse(conn.pending()) {
                Ok(httparse::Status::Complete(n)) => {
                    let head = head_of(&response)?;
                    conn.pos += n;
                    Ok(head)
                }
                Ok(httparse::Status::Partial) => Err(fail(
                    Outcome::Io,
                    "not an HTTP/1.1 response: a blank line before the head's end",
                )),
                Err(e) => Err(fail(Outcome::Io, format!("not an HTTP/1.1 response: {e}"))),
            };
        }
        searched = conn.pending().len();
        if searched >= MAX_HEAD {
            return Err(fail(
                Outcome::TooLarge,
                format!("the response head exceeds {MAX_HEAD} bytes"),
            ));
        }
        conn.fill_more("response head").await?;
    }
}

fn head_of(response: &httparse::Response<'_, '_>) -> Result<Head, FetchError> {
    let values = |name: &'static str| {
        response
            .headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let mut chunked = false;
    for te in values("transfer-encoding") {
        for coding in te.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(fail(
                    Outcome::Io,
                    format!("unsupported Transfer-Encoding {coding:?}"),
                ));
            }
            chunked = true;
        }
    }
    if let Some(ce) =
        values("content-encoding").find(|c| !c.trim().eq_ignore_ascii_case("identity"))
    {
        return Err(fail(
            Outcome::Io,
            format!("Content-Encoding {ce:?} although identity was asked for"),
        ));
    }
    let lengths: Vec<String> = values("content-length").collect();
    let length = match lengths.as_slice() {
        [] => None,
        [first, rest @ ..] if rest.iter().all(|l| l == first) => {
            // 1*DIGIT (RFC 9110 §8.6): `+5`, `5, 5` or ` 5` are not lengths.
            let digits = first.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(fail(Outcome::Io, format!("bad Content-Length {first:?}")));
            }
            // All digits: only too large for u64 fails, and that exceeds any limit.
            Some(digits.parse::<u64>().unwrap_or(u64::MAX))
        }
        _ => return Err(fail(Outcome::Io, "conflicting Content-Length headers")),
    };
    if chunked && length.is_some() {
        // RFC 9112 §6.1: such a message "ought to be handled as an error"; two framings
        // are one too many for a strict client.
        return Err(fail(
            Outcome::Io,
            "both Transfer-Encoding and Content-Length: the body's framing is ambiguous",
        ));
    }
    let cache_control: Vec<String> = values("cache-control").collect();
    let age = values("age").next();
    Ok(Head {
        status: response.code.unwrap_or(0),
        location: values("location").next(),
        chunked,
        length,
        max_age_s: cache::max_age_s(cache_control.iter().map(String::as_str), age.as_deref()),
    })
}

/// A chunked body (RFC 9112 §7.1); chunk extensions and trailers are read past, not used.
async fn read_chunked(conn: &mut Conn, max_bytes: usize) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    loop {
        let size = loop {
            match httparse::parse_chunk_size(conn.pending()) {
                Ok(httparse::Status::Complete((n, size))) => {
                    conn.pos += n;
                    break size;
                }
                Ok(httparse::Status::Partial) if conn.pending().len() < 1024 => {
                    conn.fill_more("chunk size").await?;
                }
                _ => return Err(fail(Outcome::Io, "bad chunk size line")),
            }
        };
        if size == 0 {
            return Ok(body);
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|s| body.len().saturating_add(*s) <= max_bytes)
            .ok_or_else(|| {
                fail(
                    Outcome::TooLarge,
                    format!("the body exceeds {max_bytes} bytes"),
                )
            })?;
        while conn.pending().len() < size + 2 {
            conn.fill_more("chunk").await?;
        }
        let chunk = &conn.pending()[..size + 2];
        if &chunk[size..] != b"\r\n" {
            return Err(fail(Outcome::Io, "a chunk does not end in CRLF"));
        }
        body.extend_from_slice(&chunk[..size]);
        conn.pos += size + 2;
    }
}
