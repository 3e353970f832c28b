//! `tollgate run`: loads the configuration, adopts or creates the pinned state, applies the
//! policy, attaches, and serves the control socket until SIGINT/SIGTERM. SIGHUP reloads.
//!
//! Stopping the daemon leaves the program attached with the last policy (the kernel checks
//! binding expiry itself); `tollgate uninstall` is what removes it. `--detach-on-exit` gives
//! the old behaviour for ad-hoc runs.

use std::{
    cell::RefCell,
    net::IpAddr,
    path::{Path, PathBuf},
    rc::Rc,
    time::Duration,
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
};
use tracing::{info, warn};

use crate::{
    audit::{Actor, Audit},
    config::Config,
    control::{
        peer::{self, Peer},
        protocol::{ErrorKind, MAX_REQUEST_BYTES, Request, Response},
    },
    explain,
    loader::AttachMode,
    pins::{self, Pinned},
    policy,
    state::{DynBinding, Quarantine, State, now_unix_ms},
    tables::{boot_ns, mask},
    token_bind::TokenService,
};

/// Drop events logged per second at most (the rest are counted, not logged): a flood must
/// not flood the journal.
const DROP_LOG_PER_SECOND: u32 = 20;

/// Command-line overrides of the configuration (for labs, tests and one-off runs).
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub interfaces: Vec<String>,
    pub mode: Option<AttachMode>,
    pub pin_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub detach_on_exit: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Pins(#[from] pins::PinError),
    #[error("{0}")]
    State(#[from] crate::state::StateError),
    #[error("{0}")]
    Policy(#[from] policy::PolicyError),
    #[error("{0}")]
    Keys(#[from] crate::token_bind::KeysError),
    #[error("{0}")]
    Listener(#[from] crate::bind_listener::ListenerError),
    #[error("{0}")]
    Capabilities(String),
    #[error("{what}: {message}")]
    Io { what: String, message: String },
}

fn io_err(what: impl Into<String>, e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Io {
        what: what.into(),
        message: e.to_string(),
    }
}

/// Loads the configuration the options name: an explicit file must exist; without one the
/// default path is used if present, else the embedded default (a first run).
pub fn load_config(opts: &Options) -> Result<Config, crate::config::ConfigError> {
    let mut config = match &opts.config {
        Some(path) => Config::load(path)?,
        None if Path::new(Config::DEFAULT_PATH).exists() => {
            Config::load(Path::new(Config::DEFAULT_PATH))?
        }
        None => Config::embedded_default(),
    };
    if !opts.interfaces.is_empty() {
        config.node.interfaces = opts.interfaces.clone();
    }
    if let Some(m) = opts.mode {
        config.node.xdp_mode = m;
    }
    if let Some(p) = &opts.pin_dir {
        config.node.pin_dir = p.clone();
    }
    if let Some(p) = &opts.state_dir {
        config.node.state_dir = p.clone();
    }
    if let Some(p) = &opts.control_socket {
        config.node.control_socket = p.clone();
    }
    Ok(config)
}

pub struct Daemon {
    opts: Options,
    pub(crate) config: Config,
    pub(crate) pinned: Pinned,
    pub(crate) state: State,
    pub(crate) audit: Audit,
    pub(crate) tokens: Option<TokenService>,
    pub(crate) control: crate::controller::control_loop::ControlLoop,
    pub(crate) drop_stats: crate::metrics::DropEventStats,
    drop_budget: (u64, u32),
    attached: Vec<String>,
    started_unix_ms: u64,
    stop: bool,
}

impl Daemon {
    pub fn start(opts: Options) -> Result<Daemon, DaemonError> {
        let config = load_config(&opts)?;
        if let Some(why) = crate::caps::refusal(crate::caps::effective()) {
            return Err(DaemonError::Capabilities(why));
        }
        // Keys before anything is touched: a broken JWKS is a configuration error.
        let tokens = match &config.tokens {
            Some(t) => Some(TokenService::new(t)?),
            None => None,
        };
        let control = crate::controller::control_loop::ControlLoop::new(&config)
            .map_err(|e| io_err("quota state", e))?;
        let mut pinned = Pinned::open(&config.node.pin_dir)?;
        let mut state = State::load(&config.node.state_dir)?;
        let audit = Audit::open(&config.node.state_dir).map_err(|e| {
            io_err(
                format!("audit log in {}", config.node.state_dir.display()),
                e,
            )
        })?;
        let applied = policy::apply(&config, &mut state, &mut pinned.tables, now_unix_ms())?;
        state.save(&config.node.state_dir)?;
        let mut attached = Vec::new();
        for iface in &config.node.interfaces {
            let adopted = pinned.attach(iface, config.node.xdp_mode)?;
            info!(
                iface,
                adopted,
                mode = config.node.xdp_mode.label(),
                "attached"
            );
            attached.push(iface.clone());
        }
        for old in pins::pinned_interfaces(&config.node.pin_dir) {
            if !attached.contains(&old) {
                pinned.detach(&old)?;
                info!(iface = old, "detached: no longer configured");
            }
        }
        audit
            .record(
                &Actor::AGENT,
                "start",
                "",
                json!({
                    "config": config.source,
                    "adopted_pins": pinned.adopted,
                    "interfaces": attached,
                    "applied": applied,
                }),
            )
            .map_err(|e| io_err("audit log", e))?;
        Ok(Daemon {
            opts,
            config,
            pinned,
            state,
            audit,
            tokens,
            control,
            drop_stats: crate::metrics::DropEventStats::default(),
            drop_budget: (0, 0),
            attached,
            started_unix_ms: now_unix_ms(),
            stop: false,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn save(&self) -> Result<(), Response> {
        self.state
            .save(&self.config.node.state_dir)
            .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))
    }

    fn audit(
        &self,
        who: &Actor,
        action: &str,
        reason: &str,
        detail: serde_json::Value,
    ) -> Result<(), Response> {
        self.audit
            .record(who, action, reason, detail)
            .map_err(|e| Response::err(ErrorKind::Kernel, format!("audit log: {e}")))
    }

    /// Reloads the configuration: a file that fails validation changes nothing.
    pub fn reload(&mut self, who: &Actor) -> Response {
        let config = match load_config(&self.opts) {
            Ok(c) => c,
            Err(e) => {
                warn!("reload refused: {e}");
                let _ = self.audit(who, "reload_refused", &e.to_string(), json!({}));
                return Response::err(ErrorKind::Config, e.to_string());
            }
        };
        if config.node.pin_dir != self.config.node.pin_dir
            || config.node.state_dir != self.config.node.state_dir
            || config.node.control_socket != self.config.node.control_socket
            || config.listen.bind != self.config.listen.bind
            || config.tokens.as_ref().map(|t| (&t.tls_cert, &t.tls_key))
                != self
                    .config
                    .tokens
                    .as_ref()
                    .map(|t| (&t.tls_cert, &t.tls_key))
        {
            return Response::err(
                ErrorKind::Config,
                "node.pin_dir, node.state_dir, node.control_socket, listen.bind and the TLS \
                 files take effect only on restart",
            );
        }
        // The keys are re-read too; a JWKS that does not parse refuses the whole reload.
        let tokens = match &config.tokens {
            Some(t) => match TokenService::new(t) {
                Ok(mut svc) => {
                    if let Some(old) = &self.tokens {
                        svc.results = old.results.clone();
                        svc.thefts = old.thefts;
                    }
                    Some(svc)
                }
                Err(e) => {
                    let _ = self.audit(who, "reload_refused", &e.to_string(), json!({}));
                    return Response::err(ErrorKind::Config, e.to_string());
                }
            },
            None => None,
        };
        let applied = match policy::apply(
            &config,
            &mut self.state,
            &mut self.pinned.tables,
            now_unix_ms(),
        ) {
            Ok(a) => a,
            Err(e) => return Response::err(ErrorKind::Kernel, e.to_string()),
        };
        for iface in &config.node.interfaces {
            if !self.attached.contains(iface) {
                if let Err(e) = self.pinned.attach(iface, config.node.xdp_mode) {
                    return Response::err(ErrorKind::Kernel, e.to_string());
                }
                self.attached.push(iface.clone());
            }
        }
        let removed: Vec<String> = self
            .attached
            .iter()
            .filter(|i| !config.node.interfaces.contains(i))
            .cloned()
            .collect();
        for iface in &removed {
            if let Err(e) = self.pinned.detach(iface) {
                return Response::err(ErrorKind::Kernel, e.to_string());
            }
        }
        self.attached.retain(|i| !removed.contains(i));
        self.config = config;
        self.tokens = tokens;
        self.control.reconfigure(&self.config);
        if let Err(r) = self.save() {
            return r;
        }
        let detail = json!({"config": self.config.source, "applied": applied, "detached": removed});
        if let Err(r) = self.audit(who, "reload", "", detail.clone()) {
            return r;
        }
        info!("reloaded {}", self.config.source);
        Response::ok(detail)
    }

    /// One controller interval: GPUs, hold-back, quotas, anomalies.
    pub fn control_tick(&mut self) {
        self.control.tick(
            &self.config,
            &mut self.state,
            &mut self.pinned.tables,
            &self.audit,
        );
        let mut budget = self.drop_budget;
        crate::metrics::drain_drop_events(self, &mut budget, DROP_LOG_PER_SECOND);
        self.drop_budget = budget;
    }

    /// Expires quarantines and run-time bindings whose time is up.
    pub fn tick(&mut self) {
        self.token_tick();
        let now = now_unix_ms();
        let expired: Vec<String> = self
            .state
            .quarantines
            .iter()
            .filter(|(_, q)| q.until_unix_ms.is_some_and(|u| u <= now))
            .map(|(n, _)| n.clone())
            .collect();
        let stale: Vec<DynBinding> = self
            .state
            .bindings
            .iter()
            .filter(|b| b.expired(now))
            .cloned()
            .collect();
        if expired.is_empty() && stale.is_empty() {
            return;
        }
        for name in &expired {
            self.state.quarantines.remove(name);
            if let Err(e) = self.set_quarantine_flag(name, false) {
                warn!(
                    "releasing {name}: {}",
                    e.error.map(|e| e.message).unwrap_or_default()
                );
            }
            let _ = self.audit(
                &Actor::AGENT,
                "release",
                "quarantine expired",
                json!({"identity": name}),
            );
        }
        for b in &stale {
            // The kernel already ignores it; this frees the slot.
            let _ = self.pinned.tables.unbind(b.addr, b.prefix_len);
            let _ = self.audit(
                &Actor::AGENT,
                "unbind",
                "binding expired",
                json!({"target": format!("{}/{}", b.addr, b.prefix_len), "identity": b.identity}),
            );
        }
        self.state.bindings.retain(|b| !b.expired(now));
        if let Err(r) = self.save() {
            warn!("saving state: {:?}", r.error);
        }
    }

    fn identity_id(&self, name: &str) -> Option<u32> {
        self.state.identity_ids.get(name).copied()
    }

    fn identity_name(&self, id: u32) -> Option<String> {
        self.state
            .identity_ids
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(n, _)| n.clone())
    }

    /// An identity name, or the identity an address is bound to.
    fn resolve_identity(&self, target: &str) -> Result<String, Response> {
        if self.identity_id(target).is_some() {
            return Ok(target.to_owned());
        }
        if let Ok(addr) = target.parse::<IpAddr>() {
            let found = self
                .pinned
                .tables
                .lookup_binding(addr)
                .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))?;
            return match found.and_then(|(_, b)| self.identity_name(b.identity)) {
                Some(n) => Ok(n),
                None => Err(Response::err(
                    ErrorKind::NotFound,
                    format!("{addr} is not bound to any identity"),
                )),
            };
        }
        Err(Response::err(
            ErrorKind::NotFound,
            format!("no identity named {target:?} (and it is not an address)"),
        ))
    }

    fn set_quarantine_flag(&mut self, name: &str, on: bool) -> Result<(), Response> {
        let id = self.identity_id(name).ok_or_else(|| {
            Response::err(ErrorKind::NotFound, format!("no identity named {name:?}"))
        })?;
        let kernel = |e: crate::tables::TableError| Response::err(ErrorKind::Kernel, e.to_string());
        let mut rec = self.pinned.tables.identity(id).map_err(kernel)?;
        if on {
            rec.flags |= tollgate_common::policy::ID_QUARANTINED;
        } else {
            rec.flags &= !tollgate_common::policy::ID_QUARANTINED;
        }
        self.pinned.tables.set_identity(id, &rec).map_err(kernel)
    }

    /// Serves one request from `peer`.
    pub fn handle(&mut self, req: Request, peer: &Peer) -> Response {
        let who = peer.actor();
        match self.handle_inner(req, &who) {
            Ok(r) | Err(r) => r,
        }
    }

    fn handle_inner(&mut self, req: Request, who: &Actor) -> Result<Response, Response> {
        match req {
            Request::Status {} => Ok(Response::ok(self.status()?)),
            Request::Endpoints {} => Ok(Response::ok(self.endpoints()?)),
            Request::Identities {} => Ok(Response::ok(self.identities(None)?)),
            Request::Identity { name } => {
                if self.identity_id(&name).is_none() {
                    return Err(Response::err(
                        ErrorKind::NotFound,
                        format!("no identity named {name:?}"),
                    ));
                }
                Ok(Response::ok(self.identities(Some(&name))?))
            }
            Request::Bind {
                target,
                identity,
                for_secs,
            } => self.bind(who, &target, &identity, for_secs),
            Request::Unbind { target } => self.unbind(who, &target),
            Request::Quarantine {
                target,
                for_secs,
                reason,
            } => {
                if reason.trim().is_empty() {
                    return Err(Response::err(
                        ErrorKind::BadRequest,
                        "a quarantine needs a --reason",
                    ));
                }
                let name = self.resolve_identity(&target)?;
                let now = now_unix_ms();
                let until = for_secs.map(|s| now + s.saturating_mul(1000));
                self.state.quarantines.insert(
                    name.clone(),
                    Quarantine {
                        until_unix_ms: until,
                        since_unix_ms: now,
                        reason: reason.clone(),
                        by: who.describe(),
                    },
                );
                self.save()?;
                self.set_quarantine_flag(&name, true)?;
                let detail = json!({"identity": name, "until_unix_ms": until});
                self.audit(who, "quarantine", &reason, detail.clone())?;
                Ok(Response::ok(detail))
            }
            Request::Release { target, reason } => {
                let name = self.resolve_identity(&target)?;
                if self.state.quarantines.remove(&name).is_none() {
                    return Err(Response::err(
                        ErrorKind::NotFound,
                        format!("{name} is not quarantined"),
                    ));
                }
                self.save()?;
                self.set_quarantine_flag(&name, false)?;
                let detail = json!({"identity": name});
                self.audit(who, "release", &reason, detail.clone())?;
                Ok(Response::ok(detail))
            }
            Request::Explain(probe) => {
                let names = Names { daemon: self };
                explain::explain(&self.pinned.tables, &names, &probe)
                    .map(|e| Response::ok(json!(e)))
                    .map_err(|e| Response::err(ErrorKind::BadRequest, e.to_string()))
            }
            Request::Reload {} => Ok(self.reload(who)),
            Request::QuotaShow { identity } => {
                Ok(Response::ok(self.quota_show(identity.as_deref())?))
            }
            Request::QuotaReset { identity } => {
                let detail = self.quota_reset(identity.as_deref())?;
                self.audit(who, "quota_reset", "operator", detail.clone())?;
                Ok(Response::ok(detail))
            }
            Request::BindToken { token, addr } => self
                .bind_token(&token, addr, who)
                .map(Response::ok)
                .map_err(|f| f.to_response()),
            Request::Revoke {
                token_id,
                identity,
                reason,
            } => self
                .revoke(token_id.as_deref(), identity.as_deref(), &reason, who)
                .map(Response::ok),
            Request::Uninstall {} => {
                self.audit(
                    who,
                    "uninstall",
                    "",
                    json!({"pin_dir": self.config.node.pin_dir}),
                )?;
                let removed = pins::uninstall(&self.config.node.pin_dir)
                    .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))?;
                self.stop = true;
                Ok(Response::ok(json!({"removed": removed})))
            }
        }
    }

    fn bind(
        &mut self,
        who: &Actor,
        target: &str,
        identity: &str,
        for_secs: Option<u64>,
    ) -> Result<Response, Response> {
        let (addr, len) =
            parse_target(target).map_err(|m| Response::err(ErrorKind::BadRequest, m))?;
        let Some(id) = self.identity_id(identity) else {
            return Err(Response::err(
                ErrorKind::NotFound,
                format!("no identity named {identity:?}"),
            ));
        };
        if let Some(owner) = self.static_owner(addr, len) {
            return Err(Response::err(
                ErrorKind::BadRequest,
                format!("{addr}/{len} is bound to {owner} by the configuration; change it there"),
            ));
        }
        if for_secs == Some(0) {
            return Err(Response::err(
                ErrorKind::BadRequest,
                "--for must be at least 1 second",
            ));
        }
        let now = now_unix_ms();
        let expires = for_secs.map(|s| now + s.saturating_mul(1000));
        let exp_ns = policy::expiry_boot_ns(expires, now).unwrap_or(1);
        self.pinned
            .tables
            .bind(addr, len, id, exp_ns)
            .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))?;
        self.state
            .bindings
            .retain(|b| !(b.addr == addr && b.prefix_len == len));
        self.state.bindings.push(DynBinding {
            addr,
            prefix_len: len,
            identity: identity.to_owned(),
            expires_unix_ms: expires,
            created_unix_ms: now,
            by: who.describe(),
            token_id: None,
        });
        self.save()?;
        let detail = json!({"target": format!("{addr}/{len}"), "identity": identity, "expires_unix_ms": expires});
        self.audit(who, "bind", "", detail.clone())?;
        Ok(Response::ok(detail))
    }

    fn unbind(&mut self, who: &Actor, target: &str) -> Result<Response, Response> {
        let (addr, len) =
            parse_target(target).map_err(|m| Response::err(ErrorKind::BadRequest, m))?;
        if let Some(owner) = self.static_owner(addr, len) {
            return Err(Response::err(
                ErrorKind::BadRequest,
                format!("{addr}/{len} is bound to {owner} by the configuration; change it there"),
            ));
        }
        let before = self.state.bindings.len();
        self.state
            .bindings
            .retain(|b| !(b.addr == addr && b.prefix_len == len));
        if self.state.bindings.len() == before {
            return Err(Response::err(
                ErrorKind::NotFound,
                format!("no run-time binding for {addr}/{len}"),
            ));
        }
        match self.pinned.tables.unbind(addr, len) {
            Ok(()) | Err(crate::tables::TableError::NoBinding(_)) => {}
            Err(e) => return Err(Response::err(ErrorKind::Kernel, e.to_string())),
        }
        self.save()?;
        let detail = json!({"target": format!("{addr}/{len}")});
        self.audit(who, "unbind", "", detail.clone())?;
        Ok(Response::ok(detail))
    }

    fn quota_show(&self, only: Option<&str>) -> Result<serde_json::Value, Response> {
        use crate::controller::quota::Window;
        if let Some(n) = only
            && self.identity_id(n).is_none()
        {
            return Err(Response::err(
                ErrorKind::NotFound,
                format!("no identity named {n:?}"),
            ));
        }
        let mut rows = Vec::new();
        for (name, spent) in &self.control.quotas.spent {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let plan = crate::controller::control_loop::plan_of(&self.config, &self.state, name);
            let limits = plan
                .and_then(|p| self.config.plan(p))
                .map(|p| p.quota)
                .unwrap_or_default();
            let w = |win: Window, lb: Option<u64>, lc: Option<u64>| {
                let (b, c) = spent.get(win);
                json!({"bytes": b, "bytes_limit": lb, "cost": c, "cost_limit": lc, "ends_unix": spent.window_ends(win)})
            };
            rows.push(json!({
                "identity": name,
                "plan": plan,
                "minute": w(Window::Minute, limits.minute_bytes, limits.minute_cost),
                "day": w(Window::Day, limits.day_bytes, limits.day_cost),
                "month": w(Window::Month, limits.month_bytes, limits.month_cost),
            }));
        }
        Ok(json!(rows))
    }

    fn quota_reset(&mut self, only: Option<&str>) -> Result<serde_json::Value, Response> {
        if let Some(n) = only
            && self.identity_id(n).is_none()
        {
            return Err(Response::err(
                ErrorKind::NotFound,
                format!("no identity named {n:?}"),
            ));
        }
        self.control.quotas.reset(only);
        self.control
            .quotas
            .save(&self.config.node.state_dir)
            .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))?;
        let ids: Vec<u32> = match only {
            Some(n) => self.identity_id(n).into_iter().collect(),
            None => self.state.identity_ids.values().copied().collect(),
        };
        for id in ids {
            self.pinned
                .tables
                .update_identity_flags(id, 0, tollgate_common::policy::ID_QUOTA_EXHAUSTED, None)
                .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))?;
        }
        self.control.forget_exhausted(only);
        Ok(json!({"identity": only, "reset": true}))
    }

    fn static_owner(&self, addr: IpAddr, len: u8) -> Option<String> {
        self.config
            .identities
            .iter()
            .find(|i| i.bind.contains(&(addr, len)))
            .map(|i| i.name.clone())
    }

    fn status(&self) -> Result<serde_json::Value, Response> {
        let totals = crate::counters::reason_totals(self.pinned.tables.reason_counters())
            .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))?;
        let (mut passed, mut dropped) = (0u64, 0u64);
        for (r, c) in &totals {
            if r.verdict() == tollgate_common::Verdict::Pass {
                passed += c.packets;
            } else {
                dropped += c.packets;
            }
        }
        let bindings: usize = self.pinned.tables.binding_counts().iter().sum();
        Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config": self.config.source,
            "interfaces": self.attached,
            "xdp_mode": self.config.node.xdp_mode.label(),
            "pin_dir": self.config.node.pin_dir,
            "adopted_pins": self.pinned.adopted,
            "layout_version": tollgate_common::LAYOUT_VERSION,
            "uptime_s": (now_unix_ms() - self.started_unix_ms) / 1000,
            "endpoints": self.config.endpoints.len(),
            "identities": self.state.identity_ids.len(),
            "bindings": bindings,
            "quarantined": self.state.quarantines.keys().collect::<Vec<_>>(),
            "packets_passed": passed,
            "packets_dropped": dropped,
            "gpu": json!({
                "source": format!("{:?}", self.config.controller.gpu_source).to_lowercase(),
                "error": self.control.gpu_error,
                "readings": self.control.readings,
                "saturated_endpoints": self.control.saturated(&self.config),
            }),
            "anomaly_mode": format!("{:?}", self.config.anomaly.mode).to_lowercase(),
            "tokens": self.tokens.as_ref().map(|t| json!({
                "keys": t.keys.kids(),
                "verifications": t.results,
                "probable_thefts": t.thefts,
            })),
        }))
    }

    fn endpoints(&self) -> Result<serde_json::Value, Response> {
        let per = crate::counters::reason_endpoint_totals(self.pinned.tables.reason_counters())
            .map_err(|e| Response::err(ErrorKind::Kernel, e.to_string()))?;
        let rows: Vec<serde_json::Value> = self
            .config
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| {
                let id = i as u32 + 1;
                let (mut passed, mut dropped) = (0u64, 0u64);
                for (r, e, c) in &per {
                    if *e == id {
                        if r.verdict() == tollgate_common::Verdict::Pass {
                            passed += c.packets;
                        } else {
                            dropped += c.packets;
                        }
                    }
                }
                json!({
                    "id": id,
                    "name": ep.name,
                    "protocol": ep.spec.proto,
                    "ports": ep.port_ranges.iter().map(|r| if r.start() == r.end() { r.start().to_string() } else { format!("{}-{}", r.start(), r.end()) }).collect::<Vec<_>>(),
                    "weight": ep.spec.weight,
                    "classes": ep.spec.allowed_classes.iter().map(|c| c.label()).collect::<Vec<_>>(),
                    "roles": ep.role_names,
                    "anonymous": ep.spec.anonymous,
                    "packets_passed": passed,
                    "packets_dropped": dropped,
                })
            })
            .collect();
        Ok(json!(rows))
    }

    fn identities(&self, only: Option<&str>) -> Result<serde_json::Value, Response> {
        let kernel = |e: crate::tables::TableError| Response::err(ErrorKind::Kernel, e.to_string());
        let now_boot = boot_ns();
        // Bindings grouped by identity once: listing thousands of identities stays linear.
        let mut by_id: std::collections::HashMap<u32, Vec<String>> =
            std::collections::HashMap::new();
        for (a, l, b) in self.pinned.tables.bindings().map_err(kernel)? {
            let net = mask(a, l);
            let text = if b.expires_ns == 0 {
                format!("{net}/{l}")
            } else if b.expires_ns > now_boot {
                format!(
                    "{net}/{l} (expires in {}s)",
                    (b.expires_ns - now_boot) / 1_000_000_000
                )
            } else {
                format!("{net}/{l} (expired)")
            };
            by_id.entry(b.identity).or_default().push(text);
        }
        let mut rows = Vec::new();
        for (name, id) in &self.state.identity_ids {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            // Configured identities, and those that exist because a token named them.
            let (class, plan, roles, source) = match self.config.identity(name) {
                Some(i) => (
                    i.class.label().to_owned(),
                    i.plan.clone(),
                    i.role_names.clone(),
                    "config",
                ),
                None => match self.state.token_identities.get(name) {
                    Some(t) => (t.class.clone(), t.plan.clone(), t.roles.clone(), "token"),
                    None => continue,
                },
            };
            let c = self.pinned.tables.identity_counters(*id).map_err(kernel)?;
            let q = self.state.quarantines.get(name);
            rows.push(json!({
                "id": id,
                "name": name,
                "class": class,
                "plan": plan,
                "roles": roles,
                "source": source,
                "bindings": by_id.remove(id).unwrap_or_default(),
                "quarantined": q.map(|q| json!({"reason": q.reason, "until_unix_ms": q.until_unix_ms, "by": q.by})),
                "passed_packets": c.passed.packets,
                "passed_bytes": c.passed.bytes,
                "dropped_packets": c.dropped.packets,
                "dropped_bytes": c.dropped.bytes,
            }));
        }
        rows.sort_by_key(|r| r["id"].as_u64());
        Ok(match only {
            Some(_) => rows.into_iter().next().unwrap_or_default(),
            None => json!(rows),
        })
    }
}

