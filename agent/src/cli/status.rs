//! `tollgate status`.

use std::process::ExitCode;

use tollgate::control::protocol::Request;

use super::{Ctx, print};

/// The agent's state: interfaces, config, pins, counts, packets passed and dropped.
#[derive(clap::Args)]
pub struct StatusArgs {}

pub fn run(_: StatusArgs, ctx: &Ctx) -> ExitCode {
    super::call(
        &ctx.socket,
        &Request::Status {},
        ctx.print_with(print::status),
    )
}
