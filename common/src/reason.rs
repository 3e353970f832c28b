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
    ($( $(#[doc = $doc:literal])* $name:ident = $num:literal, $label:literal, $verdict:ident,
        $explain:literal; )*) => {
        /// Verdict reasons. Each has a fixed verdict, a stable snake_case label (used as a
        /// metric label and in the CLI) and the sentence `tollgate explain` prints for it.
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

            /// What `tollgate explain` says about a packet with this reason: a template whose
            /// placeholders (`{src}`, `{dst}`, `{proto}`, `{port}`, `{ep}` for the endpoint,
            /// `{who}` for the source and its binding) the agent fills in. Every reason has
            /// one, so a new reason cannot be explained by accident as another.
            pub const fn explanation(self) -> &'static str {
                match self { $(Reason::$name => $explain,)* }
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
    NotIp = 0, "not_ip", Pass,
        "{src} sent a frame that is not IPv4 or IPv6: tollgate passes it untouched";
    /// IP traffic to no protected endpoint: passed untouched.
    Unprotected = 1, "unprotected", Pass,
        "{proto}/{port} on {dst} is not a protected endpoint: tollgate passes it untouched";
    /// A non-first fragment: it carries no ports, so it can never match a port rule.
    NonFirstFragment = 2, "non_first_fragment", Pass,
        "a non-first fragment from {src} carries no ports, so it matches no port rule: passed";
    // Frames the parser cannot classify are dropped: they might be for a protected endpoint
    // (a tiny first fragment whose ports arrive later, a port hidden behind a seventh IPv6
    // extension header), so passing them would be a way around enforcement. The kernel's own
    // stack drops truncated and bad-header packets anyway.
    /// The frame ends inside a header it announces (Ethernet, VLAN, IP, extension, TCP, UDP,
    /// ICMP), or the IP length claims more bytes than the frame holds. A first fragment too
    /// short to hold its transport header lands here too (RFC 1858's tiny fragments).
    Truncated = 3, "truncated", Drop,
        "the frame from {src} ends inside a header it announces: a packet that cannot be classified is dropped";
    /// IPv4 ihl below 5, or an IP total length shorter than the header.
    BadHeaderLength = 4, "bad_header_length", Drop,
        "the frame from {src} has an impossible IP header length: a packet that cannot be classified is dropped";
    /// The IP version nibble disagrees with the EtherType.
    BadVersion = 5, "bad_version", Drop,
        "the frame from {src} has an IP version that disagrees with its EtherType: a packet that cannot be classified is dropped";
    /// More VLAN tags than the parser walks (two).
    TooManyVlanTags = 6, "too_many_vlan_tags", Drop,
        "the frame from {src} carries more VLAN tags than the parser walks: a packet that cannot be classified is dropped";
    /// More IPv6 extension headers than the parser walks.
    TooManyExtHeaders = 7, "too_many_ext_headers", Drop,
        "the packet from {src} carries more IPv6 extension headers than the parser walks: a packet that cannot be classified is dropped";
    /// A bound identity, allowed to reach the endpoint and within its budgets.
    Bound = 8, "bound", Pass,
        "{who}; {ep} admits it, and it is within its budgets";
    /// An unbound source reaching an endpoint open to anonymous callers (the bind listener),
    /// within its prefix's allowance.
    Anonymous = 9, "anonymous", Pass,
        "{src} is unbound, but {ep} is open to anonymous callers within their prefix's allowance";
    /// An unbound source reaching a protected endpoint (the default anonymous policy).
    Unbound = 10, "unbound", Drop,
        "{src} has no binding, and {ep} admits only bound identities";
    /// The source's only binding has expired (the kernel checks expiry itself).
    Expired = 11, "expired", Drop,
        "{src}'s binding has expired; {ep} admits only bound identities";
    /// The source's identity is quarantined.
    Quarantined = 12, "quarantined", Drop,
        "{who}, which is quarantined: everything to protected endpoints is dropped";
    /// The identity's class or roles do not allow this endpoint.
    Isolation = 13, "isolation", Drop,
        "{who}; {ep} does not admit its class or roles";
    /// Over the identity's packet rate.
    PacketRate = 14, "packet_rate", Drop,
        "{who}; it is over its packet rate right now";
    /// Over the identity's byte (cost) rate.
    ByteRate = 15, "byte_rate", Drop,
        "{who}; it is over its byte (cost) rate right now";
    /// An unbound source over its prefix's anonymous allowance.
    AnonymousRate = 16, "anonymous_rate", Drop,
        "{src} is unbound and over its prefix's anonymous allowance";
    /// The limiter's compare-and-swap lost every try to other CPUs.
    LimiterContended = 17, "limiter_contended", Drop,
        "{who}; the limiter lost every compare-and-swap try to other CPUs charging the same identity, and drops rather than admit it uncharged";
    /// The binding names an identity slot that holds no identity.
    UnknownIdentity = 18, "unknown_identity", Drop,
        "{src} is bound to identity slot that holds no identity";
    /// A quota window of the identity's plan is spent.
    QuotaExhausted = 19, "quota_exhausted", Drop,
        "{who}; a quota window of its plan is spent: its packets to protected endpoints are dropped until the window rolls";
    /// The flow (one TCP connection) sent more than the endpoint's request-size cap between
    /// two answers of the server (`max_request_bytes`, `max_unanswered_bytes`): every later
    /// packet of that flow is dropped too, bar a RST, so the server can let go of it.
    RequestSize = 20, "request_size", Drop,
        "{who}; this flow to {ep} sent more than the endpoint's request-size cap before the server answered: the flow is cut";
    /// The identity is over a response cap of its plan (response bytes per second, minute,
    /// day or month, counted on egress): the plan says drop, or the throttled budget is spent.
    ResponseCap = 21, "response_cap", Drop,
        "{who}; it is over a response cap of its plan (bytes the node sent back to it), so its requests are cut back until the window rolls";
}

/// Number of reasons.
pub const REASON_COUNT: u32 = Reason::ALL.len() as u32;

/// Reason slots the per-(reason, endpoint) counter map reserves. Fixed, so that adding a
/// reason does not change the pinned map's size: a new build adopts the pins of an older one
/// (same budgets, same counters) instead of refusing them. Raising it changes the layout.
pub const REASON_SLOTS: u32 = 64;

const _: () = assert!(
    REASON_COUNT <= REASON_SLOTS,
    "more reasons than the counter map reserves: raise REASON_SLOTS (a layout change)"
);

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, vec::Vec};

    use super::*;

    fn verdict_label(v: Verdict) -> &'static str {
        match v {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
            Verdict::Aborted => "aborted",
        }
    }

    /// The text between the first pair of backticks of each backticked word in `s`.
    fn backticked(s: &str) -> Vec<&str> {
        s.split('`').skip(1).step_by(2).collect()
    }

    #[test]
    fn verdicts_md_documents_every_reason_and_nothing_else() {
        let doc = include_str!("../../docs/verdicts.md");
        // Rows of the reason table: | # | `label` | verdict | when |
        let rows: Vec<(u32, &str, &str)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let n = cells.get(1)?.parse().ok()?;
                let label = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((n, label, *cells.get(3)?))
            })
            .collect();
        let want: Vec<(u32, &str, &str)> = Reason::ALL
            .iter()
            .map(|r| (*r as u32, r.label(), verdict_label(r.verdict())))
            .collect();
        assert_eq!(
            rows, want,
            "docs/verdicts.md's table disagrees with reasons!"
        );
    }

    #[test]
    fn metrics_md_lists_every_reason_with_its_verdict() {
        let doc = include_str!("../../docs/metrics.md");
        let cell = doc
            .lines()
            .find_map(|l| l.strip_prefix("| `reason` |"))
            .expect("docs/metrics.md has a row for the reason label");
        let list = cell.split(". See").next().expect("split yields one part");
        let count = std::format!("the {REASON_COUNT} verdict reasons:");
        assert!(list.contains(&count), "docs/metrics.md says: {list}");
        let mut documented: BTreeSet<(&str, &str)> = BTreeSet::new();
        for group in list.split(';') {
            let verdict = if group.trim_end().ends_with("(pass)") {
                "pass"
            } else if group.trim_end().ends_with("(drop)") {
                "drop"
            } else {
                panic!("a group of reasons without (pass) or (drop): {group}")
            };
            for label in backticked(group) {
                assert!(
                    documented.insert((label, verdict)),
                    "{label} listed twice in docs/metrics.md"
                );
            }
        }
        let want: BTreeSet<(&str, &str)> = Reason::ALL
            .iter()
            .map(|r| (r.label(), verdict_label(r.verdict())))
            .collect();
        assert_eq!(documented, want, "docs/metrics.md's reason list disagrees");
        // Every "N reasons" in the text (cardinality estimates) counts the same reasons.
        let words: Vec<&str> = doc.split_whitespace().collect();
        for w in words.windows(2) {
            if let (true, Ok(n)) = (w[1].starts_with("reasons"), w[0].parse::<u32>()) {
                assert_eq!(n, REASON_COUNT, "docs/metrics.md speaks of {n} reasons");
            }
        }
    }

    #[test]
    fn every_explanation_uses_known_placeholders_only() {
        const KNOWN: [&str; 6] = ["src", "dst", "proto", "port", "ep", "who"];
        for r in Reason::ALL {
            let text = r.explanation();
            assert!(!text.is_empty(), "{r:?}");
            for part in text.split('{').skip(1) {
                let name = part.split('}').next().expect("split yields one part");
                assert!(
                    KNOWN.contains(&name),
                    "{r:?}: unknown placeholder {{{name}}}"
                );
            }
        }
    }

    #[test]
    fn the_counter_map_reserves_room_for_new_reasons() {
        // (REASON_COUNT <= REASON_SLOTS is a compile-time assert next to REASON_SLOTS.)
        // The map's size depends on the reserve only, never on how many reasons there are.
        assert_eq!(
            crate::REASON_COUNTER_SLOTS,
            REASON_SLOTS * crate::policy::MAX_ENDPOINTS
        );
        let last = *Reason::ALL.last().expect("reasons");
        assert!(
            crate::reason_counter_index(last, crate::policy::MAX_ENDPOINTS - 1)
                < crate::REASON_COUNTER_SLOTS
        );
    }

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
