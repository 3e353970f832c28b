//! `tollgate reload`.

use tollgate::control::{protocol::Request, reply::Reloaded};

use super::{Ctx, Outcome};

/// Re-read the configuration; a file that fails validation changes nothing.
#[derive(clap::Args)]
pub struct ReloadArgs {}

pub fn run(_: ReloadArgs, ctx: &Ctx) -> Outcome {
    super::call(&ctx.socket, &Request::Reload {}, |_: Reloaded| {
        println!("ok: reloaded")
    })
}
