//! The key fetcher against a real HTTPS server: rustls on 127.0.0.1 with a certificate from
//! a CA made here (rcgen), the CA given as `ca_bundle`. Not an identity provider (the OIDC
//! acceptance in tests/oidc.rs runs a real one): this is the HTTP client's own test, each
//! route one way a response can be good or bad.

use std::{cell::RefCell, collections::BTreeMap, path::PathBuf, rc::Rc, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    task::LocalSet,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};
use tollgate_common::token::{Alg, SigningKey, jwks};

use super::*;
use crate::config::Fetch;

/// Runs `f` on a current-thread runtime inside a LocalSet, as the agent does.
fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    LocalSet::new().block_on(&rt, f)
}

fn jwks_of(kids: &[&str]) -> String {
    let keys: Vec<_> = kids
        .iter()
        .map(|k| {
            SigningKey::generate(Alg::EdDSA, k)
                .expect("key")
                .public_jwk()
        })
        .collect();
    jwks(&keys)
}

use crate::test_dir::Dir;

/// The HTTPS server: what `/jwks` answers is switchable; requests are counted by path.
struct Server {
    base: String,
    ca: PathBuf,
    hits: Rc<RefCell<BTreeMap<String, u32>>>,
    /// `/jwks`: the JWKS to serve, or `None` for a 500.
    jwks: Rc<RefCell<Option<String>>>,
    _dir: Dir,
}

impl Server {
    fn hits(&self, path: &str) -> u32 {
        self.hits.borrow().get(path).copied().unwrap_or(0)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn tls_acceptor(dir: &Dir) -> (TlsAcceptor, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    let ca = dir.0.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).expect("ca");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![CertificateDer::from(leaf.der().to_vec())], key)
    .expect("server config");
    (TlsAcceptor::from(Arc::new(config)), ca)
}

/// Starts the server on this LocalSet.
async fn server(tag: &str) -> Server {
    let dir = Dir::new("issuers", tag);
    let (acceptor, ca) = tls_acceptor(&dir);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    let hits = Rc::new(RefCell::new(BTreeMap::new()));
    let jwks = Rc::new(RefCell::new(Some(jwks_of(&["k1"]))));
    let (h, j, b) = (Rc::clone(&hits), Rc::clone(&jwks), base.clone());
    tokio::task::spawn_local(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, h, j, b) = (acceptor.clone(), Rc::clone(&h), Rc::clone(&j), b.clone());
            tokio::task::spawn_local(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    let mut byte = [0u8];
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                *h.borrow_mut().entry(path.clone()).or_default() += 1;
                let current = j.borrow().clone();
                respond(&mut tls, &path, &b, current).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Server {
        base,
        ca,
        hits,
        jwks,
        _dir: dir,
    }
}

async fn respond<S: tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
    path: &str,
    base: &str,
    jwks: Option<String>,
) {
    let ok = |extra: &str, body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let discovery = |issuer: &str, jwks_uri: &str| {
        ok(
            "Cache-Control: max-age=600\r\n",
            &serde_json::json!({ "issuer": issuer, "jwks_uri": jwks_uri }).to_string(),
        )
    };
    let reply = match path {
        "/jwks" => match jwks {
            Some(j) => ok("Cache-Control: public, max-age=300\r\n", &j),
            None => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".into(),
        },
        "/redirect" => {
            format!("HTTP/1.1 302 Found\r\nLocation: {base}/jwks\r\nContent-Length: 0\r\n\r\n")
        }
        "/big" => ok("", &" ".repeat(5000)),
        "/big-close" => format!("HTTP/1.1 200 OK\r\n\r\n{}", " ".repeat(5000)),
        "/big-chunked" => {
            let chunk = format!("{:x}\r\n{}\r\n", 1000, " ".repeat(1000));
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
                chunk.repeat(5)
            )
        }
        "/html" => ok("", "<html>oops</html>"),
        "/te-and-cl" => {
            let body = jwks_of(&["t1"]);
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len(),
                body.len()
            )
        }
        "/plus-length" => {
            let body = jwks_of(&["p1"]);
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: +{}\r\n\r\n{body}",
                body.len()
            )
        }
        "/trickle" => {
            // The head one byte per TLS record.
            let body = jwks_of(&["t1"]);
            let head = format!(
                "HTTP/1.1 200 OK\r\nX-Pad: {}\r\nContent-Length: {}\r\n\r\n",
                "a".repeat(100),
                body.len()
            );
            for b in head.bytes() {
                let _ = tls.write_all(&[b]).await;
                let _ = tls.flush().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            body
        }
        "/chunked" => {
            let body = jwks_of(&["c1", "c2"]);
            let (a, b) = body.split_at(body.len() / 2);
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=45\r\n\r\n\
                 {:x};ext=1\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nTrailer: x\r\n\r\n",
                a.len(),
                b.len()
            )
        }
        "/close" => format!("HTTP/1.1 200 OK\r\n\r\n{}", jwks_of(&["e1"])),
        "/late-jwks" => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ok("", &jwks_of(&["late"]))
        }
        "/slow" => {
            let _ = tls
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
                .await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        "/late/.well-known/openid-configuration" => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            discovery(&format!("{base}/late"), &format!("{base}/later-jwks"))
        }
        "/later-jwks" => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            ok("", &jwks_of(&["later"]))
        }
        "/good/.well-known/openid-configuration" => {
            discovery(&format!("{base}/good"), &format!("{base}/jwks"))
        }
        "/other/.well-known/openid-configuration" => {
            discovery(&format!("{base}/someone-else"), &format!("{base}/jwks"))
        }
        "/plain/.well-known/openid-configuration" => {
            discovery(&format!("{base}/plain"), "http://127.0.0.1:1/jwks")
        }
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into(),
    };
    let _ = tls.write_all(reply.as_bytes()).await;
}

