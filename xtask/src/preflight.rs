//! What the tests need from the machine before anything runs: root, CAP_BPF and a bpffs.
//! Each missing piece is refused with what to do about it.

use anyhow::bail;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const BPFFS: &str = "/sys/fs/bpf";
/// statfs magic of a bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The effective capability set of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn is_bpffs(path: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: `c` is a valid C string and `buf` a properly sized, writable statfs.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    rc == 0 && buf.f_type as i64 == BPF_FS_MAGIC
}

/// Checks root, capabilities and the bpffs; mounts the bpffs when it is missing and we may.
pub fn check() -> anyhow::Result<()> {
    if !crate::cmd::is_root() {
        bail!(
            "the tests load XDP programs, pin maps and build network namespaces, which needs \
             root: run `sudo -E cargo xtask test` (or as root)"
        );
    }
    let caps = effective_caps();
    for (cap, name) in [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ] {
        if caps & (1 << cap) == 0 {
            bail!(
                "running as root but without {name} (effective set {caps:#x}): a container or \
                 a capability bounding set took it away; the tests need it"
            );
        }
    }
    if !is_bpffs(BPFFS) {
        eprintln!("[test] no bpffs at {BPFFS}: mounting one");
        crate::cmd::run(crate::cmd::command("mount").args(["-t", "bpf", "bpf", BPFFS]))
            .map_err(|e| anyhow::anyhow!("no bpffs at {BPFFS} and mounting one failed: {e:#}"))?;
        if !is_bpffs(BPFFS) {
            bail!("{BPFFS} is still not a bpffs after mounting one");
        }
    }
    Ok(())
}
