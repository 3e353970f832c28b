//! Pinned state: every map and each interface's XDP link (and, on Ethernet devices, its TC
//! egress link: what the node sends back) live under the pin directory, so enforcement
//! outlives the agent. A starting agent adopts what it finds there (same maps,
//! same budgets, the program swapped atomically on the existing link) or refuses pins made by
//! an incompatible build, naming what differs; it never silently resets them. A link pin is
//! named for an interface but its link is on a device: it is reused for a name only while that
//! device still has the name (`link_info`), and follows a renamed device to its new name.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{
        LinkOrder, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use tollgate_common::{LAYOUT_VERSION, map_names, program_names};

use tracing::warn;

use crate::{
    link_info,
    loader::{AttachMode, KernelLog},
    object,
    sizes::Sizes,
    tables::KernelTables,
};

mod resize;
pub use resize::{Resize, staging_dir};

/// Maps live here, one file per map name.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

/// Each interface's XDP link.
pub fn link_path(pin_dir: &Path, iface: &str) -> PathBuf {
    Hook::Xdp.path(pin_dir, iface)
}

/// Each Ethernet interface's TC egress link (TCX). Layer-3 tunnel devices have none: what
/// the node sends back leaves through the Ethernet device under them.
pub fn egress_link_path(pin_dir: &Path, iface: &str) -> PathBuf {
    Hook::Egress.path(pin_dir, iface)
}

/// Where a link is: the XDP hook (the enforcing program) or TC egress (the counting one).
/// Both kinds of pin follow the same rules (adopted while on the device of their name,
/// moved with a renamed device, removed when dead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Egress,
}

impl Hook {
    fn prefix(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp-",
            Hook::Egress => "tc-egress-",
        }
    }

    fn path(self, pin_dir: &Path, iface: &str) -> PathBuf {
        pin_dir
            .join("links")
            .join(format!("{}{iface}", self.prefix()))
    }

    /// The device the link pinned at `path` is on (0: none).
    fn ifindex(self, path: &Path) -> std::io::Result<u32> {
        match self {
            Hook::Xdp => link_info::pinned_xdp_link(path).map(|l| l.ifindex),
            Hook::Egress => link_info::pinned_tcx_link(path).map(|l| l.ifindex),
        }
    }
}

