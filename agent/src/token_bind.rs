//! The token service: the keys and verification policy a node binds tokens with, the tally
//! of verifications, why a token bind fails, and where a token's identity is placed. The
//! binding itself is `ops::tokens`'.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use tollgate_common::token::{ClaimNames, Claims, KeySet, Mapping, Policy, REFUSALS, Refusal};

use crate::{
    config::{Config, Tokens},
    state::TokenIdentity,
};

/// Keys, policy and the verification tallies.
pub struct TokenService {
    pub keys: KeySet,
    pub policy: Policy,
    pub jwks_mtime: Option<std::time::SystemTime>,
    /// Verifications by result: `ok` or a refusal label (bounded: one entry per label).
    pub results: BTreeMap<&'static str, u64>,
    /// Tokens presented from a second address while bound.
    pub thefts: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct KeysError {
    pub path: String,
    pub message: String,
}

fn mtime(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub fn load_keys(path: &Path) -> Result<KeySet, KeysError> {
    let err = |message: String| KeysError {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    KeySet::from_jwks(&text).map_err(|e| err(e.to_string()))
}

impl TokenService {
    pub fn new(cfg: &Tokens) -> Result<TokenService, KeysError> {
        let keys = load_keys(&interim_jwks(cfg))?;
        let mut results: BTreeMap<&'static str, u64> =
            REFUSALS.iter().map(|r| (r.label(), 0)).collect();
        results.insert("ok", 0);
        Ok(TokenService {
            keys,
            policy: policy_of(cfg),
            jwks_mtime: mtime(&interim_jwks(cfg)),
            results,
            thefts: 0,
        })
    }

    /// Re-reads the JWKS when the file changed (key rotation without a reload); a broken file
    /// keeps the keys in use.
    pub fn refresh(&mut self, cfg: &Tokens) -> Option<Result<usize, KeysError>> {
        let now = mtime(&interim_jwks(cfg));
        if now == self.jwks_mtime {
            return None;
        }
        self.jwks_mtime = now;
        Some(load_keys(&interim_jwks(cfg)).map(|k| {
            self.keys = k;
            self.keys.len()
        }))
    }

    pub(crate) fn count(&mut self, label: &'static str) {
        *self.results.entry(label).or_default() += 1;
    }
}

pub fn policy_of(cfg: &Tokens) -> Policy {
    let names = ClaimNames {
        identity: cfg.identity_claim.clone(),
        class: cfg.class_claim.clone(),
        plan: cfg.plan_claim.clone(),
        roles: cfg.roles_claim.clone(),
    };
    Policy {
        issuer: None,
        audiences: cfg.audience.clone().into_iter().collect(),
        max_ttl_s: cfg.max_ttl_s,
        skew_s: cfg.clock_skew_s,
        max_token_bytes: cfg.max_token_bytes,
        mapping: Mapping::legacy(&names, None, None),
    }
}

/// Why a token bind failed; maps to an HTTP status (here) and a control-socket error kind
/// (`ops::OpError`'s `From`).
#[derive(Debug)]
pub enum BindFailure {
    /// The token itself (signature, time, audience, revocation ...).
    Refused(Refusal),
    /// A valid token, already bound to another address: probable theft.
    Replay { bound_to: IpAddr },
    /// A valid token whose identity the configuration cannot place (unknown plan or class).
    Unplaceable(String),
    /// Token binding is not configured on this node.
    Disabled,
    /// The kernel refused (a full binding map, ...).
    Kernel(String),
    /// The identity already holds `tokens.max_bindings_per_identity` live bindings.
    BindingCap { cap: usize },
    /// The change could not be recorded (a full or read-only state disk): not made. The
    /// detail (a path, an OS error) is for the operator, never for the HTTPS client.
    Unrecorded(String),
    /// Made (and recorded), but its audit line could not be written: answered as a failure,
    /// since an unaudited change must not look like a success, in words that say it was made.
    Unaudited(String),
}

impl BindFailure {
    pub fn http_status(&self) -> u16 {
        match self {
            BindFailure::Refused(Refusal::Revoked) | BindFailure::Replay { .. } => 403,
            BindFailure::Refused(_) => 401,
            BindFailure::Unplaceable(_) => 422,
            BindFailure::Disabled => 404,
            BindFailure::Kernel(_) | BindFailure::Unrecorded(_) | BindFailure::Unaudited(_) => 503,
            BindFailure::BindingCap { .. } => 429,
        }
    }

    pub fn message(&self) -> String {
        match self {
            BindFailure::Refused(r) => format!("token refused: {r} ({})", r.label()),
            // Never the bound address: the presenter is probably the thief, and the victim's
            // address is the operator's to know (the audit line keeps it).
            BindFailure::Replay { .. } => {
                "token refused: it is bound to another address; probable token theft, reported"
                    .into()
            }
            BindFailure::Unplaceable(m) => format!("token refused: {m}"),
            BindFailure::Disabled => "token binding is not configured on this node".into(),
            BindFailure::Kernel(m) => m.clone(),
            BindFailure::BindingCap { cap } => format!(
                "token refused: this identity already holds {cap} bindings \
                 (tokens.max_bindings_per_identity); unbind one first (binding_cap)"
            ),
            BindFailure::Unrecorded(m) => {
                format!("not done: the change cannot be recorded ({m}); nothing was changed")
            }
            BindFailure::Unaudited(m) => {
                format!("done, but its audit record could not be written: audit log: {m}")
            }
        }
    }

    /// What an HTTPS client is told: the node's own trouble (its disk, its kernel tables) in
    /// general words, the detail left to the log and the audit log.
    pub fn public_message(&self) -> String {
        match self {
            BindFailure::Unrecorded(_) => {
                "the node cannot record the binding now; try again later".into()
            }
            BindFailure::Kernel(_) => {
                "the node cannot make the binding now; try again later".into()
            }
            BindFailure::Unaudited(_) => {
                "done, but the node could not audit it; tell the node's operator".into()
            }
            _ => self.message(),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            BindFailure::Refused(r) => r.label(),
            BindFailure::Replay { .. } => "replay",
            BindFailure::Unplaceable(_) => "unplaceable",
            BindFailure::Disabled => "disabled",
            BindFailure::Kernel(_) => "kernel",
            BindFailure::BindingCap { .. } => "binding_cap",
            BindFailure::Unrecorded(_) => "unrecorded",
            BindFailure::Unaudited(_) => "unaudited",
        }
    }
}

impl std::fmt::Display for BindFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for BindFailure {}

/// Where a token's identity is placed: `None` when the configuration names the identity (its
/// class, plan and roles are the configuration's), else the claims' class, plan and roles
/// (with the configured defaults).
pub fn placement(
    config: &Config,
    cfg: &Tokens,
    c: &Claims,
) -> Result<Option<TokenIdentity>, String> {
    if config.identity(&c.identity).is_some() {
        return Ok(None);
    }
    let class = match (&c.class, cfg.default_class) {
        (Some(label), _) => crate::config::class_from_label(label)
            .ok_or_else(|| format!("unknown class {label:?} in claim {}", cfg.class_claim))?
            .label()
            .to_owned(),
        (None, Some(d)) => d.label().to_owned(),
        (None, None) => {
            return Err(format!(
                "no {} claim and no tokens.default_class",
                cfg.class_claim
            ));
        }
    };
    let plan = match (&c.plan, &cfg.default_plan) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(format!(
                "no {} claim and no tokens.default_plan",
                cfg.plan_claim
            ));
        }
    };
    if config.plan_index(&plan).is_none() {
        return Err(format!("unknown plan {plan:?} in claim {}", cfg.plan_claim));
    }
    Ok(Some(TokenIdentity {
        class,
        plan,
        roles: c.roles.clone(),
        expires_unix_ms: c.exp.saturating_mul(1000),
    }))
}

// Interim until the issuers are wired: the first file source.
fn interim_jwks(cfg: &Tokens) -> std::path::PathBuf {
    cfg.issuers
        .iter()
        .find_map(|i| match &i.source {
            crate::config::KeySource::File(p) => Some(p.clone()),
            _ => None,
        })
        .unwrap_or_default()
}
