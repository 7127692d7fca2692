//! The process-wide counters and latency histograms powersmtp's admin port
//! reads (`/stats`, `/metrics`): written by the connection threads and by
//! [`crate::delivery`], one set per process.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Mutex;

use powermail_admin::Latencies;

powermail_admin::counters! {
    /// Process-wide counters (monotonic).
    pub struct Counters {
        sessions: Counter = "sessions accepted",
        sessions_refused: Counter = "connections refused with 421 over connections_max",
        proxy_refused: Counter = "connections refused for a missing, malformed or untrusted PROXY header",
        messages: Counter = "messages accepted (250 after DATA)",
        messages_failed: Counter = "messages refused after DATA began (451/552)",
        recipients: Counter = "recipients of accepted messages",
        bytes: Counter = "bytes of accepted messages (one copy, Received header included)",
        quota_usage_reads: Counter = "quota checks that asked every backend for USAGE",
        quota_usage_kept: Counter = "quota checks answered from a usage figure kept less than quota.usage_cache_ms",
    }
}

/// The reply classes `replies` counts, in its order.
pub const REPLY_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// Everything the admin port reads.
#[derive(Debug, Default)]
pub struct Stats {
    /// The counters.
    pub counters: Counters,
    /// Sessions open now.
    pub connections: AtomicUsize,
    /// Replies by class: [`REPLY_CLASSES`].
    pub replies: [AtomicU64; 4],
    /// Latencies: `transaction` (MAIL to final reply), `eod_to_reply`
    /// (end of DATA to the reply), `backend_put` (one PUT, first byte to
    /// durable reply).
    pub latencies: Mutex<Latencies>,
}
