//! What keeps the servers from running the process out of descriptors: a cap on the
//! connections each listener holds open (and, for the bind listener, on those from one
//! source), sized so that a reserve of descriptors always stays free for the control socket,
//! the state and audit files and the kernel's maps; and a back-off for accept errors, so that
//! an exhausted table (EMFILE, ENFILE, ENOBUFS) costs a few warnings and a sleep, not a
//! spinning loop. Every figure is counted for `/metrics`.
//!
//! The per-source key is the address for IPv4 and the /64 for IPv6 (the smallest prefix a
//! site is normally given, and the one the kernel's anonymous allowance counts by).
//!
//! A listener at its cap does not turn the newcomer away while it holds connections that have
//! not yet sent their request (a TLS handshake, a request head still to come): the oldest of
//! those is closed to make room. Idle connections cannot then lock a listener for their
//! timeout; to hold one, a client must keep opening connections faster than real clients
//! finish their requests, which the kernel's anonymous allowance limits per prefix.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::IpAddr,
    rc::Rc,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use tracing::{info, warn};

/// Descriptors never handed to connections: the control socket's own, the state and audit
/// files, the pinned maps and links, the runtime's.
pub const RESERVE: u64 = 128;
/// Connections a listener holds at most (before the descriptor limit is taken into account).
pub const CONTROL_MAX: u64 = 128;
pub const METRICS_MAX: u64 = 64;
pub const BIND_MAX: u64 = 1024;
/// Connections from one source (an IPv4 address, an IPv6 /64) to the bind listener.
pub const BIND_PER_SOURCE: u64 = 16;
/// The longest sleep after a failed accept.
pub const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// One listener's counters (process-wide: one agent per process).
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub accepted: AtomicU64,
    /// Connections closed at once because the listener was at its cap.
    pub refused_listener_cap: AtomicU64,
    /// Connections closed at once because their source was at its cap.
    pub refused_source_cap: AtomicU64,
    /// Connections that had not sent their request, closed to make room for a newer one.
    pub evicted: AtomicU64,
    /// Failed `accept` calls (descriptor exhaustion and the like).
    pub accept_errors: AtomicU64,
    /// Connections being served now.
    pub open: AtomicU64,
    /// The cap in force (0 until the listener runs).
    pub max: AtomicU64,
}

