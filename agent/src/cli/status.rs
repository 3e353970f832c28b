//! `tollgate status`.

use tollgate::control::{
    protocol::Request,
    reply::{GpuStatus, ProgramStatus, Status, TablesStatus, TokenStatus, TunnelReport},
};

use super::{
    Ctx, Outcome,
    print::{Record, gpu_label, list, opt},
};

/// The agent's state: interfaces, config, pins, counts, packets passed and dropped.
#[derive(clap::Args)]
pub struct StatusArgs {}

pub fn run(_: StatusArgs, ctx: &Ctx) -> Outcome {
    super::call(
        &ctx.socket,
        &Request::Status {},
        ctx.print_with(|s: &Status| record(s).print()),
    )
}

/// The text form: one line per field in key order, as `status` always printed it; the GPU
/// and token sections nested under their key.
fn record(s: &Status) -> Record<'_> {
    let r = Record::default()
        .line("adopted_pins", s.adopted_pins)
        .line("anomaly_mode", &s.anomaly_mode)
        .line("bindings", s.bindings)
        .line("clock", clock(s.clock.as_ref()))
        .line("config", &s.config);
    let drops: Vec<(&str, Vec<String>)> = s
        .drops
        .iter()
        .map(|(reason, n)| (reason.as_str(), vec![n.to_string()]))
        .collect();
    let r = if drops.is_empty() {
        r.line("drops", "-")
    } else {
        r.nested("drops", drops)
    };
    let r = r.nested("egress", egress(s));
    let r = r.line("endpoints", s.endpoints);
    let r = match &s.fleet {
        Some(f) => r.line(
            "fleet",
            format!(
                "pool {} node {}: store {}, {} members, {} waiting to publish",
                f.pool,
                f.node,
                if f.store_up { "up" } else { "DOWN" },
                f.members,
                f.outbox
            ),
        ),
        None => r.line("fleet", "-"),
    };
    let r = r
        .nested("gpu", gpu(&s.gpu))
        .line("identities", s.identities)
        .line("interfaces", list(&s.interfaces))
        .line("layout_version", s.layout_version)
        .line("packets_dropped", s.dropped_packets)
        .line("packets_passed", s.passed_packets)
        .line("pin_dir", s.pin_dir.display())
        .nested("program", program(&s.program))
        .line("quarantined", list(&s.quarantined))
        .line("response capped", list(&s.response_capped))
        .nested("tables", tables(&s.tables));
    let r = match &s.tokens {
        Some(t) => r.nested("tokens", tokens(t)),
        None => r.line("tokens", "-"),
    };
    r.nested("tunnels", tunnels(&s.tunnels))
        .line("uptime_s", s.uptime_s)
        .line("version", &s.version)
        .line("xdp_mode", &s.xdp_mode)
}

fn gpu(g: &GpuStatus) -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("source", vec![g.source.clone()]),
        ("error", vec![opt(g.error.as_deref())]),
        ("readings", g.readings.iter().map(gpu_label).collect()),
        ("saturated_endpoints", vec![list(&g.saturated_endpoints)]),
        ("pressure", pressure_lines(&g.endpoints)),
    ]
}

/// "llama 1.40 by queue (model_server)" per endpoint with a signal; "-" without any.
pub fn pressure_lines(loads: &[tollgate::control::reply::EndpointLoad]) -> Vec<String> {
    let lines: Vec<String> = loads
        .iter()
        .filter_map(|l| {
            let p = l.pressure?;
            Some(format!(
                "{} {p:.2} by {} ({})",
                l.endpoint,
                l.driver.as_deref().unwrap_or("-"),
                l.source
            ))
        })
        .collect();
    if lines.is_empty() {
        vec!["-".to_owned()]
    } else {
        lines
    }
}

/// "tick 4 ms (clock_getres); precise: plan-a,plan-b; anonymous coarse", or "-".
fn clock(c: Option<&tollgate::control::reply::ClockStatus>) -> String {
    let Some(c) = c else { return "-".into() };
    let precise = if c.precise_plans.is_empty() {
        "-".to_owned()
    } else {
        c.precise_plans.join(",")
    };
    format!(
        "tick {} ms ({}); precise plans: {precise}; anonymous {}",
        c.tick_ns as f64 / 1e6,
        c.tick_source.label(),
        c.anonymous.label()
    )
}

