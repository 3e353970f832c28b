//! BENCHMARKS.md from the template (the fixed method text) and what this run measured: the
//! machine, the targets marked met or missed with their figures, and each bench's tables.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use super::Measured;

const TEMPLATE: &str = include_str!("BENCHMARKS.template.md");

/// The machine as the run found it.
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub clocksource: String,
    pub virt: String,
    pub load: String,
    pub date: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

impl Machine {
    pub fn now() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        let out = |prog: &str, args: &[&str]| {
            std::process::Command::new(prog)
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".into())
        };
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib,
            kernel: read("/proc/sys/kernel/osrelease"),
            clocksource: read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
            virt: out("systemd-detect-virt", &[]),
            load: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            date: out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        }
    }
}

pub struct Run<'a> {
    pub quick: bool,
    pub measured: &'a Measured,
    pub before: &'a Machine,
    pub after: &'a Machine,
    pub elapsed: Duration,
    pub chart_dir: PathBuf,
}

pub fn render(run: &Run<'_>) -> String {
    let mut text = TEMPLATE.replace("<!-- machine -->", &machine(run));
    text = text.replace("<!-- targets -->", &targets(&run.measured.figures));
    // The quick report lies beside its charts (target/bench); the full one at the root.
    if run.quick {
        text = text.replace("docs/bench/", "");
    } else {
        let charts = run.chart_dir.display().to_string();
        text = text.replace("docs/bench/", &format!("{charts}/"));
    }
    // Each bench's section where the template names it; a bench this run did not reach says
    // so in its place.
    while let Some(start) = text.find("<!-- bench:") {
        let end = start + text[start..].find("-->").expect("a closed marker") + 3;
        let name = text[start + 11..end - 3].trim().to_owned();
        let section = match run.measured.sections.get(name.as_str()) {
            Some(s) => s.trim_end().to_owned(),
            None => match run.measured.failed.iter().find(|(n, _)| *n == name) {
                Some((_, why)) => format!("_Not measured in this run: `{name}` failed ({why})._"),
                None if run.quick => {
                    format!("_Not run by `--quick`: `{name}` runs in the full bench._")
                }
                None => format!("_Not measured in this run (`{name}`)._"),
            },
        };
        text.replace_range(start..end, &section);
    }
    text
}

fn machine(run: &Run<'_>) -> String {
    let (b, a) = (run.before, run.after);
    format!(
        "**This run:** {date}{quick}, {elapsed:.0} s of measuring. **Machine:** {cpu}, {cpus} \
         CPUs, {mem:.0} GiB, virtualization `{virt}`; kernel {kernel}, clocksource `{cs}`. \
         Load average (1, 5, 15 min) {lb} before the run, {la} after: on this shared VM the \
         absolute figures move between runs by up to ±30 %, the same-round ratios and \
         differences much less.",
        date = b.date,
        quick = if run.quick { " (`--quick`)" } else { "" },
        elapsed = run.elapsed.as_secs_f64(),
        cpu = b.cpu,
        cpus = b.cpus,
        mem = b.memory_gib,
        virt = b.virt,
        kernel = b.kernel,
        cs = b.clocksource,
        lb = b.load,
        la = a.load,
    )
}

/// The run's figures by name.
type Figs = BTreeMap<String, f64>;

/// A target: its statement, how its figure is read from the run, and what would move it.
struct Target {
    goal: &'static str,
    /// (figure as text, met) or None when this run did not measure it.
    eval: fn(&Figs) -> Option<(String, bool)>,
    lever: &'static str,
}

fn f(figs: &BTreeMap<String, f64>, k: &str) -> Option<f64> {
    figs.get(k).copied()
}

