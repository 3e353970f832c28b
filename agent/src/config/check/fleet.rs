//! `[fleet]`: the store's address, the pool's names and files, the sync knobs and the outage
//! modes. Each fact is checked by the fleet module's own rule (`fleet::store::check_url`,
//! `read_ca_file`, `check_sentinel_node`, `Credentials::load`, `fleet::entry::valid_name`,
//! `PoolKey::load`), so what passes here is what the store client takes.
//!
//! Unlike most paths of the configuration, these files are read at check time: a fleet node
//! whose key or credentials cannot be loaded would enforce alone while its operator believes
//! it shares revocations, so `config check` says so before a deploy rather than a log after.

use std::path::PathBuf;

use super::{Checker, Result};
use crate::{
    config::{
        Fleet, FleetStore, Outage, OutageMode,
        raw::{RawFleet, RawOutage, RawSentinel, S},
    },
    fleet::{
        entry::{PoolKey, name_rule, valid_name},
        store::{
            CA_FILE_WITHOUT_TLS, Credentials, StoreError, check_sentinel_node, check_url,
            read_ca_file,
        },
    },
};

impl Checker<'_> {
    pub(super) fn fleet(&self, raw: S<RawFleet>) -> Result<Fleet> {
        let span = raw.span();
        let line = crate::config::line_of(self.text, span.start);
        let raw = raw.into_inner();
        let pool = self.fleet_name(&raw.pool, "fleet.pool")?;
        let node = self.fleet_name(&raw.node, "fleet.node")?;
        let store = match (raw.store, raw.sentinel) {
            (Some(_), Some(s)) => {
                return Err(self.err(
                    s.span(),
                    "fleet.sentinel",
                    "set `store` (one server) or `sentinel` (a primary found through \
                     Sentinel), not both",
                ));
            }
            (None, None) => {
                return Err(self.err(
                    span,
                    "fleet.store",
                    "the store is required: `store = \"rediss://host:port\"` (or redis://), \
                     or `sentinel = { service = \"…\", nodes = [\"host:port\", …] }`",
                ));
            }
            (Some(url), None) => {
                let parts =
                    check_url(url.get_ref()).map_err(|m| self.err(url.span(), "fleet.store", m))?;
                FleetStore::Url {
                    url: url.into_inner(),
                    tls: parts.tls,
                }
            }
            (None, Some(s)) => self.sentinel(s)?,
        };
        let ca_file = match &raw.ca_file {
            None => None,
            Some(v) => {
                let path = self.abs_path(&raw.ca_file, "fleet.ca_file", "")?;
                if !store.tls() {
                    let why = match store {
                        FleetStore::Url { .. } => CA_FILE_WITHOUT_TLS,
                        FleetStore::Sentinel { .. } => {
                            "a CA file is set but the sentinels are reached over plain TCP; \
                             set `tls = true` in `sentinel`"
                        }
                    };
                    return Err(self.err(v.span(), "fleet.ca_file", why));
                }
                read_ca_file(&path).map_err(|m| self.err(v.span(), "fleet.ca_file", m))?;
                Some(path)
            }
        };
        let credentials = match &raw.credentials {
            None => None,
            Some(v) => {
                let path = self.abs_path(&raw.credentials, "fleet.credentials", "")?;
                Credentials::load(&path).map_err(|e| {
                    let m = match e {
                        StoreError::Credentials(m) => format!("credentials file {m}"),
                        other => other.to_string(),
                    };
                    self.err(v.span(), "fleet.credentials", m)
                })?;
                Some(path)
            }
        };
        let pool_key = self.required_abs(&raw.pool_key, "fleet.pool_key")?;
        PoolKey::load(&pool_key, &pool)
            .map_err(|e| self.err(raw.pool_key.span(), "fleet.pool_key", e.to_string()))?;
        let int = |v: &Option<S<i64>>,
                   field: &str,
                   default: u64,
                   range: std::ops::RangeInclusive<u64>| {
            self.int(
                v,
                field,
                default as i64,
                *range.start() as i64..=*range.end() as i64,
            )
            .map(|x| x as u64)
        };
        let sync_interval_ms = int(
            &raw.sync_interval_ms,
            "fleet.sync_interval_ms",
            Fleet::DEFAULT_SYNC_INTERVAL_MS,
            Fleet::SYNC_INTERVAL_MS,
        )?;
        let op_timeout_ms = int(
            &raw.op_timeout_ms,
            "fleet.op_timeout_ms",
            Fleet::DEFAULT_OP_TIMEOUT_MS,
            Fleet::OP_TIMEOUT_MS,
        )?;
        let stream_max_len = int(
            &raw.stream_max_len,
            "fleet.stream_max_len",
            Fleet::DEFAULT_STREAM_MAX_LEN,
            Fleet::STREAM_MAX_LEN,
        )?;
        let outage = self.outage(raw.outage.map(S::into_inner).unwrap_or_default())?;
        Ok(Fleet {
            store,
            ca_file,
            credentials,
            pool_key,
            pool,
            node,
            sync_interval_ms,
            op_timeout_ms,
            stream_max_len,
            outage,
            line,
        })
    }

    fn fleet_name(&self, v: &S<String>, field: &str) -> Result<String> {
        if !valid_name(v.get_ref()) {
            return Err(self.err(
                v.span(),
                field,
                format!("{:?} is not a valid name: use {}", v.get_ref(), name_rule()),
            ));
        }
        Ok(v.get_ref().clone())
    }

    fn required_abs(&self, v: &S<String>, field: &str) -> Result<PathBuf> {
        self.abs_path(&Some(v.clone()), field, "")
    }

    fn sentinel(&self, raw: S<RawSentinel>) -> Result<FleetStore> {
        let raw = raw.into_inner();
        if !valid_name(raw.service.get_ref()) {
            return Err(self.err(
                raw.service.span(),
                "fleet.sentinel.service",
                format!(
                    "{:?} is not a service name this agent takes: use {}",
                    raw.service.get_ref(),
                    name_rule()
                ),
            ));
        }
        let field = "fleet.sentinel.nodes";
        let list = raw.nodes.get_ref();
        if list.is_empty() || list.len() > Fleet::MAX_SENTINELS {
            return Err(self.err(
                raw.nodes.span(),
                field,
                format!(
                    "{} sentinels: list 1 to {} (three or five is usual: a failover needs a \
                     majority of them)",
                    list.len(),
                    Fleet::MAX_SENTINELS
                ),
            ));
        }
        let mut nodes: Vec<String> = Vec::with_capacity(list.len());
        for n in list {
            check_sentinel_node(n.get_ref()).map_err(|m| self.err(n.span(), field, m))?;
            if nodes.iter().any(|o| o.eq_ignore_ascii_case(n.get_ref())) {
                return Err(self.err(
                    n.span(),
                    field,
                    format!("{:?} is listed twice", n.get_ref()),
                ));
            }
            nodes.push(n.get_ref().clone());
        }
        Ok(FleetStore::Sentinel {
            service: raw.service.into_inner(),
            nodes,
            tls: raw.tls.is_some_and(|t| *t.get_ref()),
        })
    }

    fn outage(&self, raw: RawOutage) -> Result<Outage> {
        let d = Outage::default();
        let mode = |v: &Option<S<String>>, field: &str, default: OutageMode| match v {
            None => Ok(default),
            Some(v) => OutageMode::from_label(v.get_ref()).ok_or_else(|| {
                let modes: Vec<&str> = OutageMode::ALL.iter().map(|m| m.label()).collect();
                self.err(
                    v.span(),
                    field,
                    format!(
                        "{:?} is not an outage mode: {}",
                        v.get_ref(),
                        modes.join(", ")
                    ),
                )
            }),
        };
        Ok(Outage {
            quotas: mode(&raw.quotas, "fleet.outage.quotas", d.quotas)?,
            rates: mode(&raw.rates, "fleet.outage.rates", d.rates)?,
        })
    }
}
