//! `tollgate token issue|verify|revoke`: issue and verify are for operators without an
//! identity provider, and for checking what one issues; revoke asks the agent.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use tollgate::{
    config::Config,
    control::{protocol::Request, reply::Revoked},
    state::now_unix_ms,
    token_bind,
};
use tollgate_common::token::{ClaimNames, Mapping, NewToken, Policy, SigningKey, verify};

use super::{Ctx, Outcome, args, exit, fail, print};

/// Tokens: issue (without an identity provider), verify, revoke.
#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Sign a token with a key from `tollgate keys generate`; prints it.
    Issue {
        /// The signing key file (`<kid>.key.json`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The identity (the `sub` claim).
        #[arg(long)]
        identity: String,
        /// Class claim: internal, partner or customer.
        #[arg(long)]
        class: Option<String>,
        /// Plan claim: a plan of the nodes' configuration.
        #[arg(long)]
        plan: Option<String>,
        /// Role claims, comma-separated.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Audience: the node pool's `tokens.audience`.
        #[arg(long)]
        audience: String,
        /// Lifetime (90s, 15m, 2h); at most the nodes' `tokens.max_ttl_s`.
        #[arg(long, value_parser = args::duration_secs, default_value = "15m")]
        ttl: u64,
        /// Token id (`jti`); random if absent.
        #[arg(long)]
        id: Option<String>,
    },
    /// Check a token as a node would; prints its claims or the reason it is refused.
    Verify {
        token: String,
        /// Take keys and policy from this config's [tokens] section.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Or: the JWKS file ...
        #[arg(long, value_name = "FILE", requires = "audience")]
        jwks: Option<PathBuf>,
        /// ... and the audience.
        #[arg(long)]
        audience: Option<String>,
    },
    /// Revoke a token id, or every token of an identity issued until now: their bindings
    /// are removed at once and the revocation persists.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["token_id", "identity"])))]
    Revoke {
        /// The token's id, as bind replies, audit lines and `status` show it: its `jti` (or
        /// the claim its issuer's `token_id` names), or a derived `sha256:…`.
        #[arg(long)]
        token_id: Option<String>,
        /// The identity (the `sub` claim).
        #[arg(long)]
        identity: Option<String>,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

pub fn run(a: TokenArgs, ctx: &Ctx) -> Outcome {
    match a.action {
        Action::Issue {
            key,
            identity,
            class,
            plan,
            roles,
            audience,
            ttl,
            id,
        } => issue(&IssueArgs {
            key: &key,
            identity: &identity,
            class: class.as_deref(),
            plan: plan.as_deref(),
            roles: &roles,
            audience: &audience,
            ttl_secs: ttl,
            jti: id.as_deref(),
        }),
        Action::Verify {
            token,
            config,
            jwks,
            audience,
        } => verify_cmd(
            &token,
            jwks.as_deref(),
            audience.as_deref(),
            config.as_deref(),
        ),
        Action::Revoke {
            token_id,
            identity,
            reason,
        } => super::call(
            &ctx.socket,
            &Request::Revoke {
                token_id,
                identity,
                reason,
            },
            |r: Revoked| println!("{}", revoked_line(r)),
        ),
    }
}

fn revoked_line(r: Revoked) -> String {
    print::done_line(&[
        ("bindings_removed", Some(print::list(&r.bindings_removed))),
        ("identity", r.identity),
        ("token_id", r.token_id),
    ])
}

struct IssueArgs<'a> {
    key: &'a Path,
    identity: &'a str,
    class: Option<&'a str>,
    plan: Option<&'a str>,
    roles: &'a [String],
    audience: &'a str,
    ttl_secs: u64,
    jti: Option<&'a str>,
}

/// A random token id: 16 bytes from the kernel, hex.
fn random_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Unreachable on Linux 3.17+; a time-based id is still unique enough for one node.
        return format!("t{}", now_unix_ms());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn issue(a: &IssueArgs) -> Outcome {
    let text = match std::fs::read_to_string(a.key) {
        Ok(t) => t,
        Err(e) => return fail(exit::REFUSED, format!("{}: {e}", a.key.display())),
    };
    let key = match SigningKey::from_file_json(&text) {
        Ok(k) => k,
        Err(e) => return fail(exit::REFUSED, format!("{}: {e}", a.key.display())),
    };
    let now = now_unix_ms() / 1000;
    let jti = a.jti.map_or_else(random_id, str::to_owned);
    let t = NewToken {
        jti: &jti,
        identity: a.identity,
        class: a.class,
        plan: a.plan,
        roles: a.roles,
        audience: a.audience,
        iat: now,
        nbf: Some(now),
        exp: now + a.ttl_secs,
    };
    match tollgate_common::token::issue(&key, &t, &ClaimNames::default()) {
        Ok(token) => {
            println!("{token}");
            Ok(())
        }
        Err(e) => fail(exit::REFUSED, e),
    }
}

