//! Copies of refused messages, deleted for sure.
//!
//! A message answered `451` after its PUTs began may still be stored on some
//! backend: one whose `+OK` was lost (the copy is durable, powersmtp never
//! heard it), or one that took the copy but could not take the undo `DEL`.
//! The sender will retry, so such a copy would be read twice. Before the `451`
//! is sent, one deletion per possible copy (backend, recipient, message id) is
//! recorded in the undo journal ([`Journal`], `state_dir/undo.journal`, shared
//! with powerpop's delete journal code) and `fsync`ed; the undo `DEL`s are then
//! tried at once, and a replayer thread sends whatever is still owed every
//! `undo_replay_interval_ms` to every backend not known to be down, until each
//! deletion is acknowledged ("not found" counts: the copy never was).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use powermail_frontend::journal::{Journal, Owed};
use powermail_frontend::{BackendId, Cluster, Health, PooledConn};
use powermail_proto::{ErrorCode, MailboxName, MessageId};

/// Most owed deletions one replay round sends (the rest wait for the next).
pub const REPLAY_BATCH_MAX: usize = 1000;

/// The undo journal and its counters.
#[derive(Debug)]
pub struct Undo {
    journal: Journal,
    /// Deletions recorded because a copy of a refused message might be stored.
    pub journaled: AtomicU64,
    /// Recorded deletions acknowledged by a backend (at once or replayed).
    pub acknowledged: AtomicU64,
}

impl Undo {
    /// Wraps an opened journal.
    pub fn new(journal: Journal) -> Undo {
        Undo {
            journal,
            journaled: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
        }
    }

    /// Deletions still owed to some backend.
    pub fn owed_count(&self) -> usize {
        self.journal.owed_count()
    }

    /// Records, durably, that every copy of `msgid` for `rcpts` on `backends`
    /// must go. Called before the `451` is sent; an error is logged (the undo is
    /// then only as good as the immediate `DEL`s, as before the journal).
    pub fn record(
        &self,
        cluster: &Cluster,
        backends: &[BackendId],
        rcpts: &[MailboxName],
        msgid: &MessageId,
    ) {
        let owed = owed_for(cluster, backends, rcpts, msgid);
        match self.journal.record(&owed) {
            Ok(()) => {
                self.journaled
                    .fetch_add(owed.len() as u64, Ordering::Relaxed);
            }
            Err(e) => log::error!(
                "msgid={msgid} undo journal: cannot record {} deletions: {e}",
                owed.len()
            ),
        }
    }

    /// Deletes the copies of `msgid` on backend `id` over `conn` now; returns
    /// the connection when it is still clean. Acknowledged deletions are
    /// marked done in the journal; the rest stay owed for the replayer.
    pub fn delete_now(
        &self,
        cluster: &Cluster,
        id: BackendId,
        mut conn: PooledConn,
        rcpts: &[MailboxName],
        msgid: &MessageId,
    ) -> Option<PooledConn> {
        let name = cluster.spec(id).name.clone();
        let mut done = Vec::with_capacity(rcpts.len());
        let mut clean = true;
        for m in rcpts {
            match conn.del(m, msgid) {
                Ok(()) => {}
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
                Err(e) => {
                    cluster.report_error(id, &e);
                    log::warn!(
                        "msgid={msgid} backend={} rcpt={} cannot delete partial copy yet \
                         (journaled, replayed later): {}",
                        powermail_admin::kv(&name),
                        powermail_admin::kv(m.as_str()),
                        powermail_admin::kv(&e.to_string())
                    );
                    clean = false;
                    break;
                }
            }
            done.push(Owed {
                backend: name.clone(),
                mailbox: m.as_str().to_string(),
                msgid: msgid.as_str().to_string(),
            });
        }
        self.completed(&done);
        clean.then_some(conn)
    }

    fn completed(&self, done: &[Owed]) {
        if done.is_empty() {
            return;
        }
        match self.journal.complete(done) {
            Ok(()) => {
                self.acknowledged
                    .fetch_add(done.len() as u64, Ordering::Relaxed);
            }
            Err(e) => log::error!(
                "undo journal: cannot mark {} deletions done: {e}",
                done.len()
            ),
        }
    }

    /// One replay round: at most [`REPLAY_BATCH_MAX`] owed deletions, sent to
    /// every backend that is configured and not down (deletions owed to a backend
    /// no longer configured stay in the journal, counted in `undo_owed`). Returns
    /// how many were acknowledged.
    pub fn replay(&self, cluster: &Arc<Cluster>) -> usize {
        let reachable = |name: &str| {
            cluster
                .find(name)
                .is_some_and(|id| cluster.health(id) != Health::Down)
        };
        let mut by_backend: HashMap<String, Vec<Owed>> = HashMap::new();
        for o in self.journal.some_owed(REPLAY_BATCH_MAX, reachable) {
            by_backend.entry(o.backend.clone()).or_default().push(o);
        }
        let mut acknowledged = 0;
        for (name, owed) in by_backend {
            if let Some(id) = cluster.find(&name) {
                acknowledged += self.replay_backend(cluster, id, &owed);
            }
        }
        acknowledged
    }

    fn replay_backend(&self, cluster: &Arc<Cluster>, id: BackendId, owed: &[Owed]) -> usize {
        let Ok(mut conn) = cluster.checkout(id) else {
            return 0;
        };
        let mut done = Vec::new();
        let mut clean = true;
        for o in owed {
            let (Ok(mailbox), Ok(msgid)) =
                (MailboxName::parse(&o.mailbox), MessageId::parse(&o.msgid))
            else {
                // Cannot come from this program; drop it rather than retry for ever.
                log::warn!("undo journal: dropping unusable record {o:?}");
                done.push(o.clone());
                continue;
            };
            match conn.del(&mailbox, &msgid) {
                Ok(()) => {}
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
                Err(e) => {
                    cluster.report_error(id, &e);
                    clean = false;
                    break;
                }
            }
            done.push(o.clone());
        }
        if clean {
            conn.release();
        }
        if !done.is_empty() {
            log::info!(
                "backend={} undo journal: {} deletions of refused messages' copies replayed",
                cluster.spec(id).name,
                done.len()
            );
        }
        self.completed(&done);
        done.len()
    }
}

/// One deletion per (backend, recipient) of `msgid`.
fn owed_for(
    cluster: &Cluster,
    backends: &[BackendId],
    rcpts: &[MailboxName],
    msgid: &MessageId,
) -> Vec<Owed> {
    let mut out = Vec::with_capacity(backends.len() * rcpts.len());
    for &id in backends {
        for m in rcpts {
            out.push(Owed {
                backend: cluster.spec(id).name.clone(),
                mailbox: m.as_str().to_string(),
                msgid: msgid.as_str().to_string(),
            });
        }
    }
    out
}

/// Starts the replayer thread: a round every `interval` while `undo` lives
/// (the thread holds only a weak reference between rounds).
pub fn spawn_replayer(
    undo: &Arc<Undo>,
    cluster: &Arc<Cluster>,
    interval: Duration,
) -> std::io::Result<()> {
    let (undo, cluster): (Weak<Undo>, Weak<Cluster>) =
        (Arc::downgrade(undo), Arc::downgrade(cluster));
    std::thread::Builder::new()
        .name("undo-replay".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let (Some(undo), Some(cluster)) = (undo.upgrade(), cluster.upgrade()) else {
                return;
            };
            if undo.owed_count() > 0 {
                undo.replay(&cluster);
            }
        })
        .map(drop)
}
