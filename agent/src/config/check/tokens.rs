//! `[tokens]` and `[[tokens.issuers]]`: the legacy single issuer (`jwks` + `audience`), each
//! configured issuer (its `issuer` URL, audiences, key source, fetch settings and claim
//! mapping), and what no token could ever satisfy (a value map onto an unknown plan) or what
//! would quietly weaken the check (keys over plain HTTP, two issuers with one URL).

use std::{collections::BTreeSet, ops::Range};

use tollgate_common::token::ClaimPath;

use super::{Checker, Result};
use crate::config::{
    ClaimRules, Fetch, Issuer, KeySource, LEGACY_ISSUER, Plan, Tokens, ValueMap,
    raw::{RawClaims, RawFetch, RawIssuer, RawTokens, RawValueRule, S},
};

/// Entries of one value map: claim values an operator lists by hand.
const MAX_VALUES: usize = 256;
const MAX_PATH: usize = 256;
const MAX_AUDIENCES: usize = 16;

/// What an issuer takes from `[tokens]` unless it says otherwise.
/// `max_ttl_s`, of `[tokens]` and of an issuer: a week at most (revoked ids are kept that
/// long).
const MAX_TTL_RANGE: std::ops::RangeInclusive<i64> = 1..=7 * 86400;

/// The metrics' issuer label of the tokens no issuer was chosen for: no issuer's name.
pub(crate) const UNSELECTED_ISSUER: &str = "none";

struct Defaults<'a> {
    fetch: &'a Fetch,
    max_ttl_s: u64,
    /// `tokens.default_class` (a label) / `default_plan`: an issuer without a class (plan)
    /// rule places its tokens that carry no class claim there, as the legacy issuer does.
    class: Option<String>,
    plan: Option<String>,
}

