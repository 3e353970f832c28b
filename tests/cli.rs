//! The CLI against a running agent: who may use the control socket, what the audit log
//! records, completions and the man page, `top --once`, and interactive `top` on a terminal
//! that stops taking output or goes away.

use std::time::Duration;

use tollgate_tests::{
    agent::AgentDirs,
    frames::send_frames,
    node::{World, frame, host4},
    pty::{Pty, wait_exit},
};

fn run_as_nobody(dirs: &AgentDirs, args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(tollgate_tests::agent::tollgate_bin())
        .arg("--socket")
        .arg(&dirs.socket)
        .args(args)
        .output()
        .expect("setpriv")
}

#[test]
fn only_root_and_the_group_may_use_the_control_socket() {
    let w = World::new();
    let _agent = w.start();
    // The state dir must be traversable for the test to reach the socket's own permissions.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&w.dirs.state_dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let mode = std::fs::metadata(&w.dirs.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
    // The file mode stops an unprivileged user at connect().
    let out = run_as_nobody(&w.dirs, &["status"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    // Even when the mode would let them in, the agent checks SO_PEERCRED and refuses.
    std::fs::set_permissions(&w.dirs.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod");
    let out = run_as_nobody(&w.dirs, &["quarantine", "acme", "--reason", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        err.contains("uid 65534") && err.contains("refused"),
        "{err}"
    );
    // Nothing happened, and root is served.
    let acme = w.identity("acme");
    assert!(acme["quarantined"].is_null(), "{acme}");
    w.dirs.cli_ok(&["status"]);
}

#[test]
fn audit_log_records_who_what_why() {
    let w = World::new();
    let _agent = w.start();
    w.dirs
        .cli_ok(&["quarantine", "acme", "--reason", "e2e audit", "--for", "1h"]);
    w.dirs.cli_ok(&["release", "acme", "--reason", "cleared"]);
    let h = host4(&w.lab, 200).to_string();
    w.dirs
        .cli_ok(&["bind", &h, "--identity", "acme", "--for", "5m"]);
    w.dirs.cli_ok(&["unbind", &h]);
    let log = std::fs::read_to_string(w.dirs.state_dir.join("audit.log")).expect("audit log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let actions: Vec<&str> = lines.iter().filter_map(|l| l["action"].as_str()).collect();
    assert_eq!(
        actions,
        ["start", "quarantine", "release", "bind", "unbind"],
        "{log}"
    );
    let q = &lines[1];
    assert_eq!(q["who"]["uid"], 0);
    assert!(q["who"]["pid"].as_i64().is_some());
    assert_eq!(q["reason"], "e2e audit");
    assert_eq!(q["detail"]["identity"], "acme");
    // Bad requests change nothing and are not recorded as changes.
    let out = w.dirs.cli(&["bind", "198.18.0.0/8", "--identity", "acme"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host bits"));
    let out = w.dirs.cli(&["quarantine", "nobody-here", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let log2 = std::fs::read_to_string(w.dirs.state_dir.join("audit.log")).expect("audit log");
    assert_eq!(log2.lines().count(), lines.len());
}

#[test]
fn completions_and_man_page_come_from_the_cli_definitions() {
    let bin = tollgate_tests::agent::tollgate_bin();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .output()
            .expect("run");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bash = run(&["completions", "bash"]);
    for verb in ["quarantine", "explain", "uninstall", "--output"] {
        assert!(bash.contains(verb), "bash completion lacks {verb}");
    }
    assert!(run(&["completions", "zsh"]).contains("#compdef tollgate"));
    let man = run(&["man"]);
    assert!(
        man.contains(".TH tollgate") && man.contains("quarantine"),
        "{}",
        &man[..200.min(man.len())]
    );
    // Usage errors are exit 2, with clap's message.
    let out = std::process::Command::new(&bin)
        .args(["quarantine"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn top_once_reports_rates_from_the_running_agent() {
    let w = World::new();
    let _agent = w.start();
    let lab = &w.lab;
    let acme = host4(lab, 11);
    let frames: Vec<Vec<u8>> = (0..50)
        .map(|_| frame(acme, w.dst(acme), 8000, "tcp"))
        .collect();
    // Traffic during the snapshot's interval, from another thread.
    let sender = std::thread::scope(|s| {
        let h = s.spawn(|| {
            for _ in 0..10 {
                send_frames(&lab.client, &lab.client_if, &frames);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let out = w
            .dirs
            .cli_ok(&["top", "--once", "--interval", "0.5", "--output", "json"]);
        let _ = h.join();
        out
    });
    let v: serde_json::Value = serde_json::from_str(&sender).expect("top json");
    assert!(v["interval_s"].as_f64().is_some_and(|s| s > 0.4), "{v}");
    let ids = v["identities"].as_array().expect("identities");
    let acme_row = ids
        .iter()
        .find(|r| r["name"] == "acme")
        .expect("acme in top");
    assert!(
        acme_row["pass_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "{acme_row}"
    );
    assert_eq!(ids[0]["name"], "acme", "sorted by rate: {v}");
    // Without a terminal and without --once it refuses clearly.
    let out = w.dirs.cli(&["top"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `tollgate top` on a pseudo-terminal against the running agent, drawing every 0.2 s.
fn top_on(w: &World, pty: &Pty) -> std::process::Child {
    let mut cmd = std::process::Command::new(tollgate_tests::agent::tollgate_bin());
    cmd.arg("--socket")
        .arg(&w.dirs.socket)
        .args(["top", "--interval", "0.2"]);
    let child = pty.spawn(&mut cmd);
    assert!(
        pty.wait_for_output(Duration::from_secs(10)),
        "top drew nothing on its terminal"
    );
    child
}

/// SIGTERM, SIGHUP and SIGINT each end `top`, even when its terminal stopped taking output
/// (an ssh session whose network died: every write blocks), and the terminal is given back
/// out of raw mode. Before: the blocked write was retried after the signal, forever.
#[test]
fn top_exits_on_sigterm_sighup_and_sigint_even_with_its_output_stalled() {
    let w = World::new();
    let _agent = w.start();
    for (name, sig) in [
        ("SIGTERM", libc::SIGTERM),
        ("SIGHUP", libc::SIGHUP),
        ("SIGINT", libc::SIGINT),
    ] {
        let pty = Pty::open(120, 40);
        let mut top = top_on(&w, &pty);
        assert!(
            !pty.is_cooked(),
            "top did not take the terminal ({:?}): {:?}",
            top.try_wait(),
            pty.take_output()
        );
        pty.stop_output();
        // Several refreshes: top is now blocked writing to the stopped terminal.
        std::thread::sleep(Duration::from_millis(1500));
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
        unsafe { libc::kill(top.id() as libc::pid_t, sig) };
        let (status, ticks) = wait_exit(&mut top, Duration::from_secs(2));
        let status =
            status.unwrap_or_else(|| panic!("top ignored {name} for 2 s ({ticks} CPU ticks)"));
        assert!(status.success(), "top after {name}: {status}");
        assert!(pty.is_cooked(), "{name}: top left the terminal in raw mode");
    }
}

/// `top` whose terminal goes away (its pane or session closed: the other end of the pty is
/// closed, and no SIGHUP comes since it is not the controlling terminal) exits within 2 s,
/// without spinning on the dead terminal meanwhile. Before: it read the dead terminal in a
/// loop at full CPU until SIGKILL.
#[test]
fn top_exits_without_spinning_when_its_terminal_goes_away() {
    let w = World::new();
    let _agent = w.start();
    let mut pty = Pty::open(100, 30);
    let mut top = top_on(&w, &pty);
    std::thread::sleep(Duration::from_millis(500));
    pty.close_master();
    let (status, ticks) = wait_exit(&mut top, Duration::from_secs(2));
    // 100 ticks are one CPU-second: a spin over the 2 s would be ~200.
    assert!(ticks < 50, "top burnt {ticks} CPU ticks on a dead terminal");
    assert!(
        status.is_some(),
        "top still running 2 s after its terminal went away ({ticks} CPU ticks)"
    );
}
