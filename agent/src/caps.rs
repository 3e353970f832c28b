//! The capabilities the agent needs, checked before anything is touched so that a service
//! started with too few says which one is missing instead of failing deep inside a syscall.

/// (capability number, name, what it is needed for).
pub const REQUIRED: [(u32, &str, &str); 3] = [
    (
        39,
        "CAP_BPF",
        "creating the maps and loading the XDP program",
    ),
    (
        12,
        "CAP_NET_ADMIN",
        "loading and attaching an XDP program to an interface",
    ),
    (
        38,
        "CAP_PERFMON",
        "the verifier's full checks of the program's packet and map accesses",
    ),
];

/// The effective capability set of this process.
pub fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The required capabilities missing from `set`, with what each is for.
pub fn missing(set: u64) -> Vec<(&'static str, &'static str)> {
    REQUIRED
        .iter()
        .filter(|(bit, _, _)| set & (1u64 << bit) == 0)
        .map(|(_, name, why)| (*name, *why))
        .collect()
}

/// A sentence for the operator, or `None` when nothing is missing.
pub fn refusal(set: u64) -> Option<String> {
    let m = missing(set);
    if m.is_empty() {
        return None;
    }
    let list: Vec<String> = m.iter().map(|(n, why)| format!("{n} ({why})")).collect();
    Some(format!(
        "missing capabilit{} {}: run as root, or grant them (systemd: AmbientCapabilities= and \
         CapabilityBoundingSet=, see systemd/tollgate.service)",
        if m.len() == 1 { "y" } else { "ies" },
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_exactly_what_is_missing() {
        let all = (1 << 39) | (1 << 12) | (1 << 38);
        assert_eq!(refusal(all), None);
        let r = refusal(all & !(1 << 38)).unwrap();
        assert!(r.contains("missing capability CAP_PERFMON"), "{r}");
        assert!(!r.contains("CAP_BPF"), "{r}");
        let r = refusal(0).unwrap();
        assert!(r.contains("CAP_BPF") && r.contains("CAP_NET_ADMIN") && r.contains("capabilities"));
    }
}
