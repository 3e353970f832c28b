//! The store through Sentinel, against real `redis-server` and `redis-sentinel` processes
//! (test_sentinel.rs): lookup, failover during writes with no acknowledged entry lost, and
//! a stale sentinel's replica never written to.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    test_sentinel::{SentinelProc, SentinelSet},
    *,
};
use crate::fleet::entry::{Entry, Kind, PoolKey};

const POOL: &str = "lab";
const KEY: [u8; 32] = [0x6b; 32];
/// An outer bound only a hang reaches.
const HANG: Duration = Duration::from_secs(40);
/// Entries the failover writer publishes.
const WRITES: u64 = 200;
/// Tries per entry; with op_timeout 1 s and 50 ms between tries, longer than any failover
/// here, shorter than HANG.
const TRIES: u32 = 60;

fn config(set: &SentinelSet, target: SentinelTarget) -> StoreConfig {
    StoreConfig {
        target: Target::Sentinel(target),
        ca_file: set.acl.ca(),
        credentials: Some(Credentials::new(test_server::USER, &set.password)),
        op_timeout: Duration::from_millis(1000),
        stream_max_len: 100_000,
    }
}

fn store(set: &SentinelSet) -> Store {
    store_for(set, set.target())
}

fn store_for(set: &SentinelSet, target: SentinelTarget) -> Store {
    Store::new(
        &config(set, target),
        PoolKey::from_bytes(&KEY, POOL).unwrap(),
    )
    .unwrap()
}

fn revocation(seq: u64) -> Entry {
    Entry {
        kind: Kind::Revocation,
        pool: POOL.into(),
        origin: "node-1".into(),
        seq,
        wall_ms: 1_764_600_000_000 + seq,
        subject: format!("tok-{seq}"),
        payload: format!(r#"{{"token_id":"tok-{seq}"}}"#),
    }
}

fn port_of(addr: Option<&str>) -> Option<u16> {
    addr?.rsplit_once(':')?.1.parse().ok()
}

const STREAM: &str = "tollgate:{lab}:stream";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sentinel_a_store_appends_reads_and_claims_on_the_primary() {
    let set = SentinelSet::start();
    tokio::time::timeout(HANG, async {
        let mut s = store(&set);
        assert_eq!(s.primary(), None, "connects on first use only");
        assert_eq!(set.first.cli(&["ROLE"]).lines().next(), Some("master"));
        let pos = s.append(revocation(1)).await.unwrap();
        assert_eq!(port_of(s.primary()), Some(set.first.port));
        // The documented node rules hold: nothing dangerous, nothing outside the pool's keys.
        assert!(set.first.cli(&["FLUSHALL"]).contains("NOPERM"));
        assert!(set.first.cli(&["SET", "other", "1"]).contains("NOPERM"));
        // Acknowledged means a replica has it: it is on the replica already.
        assert_eq!(set.second.cli(&["XLEN", STREAM]).trim(), "1");
        let Read::Entries(b) = s.read_since(StreamPos::ZERO, 10).await.unwrap() else {
            panic!("gap");
        };
        assert_eq!(b.last, pos);
        assert_eq!(b.entries[0].1.entry().subject, "tok-1");
        let snap = s.snapshot().await.unwrap();
        assert_eq!(snap.entries.len(), 1);
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let ttl = Duration::from_secs(60);
        assert_eq!(s.claim_token("t1", a, ttl).await.unwrap(), Claim::Claimed);
        assert_eq!(s.claim_token("t1", b, ttl).await.unwrap(), Claim::HeldBy(a));
        s.heartbeat("node-1", "{}", ttl).await.unwrap();
        assert_eq!(s.members().await.unwrap().len(), 1);
        // Debug names the service, never the password.
        let shown = format!("{s:?} {:?}", config(&set, set.target()));
        assert!(shown.contains("sentinel:tollgate-store"), "{shown}");
        assert!(!shown.contains(&set.password), "{shown}");
    })
    .await
    .expect("hung");
}

#[test]
fn from_fleet_takes_a_url_or_sentinels() {
    use crate::config::{Fleet, FleetStore, Outage};
    let mut f = Fleet {
        store: FleetStore::Sentinel {
            service: "tollgate-store".into(),
            nodes: vec!["127.0.0.1:26379".into(), "[2001:db8::1]:26379".into()],
            tls: false,
        },
        ca_file: None,
        credentials: None,
        pool_key: "/nonexistent".into(),
        pool: POOL.into(),
        node: "node-1".into(),
        sync_interval_ms: 250,
        op_timeout_ms: 500,
        stream_max_len: 10_000,
        outage: Outage::default(),
        line: 1,
    };
    let key = || PoolKey::from_bytes(&KEY, POOL).unwrap();
    let cfg = StoreConfig::from_fleet(&f, None).unwrap();
    assert_eq!(
        cfg.target,
        Target::Sentinel(SentinelTarget {
            service: "tollgate-store".into(),
            nodes: vec!["127.0.0.1:26379".into(), "[2001:db8::1]:26379".into()],
            tls: false,
        })
    );
    assert_eq!(cfg.op_timeout, Duration::from_millis(500));
    Store::new(&cfg, key()).unwrap();
    f.store = FleetStore::Url {
        url: "redis://127.0.0.1:6379".into(),
        tls: false,
    };
    let cfg = StoreConfig::from_fleet(&f, None).unwrap();
    assert_eq!(cfg.target, Target::Url("redis://127.0.0.1:6379".into()));
    Store::new(&cfg, key()).unwrap();
    // What the store refuses (config check refuses it first): a bad node, no node, a CA
    // file without TLS.
    let refused = |t: SentinelTarget, ca: Option<&str>| {
        let cfg = StoreConfig {
            target: Target::Sentinel(t),
            ca_file: ca.map(Into::into),
            credentials: None,
            op_timeout: Duration::from_millis(500),
            stream_max_len: 10_000,
        };
        Store::new(&cfg, key()).unwrap_err().to_string()
    };
    let t = |nodes: &[&str]| SentinelTarget {
        service: "tollgate-store".into(),
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        tls: false,
    };
    assert!(refused(t(&["127.0.0.1"]), None).contains("no port"));
    assert!(refused(t(&[]), None).contains("no sentinel address"));
    assert!(refused(t(&["127.0.0.1:26379"]), Some("/etc/ssl/ca.pem")).contains("tls = true"));
}

/// How the primary goes away mid-run.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// `SENTINEL FAILOVER`: the replica promoted, the old primary demoted and kept.
    Failover,
    /// SIGKILL of the primary: the sentinels agree it is down and promote the replica.
    Kill,
}

