//! The TC egress program's plumbing (#16): the agent attaches it next to the XDP program on
//! every Ethernet interface it enforces, as a pinned TCX link; a successor after `kill -9`
//! swaps its own program into that same link (bpf_link_update: sampled throughout, there is
//! never a moment without a program on the hook); `tollgate uninstall` removes both links.
//! The links are read through the bpf syscall on their pins (`tollgate::link_info`), no
//! bpftool needed.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tollgate::link_info::{self, TcxLinkInfo};
use tollgate_tests::node::World;

/// `BPF_TCX_EGRESS` (include/uapi/linux/bpf.h).
const BPF_TCX_EGRESS: u32 = 47;

/// The name the kernel holds for program `id` (truncated to 15 bytes; ours fit).
fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
}

fn egress_link(path: &Path) -> TcxLinkInfo {
    link_info::pinned_tcx_link(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_egress_link_is_pinned_adopted_in_place_across_a_kill_and_removed_by_uninstall() {
    tollgate_tests::require_root();
    let w = World::new();
    let agent = w.start();
    let iface = &w.lab.server_if;
    let xdp_pin = tollgate::pins::link_path(&w.dirs.pin_dir, iface);
    let egress_pin = tollgate::pins::egress_link_path(&w.dirs.pin_dir, iface);
    assert!(xdp_pin.exists(), "{}", xdp_pin.display());
    assert!(egress_pin.exists(), "{}", egress_pin.display());

    // A TCX egress link on the same device as the XDP link, running tollgate_egress.
    let xdp = link_info::pinned_xdp_link(&xdp_pin).expect("xdp link");
    let first = egress_link(&egress_pin);
    assert_eq!(first.attach_type, BPF_TCX_EGRESS, "{first:?}");
    assert_eq!(first.ifindex, xdp.ifindex, "{first:?} vs {xdp:?}");
    assert_ne!(first.ifindex, 0);
    assert_eq!(
        program_name(first.prog_id).as_deref(),
        Some(tollgate_common::program_names::EGRESS),
        "program {} on the egress link",
        first.prog_id
    );
    // Every configured endpoint's flow settings are in the kernel (TCP: tracked by default,
    // UDP: not), and the ids past them are empty.
    let fp_path =
        tollgate::pins::maps_dir(&w.dirs.pin_dir).join(tollgate_common::map_names::FLOW_POLICY);
    let fp: aya::maps::Array<aya::maps::MapData, tollgate_common::flow::FlowPolicy> =
        aya::maps::Array::try_from(aya::maps::Map::Array(
            aya::maps::MapData::from_pin(&fp_path).expect("FLOW_POLICY pin"),
        ))
        .expect("array");
    let text = std::fs::read_to_string(&w.config).expect("config");
    let endpoints = text.matches("[[endpoints]]").count() as u32;
    assert!(endpoints >= 1, "{text}");
    let tracked = (1..=endpoints)
        .filter(|id| {
            fp.get(id, 0).expect("flow policy").flags & tollgate_common::flow::FP_TRACK != 0
        })
        .count();
    assert!(tracked >= 1, "no endpoint's flows tracked in FLOW_POLICY");
    assert_eq!(
        fp.get(&(endpoints + 1), 0).expect("flow policy"),
        tollgate_common::flow::FlowPolicy::default()
    );

    // `status` shows it per interface, and the flow table's size.
    let text = w.dirs.cli_ok(&["status"]);
    assert!(
        text.contains(&format!(
            "attached (TCX link {}, program {})",
            first.id, first.prog_id
        )),
        "{text}"
    );
    assert!(text.contains("flows"), "{text}");
    // The egress pin names no interface of its own: only the XDP pins do.
    assert_eq!(
        tollgate::pins::pinned_interfaces(&w.dirs.pin_dir),
        vec![iface.clone()]
    );

    // kill -9, then a successor: the link is sampled as fast as the syscall goes.
    let sampling = AtomicBool::new(true);
    let (samples, successor) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut v: Vec<Result<TcxLinkInfo, String>> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(90);
            while sampling.load(Ordering::Relaxed) && Instant::now() < deadline {
                v.push(link_info::pinned_tcx_link(&egress_pin).map_err(|e| e.to_string()));
                std::thread::sleep(Duration::from_millis(1));
            }
            v
        });
        let _ = agent.kill9();
        std::thread::sleep(Duration::from_millis(500));
        let successor = w.start();
        std::thread::sleep(Duration::from_millis(500));
        sampling.store(false, Ordering::Relaxed);
        (sampler.join().expect("sampler"), successor)
    });
    let bad: Vec<&Result<TcxLinkInfo, String>> = samples
        .iter()
        .filter(|s| {
            !matches!(s, Ok(l) if l.id == first.id && l.prog_id != 0
                && l.ifindex == first.ifindex && l.attach_type == BPF_TCX_EGRESS)
        })
        .collect();
    let programs: BTreeSet<u32> = samples
        .iter()
        .filter_map(|s| s.as_ref().ok().map(|l| l.prog_id))
        .collect();
    eprintln!(
        "{} samples, {} not the same link with a program, programs {programs:?}",
        samples.len(),
        bad.len()
    );
    assert!(samples.len() >= 200, "only {} samples", samples.len());
    assert!(
        bad.is_empty(),
        "the egress link was replaced or left without a program: {:?}",
        bad.iter().take(5).collect::<Vec<_>>()
    );
    let after = egress_link(&egress_pin);
    assert_eq!(after.id, first.id, "the same link, adopted");
    assert_ne!(
        after.prog_id, first.prog_id,
        "the successor's program swapped in"
    );
    assert_eq!(programs.len(), 2, "old and new program: {programs:?}");
    assert_eq!(
        program_name(after.prog_id).as_deref(),
        Some(tollgate_common::program_names::EGRESS)
    );

    // Uninstall: both links go, with the pins.
    let out = w.dirs.cli_ok(&["uninstall"]);
    assert!(out.contains("uninstalled"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.dirs.pin_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!egress_pin.exists() && !xdp_pin.exists());
    let exit = successor.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        w.lab.server.xdp_attach(iface).is_none(),
        "XDP still attached"
    );
    // The kernel let go of the egress link too (its last reference was the pin and our fd).
    let deadline = Instant::now() + Duration::from_secs(5);
    let gone = loop {
        let alive = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .any(|l| l.id() == first.id);
        if !alive || Instant::now() > deadline {
            break !alive;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(gone, "egress link {} still in the kernel", first.id);
}
