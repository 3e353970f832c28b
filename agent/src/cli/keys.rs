//! `tollgate keys generate`: signing keys for `tollgate token issue`.

use std::{path::Path, path::PathBuf};

use clap::{Subcommand, ValueEnum};
use tollgate_common::token::{Alg, SigningKey, jwks};

use super::{Outcome, exit, fail};

/// Signing keys for `token issue`.
#[derive(clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Create a signing key (<DIR>/<KID>.key.json, secret) and add its public half to
    /// <DIR>/jwks.json (what the nodes' `tokens.jwks` points at).
    Generate {
        #[arg(long, value_enum, default_value_t = KeyAlg::Eddsa)]
        alg: KeyAlg,
        /// Key id, unique among the keys in use (e.g. 2026-11).
        #[arg(long)]
        kid: String,
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyAlg {
    /// Ed25519 (JWS "EdDSA").
    Eddsa,
    /// ECDSA P-256 with SHA-256 (JWS "ES256").
    Es256,
}

pub fn run(a: KeysArgs) -> Outcome {
    let Action::Generate { alg, kid, out_dir } = a.action;
    let alg = match alg {
        KeyAlg::Eddsa => Alg::EdDSA,
        KeyAlg::Es256 => Alg::ES256,
    };
    generate(alg, &kid, &out_dir)
}

/// Writes `<dir>/<kid>.key.json` (the secret, mode 0600) and adds the public key to
/// `<dir>/jwks.json`, creating it if needed.
pub fn generate(alg: Alg, kid: &str, dir: &Path) -> Outcome {
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
    Ok(())
}
