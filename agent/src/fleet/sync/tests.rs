//! Against a real redis-server (store/test_server.rs), no mock: two writers, one reader.

use std::{path::PathBuf, time::Duration};

use super::*;
use crate::fleet::{
    entry::{Entry, Kind, PoolKey},
    store::{StoreConfig, test_server::RedisServer},
};

const POOL: &str = "lab";
const KEY: [u8; 32] = [0x3c; 32];
const NOW: u64 = 1_764_600_000_000;
/// An outer bound only a hang reaches.
const HANG: Duration = Duration::from_secs(30);

fn store_with(server: &RedisServer, max_len: u64) -> Store {
    let cfg = StoreConfig {
        target: crate::fleet::store::Target::Url(server.url()),
        ca_file: None,
        credentials: Some(server.credentials()),
        op_timeout: Duration::from_millis(1000),
        stream_max_len: max_len,
    };
    Store::new(&cfg, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap()
}

fn store(server: &RedisServer) -> Store {
    store_with(server, 10_000)
}

fn entry(kind: Kind, subject: &str, origin: &str, seq: u64) -> Entry {
    Entry {
        kind,
        pool: POOL.into(),
        origin: origin.into(),
        seq,
        wall_ms: NOW + seq,
        subject: subject.into(),
        payload: "{}".into(),
    }
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn state_dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("tollgate-sync-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// A pass, retried once after a connection the server killed (the first call finds it dead).
async fn pass(s: &mut Store, c: &mut CursorFile, a: &mut Applier) -> Pass {
    match sync_once(s, c, a, 100, NOW).await {
        Ok(p) => p,
        Err(SyncError::Store(e)) if matches!(e.label(), "connection" | "timeout") => {
            sync_once(s, c, a, 100, NOW).await.unwrap()
        }
        Err(e) => panic!("{e}"),
    }
}

fn subjects(p: &Pass) -> Vec<String> {
    let mut v: Vec<_> = p
        .applied
        .iter()
        .map(|v| v.entry().subject.clone())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn two_writers_one_reader_catches_up_after_a_reconnect_and_a_restart() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let (mut w1, mut w2, mut r) = (store(&server), store(&server), store(&server));
        let dir = state_dir("catchup");
        let mut cursor = CursorFile::load(&dir.0).unwrap();
        let mut applier = Applier::new();
        w1.append(entry(Kind::Revocation, "tok-a", "node-1", 1))
            .await
            .unwrap();
        // First run: the snapshot.
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(p.reload, Some(Reload::First));
        assert_eq!(subjects(&p), ["tok-a"]);
        // Then the stream, both writers' entries.
        w2.append(entry(Kind::Revocation, "tok-b", "node-2", 1))
            .await
            .unwrap();
        w1.append(entry(Kind::Quarantine, "198.18.0.9", "node-1", 2))
            .await
            .unwrap();
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(p.reload, None);
        assert_eq!(subjects(&p), ["198.18.0.9", "tok-b"]);
        // Cut off: every connection killed; the writers carry on.
        server.cli(&[
            "CLIENT",
            "KILL",
            "USER",
            crate::fleet::store::test_server::USER,
        ]);
        for (w, origin, seq, subject) in [
            (&mut w1, "node-1", 3, "tok-c"),
            (&mut w2, "node-2", 2, "tok-d"),
        ] {
            let e = entry(Kind::Revocation, subject, origin, seq);
            if w.append(e.clone()).await.is_err() {
                w.append(e).await.unwrap();
            }
        }
        // At most `max` a pass: the rest follows in the next, and `more` says so.
        let p = match sync_once(&mut r, &mut cursor, &mut applier, 1, NOW).await {
            Ok(p) => p,
            Err(_) => sync_once(&mut r, &mut cursor, &mut applier, 1, NOW)
                .await
                .unwrap(),
        };
        assert_eq!((subjects(&p), p.more), (vec!["tok-c".into()], true));
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!((subjects(&p), p.more), (vec!["tok-d".into()], false));
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(subjects(&p), Vec::<String>::new());
        assert!(p.refused.is_empty() && p.reload.is_none());
        // A reconnect alone reads on from the cursor (nothing re-read, no reload).
        w2.append(entry(Kind::Revocation, "tok-e", "node-2", 3))
            .await
            .unwrap();
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(
            (subjects(&p), p.duplicates, p.reload),
            (vec!["tok-e".into()], 0, None)
        );
        // A restart: the cursor from disk, a new applier, seeded from the snapshot first
        // (else a replayed old entry would find nothing newer held); then the stream again.
        let mut cursor = CursorFile::load(&dir.0).unwrap();
        let mut applier = Applier::new();
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(p.reload, Some(Reload::Restart));
        assert_eq!(p.applied.len(), 6);
        w1.append(entry(Kind::Revocation, "tok-f", "node-1", 4))
            .await
            .unwrap();
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!((subjects(&p), p.reload), (vec!["tok-f".into()], None));
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_trimmed_stream_is_a_gap_and_the_snapshot_reload_loses_nothing() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&["--stream-node-max-entries", "4"]);
        let mut w1 = store_with(&server, 8);
        let mut w2 = store_with(&server, 8);
        let mut r = store(&server);
        let dir = state_dir("gap");
        let mut cursor = CursorFile::load(&dir.0).unwrap();
        let mut applier = Applier::new();
        w1.append(entry(Kind::Revocation, "tok-0", "node-1", 1))
            .await
            .unwrap();
        pass(&mut r, &mut cursor, &mut applier).await;
        let mut want = vec!["tok-0".to_string()];
        for i in 1..=40u64 {
            let (w, origin) = if i % 2 == 0 {
                (&mut w1, "node-1")
            } else {
                (&mut w2, "node-2")
            };
            let subject = format!("tok-{i}");
            w.append(entry(Kind::Revocation, &subject, origin, i + 1))
                .await
                .unwrap();
            want.push(subject);
        }
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(p.reload, Some(Reload::Gap));
        assert!(!p.more);
        // Everything written is held: the 40 new ones applied, tok-0 a duplicate.
        assert_eq!(p.applied.len(), 40);
        assert_eq!(p.duplicates, 1);
        want.sort();
        for s in &want {
            assert!(applier.token_revoked(s, NOW), "{s} lost");
        }
        // And the stream reads on from the snapshot's position.
        w1.append(entry(Kind::Revocation, "tok-41", "node-1", 50))
            .await
            .unwrap();
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!((subjects(&p), p.reload), (vec!["tok-41".into()], None));
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn forged_and_replayed_entries_are_counted_and_not_applied() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let (mut w1, mut w2, mut r) = (store(&server), store(&server), store(&server));
        let dir = state_dir("forged");
        let mut cursor = CursorFile::load(&dir.0).unwrap();
        let mut applier = Applier::new();
        let addr = "198.18.0.7";
        pass(&mut r, &mut cursor, &mut applier).await;
        w1.append(entry(Kind::Quarantine, addr, "node-1", 1))
            .await
            .unwrap();
        let release_id = w2
            .append(entry(Kind::Release, addr, "node-2", 2))
            .await
            .unwrap();
        w1.append(entry(Kind::Quarantine, addr, "node-1", 3))
            .await
            .unwrap();
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(p.applied.len(), 3);
        // A store writer without the key: a forged release, and the genuine old release
        // copied back into the stream (its fields as stored, via XRANGE).
        let stream = "tollgate:{lab}:stream";
        let zero_mac = "0".repeat(64);
        let seq = "9".to_string();
        let wall = (NOW + 9).to_string();
        server.cli(&[
            "XADD", stream, "*", "kind", "release", "pool", POOL, "origin", "node-2", "seq", &seq,
            "wall_ms", &wall, "subject", addr, "payload", "{}", "mac", &zero_mac,
        ]);
        let id = release_id.to_string();
        let fields = server.cli(&["XRANGE", stream, &id, &id]);
        // redis-cli prints the id, then field and value lines.
        let lines: Vec<&str> = fields.lines().skip(1).collect();
        assert_eq!(lines.len(), 16, "{fields}");
        let mut args = vec!["XADD", stream, "*"];
        args.extend(lines);
        server.cli(&args);
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert!(p.applied.is_empty(), "{:?}", p.applied);
        assert_eq!(
            p.refused,
            BTreeMap::from([("bad_mac", 1), ("stale", 1)]),
            "the forged release is bad_mac, the replayed one stale"
        );
        let held = applier.held(&format!("quarantine:{addr}")).unwrap();
        assert_eq!((held.kind, held.seq), (Kind::Quarantine, 3));
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_store_that_comes_back_empty_is_a_reset_and_nothing_revoked_comes_back() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let (mut w, mut r) = (store(&server), store(&server));
        let dir = state_dir("reset");
        let mut cursor = CursorFile::load(&dir.0).unwrap();
        let mut applier = Applier::new();
        w.append(entry(Kind::Revocation, "tok-r", "node-1", 1))
            .await
            .unwrap();
        pass(&mut r, &mut cursor, &mut applier).await;
        assert!(applier.token_revoked("tok-r", NOW));
        server.cli(&["FLUSHALL"]);
        // After the flush a binding of the revoked token arrives (a key holder's, newer).
        w.append(entry(Kind::Binding, "tok-r", "node-2", 5))
            .await
            .unwrap();
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(p.reload, Some(Reload::StoreReset));
        assert_eq!(p.refused, BTreeMap::from([("revoked", 1)]));
        assert!(applier.token_revoked("tok-r", NOW));
        // The next pass is an ordinary read under the new epoch.
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!(p.reload, None);
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_cursor_that_cannot_be_written_stays_put_and_the_batch_is_read_again() {
    tokio::time::timeout(HANG, async {
        let server = RedisServer::start(&[]);
        let (mut w, mut r) = (store(&server), store(&server));
        let dir = state_dir("unwritable");
        let mut cursor = CursorFile::load(&dir.0).unwrap();
        let mut applier = Applier::new();
        pass(&mut r, &mut cursor, &mut applier).await;
        let before = cursor.cursor().clone();
        w.append(entry(Kind::Revocation, "tok-1", "node-1", 1))
            .await
            .unwrap();
        // The state directory is gone: the pass fails on the cursor, which stays where it was.
        std::fs::remove_dir_all(&dir.0).unwrap();
        let e = sync_once(&mut r, &mut cursor, &mut applier, 100, NOW)
            .await
            .expect_err("a cursor that cannot be written fails the pass");
        let SyncError::Cursor { pass: taken, .. } = e else {
            panic!("{e}")
        };
        // What the applier took comes back for the caller to install.
        assert_eq!(subjects(&taken), ["tok-1"]);
        assert_eq!(cursor.cursor(), &before);
        // Back: the same entry is read again, a duplicate, and the cursor moves on.
        std::fs::create_dir_all(&dir.0).unwrap();
        let p = pass(&mut r, &mut cursor, &mut applier).await;
        assert_eq!((p.applied.len(), p.duplicates), (0, 1));
        assert!(cursor.cursor().last > before.last);
        assert_eq!(CursorFile::load(&dir.0).unwrap().cursor(), cursor.cursor());
    })
    .await
    .expect("hung");
}
