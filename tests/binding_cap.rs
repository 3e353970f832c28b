//! #12 finding 7: one identity must not fill the binding table. Token bindings of one
//! identity stop at `tokens.max_bindings_per_identity` (default 64) with `binding_cap`
//! (HTTP 429) while other identities still bind, and a rebind that changes nothing writes
//! nothing: no state save, no audit line.

use std::time::Duration;

use tollgate_tests::tokenlab::World;

/// The documented default of `tokens.max_bindings_per_identity`.
const CAP: usize = 64;

fn gateway_bind(w: &World, token: &str, addr: &str) -> std::process::Output {
    w.dirs.cli(&["bind", "--token", token, "--addr", addr])
}

#[test]
fn one_identity_stops_at_its_binding_cap_and_a_repeated_bind_writes_nothing() {
    let w = World::new(None);
    let _agent = w.start();
    // Both state files: a change is a journal record, a compaction a new snapshot.
    let state = w.dirs.state_dir.join("state.json");
    let journal = w.dirs.state_dir.join("state.journal");
    let audit = w.dirs.state_dir.join("audit.log");

    // The first bind writes; the same bind again (same token, address, expiry) writes nothing.
    let first = w.issue("rotator", "10m", "rot-0");
    let out = gateway_bind(&w, &first, "2001:db8:7::");
    assert!(out.status.success(), "{out:?}");
    // Past the mtime granularity, so a rewrite would show.
    std::thread::sleep(Duration::from_millis(50));
    // `None` for a journal not made yet.
    let meta = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().expect("mtime"), m.len()))
    };
    let state_before = meta(&state);
    assert!(state_before.is_some(), "no state.json");
    let journal_before = meta(&journal);
    let audit_before = std::fs::read(&audit).expect("audit.log");
    for _ in 0..100 {
        let out = gateway_bind(&w, &first, "2001:db8:7::");
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(
        meta(&state),
        state_before,
        "an idempotent rebind rewrote state.json"
    );
    assert_eq!(
        meta(&journal),
        journal_before,
        "an idempotent rebind appended to state.journal"
    );
    assert_eq!(
        std::fs::read(&audit).expect("audit.log"),
        audit_before,
        "an idempotent rebind wrote to the audit log"
    );

    // One identity, many tokens, one address each: up to the cap, then refused.
    for i in 1..CAP {
        let t = w.issue("rotator", "10m", &format!("rot-{i}"));
        let out = gateway_bind(&w, &t, &format!("2001:db8:7::{i:x}"));
        assert!(out.status.success(), "bind {i}: {out:?}");
    }
    let over = w.issue("rotator", "10m", "rot-over");
    let out = gateway_bind(&w, &over, "2001:db8:7::ffff");
    assert!(!out.status.success(), "bind past the cap: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("binding_cap"), "{err}");
    // The same through the bind listener: 429 with the label, from a client's own address.
    let over_http = w.issue("rotator", "10m", "rot-over-http");
    let (code, body) = w.http(&w.lab.client, "POST", &over_http);
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["reason"], "binding_cap", "{body}");
    // Another identity still binds.
    let other = w.issue("bystander", "10m", "by-0");
    let (code, body) = w.http(&w.lab.client, "POST", &other);
    assert_eq!(code, 200, "{body}");
    let out = gateway_bind(&w, &w.issue("bystander", "10m", "by-1"), "2001:db8:8::1");
    assert!(out.status.success(), "{out:?}");
}
