//! `tollgate uninstall`: through the agent when one runs, else straight on the pins.

use std::path::PathBuf;

use tollgate::{
    control::{protocol::Request, reply::Uninstalled},
    paths, pins,
};

use super::{Ctx, Outcome, exit};

/// Detach from every interface and remove every pin (enforcement stops). Asks the agent
/// if one is running, else does it directly.
#[derive(clap::Args)]
pub struct UninstallArgs {
    /// Pin directory, when no agent is running.
    #[arg(long, value_name = "DIR", default_value = paths::PIN_DIR)]
    pin_dir: PathBuf,
}

pub fn run(a: UninstallArgs, ctx: &Ctx) -> Outcome {
    if ctx.socket.exists() {
        return super::call(&ctx.socket, &Request::Uninstall {}, |u: Uninstalled| {
            println!("uninstalled: {} pins removed", u.removed.len())
        });
    }
    match pins::uninstall(&a.pin_dir) {
        Ok(removed) => {
            println!(
                "uninstalled: {} pins removed (no agent was running)",
                removed.len()
            );
            Ok(())
        }
        Err(e) => super::fail(exit::KERNEL, e),
    }
}
