//! Fleet-wide quota spend and rate demand in the store (`fleet::share` holds the rules that
//! use them). Pipelined: one report cycle for 10 000 identities is a handful of round trips
//! ([`CHUNK`] identities each), not 10 000.
//!
//! Keys (under the pool's prefix, `tollgate:{P}:`):
//! - `spend:<window>:<identity>`: a hash per identity and window period (`<window>` names the
//!   period, e.g. `minute-29410000`), with a TTL the caller sets to the period's end plus a
//!   margin (set when a node's field is created, not every interval). Field `n:<node>` = `"<bytes> <cost>"`: that node's own spend in the period, an
//!   **absolute** value (HSET, not HINCRBY: a report retried after a timed-out reply, which
//!   may have landed, is counted once). Field `s:<node>` = `"<total bytes> <total cost> <own
//!   bytes> <own cost>"`: a re-seed, written only after the store lost the hash.
//! - `demand:<identity>`: a hash per identity, field `<node>` = `"<packets> <bytes>
//!   <server ms>"`: the node's smoothed offered load, stamped with the store's clock (TIME),
//!   so staleness does not depend on the nodes' clocks. TTL: the call's `ttl`.
//!
//! # Re-seeding (a store that came back empty, or a deleted key)
//!
//! A node notices the loss when its own `n:` field is new (HSET says so) although it had an
//! answer in this period before. It then writes `s:<node>` with the last total it saw,
//! `T_i`, and its own spend at that moment, `b_i`. The total is
//!
//! ```text
//! total = max( Σ_j n_j ,  max_i T_i + Σ_j max(0, n_j − b_j) )      (b_j = 0 without s:<j>)
//! ```
//!
//! Each node's spend after its last view is counted once (`n_j − b_j`), its spend before it
//! through `T_i` (which also holds the spend of nodes that never came back). It is exact when
//! the nodes' last views were of the same store state, and off by at most the spend between
//! the views (at most one interval of each node: the overshoot bound's order) otherwise.
//! The node's own view never goes down either (`share::QuotaTrack::observe`).
//!
//! # What a writer to the store without the pool key can do
//!
//! These values are not signed. Every value read is bounded: field names must be a node name
//! (`n:`/`s:` prefixed for spend), numbers parse as u64 or the field is refused, a spend
//! above [`MAX_SPEND`] or a demand above [`MAX_DEMAND`] is clamped, a demand stamp older than
//! the `ttl` is stale and one more than `ttl` ahead is refused, at most [`MAX_FIELDS`] fields
//! are read per key (HRANDFIELD with a count), a key of another type fails that identity
//! only; each is counted in [`Refused`]. Within those bounds a writer can:
//! - inflate spend (write a big `n:` field) or fake a node's demand: **denial**, the quota is
//!   spent early or honest nodes' shares shrink; a fake node's share is unused by anyone;
//! - delete or zero other nodes' fields: every honest node's view of a total never goes
//!   down and each counts its own spend, so global quotas degrade at worst to `local` mode
//!   (each node spends what is left of the budget as if alone: up to N × the remainder);
//!   demand read as zero makes other nodes take more, so global rates degrade at worst to
//!   per-node rates (each node at most the plan's rate: a share never exceeds it). Never
//!   more than the per-node enforcement tollgate has without a fleet.
//!
//! Signing each value with the pool key (HMAC, ~1 µs each) would leave only deletion and
//! replay; not done here.

use std::time::Duration;

use redis::Value;

use super::{MAX_MEMBERS, Store, StoreError, reply};
use crate::fleet::{
    entry::valid_name,
    share::{Demand, Seen, Spend},
};

