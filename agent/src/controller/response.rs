//! Response caps per plan: the bytes the node sends back to each identity (the egress
//! program's per-identity `payload`), counted per UTC minute, day and month next to the
//! plan's quotas (`quota.json`), and as a rate over each controller tick. An identity over a
//! cap gets `ID_RESPONSE_CAPPED` with its plan's `response_q8` (0: its ingress to protected
//! endpoints is dropped; otherwise its costs are multiplied, and what its budgets refuse is
//! counted as `response_cap`), until the window rolls or the rate is back under.
//!
//! Response caps hold per node, whatever the plan's `scope`: a fleet-wide plan's response
//! bytes are not shared with the pool (docs/controller.md).
//!
//! This module is the accounting on plain data (counters in, actions out), so it is tested
//! without a kernel; the control loop reads the counters and applies the actions.

use std::collections::BTreeMap;

use serde::Serialize;
use tollgate_common::flow::EgressCounters;

use super::quota::{QuotaBook, Window};

/// What a plan does to an identity over one of its response caps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseOver {
    /// Its packets to protected endpoints are dropped (`response_cap`).
    #[default]
    Drop,
    /// Its costs are multiplied by `response_throttle`; what its budgets then refuse is
    /// counted as `response_cap`.
    Throttle,
}

impl ResponseOver {
    pub fn label(self) -> &'static str {
        match self {
            ResponseOver::Drop => "drop",
            ResponseOver::Throttle => "throttle",
        }
    }
}

/// A plan's response caps; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResponseLimits {
    /// `response_bytes_per_second`: the most response bytes per second, over one tick.
    pub bytes_per_second: Option<u64>,
    pub minute_bytes: Option<u64>,
    pub day_bytes: Option<u64>,
    pub month_bytes: Option<u64>,
    pub over: ResponseOver,
    /// The cost multiplier while throttled (> 1).
    pub throttle: f64,
}

impl Default for ResponseLimits {
    fn default() -> Self {
        ResponseLimits {
            bytes_per_second: None,
            minute_bytes: None,
            day_bytes: None,
            month_bytes: None,
            over: ResponseOver::Drop,
            throttle: ResponseLimits::DEFAULT_THROTTLE,
        }
    }
}

impl ResponseLimits {
    pub const DEFAULT_THROTTLE: f64 = 4.0;

    /// The byte limit of one window.
    pub fn window(&self, w: Window) -> Option<u64> {
        match w {
            Window::Minute => self.minute_bytes,
            Window::Day => self.day_bytes,
            Window::Month => self.month_bytes,
        }
    }

    /// Whether the plan caps nothing (the mode and factor alone cap nothing).
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_second.is_none() && Window::ALL.iter().all(|&w| self.window(w).is_none())
    }

    /// `Identity::response_q8` for this plan: 0 drops, otherwise the throttle as Q8. The
    /// configuration keeps the factor in (1, 255], so a throttle never reads as 0 (drop).
    pub fn q8(&self) -> u16 {
        match self.over {
            ResponseOver::Drop => 0,
            ResponseOver::Throttle => (self.throttle * 256.0).round().clamp(257.0, 65535.0) as u16,
        }
    }
}

/// Which cap an identity is over; written as its label (`rate`, `minute`, `day`, `month`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    /// `response_bytes_per_second`, over the last tick.
    Rate,
    Window(Window),
}

impl Cap {
    pub fn label(self) -> &'static str {
        match self {
            Cap::Rate => "rate",
            Cap::Window(w) => w.as_str(),
        }
    }
}

impl Serialize for Cap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

impl std::fmt::Display for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// An identity over a cap, with the figures the audit and `explain` show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Over {
    pub cap: Cap,
    /// Response bytes spent in the window, or bytes per second over the tick for the rate.
    pub spent: u64,
    pub limit: u64,
    /// When the window rolls (unix s); `None` for the rate, which is judged again each tick.
    pub until_unix: Option<u64>,
}

impl Over {
    /// "response day cap: 1200000 of 1000000 bytes, rolls at unix 1706832000".
    pub fn describe(&self) -> String {
        match self.until_unix {
            Some(until) => format!(
                "response {} cap: {} of {} bytes, rolls at unix {until}",
                self.cap, self.spent, self.limit
            ),
            None => format!(
                "response rate cap: {} bytes/s over the last interval, limit {} bytes/s; \
                 lifted after one interval under it",
                self.spent, self.limit
            ),
        }
    }
}