fn verify_cmd(
    token: &str,
    jwks_path: Option<&Path>,
    audience: Option<&str>,
    config: Option<&Path>,
) -> Outcome {
    // The node's own settings when a config is named (or present), else the flags.
    let cfg = match config {
        Some(p) => match Config::load(p) {
            Ok(c) => Some(c),
            Err(e) => return fail(exit::CONFIG, e),
        },
        None => None,
    };
    let tokens = cfg.as_ref().and_then(|c| c.tokens.as_ref());
    let token = token.trim();
    match (cfg.as_ref(), jwks_path, audience) {
        (Some(c), None, None) => match &c.tokens {
            Some(t) => verify_with_issuers(token, t, &c.node.state_dir),
            None => fail(exit::REFUSED, "the configuration has no [tokens] section"),
        },
        (_, Some(j), Some(aud)) => {
            let policy = Policy {
                issuer: None,
                audiences: vec![aud.to_owned()],
                max_ttl_s: tokens.map_or(3600, |t| t.max_ttl_s),
                skew_s: tokens.map_or(30, |t| t.clock_skew_s),
                max_token_bytes: tokens.map_or(8192, |t| t.max_token_bytes),
                mapping: Mapping::default(),
            };
            let keys = match token_bind::load_keys(j) {
                Ok(k) => k,
                Err(e) => return fail(exit::REFUSED, e),
            };
            match verify(token, &keys, &policy, now_unix_ms() / 1000) {
                Ok(c) => {
                    print_claims(&c, None);
                    Ok(())
                }
                Err(r) => fail(exit::REFUSED, format!("invalid token: {r} ({})", r.label())),
            }
        }
        _ => fail(
            exit::REFUSED,
            "give --config FILE (with a [tokens] section), or --jwks FILE and --audience AUD",
        ),
    }
}

/// As a node would: the issuer the token's `iss` picks, that issuer's keys (remote ones
/// fetched now, falling back on the node's persisted copy when the fetch fails), its
/// policy and mapping.
fn verify_with_issuers(token: &str, t: &tollgate::config::Tokens, state_dir: &Path) -> Outcome {
    // The node's persisted keys are read from a private copy: what this command fetches is
    // its own, and never races the agent's writes in the state directory.
    let scratch = match Scratch::copy_of(state_dir, t) {
        Ok(s) => s,
        Err(e) => return fail(exit::REFUSED, format!("a scratch directory: {e}")),
    };
    let svc = match token_bind::TokenService::new(t, &scratch.0, None) {
        Ok(s) => s,
        Err(e) => return fail(exit::REFUSED, e),
    };
    let (i, _) = match svc.select(token) {
        Ok(x) => x,
        Err(r) => {
            return fail(
                exit::REFUSED,
                format!("invalid token: {r} ({}); no issuer was chosen", r.label()),
            );
        }
    };
    let issuer = &svc.issuers[i];
    if issuer.remote {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return fail(exit::REFUSED, format!("a runtime for the fetch: {e}")),
        };
        let keys = issuer.keys.clone();
        let outcome =
            tokio::task::LocalSet::new().block_on(&rt, async move { keys.fetch_now().await });
        if outcome.label() != "ok" {
            let st = issuer.keys.status();
            eprintln!(
                "issuer {}: fetching its keys failed ({}: {}); using the node's persisted keys{}",
                issuer.name,
                outcome.label(),
                st.last_fetch.and_then(|l| l.error).unwrap_or_default(),
                st.age_s
                    .map_or(" (none)".to_owned(), |a| format!(" ({a} s old)"))
            );
        }
    }
    match svc.verify(token, now_unix_ms() / 1000) {
        Ok((i, c)) => {
            print_claims(&c, Some(&svc.issuers[i].name));
            Ok(())
        }
        Err((_, r)) => fail(
            exit::REFUSED,
            format!(
                "issuer {}: invalid token: {r} ({})",
                svc.issuers[i].name,
                r.label()
            ),
        ),
    }
}

/// A temporary state directory holding copies of the node's persisted JWKS of `t`'s
/// issuers; removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(state_dir: &Path, t: &tollgate::config::Tokens) -> std::io::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-token-verify-{}-{}",
            std::process::id(),
            now_unix_ms()
        ));
        std::fs::create_dir_all(dir.join("jwks"))?;
        let scratch = Scratch(dir);
        for i in &t.issuers {
            let from = tollgate::issuers::persist::path(state_dir, &i.name);
            // Absent or unreadable (not root): the issuer is fetched, or has no keys.
            let _ = std::fs::copy(&from, tollgate::issuers::persist::path(&scratch.0, &i.name));
        }
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn print_claims(c: &tollgate_common::token::Claims, issuer: Option<&str>) {
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "valid": true,
            "issuer": issuer,
            "iss": c.issuer,
            "token_id": c.jti,
            "identity": c.identity,
            "class": c.class,
            "plan": c.plan,
            "roles": c.roles,
            "audience": c.audience,
            "issued_at": c.iat,
            "expires": c.exp,
            "key_id": c.kid,
            "alg": c.alg.as_str(),
        }))
        .unwrap_or_default()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_line_is_the_documented_one() {
        let r = Revoked {
            token_id: Some("6f1c".into()),
            identity: None,
            bindings_removed: vec!["198.18.0.7/32".into()],
        };
        let r: Revoked = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(
            revoked_line(r),
            "ok: bindings_removed=198.18.0.7/32 token_id=6f1c"
        );
        let none = Revoked {
            token_id: None,
            identity: Some("alice".into()),
            bindings_removed: vec![],
        };
        assert_eq!(revoked_line(none), "ok: bindings_removed=- identity=alice");
    }
}
