//! Where an issuer's keys come from ([`SourceConfig`], built by the configuration) and the
//! HTTPS URLs the fetcher accepts ([`HttpsUrl`]): `https://host[:port][/path][?query]`, nothing
//! else. Plain HTTP is refused here, before anything is fetched: keys that decide who may send
//! traffic must not be replaceable by anyone on the path to the identity provider.

use std::{fmt, path::PathBuf};

/// Where the keys are read or fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A local JWKS file, re-read when its modification time changes.
    File(PathBuf),
    /// A JWKS fetched from this HTTPS URL.
    JwksUrl(String),
    /// OIDC discovery: `{issuer}/.well-known/openid-configuration` names the `jwks_uri`.
    Discovery,
}

impl SourceKind {
    /// `file`, `jwks_url` or `discovery` (status, logs).
    pub fn label(&self) -> &'static str {
        match self {
            SourceKind::File(_) => "file",
            SourceKind::JwksUrl(_) => "jwks_url",
            SourceKind::Discovery => "discovery",
        }
    }
}

/// One issuer's key source and its fetching bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceConfig {
    /// The issuer's name in the configuration; the persisted JWKS is `jwks/<name>.json`.
    pub name: String,
    /// The issuer URL (`iss`); discovery starts from it and requires the document to repeat it.
    pub issuer: Option<String>,
    pub kind: SourceKind,
    /// The roots, size limit, timeout, cache bounds, cooldown and staleness bound, as
    /// configured (`[tokens]` defaults and the issuer's overrides).
    pub fetch: crate::config::Fetch,
    /// The node's state directory.
    pub state_dir: PathBuf,
}

impl SourceConfig {
    /// `{issuer}/.well-known/openid-configuration`, the issuer's trailing slash dropped
    /// (OpenID Connect Discovery 1.0 §4).
    pub fn discovery_url(&self) -> Option<String> {
        let issuer = self.issuer.as_deref()?;
        Some(format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ))
    }

    /// What the keys were fetched from, as persisted: the persisted keys are used only by a
    /// source with the same description (another URL's keys are not this source's keys).
    pub fn describe(&self) -> String {
        match &self.kind {
            SourceKind::File(p) => p.display().to_string(),
            SourceKind::JwksUrl(u) => u.clone(),
            SourceKind::Discovery => self.discovery_url().unwrap_or_default(),
        }
    }
}

/// An `https` URL split for a request: where to connect and what to ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsUrl {
    /// `https` (always, from [`HttpsUrl::parse`]); `false`: plain `http`, which only
    /// [`HttpsUrl::parse_http_or_https`] accepts.
    pub tls: bool,
    /// Host name or IP address (an IPv6 address without its brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
    /// The `Host` header: host (bracketed for IPv6) and the port when it is not 443.
    pub authority: String,
}

/// Why a URL cannot be fetched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is plain HTTP: tollgate fetches keys over HTTPS only")]
    PlainHttp(String),
    #[error("{0:?} is not an https:// URL")]
    NotHttps(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} carries user information (user@host): credentials do not belong in a URL")]
    UserInfo(String),
    #[error("{0:?} has a bad port")]
    BadPort(String),
    #[error("{0:?} contains a space or control character")]
    BadChar(String),
}

impl HttpsUrl {
    /// An `https` URL (keys travel over TLS only).
    pub fn parse(url: &str) -> Result<HttpsUrl, UrlError> {
        Self::parse_with(url, false)
    }

    /// An `http` or `https` URL: a model server's metrics endpoint on the node is often
    /// plain HTTP on loopback.
    pub fn parse_http_or_https(url: &str) -> Result<HttpsUrl, UrlError> {
        Self::parse_with(url, true)
    }

