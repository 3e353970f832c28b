//! The service unit: it verifies clean, and the agent run exactly as its ExecStart says, as
//! an unprivileged user holding only the unit's capabilities, attaches, pins and enforces;
//! without any one of those capabilities it refuses with a message naming it.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;
use tollgate_tests::{
    agent::{AgentDirs, tollgate_bin},
    config::{Config, Controller, Endpoint, Plan},
    frames::send_frames,
    lab::Lab,
};

const NOBODY: u32 = 65534;

fn unit_text() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root");
    std::fs::read_to_string(root.join("systemd/tollgate.service")).expect("unit")
}

fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_owned()
}

#[test]
fn the_unit_verifies_clean() {
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = unit_text().replace("/usr/bin/tollgate", tollgate_bin().to_str().expect("path"));
    let dir = std::env::temp_dir().join(format!("tollgate-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("tollgate.service");
    std::fs::write(&path, unit).expect("unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tollgate run` as the unit starts it (its ExecStart, with the test's config in place of
/// /etc's), through setpriv as `nobody` with exactly `caps` (setpriv names, e.g. "bpf").
fn run_as_unit(lab: &Lab, config: &Path, caps: &[String]) -> std::process::Child {
    let unit = unit_text();
    let exec = unit_value(&unit, "ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/tollgate"));
    let args: Vec<String> = words
        .map(|w| {
            if w == "/etc/tollgate/tollgate.toml" {
                config.display().to_string()
            } else {
                w.to_owned()
            }
        })
        .collect();
    let set = if caps.is_empty() {
        "-all".to_owned()
    } else {
        format!(
            "-all,{}",
            caps.iter()
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    lab.server
        .command("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            &format!("--inh-caps={set}"),
            &format!("--ambient-caps={set}"),
            &format!("--bounding-set={set}"),
            "--",
        ])
        .arg(tollgate_bin())
        .args(&args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv")
}

/// The unit's capabilities in setpriv's spelling (CAP_BPF -> bpf).
fn unit_caps() -> Vec<String> {
    unit_value(&unit_text(), "AmbientCapabilities")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

fn config(lab: &Lab, dirs: &AgentDirs) -> PathBuf {
    // The directories the unit's StateDirectory/RuntimeDirectory and ExecStartPre provide,
    // owned by the service user.
    for d in [&dirs.state_dir, &dirs.pin_dir] {
        std::fs::create_dir_all(d).expect("dir");
        std::os::unix::fs::chown(d, Some(NOBODY), Some(NOBODY)).expect("chown");
    }
    let mut config = Config::new(&[&lab.server_if])
        .controller(Controller::no_gpu())
        .plan(Plan::new("customer"))
        .endpoint(Endpoint::udp("model", 7000, &["customer"]));
    config.node.xdp_mode = Some("native".into());
    config.node.pin_dir = Some(dirs.pin_dir.clone());
    config.node.state_dir = Some(dirs.state_dir.clone());
    config.node.control_socket = Some(dirs.socket.clone());
    let path = config.write(&dirs.state_dir.join("tollgate.toml"));
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown");
    path
}

#[test]
fn the_units_capabilities_are_enough_and_each_is_needed() {
    tollgate_tests::require_root();
    let caps = unit_caps();
    assert_eq!(
        caps,
        ["bpf", "net_admin", "perfmon"],
        "update this test with the unit"
    );
    assert!(!unit_value(&unit_text(), "CapabilityBoundingSet").contains("SYS_ADMIN"));

    // With exactly the unit's capabilities, as nobody: attaches, pins, enforces.
    let lab = Lab::new();
    let dirs = AgentDirs::new();
    let cfg = config(&lab, &dirs);
    let mut child = run_as_unit(&lab, &cfg, &caps);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dirs.socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err);
            panic!("the agent exited ({status}) with the unit's capabilities:\n{err}");
        }
        assert!(Instant::now() < deadline, "the agent did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dirs.counters_pin().exists(), "no pins");
    assert!(
        lab.server.xdp_attach(&lab.server_if).is_some(),
        "not attached"
    );
    let o = lab.client_v4.octets();
    let frame = PacketBuilder::v4([o[0], o[1], o[2], 99], lab.server_v4.octets())
        .udp(1, 7000)
        .build();
    send_frames(&lab.client, &lab.client_if, &[frame]);
    std::thread::sleep(Duration::from_millis(200));
    let unbound = tollgate::counter_read::reason_totals_from_pin(&dirs.counters_pin())
        .expect("counters")
        .into_iter()
        .find(|(r, _)| *r == tollgate_common::Reason::Unbound)
        .map(|(_, c)| c.packets);
    assert_eq!(unbound, Some(1), "an unbound frame was not dropped");
    let status = dirs.cli_ok(&["status", "--output", "json"]);
    assert!(status.contains("\"adopted_pins\": false"), "{status}");
    let _ = child.kill();
    let _ = child.wait();
    drop(dirs);

    // Without any one of them: a clear refusal naming it, before anything is touched.
    for missing in &caps {
        let lab = Lab::new();
        let dirs = AgentDirs::new();
        let cfg = config(&lab, &dirs);
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let mut child = run_as_unit(&lab, &cfg, &fewer);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break s;
            }
            assert!(Instant::now() < deadline, "the agent ran without {missing}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        let _ = child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err);
        let name = format!("CAP_{}", missing.to_ascii_uppercase());
        assert!(!status.success(), "ran without {name}");
        assert!(
            err.contains(&format!("missing capability {name}")),
            "without {name}: {err}"
        );
        assert!(
            lab.server.xdp_attach(&lab.server_if).is_none(),
            "attached without {name}"
        );
    }
}
