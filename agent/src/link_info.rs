//! Which device a pinned XDP link is on: BPF_OBJ_GET on the pin, then BPF_OBJ_GET_INFO_BY_FD.
//! A link pin is named for an interface (`links/xdp-<name>`), but the kernel's link holds the
//! device, not the name: a renamed device takes its link along, and a new device given the
//! old name has none. So before a pin is reused for a name, its device is compared with the
//! one that has the name now (`pins`). aya 0.14's `LinkInfo` gives a link's type and ids but
//! not an XDP link's device, hence these two raw `bpf(2)` calls (like `tables::batch`).

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

/// What the kernel says of an XDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpLinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// The device it is attached to; 0 once it is attached to none (its device was deleted,
    /// or it was detached).
    pub ifindex: u32,
}

/// The link pinned at `path`, which must be an XDP link.
pub fn pinned_xdp_link(path: &Path) -> io::Result<XdpLinkInfo> {
    let fd = obj_get(path)?;
    xdp_info(&raw_info(&fd)?)
}

/// What the kernel says of a TCX link (the egress program's): the same fields as an XDP
/// link's, and which hook it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcxLinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// 0 once it is attached to no device.
    pub ifindex: u32,
    /// `bpf_attach_type`: `BPF_TCX_EGRESS` (47) for tollgate's.
    pub attach_type: u32,
}

/// The link pinned at `path`, which must be a TCX link.
pub fn pinned_tcx_link(path: &Path) -> io::Result<TcxLinkInfo> {
    let fd = obj_get(path)?;
    tcx_info(&raw_info(&fd)?)
}

/// The TCX fields of `info`; anything but a TCX link is refused, naming its type.
fn tcx_info(info: &bpf_link_info) -> io::Result<TcxLinkInfo> {
    let tcx = bpf_link_type::BPF_LINK_TYPE_TCX as u32;
    if info.type_ != tcx {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a link of type {}, not TCX (type {tcx}): not one tollgate made",
                info.type_
            ),
        ));
    }
    // SAFETY: a TCX link's info fills the union's tcx member.
    let t = unsafe { info.__bindgen_anon_1.tcx };
    Ok(TcxLinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        ifindex: t.ifindex,
        attach_type: t.attach_type,
    })
}

/// An interface's index in this network namespace; `None`: no such interface.
pub fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// The name interface `ifindex` has now; `None`: no such interface.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE long, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    name.to_str().ok().map(str::to_owned)
}

/// One raw `bpf(2)` call (aya 0.14 exposes neither link info by pin nor batch map
/// operations): the one place the agent makes it.
pub(crate) fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr for `cmd` (set by the callers), and whatever it
    // points at outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the pin path"))?;
    // SAFETY: an all-zero bpf_attr is valid; BPF_OBJ_GET reads the pathname member.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    let fd = sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor, now owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn raw_info(fd: &OwnedFd) -> io::Result<bpf_link_info> {
    // SAFETY: all-zero bpf_link_info and bpf_attr are valid (plain integers and unions of them).
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info = &mut info as *mut bpf_link_info as u64;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The XDP fields of `info`; anything but an XDP link is refused, naming its type.
fn xdp_info(info: &bpf_link_info) -> io::Result<XdpLinkInfo> {
    let xdp = bpf_link_type::BPF_LINK_TYPE_XDP as u32;
    if info.type_ != xdp {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a link of type {}, not XDP (type {xdp}): not one tollgate made",
                info.type_
            ),
        ));
    }
    Ok(XdpLinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        // SAFETY: an XDP link's info fills the union's xdp member.
        ifindex: unsafe { info.__bindgen_anon_1.xdp.ifindex },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(type_: u32, ifindex: u32) -> bpf_link_info {
        // SAFETY: all-zero is a valid bpf_link_info.
        let mut i: bpf_link_info = unsafe { std::mem::zeroed() };
        i.type_ = type_;
        i.id = 3;
        i.prog_id = 4;
        i.__bindgen_anon_1.xdp.ifindex = ifindex;
        i
    }

    #[test]
    fn the_xdp_ifindex_sits_where_the_kernel_writes_it() {
        // include/uapi/linux/bpf.h: type, id, prog_id (u32 each), then the union, 8-aligned
        // (its other members hold u64s), whose xdp member is { __u32 ifindex; }.
        assert_eq!(std::mem::offset_of!(bpf_link_info, __bindgen_anon_1), 16);
        assert_eq!(bpf_link_type::BPF_LINK_TYPE_XDP as u32, 6);
        let i = info(6, 9);
        // SAFETY: reading back plain integers from the struct's bytes.
        let bytes: [u8; 20] = unsafe { std::ptr::read((&i as *const bpf_link_info).cast()) };
        assert_eq!(u32::from_ne_bytes(bytes[16..20].try_into().unwrap()), 9);
    }

    #[test]
    fn xdp_links_give_their_device_and_others_are_refused() {
        assert_eq!(
            xdp_info(&info(6, 9)).unwrap(),
            XdpLinkInfo {
                id: 3,
                prog_id: 4,
                ifindex: 9
            }
        );
        assert_eq!(xdp_info(&info(6, 0)).unwrap().ifindex, 0);
        let e = xdp_info(&info(2, 9)).unwrap_err().to_string();
        assert!(e.contains("type 2, not XDP (type 6)"), "{e}");
    }

    #[test]
    fn tcx_links_give_their_device_and_hook_and_others_are_refused() {
        // include/uapi/linux/bpf.h: the tcx member is { __u32 ifindex; __u32 attach_type; }.
        assert_eq!(bpf_link_type::BPF_LINK_TYPE_TCX as u32, 11);
        let mut i = info(11, 0);
        i.__bindgen_anon_1.tcx.ifindex = 9;
        i.__bindgen_anon_1.tcx.attach_type = 47;
        let t = tcx_info(&i).unwrap();
        assert_eq!((t.id, t.prog_id, t.ifindex, t.attach_type), (3, 4, 9, 47));
        let e = tcx_info(&info(6, 9)).unwrap_err().to_string();
        assert!(e.contains("type 6, not TCX (type 11)"), "{e}");
    }

    #[test]
    fn loopback_has_index_1_both_ways_and_missing_names_have_none() {
        // Every network namespace has `lo`, always index 1 (LOOPBACK_IFINDEX).
        assert_eq!(ifindex("lo"), Some(1));
        assert_eq!(ifname(1).as_deref(), Some("lo"));
        assert_eq!(ifindex("tg-no-such-dev"), None);
        assert_eq!(ifindex("with\0nul"), None);
    }

    #[test]
    fn a_missing_pin_is_an_error_not_a_link() {
        let e = pinned_xdp_link(Path::new("/sys/fs/bpf/tollgate-no-such-pin")).unwrap_err();
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EPERM | libc::ENOSYS)
            ),
            "{e}"
        );
    }
}
