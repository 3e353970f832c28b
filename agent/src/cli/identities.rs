//! `tollgate identities [list | show NAME]`.

use clap::Subcommand;
use tollgate::control::{
    protocol::Request,
    reply::{Identities, Identity, IdentityRow, IdentitySource, QuarantineInfo},
};

use super::{
    Ctx, Outcome,
    print::{Record, list, opt, table},
};

/// Identities: list them, or show one.
#[derive(clap::Args)]
pub struct IdentitiesArgs {
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(Subcommand)]
enum Action {
    /// All identities (the default).
    List,
    /// One identity in full.
    Show { name: String },
}

pub fn run(a: IdentitiesArgs, ctx: &Ctx) -> Outcome {
    match a.action {
        None | Some(Action::List) => super::call(
            &ctx.socket,
            &Request::Identities {},
            ctx.print_with(|rows: &Identities| print!("{}", list_text(rows))),
        ),
        Some(Action::Show { name }) => super::call(
            &ctx.socket,
            &Request::Identity { name },
            ctx.print_with(|i: &Identity| record(i).print()),
        ),
    }
}

/// A quarantine in one cell: who, why, and until when if it ends by itself.
fn quarantine_cell(q: Option<&QuarantineInfo>) -> String {
    match q {
        None => "-".into(),
        Some(q) => {
            let mut s = format!("{}: {}", q.by, q.reason);
            if let Some(until) = q.until_unix_ms {
                s.push_str(&format!(" (until_unix_ms {until})"));
            }
            s
        }
    }
}

fn source(s: IdentitySource) -> &'static str {
    match s {
        IdentitySource::Config => "config",
        IdentitySource::Token => "token",
    }
}

fn list_text(rows: &[IdentityRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|i| {
            vec![
                i.id.to_string(),
                i.name.clone(),
                i.class.label().into(),
                i.plan.clone(),
                list(&i.bindings),
                quarantine_cell(i.quarantined.as_ref()),
                i.passed_packets.to_string(),
                i.dropped_packets.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "id",
            "name",
            "class",
            "plan",
            "bindings",
            "quarantined",
            "passed_packets",
            "dropped_packets",
        ],
        &cells,
    )
}

/// `identities show`: every field in key order, the quarantine nested under its key.
fn record(i: &IdentityRow) -> Record<'_> {
    let r = Record::default()
        .line("bindings", list(&i.bindings))
        .line("class", i.class.label())
        .line("clock", i.clock.map_or("-", |c| c.label()))
        .line("dropped_bytes", i.dropped_bytes)
        .line("dropped_packets", i.dropped_packets)
        .line("id", i.id)
        .line("name", &i.name)
        .line("passed_bytes", i.passed_bytes)
        .line("passed_packets", i.passed_packets)
        .line("plan", &i.plan);
    let r = match &i.quarantined {
        Some(q) => r.nested(
            "quarantined",
            vec![
                ("by", vec![q.by.to_string()]),
                ("reason", vec![q.reason.clone()]),
                ("until_unix_ms", vec![opt(q.until_unix_ms)]),
            ],
        ),
        None => r.line("quarantined", "-"),
    };
    r.line(
        "response_capped",
        i.response_capped.as_deref().unwrap_or("-"),
    )
    .line("roles", list(&i.roles))
    .line("source", source(i.source))
}

#[cfg(test)]
mod tests {
    use tollgate::control::reply::QuarantineOwner;
    use tollgate_common::policy::Class;

    use super::*;

    fn acme() -> IdentityRow {
        IdentityRow {
            id: 2,
            name: "partner-acme".into(),
            class: Class::Partner,
            plan: "partner".into(),
            roles: vec![],
            source: IdentitySource::Config,
            bindings: vec![
                "198.51.100.7/32 (expires in 7193s)".into(),
                "198.19.7.0/24".into(),
            ],
            quarantined: Some(QuarantineInfo {
                reason: "scraping pattern".into(),
                until_unix_ms: Some(1764253600123),
                by: QuarantineOwner::Operator {
                    uid: 0,
                    gid: Some(0),
                    pid: Some(48213),
                },
            }),
            passed_packets: 710279,
            passed_bytes: 412341877,
            dropped_packets: 18233,
            dropped_bytes: 10563120,
            clock: Some(tollgate::kernel_clock::Clock::Coarse),
            egress: None,
            response_capped: Some(
                "response day cap: 1200 of 1000 bytes, rolls at unix 1764288000".into(),
            ),
            quota_exhausted: None,
        }
    }

    /// Through the wire, as the agent sends it and this verb reads it.
    fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
        serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap()
    }

    #[test]
    fn show_nests_the_quarantine() {
        assert_eq!(
            record(&wire(&acme())).render(),
            "bindings         198.51.100.7/32 (expires in 7193s),198.19.7.0/24
class            partner
clock            coarse
dropped_bytes    10563120
dropped_packets  18233
id               2
name             partner-acme
passed_bytes     412341877
passed_packets   710279
plan             partner
quarantined
  by             uid 0 (pid 48213) via control
  reason         scraping pattern
  until_unix_ms  1764253600123
response_capped  response day cap: 1200 of 1000 bytes, rolls at unix 1764288000
roles            -
source           config
"
        );
    }

    #[test]
    fn list_is_the_documented_table() {
        let mut batch = acme();
        batch.id = 1;
        batch.name = "batch-cluster".into();
        batch.class = Class::Internal;
        batch.plan = "internal".into();
        batch.bindings = vec!["198.18.0.0/24".into()];
        batch.quarantined = None;
        batch.passed_packets = 8410022;
        batch.dropped_packets = 0;
        let mut acme = acme();
        acme.quarantined = None;
        assert_eq!(
            list_text(&wire(&vec![batch, acme])),
            "ID  NAME           CLASS     PLAN      BINDINGS                                          QUARANTINED  PASSED_PACKETS  DROPPED_PACKETS
1   batch-cluster  internal  internal  198.18.0.0/24                                     -            8410022         0
2   partner-acme   partner   partner   198.51.100.7/32 (expires in 7193s),198.19.7.0/24  -            710279          18233
"
        );
        assert_eq!(
            quarantine_cell(Some(&QuarantineInfo {
                reason: "anomaly".into(),
                until_unix_ms: None,
                by: QuarantineOwner::Controller,
            })),
            "controller: anomaly"
        );
    }
}
