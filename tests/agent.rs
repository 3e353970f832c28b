//! The agent end to end: the real binary in a namespace lab, driven by its CLI, checked with
//! real frames sent through the veth and the kernel's own counters: `explain` against the
//! kernel, refused configurations, kill -9 and adoption, uninstall, incompatible pins, the
//! program's own log lines (`[node] kernel_log`).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use tollgate_tests::{
    agent::Agent,
    frames::send_frames,
    lab::Lab,
    node::{World, config, frame, host4, host6},
};

#[test]
fn explain_agrees_with_real_packets() {
    let w = World::new();
    let _agent = w.start();
    w.dirs
        .cli_ok(&["quarantine", "suspect", "--reason", "e2e: scraping"]);
    let lab = &w.lab;
    let (h, h6) = (|n| host4(lab, n), |n| host6(lab, n));
    let cases: Vec<(IpAddr, u16, &str, &str)> = vec![
        (h(10), 8000, "tcp", "bound"),
        (h6(10), 8000, "tcp", "bound"),
        (h(10), 9000, "tcp", "bound"),
        (h(10), 8001, "udp", "bound"),
        (h(11), 8000, "tcp", "bound"),
        (h6(11), 8000, "tcp", "bound"),
        (h(11), 9000, "tcp", "isolation"),
        (h6(11), 9000, "tcp", "isolation"),
        (h(11), 8002, "udp", "bound"),
        (h(11), 22, "tcp", "unprotected"),
        (h(11), 8001, "tcp", "unprotected"),
        (h(65), 8000, "tcp", "isolation"),
        (h(100), 8000, "tcp", "isolation"),
        (h(13), 8000, "tcp", "quarantined"),
        (h(13), 22, "tcp", "unprotected"),
        (h(199), 8000, "tcp", "unbound"),
        (h6(99), 8000, "tcp", "unbound"),
        (h(199), 8001, "udp", "unbound"),
        (h(199), 8443, "tcp", "anonymous"),
        (h6(99), 8443, "tcp", "anonymous"),
        (h(11), 8443, "tcp", "bound"),
        (h(12), 8000, "tcp", "bound"),
        (h(12), 8000, "tcp", "bound"),
        (h(12), 8000, "tcp", "packet_rate"),
        (h(198), 8443, "tcp", "anonymous"),
        (h(197), 8443, "tcp", "anonymous"),
        (h(196), 8443, "tcp", "anonymous_rate"),
    ];
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for (src, port, proto, want) in &cases {
        let (_, said) = w.explain(*src, *port, proto);
        let got = w.real_verdict(*src, *port, proto);
        if said != got || got != *want {
            failures.push(format!(
                "{src} -> {port}/{proto}: explain said {said}, the kernel counted {got}, expected {want}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Each malformed config: (what, the TOML, a fragment of the error). Each is the builder's
/// good config with one edit to its text: a typed builder cannot write a file that is wrong
/// in these ways.
fn malformed(lab: &Lab) -> Vec<(&'static str, String, &'static str)> {
    let good = config(lab).render();
    let swap = |from: &str, to: &str| {
        assert!(good.contains(from), "{from:?} not in the config");
        good.replacen(from, to, 1)
    };
    vec![
        (
            "unknown top-level key",
            ["colour = \"blue\"", &good].join("\n"),
            "colour",
        ),
        (
            "unknown endpoint key",
            swap("anonymous = true", "anonymous = true\nrate = 5"),
            "rate",
        ),
        (
            "wrong type",
            swap("weight = 2.0", "weight = \"heavy\""),
            "weight",
        ),
        (
            "syntax error",
            swap("[[plans]]\nname = \"slow\"", "[[plans]\nname = \"slow\""),
            "",
        ),
        (
            "burst below one packet",
            swap("packet_burst = 20", "packet_burst = 0"),
            "packet_burst",
        ),
        (
            "rate without burst",
            swap(
                "packets_per_second = 1\npacket_burst = 2",
                "packets_per_second = 1",
            ),
            "packet_burst",
        ),
        (
            "overlapping endpoints",
            swap("ports = [9000]", "ports = [8000]"),
            "overlap",
        ),
        (
            "unknown plan",
            swap("plan = \"slow\"", "plan = \"platinum\""),
            "platinum",
        ),
        (
            "unknown class",
            swap("class = \"partner\"", "class = \"vip\""),
            "vip",
        ),
        (
            "reversed port range",
            swap("\"8001-8002\"", "\"8002-8001\""),
            "8002-8001",
        ),
        ("port zero", swap("ports = [9000]", "ports = [0]"), "port"),
        (
            "tables beyond the node's memory",
            swap(
                "identities = 16384",
                "identities = 16777216\nkernel_memory_mib = 64",
            ),
            "more than this node allows: 64.0 MiB",
        ),
        (
            "identity slots below the floor",
            swap("identities = 16384", "identities = 3"),
            "limits.identities",
        ),
        ("host bits in a binding", swap("/26", "/24"), "host bits"),
        (
            "duplicate endpoint name",
            swap("name = \"admin\"", "name = \"vllm\""),
            "vllm",
        ),
        (
            "zero weight",
            swap("weight = 2.0", "weight = 0.0"),
            "weight",
        ),
        (
            "empty interfaces",
            swap(
                &["interfaces = [\"", &lab.server_if, "\"]"].concat(),
                "interfaces = []",
            ),
            "interfaces",
        ),
    ]
}

#[test]
fn malformed_configs_are_refused_and_change_nothing() {
    let w = World::new();
    let _agent = w.start();
    let lab = &w.lab;
    let probe = [
        (host4(lab, 11), 8000, "tcp"),
        (host4(lab, 11), 9000, "tcp"),
        (host4(lab, 199), 8000, "tcp"),
    ];
    let before: Vec<_> = probe
        .iter()
        .map(|(s, p, pr)| w.explain(*s, *p, pr))
        .collect();
    let good = std::fs::read_to_string(&w.config).expect("config");
    let cases = malformed(lab);
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for (what, text, fragment) in &cases {
        let bad = w.dirs.state_dir.join("bad.toml");
        std::fs::write(&bad, text).expect("write");
        let check = w
            .dirs
            .cli(&["config", "check", bad.to_str().expect("path")]);
        let msg = String::from_utf8_lossy(&check.stderr).into_owned();
        let located = msg.starts_with(&format!("{}:", bad.display()))
            && msg[bad.display().to_string().len() + 1..]
                .split(':')
                .next()
                .is_some_and(|l| l.parse::<usize>().is_ok());
        if check.status.code() != Some(5) || !msg.contains(fragment) || !located {
            failures.push(format!(
                "{what}: config check exited {:?}: {msg}",
                check.status.code()
            ));
        }
        // The running agent, asked to reload the same file, refuses it with the same words.
        std::fs::write(&w.config, text).expect("write");
        let reload = w.dirs.cli(&["reload"]);
        let rmsg = String::from_utf8_lossy(&reload.stderr).into_owned();
        if reload.status.code() != Some(5) || !rmsg.contains(fragment) {
            failures.push(format!(
                "{what}: reload exited {:?}: {rmsg}",
                reload.status.code()
            ));
        }
        std::fs::write(&w.config, &good).expect("restore");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing changed: explain says what it said, and real packets agree.
    let after: Vec<_> = probe
        .iter()
        .map(|(s, p, pr)| w.explain(*s, *p, pr))
        .collect();
    assert_eq!(before, after);
    for ((s, p, pr), (_, reason)) in probe.iter().zip(&after) {
        assert_eq!(w.real_verdict(*s, *p, pr), reason.as_str());
    }
    // And a good reload still works.
    w.dirs.cli_ok(&["reload"]);
}

#[test]
fn kill_dash_nine_keeps_enforcing_and_a_restart_adopts() {
    let w = World::new();
    let agent = w.start();
    w.dirs.cli_ok(&["quarantine", "suspect", "--reason", "e2e"]);
    let lab = &w.lab;
    let suspect = host4(lab, 13);
    let metered = host4(lab, 14);
    let dst = w.dst(suspect);
    // 1000 frames/s from each source for 3 s; the agent is killed after 1 s and restarted
    // after 2 s.
    // Ten of each per send: each call enters the namespace afresh, so batches keep the
    // offered rate above the metered plan's 200/s.
    let frames: Vec<Vec<u8>> = (0..10)
        .flat_map(|_| {
            [
                frame(suspect, dst, 8000, "tcp"),
                frame(metered, dst, 8000, "tcp"),
            ]
        })
        .collect();
    let start = Instant::now();
    let mut agent = Some(agent);
    let mut killed_at = None;
    let mut restarted = None;
    let mut before_kill = None;
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        let elapsed = start.elapsed();
        if elapsed >= Duration::from_secs(1) && killed_at.is_none() {
            before_kill = Some((w.identity("suspect"), w.identity("metered")));
            agent.take().expect("agent").kill9();
            killed_at = Some(elapsed);
        }
        if elapsed >= Duration::from_secs(2) && restarted.is_none() {
            restarted = Some(w.start());
        }
        send_frames(&lab.client, &lab.client_if, &frames);
        sent += 10;
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = start.elapsed().as_secs_f64();
    let (s0, m0) = before_kill.expect("counted before the kill");
    let s1 = w.identity("suspect");
    let m1 = w.identity("metered");
    eprintln!("sent {sent} frames per source in {secs:.2}s; suspect {s1}; metered {m1}");
    assert_eq!(
        s1["passed_packets"], 0,
        "a quarantined source got packets through"
    );
    assert!(
        s1["dropped_packets"].as_u64() >= Some(sent * 9 / 10),
        "{s1}"
    );
    let passed = m1["passed_packets"].as_u64().expect("passed");
    let limit = 200.0 * secs + 20.0;
    assert!(
        sent as f64 > limit * 1.5,
        "offered {sent}, not enough to test a {limit:.0} limit"
    );
    assert!(
        (passed as f64) <= limit * 1.05,
        "metered passed {passed}, limit {limit:.0}"
    );
    // Below the limit by what the sender's pauses (the kill, the restart) left unused: a
    // budget never saves more than its burst. Half shows it was never cut off.
    assert!(
        (passed as f64) >= limit * 0.5,
        "metered passed only {passed} of {limit:.0}"
    );
    // The counters went on from where they were: never back to zero.
    for (before, after) in [(&s0, &s1), (&m0, &m1)] {
        for k in ["passed_packets", "dropped_packets"] {
            assert!(
                after[k].as_u64() >= before[k].as_u64(),
                "{k} went back: {before} -> {after}"
            );
        }
    }
    let status: serde_json::Value =
        serde_json::from_str(&w.dirs.cli_ok(&["status", "--output", "json"])).expect("json");
    assert_eq!(status["adopted_pins"], true);
    assert_eq!(status["quarantined"], serde_json::json!(["suspect"]));
}

#[test]
fn uninstall_removes_every_pin_and_detaches() {
    let w = World::new();
    let agent = w.start();
    let out = w.dirs.cli_ok(&["uninstall"]);
    assert!(out.contains("uninstalled"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.dirs.pin_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !w.dirs.pin_dir.exists(),
        "pins left in {}",
        w.dirs.pin_dir.display()
    );
    let exit = agent.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        w.lab.server.xdp_attach(&w.lab.server_if).is_none(),
        "still attached"
    );
}

#[test]
fn pins_from_an_incompatible_build_are_refused_and_left_enforcing() {
    let w = World::new();
    let agent = w.start();
    w.dirs.cli_ok(&["quarantine", "suspect", "--reason", "e2e"]);
    agent.kill9();
    // Pretend another build made these pins: bump the layout marker.
    let layout = tollgate::pins::maps_dir(&w.dirs.pin_dir).join(tollgate_common::map_names::LAYOUT);
    let data = aya::maps::MapData::from_pin(&layout).expect("layout pin");
    let mut arr: aya::maps::Array<aya::maps::MapData, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("array");
    arr.set(0, 999, 0).expect("set layout");
    // A new agent refuses, says why, and touches nothing.
    let config = w.config.to_str().expect("path").to_owned();
    let out = w
        .lab
        .server
        .command(tollgate_tests::agent::tollgate_bin())
        .arg("run")
        .arg("--pin-dir")
        .arg(&w.dirs.pin_dir)
        .arg("--state-dir")
        .arg(&w.dirs.state_dir)
        .arg("--control-socket")
        .arg(&w.dirs.socket)
        .args(["--config", &config])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("incompatible build")
            && err.contains("version 999")
            && err.contains("tollgate uninstall"),
        "{err}"
    );
    assert_eq!(
        arr.get(&0, 0).expect("layout"),
        999,
        "the refused agent rewrote the marker"
    );
    // The old program still enforces the old policy.
    assert!(
        w.lab.server.xdp_attach(&w.lab.server_if).is_some(),
        "detached"
    );
    assert_eq!(
        w.real_verdict(host4(&w.lab, 13), 8000, "tcp"),
        "quarantined"
    );
}

/// `[node] kernel_log = "info"`: a frame the parser cannot classify is logged by the program
/// itself (target `kernel`), and still after a restart that adopts the pins: the program is
/// loaded afresh at the configured level and swapped onto the pinned link.
#[test]
fn kernel_log_lines_reach_the_agent_log_after_a_restart_adopts() {
    let w = World::new();
    let mut c = config(&w.lab);
    c.node.kernel_log = Some("info".into());
    let path = c.write(&w.dirs.state_dir.join("kernel-log.toml"));
    let args = [
        "--config",
        path.to_str().expect("utf-8 path"),
        "--mode",
        "native",
    ];
    let first = Agent::launch(&w.lab.server, &w.dirs, &args);
    let exit = first.stop();
    assert!(
        exit.stderr.contains("kernel log"),
        "no word of the kernel log level: {}",
        exit.stderr
    );
    let agent = Agent::launch(&w.lab.server, &w.dirs, &args);
    let status: serde_json::Value =
        serde_json::from_str(&w.dirs.cli_ok(&["status", "--output", "json"])).expect("json");
    assert_eq!(status["adopted_pins"], true);
    // An IPv4 frame cut inside its TCP header: a parse error, never a verdict on a flow.
    let src = host4(&w.lab, 11);
    let mut cut = frame(src, w.dst(src), 8000, "tcp");
    cut.truncate(14 + 20 + 4);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.stderr().contains("cannot classify") {
        assert!(
            Instant::now() < deadline,
            "no kernel line for an unparseable frame: {}",
            agent.stderr()
        );
        send_frames(&w.lab.client, &w.lab.client_if, std::slice::from_ref(&cut));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The CLI, without `--socket` (and without `TOLLGATE_SOCKET`): what an operator types.
fn cli_without_socket(args: &[&str]) -> std::process::Output {
    std::process::Command::new(tollgate_tests::agent::tollgate_bin())
        .args(args)
        .env_remove("TOLLGATE_SOCKET")
        .env("NO_COLOR", "1")
        .output()
        .expect("running the tollgate CLI")
}

/// `uninstall --pin-dir P` without `--socket`, while an agent runs on P with a socket of its
/// own: the agent is found by its pin directory and asked, it detaches and exits. Before:
/// "18 pins removed (no agent was running)", exit 0, and the program stayed attached.
#[test]
fn uninstall_by_pin_dir_finds_the_agent_on_its_own_socket() {
    let w = World::new();
    let mut agent = w.start();
    let pin_dir = w.dirs.pin_dir.to_str().expect("utf-8 path");
    let out = cli_without_socket(&["uninstall", "--pin-dir", pin_dir]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("uninstalled:") && !stdout.contains("no agent was running"),
        "{stdout}"
    );
    // The agent did it: it wrote its audit line and exits.
    assert!(
        agent.exits_within(Duration::from_secs(10)),
        "the agent kept running after uninstall:\n{}",
        agent.stderr()
    );
    let log = std::fs::read_to_string(w.dirs.state_dir.join("audit.log")).expect("audit log");
    assert!(log.contains("\"uninstall\""), "{log}");
    assert!(!w.dirs.pin_dir.exists(), "pins left");
    assert!(
        w.lab.server.xdp_attach(&w.lab.server_if).is_none(),
        "still attached"
    );
}

/// An agent that runs on the pins but does not answer (its socket file removed) is not
/// uninstalled behind its back: `uninstall --pin-dir` refuses, naming its pid and socket,
/// and removes nothing. Before: it removed the pins, said "no agent was running", exit 0.
#[test]
fn uninstall_refuses_while_an_unreachable_agent_holds_the_pins() {
    let w = World::new();
    let agent = w.start();
    std::fs::remove_file(&w.dirs.socket).expect("removing the socket file");
    let pin_dir = w.dirs.pin_dir.to_str().expect("utf-8 path");
    let out = cli_without_socket(&["uninstall", "--pin-dir", pin_dir]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let pid = agent.pid().to_string();
    let socket = w.dirs.socket.display().to_string();
    assert!(
        err.contains(&format!("pid {pid}")) && err.contains(&socket),
        "the refusal names neither the agent's pid {pid} nor its socket {socket}: {err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("no agent was running"),
        "{out:?}"
    );
    // Nothing was removed: still attached and enforcing from the same pins.
    assert!(
        tollgate::pins::maps_dir(&w.dirs.pin_dir).exists(),
        "pins removed"
    );
    assert!(
        w.lab.server.xdp_attach(&w.lab.server_if).is_some(),
        "detached"
    );
    assert_eq!(
        w.real_verdict(host4(&w.lab, 200), 8000, "tcp"),
        "unbound",
        "no longer enforcing"
    );
    // Once it is stopped (the program stays attached), the direct uninstall is allowed.
    let exit = agent.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    let out = cli_without_socket(&["uninstall", "--pin-dir", pin_dir]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("no agent was running"), "{stdout}");
    assert!(
        w.lab.server.xdp_attach(&w.lab.server_if).is_none(),
        "still attached"
    );
}

/// `tollgate --socket S run` listens on S (the global option is `run`'s control socket, as
/// `--control-socket` is), so the CLI given the same `--socket` reaches it. Before: `--socket`
/// was accepted and ignored, and the agent listened on the configuration's socket.
#[test]
fn run_listens_on_the_global_socket() {
    let w = World::new();
    let config = w.config.to_str().expect("utf-8 path").to_owned();
    // Returns only once the socket at w.dirs.socket exists.
    let _agent = tollgate_tests::agent::Agent::launch_socket_by(
        &w.lab.server,
        &w.dirs,
        "--socket",
        &["--config", &config, "--mode", "native"],
    );
    let status: serde_json::Value =
        serde_json::from_str(&w.dirs.cli_ok(&["status", "--output", "json"])).expect("json");
    assert_eq!(
        status["pin_dir"],
        w.dirs.pin_dir.display().to_string(),
        "{status}"
    );
}