/// Identities per pipeline: bounds one round trip's size (and its time within `op_timeout`).
pub const CHUNK: usize = 2048;
/// Most fields read from one key: two per node (`n:` and `s:`).
pub const MAX_FIELDS: usize = 2 * MAX_MEMBERS;
/// Largest spend believed per field; above is clamped (2^56 bytes: no window spends that).
pub const MAX_SPEND: u64 = 1 << 56;
/// Largest demand believed per field; above is clamped (2^40 packets in one interval).
pub const MAX_DEMAND: u64 = 1 << 40;
/// Longest identity name in a key.
pub const MAX_IDENTITY_BYTES: usize = 256;

/// One identity's spend report for [`Store::report_spend`].
#[derive(Clone, Copy, Debug)]
pub struct SpendReport<'a> {
    pub identity: &'a str,
    /// This node's spend in the period (absolute).
    pub own: Spend,
    /// The last answer this node had in this period (`QuotaTrack::seen`): what it re-seeds
    /// with if the store lost the hash.
    pub seen: Option<Seen>,
}

/// The fleet total of one identity, or why there is none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetSpend {
    /// The total; `reseeded`: this call found the hash lost and re-seeded it.
    Total { total: Spend, reseeded: bool },
    /// The identity's name cannot be a key, or the key holds another type (counted).
    Unknown,
}

/// Store values refused or bounded while reading, by label (a counter each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refused {
    /// A field name or value that does not parse.
    pub malformed: u64,
    /// A number above the bound, taken as the bound.
    pub clamped: u64,
    /// A demand report older than the ttl (dropped; not an attack, a node that went away).
    pub stale: u64,
    /// A key with [`MAX_FIELDS`] or more fields (only that many read).
    pub too_many: u64,
    /// A key of another type than hash.
    pub wrong_type: u64,
    /// An identity whose name cannot be a key (refused before sending).
    pub bad_identity: u64,
}

