//! `cargo xtask demo --fleet`: three GPU nodes and one store (a real `redis-server`), each
//! node with its own agent, in network namespaces (`tollgate_tests::fleet::FleetLab`). A
//! client binds on one node and is served by all; a revocation on another node cuts it
//! everywhere; the store is killed and enforcement carries on (a revocation made meanwhile
//! applies on its node at once); the store returns empty and the nodes catch up and re-seed
//! it. Every wait is bounded; the lab is torn down by its guards, also on Ctrl-C.

use std::time::{Duration, Instant};

use tollgate_tests::fleet::{FleetLab, POOL};

use crate::interrupted;

const NODES: usize = 3;
/// The most any step waits for the pool to agree.
const SPREAD: Duration = Duration::from_secs(10);

struct Checks(Vec<(String, bool)>);

impl Checks {
    fn check(&mut self, what: &str, ok: bool) {
        println!("  {} {what}", if ok { "✓" } else { "✗" });
        self.0.push((what.to_owned(), ok));
    }
}

/// One line: which nodes serve the client now.
fn served_line(lab: &FleetLab, c: usize) -> String {
    (0..NODES)
        .map(|n| {
            let ok = lab.served(c, n, Duration::from_millis(400));
            format!("node-{} {}", n + 1, if ok { "serves" } else { "drops " })
        })
        .collect::<Vec<_>>()
        .join("   ")
}

/// Waits until every node in `nodes` serves (or drops) client `c`; the time it took.
fn until(lab: &FleetLab, c: usize, nodes: &[usize], want: bool) -> Option<Duration> {
    let t0 = Instant::now();
    lab.wait_served(c, nodes, want, SPREAD)
        .is_empty()
        .then(|| t0.elapsed())
}

fn took(d: Option<Duration>) -> String {
    d.map_or("never (within 10 s)".into(), |d| {
        format!("{} ms", d.as_millis())
    })
}

pub fn run() -> anyhow::Result<bool> {
    println!("== tollgate demo --fleet: one pool of GPU nodes sharing what they know ==\n");
    println!(
        "Building the lab: {NODES} GPU nodes, a Redis store and a client, each in its own network namespace."
    );
    let mut lab = FleetLab::new(NODES, 1);
    lab.start_all();
    let all: Vec<usize> = (0..NODES).collect();
    let mut checks = Checks(Vec::new());
    println!("  pool {POOL:?}: {}", served_line(&lab, 0));
    checks.check(
        "an unbound client is dropped by every node",
        until(&lab, 0, &all, false).is_some(),
    );
    if interrupted() {
        return Ok(false);
    }

    println!("\n1. The client binds its token on node-1 (HTTPS).");
    let token = lab.issue("acme", "10m", "demo-token-1");
    let (code, _) = lab.bind(0, 0, &token);
    let spread = until(&lab, 0, &all, true);
    println!("  {}", served_line(&lab, 0));
    checks.check(
        &format!(
            "bound on node-1 (HTTP {code}), served by every node after {} (each verified the token itself)",
            took(spread)
        ),
        code == 200 && spread.is_some(),
    );

    println!("\n2. An operator revokes the token on node-3.");
    lab.cli_ok(
        2,
        &[
            "token",
            "revoke",
            "--token-id",
            "demo-token-1",
            "--reason",
            "demo",
        ],
    );
    let cut = until(&lab, 0, &all, false);
    println!("  {}", served_line(&lab, 0));
    checks.check(
        &format!("dropped by every node after {}", took(cut)),
        cut.is_some(),
    );
    if interrupted() {
        return Ok(false);
    }

    println!("\n3. A new token; then the store dies (SIGKILL).");
    let token2 = lab.issue("acme", "10m", "demo-token-2");
    let bound = lab.bind(0, 0, &token2).0 == 200 && until(&lab, 0, &all, true).is_some();
    lab.redis.kill();
    std::thread::sleep(Duration::from_secs(1));
    println!("  {}", served_line(&lab, 0));
    checks.check(
        "enforcement carries on without the store: the bound client is still served everywhere",
        bound && until(&lab, 0, &all, true).is_some(),
    );
    lab.cli_ok(
        1,
        &[
            "token",
            "revoke",
            "--token-id",
            "demo-token-2",
            "--reason",
            "demo",
        ],
    );
    let here = !lab.served(0, 1, Duration::from_millis(500));
    println!(
        "  revoked on node-2 during the outage: {}",
        served_line(&lab, 0)
    );
    checks.check(
        "the revocation applies on node-2 at once; the others learn it when the store returns",
        here,
    );
    let s = lab.fleet_status(1);
    println!(
        "  node-2's fleet status: store up {}, {} change(s) waiting to publish",
        s["store_up"], s["outbox"]
    );
    if interrupted() {
        return Ok(false);
    }

    println!("\n4. The store comes back, empty (no persistence).");
    lab.redis.restart_empty();
    let caught = until(&lab, 0, &all, false);
    println!("  {}", served_line(&lab, 0));
    checks.check(
        &format!("every node drops the revoked client after {}", took(caught)),
        caught.is_some(),
    );
    let snapshot = format!("tollgate:{{{POOL}}}:snapshot");
    let deadline = Instant::now() + SPREAD;
    let held = |f: &str| lab.redis.cli(&["HEXISTS", &snapshot, f]).trim() == "1";
    while !(held("revocation:demo-token-1") && held("revocation:demo-token-2"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    checks.check(
        "the nodes re-seeded the empty store: both revocations are in it again",
        held("revocation:demo-token-1") && held("revocation:demo-token-2"),
    );
    let members = lab.fleet_status(0)["members"]
        .as_array()
        .map_or(0, Vec::len);
    checks.check(
        &format!("{members} of {NODES} members seen by node-1"),
        members == NODES,
    );
    let failed = checks.0.iter().filter(|(_, ok)| !ok).count();
    println!(
        "\n{} checks, {failed} failed. `tollgate fleet status` on any node shows the pool; docs/fleet.md explains it.",
        checks.0.len()
    );
    Ok(failed == 0)
}
