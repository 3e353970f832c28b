//! The token service: the issuers a node trusts (each with its verification policy, its
//! keys and its tally of refusals), how a token picks its issuer, why a token bind fails,
//! and where a token's identity is placed. The binding itself is `ops::tokens`'.
//!
//! A token picks its issuer by the `iss` the cheap unauthenticated steps read
//! ([`token::peek`]), compared exactly; nothing a token says is trusted before its signature
//! verifies with that issuer's keys, and the only thing an unverified token can cost is a
//! counter and (a remote issuer, a well-formed token, a `kid` the keys lack) one share of a
//! refetch the issuer's cooldown bounds ([`TokenService::wants_refetch`]).

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use tollgate_common::token::{
    self, ClaimPath, Claims, Mapping, Peek, Policy, REFUSALS, Refusal, RolesFormat, RolesRule,
    Unmapped, ValueRule,
};
use tracing::warn;

use crate::{
    config::{ClaimRules, Config, Issuer, KeySource, Tokens, ValueMap},
    issuers::{Keys, SourceConfig},
    state::TokenIdentity,
};

/// One trusted issuer: what its tokens must satisfy, its keys, and its refusals.
pub struct IssuerService {
    pub name: String,
    pub policy: Policy,
    pub keys: Keys,
    /// What `keys` was built from: a reload that leaves it as it is keeps `keys` (and does
    /// not refetch).
    source: SourceConfig,
    pub remote: bool,
    /// What this issuer's identities and token ids are prefixed with (`<name>:`); `None`
    /// for the legacy issuer, whose names stay as they were before issuers existed.
    /// Namespacing is what keeps one issuer from naming another's identities (or the
    /// configuration's `[[identities]]`): a partner's `azp = "batch-cluster"` is
    /// `partner:batch-cluster`, never the static `batch-cluster`.
    pub prefix: Option<String>,
    /// Refusals by label (pre-filled with every label: bounded, and a scrape shows zeros).
    pub refusals: BTreeMap<&'static str, u64>,
    /// Verifications that passed.
    pub ok: u64,
    /// The background refresh (`Keys::run`), aborted when this issuer goes.
    runner: Option<Runner>,
    /// The last fetch housekeeping has seen (its wall time), to audit each new one once.
    pub(crate) seen_fetch_ms: Option<u64>,
}

/// Aborts the task on drop: an issuer a reload removed stops fetching.
struct Runner(tokio::task::AbortHandle);

impl Drop for Runner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The issuers, and the tallies of every verification.
pub struct TokenService {
    pub issuers: Vec<IssuerService>,
    /// The legacy issuer (`tokens.jwks`): tokens whose `iss` no issuer has go to it.
    fallback: Option<usize>,
    max_token_bytes: usize,
    /// Verifications by result: `ok` or a refusal label (bounded: one entry per label).
    pub results: BTreeMap<&'static str, u64>,
    /// Refusals before an issuer was chosen (a token that does not parse, an `iss` no issuer
    /// has): `issuer="none"` in /metrics.
    pub unselected: BTreeMap<&'static str, u64>,
    /// Tokens presented from a second address while bound.
    pub thefts: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct KeysError {
    pub path: String,
    pub message: String,
}

fn zeros() -> BTreeMap<&'static str, u64> {
    REFUSALS.iter().map(|r| (r.label(), 0)).collect()
}

/// The fetcher's view of an issuer.
pub fn source_of(issuer: &Issuer, state_dir: &Path) -> SourceConfig {
    SourceConfig {
        name: issuer.name.clone(),
        issuer: issuer.issuer.clone(),
        kind: issuer.source.clone(),
        fetch: issuer.fetch.clone(),
        state_dir: state_dir.to_owned(),
    }
}

/// A configured issuer's paths are parsed (config check did, so this does not fail); the
/// legacy claim names are member names taken as they are (dots included), as before.
fn path(p: &str, legacy: bool) -> Result<ClaimPath, String> {
    if legacy {
        return Ok(ClaimPath::member(p));
    }
    ClaimPath::parse(p).map_err(|e| format!("claim path {p:?}: {e}"))
}

