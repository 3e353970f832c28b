//! `tollgate explain SRC DST:PORT/PROTO`.

use std::net::IpAddr;

use tollgate::{
    control::{protocol::Request, reply::Explained},
    explain::Probe,
    tables::Proto,
};

use super::{Ctx, Outcome, args};

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

pub fn run(a: ExplainArgs, ctx: &Ctx) -> Outcome {
    super::call(
        &ctx.socket,
        &Request::Explain(Probe {
            src: a.src,
            dst: a.dst.0,
            port: a.dst.1,
            proto: a.dst.2,
            bytes: Some(a.bytes),
        }),
        ctx.print_with(|e: &Explained| print!("{}", text(e))),
    )
}

/// The verdict and reason, the sentence, then what the decision looked at.
fn text(e: &Explained) -> String {
    let mut out = format!("{} ({})\n  {}\n", e.verdict.to_uppercase(), e.reason, e.why);
    let seen = [
        ("endpoint", e.endpoint.clone()),
        ("identity", e.identity.clone()),
        ("class", e.class.map(|c| c.label().to_owned())),
        ("binding", e.binding.clone()),
        ("clock", e.clock.clone()),
    ];
    for (k, v) in seen {
        if let Some(v) = v {
            out.push_str(&format!("  {k:<9} {v}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tollgate_common::policy::Class;

    use super::*;

    #[test]
    fn text_shows_what_was_looked_at() {
        let e = Explained {
            verdict: "drop".into(),
            reason: "class_not_allowed".into(),
            endpoint_id: 1,
            endpoint: Some("model".into()),
            identity_id: Some(2),
            identity: Some("acme".into()),
            class: Some(Class::Customer),
            binding: Some("198.18.0.5/32".into()),
            clock: Some("coarse".into()),
            why: "customers may not reach model".into(),
            quota_reason: None,
        };
        let read: Explained = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(
            text(&read),
            "DROP (class_not_allowed)
  customers may not reach model
  endpoint  model
  identity  acme
  class     customer
  binding   198.18.0.5/32
  clock     coarse
"
        );
        let bare = Explained {
            endpoint: None,
            identity: None,
            class: None,
            binding: None,
            clock: None,
            ..e
        };
        assert_eq!(
            text(&bare),
            "DROP (class_not_allowed)\n  customers may not reach model\n"
        );
    }
}
