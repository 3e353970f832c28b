//! `tollgate reload`.

use std::process::ExitCode;

use tollgate::control::{protocol::Request, reply::Reloaded};

use super::Ctx;

/// Re-read the configuration; a file that fails validation changes nothing.
#[derive(clap::Args)]
pub struct ReloadArgs {}

pub fn run(_: ReloadArgs, ctx: &Ctx) -> ExitCode {
    super::call(&ctx.socket, &Request::Reload {}, |_: Reloaded| {
        println!("ok: reloaded")
    })
}