fn value_rule(m: &ValueMap, legacy: bool) -> Result<ValueRule, String> {
    Ok(ValueRule {
        path: path(&m.claim, legacy)?,
        values: m.values.clone(),
        default: m.default.clone(),
        unmapped: if m.unmapped_default {
            Unmapped::UseDefault
        } else {
            Unmapped::Refuse
        },
        required: !legacy,
    })
}

/// An issuer's claim rules as the verifier's mapping. The legacy issuer's class and plan
/// are optional (an absent one is placed by `tokens.default_class`/`default_plan`, or
/// refused as unplaceable, as before issuers existed); a configured issuer's absent class or
/// plan without a default is the refusal `missing_claim`.
pub fn mapping_of(c: &ClaimRules, legacy: bool) -> Result<Mapping, String> {
    let mapping = Mapping {
        token_id: ClaimPath::parse_token_id(&c.token_id)
            .map_err(|e| format!("token_id claim path {:?}: {e}", c.token_id))?,
        derive_token_id: c.derive_token_id,
        identity: path(&c.identity, legacy)?,
        roles: RolesRule {
            path: path(&c.roles, legacy)?,
            format: if c.roles_scope {
                RolesFormat::Scope
            } else {
                RolesFormat::Array
            },
            required: c.roles_required,
        },
        class: value_rule(&c.class, legacy)?,
        plan: value_rule(&c.plan, legacy)?,
    };
    mapping.check().map_err(|e| e.to_string())?;
    Ok(mapping)
}

pub fn policy_of(cfg: &Tokens, issuer: &Issuer) -> Result<Policy, String> {
    Ok(Policy {
        issuer: issuer.issuer.clone(),
        audiences: issuer.audiences.clone(),
        max_ttl_s: issuer.max_ttl_s,
        skew_s: cfg.clock_skew_s,
        max_token_bytes: cfg.max_token_bytes,
        mapping: mapping_of(&issuer.claims, is_legacy(cfg, issuer))?,
    })
}

fn is_legacy(cfg: &Tokens, issuer: &Issuer) -> bool {
    issuer.name == crate::config::LEGACY_ISSUER && cfg.jwks.is_some()
}

impl TokenService {
    /// The issuers of `cfg`. With `previous` (a reload): its tallies carry over, and a remote
    /// issuer whose source is unchanged keeps its keys (no refetch); key files are re-read.
    pub fn new(
        cfg: &Tokens,
        state_dir: &Path,
        previous: Option<&TokenService>,
    ) -> Result<TokenService, KeysError> {
        let mut issuers = Vec::with_capacity(cfg.issuers.len());
        for issuer in &cfg.issuers {
            let err = |message: String| KeysError {
                path: location(issuer),
                message,
            };
            let source = source_of(issuer, state_dir);
            let policy = policy_of(cfg, issuer).map_err(err)?;
            if !is_legacy(cfg, issuer)
                && issuer.claims.class.values.is_empty()
                && issuer.classes.is_none()
            {
                warn!(
                    issuer = %issuer.name,
                    claim = %issuer.claims.class.claim,
                    "its tokens' class is taken as they say: any class, internal included; \
                     a value map for claims.class or `classes` limits it"
                );
            }
            let old = previous.and_then(|p| p.issuer(&issuer.name));
            // A remote issuer whose source is unchanged keeps its keys: a reload does not
            // refetch (or lose what an outage left). A key file is read again: cheap, and
            // what an operator who edited it and reloads expects.
            let keys = match old {
                Some(o) if o.source == source && o.remote => o.keys.clone(),
                _ => Keys::new(source.clone()).map_err(err)?,
            };
            issuers.push(IssuerService {
                name: issuer.name.clone(),
                policy,
                remote: issuer.source.is_remote(),
                prefix: (!is_legacy(cfg, issuer)).then(|| format!("{}:", issuer.name)),
                keys,
                source,
                refusals: old.map_or_else(zeros, |o| o.refusals.clone()),
                ok: old.map_or(0, |o| o.ok),
                runner: None,
                seen_fetch_ms: old.and_then(|o| o.seen_fetch_ms),
            });
        }
        let fallback = cfg.issuers.iter().position(|i| is_legacy(cfg, i));
        let mut results = zeros();
        results.insert("ok", 0);
        let mut svc = TokenService {
            issuers,
            fallback,
            max_token_bytes: cfg.max_token_bytes,
            results,
            unselected: zeros(),
            thefts: 0,
        };
        if let Some(p) = previous {
            svc.results = p.results.clone();
            svc.unselected = p.unselected.clone();
            svc.thefts = p.thefts;
        }
        Ok(svc)
    }

