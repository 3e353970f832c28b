//! The fleet task: one per node, on the agent's thread. Every sync interval, and at once
//! when a change is queued here or the stream moves: publish the outbox in order, run a sync
//! pass (`fleet::sync`) and install what it applied (`fleet::install`), re-seed a store that
//! came back empty, and beat the heartbeat. A second task only waits on the stream (a
//! blocking XREAD on a connection of its own) to wake the first, so a change made on one
//! node reaches the others in a store round trip or two, not an interval.
//!
//! The node is borrowed only between awaits. Everything the task does with the store is
//! bounded by the store timeout; a failure marks the store down (binds then claim from the
//! node's own memory) and is retried next interval; nothing here ever stops enforcement.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    time::Duration,
};

use tokio::sync::Notify;
use tracing::{info, warn};

use super::{
    apply::Applier,
    cursor::CursorFile,
    entry::{Entry, Kind},
    global, install,
    link::MemberView,
    payload, share,
    store::{Store, StoreError, StreamPos, spend::SpendReport},
    sync::{self, Pass, Reload, SyncError},
};
use crate::{clock, node::Node};

/// Most stream entries one pass reads; a node far behind catches up over several passes.
const MAX_PER_PASS: usize = 1000;
/// Entries installed per turn of the event loop (`take`).
const INSTALL_CHUNK: usize = 128;
/// Passes run back to back while the stream has more (then the interval).
const MAX_PASSES: usize = 16;
/// Outbox entries published per round (the rest next round, after a sync pass).
const MAX_PUBLISH: usize = 1000;
/// How often the node beats and lists the members.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the node reloads the whole snapshot even without a gap, and re-seeds what it
/// holds in force that the pool lacks: the stream can be edited by anyone who can write to
/// the store (an XDEL of a revocation before a slow node read it, a snapshot field deleted);
/// this bounds how long such an edit can hide a change.
const RECONCILE: Duration = Duration::from_secs(300);
/// How often the applier forgets ended revocations and bindings past any token's lifetime.
const PRUNE: Duration = Duration::from_secs(60);
/// A member whose heartbeat is older than this is gone.
const MEMBER_TTL: Duration = Duration::from_secs(5);

/// What the task owns.
pub struct Task {
    pub store: Store,
    pub waiter: Store,
    pub cursor: CursorFile,
    pub applier: Applier,
    pub interval: Duration,
    pub wake: Rc<Notify>,
    /// Entries were re-read from the store after a reset and not all republished yet.
    reseed: Option<Reseed>,
    /// When the last full re-seed was started (agent time): a store writer who flips the
    /// epoch key every interval must not keep the pool republishing everything.
    last_everything_ms: Option<u64>,
}

/// At most one full re-seed per this long; a reset seen sooner re-seeds what this node holds
/// in force that the store lacks (cheap, and the revocations are in it).
const EVERYTHING_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reseed {
    /// The node's own state the snapshot lacks (first sync, restart).
    Local,
    /// Every entry the applier holds and the node's own state (the store was reset).
    Everything,
}

impl Task {
    pub fn new(store: Store, cursor: CursorFile, interval: Duration, wake: Rc<Notify>) -> Task {
        // The waiter blocks up to four intervals: short enough to notice a dead connection,
        // long enough not to spin.
        let waiter = store.waiter(interval * 4);
        Task {
            store,
            waiter,
            cursor,
            applier: Applier::new(),
            interval,
            wake,
            reseed: None,
            last_everything_ms: None,
        }
    }
}

