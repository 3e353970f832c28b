//! `tollgate endpoints`.

use std::process::ExitCode;

use tollgate::control::protocol::Request;

use super::{Ctx, print};

/// Protected endpoints with their packet counts.
#[derive(clap::Args)]
pub struct EndpointsArgs {}

pub fn run(_: EndpointsArgs, ctx: &Ctx) -> ExitCode {
    super::call(
        &ctx.socket,
        &Request::Endpoints {},
        ctx.print_with(|v| {
            print::table(
                v,
                &[
                    "id",
                    "name",
                    "protocol",
                    "ports",
                    "weight",
                    "classes",
                    "roles",
                    "anonymous",
                    "packets_passed",
                    "packets_dropped",
                ],
            )
        }),
    )
}