/// What the writer saw.
struct Written {
    /// Seqs whose append returned Ok, with the port of the primary and the time.
    acked: Vec<(u64, u16, Instant)>,
    /// Failed tries by label and the port of the primary last connected to (0: none).
    errors: BTreeMap<(&'static str, u16), u32>,
    /// Seqs that never got an Ok within their tries.
    given_up: Vec<u64>,
    /// The writer's store when it is done.
    store: Option<Store>,
}

/// Publishes WRITES revocations, each tried again after an error (as the outbox does)
/// until it returns Ok, at most TRIES times; `progress` is the last seq finished.
async fn write_all(mut store: Store, progress: Arc<AtomicU64>) -> Written {
    let mut w = Written {
        acked: Vec::new(),
        errors: BTreeMap::new(),
        given_up: Vec::new(),
        store: None,
    };
    for seq in 1..=WRITES {
        let mut done = false;
        for _ in 0..TRIES {
            match store.append(revocation(seq)).await {
                Ok(_) => {
                    let port = port_of(store.primary()).expect("connected after an Ok");
                    w.acked.push((seq, port, Instant::now()));
                    done = true;
                    break;
                }
                Err(e) => {
                    let port = port_of(store.primary()).unwrap_or(0);
                    *w.errors.entry((e.label(), port)).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if !done {
            w.given_up.push(seq);
        }
        progress.store(seq, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    w.store = Some(store);
    w
}

/// Every subject in the stream, read through the sentinels.
async fn subjects_in_stream(s: &mut Store) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut last = StreamPos::ZERO;
    for _ in 0..100 {
        let b = match s.read_since(last, 1000).await {
            Ok(Read::Entries(b)) => b,
            Ok(Read::Gap) => panic!("gap after {last}"),
            Err(e) => panic!("reading back: {e}"),
        };
        if b.entries.is_empty() {
            return seen;
        }
        assert!(b.refused.is_empty(), "{:?}", b.refused);
        seen.extend(b.entries.iter().map(|(_, v)| v.entry().subject.clone()));
        last = b.last;
    }
    panic!("stream longer than 100 000 entries");
}

async fn no_acknowledged_entry_is_lost(loss: Loss) {
    let mut set = SentinelSet::start();
    let old = set.agreed_primary().expect("sentinels agree");
    assert_eq!(old, set.first.port);
    let progress = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_all(store(&set), progress.clone()));
    let r = tokio::time::timeout(HANG, async {
        // Mid-way: a quarter written.
        for _ in 0..400 {
            if progress.load(Ordering::Relaxed) >= WRITES / 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            progress.load(Ordering::Relaxed) >= WRITES / 4,
            "writer stuck"
        );
        let lost_at = Instant::now();
        let new = tokio::task::block_in_place(|| {
            match loss {
                Loss::Failover => set.failover(),
                Loss::Kill => set.first.kill(),
            }
            let new = set.wait_new_primary(old);
            if let Loss::Kill = loss {
                // The new primary has no replica left: nothing can be acknowledged until
                // one follows it again.
                set.replace_first(new);
            }
            new
        });
        let w = writer.await.expect("writer panicked");
        (lost_at, new, w)
    })
    .await;
    let (lost_at, new, w) = match r {
        Ok(r) => r,
        Err(_) => panic!("hung; sentinel logs:\n{}", set.logs()),
    };
    assert_ne!(new, old, "the sentinels promoted another node");
    // The writer's store follows the new primary.
    assert_eq!(
        port_of(w.store.as_ref().and_then(Store::primary)),
        Some(new)
    );
    let first_on_new = w
        .acked
        .iter()
        .find(|(_, p, _)| *p == new)
        .expect("some entries acknowledged by the new primary");
    eprintln!(
        "{loss:?}: old primary {old}, new {new}; first write acknowledged on the new primary \
         {} ms after the loss; failed tries (label, primary port): {:?}; \
         acknowledged {} of {WRITES}, gave up on {:?}",
        first_on_new.2.duration_since(lost_at).as_millis(),
        w.errors,
        w.acked.len(),
        w.given_up,
    );
    assert!(w.given_up.is_empty(), "gave up on {:?}", w.given_up);
    assert!(!w.errors.is_empty(), "the loss was seen by the writer");

    // A reader through the sentinels sees every acknowledged entry.
    let mut reader = store(&set);
    let seen = tokio::time::timeout(HANG, subjects_in_stream(&mut reader))
        .await
        .expect("hung");
    assert_eq!(port_of(reader.primary()), Some(new));
    let lost: Vec<u64> = w
        .acked
        .iter()
        .map(|(seq, _, _)| *seq)
        .filter(|seq| !seen.contains(&format!("tok-{seq}")))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged entries lost in the failover: {lost:?}",
        lost.len()
    );
    let snap = tokio::time::timeout(HANG, reader.snapshot())
        .await
        .expect("hung")
        .unwrap();
    assert_eq!(snap.entries.len() as u64, WRITES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_during_writes_loses_no_acknowledged_entry() {
    no_acknowledged_entry_is_lost(Loss::Failover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_during_writes_loses_no_acknowledged_entry() {
    no_acknowledged_entry_is_lost(Loss::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_named_by_a_stale_sentinel_is_never_written_to() {
    let set = SentinelSet::start();
    let (replica, stale) = set.rogue();
    // The replica takes writes (replica-read-only no), so one sent to it would show.
    assert_eq!(replica.cli(&["SET", "tollgate:probe", "1"]).trim(), "OK");
    assert_eq!(replica.cli(&["DEL", "tollgate:probe"]).trim(), "1");
    let only = |nodes: &[&SentinelProc]| SentinelTarget {
        service: test_sentinel::SERVICE.into(),
        nodes: nodes.iter().map(|s| s.addr()).collect(),
        tls: false,
    };
    tokio::time::timeout(HANG, async {
        // Only the stale sentinel: refused, nothing sent.
        let mut s = store_for(&set, only(&[&stale]));
        let e = s.append(revocation(1)).await.unwrap_err();
        assert_eq!(e.label(), "connection", "{e}");
        assert_eq!(s.primary(), None);
        // The stale one first: passed over for the next, which names the real primary.
        let mut all = vec![&stale];
        all.extend(set.sentinels.iter());
        let mut s = store_for(&set, only(&all));
        s.append(revocation(2)).await.unwrap();
        assert_eq!(port_of(s.primary()), Some(set.first.port));
        assert_eq!(set.first.cli(&["XLEN", STREAM]).trim(), "1");
    })
    .await
    .expect("hung");
    assert_eq!(
        replica.cli(&["EXISTS", STREAM]).trim(),
        "0",
        "the replica a stale sentinel named was written to"
    );
    // The stale answer held throughout (else the test proved nothing).
    assert_eq!(stale.primary_port(), Some(replica.port));

    // The store's own check on the connection it uses (the crate's lookup checks too, on a
    // connection of its own, so the cases above pass on either): a replica is refused,
    // the primary taken.
    let check = |server: &test_server::RedisServer| {
        let url = format!("redis://127.0.0.1:{}", server.port);
        let creds = Credentials::new(test_server::USER, &set.password);
        async move {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
            let r = info
                .redis_settings()
                .clone()
                .set_username(&creds.user)
                .set_password(&creds.password);
            let client = redis::Client::open(info.set_redis_settings(r)).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            sentinel::ensure_primary(&mut c, "test", &url, test_sentinel::SERVICE).await
        }
    };
    tokio::time::timeout(HANG, async {
        let e = check(&replica).await.unwrap_err();
        assert!(e.to_string().contains("answers as a replica"), "{e}");
        check(&set.second).await.unwrap_err();
        check(&set.first).await.unwrap();
    })
    .await
    .expect("hung");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_store_finds_the_primary_and_its_writes_reach_the_replica() {
    let set = SentinelSet::start_tls();
    tokio::time::timeout(HANG, async {
        let mut s = store(&set);
        s.append(revocation(1)).await.unwrap();
        assert_eq!(port_of(s.primary()), Some(set.first.port));
        assert_eq!(set.second.cli(&["XLEN", STREAM]).trim(), "1");
        let Read::Entries(b) = s.read_since(StreamPos::ZERO, 10).await.unwrap() else {
            panic!("gap");
        };
        assert_eq!(b.entries.len(), 1);
        // Without the CA (the system's roots) the sentinels' certificates are refused.
        let mut cfg = config(&set, set.target());
        cfg.ca_file = None;
        let mut s = Store::new(&cfg, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        let e = s.append(revocation(2)).await.unwrap_err();
        assert_eq!(e.label(), "connection", "{e}");
        // Plain TCP to TLS sentinels gets no primary either.
        let mut plain = set.target();
        plain.tls = false;
        let mut cfg = config(&set, plain);
        cfg.ca_file = None;
        let mut s = Store::new(&cfg, PoolKey::from_bytes(&KEY, POOL).unwrap()).unwrap();
        let e = s.append(revocation(3)).await.unwrap_err();
        assert!(matches!(e.label(), "connection" | "timeout"), "{e}");
    })
    .await
    .expect("hung");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_demoted_under_an_open_connection_is_left_at_the_first_readonly() {
    let set = SentinelSet::start();
    tokio::time::timeout(HANG, async {
        let mut s = store(&set);
        s.append(revocation(1)).await.unwrap();
        assert_eq!(port_of(s.primary()), Some(set.first.port));
        // Demoted by hand (as the sentinels' user, which may), behind the sentinels' back:
        // the store's connection stays open, the node now refuses writes.
        let admin = |node: &test_server::RedisServer, args: &[&str]| {
            node.cli_as(test_sentinel::SENTINEL_USER, &set.acl.sentinel, args)
        };
        assert_eq!(admin(&set.second, &["SLAVEOF", "NO", "ONE"]).trim(), "OK");
        let port = set.second.port.to_string();
        assert_eq!(
            admin(&set.first, &["SLAVEOF", "127.0.0.1", &port]).trim(),
            "OK"
        );
        let e = s.append(revocation(2)).await.unwrap_err();
        assert_eq!(e.label(), "connection", "{e}");
        assert!(e.to_string().contains("no primary (demoted?)"), "{e}");
        // The connection was dropped: the next operation asks the sentinels again (which
        // still name the demoted node, refused by its role).
        let e = s.append(revocation(3)).await.unwrap_err();
        assert_eq!(e.label(), "connection", "{e}");
        assert!(
            e.to_string()
                .contains("no sentinel named a reachable primary"),
            "{e}"
        );
    })
    .await
    .expect("hung");
}