/// Runs the fleet task until the node is uninstalled.
pub async fn run(node: Rc<RefCell<Node>>, mut t: Task) {
    let moved = Rc::new(Notify::new());
    let last = Rc::new(Cell::new(t.cursor.cursor().last));
    tokio::task::spawn_local(watch(
        t.waiter.clone(),
        Rc::clone(&last),
        Rc::clone(&moved),
        t.interval,
    ));
    let mut beat_due = clock::now_ms();
    let mut reconcile_due = clock::now_ms() + RECONCILE.as_millis() as u64;
    let mut prune_due = clock::now_ms() + PRUNE.as_millis() as u64;
    let mut global_due = beat_due;
    {
        let mut n = node.borrow_mut();
        let n = &mut *n;
        if let Some(cfg) = &n.config.fleet {
            let g = &mut n.state.fleet;
            g.on = true;
            g.node.clone_from(&cfg.node);
            g.interval = t.interval;
            g.outage = cfg.outage;
        }
    }
    loop {
        if node.borrow().uninstalled {
            return;
        }
        publish(&node, &mut t).await;
        sync_passes(&node, &mut t).await;
        last.set(t.cursor.cursor().last);
        if t.reseed.is_some() {
            reseed(&node, &mut t).await;
        }
        let now = clock::now_ms();
        if now >= reconcile_due {
            t.applier.unseed();
            reconcile_due = now + RECONCILE.as_millis() as u64;
        }
        if now >= prune_due {
            // A binding cannot outlive its token: the longest lifetime any issuer allows,
            // plus the skew (a day when tokens are not configured: nothing is bound then).
            let max_age_ms = node
                .borrow()
                .config
                .tokens
                .as_ref()
                .map_or(86_400_000, |c| {
                    (c.longest_ttl_s() + c.clock_skew_s).saturating_mul(1000)
                });
            t.applier.prune(clock::wall_ms(), max_age_ms);
            prune_due = now + PRUNE.as_millis() as u64;
        }
        if now >= beat_due {
            heartbeat(&node, &mut t).await;
            beat_due = now + HEARTBEAT.as_millis() as u64;
        }
        // Fleet-wide plans once per interval (not at every wake-up: the demand is measured
        // over the interval, and the others judge freshness by it).
        let now = clock::now_ms();
        if now >= global_due {
            global(&node, &mut t).await;
            global_due = now + t.interval.as_millis() as u64;
        }
        let until_global = Duration::from_millis(global_due.saturating_sub(clock::now_ms()));
        // While the store is down, look for it four times an interval: a store that returns
        // gets the queued changes within one interval, not two.
        let down = node.borrow().fleet.as_ref().is_some_and(|l| !l.health.up);
        let pause = if down { t.interval / 4 } else { t.interval };
        tokio::select! {
            _ = t.wake.notified() => {}
            _ = moved.notified() => {}
            _ = tokio::time::sleep(pause.min(until_global)) => {}
        }
    }
}

/// Waits on the stream and wakes the task when it moves past what the task has read.
async fn watch(
    mut waiter: Store,
    last: Rc<Cell<StreamPos>>,
    moved: Rc<Notify>,
    interval: Duration,
) {
    let mut seen = last.get();
    loop {
        seen = seen.max(last.get());
        match waiter.wait_after(seen).await {
            Ok(Some(pos)) => {
                seen = pos;
                moved.notify_one();
            }
            Ok(None) => {}
            // The task notices the outage itself; here only do not spin. A quarter interval,
            // as the task waits while the store is down: a store that returns wakes this
            // node soon after another node publishes.
            Err(_) => tokio::time::sleep(interval / 4).await,
        }
    }
}

/// Publishes the outbox in order, each entry under its reserved seq.
async fn publish(node: &Rc<RefCell<Node>>, t: &mut Task) {
    for _ in 0..MAX_PUBLISH {
        let (p, pool, origin) = {
            let n = node.borrow();
            let Some(link) = n.fleet.as_ref() else { return };
            let Some(p) = link.outbox.front() else { return };
            (p.clone(), link.pool.clone(), link.node.clone())
        };
        let seq = if p.seq != 0 {
            p.seq
        } else {
            // Reserved (on disk past it) before it is used, then remembered in the outbox:
            // a retry after an unknown outcome republishes the same (origin, seq).
            let seq = match t.cursor.reserve_seq() {
                Ok(s) => s,
                Err(e) => {
                    warn!("fleet: reserving a seq: {e}; publishing waits");
                    return;
                }
            };
            let mut n = node.borrow_mut();
            if let Some(link) = n.fleet.as_mut()
                && let Err(e) = link.outbox.set_front_seq(seq)
            {
                warn!("fleet: {e}; publishing waits");
                return;
            }
            seq
        };
        let entry = Entry {
            kind: p.kind,
            pool,
            origin,
            seq,
            wall_ms: p.wall_ms,
            subject: p.subject.clone(),
            payload: p.payload.clone(),
        };
        let own = t.store.seal(entry.clone());
        let r = t.store.append(entry).await;
        if r.is_ok()
            && let Ok(v) = own
        {
            // This node's own change is held at once for ordering, not an interval later
            // when it is read back: an older entry of another node for the same subject,
            // read meanwhile, is refused stale instead of undoing it here.
            t.applier.offer(v, clock::wall_ms());
        }
        let mut n = node.borrow_mut();
        let Some(link) = n.fleet.as_mut() else { return };
        match r {
            Ok(_) => {
                link.mark_up();
                *link.stats.published.entry(p.kind.label()).or_default() += 1;
                if let Err(e) = link.outbox.pop_front() {
                    // Published, but still queued: it goes again (a duplicate) next round.
                    warn!("fleet: {e}");
                    return;
                }
            }
            Err(e) => {
                link.stats.publish_errors += 1;
                if e.label() == "refused" {
                    // An entry no node would accept (checked before signing): it never
                    // will be; dropped rather than block the queue behind it.
                    warn!(
                        kind = p.kind.label(),
                        "fleet: not publishable, dropped: {e}"
                    );
                    let _ = link.outbox.pop_front();
                    continue;
                }
                link.mark_down(&e);
                return;
            }
        }
    }
}

