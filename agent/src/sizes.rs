//! How big the kernel tables are, and what that costs.
//!
//! The object carries small compile-time sizes (`tollgate_common::policy::MAX_*`, what the
//! fixture tests that load it directly get). The agent sizes five groups of maps from
//! `[limits]` when it loads the object (`EbpfLoader::set_max_entries`): identity slots (the
//! identity, bucket and per-CPU counter arrays, ingress and egress), exact bindings (one hash
//! map per family), CIDR bindings (one LPM trie per family), anonymous prefixes (one LRU per
//! family) and tracked flows (one LRU for both families and both directions). Every
//! map is preallocated except the tries, so memory is taken when the map is made, not when
//! it fills: [`kernel_memory`] estimates it the way the kernel accounts it (its
//! `map_mem_usage`, shown as `memlock` in a map's fdinfo), which `status` then reads back.

use std::collections::BTreeMap;

use aya::EbpfLoader;
use aya_obj::generated::bpf_map_type;
use serde::Serialize;
use tollgate_common::{map_names as names, policy};

/// The sizes the operator can set (`[limits]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sizes {
    /// Identity slots, slot 0 (anonymous) included: ids run 1..identities.
    pub identities: u32,
    /// Exact (/32, /128) bindings, per address family.
    pub exact_bindings: u32,
    /// CIDR bindings, per address family.
    pub cidr_bindings: u32,
    /// Anonymous prefixes tracked, per address family (an LRU: a flood ages out the oldest).
    pub anon_prefixes: u32,
    /// Bound identities' TCP flows tracked (an LRU: a flood ages out the oldest flow, which
    /// then counts as untracked, never wrongly).
    pub flows: u32,
}

/// The most identity slots `[limits]` may ask for.
pub const MAX_IDENTITY_SLOTS: u32 = 1 << 24;

/// One group of maps sized together, as `[limits]` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Group {
    Identities,
    ExactBindings,
    CidrBindings,
    AnonPrefixes,
    Flows,
}

impl Group {
    pub const ALL: [Group; 5] = [
        Group::Identities,
        Group::ExactBindings,
        Group::CidrBindings,
        Group::AnonPrefixes,
        Group::Flows,
    ];

    /// The key in `[limits]`.
    pub fn key(self) -> &'static str {
        match self {
            Group::Identities => "identities",
            Group::ExactBindings => "exact_bindings",
            Group::CidrBindings => "cidr_bindings",
            Group::AnonPrefixes => "anon_prefixes",
            Group::Flows => "flows",
        }
    }

    /// The maps this group sizes.
    pub fn maps(self) -> &'static [&'static str] {
        match self {
            Group::Identities => &[
                names::IDENTITIES,
                names::BUCKETS,
                names::IDENTITY_COUNTERS,
                names::EGRESS_IDENTITY,
            ],
            Group::ExactBindings => &[names::BIND_V4, names::BIND_V6],
            Group::CidrBindings => &[names::BIND_CIDR_V4, names::BIND_CIDR_V6],
            Group::AnonPrefixes => &[names::ANON_V4, names::ANON_V6],
            Group::Flows => &[names::FLOWS],
        }
    }

    /// The group a map belongs to, if its size comes from `[limits]`.
    pub fn of_map(map: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.maps().contains(&map))
    }

    /// The sizes the operator may ask for. The floors keep a typo (`identities = 10`) from
    /// making a node that cannot hold its own configuration; the ceilings keep every index
    /// and count inside u32 arithmetic in the kernel and here.
    pub fn range(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Group::Identities => 16..=MAX_IDENTITY_SLOTS,
            Group::ExactBindings => 16..=(1 << 26),
            Group::CidrBindings => 16..=(1 << 24),
            Group::AnonPrefixes => 1024..=(1 << 24),
            Group::Flows => 1024..=(1 << 24),
        }
    }
}