    pub fn issuer(&self, name: &str) -> Option<&IssuerService> {
        self.issuers.iter().find(|i| i.name == name)
    }

    /// Takes over `old`'s background refreshes of the keys this service kept; the rest of
    /// `old` (issuers that went or changed source) stops with it.
    pub fn adopt(&mut self, mut old: TokenService) {
        for i in &mut self.issuers {
            if let Some(o) = old.issuers.iter_mut().find(|o| o.name == i.name)
                && o.source == i.source
                && o.remote
            {
                i.runner = o.runner.take();
            }
        }
    }

    /// Starts the background refresh of every issuer that has none (on the agent's
    /// `LocalSet`): remote keys are fetched at once and then as they expire, key files
    /// re-read when they change.
    pub fn spawn_refreshers(&mut self) {
        for i in &mut self.issuers {
            if i.runner.is_none() {
                let keys = i.keys.clone();
                let task = tokio::task::spawn_local(async move { keys.run().await });
                i.runner = Some(Runner(task.abort_handle()));
            }
        }
    }

    /// The issuer a token names: exact `iss`; no `iss` (or only the legacy issuer
    /// configured): the legacy issuer; else `wrong_issuer`.
    /// Malformed tokens are refused here, before any key is looked at.
    pub fn select(&self, token: &str) -> Result<(usize, Peek), Refusal> {
        let peek = token::peek(token, self.max_token_bytes)?;
        let by_iss = peek.iss.as_deref().and_then(|iss| {
            self.issuers
                .iter()
                .position(|i| i.policy.issuer.as_deref() == Some(iss))
        });
        // The legacy issuer takes tokens without `iss`, and, while it is the only issuer,
        // every token (as before issuers existed). Beside [[tokens.issuers]] an `iss` that
        // no issuer has is refused: it must not reach the legacy issuer's keys and
        // passthrough mapping (an Entra v1 `iss` signed by the keys of a v2 issuer's JWKS
        // file, another tenant's token).
        let fallback = self
            .fallback
            .filter(|_| peek.iss.is_none() || self.issuers.len() == 1);
        match by_iss.or(fallback) {
            Some(i) => Ok((i, peek)),
            None => Err(Refusal::WrongIssuer),
        }
    }

    /// The keys to refetch before verifying `token`: those of a remote issuer that lacks the
    /// token's `kid` (and did not skip it: a refetch would not change that). `None` for
    /// anything else, a token that does not parse included: it is refused without a fetch.
    pub fn wants_refetch(&self, token: &str) -> Option<Keys> {
        let (i, peek) = self.select(token).ok()?;
        let issuer = &self.issuers[i];
        let keys = &issuer.keys;
        let skipped = keys.is_skipped(&peek.kid)
            || keys
                .current(crate::clock::now_ms())
                .is_ok_and(|k| k.is_skipped_kid(&peek.kid));
        (issuer.remote && !keys.knows(&peek.kid) && !skipped).then(|| keys.clone())
    }

    /// Verifies `token` against the issuer it names, with that issuer's keys now. The error
    /// carries the issuer when one was chosen (for its tally).
    pub fn verify(
        &self,
        token: &str,
        now_s: u64,
    ) -> Result<(usize, Claims), (Option<usize>, Refusal)> {
        let (i, _) = self.select(token).map_err(|r| (None, r))?;
        let issuer = &self.issuers[i];
        // Not logged per token (a flood of them would be a flood of lines): status and
        // /metrics say the issuer is unavailable, and why.
        let keys = issuer
            .keys
            .current(crate::clock::now_ms())
            .map_err(|_| (Some(i), Refusal::KeysUnavailable))?;
        let mut claims =
            token::verify(token, &keys, &issuer.policy, now_s).map_err(|r| (Some(i), r))?;
        // The one place a verified token's names are made: bind, unbind, the replay check,
        // revocation, status and audit all see the issuer's namespace.
        if let Some(p) = &issuer.prefix {
            claims.identity.insert_str(0, p);
            claims.jti.insert_str(0, p);
        }
        Ok((i, claims))
    }

