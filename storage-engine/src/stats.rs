//! What each backend shares with the admin thread: counters (atomics, so the
//! executor never takes a lock to count), the read-only switches, and a
//! latency snapshot the executor publishes once a second from its own
//! lock-free histograms.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use powermail_admin::{AdminHandler, Latencies, Prometheus};

/// Counters of one backend.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused by the connection limit.
    pub connections_refused: AtomicU64,
    /// Failed authentications.
    pub auth_failures: AtomicU64,
    /// Messages stored.
    pub puts: AtomicU64,
    /// PUTs refused or failed.
    pub put_errors: AtomicU64,
    /// Links created by PUTs.
    pub links_created: AtomicU64,
    /// Body bytes stored.
    pub bytes_in: AtomicU64,
    /// Messages sent by GET.
    pub gets: AtomicU64,
    /// Body bytes sent by GET.
    pub bytes_out: AtomicU64,
    /// LIST requests.
    pub lists: AtomicU64,
    /// Requests about a mailbox with no directory here, answered from memory.
    pub empty_fast_path: AtomicU64,
    /// Messages deleted.
    pub dels: AtomicU64,
    /// Protocol errors (bad lines, fatal framing errors).
    pub protocol_errors: AtomicU64,
    /// Mailboxes resident in the index now (published each second).
    pub index_mailboxes: AtomicU64,
    /// Entries resident in the index now: mailboxes + messages (published each second).
    pub index_entries: AtomicU64,
    /// Directory walks that built a mailbox's index (published each second).
    pub index_builds: AtomicU64,
    /// Mailboxes evicted from the index to stay under `index_entries_max`.
    pub index_evictions: AtomicU64,
    /// Device flushes made for PUTs: the sum of the three below.
    pub flushes: AtomicU64,
    /// Body `fdatasync`s (`durability = "file"`, and extra copies past the link limit).
    pub flushes_fdatasync: AtomicU64,
    /// Directory `fsync`s after a batch of links (`durability = "file"`).
    pub flushes_dir_fsync: AtomicU64,
    /// `syncfs` calls, one per batch (`durability = "syncfs"`).
    pub flushes_syncfs: AtomicU64,
    /// Flushes that reported an error (each failed its whole batch).
    pub flush_errors: AtomicU64,
    /// Link batches made durable together.
    pub batches: AtomicU64,
    /// PUTs in those batches (divided by `batches`: PUTs per batch).
    pub batch_puts: AtomicU64,
    /// The most PUTs one batch held.
    pub batch_puts_max: AtomicU64,
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

    fn stats(&self) -> serde_json::Value {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Relaxed);
        serde_json::json!({
            "name": self.name,
            "listen": self.listen.to_string(),
            "data_dir": self.data_dir.display().to_string(),
            "cpu": self.cpu,
            "mode": self.mode(),
            "free_bytes": l(&self.free_bytes),
            "total_bytes": l(&self.total_bytes),
            "connections": l(&c.connections),
            "connections_total": l(&c.connections_total),
            "connections_refused": l(&c.connections_refused),
            "auth_failures": l(&c.auth_failures),
            "puts": l(&c.puts),
            "put_errors": l(&c.put_errors),
            "links_created": l(&c.links_created),
            "bytes_in": l(&c.bytes_in),
            "gets": l(&c.gets),
            "bytes_out": l(&c.bytes_out),
            "lists": l(&c.lists),
            "empty_fast_path": l(&c.empty_fast_path),
            "dels": l(&c.dels),
            "protocol_errors": l(&c.protocol_errors),
            "durability": self.durability.as_str(),
            "flush_before_link": self.flush_before_link,
            "flushes": l(&c.flushes),
            "flushes_fdatasync": l(&c.flushes_fdatasync),
            "flushes_dir_fsync": l(&c.flushes_dir_fsync),
            "flushes_syncfs": l(&c.flushes_syncfs),
            "flush_errors": l(&c.flush_errors),
            "batches": l(&c.batches),
            "batch_puts": l(&c.batch_puts),
            "batch_puts_max": l(&c.batch_puts_max),
            "puts_per_batch": if l(&c.batches) == 0 { 0.0 } else { l(&c.batch_puts) as f64 / l(&c.batches) as f64 },
            "index_mailboxes": l(&c.index_mailboxes),
            "index_entries": l(&c.index_entries),
            "index_builds": l(&c.index_builds),
            "index_evictions": l(&c.index_evictions),
            "latency": self.latencies.lock().map(|l| l.summary()).unwrap_or_default(),
        })
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

