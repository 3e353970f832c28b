//! What the benchmark binaries (tests/bench_*.rs) share: where they leave their figures for
//! `cargo xtask bench` (which writes BENCHMARKS.md and the chart from them), the quick mode,
//! medians and spreads, and bulk map writes for tables of a million entries.
//!
//! Each bench prints its markdown section on stdout (what BENCHMARKS.md shows) and writes
//! `target/bench/<name>.json`: named figures the generator checks the targets against and
//! draws the chart from.

use std::{
    collections::BTreeMap,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::PathBuf,
};

use aya::Pod;
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// `TOLLGATE_BENCH_QUICK=1` (`cargo xtask bench --quick`): smaller sizes, fewer rounds.
pub fn quick() -> bool {
    std::env::var_os("TOLLGATE_BENCH_QUICK").is_some_and(|v| v == "1")
}

/// Where the figures go: the workspace's `target/bench`.
pub fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
}

/// Named figures of one bench, written as JSON when the bench ends.
#[derive(Default)]
pub struct Figures {
    values: BTreeMap<String, f64>,
}

impl Figures {
    pub fn set(&mut self, key: impl Into<String>, value: f64) {
        self.values.insert(key.into(), value);
    }

    /// Writes `target/bench/<bench>.json` (`{"figures": {name: value}}`).
    pub fn write(&self, bench: &str) {
        let dir = out_dir();
        std::fs::create_dir_all(&dir).expect("creating target/bench");
        let json = serde_json::json!({ "figures": self.values });
        let path = dir.join(format!("{bench}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&json).expect("json"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// The median of `xs` (the upper one of an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The interquartile range of `xs`: (25th, 75th percentile), nearest rank.
pub fn quartiles(xs: &[f64]) -> (f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 4], v[(3 * v.len()) / 4])
}

/// The `q`-quantile (0..=1) of `xs`, nearest rank.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Entries written per BPF_MAP_UPDATE_BATCH call.
const CHUNK: usize = 8192;

/// Writes every (key, value) into the map behind `fd` with BPF_MAP_UPDATE_BATCH, 8 192 per
/// call (a million bindings in ~120 syscalls instead of a million). Values are plain (not
/// per-CPU). aya 0.14 has no batch API; the agent's own batch writer (agent/src/tables/batch.rs)
/// is the one it uses, this one only fills the bench's tables.
pub fn update_batch<K: Pod, V: Pod>(fd: BorrowedFd<'_>, entries: &[(K, V)]) -> std::io::Result<()> {
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    let mut keys = vec![0u8; CHUNK * ks];
    let mut values = vec![0u8; CHUNK * vs];
    for chunk in entries.chunks(CHUNK) {
        for (i, (k, v)) in chunk.iter().enumerate() {
            // SAFETY: K and V are Pod; the buffers hold CHUNK of each; unaligned writes.
            unsafe {
                std::ptr::write_unaligned(keys.as_mut_ptr().add(i * ks) as *mut K, *k);
                std::ptr::write_unaligned(values.as_mut_ptr().add(i * vs) as *mut V, *v);
            }
        }
        // SAFETY: an all-zero bpf_attr is valid; the batch fields are set below.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the union's batch member.
        unsafe {
            let b = &mut attr.batch;
            b.keys = keys.as_ptr() as u64;
            b.values = values.as_ptr() as u64;
            b.count = chunk.len() as u32;
            b.map_fd = fd.as_raw_fd() as u32;
        }
        // SAFETY: the buffers outlive the call and hold `count` keys and values.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
                &mut attr as *mut bpf_attr,
                size_of::<bpf_attr>(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the count the kernel wrote back.
        let n = unsafe { attr.batch.count } as usize;
        if n != chunk.len() {
            return Err(std::io::Error::other(format!(
                "batch update wrote {n} of {}",
                chunk.len()
            )));
        }
    }
    Ok(())
}

/// The kernel memory a map is charged (`memlock` in /proc/self/fdinfo/<fd>), in bytes.
pub fn map_memlock(fd: BorrowedFd<'_>) -> Option<u64> {
    fdinfo_memlock(std::process::id(), fd.as_raw_fd())
}

/// `memlock` of fd `fd` of process `pid`, from its fdinfo (bpf maps only).
pub fn fdinfo_memlock(pid: u32, fd: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The sum of `memlock` over every bpf map fd process `pid` holds, and how many maps.
pub fn process_map_memlock(pid: u32) -> (u64, usize) {
    let mut total = (0, 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return total;
    };
    for e in dir.flatten() {
        let is_map =
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-map");
        let fd = e.file_name().to_string_lossy().parse::<i32>().ok();
        if let (true, Some(fd)) = (is_map, fd)
            && let Some(m) = fdinfo_memlock(pid, fd)
        {
            total.0 += m;
            total.1 += 1;
        }
    }
    total
}

/// A process's resident memory (VmRSS), in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}
