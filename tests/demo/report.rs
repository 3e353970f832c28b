//! What the demo reports: the kernel's counters per identity at a moment (and what moved
//! between two), the line printed every second, /metrics excerpts, and the final tables and
//! checks.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tollgate_common::Reason;
use tollgate_tests::{
    agent::{AgentDirs, Counters, identity_counters, reason_counter},
    lab::NetNs,
    tokenlab::{BIND_PORT, MODEL_PORT},
};

use crate::{
    model_server::ModelServer,
    traffic::Tally,
    world::{
        ATTACKER, CUSTOMER, EP_BIND, EP_MODEL, INTERNAL, METRICS, PARTNER, PHASES, WHO, World,
    },
};

/// Packets the kernel passed and dropped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pd {
    pub pass: u64,
    pub drop: u64,
}

/// The attacker's verdicts: unbound sources, on the model and the bind endpoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct Anon {
    pub model_unbound: u64,
    pub model_anonymous: u64,
    pub bind_anonymous: u64,
    pub bind_anonymous_rate: u64,
    pub bind_unbound: u64,
}

impl Anon {
    pub fn read(dirs: &AgentDirs) -> Anon {
        let c = |r, ep| reason_counter(dirs, r, ep).packets;
        Anon {
            model_unbound: c(Reason::Unbound, EP_MODEL),
            model_anonymous: c(Reason::Anonymous, EP_MODEL) + c(Reason::AnonymousRate, EP_MODEL),
            bind_anonymous: c(Reason::Anonymous, EP_BIND),
            bind_anonymous_rate: c(Reason::AnonymousRate, EP_BIND),
            bind_unbound: c(Reason::Unbound, EP_BIND),
        }
    }

    pub fn since(&self, b: &Anon) -> Anon {
        Anon {
            model_unbound: self.model_unbound - b.model_unbound,
            model_anonymous: self.model_anonymous - b.model_anonymous,
            bind_anonymous: self.bind_anonymous - b.bind_anonymous,
            bind_anonymous_rate: self.bind_anonymous_rate - b.bind_anonymous_rate,
            bind_unbound: self.bind_unbound - b.bind_unbound,
        }
    }

    pub fn pd(&self) -> Pd {
        Pd {
            pass: self.model_anonymous + self.bind_anonymous,
            drop: self.model_unbound + self.bind_anonymous_rate + self.bind_unbound,
        }
    }
}

/// Every counter the narration needs, at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Snap {
    pub at: Instant,
    pub ids: [Pd; 3],
    pub anon: Anon,
}

impl Snap {
    pub fn read(dirs: &AgentDirs, ids: &[u32; 3]) -> Snap {
        let mut out = [Pd::default(); 3];
        for (o, id) in out.iter_mut().zip(ids) {
            let c = identity_counters(dirs, *id);
            *o = Pd {
                pass: c.passed.packets,
                drop: c.dropped.packets,
            };
        }
        Snap {
            at: Instant::now(),
            ids: out,
            anon: Anon::read(dirs),
        }
    }

    /// What moved since `b`, per client (the attacker last), and over how long.
    pub fn since(&self, b: &Snap) -> ([Pd; 4], f64) {
        let mut out = [Pd::default(); 4];
        for ((o, now), then) in out.iter_mut().zip(&self.ids).zip(&b.ids) {
            *o = Pd {
                pass: now.pass - then.pass,
                drop: now.drop - then.drop,
            };
        }
        out[ATTACKER] = self.anon.since(&b.anon).pd();
        (out, (self.at - b.at).as_secs_f64().max(1e-3))
    }
}

