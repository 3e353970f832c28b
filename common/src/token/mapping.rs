//! Claim mapping: where a verified token's identity, roles, class and plan come from, per
//! issuer. Identity providers put these in different places (`sub` or `client_id` or `azp`;
//! roles in `roles`, in `scope`, or nested as Keycloak's `realm_access.roles`), and name
//! plans in their own words (`groups` contains `gold`), so each issuer has its own
//! [`Mapping`].
//!
//! [`verify`](super::verify) applies a mapping in two steps: the claims' JSON types with the
//! other claims (step 9, a wrong type is `bad_claim`), then, after the time, issuer and
//! audience checks, the presence and value rules (step 13: `missing_claim`,
//! `unmapped_value`, `missing_roles`).

use std::{
    borrow::ToOwned,
    string::{String, ToString as _},
    vec::Vec,
};

use core::fmt;

use serde_json::{Map, Value};

use super::{ClaimNames, Refusal};

/// Claims [`verify`](super::verify) reads itself: no path may start with one.
pub const RESERVED_CLAIMS: &[&str] = &["jti", "iat", "exp", "nbf", "aud", "iss"];

/// A path to a claim: member names separated by `.`, each looked up in the object the
/// previous one named (`realm_access.roles`, `resource_access.my-client.roles`). A member
/// name that itself contains a `.` (Auth0's namespaced claims such as
/// `https://example.com/roles`) is written in double quotes: `"https://example.com/roles"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClaimPath {
    segments: Vec<String>,
}

/// A mapping the configuration cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("the claim path is empty")]
    Empty,
    #[error("the claim path {0:?} has an empty member name (two dots, or a dot at an end)")]
    EmptySegment(String),
    #[error("the claim path {0:?} has an unbalanced or misplaced double quote")]
    Quote(String),
    #[error(
        "the claim path {path:?} starts with {claim:?}, a registered claim tollgate checks itself"
    )]
    Registered { path: String, claim: String },
    #[error("the {rule} rule says unmapped values take the default, but it has no default")]
    NoDefault { rule: &'static str },
    #[error("the {rule} rule maps the claim value {value:?} twice")]
    DuplicateValue { rule: &'static str, value: String },
}

impl ClaimPath {
    /// Parses a dotted path (see the type's documentation).
    pub fn parse(text: &str) -> Result<ClaimPath, MappingError> {
        if text.is_empty() {
            return Err(MappingError::Empty);
        }
        let mut segments = Vec::new();
        let mut rest = text;
        loop {
            let (segment, after) = if let Some(quoted) = rest.strip_prefix('"') {
                let end = quoted
                    .find('"')
                    .ok_or_else(|| MappingError::Quote(text.into()))?;
                (&quoted[..end], &quoted[end + 1..])
            } else {
                let end = rest.find('.').unwrap_or(rest.len());
                let segment = &rest[..end];
                if segment.contains('"') {
                    return Err(MappingError::Quote(text.into()));
                }
                (segment, &rest[end..])
            };
            if segment.is_empty() {
                return Err(MappingError::EmptySegment(text.into()));
            }
            segments.push(segment.to_owned());
            if after.is_empty() {
                break;
            }
            // After a segment: either the end or a dot and another segment.
            rest = after
                .strip_prefix('.')
                .ok_or_else(|| MappingError::Quote(text.into()))?;
            if rest.is_empty() {
                return Err(MappingError::EmptySegment(text.into()));
            }
        }
        if RESERVED_CLAIMS.contains(&segments[0].as_str()) {
            return Err(MappingError::Registered {
                path: text.into(),
                claim: segments[0].clone(),
            });
        }
        Ok(ClaimPath { segments })
    }

    /// The path of a token's id ([`Mapping::token_id`]): `jti` (a registered claim, which
    /// [`ClaimPath::parse`] refuses elsewhere) as itself, anything else as `parse` reads it
    /// (`uti`, Entra ID's token id).
    pub fn parse_token_id(text: &str) -> Result<ClaimPath, MappingError> {
        if text == "jti" {
            return Ok(ClaimPath::member("jti"));
        }
        ClaimPath::parse(text)
    }

    /// One top-level member, its name taken as is (dots included): the legacy claim names of
    /// [`ClaimNames`], which [`ClaimNames::check`] validates.
    pub fn member(name: &str) -> ClaimPath {
        ClaimPath {
            segments: std::vec![name.to_owned()],
        }
    }

    /// The member names, outermost first.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The value at this path; `None` when a member is absent or a step on the way is not a
    /// JSON object.
    pub fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        let (first, rest) = self.segments.split_first()?;
        let mut value = claims.get(first)?;
        for segment in rest {
            value = value.as_object()?.get(segment)?;
        }
        Some(value)
    }
}

