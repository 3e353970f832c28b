//! The order a node applies store entries in. Entries arrive from the snapshot and the stream,
//! possibly twice (a snapshot reload overlaps the stream), in any interleaving of origins, and
//! possibly replayed: anyone who can write to the store can re-add an old genuine entry (it
//! verifies again), e.g. an old `release` after a newer `quarantine` of the same address.
//! So the stream's order is not trusted; per subject ([`Entry::snapshot_field`]) the held
//! entry is replaced only by one whose `(wall_ms, origin, seq)` is greater:
//! - greater: applied (it replaces the held one);
//! - equal: the same entry again ([`Outcome::Duplicate`]), nothing to do, not counted;
//! - smaller: refused `stale` and counted: an entry the node has already superseded.
//!
//! The result depends only on the set of entries seen, not their order, so every node that
//! saw the same entries holds the same state.
//!
//! Revocations are never undone by an entry: a newer revocation of the same subject replaces
//! the held one but keeps the later expiry (so a key holder's short revocation cannot shorten
//! a long one), and a binding of a revoked token id is refused `revoked` however new it is.
//! An identity revocation is enforced where the binding's identity is known, after the token
//! is re-verified ([`Applier::identity_revoked`]); the store's entries do not name it.
//!
//! Pure logic: no store, no kernel, no clock of its own (the caller passes the wall time,
//! the only clock nodes share; revocation expiries are wall-clock like the tokens' `exp`).

use std::collections::{BTreeMap, HashMap};

use super::entry::{Entry, Kind, Verified};

/// Why a verified entry was not applied. Labels are stable (counter labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApplyRefusal {
    /// Older than the entry held for its subject (replayed, or overtaken).
    Stale,
    /// A binding of a token id that is revoked.
    Revoked,
    /// Stamped further in the future than any clock of the pool should be
    /// ([`MAX_FUTURE_MS`]): it would win its subject until every clock passed it.
    Future,
}

/// How far ahead of this node's wall clock an entry may be stamped: clocks under NTP agree
/// within far less; a node whose clock stepped ahead, or a key holder stamping entries near
/// `u64::MAX`, would otherwise win every subject it touches for as long.
pub const MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

impl ApplyRefusal {
    pub const ALL: [ApplyRefusal; 3] = [
        ApplyRefusal::Stale,
        ApplyRefusal::Revoked,
        ApplyRefusal::Future,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ApplyRefusal::Stale => "stale",
            ApplyRefusal::Revoked => "revoked",
            ApplyRefusal::Future => "future",
        }
    }
}

/// What [`Applier::offer`] did with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Newer than what was held: the caller installs it.
    Applied,
    /// The entry already held (same order key): nothing to do.
    Duplicate,
    Refused(ApplyRefusal),
}

/// The order key: wall clock first, then origin and seq to break ties the same way on every
/// node (two origins' clocks may agree to the millisecond).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Order {
    pub wall_ms: u64,
    pub origin: String,
    pub seq: u64,
}

impl Order {
    pub fn of(e: &Entry) -> Order {
        Order {
            wall_ms: e.wall_ms,
            origin: e.origin.clone(),
            seq: e.seq,
        }
    }
}

#[derive(Clone, Debug)]
struct Held {
    order: Order,
    entry: Verified,
    /// Revocations: wall-clock end (`None`: no end). Others: `None`, unused.
    until_wall_ms: Option<u64>,
}

/// The entries a node holds, one per subject, and the refusals counted on the way.
#[derive(Debug, Default)]
pub struct Applier {
    held: HashMap<String, Held>,
    refused: BTreeMap<&'static str, u64>,
    /// Whether a whole snapshot was offered since this applier was made. An applier made at
    /// start holds nothing to compare a replayed entry with, so the sync loads the snapshot
    /// before reading the stream on.
    seeded: bool,
}

fn is_revocation(k: Kind) -> bool {
    matches!(k, Kind::Revocation | Kind::IdentityRevocation)
}

/// A revocation's end: the payload's `until_wall_ms` (wall-clock ms). Absent or not a number
/// is no end: the entry is genuine (signed), so the doubt falls on the revoked side.
fn revocation_until(e: &Entry) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(&e.payload)
        .ok()?
        .get("until_wall_ms")?
        .as_u64()
}

