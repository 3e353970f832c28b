//! Binding by token: verify, apply the revocation list, refuse replays from a second
//! address, give the identity a slot, bind the caller's observed address until the token
//! expires. The HTTPS listener and `tollgate bind --token` both end here.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use serde_json::json;
use tollgate_common::{
    policy::MAX_IDENTITIES,
    token::{ClaimNames, Claims, KeySet, Policy, REFUSALS, Refusal, verify},
};
use tracing::warn;

use crate::{
    audit::Actor,
    config::{Config, Tokens},
    control::protocol::{ErrorKind, Response},
    daemon::Daemon,
    policy,
    state::{DynBinding, TokenIdentity, now_unix_ms},
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
        let keys = load_keys(&cfg.jwks)?;
        let mut results: BTreeMap<&'static str, u64> =
            REFUSALS.iter().map(|r| (r.label(), 0)).collect();
        results.insert("ok", 0);
        Ok(TokenService {
            keys,
            policy: policy_of(cfg),
            jwks_mtime: mtime(&cfg.jwks),
            results,
            thefts: 0,
        })
    }

    /// Re-reads the JWKS when the file changed (key rotation without a reload); a broken file
    /// keeps the keys in use.
    pub fn refresh(&mut self, cfg: &Tokens) -> Option<Result<usize, KeysError>> {
        let now = mtime(&cfg.jwks);
        if now == self.jwks_mtime {
            return None;
        }
        self.jwks_mtime = now;
        Some(load_keys(&cfg.jwks).map(|k| {
            self.keys = k;
            self.keys.len()
        }))
    }

    fn count(&mut self, label: &'static str) {
        *self.results.entry(label).or_default() += 1;
    }
}

pub fn policy_of(cfg: &Tokens) -> Policy {
    Policy {
        audience: cfg.audience.clone(),
        max_ttl_s: cfg.max_ttl_s,
        skew_s: cfg.clock_skew_s,
        max_token_bytes: cfg.max_token_bytes,
        claim_names: ClaimNames {
            identity: cfg.identity_claim.clone(),
            class: cfg.class_claim.clone(),
            plan: cfg.plan_claim.clone(),
            roles: cfg.roles_claim.clone(),
        },
    }
}

/// Why a token bind failed; maps to an HTTP status and a control-socket error kind.
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
}

impl BindFailure {
    pub fn http_status(&self) -> u16 {
        match self {
            BindFailure::Refused(Refusal::Revoked) | BindFailure::Replay { .. } => 403,
            BindFailure::Refused(_) => 401,
            BindFailure::Unplaceable(_) => 422,
            BindFailure::Disabled => 404,
            BindFailure::Kernel(_) => 503,
        }
    }

    pub fn message(&self) -> String {
        match self {
            BindFailure::Refused(r) => format!("token refused: {r} ({})", r.label()),
            BindFailure::Replay { bound_to } => format!(
                "token refused: it is bound to another address ({bound_to}); probable token theft, reported"
            ),
            BindFailure::Unplaceable(m) => format!("token refused: {m}"),
            BindFailure::Disabled => "token binding is not configured on this node".into(),
            BindFailure::Kernel(m) => m.clone(),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            BindFailure::Refused(r) => r.label(),
            BindFailure::Replay { .. } => "replay",
            BindFailure::Unplaceable(_) => "unplaceable",
            BindFailure::Disabled => "disabled",
            BindFailure::Kernel(_) => "kernel",
        }
    }

    pub fn to_response(&self) -> Response {
        let kind = match self {
            BindFailure::Kernel(_) => ErrorKind::Kernel,
            BindFailure::Disabled => ErrorKind::NotFound,
            _ => ErrorKind::BadRequest,
        };
        Response::err(kind, self.message())
    }
}

