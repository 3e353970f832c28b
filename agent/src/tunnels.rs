//! Tunnels: devices where decapsulated (or decrypted) packets re-enter the stack.
//!
//! XDP on the node's interfaces sees a tunnelled packet's *outer* header (VXLAN to udp/4789,
//! GRE, IPIP: unprotected, so it passes); the kernel then decapsulates it and the inner packet
//! arrives on the tunnel device, where the configured interfaces' program never runs. So the
//! agent finds every decapsulating device in its network namespace (by rtnetlink kind) and
//! attaches the enforcing program to it in generic mode, pinned like any interface:
//! `tollgate` on devices that deliver Ethernet frames (vxlan, geneve, gretap, erspan, tap,
//! macsec ...), `tollgate_l3` on those that deliver bare IP packets (ipip, sit, gre, ip6tnl,
//! wireguard, xfrm, vti ...; generic XDP's data starts at the IP header there). Devices are
//! looked for again on every daemon tick; a device that goes away has its pin removed.
//!
//! What cannot be covered this way: IPsec without an interface. ESP is decrypted by xfrm and
//! re-injected (transport mode straight into IP receive, tunnel mode through `netif_rx` on the
//! receiving device, which skips native XDP): an xfrm SA in the namespace is reported as an
//! uncovered decapsulation point. `[node] tunnels` says what happens then ([`TunnelPolicy`]).

pub mod netlink;

use std::collections::BTreeMap;

use tollgate_common::program_names;
use tracing::{error, info, warn};

use crate::{
    control::reply::{CoveredTunnel, TunnelReport, UncoveredTunnel},
    loader::AttachMode,
    pins::{self, Pinned},
};
pub use netlink::Link;

/// `[node] tunnels`: what the agent does about decapsulating devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelPolicy {
    /// Cover every decapsulating device; refuse to start while one cannot be covered (one that
    /// appears later and cannot be covered: an error logged once, a metric, `status`).
    #[default]
    Enforce,
    /// Refuse to start while any decapsulating device or IPsec SA exists (one appearing later
    /// is covered where it can be and logged as an error).
    Refuse,
    /// Attach nothing: a loud warning and the metric only; the operator accepts the gap.
    Warn,
}

impl TunnelPolicy {
    pub const ALL: [TunnelPolicy; 3] = [
        TunnelPolicy::Enforce,
        TunnelPolicy::Refuse,
        TunnelPolicy::Warn,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TunnelPolicy::Enforce => "enforce",
            TunnelPolicy::Refuse => "refuse",
            TunnelPolicy::Warn => "warn",
        }
    }

    pub fn from_label(label: &str) -> Option<TunnelPolicy> {
        TunnelPolicy::ALL.into_iter().find(|p| p.label() == label)
    }
}

/// What a decapsulating device hands to XDP, so which entry of the program reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// Ethernet frames (ARPHRD_ETHER): the Ethernet entry.
    Ethernet,
    /// Packets starting at the IP header: the layer-3 entry.
    Ip,
}

impl Layer {
    pub fn program(self) -> &'static str {
        match self {
            Layer::Ethernet => program_names::XDP,
            Layer::Ip => program_names::XDP_L3,
        }
    }
}

const ARPHRD_ETHER: u16 = 1;

/// rtnetlink kinds of devices on which packets arrive decapsulated or decrypted.
pub const DECAPSULATING_KINDS: &[&str] = &[
    // UDP and GRE encapsulations of Ethernet.
    "vxlan",
    "geneve",
    "gretap",
    "ip6gretap",
    "erspan",
    "ip6erspan",
    "bareudp",
    // IP in IP, IPv6 in IPv4, GRE, IPv6 tunnels.
    "ipip",
    "sit",
    "gre",
    "ip6gre",
    "ip6tnl",
    // Encrypted tunnels and IPsec interfaces.
    "wireguard",
    "xfrm",
    "vti",
    "vti6",
    "macsec",
    // Userspace tunnels (OpenVPN and the like write decapsulated packets into tun/tap),
    // mobile and mesh encapsulations, PPP (PPPoE's payload arrives on the ppp device).
    "tun",
    "gtp",
    "amt",
    "batadv",
    "ppp",
    // The kernel's OpenVPN data channel offload.
    "ovpn",
];