fn config(s: &Server, kind: SourceKind, state_dir: &Dir) -> SourceConfig {
    SourceConfig {
        name: "idp".into(),
        issuer: None,
        kind,
        fetch: Fetch {
            ca_bundle: Some(s.ca.clone()),
            max_bytes: 4096,
            timeout_ms: 500,
            cache_min_s: 30,
            cache_max_s: 3600,
            refetch_cooldown_s: 3600,
            max_stale_s: 600,
        },
        state_dir: state_dir.0.clone(),
    }
}

/// Fetches `path` once with a fresh `jwks_url` source: its outcome, its last error, its kids.
async fn fetch(s: &Server, path: &str) -> (Outcome, Option<String>, Vec<String>) {
    let state = Dir::new("issuers", &format!("fetch{}", path.replace('/', "_")));
    let keys = Keys::new(config(s, SourceKind::JwksUrl(s.url(path)), &state)).expect("keys");
    let outcome = keys.fetch_now().await;
    let st = keys.status();
    (outcome, st.last_fetch.and_then(|l| l.error), st.kids)
}

#[test]
fn a_jwks_is_fetched_over_https_with_its_max_age() {
    local(async {
        let s = server("ok").await;
        let state = Dir::new("issuers", "ok-state");
        let keys = Keys::new(config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state)).unwrap();
        assert!(
            keys.current(clock::now_ms()).is_err(),
            "no keys before the first fetch"
        );
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        assert!(keys.knows("k1"));
        let now = clock::now_ms();
        let due = keys.0.state.borrow().next_due_ms;
        assert!(
            (now + 299_000..=now + 300_000).contains(&due),
            "max-age=300 sets the next fetch"
        );
        let (outcome, _, kids) = fetch(&s, "/chunked").await;
        assert_eq!(
            (outcome, kids),
            (Outcome::Ok, vec!["c1".into(), "c2".into()])
        );
        let (outcome, err, kids) = fetch(&s, "/close").await;
        assert_eq!(
            (outcome, kids),
            (Outcome::Ok, vec!["e1".to_owned()]),
            "{err:?}"
        );
    });
}

