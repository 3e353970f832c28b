//! Who is on the other end of the control socket, and whether they may be served.

use crate::audit::Actor;

/// Peer credentials from SO_PEERCRED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Peer {
    pub fn actor(&self) -> Actor {
        Actor {
            via: "control",
            uid: Some(self.uid),
            gid: Some(self.gid),
            pid: self.pid,
        }
    }
}

/// The gid of `group`, if it exists.
pub fn group_gid(group: &str) -> Option<u32> {
    let c = std::ffi::CString::new(group).ok()?;
    // SAFETY: getgrnam returns a pointer into static storage or null; we copy the gid out
    // before any other call could overwrite it.
    unsafe {
        let g = libc::getgrnam(c.as_ptr());
        if g.is_null() { None } else { Some((*g).gr_gid) }
    }
}

/// Supplementary groups of a process, from /proc (SO_PEERCRED carries only the primary gid).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Root is served; so is any member of `group` (primary or supplementary). Everyone else
/// gets the reason.
pub fn authorize(peer: &Peer, group: &str) -> Result<(), String> {
    if peer.uid == 0 {
        return Ok(());
    }
    if let Some(gid) = group_gid(group)
        && (peer.gid == gid
            || peer
                .pid
                .is_some_and(|p| supplementary_groups(p).contains(&gid)))
    {
        return Ok(());
    }
    Err(format!(
        "uid {} is neither root nor in group {group}: the control socket is refused",
        peer.uid
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_served_strangers_are_not() {
        let root = Peer {
            uid: 0,
            gid: 0,
            pid: None,
        };
        assert!(authorize(&root, "tollgate-no-such-group").is_ok());
        let nobody = Peer {
            uid: 65534,
            gid: 65534,
            pid: None,
        };
        let e = authorize(&nobody, "tollgate-no-such-group").unwrap_err();
        assert!(
            e.contains("65534") && e.contains("tollgate-no-such-group"),
            "{e}"
        );
    }

    #[test]
    fn group_members_are_served() {
        // gid 0 is group "root" on every Debian machine.
        let member = Peer {
            uid: 1234,
            gid: 0,
            pid: None,
        };
        assert!(authorize(&member, "root").is_ok());
    }
}