/// (class, plan, roles) of a token's identity: the configuration's if it names the identity,
/// else the claims' (with the configured defaults).
fn placement(config: &Config, cfg: &Tokens, c: &Claims) -> Result<Option<TokenIdentity>, String> {
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

impl Daemon {
    /// Verifies `token` and binds `addr` (the observed peer, or the gateway's client) to its
    /// identity until it expires. Every outcome is counted; refusals and binds are audited.
    pub fn bind_token(
        &mut self,
        token: &str,
        addr: IpAddr,
        who: &Actor,
    ) -> Result<serde_json::Value, BindFailure> {
        // An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let addr = addr.to_canonical();
        let r = self.bind_token_inner(token, addr, who);
        if let Err(f) = &r {
            if let Some(svc) = self.tokens.as_mut() {
                match f {
                    BindFailure::Refused(refusal) => svc.count(refusal.label()),
                    BindFailure::Replay { .. } => svc.thefts += 1,
                    _ => {}
                }
            }
            let action = if matches!(f, BindFailure::Replay { .. }) {
                "token_theft"
            } else {
                "token_refused"
            };
            if let Err(e) = self.audit.record(
                who,
                action,
                f.label(),
                json!({"address": addr, "message": f.message()}),
            ) {
                warn!("audit log: {e}");
            }
        }
        r
    }

    fn bind_token_inner(
        &mut self,
        token: &str,
        addr: IpAddr,
        who: &Actor,
    ) -> Result<serde_json::Value, BindFailure> {
        let cfg = self.config.tokens.clone().ok_or(BindFailure::Disabled)?;
        let svc = self.tokens.as_mut().ok_or(BindFailure::Disabled)?;
        let now_ms = now_unix_ms();
        let claims =
            verify(token, &svc.keys, &svc.policy, now_ms / 1000).map_err(BindFailure::Refused)?;
        if self.state.revoked_tokens.contains_key(&claims.jti)
            || self
                .state
                .revoked_identities
                .get(&claims.identity)
                .is_some_and(|at| claims.iat.saturating_mul(1000) <= *at)
        {
            return Err(BindFailure::Refused(Refusal::Revoked));
        }
        svc.count("ok");
        // Replay: the same token, bound and alive, from another address.
        if let Some(b) = self
            .state
            .bindings
            .iter()
            .find(|b| b.token_id.as_deref() == Some(claims.jti.as_str()) && !b.expired(now_ms))
            && b.addr != addr
        {
            return Err(BindFailure::Replay { bound_to: b.addr });
        }
        let len = crate::tables::host_len(addr);
        if let Some(owner) = self
            .config
            .identities
            .iter()
            .find(|i| i.bind.contains(&(addr, len)))
        {
            return Err(BindFailure::Unplaceable(format!(
                "{addr} is bound to {} by the configuration",
                owner.name
            )));
        }
        let placed = placement(&self.config, &cfg, &claims).map_err(BindFailure::Unplaceable)?;
        let id = self
            .state
            .identity_id(&claims.identity, MAX_IDENTITIES)
            .ok_or_else(|| {
                BindFailure::Kernel(format!("no free identity slot for {}", claims.identity))
            })?;
        if let Some(t) = placed {
            let merged = match self.state.token_identities.get(&claims.identity) {
                Some(old) if old.expires_unix_ms > t.expires_unix_ms => TokenIdentity {
                    expires_unix_ms: old.expires_unix_ms,
                    ..t
                },
                _ => t,
            };
            let rec = policy::token_identity_record(
                &self.config,
                &merged,
                self.state.quarantined(&claims.identity, now_ms),
            );
            self.pinned
                .tables
                .set_identity_keeping_controller_flags(id, &rec)
                .map_err(|e| BindFailure::Kernel(e.to_string()))?;
            self.state
                .token_identities
                .insert(claims.identity.clone(), merged);
        }
        let expires_ms = claims.exp.saturating_mul(1000);
        let exp_ns = policy::expiry_boot_ns(Some(expires_ms), now_ms).unwrap_or(1);
        self.pinned
            .tables
            .bind(addr, len, id, exp_ns)
            .map_err(|e| BindFailure::Kernel(e.to_string()))?;
        self.state
            .bindings
            .retain(|b| !(b.addr == addr && b.prefix_len == len));
        self.state.bindings.push(DynBinding {
            addr,
            prefix_len: len,
            identity: claims.identity.clone(),
            expires_unix_ms: Some(expires_ms),
            created_unix_ms: now_ms,
            by: who.describe(),
            token_id: Some(claims.jti.clone()),
        });
        self.state
            .save(&self.config.node.state_dir)
            .map_err(|e| BindFailure::Kernel(e.to_string()))?;
        let detail = json!({
            "address": addr,
            "identity": claims.identity,
            "token_id": claims.jti,
            "key_id": claims.kid,
            "expires_unix": claims.exp,
        });
        self.audit
            .record(who, "bind", "token", detail.clone())
            .map_err(|e| BindFailure::Kernel(format!("audit log: {e}")))?;
        Ok(detail)
    }

    /// Ends the binding `token` made for `addr` (DELETE /v1/bind): the token must verify and
    /// must be the one that made it.
    pub fn unbind_token(
        &mut self,
        token: &str,
        addr: IpAddr,
        who: &Actor,
    ) -> Result<serde_json::Value, BindFailure> {
        // An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let addr = addr.to_canonical();
        let svc = self.tokens.as_mut().ok_or(BindFailure::Disabled)?;
        let claims = verify(token, &svc.keys, &svc.policy, now_unix_ms() / 1000)
            .map_err(BindFailure::Refused)?;
        let before = self.state.bindings.len();
        self.state
            .bindings
            .retain(|b| !(b.addr == addr && b.token_id.as_deref() == Some(claims.jti.as_str())));
        if self.state.bindings.len() == before {
            return Err(BindFailure::Unplaceable(format!(
                "{addr} is not bound by this token"
            )));
        }
        let len = crate::tables::host_len(addr);
        let _ = self.pinned.tables.unbind(addr, len);
        self.state
            .save(&self.config.node.state_dir)
            .map_err(|e| BindFailure::Kernel(e.to_string()))?;
        let detail = json!({"address": addr, "identity": claims.identity, "token_id": claims.jti});
        self.audit
            .record(who, "unbind", "token", detail.clone())
            .map_err(|e| BindFailure::Kernel(format!("audit log: {e}")))?;
        Ok(detail)
    }

    /// Revokes a token id or every token of an identity issued until now: their bindings go
    /// at once, and the revocation is persisted.
    pub fn revoke(
        &mut self,
        token_id: Option<&str>,
        identity: Option<&str>,
        reason: &str,
        who: &Actor,
    ) -> Result<serde_json::Value, Response> {
        let now_ms = now_unix_ms();
        if token_id.is_none() && identity.is_none() {
            return Err(Response::err(
                ErrorKind::BadRequest,
                "revoke needs --token-id or --identity",
            ));
        }
        let hit = |b: &DynBinding| {
            token_id.is_some_and(|t| b.token_id.as_deref() == Some(t))
                || identity.is_some_and(|i| b.identity == i && b.token_id.is_some())
        };
        let removed: Vec<DynBinding> = self
            .state
            .bindings
            .iter()
            .filter(|b| hit(b))
            .cloned()
            .collect();
        for b in &removed {
            match self.pinned.tables.unbind(b.addr, b.prefix_len) {
                Ok(()) | Err(crate::tables::TableError::NoBinding(_)) => {}
                Err(e) => return Err(Response::err(ErrorKind::Kernel, e.to_string())),
            }
        }
        self.state.bindings.retain(|b| !hit(b));
        if let Some(t) = token_id {
            // Kept until the token would have expired anyway (max TTL from now bounds it).
            let ttl = self
                .config
                .tokens
                .as_ref()
                .map_or(86400, |c| c.max_ttl_s + c.clock_skew_s);
            let until = removed
                .iter()
                .filter_map(|b| b.expires_unix_ms)
                .max()
                .unwrap_or(now_ms + ttl * 1000);
            self.state.revoked_tokens.insert(t.to_owned(), until);
        }
        if let Some(i) = identity {
            self.state.revoked_identities.insert(i.to_owned(), now_ms);
        }
        self.state
            .save(&self.config.node.state_dir)
            .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))?;
        let detail = json!({
            "token_id": token_id,
            "identity": identity,
            "bindings_removed": removed.iter().map(|b| format!("{}/{}", b.addr, b.prefix_len)).collect::<Vec<_>>(),
        });
        self.audit
            .record(who, "revoke", reason, detail.clone())
            .map_err(|e| Response::err(ErrorKind::Kernel, format!("audit log: {e}")))?;
        Ok(detail)
    }

    /// Housekeeping for tokens: drop revocations of tokens that have expired anyway, free
    /// token identities whose tokens have all expired, pick up a rotated JWKS.
    pub fn token_tick(&mut self) {
        let now_ms = now_unix_ms();
        self.state.revoked_tokens.retain(|_, until| *until > now_ms);
        let expired: Vec<String> = self
            .state
            .token_identities
            .iter()
            .filter(|(n, t)| {
                t.expires_unix_ms <= now_ms
                    && !self.state.bindings.iter().any(|b| &b.identity == *n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            self.state.token_identities.remove(&name);
            if let Some(id) = self.state.identity_ids.remove(&name) {
                let _ = self.pinned.tables.clear_identity(id);
            }
        }
        if let (Some(cfg), Some(svc)) = (self.config.tokens.clone(), self.tokens.as_mut()) {
            match svc.refresh(&cfg) {
                Some(Ok(n)) => {
                    let _ = self.audit.record(
                        &Actor::AGENT,
                        "keys_reloaded",
                        "jwks changed",
                        json!({"keys": n}),
                    );
                }
                Some(Err(e)) => warn!("keeping the previous keys: {e}"),
                None => {}
            }
        }
    }
}
