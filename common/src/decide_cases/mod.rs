//! The decision cases as data, as katran's fixtures are: a world (endpoints, identities,
//! bindings, anonymous allowance, hold-backs) and an ordered list of packets, each with a
//! description and the reason (hence verdict), endpoint and identity it must be counted
//! under. Two runners iterate the same table: the host tests of [`crate::decide::decide`]
//! (`decide_tests.rs`, over tables in plain memory) and BPF_PROG_TEST_RUN through the real
//! program in the real kernel (`tests/enforcement.rs`, over the real maps). A case added here
//! is checked by both.
//!
//! The order matters: budgets are spent by the rows before, and a [`Step::Pressure`] changes
//! the pressure for the rows after it. Host-only tests (the clock, CAS contention, limiter
//! arithmetic swept over many configurations) stay in `decide_tests.rs`.

mod enforcement;

use core::{net::IpAddr, ops::RangeInclusive};
use std::{string::String, vec, vec::Vec};

pub use enforcement::*;

use crate::{
    Reason, limiter,
    policy::{
        Class, EP_ACTIVE, EP_ANON_ALLOWED, EP_V4_PREFIX, EP_V6_PREFIX, Endpoint, ID_ACTIVE,
        Identity, PlanLimits, Settings,
    },
};

/// An endpoint as the configuration states it.
#[derive(Clone, Debug)]
pub struct EndpointDef {
    pub id: u32,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub ports: RangeInclusive<u16>,
    pub classes: Vec<Class>,
    pub roles: u64,
    /// Cost weight, Q8 (256 = 1.0).
    pub weight_q8: u16,
    pub anonymous: bool,
    pub v4_prefix: Option<([u8; 4], u8)>,
    pub v6_prefix: Option<([u8; 16], u8)>,
}

impl EndpointDef {
    /// The kernel's record of it.
    pub fn record(&self) -> Endpoint {
        let mut ep = Endpoint {
            flags: EP_ACTIVE,
            weight_q8: self.weight_q8,
            roles: self.roles,
            ..Default::default()
        };
        for c in &self.classes {
            ep.allowed_classes |= c.bit();
        }
        if self.anonymous {
            ep.flags |= EP_ANON_ALLOWED;
        }
        if let Some((a, len)) = self.v4_prefix {
            ep.flags |= EP_V4_PREFIX;
            (ep.v4_prefix, ep.v4_prefix_len) = (a, len);
        }
        if let Some((a, len)) = self.v6_prefix {
            ep.flags |= EP_V6_PREFIX;
            (ep.v6_prefix, ep.v6_prefix_len) = (a, len);
        }
        ep
    }
}

/// What an identity's slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// An active identity, with these extra flags (quarantine, throttle, quota).
    Active(u8),
    /// A record without `ID_ACTIVE` (a cleared slot).
    Inactive,
    /// Nothing written at all (the kernel's map reads zeroes; the host's has no entry).
    Vacant,
}

#[derive(Clone, Debug)]
pub struct IdentityDef {
    pub id: u32,
    pub class: Class,
    pub roles: u64,
    pub plan: u16,
    pub limits: PlanLimits,
    pub throttle_q8: u16,
    /// `Identity::response_q8`: read only under `ID_RESPONSE_CAPPED` (0: drop).
    pub response_q8: u16,
    pub slot: Slot,
}

impl IdentityDef {
    /// The kernel's record, or `None` for a vacant slot.
    pub fn record(&self) -> Option<Identity> {
        let flags = match self.slot {
            Slot::Active(extra) => ID_ACTIVE | extra,
            Slot::Inactive => 0,
            Slot::Vacant => return None,
        };
        Some(Identity {
            flags,
            class: self.class as u8,
            throttle_q8: self.throttle_q8,
            plan: self.plan,
            response_q8: self.response_q8,
            roles: self.roles,
            limits: self.limits.to_kernel(),
        })
    }
}

/// When a binding ends, relative to the runner's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    Never,
    /// One nanosecond after boot: long gone.
    Past,
    /// An hour from now.
    Future,
}

impl Expiry {
    /// `expires_ns` for a clock that reads `now_ns`.
    pub fn ns(self, now_ns: u64) -> u64 {
        match self {
            Expiry::Never => 0,
            Expiry::Past => 1,
            Expiry::Future => now_ns + 3600 * limiter::NS_PER_S,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BindingDef {
    /// With its host bits zero.
    pub addr: IpAddr,
    pub len: u8,
    pub identity: u32,
    pub expiry: Expiry,
}

/// Everything a packet's decision reads.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub endpoints: Vec<EndpointDef>,
    pub identities: Vec<IdentityDef>,
    pub bindings: Vec<BindingDef>,
    /// (endpoint, plan, Q8 multiplier).
    pub hold_backs: Vec<(u32, u16, u16)>,
    pub anon_pps: u64,
    pub anon_burst: u64,
}

impl World {
    /// The settings record (pressure 1.0, no drop events).
    pub fn settings(&self) -> Settings {
        Settings {
            anon_pps: self.anon_pps,
            anon_tau_ns: limiter::packet_tau_ns(self.anon_pps, self.anon_burst),
            ..Settings::default()
        }
    }

    /// Every identity slot a case may charge, the anonymous one (0) included.
    pub fn watched(&self) -> Vec<u32> {
        core::iter::once(0)
            .chain(self.identities.iter().map(|i| i.id))
            .collect()
    }
}

/// One packet and what must become of it.
#[derive(Clone, Debug)]
pub struct Case {
    pub desc: String,
    pub packet: Vec<u8>,
    /// The verdict is `reason.verdict()`.
    pub reason: Reason,
    /// Endpoint id it is counted under (0: none).
    pub endpoint: u32,
    /// Identity charged: `Some(0)` the anonymous identity; `None` nobody (parser-level and
    /// unprotected verdicts, unbound later fragments).
    pub identity: Option<u32>,
}

#[derive(Clone, Debug)]
pub enum Step {
    Expect(Case),
    /// Sets the pressure multiplier (Q8) for the rows that follow.
    Pressure(u16),
}

/// A world and the packets sent into it, in order.
#[derive(Clone, Debug)]
pub struct Table {
    pub name: &'static str,
    pub world: World,
    pub steps: Vec<Step>,
}

impl Table {
    pub fn cases(&self) -> impl Iterator<Item = &Case> {
        self.steps.iter().filter_map(|s| match s {
            Step::Expect(c) => Some(c),
            Step::Pressure(_) => None,
        })
    }
}

/// Every table.
pub fn tables() -> Vec<Table> {
    vec![enforcement()]
}
