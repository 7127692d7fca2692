//! What each backend shares with the admin thread: counters (atomics, so the
//! executor never takes a lock to count), the read-only switches, and a
//! latency snapshot the executor publishes once a second from its own
//! lock-free histograms.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use powermail_admin::{AdminHandler, BackendReport, Latencies, Metric, Report};

powermail_admin::counters! {
    /// Counters and gauges of one backend.
    pub struct Counters {
        connections: Gauge = "connections open now",
        connections_total: Counter = "connections accepted since start",
        connections_refused: Counter = "connections refused by the connection limit",
        auth_failures: Counter = "failed authentications",
        puts: Counter = "messages stored",
        put_errors: Counter = "PUTs refused or failed",
        links_created: Counter = "mailbox links created by PUTs",
        bytes_in: Counter = "body bytes stored",
        bytes_in_direct: Counter = "of bytes_in, those written with O_DIRECT (the rest went through the page cache)",
        gets: Counter = "messages sent by GET",
        bytes_out: Counter = "body bytes sent by GET",
        lists: Counter = "LIST requests",
        empty_fast_path: Counter = "requests about a mailbox with no directory here, answered from memory",
        dels: Counter = "messages deleted",
        protocol_errors: Counter = "protocol errors (bad lines, fatal framing errors)",
        index_mailboxes: Gauge = "mailboxes resident in the index now (published each second)",
        index_entries: Gauge = "entries resident in the index now: mailboxes + messages (published each second)",
        index_builds: Counter = "directory walks that built a mailbox's index (published each second)",
        index_evictions: Counter = "mailboxes evicted from the index to stay under index_entries_max",
        flushes: Counter = "device flushes for PUTs (fdatasync, directory fsync, syncfs, trailing)",
        flushes_fdatasync: Counter = "body fdatasyncs (durability = file, and extra copies past the link limit)",
        flushes_dir_fsync: Counter = "directory fsyncs after link batches (durability = file)",
        flushes_syncfs: Counter = "syncfs calls, one per batch (durability = syncfs)",
        flushes_trailing: Counter = "device flushes (an fsync of the data directory) after each syncfs on a file system without a journal",
        flush_errors: Counter = "flushes that reported an error (each failed its whole batch)",
        batches: Counter = "link batches made durable together",
        batch_puts: Counter = "PUTs in link batches (divide by batches: PUTs per batch)",
        batch_puts_max: Gauge = "most PUTs in one batch since start",
    }
}

impl Counters {
    /// Counts `n` device flushes of one kind (`which` is one of the
    /// `flushes_*` counters) in it and in the total.
    pub fn flushed(&self, which: &AtomicU64, n: u64) {
        add(which, n);
        add(&self.flushes, n);
    }

    /// Counts one batch of `puts` PUTs.
    pub fn batch(&self, puts: u64) {
        add(&self.batches, 1);
        add(&self.batch_puts, puts);
        self.batch_puts_max.fetch_max(puts, Relaxed);
    }
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// One backend as the admin thread sees it.
#[derive(Debug)]
pub struct BackendShared {
    /// Name.
    pub name: String,
    /// Address.
    pub listen: std::net::SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// CPU.
    pub cpu: usize,
    /// How PUTs are made durable.
    pub durability: crate::config::Durability,
    /// `syncfs` mode only: bodies are flushed before they are linked (a file
    /// system that does not order data before metadata).
    pub flush_before_link: bool,
    /// `syncfs` mode: the backends whose PUTs one commit thread links and
    /// flushes together (those on this file system), `+`-joined; empty in
    /// `file` mode.
    pub commit_group: String,
    /// Bodies up to this size are written through the page cache where the
    /// tail may be (`page_cache_body_max_bytes`).
    pub page_cache_body_max_bytes: usize,
    /// An operator made it read-only (persisted by a marker file).
    pub operator_readonly: AtomicBool,
    /// Free space or inodes fell under a floor, or a write hit ENOSPC/EDQUOT
    /// (then it stays until a probe write succeeds or an operator says READWRITE).
    pub auto_readonly: AtomicBool,
    /// A write or flush failed with `EIO` or `EROFS`: the disk or the file
    /// system under it has failed, and later flushes cannot be believed (xfs,
    /// once its log is shut down, answers a directory `fsync` with success
    /// for changes it never wrote — kernel-notes/README.md). PUT, DEL and DELM
    /// are refused until an operator says READWRITE or the backend restarts;
    /// the probe write never clears it.
    pub disk_failed: AtomicBool,
    /// Free bytes at the last check.
    pub free_bytes: AtomicU64,
    /// Total bytes at the last check.
    pub total_bytes: AtomicU64,
    /// Counters.
    pub counters: Counters,
    /// Latencies as last published by the executor.
    pub latencies: Mutex<Latencies>,
    /// Marker file for the operator switch.
    pub readonly_marker: PathBuf,
    /// `limits.connections_per_backend_max`, replaced by a reload (SIGHUP).
    pub connections_max: AtomicU64,
    /// `limits.free_bytes_min` (the read-only floor), replaced by a reload.
    pub free_bytes_min: AtomicU64,
}

impl BackendShared {
    /// Whether PUT is refused now.
    pub fn readonly(&self) -> bool {
        self.operator_readonly.load(Relaxed)
            || self.auto_readonly.load(Relaxed)
            || self.disk_failed.load(Relaxed)
    }

