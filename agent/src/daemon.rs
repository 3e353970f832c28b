//! `tollgate run`: loads the configuration, adopts or creates the pinned state, applies the
//! policy, attaches, and serves the control socket until SIGINT/SIGTERM. SIGHUP reloads.
//! This module starts the node, reloads it and runs the event loop; what can be done to a
//! node is `ops`', the servers are `servers`'.
//!
//! Stopping the daemon leaves the program attached with the last policy (the kernel checks
//! binding expiry itself); `tollgate uninstall` is what removes it. `--detach-on-exit` gives
//! the old behaviour for ad-hoc runs.

use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    rc::Rc,
    time::Duration,
};

use serde_json::json;
use tracing::{info, warn};

use crate::{
    audit::{Actor, Audit},
    config::Config,
    control::reply::Reloaded,
    control_loop::ControlLoop,
    drop_events::{self, DropEventStats, LogBudget},
    loader::{AttachMode, KernelLog},
    node::Node,
    ops::{self, Change, Done, Failed, Lifecycle, OpError},
    pins::{self, Pinned},
    policy_apply, servers,
    state::{State, now_unix_ms},
    token_bind::TokenService,
    tunnels::{self, Tunnels},
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
    Policy(#[from] policy_apply::PolicyError),
    #[error("{0}")]
    Keys(#[from] crate::token_bind::KeysError),
    #[error("{0}")]
    Listener(#[from] servers::bind::ListenerError),
    #[error("{0}")]
    Capabilities(String),
    #[error("{0}")]
    Tunnels(String),
    #[error("{0}")]
    Fleet(String),
    #[error("{what}: {message}")]
    Io { what: String, message: String },
}

fn io_err(what: impl Into<String>, e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Io {
        what: what.into(),
        message: e.to_string(),
    }
}

impl From<servers::control::SocketError> for DaemonError {
    fn from(e: servers::control::SocketError) -> DaemonError {
        io_err(e.path, e.message)
    }
}

/// Loads the configuration the options name: an explicit file must exist; without one the
/// default path is used if present, else the embedded default (a first run).
pub fn load_config(opts: &Options) -> Result<Config, crate::config::ConfigError> {
    // Parsed apart and kept as a compact copy (`heap`): 100 000 identities stay small.
    crate::heap::built_apart(|| read_config(opts))
}

fn read_config(opts: &Options) -> Result<Config, crate::config::ConfigError> {
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

/// Builds the node: configuration, keys, pins, state, policy, attachments; and the fleet
/// task, when the node is in a pool, for `serve` to run.
pub fn start(opts: &Options) -> Result<(Node, Option<crate::fleet::task::Task>), DaemonError> {
    let config = load_config(opts)?;
    if let Some(why) = crate::caps::refusal(crate::caps::effective()) {
        return Err(DaemonError::Capabilities(why));
    }
    // Keys before anything is touched: a broken JWKS is a configuration error.
    // The usage feed's secret, read before anything is touched: a listener with a short or
    // unreadable secret does not start.
    let usage_secret = usage_secret(&config).map_err(|e| io_err("usage.secret_file", e))?;
    let tokens = match &config.tokens {
        Some(t) => Some(TokenService::new(t, &config.node.state_dir, None)?),
        None => None,
    };
    let control = ControlLoop::new(&config).map_err(|e| io_err("quota state", e))?;
    // The pool's files (key, credentials, cursor, outbox) before anything is touched, too.
    let (fleet, fleet_task) = match &config.fleet {
        Some(f) => {
            let (link, task) =
                crate::fleet::link::open(f, &config.node.state_dir).map_err(DaemonError::Fleet)?;
            (Some(link), Some(task))
        }
        None => (None, None),
    };
    let mut pinned = match Pinned::open(
        &config.node.pin_dir,
        config.node.kernel_log,
        &config.limits.sizes,
    ) {
        Ok(p) => p,
        // A program the kernel refused (an upgrade that does not verify): nothing was
        // detached, the old program keeps enforcing; recorded for the agent that runs next.
        Err(e @ pins::PinError::Load { .. }) => {
            let dir = &config.node.state_dir;
            if let Err(w) = crate::object::record_load_failure(dir, &e.to_string(), now_unix_ms()) {
                warn!(
                    "recording the failed program load in {}: {w}",
                    dir.display()
                );
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    if pinned.kernel_log != KernelLog::Off {
        info!(
            level = pinned.kernel_log.label(),
            "kernel log: the program's rare-event lines go to target `kernel`"
        );
    }
    // Before anything is attached: `tollgate uninstall` finds this agent by its pin directory.
    pinned.claim(&config.node.control_socket)?;
    let mut state = State::load(&config.node.state_dir)?;
    let audit =
        Audit::open_bounded(&config.node.state_dir, config.node.audit_max_bytes).map_err(|e| {
            io_err(
                format!("audit log in {}", config.node.state_dir.display()),
                e,
            )
        })?;
    let applied = policy_apply::apply(&config, &mut state, &mut pinned.tables, now_unix_ms())?;
    // A full (or read-only) state disk does not stop enforcement: the kernel holds the
    // policy just applied. What cannot be made durable is refused later, change by change.
    if let Err(e) = state.save(&config.node.state_dir) {
        warn!(
            "saving the state: {e}; enforcing anyway, but changes that must be saved \
             (binds, quarantines, revocations) will be refused until it can be"
        );
    }
    // Tunnel devices first: a refusal attaches nothing more, and their link pins are theirs,
    // not stale ones of unconfigured interfaces.
    let (tunnels, tunnel_events) =
        Tunnels::start(config.node.tunnels, &mut pinned, &config.node.interfaces)
            .map_err(DaemonError::Tunnels)?;
    let mut attached = Vec::new();
    for iface in &config.node.interfaces {
        let program = tunnels::program_for(iface).map_err(|message| pins::PinError::Attach {
            iface: iface.clone(),
            message,
        })?;
        let adopted = pinned.attach_program(iface, config.node.xdp_mode, program)?;
        info!(
            iface,
            adopted,
            mode = config.node.xdp_mode.label(),
            "attached"
        );
        attached.push(iface.clone());
    }
    for old in pins::pinned_interfaces(&config.node.pin_dir) {
        if !attached.contains(&old) && !tunnels.covered_names().contains(&old) {
            pinned.detach(&old)?;
            info!(iface = old, "detached: no longer configured");
        }
    }
    // Every pinned link has the new program now: a size change can end.
    let resized = pinned.finish_migration()?;
    for r in &resized {
        info!(map = r.map, from = r.from, to = r.to, "table size changed");
    }
    if let Err(e) = audit.record(
        &Actor::AGENT,
        "start",
        "",
        json!({
            "config": config.source,
            "adopted_pins": pinned.adopted,
            "resized": resized
                .iter()
                .map(|r| json!({"map": r.map, "from": r.from, "to": r.to}))
                .collect::<Vec<_>>(),
            "interfaces": attached,
            "applied": applied,
        }),
    ) {
        warn!("audit log: recording the start: {e}; enforcing anyway");
    }
    record_tunnel_events(&audit, tunnel_events);
    // Loading the program and applying a large policy leave freed pages behind.
    crate::heap::release_freed_memory();
    let node = Node {
        config,
        pinned,
        state,
        audit,
        tokens,
        fleet,
        control,
        drop_stats: DropEventStats::default(),
        attached,
        tunnels,
        started_unix_ms: now_unix_ms(),
        uninstalled: false,
        usage: crate::usage::Feed::with_secret(usage_secret),
    };
    Ok((node, fleet_task))
}

/// The usage feed's secret, if `[usage] secret_file` names one.
fn usage_secret(config: &Config) -> Result<Option<Vec<u8>>, String> {
    config
        .usage
        .secret_file
        .as_deref()
        .map(crate::usage::read_secret)
        .transpose()
}

/// Reloads the configuration `opts` names: a file that fails validation changes nothing.
pub fn reload(opts: &Options, node: &mut Node) -> Result<Done<Reloaded>, Failed> {
    let refused = |e: String| {
        let change = Change::new("reload_refused", e.clone(), json!({}));
        Failed::audited(OpError::Config(e), change)
    };
    let config = match load_config(opts) {
        Ok(c) => c,
        Err(e) => {
            warn!("reload refused: {e}");
            return Err(refused(e.to_string()));
        }
    };
    let tls = |c: &Config| {
        c.tokens
            .as_ref()
            .map(|t| (t.tls_cert.clone(), t.tls_key.clone()))
    };
    let old = &node.config;
    if config.node.pin_dir != old.node.pin_dir
        || config.node.state_dir != old.node.state_dir
        || config.node.control_socket != old.node.control_socket
        || config.listen.bind != old.listen.bind
        || config.usage.listen != old.usage.listen
        || tls(&config) != tls(old)
        || config.fleet != old.fleet
    {
        return Err(OpError::Config(
            "node.pin_dir, node.state_dir, node.control_socket, listen.bind, usage.listen, \
             the TLS files and [fleet] take effect only on restart"
                .into(),
        )
        .into());
    }
    // New sizes mean new maps and a program swap: the start does that (pins::resize).
    if config.limits.sizes != old.limits.sizes {
        return Err(OpError::Config(format!(
            "[limits] changes the kernel tables' sizes ({}): restart the agent to migrate \
             them (entries, budgets and counters are carried over, the program never leaves \
             the interfaces; docs/operations.md)",
            crate::sizes::Group::ALL
                .iter()
                .filter(|g| config.limits.sizes.get(**g) != old.limits.sizes.get(**g))
                .map(|g| format!(
                    "{} {} -> {}",
                    g.key(),
                    old.limits.sizes.get(*g),
                    config.limits.sizes.get(*g)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into());
    }
    // The level is a constant of the loaded program: say once that it waits for a restart.
    if config.node.kernel_log != node.pinned.kernel_log {
        warn!(
            running = node.pinned.kernel_log.label(),
            configured = config.node.kernel_log.label(),
            "node.kernel_log takes effect only on restart"
        );
    }
    if config.node.tunnels != old.node.tunnels {
        warn!(
            running = old.node.tunnels.label(),
            configured = config.node.tunnels.label(),
            "node.tunnels takes effect only on restart"
        );
    }
    // The issuers are rebuilt: a key file that does not parse refuses the whole reload; an
    // issuer whose source is unchanged keeps its keys (a reload refetches nothing), and
    // every tally carries over.
    let tokens = match &config.tokens {
        Some(t) => match TokenService::new(t, &config.node.state_dir, node.tokens.as_ref()) {
            Ok(svc) => Some(svc),
            Err(e) => return Err(refused(e.to_string())),
        },
        None => None,
    };
    // A secret file that went short or unreadable refuses the reload: the old one stays.
    let usage_secret = match usage_secret(&config) {
        Ok(s) => s,
        Err(e) => return Err(refused(format!("usage.secret_file: {e}"))),
    };
    let kernel = |e: &dyn std::fmt::Display| Failed::from(OpError::Kernel(e.to_string()));
    // What the new configuration does to the state (slots, bindings of identities that
    // went) is recorded before the kernel changes: a reload that cannot be recorded changes
    // nothing, and one that was reported is what a restart restores.
    let now = now_unix_ms();
    let mut next = node.state.clone();
    let settled = policy_apply::settle(&config, &mut next, now).map_err(|e| kernel(&e))?;
    let entries = node.state.entries_to(&next);
    if (!entries.is_empty() || next.has_unrecorded())
        && let Err(e) = next.record(&config.node.state_dir, entries)
    {
        node.state.keep_disk_of(&next);
        return Err(ops::not_recorded(e).into());
    }
    node.state = next;
    let applied =
        policy_apply::enforce(&config, &node.state, &mut node.pinned.tables, settled, now)
            .map_err(|e| kernel(&e))?;
    for iface in &config.node.interfaces {
        if !node.attached.contains(iface) {
            let program = tunnels::program_for(iface).map_err(|e| kernel(&e))?;
            node.pinned
                .attach_program(iface, config.node.xdp_mode, program)
                .map_err(|e| kernel(&e))?;
            node.attached.push(iface.clone());
        }
    }
    let removed: Vec<String> = node
        .attached
        .iter()
        .filter(|i| !config.node.interfaces.contains(i))
        .cloned()
        .collect();
    for iface in &removed {
        node.pinned.detach(iface).map_err(|e| kernel(&e))?;
    }
    node.attached.retain(|i| !removed.contains(i));
    node.config = config;
    let old_tokens = std::mem::replace(&mut node.tokens, tokens);
    if let Some(svc) = node.tokens.as_mut() {
        if let Some(old) = old_tokens {
            svc.adopt(old);
        }
        svc.spawn_refreshers();
    }
    node.control.reconfigure(&node.config);
    node.usage.secret = usage_secret;
    info!("reloaded {}", node.config.source);
    let reply = Reloaded {
        config: node.config.source.clone(),
        applied,
        detached: removed,
    };
    let change = Change::new("reload", "", &reply);
    Ok(Done::changed(reply, change))
}

/// The control socket's view of the process: reload with the options it was started with.
struct Process {
    opts: Options,
}

impl Lifecycle for Process {
    fn reload(&self, node: &mut Node, _who: &Actor) -> Result<Done<Reloaded>, Failed> {
        reload(&self.opts, node)
    }
}

/// Writes the agent's own audit records (expiry, key rotation); a record that cannot be
/// written is logged.
fn record_agent(node: &Node, changes: Vec<Change>) {
    for c in changes {
        let r: Result<(), OpError> = ops::audited(node, &Actor::AGENT, Ok(Done::changed((), c)));
        if let Err(e) = r {
            warn!("{e}");
        }
    }
}

/// Audits what changed among the tunnel devices (`tunnel_attached`, `tunnel_uncovered`,
/// `tunnel_gone`).
fn record_tunnel_events(audit: &Audit, events: Vec<tunnels::Event>) {
    for e in events {
        let (action, detail) = e.audit();
        if let Err(err) = audit.record(&Actor::AGENT, action, "", detail) {
            warn!("audit log: recording {action}: {err}");
        }
    }
}

/// Once a second: tunnel devices, token housekeeping, then quarantines and run-time bindings
/// whose time is up; every `reconcile::INTERVAL` the kernel's tables are compared with the
/// policy.
fn tick(node: &mut Node) {
    // After an uninstall the pins are gone on purpose: attach nothing again.
    if !node.uninstalled {
        let events = node
            .tunnels
            .rescan(&mut node.pinned, &node.config.node.interfaces);
        record_tunnel_events(&node.audit, events);
    }
    if let Err(e) = node.audit.flush_suppressed() {
        warn!("audit log: {e}");
    }
    let now = now_unix_ms();
    let changes = ops::tokens::housekeeping(node, now);
    record_agent(node, changes);
    let now = now_unix_ms();
    let mut changes = ops::quarantine::expire(node, now);
    changes.extend(ops::bindings::expire(node, now));
    if !changes.is_empty() {
        record_agent(node, changes);
        // Expiries are the agent's own: if they cannot be recorded now they wait for the next
        // record, and a restart before it derives them again from the stored deadlines.
        if node.state.has_unrecorded()
            && let Err(e) = node.record(Vec::new())
        {
            warn!("recording expiries: {e}");
        }
    }
    // After the expiries, at the same agent time: what just expired is not drift.
    crate::reconcile::tick(node, now);
}

/// One controller interval: GPUs, hold-back, quotas, anomalies; then the drop events.
fn control_tick(node: &mut Node, budget: &mut LogBudget) {
    node.control.tick(
        &node.config,
        &mut node.state,
        &mut node.pinned.tables,
        &node.audit,
    );
    drop_events::drain(
        node.pinned.drop_events.as_mut(),
        &node.config.endpoints,
        &node.drop_stats,
        budget,
        DROP_LOG_PER_SECOND,
    );
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
    // Descriptors first: connections are capped under the limit, keeping a reserve free.
    let fd_limit = match servers::limit::raise_fd_limit() {
        Ok((soft, hard)) => {
            info!(soft, hard, "descriptor limit (RLIMIT_NOFILE)");
            soft
        }
        Err(e) => {
            warn!("reading the descriptor limit: {e}; assuming 1024");
            1024
        }
    };
    let (control_max, metrics_max, bind_max) = servers::limit::caps(fd_limit);
    info!(
        control = control_max,
        metrics = metrics_max,
        bind = bind_max,
        bind_per_source = servers::limit::BIND_PER_SOURCE,
        reserve = servers::limit::RESERVE,
        "connection caps"
    );
    let (node, fleet_task) = start(&opts)?;
    let node = Rc::new(RefCell::new(node));
    if let Some(task) = fleet_task {
        info!(
            pool = node.borrow().fleet.as_ref().map(|l| l.pool.clone()),
            "fleet: sharing bindings, revocations and quarantines with the pool"
        );
        tokio::task::spawn_local(crate::fleet::task::run(Rc::clone(&node), task));
    }
    // The issuers' keys refresh in the background from now on (remote ones fetch at once).
    if let Some(svc) = node.borrow_mut().tokens.as_mut() {
        svc.spawn_refreshers();
    }
    let process = Rc::new(Process { opts });
    let (socket, group, attached, metrics_addr, token_listener, interval_ms) = {
        let n = node.borrow();
        (
            n.config.node.control_socket.clone(),
            n.config.node.control_group.clone(),
            n.attached.clone(),
            n.config.listen.metrics,
            n.config.tokens.clone(),
            n.config.controller.interval_ms,
        )
    };
    let listener = servers::control::bind(&socket, &group)?;
    match servers::metrics::bind(metrics_addr).await {
        Ok(tcp) => {
            info!(%metrics_addr, "metrics: http://{metrics_addr}/metrics");
            tokio::task::spawn_local(servers::metrics::serve(Rc::clone(&node), tcp, metrics_max));
        }
        // Enforcement does not depend on being watched: say so and go on.
        Err(e) => warn!("metrics listener on {metrics_addr}: {e}; serving no metrics"),
    }
    if let Some(t) = token_listener {
        let tls = servers::bind::acceptor(&t.tls_cert, &t.tls_key)?;
        let addr = node.borrow().config.listen.bind;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| io_err(format!("bind listener on {addr}"), e))?;
        info!(%addr, "bind listener: https://{addr}/v1/bind");
        tokio::task::spawn_local(servers::bind::serve(Rc::clone(&node), tcp, tls, bind_max));
    }
    let usage_listen = node.borrow().config.usage.listen;
    if let Some(addr) = usage_listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| io_err(format!("usage listener on {addr}"), e))?;
        info!(%addr, "usage feed: http://{addr}/v1/usage");
        // Capped as the metrics listener: a local sender, one request per connection.
        tokio::task::spawn_local(servers::usage::serve(Rc::clone(&node), tcp, metrics_max));
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
    let mut tick_timer = tokio::time::interval(Duration::from_secs(1));
    let mut control = tokio::time::interval(Duration::from_millis(interval_ms));
    control.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut budget = LogBudget::default();
    let stopped = Rc::new(tokio::sync::Notify::new());
    let life: Rc<dyn Lifecycle> = Rc::clone(&process) as Rc<dyn Lifecycle>;
    tokio::task::spawn_local(servers::control::serve(
        Rc::clone(&node),
        life,
        listener,
        control_max,
        Rc::clone(&stopped),
    ));
    while !node.borrow().uninstalled {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = stopped.notified() => {}
            _ = hup.recv() => {
                let mut n = node.borrow_mut();
                let r = reload(&process.opts, &mut n);
                if let Err(e) = ops::audited(&n, &Actor::SIGNAL, r) {
                    warn!("SIGHUP reload refused: {e}");
                }
            }
            _ = tick_timer.tick() => tick(&mut node.borrow_mut()),
            _ = control.tick() => control_tick(&mut node.borrow_mut(), &mut budget),
        }
    }
    let _ = std::fs::remove_file(&socket);
    let mut n = node.borrow_mut();
    // A clean stop folds the journal into the snapshot: the next start reads one file, and
    // an older agent (which knows no journal) finds everything in it and may read it.
    if !n.uninstalled
        && let Err(e) = n.save_state_folded()
    {
        warn!("compacting the state at stop: {e}; the journal keeps the changes");
    }
    if detach_on_exit && !n.uninstalled {
        let removed = pins::uninstall(&n.config.node.pin_dir)?;
        info!(
            pins = removed.len(),
            "detached and removed pins (--detach-on-exit)"
        );
    } else if n.uninstalled {
        info!("uninstalled: detached and removed pins");
    } else {
        info!("stopping; the program stays attached with the last policy");
    }
    Ok(())
}