impl Sizes {
    /// The object's own sizes (compile time).
    pub const COMPILED: Sizes = Sizes {
        identities: policy::MAX_IDENTITIES,
        exact_bindings: policy::MAX_EXACT_BINDINGS,
        cidr_bindings: policy::MAX_CIDR_BINDINGS,
        anon_prefixes: policy::MAX_ANON_PREFIXES,
        flows: policy::MAX_FLOWS,
    };

    /// What a node gets when `[limits]` says nothing, where its memory allows (see
    /// [`Sizes::fit_defaults`]): a million identity slots and two million exact bindings per
    /// family, enough for a public API's whole customer base on every node of a fleet that
    /// shares its bindings. CIDR bindings are operator-written ranges (a few per partner):
    /// the old size stays. Anonymous prefixes: four times the old size, so a spoofed flood
    /// needs four times the sources to age out a real client's prefix. Flows: 2^18, four
    /// open connections for each of 65 536 busy clients (~36 MiB).
    pub const DEFAULT: Sizes = Sizes {
        identities: 1 << 20,
        exact_bindings: 1 << 21,
        cidr_bindings: policy::MAX_CIDR_BINDINGS,
        anon_prefixes: 1 << 18,
        flows: 1 << 18,
    };

    pub fn get(&self, g: Group) -> u32 {
        match g {
            Group::Identities => self.identities,
            Group::ExactBindings => self.exact_bindings,
            Group::CidrBindings => self.cidr_bindings,
            Group::AnonPrefixes => self.anon_prefixes,
            Group::Flows => self.flows,
        }
    }

    pub fn set(&mut self, g: Group, v: u32) {
        match g {
            Group::Identities => self.identities = v,
            Group::ExactBindings => self.exact_bindings = v,
            Group::CidrBindings => self.cidr_bindings = v,
            Group::AnonPrefixes => self.anon_prefixes = v,
            Group::Flows => self.flows = v,
        }
    }

    /// The configured size of `map`, if `[limits]` sizes it.
    pub fn of_map(&self, map: &str) -> Option<u32> {
        Group::of_map(map).map(|g| self.get(g))
    }

    /// Sets every sized map's max_entries on a loader, before `load`. Every loader of the
    /// enforcing program calls this, so that the maps it creates have the node's sizes.
    pub fn configure(&self, loader: &mut EbpfLoader<'_>) {
        for g in Group::ALL {
            for map in g.maps() {
                loader.map_max_entries(map, self.get(g));
            }
        }
    }

    /// Halves the groups the operator did not set (`defaulted`) until the whole fits in
    /// `allowance` bytes, never below the compiled sizes: a small node gets smaller default
    /// tables instead of a refusal. Sizes the operator wrote are never changed.
    pub fn fit_defaults(mut self, defaulted: &[Group], cpus: u32, allowance: u64) -> Sizes {
        while total(&kernel_memory(&self, cpus)) > allowance {
            let mut shrunk = false;
            for g in [
                Group::ExactBindings,
                Group::Identities,
                Group::AnonPrefixes,
                Group::Flows,
            ] {
                let v = self.get(g);
                if defaulted.contains(&g) && v / 2 >= Sizes::COMPILED.get(g) {
                    self.set(g, v / 2);
                    shrunk = true;
                }
            }
            if !shrunk {
                break;
            }
        }
        self
    }
}

/// The kernel memory one map takes, as estimated before it exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapCost {
    pub map: String,
    pub max_entries: u32,
    pub bytes: u64,
}

/// Sum of `costs`.
pub fn total(costs: &[MapCost]) -> u64 {
    costs.iter().map(|c| c.bytes).sum()
}

/// Kernel memory per map of the enforcing object at `sizes`, on a machine with `cpus`
/// possible CPUs (per-CPU maps hold one value per possible CPU). The formulas are the
/// kernel's own accounting (`array_map_mem_usage`, `htab_map_mem_usage`, `trie_mem_usage`,
/// `ringbuf_map_mem_usage` in 6.x), with a trie counted full. Checked against the kernel's
/// `memlock` figure by `tests/limits.rs`.
pub fn kernel_memory(sizes: &Sizes, cpus: u32) -> Vec<MapCost> {
    shapes()
        .iter()
        .map(|(name, s)| {
            let entries = sizes.of_map(name).unwrap_or(s.max_entries);
            MapCost {
                map: name.clone(),
                max_entries: entries,
                bytes: map_bytes(s, entries, u64::from(cpus.max(1))),
            }
        })
        .collect()
}

