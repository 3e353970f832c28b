//! Wall-clock steps (issue #12, finding 2): only the AGENT's wall clock is stepped, with
//! libfaketime (`LD_PRELOAD`, a timestamp file rewritten by the test, CLOCK_MONOTONIC and
//! CLOCK_BOOTTIME left alone), never the machine's. A forward step corrected seconds later
//! must undo no revocation and no timed quarantine, and is reported (`clock_step`).

use std::{path::PathBuf, time::Duration};

use tollgate_tests::tokenlab::World;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// The agent's wall-clock offset, read by libfaketime on every call (`FAKETIME_NO_CACHE`).
struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    /// Every process the test starts from here on (the agent, the CLI) runs on the offset
    /// in the file; the test process itself is not preloaded.
    fn install(w: &World) -> FakeClock {
        assert!(
            std::path::Path::new(LIBFAKETIME).exists(),
            "{LIBFAKETIME} missing: `cargo xtask setup` installs libfaketime"
        );
        let file = w.dirs.state_dir.with_extension("faketime");
        std::fs::write(&file, "+0\n").expect("faketime file");
        // SAFETY: the tests of this binary run one at a time (--test-threads=1), and no
        // other thread reads the environment while it is set.
        unsafe {
            std::env::set_var("LD_PRELOAD", LIBFAKETIME);
            std::env::set_var("FAKETIME_TIMESTAMP_FILE", &file);
            std::env::set_var("FAKETIME_NO_CACHE", "1");
            std::env::set_var("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        FakeClock { file }
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
