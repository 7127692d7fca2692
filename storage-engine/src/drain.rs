//! Graceful stop (SIGTERM or SIGINT): no new connections, open requests
//! finish, idle connections close, and the process exits 0 within
//! `shutdown_grace_ms`.
//!
//! The signal thread sets one process-wide flag ([`Stop`]). On each executor a
//! watcher task ([`watch`]) sees it within [`STOP_POLL`] and starts that
//! executor's [`Drain`]: the accept loop ends and drops its listener (the
//! kernel then refuses new connections), a connection between requests is
//! closed, and a connection in the middle of one finishes it first. A PUT
//! being received is thus either completed, made durable and answered `+OK`,
//! or (when the grace runs out first) dropped unseen: its body is a nameless
//! `O_TMPFILE` until it is linked. PPL/1 has no "going away" reply, so a
//! connection is closed without one; frontends treat that as a backend
//! failure and use another. The process exits 0 once every executor has
//! drained ([`Stop::finish`] from `main`), or when the grace is over
//! ([`on_stop_signal`]), whichever comes first.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use glommio::sync::Semaphore;

use crate::stats::BackendShared;

/// How often each executor's watcher looks at the process-wide stop flag, and
/// how often a draining executor counts its open connections.
pub const STOP_POLL: Duration = Duration::from_millis(50);

/// One executor's drain, started once; idle connections and the accept loop
/// wait on it.
pub struct Drain {
    started: Cell<bool>,
    /// Never holds a permit: closing it wakes every waiter at once.
    closed: Semaphore,
}

impl Default for Drain {
    fn default() -> Drain {
        Drain {
            started: Cell::new(false),
            closed: Semaphore::new(0),
        }
    }
}

impl Drain {
    /// Whether this executor is draining.
    pub fn started(&self) -> bool {
        self.started.get()
    }

    /// Starts draining and wakes everything waiting in [`Drain::wait`].
    pub fn start(&self) {
        self.started.set(true);
        self.closed.close();
    }

    /// Returns once the drain has started (at once if it has).
    pub async fn wait(&self) {
        if self.started() {
            return;
        }
        // A closed semaphore answers every waiter with an error: that is the signal.
        let _ = self.closed.acquire(1).await;
    }
}

/// Runs on each executor: starts `drain` once `stop` is requested.
pub async fn watch(stop: Arc<Stop>, drain: std::rc::Rc<Drain>) {
    while !stop.requested() {
        glommio::timer::sleep(STOP_POLL).await;
    }
    drain.start();
}

/// Connections open and PUTs stored, summed over every backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Connections open now.
    pub connections: u64,
    /// Messages stored since start.
    pub puts: u64,
}

impl Totals {
    /// Sums the counters of `backends`.
    pub fn of(backends: &[Arc<BackendShared>]) -> Totals {
        let mut t = Totals::default();
        for b in backends {
            t.connections += b.counters.connections.load(Ordering::Relaxed);
            t.puts += b.counters.puts.load(Ordering::Relaxed);
        }
        t
    }
}

/// The process-wide stop request, and the one start and end log line of a drain.
#[derive(Default)]
pub struct Stop {
    requested: AtomicBool,
    started: OnceLock<(Instant, Totals)>,
    ended: AtomicBool,
}

impl Stop {
    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Requests the stop and logs `drain start` with the counts; `false` if it
    /// had been requested already.
    pub fn request(&self, backends: &[Arc<BackendShared>], grace_ms: u64) -> bool {
        let at_start = Totals::of(backends);
        let _ = self.started.set((Instant::now(), at_start));
        if self.requested.swap(true, Ordering::SeqCst) {
            return false;
        }
        log::warn!(
            "pplistener drain start: backends={} connections={} grace_ms={grace_ms}",
            backends.len(),
            at_start.connections
        );
        println!(
            "pplistener: stopping ({} connections open)",
            at_start.connections
        );
        true
    }

    /// Logs `drain end` once (`reason` is `drained` or `grace`) with the
    /// connections still open (about to be dropped) and the PUTs completed
    /// during the drain.
    pub fn finish(&self, backends: &[Arc<BackendShared>], reason: &str) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let now = Totals::of(backends);
        let (since, at_start) = self
            .started
            .get()
            .copied()
            .unwrap_or_else(|| (Instant::now(), Totals::default()));
        log::warn!(
            "pplistener drain end: reason={reason} connections_dropped={} puts_during_drain={} elapsed_ms={}",
            now.connections,
            now.puts.saturating_sub(at_start.puts),
            since.elapsed().as_millis()
        );
        println!("pplistener: stopped");
    }
}

/// On the first SIGTERM or SIGINT: requests `stop`, tells systemd
/// `STOPPING=1`, and after `grace` ends the process with status 0 whatever is
/// still open (`main` ends it sooner once every executor has drained). A
/// second signal ends the process at once, with status 1
/// ([`powermail_admin::signals::on_sigterm`]).
pub fn on_stop_signal(
    stop: Arc<Stop>,
    backends: Vec<Arc<BackendShared>>,
    grace: Duration,
) -> std::io::Result<()> {
    powermail_admin::signals::on_sigterm(move || {
        stop.request(&backends, grace.as_millis() as u64);
        if let Err(e) = powermail_admin::systemd::notify("STOPPING=1") {
            log::warn!("sd_notify STOPPING=1 failed: {e}");
        }
        std::thread::sleep(grace);
        stop.finish(&backends, "grace");
        std::process::exit(0);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_is_requested_once_and_ends_once() {
        let stop = Stop::default();
        assert!(!stop.requested());
        assert!(stop.request(&[], 10));
        assert!(stop.requested());
        assert!(!stop.request(&[], 10), "a second request changes nothing");
        stop.finish(&[], "drained");
        assert!(stop.ended.load(Ordering::SeqCst));
    }
}
