//! Counters and latency histograms for the admin port.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use powermail_admin::{AdminHandler, Latencies, Prometheus};
use powermail_frontend::reload::{changes, reload_file, split_live, Reloadable};
use powermail_frontend::Cluster;

use crate::config::{Config, Limits};
use crate::journal::Journal;
use crate::lock::Locks;

macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        /// Process-wide counters (monotonic unless noted).
        #[derive(Debug, Default)]
        pub struct Counters {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        impl Counters {
            /// `(name, help, value)` of every counter.
            pub fn all(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    connections_accepted: "connections accepted",
    connections_refused: "connections refused at connections_max",
    proxy_refused: "connections refused for a missing, malformed or untrusted PROXY header",
    sessions: "sessions ended",
    logins_ok: "successful logins",
    logins_failed: "failed logins (bad credentials)",
    logins_locked_out: "logins refused by throttling",
    logins_in_use: "logins refused because the mailbox was locked",
    logins_unavailable: "logins refused because the userbase was unavailable",
    empty_mailbox_logins: "logins that found an empty mailbox",
    listing_cache_hits: "logins whose big mailbox listing was kept and still held on every backend (one USAGE each, no LIST)",
    listing_cache_stale: "logins whose kept listing no longer held (a generation or the backends changed) and listed again",
    messages_retrieved: "RETR and TOP served",
    bytes_retrieved: "message bytes sent by RETR and TOP",
    bytes_spliced: "message bytes RETR moved from a backend to a plain client socket with splice(2), never copied",
    messages_deleted: "messages deleted at QUIT",
    deletes_journaled: "deletions recorded in the journal for a backend that could not take them",
    deletes_replayed: "journaled deletions replayed to a backend",
    idle_timeouts: "sessions closed by the idle time-out",
}

/// Everything the admin port shows.
pub struct Stats {
    /// The counters.
    pub counters: Counters,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Per-command latencies, merged from every ended session.
    pub latencies: Mutex<Latencies>,
}

impl Stats {
    /// Zeroed.
    pub fn new() -> Stats {
        Stats {
            counters: Counters::default(),
            connections: AtomicU64::new(0),
            latencies: Mutex::new(Latencies::new()),
        }
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// The admin port's view of a running powerpop.
pub struct Admin {
    /// Counters.
    pub stats: Arc<Stats>,
    /// The backends.
    pub cluster: Arc<Cluster>,
    /// The delete journal.
    pub journal: Arc<Journal>,
    /// The lock table.
    pub locks: Arc<Locks>,
    /// The configuration as started.
    pub config: Config,
    /// The limits new sessions get (what a reload changes).
    pub limits: Arc<Reloadable<Limits>>,
    /// The configuration file, re-read on reload.
    pub path: Option<PathBuf>,
}

/// Top-level keys whose changes a reload applies (to new sessions).
const RELOADABLE: &[&str] = &["limits"];

impl Admin {
    /// The configuration in effect: as started, with the current limits.
    fn effective(&self) -> Config {
        let mut cfg = self.config.clone();
        cfg.limits = (*self.limits.get()).clone();
        cfg
    }

    /// Re-reads the configuration file and applies its `[limits]` to new sessions;
    /// every other change is logged as needing a restart. A file that does not parse
    /// changes nothing.
    pub fn reload(&self) -> Result<String, String> {
        reload_file(self.path.as_deref(), Config::parse, |new: Config| {
            let split = split_live(
                changes(&self.effective().public_json(), &new.public_json()),
                RELOADABLE,
            );
            self.limits.set(new.limits);
            split
        })
    }
}

impl AdminHandler for Admin {
    fn stats(&self) -> serde_json::Value {
        let mut counters = serde_json::Map::new();
        for (name, _, v) in self.stats.counters.all() {
            counters.insert(name.into(), v.into());
        }
        let latencies = self
            .stats
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .summary();
        serde_json::json!({
            "daemon": "powerpop",
            "connections": self.stats.connections.load(Ordering::Relaxed),
            "mailboxes_locked": self.locks.held(),
            "deletes_owed": self.journal.owed_count(),
            "counters": counters,
            "latency": latencies,
            "backends": self.cluster.snapshot(),
        })
    }

    fn metrics(&self) -> String {
        let mut p = Prometheus::new();
        for (name, help, v) in self.stats.counters.all() {
            p.metric(
                &format!("powerpop_{name}_total"),
                "counter",
                help,
                "",
                v as f64,
            );
        }
        let gauge = |p: &mut Prometheus, name: &str, help: &str, v: f64| {
            p.metric(name, "gauge", help, "", v)
        };
        gauge(
            &mut p,
            "powerpop_connections",
            "connections open",
            self.stats.connections.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut p,
            "powerpop_mailboxes_locked",
            "mailboxes locked",
            self.locks.held() as f64,
        );
        gauge(
            &mut p,
            "powerpop_deletes_owed",
            "deletions owed to backends",
            self.journal.owed_count() as f64,
        );
        self.cluster.write_backend_metrics(
            &mut p,
            "powerpop",
            "1 if the backend serves reads",
            |h| {
                matches!(
                    h,
                    powermail_frontend::Health::Up | powermail_frontend::Health::ReadOnly
                )
            },
        );
        self.stats
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_prometheus(&mut p, "powerpop_command_latency_seconds", "");
        p.finish()
    }

    fn config(&self) -> serde_json::Value {
        self.effective().public_json()
    }

    fn control(&self, action: &str, params: &[(String, String)]) -> Result<String, String> {
        if let Some(result) = self.cluster.control(action, params) {
            return result;
        }
        match action {
            "reload" => self.reload(),
            _ => Err(format!(
                "unknown action {action:?} (loglevel, disable, enable, reload)"
            )),
        }
    }
}