#[test]
fn bad_responses_get_their_outcome_and_change_no_keys() {
    local(async {
        let s = server("bad").await;
        let (o, err, _) = fetch(&s, "/redirect").await;
        assert_eq!(o, Outcome::HttpStatus);
        assert!(err.unwrap().contains("302 (a redirect to"), "not followed");
        assert_eq!(s.hits("/jwks"), 0, "the redirect was not followed");
        let (o, err, _) = fetch(&s, "/big").await;
        assert_eq!(o, Outcome::TooLarge, "{err:?}");
        let (o, err, _) = fetch(&s, "/big-chunked").await;
        assert_eq!(o, Outcome::TooLarge, "{err:?}");
        let (o, err, _) = fetch(&s, "/big-close").await;
        assert_eq!(o, Outcome::TooLarge, "{err:?}");
        assert_eq!(fetch(&s, "/html").await.0, Outcome::NotJson);
        let (o, err, _) = fetch(&s, "/te-and-cl").await;
        assert_eq!(o, Outcome::Io, "{err:?}");
        assert!(
            err.unwrap()
                .contains("both Transfer-Encoding and Content-Length")
        );
        let (o, err, _) = fetch(&s, "/plus-length").await;
        assert_eq!(o, Outcome::Io, "{err:?}");
        assert!(err.unwrap().contains("bad Content-Length \"+"));
        assert_eq!(fetch(&s, "/missing").await.0, Outcome::HttpStatus);
        let (o, err, _) = fetch(&s, "/slow").await;
        assert_eq!(o, Outcome::Timeout, "{err:?}");
        // Another CA's server certificate, no server at all.
        let state = Dir::new("issuers", "bad-state");
        let mut cfg = config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state);
        let other = server("bad-other").await;
        cfg.fetch.ca_bundle = Some(other.ca.clone());
        let tls = async |cfg: &SourceConfig| Keys::new(cfg.clone()).unwrap().fetch_now().await;
        assert_eq!(tls(&cfg).await, Outcome::Tls);
        // The system's roots do not hold the test CA either; a bundle without a certificate
        // is a configuration error.
        cfg.fetch.ca_bundle = None;
        assert_eq!(tls(&cfg).await, Outcome::Tls);
        let empty = state.0.join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        cfg.fetch.ca_bundle = Some(empty);
        assert!(
            Keys::new(cfg.clone())
                .unwrap_err()
                .contains("no usable CA certificate")
        );
        // The right CA beside a certificate that cannot be parsed: the bundle is refused.
        let broken = state.0.join("broken.pem");
        let good = std::fs::read_to_string(&s.ca).unwrap();
        std::fs::write(
            &broken,
            format!("{good}-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n"),
        )
        .unwrap();
        cfg.fetch.ca_bundle = Some(broken);
        let e = Keys::new(cfg.clone()).unwrap_err();
        assert!(e.contains("certificate #2 cannot be used"), "{e}");
        cfg.fetch.ca_bundle = Some(s.ca.clone());
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        cfg.kind = SourceKind::JwksUrl(format!("https://{}/", closed.local_addr().unwrap()));
        drop(closed);
        assert_eq!(Keys::new(cfg).unwrap().fetch_now().await, Outcome::Connect);
    });
}

#[test]
fn a_head_trickled_byte_by_byte_is_parsed_once() {
    local(async {
        let s = server("trickle").await;
        fetch::HEAD_PARSES.with(|n| n.set(0));
        let (o, err, kids) = fetch(&s, "/trickle").await;
        assert_eq!((o, kids), (Outcome::Ok, vec!["t1".to_owned()]), "{err:?}");
        let parses = fetch::HEAD_PARSES.with(|n| n.get());
        assert_eq!(parses, 1, "the head was parsed {parses} times");
    });
}

#[test]
fn a_failed_fetch_keeps_the_keys_until_max_stale_and_a_good_one_restores_them() {
    local(async {
        let s = server("stale").await;
        let state = Dir::new("issuers", "stale-state");
        let keys = Keys::new(config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state)).unwrap();
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        *s.jwks.borrow_mut() = Some("<html>".into());
        assert_eq!(keys.fetch_now().await, Outcome::NotJson);
        *s.jwks.borrow_mut() = Some(r#"{"keys":{}}"#.into());
        assert_eq!(keys.fetch_now().await, Outcome::NoKeys, "no `keys` array");
        *s.jwks.borrow_mut() = None;
        assert_eq!(keys.fetch_now().await, Outcome::HttpStatus);
        let st = keys.status();
        assert_eq!(
            (st.kids, st.stale, st.unavailable),
            (vec!["k1".to_owned()], true, false)
        );
        let fetched = keys.0.state.borrow().fetched_ms.unwrap();
        assert!(
            keys.current(fetched + 600_000).is_ok(),
            "served up to max_stale"
        );
        let e = keys.current(fetched + 600_001).unwrap_err();
        assert!(e.why.contains("more than max_stale_s = 600"), "{e}");
        // The provider is back: the next fetch restores fresh keys.
        *s.jwks.borrow_mut() = Some(jwks_of(&["k2"]));
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        assert!(keys.knows("k2") && !keys.knows("k1"));
        assert!(!keys.status().stale);
    });
}

