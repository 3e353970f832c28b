//! `tollgate release TARGET [--reason WHY]`.

use tollgate::control::{protocol::Request, reply::Released};

use super::{Ctx, Outcome, print};

/// Lift a quarantine.
#[derive(clap::Args)]
pub struct ReleaseArgs {
    /// Identity name, or an address whose binding names it.
    target: String,
    /// Why (recorded in the audit log).
    #[arg(long, default_value = "")]
    reason: String,
}

pub fn run(a: ReleaseArgs, ctx: &Ctx) -> Outcome {
    super::call(
        &ctx.socket,
        &Request::Release {
            target: a.target,
            reason: a.reason,
        },
        |r: Released| print::done(&[("identity", Some(r.identity))]),
    )
}