/// Whether `link` decapsulates and, if so, what its packets start with. The layer comes
/// from the device type, not the kind: a device whose frames are not Ethernet gets the
/// layer-3 entry, which drops anything that does not start with an IP version nibble (a
/// wrong guess fails closed; the Ethernet entry on a bare IP packet would pass it as non-IP).
pub fn classify(link: &Link) -> Option<Layer> {
    if !DECAPSULATING_KINDS.contains(&link.kind.as_str()) {
        return None;
    }
    Some(if link.arphrd == ARPHRD_ETHER {
        Layer::Ethernet
    } else {
        Layer::Ip
    })
}

/// Device types (ARPHRD_*) whose frames start at the IP header: none (wireguard, tun),
/// tunnel, tunnel6, sit, ipgre, ip6gre, ppp, rawip.
const ARPHRD_BARE_IP: &[u16] = &[0xfffe, 768, 769, 776, 778, 823, 512, 519];

/// The program entry for a device of type `arphrd`: Ethernet frames or bare IP packets;
/// `None` for anything else (InfiniBand, loopback ...), which neither parser reads.
pub fn entry_for_type(arphrd: u16) -> Option<&'static str> {
    if arphrd == ARPHRD_ETHER {
        Some(program_names::XDP)
    } else if ARPHRD_BARE_IP.contains(&arphrd) {
        Some(program_names::XDP_L3)
    } else {
        None
    }
}

/// The entry to attach to a configured interface, by its device type: the layer-3 one on a
/// device that delivers bare IP packets (a wireguard device named in `[node] interfaces`),
/// the Ethernet one on Ethernet. Fails closed: when the type cannot be read, or is neither,
/// nothing is attached (the Ethernet entry on bare IP packets would pass them all as
/// non-IP). A device that does not exist gets the Ethernet entry, whose attach then fails
/// naming it.
pub fn program_for(iface: &str) -> Result<&'static str, String> {
    let links = netlink::links()
        .map_err(|e| format!("reading the device type of {iface} (rtnetlink): {e}"))?;
    match links.iter().find(|l| l.name == iface) {
        None => Ok(program_names::XDP),
        Some(l) => entry_for_type(l.arphrd).ok_or_else(|| {
            format!(
                "{iface} has device type {} (ARPHRD), neither Ethernet nor bare IP: tollgate                  cannot parse its frames and will not attach to it",
                l.arphrd
            )
        }),
    }
}

/// The name status and the metric give IPsec SAs, which have no device.
pub const XFRM_STATES: &str = "xfrm-states";

#[derive(Clone, Debug, PartialEq, Eq)]
struct Covered {
    ifindex: u32,
    kind: String,
    layer: Layer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Uncovered {
    ifindex: u32,
    kind: String,
    why: String,
}

/// A change worth an audit line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Attached {
        name: String,
        kind: String,
        program: &'static str,
    },
    Uncovered {
        name: String,
        kind: String,
        why: String,
    },
    Gone {
        name: String,
    },
}

impl Event {
    /// The audit action and its detail.
    pub fn audit(&self) -> (&'static str, serde_json::Value) {
        match self {
            Event::Attached {
                name,
                kind,
                program,
            } => (
                "tunnel_attached",
                serde_json::json!({"device": name, "kind": kind, "program": program}),
            ),
            Event::Uncovered { name, kind, why } => (
                "tunnel_uncovered",
                serde_json::json!({"device": name, "kind": kind, "why": why}),
            ),
            Event::Gone { name } => ("tunnel_gone", serde_json::json!({"device": name})),
        }
    }
}

/// The decapsulating devices found, and what was done about each.
#[derive(Debug, Default)]
pub struct Tunnels {
    policy: TunnelPolicy,
    covered: BTreeMap<String, Covered>,
    uncovered: BTreeMap<String, Uncovered>,
    /// The last scan (decapsulating links, SA count): an unchanged scan costs nothing more.
    last: Option<(Vec<Link>, u32)>,
    scan_failing: bool,
}

/// What the namespace holds that decapsulates: its devices (configured interfaces left out)
/// and its IPsec SA count.
fn scan(configured: &[String]) -> std::io::Result<(Vec<Link>, u32)> {
    let mut links: Vec<Link> = netlink::links()?
        .into_iter()
        .filter(|l| classify(l).is_some() && !configured.contains(&l.name))
        .collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((links, netlink::xfrm_states()?))
}