const TARGETS: &[Target] = &[
    Target {
        goal: "bound pass adds ≤ 50 ns over the no-op program in the same run",
        eval: |m| {
            let a = f(m, "xdp.one.bound.added_ns")?;
            let r = f(m, "xdp.one.bound.ratio")?;
            Some((format!("{a:+.0} ns ({r:.2}× the no-op)"), a <= 50.0))
        },
        lever: "the binding lookup and the limiter's reads of the identity, its bucket, the \
                hold-back and the counters (four maps); the clock is the coarse one already for \
                plans whose burst covers two ticks; the component rows say where the time goes",
    },
    Target {
        goal: "unbound flood drop ≤ 1.5× the empty XDP drop (live frames, same round)",
        eval: |m| {
            let r = f(m, "live.unbound_vs_empty_drop")?;
            Some((format!("{r:.2}×"), r <= 1.5))
        },
        lever: "fewer steps before the unbound verdict: the parser and the exact and CIDR \
                lookups (an unbound source misses both), the reason counter",
    },
    Target {
        goal: "unbound flood drop ≥ 5× cheaper than the nftables allow-list (same round)",
        eval: |m| {
            let r = f(m, "live.nft_vs_tollgate")?;
            Some((format!("{r:.2}×"), r >= 5.0))
        },
        lever: "the same as the row above: nftables' cost is the skb and the hook, tollgate's \
                is what it does before dropping",
    },
    Target {
        goal: "verifier: processed instructions per program, well under the kernel's 1 000 000 \
               (suite ceiling 150 000)",
        eval: |m| {
            let t = f(m, "xdp.verifier.tollgate")?;
            let l3 = f(m, "xdp.verifier.tollgate_l3").unwrap_or(0.0);
            Some((
                format!("tollgate {t:.0}, tollgate_l3 {l3:.0}"),
                t.max(l3) < 150_000.0,
            ))
        },
        lever: "fewer branches the verifier cannot prune (its count follows state pruning, not \
                code size)",
    },
    Target {
        goal: "bound pass at 1 000 000 identities ≤ 2× its cost at one identity (spread)",
        eval: |m| {
            let big = f(m, "xdp.spread.bound.1000000.added_ns")?;
            let one = f(m, "xdp.spread.bound.1.added_ns")?;
            let r = big / one.max(1.0);
            Some((
                format!("{big:.0} ns vs {one:.0} ns over the rotator's no-op: {r:.2}×"),
                r <= 2.0,
            ))
        },
        lever: "fewer cache lines per packet: the binding, identity, limiter state and counter \
                of one identity in fewer lines (they are four maps today), or a smaller binding \
                table (its hash buckets)",
    },
    Target {
        goal: "1 000 000 bindings from cold < 2 s",
        eval: |m| {
            let s = f(m, "scale.bind_cold_s.1000000")?;
            Some((format!("{s:.2} s"), s < 2.0))
        },
        lever: "the kernel write is batched already (~0.75 s per million); what is left is \
                parsing a state file of a million bindings and making the million-slot per-CPU \
                counters (~3 s alone): a compact state format, and the tables made once \
                (pinned) rather than per start",
    },
    Target {
        goal: "bind p99 < 5 ms at 1 000 000 existing bindings",
        eval: |m| {
            let p = f(m, "scale.bind_p99_ms.1000000")?;
            Some((format!("{p:.2} ms"), p < 5.0))
        },
        lever: "an index of the state's bindings by prefix: every bind scans the whole list \
                three times today (find the previous one, replace it, journal it)",
    },
    Target {
        goal: "/metrics scrape < 100 ms at 100 000 identities",
        eval: |m| {
            let p = f(m, "scale.scrape_ms.100000")?;
            Some((format!("{p:.1} ms"), p < 100.0))
        },
        lever: "the counters are read in batches already; the scrape shares the agent's \
                thread with a controller that walks every identity each tick: class, plan and \
                top-K totals kept by the controller would leave the scrape nothing per identity",
    },
    Target {
        goal: "/metrics scrape < 1 s at 1 000 000 identities",
        eval: |m| {
            let p = f(m, "scale.scrape_ms.1000000")?;
            Some((format!("{p:.0} ms"), p < 1000.0))
        },
        lever: "as above",
    },
    Target {
        goal: "agent resident memory < 64 MiB at 100 000 identities",
        eval: |m| {
            let r = f(m, "scale.rss_mib.100000")?;
            Some((format!("{r:.1} MiB"), r < 64.0))
        },
        lever: "less per-identity state in the agent: names interned, resolved identities \
                kept by slot instead of by name",
    },
];

fn targets(figs: &BTreeMap<String, f64>) -> String {
    let mut s =
        String::from("| target | this run | met? | what would move it |\n|---|---|---|---|\n");
    for t in TARGETS {
        let (fig, met) = match (t.eval)(figs) {
            Some((fig, true)) => (fig, "**met**"),
            Some((fig, false)) => (fig, "**missed**"),
            None => ("not measured in this run".to_owned(), "—"),
        };
        s.push_str(&format!("| {} | {fig} | {met} | {} |\n", t.goal, t.lever));
    }
    s.push_str(
        "| limiter accuracy unchanged (±5 %, on the coarse clock) | checked by the suite \
         (`tests/limits.rs`), not timed here | see the suite | — |\n",
    );
    s
}
