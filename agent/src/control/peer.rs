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
    // getgrnam_r, not getgrnam: getgrnam's static buffer is shared by every thread of the
    // process (the unit tests check configurations on many threads at once, and one lookup
    // overwrote another's answer). Retried with a larger buffer on ERANGE, up to 1 MiB.
    let mut len = 16 * 1024;
    while len <= 1024 * 1024 {
        let mut buf = vec![0 as libc::c_char; len];
        // SAFETY: `libc::group` is plain data (integers and pointers): all zeroes is a value.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `grp` and `buf` outlive the call, which writes the entry into them and sets
        // `found` to `&mut grp` or null; only `grp.gr_gid` is read afterwards.
        let rc = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE {
            len *= 4;
            continue;
        }
        return (rc == 0 && !found.is_null()).then_some(grp.gr_gid);
    }
    None
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
