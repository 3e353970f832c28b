//! `[limits]` on a running node: a size change is made at restart and migrates the kernel
//! tables under traffic (the program never leaves the interface, budgets and counters carry
//! over, the kernel's memory figures match the estimate `config check` printed); a reload
//! that would change a size is refused; a shrink that would drop bindings is refused and
//! changes nothing.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::Agent,
    config::{Identity, Plan},
    frames::{FrameBlaster, send_frames},
    node::{World, config, frame, host4},
};

/// A plan whose budget shows whether it was kept: 1 packet/s after a burst of 40. A reset
/// budget hands out the whole burst again; a kept one only what the elapsed seconds earned.
fn trickle_config(w: &World) -> tollgate_tests::config::Config {
    config(&w.lab)
        .plan(Plan::new("trickle").packets(1, 40))
        .identity(
            Identity::new("trickle", "customer", "trickle", &[host4(&w.lab, 20)])
                .roles(&["inference"]),
        )
}

/// The pinned link's (program id, ifindex) every millisecond until stopped.
struct LinkSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64, BTreeSet<u32>)>>,
}

impl LinkSampler {
    fn start(path: std::path::PathBuf) -> LinkSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut samples, mut without) = (0u64, 0u64);
            let mut programs = BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                samples += 1;
                match tollgate::link_info::pinned_xdp_link(&path) {
                    Ok(l) if l.prog_id != 0 && l.ifindex != 0 => {
                        programs.insert(l.prog_id);
                    }
                    _ => without += 1,
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (samples, without, programs)
        });
        LinkSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// (samples, samples without a program, program ids seen).
    fn finish(mut self) -> (u64, u64, BTreeSet<u32>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("once").join().expect("sampler")
    }
}

impl Drop for LinkSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn passed(w: &World, name: &str) -> u64 {
    w.identity(name)["passed_packets"]
        .as_u64()
        .expect("passed_packets")
}

fn status(w: &World) -> serde_json::Value {
    serde_json::from_str(&w.dirs.cli_ok(&["status", "--output", "json"])).expect("status json")
}

fn max_entries(status: &serde_json::Value, map: &str) -> u64 {
    status["tables"]["maps"]
        .as_array()
        .expect("tables.maps")
        .iter()
        .find(|m| m["map"] == map)
        .and_then(|m| m["max_entries"].as_u64())
        .unwrap_or_else(|| panic!("{map} not in status.tables: {status}"))
}