/// Sync passes until the stream has nothing more (bounded), installing what each applied.
async fn sync_passes(node: &Rc<RefCell<Node>>, t: &mut Task) {
    for _ in 0..MAX_PASSES {
        let r = sync::sync_once(
            &mut t.store,
            &mut t.cursor,
            &mut t.applier,
            MAX_PER_PASS,
            clock::wall_ms(),
        )
        .await;
        let pass = match r {
            Ok(p) => p,
            Err(SyncError::Cursor { pass, err }) => {
                warn!("fleet: {err}");
                let pass = *pass;
                take(node, t, &pass).await;
                return;
            }
            Err(SyncError::Store(e)) => {
                if let Some(link) = node.borrow_mut().fleet.as_mut() {
                    link.mark_down(&e);
                }
                return;
            }
        };
        let more = pass.more;
        take(node, t, &pass).await;
        if !more {
            return;
        }
    }
}

/// Installs a pass's entries and counts it.
async fn take(node: &Rc<RefCell<Node>>, t: &mut Task, pass: &Pass) {
    let Some(own) = node.borrow().fleet.as_ref().map(|l| l.node.clone()) else {
        return;
    };
    let mut outcomes = Vec::new();
    for chunk in pass.applied.chunks(INSTALL_CHUNK) {
        {
            let mut n = node.borrow_mut();
            for v in chunk {
                // This node's own entries are already in force here; the applier holds them
                // for ordering only.
                if v.entry().origin == own {
                    continue;
                }
                let outcome = install::install(&mut n, v);
                if install::retry(outcome) {
                    // Not in force here (the state disk, the kernel): offered again next pass.
                    warn!(
                        kind = v.entry().kind.label(),
                        subject = %v.entry().subject,
                        outcome,
                        "fleet: a change of the pool could not be put in force here; retrying"
                    );
                    t.applier.forget(&v.entry().snapshot_field());
                }
                outcomes.push((v.entry().kind.label(), outcome));
            }
        }
        // Binds, the control socket and /metrics get their turn between chunks: a snapshot
        // of many entries (each a token verification and a journal record) is installed over
        // several turns of the event loop, not in one.
        tokio::task::yield_now().await;
    }
    let mut n = node.borrow_mut();
    if n.state.has_unrecorded()
        && let Err(e) = n.record(Vec::new())
    {
        warn!("fleet: recording installed changes: {e}");
    }
    let held = t.applier.len();
    let position = t.cursor.cursor().last.to_string();
    let Some(link) = n.fleet.as_mut() else { return };
    link.mark_up();
    link.primary = t.store.primary().map(str::to_owned);
    link.stream_lag_ms = pass.lag_ms;
    link.health.last_sync_ms = Some(clock::now_ms());
    link.held = held;
    link.position = position;
    for (kind, outcome) in outcomes {
        *link
            .stats
            .installs
            .entry((kind, outcome.to_owned()))
            .or_default() += 1;
    }
    for (label, n) in &pass.refused {
        *link.stats.refused.entry(label).or_default() += n;
    }
    if !pass.refused.is_empty() {
        warn!(refused = ?pass.refused, "fleet: entries refused (not signed with this pool's key, malformed, or stale)");
    }
    if let Some(r) = pass.reload {
        let label = r.label();
        *link.stats.reloads.entry(label).or_default() += 1;
        info!(
            reason = label,
            entries = pass.applied.len(),
            "fleet: snapshot loaded"
        );
        let now = clock::now_ms();
        let recent = t
            .last_everything_ms
            .is_some_and(|at| now.saturating_sub(at) < EVERYTHING_EVERY.as_millis() as u64);
        let wanted = match r {
            Reload::StoreReset if recent => {
                warn!(
                    "fleet: the store's epoch changed again within a minute; re-seeding only what is in force here"
                );
                Reseed::Local
            }
            Reload::StoreReset => {
                t.last_everything_ms = Some(now);
                Reseed::Everything
            }
            // A gap lost nothing the snapshot lacks.
            Reload::Gap => return,
            Reload::First | Reload::Restart => Reseed::Local,
        };
        t.reseed = Some(match t.reseed {
            Some(Reseed::Everything) => Reseed::Everything,
            _ => wanted,
        });
    }
}

