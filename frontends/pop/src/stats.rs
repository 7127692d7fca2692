//! Counters and latency histograms for the admin port.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use powermail_admin::{AdminHandler, BackendReport, Latencies, Metric, Report};
use powermail_frontend::reload::{changes, reload_file, split_live, Reloadable};
use powermail_frontend::Cluster;

use crate::config::{Config, Limits};
use crate::journal::Journal;
use crate::lock::Locks;

powermail_admin::counters! {
    /// Process-wide counters (monotonic).
    pub struct Counters {
        connections_accepted: Counter = "connections accepted",
        connections_refused: Counter = "connections refused at connections_max",
        proxy_refused: Counter = "connections refused for a missing, malformed or untrusted PROXY header",
        sessions: Counter = "sessions ended",
        logins_ok: Counter = "successful logins",
        logins_failed: Counter = "failed logins (bad credentials)",
        logins_locked_out: Counter = "logins refused by throttling",
        logins_in_use: Counter = "logins refused because the mailbox was locked",
        logins_unavailable: Counter = "logins refused because the userbase was unavailable",
        logins_storage_unavailable: Counter = "logins refused because no backend listed the mailbox in time",
        empty_mailbox_logins: Counter = "logins that found an empty mailbox",
        listing_cache_hits: Counter = "logins whose big mailbox listing was kept and still held on every backend (one USAGE each, no LIST)",
        listing_cache_stale: Counter = "logins whose kept listing no longer held (a generation or the backends changed) and listed again",
        messages_retrieved: Counter = "RETR and TOP served",
        bytes_retrieved: Counter = "message bytes sent by RETR and TOP",
        bytes_spliced: Counter = "message bytes RETR moved from a backend to a plain client socket with splice(2), never copied",
        messages_deleted: Counter = "messages deleted at QUIT",
        deletes_journaled: Counter = "deletions recorded in the journal for a backend that could not take them",
        deletes_replayed: Counter = "journaled deletions replayed to a backend",
        idle_timeouts: Counter = "sessions closed by the idle time-out",
    }
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

impl Admin {
    /// Everything `/stats` and `/metrics` show, read once.
    pub fn report(&self) -> Report {
        report(
            &self.stats,
            self.locks.held(),
            self.journal.owed_count(),
            self.cluster.reports("1 if the backend serves reads", |h| {
                matches!(
                    h,
                    powermail_frontend::Health::Up | powermail_frontend::Health::ReadOnly
                )
            }),
        )
    }
}

/// The report of a powerpop with these `stats`, locks held, deletions owed and backends.
pub fn report(
    stats: &Stats,
    mailboxes_locked: usize,
    deletes_owed: usize,
    backends: Vec<BackendReport>,
) -> Report {
    let mut metrics = stats.counters.metrics();
    metrics.push(Metric::gauge(
        "connections",
        "connections open",
        stats.connections.load(Ordering::Relaxed),
    ));
    metrics.push(Metric::gauge(
        "mailboxes_locked",
        "mailboxes locked",
        mailboxes_locked as u64,
    ));
    metrics.push(Metric::gauge(
        "deletes_owed",
        "deletions owed to backends",
        deletes_owed as u64,
    ));
    Report {
        daemon: "powerpop",
        version: env!("CARGO_PKG_VERSION"),
        metrics,
        latency: stats
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        latency_family: "powerpop_command_latency_seconds",
        backend_prefix: "powerpop_backend",
        backends,
    }
}

impl AdminHandler for Admin {
    fn stats(&self) -> serde_json::Value {
        self.report().stats()
    }

    fn metrics(&self) -> String {
        powermail_frontend::cluster::frontend_metrics(&self.report())
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

#[cfg(test)]
mod tests {
    use super::*;
    use powermail_admin::{families_in_stats, families_in_text};

    /// Every counter and gauge in `/stats` is in `/metrics` and vice versa (the
    /// backend health gauges, written from the backends' state fields, aside).
    #[test]
    fn stats_and_metrics_name_the_same_numbers() {
        let stats = Stats::new();
        Stats::inc(&stats.counters.logins_ok);
        let r = report(&stats, 2, 1, Vec::new());
        let json = r.stats();
        assert_eq!(json["daemon"], "powerpop");
        assert_eq!(json["counters"]["logins_ok"], 1);
        assert_eq!(json["gauges"]["mailboxes_locked"], 2);
        assert_eq!(json["gauges"]["deletes_owed"], 1);
        let text = r.prometheus();
        let from_text = families_in_text(&text);
        assert_eq!(
            families_in_stats(&json, "powerpop", "powerpop_backend"),
            from_text
        );
        for kept in [
            "powerpop_logins_ok_total",
            "powerpop_bytes_spliced_total",
            "powerpop_connections",
            "powerpop_mailboxes_locked",
            "powerpop_deletes_owed",
        ] {
            assert!(from_text.contains(kept), "{kept} missing: {text}");
        }
        assert_eq!(from_text.len(), stats.counters.metrics().len() + 3);
    }
}
