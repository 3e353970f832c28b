//! `GET /metrics` from inside a namespace, as Prometheus would: the body of a 200 answer.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use crate::lab::NetNs;

/// One scrape of `addr` from inside `ns`: the body of a 200 answer, or `None` if none came
/// within `wait` (connect and read each).
pub fn scrape(ns: &NetNs, addr: SocketAddr, wait: Duration) -> Option<String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, wait).ok()?;
        s.set_read_timeout(Some(wait)).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.starts_with("HTTP/1.1 200")
            .then(|| text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()))
            .flatten()
    })
}

/// Scrapes until one answers (an agent still starting), for at most `limit`.
pub fn scrape_within(ns: &NetNs, addr: SocketAddr, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(body) = scrape(ns, addr, Duration::from_secs(2)) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape of {addr} answered within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