/// The map definitions of the object this build embeds: (type, key size, value size, the
/// object's max_entries), by name. Read once: the object does not change while we run.
fn shapes() -> &'static BTreeMap<String, Shape> {
    static SHAPES: std::sync::OnceLock<BTreeMap<String, Shape>> = std::sync::OnceLock::new();
    SHAPES.get_or_init(|| {
        // The object is part of this binary; one that does not parse fails every load too.
        let Ok(obj) = aya_obj::Object::parse(crate::object::bytes()) else {
            return BTreeMap::new();
        };
        obj.maps
            .iter()
            .filter(|(name, _)| names::ALL.contains(&name.as_str()))
            .map(|(name, m)| {
                (
                    name.clone(),
                    Shape {
                        map_type: m.map_type(),
                        key_size: m.key_size(),
                        value_size: m.value_size(),
                        max_entries: m.max_entries(),
                    },
                )
            })
            .collect()
    })
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

const fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// `struct htab_elem` before its key (hash node / free-list link, LRU node, hash).
const HTAB_ELEM: u64 = 48;
/// `struct bucket` (list head and lock).
const HTAB_BUCKET: u64 = 16;
/// `struct lpm_trie_node` before its data (rcu head, two children, prefix length, flags).
const TRIE_NODE: u64 = 40;

fn map_bytes(s: &Shape, entries: u32, cpus: u64) -> u64 {
    let n = u64::from(entries);
    let key = u64::from(s.key_size);
    let value = round8(u64::from(s.value_size));
    const HASH: u32 = bpf_map_type::BPF_MAP_TYPE_HASH as u32;
    const LRU_HASH: u32 = bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32;
    const ARRAY: u32 = bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
    const PERCPU_ARRAY: u32 = bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as u32;
    const LPM_TRIE: u32 = bpf_map_type::BPF_MAP_TYPE_LPM_TRIE as u32;
    const RINGBUF: u32 = bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32;
    match s.map_type {
        ARRAY => n * value,
        // A pointer per entry, and the value once per possible CPU.
        PERCPU_ARRAY => n * 8 + n * value * cpus,
        HASH | LRU_HASH => {
            let elem = HTAB_ELEM + round8(key) + value;
            // A preallocated plain hash keeps one spare element per CPU for updates.
            let extra = if s.map_type == HASH { cpus } else { 0 };
            let buckets = n.max(1).next_power_of_two() * HTAB_BUCKET;
            buckets + elem * (n + extra) + if s.map_type == HASH { 8 * cpus } else { 0 }
        }
        // The key's data (its 4-byte prefix length is in the node) and the value.
        LPM_TRIE => n * (TRIE_NODE + key.saturating_sub(4) + u64::from(s.value_size)),
        // max_entries is the ring's byte size; its pages are mapped twice but held once.
        RINGBUF => u64::from(s.max_entries),
        _ => n * (round8(key) + value),
    }
}

/// What `config check` prints about `[limits]`: each group's size and cost, the total and
/// the allowance.
pub fn summary(limits: &crate::config::Limits) -> Vec<String> {
    let costs = kernel_memory(&limits.sizes, limits.cpus);
    let from = if limits.allowance_set {
        "limits.kernel_memory_mib"
    } else {
        "an eighth of the node's memory"
    };
    let mut out = vec![format!(
        "kernel tables: {} of kernel memory ({} allowed: {from}; {} possible CPUs)",
        human(total(&costs)),
        human(limits.allowance),
        limits.cpus
    )];
    let mut grouped = 0;
    for g in Group::ALL {
        let b: u64 = costs
            .iter()
            .filter(|c| g.maps().contains(&c.map.as_str()))
            .map(|c| c.bytes)
            .sum();
        grouped += b;
        let per = match g {
            Group::Identities => "slots",
            Group::Flows => "flows",
            _ => "per family",
        };
        out.push(format!(
            "  {:<15} {:>9} {per:<10} {:>10}",
            g.key(),
            limits.sizes.get(g),
            human(b)
        ));
    }
    out.push(format!(
        "  {:<15} {:>9} {:<10} {:>10}",
        "other tables",
        "",
        "",
        human(total(&costs) - grouped)
    ));
    out
}

