//! Batched map I/O with BPF_MAP_LOOKUP_BATCH and BPF_MAP_UPDATE_BATCH: a map of 131 072
//! entries in 16 syscalls instead of 262 144 (get-next-key and lookup per entry), and a
//! million bindings written in 123 calls instead of a million. aya 0.14 has no batch API;
//! these are the raw `bpf(2)` calls of the tables module. Hash maps and arrays (per-CPU ones
//! included) have batch operations since Linux 5.6 (tollgate needs 5.9 for bpf_link XDP);
//! LPM tries have none and are read and written key by key by the caller.
//!
//! Per-CPU maps: the kernel copies `nr_possible_cpus × round_up(value_size, 8)` bytes per
//! key (`bpf_map_value_size` in kernel/bpf/syscall.c), so [`for_each_per_cpu`] sizes its
//! buffers from `/sys/devices/system/cpu/possible` (aya's `nr_cpus`) and hands each key's
//! slots to the caller one chunk at a time: a scrape of a million identities never holds
//! more than one chunk of raw per-CPU values.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per call. A hash map's batch must fit a whole bucket, which is a
/// handful of entries; 8 192 is far above that and keeps the buffers under 1 MiB even for
/// per-CPU values on a few CPUs.
const CHUNK: usize = 8192;

/// One `bpf(2)` batch command on `attr` (whose batch member points at buffers the caller
/// keeps alive for the call, sized for `count` keys and values).
fn batch_call(cmd: bpf_cmd, attr: &mut bpf_attr) -> Option<io::Error> {
    crate::link_info::sys_bpf(cmd, attr).err()
}

/// How far a walk goes.
#[derive(Clone, Copy)]
enum Bound {
    /// The whole map, which never holds more than this (its max_entries): a walk past it
    /// means the map is misbehaving.
    Whole(u32),
    /// The first this many entries of an array (keys 0..n): the count asked for shrinks to
    /// what is left, which only arrays allow (a hash map's batch must fit a whole bucket).
    ArrayPrefix(u32),
}

/// Walks the map in batches of raw keys (`ks` bytes each) and values (`vs` bytes each),
/// calling `each(keys, values, n)` per batch.
fn walk(
    map: &MapData,
    ks: usize,
    vs: usize,
    bound: Bound,
    mut each: impl FnMut(&[u8], &[u8], usize),
) -> io::Result<()> {
    let mut keys = vec![0u8; CHUNK * ks];
    let mut values = vec![0u8; CHUNK * vs];
    // The batch cursor: a u32 for hash maps, a key for arrays (4 bytes, u32 indices).
    let mut cursor = [0u8; 16];
    let mut next = [0u8; 16];
    let fd = map.fd().as_fd().as_raw_fd();
    let mut first = true;
    let mut total = 0usize;
    loop {
        let ask = match bound {
            Bound::Whole(_) => CHUNK,
            Bound::ArrayPrefix(n) => CHUNK.min(n as usize - total),
        };
        if ask == 0 {
            return Ok(());
        }
        // SAFETY: an all-zero bpf_attr is valid; the batch fields are set below.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the union's batch member.
        unsafe {
            let b = &mut attr.batch;
            b.in_batch = if first { 0 } else { cursor.as_ptr() as u64 };
            b.out_batch = next.as_mut_ptr() as u64;
            b.keys = keys.as_mut_ptr() as u64;
            b.values = values.as_mut_ptr() as u64;
            b.count = ask as u32;
            b.map_fd = fd as u32;
        }
        let err = batch_call(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: reading back the count the kernel wrote (also on ENOENT: the last chunk).
        let n = (unsafe { attr.batch.count } as usize).min(ask);
        each(&keys, &values, n);
        total += n;
        match err {
            // ENOENT: no more entries (what was read with it is in).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
            None => {}
        }
        match bound {
            Bound::Whole(max) if total > max as usize => {
                return Err(io::Error::other(format!(
                    "batch read returned more than the map's {max} entries"
                )));
            }
            _ if n == 0 => return Err(io::Error::other("batch read returned nothing")),
            _ => {}
        }
        cursor = next;
        first = false;
    }
}

/// Reads the `i`th `T` of a raw buffer.
fn at<T: Pod>(buf: &[u8], i: usize) -> T {
    let size = size_of::<T>();
    assert!(buf.len() >= (i + 1) * size, "batch buffer too short");
    // SAFETY: T is Pod and the buffer holds at least i + 1 of them; unaligned read.
    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(i * size) as *const T) }
}

/// Every (key, value) of the map, in the kernel's order.
pub fn read_all<K: Pod, V: Pod>(map: &MapData, max: u32) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    walk(
        map,
        size_of::<K>(),
        size_of::<V>(),
        Bound::Whole(max),
        |ks, vs, n| {
            out.extend((0..n).map(|i| (at::<K>(ks, i), at::<V>(vs, i))));
        },
    )?;
    Ok(out)
}

/// How many entries the map holds: a batch walk of keys and values, counted and thrown
/// away chunk by chunk (a hash map has no entry count the kernel hands out, and a
/// get-next-key walk is one syscall per entry).
pub fn count<K: Pod, V: Pod>(map: &MapData, max: u32) -> io::Result<usize> {
    let mut n = 0;
    walk(
        map,
        size_of::<K>(),
        size_of::<V>(),
        Bound::Whole(max),
        |_, _, got| n += got,
    )?;
    Ok(n)
}