impl Checker<'_> {
    pub(super) fn tokens(&self, raw: S<RawTokens>, plans: &[Plan]) -> Result<Tokens> {
        let span = raw.span();
        let mut raw = raw.into_inner();
        let tls_cert = self.abs_path(&Some(raw.tls_cert.clone()), "tokens.tls_cert", "")?;
        let tls_key = self.abs_path(&Some(raw.tls_key.clone()), "tokens.tls_key", "")?;
        let max_ttl_s = self.int(
            &raw.max_ttl_s,
            "tokens.max_ttl_s",
            Tokens::DEFAULT_MAX_TTL_S as i64,
            MAX_TTL_RANGE,
        )? as u64;
        let clock_skew_s = self.int(
            &raw.clock_skew_s,
            "tokens.clock_skew_s",
            Tokens::DEFAULT_CLOCK_SKEW_S as i64,
            0..=600,
        )? as u64;
        let max_token_bytes = self.int(
            &raw.max_token_bytes,
            "tokens.max_token_bytes",
            Tokens::DEFAULT_MAX_TOKEN_BYTES as i64,
            256..=65536,
        )? as usize;
        let max_bindings_per_identity = self.int(
            &raw.max_bindings_per_identity,
            "tokens.max_bindings_per_identity",
            Tokens::DEFAULT_MAX_BINDINGS_PER_IDENTITY as i64,
            1..=131072,
        )? as usize;
        let claim = |v: &Option<S<String>>, field: &str, default: &str| -> Result<String> {
            match v {
                None => Ok(default.to_owned()),
                Some(v) if v.get_ref().is_empty() || v.get_ref().len() > 64 => {
                    Err(self.err(v.span(), field, "a claim name must be 1 to 64 characters"))
                }
                Some(v) => Ok(v.get_ref().clone()),
            }
        };
        let default_class = match &raw.default_class {
            None => None,
            Some(v) => Some(self.class(v, "tokens.default_class")?),
        };
        let default_plan = match &raw.default_plan {
            None => None,
            Some(v) => Some(self.plan_name(v, "tokens.default_plan", plans)?),
        };
        let fetch_raw = raw.take_fetch();
        let fetch = self.fetch(&fetch_raw, "tokens", &Fetch::default())?;
        let identity_claim = claim(
            &raw.identity_claim,
            "tokens.identity_claim",
            Tokens::DEFAULT_IDENTITY_CLAIM,
        )?;
        let class_claim = claim(
            &raw.class_claim,
            "tokens.class_claim",
            Tokens::DEFAULT_CLASS_CLAIM,
        )?;
        let plan_claim = claim(
            &raw.plan_claim,
            "tokens.plan_claim",
            Tokens::DEFAULT_PLAN_CLAIM,
        )?;
        let roles_claim = claim(
            &raw.roles_claim,
            "tokens.roles_claim",
            Tokens::DEFAULT_ROLES_CLAIM,
        )?;

        // The legacy issuer: `jwks` and `audience` together, or neither.
        let mut issuers = Vec::new();
        let (jwks, audience, issuer) = match (&raw.jwks, &raw.audience) {
            (Some(j), Some(a)) => {
                let jwks = self.abs_path(&Some(j.clone()), "tokens.jwks", "")?;
                let audience = self.audience(a, "tokens.audience")?;
                let issuer = match &raw.issuer {
                    None => None,
                    Some(v) => Some(self.legacy_issuer(v)?),
                };
                issuers.push(Issuer {
                    name: LEGACY_ISSUER.to_owned(),
                    issuer: issuer.clone(),
                    audiences: vec![audience.clone()],
                    source: KeySource::File(jwks.clone()),
                    fetch: fetch.clone(),
                    max_ttl_s,
                    claims: ClaimRules {
                        token_id: Tokens::DEFAULT_TOKEN_ID_CLAIM.to_owned(),
                        derive_token_id: false,
                        identity: identity_claim.clone(),
                        roles: roles_claim.clone(),
                        roles_scope: false,
                        roles_required: false,
                        class: ValueMap {
                            claim: class_claim.clone(),
                            values: Vec::new(),
                            default: default_class.map(|c| c.label().to_owned()),
                            unmapped_default: false,
                            from_tokens_default: false,
                        },
                        plan: ValueMap {
                            claim: plan_claim.clone(),
                            values: Vec::new(),
                            default: default_plan.clone(),
                            unmapped_default: false,
                            from_tokens_default: false,
                        },
                    },
                    classes: None,
                    plans: None,
                });
                (Some(jwks), Some(audience), issuer)
            }
            (Some(j), None) => {
                return Err(self.err(
                    j.span(),
                    "tokens.audience",
                    "tokens.jwks needs tokens.audience: the audience this node pool accepts",
                ));
            }
            (None, Some(a)) => {
                return Err(self.err(
                    a.span(),
                    "tokens.jwks",
                    "tokens.audience is the audience of tokens.jwks' keys, and there is no \
                     tokens.jwks; an issuer of [[tokens.issuers]] names its own audiences",
                ));
            }
            (None, None) => {
                if let Some(v) = &raw.issuer {
                    return Err(self.err(
                        v.span(),
                        "tokens.issuer",
                        "tokens.issuer is the `iss` of tokens.jwks' keys, and there is no \
                         tokens.jwks; give [[tokens.issuers]] their own `issuer`",
                    ));
                }
                (None, None, None)
            }
        };

        if let Some(list) = raw.issuers.take() {
            let list_span = list.span();
            let list = list.into_inner();
            if list.len() > Tokens::MAX_ISSUERS {
                return Err(self.err(
                    list_span,
                    "tokens.issuers",
                    format!(
                        "{} issuers: at most {} are allowed",
                        list.len(),
                        Tokens::MAX_ISSUERS
                    ),
                ));
            }
            for (i, item) in list.into_iter().enumerate() {
                let defaults = Defaults {
                    fetch: &fetch,
                    max_ttl_s,
                    class: default_class.map(|c| c.label().to_owned()),
                    plan: default_plan.clone(),
                };
                let issuer = self.issuer(item, i, &defaults, plans, &issuers)?;
                issuers.push(issuer);
            }
        }
        if issuers.is_empty() {
            return Err(self.err(
                span,
                "tokens",
                "no issuer: set tokens.jwks and tokens.audience, or add [[tokens.issuers]]",
            ));
        }
        Ok(Tokens {
            jwks,
            audience,
            issuer,
            tls_cert,
            tls_key,
            max_ttl_s,
            clock_skew_s,
            max_token_bytes,
            identity_claim,
            class_claim,
            plan_claim,
            roles_claim,
            default_class,
            default_plan,
            max_bindings_per_identity,
            fetch,
            issuers,
        })
    }

    fn plan_name(&self, v: &S<String>, field: &str, plans: &[Plan]) -> Result<String> {
        if !plans.iter().any(|p| &p.name == v.get_ref()) {
            return Err(self.err(v.span(), field, format!("unknown plan {:?}", v.get_ref())));
        }
        Ok(v.get_ref().clone())
    }

    fn audience(&self, v: &S<String>, field: &str) -> Result<String> {
        let audience = v.get_ref().trim().to_owned();
        if audience.is_empty() {
            return Err(self.err(v.span(), field, "the audience must not be empty"));
        }
        Ok(audience)
    }

    /// `tokens.issuer`: compared with `iss` exactly, so taken exactly as written.
    fn legacy_issuer(&self, v: &S<String>) -> Result<String> {
        let s = v.get_ref();
        if s.is_empty() || s.len() > 512 || s.trim() != s {
            return Err(self.err(
                v.span(),
                "tokens.issuer",
                "the issuer must be 1 to 512 characters with no surrounding whitespace (it is \
                 compared with `iss` exactly)",
            ));
        }
        Ok(s.clone())
    }

    /// An issuer identifier (OpenID Connect Discovery §2): an https URL with a host and no
    /// query or fragment, kept exactly as written (`iss` must equal it, trailing slash
    /// included).
    fn issuer_url(&self, v: &S<String>, field: &str) -> Result<String> {
        let s = v.get_ref();
        let bad = |why: &str| {
            self.err(
                v.span(),
                field,
                format!("{s:?} is not an issuer URL: {why}"),
            )
        };
        let Some(rest) = s.strip_prefix("https://") else {
            return Err(bad(
                "it must start with https:// (OpenID Connect issuers are https URLs)",
            ));
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() {
            return Err(bad("it has no host"));
        }
        if s.len() > 512 {
            return Err(bad("longer than 512 characters"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains whitespace"));
        }
        if s.contains('?') || s.contains('#') {
            return Err(bad("an issuer has no query or fragment"));
        }
        crate::issuers::check_https_url(s).map_err(|e| bad(&e))?;
        Ok(s.clone())
    }

    /// `jwks_url`: https only. Keys fetched in the clear could be replaced by anyone on the
    /// path, and whoever holds the keys mints any identity.
    fn jwks_url(&self, v: &S<String>, field: &str) -> Result<String> {
        let s = v.get_ref();
        if s.starts_with("http://") || s.starts_with("HTTP://") {
            return Err(self.err(
                v.span(),
                field,
                format!(
                    "{s:?} is plain HTTP: keys fetched without TLS could be replaced by anyone \
                     on the path, and whoever holds the keys mints any identity; use an \
                     https:// URL"
                ),
            ));
        }
        let Some(rest) = s.strip_prefix("https://") else {
            return Err(self.err(v.span(), field, format!("{s:?} is not an https URL")));
        };
        if rest.split('/').next().unwrap_or_default().is_empty()
            || s.chars().any(|c| c.is_whitespace() || c.is_control())
            || s.len() > 2048
        {
            return Err(self.err(
                v.span(),
                field,
                format!("{s:?} is not an https URL with a host"),
            ));
        }
        // What the fetcher will parse: refused here rather than at start.
        crate::issuers::check_https_url(s)
            .map_err(|e| self.err(v.span(), field, format!("{s:?}: {e}")))?;
        Ok(s.clone())
    }

    /// Fetch settings: `base` with what `raw` sets (`at` names the table in errors).
    fn fetch(&self, raw: &RawFetch, at: &str, base: &Fetch) -> Result<Fetch> {
        let f = |key: &str| format!("{at}.{key}");
        let ca_bundle = match &raw.ca_bundle {
            None => base.ca_bundle.clone(),
            Some(v) => Some(self.abs_path(&Some(v.clone()), &f("ca_bundle"), "")?),
        };
        // Real key sets are a few KiB; parsing one costs some times its size in memory, so
        // the bound stays far below what an identity provider's host could make us hold.
        let max_bytes = self.int(
            &raw.jwks_max_bytes,
            &f("jwks_max_bytes"),
            base.max_bytes as i64,
            1024..=1024 * 1024,
        )? as usize;
        let timeout_ms = self.int(
            &raw.fetch_timeout_ms,
            &f("fetch_timeout_ms"),
            base.timeout_ms as i64,
            100..=60_000,
        )? as u64;
        let cache_min_s = self.int(
            &raw.cache_min_s,
            &f("cache_min_s"),
            base.cache_min_s as i64,
            1..=86400,
        )? as u64;
        let cache_max_s = self.int(
            &raw.cache_max_s,
            &f("cache_max_s"),
            base.cache_max_s as i64,
            1..=7 * 86400,
        )? as u64;
        // Zero would let every random kid cost a fetch: the flood the cooldown prevents.
        let refetch_cooldown_s = self.int(
            &raw.refetch_cooldown_s,
            &f("refetch_cooldown_s"),
            base.refetch_cooldown_s as i64,
            1..=3600,
        )? as u64;
        let max_stale_s = self.int(
            &raw.max_stale_s,
            &f("max_stale_s"),
            base.max_stale_s as i64,
            1..=30 * 86400,
        )? as u64;
        let span_of = |v: &Option<S<i64>>| v.as_ref().map(|v| v.span());
        if cache_min_s > cache_max_s {
            let span = span_of(&raw.cache_min_s)
                .or(span_of(&raw.cache_max_s))
                .unwrap_or(0..0);
            return Err(self.err(
                span,
                f("cache_min_s"),
                format!(
                    "cache_min_s ({cache_min_s}) is above cache_max_s ({cache_max_s}): the \
                     bounds on a key set's refresh interval are backwards"
                ),
            ));
        }
        // Keys are refreshed at the latest cache_max_s after a good fetch: a shorter
        // max_stale_s would fail the issuer closed between two healthy refreshes.
        if max_stale_s < cache_max_s {
            let span = span_of(&raw.max_stale_s)
                .or(span_of(&raw.cache_max_s))
                .unwrap_or(0..0);
            return Err(self.err(
                span,
                f("max_stale_s"),
                format!(
                    "max_stale_s ({max_stale_s}) is below cache_max_s ({cache_max_s}): keys \
                     would go stale (keys_unavailable) before their next scheduled refresh"
                ),
            ));
        }
        Ok(Fetch {
            ca_bundle,
            max_bytes,
            timeout_ms,
            cache_min_s,
            cache_max_s,
            refetch_cooldown_s,
            max_stale_s,
        })
    }

    fn issuer(
        &self,
        item: S<RawIssuer>,
        i: usize,
        defaults: &Defaults<'_>,
        plans: &[Plan],
        before: &[Issuer],
    ) -> Result<Issuer> {
        let span = item.span();
        let mut raw = item.into_inner();
        let at = format!("tokens.issuers[{i}]");
        let f = |key: &str| format!("{at}.{key}");
        let name = self.name(&raw.name, &f("name"), 32, false)?;
        if name == UNSELECTED_ISSUER {
            return Err(self.err(
                raw.name.span(),
                f("name"),
                "\"none\" is reserved: /metrics counts the tokens no issuer was chosen for \
                 under issuer=\"none\"",
            ));
        }
        if before.iter().any(|b| b.name == name) {
            let why = if name == LEGACY_ISSUER {
                "\"default\" is the issuer tokens.jwks makes; name this one otherwise"
            } else {
                "two issuers share this name"
            };
            return Err(self.err(raw.name.span(), f("name"), why));
        }
        let issuer = self.issuer_url(&raw.issuer, &f("issuer"))?;
        if let Some(b) = before
            .iter()
            .find(|b| b.issuer.as_deref() == Some(issuer.as_str()))
        {
            return Err(self.err(
                raw.issuer.span(),
                f("issuer"),
                format!(
                    "issuer {issuer:?} is issuer {:?}'s too: a token's `iss` must pick one \
                     issuer",
                    b.name
                ),
            ));
        }
        let audiences = match (&raw.audience, &raw.audiences) {
            (Some(_), Some(l)) => {
                return Err(self.err(
                    l.span(),
                    f("audiences"),
                    "give `audience` or `audiences`, not both",
                ));
            }
            (Some(a), None) => vec![self.audience(a, &f("audience"))?],
            (None, Some(l)) => {
                if l.get_ref().is_empty() || l.get_ref().len() > MAX_AUDIENCES {
                    return Err(self.err(
                        l.span(),
                        f("audiences"),
                        format!("give 1 to {MAX_AUDIENCES} audiences"),
                    ));
                }
                let mut out: Vec<String> = Vec::new();
                for a in l.get_ref() {
                    let a = self.audience(a, &f("audiences"))?;
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
                out
            }
            (None, None) => {
                return Err(self.err(
                    span,
                    f("audience"),
                    "an issuer needs `audience` (or `audiences`): the audience(s) of this \
                     node pool its tokens must carry",
                ));
            }
        };
        let discovery = raw.discovery.as_ref().is_some_and(|d| *d.get_ref());
        let sources = usize::from(raw.jwks.is_some())
            + usize::from(raw.jwks_url.is_some())
            + usize::from(discovery);
        if sources != 1 {
            return Err(self.err(
                span,
                &at,
                format!(
                    "an issuer takes its keys from exactly one of `jwks` (a file), `jwks_url` \
                     or `discovery = true`; this one has {sources}"
                ),
            ));
        }
        let source = if let Some(j) = &raw.jwks {
            KeySource::File(self.abs_path(&Some(j.clone()), &f("jwks"), "")?)
        } else if let Some(u) = &raw.jwks_url {
            KeySource::JwksUrl(self.jwks_url(u, &f("jwks_url"))?)
        } else {
            KeySource::Discovery
        };
        let max_ttl_s = self.int(
            &raw.max_ttl_s,
            &f("max_ttl_s"),
            defaults.max_ttl_s as i64,
            MAX_TTL_RANGE,
        )? as u64;
        let fetch_raw = raw.take_fetch();
        let fetch = self.fetch(&fetch_raw, &at, defaults.fetch)?;
        let classes = match &raw.classes {
            None => None,
            Some(l) => Some(
                self.allowed(l, &f("classes"), &|v: &S<String>, field: &str| {
                    self.class(v, field).map(|c| c.label().to_owned())
                })?,
            ),
        };
        let allowed_plans = match &raw.plans {
            None => None,
            Some(l) => Some(self.allowed(l, &f("plans"), &|v: &S<String>, field: &str| {
                self.plan_name(v, field, plans)
            })?),
        };
        let claims = self.claim_rules(raw.claims.take(), &f("claims"), plans, defaults)?;
        // What a value map gives must be what the issuer may give: else that mapping
        // could never place a token.
        for (what, key, rule, allowed) in [
            ("class", "classes", &claims.class, &classes),
            ("plan", "plans", &claims.plan, &allowed_plans),
        ] {
            let Some(allowed) = allowed else { continue };
            let outputs = rule.values.iter().map(|(_, o)| o).chain(&rule.default);
            if let Some(o) = outputs.into_iter().find(|o| !allowed.contains(o)) {
                if rule.from_tokens_default {
                    return Err(self.err(
                        span.clone(),
                        f(&format!("claims.{what}")),
                        format!(
                            "this issuer has no claims.{what} rule, so its tokens without \
                             {} take tokens.default_{what} {o:?}, which is not in its {key} \
                             ({}); give it a claims.{what} rule with a default",
                            rule.claim,
                            allowed.join(", ")
                        ),
                    ));
                }
                return Err(self.err(
                    span.clone(),
                    f(&format!("claims.{what}")),
                    format!(
                        "the {what} map gives {o:?}, which is not in this issuer's {key} ({})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(Issuer {
            name,
            issuer: Some(issuer),
            audiences,
            source,
            fetch,
            claims,
            classes,
            plans: allowed_plans,
            max_ttl_s,
        })
    }

    /// `classes` / `plans`: 1 or more outputs, each valid, none twice.
    fn allowed(
        &self,
        l: &crate::config::raw::List<String>,
        field: &str,
        output: &dyn Fn(&S<String>, &str) -> Result<String>,
    ) -> Result<Vec<String>> {
        if l.get_ref().is_empty() {
            return Err(self.err(
                l.span(),
                field,
                "an empty list would refuse every token; leave the key out to allow any",
            ));
        }
        let mut out: Vec<String> = Vec::new();
        for v in l.get_ref() {
            let o = output(v, field)?;
            if !out.contains(&o) {
                out.push(o);
            }
        }
        Ok(out)
    }

    fn claim_rules(
        &self,
        raw: Option<S<RawClaims>>,
        at: &str,
        plans: &[Plan],
        defaults: &Defaults<'_>,
    ) -> Result<ClaimRules> {
        let f = |key: &str| format!("{at}.{key}");
        let raw = raw.map(S::into_inner).unwrap_or_default();
        let path = |v: &Option<S<String>>, key: &str, default: &str| {
            v.as_ref().map_or(Ok(default.to_owned()), |v| {
                self.claim_path(v.get_ref(), v.span(), &f(key))
            })
        };
        let token_id = match &raw.token_id {
            None => Tokens::DEFAULT_TOKEN_ID_CLAIM.to_owned(),
            Some(v) => self.token_id_path(v.get_ref(), v.span(), &f("token_id"))?,
        };
        let identity = path(&raw.identity, "identity", Tokens::DEFAULT_IDENTITY_CLAIM)?;
        let roles = path(&raw.roles, "roles", Tokens::DEFAULT_ROLES_CLAIM)?;
        let roles_scope = match &raw.roles_format {
            None => false,
            Some(v) => match v.get_ref().as_str() {
                "array" => false,
                "scope" => true,
                other => {
                    return Err(self.err(
                        v.span(),
                        f("roles_format"),
                        format!(
                            "unknown roles_format {other:?}: expected \"array\" (an array of \
                             strings) or \"scope\" (one space-separated string)"
                        ),
                    ));
                }
            },
        };
        let class = self.value_map(
            raw.class.as_ref(),
            &f("class"),
            (Tokens::DEFAULT_CLASS_CLAIM, &defaults.class),
            &|v, field| self.class(v, field).map(|c| c.label().to_owned()),
        )?;
        let plan = self.value_map(
            raw.plan.as_ref(),
            &f("plan"),
            (Tokens::DEFAULT_PLAN_CLAIM, &defaults.plan),
            &|v, field| self.plan_name(v, field, plans),
        )?;
        Ok(ClaimRules {
            token_id,
            derive_token_id: raw.derive_token_id.is_some_and(|b| *b.get_ref()),
            identity,
            roles,
            roles_scope,
            roles_required: raw.roles_required.is_some_and(|b| *b.get_ref()),
            class,
            plan,
        })
    }

    /// A claim path (`realm_access.roles`; a member name with dots in double quotes:
    /// `"https://example.com/roles"`), parsed as the verifier will: no empty member, and not
    /// starting with a claim the verifier checks itself (`iss`, `aud`, `exp`, ...).
    fn claim_path(&self, p: &str, span: Range<usize>, field: &str) -> Result<String> {
        if p.len() > MAX_PATH {
            return Err(self.err(
                span,
                field,
                format!("the claim path is longer than {MAX_PATH} characters"),
            ));
        }
        ClaimPath::parse(p).map_err(|e| {
            self.err(
                span,
                field,
                format!("{e} (e.g. \"groups\", \"realm_access.roles\")"),
            )
        })?;
        Ok(p.to_owned())
    }

    /// The token-id claim: `jti`, or a path as [`Self::claim_path`] takes it (`uti`).
    fn token_id_path(&self, p: &str, span: Range<usize>, field: &str) -> Result<String> {
        if p.len() > MAX_PATH {
            return Err(self.err(
                span,
                field,
                format!("the claim path is longer than {MAX_PATH} characters"),
            ));
        }
        ClaimPath::parse_token_id(p).map_err(|e| {
            self.err(
                span,
                field,
                format!("{e} (e.g. \"jti\", Entra ID's \"uti\")"),
            )
        })?;
        Ok(p.to_owned())
    }

    /// A `class` / `plan` rule. Without one, `(claim, default)`: the legacy issuer's rule,
    /// the claim taken as it is and `[tokens]`' default when it is absent.
    fn value_map(
        &self,
        raw: Option<&S<RawValueRule>>,
        field: &str,
        (default_claim, tokens_default): (&str, &Option<String>),
        output: &dyn Fn(&S<String>, &str) -> Result<String>,
    ) -> Result<ValueMap> {
        let Some(raw) = raw else {
            return Ok(ValueMap {
                claim: default_claim.to_owned(),
                values: Vec::new(),
                default: tokens_default.clone(),
                unmapped_default: false,
                from_tokens_default: tokens_default.is_some(),
            });
        };
        let m = match raw.get_ref() {
            RawValueRule::Path(p) => {
                return Ok(ValueMap {
                    claim: self.claim_path(p, raw.span(), field)?,
                    values: Vec::new(),
                    default: None,
                    unmapped_default: false,
                    from_tokens_default: false,
                });
            }
            RawValueRule::Map(m) => m,
        };
        let claim =
            self.claim_path(m.claim.get_ref(), m.claim.span(), &format!("{field}.claim"))?;
        let mut values = Vec::new();
        if let Some(v) = &m.values {
            let list = &v.get_ref().0;
            if list.len() > MAX_VALUES {
                return Err(self.err(
                    v.span(),
                    format!("{field}.values"),
                    format!("{} values: at most {MAX_VALUES}", list.len()),
                ));
            }
            let mut seen = BTreeSet::new();
            for (k, out) in list {
                let key_field = format!("{field}.values.{k}");
                if k.is_empty() || !seen.insert(k.clone()) {
                    return Err(self.err(out.span(), key_field, "a claim value must not be empty"));
                }
                values.push((k.clone(), output(out, &key_field)?));
            }
        }
        let default = match &m.default {
            None => None,
            Some(d) => Some(output(d, &format!("{field}.default"))?),
        };
        let unmapped_default = match &m.unmapped {
            None => false,
            Some(u) => match u.get_ref().as_str() {
                "refuse" => false,
                "default" if default.is_some() => true,
                "default" => {
                    return Err(self.err(
                        u.span(),
                        format!("{field}.unmapped"),
                        "unmapped = \"default\" needs a `default` to fall back to",
                    ));
                }
                other => {
                    return Err(self.err(
                        u.span(),
                        format!("{field}.unmapped"),
                        format!(
                            "unknown unmapped {other:?}: expected \"refuse\" (the refusal \
                             unmapped_value) or \"default\""
                        ),
                    ));
                }
            },
        };
        if m.unmapped.is_some() && values.is_empty() {
            let span = m.unmapped.as_ref().map_or(0..0, |u| u.span());
            return Err(self.err(
                span,
                format!("{field}.unmapped"),
                "`unmapped` says what a value missing from `values` does, and there are no \
                 `values`",
            ));
        }
        Ok(ValueMap {
            claim,
            values,
            default,
            unmapped_default,
            from_tokens_default: false,
        })
    }
}