/// The cap `name` is held by now, if any: of the windows spent, the one that ends last (how
/// long the identity stays capped even as shorter windows roll), else the rate. A window's
/// limit is reached at its limit, as a quota's is; a rate only above its limit.
pub fn over(
    book: &QuotaBook,
    name: &str,
    limits: &ResponseLimits,
    rate: Option<u64>,
) -> Option<Over> {
    let spent = book.spent.get(name);
    for w in [Window::Month, Window::Day, Window::Minute] {
        let (Some(limit), Some(s)) = (limits.window(w), spent) else {
            continue;
        };
        let r = s.response(w);
        if r >= limit {
            return Some(Over {
                cap: Cap::Window(w),
                spent: r,
                limit,
                until_unix: Some(s.window_ends(w)),
            });
        }
    }
    match (limits.bytes_per_second, rate) {
        (Some(limit), Some(r)) if r > limit => Some(Over {
            cap: Cap::Rate,
            spent: r,
            limit,
            until_unix: None,
        }),
        _ => None,
    }
}

/// An identity the controller holds capped, as the kernel has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capped {
    /// `None`: found flagged in the kernel at start (the cap is judged again at the next tick).
    pub over: Option<Over>,
    pub q8: u16,
}

/// What a tick asks of the kernel for one identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Set `ID_RESPONSE_CAPPED` with `q8` (also when only `q8` changed: a reload switched the
    /// plan between drop and throttle).
    Set {
        name: String,
        slot: u32,
        plan: String,
        over: Over,
        q8: u16,
    },
    /// Clear the flag: the window rolled, the rate is back under, or the plan caps no more.
    Clear {
        name: String,
        slot: u32,
        plan: Option<String>,
        was: Option<Over>,
    },
}

/// One identity as a tick sees it.
pub struct Seen<'a> {
    pub name: &'a str,
    pub slot: u32,
    /// Its plan and the plan's caps; `None`: no plan (any more).
    pub plan: Option<(&'a str, &'a ResponseLimits)>,
}

/// The response side of the controller's state between ticks.
#[derive(Default)]
pub struct ResponseCaps {
    /// The last egress reading of each slot, indexed by slot (as the loop's identity
    /// counters): `since` counts a reused slot from zero.
    last: Vec<Option<EgressCounters>>,
    /// Agent time of the last reading (ms): the rate's interval.
    last_ms: Option<u64>,
    /// Identities flagged in the kernel, mirrored (seeded from the kernel's flags at start).
    capped: BTreeMap<String, Capped>,
}

impl ResponseCaps {
    /// Identities found flagged at start (the flag outlives the agent).
    pub fn seed(&mut self, flagged: impl IntoIterator<Item = (String, u16)>) {
        for (name, q8) in flagged {
            self.capped.insert(name, Capped { over: None, q8 });
        }
    }

    pub fn capped(&self) -> &BTreeMap<String, Capped> {
        &self.capped
    }