/// Values of keys `0..upto` of an array, indexed by key.
pub fn read_array_prefix<V: Pod>(map: &MapData, upto: u32) -> io::Result<Vec<V>> {
    let mut out = Vec::with_capacity(upto as usize);
    let bound = Bound::ArrayPrefix(upto);
    let mut bad = None;
    walk(map, size_of::<u32>(), size_of::<V>(), bound, |ks, vs, n| {
        for i in 0..n {
            let k = at::<u32>(ks, i);
            // An array hands out every index in order; anything else is not an array.
            if k as usize != out.len() {
                bad.get_or_insert(k);
            }
            out.push(at::<V>(vs, i));
        }
    })?;
    match bad {
        Some(k) => Err(io::Error::other(format!(
            "batch read returned index {k} out of order"
        ))),
        None => Ok(out),
    }
}

/// The per-CPU value stride of `V`: the kernel rounds each CPU's copy up to 8 bytes.
fn per_cpu_stride<V>() -> usize {
    size_of::<V>().div_ceil(8) * 8
}

/// The number of possible CPUs (what a per-CPU map holds a slot for).
pub fn possible_cpus() -> io::Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Keys `0..upto` of a per-CPU array with their per-CPU slots, one chunk of keys at a time:
/// `each(key, slots)` with one `V` per possible CPU. One call per 8 192 keys.
pub fn for_each_per_cpu<V: Pod>(
    map: &MapData,
    upto: u32,
    mut each: impl FnMut(u32, &[V]),
) -> io::Result<()> {
    let cpus = possible_cpus()?;
    let stride = per_cpu_stride::<V>();
    let mut slots: Vec<V> = Vec::with_capacity(cpus);
    let bound = Bound::ArrayPrefix(upto);
    walk(map, size_of::<u32>(), stride * cpus, bound, |ks, vs, n| {
        for i in 0..n {
            slots.clear();
            let value = &vs[i * stride * cpus..(i + 1) * stride * cpus];
            slots.extend((0..cpus).map(|c| at::<V>(&value[c * stride..], 0)));
            each(at::<u32>(ks, i), &slots);
        }
    })
}

/// Writes every (key, value) with BPF_MAP_UPDATE_BATCH (`elem_flags` as for a single
/// update: BPF_ANY, BPF_NOEXIST, BPF_EXIST), in chunks. On an error the entries before the
/// one that failed are in the map and none after; a full hash map stops with E2BIG (or
/// ENOSPC), as a single update does.
pub fn update_all<K: Pod, V: Pod>(
    map: &MapData,
    entries: &[(K, V)],
    elem_flags: u64,
) -> io::Result<()> {
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    let mut keys = Vec::with_capacity(CHUNK.min(entries.len()) * ks);
    let mut values = Vec::with_capacity(CHUNK.min(entries.len()) * vs);
    for chunk in entries.chunks(CHUNK) {
        keys.clear();
        values.clear();
        for (k, v) in chunk {
            keys.extend_from_slice(bytes_of(k));
            values.extend_from_slice(bytes_of(v));
        }
        write_chunk(map, &keys, &values, chunk.len(), elem_flags)?;
    }
    Ok(())
}

/// Writes the same per-CPU value on every CPU for every key (clearing counters: all zeros).
pub fn update_all_per_cpu<K: Pod, V: Pod>(
    map: &MapData,
    keys_in: &[K],
    value: &V,
    elem_flags: u64,
) -> io::Result<()> {
    let cpus = possible_cpus()?;
    let stride = per_cpu_stride::<V>();
    let mut one = vec![0u8; stride * cpus];
    for c in 0..cpus {
        one[c * stride..c * stride + size_of::<V>()].copy_from_slice(bytes_of(value));
    }
    let ks = size_of::<K>();
    let mut keys = Vec::with_capacity(CHUNK.min(keys_in.len()) * ks);
    let mut values = Vec::with_capacity(CHUNK.min(keys_in.len()) * one.len());
    for chunk in keys_in.chunks(CHUNK) {
        keys.clear();
        values.clear();
        for k in chunk {
            keys.extend_from_slice(bytes_of(k));
            values.extend_from_slice(&one);
        }
        write_chunk(map, &keys, &values, chunk.len(), elem_flags)?;
    }
    Ok(())
}

fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod (plain bytes, no padding that matters to the kernel: tollgate's
    // shared types have none, asserted in common).
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

/// One BPF_MAP_UPDATE_BATCH of `n` packed keys and values, retried where the kernel stopped
/// early without an error (it may write fewer than asked).
fn write_chunk(
    map: &MapData,
    keys: &[u8],
    values: &[u8],
    n: usize,
    elem_flags: u64,
) -> io::Result<()> {
    let (ks, vs) = (keys.len() / n.max(1), values.len() / n.max(1));
    let fd = map.fd().as_fd().as_raw_fd();
    let mut done = 0;
    // Bounded: each turn either writes at least one entry or returns.
    while done < n {
        // SAFETY: an all-zero bpf_attr is valid; the batch fields are set below.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the union's batch member; the kernel only
        // reads the key and value buffers of an update.
        unsafe {
            let b = &mut attr.batch;
            b.keys = keys[done * ks..].as_ptr() as u64;
            b.values = values[done * vs..].as_ptr() as u64;
            b.count = (n - done) as u32;
            b.map_fd = fd as u32;
            b.elem_flags = elem_flags;
        }
        let err = batch_call(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr);
        // SAFETY: the kernel writes back how many it processed, on success and on error.
        let wrote = (unsafe { attr.batch.count } as usize).min(n - done);
        done += wrote;
        if let Some(e) = err {
            return Err(e);
        }
        if wrote == 0 {
            return Err(io::Error::other("batch update wrote nothing"));
        }
    }
    Ok(())
}