/// The later of two ends (`None` is no end, the latest).
fn later(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

impl Applier {
    pub fn new() -> Applier {
        Applier::default()
    }

    /// Offers one verified entry; `now_wall_ms` decides whether a held revocation still
    /// holds. A refusal is counted under its label.
    pub fn offer(&mut self, v: Verified, now_wall_ms: u64) -> Outcome {
        let e = v.entry();
        if e.wall_ms > now_wall_ms.saturating_add(MAX_FUTURE_MS) {
            return self.refuse(ApplyRefusal::Future);
        }
        let field = e.snapshot_field();
        let order = Order::of(e);
        if e.kind == Kind::Binding && self.token_revoked(&e.subject, now_wall_ms) {
            return self.refuse(ApplyRefusal::Revoked);
        }
        let mut until = is_revocation(e.kind).then(|| revocation_until(e)).flatten();
        if let Some(h) = self.held.get(&field) {
            match order.cmp(&h.order) {
                std::cmp::Ordering::Equal => return Outcome::Duplicate,
                std::cmp::Ordering::Less => return self.refuse(ApplyRefusal::Stale),
                std::cmp::Ordering::Greater => {}
            }
            if is_revocation(h.entry.entry().kind) && Self::holds(h, now_wall_ms) {
                until = later(until, h.until_wall_ms);
            }
        }
        self.held.insert(
            field,
            Held {
                order,
                entry: v,
                until_wall_ms: until,
            },
        );
        Outcome::Applied
    }

    fn refuse(&mut self, r: ApplyRefusal) -> Outcome {
        *self.refused.entry(r.label()).or_default() += 1;
        Outcome::Refused(r)
    }

    fn holds(h: &Held, now_wall_ms: u64) -> bool {
        h.until_wall_ms.is_none_or(|u| now_wall_ms < u)
    }

    fn revoked(&self, field: &str, now_wall_ms: u64) -> bool {
        self.held
            .get(field)
            .is_some_and(|h| is_revocation(h.entry.entry().kind) && Self::holds(h, now_wall_ms))
    }

    /// Whether a token id is revoked at `now_wall_ms`.
    pub fn token_revoked(&self, token_id: &str, now_wall_ms: u64) -> bool {
        self.revoked(
            &format!("{}:{token_id}", Kind::Revocation.slot()),
            now_wall_ms,
        )
    }

    /// Whether an identity is revoked at `now_wall_ms` (checked by the installer once a
    /// binding's token is re-verified and its identity known).
    pub fn identity_revoked(&self, identity: &str, now_wall_ms: u64) -> bool {
        self.revoked(
            &format!("{}:{identity}", Kind::IdentityRevocation.slot()),
            now_wall_ms,
        )
    }

    /// The entry held for a snapshot field (`<slot>:<subject>`).
    pub fn held(&self, field: &str) -> Option<&Entry> {
        self.held.get(field).map(|h| h.entry.entry())
    }

    /// A held revocation's end (`Some(None)`: no end), as merged.
    pub fn revocation_end(&self, field: &str) -> Option<Option<u64>> {
        self.held
            .get(field)
            .filter(|h| is_revocation(h.entry.entry().kind))
            .map(|h| h.until_wall_ms)
    }

    /// Every entry held, for re-seeding a store that came back empty.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.held.values().map(|h| h.entry.entry())
    }

    /// Forgets the entry held for `field` and asks for the snapshot again (the applier is no
    /// longer seeded): for an entry that was applied here but could not be put in force (a
    /// full state disk), so that it is offered, applied and installed again on the next pass
    /// rather than held as done.
    pub fn forget(&mut self, field: &str) {
        self.held.remove(field);
        self.seeded = false;
    }

    /// Asks for the snapshot again (the next pass reloads it and offers every entry): the
    /// periodic reconciliation with the snapshot, which catches what a store writer hid from
    /// the stream in ways no gap check sees.
    pub fn unseed(&mut self) {
        self.seeded = false;
    }

    /// Records that a whole snapshot was offered.
    pub fn mark_seeded(&mut self) {
        self.seeded = true;
    }

    pub fn is_seeded(&self) -> bool {
        self.seeded
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Refusals counted so far, by label.
    pub fn refused(&self) -> &BTreeMap<&'static str, u64> {
        &self.refused
    }

    /// Forgets revocations that ended before `now_wall_ms`, and bindings made more than
    /// `binding_max_age_ms` ago (the longest token lifetime any issuer allows: their tokens
    /// have expired), so memory follows the pool's live state, not its history. A forgotten
    /// entry read again is applied again and refused where it is installed (the token has
    /// expired; the revocation has ended): work, never a grant.
    pub fn prune(&mut self, now_wall_ms: u64, binding_max_age_ms: u64) {
        self.held.retain(|_, h| {
            let e = h.entry.entry();
            match e.kind {
                k if is_revocation(k) => Self::holds(h, now_wall_ms),
                Kind::Binding => e.wall_ms.saturating_add(binding_max_age_ms) >= now_wall_ms,
                _ => true,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::entry::PoolKey;

    const NOW: u64 = 1_764_600_000_000;

    fn key() -> PoolKey {
        PoolKey::from_bytes(&[7; 32], "lab").unwrap()
    }

    #[test]
    fn pruning_forgets_bindings_older_than_any_token_and_keeps_the_rest() {
        let mut a = Applier::new();
        let hour = 3_600_000;
        let old = entry(Kind::Binding, "tok-old", "n1", 1, NOW - 2 * hour);
        let young = entry(Kind::Binding, "tok-new", "n1", 2, NOW - hour / 2);
        let q = entry(Kind::Quarantine, "acme", "n1", 3, NOW - 2 * hour);
        for e in [old, young, q] {
            assert_eq!(a.offer(e, NOW), Outcome::Applied);
        }
        a.prune(NOW, hour);
        assert!(a.held("binding:tok-old").is_none());
        assert!(a.held("binding:tok-new").is_some());
        assert!(a.held("quarantine:acme").is_some());
    }

    #[test]
    fn an_entry_stamped_far_in_the_future_is_refused() {
        let mut a = Applier::new();
        let far = entry(Kind::Release, "acme", "n1", 1, NOW + MAX_FUTURE_MS + 1);
        assert_eq!(a.offer(far, NOW), Outcome::Refused(ApplyRefusal::Future));
        assert_eq!(a.refused().get("future"), Some(&1));
        let near = entry(Kind::Release, "acme", "n1", 2, NOW + MAX_FUTURE_MS);
        assert_eq!(a.offer(near, NOW), Outcome::Applied);
    }

    #[test]
    fn a_forgotten_entry_applies_again_and_the_snapshot_is_asked_for() {
        let mut a = Applier::new();
        a.mark_seeded();
        let q = entry(Kind::Quarantine, "acme", "n1", 1, NOW);
        assert_eq!(a.offer(q.clone(), NOW), Outcome::Applied);
        assert_eq!(a.offer(q.clone(), NOW), Outcome::Duplicate);
        a.forget(&q.entry().snapshot_field());
        assert!(!a.is_seeded());
        assert_eq!(a.offer(q, NOW), Outcome::Applied);
    }

    fn entry(kind: Kind, subject: &str, origin: &str, seq: u64, wall_ms: u64) -> Verified {
        entry_with(kind, subject, origin, seq, wall_ms, "{}")
    }

    fn entry_with(
        kind: Kind,
        subject: &str,
        origin: &str,
        seq: u64,
        wall_ms: u64,
        payload: &str,
    ) -> Verified {
        let k = key();
        let signed = k
            .sign(Entry {
                kind,
                pool: "lab".into(),
                origin: origin.into(),
                seq,
                wall_ms,
                subject: subject.into(),
                payload: payload.into(),
            })
            .unwrap();
        k.verify(signed).unwrap()
    }

    const ADDR: &str = "198.18.0.7";
    const QFIELD: &str = "quarantine:198.18.0.7";

    #[test]
    fn an_old_release_replayed_after_a_newer_quarantine_is_refused_stale() {
        let mut a = Applier::new();
        let old_quarantine = entry(Kind::Quarantine, ADDR, "node-2", 4, NOW);
        // Released by node-1 in the same millisecond: the tie is broken by origin, then seq.
        let release = entry(Kind::Release, ADDR, "node-1", 8, NOW + 10);
        let requarantine = entry(Kind::Quarantine, ADDR, "node-1", 9, NOW + 10);
        assert_eq!(a.offer(old_quarantine, NOW), Outcome::Applied);
        assert_eq!(a.offer(release.clone(), NOW), Outcome::Applied);
        assert_eq!(a.offer(requarantine, NOW), Outcome::Applied);
        // A store writer re-adds the genuine release: it verifies, but it is older.
        assert_eq!(
            a.offer(release, NOW),
            Outcome::Refused(ApplyRefusal::Stale),
            "the replayed release must not lift the newer quarantine"
        );
        assert_eq!(a.held(QFIELD).unwrap().kind, Kind::Quarantine);
        assert_eq!(a.held(QFIELD).unwrap().seq, 9);
        // Another origin at the same millisecond orders by name: node-0 < node-1.
        let tie = entry(Kind::Release, ADDR, "node-0", 99, NOW + 10);
        assert_eq!(a.offer(tie, NOW), Outcome::Refused(ApplyRefusal::Stale));
        assert_eq!(a.refused().get("stale"), Some(&2));
        assert_eq!(a.held(QFIELD).unwrap().kind, Kind::Quarantine);
    }

    #[test]
    fn the_same_entry_twice_is_a_duplicate_not_counted() {
        let mut a = Applier::new();
        let q = entry(Kind::Quarantine, ADDR, "node-1", 1, NOW);
        assert_eq!(a.offer(q.clone(), NOW), Outcome::Applied);
        assert_eq!(a.offer(q, NOW), Outcome::Duplicate);
        assert!(a.refused().is_empty());
    }

    #[test]
    fn any_order_of_the_same_entries_ends_in_the_same_state() {
        let all = [
            entry(Kind::Quarantine, ADDR, "node-1", 1, NOW),
            entry(Kind::Release, ADDR, "node-2", 1, NOW + 5),
            entry(Kind::Quarantine, ADDR, "node-3", 1, NOW + 5),
            entry(Kind::Release, ADDR, "node-1", 2, NOW + 3),
        ];
        // Every rotation and its reverse: the newest, (NOW+5, node-3, 1), always wins.
        for r in 0..all.len() {
            for rev in [false, true] {
                let mut order = all.to_vec();
                order.rotate_left(r);
                if rev {
                    order.reverse();
                }
                let mut a = Applier::new();
                for v in order {
                    a.offer(v, NOW);
                }
                let held = a.held(QFIELD).unwrap();
                assert_eq!(
                    (held.kind, held.origin.as_str()),
                    (Kind::Quarantine, "node-3"),
                    "rotation {r} reversed {rev}"
                );
            }
        }
    }

    #[test]
    fn a_revocation_is_never_undone_by_an_entry() {
        let mut a = Applier::new();
        let field = "revocation:tok-1";
        let until = NOW + 60_000;
        let revoke = entry_with(
            Kind::Revocation,
            "tok-1",
            "node-1",
            1,
            NOW,
            &format!(r#"{{"until_wall_ms":{until}}}"#),
        );
        assert_eq!(a.offer(revoke, NOW), Outcome::Applied);
        // A newer binding of the revoked token: refused, however new.
        let bind = entry(Kind::Binding, "tok-1", "node-2", 1, NOW + 1_000);
        assert_eq!(
            a.offer(bind.clone(), NOW + 1_000),
            Outcome::Refused(ApplyRefusal::Revoked)
        );
        assert!(a.held("binding:tok-1").is_none());
        // A newer revocation with an earlier end replaces it but does not shorten it.
        let short = entry_with(
            Kind::Revocation,
            "tok-1",
            "node-2",
            2,
            NOW + 2_000,
            &format!(r#"{{"until_wall_ms":{}}}"#, NOW + 3_000),
        );
        assert_eq!(a.offer(short, NOW + 2_000), Outcome::Applied);
        assert_eq!(a.revocation_end(field), Some(Some(until)));
        assert!(a.token_revoked("tok-1", NOW + 30_000));
        // Pruning before its end keeps it; after its end the token may bind again.
        a.prune(NOW + 30_000, u64::MAX);
        assert!(a.token_revoked("tok-1", NOW + 30_000));
        assert!(!a.token_revoked("tok-1", until));
        assert_eq!(a.offer(bind, until), Outcome::Applied);
        a.prune(until, u64::MAX);
        assert!(a.held(field).is_none());
        // A revocation without a readable end has none.
        let forever = entry_with(
            Kind::IdentityRevocation,
            "idp:alice",
            "node-1",
            3,
            NOW,
            r#"{"until_wall_ms":"soon"}"#,
        );
        assert_eq!(a.offer(forever, NOW), Outcome::Applied);
        assert!(a.identity_revoked("idp:alice", u64::MAX));
        assert_eq!(a.refused().get("revoked"), Some(&1));
    }
}
