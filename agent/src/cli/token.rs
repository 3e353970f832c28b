//! `tollgate token ...` and `tollgate keys generate`: for operators without an identity
//! provider, and for checking what one issues.

use std::{path::Path, process::ExitCode};

use tollgate::{config::Config, state::now_unix_ms, token_bind};
use tollgate_common::token::{Alg, ClaimNames, NewToken, Policy, SigningKey, jwks, verify};

use super::exit;

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tollgate: {msg}");
    ExitCode::from(code)
}

pub struct IssueArgs<'a> {
    pub key: &'a Path,
    pub identity: &'a str,
    pub class: Option<&'a str>,
    pub plan: Option<&'a str>,
    pub roles: &'a [String],
    pub audience: &'a str,
    pub ttl_secs: u64,
    pub jti: Option<&'a str>,
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

pub fn issue(a: &IssueArgs) -> ExitCode {
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
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit::REFUSED, e),
    }
}

pub fn verify_cmd(
    token: &str,
    jwks_path: Option<&Path>,
    audience: Option<&str>,
    config: Option<&Path>,
) -> ExitCode {
    // The node's own settings when a config is named (or present), else the flags.
    let cfg = match config {
        Some(p) => match Config::load(p) {
            Ok(c) => c.tokens,
            Err(e) => return fail(exit::CONFIG, e),
        },
        None => None,
    };
    let (policy, jwks_path) = match (&cfg, jwks_path, audience) {
        (Some(t), None, None) => (token_bind::policy_of(t), t.jwks.clone()),
        (_, Some(j), Some(aud)) => (
            Policy {
                audience: aud.to_owned(),
                max_ttl_s: cfg.as_ref().map_or(3600, |t| t.max_ttl_s),
                skew_s: cfg.as_ref().map_or(30, |t| t.clock_skew_s),
                max_token_bytes: cfg.as_ref().map_or(8192, |t| t.max_token_bytes),
                claim_names: ClaimNames::default(),
            },
            j.to_owned(),
        ),
        _ => {
            return fail(
                exit::REFUSED,
                "give --config FILE (with a [tokens] section), or --jwks FILE and --audience AUD",
            );
        }
    };
    let keys = match token_bind::load_keys(&jwks_path) {
        Ok(k) => k,
        Err(e) => return fail(exit::REFUSED, e),
    };
    match verify(token.trim(), &keys, &policy, now_unix_ms() / 1000) {
        Ok(c) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "valid": true,
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
            ExitCode::SUCCESS
        }
        Err(r) => fail(exit::REFUSED, format!("invalid token: {r} ({})", r.label())),
    }
}

/// Writes `<dir>/<kid>.key.json` (the secret, mode 0600) and adds the public key to
/// `<dir>/jwks.json`, creating it if needed.
pub fn generate(alg: Alg, kid: &str, dir: &Path) -> ExitCode {
    let key = match SigningKey::generate(alg, kid) {
        Ok(k) => k,
        Err(e) => return fail(exit::REFUSED, e),
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        return fail(exit::REFUSED, format!("{}: {e}", dir.display()));
    }
    let secret = dir.join(format!("{kid}.key.json"));
    if secret.exists() {
        return fail(
            exit::REFUSED,
            format!("{} exists: choose another --kid", secret.display()),
        );
    }
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret)
        .and_then(|mut f| f.write_all(key.to_file_json().as_bytes()));
    if let Err(e) = written {
        return fail(exit::REFUSED, format!("{}: {e}", secret.display()));
    }
    let jwks_path = dir.join("jwks.json");
    let mut keys: Vec<serde_json::Value> = match std::fs::read_to_string(&jwks_path) {
        Ok(t) => match serde_json::from_str::<serde_json::Value>(&t) {
            Ok(v) => v["keys"].as_array().cloned().unwrap_or_default(),
            Err(e) => return fail(exit::REFUSED, format!("{}: {e}", jwks_path.display())),
        },
        Err(_) => Vec::new(),
    };
    keys.push(key.public_jwk());
    if let Err(e) = std::fs::write(&jwks_path, jwks(&keys)) {
        return fail(exit::REFUSED, format!("{}: {e}", jwks_path.display()));
    }
    println!("secret key: {} (keep it secret)", secret.display());
    println!(
        "public keys: {} ({} keys; give this file to the nodes)",
        jwks_path.display(),
        keys.len()
    );
    ExitCode::SUCCESS
}
