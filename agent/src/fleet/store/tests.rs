//! Against a real redis-server (test_server.rs), no mock.

use std::{net::IpAddr, time::Duration};

use super::{test_server::RedisServer, *};
use crate::fleet::entry::{Entry, Kind, PoolKey, Refusal};

const POOL: &str = "lab";
const KEY: [u8; 32] = [0x5a; 32];
/// An outer bound that only a hang reaches; a hung test fails instead of blocking CI.
const HANG: Duration = Duration::from_secs(20);

fn config(server: &RedisServer) -> StoreConfig {
    StoreConfig {
        target: Target::Url(server.url()),
        ca_file: None,
        credentials: Some(server.credentials()),
        op_timeout: Duration::from_millis(1000),
        stream_max_len: 10_000,
    }
}

fn store(server: &RedisServer) -> Store {
    Store::new(&config(server), PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap()
}

fn revocation(origin: &str, seq: u64) -> Entry {
    Entry {
        kind: Kind::Revocation,
        pool: POOL.into(),
        origin: origin.into(),
        seq,
        wall_ms: 1_764_600_000_000 + seq,
        subject: format!("tok-{seq}"),
        payload: format!(r#"{{"token_id":"tok-{seq}"}}"#),
    }
}

async fn entries(s: &mut Store, since: StreamPos) -> Batch {
    match s.read_since(since, 100).await.unwrap() {
        Read::Entries(b) => b,
        Read::Gap => panic!("unexpected gap after {since}"),
    }
}

fn seqs(b: &Batch) -> Vec<u64> {
    b.entries.iter().map(|(_, v)| v.entry().seq).collect()
}

#[tokio::test]
async fn append_then_read_since_catches_up_across_a_reconnect() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let mut writer = store(&server);
        let mut reader = store(&server);
        // An empty pool reads as nothing, not as a gap, and its snapshot is empty.
        let b = entries(&mut reader, StreamPos::ZERO).await;
        assert!(b.entries.is_empty() && b.last == StreamPos::ZERO);
        let snap = reader.snapshot().await.unwrap();
        assert!(snap.entries.is_empty() && snap.position == StreamPos::ZERO);

        for seq in 1..=3 {
            writer.append(revocation("node-1", seq)).await.unwrap();
        }
        let b = entries(&mut reader, StreamPos::ZERO).await;
        assert_eq!(seqs(&b), [1, 2, 3]);
        let seen = b.last;

        // The reader is cut off (its connection killed by the server); meanwhile two more.
        server.cli(&["CLIENT", "KILL", "USER", test_server::USER]);
        // The writer's connection was killed too: its first append may fail the same way.
        for seq in 4..=5 {
            if let Err(e) = writer.append(revocation("node-1", seq)).await {
                assert!(matches!(e.label(), "connection" | "timeout"), "{e}");
                writer.append(revocation("node-1", seq)).await.unwrap();
            }
        }
        // The first call after the kill may fail (the dead connection is found and dropped);
        // the next reconnects and reads exactly what was missed.
        let b = match reader.read_since(seen, 100).await {
            Ok(Read::Entries(b)) => b,
            Ok(Read::Gap) => panic!("gap"),
            Err(e) => {
                assert!(matches!(e.label(), "connection" | "timeout"), "{e}");
                entries(&mut reader, seen).await
            }
        };
        assert_eq!(seqs(&b), [4, 5]);
        assert!(b.refused.is_empty());
        // Nothing new: same position back.
        let again = entries(&mut reader, b.last).await;
        assert!(again.entries.is_empty() && again.last == b.last);
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_trimmed_stream_reports_a_gap_and_the_snapshot_covers_it() {
    tokio::time::timeout(HANG, async {
        // Small stream nodes, so `MAXLEN ~` trims in small steps.
        let server = RedisServer::start(&["--stream-node-max-entries", "4"]);
        let mut cfg = config(&server);
        cfg.stream_max_len = 8;
        let mut writer = Store::new(&cfg, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        let first = writer.append(revocation("node-1", 1)).await.unwrap();
        for seq in 2..=40 {
            writer.append(revocation("node-1", seq)).await.unwrap();
        }
        let mut reader = store(&server);
        assert!(matches!(
            reader.read_since(first, 100).await.unwrap(),
            Read::Gap
        ));
        // The snapshot has every subject, and a position from which the stream is whole.
        let snap = reader.snapshot().await.unwrap();
        assert!(snap.refused.is_empty());
        let mut got: Vec<u64> = snap.entries.iter().map(|v| v.entry().seq).collect();
        got.sort();
        assert_eq!(got, (1..=40).collect::<Vec<_>>());
        writer.append(revocation("node-1", 41)).await.unwrap();
        assert_eq!(seqs(&entries(&mut reader, snap.position).await), [41]);
        // A store that lost the stream (restarted empty) is a gap for a node that saw some.
        server.cli(&["DEL", "tollgate:{lab}:stream"]);
        assert!(matches!(
            reader.read_since(snap.position, 100).await.unwrap(),
            Read::Gap
        ));
    })
    .await
    .expect("hung");
}

/// A store writer without the key hides an entry from the nodes that have not read it yet:
/// by XDEL, or by deleting the stream and adding one with ids above every cursor. Both are
/// gaps (the snapshot decides), never a silent skip.
#[tokio::test]
async fn a_deleted_entry_or_a_remade_stream_is_a_gap() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let mut writer = store(&server);
        let first = writer.append(revocation("node-1", 1)).await.unwrap();
        let second = writer.append(revocation("node-1", 2)).await.unwrap();
        let third = writer.append(revocation("node-1", 3)).await.unwrap();
        let mut reader = store(&server);
        assert_eq!(
            seqs(&entries(&mut reader, StreamPos::ZERO).await),
            [1, 2, 3]
        );
        // XDEL of the second entry: a reader at the first has lost it.
        let stream = "tollgate:{lab}:stream";
        server.cli(&["XDEL", stream, &second.to_string()]);
        let mut late = store(&server);
        assert!(matches!(
            late.read_since(first, 100).await.unwrap(),
            Read::Gap
        ));
        // A reader past the deleted entry lost nothing: no gap.
        let last = writer.append(revocation("node-1", 4)).await.unwrap();
        assert_eq!(seqs(&entries(&mut reader, third).await), [4]);
        // The stream made again with an id above every cursor: fewer entries added than
        // this reader saw.
        server.cli(&["DEL", stream]);
        let high = format!("{}-0", last.ms + 60_000);
        server.cli(&["XADD", stream, &high, "kind", "release"]);
        assert!(matches!(
            reader.read_since(last, 100).await.unwrap(),
            Read::Gap
        ));
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn two_concurrent_claims_of_one_token_one_wins() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let mut a = store(&server);
        let mut b = store(&server);
        let addr_a: IpAddr = "198.18.0.10".parse().unwrap();
        let addr_b: IpAddr = "2001:db8::20".parse().unwrap();
        let ttl = Duration::from_secs(60);
        for i in 0..20 {
            let jti = format!("jti-{i}");
            let (ra, rb) = tokio::join!(
                a.claim_token(&jti, addr_a, ttl),
                b.claim_token(&jti, addr_b, ttl)
            );
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            // Exactly one wins, and the loser is told the winner's address.
            let winner = match (&ra, &rb) {
                (Claim::Claimed, Claim::HeldBy(h)) if *h == addr_a => addr_a,
                (Claim::HeldBy(h), Claim::Claimed) if *h == addr_b => addr_b,
                _ => panic!("not exactly one winner: {ra:?} {rb:?}"),
            };
            // The loser changed nothing: the store still names the winner.
            let held = server.cli(&["GET", &KeyNames::new(POOL).claim(&jti)]);
            assert_eq!(held.trim(), winner.to_string(), "{jti}");
        }
        // The holder claiming again is still Claimed (a second bind from the same address).
        let holder = server.cli(&["GET", &KeyNames::new(POOL).claim("jti-0")]);
        let holder: IpAddr = holder.trim().parse().unwrap();
        assert_eq!(
            a.claim_token("jti-0", holder, ttl).await.unwrap(),
            Claim::Claimed
        );
        // Any token id can be claimed (its key holds the id's SHA-256): spaces, non-ASCII.
        for odd in ["a b", "Zoë", &"x".repeat(4000)] {
            assert_eq!(
                a.claim_token(odd, addr_a, ttl).await.unwrap(),
                Claim::Claimed
            );
            assert_eq!(
                b.claim_token(odd, addr_b, ttl).await.unwrap(),
                Claim::HeldBy(addr_a)
            );
        }
        // The claim expires with the token.
        a.claim_token("short", addr_a, Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            b.claim_token("short", addr_b, ttl).await.unwrap(),
            Claim::Claimed
        );
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn entries_written_by_hand_without_the_key_are_refused_with_their_label() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let mut s = store(&server);
        s.append(revocation("node-1", 1)).await.unwrap();
        let stream = "tollgate:{lab}:stream";
        let zero_mac = "0".repeat(64);
        let xadd = |fields: &[&str]| {
            let mut args = vec!["XADD", stream, "*"];
            args.extend_from_slice(fields);
            server.cli(&args)
        };
        // A "release" a store writer would like to lift a quarantine with.
        xadd(&[
            "kind", "release", "pool", POOL, "origin", "node-1", "seq", "2", "wall_ms", "1",
            "subject", "198.18.0.7", "payload", "{}", "mac", &zero_mac,
        ]);
        xadd(&[
            "kind", "grant", "pool", POOL, "origin", "node-1", "seq", "3", "wall_ms", "1",
            "subject", "x", "payload", "{}", "mac", &zero_mac,
        ]);
        xadd(&["hello", "world"]);
        xadd(&[
            "kind", "revocation", "pool", "other", "origin", "node-1", "seq", "4", "wall_ms",
            "1", "subject", "x", "payload", "{}", "mac", &zero_mac,
        ]);
        // A binary field name (redis-cli cannot type one; any client can send one): one
        // refused entry, not a read that fails every interval.
        let info = redis::IntoConnectionInfo::into_connection_info(server.url().as_str())
            .unwrap()
            .set_redis_settings(
                redis::RedisConnectionInfo::default()
                    .set_username(test_server::USER)
                    .set_password(&server.password),
            );
        let raw = redis::Client::open(info).unwrap();
        let mut raw = raw.get_multiplexed_async_connection().await.unwrap();
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(&b"\xff\xfe"[..])
            .arg("x")
            .query_async(&mut raw)
            .await
            .unwrap();
        s.append(revocation("node-1", 5)).await.unwrap();
        let b = entries(&mut s, StreamPos::ZERO).await;
        assert_eq!(seqs(&b), [1, 5]);
        let labels: Vec<_> = b.refused.iter().map(|(_, r)| r.label()).collect();
        assert_eq!(
            labels,
            ["bad_mac", "unknown_kind", "malformed", "other_pool", "malformed"]
        );

        // Into the snapshot: a forged value, and a genuine one copied under another field.
        let snapshot = "tollgate:{lab}:snapshot";
        let genuine = server.cli(&["HGET", snapshot, "revocation:tok-1"]);
        server.cli(&[
            "HSET",
            snapshot,
            "quarantine:198.18.0.7",
            &format!(
                r#"{{"kind":"release","pool":"lab","origin":"n","seq":"1","wall_ms":"1","subject":"198.18.0.7","payload":"{{}}","mac":"{zero_mac}"}}"#
            ),
        ]);
        server.cli(&["HSET", snapshot, "revocation:tok-9", genuine.trim_end()]);
        let snap = s.snapshot().await.unwrap();
        let mut refused: Vec<_> = snap
            .refused
            .iter()
            .map(|(f, r)| (f.as_str(), r.label()))
            .collect();
        refused.sort();
        assert_eq!(
            refused,
            [
                ("quarantine:198.18.0.7", Refusal::BadMac.label()),
                ("revocation:tok-9", Refusal::Misplaced.label())
            ]
        );
        assert_eq!(snap.entries.len(), 2);
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_frozen_server_times_out_every_operation_and_the_store_recovers() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let mut cfg = config(&server);
        cfg.op_timeout = Duration::from_millis(300);
        let mut s = Store::new(&cfg, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        s.ping().await.unwrap();
        server.pause();
        // On the open connection, and then on a new one (connect succeeds into the kernel's
        // backlog; the handshake never answers): both bounded by op_timeout.
        let e = s.append(revocation("node-1", 1)).await.unwrap_err();
        assert_eq!(e.label(), "timeout", "{e}");
        let e = s.read_since(StreamPos::ZERO, 10).await.unwrap_err();
        assert_eq!(e.label(), "timeout", "{e}");
        let e = s
            .claim_token("jti", "198.18.0.1".parse().unwrap(), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.label(), "timeout", "{e}");
        server.resume();
        // Back: the next operation reconnects.
        s.append(revocation("node-1", 2)).await.unwrap();
        // A timed-out append is "unknown", not "not done": its bytes were in the frozen
        // server's socket and it ran on resume. Entries are idempotent per subject, so the
        // caller republishes after a timeout and a duplicate is harmless.
        let got = seqs(&entries(&mut s, StreamPos::ZERO).await);
        assert!(got == [1, 2] || got == [2], "{got:?}");
    })
    .await
    .expect("hung: an operation was not bounded by op_timeout");
}

#[tokio::test]
async fn the_password_is_never_printed_and_a_wrong_one_is_auth() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let cfg = config(&server);
        let mut s = store(&server);
        s.ping().await.unwrap();
        for text in [
            format!("{cfg:?}"),
            format!("{s:?}"),
            format!("{:?}", server.credentials()),
        ] {
            assert!(!text.contains(&server.password), "{text}");
        }

        let mut wrong = cfg.clone();
        let wrong_password = format!("{}x", server.password);
        wrong.credentials = Some(Credentials::new(test_server::USER, &wrong_password));
        let mut w = Store::new(&wrong, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        let e = w.ping().await.unwrap_err();
        assert_eq!(e.label(), "auth", "{e}");
        for text in [e.to_string(), format!("{e:?}"), format!("{w:?}")] {
            assert!(!text.contains(&server.password), "{text}");
        }

        // A password in the URL is refused without echoing it.
        let mut in_url = cfg.clone();
        in_url.target = Target::Url(format!(
            "redis://{}:{}@127.0.0.1:{}",
            test_server::USER,
            server.password,
            server.port
        ));
        let e = Store::new(&in_url, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap_err();
        assert_eq!(e.label(), "config");
        assert!(!e.to_string().contains(&server.password), "{e}");

        // Credentials from a file: loose permissions refused, the error without the content.
        let path = server.dir.join("creds.toml");
        std::fs::write(
            &path,
            format!(
                "user = \"{}\"\npassword = \"{}\"\n",
                test_server::USER,
                server.password
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credentials::load(&path).unwrap_err();
        assert!(e.to_string().contains("other users"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Credentials::load(&path).unwrap();
        let mut from_file = cfg.clone();
        from_file.credentials = Some(c);
        let mut f = Store::new(&from_file, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        f.ping().await.unwrap();
        std::fs::write(&path, format!("password = {}\n", server.password)).unwrap();
        let e = Credentials::load(&path).unwrap_err();
        assert!(!e.to_string().contains(&server.password), "{e}");
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn heartbeats_list_live_members_and_drop_expired_ones() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let mut s = store(&server);
        assert!(s.members().await.unwrap().is_empty());
        s.heartbeat("node-1", r#"{"v":1}"#, Duration::from_secs(60))
            .await
            .unwrap();
        s.heartbeat("node-2", r#"{"v":2}"#, Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        let m = s.members().await.unwrap();
        assert_eq!(
            m,
            [Member {
                node: "node-1".into(),
                info: r#"{"v":1}"#.into()
            }]
        );
        // The expired name left the set.
        assert_eq!(server.cli(&["SCARD", "tollgate:{lab}:members"]).trim(), "1");
        // Names a store writer added that are no node names are skipped, not an error.
        server.cli(&["SADD", "tollgate:{lab}:members", "no such node!"]);
        assert_eq!(s.members().await.unwrap().len(), 1);
        assert_eq!(server.cli(&["SCARD", "tollgate:{lab}:members"]).trim(), "1");
        // A member key a store writer made huge is not read: its info shows as nothing.
        server.cli(&["SADD", "tollgate:{lab}:members", "node-9"]);
        server.cli(&[
            "SET",
            "tollgate:{lab}:member:node-9",
            &"x".repeat(MAX_MEMBER_INFO_BYTES + 1),
        ]);
        let m = s.members().await.unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].node, "node-9");
        assert_eq!(m[1].info, "");
        assert_eq!(
            s.heartbeat("bad name", "{}", Duration::from_secs(1))
                .await
                .unwrap_err()
                .label(),
            "config"
        );
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn rediss_with_the_ca_file_connects_and_another_ca_is_refused() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start_tls();
        let mut cfg = config(&server);
        cfg.ca_file = server.ca.clone();
        let mut s = Store::new(&cfg, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        s.append(revocation("node-1", 1)).await.unwrap();
        assert_eq!(seqs(&entries(&mut s, StreamPos::ZERO).await), [1]);

        // A certificate from a CA the node was not given: the handshake fails.
        cfg.ca_file = Some(test_server::other_ca(&server.dir));
        let mut s = Store::new(&cfg, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        let e = s.ping().await.unwrap_err();
        assert_eq!(e.label(), "connection", "{e}");
        // Plain TCP to the TLS port gets no answer it can read.
        cfg.ca_file = None;
        cfg.target = Target::Url(format!("redis://127.0.0.1:{}", server.port));
        cfg.op_timeout = Duration::from_millis(300);
        let mut s = Store::new(&cfg, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        assert!(s.ping().await.is_err());
    })
    .await
    .expect("hung");
}

#[test]
fn urls_and_ca_files_are_checked_before_connecting() {
    let key = || PoolKey::from_bytes(&KEY, POOL).unwrap();
    let cfg = |url: &str, ca: Option<&str>| StoreConfig {
        target: Target::Url(url.into()),
        ca_file: ca.map(PathBuf::from),
        credentials: None,
        op_timeout: Duration::from_secs(1),
        stream_max_len: 100,
    };
    let label = |c: StoreConfig| Store::new(&c, key()).map(|_| ()).unwrap_err().label();
    assert_eq!(label(cfg("http://127.0.0.1:6379", None)), "config");
    assert_eq!(
        label(cfg("redis://127.0.0.1:6379", Some("/ca.pem"))),
        "config"
    );
    assert_eq!(
        label(cfg("rediss://127.0.0.1:6379", Some("/nonexistent/ca.pem"))),
        "config"
    );
    // `#insecure` is the crate's switch for "no certificate check": never taken from a URL.
    assert_eq!(
        label(cfg("rediss://127.0.0.1:6379#insecure", None)),
        "config"
    );
    assert_eq!(
        label(cfg("redis://127.0.0.1:6379/?protocol=3", None)),
        "config"
    );
    let err = Store::new(&cfg("redis://user:s3cret@127.0.0.1:6379", None), key())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("credentials") && !err.contains("s3cret"),
        "{err}"
    );
    Store::new(&cfg("redis://127.0.0.1:6379/0", None), key()).unwrap();
    Store::new(&cfg("rediss://store.example.invalid:6380", None), key()).unwrap();
    assert_eq!("5-7".parse::<StreamPos>(), Ok(StreamPos { ms: 5, seq: 7 }));
    assert!(StreamPos { ms: 5, seq: 8 } > StreamPos { ms: 5, seq: 7 });
}

#[test]
fn sentinel_addresses_are_host_and_port() {
    for ok in [
        "sentinel-1.example:26379",
        "198.18.0.1:26379",
        "[2001:db8::1]:26379",
        "localhost:1",
    ] {
        assert_eq!(check_sentinel_node(ok), Ok(()), "{ok}");
    }
    for bad in [
        "sentinel-1.example",
        "198.18.0.1:0",
        "198.18.0.1:65536",
        "198.18.0.1:+80",
        "2001:db8::1:26379",
        "[2001:db8::1]26379",
        "0.0.0.0:26379",
        "[::]:26379",
        ":26379",
        "bad_host:26379",
        "-lead.example:26379",
        "redis://198.18.0.1:26379",
    ] {
        assert!(check_sentinel_node(bad).is_err(), "{bad} accepted");
    }
}
