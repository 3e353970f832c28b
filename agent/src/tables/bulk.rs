//! Many entries at once: identity counters read in one pass (a scrape, a controller tick,
//! `top` cost a few syscalls, not one per identity), and bindings, identity records and
//! cleared slots written with batch updates (a million bindings from cold in ~123 calls).
//! Same rules as the one-entry calls in `tables`: a full binding map refuses, nothing is
//! evicted; identity ids are checked before anything is written.

use std::net::IpAddr;

use aya::maps::{IterableMap as _, MapError};
use tollgate_common::{
    flow::EgressCounters,
    map_names as names,
    policy::{AnonKey6, Binding, Bucket, Identity, IdentityCounters},
};

use super::{KernelTables, Result, TableError, batch, keep_controller_flags};

/// BPF_ANY: create or replace, as the one-entry writes do.
const BPF_ANY: u64 = 0;

/// One binding to write: address, prefix length, identity slot, expiry (CLOCK_BOOTTIME ns;
/// 0: never).
pub type NewBinding = (IpAddr, u8, u32, u64);

pub(super) fn io_err(name: &'static str) -> impl Fn(std::io::Error) -> TableError {
    move |e| TableError::Map {
        name,
        source: MapError::IoError(e),
    }
}

/// The map's max_entries (the bound on a walk; the size the loader gave it).
impl KernelTables {
    /// Entries in the exact IPv4 binding map (a batch walk; get-next-key on failure).
    pub(super) fn count_exact_v4(&self) -> usize {
        // The sizes the kernel made the maps with (read once, `KernelTables::sizes`).
        batch::count::<[u8; 4], Binding>(self.bind_v4.map(), self.sizes.exact_bindings)
            .unwrap_or_else(|_| self.bind_v4.keys().count())
    }

    pub(super) fn count_exact_v6(&self) -> usize {
        batch::count::<[u8; 16], Binding>(self.bind_v6.map(), self.sizes.exact_bindings)
            .unwrap_or_else(|_| self.bind_v6.keys().count())
    }

    /// Entries in the anonymous-prefix tables (batch walks).
    pub(super) fn count_anon(&self) -> [usize; 2] {
        let max = self.sizes.anon_prefixes;
        let v4 = batch::count::<[u8; 4], u64>(self.anon_v4.map(), max)
            .unwrap_or_else(|_| self.anon_v4.keys().count());
        let v6 = batch::count::<AnonKey6, u64>(self.anon_v6.map(), max)
            .unwrap_or_else(|_| self.anon_v6.keys().count());
        [v4, v6]
    }

    /// Counters of identities `0..upto` (0: anonymous), summed over CPUs, indexed by slot:
    /// a batch read of that part of the per-CPU array (one call per 8 192 slots), never one
    /// call per identity. Slots are given out from 1 upward, so `upto` (the highest slot in
    /// use + 1) keeps a node with few identities from reading a million-slot array.
    pub fn identity_counters_upto(&self, upto: u32) -> Result<Vec<IdentityCounters>> {
        sum_per_cpu(
            self.identity_counters.map(),
            upto.min(self.sizes.identities),
            names::IDENTITY_COUNTERS,
            |s: &[IdentityCounters]| IdentityCounters::sum(s),
        )
    }

    /// Identity records `0..upto`, indexed by slot, in one batch read (as
    /// [`KernelTables::identity_counters_upto`]).
    pub fn identities_upto(&self, upto: u32) -> Result<Vec<Identity>> {
        let map = self.identities.map();
        let upto = upto.min(self.sizes.identities);
        batch::read_array_prefix::<Identity>(map, upto).map_err(io_err(names::IDENTITIES))
    }

    /// Writes identity records with batch updates; their limiter state is left as it is
    /// (as [`KernelTables::set_identity`]). Every id is checked before anything is written.
    pub fn set_identities(&mut self, records: &[(u32, Identity)]) -> Result<()> {
        let cap = self.identity_slots();
        if let Some((id, _)) = records.iter().find(|(id, _)| *id == 0 || *id >= cap) {
            return Err(TableError::IdentityId(*id, cap));
        }
        batch::update_all(self.identities.map(), records, BPF_ANY)
            .map_err(io_err(names::IDENTITIES))
    }