    /// `rw`, `ro` (operator), `ro-disk-error` (a failed write or flush) or
    /// `ro-auto` (disk space).
    pub fn mode(&self) -> &'static str {
        if self.operator_readonly.load(Relaxed) {
            "ro"
        } else if self.disk_failed.load(Relaxed) {
            "ro-disk-error"
        } else if self.auto_readonly.load(Relaxed) {
            "ro-auto"
        } else {
            "rw"
        }
    }

    /// Sets the operator switch and persists it, so a restart keeps it.
    pub fn set_operator_readonly(&self, on: bool) -> std::io::Result<()> {
        if on {
            std::fs::write(&self.readonly_marker, b"read-only set by operator\n")?;
        } else if let Err(e) = std::fs::remove_file(&self.readonly_marker) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        if let Some(dir) = self.readonly_marker.parent() {
            crate::store::sync_dir(dir)?;
        }
        self.operator_readonly.store(on, Relaxed);
        if !on {
            // READWRITE also overrides an ro-auto left by an ENOSPC/EDQUOT write; the
            // next housekeeping tick sets it again only if a floor is not met.
            self.auto_readonly.store(false, Relaxed);
            self.disk_failed.store(false, Relaxed);
        }
        log::warn!("backend={} mode={} (operator)", self.name, self.mode());
        Ok(())
    }

    /// Its part of the admin report: what it is, its mode, its counters and
    /// gauges, its latencies.
    fn report(&self) -> BackendReport {
        let mut state = serde_json::Map::new();
        state.insert("listen".into(), self.listen.to_string().into());
        state.insert(
            "data_dir".into(),
            self.data_dir.display().to_string().into(),
        );
        state.insert("cpu".into(), self.cpu.into());
        state.insert("mode".into(), self.mode().into());
        state.insert("durability".into(), self.durability.as_str().into());
        state.insert("flush_before_link".into(), self.flush_before_link.into());
        state.insert("commit_group".into(), self.commit_group.clone().into());
        state.insert(
            "page_cache_body_max_bytes".into(),
            self.page_cache_body_max_bytes.into(),
        );
        let mut metrics = self.counters.metrics();
        metrics.extend([
            Metric::gauge(
                "free_bytes",
                "free bytes on the data file system",
                self.free_bytes.load(Relaxed),
            ),
            Metric::gauge(
                "total_bytes",
                "size of the data file system",
                self.total_bytes.load(Relaxed),
            ),
            Metric::gauge(
                "readonly",
                "1 when PUT is refused",
                u64::from(self.readonly()),
            ),
        ]);
        BackendReport {
            name: self.name.clone(),
            state,
            metrics,
            latency: Some(
                self.latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            ),
        }
    }
}

/// The admin view of the whole pplistener process.
pub struct Process {
    /// Every backend.
    pub backends: Vec<Arc<BackendShared>>,
    /// Effective configuration (no secrets).
    pub config: serde_json::Value,
}

impl Process {
    fn find(&self, params: &[(String, String)]) -> Result<Vec<&Arc<BackendShared>>, String> {
        match params.iter().find(|(k, _)| k == "backend") {
            None => Ok(self.backends.iter().collect()),
            Some((_, want)) => {
                let found: Vec<_> = self
                    .backends
                    .iter()
                    .enumerate()
                    .filter(|(i, b)| &b.name == want || &i.to_string() == want)
                    .map(|(_, b)| b)
                    .collect();
                if found.is_empty() {
                    Err(format!("no backend {want:?}"))
                } else {
                    Ok(found)
                }
            }
        }
    }
}

