//! The process-wide counters and latency histograms powersmtp's admin port
//! reads (`/stats`, `/metrics`): written by the connection threads and by
//! [`crate::delivery`], one set per process.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Mutex;

use powermail_admin::Latencies;

/// Process-wide counters, read by the admin port.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions accepted.
    pub sessions: AtomicU64,
    /// Connections refused with 421 (over `connections_max`).
    pub sessions_refused: AtomicU64,
    /// Connections refused for a missing, malformed or untrusted PROXY header.
    pub proxy_refused: AtomicU64,
    /// Sessions open now.
    pub connections: AtomicUsize,
    /// Messages accepted (250 after DATA).
    pub messages: AtomicU64,
    /// Messages refused after DATA began (451/552).
    pub messages_failed: AtomicU64,
    /// Recipients of accepted messages.
    pub recipients: AtomicU64,
    /// Bytes of accepted messages (one copy, Received header included).
    pub bytes: AtomicU64,
    /// Replies by class: 2xx, 3xx, 4xx, 5xx.
    pub replies: [AtomicU64; 4],
    /// Latencies: `transaction` (MAIL to final reply), `eod_to_reply`
    /// (end of DATA to the reply), `backend_put` (one PUT, first byte to
    /// durable reply).
    pub latencies: Mutex<Latencies>,
}
