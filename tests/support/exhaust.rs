//! Exhaustion helpers: extra IPv6 sources for a lab's client (one /64 each), TCP connections
//! from a chosen source address, HTTPS binds made in-process (thousands of them, faster than
//! curl), and an identity's quarantine flag as the kernel holds it.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::FromRawFd as _,
    sync::Arc,
    time::Duration,
};

use crate::{agent::AgentDirs, lab::Lab};

/// Adds `n` addresses to the lab's client, each in a /64 of its own inside the lab's /48
/// (`2001:db8:S:i::1`, i = 1..=n), with the server's route and static neighbours back.
pub fn add_v6_sources(lab: &Lab, n: u16) -> Vec<Ipv6Addr> {
    let s = lab.client_v6.segments();
    let prefix48 = format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]);
    lab.server
        .ip(&["-6", "route", "replace", &prefix48, "dev", &lab.server_if]);
    (1..=n)
        .map(|i| {
            let a = Ipv6Addr::new(s[0], s[1], s[2], i, 0, 0, 0, 1);
            lab.client.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                &lab.client_if,
                "nodad",
            ]);
            lab.server.ip(&[
                "neigh",
                "replace",
                &a.to_string(),
                "lladdr",
                &lab.client_mac,
                "nud",
                "permanent",
                "dev",
                &lab.server_if,
            ]);
            a
        })
        .collect()
}

/// A TCP connection to `dst` from `src` (bound before connecting), within `timeout`. Call it
/// inside the namespace that owns `src`.
pub fn connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let family = if dst.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket syscalls on a descriptor this function owns; every sockaddr is a
    // local of the size passed.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let (sa, len) = sockaddr(SocketAddr::new(src, 0));
        if libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (sa, len) = sockaddr(dst);
        if libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage; the casts write within its size.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let len = match a {
            SocketAddr::V4(v4) => {
                let sin = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_port = v4.port().to_be();
                (*sin).sin_addr.s_addr = u32::from(*v4.ip()).to_be();
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                (*sin6).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*sin6).sin6_port = v6.port().to_be();
                (*sin6).sin6_addr.s6_addr = v6.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
}

/// A TLS client trusting the PEM certificates in `ca`.
pub fn tls_client(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(cert.expect("cert")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// One HTTPS `POST /v1/bind` with `token` over `tcp`; the HTTP status (0: no answer).
pub fn post_bind(
    cfg: &Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    server: IpAddr,
    token: &str,
) -> u16 {
    let name = rustls::pki_types::ServerName::IpAddress(server.into());
    let conn = rustls::ClientConnection::new(Arc::clone(cfg), name).expect("tls");
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = format!(
        "POST /v1/bind HTTP/1.1\r\nhost: {server}\r\nauthorization: Bearer {token}\r\ncontent-length: 0\r\n\r\n"
    );
    if tls.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The flags word of identity slot `id` as the kernel holds it (read from the pins).
pub fn identity_flags(dirs: &AgentDirs, id: u32) -> u8 {
    use aya::maps::{Array, Map, MapData};
    let path = tollgate::pins::maps_dir(&dirs.pin_dir).join(tollgate_common::map_names::IDENTITIES);
    let data = MapData::from_pin(&path).expect("identities pin");
    let map: Array<MapData, tollgate_common::policy::Identity> =
        Array::try_from(Map::from_map_data(data).expect("map")).expect("array");
    map.get(&id, 0).expect("identity").flags
}

/// Whether identity slot `id` carries the kernel's quarantine flag.
pub fn kernel_quarantined(dirs: &AgentDirs, id: u32) -> bool {
    identity_flags(dirs, id) & tollgate_common::policy::ID_QUARANTINED != 0
}

/// The identity slot the kernel binds `addr` (a /32) to, if any (read from the pins).
pub fn kernel_binding_v4(dirs: &AgentDirs, addr: std::net::Ipv4Addr) -> Option<u32> {
    use aya::maps::{HashMap, Map, MapData};
    let path = tollgate::pins::maps_dir(&dirs.pin_dir).join(tollgate_common::map_names::BIND_V4);
    let data = MapData::from_pin(&path).expect("bind_v4 pin");
    let map: HashMap<MapData, [u8; 4], tollgate_common::policy::Binding> =
        HashMap::try_from(Map::from_map_data(data).expect("map")).expect("hash map");
    map.get(&addr.octets(), 0).ok().map(|b| b.identity)
}