    fn parse_with(url: &str, allow_http: bool) -> Result<HttpsUrl, UrlError> {
        let own = || url.to_owned();
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(UrlError::BadChar(own()));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(UrlError::NotHttps(own()));
        };
        let tls = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            if !allow_http {
                return Err(UrlError::PlainHttp(own()));
            }
            false
        } else {
            return Err(UrlError::NotHttps(own()));
        };
        let default_port = if tls { 443 } else { 80 };
        // The fragment is the client's, never sent.
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        if authority.contains('@') {
            return Err(UrlError::UserInfo(own()));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| UrlError::NoHost(own()))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::NoHost(own()));
        }
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| UrlError::BadPort(own()))?,
        };
        let target = match target {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        Ok(HttpsUrl {
            tls,
            host: host.to_owned(),
            port,
            target,
            authority,
        })
    }
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.target)
    }
}

/// For the configuration check: whether `url` is one the fetcher will fetch, else why not,
/// in a sentence (`"http://…" is plain HTTP: tollgate fetches keys over HTTPS only`).
pub fn check_https_url(url: &str) -> Result<(), String> {
    HttpsUrl::parse(url).map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Fetch;

    #[test]
    fn https_urls_split_into_host_port_and_target() {
        let u = HttpsUrl::parse("https://idp.example/realms/x/certs?a=1#frag").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.target.as_str(),
                u.authority.as_str()
            ),
            ("idp.example", 443, "/realms/x/certs?a=1", "idp.example")
        );
        let u = HttpsUrl::parse("HTTPS://127.0.0.1:8443").unwrap();
        assert_eq!((u.port, u.target.as_str()), (8443, "/"));
        assert_eq!(u.authority, "127.0.0.1:8443");
        let u = HttpsUrl::parse("https://[2001:db8::1]:9443/jwks").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority.as_str()),
            ("2001:db8::1", "[2001:db8::1]:9443")
        );
        assert_eq!(u.to_string(), "https://[2001:db8::1]:9443/jwks");
        assert_eq!(HttpsUrl::parse("https://h?x").unwrap().target, "/?x");
    }

    #[test]
    fn urls_that_cannot_be_fetched_are_refused_with_their_reason() {
        let refused = |u: &str| HttpsUrl::parse(u).unwrap_err();
        assert!(matches!(
            refused("http://idp.example/jwks"),
            UrlError::PlainHttp(_)
        ));
        assert!(matches!(
            refused("HTTP://idp.example/jwks"),
            UrlError::PlainHttp(_)
        ));
        assert!(matches!(
            refused("ftp://idp.example/jwks"),
            UrlError::NotHttps(_)
        ));
        assert!(matches!(refused("idp.example/jwks"), UrlError::NotHttps(_)));
        assert!(matches!(refused("https:///jwks"), UrlError::NoHost(_)));
        assert!(matches!(
            refused("https://u:p@idp.example/"),
            UrlError::UserInfo(_)
        ));
        assert!(matches!(
            refused("https://idp.example:0/"),
            UrlError::BadPort(_)
        ));
        assert!(matches!(
            refused("https://idp.example:x/"),
            UrlError::BadPort(_)
        ));
        assert!(matches!(
            refused("https://idp.example:70000/"),
            UrlError::BadPort(_)
        ));
        assert!(matches!(
            refused("https://idp .example/"),
            UrlError::BadChar(_)
        ));
        assert!(matches!(
            refused("https://idp.example/\r\nX: y"),
            UrlError::BadChar(_)
        ));
        assert_eq!(
            check_https_url("http://idp.example/jwks").unwrap_err(),
            "\"http://idp.example/jwks\" is plain HTTP: tollgate fetches keys over HTTPS only"
        );
    }

    #[test]
    fn discovery_url_drops_the_issuers_trailing_slash() {
        let mut cfg = SourceConfig {
            name: "idp".into(),
            issuer: Some("https://idp.example/realms/x/".into()),
            kind: SourceKind::Discovery,
            fetch: Fetch {
                ca_bundle: None,
                max_bytes: 1,
                timeout_ms: 1,
                cache_min_s: 1,
                cache_max_s: 1,
                refetch_cooldown_s: 1,
                max_stale_s: 1,
            },
            state_dir: PathBuf::new(),
        };
        let want = "https://idp.example/realms/x/.well-known/openid-configuration";
        assert_eq!(cfg.discovery_url().as_deref(), Some(want));
        cfg.issuer = Some("https://idp.example/realms/x".into());
        assert_eq!(cfg.describe(), want);
    }
}
