//! `tollgate quota show|reset`.

use clap::Subcommand;
use tollgate::control::{
    protocol::Request,
    reply::{QuotaReset, Quotas},
};

use super::{Ctx, Outcome, print};

/// Quota spent per identity and plan window (minute, day, month).
#[derive(clap::Args)]
pub struct QuotaArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// What each identity has spent in its current windows, against its plan's quotas.
    Show {
        #[arg(long)]
        identity: Option<String>,
    },
    /// Forget what was spent (one identity, or all) and lift quota drops at once.
    Reset { identity: Option<String> },
}

pub fn run(a: QuotaArgs, ctx: &Ctx) -> Outcome {
    match a.action {
        Action::Show { identity } => super::call(
            &ctx.socket,
            &Request::QuotaShow { identity },
            // JSON in both formats: the windows nest three deep.
            |q: Quotas| print::json(&q),
        ),
        Action::Reset { identity } => super::call(
            &ctx.socket,
            &Request::QuotaReset { identity },
            |r: QuotaReset| {
                print::done(&[
                    ("identity", r.identity),
                    ("reset", Some(r.reset.to_string())),
                ])
            },
        ),
    }
}