fn xfrm_why(n: u32) -> String {
    // Tunnel-mode SAs bound to an xfrm interface (if_id) deliver on that device, which is
    // covered; transport mode never passes a device's XDP again. Telling them apart needs the
    // SA dump (mode, if_id): until then every SA counts as a gap.
    format!(
        "{n} IPsec SA(s): ESP decrypted by xfrm re-enters the stack past XDP (transport mode \
         straight into IP receive, tunnel mode through netif_rx on the receiving device, which \
         skips native XDP)"
    )
}

impl Tunnels {
    /// Finds the decapsulating devices at start and deals with them as `policy` says; `Err`
    /// is the refusal to start, naming the devices.
    pub fn start(
        policy: TunnelPolicy,
        pinned: &mut Pinned,
        configured: &[String],
    ) -> Result<(Tunnels, Vec<Event>), String> {
        let (links, sas) = scan(configured)
            .map_err(|e| format!("looking for tunnel devices (rtnetlink/xfrm): {e}"))?;
        let found: Vec<String> = links
            .iter()
            .map(|l| format!("{} ({})", l.name, l.kind))
            .chain((sas > 0).then(|| format!("{sas} IPsec SA(s)")))
            .collect();
        if policy == TunnelPolicy::Refuse && !found.is_empty() {
            return Err(format!(
                "node.tunnels = \"refuse\" and this namespace decapsulates: {}. Remove them, or \
                 set node.tunnels = \"enforce\" to have tollgate cover them",
                found.join(", ")
            ));
        }
        let mut t = Tunnels {
            policy,
            ..Tunnels::default()
        };
        let events = t.apply(pinned, configured, links, sas);
        if policy == TunnelPolicy::Enforce && !t.uncovered.is_empty() {
            return Err(format!(
                "node.tunnels = \"enforce\" and decapsulated traffic could bypass tollgate on: \
                 {}. Remove them, or set node.tunnels = \"warn\" to accept the gap",
                t.uncovered
                    .iter()
                    .map(|(n, u)| format!("{n} ({}): {}", u.kind, u.why))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        if policy == TunnelPolicy::Warn && !t.uncovered.is_empty() {
            warn!(
                devices = ?t.uncovered.keys().collect::<Vec<_>>(),
                "node.tunnels = \"warn\": decapsulated traffic on these devices is NOT enforced"
            );
        }
        Ok((t, events))
    }

    /// Looks again (every daemon tick); returns what changed.
    pub fn rescan(&mut self, pinned: &mut Pinned, configured: &[String]) -> Vec<Event> {
        let (links, sas) = match scan(configured) {
            Ok(s) => {
                self.scan_failing = false;
                s
            }
            Err(e) => {
                if !self.scan_failing {
                    error!(
                        "looking for tunnel devices: {e}; new ones are not covered until it works"
                    );
                }
                self.scan_failing = true;
                return Vec::new();
            }
        };
        if !self.worth_applying(&links, sas) {
            return Vec::new();
        }
        self.apply(pinned, configured, links, sas)
    }

    /// Whether a scan needs [`Tunnels::apply`]: it changed, or a device is still uncovered by
    /// a failed attach (a transient EMFILE, a device mid-setup), which is tried again every
    /// tick rather than left open until some other device changes. An unchanged scan with
    /// everything covered costs nothing more.
    fn worth_applying(&self, links: &[Link], sas: u32) -> bool {
        let retry =
            self.policy != TunnelPolicy::Warn && self.uncovered.keys().any(|n| n != XFRM_STATES);
        retry
            || self
                .last
                .as_ref()
                .is_none_or(|(l, s)| l.as_slice() != links || *s != sas)
    }

    /// Attaches to new devices, detaches from vanished ones, records the uncovered.
    fn apply(
        &mut self,
        pinned: &mut impl Links,
        configured: &[String],
        links: Vec<Link>,
        sas: u32,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
        for name in self.covered.keys().cloned().collect::<Vec<_>>() {
            if configured.contains(&name) {
                // Now a configured interface (a reload): its link is the daemon's.
                self.covered.remove(&name);
                continue;
            }
            if !names.contains(&name.as_str()) {
                self.covered.remove(&name);
                if let Err(e) = Links::detach(pinned, &name) {
                    warn!("removing the link pin of vanished tunnel device {name}: {e}");
                }
                info!(device = name, "tunnel device gone");
                events.push(Event::Gone { name });
            }
        }
        self.uncovered.retain(|n, _| {
            let keep = names.contains(&n.as_str()) || (n == XFRM_STATES && sas > 0);
            if !keep {
                events.push(Event::Gone { name: n.clone() });
            }
            keep
        });
        for link in &links {
            let Some(layer) = classify(link) else {
                continue;
            };
            if self
                .covered
                .get(&link.name)
                .is_some_and(|c| c.ifindex == link.ifindex)
            {
                continue;
            }
            let result = if self.policy == TunnelPolicy::Warn {
                Err("node.tunnels = \"warn\": not attached".to_owned())
            } else {
                pinned.attach(&link.name, layer)
            };
            match result {
                Ok(()) => {
                    self.uncovered.remove(&link.name);
                    self.covered.insert(
                        link.name.clone(),
                        Covered {
                            ifindex: link.ifindex,
                            kind: link.kind.clone(),
                            layer,
                        },
                    );
                    if self.policy == TunnelPolicy::Refuse {
                        error!(
                            device = link.name,
                            kind = link.kind,
                            "node.tunnels = \"refuse\": a decapsulating device appeared; covered"
                        );
                    } else {
                        info!(
                            device = link.name,
                            kind = link.kind,
                            program = layer.program(),
                            "tunnel device covered (generic XDP)"
                        );
                    }
                    events.push(Event::Attached {
                        name: link.name.clone(),
                        kind: link.kind.clone(),
                        program: layer.program(),
                    });
                }
                Err(why) => {
                    self.covered.remove(&link.name);
                    let u = Uncovered {
                        ifindex: link.ifindex,
                        kind: link.kind.clone(),
                        why,
                    };
                    // Logged (and audited) once per device and reason, not per tick.
                    if self.uncovered.get(&link.name) != Some(&u) {
                        error!(
                            device = link.name,
                            kind = link.kind,
                            why = u.why,
                            "decapsulated traffic on this device is NOT enforced"
                        );
                        events.push(Event::Uncovered {
                            name: link.name.clone(),
                            kind: u.kind.clone(),
                            why: u.why.clone(),
                        });
                        self.uncovered.insert(link.name.clone(), u);
                    }
                }
            }
        }
        if sas > 0 {
            let u = Uncovered {
                ifindex: 0,
                kind: "ipsec".into(),
                why: xfrm_why(sas),
            };
            if self.uncovered.get(XFRM_STATES) != Some(&u) {
                error!(sas, "{}", u.why);
                events.push(Event::Uncovered {
                    name: XFRM_STATES.into(),
                    kind: u.kind.clone(),
                    why: u.why.clone(),
                });
                self.uncovered.insert(XFRM_STATES.into(), u);
            }
        }
        self.last = Some((links, sas));
        events
    }

    /// Names of the covered devices (their link pins belong to this module).
    pub fn covered_names(&self) -> Vec<String> {
        self.covered.keys().cloned().collect()
    }

    /// (covered, uncovered) counts, for the metric.
    pub fn counts(&self) -> (usize, usize) {
        (self.covered.len(), self.uncovered.len())
    }

    pub fn report(&self) -> TunnelReport {
        TunnelReport {
            policy: self.policy.label().to_owned(),
            covered: self
                .covered
                .iter()
                .map(|(n, c)| CoveredTunnel {
                    device: n.clone(),
                    kind: c.kind.clone(),
                    program: c.layer.program().to_owned(),
                })
                .collect(),
            uncovered: self
                .uncovered
                .iter()
                .map(|(n, u)| UncoveredTunnel {
                    device: n.clone(),
                    kind: u.kind.clone(),
                    why: u.why.clone(),
                })
                .collect(),
        }
    }
}

/// Where the links go: the pins (the daemon), or a recorder (the unit tests).
pub trait Links {
    fn attach(&mut self, name: &str, layer: Layer) -> Result<(), String>;
    fn detach(&mut self, name: &str) -> Result<(), String>;
}

impl Links for Pinned {
    /// Attaches `layer`'s entry in generic mode (tunnel devices have no driver XDP). A pin
    /// left for a device of that name that was deleted (and perhaps recreated) holds a dead
    /// link that cannot take a program: it is removed and the attach made afresh.
    fn attach(&mut self, name: &str, layer: Layer) -> Result<(), String> {
        match self.attach_program(name, AttachMode::Generic, layer.program()) {
            Ok(_) => Ok(()),
            Err(first) => {
                if pins::link_path(self.pin_dir(), name).exists() {
                    let _ = Pinned::detach(self, name);
                    return self
                        .attach_program(name, AttachMode::Generic, layer.program())
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                }
                Err(first.to_string())
            }
        }
    }

    fn detach(&mut self, name: &str) -> Result<(), String> {
        Pinned::detach(self, name)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(kind: &str, arphrd: u16) -> Link {
        Link {
            name: "t0".into(),
            ifindex: 5,
            arphrd,
            kind: kind.into(),
        }
    }

    #[test]
    fn ethernet_tunnels_get_the_ethernet_entry_and_l3_tunnels_the_l3_one() {
        for kind in ["vxlan", "geneve", "gretap", "ip6gretap", "erspan", "macsec"] {
            assert_eq!(classify(&link(kind, 1)), Some(Layer::Ethernet), "{kind}");
        }
        // ARPHRD_TUNNEL, ARPHRD_SIT, ARPHRD_IPGRE, ARPHRD_TUNNEL6, ARPHRD_IP6GRE, ARPHRD_NONE.
        for (kind, arphrd) in [
            ("ipip", 768),
            ("sit", 776),
            ("gre", 778),
            ("ip6tnl", 769),
            ("ip6gre", 823),
            ("wireguard", 0xfffe),
            ("xfrm", 0xfffe),
            ("bareudp", 0xfffe),
            ("vti", 768),
        ] {
            assert_eq!(classify(&link(kind, arphrd)), Some(Layer::Ip), "{kind}");
        }
        assert_eq!(Layer::Ip.program(), program_names::XDP_L3);
        assert_eq!(Layer::Ethernet.program(), program_names::XDP);
    }

    #[test]
    fn tun_and_tap_follow_their_device_type() {
        assert_eq!(classify(&link("tun", 1)), Some(Layer::Ethernet), "tap");
        assert_eq!(classify(&link("tun", 0xfffe)), Some(Layer::Ip), "tun");
    }

    #[test]
    fn plain_devices_are_not_tunnels() {
        for kind in [
            "", "veth", "bridge", "vlan", "macvlan", "ipvlan", "dummy", "bond",
        ] {
            assert_eq!(classify(&link(kind, 1)), None, "{kind:?}");
        }
    }

    #[test]
    fn policy_labels_round_trip() {
        for p in TunnelPolicy::ALL {
            assert_eq!(TunnelPolicy::from_label(p.label()), Some(p));
        }
        assert_eq!(TunnelPolicy::default(), TunnelPolicy::Enforce);
        assert_eq!(TunnelPolicy::from_label("ignore"), None);
    }

    /// Records attaches and detaches; refuses to attach the names in `refuse`.
    #[derive(Default)]
    struct Recorder {
        log: Vec<String>,
        refuse: Vec<&'static str>,
    }

    impl Links for Recorder {
        fn attach(&mut self, name: &str, layer: Layer) -> Result<(), String> {
            if self.refuse.contains(&name) {
                return Err("the kernel said no".into());
            }
            self.log.push(format!("attach {name} {}", layer.program()));
            Ok(())
        }
        fn detach(&mut self, name: &str) -> Result<(), String> {
            self.log.push(format!("detach {name}"));
            Ok(())
        }
    }

    fn dev(name: &str, ifindex: u32, kind: &str, arphrd: u16) -> Link {
        Link {
            name: name.into(),
            ifindex,
            arphrd,
            kind: kind.into(),
        }
    }

    fn tunnels(policy: TunnelPolicy) -> Tunnels {
        Tunnels {
            policy,
            ..Tunnels::default()
        }
    }

    #[test]
    fn devices_are_attached_once_reattached_when_recreated_and_let_go_when_gone() {
        let mut t = tunnels(TunnelPolicy::Enforce);
        let mut r = Recorder::default();
        let vx = dev("vx0", 7, "vxlan", 1);
        let wg = dev("wg0", 8, "wireguard", 0xfffe);
        let ev = t.apply(&mut r, &[], vec![vx.clone(), wg.clone()], 0);
        assert_eq!(ev.len(), 2);
        assert_eq!(r.log, ["attach vx0 tollgate", "attach wg0 tollgate_l3"]);
        assert_eq!(t.counts(), (2, 0));
        // The same scan again changes nothing.
        assert!(
            t.apply(&mut r, &[], vec![vx.clone(), wg.clone()], 0)
                .is_empty()
        );
        assert_eq!(r.log.len(), 2);
        // vx0 deleted and made again (a new ifindex): attached again; wg0 gone: let go.
        let vx2 = dev("vx0", 9, "vxlan", 1);
        let ev = t.apply(&mut r, &[], vec![vx2], 0);
        assert_eq!(r.log[2..], ["detach wg0", "attach vx0 tollgate"]);
        assert!(ev.contains(&Event::Gone { name: "wg0".into() }), "{ev:?}");
        assert_eq!(t.report().covered.len(), 1);
        // Named in node.interfaces by a reload: the daemon's now, not detached here.
        t.apply(&mut r, &["vx0".to_owned()], vec![], 0);
        assert_eq!(r.log.len(), 4, "{:?}", r.log);
        assert_eq!(t.counts(), (0, 0));
    }

    #[test]
    fn failed_attaches_and_sas_are_uncovered_and_reported_once() {
        let mut t = tunnels(TunnelPolicy::Enforce);
        let mut r = Recorder {
            refuse: vec!["gre9"],
            ..Recorder::default()
        };
        let gre = dev("gre9", 4, "gre", 778);
        let ev = t.apply(&mut r, &[], vec![gre.clone()], 2);
        let uncovered: Vec<&str> = ev
            .iter()
            .filter_map(|e| match e {
                Event::Uncovered { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(uncovered, ["gre9", XFRM_STATES]);
        let report = t.report();
        assert!(
            report.uncovered[1].why.contains("2 IPsec SA(s)"),
            "{report:?}"
        );
        assert_eq!(t.counts(), (0, 2));
        // Retried on every tick while uncovered (the scan unchanged), not reported again while
        // it fails the same way; once it attaches, an unchanged scan is left alone.
        t.last = Some((vec![gre.clone()], 2));
        assert!(t.worth_applying(std::slice::from_ref(&gre), 2));
        assert!(t.apply(&mut r, &[], vec![gre.clone()], 2).is_empty());
        r.refuse.clear();
        let ev = t.apply(&mut r, &[], vec![gre.clone()], 2);
        assert!(
            matches!(&ev[..], [Event::Attached { name, .. }] if name == "gre9"),
            "{ev:?}"
        );
        t.last = Some((vec![gre.clone()], 0));
        assert!(!t.worth_applying(std::slice::from_ref(&gre), 0));
        assert!(
            t.worth_applying(std::slice::from_ref(&gre), 2),
            "the SAs changed"
        );
        r.refuse.push("gre9");
        t.covered.clear();
        let ev = t.apply(&mut r, &[], vec![gre.clone(), dev("vx1", 5, "vxlan", 1)], 2);
        assert_eq!(ev.len(), 2, "{ev:?}");
        // The SAs gone: that gap closes.
        let ev = t.apply(&mut r, &[], vec![gre], 0);
        assert!(ev.contains(&Event::Gone {
            name: XFRM_STATES.into()
        }));
    }

    #[test]
    fn warn_attaches_nothing() {
        let mut t = tunnels(TunnelPolicy::Warn);
        let mut r = Recorder::default();
        t.apply(&mut r, &[], vec![dev("vx0", 7, "vxlan", 1)], 0);
        assert!(r.log.is_empty());
        assert_eq!(t.counts(), (0, 1));
        assert_eq!(t.report().uncovered[0].device, "vx0");
    }

    #[test]
    fn audit_actions_name_the_change() {
        let e = Event::Uncovered {
            name: "vx0".into(),
            kind: "vxlan".into(),
            why: "x".into(),
        };
        assert_eq!(e.audit().0, "tunnel_uncovered");
        assert_eq!(e.audit().1["device"], "vx0");
    }

    #[test]
    fn configured_devices_get_the_entry_their_type_reads_or_none() {
        assert_eq!(entry_for_type(1), Some(program_names::XDP));
        for bare in [0xfffe, 768, 769, 776, 778, 823, 512, 519] {
            assert_eq!(entry_for_type(bare), Some(program_names::XDP_L3), "{bare}");
        }
        // InfiniBand and loopback: neither parser reads them, so nothing is attached.
        assert_eq!(entry_for_type(32), None);
        assert_eq!(entry_for_type(772), None);
    }
}
