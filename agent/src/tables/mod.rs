//! The userspace API to the kernel's policy maps: endpoints, identities, bindings, settings,
//! counters. The daemon programs enforcement through this, and so do the tests.

pub(crate) mod batch;
mod bulk;
mod egress;
mod records;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
        PerCpuValues, lpm_trie::Key,
    },
};
pub use bulk::NewBinding;
pub use records::{EndpointSpec, PlanLimits, Proto, boot_ns, identity_record, to_q8};
use tollgate_common::{
    Counter,
    decide::AnonPrefix,
    flow::{EgressCounters, Flow, FlowKey, FlowPolicy, TtfbHist},
    map_names as names,
    policy::{
        AnonKey6, Binding, Bucket, Endpoint, ID_QUOTA_EXHAUSTED, ID_RESPONSE_CAPPED, ID_THROTTLED,
        Identity, IdentityCounters, MAX_ENDPOINTS, Settings, hold_back_index, port_slot,
    },
};

use crate::net::{host_len, mask_v4, mask_v6};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the object has no map named {0}")]
    NoMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("endpoint id {0} is out of range (1..{MAX_ENDPOINTS})")]
    EndpointId(u32),
    #[error("identity id {0} is out of range (1..{1}, limits.identities)")]
    IdentityId(u32, u32),
    #[error("prefix length {len} is too long for {addr}")]
    PrefixLength { addr: IpAddr, len: u8 },
    #[error("the {0} binding map is full: binding refused (existing bindings are never evicted)")]
    BindingsFull(&'static str),
    #[error("no binding for {0}")]
    NoBinding(String),
}

type Result<T> = std::result::Result<T, TableError>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> TableError {
    move |source| TableError::Map { name, source }
}

/// The policy maps, owned. (Not `Tables`: that is the trait `decide` reads the kernel's state
/// through, `tollgate_common::decide::Tables`.)
pub struct KernelTables {
    pub(crate) ports: Array<MapData, u32>,
    pub(crate) endpoints: Array<MapData, Endpoint>,
    bind_v4: HashMap<MapData, [u8; 4], Binding>,
    bind_v6: HashMap<MapData, [u8; 16], Binding>,
    cidr_v4: LpmTrie<MapData, [u8; 4], Binding>,
    cidr_v6: LpmTrie<MapData, [u8; 16], Binding>,
    pub(crate) identities: Array<MapData, Identity>,
    pub(crate) buckets: Array<MapData, Bucket>,
    settings: Array<MapData, Settings>,
    identity_counters: PerCpuArray<MapData, IdentityCounters>,
    reason_counters: PerCpuArray<MapData, Counter>,
    anon_v4: HashMap<MapData, [u8; 4], u64>,
    anon_v6: HashMap<MapData, AnonKey6, u64>,
    hold_back: Array<MapData, u16>,
    /// Both directions of bound identities' TCP flows (`tollgate_common::flow`); an LRU.
    pub(crate) flows: HashMap<MapData, FlowKey, Flow>,
    /// Per endpoint id: whether its flows are tracked and its request caps.
    pub(crate) flow_policy: Array<MapData, FlowPolicy>,
    /// Per CPU, indexed by `tollgate_common::flow::FLOW_*`.
    pub(crate) flow_counters: PerCpuArray<MapData, u64>,
    /// What the node sent, per identity slot (sized with the identities) and per endpoint.
    pub(crate) egress_identity: PerCpuArray<MapData, EgressCounters>,
    pub(crate) egress_endpoint: PerCpuArray<MapData, EgressCounters>,
    /// Time to first byte per (endpoint, class): `tollgate_common::flow::ttfb_index`.
    pub(crate) ttfb: PerCpuArray<MapData, TtfbHist>,
    /// The maps' sizes as the kernel made them (`[limits]`, or the pins adopted).
    sizes: crate::sizes::Sizes,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(TableError::NoMap(name))
}

macro_rules! typed {
    ($map:expr, $name:expr) => {
        $map.try_into().map_err(map_err($name))?
    };
}

