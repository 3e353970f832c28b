//! One home for identity: what the kernel needs to know about a name (its slot, class, plan,
//! roles) and where that came from, whether the configuration names it or a verified token
//! did. Listing, binding, `/metrics`, policy application and the controller all ask here,
//! so "configuration first, then tokens" and the fallback for a class this build does not
//! know are written once.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use tollgate_common::policy::{Class, ID_QUARANTINED, Identity};

use crate::{
    config::Config,
    state::{State, TokenIdentity},
    tables::{PlanLimits, identity_record},
};

/// The class a token identity gets when its stored label names no class this build knows
/// (a state file from a newer agent): the least privileged named class.
pub const FALLBACK_CLASS: Class = Class::Customer;

/// The class a stored label names, or [`FALLBACK_CLASS`].
pub fn class_of(label: &str) -> Class {
    Class::from_label(label).unwrap_or(FALLBACK_CLASS)
}

/// Where an identity comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// `[[identity]]` in the configuration.
    Config,
    /// A verified token named it (the configuration does not).
    Token,
}

/// An identity as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resolved<'a> {
    pub name: &'a str,
    /// Its kernel slot; `None` before one is allocated.
    pub slot: Option<u32>,
    pub class: Class,
    /// The plan's name (as configured or as the token said).
    pub plan: &'a str,
    /// The role names it holds (a token's may include roles the configuration does not
    /// know; those grant nothing).
    pub roles: &'a [String],
    pub source: IdentitySource,
}

/// Looks identities up in the configuration, then in the token identities.
#[derive(Clone, Copy)]
pub struct Resolver<'a> {
    pub config: &'a Config,
    pub state: &'a State,
}

impl<'a> Resolver<'a> {
    pub fn new(config: &'a Config, state: &'a State) -> Resolver<'a> {
        Resolver { config, state }
    }

    /// The identity called `name`, if the configuration or a token names it.
    pub fn get(&self, name: &str) -> Option<Resolved<'a>> {
        self.with_slot(name, self.state.identity_ids.get(name).copied())
    }

    /// [`Resolver::get`] for a caller that already holds the name's slot (walking
    /// `identity_ids`): no second search of the slot map, which at 100 000 identities is
    /// most of a pass's time.
    pub fn with_slot(&self, name: &str, slot: Option<u32>) -> Option<Resolved<'a>> {
        if let Some((n, i)) = self.config.identity(name).map(|i| (i.name.as_str(), i)) {
            return Some(Resolved {
                name: n,
                slot,
                class: i.class,
                plan: &i.plan,
                roles: &i.role_names,
                source: IdentitySource::Config,
            });
        }
        let (n, t) = self.state.token_identities.get_key_value(name)?;
        Some(token(n, slot, t))
    }

    /// Every identity with a slot, in name order (slot-holders neither source names are
    /// skipped: they are on their way out).
    pub fn all(&self) -> impl Iterator<Item = Resolved<'a>> + 'a {
        let r = *self;
        self.state
            .identity_ids
            .iter()
            .filter_map(move |(name, slot)| r.with_slot(name, Some(*slot)))
    }

    /// The slot of `name`, if it has one.
    pub fn slot(&self, name: &str) -> Option<u32> {
        self.state.identity_ids.get(name).copied()
    }

    /// The name holding slot `id`.
    pub fn name_of(&self, id: u32) -> Option<&'a str> {
        self.state
            .identity_ids
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(n, _)| n.as_str())
    }

    /// The configured identity that binds exactly `addr/len`, if one does: such bindings
    /// are the configuration's, and only it changes them.
    pub fn static_owner(&self, addr: IpAddr, len: u8) -> Option<&'a str> {
        self.config
            .identities
            .iter()
            .find(|i| i.bind.contains(&(addr, len)))
            .map(|i| i.name.as_str())
    }

    /// The kernel record of `r`: its class, the role bits the configuration knows, its
    /// plan's index and limits (plan 0 and no limits when the plan is gone), and the
    /// quarantine flag.
    pub fn record(&self, r: &Resolved<'_>, quarantined: bool) -> Identity {
        let plan_index = self.config.plan_index(r.plan).unwrap_or(0);
        // A fleet-wide plan's rate is the pool's: this node enforces its share of it (the
        // floor before it has one), never the whole rate (`fleet::global`).
        let limits = match self.config.plans.get(plan_index as usize) {
            Some(p) if p.fleet_wide() => self.state.fleet.limits_for(r.name, p),
            Some(p) => p.limits,
            None => PlanLimits::UNLIMITED,
        };
        let roles = r
            .roles
            .iter()
            .filter_map(|n| self.config.role_bit(n))
            .fold(0, |a, b| a | b);
        let mut rec = identity_record(r.class, roles, plan_index, &limits);
        if quarantined {
            rec.flags |= ID_QUARANTINED;
        }
        rec
    }
}

/// A token identity as the kernel sees it.
pub fn token<'a>(name: &'a str, slot: Option<u32>, t: &'a TokenIdentity) -> Resolved<'a> {
    Resolved {
        name,
        slot,
        class: class_of(&t.class),
        plan: &t.plan,
        roles: &t.roles,
        source: IdentitySource::Token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_class_labels_fall_back_once() {
        assert_eq!(class_of("partner"), Class::Partner);
        assert_eq!(class_of("anonymous"), Class::Anonymous);
        assert_eq!(class_of("premium"), FALLBACK_CLASS);
    }

    #[test]
    fn configuration_first_then_tokens() {
        let config = Config::embedded_default();
        let mut state = State::default();
        let configured = config.identities.first().map(|i| i.name.clone());
        state.token_identities.insert(
            "tok".into(),
            TokenIdentity {
                class: "partner".into(),
                plan: config.plans[0].name.clone(),
                roles: vec!["nobody-knows-this-role".into()],
                expires_unix_ms: 1,
            },
        );
        state.identity_id("tok", 10);
        let r = Resolver::new(&config, &state);
        let t = r.get("tok").expect("token identity");
        assert_eq!(
            (t.class, t.source, t.slot),
            (Class::Partner, IdentitySource::Token, Some(1))
        );
        // Roles the configuration does not know grant nothing.
        assert_eq!(r.record(&t, false).roles, 0);
        assert_eq!(r.record(&t, true).flags & ID_QUARANTINED, ID_QUARANTINED);
        assert_eq!(r.name_of(1), Some("tok"));
        assert!(r.get("nobody").is_none());
        if let Some(name) = configured {
            let c = r.get(&name).expect("configured identity");
            assert_eq!(c.source, IdentitySource::Config);
            assert_eq!(c.slot, None);
        }
        assert_eq!(r.all().count(), 1);
    }
}