#[test]
fn a_size_change_under_traffic_keeps_the_program_budgets_and_counters() {
    let w = World::new();
    trickle_config(&w).write(&w.config);
    let agent = w.start();
    let lab = &w.lab;
    let dst = w.dst(host4(lab, 20));
    let trickle = frame(host4(lab, 20), dst, 8000, "tcp");
    // Spend trickle's burst.
    send_frames(&lab.client, &lab.client_if, &vec![trickle.clone(); 60]);
    let spent_at = Instant::now();
    let t0 = passed(&w, "trickle");
    assert!(
        (40..=42).contains(&t0),
        "trickle passed {t0} of its burst of 40"
    );
    let s0 = status(&w);
    assert_eq!(max_entries(&s0, "IDENTITIES"), 16384);

    // A reload cannot change a size: it names the change and says to restart.
    let bigger = trickle_config(&w).limits(1 << 16, 1 << 18);
    bigger.write(&w.config);
    let reload = w.dirs.cli(&["reload"]);
    let msg = String::from_utf8_lossy(&reload.stderr).into_owned();
    assert_eq!(reload.status.code(), Some(5), "{msg}");
    assert!(
        msg.contains("identities 16384 -> 65536") && msg.contains("restart"),
        "{msg}"
    );

    // Under traffic (metered: 200/s plan, offered 1 000/s), restart with the new sizes while
    // the link is sampled every millisecond.
    let link = tollgate::pins::link_path(&w.dirs.pin_dir, &lab.server_if);
    let sampler = LinkSampler::start(link);
    let metered = host4(lab, 14);
    let blaster = FrameBlaster::start(
        &lab.client,
        &lab.client_if,
        frame(metered, w.dst(metered), 8000, "tcp"),
        1000,
    );
    std::thread::sleep(Duration::from_millis(300));
    let m0 = passed(&w, "metered");
    let exit = agent.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    let agent = w.start();
    std::thread::sleep(Duration::from_millis(500));
    let m1 = passed(&w, "metered");
    let sent = blaster.stop();
    let (samples, without, programs) = sampler.finish();
    eprintln!(
        "{samples} samples, {without} without a program, programs {programs:?}; metered \
         passed {m0} -> {m1} ({sent} sent)"
    );
    let stderr = agent.stderr();
    assert!(stderr.contains("table size changed"), "{stderr}");
    assert_eq!(without, 0, "the interface was without a program");
    assert!(samples > 500, "only {samples} samples");
    assert_eq!(programs.len(), 2, "old and new program: {programs:?}");
    // Traffic went on being enforced and counted across the swap.
    assert!(m1 > m0, "metered passed {m0} -> {m1}");

    // The tables have the new sizes, the staging pins are gone, and the kernel's memory
    // figures are the estimate's (tries are counted full by the estimate, by entries by the
    // kernel).
    let s1 = status(&w);
    assert_eq!(max_entries(&s1, "IDENTITIES"), 1 << 16);
    assert_eq!(max_entries(&s1, "IDENTITY_COUNTERS"), 1 << 16);
    assert_eq!(max_entries(&s1, "BIND_V4"), 1 << 18);
    assert_eq!(max_entries(&s1, "BIND_V6"), 1 << 18);
    assert!(!tollgate::pins::staging_dir(&w.dirs.pin_dir).exists());
    let sizes = tollgate::sizes::Sizes {
        identities: 1 << 16,
        exact_bindings: 1 << 18,
        ..tollgate::sizes::Sizes::COMPILED
    };
    let estimate = tollgate::sizes::kernel_memory(&sizes, tollgate::sizes::possible_cpus());
    for m in s1["tables"]["maps"].as_array().expect("maps") {
        let name = m["map"].as_str().expect("map");
        let kernel = m["bytes"].as_u64().expect("bytes");
        let est = estimate
            .iter()
            .find(|c| c.map == name)
            .expect("estimated")
            .bytes;
        if name.starts_with("BIND_CIDR") {
            assert!(
                est >= kernel,
                "{name}: estimate {est} below the kernel's {kernel}"
            );
        } else {
            // Within 2%, or a map header's few hundred bytes for the small ones.
            let off = est.abs_diff(kernel);
            assert!(
                off < 1024 || off as f64 / kernel as f64 <= 0.02,
                "{name}: estimate {est}, kernel {kernel}"
            );
        }
    }

    // Budgets: trickle earned about one packet per second since its burst was spent, not a
    // new burst.
    send_frames(&lab.client, &lab.client_if, &vec![trickle; 60]);
    let t1 = passed(&w, "trickle");
    let earned = spent_at.elapsed().as_secs_f64() + 2.0;
    assert!(t1 >= t0, "trickle's counters went back: {t0} -> {t1}");
    assert!(
        ((t1 - t0) as f64) <= earned,
        "trickle passed {} more after the size change, its budget earned at most {earned:.0}",
        t1 - t0
    );
    drop(agent);
}

#[test]
fn a_shrink_below_what_the_tables_hold_is_refused_and_changes_nothing() {
    let w = World::new();
    let agent = w.start();
    let o = w.lab.client_v4.octets();
    for i in 0..20u8 {
        let addr = format!("{}.{}.{}.{}", o[0], o[1], o[2], 100 + i);
        w.dirs
            .cli_ok(&["bind", &addr, "--identity", "acme", "--for", "10m"]);
    }
    let exit = agent.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    let link = tollgate::pins::link_path(&w.dirs.pin_dir, &w.lab.server_if);
    let before = tollgate::link_info::pinned_xdp_link(&link).expect("link");
    config(&w.lab).limits(16384, 16).write(&w.config);
    // The start that would shrink exits with the reason (bounded: it never gets to serve).
    let mut child = Agent::command(&w.lab.server, &w.dirs)
        .args([
            "--config",
            w.config.to_str().expect("path"),
            "--mode",
            "native",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running the agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("polling").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().expect("polling").is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("the agent's output");
    assert!(!out.status.success(), "the agent started");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("BIND_V4 holds") && err.contains("more than the 16 asked for"),
        "{err}"
    );
    // Nothing changed: the same program on the link, the old maps pinned, no staging left.
    let after = tollgate::link_info::pinned_xdp_link(&link).expect("link");
    assert_eq!(before.prog_id, after.prog_id);
    assert!(!tollgate::pins::staging_dir(&w.dirs.pin_dir).exists());
    // The old sizes adopt the pins as they are, bindings and all.
    config(&w.lab).write(&w.config);
    let _agent = w.start();
    let s = status(&w);
    assert_eq!(s["adopted_pins"], true);
    assert_eq!(max_entries(&s, "BIND_V4"), 131072);
    assert!(s["bindings"].as_u64() >= Some(20), "{s}");
}
