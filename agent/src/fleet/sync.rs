//! One read pass of the fleet sync: what the sync task (not wired yet) runs every interval.
//!
//! - First run (no epoch in the cursor), a store whose epoch changed (reset: restarted
//!   empty or flushed), a new applier (restart: nothing to order entries against), or a
//!   [`Read::Gap`] (the stream was trimmed past the cursor, or lost):
//!   load the snapshot and offer every entry; read on from the snapshot's position.
//! - Otherwise: the stream after the cursor, at most `max` entries.
//!
//! Entries the store refused to verify and entries the applier refused are counted by label
//! in the [`Pass`]. The cursor is advanced (and written) only after the applier has taken the
//! whole batch: a crash or a failed write in between reads the same entries again next time,
//! which the applier takes as duplicates (so a failed write hands the pass back inside
//! [`SyncError::Cursor`], for the caller to install). Applied entries are returned in the order taken,
//! for the caller to install (re-verifying a binding's token first).

use std::collections::BTreeMap;

use super::{
    apply::{Applier, Outcome},
    cursor::{CursorError, CursorFile},
    entry::Verified,
    store::{Read, Store, StoreError},
};

/// Why a pass read the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The node had never synced.
    First,
    /// The stream no longer reached back to the cursor.
    Gap,
    /// The store's epoch is not the one the node saw: it was reset. The caller re-seeds it
    /// (the applier still holds every revocation it had; nothing becomes valid again).
    StoreReset,
    /// The applier is new (the node restarted): it holds nothing to order the stream's
    /// entries against (a replayed old entry would apply), so it is seeded from the snapshot.
    Restart,
}

impl Reload {
    pub const ALL: [Reload; 4] = [
        Reload::First,
        Reload::Gap,
        Reload::StoreReset,
        Reload::Restart,
    ];

    /// The counter label (`tollgate_fleet_snapshot_loads_total{reason}`, `fleet status`).
    pub fn label(self) -> &'static str {
        match self {
            Reload::First => "first",
            Reload::Gap => "gap",
            Reload::StoreReset => "store_reset",
            Reload::Restart => "restart",
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Entries applied, in the order taken.
    pub applied: Vec<Verified>,
    /// Entries read again (overlap of snapshot and stream, a re-read after a failed write).
    pub duplicates: u64,
    /// Refused entries by label: the entry's own (`bad_mac`, `malformed`, …) and the
    /// applier's (`stale`, `revoked`).
    pub refused: BTreeMap<&'static str, u64>,
    /// Set when the snapshot was loaded, with the reason.
    pub reload: Option<Reload>,
    /// The stream read returned `max` entries: more may be waiting (run another pass now
    /// rather than after the interval).
    pub more: bool,
    /// How far the stream's newest entry was ahead of what this pass read up to, in the ids'
    /// milliseconds (0 after a snapshot load: it covers the whole stream).
    pub lag_ms: u64,
}

impl Pass {
    fn take(&mut self, applier: &mut Applier, v: Verified, now_wall_ms: u64) {
        match applier.offer(v.clone(), now_wall_ms) {
            Outcome::Applied => self.applied.push(v),
            Outcome::Duplicate => self.duplicates += 1,
            Outcome::Refused(r) => *self.refused.entry(r.label()).or_default() += 1,
        }
    }

    fn count(&mut self, label: &'static str) {
        *self.refused.entry(label).or_default() += 1;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Nothing was taken (the store failed before the applier saw an entry).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The applier took the batch but the cursor could not be written (it stays where it
    /// was, so the batch is read again next pass, as duplicates). `pass` is what was taken:
    /// the caller installs `pass.applied` all the same, or those entries would be held by
    /// the applier and never installed.
    #[error("{err} (the pass's entries were taken; the cursor did not move)")]
    Cursor { pass: Box<Pass>, err: CursorError },
}

fn advance(
    cursor: &mut CursorFile,
    pass: Pass,
    last: super::store::StreamPos,
    epoch: String,
) -> Result<Pass, SyncError> {
    match cursor.advance(last, Some(epoch)) {
        Ok(()) => Ok(pass),
        Err(err) => Err(SyncError::Cursor {
            pass: Box::new(pass),
            err,
        }),
    }
}

/// One pass: see the module doc. `max` bounds the entries read from the stream this pass (a
/// node far behind catches up over several passes); `now_wall_ms` is the wall clock, for
/// revocation ends.
pub async fn sync_once(
    store: &mut Store,
    cursor: &mut CursorFile,
    applier: &mut Applier,
    max: usize,
    now_wall_ms: u64,
) -> Result<Pass, SyncError> {
    let epoch = store.epoch().await?;
    let mut pass = Pass::default();
    let reload = match &cursor.cursor().epoch {
        None => Some(Reload::First),
        Some(seen) if *seen != epoch => Some(Reload::StoreReset),
        Some(_) if !applier.is_seeded() => Some(Reload::Restart),
        Some(_) => None,
    };
    let reload = match reload {
        Some(r) => r,
        None => match store.read_since(cursor.cursor().last, max).await? {
            Read::Gap => Reload::Gap,
            Read::Entries(batch) => {
                pass.more = batch.entries.len() + batch.refused.len() >= max.max(1);
                pass.lag_ms = batch.head.ms.saturating_sub(batch.last.ms);
                for (_, r) in &batch.refused {
                    pass.count(r.label());
                }
                for (_, v) in batch.entries {
                    pass.take(applier, v, now_wall_ms);
                }
                return advance(cursor, pass, batch.last, epoch);
            }
        },
    };
    let snap = store.snapshot().await?;
    for (_, r) in &snap.refused {
        pass.count(r.label());
    }
    for v in snap.entries {
        pass.take(applier, v, now_wall_ms);
    }
    applier.mark_seeded();
    pass.reload = Some(reload);
    advance(cursor, pass, snap.position, epoch)
}

#[cfg(test)]
mod tests;