impl KernelTables {
    /// Takes the policy maps out of a loaded object (pin them first if they must outlive it).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_maps(|name| take(ebpf, name))
    }

    /// Builds from any source of maps by name (a loaded object, pins).
    pub fn from_maps(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        let mut t = KernelTables {
            ports: typed!(get(names::PORTS)?, names::PORTS),
            endpoints: typed!(get(names::ENDPOINTS)?, names::ENDPOINTS),
            bind_v4: typed!(get(names::BIND_V4)?, names::BIND_V4),
            bind_v6: typed!(get(names::BIND_V6)?, names::BIND_V6),
            cidr_v4: typed!(get(names::BIND_CIDR_V4)?, names::BIND_CIDR_V4),
            cidr_v6: typed!(get(names::BIND_CIDR_V6)?, names::BIND_CIDR_V6),
            identities: typed!(get(names::IDENTITIES)?, names::IDENTITIES),
            buckets: typed!(get(names::BUCKETS)?, names::BUCKETS),
            settings: typed!(get(names::SETTINGS)?, names::SETTINGS),
            identity_counters: typed!(get(names::IDENTITY_COUNTERS)?, names::IDENTITY_COUNTERS),
            reason_counters: typed!(get(names::REASON_COUNTERS)?, names::REASON_COUNTERS),
            anon_v4: typed!(get(names::ANON_V4)?, names::ANON_V4),
            anon_v6: typed!(get(names::ANON_V6)?, names::ANON_V6),
            hold_back: typed!(get(names::HOLD_BACK)?, names::HOLD_BACK),
            flows: typed!(get(names::FLOWS)?, names::FLOWS),
            flow_policy: typed!(get(names::FLOW_POLICY)?, names::FLOW_POLICY),
            flow_counters: typed!(get(names::FLOW_COUNTERS)?, names::FLOW_COUNTERS),
            egress_identity: typed!(get(names::EGRESS_IDENTITY)?, names::EGRESS_IDENTITY),
            egress_endpoint: typed!(get(names::EGRESS_ENDPOINT)?, names::EGRESS_ENDPOINT),
            ttfb: typed!(get(names::TTFB)?, names::TTFB),
            sizes: crate::sizes::Sizes::COMPILED,
        };
        let size = |m: &MapData, name: &'static str| -> Result<u32> {
            m.info()
                .map(|i| i.max_entries())
                .map_err(|e| map_err(name)(e))
        };
        t.sizes = crate::sizes::Sizes {
            identities: size(t.identities.map(), names::IDENTITIES)?,
            exact_bindings: size(t.bind_v4.map(), names::BIND_V4)?,
            cidr_bindings: size(t.cidr_v4.map(), names::BIND_CIDR_V4)?,
            anon_prefixes: size(t.anon_v4.map(), names::ANON_V4)?,
            flows: size(t.flows.map(), names::FLOWS)?,
        };
        Ok(t)
    }

    /// (map, max_entries, kernel memory) of every table here, as the kernel reports them
    /// (`memlock` in the map's fdinfo; 0 where it cannot be read).
    pub fn memory(&self) -> Vec<(&'static str, u32, u64)> {
        use std::os::fd::AsFd as _;
        let maps: [(&'static str, &MapData); 20] = [
            (names::PORTS, self.ports.map()),
            (names::ENDPOINTS, self.endpoints.map()),
            (names::BIND_V4, self.bind_v4.map()),
            (names::BIND_V6, self.bind_v6.map()),
            (names::BIND_CIDR_V4, self.cidr_v4.map()),
            (names::BIND_CIDR_V6, self.cidr_v6.map()),
            (names::IDENTITIES, self.identities.map()),
            (names::BUCKETS, self.buckets.map()),
            (names::SETTINGS, self.settings.map()),
            (names::IDENTITY_COUNTERS, self.identity_counters.map()),
            (names::REASON_COUNTERS, self.reason_counters.map()),
            (names::ANON_V4, self.anon_v4.map()),
            (names::ANON_V6, self.anon_v6.map()),
            (names::HOLD_BACK, self.hold_back.map()),
            (names::FLOWS, self.flows.map()),
            (names::FLOW_POLICY, self.flow_policy.map()),
            (names::FLOW_COUNTERS, self.flow_counters.map()),
            (names::EGRESS_IDENTITY, self.egress_identity.map()),
            (names::EGRESS_ENDPOINT, self.egress_endpoint.map()),
            (names::TTFB, self.ttfb.map()),
        ];
        maps.into_iter()
            .map(|(name, m)| {
                let entries = m.info().map_or(0, |i| i.max_entries());
                let bytes = crate::sizes::memlock(m.fd().as_fd()).unwrap_or(0);
                (name, entries, bytes)
            })
            .collect()
    }

    /// The tables' sizes, as the kernel holds them.
    pub fn sizes(&self) -> crate::sizes::Sizes {
        self.sizes
    }

    /// Identity slots (ids run 1..this).
    pub fn identity_slots(&self) -> u32 {
        self.sizes.identities
    }

    /// Installs endpoint `id` and points its ports at it.
    pub fn set_endpoint(&mut self, id: u32, spec: &EndpointSpec) -> Result<()> {
        if id == 0 || id >= MAX_ENDPOINTS {
            return Err(TableError::EndpointId(id));
        }
        let ep = spec.to_kernel()?;
        // The record first, then the ports: a packet never finds a port pointing at nothing.
        self.endpoints
            .set(id, ep, 0)
            .map_err(map_err(names::ENDPOINTS))?;
        for port in spec.ports.clone() {
            let slot = port_slot(spec.proto.number(), port).unwrap_or_default();
            self.ports.set(slot, id, 0).map_err(map_err(names::PORTS))?;
        }
        Ok(())
    }

    /// Removes endpoint `id`: its ports first, then the record.
    pub fn remove_endpoint(&mut self, id: u32, spec: &EndpointSpec) -> Result<()> {
        for port in spec.ports.clone() {
            let slot = port_slot(spec.proto.number(), port).unwrap_or_default();
            if self.ports.get(&slot, 0).map_err(map_err(names::PORTS))? == id {
                self.ports.set(slot, 0, 0).map_err(map_err(names::PORTS))?;
            }
        }
        self.endpoints
            .set(id, Endpoint::default(), 0)
            .map_err(map_err(names::ENDPOINTS))
    }

    /// Writes identity `id`. Its limiter state is left as it is, so re-writing an identity
    /// (a plan change, a reload) never hands out a fresh burst.
    pub fn set_identity(&mut self, id: u32, identity: &Identity) -> Result<()> {
        if id == 0 || id >= self.sizes.identities {
            return Err(TableError::IdentityId(id, self.sizes.identities));
        }
        self.identities
            .set(id, identity, 0)
            .map_err(map_err(names::IDENTITIES))
    }

    /// Writes identity `id` but keeps the flags the controller owns (throttle, quota) and
    /// the throttle factor, so that a reload or a new token does not undo them.
    pub fn set_identity_keeping_controller_flags(
        &mut self,
        id: u32,
        identity: &Identity,
    ) -> Result<()> {
        let mut rec = *identity;
        if let Ok(old) = self.identity(id) {
            keep_controller_flags(&mut rec, &old);
        }
        self.set_identity(id, &rec)
    }

    pub fn identity(&self, id: u32) -> Result<Identity> {
        if id >= self.sizes.identities {
            return Err(TableError::IdentityId(id, self.sizes.identities));
        }
        self.identities
            .get(&id, 0)
            .map_err(map_err(names::IDENTITIES))
    }

    /// Clears identity `id`, its limiter state and its counters: the slot may be reused, and
    /// its next occupant must not inherit the budget, flags or traffic of this one.
    pub fn clear_identity(&mut self, id: u32) -> Result<()> {
        if id == 0 || id >= self.sizes.identities {
            return Err(TableError::IdentityId(id, self.sizes.identities));
        }
        self.identities
            .set(id, Identity::default(), 0)
            .map_err(map_err(names::IDENTITIES))?;
        self.buckets
            .set(id, Bucket::default(), 0)
            .map_err(map_err(names::BUCKETS))?;
        let cpus = self
            .identity_counters
            .get(&id, 0)
            .map_err(map_err(names::IDENTITY_COUNTERS))?
            .iter()
            .count();
        let zeros = PerCpuValues::try_from(vec![IdentityCounters::default(); cpus])
            .map_err(|e| map_err(names::IDENTITY_COUNTERS)(MapError::IoError(e)))?;
        self.identity_counters
            .set(id, zeros, 0)
            .map_err(map_err(names::IDENTITY_COUNTERS))?;
        let zeros = PerCpuValues::try_from(vec![EgressCounters::default(); cpus])
            .map_err(|e| map_err(names::EGRESS_IDENTITY)(MapError::IoError(e)))?;
        self.egress_identity
            .set(id, zeros, 0)
            .map_err(map_err(names::EGRESS_IDENTITY))
    }

    /// Binds `addr/len` to `identity` until `expires_ns` (CLOCK_MONOTONIC; 0: never). A full
    /// prefix (/32, /128) goes to the exact map, anything shorter to the LPM trie. A full map
    /// refuses the binding; nothing is evicted.
    pub fn bind(&mut self, addr: IpAddr, len: u8, identity: u32, expires_ns: u64) -> Result<()> {
        if identity == 0 || identity >= self.sizes.identities {
            return Err(TableError::IdentityId(identity, self.sizes.identities));
        }
        let b = Binding {
            identity,
            _pad: 0,
            expires_ns,
        };
        let full = |e: MapError, which: &'static str, name: &'static str| match &e {
            MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                TableError::BindingsFull(which)
            }
            MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOSPC) => {
                TableError::BindingsFull(which)
            }
            _ => TableError::Map { name, source: e },
        };
        match addr {
            IpAddr::V4(a) if len == 32 => self
                .bind_v4
                .insert(a.octets(), b, 0)
                .map_err(|e| full(e, "IPv4 exact", names::BIND_V4)),
            IpAddr::V6(a) if len == 128 => self
                .bind_v6
                .insert(a.octets(), b, 0)
                .map_err(|e| full(e, "IPv6 exact", names::BIND_V6)),
            IpAddr::V4(a) if len < 32 => self
                .cidr_v4
                .insert(&Key::new(len.into(), mask_v4(a, len)), b, 0)
                .map_err(|e| full(e, "IPv4 CIDR", names::BIND_CIDR_V4)),
            IpAddr::V6(a) if len < 128 => self
                .cidr_v6
                .insert(&Key::new(len.into(), mask_v6(a, len)), b, 0)
                .map_err(|e| full(e, "IPv6 CIDR", names::BIND_CIDR_V6)),
            _ => Err(TableError::PrefixLength { addr, len }),
        }
    }

    /// Removes the binding of exactly `addr/len`.
    pub fn unbind(&mut self, addr: IpAddr, len: u8) -> Result<()> {
        let r = match addr {
            IpAddr::V4(a) if len == 32 => self.bind_v4.remove(&a.octets()),
            IpAddr::V6(a) if len == 128 => self.bind_v6.remove(&a.octets()),
            IpAddr::V4(a) if len < 32 => {
                self.cidr_v4.remove(&Key::new(len.into(), mask_v4(a, len)))
            }
            IpAddr::V6(a) if len < 128 => {
                self.cidr_v6.remove(&Key::new(len.into(), mask_v6(a, len)))
            }
            _ => return Err(TableError::PrefixLength { addr, len }),
        };
        r.map_err(|e| match e {
            MapError::KeyNotFound => TableError::NoBinding(format!("{addr}/{len}")),
            MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                TableError::NoBinding(format!("{addr}/{len}"))
            }
            other => TableError::Map {
                name: names::BIND_V4,
                source: other,
            },
        })
    }

    pub fn settings(&self) -> Result<Settings> {
        self.settings.get(&0, 0).map_err(map_err(names::SETTINGS))
    }

    pub fn set_settings(&mut self, s: &Settings) -> Result<()> {
        self.settings.set(0, s, 0).map_err(map_err(names::SETTINGS))
    }

    /// Packets and bytes passed and dropped for identity `id` (0: anonymous), over all CPUs.
    pub fn identity_counters(&self, id: u32) -> Result<IdentityCounters> {
        let slots: PerCpuValues<IdentityCounters> = self
            .identity_counters
            .get(&id, 0)
            .map_err(map_err(names::IDENTITY_COUNTERS))?;
        Ok(IdentityCounters::sum(slots.iter()))
    }

    /// Identity `id`'s counters, one entry per CPU (to see which CPUs carried its traffic).
    pub fn identity_counters_per_cpu(&self, id: u32) -> Result<Vec<IdentityCounters>> {
        let slots: PerCpuValues<IdentityCounters> = self
            .identity_counters
            .get(&id, 0)
            .map_err(map_err(names::IDENTITY_COUNTERS))?;
        Ok(slots.iter().copied().collect())
    }

    /// The (reason, endpoint) counter map.
    pub fn reason_counters(&self) -> &PerCpuArray<MapData, Counter> {
        &self.reason_counters
    }

    /// Every binding in the kernel: (address, prefix length, binding). The exact maps are
    /// read in batches (a few syscalls for 131 072 entries); the CIDR tries, which have no
    /// batch operation, key by key.
    pub fn bindings(&self) -> Result<Vec<(IpAddr, u8, Binding)>> {
        let mut out = Vec::new();
        let v4 = batch::read_all::<[u8; 4], Binding>(self.bind_v4.map(), self.sizes.exact_bindings)
            .map_err(|e| batch_err(names::BIND_V4, e))?;
        out.extend(v4.into_iter().map(|(k, b)| (IpAddr::from(k), 32, b)));
        let v6 =
            batch::read_all::<[u8; 16], Binding>(self.bind_v6.map(), self.sizes.exact_bindings)
                .map_err(|e| batch_err(names::BIND_V6, e))?;
        out.extend(v6.into_iter().map(|(k, b)| (IpAddr::from(k), 128, b)));
        for k in self.cidr_v4.keys() {
            let k = k.map_err(map_err(names::BIND_CIDR_V4))?;
            if let Ok(b) = self.cidr_v4.get(&k, 0) {
                out.push((IpAddr::from(k.data()), k.prefix_len() as u8, b));
            }
        }
        for k in self.cidr_v6.keys() {
            let k = k.map_err(map_err(names::BIND_CIDR_V6))?;
            if let Ok(b) = self.cidr_v6.get(&k, 0) {
                out.push((IpAddr::from(k.data()), k.prefix_len() as u8, b));
            }
        }
        Ok(out)
    }

    /// Every identity record, indexed by id (a batch read of the whole array).
    pub fn identity_table(&self) -> Result<Vec<Identity>> {
        array_table(
            self.identities.map(),
            self.sizes.identities,
            names::IDENTITIES,
        )
    }

    /// Every endpoint record, indexed by id.
    pub fn endpoint_table(&self) -> Result<Vec<Endpoint>> {
        array_table(self.endpoints.map(), MAX_ENDPOINTS, names::ENDPOINTS)
    }

    /// Entries per binding map (exact v4, exact v6, CIDR v4, CIDR v6), keys only.
    /// The exact maps and the anonymous tables are counted with batch walks
    /// ([`bulk`]: a few syscalls per scrape at a million entries); the CIDR tries key by key.
    pub fn binding_counts(&self) -> [usize; 4] {
        [
            self.count_exact_v4(),
            self.count_exact_v6(),
            self.cidr_v4.keys().count(),
            self.cidr_v6.keys().count(),
        ]
    }

    /// Anonymous prefixes tracked (IPv4 /24s; IPv6 /64s, /56s and /48s).
    pub fn anon_counts(&self) -> [usize; 2] {
        self.count_anon()
    }

    /// The binding that covers `addr` (exact first, then longest prefix), as the kernel
    /// would find it, expired or not.
    pub fn lookup_binding(&self, addr: IpAddr) -> Result<Option<(u8, Binding)>> {
        if let Some(b) = self.exact_binding(addr)? {
            return Ok(Some((host_len(addr), b)));
        }
        self.cidr_binding(addr)
    }

    /// The /32 or /128 binding of `addr`, as the kernel's exact map has it.
    pub fn exact_binding(&self, addr: IpAddr) -> Result<Option<Binding>> {
        match addr {
            IpAddr::V4(a) => {
                found(self.bind_v4.get(&a.octets(), 0)).map_err(map_err(names::BIND_V4))
            }
            IpAddr::V6(a) => {
                found(self.bind_v6.get(&a.octets(), 0)).map_err(map_err(names::BIND_V6))
            }
        }
    }

    /// The longest CIDR binding covering `addr` (one LPM lookup, as the kernel does) and its
    /// prefix length (found by walking the trie's keys, only on a hit: for display).
    pub fn cidr_binding(&self, addr: IpAddr) -> Result<Option<(u8, Binding)>> {
        let Some(b) = self.cidr_lookup(addr)? else {
            return Ok(None);
        };
        let len = match addr {
            IpAddr::V4(a) => self.matching_prefix_v4(a)?,
            IpAddr::V6(a) => self.matching_prefix_v6(a)?,
        };
        Ok(Some((len, b)))
    }

    /// The longest CIDR binding covering `addr`: one LPM lookup, no walk.
    fn cidr_lookup(&self, addr: IpAddr) -> Result<Option<Binding>> {
        match addr {
            IpAddr::V4(a) => found(self.cidr_v4.get(&Key::new(32, a.octets()), 0))
                .map_err(map_err(names::BIND_CIDR_V4)),
            IpAddr::V6(a) => found(self.cidr_v6.get(&Key::new(128, a.octets()), 0))
                .map_err(map_err(names::BIND_CIDR_V6)),
        }
    }

    /// The binding the kernel would charge `addr` to at `now_ns` (coarse clock): the exact
    /// one if live, else the longest live CIDR one; two lookups, no walk (a path taken per
    /// usage report).
    pub fn live_binding(&self, addr: IpAddr, now_ns: u64) -> Result<Option<Binding>> {
        if let Some(b) = self.exact_binding(addr)?.filter(|b| b.live_at(now_ns)) {
            return Ok(Some(b));
        }
        Ok(self.cidr_lookup(addr)?.filter(|b| b.live_at(now_ns)))
    }

    fn matching_prefix_v4(&self, a: Ipv4Addr) -> Result<u8> {
        let mut best = 0;
        for k in self.cidr_v4.keys() {
            let k = k.map_err(map_err(names::BIND_CIDR_V4))?;
            let len = k.prefix_len() as u8;
            if len >= best && mask_v4(a, len) == k.data() {
                best = len;
            }
        }
        Ok(best)
    }

    fn matching_prefix_v6(&self, a: Ipv6Addr) -> Result<u8> {
        let mut best = 0;
        for k in self.cidr_v6.keys() {
            let k = k.map_err(map_err(names::BIND_CIDR_V6))?;
            let len = k.prefix_len() as u8;
            if len >= best && mask_v6(a, len) == k.data() {
                best = len;
            }
        }
        Ok(best)
    }

    /// The anonymous allowance's TAT for a prefix, if the kernel tracks it.
    pub fn anon_tat(&self, prefix: &AnonPrefix) -> Result<Option<u64>> {
        let r = match prefix {
            AnonPrefix::V4(k) => self.anon_v4.get(k, 0),
            AnonPrefix::V6(k) => self.anon_v6.get(k, 0),
        };
        match r {
            Ok(t) => Ok(Some(t)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(TableError::Map {
                name: names::ANON_V4,
                source: e,
            }),
        }
    }

    /// The controller's Q8 hold-back multiplier for (endpoint, plan); 0 means 1.0.
    pub fn hold_back(&self, endpoint: u32, plan: u16) -> Result<u16> {
        self.hold_back
            .get(&hold_back_index(endpoint, plan), 0)
            .map_err(map_err(names::HOLD_BACK))
    }

    pub fn set_hold_back(&mut self, endpoint: u32, plan: u16, q8: u16) -> Result<()> {
        if endpoint >= MAX_ENDPOINTS {
            return Err(TableError::EndpointId(endpoint));
        }
        self.hold_back
            .set(hold_back_index(endpoint, plan), q8, 0)
            .map_err(map_err(names::HOLD_BACK))
    }

    /// Sets or clears identity flags (quarantine, throttle, quota) without touching the rest
    /// of the record; `throttle_q8` is written when given.
    pub fn update_identity_flags(
        &mut self,
        id: u32,
        set: u8,
        clear: u8,
        throttle_q8: Option<u16>,
    ) -> Result<()> {
        let mut rec = self.identity(id)?;
        rec.flags = (rec.flags | set) & !clear;
        if let Some(t) = throttle_q8 {
            rec.throttle_q8 = t;
        }
        self.set_identity(id, &rec)
    }

    /// The whole port table (slot -> endpoint id).
    pub fn port_table(&self) -> Result<Vec<u32>> {
        array_table(
            self.ports.map(),
            tollgate_common::policy::PORT_SLOTS,
            names::PORTS,
        )
    }

    /// Points one port slot at an endpoint (0: unprotected).
    pub fn set_port_slot(&mut self, slot: u32, id: u32) -> Result<()> {
        self.ports.set(slot, id, 0).map_err(map_err(names::PORTS))
    }

    /// Writes an endpoint record without touching ports.
    pub fn set_endpoint_record(&mut self, id: u32, ep: &Endpoint) -> Result<()> {
        if id >= MAX_ENDPOINTS {
            return Err(TableError::EndpointId(id));
        }
        self.endpoints
            .set(id, ep, 0)
            .map_err(map_err(names::ENDPOINTS))
    }

    pub fn endpoint_record(&self, id: u32) -> Result<Endpoint> {
        if id >= MAX_ENDPOINTS {
            return Err(TableError::EndpointId(id));
        }
        self.endpoints
            .get(&id, 0)
            .map_err(map_err(names::ENDPOINTS))
    }

    pub fn bucket(&self, id: u32) -> Result<Bucket> {
        self.buckets.get(&id, 0).map_err(map_err(names::BUCKETS))
    }

    /// Writes endpoint `id`'s flow settings (`FlowPolicy::default()`: not tracked, no caps,
    /// what an endpoint that went gets). The kernel reads them on every bound TCP packet.
    pub fn set_flow_policy(&mut self, endpoint: u32, p: &FlowPolicy) -> Result<()> {
        if endpoint >= MAX_ENDPOINTS {
            return Err(TableError::EndpointId(endpoint));
        }
        self.flow_policy
            .set(endpoint, p, 0)
            .map_err(map_err(names::FLOW_POLICY))
    }

    /// Endpoint `id`'s flow settings as the kernel has them.
    pub fn flow_policy(&self, endpoint: u32) -> Result<FlowPolicy> {
        if endpoint >= MAX_ENDPOINTS {
            return Err(TableError::EndpointId(endpoint));
        }
        self.flow_policy
            .get(&endpoint, 0)
            .map_err(map_err(names::FLOW_POLICY))
    }

    /// Every endpoint's flow settings, indexed by id (one batch read).
    pub fn flow_policy_table(&self) -> Result<Vec<FlowPolicy>> {
        array_table(self.flow_policy.map(), MAX_ENDPOINTS, names::FLOW_POLICY)
    }
}