impl fmt::Display for ClaimPath {
    /// The path as [`ClaimPath::parse`] reads it back (quoting members that contain a dot).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            if s.contains('.') {
                write!(f, "\"{s}\"")?;
            } else {
                f.write_str(s)?;
            }
        }
        Ok(())
    }
}

/// How the roles claim is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RolesFormat {
    /// A JSON array of strings (`roles`, `groups`, `realm_access.roles`).
    Array,
    /// One string of space-separated values (OAuth 2.0's `scope`, RFC 8693 §4.2).
    Scope,
}

/// Where the roles come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolesRule {
    pub path: ClaimPath,
    pub format: RolesFormat,
    /// Whether a token without the claim is refused (`missing_roles`) rather than taken with
    /// no roles.
    pub required: bool,
}

/// What to do with a claim value the value map does not name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unmapped {
    /// Refuse the token (`unmapped_value`): an unknown value is a specific refusal, not a
    /// silent default.
    Refuse,
    /// Take [`ValueRule::default`] (which must then be set).
    UseDefault,
}

/// Where a class or plan comes from, and how the claim's values map to tollgate's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueRule {
    pub path: ClaimPath,
    /// Claim value → output (a class label or plan name), in configuration order. Empty: the
    /// claim's string value is the output itself.
    pub values: Vec<(String, String)>,
    /// The output when the claim is absent (and, with [`Unmapped::UseDefault`], when its
    /// value is not in `values`).
    pub default: Option<String>,
    pub unmapped: Unmapped,
    /// With no `default`: whether an absent claim is refused (`missing_claim`) or leaves the
    /// output unset (`None`, the legacy behaviour: the agent's own defaults then apply).
    pub required: bool,
}

impl ValueRule {
    /// The claim's string value as is; absent → `None` (legacy).
    pub fn passthrough(path: ClaimPath) -> ValueRule {
        ValueRule {
            path,
            values: Vec::new(),
            default: None,
            unmapped: Unmapped::Refuse,
            required: false,
        }
    }
}

/// One issuer's claim mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The token's id: what revocation and replay detection key on. `jti` by default;
    /// Entra ID's is `uti`. Absent (or empty) → `missing_jti`, unless `derive_token_id`.
    pub token_id: ClaimPath,
    /// With the token-id claim absent, derive the id from the token itself
    /// ([`derived_token_id`](super::derived_token_id): a hash of the signed bytes) instead of
    /// refusing it `missing_jti` (Dex's tokens, Auth0's default profile carry no id at all).
    pub derive_token_id: bool,
    /// The identity (a non-empty string; absent or empty → `missing_identity`).
    pub identity: ClaimPath,
    pub roles: RolesRule,
    pub class: ValueRule,
    pub plan: ValueRule,
}

impl Mapping {
    /// Today's behaviour under these claim names: identity, class and plan strings taken as
    /// they are, roles an optional array; an absent class or plan is the given default, or
    /// `None`.
    pub fn legacy(
        names: &ClaimNames,
        default_class: Option<String>,
        default_plan: Option<String>,
    ) -> Mapping {
        Mapping {
            token_id: ClaimPath::member("jti"),
            derive_token_id: false,
            identity: ClaimPath::member(&names.identity),
            roles: RolesRule {
                path: ClaimPath::member(&names.roles),
                format: RolesFormat::Array,
                required: false,
            },
            class: ValueRule {
                default: default_class,
                ..ValueRule::passthrough(ClaimPath::member(&names.class))
            },
            plan: ValueRule {
                default: default_plan,
                ..ValueRule::passthrough(ClaimPath::member(&names.plan))
            },
        }
    }

