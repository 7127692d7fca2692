//! The live view of the backends: health and pooled connections.
//!
//! A [`Cluster`] owns one [`Slot`] per configured backend. Each slot has a
//! health checker thread (a dedicated connection asking STATUS every
//! `health_interval_ms`) and a bounded pool of authenticated connections
//! that callers [`checkout`](Cluster::checkout) and
//! [`release`](PooledConn::release). A connection that saw an error is never
//! returned to the pool: dropping a [`PooledConn`] closes it.
//!
//! When the health checker marks a backend down, every connection in use to
//! it is interrupted (`shutdown(2)` through a registry of in-use sockets per
//! backend): a request waiting on a backend that went silent (a partition
//! drops packets, no RST comes) fails within one health check
//! (`health_interval_ms + health_timeout_ms`), so its transaction fails over
//! or gets a temporary error, instead of waiting `io_timeout_ms`, which must
//! stay long for honest slow fsyncs.
//!
//! Every backend's round-trip latency is kept as an EWMA
//! ([`LATENCY_EWMA_WEIGHT_PERCENT`] for each new sample) of what the cluster
//! times itself (each health check's STATUS, each PING of an idle connection)
//! and what callers report through [`observe_latency`](Cluster::observe_latency)
//! (powersmtp: the end of a PUT to its durable reply). With the number of
//! connections checked out (in flight) it bends [`select_writable`](Cluster::select_writable)
//! toward fast, unloaded backends and orders the holders a read tries
//! ([`read_order`](Cluster::read_order)). The health check keeps the estimate
//! of a backend fresh even when it gets no traffic.
//!
//! An operator can [`disable`](Cluster::set_disabled) a backend at run time (admin
//! `POST /control/disable?backend=NAME`, `ppadmin disable`): it is then never chosen for
//! new messages, whatever its health. Reads still use it while it answers, on purpose:
//! disabling is how a backend is taken out of the write path before a drain, and its
//! messages must stay visible until they have been copied elsewhere.

use std::collections::HashMap;
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use powermail_proto::{BackendConn, BackendError, ErrorCode};

use crate::config::{BackendSpec, PoolConfig};
use crate::select::{select, Candidate};

/// Index of a backend in the configured list.
pub type BackendId = usize;

/// How much of a backend's latency EWMA one new sample makes up, in percent.
pub const LATENCY_EWMA_WEIGHT_PERCENT: u64 = 20;
/// A latency sample above this is taken as this: one stalled request must
/// not make a backend look slow for minutes.
pub const LATENCY_SAMPLE_MAX_US: u64 = 10_000_000;

/// What the health checker last saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet.
    Unknown,
    /// Answering and accepting new messages.
    Up,
    /// Answering, serving reads, refusing new messages.
    ReadOnly,
    /// Not answering (or answering nonsense).
    Down,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// `open_max_per_backend` connections are in use and none came back in time.
    #[error("backend {0}: connection pool exhausted")]
    Exhausted(String),
    /// Connecting or authenticating failed.
    #[error("backend {0}: {1}")]
    Backend(String, BackendError),
}

/// A point-in-time view of one backend, for admin ports and logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendSnapshot {
    /// Its index.
    pub id: BackendId,
    /// Configured name.
    pub name: String,
    /// Configured address.
    pub addr: String,
    /// Failure domain.
    pub group: String,
    /// Selection priority.
    pub priority: i32,
    /// Last health seen.
    pub health: Health,
    /// Free bytes reported by the last STATUS.
    pub free_bytes: u64,
    /// Connections open for work (idle and in use).
    pub open_connections: usize,
    /// Of which idle in the pool.
    pub idle_connections: usize,
    /// The last error seen, if any.
    pub last_error: Option<String>,
    /// Disabled by the operator: no new messages go to it.
    pub disabled: bool,
    /// Round-trip latency EWMA in microseconds; `None` before the first sample.
    pub latency_ewma_us: Option<u64>,
    /// Connections checked out now (requests under way).
    pub in_flight: usize,
}