/// `12345` as `12,345`.
pub fn n(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The GPU utilisation and the saturated endpoints, as the agent reports them.
pub fn gpu_state(dirs: &AgentDirs) -> String {
    let out = dirs.cli(&["status", "--output", "json"]);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return "?".to_owned();
    };
    let util = v["gpu"]["readings"][0]["utilization"]
        .as_f64()
        .map_or("?".to_owned(), |u| format!("{:.0}%", u * 100.0));
    let saturated = v["gpu"]["saturated_endpoints"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    format!(
        "{util:>4} {}",
        if saturated { "saturated" } else { "ok       " }
    )
}

pub fn header() {
    println!(
        "  time  GPU 0           {:>15}  {:>15}  {:>15}  {:>17}",
        "internal", "partner", "customer", "attacker"
    );
    println!(
        "                        {:>15}  {:>15}  {:>15}  {:>17}",
        "pass/s drop/s", "pass/s drop/s", "pass/s drop/s", "pass/s  drop/s"
    );
}

/// Lines of /metrics, scraped from inside the GPU node's namespace: the GPU and hold-back
/// families (`controller`), or the traffic counters that moved.
pub fn metrics_excerpt(server: &NetNs, controller: bool) -> Vec<String> {
    let out = server.exec(
        "curl",
        &[
            "-s",
            "--max-time",
            "5",
            &format!("http://{METRICS}/metrics"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let nonzero = l.rsplit(' ').next().is_some_and(|v| v != "0");
            if controller {
                l.starts_with("tollgate_gpu_utilization_ratio")
                    || l.starts_with("tollgate_endpoint_saturated{endpoint=\"model\"")
                    || (l.starts_with("tollgate_hold_back_share{") && l.contains("\"model\""))
            } else {
                (l.starts_with("tollgate_class_packets_total{") && nonzero)
                    || (l.starts_with("tollgate_packets_total{")
                        && l.contains("verdict=\"drop\"")
                        && nonzero)
            }
        })
        .map(str::to_owned)
        .collect()
}

/// The final tables and the checks; true if every check holds.
pub fn report(
    w: &World,
    model: &ModelServer,
    tallies: &[Arc<Tally>; 4],
    marks: &[Snap],
    global: &Counters,
    metrics: &[Vec<String>; 2],
    server_ns: &str,
) -> anyhow::Result<bool> {
    anyhow::ensure!(marks.len() == 4, "the timeline did not complete");
    let bounds = [marks[0], marks[1], marks[2], marks[3]];
    let (total, total_secs) = bounds[3].since(&bounds[0]);
    let per_phase: Vec<([Pd; 4], f64)> = (0..3).map(|i| bounds[i + 1].since(&bounds[i])).collect();
    let anon = bounds[3].anon.since(&bounds[0].anon);
    let bound_reasons: Vec<(String, u64)> = global
        .0
        .iter()
        .filter(|(r, c)| {
            c.verdict == "drop"
                && c.packets > 0
                && !matches!(r.as_str(), "unbound" | "anonymous_rate")
        })
        .map(|(r, c)| (r.clone(), c.packets))
        .collect();
    let bound_label = if bound_reasons.is_empty() {
        "packet_rate".to_owned()
    } else {
        bound_reasons
            .iter()
            .map(|(r, _)| r.as_str())
            .collect::<Vec<_>>()
            .join("/")
    };

    println!(
        "\n== Per identity, over the {:.0} s of traffic: packets the XDP program saw from each (offered), admitted and dropped ==",
        total_secs
    );
    println!(
        "{:<10} {:<20} {:<20} {:>10} {:>10} {:>10}  dropped by reason",
        "identity", "source", "class/plan", "offered", "admitted", "dropped"
    );
    let internal_net = {
        let o = w.client_v4(INTERNAL).octets();
        format!("{}.{}.{}.0/24", o[0], o[1], o[2])
    };
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let p = total[who];
        let (source, plan, reasons) = match who {
            INTERNAL => (
                internal_net.clone(),
                "internal/internal",
                if p.drop == 0 {
                    "-".to_owned()
                } else {
                    format!("{bound_label} {}", n(p.drop))
                },
            ),
            ATTACKER => (
                w.client_v4(ATTACKER).to_string(),
                "anonymous (unbound)",
                format!(
                    "unbound {} (:{MODEL_PORT}), anonymous_rate {} (:{BIND_PORT})",
                    n(anon.model_unbound),
                    n(anon.bind_anonymous_rate + anon.bind_unbound)
                ),
            ),
            _ => (
                format!("{} (token)", w.client_v4(who)),
                if who == PARTNER {
                    "partner/partner"
                } else {
                    "customer/customer"
                },
                if p.drop == 0 {
                    "-".to_owned()
                } else {
                    format!("{bound_label} {}", n(p.drop))
                },
            ),
        };
        println!(
            "{:<10} {:<20} {:<20} {:>10} {:>10} {:>10}  {reasons}",
            WHO[who],
            source,
            plan,
            n(p.pass + p.drop),
            n(p.pass),
            n(p.drop)
        );
    }
    if !bound_reasons.is_empty() {
        println!(
            "  (kernel reason counters for bound sources over the run: {}; the identity rows above share them)",
            bound_reasons
                .iter()
                .map(|(r, c)| format!("{r} {}", n(*c)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "  attacker on :{MODEL_PORT}: {} offered, {} admitted; on :{BIND_PORT}: {} admitted within the anonymous allowance",
        n(anon.model_unbound + anon.model_anonymous),
        n(anon.model_anonymous),
        n(anon.bind_anonymous)
    );

    println!(
        "\n{:<26} {:>16} {:>16} {:>16}",
        "admitted packets/s", PHASES[0], PHASES[1], PHASES[2]
    );
    let rate = |who: usize, phase: usize| {
        let (d, secs) = per_phase[phase];
        d[who].pass as f64 / secs
    };
    let ratio = |who: usize| {
        let normal = rate(who, 0);
        if normal > 0.0 {
            rate(who, 1) / normal
        } else {
            0.0
        }
    };
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let sat = if who == ATTACKER {
            format!("{:.0}", rate(who, 1))
        } else {
            format!("{:.0} ({:.0}%)", rate(who, 1), ratio(who) * 100.0)
        };
        println!(
            "{:<26} {:>16.0} {:>16} {:>16.0}",
            WHO[who],
            rate(who, 0),
            sat,
            rate(who, 2)
        );
    }
    println!(
        "\n{:<26} {:>16} {:>16} {:>16}",
        "requests completed/failed", PHASES[0], PHASES[1], PHASES[2]
    );
    for who in [INTERNAL, PARTNER, CUSTOMER, ATTACKER] {
        let t = &tallies[who];
        let cell = |i: usize| {
            format!(
                "{}/{}",
                t.ok[i].load(Ordering::Relaxed),
                t.failed[i].load(Ordering::Relaxed)
            )
        };
        println!(
            "{:<26} {:>16} {:>16} {:>16}",
            WHO[who],
            cell(0),
            cell(1),
            cell(2)
        );
    }

    println!("\n== Metrics ==");
    println!(
        "While the demo runs they are at http://{METRICS}/metrics inside the GPU node's namespace:\n  \
         ip netns exec {server_ns} curl -s http://{METRICS}/metrics\n(the namespace is gone now). \
         At the end of the saturated phase:"
    );
    for l in &metrics[0] {
        println!("  {l}");
    }
    println!("Just before teardown:");
    for l in &metrics[1] {
        println!("  {l}");
    }

    println!("\n== Checks ==");
    let served_attacker = model.served_to(w.client_v4(ATTACKER));
    let attacker_ok: u64 = tallies[ATTACKER]
        .ok
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum();
    let (c_ratio, p_ratio, i_ratio) = (ratio(CUSTOMER), ratio(PARTNER), ratio(INTERNAL));
    let checks = [
        (
            anon.model_anonymous == 0 && served_attacker == 0 && attacker_ok == 0,
            format!(
                "attacker admitted to the model port: {} packets, {} streams served, {} requests completed (want 0)",
                anon.model_anonymous, served_attacker, attacker_ok
            ),
        ),
        (
            anon.model_unbound > 0,
            format!(
                "attacker dropped as unbound: {} packets",
                n(anon.model_unbound)
            ),
        ),
        (
            total[INTERNAL].drop == 0 && total[INTERNAL].pass > 0,
            format!(
                "internal service untouched: {} packets admitted, {} dropped",
                n(total[INTERNAL].pass),
                total[INTERNAL].drop
            ),
        ),
        (
            c_ratio < 0.9 && per_phase[1].0[CUSTOMER].drop > 0,
            format!(
                "customer held back while the GPU was saturated: {:.0} -> {:.0} pkt/s admitted ({:.0}%), {} dropped",
                rate(CUSTOMER, 0),
                rate(CUSTOMER, 1),
                c_ratio * 100.0,
                n(per_phase[1].0[CUSTOMER].drop)
            ),
        ),
        (
            c_ratio < p_ratio && p_ratio <= i_ratio + 0.1,
            format!(
                "partner in between: kept {:.0}% of its normal rate (customer {:.0}%, internal {:.0}%)",
                p_ratio * 100.0,
                c_ratio * 100.0,
                i_ratio * 100.0
            ),
        ),
    ];
    let mut all = true;
    for (ok, what) in &checks {
        println!("  [{}] {what}", if *ok { " ok " } else { "FAIL" });
        all &= ok;
    }
    Ok(all)
}
