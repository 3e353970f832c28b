//! `tollgate uninstall`: through the agent that runs on the pins, else straight on the pins.

use std::path::{Path, PathBuf};

use tollgate::{
    control::{protocol::Request, reply::Uninstalled},
    paths,
    pins::{self, AgentRecord, PinDirUse},
};

use super::{Ctx, Failure, Outcome, exit};

/// Detach from every interface and remove every pin (enforcement stops). An agent running
/// on the pin directory is found by the directory itself (whatever its control socket) and
/// asked to do it; with none running, the CLI does it directly.
#[derive(clap::Args)]
pub struct UninstallArgs {
    /// Pin directory [default: /sys/fs/bpf/tollgate; without this option, an agent answering
    /// on --socket is asked to remove its own pins, wherever they are].
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
}

pub fn run(a: UninstallArgs, ctx: &Ctx) -> Outcome {
    let pin_dir = a
        .pin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(paths::PIN_DIR));
    let in_use = pins::pin_dir_use(&pin_dir).map_err(|e| Failure::new(exit::KERNEL, e))?;
    match in_use {
        PinDirUse::Agent(record) => through_agent(&pin_dir, record.as_ref(), ctx),
        PinDirUse::Free(lock) => {
            // Without --pin-dir, the agent behind --socket is asked, as it always was: it
            // removes its own pins, wherever they are.
            if a.pin_dir.is_none() && ctx.socket.exists() {
                drop(lock);
                return super::call(&ctx.socket, &Request::Uninstall {}, print);
            }
            // No agent holds the pins, and the lock held until the end keeps one from
            // starting on them meanwhile.
            let removed = pins::uninstall(&pin_dir).map_err(|e| Failure::new(exit::KERNEL, e))?;
            drop(lock);
            println!(
                "uninstalled: {} pins removed (no agent was running)",
                removed.len()
            );
            Ok(())
        }
    }
}

fn print(u: Uninstalled) {
    println!("uninstalled: {} pins removed", u.removed.len());
}

/// An agent holds `pin_dir`: it is asked on the socket it recorded (else `--socket`), and
/// nothing is touched behind its back if it does not answer.
fn through_agent(pin_dir: &Path, record: Option<&AgentRecord>, ctx: &Ctx) -> Outcome {
    let socket = record.map_or(ctx.socket.as_path(), |r| r.socket.as_path());
    let reply = super::request(
        socket,
        &Request::Uninstall {},
        std::time::Duration::from_secs(30),
    );
    match reply {
        Ok(u) => {
            print(u);
            Ok(())
        }
        Err(f) => {
            let who = match record {
                Some(r) => format!("an agent (pid {}) runs on {}", r.pid, pin_dir.display()),
                None => format!(
                    "an agent runs on {} (it holds the directory's lock) but left no record of \
                     its pid and socket",
                    pin_dir.display()
                ),
            };
            Err(Failure::new(
                f.code,
                format!(
                    "{who} and did not answer on its control socket {}: {}. Nothing was \
                     removed; uninstall through the agent once it answers, or stop it first \
                     (the program stays attached) and run `tollgate uninstall --pin-dir {}`",
                    socket.display(),
                    f.message,
                    pin_dir.display()
                ),
            ))
        }
    }
}