#[test]
fn concurrent_unknown_kids_share_one_fetch_and_the_cooldown_refuses_more() {
    local(async {
        let s = server("flight").await;
        let state = Dir::new("issuers", "flight-state");
        let keys = Keys::new(config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state)).unwrap();
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let k = keys.clone();
                tokio::task::spawn_local(async move { k.refetch_unknown_kid().await })
            })
            .collect();
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(s.hits("/jwks"), 1, "20 waiters, one fetch");
        assert!(keys.knows("k1"), "every waiter returned after the fetch");
        // Within the cooldown: no request, and the call returns at once.
        keys.refetch_unknown_kid().await;
        assert_eq!(s.hits("/jwks"), 1, "the cooldown refused a second fetch");
        assert_eq!(keys.status().refetches_suppressed, 1);
        let counts = keys.status().fetches;
        assert_eq!(counts.len(), 1);
        assert_eq!(
            (counts[0].trigger.as_str(), counts[0].count),
            ("unknown_kid", 1)
        );
    });
}

#[test]
fn a_restarted_node_verifies_with_the_persisted_keys_of_its_own_source() {
    local(async {
        let s = server("persist").await;
        let state = Dir::new("issuers", "persist-state");
        let cfg = config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state);
        let first = Keys::new(cfg.clone()).unwrap();
        assert_eq!(first.fetch_now().await, Outcome::Ok);
        first.persisted().await;
        drop(first);
        // The provider is down when the node starts again.
        *s.jwks.borrow_mut() = None;
        let again = Keys::new(cfg.clone()).unwrap();
        assert!(
            again
                .current(clock::now_ms())
                .is_ok_and(|k| k.get("k1").is_some())
        );
        assert!(again.status().age_s.is_some_and(|a| a < 60));
        // Another URL's source does not take them.
        let other = SourceConfig {
            kind: SourceKind::JwksUrl(s.url("/chunked")),
            ..cfg
        };
        assert!(Keys::new(other).unwrap().current(clock::now_ms()).is_err());
    });
}

#[test]
fn persisted_keys_are_aged_by_the_boot_clock_and_a_future_wall_time_is_refused() {
    local(async {
        let s = server("persist-age").await;
        let state = Dir::new("issuers", "persist-age-state");
        let cfg = config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state);
        let write = |fetched: persist::Fetched| {
            let saved =
                persist::Saved::new("idp", &cfg.describe(), None, fetched, jwks_of(&["k1"]));
            persist::save(&state.0, &saved).unwrap();
            Keys::new(cfg.clone()).unwrap()
        };
        let now = persist::Fetched::now();
        // Fetched 700 s ago in this boot, while the wall clock ran an hour ahead; it has been
        // set right since. The boot clock says 700 s: older than max_stale_s = 600.
        let keys = write(persist::Fetched {
            wall_ms: now.wall_ms + 3_600_000,
            boot_ns: now.boot_ns.saturating_sub(700_000_000_000),
            ..now.clone()
        });
        let e = keys.current(clock::now_ms()).unwrap_err();
        assert!(e.why.contains("more than max_stale_s = 600"), "{e}");
        // Before a reboot, at a wall time an hour from now: the age is unknown, not "new".
        let keys = write(persist::Fetched {
            wall_ms: now.wall_ms + 3_600_000,
            boot_id: "another-boot".into(),
            boot_ns: 1,
        });
        let e = keys.current(clock::now_ms()).unwrap_err();
        assert!(e.why.contains("s in the future"), "{e}");
        assert!(!keys.knows("k1"));
        let st = keys.status();
        assert!(st.unavailable, "{st:?}");
        assert!(
            st.unavailable_why
                .unwrap()
                .contains("the persisted keys: saved before a reboot")
        );
        // Before a reboot, 60 s ago on the wall clock: used, 60 s old.
        let keys = write(persist::Fetched {
            wall_ms: now.wall_ms - 60_000,
            boot_id: "another-boot".into(),
            boot_ns: 1,
        });
        assert!(keys.current(clock::now_ms()).is_ok());
        assert!(keys.status().age_s.is_some_and(|a| (60..120).contains(&a)));
    });
}

/// The threads that persisted into `dir`.
fn saves_into(dir: &Dir) -> Vec<std::thread::ThreadId> {
    let saves = persist::SAVES.lock().unwrap();
    saves
        .iter()
        .filter(|(d, _)| *d == dir.0)
        .map(|(_, t)| *t)
        .collect()
}

