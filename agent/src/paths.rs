//! Every filesystem path tollgate uses, in one place.

/// Where maps and links are pinned (a directory on a bpffs).
pub const PIN_DIR: &str = "/sys/fs/bpf/tollgate";
/// The bpffs mount point the pin directory lives under.
pub const BPFFS: &str = "/sys/fs/bpf";
/// File name of the pinned per-reason counter map inside the pin directory.
pub const PIN_REASON_COUNTERS: &str = "reason_counters";