/// Puts back into the store what it should hold and does not: after a reset, every entry
/// the applier holds (republished as they are: same origin, seq and MAC, so a node that
/// holds them takes them as duplicates); and, after any snapshot load, the revocations and
/// quarantines in force here that the pool does not hold (made before this node joined, or
/// held only here when the store lost them), queued as this node's. Revocations are a
/// union: nothing revoked anywhere becomes valid again.
async fn reseed(node: &Rc<RefCell<Node>>, t: &mut Task) {
    let Some(what) = t.reseed else { return };
    if what == Reseed::Everything {
        let held: Vec<Entry> = t
            .applier
            .entries()
            .filter(|e| e.kind != Kind::Binding)
            .cloned()
            .collect();
        for e in held {
            if let Err(err) = t.store.append(e).await {
                if let Some(link) = node.borrow_mut().fleet.as_mut() {
                    link.mark_down(&err);
                }
                return;
            }
        }
    }
    let mut n = node.borrow_mut();
    let now = clock::now_ms();
    // (kind, subject, payload): published as this node's own changes.
    let mut local: Vec<(Kind, String, String)> = Vec::new();
    let held = |slot: Kind, subject: &str| {
        let field = format!("{}:{}", slot.slot(), payload::encode_subject(subject));
        t.applier.held(&field).is_some()
    };
    for (tid, until) in &n.state.revoked_tokens {
        if *until > now && !held(Kind::Revocation, tid) {
            local.push((
                Kind::Revocation,
                tid.clone(),
                payload::encode(&payload::Revocation {
                    until_wall_ms: clock::to_wall_ms(*until),
                    reason: "re-seed".into(),
                }),
            ));
        }
    }
    for (identity, cutoff) in &n.state.revoked_identities {
        if !held(Kind::IdentityRevocation, identity) {
            local.push((
                Kind::IdentityRevocation,
                identity.clone(),
                payload::encode(&payload::IdentityRevocation {
                    cutoff_wall_ms: *cutoff,
                    reason: "re-seed".into(),
                }),
            ));
        }
    }
    for (identity, q) in &n.state.quarantines {
        // The anomaly ladder's quarantines are this node's own (docs/fleet.md): not shared.
        let own = matches!(q.by, crate::state::QuarantineOwner::Controller);
        if !own && q.until_unix_ms.is_none_or(|u| u > now) && !held(Kind::Quarantine, identity) {
            local.push((
                Kind::Quarantine,
                identity.clone(),
                payload::encode(&payload::Quarantine {
                    until_wall_ms: q.until_unix_ms.map(clock::to_wall_ms),
                    reason: q.reason.clone(),
                }),
            ));
        }
    }
    let Some(link) = n.fleet.as_mut() else { return };
    let count = local.len();
    for (kind, subject, payload) in local {
        link.publish(kind, &subject, payload);
    }
    link.stats.reseeded += 1;
    if what == Reseed::Everything || count > 0 {
        info!(
            local = count,
            everything = what == Reseed::Everything,
            "fleet: store re-seeded"
        );
    }
    t.reseed = None;
}

