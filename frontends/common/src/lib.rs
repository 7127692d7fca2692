//! What PowerMail's frontends share about the backends.
//!
//! powersmtp and powerpop are stateless: everything they know about the
//! store is a configured list of pplistener backends. This crate turns that
//! list into a live [`Cluster`]:
//!
//! * [`accept`] — the threaded accept loop both frontends run: a connection-slot limit
//!   held by an RAII guard, the over-limit and draining refusals, the PROXY stage, and
//!   the shared half of a graceful stop;
//! * [`config`] — the `[[backend]]` tables and the `[backend_pool]` knobs of a
//!   frontend's TOML file;
//! * [`Cluster`] — one background health-checker thread per backend (STATUS
//!   every `health_interval_ms` with a short time-out: up, down, read-only,
//!   free bytes) and a bounded pool of authenticated, reusable
//!   [`BackendConn`](powermail_proto::BackendConn)s per backend;
//! * [`select`] — the choice of K distinct writable backends for a new
//!   message, after PowerMail's ServerSelect: distinct groups first, then
//!   higher priority, then weighted by free space, random among equals;
//! * [`settings`] — configuration both frontends share: [`FrontendSettings`]
//!   (PROXY sources, admin port, userbase, secret, pool, backends; one
//!   `check`, one password-hiding `public_json`), TLS certificate, userbase cache;
//! * [`deadline`] — client writes held to a deadline for a whole reply, so a
//!   client that reads a trickle cannot hold a connection thread for ever;
//! * [`journal`] — deletions owed to backends that could not take them (powerpop's
//!   delete journal, powersmtp's undo journal), durable and replayed;
//! * [`lock`] — the per-mailbox `[IN-USE]` lock: in-process, `flock` on the
//!   host, and a lease row in a MySQL/MariaDB userbase across hosts;
//! * [`proxy`] — the PROXY protocol (v1/v2) from trusted balancers only;
//! * [`tls`] — the TLS upgrade (STARTTLS, STLS, implicit-TLS ports);
//! * [`reload`] — configuration reload without a restart (SIGHUP or the admin port),
//!   applied to new sessions only.
//!
//! ```no_run
//! use powermail_frontend::{Cluster, config::{BackendSpec, PoolConfig}};
//! let specs = vec![BackendSpec::new("b0", "127.0.0.1:7900")];
//! let cluster = Cluster::start(b"secret".to_vec(), specs, PoolConfig::default());
//! let chosen = cluster.select_writable(1);
//! for id in chosen {
//!     let mut conn = cluster.checkout(id).expect("backend reachable");
//!     conn.ping().expect("alive");
//!     conn.release(); // back to the pool
//! }
//! ```

pub mod accept;
pub mod cluster;
pub mod config;
pub mod deadline;
pub mod journal;
pub mod lock;
pub mod proxy;
pub mod reload;
pub mod select;
pub mod settings;
pub mod tls;

pub use cluster::{BackendId, BackendSnapshot, Cluster, Health, PoolError, PooledConn};
pub use config::{validate_backends, BackendListError, BackendSpec, PoolConfig};
pub use deadline::DeadlineWrite;
pub use select::{select, Candidate, LatencyWeighting};
pub use settings::{FrontendSettings, SettingsError};
