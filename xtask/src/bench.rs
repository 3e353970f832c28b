//! `cargo xtask bench`: runs the benchmark binaries in release mode, each under a time limit,
//! and writes BENCHMARKS.md from their tables and figures (`report`), with the charts
//! (`chart`). `--quick` runs the per-packet and live-frames benches at small sizes, for a
//! regression check, and writes its report under target/bench instead.

mod chart;
mod report;

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{cmd, preflight, setup};

/// One bench binary: where it lives, what it measures, how long it may take.
struct Bench {
    package: &'static str,
    features: Option<&'static str>,
    name: &'static str,
    what: &'static str,
    /// Whether `--quick` runs it.
    quick: bool,
    /// Wall-clock limit once built (the full run stays under 15 minutes).
    limit: Duration,
}

const BENCHES: &[Bench] = &[
    Bench {
        package: "tollgate-tests",
        features: None,
        name: "bench_xdp",
        what: "XDP paths through BPF_PROG_TEST_RUN, one key and spread over up to 1 000 000 identities",
        quick: true,
        limit: Duration::from_secs(360),
    },
    Bench {
        package: "tollgate-tests",
        features: None,
        name: "bench_egress",
        what: "the egress program and flow tracking on ingress through BPF_PROG_TEST_RUN, next to the empty TC and XDP programs",
        quick: true,
        limit: Duration::from_secs(120),
    },
    Bench {
        package: "tollgate-tests",
        features: None,
        name: "bench_live",
        what: "live frames: tollgate against an empty drop, nftables and iptables; hping3 end to end",
        // 15 rounds take ~170 s on the development VM, the end-to-end part ~20 s more.
        quick: true,
        limit: Duration::from_secs(240),
    },
    Bench {
        package: "tollgate-tests",
        features: None,
        name: "bench_scale",
        what: "control plane: bindings from cold, bind latency, scrape, memory at scale",
        quick: false,
        limit: Duration::from_secs(300),
    },
    Bench {
        package: "tollgate-tests",
        features: None,
        name: "bench_quarantine",
        what: "quarantine to first dropped packet, real agent and traffic",
        quick: false,
        limit: Duration::from_secs(60),
    },
    Bench {
        package: "tollgate-tests",
        features: None,
        name: "bench_bind",
        what: "HTTPS bind request to first admitted packet, real agent and traffic",
        quick: false,
        limit: Duration::from_secs(60),
    },
    Bench {
        package: "tollgate-tests",
        features: None,
        name: "bench_fleet",
        what: "fleet of four nodes and a store: bind on one node to admitted on the others, revoke to dropped everywhere",
        quick: false,
        limit: Duration::from_secs(150),
    },
    Bench {
        package: "tollgate-tests",
        features: None,
        name: "bench_scrape",
        what: "one /metrics scrape with 10 000 identities",
        quick: false,
        limit: Duration::from_secs(60),
    },
    Bench {
        package: "tollgate-common",
        features: Some("token"),
        name: "token_verify",
        what: "token verifications per second on one core, beside ring alone",
        quick: false,
        limit: Duration::from_secs(60),
    },
];

