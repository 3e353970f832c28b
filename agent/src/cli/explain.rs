//! `tollgate explain SRC DST:PORT/PROTO`.

use std::{net::IpAddr, process::ExitCode};

use tollgate::{control::protocol::Request, explain::Probe, tables::Proto};

use super::{Ctx, args, print};

/// The verdict a packet from SRC to DST:PORT/PROTO would get now, and why.
#[derive(clap::Args)]
pub struct ExplainArgs {
    /// Source address.
    src: IpAddr,
    /// Destination as ADDR:PORT/PROTO, e.g. 198.19.0.1:8000/tcp or [2001:db8::1]:443/udp.
    #[arg(value_parser = args::destination)]
    dst: (IpAddr, u16, Proto),
    /// Frame size in bytes to weigh against the byte budget.
    #[arg(long, default_value_t = 100)]
    bytes: u16,
}

pub fn run(a: ExplainArgs, ctx: &Ctx) -> ExitCode {
    super::call(
        &ctx.socket,
        &Request::Explain(Probe {
            src: a.src,
            dst: a.dst.0,
            port: a.dst.1,
            proto: a.dst.2,
            bytes: Some(a.bytes),
        }),
        ctx.print_with(print::explain),
    )
}