#[derive(Debug)]
struct State {
    health: Health,
    free_bytes: u64,
    last_error: Option<String>,
    latency_ewma_us: Option<u64>,
}

#[derive(Debug, Default)]
struct Pool {
    /// Idle connections with the time they were returned; newest last.
    idle: Vec<(BackendConn, Instant)>,
    /// Connections open for work, idle ones included.
    open: usize,
}

/// Second handles on the sockets of the connections checked out of one
/// backend's pool, by ticket; at most `open_max_per_backend` entries.
#[derive(Debug, Default)]
struct InUse {
    next_ticket: u64,
    sockets: HashMap<u64, TcpStream>,
}

#[derive(Debug)]
struct Slot {
    spec: BackendSpec,
    disabled: AtomicBool,
    state: Mutex<State>,
    pool: Mutex<Pool>,
    returned: Condvar,
    in_use: Mutex<InUse>,
}

/// The configured backends, their health and their connection pools.
#[derive(Debug)]
pub struct Cluster {
    secret: Vec<u8>,
    cfg: PoolConfig,
    slots: Vec<Slot>,
    stopped: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these plain records inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Builds the cluster, checks every backend once (in parallel, bounded by
    /// `health_timeout_ms`), then starts one health-checker thread per backend.
    /// The threads end when the last `Arc` is dropped or on [`stop`](Self::stop).
    pub fn start(secret: Vec<u8>, specs: Vec<BackendSpec>, cfg: PoolConfig) -> Arc<Cluster> {
        let slots = specs
            .into_iter()
            .map(|spec| Slot {
                spec,
                disabled: AtomicBool::new(false),
                state: Mutex::new(State {
                    health: Health::Unknown,
                    free_bytes: 0,
                    last_error: None,
                    latency_ewma_us: None,
                }),
                pool: Mutex::new(Pool::default()),
                returned: Condvar::new(),
                in_use: Mutex::new(InUse::default()),
            })
            .collect();
        let cluster = Arc::new(Cluster {
            secret,
            cfg,
            slots,
            stopped: AtomicBool::new(false),
        });
        let checkers: Vec<_> = (0..cluster.slots.len())
            .map(|id| {
                let weak = Arc::downgrade(&cluster);
                let (first_tx, first_rx) = std::sync::mpsc::channel();
                let spawned = thread::Builder::new()
                    .name(format!("health-{id}"))
                    .spawn(move || health_loop(weak, id, first_tx));
                if let Err(e) = spawned {
                    log::error!("cannot start health checker {id}: {e}");
                }
                first_rx
            })
            .collect();
        for first in checkers {
            let _ = first.recv_timeout(Duration::from_millis(cluster.cfg.health_timeout_ms * 2));
        }
        cluster
    }

    /// Stops the health checkers (idle connections are closed on drop).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Number of configured backends.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no backend is configured.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The configuration of backend `id`. Panics on an id not from this cluster.
    pub fn spec(&self, id: BackendId) -> &BackendSpec {
        &self.slots[id].spec
    }

    /// The pool settings.
    pub fn pool_config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Current health of backend `id`.
    pub fn health(&self, id: BackendId) -> Health {
        lock(&self.slots[id].state).health
    }

    /// The backend called `name`, if configured.
    pub fn find(&self, name: &str) -> Option<BackendId> {
        self.slots.iter().position(|s| s.spec.name == name)
    }

    /// Disables (`true`) or enables backend `id` for new messages; returns whether it was
    /// disabled before.
    pub fn set_disabled(&self, id: BackendId, disabled: bool) -> bool {
        let was = self.slots[id].disabled.swap(disabled, Ordering::Relaxed);
        if was != disabled {
            log::warn!(
                "backend={} {} for new messages (operator)",
                self.slots[id].spec.name,
                if disabled { "disabled" } else { "enabled" }
            );
        }
        was
    }

    /// The admin actions every frontend shares: `disable` and `enable` with
    /// `backend=NAME`. Returns `None` for any other action.
    pub fn control(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Option<Result<String, String>> {
        let disable = match action {
            "disable" => true,
            "enable" => false,
            _ => return None,
        };
        let Some((_, name)) = params.iter().find(|(k, _)| k == "backend") else {
            return Some(Err(format!("{action}: backend=NAME required")));
        };
        let Some(id) = self.find(name) else {
            let names: Vec<&str> = self.slots.iter().map(|s| s.spec.name.as_str()).collect();
            return Some(Err(format!(
                "no backend {name:?} (known: {})",
                names.join(", ")
            )));
        };
        self.set_disabled(id, disable);
        Some(Ok(format!("backend {name} {action}d")))
    }

    /// True when backend `id` is disabled for new messages.
    pub fn is_disabled(&self, id: BackendId) -> bool {
        self.slots[id].disabled.load(Ordering::Relaxed)
    }

    /// Folds one round-trip time of backend `id` into its latency EWMA.
    pub fn observe_latency(&self, id: BackendId, elapsed: Duration) {
        let sample_us = (elapsed.as_micros() as u64).min(LATENCY_SAMPLE_MAX_US);
        let mut st = lock(&self.slots[id].state);
        st.latency_ewma_us = Some(match st.latency_ewma_us {
            None => sample_us,
            Some(old) => {
                (old * (100 - LATENCY_EWMA_WEIGHT_PERCENT)
                    + sample_us * LATENCY_EWMA_WEIGHT_PERCENT)
                    / 100
            }
        });
    }

    /// Backend `id`'s latency EWMA in microseconds, `None` before any sample.
    pub fn latency_us(&self, id: BackendId) -> Option<u64> {
        lock(&self.slots[id].state).latency_ewma_us
    }

    /// Connections of backend `id` checked out now.
    pub fn in_flight(&self, id: BackendId) -> usize {
        let pool = lock(&self.slots[id].pool);
        pool.open.saturating_sub(pool.idle.len())
    }

    /// `holders` in the order a read should try them: not down first, then
    /// by latency and load (the cost [`select`] weighs by), fastest first;
    /// unmeasured ones count as the fastest measured. Ties keep their order.
    pub fn read_order(&self, holders: &[BackendId]) -> Vec<BackendId> {
        let slack_us = self.cfg.latency_slack_us;
        let known: Vec<(BackendId, bool, Option<u64>, usize)> = holders
            .iter()
            .map(|&b| {
                (
                    b,
                    self.health(b) == Health::Down,
                    self.latency_us(b),
                    self.in_flight(b),
                )
            })
            .collect();
        let fastest_us = known.iter().filter_map(|k| k.2).min().unwrap_or(0);
        let mut ordered = known;
        ordered.sort_by_key(|&(_, down, latency_us, in_flight)| {
            let cost = latency_us
                .unwrap_or(fastest_us)
                .saturating_add(slack_us)
                .saturating_mul(in_flight as u64 + 1);
            (down, cost)
        });
        ordered.into_iter().map(|k| k.0).collect()
    }

    /// Up to `k` distinct backends that are up, writable and not disabled, chosen by
    /// [`select`] (groups, priority, free space and latency × load, random).
    pub fn select_writable(&self, k: usize) -> Vec<BackendId> {
        let states: Vec<(Health, u64, Option<u64>, usize)> = self
            .slots
            .iter()
            .enumerate()
            .map(|(id, s)| {
                let st = lock(&s.state);
                let got = (st.health, st.free_bytes, st.latency_ewma_us);
                drop(st);
                (got.0, got.1, got.2, self.in_flight(id))
            })
            .collect();
        let candidates: Vec<Candidate<'_>> = self
            .slots
            .iter()
            .zip(&states)
            .enumerate()
            .filter(|(_, (slot, (h, free, _, _)))| {
                *h == Health::Up
                    && *free >= self.cfg.free_bytes_min
                    && !slot.disabled.load(Ordering::Relaxed)
            })
            .map(|(id, (slot, (_, free, latency_us, in_flight)))| Candidate {
                id,
                group: slot.spec.group_name(),
                priority: slot.spec.priority,
                free_bytes: *free,
                latency_us: *latency_us,
                in_flight: *in_flight,
            })
            .collect();
        select(
            &candidates,
            k,
            self.cfg.latency_weighting(),
            &mut rand::thread_rng(),
        )
    }

    /// Backends that can serve reads right now (up or read-only): the ones a
    /// POP3 listing asks.
    pub fn readable(&self) -> Vec<BackendId> {
        (0..self.slots.len())
            .filter(|&id| matches!(self.health(id), Health::Up | Health::ReadOnly))
            .collect()
    }

    /// Records what a caller learnt from an error on backend `id`: an I/O or
    /// protocol error marks it down, a `READONLY` refusal marks it
    /// read-only, until the health checker sees otherwise.
    pub fn report_error(&self, id: BackendId, err: &BackendError) {
        let health = match err {
            BackendError::Io(_) | BackendError::Protocol(_) => Health::Down,
            BackendError::Refused {
                code: Some(ErrorCode::ReadOnly),
                ..
            } => Health::ReadOnly,
            BackendError::Refused { .. } => return,
        };
        let mut st = lock(&self.slots[id].state);
        if st.health != health {
            log::warn!("backend={} now {health:?}: {err}", self.slots[id].spec.name);
        }
        st.health = health;
        st.last_error = Some(err.to_string());
    }

    /// An authenticated connection to backend `id`: an idle one from the pool
    /// (PINGed first if it idled longer than `ping_after_idle_ms`) or a new
    /// one. Waits up to `connect_timeout_ms` when `open_max_per_backend` are
    /// in use. A failure to connect marks the backend down.
    pub fn checkout(self: &Arc<Self>, id: BackendId) -> Result<PooledConn, PoolError> {
        let slot = &self.slots[id];
        let deadline = Instant::now() + Duration::from_millis(self.cfg.connect_timeout_ms);
        let mut pool = lock(&slot.pool);
        loop {
            if let Some((mut conn, since)) = pool.idle.pop() {
                drop(pool);
                let fresh = since.elapsed() < Duration::from_millis(self.cfg.ping_after_idle_ms);
                if fresh {
                    return Ok(self.wrap(id, conn));
                }
                let ping_started = Instant::now();
                if conn.ping().is_ok() {
                    self.observe_latency(id, ping_started.elapsed());
                    return Ok(self.wrap(id, conn));
                }
                drop(conn);
                pool = lock(&slot.pool);
                pool.open -= 1;
                continue;
            }
            if pool.open < self.cfg.open_max_per_backend {
                pool.open += 1;
                drop(pool);
                return self
                    .connect(id)
                    .map(|conn| self.wrap(id, conn))
                    .inspect_err(|_| {
                        lock(&slot.pool).open -= 1;
                        slot.returned.notify_one();
                    });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PoolError::Exhausted(slot.spec.name.clone()));
            }
            pool = slot
                .returned
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn connect(&self, id: BackendId) -> Result<BackendConn, PoolError> {
        let spec = &self.slots[id].spec;
        let connect_timeout = Duration::from_millis(self.cfg.connect_timeout_ms);
        let io_timeout = Duration::from_millis(self.cfg.io_timeout_ms);
        BackendConn::connect(&spec.addr, &self.secret, connect_timeout)
            .and_then(|mut c| c.set_timeout(io_timeout).map(|_| c))
            .map_err(|e| {
                self.report_error(id, &e);
                PoolError::Backend(spec.name.clone(), e)
            })
    }

    fn wrap(self: &Arc<Self>, id: BackendId, conn: BackendConn) -> PooledConn {
        // Without a second handle (out of descriptors) the connection still
        // works; it just cannot be interrupted and falls back to io_timeout_ms.
        let ticket = match conn.interrupt_handle() {
            Ok(socket) => {
                let mut in_use = lock(&self.slots[id].in_use);
                let ticket = in_use.next_ticket;
                in_use.next_ticket += 1;
                in_use.sockets.insert(ticket, socket);
                Some(ticket)
            }
            Err(e) => {
                log::warn!(
                    "backend={} no interrupt handle: {e}",
                    self.slots[id].spec.name
                );
                None
            }
        };
        PooledConn {
            conn: Some(conn),
            cluster: self.clone(),
            id,
            ticket,
        }
    }

    /// Cuts every connection in use to backend `id` (see the module
    /// documentation); returns how many.
    fn interrupt_in_use(&self, id: BackendId) -> usize {
        let in_use = lock(&self.slots[id].in_use);
        for socket in in_use.sockets.values() {
            powermail_proto::client::interrupt(socket);
        }
        in_use.sockets.len()
    }

    /// A view of every backend.
    pub fn snapshot(&self) -> Vec<BackendSnapshot> {
        self.slots
            .iter()
            .enumerate()
            .map(|(id, s)| {
                let st = lock(&s.state);
                let pool = lock(&s.pool);
                BackendSnapshot {
                    id,
                    name: s.spec.name.clone(),
                    addr: s.spec.addr.clone(),
                    group: s.spec.group_name().to_string(),
                    priority: s.spec.priority,
                    health: st.health,
                    free_bytes: st.free_bytes,
                    open_connections: pool.open,
                    idle_connections: pool.idle.len(),
                    last_error: st.last_error.clone(),
                    disabled: s.disabled.load(Ordering::Relaxed),
                    latency_ewma_us: st.latency_ewma_us,
                    in_flight: pool.open.saturating_sub(pool.idle.len()),
                }
            })
            .collect()
    }

    /// The backends as a [`powermail_admin::Report`] shows them, from one
    /// snapshot: what each is and its state (`id`, `addr`, `group`,
    /// `priority`, `health`, `last_error`, `disabled`, `latency_ewma_us`)
    /// and its gauges: `up` (1 when `up(health)`, described by `up_help`),
    /// `in_flight`, `open_connections`, `idle_connections`, `free_bytes`.
    /// Under the report's `backend_prefix` `<daemon>_backend` they are
    /// `<daemon>_backend_up{backend=..}`, ...; the EWMA goes to `/metrics` in
    /// seconds through [`frontend_metrics`].
    pub fn reports(
        &self,
        up_help: &'static str,
        up: impl Fn(Health) -> bool,
    ) -> Vec<powermail_admin::BackendReport> {
        use powermail_admin::Metric;
        self.snapshot()
            .into_iter()
            .map(|b| {
                let mut state = serde_json::Map::new();
                state.insert("id".into(), b.id.into());
                state.insert("addr".into(), b.addr.clone().into());
                state.insert("group".into(), b.group.clone().into());
                state.insert("priority".into(), b.priority.into());
                state.insert(
                    "health".into(),
                    serde_json::to_value(b.health).unwrap_or_default(),
                );
                state.insert("last_error".into(), b.last_error.clone().into());
                state.insert("disabled".into(), b.disabled.into());
                state.insert("latency_ewma_us".into(), b.latency_ewma_us.into());
                let gauges = vec![
                    Metric::gauge("up", up_help, u64::from(up(b.health))),
                    Metric::gauge(
                        "in_flight",
                        "connections to the backend checked out now",
                        b.in_flight as u64,
                    ),
                    Metric::gauge(
                        "open_connections",
                        "connections to the backend open for work (idle and in use)",
                        b.open_connections as u64,
                    ),
                    Metric::gauge(
                        "idle_connections",
                        "connections to the backend idle in the pool",
                        b.idle_connections as u64,
                    ),
                    Metric::gauge(
                        "free_bytes",
                        "free bytes the backend reported in its last STATUS",
                        b.free_bytes,
                    ),
                ];
                powermail_admin::BackendReport {
                    name: b.name,
                    state,
                    metrics: gauges,
                    latency: None,
                }
            })
            .collect()
    }

    /// One STATUS round trip on the checker's own connection.
    fn check(&self, id: BackendId, conn: &mut Option<BackendConn>) {
        let slot = &self.slots[id];
        let timeout = Duration::from_millis(self.cfg.health_timeout_ms);
        let result = match conn.take() {
            Some(c) => Ok(c),
            None => BackendConn::connect(&slot.spec.addr, &self.secret, timeout),
        }
        .and_then(|mut c| {
            let asked = Instant::now();
            c.status().map(|kv| (c, kv, asked.elapsed()))
        });
        if let Ok((_, _, rtt)) = &result {
            self.observe_latency(id, *rtt);
        }
        let mut st = lock(&slot.state);
        let before = st.health;
        match result {
            Ok((c, kv, _)) => {
                let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
                st.health = match get("mode") {
                    Some("rw") => Health::Up,
                    _ => Health::ReadOnly,
                };
                st.free_bytes = get("free_bytes").and_then(|v| v.parse().ok()).unwrap_or(0);
                *conn = Some(c);
            }
            Err(e) => {
                st.health = Health::Down;
                st.last_error = Some(e.to_string());
            }
        }
        if st.health != before {
            log::info!(
                "backend={} health {before:?} -> {:?}",
                slot.spec.name,
                st.health
            );
        }
        if st.health == Health::Down {
            drop(st);
            // Idle connections to a dead backend are useless; close them.
            let mut pool = lock(&slot.pool);
            let n = pool.idle.len();
            pool.idle.clear();
            pool.open -= n;
            drop(pool);
            // Requests under way on it would wait io_timeout_ms for a backend
            // that may never answer: cut them, so they fail over now.
            let cut = self.interrupt_in_use(id);
            if cut > 0 {
                log::warn!(
                    "backend={} down: interrupted {cut} connections in use",
                    slot.spec.name
                );
            }
        }
    }
}

fn health_loop(cluster: Weak<Cluster>, id: BackendId, first: std::sync::mpsc::Sender<()>) {
    let mut conn = None;
    let mut first = Some(first);
    loop {
        let interval = match cluster.upgrade() {
            Some(c) if !c.stopped.load(Ordering::Relaxed) => {
                c.check(id, &mut conn);
                Duration::from_millis(c.cfg.health_interval_ms)
            }
            _ => return,
        };
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        thread::sleep(interval);
    }
}

/// A connection checked out of a backend's pool. Derefs to
/// [`BackendConn`]. Call [`release`](Self::release) when the connection is
/// idle and healthy; dropping it instead closes it.
#[derive(Debug)]
pub struct PooledConn {
    conn: Option<BackendConn>,
    cluster: Arc<Cluster>,
    id: BackendId,
    /// Its entry in the backend's in-use registry.
    ticket: Option<u64>,
}

impl PooledConn {
    /// The backend this connection goes to.
    pub fn backend(&self) -> BackendId {
        self.id
    }

    /// Returns the connection to the pool for reuse (or closes it when the
    /// pool already holds `idle_max_per_backend`). Only call this between
    /// requests, never after an error.
    pub fn release(mut self) {
        let conn = self.conn.take().expect("present until release or drop");
        self.unregister();
        let slot = &self.cluster.slots[self.id];
        let mut pool = lock(&slot.pool);
        if pool.idle.len() < self.cluster.cfg.idle_max_per_backend {
            pool.idle.push((conn, Instant::now()));
        } else {
            pool.open -= 1;
        }
        drop(pool);
        slot.returned.notify_one();
    }
}

impl PooledConn {
    /// Leaves the in-use registry (releasing its second socket handle).
    fn unregister(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            lock(&self.cluster.slots[self.id].in_use)
                .sockets
                .remove(&ticket);
        }
    }
}

impl Deref for PooledConn {
    type Target = BackendConn;
    fn deref(&self) -> &BackendConn {
        self.conn.as_ref().expect("present until release or drop")
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut BackendConn {
        self.conn.as_mut().expect("present until release or drop")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        self.unregister();
        if self.conn.take().is_some() {
            let slot = &self.cluster.slots[self.id];
            lock(&slot.pool).open -= 1;
            slot.returned.notify_one();
        }
    }
}

/// A frontend's `/metrics` text: every family of `report`, then
/// `<daemon>_backend_latency_seconds{backend=..}`, the round-trip EWMA the
/// backend selection weighs, in seconds (absent before a sample), read from
/// the same snapshot as the rest ([`Cluster::reports`]'s `latency_ewma_us`).
pub fn frontend_metrics(report: &powermail_admin::Report) -> String {
    let mut p = powermail_admin::Prometheus::new();
    report.write_prometheus(&mut p);
    let name = format!("{}_backend_latency_seconds", report.daemon);
    p.header(
        &name,
        "gauge",
        "round-trip latency EWMA the backend selection weighs (absent before a sample)",
    );
    for b in &report.backends {
        if let Some(us) = b.state.get("latency_ewma_us").and_then(|v| v.as_u64()) {
            p.sample(&name, &format!("backend=\"{}\"", b.name), us as f64 / 1e6);
        }
    }
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback address nobody listens on (connections are refused).
    fn closed_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        addr.to_string()
    }

    #[test]
    fn latency_ewma_and_the_order_of_reads() {
        let specs = (0..3)
            .map(|i| BackendSpec::new(&format!("b{i}"), &closed_addr()))
            .collect();
        let cfg = PoolConfig {
            health_interval_ms: 60_000,
            ..PoolConfig::default()
        };
        let c = Cluster::start(b"secret-0123456789".to_vec(), specs, cfg);
        // A refused health check is no latency sample.
        assert_eq!(c.latency_us(0), None);
        c.observe_latency(0, Duration::from_millis(200));
        assert_eq!(c.latency_us(0), Some(200_000));
        c.observe_latency(0, Duration::from_millis(100));
        assert_eq!(c.latency_us(0), Some(180_000));
        // One stalled request counts as LATENCY_SAMPLE_MAX_US at most.
        c.observe_latency(0, Duration::from_secs(1000));
        assert_eq!(c.latency_us(0), Some(180_000 * 4 / 5 + 2_000_000));
        c.observe_latency(1, Duration::from_millis(2));
        // All down alike: fastest first; unmeasured counts as the fastest
        // measured (ties keep their order).
        assert_eq!(c.read_order(&[0, 1, 2]), vec![1, 2, 0]);
        assert_eq!(c.read_order(&[2, 0]), vec![2, 0]);
        let snap = c.snapshot();
        assert_eq!(snap[0].latency_ewma_us, Some(2_144_000));
        assert_eq!(snap[2].latency_ewma_us, None);
        assert!(snap.iter().all(|b| b.in_flight == 0));
        assert_eq!(c.in_flight(1), 0);
        // The admin view: state fields and gauges; the EWMA in seconds in /metrics.
        let reports = c.reports("up", |h| h == Health::Up);
        let report = powermail_admin::Report {
            daemon: "d",
            version: "0",
            metrics: Vec::new(),
            latency: powermail_admin::Latencies::new(),
            latency_family: "d_latency_seconds",
            backend_prefix: "d_backend",
            backends: reports,
        };
        let stats = report.stats();
        let b0 = &stats["backends"][0];
        assert_eq!(b0["name"], "b0");
        assert_eq!(b0["latency_ewma_us"], 2_144_000);
        assert_eq!(b0["gauges"]["in_flight"], 0);
        assert_eq!(b0["gauges"]["up"], 0, "{b0}");
        let text = frontend_metrics(&report);
        assert!(
            text.contains("d_backend_in_flight{backend=\"b1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("d_backend_latency_seconds{backend=\"b0\"} 2.144\n"),
            "{text}"
        );
        assert!(
            !text.contains("d_backend_latency_seconds{backend=\"b2\"}"),
            "{text}"
        );
        let mut families = powermail_admin::families_in_text(&text);
        assert!(families.remove("d_backend_latency_seconds"));
        assert_eq!(
            powermail_admin::families_in_stats(&stats, "d", "d_backend"),
            families
        );
        c.stop();
    }
}
