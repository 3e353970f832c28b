//! Many entries at once: identity counters read in one pass (a scrape, a controller tick,
//! `top` cost a few syscalls, not one per identity), and bindings, identity records and
//! cleared slots written with batch updates (a million bindings from cold in ~123 calls).
//! Same rules as the one-entry calls in `tables`: a full binding map refuses, nothing is
//! evicted; identity ids are checked before anything is written.

use std::net::IpAddr;

use aya::maps::{IterableMap as _, MapData, MapError};
use tollgate_common::{
    map_names as names,
    policy::{Binding, Bucket, Identity, IdentityCounters},
};

use super::{KernelTables, Result, TableError, batch};

/// BPF_ANY: create or replace, as the one-entry writes do.
const BPF_ANY: u64 = 0;

/// One binding to write: address, prefix length, identity slot, expiry (CLOCK_BOOTTIME ns;
/// 0: never).
pub type NewBinding = (IpAddr, u8, u32, u64);

fn io_err(name: &'static str) -> impl Fn(std::io::Error) -> TableError {
    move |e| TableError::Map {
        name,
        source: MapError::IoError(e),
    }
}

/// The map's max_entries (the bound on a walk; the size the loader gave it).
fn capacity(map: &MapData, name: &'static str) -> Result<u32> {
    map.info()
        .map(|i| i.max_entries())
        .map_err(|source| TableError::Map { name, source })
}

impl KernelTables {
    /// Slots an identity array holds (the size the map was created with).
    pub fn identity_capacity(&self) -> Result<u32> {
        capacity(self.identities.map(), names::IDENTITIES)
    }

    /// Counters of identities `0..upto` (0: anonymous), summed over CPUs, indexed by slot:
    /// a batch read of that part of the per-CPU array (one call per 8 192 slots), never one
    /// call per identity. Slots are given out from 1 upward, so `upto` (the highest slot in
    /// use + 1) keeps a node with few identities from reading a million-slot array.
    pub fn identity_counters_upto(&self, upto: u32) -> Result<Vec<IdentityCounters>> {
        let map = self.identity_counters.map();
        let upto = upto.min(capacity(map, names::IDENTITY_COUNTERS)?);
        let mut out = Vec::with_capacity(upto as usize);
        batch::for_each_per_cpu::<IdentityCounters>(map, upto, |id, slots| {
            // An array hands out every index in order.
            if id as usize == out.len() {
                out.push(IdentityCounters::sum(slots));
            }
        })
        .map_err(io_err(names::IDENTITY_COUNTERS))?;
        if out.len() < upto as usize {
            return Err(io_err(names::IDENTITY_COUNTERS)(std::io::Error::other(
                format!("batch read returned {} of {upto} slots", out.len()),
            )));
        }
        Ok(out)
    }

    /// Writes identity records with batch updates; their limiter state is left as it is
    /// (as [`KernelTables::set_identity`]). Every id is checked before anything is written.
    pub fn set_identities(&mut self, records: &[(u32, Identity)]) -> Result<()> {
        let cap = self.identity_capacity()?;
        if let Some((id, _)) = records.iter().find(|(id, _)| *id == 0 || *id >= cap) {
            return Err(TableError::IdentityId(*id));
        }
        batch::update_all(self.identities.map(), records, BPF_ANY)
            .map_err(io_err(names::IDENTITIES))
    }

    /// Clears slots (record, limiter state, counters) as [`KernelTables::clear_identity`]
    /// does, three batch writes for all of them.
    pub fn clear_identities(&mut self, ids: &[u32]) -> Result<()> {
        let cap = self.identity_capacity()?;
        if let Some(id) = ids.iter().find(|id| **id == 0 || **id >= cap) {
            return Err(TableError::IdentityId(*id));
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
        .map_err(io_err(names::IDENTITY_COUNTERS))
    }

    /// Writes many bindings: the exact ones (/32, /128) with batch updates, CIDR ones key by
    /// key (LPM tries have no batch operation). Every entry is checked first; a full map
    /// stops the write with [`TableError::BindingsFull`] (the entries before it are in,
    /// none is evicted). Returns how many were written.
    pub fn bind_many(&mut self, entries: &[NewBinding]) -> Result<usize> {
        let cap = self.identity_capacity()?;
        let mut v4: Vec<([u8; 4], Binding)> = Vec::new();
        let mut v6: Vec<([u8; 16], Binding)> = Vec::new();
        let mut cidr: Vec<NewBinding> = Vec::new();
        for &(addr, len, identity, expires_ns) in entries {
            if identity == 0 || identity >= cap {
                return Err(TableError::IdentityId(identity));
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
