//! Wall-clock steps (issue #12, finding 2): only the AGENT's wall clock is stepped, with
//! libfaketime (`LD_PRELOAD`, a timestamp file rewritten by the test, CLOCK_MONOTONIC and
//! CLOCK_BOOTTIME left alone), never the machine's. A forward step corrected seconds later
//! must undo no revocation and no timed quarantine, and is reported (`clock_step`); a spent
//! daily quota stays spent across a day-long step and back.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{Agent, AgentDirs, identity_counters},
    config::{Config, Controller, Endpoint, Identity, Plan},
    frames::FrameBlaster,
    lab::Lab,
    tokenlab::World,
};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// The agent's wall-clock offset, read by libfaketime on every call (`FAKETIME_NO_CACHE`).
/// The preload is set in this process's environment, which every thread's children inherit:
/// `SERIAL` keeps the tests that install one from overlapping (cargo runs a test binary's
/// tests on several threads), or one test's agent would start on another's offset.
struct FakeClock {
    file: PathBuf,
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl FakeClock {
    /// Every process the test starts from here on (the agent, the CLI) runs on the offset
    /// in the file; the test process itself is not preloaded.
    fn install(w: &World) -> FakeClock {
        FakeClock::install_beside(&w.dirs.state_dir)
    }

    /// As [`FakeClock::install`], the offset file beside `state_dir`.
    fn install_beside(state_dir: &Path) -> FakeClock {
        assert!(
            std::path::Path::new(LIBFAKETIME).exists(),
            "{LIBFAKETIME} missing: `cargo xtask setup` installs libfaketime"
        );
        // A test that panicked while holding it leaves nothing set (Drop ran): go on.
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let file = state_dir.with_extension("faketime");
        std::fs::write(&file, "+0\n").expect("faketime file");
        // SAFETY: `SERIAL` keeps the other tests of this binary, the only ones that set or
        // read these variables, out while they are set.
        unsafe {
            std::env::set_var("LD_PRELOAD", LIBFAKETIME);
            std::env::set_var("FAKETIME_TIMESTAMP_FILE", &file);
            std::env::set_var("FAKETIME_NO_CACHE", "1");
            std::env::set_var("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        FakeClock {
            file,
            _serial: serial,
        }
    }

    fn set(&self, offset: &str) {
        std::fs::write(&self.file, format!("{offset}\n")).expect("faketime file");
    }

    /// +`offset` for three seconds, then back.
    fn step_and_back(&self, offset: &str) {
        self.set(offset);
        std::thread::sleep(Duration::from_secs(3));
        self.set("+0");
        std::thread::sleep(Duration::from_millis(1500));
    }
}

impl Drop for FakeClock {
    fn drop(&mut self) {
        // SAFETY: as in `install`.
        unsafe {
            std::env::remove_var("LD_PRELOAD");
            std::env::remove_var("FAKETIME_TIMESTAMP_FILE");
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

#[test]
fn a_forward_step_and_back_keeps_a_revocation_and_a_timed_quarantine_and_is_reported() {
    let w = World::new(None);
    let clock = FakeClock::install(&w);
    let agent = w.start();
    let client = &w.lab.client;
    // A revoked token (its binding would have run 5 minutes).
    let revoked = w.issue("bob", "5m", "tok-step-revoked");
    assert_eq!(w.http(client, "POST", &revoked).0, 200);
    w.dirs.cli_ok(&[
        "token",
        "revoke",
        "--token-id",
        "tok-step-revoked",
        "--reason",
        "leaked",
    ]);
    clock.step_and_back("+3h");
    let (code, body) = w.http(client, "POST", &revoked);
    assert_eq!(
        (code, body["reason"].as_str()),
        (403, Some("revoked")),
        "a revoked token bound again after a wall-clock step: {body}"
    );
    // A client in a 2-hour quarantine (the same client address: its traffic, binds
    // included, is dropped from here on).
    let token = w.issue("carol", "5m", "tok-step-carol");
    assert_eq!(w.http(client, "POST", &token).0, 200);
    assert!(w.model_answers(client, Duration::from_secs(2)));
    w.dirs
        .cli_ok(&["quarantine", "carol", "--for", "2h", "--reason", "e2e"]);
    assert!(!w.model_answers(client, Duration::from_millis(700)));

    clock.step_and_back("+3h");
    assert!(
        !w.model_answers(client, Duration::from_millis(700)),
        "the 2-hour quarantine let traffic through after a wall-clock step: {}",
        agent.stderr()
    );
    let audit = w.audit();
    assert!(
        !audit.iter().any(|l| l["action"] == "release"),
        "a release was audited: {audit:?}"
    );
    let steps: Vec<_> = audit
        .iter()
        .filter(|l| l["action"] == "clock_step")
        .collect();
    assert!(!steps.is_empty(), "no clock_step audited: {audit:?}");
    // The step there (about +3 h) is the one reported first.
    let first = steps[0]["detail"]["step_ms"].as_i64();
    assert!(
        first.is_some_and(|s| s > 3 * 3600 * 1000 - 60_000),
        "{:?}",
        steps[0]
    );
    assert!(w.status().to_string().contains("carol"));
}

/// Seconds the kernel's binding of the client has left, from `identities` (which reads the
/// binding's `expires_ns` from the pinned table against CLOCK_BOOTTIME).
fn kernel_expires_in_s(w: &World) -> u64 {
    let text = w.dirs.cli_ok(&["identities"]);
    let at = text.find("expires in ").unwrap_or_else(|| panic!("{text}")) + "expires in ".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or_else(|_| panic!("{text}"))
}

#[test]
fn a_backward_step_and_a_reload_do_not_extend_a_bindings_kernel_expiry() {
    let w = World::new(None);
    let clock = FakeClock::install(&w);
    let _agent = w.start();
    let client = &w.lab.client;
    let token = w.issue("bob", "60s", "tok-step-60s");
    assert_eq!(w.http(client, "POST", &token).0, 200);
    let before = kernel_expires_in_s(&w);
    assert!(before <= 60, "{before}");
    clock.set("-1h");
    std::thread::sleep(Duration::from_millis(1500));
    w.dirs.cli_ok(&["reload"]);
    let after = kernel_expires_in_s(&w);
    clock.set("+0");
    assert!(
        after <= before,
        "a reload on a wall clock stepped back re-armed the binding: {before}s left before, {after}s after"
    );
}

/// The day's spend of `identity` in bytes, from `tollgate quota show`.
fn day_spent(dirs: &AgentDirs, identity: &str) -> u64 {
    let shown: serde_json::Value = serde_json::from_str(&dirs.cli_ok(&[
        "quota",
        "show",
        "--identity",
        identity,
        "--output",
        "json",
    ]))
    .expect("json");
    shown[0]["day"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{shown}"))
}

#[test]
fn a_spent_daily_quota_stays_spent_across_a_day_long_step_and_back() {
    tollgate_tests::require_root();
    // Not in the last minutes of a UTC day: the real day's end must not roll the window
    // under the test (bounded: at most two minutes of waiting).
    let into_day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        % 86_400;
    if into_day > 86_400 - 90 {
        std::thread::sleep(Duration::from_secs(86_400 - into_day + 2));
    }
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let o = lab.client_v4.octets();
    let metered = [o[0], o[1], o[2], 12];
    let config = Config::new(&[&lab.server_if])
        .controller(Controller {
            interval_ms: Some(250),
            ..Controller::no_gpu()
        })
        .plan(Plan {
            quota_day_bytes: Some(30_000),
            ..Plan::new("metered")
        })
        .endpoint(Endpoint::udp("model", 7000, &["customer"]))
        .identity(Identity::new(
            "metered",
            "customer",
            "metered",
            &[IpAddr::from(metered)],
        ))
        .write(&dirs.state_dir.join("tollgate.toml"));
    let clock = FakeClock::install_beside(&dirs.state_dir);
    let agent = Agent::launch(
        &lab.server,
        &dirs,
        &[
            "--config",
            config.to_str().expect("path"),
            "--mode",
            "native",
        ],
    );
    let id = dirs.identity_slot("metered");
    // 100-byte frames at 200/s: 20 kB/s, the 30 kB daily quota gone in 1.5 s.
    let frame = PacketBuilder::v4(metered, lab.server_v4.octets())
        .udp(40000, 7000)
        .payload(58)
        .build();
    let blast = FrameBlaster::start(&lab.client, &lab.client_if, frame, 200);
    std::thread::sleep(Duration::from_secs(3));
    let audit = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(dirs.state_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let exhausted = audit()
        .into_iter()
        .find(|l| l["action"] == "quota_exhausted")
        .unwrap_or_else(|| panic!("no quota_exhausted: {}", agent.stderr()));
    assert_eq!(exhausted["detail"]["window"], "day");
    let spent = day_spent(&dirs, "metered");
    assert!(spent >= 30_000, "{spent}");
    // A day ahead for four seconds, while the identity keeps sending: still over quota.
    let before = identity_counters(&dirs, id);
    clock.set("+1d");
    std::thread::sleep(Duration::from_secs(4));
    let during = identity_counters(&dirs, id);
    let spent_during = day_spent(&dirs, "metered");
    clock.set("+0");
    std::thread::sleep(Duration::from_millis(1500));
    let after = identity_counters(&dirs, id);
    let spent_after = day_spent(&dirs, "metered");
    let sent = blast.stop();
    let log = audit();
    assert!(
        !log.iter().any(|l| l["action"] == "quota_reset"),
        "the daily quota was reset by a wall-clock step: {:?}",
        log.iter()
            .filter(|l| l["action"].as_str().is_some_and(|a| a.starts_with("quota")))
            .collect::<Vec<_>>()
    );
    // Nothing passed beyond what was already spent (one interval's 5 kB of slack at most,
    // which the flag set before the step leaves at 0).
    assert!(
        during.passed.bytes <= before.passed.bytes + 5_000
            && after.passed.bytes <= before.passed.bytes + 5_000,
        "passed across the step: {} -> {} -> {} bytes (sent {sent} frames)",
        before.passed.bytes,
        during.passed.bytes,
        after.passed.bytes
    );
    assert!(
        during.dropped.packets > before.dropped.packets + 300,
        "not dropped during the step: {before:?} -> {during:?}"
    );
    assert!(
        spent_during >= spent && spent_after >= spent,
        "quota shows the day unspent: {spent} -> {spent_during} -> {spent_after}"
    );
    assert!(
        log.iter().any(|l| l["action"] == "clock_step"),
        "no clock_step audited"
    );
}