/// Bytes, for people: "184.0 MiB".
pub fn human(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.1} KiB", b / KIB)
    }
}

/// Possible CPUs (per-CPU maps are sized by them, not by the online ones).
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map_or(1, |n| n as u32)
}

/// The node's physical memory (`MemTotal`), in bytes.
pub fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The share of physical memory the tables may take when `[limits] kernel_memory_mib` is
/// not set: an eighth. Kernel map memory is never swapped or reclaimed, and a GPU node's
/// memory belongs to its model servers' host-side buffers first.
pub const DEFAULT_SHARE: u64 = 8;

/// The kernel memory figure the kernel itself gives a loaded map (`memlock:` in its fdinfo,
/// the kernel's `map_mem_usage`).
pub fn memlock(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sized_map_is_in_the_object() {
        let shapes = shapes();
        for g in Group::ALL {
            for m in g.maps() {
                assert!(shapes.contains_key(*m), "{m} is not in the object");
            }
        }
    }

    #[test]
    fn defaults_cost_what_the_docs_say_on_two_cpus() {
        let costs = kernel_memory(&Sizes::DEFAULT, 2);
        let by = |m: &str| costs.iter().find(|c| c.map == m).unwrap().bytes;
        // IDENTITIES: 48-byte records; IDENTITY_COUNTERS: a pointer + 56 bytes per CPU.
        assert_eq!(by(names::IDENTITIES), (1 << 20) * 48);
        assert_eq!(by(names::IDENTITY_COUNTERS), (1 << 20) * (8 + 2 * 56));
        // BIND_V4: 2^21 buckets of 16 bytes, (2^21 + 2) elements of 48 + 8 + 16 bytes.
        assert_eq!(
            by(names::BIND_V4),
            (1 << 21) * 16 + ((1 << 21) + 2) * 72 + 16
        );
        // EGRESS_IDENTITY: a pointer + 40 bytes per CPU, sized with the identities.
        assert_eq!(by(names::EGRESS_IDENTITY), (1 << 20) * (8 + 2 * 40));
        // FLOWS (LRU, no spare elements): 2^18 buckets, elements of 48 + 40 + 56 bytes.
        assert_eq!(
            by(names::FLOWS),
            (1 << 18) * 16 + (1 << 18) * (48 + 40 + 56)
        );
        let t = total(&costs);
        assert!(t > 650 << 20 && t < 800 << 20, "{}", human(t));
    }

    #[test]
    fn defaults_shrink_to_fit_and_set_sizes_do_not() {
        let small = 256 << 20;
        let fitted = Sizes::DEFAULT.fit_defaults(&Group::ALL, 2, small);
        assert!(total(&kernel_memory(&fitted, 2)) <= small);
        assert!(fitted.identities < Sizes::DEFAULT.identities);
        // The operator wrote identities: only the others shrink.
        let kept = Sizes::DEFAULT.fit_defaults(&[Group::ExactBindings], 2, small);
        assert_eq!(kept.identities, Sizes::DEFAULT.identities);
        assert!(kept.exact_bindings < Sizes::DEFAULT.exact_bindings);
        // Never below the compiled sizes, even if that still does not fit.
        let floor = Sizes::DEFAULT.fit_defaults(&Group::ALL, 2, 1);
        assert_eq!(floor.identities, Sizes::COMPILED.identities);
        assert_eq!(floor.exact_bindings, Sizes::COMPILED.exact_bindings);
    }
}
