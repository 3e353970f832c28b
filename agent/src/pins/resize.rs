//! A table size change on a running node (`[limits]` changed, then a restart): new maps of
//! the new sizes are made beside the pinned ones (`maps-new/`), what the old ones hold is
//! copied in, the new program (which uses the new maps) is swapped onto every pinned link
//! with `bpf_link_update` (no moment without a program), and the new maps' pins replace the
//! old ones'. Nothing the kernel decided is lost on the way:
//!
//! - identities (with the controller's flags), bindings and anonymous prefixes are copied
//!   before the new program runs anywhere;
//! - budgets (GCRA state) are copied once more right before the first swap, so the old
//!   program's charges until then count;
//! - per-identity counters (ingress and egress) are added after the last swap, when the old
//!   program no longer counts: new = what the new program counted + everything the old one
//!   did;
//! - tracked flows are copied best-effort before the swap (an LRU: what does not fit, or a
//!   flow that changes in between, is at worst measured from its next request, as after an
//!   eviction; it is never given a wrong figure).
//!
//! A shrink that would drop something (an identity in a slot past the new size, more
//! bindings than the new map holds) is refused before anything changes; anonymous prefixes
//! are an LRU and keep as many as fit. An agent that dies mid-way leaves the old pins in
//! `maps/`: the next start removes `maps-new/` and migrates again from them.

use std::path::{Path, PathBuf};

use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues,
};
use tollgate_common::{
    flow::{EgressCounters, Flow, FlowKey},
    map_names as names,
    policy::{AnonKey6, Binding, Bucket, Identity, IdentityCounters},
};
use tracing::{info, warn};

use super::{PinError, io, maps_dir};
use crate::{sizes::Group, tables::batch};

/// Where the new maps are pinned until they replace the old ones.
pub fn staging_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps-new")
}

/// One map whose pinned size is not the configured one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resize {
    pub map: String,
    pub from: u32,
    pub to: u32,
}

/// A migration in progress (see the module's text).
pub struct Migration {
    pin_dir: PathBuf,
    resizes: Vec<Resize>,
    budgets_synced: bool,
}

fn err(map: &str, e: impl std::fmt::Display) -> PinError {
    PinError::Resize {
        detail: format!("map {map}: {e}"),
    }
}

fn open(dir: &Path, name: &str) -> Result<MapData, PinError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|e| io(&path, e))
}

/// Old and new handles of one map, typed.
fn pair<T>(pin_dir: &Path, name: &str, wrap: fn(MapData) -> Map) -> Result<(T, T), PinError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let old = T::try_from(wrap(open(&maps_dir(pin_dir), name)?)).map_err(|e| err(name, e))?;
    let new = T::try_from(wrap(open(&staging_dir(pin_dir), name)?)).map_err(|e| err(name, e))?;
    Ok((old, new))
}

impl Migration {
    /// Checks that nothing would be dropped, then copies identities, bindings and anonymous
    /// prefixes from the pinned maps into the new ones (pinned in [`staging_dir`]).
    pub fn prepare(pin_dir: &Path, resizes: Vec<Resize>) -> Result<Migration, PinError> {
        let m = Migration {
            pin_dir: pin_dir.to_owned(),
            resizes,
            budgets_synced: false,
        };
        for r in &m.resizes {
            m.check_fits(r)?;
        }
        for r in &m.resizes {
            m.copy(r)?;
        }
        Ok(m)
    }

    pub fn resizes(&self) -> &[Resize] {
        &self.resizes
    }

    fn check_fits(&self, r: &Resize) -> Result<(), PinError> {
        if r.to >= r.from {
            return Ok(());
        }
        let old = open(&maps_dir(&self.pin_dir), &r.map)?;
        let held = match Group::of_map(&r.map) {
            Some(Group::Identities) if r.map == names::IDENTITIES => {
                let ids =
                    batch::read_all::<u32, Identity>(&old, r.from).map_err(|e| err(&r.map, e))?;
                // The highest slot in use must still exist.
                let top = ids
                    .iter()
                    .filter(|(_, v)| *v != Identity::default())
                    .map(|(k, _)| k + 1)
                    .max()
                    .unwrap_or(0);
                if top > r.to {
                    return Err(PinError::Resize {
                        detail: format!(
                            "limits.identities = {} is below identity slot {} in use (the \
                             slots are given out in order and never move): keep at least {top}",
                            r.to,
                            top - 1
                        ),
                    });
                }
                return Ok(());
            }
            Some(Group::ExactBindings | Group::CidrBindings) => count(old, &r.map)?,
            _ => return Ok(()),
        };
        if held > r.to as usize {
            return Err(PinError::Resize {
                detail: format!(
                    "map {} holds {held} bindings, more than the {} asked for: unbind some or \
                     keep the size",
                    r.map, r.to
                ),
            });
        }
        Ok(())
    }

