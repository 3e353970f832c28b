//! `[limits]`: the kernel tables' sizes, and the memory they may take.

use super::{Checker, Result};
use crate::{
    config::{
        Limits,
        raw::{RawLimits, S},
    },
    sizes::{self, Group, Sizes},
};

/// `kernel_memory_mib`: at least what the compiled sizes need, at most 1 TiB.
const KERNEL_MEMORY_MIB: std::ops::RangeInclusive<i64> = 64..=(1 << 20);

impl Checker<'_> {
    /// Reads the node's memory and CPUs: a size that fits one machine may not fit another,
    /// so `config check` is run on the node (the package's `ExecStartPre` does).
    pub(super) fn limits(&self, raw: Option<S<RawLimits>>) -> Result<Limits> {
        let span = raw.as_ref().map_or(0..0, |r| r.span());
        let raw = raw.map(S::into_inner).unwrap_or_default();
        let cpus = sizes::possible_cpus();
        let mem = sizes::mem_total();
        let (allowance, allowance_from) = match &raw.kernel_memory_mib {
            Some(_) => {
                let mib = self.int(
                    &raw.kernel_memory_mib,
                    "limits.kernel_memory_mib",
                    0,
                    KERNEL_MEMORY_MIB,
                )?;
                (mib as u64 * (1 << 20), "limits.kernel_memory_mib")
            }
            None => (
                // Unknown memory (no /proc): the defaults' own cost, so that they fit.
                mem.map_or(u64::MAX, |m| m / sizes::DEFAULT_SHARE),
                "an eighth of the node's memory",
            ),
        };
        let mut sizes = Sizes::DEFAULT;
        let mut defaulted = Vec::new();
        for (g, v) in [
            (Group::Identities, &raw.identities),
            (Group::ExactBindings, &raw.exact_bindings),
            (Group::CidrBindings, &raw.cidr_bindings),
            (Group::AnonPrefixes, &raw.anon_prefixes),
            (Group::Flows, &raw.flows),
        ] {
            let range = g.range();
            let field = format!("limits.{}", g.key());
            match v {
                Some(_) => {
                    let n = self.int(
                        v,
                        &field,
                        0,
                        i64::from(*range.start())..=i64::from(*range.end()),
                    )?;
                    sizes.set(g, n as u32);
                }
                None => defaulted.push(g),
            }
        }
        let sizes = sizes.fit_defaults(&defaulted, cpus, allowance);
        let costs = sizes::kernel_memory(&sizes, cpus);
        let need = sizes::total(&costs);
        if need > allowance {
            let mut parts: Vec<String> = Group::ALL
                .iter()
                .map(|g| {
                    let b: u64 = costs
                        .iter()
                        .filter(|c| g.maps().contains(&c.map.as_str()))
                        .map(|c| c.bytes)
                        .sum();
                    format!("{} {} ({})", g.key(), sizes.get(*g), sizes::human(b))
                })
                .collect();
            parts.push(format!("{cpus} possible CPUs"));
            return Err(self.err(
                span,
                "limits",
                format!(
                    "the kernel tables would take {} ({}), more than this node allows: {} \
                     ({allowance_from}). Lower the sizes, or raise limits.kernel_memory_mib \
                     if the node can spare it",
                    sizes::human(need),
                    parts.join(", "),
                    sizes::human(allowance),
                ),
            ));
        }
        Ok(Limits {
            sizes,
            kernel_memory: need,
            allowance,
            allowance_set: raw.kernel_memory_mib.is_some(),
            cpus,
        })
    }
}