/// The TC egress program is attached as a TCX link, which only Linux 6.6+ has: the only
/// kind of TC attachment that is a bpf_link, so the only one that can be pinned and have a
/// program swapped in without a moment unattached.
fn require_tcx() -> Result<(), String> {
    use aya::util::KernelVersion;
    match KernelVersion::current() {
        Ok(v) if v < KernelVersion::new(6, 6, 0) => Err(format!(
            "the TC egress program needs TCX links (Linux 6.6 or later); this kernel is {v}"
        )),
        _ => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "the pins in {dir} were made by an incompatible build: {detail}. Enforcement from the \
         old pins is still running. To replace it run `tollgate uninstall` (detaches the \
         program and drops its kernel state; bindings and quarantines come back from the state \
         directory, budgets start full), or run the build that made the pins"
    )]
    Incompatible { dir: String, detail: String },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("parsing the embedded object: {0}")]
    Object(String),
    #[error("loading the program with the pinned maps in {dir}: {message}")]
    Load { dir: String, message: String },
    #[error("attaching to {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("{0}")]
    Tables(#[from] crate::tables::TableError),
    #[error(
        "changing the table sizes ([limits]): {detail}. Nothing was changed: the pinned maps \
         and the running program are as they were"
    )]
    Resize { detail: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> PinError {
    PinError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Shape of a map: (type, key size, value size, max entries, flags).
type Shape = (u32, u32, u32, u32, u32);

fn object_shapes() -> Result<BTreeMap<String, Shape>, PinError> {
    let obj =
        aya_obj::Object::parse(object::bytes()).map_err(|e| PinError::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .filter(|(name, _)| map_names::ALL.contains(&name.as_str()))
        .map(|(name, m)| {
            (
                name.clone(),
                (
                    m.map_type(),
                    m.key_size(),
                    m.value_size(),
                    m.max_entries(),
                    m.map_flags(),
                ),
            )
        })
        .collect())
}

/// What a start finds pinned.
#[derive(Debug, Default)]
pub struct Found {
    /// Maps pinned by an earlier run, of this build's layout.
    pub adopted: bool,
    /// Pinned maps whose size is not the configured one (`[limits]` changed).
    pub resizes: Vec<Resize>,
}

/// Checks every pinned map against this build's definition and the configured `sizes`, and
/// the layout version. A map sized by `[limits]` may differ in size only: that is a
/// [`Resize`]. `adopted: false`: nothing is pinned yet.
pub fn check_compatible(pin_dir: &Path, sizes: &Sizes) -> Result<Found, PinError> {
    let dir = maps_dir(pin_dir);
    if !dir.exists() {
        return Ok(Found::default());
    }
    let mut resizes = Vec::new();
    let incompatible = |detail: String| PinError::Incompatible {
        dir: pin_dir.display().to_string(),
        detail,
    };
    let shapes = object_shapes()?;
    let mut found = 0;
    for (name, want) in &shapes {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        found += 1;
        let data = MapData::from_pin(&path).map_err(|e| io(&path, e))?;
        let info = data.info().map_err(|e| io(&path, e))?;
        let map_type = info.map_type().map_err(|e| io(&path, e))?;
        let got: Shape = (
            map_type as u32,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        // The kernel may add flags of its own to a map; type and sizes must match exactly,
        // except the entries of a map `[limits]` sizes.
        let want_entries = sizes.of_map(name).unwrap_or(want.3);
        if (got.0, got.1, got.2) == (want.0, want.1, want.2)
            && got.3 != want_entries
            && sizes.of_map(name).is_some()
        {
            resizes.push(Resize {
                map: name.clone(),
                from: got.3,
                to: want_entries,
            });
            continue;
        }
        if (got.0, got.1, got.2, got.3) != (want.0, want.1, want.2, want_entries) {
            return Err(incompatible(format!(
                "map {name} is (type {}, key {} B, value {} B, {} entries), this build needs \
                 (type {}, key {} B, value {} B, {} entries)",
                got.0, got.1, got.2, got.3, want.0, want.1, want.2, want_entries
            )));
        }
    }
    if found == 0 {
        return Ok(Found::default());
    }
    let layout_path = dir.join(map_names::LAYOUT);
    let version = MapData::from_pin(&layout_path)
        .ok()
        .and_then(|d| Array::<MapData, u32>::try_from(aya::maps::Map::Array(d)).ok())
        .and_then(|a| a.get(&0, 0).ok());
    match version {
        Some(v) if v == LAYOUT_VERSION => Ok(Found {
            adopted: true,
            resizes,
        }),
        Some(v) => Err(incompatible(format!(
            "pin layout version {v}, this build uses version {LAYOUT_VERSION}"
        ))),
        None => Err(incompatible(format!(
            "no readable layout marker ({})",
            layout_path.display()
        ))),
    }
}

/// The object loaded over the pinned maps (creating and pinning any that are missing), with
/// the enforcing program loaded and the layout marker written.
pub struct Pinned {
    pub ebpf: Ebpf,
    pub tables: KernelTables,
    /// Sampled drop events from the kernel (read by the daemon, logged rate-limited).
    pub drop_events: Option<aya::maps::RingBuf<MapData>>,
    /// Whether maps were adopted (true) or created (false).
    pub adopted: bool,
    /// The program's log level (`[node] kernel_log`), fixed when it was loaded.
    pub kernel_log: KernelLog,
    pin_dir: PathBuf,
    /// The running agent's claim on the pin directory (see [`Pinned::claim`]).
    claim: Option<std::fs::File>,
    /// Our handle on each interface's link. Dropping it only closes a file descriptor (the
    /// pin keeps the link); holding it until a detach means removing the pin really ends the
    /// link instead of leaving it alive through a forgotten descriptor.
    links: BTreeMap<String, Held>,
    /// The same for each interface's TC egress link.
    egress_links: BTreeMap<String, Held>,
    /// Per interface with an egress link: whether it was adopted (the program swapped into
    /// a pinned link) rather than made.
    egress_adopted: BTreeMap<String, bool>,
    /// A table size change in progress, finished by [`Pinned::finish_migration`].
    migration: Option<resize::Migration>,
}

/// A link handle: one we pinned, or one we adopted from a pin.
enum Held {
    Pinned(#[expect(dead_code, reason = "held for its file descriptor")] PinnedLink),
    Adopted(#[expect(dead_code, reason = "held for its file descriptor")] XdpLink),
    AdoptedEgress(
        #[expect(dead_code, reason = "held for its file descriptor")] SchedClassifierLink,
    ),
}

impl Pinned {
    /// Loads this build's program over the pins in `pin_dir`, logging at `kernel_log`. On
    /// adopted pins the program is loaded afresh too (and swapped onto the links by
    /// [`Pinned::attach`]), so the level applies on every start; its log buffer is never pinned.
    pub fn open(pin_dir: &Path, kernel_log: KernelLog, sizes: &Sizes) -> Result<Pinned, PinError> {
        let Found { adopted, resizes } = check_compatible(pin_dir, sizes)?;
        let dir = maps_dir(pin_dir);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        std::fs::create_dir_all(pin_dir.join("links")).map_err(|e| io(pin_dir, e))?;
        // Left by an agent that died during a size change: its maps live on only through
        // the program on the links, which this start replaces; the old pins are whole.
        let staging = staging_dir(pin_dir);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
        }
        if !resizes.is_empty() {
            std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
        }
        let paths: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|n| {
                let resized = resizes.iter().any(|r| r.map == *n);
                (*n, if resized { &staging } else { &dir }.join(n))
            })
            .collect();
        let mut loader = EbpfLoader::new();
        sizes.configure(&mut loader);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let load_err = |message: String| PinError::Load {
            dir: pin_dir.display().to_string(),
            message,
        };
        crate::loader::configure_kernel_log(&mut loader, kernel_log);
        let mut ebpf = loader
            .load(object::bytes())
            .map_err(|e| load_err(format!("{e:#}")))?;
        // The new maps exist (pinned in the staging directory): fill them before the new
        // program is attached anywhere. A refusal leaves the old pins as they were.
        let migration = if resizes.is_empty() {
            None
        } else {
            match resize::Migration::prepare(pin_dir, resizes) {
                Ok(m) => Some(m),
                Err(e) => {
                    drop(ebpf);
                    let _ = std::fs::remove_dir_all(&staging);
                    return Err(e);
                }
            }
        };
        // Both enforcing entries: the layer-3 one is attached to tunnel devices whose
        // packets start at the IP header (`tunnels`).
        for name in [program_names::XDP, program_names::XDP_L3] {
            crate::loader::xdp_program(&mut ebpf, name)
                .map_err(|e| load_err(e.to_string()))?
                .load()
                .map_err(|e| load_err(format!("verifier ({name}): {e}")))?;
        }
        // What the node sends back, counted on every device an enforcing program is on (the
        // layer-3 one beside `tollgate_l3` on tunnel devices).
        for name in [program_names::EGRESS, program_names::EGRESS_L3] {
            crate::loader::tc_program(&mut ebpf, name)
                .map_err(|e| load_err(e.to_string()))?
                .load()
                .map_err(|e| load_err(format!("verifier ({name}): {e}")))?;
        }
        crate::flow_programs::install(&mut ebpf).map_err(|e| load_err(format!("{e:#}")))?;
        crate::loader::spawn_kernel_log(&mut ebpf, kernel_log)
            .map_err(|e| load_err(e.to_string()))?;
        {
            let map = ebpf
                .map_mut(map_names::LAYOUT)
                .ok_or_else(|| load_err("no LAYOUT map in the object".into()))?;
            let mut layout: Array<&mut MapData, u32> =
                Array::try_from(map).map_err(|e| load_err(e.to_string()))?;
            layout
                .set(0, LAYOUT_VERSION, 0)
                .map_err(|e| load_err(e.to_string()))?;
        }
        let tables = KernelTables::from_ebpf(&mut ebpf)?;
        let drop_events = ebpf
            .take_map(map_names::DROP_EVENTS)
            .and_then(|m| aya::maps::RingBuf::try_from(m).ok());
        Ok(Pinned {
            ebpf,
            tables,
            drop_events,
            adopted,
            kernel_log,
            pin_dir: pin_dir.to_owned(),
            claim: None,
            links: BTreeMap::new(),
            egress_links: BTreeMap::new(),
            egress_adopted: BTreeMap::new(),
            migration,
        })
    }

    /// The table size change this start is making, if any.
    pub fn migrating(&self) -> Option<&[Resize]> {
        self.migration.as_ref().map(|m| m.resizes())
    }

    /// Ends a size change once every interface that had a pinned link has the new program:
    /// the counters are carried over and the new maps' pins replace the old ones. Returns
    /// what was resized (empty when nothing was).
    pub fn finish_migration(&mut self) -> Result<Vec<Resize>, PinError> {
        match self.migration.take() {
            Some(m) => m.finish(),
            None => Ok(Vec::new()),
        }
    }

    /// Marks the pin directory as served by this process, so that `tollgate uninstall` on it
    /// finds this agent whatever socket it was told about: a shared `flock` on the directory,
    /// held until the process ends (the kernel drops it on any death, `kill -9` included, so
    /// it can never go stale), and [`AGENT_RECORD`] naming this pid and `control_socket`. A
    /// record left by a dead agent says nothing while nobody holds the lock.
    pub fn claim(&mut self, control_socket: &Path) -> Result<(), PinError> {
        let dir = open_dir(&self.pin_dir)?;
        flock(&dir, libc::LOCK_SH).map_err(|e| io(&self.pin_dir, e))?;
        let record = AgentRecord {
            pid: std::process::id(),
            socket: std::path::absolute(control_socket).unwrap_or(control_socket.to_owned()),
        };
        let target = serde_json::to_string(&record).map_err(|e| io(&self.pin_dir, e))?;
        // A symbolic link: a bpffs holds no regular files, and a link's target is written in
        // one step; renamed over the old record so that a reader never sees none or half.
        let new = self.pin_dir.join(AGENT_RECORD_NEW);
        let _ = std::fs::remove_file(&new);
        std::os::unix::fs::symlink(&target, &new).map_err(|e| io(&new, e))?;
        let path = self.pin_dir.join(AGENT_RECORD);
        std::fs::rename(&new, &path).map_err(|e| io(&path, e))?;
        self.claim = Some(dir);
        Ok(())
    }

    /// Attaches to `iface`: an existing pinned link gets this program swapped in atomically
    /// (bpf_link_update: no moment without a program); otherwise a new link is made and
    /// pinned. A pin is only reused while its link is on the device that has the name now
    /// (the kernel's link follows a device, not a name); one that is not is moved or removed
    /// ([`Pinned::retire_stale`]) and a new link made, and a pin of another name whose link is
    /// on this device is taken over ([`Pinned::claim_renamed`]). Returns whether an existing
    /// link was adopted.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<bool, PinError> {
        self.attach_program(iface, mode, program_names::XDP)
    }

    /// [`Pinned::attach`] with the enforcing entry `program` (`program_names::XDP` for
    /// Ethernet devices, `XDP_L3` for layer-3 tunnel devices).
    pub fn attach_program(
        &mut self,
        iface: &str,
        mode: AttachMode,
        program: &'static str,
    ) -> Result<bool, PinError> {
        let path = link_path(&self.pin_dir, iface);
        let attach_err = |message: String| PinError::Attach {
            iface: iface.to_owned(),
            message,
        };
        self.settle_pin(Hook::Xdp, iface)?;
        let prog = crate::loader::xdp_program(&mut self.ebpf, program)
            .map_err(|e| attach_err(e.to_string()))?;
        // Still there: its link is on this name's device.
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| attach_err(e.to_string()))?;
            let fd: FdLink = pinned.into();
            let link = XdpLink::try_from(fd).map_err(|e| attach_err(e.to_string()))?;
            // A size change: the old program's budgets, as late as they can be read.
            if let Some(m) = self.migration.as_mut() {
                m.sync_budgets()?;
            }
            let id = prog.attach_to_link(link).map_err(|e| {
                attach_err(format!("replacing the program on the pinned link: {e}"))
            })?;
            // Taken out of the program, so that unloading the program never detaches it.
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            self.links.insert(iface.to_owned(), Held::Adopted(link));
            self.attach_egress(iface, egress_for(program))?;
            return Ok(true);
        }
        let id = prog
            .attach(iface, mode.xdp_mode())
            .map_err(|e| attach_err(format!("{} mode: {e}", mode.label())))?;
        let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
        let fd = FdLink::try_from(link).map_err(|e| {
            attach_err(format!(
                "the kernel attached without a bpf_link ({e}); tollgate needs bpf_link XDP (5.9+) \
                 to keep enforcing across restarts"
            ))
        })?;
        let pinned = fd
            .pin(&path)
            .map_err(|e| attach_err(format!("pinning {}: {e}", path.display())))?;
        self.links.insert(iface.to_owned(), Held::Pinned(pinned));
        self.attach_egress(iface, egress_for(program))?;
        Ok(false)
    }

    /// Before a link of `hook` is reused for `iface`: a pin whose link is not on the device
    /// that has the name now is moved or removed, and one of another name whose link is on
    /// it is taken over (see [`Pinned::attach`]).
    fn settle_pin(&mut self, hook: Hook, iface: &str) -> Result<(), PinError> {
        let path = hook.path(&self.pin_dir, iface);
        let current = link_info::ifindex(iface);
        if path.exists() {
            let ifindex = hook.ifindex(&path).map_err(|e| PinError::Attach {
                iface: iface.to_owned(),
                message: format!("reading the pinned link {}: {e}", path.display()),
            })?;
            if let Some(stale) = stale_pin(ifindex, current) {
                self.retire_stale(hook, iface, &path, stale, current)?;
            }
        }
        if !path.exists()
            && let Some(ifindex) = current
        {
            self.claim_renamed(hook, iface, ifindex)?;
        }
        Ok(())
    }

    /// Attaches the TC egress program to `iface` as a TCX link, like the XDP program: a
    /// pinned link gets the new program swapped in (bpf_link_update: what the node sends is
    /// counted without a gap), otherwise a new link is made and pinned. The program never
    /// drops, so a device without it loses figures, never traffic. Returns whether an
    /// existing link was adopted.
    fn attach_egress(&mut self, iface: &str, program: &'static str) -> Result<bool, PinError> {
        let attach_err = |message: String| PinError::Attach {
            iface: iface.to_owned(),
            message: format!("TC egress: {message}"),
        };
        self.settle_pin(Hook::Egress, iface)?;
        let path = egress_link_path(&self.pin_dir, iface);
        let prog = crate::loader::tc_program(&mut self.ebpf, program)
            .map_err(|e| attach_err(e.to_string()))?;
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| attach_err(e.to_string()))?;
            let fd: FdLink = pinned.into();
            let link = SchedClassifierLink::try_from(fd).map_err(|e| attach_err(e.to_string()))?;
            let id = prog.attach_to_link(link).map_err(|e| {
                attach_err(format!("replacing the program on the pinned link: {e}"))
            })?;
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            self.egress_links
                .insert(iface.to_owned(), Held::AdoptedEgress(link));
            self.egress_adopted.insert(iface.to_owned(), true);
            return Ok(true);
        }
        require_tcx().map_err(&attach_err)?;
        // First on the hook: a program before it that returns PASS or REDIRECT would hide the
        // answers from it (requests never closed, bytes never counted). It only observes and
        // returns TC_ACT_UNSPEC ("next"), so everything after it still runs.
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| attach_err(format!("attaching a TCX link: {e}")))?;
        let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
        let fd = FdLink::try_from(link).map_err(|e| {
            attach_err(format!(
                "the kernel attached without a bpf_link ({e}); tollgate needs TCX (Linux 6.6+)"
            ))
        })?;
        let pinned = fd
            .pin(&path)
            .map_err(|e| attach_err(format!("pinning {}: {e}", path.display())))?;
        self.egress_links
            .insert(iface.to_owned(), Held::Pinned(pinned));
        self.egress_adopted.insert(iface.to_owned(), false);
        Ok(false)
    }

    /// Whether `iface` has the egress program from this agent, and if so whether its link
    /// was adopted (`Some(true)`) or made by this start (`Some(false)`).
    pub fn egress(&self, iface: &str) -> Option<bool> {
        self.egress_adopted.get(iface).copied()
    }

    fn held(&mut self, hook: Hook) -> &mut BTreeMap<String, Held> {
        match hook {
            Hook::Xdp => &mut self.links,
            Hook::Egress => &mut self.egress_links,
        }
    }

    /// Takes the link pinned for `iface` off that name, because it is not on the device that
    /// has the name now. One still on a device (renamed, taking its link along) moves to the
    /// pin of the name that device has now, so that it stays enforced there and is adopted,
    /// or let go, under its real name; a dead one (its device deleted) is removed.
    fn retire_stale(
        &mut self,
        hook: Hook,
        iface: &str,
        path: &Path,
        stale: Stale,
        current: Option<u32>,
    ) -> Result<(), PinError> {
        let now = current.map_or("none: no such device".to_owned(), |i| i.to_string());
        let held = self.held(hook).remove(iface);
        if hook == Hook::Egress {
            self.egress_adopted.remove(iface);
        }
        if let Stale::Elsewhere(pinned) = stale
            && let Some(name) = link_info::ifname(pinned).filter(|n| n != iface)
        {
            let to = hook.path(&self.pin_dir, &name);
            if !to.exists() {
                std::fs::rename(path, &to).map_err(|e| io(path, e))?;
                if let Some(h) = held {
                    self.held(hook).insert(name.clone(), h);
                }
                warn!(
                    iface,
                    "the link pinned for {iface} is on ifindex {pinned} (now named {name}), \
                     not on the {iface} of now (ifindex {now}): its pin moves to {name}, and \
                     {iface} gets a link of its own"
                );
                return Ok(());
            }
        }
        // Dead, on a device this namespace does not know by that ifindex (moved to another
        // namespace), or the device's own name has a pin already: removed, and with our
        // handle dropped the kernel ends the link (a device left without one gets its own
        // link when it is next attached under its name).
        std::fs::remove_file(path).map_err(|e| io(path, e))?;
        let on = match stale {
            Stale::Dead => "no device (its device was deleted)".to_owned(),
            Stale::Elsewhere(i) => format!("ifindex {i}"),
        };
        warn!(
            iface,
            "the link pinned for {iface} is on {on}, not on the {iface} of now (ifindex \
             {now}): its pin is removed, and {iface} gets a link of its own"
        );
        Ok(())
    }

    /// A device renamed to `iface` took its link along, pinned under its old name: that pin
    /// moves to `iface`'s, so that the link is adopted (a device takes one XDP link: a second
    /// attach would fail, and the old name's pin would be on the wrong device).
    fn claim_renamed(&mut self, hook: Hook, iface: &str, ifindex: u32) -> Result<(), PinError> {
        for other in pinned_names(&self.pin_dir, hook) {
            let from = hook.path(&self.pin_dir, &other);
            let on_this = other != iface && hook.ifindex(&from).is_ok_and(|i| i == ifindex);
            if !on_this {
                continue;
            }
            let to = hook.path(&self.pin_dir, iface);
            std::fs::rename(&from, &to).map_err(|e| io(&from, e))?;
            if let Some(h) = self.held(hook).remove(&other) {
                self.held(hook).insert(iface.to_owned(), h);
            }
            warn!(
                iface,
                "the link pinned for {other} is on {iface} (ifindex {ifindex}): the device was \
                 renamed; its pin moves to {iface}"
            );
            return Ok(());
        }
        Ok(())
    }

    /// Detaches from `iface`: removes the pin and lets go of our handle, so the kernel ends
    /// the link. Returns whether it was attached.
    pub fn detach(&mut self, iface: &str) -> Result<bool, PinError> {
        let was = detach(&self.pin_dir, iface)?;
        let held = self.links.remove(iface).is_some();
        self.egress_links.remove(iface);
        self.egress_adopted.remove(iface);
        Ok(was || held)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// The egress program that goes with an enforcing entry: layer-3 tunnel devices (`XDP_L3`)
/// hand TC a packet that starts at its IP header too. Without it a decapsulated client's
/// answers would never close its requests, and a capped endpoint would cut its flows.
fn egress_for(xdp_program: &str) -> &'static str {
    if xdp_program == program_names::XDP_L3 {
        program_names::EGRESS_L3
    } else {
        program_names::EGRESS
    }
}