    fn copy(&self, r: &Resize) -> Result<(), PinError> {
        let n = r.from.min(r.to);
        let d = &self.pin_dir;
        let copied = match r.map.as_str() {
            names::IDENTITIES => {
                let (old, mut new): (Array<MapData, Identity>, _) = pair(d, &r.map, Map::Array)?;
                copy_array(&old, &mut new, n, &r.map)?
            }
            // Budgets: in `sync_budgets`; counters: in `finish`.
            names::BUCKETS | names::IDENTITY_COUNTERS | names::EGRESS_IDENTITY => 0,
            names::FLOWS => {
                let (old, mut new): (HashMap<MapData, FlowKey, Flow>, _) =
                    pair(d, &r.map, Map::LruHashMap)?;
                // Best-effort: a flow not carried over is measured from its next request.
                copy_hash(&old, &mut new, r, &r.map).unwrap_or_else(|e| {
                    warn!(map = r.map, "tracked flows not carried over: {e}");
                    0
                })
            }
            names::BIND_V4 => {
                let (old, mut new): (HashMap<MapData, [u8; 4], Binding>, _) =
                    pair(d, &r.map, Map::HashMap)?;
                copy_hash(&old, &mut new, r, &r.map)?
            }
            names::BIND_V6 => {
                let (old, mut new): (HashMap<MapData, [u8; 16], Binding>, _) =
                    pair(d, &r.map, Map::HashMap)?;
                copy_hash(&old, &mut new, r, &r.map)?
            }
            names::ANON_V4 => {
                let (old, mut new): (HashMap<MapData, [u8; 4], u64>, _) =
                    pair(d, &r.map, Map::LruHashMap)?;
                copy_hash(&old, &mut new, r, &r.map)?
            }
            names::ANON_V6 => {
                let (old, mut new): (HashMap<MapData, AnonKey6, u64>, _) =
                    pair(d, &r.map, Map::LruHashMap)?;
                copy_hash(&old, &mut new, r, &r.map)?
            }
            names::BIND_CIDR_V4 => {
                let (old, mut new): (LpmTrie<MapData, [u8; 4], Binding>, _) =
                    pair(d, &r.map, Map::LpmTrie)?;
                copy_trie(&old, &mut new, &r.map)?
            }
            names::BIND_CIDR_V6 => {
                let (old, mut new): (LpmTrie<MapData, [u8; 16], Binding>, _) =
                    pair(d, &r.map, Map::LpmTrie)?;
                copy_trie(&old, &mut new, &r.map)?
            }
            other => return Err(err(other, "has no copy rule for a size change")),
        };
        info!(
            map = r.map,
            from = r.from,
            to = r.to,
            copied,
            "table resized"
        );
        Ok(())
    }

    /// Right before the first program swap: the budgets as the old program left them.
    pub fn sync_budgets(&mut self) -> Result<(), PinError> {
        if self.budgets_synced {
            return Ok(());
        }
        if let Some(r) = self.resizes.iter().find(|r| r.map == names::BUCKETS) {
            let (old, mut new): (Array<MapData, Bucket>, _) =
                pair(&self.pin_dir, names::BUCKETS, Map::Array)?;
            copy_array(&old, &mut new, r.from.min(r.to), names::BUCKETS)?;
        }
        self.budgets_synced = true;
        Ok(())
    }

    /// After the last swap: adds the old counters into the new ones, then moves the new
    /// maps' pins over the old ones (the old maps are freed with the old program).
    pub fn finish(mut self) -> Result<Vec<Resize>, PinError> {
        // A node with no pinned link swapped nothing: the budgets are copied here.
        self.sync_budgets()?;
        for r in &self.resizes {
            let n = r.from.min(r.to);
            match r.map.as_str() {
                names::IDENTITY_COUNTERS => {
                    add_counters::<IdentityCounters>(&self.pin_dir, &r.map, n, |c, o| {
                        c.passed.accumulate(&o.passed);
                        c.dropped.accumulate(&o.dropped);
                        c.cost = c.cost.wrapping_add(o.cost);
                        c.syn = c.syn.wrapping_add(o.syn);
                        c.small = c.small.wrapping_add(o.small);
                    })?
                }
                names::EGRESS_IDENTITY => {
                    add_counters::<EgressCounters>(&self.pin_dir, &r.map, n, |c, o| {
                        c.accumulate(o)
                    })?
                }
                _ => {}
            }
        }
        let (from, to) = (staging_dir(&self.pin_dir), maps_dir(&self.pin_dir));
        for r in &self.resizes {
            let (a, b) = (from.join(&r.map), to.join(&r.map));
            std::fs::rename(&a, &b).map_err(|e| io(&a, e))?;
        }
        std::fs::remove_dir(&from).map_err(|e| io(&from, e))?;
        Ok(self.resizes)
    }
}

