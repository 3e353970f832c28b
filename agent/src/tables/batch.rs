//! Whole-map reads with BPF_MAP_LOOKUP_BATCH: a map of 131 072 entries in 16 syscalls
//! instead of 262 144 (get-next-key and lookup per entry), so that the reconcile can look at
//! every binding every interval. aya 0.14 has no batch API; this is the one raw `bpf(2)` call
//! of the tables module. Hash maps and arrays have batch lookups since Linux 5.6 (tollgate
//! needs 5.9 for bpf_link XDP); LPM tries have none and are read key by key by the caller.

use std::{
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per call. A hash map's batch must fit a whole bucket, which is a
/// handful of entries; 8 192 is far above that and keeps the buffers under 200 KiB.
const CHUNK: usize = 8192;

/// Every (key, value) of the map, in the kernel's order. `max` bounds what is read: a map
/// never holds more than its max_entries, so a loop past it means the map is misbehaving.
pub fn read_all<K: Pod, V: Pod>(map: &MapData, max: u32) -> std::io::Result<Vec<(K, V)>> {
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    let mut keys = vec![0u8; CHUNK * ks];
    let mut values = vec![0u8; CHUNK * vs];
    // The batch cursor: a u32 for hash maps, a key for arrays (4 bytes, u32 indices).
    let mut cursor = [0u8; 16];
    let mut next = [0u8; 16];
    let mut out = Vec::new();
    let fd = map.fd().as_fd().as_raw_fd();
    let mut first = true;
    loop {
        // SAFETY: an all-zero bpf_attr is valid; the batch fields are set below.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the union's batch member.
        unsafe {
            let b = &mut attr.batch;
            b.in_batch = if first { 0 } else { cursor.as_ptr() as u64 };
            b.out_batch = next.as_mut_ptr() as u64;
            b.keys = keys.as_mut_ptr() as u64;
            b.values = values.as_mut_ptr() as u64;
            b.count = CHUNK as u32;
            b.map_fd = fd as u32;
        }
        // SAFETY: the buffers outlive the call and hold `count` keys and values; the kernel
        // writes at most that many, and the cursor buffers are larger than any cursor.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &mut attr as *mut bpf_attr,
                size_of::<bpf_attr>(),
            )
        };
        let err = (r < 0).then(std::io::Error::last_os_error);
        // SAFETY: reading back the count the kernel wrote (also on ENOENT: the last chunk).
        let n = unsafe { attr.batch.count } as usize;
        for i in 0..n.min(CHUNK) {
            // SAFETY: K and V are Pod, the buffers hold n of each; unaligned reads.
            let k = unsafe { std::ptr::read_unaligned(keys.as_ptr().add(i * ks) as *const K) };
            let v = unsafe { std::ptr::read_unaligned(values.as_ptr().add(i * vs) as *const V) };
            out.push((k, v));
        }
        match err {
            // ENOENT: no more entries (what was read with it is in).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
            None => {}
        }
        if out.len() > max as usize {
            return Err(std::io::Error::other(format!(
                "batch read returned more than the map's {max} entries"
            )));
        }
        cursor = next;
        first = false;
    }
}
