//! `cargo xtask demo`: a GPU node in a lab of network namespaces, protected by the real
//! agent, with an internal service, a partner, a customer and an attacker as its clients.
//!
//! The GPU node runs a small OpenAI-style HTTP server that streams tokens (the model server
//! stand-in) on TCP 8000, and tollgate on the embedded XDP program with a demo configuration
//! and the simulated GPU source. The internal service is bound by its /24 in the
//! configuration; the partner and the customer bind with real tokens over HTTPS; the attacker
//! never binds. After 10 s of normal traffic the GPU saturates and the attacker floods for
//! 15 s, then the node recovers for 10 s. One line a second says what the kernel admitted and
//! dropped per identity; the end is a table per identity and checks of what must hold.
//!
//! Everything is bounded in time and torn down by the lab's guards, also on SIGINT/SIGTERM
//! (the handler only sets a flag: every loop stops, `main` returns, the guards run). Only
//! addresses inside the lab (198.18.0.0/15) are ever targets.

mod fleet;
mod model_server;
mod report;
mod traffic;
mod world;

use std::{
    process::{Command, ExitCode},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::{Agent, AgentDirs, tollgate_bin},
    frames::FrameBlaster,
    lab::Lab,
    tokenlab::{BIND_PORT, MODEL_PORT, TokenKit},
};

use crate::{
    model_server::{CHUNKS, ModelServer},
    report::{Pd, Snap, gpu_state, header, metrics_excerpt, n, report},
    traffic::{
        ATTACKER_REQUESTS_PER_SECOND, FLOOD_BIND_PPS, FLOOD_MODEL_PPS, REQUESTS_PER_SECOND, Tally,
        client_loop, mac, syn_frame,
    },
    world::{
        ANON_BURST, ANON_PPS, ATTACKER, CUSTOMER, GPU_CALM, GPU_HOT, IDENTITY, INTERNAL,
        INTERVAL_MS, METRICS, PARTNER, PLANS, RECOVER_AFTER, RECOVER_AT, SATURATE_AT, StopLoops,
        WHO, World, share,
    },
};

// The timeline.
const NORMAL: Duration = Duration::from_secs(10);
const SATURATED: Duration = Duration::from_secs(15);
const RECOVERED: Duration = Duration::from_secs(10);
/// No loop of the demo runs longer than this after the lab is up, whatever happens.
const HARD_LIMIT: Duration = Duration::from_secs(120);

/// Set by SIGINT/SIGTERM.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Set when the timeline is over (or interrupted): every loop stops.
pub static FINISHED: AtomicBool = AtomicBool::new(false);
/// The phase the timeline is in (index into PHASES).
pub static PHASE: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe; `sa` is a
    // zeroed, then filled, sigaction that outlives the calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_RESTART;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn running() -> bool {
    !interrupted() && !FINISHED.load(Ordering::SeqCst)
}

