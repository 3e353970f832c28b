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
        /// The identity (the `sub` claim). A node takes it as it is under its legacy issuer
        /// (`tokens.jwks`).
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
    /// Check a token's signature, times, issuer, audience and claim mapping as a node
    /// would; prints its claims (identity and token id as the node names them) or the reason
    /// it is refused. It checks neither revocation nor placement (the node's revoked ids,
    /// whether a class or plan is within the issuer's `classes`/`plans`): a token it calls
    /// valid may still be refused by a bind.
    Verify {
        /// The token, or `-` to read it from stdin (keeps it out of shell history and `ps`).
        #[arg(value_name = "TOKEN")]
        token: String,
        /// Verify as the node with this configuration does: the issuer the token's `iss`
        /// picks, its claim mapping and policy. Fetches remote issuers' keys over the network
        /// now (discovery, jwks_url), falling back on the node's persisted copy in its
        /// state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Instead of --config's issuers: the keys of this JWKS file, with --audience (a
        /// --config then gives only its max_ttl_s, clock_skew_s, max_token_bytes). Ignores
        /// `iss` and reads the legacy claim names (sub, tollgate_class, tollgate_plan,
        /// tollgate_roles), so an identity provider's token may show class null.
        #[arg(long, value_name = "FILE", requires = "audience")]
        jwks: Option<PathBuf>,
        /// With --jwks: the audience `aud` must contain.
        #[arg(long, requires = "jwks")]
        audience: Option<String>,
    },
    /// Revoke a token id, or every token of an identity issued until now: their bindings
    /// are removed at once and the revocation persists.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["token_id", "identity"])))]
    Revoke {
        /// The token's id, as bind replies, audit lines and `status` show it: its `jti` (or
        /// the claim its issuer's `token_id` names), or a derived `sha256:…`; prefixed
        /// `<issuer>:` for a `[[tokens.issuers]]` issuer (`partner:6f1c…`).
        #[arg(long)]
        token_id: Option<String>,
        /// The identity, as bind replies and `tollgate identities` show it: the issuer's
        /// mapped identity claim, prefixed `<issuer>:` for a `[[tokens.issuers]]` issuer
        /// (`partner:trainer`); bare for the legacy issuer (`tokens.jwks`).
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
    let stdin;
    let token = if token == "-" {
        stdin = match read_token(std::io::stdin().lock()) {
            Ok(t) => t,
            Err(e) => return fail(exit::REFUSED, format!("reading the token from stdin: {e}")),
        };
        stdin.as_str()
    } else {
        token
    };
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

/// The token from `r` (stdin), bounded: a token is at most 64 KiB (`max_token_bytes`), so
/// more is not read.
fn read_token(r: impl std::io::Read) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    r.take(65536 + 2).read_to_string(&mut text)?;
    Ok(text)
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

/// A private temporary state directory holding copies of the node's persisted JWKS of `t`'s
/// issuers; removed on drop. It is made afresh under an unguessable name, mode 0700, never
/// reused: the command often runs as root (the persisted keys are root's), and a directory
/// another user planted at a guessable name could redirect the copy (symlinks) or swap the
/// keys it verifies with (review 13b, must-fix 5).
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(state_dir: &Path, t: &tollgate::config::Tokens) -> std::io::Result<Scratch> {
        use ring::rand::SecureRandom as _;
        let mut b = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| std::io::Error::other("no randomness for its name"))?;
        let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("tollgate-token-verify-{name}"));
        let names: Vec<&str> = t.issuers.iter().map(|i| i.name.as_str()).collect();
        Scratch::create(dir, state_dir, &names)
    }

    /// Makes `dir` (its parent must exist; a path that exists already, a symlink included,
    /// is an error: nothing there is touched or removed) and copies the issuers' persisted
    /// keys into it.
    fn create(dir: PathBuf, state_dir: &Path, issuers: &[&str]) -> std::io::Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt as _;
        let private = || {
            let mut b = std::fs::DirBuilder::new();
            b.mode(0o700);
            b
        };
        private().create(&dir)?;
        // Ours from here: removed on drop, whatever fails below.
        let scratch = Scratch(dir);
        private().create(scratch.0.join("jwks"))?;
        for name in issuers {
            let from = tollgate::issuers::persist::path(state_dir, name);
            copy_private(&from, &tollgate::issuers::persist::path(&scratch.0, name))?;
        }
        Ok(scratch)
    }
}

/// Copies `from` to a new file `to` (never an existing one, never through a symlink).
/// An absent or unreadable `from` (not root) is no error: the issuer is fetched, or has no
/// keys.
fn copy_private(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let Ok(mut src) = std::fs::File::open(from) else {
        return Ok(());
    };
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)?;
    std::io::copy(&mut src, &mut dst).map(|_| ())
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

    /// A test directory of its own, removed on drop.
    struct Tmp(PathBuf);

    impl Tmp {
        fn new(tag: &str) -> Tmp {
            let d = std::env::temp_dir()
                .join(format!("tollgate-cli-token-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("state/jwks")).expect("dir");
            std::fs::write(d.join("state/jwks/idp.json"), "{\"keys\": []}").expect("jwks");
            Tmp(d)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_token_from_stdin_is_read_bounded() {
        assert_eq!(read_token(&b"eyJ.x.y\n"[..]).unwrap(), "eyJ.x.y\n");
        let huge = vec![b'a'; 1 << 20];
        assert_eq!(read_token(&huge[..]).unwrap().len(), 65538);
    }

    #[test]
    fn the_scratch_directory_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = Tmp::new("fresh");
        let dir = t.0.join("scratch");
        let s = Scratch::create(dir.clone(), &t.0.join("state"), &["idp", "absent"]).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(
            std::fs::read_to_string(dir.join("jwks/idp.json")).unwrap(),
            "{\"keys\": []}"
        );
        drop(s);
        assert!(!dir.exists());
    }

    /// A directory (or a symlink) planted at the scratch name is refused, not reused: nothing
    /// is written through it, and it is not removed.
    #[test]
    fn a_planted_scratch_directory_or_symlink_is_refused() {
        let t = Tmp::new("planted");
        let state = t.0.join("state");
        let planted = t.0.join("planted");
        std::fs::create_dir_all(planted.join("jwks")).unwrap();
        let victim = t.0.join("victim");
        std::fs::write(&victim, "root's file").unwrap();
        std::os::unix::fs::symlink(&victim, planted.join("jwks/idp.json")).unwrap();
        let e = Scratch::create(planted.clone(), &state, &["idp"])
            .err()
            .expect("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file");
        assert!(
            planted.join("jwks").is_dir(),
            "the planted directory was removed"
        );
        let link = t.0.join("link");
        std::os::unix::fs::symlink(&planted, &link).unwrap();
        let e = Scratch::create(link, &state, &["idp"])
            .err()
            .expect("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file");
        // The copy itself neither follows a symlink nor overwrites.
        let e = copy_private(&state.join("jwks/idp.json"), &planted.join("jwks/idp.json"))
            .expect_err("through a symlink");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file");
    }

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
