//! Why the XDP program gave a packet its verdict. One enum for the kernel's counters, the
//! agent's metrics and `docs/verdicts.md`; the numbers index the counter maps, so they are
//! append-only.

/// The action the program returns, in the kernel's numbering (`enum xdp_action`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
}

impl Verdict {
    pub const fn from_u32(v: u32) -> Option<Verdict> {
        match v {
            0 => Some(Verdict::Aborted),
            1 => Some(Verdict::Drop),
            2 => Some(Verdict::Pass),
            _ => None,
        }
    }
}

macro_rules! reasons {
    ($( $(#[doc = $doc:literal])* $name:ident = $num:literal, $label:literal, $verdict:ident; )*) => {
        /// Verdict reasons. Each has a fixed verdict and a stable snake_case label (used as a
        /// metric label and in the CLI).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[doc = $doc])* $name = $num, )*
        }

        impl Reason {
            /// Every reason, in counter order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The stable label of this reason.
            pub const fn label(self) -> &'static str {
                match self { $(Reason::$name => $label,)* }
            }

            /// The verdict this reason always carries.
            #[inline(always)]
            pub const fn verdict(self) -> Verdict {
                match self { $(Reason::$name => Verdict::$verdict,)* }
            }

            /// The reason with counter index `i`.
            pub const fn from_index(i: u32) -> Option<Reason> {
                match i { $($num => Some(Reason::$name),)* _ => None }
            }
        }
    };
}

reasons! {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): never tollgate's business.
    NotIp = 0, "not_ip", Pass;
    /// IP traffic to no protected endpoint: passed untouched.
    Unprotected = 1, "unprotected", Pass;
    /// A non-first fragment: it carries no ports, so it can never match a port rule.
    NonFirstFragment = 2, "non_first_fragment", Pass;
    // Frames the parser cannot classify are dropped: they might be for a protected endpoint
    // (a tiny first fragment whose ports arrive later, a port hidden behind a seventh IPv6
    // extension header), so passing them would be a way around enforcement. The kernel's own
    // stack drops truncated and bad-header packets anyway.
    /// The frame ends inside a header it announces (Ethernet, VLAN, IP, extension, TCP, UDP,
    /// ICMP), or the IP length claims more bytes than the frame holds. A first fragment too
    /// short to hold its transport header lands here too (RFC 1858's tiny fragments).
    Truncated = 3, "truncated", Drop;
    /// IPv4 ihl below 5, or an IP total length shorter than the header.
    BadHeaderLength = 4, "bad_header_length", Drop;
    /// The IP version nibble disagrees with the EtherType.
    BadVersion = 5, "bad_version", Drop;
    /// More VLAN tags than the parser walks (two).
    TooManyVlanTags = 6, "too_many_vlan_tags", Drop;
    /// More IPv6 extension headers than the parser walks.
    TooManyExtHeaders = 7, "too_many_ext_headers", Drop;
    /// A bound identity, allowed to reach the endpoint and within its budgets.
    Bound = 8, "bound", Pass;
    /// An unbound source reaching an endpoint open to anonymous callers (the bind listener),
    /// within its prefix's allowance.
    Anonymous = 9, "anonymous", Pass;
    /// An unbound source reaching a protected endpoint (the default anonymous policy).
    Unbound = 10, "unbound", Drop;
    /// The source's only binding has expired (the kernel checks expiry itself).
    Expired = 11, "expired", Drop;
    /// The source's identity is quarantined.
    Quarantined = 12, "quarantined", Drop;
    /// The identity's class or roles do not allow this endpoint.
    Isolation = 13, "isolation", Drop;
    /// Over the identity's packet rate.
    PacketRate = 14, "packet_rate", Drop;
    /// Over the identity's byte (cost) rate.
    ByteRate = 15, "byte_rate", Drop;
    /// An unbound source over its prefix's anonymous allowance.
    AnonymousRate = 16, "anonymous_rate", Drop;
    /// The limiter's compare-and-swap lost every try to other CPUs.
    LimiterContended = 17, "limiter_contended", Drop;
    /// The binding names an identity slot that holds no identity.
    UnknownIdentity = 18, "unknown_identity", Drop;
    /// A quota window of the identity's plan is spent.
    QuotaExhausted = 19, "quota_exhausted", Drop;
}

/// Number of reasons: the size of the per-reason counter map.
pub const REASON_COUNT: u32 = Reason::ALL.len() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_round_trip() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{r:?} is out of order");
            assert_eq!(Reason::from_index(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_index(REASON_COUNT), None);
    }

    #[test]
    fn labels_are_unique_snake_case() {
        for (i, a) in Reason::ALL.iter().enumerate() {
            assert!(
                a.label()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
            for b in &Reason::ALL[i + 1..] {
                assert_ne!(a.label(), b.label());
            }
        }
    }

    #[test]
    fn frames_that_cannot_be_classified_are_dropped() {
        // Passing them would let a tiny first fragment or a port behind a seventh extension
        // header reach a protected endpoint unjudged.
        for r in [
            Reason::Truncated,
            Reason::BadHeaderLength,
            Reason::BadVersion,
            Reason::TooManyVlanTags,
            Reason::TooManyExtHeaders,
        ] {
            assert_eq!(r.verdict(), Verdict::Drop, "{r:?}");
        }
        for r in [Reason::NotIp, Reason::Unprotected, Reason::NonFirstFragment] {
            assert_eq!(r.verdict(), Verdict::Pass, "{r:?}");
        }
    }

    #[test]
    fn verdict_numbers_match_the_kernel() {
        // include/uapi/linux/bpf.h: XDP_ABORTED = 0, XDP_DROP, XDP_PASS.
        assert_eq!(Verdict::from_u32(0), Some(Verdict::Aborted));
        assert_eq!(Verdict::from_u32(1), Some(Verdict::Drop));
        assert_eq!(Verdict::from_u32(2), Some(Verdict::Pass));
        assert_eq!(Verdict::from_u32(3), None);
    }
}
