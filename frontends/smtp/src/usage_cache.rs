//! Quota usage kept between transactions.
//!
//! A RCPT for a mailbox with a quota needs the bytes it uses: one `USAGE` round trip to
//! every backend (answered from their in-memory index). Under load that round trip is
//! most of what a quota costs a delivery, so the answer is kept for `ttl_ms`, plus the
//! bytes this process stored in the mailbox since. A kept figure may only **accept**: a
//! recipient or a message it would refuse is checked against a fresh `USAGE` first
//! (`delivery.rs`), so a refusal is never decided on old numbers. What a kept figure
//! can miss is what other frontends stored meanwhile, at most `ttl_ms` worth of their
//! deliveries: quotas are soft limits (docs/SECURITY.md).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use powermail_proto::MailboxName;

/// One mailbox's usage as read, and when.
#[derive(Debug, Clone, Copy)]
struct Kept {
    bytes: u64,
    read_at: Instant,
}

/// Usage figures of mailboxes with a quota, shared by the sessions of one process.
#[derive(Debug)]
pub struct UsageCache {
    ttl: Duration,
    entries_max: usize,
    kept: Mutex<HashMap<MailboxName, Kept>>,
}

impl UsageCache {
    /// Figures are used for `ttl_ms` after they were read (0: never kept); at most
    /// `entries_max` mailboxes are kept.
    pub fn new(ttl_ms: u64, entries_max: usize) -> UsageCache {
        UsageCache {
            ttl: Duration::from_millis(ttl_ms),
            entries_max,
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// The bytes `mailbox` uses, if read less than `ttl_ms` before `now`.
    pub fn get(&self, mailbox: &MailboxName, now: Instant) -> Option<u64> {
        let kept = self.kept.lock().ok()?;
        let k = kept.get(mailbox)?;
        (now.saturating_duration_since(k.read_at) < self.ttl).then_some(k.bytes)
    }

    /// Keeps `bytes` as read from the backends at `now`. When full, the expired
    /// figures go first, then all of them (they are read again as needed).
    pub fn put(&self, mailbox: &MailboxName, bytes: u64, now: Instant) {
        if self.ttl.is_zero() || self.entries_max == 0 {
            return;
        }
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        if kept.len() >= self.entries_max && !kept.contains_key(mailbox) {
            let ttl = self.ttl;
            kept.retain(|_, k| now.saturating_duration_since(k.read_at) < ttl);
            if kept.len() >= self.entries_max {
                kept.clear();
            }
        }
        kept.insert(
            mailbox.clone(),
            Kept {
                bytes,
                read_at: now,
            },
        );
    }

    /// Counts `bytes` this process just stored in `mailbox` (if a figure is kept).
    pub fn add(&self, mailbox: &MailboxName, bytes: u64) {
        if let Ok(mut kept) = self.kept.lock() {
            if let Some(k) = kept.get_mut(mailbox) {
                k.bytes = k.bytes.saturating_add(bytes);
            }
        }
    }

    /// Mailboxes kept now.
    pub fn len(&self) -> usize {
        self.kept.lock().map(|k| k.len()).unwrap_or(0)
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> MailboxName {
        MailboxName::parse(s).expect("valid name")
    }

    #[test]
    fn a_figure_is_used_until_it_is_ttl_old_and_grows_with_what_is_stored() {
        let cache = UsageCache::new(1_000, 10);
        let (a, t0) = (mb("a@x"), Instant::now());
        assert_eq!(cache.get(&a, t0), None);
        cache.put(&a, 500, t0);
        cache.add(&a, 20);
        cache.add(&mb("b@x"), 7);
        assert_eq!(cache.get(&a, t0 + Duration::from_millis(999)), Some(520));
        assert_eq!(cache.get(&a, t0 + Duration::from_millis(1_000)), None);
        assert_eq!(cache.get(&mb("b@x"), t0), None, "add keeps nothing new");
    }

    #[test]
    fn ttl_zero_keeps_nothing() {
        let cache = UsageCache::new(0, 10);
        let now = Instant::now();
        cache.put(&mb("a@x"), 1, now);
        assert_eq!(cache.get(&mb("a@x"), now), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn bounded_expired_figures_go_first() {
        let cache = UsageCache::new(1_000, 2);
        let t0 = Instant::now();
        cache.put(&mb("old@x"), 1, t0);
        cache.put(&mb("new@x"), 2, t0 + Duration::from_millis(900));
        // Full: the expired one goes, the fresh one stays.
        let t1 = t0 + Duration::from_millis(1_500);
        cache.put(&mb("c@x"), 3, t1);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&mb("new@x"), t1), Some(2));
        assert_eq!(cache.get(&mb("c@x"), t1), Some(3));
        // Full of fresh figures: all go, the new one is kept.
        cache.put(&mb("d@x"), 4, t1);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&mb("d@x"), t1), Some(4));
    }
}