/// Why a link pinned for a name may not take the program (see [`stale_pin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stale {
    /// Attached to no device: its device was deleted (or it was detached).
    Dead,
    /// Attached to this ifindex, which is not the device that has the name now.
    Elsewhere(u32),
}

/// Whether a link on `link_ifindex` (0: none) is stale for a name whose device now has
/// `current` (`None`: no device has it). Swapping a program into a link only enforces on the
/// device the link is on: reusing one that is elsewhere would record the name enforced while
/// its device runs nothing.
fn stale_pin(link_ifindex: u32, current: Option<u32>) -> Option<Stale> {
    match link_ifindex {
        0 => Some(Stale::Dead),
        i if Some(i) == current => None,
        i => Some(Stale::Elsewhere(i)),
    }
}

/// Interfaces with a pinned XDP link (the enforced ones; an egress pin alone names none).
pub fn pinned_interfaces(pin_dir: &Path) -> Vec<String> {
    pinned_names(pin_dir, Hook::Xdp)
}

/// Names with a pinned link of `hook`.
fn pinned_names(pin_dir: &Path, hook: Hook) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return Vec::new();
    };
    let mut v: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(hook.prefix()))
                .map(str::to_owned)
        })
        .collect();
    v.sort();
    v
}

/// Detaches from one interface by removing its link pins, XDP and TC egress (each link dies
/// with its last reference). Returns whether the XDP one was there.
pub fn detach(pin_dir: &Path, iface: &str) -> Result<bool, PinError> {
    let remove = |path: PathBuf| match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(&path, e)),
    };
    remove(egress_link_path(pin_dir, iface))?;
    remove(link_path(pin_dir, iface))
}