/// `rec` with the flags the controller owns (throttle, quota) and a throttle's factor taken
/// from `old`, the record in force.
fn keep_controller_flags(rec: &mut Identity, old: &Identity) {
    rec.flags |= old.flags & (ID_THROTTLED | ID_QUOTA_EXHAUSTED | ID_RESPONSE_CAPPED);
    if old.flags & ID_THROTTLED != 0 {
        rec.throttle_q8 = old.throttle_q8;
    }
    // A response cap's mode (0: drop) goes with its flag.
    if old.flags & ID_RESPONSE_CAPPED != 0 {
        rec.response_q8 = old.response_q8;
    }
}

fn batch_err(name: &'static str, e: std::io::Error) -> TableError {
    TableError::Map {
        name,
        source: MapError::IoError(e),
    }
}

/// A whole array map, read in batches, as a vector indexed by key.
fn array_table<V: aya::Pod>(map: &MapData, len: u32, name: &'static str) -> Result<Vec<V>> {
    let entries = batch::read_all::<u32, V>(map, len).map_err(|e| batch_err(name, e))?;
    let mut out = Vec::with_capacity(len as usize);
    for (i, (k, v)) in entries.into_iter().enumerate() {
        // An array hands out every index in order; anything else is not an array.
        if k as usize != i {
            return Err(batch_err(
                name,
                std::io::Error::other(format!("batch read returned index {k} at {i}")),
            ));
        }
        out.push(v);
    }
    Ok(out)
}

/// A map lookup's result, with "no such key" as `None`.
fn found(
    r: std::result::Result<Binding, MapError>,
) -> std::result::Result<Option<Binding>, MapError> {
    match r {
        Ok(b) => Ok(Some(b)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