/// Beats, and lists the members.
async fn heartbeat(node: &Rc<RefCell<Node>>, t: &mut Task) {
    let (name, info) = {
        let n = node.borrow();
        let Some(link) = n.fleet.as_ref() else { return };
        let info = serde_json::json!({
            "wall_ms": clock::wall_ms(),
            "outbox": link.outbox.len(),
            "bindings": n.state.bindings.len(),
        });
        (link.node.clone(), info.to_string())
    };
    let r = t.store.heartbeat(&name, &info, MEMBER_TTL).await;
    let r = match r {
        Ok(()) => t.store.members().await,
        Err(e) => Err(e),
    };
    let mut n = node.borrow_mut();
    let Some(link) = n.fleet.as_mut() else { return };
    match r {
        Ok(members) => {
            link.mark_up();
            link.members = members
                .into_iter()
                .map(|m| {
                    let v: serde_json::Value = serde_json::from_str(&m.info).unwrap_or_default();
                    MemberView {
                        node: m.node,
                        heartbeat_wall_ms: v.get("wall_ms").and_then(|x| x.as_u64()),
                        outbox: v.get("outbox").and_then(|x| x.as_u64()),
                        bindings: v.get("bindings").and_then(|x| x.as_u64()),
                    }
                })
                .collect();
        }
        Err(e) => link.mark_down(&e),
    }
    let members = link.members.len();
    n.state.fleet.pool_size = members.max(1);
}

/// One cycle of the fleet-wide plans (`fleet::global`): measure and build the reports, send
/// them with the node not borrowed, then write the shares that changed into the kernel and
/// set or clear the quota flags by the fleet totals.
async fn global(node: &Rc<RefCell<Node>>, t: &mut Task) {
    let job = {
        let mut n = node.borrow_mut();
        let n = &mut *n;
        if !n.config.plans.iter().any(|p| p.fleet_wide()) {
            return;
        }
        let mut g = std::mem::take(&mut n.state.fleet);
        let job = g.prepare(&n.config, &n.state, &n.pinned.tables, &n.control.quotas);
        n.state.fleet = g;
        job
    };
    let answers = exchange(&mut t.store, &job).await;
    let mut n = node.borrow_mut();
    let n = &mut *n;
    let answers = match answers {
        Ok(a) => {
            // Nothing to send says nothing about the store: its health does.
            let up = n.fleet.as_ref().is_some_and(|l| l.health.up);
            (up || !(job.demand.is_empty() && job.spend.is_empty())).then_some(a)
        }
        Err(e) => {
            if let Some(link) = n.fleet.as_mut() {
                link.mark_down(&e);
            }
            None
        }
    };
    if answers.is_some()
        && let Some(link) = n.fleet.as_mut()
        && !(job.demand.is_empty() && job.spend.is_empty())
    {
        link.mark_up();
    }
    let mut g = std::mem::take(&mut n.state.fleet);
    let changed = g.finish(&n.config, &job, answers);
    n.state.fleet = g;
    let now_ms = clock::now_ms();
    for name in changed {
        let resolver = crate::identity::Resolver::new(&n.config, &n.state);
        let (Some(id), Some(r)) = (resolver.slot(&name), resolver.get(&name)) else {
            continue;
        };
        let rec = resolver.record(&r, n.state.quarantined(&name, now_ms));
        if let Err(e) = n
            .pinned
            .tables
            .set_identity_keeping_controller_flags(id, &rec)
        {
            warn!(identity = %name, "fleet: writing the identity's share: {e}");
        }
    }
    n.control
        .fleet_quota_flags(&n.config, &mut n.state, &mut n.pinned.tables, &n.audit);
}

/// Sends a cycle's reports: demand, then spend per window kind.
async fn exchange(store: &mut Store, job: &global::Job) -> Result<global::Answers, StoreError> {
    let mut a = global::Answers {
        demand: None,
        spend: Vec::new(),
    };
    if !job.demand.is_empty() {
        let reports: Vec<(&str, share::Demand)> =
            job.demand.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        a.demand = Some(
            store
                .report_demand(&job.node, &reports, job.demand_ttl)
                .await?,
        );
    }
    for sj in &job.spend {
        let reports: Vec<SpendReport<'_>> = sj
            .reports
            .iter()
            .map(|(identity, own, seen)| SpendReport {
                identity,
                own: *own,
                seen: *seen,
            })
            .collect();
        a.spend.push(
            store
                .report_spend(&sj.name, &job.node, &reports, sj.ttl)
                .await?,
        );
    }
    Ok(a)
}