/// Decapsulating devices: the covered ones with their program, the uncovered ones with why.
/// Each `[limits]` group: its size and what its tables take (the kernel's figure).
fn tables(t: &TablesStatus) -> Vec<(&'static str, Vec<String>)> {
    use tollgate::sizes::{Group, human};
    if t.maps.is_empty() {
        return vec![("kernel_memory", vec!["-".to_owned()])];
    }
    let mut out = vec![(
        "kernel_memory",
        vec![format!(
            "{} ({} allowed)",
            human(t.kernel_memory),
            human(t.allowance)
        )],
    )];
    for g in Group::ALL {
        let maps: Vec<_> = t
            .maps
            .iter()
            .filter(|m| g.maps().contains(&m.map.as_str()))
            .collect();
        let Some(size) = maps.first().map(|m| m.max_entries) else {
            continue;
        };
        let bytes: u64 = maps.iter().map(|m| m.bytes).sum();
        out.push((g.key(), vec![format!("{size} ({})", human(bytes))]));
    }
    out
}

/// Per enforced interface, its TC egress link as the kernel has it (read from the pin, so it
/// needs the same privilege as the agent; the JSON form does not carry it). Layer-3 tunnel
/// devices have none: what the node sends leaves through the Ethernet device under them.
fn egress(s: &Status) -> Vec<(&str, Vec<String>)> {
    s.interfaces
        .iter()
        .map(|iface| {
            let path = tollgate::pins::egress_link_path(&s.pin_dir, iface);
            let v = if !path.exists() {
                "not attached".to_owned()
            } else {
                match tollgate::link_info::pinned_tcx_link(&path) {
                    Ok(l) if l.ifindex != 0 => {
                        format!("attached (TCX link {}, program {})", l.id, l.prog_id)
                    }
                    Ok(l) => format!("DETACHED: link {} is on no device", l.id),
                    Err(e) => format!("unreadable: {e}"),
                }
            };
            (iface.as_str(), vec![v])
        })
        .collect()
}

fn tunnels(t: &TunnelReport) -> Vec<(&'static str, Vec<String>)> {
    let or_dash = |v: Vec<String>| {
        if v.is_empty() {
            vec!["-".to_owned()]
        } else {
            v
        }
    };
    vec![
        ("policy", vec![t.policy.clone()]),
        (
            "covered",
            or_dash(
                t.covered
                    .iter()
                    .map(|c| format!("{} ({}, {})", c.device, c.kind, c.program))
                    .collect(),
            ),
        ),
        (
            "uncovered",
            or_dash(
                t.uncovered
                    .iter()
                    .map(|u| format!("{} ({}): {}", u.device, u.kind, u.why))
                    .collect(),
            ),
        ),
    ]
}

fn program(p: &ProgramStatus) -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("object", vec![p.object.clone()]),
        ("load_failures", vec![p.load_failures.to_string()]),
        (
            "last_load_failure",
            vec![opt(p.last_load_failure.as_deref())],
        ),
    ]
}

fn tokens(t: &TokenStatus) -> Vec<(&'static str, Vec<String>)> {
    let verifications: Vec<String> = t
        .verifications
        .iter()
        .map(|(label, n)| format!("{label}={n}"))
        .collect();
    let issuers: Vec<String> = t.issuers.iter().map(issuer_line).collect();
    vec![
        ("keys", vec![list(&t.keys)]),
        ("verifications", vec![verifications.join(" ")]),
        ("probable_thefts", vec![t.probable_thefts.to_string()]),
        (
            "issuers",
            if issuers.is_empty() {
                vec!["-".into()]
            } else {
                issuers
            },
        ),
    ]
}