    /// Writes identity records as [`KernelTables::set_identity_keeping_controller_flags`]
    /// does, with one batch read of the records in force and one batch write: the flags the
    /// controller owns (throttle, quota) and a throttle's factor are kept from the kernel.
    pub fn set_identities_keeping_controller_flags(
        &mut self,
        records: &mut [(u32, Identity)],
    ) -> Result<()> {
        let upto = records.iter().map(|(id, _)| id + 1).max().unwrap_or(0);
        let upto = upto.min(self.identity_slots());
        let old = batch::read_array_prefix::<Identity>(self.identities.map(), upto)
            .map_err(io_err(names::IDENTITIES))?;
        for (id, rec) in records.iter_mut() {
            if let Some(o) = old.get(*id as usize) {
                keep_controller_flags(rec, o);
            }
        }
        self.set_identities(records)
    }

    /// Clears slots (record, limiter state, counters) as [`KernelTables::clear_identity`]
    /// does, three batch writes for all of them.
    pub fn clear_identities(&mut self, ids: &[u32]) -> Result<()> {
        let cap = self.identity_slots();
        if let Some(id) = ids.iter().find(|id| **id == 0 || **id >= cap) {
            return Err(TableError::IdentityId(*id, cap));
        }
        let records: Vec<(u32, Identity)> =
            ids.iter().map(|id| (*id, Identity::default())).collect();
        batch::update_all(self.identities.map(), &records, BPF_ANY)
            .map_err(io_err(names::IDENTITIES))?;
        let buckets: Vec<(u32, Bucket)> = ids.iter().map(|id| (*id, Bucket::default())).collect();
        batch::update_all(self.buckets.map(), &buckets, BPF_ANY).map_err(io_err(names::BUCKETS))?;
        batch::update_all_per_cpu(
            self.identity_counters.map(),
            ids,
            &IdentityCounters::default(),
            BPF_ANY,
        )
        .map_err(io_err(names::IDENTITY_COUNTERS))?;
        // What the node sent the slot's last holder is not the new one's either.
        batch::update_all_per_cpu(
            self.egress_identity.map(),
            ids,
            &EgressCounters::default(),
            BPF_ANY,
        )
        .map_err(io_err(names::EGRESS_IDENTITY))
    }

    /// Writes many bindings: the exact ones (/32, /128) with batch updates, CIDR ones key by
    /// key (LPM tries have no batch operation). Every entry is checked first; a full map
    /// stops the write with [`TableError::BindingsFull`] (the entries before it are in,
    /// none is evicted). Returns how many were written.
    pub fn bind_many(&mut self, entries: &[NewBinding]) -> Result<usize> {
        let cap = self.identity_slots();
        let mut v4: Vec<([u8; 4], Binding)> = Vec::new();
        let mut v6: Vec<([u8; 16], Binding)> = Vec::new();
        let mut cidr: Vec<NewBinding> = Vec::new();
        for &(addr, len, identity, expires_ns) in entries {
            if identity == 0 || identity >= cap {
                return Err(TableError::IdentityId(identity, cap));
            }
            let b = Binding {
                identity,
                _pad: 0,
                expires_ns,
            };
            match addr {
                IpAddr::V4(a) if len == 32 => v4.push((a.octets(), b)),
                IpAddr::V6(a) if len == 128 => v6.push((a.octets(), b)),
                IpAddr::V4(_) if len < 32 => cidr.push((addr, len, identity, expires_ns)),
                IpAddr::V6(_) if len < 128 => cidr.push((addr, len, identity, expires_ns)),
                _ => return Err(TableError::PrefixLength { addr, len }),
            }
        }
        let full = |which: &'static str, name: &'static str| {
            move |e: std::io::Error| match e.raw_os_error() {
                Some(libc::E2BIG) | Some(libc::ENOSPC) => TableError::BindingsFull(which),
                _ => io_err(name)(e),
            }
        };
        batch::update_all(self.bind_v4.map(), &v4, BPF_ANY)
            .map_err(full("IPv4 exact", names::BIND_V4))?;
        batch::update_all(self.bind_v6.map(), &v6, BPF_ANY)
            .map_err(full("IPv6 exact", names::BIND_V6))?;
        for (addr, len, identity, exp) in &cidr {
            self.bind(*addr, *len, *identity, *exp)?;
        }
        Ok(entries.len())
    }
}