/// Sleeps `d`, or less if the demo is interrupted.
fn nap(d: Duration) {
    let end = Instant::now() + d;
    while !interrupted() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

fn main() -> ExitCode {
    install_signal_handlers();
    tollgate_tests::require_root();
    let started = Instant::now();
    let result = if std::env::args().any(|a| a == "--fleet") {
        fleet::run()
    } else {
        run()
    };
    let took = started.elapsed().as_secs();
    match result {
        _ if interrupted() => {
            println!("\ninterrupted: the lab is torn down (namespaces, agent, pins)");
            ExitCode::from(130)
        }
        Ok(true) => {
            println!("\ndemo finished in {took} s; the lab is torn down");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("\ndemo finished in {took} s, but a check failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<bool> {
    println!("== tollgate demo: identity-bound enforcement on a GPU node ==\n");
    println!("Building the lab: a GPU node and four clients, each in its own network namespace.");
    // The customer is the lab's own client; the others come in on their own veths and /24s.
    let lab = Lab::new();
    let clients = [
        lab.add_nth_client(1),
        lab.add_nth_client(2),
        lab.add_nth_client(3),
    ];
    let dirs = AgentDirs::new();
    let kit = TokenKit::new(&dirs, lab.server_v4);
    let gpu_file = dirs.state_dir.join("gpu-simulated.json");
    let w = World {
        dirs,
        kit,
        gpu_file,
        clients,
        lab,
    };
    let server = &w.lab.server;
    println!(
        "  GPU node   {:<22} model server on :{MODEL_PORT}, token bind listener on :{BIND_PORT}",
        server.name()
    );
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let what = match who {
            INTERNAL => "internal service: bound by its /24 in the configuration",
            PARTNER => "partner: binds with a token (class partner, plan partner)",
            CUSTOMER => "customer: binds with a token (class customer, plan customer)",
            _ => "attacker: no token, never bound",
        };
        println!(
            "  {:<10} {:<22} {:<14} {what}",
            WHO[who],
            w.client_ns(who).name(),
            w.client_v4(who).to_string()
        );
    }

    let model = ModelServer::start(server)?;
    // Dropped before the model server, which waits for the loops to end.
    let _stop_loops = StopLoops;
    w.gpu(GPU_CALM)?;
    let config = w.write_config()?;
    let check = Command::new(tollgate_bin())
        .args(["config", "check"])
        .arg(&config)
        .output()?;
    anyhow::ensure!(
        check.status.success(),
        "the demo configuration is refused: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    println!(
        "\nStarting tollgate on the GPU node (XDP, native mode, on {} interfaces), config {}",
        w.interfaces().len(),
        config.display()
    );
    let config_arg = config.to_str().unwrap_or_default().to_owned();
    let agent = Agent::launch(server, &w.dirs, &["--config", &config_arg]);
    println!("  attached; enforcing. Plans (packets/s per identity, burst):");
    for p in &PLANS {
        println!(
            "    {:<9} priority {:>3}  {:>5} pkt/s, burst {:>4}",
            p.name, p.priority, p.pps, p.burst
        );
    }
    println!(
        "  Unbound sources: dropped on :{MODEL_PORT}; on :{BIND_PORT} each /24 gets {ANON_PPS} pkt/s (burst {ANON_BURST})."
    );
    println!(
        "  Metrics, while the demo runs:  ip netns exec {} curl -s http://{METRICS}/metrics",
        server.name()
    );

    if interrupted() {
        return Ok(false);
    }
    // Binds, with real tokens over HTTPS, from the clients' own namespaces.
    println!(
        "\nBinding with tokens (tollgate token issue, then curl POST https://{}:{BIND_PORT}/v1/bind):",
        w.lab.server_v4
    );
    for (who, class) in [(PARTNER, "partner"), (CUSTOMER, "customer")] {
        let token = w.kit.issue(IDENTITY[who], class, class, "15m");
        let (code, body) = w.kit.bind(w.client_ns(who), &token);
        anyhow::ensure!(
            code == 200 || interrupted(),
            "{} could not bind: HTTP {code} {body}",
            WHO[who]
        );
        println!(
            "  {:<9} HTTP {code}: {} bound as {} until unix {}",
            WHO[who], body["address"], body["identity"], body["expires_unix"]
        );
    }
    if interrupted() {
        return Ok(false);
    }
    let listed: serde_json::Value =
        serde_json::from_str(&w.dirs.cli_ok(&["identities", "--output", "json"]))?;
    let mut ids = [0u32; 3];
    for (i, name) in IDENTITY.iter().enumerate() {
        ids[i] = listed
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == *name))
            .and_then(|r| r["id"].as_u64())
            .ok_or_else(|| anyhow::anyhow!("identity {name} is not listed: {listed}"))?
            as u32;
    }

    // The attacker's frames, addressed like real ones.
    let attacker_ns = w.client_ns(ATTACKER);
    let attacker_if = w.clients[2].client_if.clone();
    let src_mac = mac(attacker_ns, &attacker_if)?;
    let dst_mac = mac(server, &w.clients[2].server_if)?;
    let flood_model = syn_frame(&w, MODEL_PORT, src_mac, dst_mac);
    let flood_bind = syn_frame(&w, BIND_PORT, src_mac, dst_mac);

    // Traffic: every client sends completions requests for the whole timeline.
    let tallies: [Arc<Tally>; 4] = Default::default();
    let mut loops = Vec::new();
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let (pace, connect) = if who == ATTACKER {
            (ATTACKER_REQUESTS_PER_SECOND, Duration::from_millis(500))
        } else {
            (REQUESTS_PER_SECOND, Duration::from_secs(2))
        };
        loops.push(client_loop(
            w.client_ns(who),
            w.model_addr(),
            pace,
            connect,
            Arc::clone(&tallies[who]),
        ));
    }
    println!(
        "\nTraffic: internal, partner and customer each send {REQUESTS_PER_SECOND} streaming completions/s \
         (POST /v1/completions, {CHUNKS} tokens each); the attacker tries {ATTACKER_REQUESTS_PER_SECOND}/s without a token."
    );

    let durations = [NORMAL, SATURATED, RECOVERED];
    // A snapshot at the start of each phase, then one at the end.
    let mut marks: Vec<Snap> = Vec::new();
    let global_before = agent.counters();
    let mut flood: Vec<FrameBlaster> = Vec::new();
    let mut during = Vec::new();
    println!(
        "\nEvery second: packets per second the XDP program admitted (pass/s) and dropped (drop/s) \
         from each identity, read from the kernel's counters; the GPU as the agent sees it."
    );
    let timeline_start = Instant::now();
    for (phase, length) in durations.iter().enumerate() {
        if interrupted() {
            break;
        }
        match phase {
            0 => {
                println!(
                    "\n-- Phase 1/3: normal ({} s). GPU 0 at {:.0}%: every plan has its whole budget; the attacker's \
                     requests die in XDP (unbound).",
                    NORMAL.as_secs(),
                    GPU_CALM * 100.0
                );
            }
            1 => {
                w.gpu(GPU_HOT)?;
                println!(
                    "\n-- Phase 2/3: GPU saturated + attacker flood ({} s).\n   `tollgate gpu simulate --util {GPU_HOT}`: GPU 0 at {:.0}% (saturate_at {:.0}%). \
                     Within one controller interval ({INTERVAL_MS} ms) the model endpoint is held back:",
                    SATURATED.as_secs(),
                    GPU_HOT * 100.0,
                    SATURATE_AT * 100.0
                );
                for p in &PLANS {
                    let s = share(p.priority);
                    println!(
                        "     {:<9} (priority {:>3}) keeps {:>3.0}% of its budget: {:>5.0} pkt/s",
                        p.name,
                        p.priority,
                        s * 100.0,
                        s * f64::from(p.pps)
                    );
                }
                let forged = {
                    let a = w.kit.issue("mallory", "internal", "internal", "15m");
                    let b = w.kit.issue("someone-else", "customer", "customer", "15m");
                    let (head, _) = a.rsplit_once('.').unwrap_or((&a, ""));
                    let (_, sig) = b.rsplit_once('.').unwrap_or(("", &b));
                    format!("{head}.{sig}")
                };
                let (code, body) = w.kit.bind(attacker_ns, &forged);
                println!(
                    "   The attacker tries to bind with a forged token (claims class internal): HTTP {code}, reason {}.",
                    body["reason"]
                );
                flood.push(FrameBlaster::start(
                    attacker_ns,
                    &attacker_if,
                    flood_model.clone(),
                    FLOOD_MODEL_PPS,
                ));
                flood.push(FrameBlaster::start(
                    attacker_ns,
                    &attacker_if,
                    flood_bind.clone(),
                    FLOOD_BIND_PPS,
                ));
                println!(
                    "   Then it floods: {} SYN/s at :{MODEL_PORT} and {} SYN/s at :{BIND_PORT}, from {}. XDP drops them before \
                     the TCP stack sees them; on :{BIND_PORT} its /24 gets {ANON_PPS} pkt/s.",
                    n(u64::from(FLOOD_MODEL_PPS)),
                    n(u64::from(FLOOD_BIND_PPS)),
                    w.client_v4(ATTACKER)
                );
            }
            _ => {
                for f in flood.drain(..) {
                    f.stop();
                }
                w.gpu(GPU_CALM)?;
                println!(
                    "\n-- Phase 3/3: recovered ({} s). Flood stopped; GPU 0 back at {:.0}%. After {RECOVER_AFTER} readings at or \
                     below {:.0}% (hysteresis: {} ms) every plan has its whole budget again.",
                    RECOVERED.as_secs(),
                    GPU_CALM * 100.0,
                    RECOVER_AT * 100.0,
                    RECOVER_AFTER * INTERVAL_MS
                );
            }
        }
        PHASE.store(phase, Ordering::SeqCst);
        header();
        let phase_start = Instant::now();
        let mut last = Snap::read(&w.dirs, &ids);
        marks.push(last);
        for second in 1..=length.as_secs() {
            let tick = phase_start + Duration::from_secs(second);
            nap(tick.saturating_duration_since(Instant::now()));
            if interrupted() {
                break;
            }
            let now = Snap::read(&w.dirs, &ids);
            let (d, secs) = now.since(&last);
            last = now;
            let cell = |p: Pd| {
                format!(
                    "{:>6.0} {:>6.0}",
                    p.pass as f64 / secs,
                    p.drop as f64 / secs
                )
            };
            println!(
                "  {:>3}s  {:<14}  {:>15}  {:>15}  {:>15}  {:>8.0} {:>8.0}",
                timeline_start.elapsed().as_secs(),
                gpu_state(&w.dirs),
                cell(d[INTERNAL]),
                cell(d[PARTNER]),
                cell(d[CUSTOMER]),
                d[ATTACKER].pass as f64 / secs,
                d[ATTACKER].drop as f64 / secs,
            );
        }
        if phase == 1 && !interrupted() {
            during = metrics_excerpt(server, true);
        }
    }
    let end = Snap::read(&w.dirs, &ids);
    marks.push(end);
    FINISHED.store(true, Ordering::SeqCst);
    drop(flood);
    for l in loops {
        let _ = l.join();
    }
    if interrupted() {
        return Ok(false);
    }
    let global = agent.counters().since(&global_before);
    let metrics = [during, metrics_excerpt(server, false)];
    report(
        &w,
        &model,
        &tallies,
        &marks,
        &global,
        &metrics,
        server.name(),
    )
}