    /// The configuration-time checks paths cannot make alone: `UseDefault` without a default,
    /// a claim value mapped twice.
    pub fn check(&self) -> Result<(), MappingError> {
        for (rule, r) in [("class", &self.class), ("plan", &self.plan)] {
            if r.unmapped == Unmapped::UseDefault && r.default.is_none() {
                return Err(MappingError::NoDefault { rule });
            }
            for (i, (value, _)) in r.values.iter().enumerate() {
                if r.values[..i].iter().any(|(v, _)| v == value) {
                    return Err(MappingError::DuplicateValue {
                        rule,
                        value: value.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The legacy mapping under the default claim names (`sub`, `tollgate_class`, ...).
impl Default for Mapping {
    fn default() -> Mapping {
        Mapping::legacy(&ClaimNames::default(), None, None)
    }
}

/// A mapped claim as found in the payload, type-checked (step 9), not yet resolved.
pub(crate) enum Found<'a> {
    Absent,
    One(&'a str),
    /// An array of strings (only where the rule has a value map).
    Many(Vec<&'a str>),
}

/// The mapped claims, typed: what step 13 resolves.
pub(crate) struct Typed<'a> {
    roles: Option<Vec<String>>,
    class: Found<'a>,
    plan: Found<'a>,
}

/// What step 13 produces.
pub(crate) struct Mapped {
    pub roles: Vec<String>,
    pub class: Option<String>,
    pub plan: Option<String>,
}

impl Mapping {
    /// Step 9: the token id. Absent or empty → derived from `signed` when the mapping says
    /// so, else `missing_jti`; not a string → `bad_claim`.
    pub(crate) fn token_id_of(
        &self,
        payload: &Map<String, Value>,
        signed: &[u8],
    ) -> Result<String, Refusal> {
        match self.token_id.lookup(payload) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) | None if self.derive_token_id => {
                Ok(super::derived_token_id(signed))
            }
            Some(Value::String(_)) | None => Err(Refusal::MissingJti),
            Some(_) => Err(Refusal::BadClaim),
        }
    }

    /// Step 9: the identity (absent or empty → `missing_identity`).
    pub(crate) fn identity_of(&self, payload: &Map<String, Value>) -> Result<String, Refusal> {
        match self.identity.lookup(payload) {
            None => Err(Refusal::MissingIdentity),
            Some(Value::String(s)) if s.is_empty() => Err(Refusal::MissingIdentity),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(Refusal::BadClaim),
        }
    }

    /// Step 9: the roles, class and plan claims' JSON types.
    pub(crate) fn typed<'a>(&self, payload: &'a Map<String, Value>) -> Result<Typed<'a>, Refusal> {
        let roles = match (self.roles.path.lookup(payload), self.roles.format) {
            (None, _) => None,
            (Some(Value::Array(list)), RolesFormat::Array) => Some(
                list.iter()
                    .map(|v| v.as_str().map(str::to_owned).ok_or(Refusal::BadClaim))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            (Some(Value::String(s)), RolesFormat::Scope) => {
                Some(s.split_ascii_whitespace().map(str::to_owned).collect())
            }
            (Some(_), _) => return Err(Refusal::BadClaim),
        };
        Ok(Typed {
            roles,
            class: found(&self.class, payload)?,
            plan: found(&self.plan, payload)?,
        })
    }

    /// Step 13: presence and value rules.
    pub(crate) fn resolve(&self, typed: Typed<'_>) -> Result<Mapped, Refusal> {
        let roles = match typed.roles {
            Some(r) => r,
            None if self.roles.required => return Err(Refusal::MissingRoles),
            None => Vec::new(),
        };
        Ok(Mapped {
            roles,
            class: resolve(&self.class, &typed.class)?,
            plan: resolve(&self.plan, &typed.plan)?,
        })
    }
}

fn found<'a>(rule: &ValueRule, payload: &'a Map<String, Value>) -> Result<Found<'a>, Refusal> {
    match rule.path.lookup(payload) {
        None => Ok(Found::Absent),
        Some(Value::String(s)) => Ok(Found::One(s)),
        // An array only means something against a value map ("groups contains gold").
        Some(Value::Array(list)) if !rule.values.is_empty() => list
            .iter()
            .map(|v| v.as_str().ok_or(Refusal::BadClaim))
            .collect::<Result<Vec<_>, _>>()
            .map(Found::Many),
        Some(_) => Err(Refusal::BadClaim),
    }
}

fn resolve(rule: &ValueRule, found: &Found<'_>) -> Result<Option<String>, Refusal> {
    let hit = match found {
        Found::Absent => {
            return match &rule.default {
                Some(d) => Ok(Some(d.clone())),
                None if rule.required => Err(Refusal::MissingClaim),
                None => Ok(None),
            };
        }
        Found::One(s) if rule.values.is_empty() => return Ok(Some((*s).to_string())),
        Found::One(s) => rule.values.iter().find(|(v, _)| v == s),
        // The first configured value the array holds: config order decides, not the token's.
        Found::Many(list) => rule.values.iter().find(|(v, _)| list.contains(&v.as_str())),
    };
    match (hit, rule.unmapped, &rule.default) {
        (Some((_, out)), _, _) => Ok(Some(out.clone())),
        (None, Unmapped::UseDefault, Some(d)) => Ok(Some(d.clone())),
        (None, _, _) => Err(Refusal::UnmappedValue),
    }
}