/// Against the kernel: the maps of the real object (created, no program loaded). Each test
/// prints the batch path's time next to the per-key path's, measured in the same run (no
/// timed assertions: `cargo test -p tollgate --lib bulk -- --nocapture` shows the figures).
/// Keys `0..upto` of a per-CPU array, each summed over its CPUs by `sum`, indexed by key.
pub(super) fn sum_per_cpu<V: aya::Pod, S>(
    map: &aya::maps::MapData,
    upto: u32,
    name: &'static str,
    sum: impl Fn(&[V]) -> S,
) -> Result<Vec<S>> {
    let mut out = Vec::with_capacity(upto as usize);
    batch::for_each_per_cpu::<V>(map, upto, |key, slots| {
        // An array hands out every index in order.
        if key as usize == out.len() {
            out.push(sum(slots));
        }
    })
    .map_err(io_err(name))?;
    if out.len() < upto as usize {
        return Err(io_err(name)(std::io::Error::other(format!(
            "batch read returned {} of {upto} slots",
            out.len()
        ))));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        time::Instant,
    };

    use aya::{EbpfLoader, maps::PerCpuValues};
    use tollgate_common::policy::{ID_QUARANTINED, ID_THROTTLED, MAX_EXACT_BINDINGS};

    use super::*;

    fn tables() -> (aya::Ebpf, KernelTables) {
        let mut ebpf = EbpfLoader::new()
            .load(crate::object::bytes())
            .expect("creating the object's maps (needs root)");
        let t = KernelTables::from_ebpf(&mut ebpf).expect("policy maps");
        (ebpf, t)
    }

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i))
    }

    fn ms(t: Instant) -> f64 {
        t.elapsed().as_secs_f64() * 1e3
    }

    #[test]
    fn bind_many_writes_what_one_by_one_writes_and_refuses_when_full() {
        let (_e, mut t) = tables();
        let n = 60_000u32;
        let batch: Vec<NewBinding> = (0..n).map(|i| (v4(i), 32, 1 + i % 500, 0)).collect();
        let started = Instant::now();
        assert_eq!(t.bind_many(&batch).expect("bind_many"), n as usize);
        let batch_ms = ms(started);
        let started = Instant::now();
        for i in n..2 * n {
            t.bind(v4(i), 32, 1 + i % 500, 0).expect("bind");
        }
        let single_ms = ms(started);
        eprintln!(
            "{n} exact bindings: batch {batch_ms:.1} ms, one by one {single_ms:.1} ms ({:.1}x)",
            single_ms / batch_ms
        );
        // Both paths wrote the same thing.
        for i in [0, 1, n - 1, n, 2 * n - 1] {
            let b = t.exact_binding(v4(i)).expect("lookup").expect("bound");
            assert_eq!((b.identity, b.expires_ns), (1 + i % 500, 0), "{}", v4(i));
        }
        // IPv6 and CIDR go where the one-by-one path puts them; an update replaces.
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7));
        let cidr = IpAddr::V4(Ipv4Addr::new(198, 19, 250, 0));
        t.bind_many(&[(v6, 128, 9, 5), (cidr, 24, 10, 0), (v4(0), 32, 11, 7)])
            .expect("mixed");
        assert_eq!(t.exact_binding(v6).unwrap().unwrap().identity, 9);
        assert_eq!(
            t.lookup_binding(IpAddr::V4(Ipv4Addr::new(198, 19, 250, 9)))
                .unwrap()
                .map(|(l, b)| (l, b.identity)),
            Some((24, 10))
        );
        let b = t.exact_binding(v4(0)).unwrap().unwrap();
        assert_eq!((b.identity, b.expires_ns), (11, 7));
        // Bad input changes nothing.
        assert!(matches!(
            t.bind_many(&[(v4(900_000), 32, 1, 0), (v4(900_001), 32, 0, 0)]),
            Err(TableError::IdentityId(0, _))
        ));
        assert_eq!(t.exact_binding(v4(900_000)).unwrap(), None);
        // Past the map's size (IPv6: 198.18.0.0/15 holds only as many addresses as the
        // IPv4 map holds entries): refused as full, nothing evicted.
        let base = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0));
        let v6_at = |i: u32| IpAddr::V6(Ipv6Addr::from(base | u128::from(i)));
        let more: Vec<NewBinding> = (0..MAX_EXACT_BINDINGS + 10)
            .map(|i| (v6_at(i), 128, 2, 0))
            .collect();
        assert!(matches!(
            t.bind_many(&more),
            Err(TableError::BindingsFull("IPv6 exact"))
        ));
        assert_eq!(t.exact_binding(v6).unwrap().unwrap().identity, 9);
        assert_eq!(t.binding_counts()[1], MAX_EXACT_BINDINGS as usize);
    }

    #[test]
    fn counters_read_in_one_pass_match_the_per_identity_reads() {
        let (_e, mut t) = tables();
        let cpus = batch::possible_cpus().expect("cpus");
        let n = t.identity_slots().min(16_000);
        // Distinct values per identity and per CPU, so a wrong stride or offset shows.
        for id in 0..n {
            let slots: Vec<IdentityCounters> = (0..cpus as u64)
                .map(|c| {
                    let mut v = IdentityCounters::default();
                    v.passed.packets = u64::from(id) * 10 + c;
                    v.dropped.bytes = c + 1;
                    v.small = u64::from(id);
                    v
                })
                .collect();
            t.identity_counters
                .set(id, PerCpuValues::try_from(slots).unwrap(), 0)
                .expect("set");
        }
        let started = Instant::now();
        let all = t.identity_counters_upto(n).expect("batch read");
        let batch_ms = ms(started);
        let started = Instant::now();
        let one: Vec<IdentityCounters> = (0..n)
            .map(|id| t.identity_counters(id).expect("read"))
            .collect();
        let single_ms = ms(started);
        eprintln!(
            "{n} identities' counters on {cpus} CPUs: batch {batch_ms:.2} ms, one by one {single_ms:.2} ms ({:.1}x)",
            single_ms / batch_ms
        );
        assert_eq!(all.len(), n as usize);
        // The first slot that differs, not 16 000 of them.
        let differs = (0..n as usize).find(|&i| all[i] != one[i]);
        assert!(
            differs.is_none(),
            "slot {differs:?}: batch {:?}, one by one {:?}",
            differs.map(|i| all[i]),
            differs.map(|i| one[i])
        );
        let c = cpus as u64;
        assert_eq!(all[7].passed.packets, 70 * c + c * (c - 1) / 2);
        assert_eq!(all[7].small, 7 * c);
        // A prefix reads only that many.
        assert_eq!(t.identity_counters_upto(3).unwrap(), one[..3]);
        // Cleared slots read zero in both paths; the others keep theirs.
        t.clear_identities(&[5, 9]).expect("clear");
        let after = t.identity_counters_upto(10).unwrap();
        assert_eq!(after[5], IdentityCounters::default());
        assert_eq!(after[9], t.identity_counters(9).unwrap());
        assert_eq!(after[9], IdentityCounters::default());
        assert_eq!(after[8], one[8]);
    }

    #[test]
    fn identity_records_in_batches_keep_the_controllers_flags() {
        let (_e, mut t) = tables();
        let rec = |plan: u16| Identity {
            plan,
            class: 2,
            ..Identity::default()
        };
        t.set_identities(&[(1, rec(1)), (2, rec(2)), (3, rec(3))])
            .expect("write");
        t.update_identity_flags(2, ID_THROTTLED, 0, Some(77))
            .expect("throttle");
        t.buckets
            .set(
                3,
                Bucket {
                    pkt_tat: 5,
                    ..Bucket::default()
                },
                0,
            )
            .expect("bucket");
        let mut again = vec![(1, rec(4)), (2, rec(5)), (3, rec(6))];
        again[0].1.flags = ID_QUARANTINED;
        t.set_identities_keeping_controller_flags(&mut again)
            .expect("rewrite");
        assert_eq!(t.identity(1).unwrap().flags, ID_QUARANTINED);
        let two = t.identity(2).unwrap();
        assert_eq!(
            (two.plan, two.flags, two.throttle_q8),
            (5, ID_THROTTLED, 77)
        );
        assert_eq!(t.bucket(3).unwrap().pkt_tat, 5, "limiter state untouched");
        t.clear_identities(&[3]).unwrap();
        assert_eq!(t.identity(3).unwrap(), Identity::default());
        assert_eq!(t.bucket(3).unwrap(), Bucket::default());
        let cap = t.identity_slots();
        assert!(matches!(
            t.set_identities(&[(1, rec(9)), (cap, rec(9))]),
            Err(TableError::IdentityId(c, _)) if c == cap
        ));
        assert_eq!(
            t.identity(1).unwrap().plan,
            4,
            "a refused batch writes nothing"
        );
    }
}