#[test]
fn keys_are_persisted_off_the_agent_thread_and_an_unchanged_jwks_not_rewritten_soon() {
    local(async {
        let s = server("persist-write").await;
        let state = Dir::new("issuers", "persist-write-state");
        let keys = Keys::new(config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state)).unwrap();
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        keys.persisted().await;
        let saves = saves_into(&state);
        assert_eq!(saves.len(), 1);
        assert_ne!(
            saves[0],
            std::thread::current().id(),
            "the fsync ran on the agent's thread"
        );
        // The same JWKS again within cache_min_s = 30: not written again.
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        keys.persisted().await;
        assert_eq!(
            saves_into(&state).len(),
            1,
            "an unchanged JWKS was rewritten"
        );
        // A new JWKS is.
        *s.jwks.borrow_mut() = Some(jwks_of(&["k2"]));
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        keys.persisted().await;
        assert_eq!(saves_into(&state).len(), 2);
        let loaded = persist::load(&state.0, "idp", &keys.0.cfg.describe(), 4096).unwrap();
        assert!(loaded.unwrap().jwks.contains("\"k2\""));
    });
}

#[test]
fn discovery_finds_the_jwks_uri_of_the_configured_issuer_only() {
    local(async {
        let s = server("disc").await;
        let state = Dir::new("issuers", "disc-state");
        let mut cfg = config(&s, SourceKind::Discovery, &state);
        cfg.issuer = Some(s.url("/good"));
        let keys = Keys::new(cfg.clone()).unwrap();
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        assert_eq!(keys.status().jwks_uri, Some(s.url("/jwks")));
        // The discovery document is cached (max-age=600): a second fetch asks for the JWKS only.
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        assert_eq!(s.hits("/good/.well-known/openid-configuration"), 1);
        assert_eq!(s.hits("/jwks"), 2);
        cfg.issuer = Some(s.url("/other"));
        assert_eq!(
            Keys::new(cfg.clone()).unwrap().fetch_now().await,
            Outcome::IssuerMismatch
        );
        cfg.issuer = Some(s.url("/plain"));
        assert_eq!(
            Keys::new(cfg).unwrap().fetch_now().await,
            Outcome::InsecureJwksUri
        );
    });
}

#[test]
fn discovery_and_the_jwks_share_one_timeout() {
    local(async {
        let s = server("disc-late").await;
        let state = Dir::new("issuers", "disc-late-state");
        let mut cfg = config(&s, SourceKind::Discovery, &state);
        cfg.issuer = Some(s.url("/late"));
        // Each GET alone (600 ms) is within the timeout; both together are not.
        cfg.fetch.timeout_ms = 1000;
        let keys = Keys::new(cfg).unwrap();
        assert_eq!(keys.fetch_now().await, Outcome::Timeout);
        let err = keys.status().last_fetch.unwrap().error.unwrap();
        assert!(err.contains("within timeout_ms = 1000"), "{err}");
        assert_eq!(s.hits("/late/.well-known/openid-configuration"), 1);
    });
}