/// The agent record in a pin directory: a symbolic link whose target is an [`AgentRecord`]
/// as JSON (bpffs names may not contain a dot).
pub const AGENT_RECORD: &str = "agent";
const AGENT_RECORD_NEW: &str = "agent-new";

/// Which agent serves a pin directory, as it recorded when it started.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentRecord {
    pub pid: u32,
    /// Its control socket, absolute.
    pub socket: PathBuf,
}

/// Who uses a pin directory, for `tollgate uninstall`.
#[derive(Debug)]
pub enum PinDirUse {
    /// No agent runs on it. The exclusive lock is held while this lives, so that no agent
    /// starts on the directory while it is being removed.
    Free(Option<std::fs::File>),
    /// An agent holds it; what it recorded, if the record could be read.
    Agent(Option<AgentRecord>),
}

fn open_dir(dir: &Path) -> Result<std::fs::File, PinError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| io(dir, e))
}

fn flock(f: &std::fs::File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether an agent runs on `pin_dir`: one does while it holds its lock (see
/// [`Pinned::claim`]). A directory that does not exist has no agent.
pub fn pin_dir_use(pin_dir: &Path) -> Result<PinDirUse, PinError> {
    let dir = match open_dir(pin_dir) {
        Ok(d) => d,
        Err(_) if !pin_dir.exists() => return Ok(PinDirUse::Free(None)),
        Err(e) => return Err(e),
    };
    match flock(&dir, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(PinDirUse::Free(Some(dir))),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Ok(PinDirUse::Agent(agent_record(pin_dir)))
        }
        Err(e) => Err(io(pin_dir, e)),
    }
}

/// The record the last agent to start on `pin_dir` left, if it can be read.
pub fn agent_record(pin_dir: &Path) -> Option<AgentRecord> {
    let target = std::fs::read_link(pin_dir.join(AGENT_RECORD)).ok()?;
    serde_json::from_str(target.to_str()?).ok()
}

/// Removes every link and map pin and the directories: enforcement stops, kernel state goes.
/// Returns what was removed (the pins; not the agent record).
pub fn uninstall(pin_dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    for record in [AGENT_RECORD, AGENT_RECORD_NEW] {
        let p = pin_dir.join(record);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p, e)),
        }
    }
    let mut removed = Vec::new();
    for sub in ["links", "maps", "maps-new"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|err| io(&p, err))?;
            removed.push(p);
        }
        std::fs::remove_dir(&dir).map_err(|e| io(&dir, e))?;
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(pin_dir, e)),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_link_is_reused_only_on_the_device_that_has_the_name_now() {
        // Still on the device of that name: the program is swapped in.
        assert_eq!(stale_pin(7, Some(7)), None);
        // vx0 (7) renamed and a new vx0 made (9): the link is on the renamed device.
        assert_eq!(stale_pin(7, Some(9)), Some(Stale::Elsewhere(7)));
        // Renamed and no device of the old name: still elsewhere, never reused for the name.
        assert_eq!(stale_pin(7, None), Some(Stale::Elsewhere(7)));
        // Deleted (and perhaps made again): the link is on nothing.
        assert_eq!(stale_pin(0, Some(9)), Some(Stale::Dead));
        assert_eq!(stale_pin(0, None), Some(Stale::Dead));
    }
}