struct Names<'a> {
    daemon: &'a Daemon,
}

impl explain::Names for Names<'_> {
    fn endpoint(&self, id: u32) -> Option<String> {
        self.daemon
            .config
            .endpoints
            .get(id.checked_sub(1)? as usize)
            .map(|e| e.name.clone())
    }
    fn identity(&self, id: u32) -> Option<String> {
        self.daemon.identity_name(id)
    }
}

/// "198.18.0.5" (a /32 or /128) or "198.18.0.0/24"; host bits must be zero.
pub fn parse_target(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = crate::tables::host_len(addr);
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
    };
    if mask(addr, len) != addr {
        return Err(format!(
            "{s:?} has host bits set (did you mean {}/{len}?)",
            mask(addr, len)
        ));
    }
    Ok((addr, len))
}

/// Runs the daemon until SIGINT/SIGTERM or `tollgate uninstall`.
pub fn run(opts: Options) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| io_err("starting the runtime", e))?;
    // One thread: connections are read concurrently (a slow client cannot hold up another),
    // but each request is handled to the end before the next, so state needs no locks.
    let local = tokio::task::LocalSet::new();
    rt.block_on(local.run_until(serve(opts)))
}

async fn serve(opts: Options) -> Result<(), DaemonError> {
    let detach_on_exit = opts.detach_on_exit;
    let daemon = Rc::new(RefCell::new(Daemon::start(opts)?));
    let (socket, group, attached) = {
        let d = daemon.borrow();
        (
            d.config.node.control_socket.clone(),
            d.config.node.control_group.clone(),
            d.attached.clone(),
        )
    };
    let listener = bind_socket(&socket, &group)?;
    let metrics_addr = daemon.borrow().config.listen.metrics;
    match crate::metrics::bind(metrics_addr).await {
        Ok(tcp) => {
            info!(%metrics_addr, "metrics: http://{metrics_addr}/metrics");
            tokio::task::spawn_local(crate::metrics::serve(Rc::clone(&daemon), tcp));
        }
        // Enforcement does not depend on being watched: say so and go on.
        Err(e) => warn!("metrics listener on {metrics_addr}: {e}; serving no metrics"),
    }
    let token_listener = daemon.borrow().config.tokens.clone();
    if let Some(t) = token_listener {
        let tls = crate::bind_listener::acceptor(&t.tls_cert, &t.tls_key)?;
        let addr = daemon.borrow().config.listen.bind;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| io_err(format!("bind listener on {addr}"), e))?;
        info!(%addr, "bind listener: https://{addr}/v1/bind");
        tokio::task::spawn_local(crate::bind_listener::serve(Rc::clone(&daemon), tcp, tls));
    }
    info!(
        socket = %socket.display(),
        interfaces = ?attached,
        "attached; enforcing until SIGINT/SIGTERM"
    );
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| io_err("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| io_err("SIGINT handler", e))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| io_err("SIGHUP handler", e))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let interval_ms = daemon.borrow().config.controller.interval_ms;
    let mut control = tokio::time::interval(Duration::from_millis(interval_ms));
    control.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = Rc::new(tokio::sync::Notify::new());
    while !daemon.borrow().stop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = stopped.notified() => {}
            _ = hup.recv() => {
                let r = daemon.borrow_mut().reload(&Actor::SIGNAL);
                if !r.ok {
                    warn!("SIGHUP reload refused: {}", r.error.map(|e| e.message).unwrap_or_default());
                }
            }
            _ = tick.tick() => daemon.borrow_mut().tick(),
            _ = control.tick() => daemon.borrow_mut().control_tick(),
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let d = Rc::clone(&daemon);
                    let s = Rc::clone(&stopped);
                    tokio::task::spawn_local(async move {
                        serve_connection(&d, stream).await;
                        if d.borrow().stop {
                            s.notify_one();
                        }
                    });
                }
                Err(e) => warn!("control socket: {e}"),
            },
        }
    }
    let _ = std::fs::remove_file(&socket);
    let d = daemon.borrow();
    if detach_on_exit && !d.stop {
        let removed = pins::uninstall(&d.config.node.pin_dir)?;
        info!(
            pins = removed.len(),
            "detached and removed pins (--detach-on-exit)"
        );
    } else if d.stop {
        info!("uninstalled: detached and removed pins");
    } else {
        info!("stopping; the program stays attached with the last policy");
    }
    Ok(())
}