    /// One tick at agent time `now_ms` over the counters read (`counters[slot]`): counts each
    /// capped plan's identities' response bytes in `book` and returns what the kernel must
    /// change. Returns whether anything was counted (the book needs saving) with the actions;
    /// call [`ResponseCaps::applied`] for each action the kernel took.
    pub fn tick<'a>(
        &mut self,
        now_ms: u64,
        counters: &[EgressCounters],
        seen: impl IntoIterator<Item = Seen<'a>>,
        book: &mut QuotaBook,
    ) -> (bool, Vec<Action>) {
        let now_s = now_ms / 1000;
        let elapsed_ms = self.last_ms.map(|l| now_ms.saturating_sub(l));
        self.last_ms = Some(now_ms);
        if self.last.len() < counters.len() {
            self.last.resize(counters.len(), None);
        }
        let mut dirty = false;
        let mut actions = Vec::new();
        let mut present = std::collections::BTreeSet::new();
        for s in seen {
            present.insert(s.name);
            let Some(&now) = counters.get(s.slot as usize) else {
                continue;
            };
            let first = self.last[s.slot as usize].is_none();
            let delta = match self.last[s.slot as usize].replace(now) {
                Some(prev) => now.since(&prev).payload,
                // First sight: a baseline, nothing counted (what was sent before is the
                // previous run's, already in the book up to its last save).
                None => 0,
            };
            let flagged = self.capped.get(s.name).copied();
            let Some((plan, limits)) = s.plan.filter(|(_, l)| !l.is_unlimited()) else {
                if let Some(c) = flagged {
                    actions.push(Action::Clear {
                        name: s.name.to_owned(),
                        slot: s.slot,
                        plan: s.plan.map(|(p, _)| p.to_owned()),
                        was: c.over,
                    });
                }
                continue;
            };
            if delta > 0 || !book.spent.contains_key(s.name) {
                dirty |= delta > 0;
                book.spent
                    .entry(s.name.to_owned())
                    .or_default()
                    .add_response(now_s, delta);
            } else if let Some(sp) = book.spent.get_mut(s.name) {
                sp.roll(now_s);
            }
            // A rate needs an interval: none at the first tick or a slot's first sight.
            let rate = match elapsed_ms {
                Some(ms) if ms > 0 && !first => Some(delta.saturating_mul(1000) / ms),
                _ => None,
            };
            let now_over = over(book, s.name, limits, rate);
            let q8 = limits.q8();
            match (now_over, flagged) {
                (Some(o), None) => actions.push(Action::Set {
                    name: s.name.to_owned(),
                    slot: s.slot,
                    plan: plan.to_owned(),
                    over: o,
                    q8,
                }),
                (Some(o), Some(c)) if c.q8 != q8 => actions.push(Action::Set {
                    name: s.name.to_owned(),
                    slot: s.slot,
                    plan: plan.to_owned(),
                    over: o,
                    q8,
                }),
                (Some(o), Some(_)) => {
                    // Still capped: the figures follow (explain shows them), the kernel not.
                    if let Some(c) = self.capped.get_mut(s.name) {
                        c.over = Some(o);
                    }
                }
                (None, Some(c)) => actions.push(Action::Clear {
                    name: s.name.to_owned(),
                    slot: s.slot,
                    plan: Some(plan.to_owned()),
                    was: c.over,
                }),
                (None, None) => {}
            }
        }
        // An identity gone (its slot freed and cleared) holds no flag any more.
        self.capped.retain(|n, _| present.contains(n.as_str()));
        (dirty, actions)
    }

    /// The kernel took `action`: the mirror follows.
    pub fn applied(&mut self, action: &Action) {
        match action {
            Action::Set { name, over, q8, .. } => {
                self.capped.insert(
                    name.clone(),
                    Capped {
                        over: Some(*over),
                        q8: *q8,
                    },
                );
            }
            Action::Clear { name, .. } => {
                self.capped.remove(name);
            }
        }
    }

    /// After `quota reset`: response bytes are forgotten with the rest, the flags cleared.
    pub fn forget(&mut self, only: Option<&str>) {
        match only {
            Some(n) => {
                self.capped.remove(n);
            }
            None => self.capped.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-02-01T00:00:00Z.
    const FEB01_2024: u64 = 1_706_745_600;
    const T0_MS: u64 = FEB01_2024 * 1000 + 10_000;

    fn payload(bytes: u64) -> EgressCounters {
        EgressCounters {
            payload: bytes,
            ..EgressCounters::default()
        }
    }

    /// Slot 1 is `alice`, slot 2 `bob`, both on `limits`; `sent[slot]` the payload counters.
    fn tick(
        caps: &mut ResponseCaps,
        book: &mut QuotaBook,
        now_ms: u64,
        sent: [u64; 3],
        limits: &ResponseLimits,
    ) -> Vec<Action> {
        let counters: Vec<EgressCounters> = sent.iter().map(|&b| payload(b)).collect();
        let seen = [("alice", 1), ("bob", 2)].map(|(name, slot)| Seen {
            name,
            slot,
            plan: Some(("metered", limits)),
        });
        let (_, actions) = caps.tick(now_ms, &counters, seen, book);
        for a in &actions {
            caps.applied(a);
        }
        actions
    }

    fn set_of(actions: &[Action]) -> Vec<(&str, Cap, u16)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Set { name, over, q8, .. } => Some((name.as_str(), over.cap, *q8)),
                Action::Clear { .. } => None,
            })
            .collect()
    }

    fn cleared(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Clear { name, .. } => Some(name.as_str()),
                Action::Set { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_minute_window_crossing_caps_one_identity_until_it_rolls() {
        let limits = ResponseLimits {
            minute_bytes: Some(10_000),
            ..ResponseLimits::default()
        };
        let (mut caps, mut book) = (ResponseCaps::default(), QuotaBook::default());
        // First sight: a baseline, whatever the counters hold already.
        assert!(tick(&mut caps, &mut book, T0_MS, [0, 50_000, 0], &limits).is_empty());
        assert_eq!(book.spent["alice"].response(Window::Minute), 0);
        let a = tick(&mut caps, &mut book, T0_MS + 250, [0, 59_999, 100], &limits);
        assert!(a.is_empty(), "9999 of 10000: {a:?}");
        let a = tick(&mut caps, &mut book, T0_MS + 500, [0, 60_000, 200], &limits);
        assert_eq!(set_of(&a), [("alice", Cap::Window(Window::Minute), 0)]);
        let Action::Set { over, .. } = &a[0] else {
            unreachable!()
        };
        assert_eq!(over.spent, 10_000);
        assert_eq!(over.until_unix, Some(FEB01_2024 + 60));
        assert!(over.describe().contains("rolls at unix 1706745660"));
        assert_eq!(serde_json::to_value(over.cap).unwrap(), "minute");
        assert_eq!(serde_json::to_value(Cap::Rate).unwrap(), "rate");
        // Held, not set again; bob untouched.
        let a = tick(&mut caps, &mut book, T0_MS + 750, [0, 60_500, 300], &limits);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(
            caps.capped().keys().collect::<Vec<_>>(),
            ["alice"],
            "bob is not capped"
        );
        assert_eq!(book.spent["alice"].response(Window::Minute), 10_500);
        // The minute rolls: cleared, and the new minute counts from zero.
        let a = tick(
            &mut caps,
            &mut book,
            (FEB01_2024 + 60) * 1000,
            [0, 60_600, 300],
            &limits,
        );
        assert_eq!(cleared(&a), ["alice"]);
        assert_eq!(book.spent["alice"].response(Window::Minute), 100);
        assert_eq!(book.spent["alice"].response(Window::Day), 10_600);
        assert!(caps.capped().is_empty());
    }

    #[test]
    fn the_longest_window_spent_is_the_one_reported() {
        let limits = ResponseLimits {
            minute_bytes: Some(100),
            day_bytes: Some(150),
            ..ResponseLimits::default()
        };
        let (mut caps, mut book) = (ResponseCaps::default(), QuotaBook::default());
        tick(&mut caps, &mut book, T0_MS, [0; 3], &limits);
        let a = tick(&mut caps, &mut book, T0_MS + 250, [0, 200, 0], &limits);
        assert_eq!(set_of(&a), [("alice", Cap::Window(Window::Day), 0)]);
        // The minute rolls, the day does not: still capped, by the day.
        let a = tick(&mut caps, &mut book, T0_MS + 60_000, [0, 200, 0], &limits);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(
            caps.capped()["alice"].over.map(|o| o.cap),
            Some(Cap::Window(Window::Day))
        );
    }

    #[test]
    fn the_rate_cap_sets_over_one_tick_and_clears_after_one_tick_under() {
        let limits = ResponseLimits {
            bytes_per_second: Some(4000),
            ..ResponseLimits::default()
        };
        let (mut caps, mut book) = (ResponseCaps::default(), QuotaBook::default());
        tick(&mut caps, &mut book, T0_MS, [0; 3], &limits);
        // 1000 bytes in 250 ms: 4000/s, at the limit, not over it.
        let a = tick(&mut caps, &mut book, T0_MS + 250, [0, 1000, 0], &limits);
        assert!(a.is_empty(), "{a:?}");
        // 1001 in 250 ms: over.
        let a = tick(&mut caps, &mut book, T0_MS + 500, [0, 2001, 0], &limits);
        assert_eq!(set_of(&a), [("alice", Cap::Rate, 0)]);
        let Action::Set { over, .. } = &a[0] else {
            unreachable!()
        };
        assert_eq!(
            (over.spent, over.limit, over.until_unix),
            (4004, 4000, None)
        );
        // Still over: held. A longer interval counts as one: 2000 bytes over 500 ms is 4000/s.
        let a = tick(&mut caps, &mut book, T0_MS + 750, [0, 4001, 0], &limits);
        assert!(a.is_empty(), "{a:?}");
        let a = tick(&mut caps, &mut book, T0_MS + 1250, [0, 6001, 0], &limits);
        assert_eq!(cleared(&a), ["alice"]);
    }

    #[test]
    fn throttle_and_drop_give_their_q8_and_a_reload_switching_them_rewrites_it() {
        let drop = ResponseLimits {
            minute_bytes: Some(10),
            ..ResponseLimits::default()
        };
        let throttle = ResponseLimits {
            over: ResponseOver::Throttle,
            ..drop
        };
        assert_eq!(drop.q8(), 0);
        assert_eq!(throttle.q8(), 1024, "the default 4.0");
        assert_eq!(
            ResponseLimits {
                throttle: 1.5,
                ..throttle
            }
            .q8(),
            384
        );
        assert_eq!(
            ResponseLimits {
                throttle: 1.0001,
                ..throttle
            }
            .q8(),
            257,
            "a throttle never rounds to 1.0 or to 0 (drop)"
        );
        assert_eq!(
            ResponseLimits {
                throttle: 255.999,
                ..throttle
            }
            .q8(),
            65535
        );
        let (mut caps, mut book) = (ResponseCaps::default(), QuotaBook::default());
        tick(&mut caps, &mut book, T0_MS, [0; 3], &throttle);
        let a = tick(&mut caps, &mut book, T0_MS + 250, [0, 11, 0], &throttle);
        assert_eq!(set_of(&a), [("alice", Cap::Window(Window::Minute), 1024)]);
        let a = tick(&mut caps, &mut book, T0_MS + 500, [0, 11, 0], &drop);
        assert_eq!(set_of(&a), [("alice", Cap::Window(Window::Minute), 0)]);
        assert_eq!(caps.capped()["alice"].q8, 0);
    }

    #[test]
    fn a_plan_without_caps_clears_and_counts_nothing() {
        let limits = ResponseLimits {
            minute_bytes: Some(10),
            ..ResponseLimits::default()
        };
        let none = ResponseLimits::default();
        assert!(none.is_unlimited());
        let (mut caps, mut book) = (ResponseCaps::default(), QuotaBook::default());
        tick(&mut caps, &mut book, T0_MS, [0; 3], &limits);
        tick(&mut caps, &mut book, T0_MS + 250, [0, 20, 0], &limits);
        assert!(caps.capped().contains_key("alice"));
        let a = tick(&mut caps, &mut book, T0_MS + 500, [0, 40, 0], &none);
        assert_eq!(cleared(&a), ["alice"]);
        assert_eq!(book.spent["alice"].response(Window::Minute), 20);
    }

    #[test]
    fn a_reused_slot_counts_its_new_owner_from_zero_and_a_seeded_flag_is_judged_again() {
        let limits = ResponseLimits {
            minute_bytes: Some(1000),
            ..ResponseLimits::default()
        };
        let (mut caps, mut book) = (ResponseCaps::default(), QuotaBook::default());
        caps.seed([("bob".to_owned(), 0), ("alice".to_owned(), 0)]);
        // The previous run left 2000 bytes in alice's minute: still capped after a restart.
        book.spent
            .entry("alice".into())
            .or_default()
            .add_response(T0_MS / 1000, 2000);
        // bob was flagged by the previous run and is under every cap now: cleared at once.
        let a = tick(&mut caps, &mut book, T0_MS, [0, 5000, 0], &limits);
        assert_eq!(cleared(&a), ["bob"]);
        assert!(set_of(&a).is_empty(), "alice's flag is in force: {a:?}");
        assert_eq!(
            caps.capped()["alice"].over.map(|o| o.cap),
            Some(Cap::Window(Window::Minute))
        );
        book.reset(Some("alice"));
        let a = tick(&mut caps, &mut book, T0_MS + 250, [0, 5000, 0], &limits);
        assert_eq!(cleared(&a), ["alice"]);
        // Slot 1 cleared and reused (counters below the last reading): from zero, so 300.
        tick(&mut caps, &mut book, T0_MS + 500, [0, 300, 0], &limits);
        assert_eq!(book.spent["alice"].response(Window::Minute), 300);
    }
}
