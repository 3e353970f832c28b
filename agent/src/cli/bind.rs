//! `tollgate bind TARGET --identity NAME` and `tollgate bind --token TOKEN --addr ADDR`.

use tollgate::control::{
    protocol::Request,
    reply::{Bound, TokenBound},
};

use super::{Ctx, Outcome, args, exit, print};

/// Bind an address or CIDR to a configured identity (run-time binding, persisted), or,
/// with --token, bind a client's address with the client's token (for a trusted gateway
/// that terminates the client's connection itself).
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["identity", "token"])))]
pub struct BindArgs {
    /// Address (a /32 or /128) or CIDR, host bits zero.
    #[arg(required_unless_present = "addr", conflicts_with = "addr")]
    target: Option<String>,
    /// The client's address (same as TARGET; reads better with --token).
    #[arg(long, value_name = "ADDR")]
    addr: Option<String>,
    /// The identity's name.
    #[arg(long)]
    identity: Option<String>,
    /// The client's token: the binding gets the token's identity and expiry.
    #[arg(long, conflicts_with = "for_secs")]
    token: Option<String>,
    /// Expire after this long (90s, 15m, 2h, 7d); the kernel enforces the expiry itself.
    #[arg(long = "for", value_name = "DURATION", value_parser = args::duration_secs)]
    for_secs: Option<u64>,
}

pub fn run(a: BindArgs, ctx: &Ctx) -> Outcome {
    let target = a.target.or(a.addr).unwrap_or_default();
    match (a.identity, a.token) {
        (Some(identity), _) => super::call(
            &ctx.socket,
            &Request::Bind {
                target,
                identity,
                for_secs: a.for_secs,
            },
            |b: Bound| println!("{}", bound_line(b)),
        ),
        (None, Some(token)) => match target.parse() {
            Ok(addr) => super::call(
                &ctx.socket,
                &Request::BindToken { token, addr },
                |b: TokenBound| println!("{}", token_bound_line(b)),
            ),
            Err(_) => super::fail(
                exit::REFUSED,
                format!("{target:?} is not an address (a token binds one address)"),
            ),
        },
        (None, None) => unreachable!("clap requires --identity or --token"),
    }
}

fn bound_line(b: Bound) -> String {
    print::done_line(&[
        ("expires_unix_ms", b.expires_unix_ms.map(|t| t.to_string())),
        ("identity", Some(b.identity)),
        ("target", Some(b.target)),
    ])
}

fn token_bound_line(b: TokenBound) -> String {
    print::done_line(&[
        ("address", Some(b.address.to_string())),
        ("expires_unix", Some(b.expires_unix.to_string())),
        ("identity", Some(b.identity)),
        ("key_id", Some(b.key_id)),
        ("token_id", Some(b.token_id)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(v: T) -> T {
        serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap()
    }

    /// The lines docs/cli.md shows.
    #[test]
    fn ok_lines() {
        let b = Bound {
            target: "198.51.100.7/32".into(),
            identity: "partner-acme".into(),
            expires_unix_ms: Some(1764257207000),
        };
        assert_eq!(
            bound_line(wire(b)),
            "ok: expires_unix_ms=1764257207000 identity=partner-acme target=198.51.100.7/32"
        );
        let b = Bound {
            target: "198.51.100.0/28".into(),
            identity: "partner-acme".into(),
            expires_unix_ms: None,
        };
        assert_eq!(
            bound_line(wire(b)),
            "ok: identity=partner-acme target=198.51.100.0/28"
        );
        let t = TokenBound {
            address: "198.18.0.7".parse().unwrap(),
            identity: "alice".into(),
            token_id: "6f1c".into(),
            key_id: "2026-11".into(),
            expires_unix: 1795780000,
        };
        assert_eq!(
            token_bound_line(wire(t)),
            "ok: address=198.18.0.7 expires_unix=1795780000 identity=alice key_id=2026-11 \
             token_id=6f1c"
        );
    }
}