/// One issuer on one line: its name and source, how many keys and how old, the last
/// fetch, what it refused; `UNAVAILABLE` when its tokens are refused `keys_unavailable`.
fn issuer_line(i: &tollgate::control::reply::IssuerStatus) -> String {
    let k = &i.keys;
    let mut parts = vec![
        k.name.clone(),
        k.source.clone(),
        format!("keys={}", k.kids.len()),
    ];
    if !k.skipped.is_empty() {
        parts.push(format!("skipped={}", k.skipped.len()));
    }
    parts.push(k.age_s.map_or("age=-".into(), |a| format!("age={a}s")));
    if let Some(l) = &k.last_fetch {
        parts.push(format!("last={}/{}", l.trigger, l.outcome));
    }
    let refused: u64 = i.refusals.values().sum();
    parts.push(format!("verified={} refused={refused}", i.verified));
    if k.unavailable {
        parts.push("UNAVAILABLE".into());
    } else if k.stale {
        parts.push("stale".into());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate::control::reply::TableStatus;

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            config: "/etc/tollgate/tollgate.toml".into(),
            interfaces: vec!["eth0".into()],
            xdp_mode: "auto".into(),
            // A directory no machine has: the egress section reads the link pins under it.
            pin_dir: "/nonexistent/tollgate".into(),
            adopted_pins: true,
            layout_version: 1,
            uptime_s: 86,
            endpoints: 2,
            identities: 2,
            bindings: 3,
            quarantined: vec![],
            response_capped: vec![],
            passed_packets: 11225299,
            dropped_packets: 18244,
            drops: [
                ("unbound".to_owned(), 18000),
                ("quarantined".to_owned(), 244),
            ]
            .into(),
            gpu: crate::cli::top::fixtures::saturated_gpu(),
            anomaly_mode: "observe".into(),
            tokens: None,
            tunnels: TunnelReport {
                policy: "enforce".into(),
                covered: vec![tollgate::control::reply::CoveredTunnel {
                    device: "vx0".into(),
                    kind: "vxlan".into(),
                    program: "tollgate".into(),
                }],
                uncovered: vec![],
            },
            program: ProgramStatus {
                object: "embedded".into(),
                load_failures: 0,
                last_load_failure: None,
            },
            fleet: None,
            tables: TablesStatus {
                kernel_memory: 50_331_960 + 184_550_496,
                allowance: 3 << 30,
                maps: vec![
                    TableStatus {
                        map: "IDENTITIES".into(),
                        max_entries: 1 << 20,
                        bytes: 50_331_960,
                    },
                    TableStatus {
                        map: "BIND_V4".into(),
                        max_entries: 1 << 21,
                        bytes: 184_550_496,
                    },
                ],
            },
            clock: Some(tollgate::control::reply::ClockStatus {
                tick_ns: 4_000_000,
                tick_source: tollgate::kernel_clock::TickSource::ClockGetres,
                precise_plans: vec!["trial".into()],
                anonymous: tollgate::kernel_clock::Clock::Coarse,
            }),
        }
    }

    /// The reply as the agent sends it, read as this verb reads it, printed as text.
    fn text_of(s: &Status) -> String {
        let wire = serde_json::to_string(s).unwrap();
        record(&serde_json::from_str(&wire).unwrap()).render()
    }

    #[test]
    fn text_is_the_documented_lines_with_nested_sections_readable() {
        let text = text_of(&status());
        assert_eq!(
            text,
            "adopted_pins     true
anomaly_mode     observe
bindings         3
clock            tick 4 ms (clock_getres); precise plans: trial; anonymous coarse
config           /etc/tollgate/tollgate.toml
drops
  quarantined  244
  unbound      18000
egress
  eth0  not attached
endpoints        2
fleet            -
gpu
  source               simulated
  error                -
  readings             GPU0 H100  88%  mem 40.0/80.0 GiB  550 W
  saturated_endpoints  model
  pressure             model 1.10 by gpu_util (gpus)
identities       2
interfaces       eth0
layout_version   1
packets_dropped  18244
packets_passed   11225299
pin_dir          /nonexistent/tollgate
program
  object             embedded
  load_failures      0
  last_load_failure  -
quarantined      -
response capped  -
tables
  kernel_memory   224.0 MiB (3.0 GiB allowed)
  identities      1048576 (48.0 MiB)
  exact_bindings  2097152 (176.0 MiB)
tokens           -
tunnels
  policy     enforce
  covered    vx0 (vxlan, tollgate)
  uncovered  -
uptime_s         86
version          0.1.0
xdp_mode         auto
"
        );
        assert!(!text.contains('{'), "no raw JSON: {text}");
        let mut s = status();
        s.tokens = Some(TokenStatus {
            keys: vec!["k1".into(), "k2".into()],
            verifications: [("ok".to_owned(), 10), ("expired".to_owned(), 1)].into(),
            probable_thefts: 0,
            issuers: vec![],
            unselected_refusals: Default::default(),
        });
        s.gpu.readings.clear();
        s.drops.clear();
        let text = text_of(&s);
        assert!(text.contains("  readings             -\n"), "{text}");
        assert!(text.contains("\ndrops            -\n"), "{text}");
        assert!(
            text.contains(
                "tokens\n  keys             k1,k2\n  verifications    expired=1 ok=10\n  \
                 probable_thefts  0\n  issuers          -\n"
            ),
            "{text}"
        );
    }
}
