//! What userspace says about endpoints, plans and identities, and the kernel records it
//! becomes.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

pub use tollgate_common::policy::PlanLimits;
use tollgate_common::policy::{
    Class, EP_ACTIVE, EP_ANON_ALLOWED, EP_V4_PREFIX, EP_V6_PREFIX, Endpoint, ID_ACTIVE, Identity,
    Q8_ONE,
};

use super::{KernelTables, Result, TableError, map_err};

/// Transport protocol of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => tollgate_common::parse::IPPROTO_TCP,
            Proto::Udp => tollgate_common::parse::IPPROTO_UDP,
        }
    }
}

/// A protected endpoint as userspace describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSpec {
    pub proto: Proto,
    pub ports: RangeInclusive<u16>,
    /// Only destinations inside these prefixes are protected (at most one per family).
    pub v4_prefix: Option<(Ipv4Addr, u8)>,
    pub v6_prefix: Option<(Ipv6Addr, u8)>,
    /// Cost weight (1.0 = bytes count once).
    pub weight: f64,
    pub allowed_classes: Vec<Class>,
    /// Role bits that may reach it; 0: any.
    pub roles: u64,
    /// Unbound sources may reach it within the anonymous per-prefix allowance.
    pub anonymous: bool,
}

/// Converts a factor to Q8 (256 = 1.0), clamped to what the kernel's u16 holds.
pub fn to_q8(x: f64) -> u16 {
    (x * 256.0).round().clamp(1.0, u16::MAX as f64) as u16
}

impl EndpointSpec {
    /// The kernel's record of this endpoint.
    pub fn to_kernel(&self) -> Result<Endpoint> {
        let mut ep = Endpoint {
            flags: EP_ACTIVE,
            weight_q8: to_q8(self.weight),
            roles: self.roles,
            ..Default::default()
        };
        for c in &self.allowed_classes {
            ep.allowed_classes |= c.bit();
        }
        if self.anonymous {
            ep.flags |= EP_ANON_ALLOWED;
        }
        if let Some((a, len)) = self.v4_prefix {
            if len > 32 {
                return Err(TableError::PrefixLength {
                    addr: a.into(),
                    len,
                });
            }
            ep.flags |= EP_V4_PREFIX;
            ep.v4_prefix = a.octets();
            ep.v4_prefix_len = len;
        }
        if let Some((a, len)) = self.v6_prefix {
            if len > 128 {
                return Err(TableError::PrefixLength {
                    addr: a.into(),
                    len,
                });
            }
            ep.flags |= EP_V6_PREFIX;
            ep.v6_prefix = a.octets();
            ep.v6_prefix_len = len;
        }
        Ok(ep)
    }
}

/// The kernel record of an active identity, on the clock its limits need on this node
/// (`kernel_clock::set_identity_clock`: precise only if a burst does not cover the coarse
/// clock's tick).
pub fn identity_record(class: Class, roles: u64, plan: u16, limits: &PlanLimits) -> Identity {
    let mut rec = Identity {
        flags: ID_ACTIVE,
        class: class as u8,
        throttle_q8: Q8_ONE,
        plan,
        response_q8: 0,
        roles,
        limits: limits.to_kernel(),
    };
    crate::kernel_clock::set_identity_clock(&mut rec);
    rec
}

/// CLOCK_BOOTTIME now, in ns: what agent time runs on (`crate::clock`). Not the kernel's
/// expiry clock: that is CLOCK_MONOTONIC (`crate::kernel_clock::now_ns`).
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl KernelTables {
    /// Moves every limiter TAT (identity buckets, anonymous prefixes) `offset_ns` back,
    /// saturating at 0, which leaves idle ones idle: pins made by a build that charged on
    /// CLOCK_BOOTTIME, adopted by one that charges on CLOCK_MONOTONIC, `offset_ns` being
    /// BOOTTIME − MONOTONIC (the time this machine spent suspended). Without it each budget
    /// would read that much further spent and refuse traffic until the clock caught up.
    /// Returns how many TATs moved.
    pub fn shift_tats_back(&mut self, offset_ns: u64) -> Result<usize> {
        use tollgate_common::{map_names as names, policy::Bucket};
        let back = |t: u64| {
            if t == 0 {
                0
            } else {
                t.saturating_sub(offset_ns).max(1)
            }
        };
        let mut moved = 0;
        for id in 1..self.buckets.len() {
            let b: Bucket = self.buckets.get(&id, 0).map_err(map_err(names::BUCKETS))?;
            if b == Bucket::default() {
                continue;
            }
            let shifted = Bucket {
                pkt_tat: back(b.pkt_tat),
                byte_tat: back(b.byte_tat),
            };
            self.buckets
                .set(id, shifted, 0)
                .map_err(map_err(names::BUCKETS))?;
            moved += 1;
        }
        // Keys first: a hash map is not rewritten while it is walked.
        let v4: Vec<_> = self.anon_v4.iter().filter_map(|e| e.ok()).collect();
        for (k, t) in v4 {
            // An entry the LRU evicted meanwhile is simply not there to move.
            let _ = self.anon_v4.insert(k, back(t), 0);
            moved += 1;
        }
        let v6: Vec<_> = self.anon_v6.iter().filter_map(|e| e.ok()).collect();
        for (k, t) in v6 {
            let _ = self.anon_v6.insert(k, back(t), 0);
            moved += 1;
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_conversion_clamps() {
        assert_eq!(to_q8(1.0), 256);
        assert_eq!(to_q8(2.5), 640);
        assert_eq!(to_q8(0.0), 1);
        assert_eq!(to_q8(1e9), u16::MAX);
    }
}