impl Refused {
    /// (label, count) for a metrics counter.
    pub fn labels(&self) -> [(&'static str, u64); 6] {
        [
            ("malformed", self.malformed),
            ("clamped", self.clamped),
            ("stale", self.stale),
            ("too_many", self.too_many),
            ("wrong_type", self.wrong_type),
            ("bad_identity", self.bad_identity),
        ]
    }

    pub fn total(&self) -> u64 {
        self.labels().iter().map(|(_, n)| n).sum()
    }
}

/// What [`Store::report_spend`] returns: one total per report, in order.
#[derive(Debug)]
pub struct SpendRound {
    pub totals: Vec<FleetSpend>,
    pub refused: Refused,
    /// Pipelines sent (for sizing).
    pub round_trips: u32,
}

/// What [`Store::report_demand`] returns: per report, in order, each node's fresh demand for
/// that identity (this node's included), or `None` when the identity failed (counted).
#[derive(Debug)]
pub struct DemandRound {
    pub views: Vec<Option<Vec<(String, Demand)>>>,
    pub refused: Refused,
    pub round_trips: u32,
}

/// Whether `identity` may be part of a key: 1 to [`MAX_IDENTITY_BYTES`] printable ASCII
/// characters, no space.
pub fn valid_identity(identity: &str) -> bool {
    !identity.is_empty()
        && identity.len() <= MAX_IDENTITY_BYTES
        && identity.bytes().all(|c| c.is_ascii_graphic())
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

/// Parses `n` space-separated u64s, clamping each at `max` (counted once per value).
fn numbers<const N: usize>(v: &[u8], max: u64, refused: &mut Refused) -> Option<[u64; N]> {
    let s = std::str::from_utf8(v).ok()?;
    let mut out = [0u64; N];
    let mut it = s.split(' ');
    for slot in &mut out {
        let p = it.next()?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = p.parse().ok()?;
        if n > max {
            refused.clamped += 1;
        }
        *slot = n.min(max);
    }
    it.next().is_none().then_some(out)
}

/// Adds the read of a hash's fields to `pipe`: at most [`MAX_FIELDS`] of them, with their
/// values ([`field_pairs`] parses the reply).
fn read_fields(pipe: &mut redis::Pipeline, key: &str) {
    pipe.cmd("HRANDFIELD")
        .arg(key)
        .arg(MAX_FIELDS)
        .arg("WITHVALUES");
}

/// HRANDFIELD … WITHVALUES (RESP2: a flat array, field then value), bounded by the count
/// asked for.
fn field_pairs(v: Value, refused: &mut Refused) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let flat = match v {
        Value::Nil => return Some(Vec::new()),
        Value::Array(a) => a,
        _ => return None,
    };
    if flat.len() >= 2 * MAX_FIELDS {
        refused.too_many += 1;
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let Some(k) = it.next() {
        match (k, it.next()) {
            (Value::BulkString(k), Some(Value::BulkString(v))) => out.push((k, v)),
            _ => return None,
        }
    }
    Some(out)
}

/// The total from a spend hash's fields (the re-seed rule in the module comment).
fn spend_total(fields: &[(Vec<u8>, Vec<u8>)], refused: &mut Refused) -> Spend {
    let mut own: Vec<(&[u8], Spend)> = Vec::new();
    let mut seeds: Vec<(&[u8], Seen)> = Vec::new();
    for (k, v) in fields {
        let node = |p: &[u8]| {
            k.strip_prefix(p)
                .filter(|n| std::str::from_utf8(n).is_ok_and(valid_name))
        };
        if let Some(n) = node(b"n:") {
            match numbers::<2>(v, MAX_SPEND, refused) {
                Some([bytes, cost]) => own.push((n, Spend { bytes, cost })),
                None => refused.malformed += 1,
            }
        } else if let Some(n) = node(b"s:") {
            match numbers::<4>(v, MAX_SPEND, refused) {
                Some([tb, tc, ob, oc]) => seeds.push((
                    n,
                    Seen {
                        total: Spend {
                            bytes: tb,
                            cost: tc,
                        },
                        own: Spend {
                            bytes: ob,
                            cost: oc,
                        },
                    },
                )),
                None => refused.malformed += 1,
            }
        } else {
            refused.malformed += 1;
        }
    }
    let sum = own
        .iter()
        .fold(Spend::default(), |acc, (_, s)| acc.plus(*s));
    if seeds.is_empty() {
        return sum;
    }
    let seed = seeds
        .iter()
        .fold(Spend::default(), |acc, (_, s)| acc.max(s.total));
    let since = own.iter().fold(Spend::default(), |acc, (n, s)| {
        let base = seeds
            .iter()
            .find(|(m, _)| m == n)
            .map(|(_, b)| b.own)
            .unwrap_or_default();
        acc.plus(s.minus(base))
    });
    sum.max(seed.plus(since))
}

/// The fresh demand reports in a demand hash's fields at server time `now_ms`.
fn demand_view(
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    now_ms: u64,
    ttl_ms: u64,
    refused: &mut Refused,
) -> Vec<(String, Demand)> {
    let mut out = Vec::new();
    for (k, v) in fields {
        let Some(node) = String::from_utf8(k).ok().filter(|n| valid_name(n)) else {
            refused.malformed += 1;
            continue;
        };
        let Some([packets, bytes, stamp]) = numbers::<3>(&v, u64::MAX, refused).map(|[p, b, s]| {
            let mut clamp = |x: u64| {
                if x > MAX_DEMAND {
                    refused.clamped += 1;
                }
                x.min(MAX_DEMAND)
            };
            [clamp(p), clamp(b), s]
        }) else {
            refused.malformed += 1;
            continue;
        };
        if stamp > now_ms.saturating_add(ttl_ms) {
            refused.malformed += 1;
        } else if now_ms.saturating_sub(stamp) > ttl_ms {
            refused.stale += 1;
        } else {
            out.push((node, Demand { packets, bytes }));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A spend hash's HRANDFIELD reply as a total.
fn read_total(read: Value, reseeded: bool, refused: &mut Refused) -> FleetSpend {
    match field_pairs(read, refused) {
        Some(f) => FleetSpend::Total {
            total: spend_total(&f, refused),
            reseeded,
        },
        None => {
            refused.malformed += 1;
            FleetSpend::Unknown
        }
    }
}

fn is_wrong_type(e: &redis::RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
}

impl Store {
    fn spend_key(&self, window: &str, identity: &str) -> String {
        format!("{}spend:{window}:{identity}", self.keys.prefix)
    }

    fn demand_key(&self, identity: &str) -> String {
        format!("{}demand:{identity}", self.keys.prefix)
    }

    /// Reports this node's spend in `window` (a period name, [`valid_name`]) for every
    /// identity in `reports` and reads each fleet total back: per [`CHUNK`] identities one
    /// pipeline of HSET `n:<node>` and HRANDFIELD. Where HSET created the field (this node's
    /// first report in the period, or the store lost the hash) one more pipeline follows:
    /// PEXPIRE `ttl` (the period's end plus a margin, so it is set once, not every interval)
    /// and, for a lost hash, the re-seed and a second read (module comment). A key of another
    /// type or an identity that cannot be a key is [`FleetSpend::Unknown`] and counted,
    /// never an error for the others.
    pub async fn report_spend(
        &mut self,
        window: &str,
        node: &str,
        reports: &[SpendReport<'_>],
        ttl: Duration,
    ) -> Result<SpendRound, StoreError> {
        const OP: &str = "report_spend";
        if !valid_name(node) || !valid_name(window) {
            return Err(StoreError::Config(format!(
                "node {node:?} or window {window:?} is not a name"
            )));
        }
        let ttl_ms = millis(ttl);
        let own_field = format!("n:{node}");
        let mut round = SpendRound {
            totals: vec![FleetSpend::Unknown; reports.len()],
            refused: Refused::default(),
            round_trips: 0,
        };
        let valid: Vec<usize> = (0..reports.len())
            .filter(|&i| valid_identity(reports[i].identity))
            .collect();
        round.refused.bad_identity = (reports.len() - valid.len()) as u64;
        // Identities whose field HSET created: (index, whether the hash was lost).
        let mut created: Vec<(usize, bool)> = Vec::new();
        for chunk in valid.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in chunk {
                let r = &reports[i];
                let key = self.spend_key(window, r.identity);
                pipe.cmd("HSET")
                    .arg(&key)
                    .arg(&own_field)
                    .arg(format!("{} {}", r.own.bytes, r.own.cost));
                read_fields(&mut pipe, &key);
            }
            let replies: Vec<redis::RedisResult<Value>> = self.query_pipe(OP, &pipe).await?;
            round.round_trips += 1;
            if replies.len() != 2 * chunk.len() {
                return Err(reply(OP, "pipeline reply of the wrong length"));
            }
            let mut it = replies.into_iter();
            for &i in chunk {
                let (Some(set), Some(read)) = (it.next(), it.next()) else {
                    return Err(reply(OP, "pipeline reply of the wrong length"));
                };
                let read = match (set, read) {
                    (Ok(set), Ok(read)) => {
                        if matches!(set, Value::Int(1)) {
                            let seen = reports[i].seen;
                            let lost = seen.is_some_and(|s| s.total != Spend::default());
                            created.push((i, lost));
                            if lost {
                                continue;
                            }
                        }
                        read
                    }
                    (Err(e), _) | (_, Err(e)) if is_wrong_type(&e) => {
                        round.refused.wrong_type += 1;
                        continue;
                    }
                    (Err(e), _) | (_, Err(e)) => return Err(StoreError::from_redis(OP, e)),
                };
                round.totals[i] = read_total(read, false, &mut round.refused);
            }
        }
        let seed_field = format!("s:{node}");
        for chunk in created.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &(i, lost) in chunk {
                let r = &reports[i];
                let key = self.spend_key(window, r.identity);
                pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
                if lost {
                    let s = r.seen.unwrap_or_default();
                    pipe.cmd("HSET")
                        .arg(&key)
                        .arg(&seed_field)
                        .arg(format!(
                            "{} {} {} {}",
                            s.total.bytes, s.total.cost, s.own.bytes, s.own.cost
                        ))
                        .ignore();
                    read_fields(&mut pipe, &key);
                }
            }
            let replies: Vec<redis::RedisResult<Value>> = self.query_pipe(OP, &pipe).await?;
            round.round_trips += 1;
            let mut it = replies.into_iter();
            for &(i, lost) in chunk.iter().filter(|(_, lost)| *lost) {
                match it.next() {
                    Some(Ok(read)) => round.totals[i] = read_total(read, lost, &mut round.refused),
                    Some(Err(e)) if is_wrong_type(&e) => round.refused.wrong_type += 1,
                    Some(Err(e)) => return Err(StoreError::from_redis(OP, e)),
                    None => return Err(reply(OP, "pipeline reply too short")),
                }
            }
        }
        Ok(round)
    }

    /// The store's clock (TIME), in ms.
    async fn server_ms(&mut self, op: &'static str) -> Result<u64, StoreError> {
        let (s, us): (u64, u64) = self.query(op, &redis::cmd("TIME")).await?;
        Ok(s.saturating_mul(1000).saturating_add(us / 1000))
    }

    /// Publishes this node's demand per identity (all zero: withdraws it, HDEL) stamped with
    /// the store's clock, and reads every node's fresh demand for each: one TIME, then per
    /// [`CHUNK`] identities one pipeline of HSET (or HDEL), PEXPIRE `ttl`, HRANDFIELD.
    /// Reports older than `ttl` (N sync intervals) are left out of the views.
    pub async fn report_demand(
        &mut self,
        node: &str,
        reports: &[(&str, Demand)],
        ttl: Duration,
    ) -> Result<DemandRound, StoreError> {
        if !valid_name(node) {
            return Err(StoreError::Config(format!("node name {node:?}")));
        }
        let ttl_ms = millis(ttl);
        let now_ms = self.server_ms("report_demand").await?;
        let mut round = DemandRound {
            views: vec![None; reports.len()],
            refused: Refused::default(),
            round_trips: 1,
        };
        let valid: Vec<usize> = (0..reports.len())
            .filter(|&i| valid_identity(reports[i].0))
            .collect();
        round.refused.bad_identity = (reports.len() - valid.len()) as u64;
        for chunk in valid.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in chunk {
                let (identity, d) = reports[i];
                let key = self.demand_key(identity);
                if d.is_zero() {
                    pipe.cmd("HDEL").arg(&key).arg(node);
                } else {
                    pipe.cmd("HSET")
                        .arg(&key)
                        .arg(node)
                        .arg(format!("{} {} {now_ms}", d.packets, d.bytes));
                }
                pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms);
                read_fields(&mut pipe, &key);
            }
            let replies: Vec<redis::RedisResult<Value>> =
                self.query_pipe("report_demand", &pipe).await?;
            round.round_trips += 1;
            if replies.len() != 3 * chunk.len() {
                return Err(reply("report_demand", "pipeline reply of the wrong length"));
            }
            let mut it = replies.into_iter();
            for &i in chunk {
                let (Some(set), Some(_), Some(read)) = (it.next(), it.next(), it.next()) else {
                    return Err(reply("report_demand", "pipeline reply of the wrong length"));
                };
                match (set, read) {
                    (Ok(_), Ok(read)) => match field_pairs(read, &mut round.refused) {
                        Some(f) => {
                            round.views[i] =
                                Some(demand_view(f, now_ms, ttl_ms, &mut round.refused));
                        }
                        None => round.refused.malformed += 1,
                    },
                    (Err(e), _) | (_, Err(e)) if is_wrong_type(&e) => {
                        round.refused.wrong_type += 1;
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        return Err(StoreError::from_redis("report_demand", e));
                    }
                }
            }
        }
        Ok(round)
    }
}

#[cfg(test)]
mod tests;
