//! Login-failure throttling, per client IP and per account.
//!
//! Every failure is answered after a delay (slowing a guesser down without
//! slowing anyone else: the delay is in that session's own thread). Too many
//! failures within a window lock the IP, or the account, out for a while:
//! every attempt is then refused before the password is even checked, so a
//! guesser learns nothing during the lock-out. Memory is bounded by
//! `tracked_max` records.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::ThrottleSettings;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    Account(String),
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// The throttle table of one process.
#[derive(Debug)]
pub struct Throttle {
    cfg: ThrottleSettings,
    table: Mutex<HashMap<Key, Record>>,
}

impl Throttle {
    /// An empty table.
    pub fn new(cfg: ThrottleSettings) -> Throttle {
        Throttle {
            cfg,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The delay to apply before answering a failed login.
    pub fn failure_delay(&self) -> Duration {
        Duration::from_millis(self.cfg.failure_delay_ms)
    }

    fn keys(ip: IpAddr, account: &str) -> [Key; 2] {
        [Key::Ip(ip), Key::Account(account.to_ascii_lowercase())]
    }

    /// True if `ip` or `account` is locked out at `now`.
    pub fn locked(&self, ip: IpAddr, account: &str, now: Instant) -> bool {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        Self::keys(ip, account).iter().any(|k| {
            table
                .get(k)
                .and_then(|r| r.locked_until)
                .is_some_and(|until| now < until)
        })
    }

    /// Counts one failure for `ip` and `account`.
    pub fn failed(&self, ip: IpAddr, account: &str, now: Instant) {
        let window = Duration::from_millis(self.cfg.window_ms);
        let lockout = Duration::from_millis(self.cfg.lockout_ms);
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() + 2 > self.cfg.tracked_max {
            table.retain(|_, r| {
                now.duration_since(r.window_start) < window
                    || r.locked_until.is_some_and(|u| now < u)
            });
            if table.len() + 2 > self.cfg.tracked_max {
                log::warn!(
                    "throttle table full ({} records); forgetting all",
                    table.len()
                );
                table.clear();
            }
        }
        for key in Self::keys(ip, account) {
            let r = table.entry(key).or_insert(Record {
                failures: 0,
                window_start: now,
                locked_until: None,
            });
            if now.duration_since(r.window_start) >= window {
                r.failures = 0;
                r.window_start = now;
            }
            r.failures += 1;
            if r.failures >= self.cfg.failures_max {
                r.locked_until = Some(now + lockout);
                r.failures = 0;
                r.window_start = now;
            }
        }
    }

    /// A successful login forgets the account's failures (the IP's stay: one
    /// right password must not reset a guesser spraying many accounts).
    pub fn succeeded(&self, account: &str) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.remove(&Key::Account(account.to_ascii_lowercase()));
    }

    /// Records held.
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ThrottleSettings {
        ThrottleSettings {
            failure_delay_ms: 0,
            failures_max: 3,
            window_ms: 1000,
            lockout_ms: 5000,
            tracked_max: 100,
        }
    }

    #[test]
    fn locks_out_after_failures_then_expires() {
        let t = Throttle::new(cfg());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        t.failed(ip, "a@x", t0);
        t.failed(ip, "a@x", t0);
        assert!(!t.locked(ip, "a@x", t0));
        t.failed(ip, "A@x", t0);
        assert!(t.locked(ip, "b@x", t0), "the IP is locked");
        assert!(t.locked(other, "a@x", t0), "the account is locked");
        assert!(!t.locked(other, "b@x", t0));
        assert!(!t.locked(ip, "a@x", t0 + Duration::from_secs(6)));
    }

    #[test]
    fn window_resets_and_success_forgets_the_account() {
        let t = Throttle::new(cfg());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        t.failed(ip, "a@x", t0);
        t.failed(ip, "a@x", t0);
        t.failed(ip, "a@x", t0 + Duration::from_secs(2));
        assert!(!t.locked(ip, "a@x", t0 + Duration::from_secs(2)));
        t.succeeded("a@x");
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn memory_is_bounded() {
        let t = Throttle::new(ThrottleSettings {
            tracked_max: 10,
            ..cfg()
        });
        let now = Instant::now();
        for i in 0..100u32 {
            t.failed(IpAddr::from(i.to_be_bytes()), &format!("u{i}@x"), now);
            assert!(t.tracked() <= 10);
        }
    }
}