impl Process {
    /// Everything `/stats` and `/metrics` show, read once: pplistener's
    /// numbers are all per backend.
    pub fn report(&self) -> Report {
        Report {
            daemon: "pplistener",
            version: env!("CARGO_PKG_VERSION"),
            metrics: Vec::new(),
            latency: Latencies::new(),
            latency_family: "pplistener_latency_seconds",
            backend_prefix: "pplistener",
            backends: self.backends.iter().map(|b| b.report()).collect(),
        }
    }
}

impl AdminHandler for Process {
    fn stats(&self) -> serde_json::Value {
        self.report().stats()
    }

    fn metrics(&self) -> String {
        self.report().prometheus()
    }

    fn config(&self) -> serde_json::Value {
        self.config.clone()
    }

    fn control(&self, action: &str, params: &[(String, String)]) -> Result<String, String> {
        let on = match action {
            "readonly" => true,
            "readwrite" => false,
            _ => {
                return Err(format!(
                    "unknown action {action:?} (readonly, readwrite, loglevel)"
                ))
            }
        };
        let targets = self.find(params)?;
        for b in &targets {
            b.set_operator_readonly(on)
                .map_err(|e| format!("{}: {e}", b.name))?;
        }
        Ok(targets
            .iter()
            .map(|b| format!("{} {}", b.name, b.mode()))
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powermail_admin::{families_in_stats, families_in_text};

    fn backend(name: &str) -> Arc<BackendShared> {
        Arc::new(BackendShared {
            name: name.into(),
            listen: "127.0.0.1:1".parse().expect("address"),
            data_dir: PathBuf::from("/nonexistent"),
            cpu: 0,
            durability: crate::config::Durability::File,
            flush_before_link: false,
            commit_group: String::new(),
            page_cache_body_max_bytes: 0,
            operator_readonly: AtomicBool::new(false),
            auto_readonly: AtomicBool::new(true),
            disk_failed: AtomicBool::new(false),
            free_bytes: AtomicU64::new(7),
            total_bytes: AtomicU64::new(9),
            counters: Counters::default(),
            latencies: Default::default(),
            readonly_marker: PathBuf::from("/nonexistent/readonly"),
            connections_max: AtomicU64::new(1),
            free_bytes_min: AtomicU64::new(0),
        })
    }

    /// Every counter and gauge of a backend in `/stats` is in `/metrics` and
    /// vice versa, under the names dashboards already use, and each family's
    /// samples for both backends stay together.
    #[test]
    fn stats_and_metrics_name_the_same_numbers() {
        let (b0, b1) = (backend("b0"), backend("b1"));
        add(&b1.counters.puts, 3);
        b0.latencies.lock().expect("latencies").record("PUT", 250);
        let process = Process {
            backends: vec![b0, b1],
            config: serde_json::Value::Null,
        };
        let json = process.stats();
        assert_eq!(json["daemon"], "pplistener");
        let b = &json["backends"][1];
        assert_eq!(b["name"], "b1");
        assert_eq!(b["mode"], "ro-auto");
        assert_eq!(b["counters"]["puts"], 3);
        assert_eq!(b["gauges"]["free_bytes"], 7);
        assert_eq!(b["gauges"]["readonly"], 1);
        assert_eq!(json["backends"][0]["latency"]["PUT"]["count"], 1);
        let text = process.metrics();
        let from_text = families_in_text(&text);
        assert_eq!(
            families_in_stats(&json, "pplistener", "pplistener"),
            from_text
        );
        for kept in [
            "pplistener_connections",
            "pplistener_connections_total",
            "pplistener_connections_refused_total",
            "pplistener_auth_failures_total",
            "pplistener_puts_total",
            "pplistener_put_errors_total",
            "pplistener_links_created_total",
            "pplistener_bytes_in_total",
            "pplistener_gets_total",
            "pplistener_bytes_out_total",
            "pplistener_lists_total",
            "pplistener_dels_total",
            "pplistener_protocol_errors_total",
            "pplistener_flushes_total",
            "pplistener_flushes_fdatasync_total",
            "pplistener_flushes_dir_fsync_total",
            "pplistener_flushes_syncfs_total",
            "pplistener_flushes_trailing_total",
            "pplistener_flush_errors_total",
            "pplistener_batches_total",
            "pplistener_batch_puts_total",
            "pplistener_batch_puts_max",
            "pplistener_free_bytes",
            "pplistener_total_bytes",
            "pplistener_readonly",
        ] {
            assert!(from_text.contains(kept), "{kept} missing: {text}");
        }
        assert!(
            text.contains("pplistener_puts_total{backend=\"b0\"} 0\npplistener_puts_total{backend=\"b1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("pplistener_latency_seconds_count{backend=\"b0\",op=\"PUT\"} 1\n"),
            "{text}"
        );
    }
}
