//! `tollgate unbind TARGET`.

use tollgate::control::{protocol::Request, reply::Unbound};

use super::{Ctx, Outcome, print};

/// Remove a run-time binding (configured ones are changed in the config).
#[derive(clap::Args)]
pub struct UnbindArgs {
    /// Address or CIDR exactly as bound.
    target: String,
}

pub fn run(a: UnbindArgs, ctx: &Ctx) -> Outcome {
    super::call(
        &ctx.socket,
        &Request::Unbind { target: a.target },
        |u: Unbound| print::done(&[("target", Some(u.target))]),
    )
}
