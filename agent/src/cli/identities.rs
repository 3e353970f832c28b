//! `tollgate identities [list | show NAME]`.

use std::process::ExitCode;

use clap::Subcommand;
use tollgate::control::protocol::Request;

use super::{Ctx, print};

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

pub fn run(a: IdentitiesArgs, ctx: &Ctx) -> ExitCode {
    match a.action {
        None | Some(Action::List) => super::call(
            &ctx.socket,
            &Request::Identities {},
            ctx.print_with(|v| {
                print::table(
                    v,
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
                )
            }),
        ),
        Some(Action::Show { name }) => super::call(
            &ctx.socket,
            &Request::Identity { name },
            ctx.print_with(print::status),
        ),
    }
}