impl ListenerStats {
    const fn new() -> ListenerStats {
        ListenerStats {
            accepted: AtomicU64::new(0),
            refused_listener_cap: AtomicU64::new(0),
            refused_source_cap: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            open: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

pub static CONTROL: ListenerStats = ListenerStats::new();
pub static METRICS: ListenerStats = ListenerStats::new();
pub static BIND: ListenerStats = ListenerStats::new();
/// The usage feed's HTTP listener (`[usage] listen`): capped like the metrics listener.
pub static USAGE: ListenerStats = ListenerStats::new();

/// The listeners by their `/metrics` label.
pub fn listeners() -> [(&'static str, &'static ListenerStats); 4] {
    [
        ("control", &CONTROL),
        ("metrics", &METRICS),
        ("bind", &BIND),
        ("usage", &USAGE),
    ]
}

/// The descriptor limit in force (the soft one), recorded at start for `/metrics`.
pub static FD_LIMIT: AtomicU64 = AtomicU64::new(0);

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) as now in force.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        } else {
            warn!(
                "raising the descriptor limit to {}: {}",
                lim.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    FD_LIMIT.store(lim.rlim_cur, Relaxed);
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The caps of the three listeners (control, metrics, bind) under a soft limit of `limit`
/// descriptors: the defaults while they and [`RESERVE`] fit, else shared out in proportion
/// to them, so that the reserve stays free whatever the limit.
pub fn caps(limit: u64) -> (u64, u64, u64) {
    let budget = limit.saturating_sub(RESERVE);
    let want = CONTROL_MAX + METRICS_MAX + BIND_MAX;
    if budget >= want {
        return (CONTROL_MAX, METRICS_MAX, BIND_MAX);
    }
    let share = |n: u64| (n * budget / want).max(1);
    (share(CONTROL_MAX), share(METRICS_MAX), share(BIND_MAX))
}

/// The per-source key: the address (IPv4), the /64 (IPv6).
pub fn source_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V4(a) => IpAddr::V4(a),
        IpAddr::V6(a) => {
            let bits = u128::from(a) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

struct GateInner {
    stats: &'static ListenerStats,
    max: u64,
    per_source: u64,
    open: Cell<u64>,
    sources: RefCell<HashMap<IpAddr, u64>>,
    /// Connections in the order admitted; those not yet settled may be evicted.
    queue: RefCell<std::collections::VecDeque<std::rc::Weak<Slot>>>,
}

/// One connection's eviction state.
#[derive(Default)]
struct Slot {
    evict: tokio::sync::Notify,
    /// Sent its request (or already evicted): no longer evictable.
    settled: Cell<bool>,
}

/// Admits connections up to a listener's cap (and a source's); single-threaded.
#[derive(Clone)]
pub struct Gate(Rc<GateInner>);

/// A connection's place under its listener's cap, given back on drop.
pub struct Permit {
    gate: Rc<GateInner>,
    source: Option<IpAddr>,
    slot: Rc<Slot>,
}

impl Permit {
    /// The connection has sent its request: from now on it is not evicted.
    pub fn settle(&self) {
        self.slot.settled.set(true);
    }

    /// Completes when the connection is evicted to make room for a newer one.
    pub async fn evicted(&self) {
        self.slot.evict.notified().await;
    }
}

impl Gate {
    /// A gate of `max` connections, `per_source` of them from one source (0: no per-source cap).
    pub fn new(stats: &'static ListenerStats, max: u64, per_source: u64) -> Gate {
        stats.max.store(max, Relaxed);
        Gate(Rc::new(GateInner {
            stats,
            max,
            per_source,
            open: Cell::new(0),
            sources: RefCell::new(HashMap::new()),
            queue: RefCell::new(std::collections::VecDeque::new()),
        }))
    }

    /// Evicts the oldest connection that has not sent its request; false if there is none.
    fn evict_oldest(&self) -> bool {
        let g = &self.0;
        let mut q = g.queue.borrow_mut();
        while let Some(w) = q.pop_front() {
            if let Some(slot) = w.upgrade()
                && !slot.settled.get()
            {
                slot.settled.set(true);
                slot.evict.notify_one();
                g.stats.evicted.fetch_add(1, Relaxed);
                return true;
            }
        }
        false
    }

    /// A permit for one more connection from `source`, or `None` (counted) at a cap. At the
    /// listener's cap the oldest connection that has not sent its request is evicted to make
    /// room (its task ends it; the caller should yield so that it can).
    pub fn admit(&self, source: Option<IpAddr>) -> Option<Permit> {
        let g = &self.0;
        let source = source.filter(|_| g.per_source > 0).map(source_key);
        if let Some(key) = source
            && g.sources.borrow().get(&key).copied().unwrap_or(0) >= g.per_source
        {
            g.stats.refused_source_cap.fetch_add(1, Relaxed);
            return None;
        }
        if g.open.get() >= g.max && !self.evict_oldest() {
            g.stats.refused_listener_cap.fetch_add(1, Relaxed);
            return None;
        }
        if let Some(key) = source {
            *g.sources.borrow_mut().entry(key).or_default() += 1;
        }
        g.open.set(g.open.get() + 1);
        g.stats.open.store(g.open.get(), Relaxed);
        g.stats.accepted.fetch_add(1, Relaxed);
        let slot = Rc::new(Slot::default());
        let mut q = g.queue.borrow_mut();
        // Settled and finished connections leave the queue here, in bulk.
        if q.len() as u64 > 2 * g.max + 16 {
            q.retain(|w| w.upgrade().is_some_and(|s| !s.settled.get()));
        }
        q.push_back(Rc::downgrade(&slot));
        Some(Permit {
            gate: Rc::clone(g),
            source,
            slot,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let g = &self.gate;
        g.open.set(g.open.get().saturating_sub(1));
        g.stats.open.store(g.open.get(), Relaxed);
        if let Some(key) = self.source {
            let mut sources = g.sources.borrow_mut();
            if let Some(n) = sources.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    sources.remove(&key);
                }
            }
        }
    }
}

/// Back-off for a failing `accept`: the sleep doubles from 1 ms to [`BACKOFF_MAX`]; one
/// warning when an outage starts and one line when it ends, however many accepts fail.
pub struct Backoff {
    what: &'static str,
    stats: &'static ListenerStats,
    delay: Duration,
    failures: u64,
}

impl Backoff {
    pub fn new(what: &'static str, stats: &'static ListenerStats) -> Backoff {
        Backoff {
            what,
            stats,
            delay: Duration::from_millis(1),
            failures: 0,
        }
    }

    /// A failed accept: counted, warned of once per outage, then slept off.
    pub async fn failed(&mut self, e: &std::io::Error) {
        self.stats.accept_errors.fetch_add(1, Relaxed);
        if self.failures == 0 {
            warn!(
                "{}: accept failed: {e}; backing off (up to {} ms) until it works again",
                self.what,
                BACKOFF_MAX.as_millis()
            );
        }
        self.failures += 1;
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }

    /// Accepts until `gate` admits a connection: a failed accept is backed off, and one past
    /// a cap is dropped (closed) as soon as accepted. `source` says what the gate counts the
    /// connection under (the bind listener's per-source cap), `None` for none. The one accept
    /// loop of every listener.
    pub async fn admitted<T>(
        &mut self,
        gate: &Gate,
        mut accept: impl AsyncFnMut() -> std::io::Result<T>,
        source: impl Fn(&T) -> Option<IpAddr>,
    ) -> (T, Permit) {
        loop {
            let conn = match accept().await {
                Ok(c) => c,
                Err(e) => {
                    self.failed(&e).await;
                    continue;
                }
            };
            self.ok();
            if let Some(permit) = gate.admit(source(&conn)) {
                return (conn, permit);
            }
        }
    }

    /// A successful accept: ends an outage.
    pub fn ok(&mut self) {
        if self.failures > 0 {
            info!(
                "{}: accepting again after {} failed accepts",
                self.what, self.failures
            );
            self.failures = 0;
            self.delay = Duration::from_millis(1);
        }
    }
}

/// Requests refused before anyone was authenticated, by (listener, reason): malformed or
/// over-long heads, slow clients, failed TLS handshakes, missing tokens, wrong paths. Counted
/// here and in `/metrics`, never written to the audit log one line each.
static REFUSALS: std::sync::Mutex<std::collections::BTreeMap<(&str, &str), u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

pub fn count_refusal(listener: &'static str, reason: &'static str) {
    let mut r = REFUSALS.lock().unwrap_or_else(|p| p.into_inner());
    *r.entry((listener, reason)).or_default() += 1;
}

/// The refusal counts, for `/metrics`.
pub fn refusals() -> Vec<((&'static str, &'static str), u64)> {
    let r = REFUSALS.lock().unwrap_or_else(|p| p.into_inner());
    r.iter().map(|(k, v)| (*k, *v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_keep_the_reserve() {
        assert_eq!(caps(1 << 20), (CONTROL_MAX, METRICS_MAX, BIND_MAX));
        for limit in [256, 1024, 1200] {
            let (c, m, b) = caps(limit);
            assert!(c + m + b + RESERVE <= limit, "{limit}: {c} {m} {b}");
            assert!(c >= 1 && m >= 1 && b >= 1);
        }
    }

    #[test]
    fn sources_are_addresses_and_slash_64s() {
        let k = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2:3::4"), k("2001:db8:1:2::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
        assert_ne!(k("192.0.2.1"), k("192.0.2.2"));
    }

    #[test]
    fn gate_caps_listener_and_source_and_gives_back() {
        static S: ListenerStats = ListenerStats::new();
        let g = Gate::new(&S, 3, 2);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let p1 = g.admit(Some(a)).unwrap();
        let p2 = g.admit(Some(a)).unwrap();
        assert!(g.admit(Some(a)).is_none(), "source cap");
        let p3 = g.admit(Some(b)).unwrap();
        for p in [&p1, &p2, &p3] {
            p.settle();
        }
        assert!(g.admit(Some(b)).is_none(), "listener cap, nothing to evict");
        drop(p1);
        assert!(g.admit(Some(a)).is_some(), "a place given back");
        assert_eq!(S.refused_source_cap.load(Relaxed), 1);
        assert_eq!(S.refused_listener_cap.load(Relaxed), 1);
    }

    #[test]
    fn at_the_cap_the_oldest_unsettled_connection_is_evicted() {
        static S: ListenerStats = ListenerStats::new();
        let g = Gate::new(&S, 2, 0);
        let old = g.admit(None).unwrap();
        let busy = g.admit(None).unwrap();
        busy.settle();
        let new = g.admit(None).expect("room made by eviction");
        assert_eq!(S.evicted.load(Relaxed), 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), old.evicted())
                .await
                .expect("the oldest idle one is told");
        });
        drop(old);
        new.settle();
        assert!(g.admit(None).is_none(), "all settled: refused");
    }
}