fn bind_socket(path: &Path, group: &str) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir.display().to_string(), e))?;
    }
    // A socket left by a killed agent: nobody answers on it, so it can go.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io_err(
            path.display().to_string(),
            "another agent is already serving this control socket",
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| io_err(path.display().to_string(), e))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| io_err(path.display().to_string(), e))?;
    if let Some(gid) = peer::group_gid(group) {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| io_err(path.display().to_string(), e))?;
    } else {
        warn!("group {group} does not exist: the control socket is root-only");
    }
    Ok(listener)
}

async fn serve_connection(daemon: &RefCell<Daemon>, stream: tokio::net::UnixStream) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(e) => {
            warn!("control socket: no peer credentials: {e}");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    // The request is read (bounded in size and time) before the peer is judged, so that a
    // refused client reads its refusal instead of a reset connection.
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let group = daemon.borrow().config.node.control_group.clone();
    let answer = match peer::authorize(&peer, &group) {
        Err(why) => {
            warn!("{why}");
            Response::err(ErrorKind::Refused, why)
        }
        Ok(()) => match read {
            Err(_) => Response::err(ErrorKind::BadRequest, "no request within 5 s"),
            Ok(Err(e)) => Response::err(ErrorKind::BadRequest, format!("reading the request: {e}")),
            Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Response::err(
                ErrorKind::BadRequest,
                format!("request over {MAX_REQUEST_BYTES} bytes"),
            ),
            Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim_end()) {
                Ok(req) => daemon.borrow_mut().handle(req, &peer),
                Err(e) => Response::err(ErrorKind::BadRequest, format!("malformed request: {e}")),
            },
        },
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    let _ = tokio::time::timeout(Duration::from_secs(5), write.write_all(&out)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("198.18.0.5"),
            Ok(("198.18.0.5".parse().unwrap(), 32))
        );
        assert_eq!(
            parse_target("198.18.0.0/24"),
            Ok(("198.18.0.0".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_target("2001:db8::/32"),
            Ok(("2001:db8::".parse().unwrap(), 32))
        );
        assert!(
            parse_target("198.18.0.5/24")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(
            parse_target("198.18.0.0/33")
                .unwrap_err()
                .contains("0..=32")
        );
        assert!(parse_target("batch").unwrap_err().contains("not an IP"));
    }
}