/// What the benches left: each one's markdown section and its named figures.
pub struct Measured {
    pub sections: BTreeMap<&'static str, String>,
    pub figures: BTreeMap<String, f64>,
    /// Benches that failed or ran out of time, with why.
    pub failed: Vec<(&'static str, String)>,
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    preflight::check()?;
    if !setup::is_complete() {
        eprintln!("[bench] the toolchain or packages are incomplete: running setup first");
        setup::run()?;
    }
    let root = cmd::workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let benches: Vec<&Bench> = BENCHES.iter().filter(|b| b.quick || !quick).collect();
    // Built first, so that the limits below time the measuring, not the compiling. The
    // agent's benches drive the real binary, built here in the same profile.
    cmd::run(cmd::command("cargo").args(["build", "--release", "--package", "tollgate"]))?;
    for b in &benches {
        let mut c = bench_command(b);
        c.arg("--no-run");
        cmd::run(&mut c)?;
    }
    let machine_before = report::Machine::now();
    let started = Instant::now();
    let mut measured = Measured {
        sections: BTreeMap::new(),
        figures: BTreeMap::new(),
        failed: Vec::new(),
    };
    for b in &benches {
        eprintln!("[bench] {}: {}", b.name, b.what);
        let json = out_dir.join(format!("{}.json", b.name));
        let _ = std::fs::remove_file(&json);
        let mut c = bench_command(b);
        if quick {
            c.env("TOLLGATE_BENCH_QUICK", "1");
        }
        let (table, result) = run_bounded(&mut c, b.limit);
        let path = out_dir.join(format!("{}.md", b.name));
        std::fs::write(&path, table.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{table}");
        match result {
            Ok(()) => {
                measured.sections.insert(b.name, table);
            }
            Err(e) => {
                eprintln!("[bench] {} failed: {e:#}", b.name);
                // What it printed before it failed still stands (a bench prints each table
                // as soon as it is measured), marked as cut short.
                if !table.trim().is_empty() {
                    measured.sections.insert(
                        b.name,
                        format!("{table}\n_This bench was cut short: {e:#}._\n"),
                    );
                }
                measured.failed.push((b.name, format!("{e:#}")));
            }
        }
        if let Ok(s) = std::fs::read_to_string(&json) {
            let v: serde_json::Value =
                serde_json::from_str(&s).with_context(|| format!("parsing {}", json.display()))?;
            if let Some(map) = v["figures"].as_object() {
                for (k, x) in map {
                    if let Some(x) = x.as_f64() {
                        measured.figures.insert(k.clone(), x);
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();
    let machine_after = report::Machine::now();
    let (doc, chart_dir) = if quick {
        (out_dir.join("BENCHMARKS.md"), out_dir.clone())
    } else {
        (root.join("BENCHMARKS.md"), root.join("docs/bench"))
    };
    std::fs::create_dir_all(&chart_dir)
        .with_context(|| format!("creating {}", chart_dir.display()))?;
    chart::per_packet(&measured.figures, &chart_dir.join("per-packet.svg"))?;
    chart::live_frames(&measured.figures, &chart_dir.join("live-frames.svg"))?;
    let text = report::render(&report::Run {
        quick,
        measured: &measured,
        before: &machine_before,
        after: &machine_after,
        elapsed,
        chart_dir: relative(&root, &chart_dir),
    });
    std::fs::write(&doc, text).with_context(|| format!("writing {}", doc.display()))?;
    eprintln!(
        "[bench] {} written ({:.0} s of measuring); charts in {}",
        doc.display(),
        elapsed.as_secs_f64(),
        chart_dir.display()
    );
    if !measured.failed.is_empty() {
        anyhow::bail!(
            "{} bench(es) failed: {}",
            measured.failed.len(),
            measured
                .failed
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn relative(root: &Path, p: &Path) -> PathBuf {
    p.strip_prefix(root).unwrap_or(p).to_path_buf()
}

fn bench_command(b: &Bench) -> std::process::Command {
    let mut c = cmd::command("cargo");
    c.args(["bench", "--package", b.package, "--bench", b.name]);
    if let Some(f) = b.features {
        c.args(["--features", f]);
    }
    c
}

/// Runs `c` in a process group of its own, its stdout captured, its stderr shown; past
/// `limit` the whole group is ended (SIGTERM, then SIGKILL), so that the bench binary's
/// guards still remove its namespaces on the first signal where they can.
fn run_bounded(c: &mut std::process::Command, limit: Duration) -> (String, anyhow::Result<()>) {
    use std::io::Read as _;
    let mut child = match c
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return (
                String::new(),
                Err(anyhow::anyhow!("running cargo bench: {e}")),
            );
        }
    };
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() > deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => break None,
        }
    };
    let result = match status {
        Some(st) if st.success() => Ok(()),
        Some(st) => Err(anyhow::anyhow!("exited with {st}")),
        None => {
            let pgid = child.id() as i32;
            // SAFETY: signals to the process group this function started (its leader's pid).
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let grace = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            Err(anyhow::anyhow!(
                "ran past its limit of {} s",
                limit.as_secs()
            ))
        }
    };
    (reader.join().unwrap_or_default(), result)
}