#[test]
fn a_key_file_is_reread_when_it_changes_and_a_broken_one_keeps_the_keys() {
    let dir = Dir::new("issuers", "file");
    let path = dir.0.join("jwks.json");
    std::fs::write(&path, jwks_of(&["f1"])).unwrap();
    let cfg = SourceConfig {
        name: "default".into(),
        issuer: None,
        kind: SourceKind::File(path.clone()),
        fetch: Fetch {
            ca_bundle: None,
            max_bytes: 4096,
            timeout_ms: 1,
            cache_min_s: 1,
            cache_max_s: 1,
            refetch_cooldown_s: 1,
            max_stale_s: 1,
        },
        state_dir: dir.0.clone(),
    };
    let keys = Keys::new(cfg.clone()).unwrap();
    assert!(keys.knows("f1"));
    // A file never goes stale.
    assert!(keys.current(clock::now_ms() + 10_000_000).is_ok());
    let touch = |text: String| {
        std::fs::write(&path, text).unwrap();
        let later = SystemTime::now() + Duration::from_secs(keys.status().fetches.len() as u64 + 5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        keys.check_file()
    };
    assert_eq!(keys.check_file(), None, "unchanged");
    assert_eq!(touch("{".into()), Some(Outcome::NotJson));
    assert!(keys.knows("f1"), "a broken file keeps the keys");
    assert_eq!(touch(jwks_of(&["f2"])), Some(Outcome::Ok));
    assert!(keys.knows("f2") && !keys.knows("f1"));
    let counts: Vec<_> = keys
        .status()
        .fetches
        .into_iter()
        .map(|c| (c.trigger, c.outcome))
        .collect();
    assert_eq!(
        counts,
        [
            ("file_changed".into(), "ok".into()),
            ("file_changed".into(), "not_json".into())
        ]
    );
    std::fs::remove_file(&path).unwrap();
    assert!(
        Keys::new(cfg).unwrap_err().contains("jwks.json"),
        "a missing file is a configuration error"
    );
}

#[test]
fn skipped_keys_are_reported_and_a_jwks_of_no_usable_key_replaces_the_keys() {
    local(async {
        let s = server("skip").await;
        let state = Dir::new("issuers", "skip-state");
        let cfg = config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state);
        let keys = Keys::new(cfg.clone()).unwrap();
        let mut enc = SigningKey::generate(Alg::EdDSA, "e1").unwrap().public_jwk();
        enc["use"] = "enc".into();
        let sig = SigningKey::generate(Alg::EdDSA, "s1").unwrap().public_jwk();
        *s.jwks.borrow_mut() = Some(jwks(&[enc.clone(), sig]));
        assert_eq!(keys.fetch_now().await, Outcome::Ok);
        let st = keys.status();
        assert_eq!(st.kids, ["s1"]);
        assert_eq!(
            st.skipped
                .iter()
                .map(|k| (k.index, k.kid.as_deref(), k.reason.as_str()))
                .collect::<Vec<_>>(),
            [(0, Some("e1"), "encryption_key")]
        );
        assert!(keys.is_skipped("e1") && !keys.is_skipped("s1") && !keys.is_skipped("zz"));
        // The provider withdraws its signing key: the JWKS parses, and is the provider's word.
        *s.jwks.borrow_mut() = Some(jwks(&[enc]));
        assert_eq!(keys.fetch_now().await, Outcome::NoKeys);
        let st = keys.status();
        let err = st.last_fetch.clone().unwrap().error.unwrap();
        assert!(
            err.contains("no usable key (1 skipped; the first: JWKS key #0"),
            "{err}"
        );
        assert!(!keys.knows("s1"), "the withdrawn key is no longer trusted");
        assert!(keys.is_skipped("e1"), "its kid gets key_unusable");
        let now_keys = keys
            .current(clock::now_ms())
            .expect("an empty set, not unavailable");
        assert!(now_keys.is_empty());
        assert!(!st.stale && !st.unavailable, "{st:?}");
        *s.jwks.borrow_mut() = Some(r#"{"keys":[]}"#.into());
        assert_eq!(keys.fetch_now().await, Outcome::NoKeys);
        assert!(keys.current(clock::now_ms()).unwrap().is_empty());
        keys.persisted().await;
        // A restart does not bring the withdrawn key back from the persisted JWKS.
        *s.jwks.borrow_mut() = None;
        drop(keys);
        let again = Keys::new(cfg).unwrap();
        assert!(!again.knows("s1"), "the persisted JWKS is the empty one");
    });
}

/// Polls `done` every 10 ms, at most 5 s.
async fn until(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[test]
fn a_waiter_that_gives_up_cancels_nothing_and_run_fetches_at_start() {
    local(async {
        let s = server("cancel").await;
        let state = Dir::new("issuers", "cancel-state");
        let keys = Keys::new(config(&s, SourceKind::JwksUrl(s.url("/late-jwks")), &state)).unwrap();
        // The bind that asked goes away (its connection's timeout) before the fetch ends.
        let gave_up = tokio::time::timeout(Duration::from_millis(10), keys.refetch_unknown_kid());
        assert!(gave_up.await.is_err());
        assert!(until(|| keys.knows("late")).await, "the fetch went on");
        assert_eq!(s.hits("/late-jwks"), 1);
        // The background loop's first fetch is a `start` fetch.
        let state = Dir::new("issuers", "run-state");
        let keys = Keys::new(config(&s, SourceKind::JwksUrl(s.url("/jwks")), &state)).unwrap();
        let k = keys.clone();
        let run = tokio::task::spawn_local(async move { k.run().await });
        assert!(until(|| keys.status().last_fetch.is_some()).await);
        let last = keys.status().last_fetch.unwrap();
        assert_eq!(
            (last.trigger.as_str(), last.outcome.as_str()),
            ("start", "ok")
        );
        run.abort();
    });
}
