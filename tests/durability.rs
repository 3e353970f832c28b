//! The state store (issue #12, findings 6 and 7): a change is one record appended to
//! `state.journal`, not a rewrite of `state.json`, and what the agent reported done survives
//! a `kill -9`. The full-disk refusals are in `exhaustion.rs` (with its tmpfs).

use std::{
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::{AgentDirs, tollgate_bin},
    exhaust::kernel_binding_v4,
    tokenlab::World,
};

/// The slot the agent gave identity `name`.
fn slot(dirs: &AgentDirs, name: &str) -> u32 {
    let v: serde_json::Value =
        serde_json::from_str(&dirs.cli_ok(&["identities", "--output", "json"])).expect("json");
    let row = v
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no identity {name}: {v}"));
    row["id"].as_u64().expect("id") as u32
}

/// Run-time binding addresses, away from the lab's own (198.19.0.0/16).
fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i)
}

/// A token identity with a slot: the client binds `erin` itself.
fn erin(w: &World) -> u32 {
    let token = w.issue("erin", "10m", "tok-erin");
    let (code, body) = w.http(&w.lab.client, "POST", &token);
    assert_eq!(code, 200, "{body}");
    slot(&w.dirs, "erin")
}

#[test]
fn a_bind_appends_one_small_record_and_leaves_state_json_alone() {
    let w = World::new(None);
    let _agent = w.start();
    let id = erin(&w);
    let state = w.dirs.state_dir.join("state.json");
    let journal = w.dirs.state_dir.join("state.journal");
    w.dirs
        .cli_ok(&["bind", &addr(0).to_string(), "--identity", "erin"]);
    // Past the mtime granularity, so a rewrite would show.
    std::thread::sleep(Duration::from_millis(50));
    let snapshot = |p: &std::path::Path| {
        let m = std::fs::metadata(p).expect("state.json");
        (m.ino(), m.modified().expect("mtime"), m.len())
    };
    let before = snapshot(&state);
    let journal_len = || std::fs::metadata(&journal).map_or(0, |m| m.len());
    let journal_before = journal_len();
    const BINDS: u32 = 40;
    for i in 1..=BINDS {
        w.dirs
            .cli_ok(&["bind", &addr(i).to_string(), "--identity", "erin"]);
    }
    assert_eq!(
        snapshot(&state),
        before,
        "a bind rewrote state.json (inode, mtime, size)"
    );
    let grown = journal_len().saturating_sub(journal_before);
    assert!(
        grown > 0 && grown < u64::from(BINDS) * 1024,
        "{BINDS} binds grew the journal by {grown} bytes (at most 1 KiB each)"
    );
    for i in 0..=BINDS {
        assert_eq!(kernel_binding_v4(&w.dirs, addr(i)), Some(id), "{}", addr(i));
    }
}

#[test]
fn every_bind_reported_before_a_kill_9_is_there_after_the_restart() {
    let w = World::new(None);
    let agent = w.start();
    erin(&w);
    let reported: Arc<Mutex<Vec<u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (reported, stop) = (Arc::clone(&reported), Arc::clone(&stop));
        let socket = w.dirs.socket.clone();
        std::thread::spawn(move || {
            for i in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let out = std::process::Command::new(tollgate_bin())
                    .arg("--socket")
                    .arg(&socket)
                    .args(["bind", &addr(i).to_string(), "--identity", "erin"])
                    .output()
                    .expect("tollgate bind");
                if out.status.success() {
                    reported.lock().expect("lock").push(i);
                }
            }
        })
    };
    // Mid-churn: some binds done, one probably in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reported.lock().expect("lock").len() < 60 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = agent.kill9();
    stop.store(true, Ordering::Relaxed);
    churn.join().expect("churn");
    let reported = reported.lock().expect("lock").clone();
    assert!(
        reported.len() >= 60,
        "only {} binds before the kill",
        reported.len()
    );

    let _agent = w.start();
    let id = slot(&w.dirs, "erin");
    let missing: Vec<String> = reported
        .iter()
        .filter(|i| kernel_binding_v4(&w.dirs, addr(**i)) != Some(id))
        .map(|i| addr(*i).to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} reported binds lost by a kill -9: {missing:?}\nfirst agent's log:\n{log}",
        missing.len(),
        reported.len()
    );
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.dirs.state_dir.join("state.json")).expect("state.json"),
    )
    .expect("state json");
    let held = state["bindings"].as_array().expect("bindings").len();
    assert!(held >= reported.len(), "state.json holds {held} bindings");
}