impl AdminHandler for Process {
    fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "daemon": "pplistener",
            "version": env!("CARGO_PKG_VERSION"),
            "backends": self.backends.iter().map(|b| b.stats()).collect::<Vec<_>>(),
        })
    }

    fn metrics(&self) -> String {
        let mut p = Prometheus::new();
        for b in &self.backends {
            let labels = format!("backend=\"{}\"", b.name);
            let c = &b.counters;
            let l = |a: &AtomicU64| a.load(Relaxed) as f64;
            for (name, kind, help, v) in [
                (
                    "pplistener_connections",
                    "gauge",
                    "open connections",
                    l(&c.connections),
                ),
                (
                    "pplistener_connections_total",
                    "counter",
                    "accepted connections",
                    l(&c.connections_total),
                ),
                (
                    "pplistener_connections_refused_total",
                    "counter",
                    "connections over the limit",
                    l(&c.connections_refused),
                ),
                (
                    "pplistener_auth_failures_total",
                    "counter",
                    "failed authentications",
                    l(&c.auth_failures),
                ),
                (
                    "pplistener_puts_total",
                    "counter",
                    "messages stored",
                    l(&c.puts),
                ),
                (
                    "pplistener_put_errors_total",
                    "counter",
                    "PUTs refused or failed",
                    l(&c.put_errors),
                ),
                (
                    "pplistener_links_created_total",
                    "counter",
                    "mailbox links created",
                    l(&c.links_created),
                ),
                (
                    "pplistener_bytes_in_total",
                    "counter",
                    "body bytes stored",
                    l(&c.bytes_in),
                ),
                (
                    "pplistener_gets_total",
                    "counter",
                    "messages sent",
                    l(&c.gets),
                ),
                (
                    "pplistener_bytes_out_total",
                    "counter",
                    "body bytes sent",
                    l(&c.bytes_out),
                ),
                (
                    "pplistener_lists_total",
                    "counter",
                    "LIST requests",
                    l(&c.lists),
                ),
                (
                    "pplistener_dels_total",
                    "counter",
                    "messages deleted",
                    l(&c.dels),
                ),
                (
                    "pplistener_protocol_errors_total",
                    "counter",
                    "protocol errors",
                    l(&c.protocol_errors),
                ),
                (
                    "pplistener_flushes_total",
                    "counter",
                    "device flushes for PUTs (fdatasync, directory fsync, syncfs)",
                    l(&c.flushes),
                ),
                (
                    "pplistener_flushes_fdatasync_total",
                    "counter",
                    "body fdatasyncs",
                    l(&c.flushes_fdatasync),
                ),
                (
                    "pplistener_flushes_dir_fsync_total",
                    "counter",
                    "directory fsyncs after link batches",
                    l(&c.flushes_dir_fsync),
                ),
                (
                    "pplistener_flushes_syncfs_total",
                    "counter",
                    "syncfs calls, one per batch in syncfs mode",
                    l(&c.flushes_syncfs),
                ),
                (
                    "pplistener_flush_errors_total",
                    "counter",
                    "flushes that failed their batch",
                    l(&c.flush_errors),
                ),
                (
                    "pplistener_batches_total",
                    "counter",
                    "link batches made durable together",
                    l(&c.batches),
                ),
                (
                    "pplistener_batch_puts_total",
                    "counter",
                    "PUTs in link batches (divide by batches: PUTs per batch)",
                    l(&c.batch_puts),
                ),
                (
                    "pplistener_batch_puts_max",
                    "gauge",
                    "most PUTs in one batch since start",
                    l(&c.batch_puts_max),
                ),
                (
                    "pplistener_free_bytes",
                    "gauge",
                    "free bytes on the data file system",
                    l(&b.free_bytes),
                ),
                (
                    "pplistener_total_bytes",
                    "gauge",
                    "size of the data file system",
                    l(&b.total_bytes),
                ),
                (
                    "pplistener_readonly",
                    "gauge",
                    "1 when PUT is refused",
                    if b.readonly() { 1.0 } else { 0.0 },
                ),
            ] {
                p.metric(name, kind, help, &labels, v);
            }
            if let Ok(lat) = b.latencies.lock() {
                lat.write_prometheus(&mut p, "pplistener_latency_seconds", &labels);
            }
        }
        p.finish()
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
