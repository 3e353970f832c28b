//! `tollgate quarantine TARGET --reason WHY [--for DURATION]`.

use tollgate::control::{protocol::Request, reply::Quarantined};

use super::{Ctx, Outcome, args, print};

/// Drop everything an identity sends to protected endpoints, at once.
#[derive(clap::Args)]
pub struct QuarantineArgs {
    /// Identity name, or an address whose binding names it.
    target: String,
    /// Why (recorded in the audit log).
    #[arg(long)]
    reason: String,
    /// Release by itself after this long (90s, 15m, 2h, 7d).
    #[arg(long = "for", value_name = "DURATION", value_parser = args::duration_secs)]
    for_secs: Option<u64>,
}

pub fn run(a: QuarantineArgs, ctx: &Ctx) -> Outcome {
    super::call(
        &ctx.socket,
        &Request::Quarantine {
            target: a.target,
            for_secs: a.for_secs,
            reason: a.reason,
        },
        |q: Quarantined| {
            print::done(&[
                ("identity", Some(q.identity)),
                ("until_unix_ms", q.until_unix_ms.map(|t| t.to_string())),
            ])
        },
    )
}