    /// Counts a verification's result: `ok` or a refusal label, for the issuer chosen (or
    /// `none`).
    pub(crate) fn count(&mut self, issuer: Option<usize>, label: &'static str) {
        *self.results.entry(label).or_default() += 1;
        match issuer.and_then(|i| self.issuers.get_mut(i)) {
            Some(i) if label == "ok" => i.ok += 1,
            Some(i) => *i.refusals.entry(label).or_default() += 1,
            None => *self.unselected.entry(label).or_default() += 1,
        }
    }
}

fn location(issuer: &Issuer) -> String {
    match &issuer.source {
        KeySource::File(p) => p.display().to_string(),
        KeySource::JwksUrl(u) => u.clone(),
        KeySource::Discovery => format!(
            "issuer {} ({})",
            issuer.name,
            issuer.issuer.as_deref().unwrap_or_default()
        ),
    }
}

/// A JWKS file's keys (`tollgate token verify --jwks`).
pub fn load_keys(path: &Path) -> Result<token::KeySet, KeysError> {
    let err = |message: String| KeysError {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    token::KeySet::from_jwks(&text).map_err(|e| err(e.to_string()))
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
            // The node cannot check the token now (its issuer's keys are gone stale): the
            // client is not wrong, and may retry.
            BindFailure::Refused(Refusal::KeysUnavailable) => 503,
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
/// class, plan and roles are the configuration's; `c.identity` carries its issuer's prefix
/// already, so only a static `<issuer>:<name>` matches a configured issuer's token), else the class, plan and roles its
/// issuer's mapping gave (a value map's outputs were checked at config check; a claim taken
/// as it is is checked here), within the classes and plans the issuer may give.
pub fn placement(
    config: &Config,
    issuer: &Issuer,
    c: &Claims,
) -> Result<Option<TokenIdentity>, String> {
    let rules = &issuer.claims;
    // A static identity keeps its class, plan and roles, but only within what the issuer
    // may give (the name already had to carry the issuer's prefix to match: the operator
    // chose to let this issuer's tokens land there).
    if let Some(s) = config.identity(&c.identity) {
        allowed(issuer, s.class.label(), &s.plan)?;
        return Ok(None);
    }
    let class = match &c.class {
        Some(label) => crate::config::class_from_label(label)
            .ok_or_else(|| format!("unknown class {label:?} in claim {}", rules.class.claim))?
            .label()
            .to_owned(),
        None => {
            return Err(format!(
                "no {} claim and no tokens.default_class",
                rules.class.claim
            ));
        }
    };
    let plan = match &c.plan {
        Some(p) => p.clone(),
        None => {
            return Err(format!(
                "no {} claim and no tokens.default_plan",
                rules.plan.claim
            ));
        }
    };
    if config.plan_index(&plan).is_none() {
        return Err(format!(
            "unknown plan {plan:?} in claim {}",
            rules.plan.claim
        ));
    }
    allowed(issuer, &class, &plan)?;
    Ok(Some(TokenIdentity {
        class,
        plan,
        roles: c.roles.clone(),
        expires_unix_ms: c.exp.saturating_mul(1000),
    }))
}

/// An identity provider trusted for some classes (plans) cannot give another (a partner's
/// IdP saying `internal`, or its token landing on an internal static identity).
fn allowed(issuer: &Issuer, class: &str, plan: &str) -> Result<(), String> {
    for (what, key, value, allowed) in [
        ("class", "classes", class, &issuer.classes),
        ("plan", "plans", plan, &issuer.plans),
    ] {
        if let Some(allowed) = allowed
            && !allowed.iter().any(|a| a == value)
        {
            return Err(format!(
                "{what} {value:?} is not one issuer {} may give (its {key}: {})",
                issuer.name,
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use tollgate_common::token::{Alg, SigningKey, jwks};

    use super::*;

    /// A directory of its own, removed on drop.
    pub(crate) use crate::test_dir::Dir;

    const ISS_A: &str = "https://a.example/realms/x";
    const ISS_REMOTE: &str = "https://r.example";

    /// Issuer `a` (a key file with key `k1`), issuer `remote` (a jwks_url, never reached:
    /// no fetch runs here) and, with `legacy`, the `default` issuer with key `k0`.
    pub(crate) fn service(dir: &Dir, legacy: bool) -> (TokenService, SigningKey, SigningKey) {
        let k1 = SigningKey::generate(Alg::ES256, "k1").expect("key");
        let k0 = SigningKey::generate(Alg::ES256, "k0").expect("key");
        std::fs::write(dir.0.join("a.json"), jwks(&[k1.public_jwk()])).expect("jwks");
        std::fs::write(dir.0.join("default.json"), jwks(&[k0.public_jwk()])).expect("jwks");
        let config = Config::parse(&config_text(dir, legacy), "t.toml").expect("config");
        let svc =
            TokenService::new(config.tokens.as_ref().unwrap(), &dir.0, None).expect("service");
        (svc, k1, k0)
    }

    fn config_text(dir: &Dir, legacy: bool) -> String {
        let a = dir.0.join("a.json");
        let d = dir.0.join("default.json");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .self_signed(&ca_key)
            .expect("ca");
        let ca_path = dir.0.join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).expect("ca");
        let legacy_keys = if legacy {
            format!("jwks = \"{}\"\naudience = \"pool\"\n", d.display())
        } else {
            String::new()
        };
        format!(
            "[node]\ninterfaces = [\"eth0\"]\n[[plans]]\nname = \"free\"\n\
             [[endpoints]]\nname = \"bind\"\nprotocol = \"tcp\"\nports = [8443]\n\
             classes = [\"internal\", \"partner\", \"customer\"]\nanonymous = true\n\
             [tokens]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n{legacy_keys}\
             [[tokens.issuers]]\nname = \"a\"\nissuer = \"{ISS_A}\"\naudience = \"pool\"\n\
             jwks = \"{}\"\n\
             [[tokens.issuers]]\nname = \"remote\"\nissuer = \"{ISS_REMOTE}\"\n\
             audience = \"pool\"\njwks_url = \"https://r.example/keys\"\nca_bundle = \"{}\"\n",
            a.display(),
            ca_path.display()
        )
    }

    fn now_s() -> u64 {
        crate::clock::wall_ms() / 1000
    }

    fn token(key: &SigningKey, iss: Option<&str>) -> String {
        let now = now_s();
        let mut claims = serde_json::json!({
            "sub": "alice", "aud": "pool", "jti": "t1", "iat": now, "exp": now + 60,
            "tollgate_class": "customer", "tollgate_plan": "free",
        });
        if let Some(iss) = iss {
            claims["iss"] = iss.into();
        }
        let header = serde_json::json!({"alg": "ES256", "kid": key.kid, "typ": "JWT"});
        key.sign_compact(header.to_string().as_bytes(), claims.to_string().as_bytes())
            .expect("sign")
    }

    fn names(
        svc: &TokenService,
        r: Result<(usize, Claims), (Option<usize>, Refusal)>,
    ) -> Result<String, (Option<String>, &'static str)> {
        r.map(|(_, c)| c.identity)
            .map_err(|(i, r)| (i.map(|i| svc.issuers[i].name.clone()), r.label()))
    }

    #[test]
    fn a_token_picks_its_issuer_by_the_exact_iss() {
        let dir = Dir::new("token-bind", "exact");
        let (svc, k1, _) = service(&dir, false);
        assert_eq!(
            names(&svc, svc.verify(&token(&k1, Some(ISS_A)), now_s())),
            Ok("a:alice".to_owned())
        );
        // The same key, an `iss` one slash longer: another issuer, which nobody is. It is not
        // verified against a's keys.
        for iss in [
            Some(format!("{ISS_A}/")),
            Some("https://A.example/realms/x".to_owned()),
            Some(" https://a.example/realms/x".to_owned()),
            None,
        ] {
            assert_eq!(
                names(&svc, svc.verify(&token(&k1, iss.as_deref()), now_s())),
                Err((None, "wrong_issuer")),
                "iss {iss:?}"
            );
        }
    }

    #[test]
    fn the_legacy_issuer_takes_tokens_without_iss_and_no_other_issuers() {
        let dir = Dir::new("token-bind", "legacy");
        let (svc, k1, k0) = service(&dir, true);
        // No iss: the legacy issuer, with its own keys.
        assert_eq!(
            names(&svc, svc.verify(&token(&k0, None), now_s())),
            Ok("alice".to_owned())
        );
        // An iss no issuer has, even one slash off a's: refused, neither a's keys nor the
        // legacy issuer's are tried.
        for iss in ["https://elsewhere".to_owned(), format!("{ISS_A}/")] {
            for key in [&k0, &k1] {
                assert_eq!(
                    names(&svc, svc.verify(&token(key, Some(&iss)), now_s())),
                    Err((None, "wrong_issuer")),
                    "iss {iss}"
                );
            }
        }
        // The legacy key under a's exact iss: a's keys, which lack k0.
        assert_eq!(
            names(&svc, svc.verify(&token(&k0, Some(ISS_A)), now_s())),
            Err((Some("a".to_owned()), "unknown_kid"))
        );
    }

    /// A node with only `[tokens] jwks` + `audience` takes every token as before issuers
    /// existed, `iss` or not.
    #[test]
    fn the_legacy_issuer_alone_takes_any_iss() {
        let dir = Dir::new("token-bind", "alone");
        let k0 = SigningKey::generate(Alg::ES256, "k0").expect("key");
        let d = dir.0.join("default.json");
        std::fs::write(&d, jwks(&[k0.public_jwk()])).expect("jwks");
        let text = format!(
            "[node]\ninterfaces = [\"eth0\"]\n[[plans]]\nname = \"free\"\n\
             [[endpoints]]\nname = \"bind\"\nprotocol = \"tcp\"\nports = [8443]\n\
             classes = [\"internal\", \"partner\", \"customer\"]\nanonymous = true\n\
             [tokens]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\njwks = \"{}\"\n\
             audience = \"pool\"\n",
            d.display()
        );
        let config = Config::parse(&text, "t.toml").expect("config");
        let svc = TokenService::new(config.tokens.as_ref().unwrap(), &dir.0, None).unwrap();
        for iss in [None, Some("https://idp.example/")] {
            assert_eq!(
                names(&svc, svc.verify(&token(&k0, iss), now_s())),
                Ok("alice".to_owned())
            );
        }
    }

    #[test]
    fn only_a_well_formed_token_of_a_remote_issuer_with_an_unknown_kid_asks_for_a_fetch() {
        let dir = Dir::new("token-bind", "refetch");
        let (svc, k1, _) = service(&dir, true);
        let remote = token(&k1, Some(ISS_REMOTE));
        assert!(svc.wants_refetch(&remote).is_some());
        // A remote issuer with no keys yet is unavailable, not a crash.
        assert_eq!(
            names(&svc, svc.verify(&remote, now_s())),
            Err((Some("remote".to_owned()), "keys_unavailable"))
        );
        // What costs no fetch: anything that does not parse, an iss one slash off (the
        // legacy issuer's, a file), a file issuer's unknown kid.
        let (head, rest) = remote.split_once('.').unwrap();
        for t in [
            "garbage".to_owned(),
            format!("{head}x.{rest}"),
            format!("{head}.!!!.sig"),
            "a".repeat(9000),
            token(&k1, Some(&format!("{ISS_REMOTE}/"))),
            token(
                &SigningKey::generate(Alg::ES256, "zz").unwrap(),
                Some(ISS_A),
            ),
        ] {
            assert!(svc.wants_refetch(&t).is_none(), "{t:.60}");
        }
    }

    /// An issuer limited to some classes cannot place a token in another, whatever its
    /// token says (a partner's identity provider minting `internal`).
    #[test]
    fn an_issuer_places_only_in_the_classes_it_may_give() {
        let dir = Dir::new("token-bind", "classes");
        let (_, k1, _) = service(&dir, false);
        let text = config_text(&dir, false)
            .replace("name = \"a\"\n", "name = \"a\"\nclasses = [\"customer\"]\n");
        let config = Config::parse(&text, "t.toml").expect("config");
        let tokens = config.tokens.as_ref().unwrap();
        let svc = TokenService::new(tokens, &dir.0, None).unwrap();
        let a = tokens.issuer("a").unwrap();
        let (_, claims) = svc.verify(&token(&k1, Some(ISS_A)), now_s()).unwrap();
        assert!(placement(&config, a, &claims).unwrap().is_some());
        let mut internal = claims.clone();
        internal.class = Some("internal".into());
        assert_eq!(
            placement(&config, a, &internal).unwrap_err(),
            "class \"internal\" is not one issuer a may give (its classes: customer)"
        );
        // The other issuer is not limited.
        let remote = tokens.issuer("remote").unwrap();
        assert!(placement(&config, remote, &internal).unwrap().is_some());
    }

    fn token_for(key: &SigningKey, iss: &str, sub: &str, jti: &str) -> String {
        let now = now_s();
        let claims = serde_json::json!({
            "sub": sub, "aud": "pool", "jti": jti, "iat": now, "exp": now + 60, "iss": iss,
            "tollgate_class": "customer", "tollgate_plan": "free",
        });
        let header = serde_json::json!({"alg": "ES256", "kid": key.kid, "typ": "JWT"});
        key.sign_compact(header.to_string().as_bytes(), claims.to_string().as_bytes())
            .expect("sign")
    }

    /// Names are namespaced by issuer (review 13b, must-fix 1): a configured issuer's token
    /// cannot name a static identity, nor another issuer's identity or token id; only the
    /// legacy issuer keeps bare names.
    #[test]
    fn identities_and_token_ids_are_namespaced_by_issuer() {
        let dir = Dir::new("token-bind", "names");
        let (_, k1, k0) = service(&dir, true);
        let statics = "[[identities]]\nname = \"batch-cluster\"\nclass = \"internal\"\n\
                       plan = \"free\"\nbind = [\"198.18.0.10\"]\n\
                       [[identities]]\nname = \"a:trusted\"\nclass = \"internal\"\n\
                       plan = \"free\"\nbind = [\"198.18.0.11\"]\n";
        let text = format!("{statics}{}", config_text(&dir, true))
            .replace("name = \"a\"\n", "name = \"a\"\nclasses = [\"customer\"]\n");
        let config = Config::parse(&text, "t.toml").expect("config");
        let tokens = config.tokens.as_ref().unwrap();
        let svc = TokenService::new(tokens, &dir.0, None).unwrap();
        let a = tokens.issuer("a").unwrap();
        let legacy = tokens.issuer("default").unwrap();
        // Issuer a says `sub = batch-cluster`: it is a:batch-cluster, placed by a's rules
        // (a customer), not as the internal static identity.
        let (_, c) = svc
            .verify(&token_for(&k1, ISS_A, "batch-cluster", "j1"), now_s())
            .unwrap();
        assert_eq!(
            (c.identity.as_str(), c.jti.as_str()),
            ("a:batch-cluster", "a:j1")
        );
        let placed = placement(&config, a, &c)
            .unwrap()
            .expect("placed by a's rules");
        assert_eq!(placed.class, "customer");
        // The legacy issuer's same names stay bare (and do name the static identity).
        let (_, c0) = svc.verify(&token(&k0, None), now_s()).unwrap();
        assert_eq!((c0.identity.as_str(), c0.jti.as_str()), ("alice", "t1"));
        let mut bare = c0.clone();
        bare.identity = "batch-cluster".into();
        assert!(placement(&config, legacy, &bare).unwrap().is_none());
        // The static identity the operator named for issuer a is what a's token lands on,
        // within a's allow-list: its internal class is not one a may give.
        let (_, t) = svc
            .verify(&token_for(&k1, ISS_A, "trusted", "j2"), now_s())
            .unwrap();
        assert_eq!(t.identity, "a:trusted");
        assert_eq!(
            placement(&config, a, &t).unwrap_err(),
            "class \"internal\" is not one issuer a may give (its classes: customer)"
        );
    }

    #[test]
    fn two_issuers_minting_one_sub_are_two_identities() {
        let dir = Dir::new("token-bind", "twosub");
        let (_, k1, k0) = service(&dir, false);
        // A second file issuer `b` with the legacy test key.
        let b = dir.0.join("default.json");
        let text = format!(
            "{}[[tokens.issuers]]\nname = \"b\"\nissuer = \"https://b.example\"\n\
             audience = \"pool\"\njwks = \"{}\"\n",
            config_text(&dir, false),
            b.display()
        );
        let config = Config::parse(&text, "t.toml").expect("config");
        let svc = TokenService::new(config.tokens.as_ref().unwrap(), &dir.0, None).unwrap();
        let (_, ca) = svc
            .verify(&token_for(&k1, ISS_A, "trainer", "same"), now_s())
            .unwrap();
        let (_, cb) = svc
            .verify(
                &token_for(&k0, "https://b.example", "trainer", "same"),
                now_s(),
            )
            .unwrap();
        assert_eq!(
            [ca.identity, ca.jti, cb.identity, cb.jti],
            ["a:trainer", "a:same", "b:trainer", "b:same"]
        );
    }

    /// Counted at the key server: garbage and well-formed tokens of every other kind cost no
    /// connection; a thousand random kids cost one (the cooldown), however they interleave.
    #[test]
    fn unauthenticated_tokens_cost_at_most_one_fetch_per_cooldown() {
        let dir = Dir::new("token-bind", "flood");
        let (_, k1, _) = service(&dir, false);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = std::sync::Arc::clone(&hits);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(conn);
            }
        });
        let text = config_text(&dir, false).replace(
            "https://r.example/keys",
            &format!("https://127.0.0.1:{port}/keys"),
        );
        let config = Config::parse(&text, "t.toml").expect("config");
        let svc = TokenService::new(config.tokens.as_ref().unwrap(), &dir.0, None).unwrap();
        let good_shape = token(&k1, Some(ISS_REMOTE));
        let (head, rest) = good_shape.split_once('.').unwrap();
        let garbage = [
            "garbage".to_owned(),
            format!("{head}x.{rest}"),
            format!("{head}.!!!.sig"),
            "a".repeat(9000),
            token(&k1, Some(&format!("{ISS_REMOTE}/"))),
        ];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let asked = |t: &str| svc.wants_refetch(t);
        tokio::task::LocalSet::new().block_on(&rt, async {
            for t in garbage.iter().cycle().take(500) {
                if let Some(k) = asked(t) {
                    k.refetch_unknown_kid().await;
                }
            }
        });
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        tokio::task::LocalSet::new().block_on(&rt, async {
            for n in 0..1000 {
                let key = SigningKey::generate(Alg::ES256, &format!("rand-{n}")).unwrap();
                if let Some(k) = asked(&token(&key, Some(ISS_REMOTE))) {
                    k.refetch_unknown_kid().await;
                }
            }
        });
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn keys_unavailable_is_a_503_the_client_may_retry() {
        let f = BindFailure::Refused(Refusal::KeysUnavailable);
        assert_eq!((f.http_status(), f.label()), (503, "keys_unavailable"));
        assert_eq!(
            BindFailure::Refused(Refusal::WrongIssuer).http_status(),
            401
        );
    }

    #[test]
    fn a_reload_rereads_key_files_and_keeps_every_tally() {
        let dir = Dir::new("token-bind", "reload");
        let (mut svc, _, _) = service(&dir, false);
        svc.count(Some(0), "expired");
        svc.count(None, "malformed");
        // The key file changes on disk: a reload reads it again, and keeps the tallies.
        let k2 = SigningKey::generate(Alg::ES256, "k2").unwrap();
        std::fs::write(dir.0.join("a.json"), jwks(&[k2.public_jwk()])).unwrap();
        let config = config_text(&dir, false);
        let tokens = Config::parse(&config, "t.toml").unwrap().tokens.unwrap();
        let again = TokenService::new(&tokens, &dir.0, Some(&svc)).unwrap();
        assert_eq!(again.issuers[0].keys.status().kids, ["k2"]);
        assert_eq!(again.issuers[0].refusals["expired"], 1);
        assert_eq!(again.unselected["malformed"], 1);
        assert_eq!(again.results["expired"] + again.results["malformed"], 2);
        // A key file that no longer parses refuses the reload (the running keys stay).
        std::fs::write(dir.0.join("a.json"), "{not json").unwrap();
        assert!(TokenService::new(&tokens, &dir.0, Some(&svc)).is_err());
    }
}