/// Entries in a binding map (only read on a shrink).
fn count(map: MapData, name: &str) -> Result<usize, PinError> {
    let max = map.info().map_err(|e| err(name, e))?.max_entries();
    let n = match name {
        names::BIND_V4 => batch::read_all::<[u8; 4], Binding>(&map, max).map(|v| v.len()),
        names::BIND_V6 => batch::read_all::<[u8; 16], Binding>(&map, max).map(|v| v.len()),
        names::BIND_CIDR_V4 => {
            let t: LpmTrie<MapData, [u8; 4], Binding> =
                LpmTrie::try_from(Map::LpmTrie(map)).map_err(|e| err(name, e))?;
            return Ok(t.keys().count());
        }
        names::BIND_CIDR_V6 => {
            let t: LpmTrie<MapData, [u8; 16], Binding> =
                LpmTrie::try_from(Map::LpmTrie(map)).map_err(|e| err(name, e))?;
            return Ok(t.keys().count());
        }
        other => return Err(err(other, "is not a binding map")),
    };
    n.map_err(|e| err(name, e))
}

fn copy_array<V: aya::Pod + Default + PartialEq>(
    old: &Array<MapData, V>,
    new: &mut Array<MapData, V>,
    n: u32,
    name: &str,
) -> Result<usize, PinError> {
    let all = batch::read_all::<u32, V>(old.map(), old.len()).map_err(|e| err(name, e))?;
    let mut copied = 0;
    for (k, v) in all {
        // The new map starts zeroed: only what is set needs writing.
        if k < n && v != V::default() {
            new.set(k, v, 0).map_err(|e| err(name, e))?;
            copied += 1;
        }
    }
    Ok(copied)
}

fn copy_hash<K: aya::Pod, V: aya::Pod>(
    old: &HashMap<MapData, K, V>,
    new: &mut HashMap<MapData, K, V>,
    r: &Resize,
    name: &str,
) -> Result<usize, PinError> {
    let all = batch::read_all::<K, V>(old.map(), r.from).map_err(|e| err(name, e))?;
    let mut copied = 0;
    // An LRU that shrinks keeps what fits (the order is the kernel's, not recency: the
    // anonymous allowance of the prefixes left out starts full, as after an eviction).
    for (k, v) in all.into_iter().take(r.to as usize) {
        new.insert(k, v, 0).map_err(|e| err(name, e))?;
        copied += 1;
    }
    Ok(copied)
}

fn copy_trie<K: aya::Pod, V: aya::Pod>(
    old: &LpmTrie<MapData, K, V>,
    new: &mut LpmTrie<MapData, K, V>,
    name: &str,
) -> Result<usize, PinError> {
    let mut copied = 0;
    for k in old.keys() {
        let k = k.map_err(|e| err(name, e))?;
        // A key listed but not readable: a binding would be lost, so the migration stops
        // (the old pins stay as they are).
        let v = old.get(&k, 0).map_err(|e| err(name, e))?;
        new.insert(&k, v, 0).map_err(|e| err(name, e))?;
        copied += 1;
    }
    Ok(copied)
}

/// Adds the old per-CPU counters of slots `0..n` into the new map's (`add` sums one CPU's).
fn add_counters<V: aya::Pod + Default + PartialEq>(
    pin_dir: &Path,
    name: &str,
    n: u32,
    add: impl Fn(&mut V, &V),
) -> Result<(), PinError> {
    let (old, mut new): (PerCpuArray<MapData, V>, _) = pair(pin_dir, name, Map::PerCpuArray)?;
    for id in 0..n {
        let o = old.get(&id, 0).map_err(|e| err(name, e))?;
        if o.iter().all(|c| *c == V::default()) {
            continue;
        }
        let cur = new.get(&id, 0).map_err(|e| err(name, e))?;
        let sum: Vec<V> = cur
            .iter()
            .zip(o.iter())
            .map(|(a, b)| {
                let mut c = *a;
                add(&mut c, b);
                c
            })
            .collect();
        let values = PerCpuValues::try_from(sum).map_err(|e| err(name, e))?;
        new.set(id, values, 0).map_err(|e| err(name, e))?;
    }
    Ok(())
}
