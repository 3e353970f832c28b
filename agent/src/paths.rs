//! Every filesystem path tollgate uses, in one place.

/// Where maps and links are pinned (a directory on a bpffs).
pub const PIN_DIR: &str = "/sys/fs/bpf/tollgate";
/// The bpffs mount point the pin directory lives under.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The agent's control socket.
pub const CONTROL_SOCKET: &str = "/run/tollgate/control.sock";
/// Where state.json and audit.log live.
pub const STATE_DIR: &str = "/var/lib/tollgate";
