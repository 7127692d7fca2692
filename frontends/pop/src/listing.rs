//! The mailbox listing: every readable backend asked in parallel, merged.
//!
//! Each readable backend's part runs on one of that backend's long-lived
//! [`ListPool`] workers (no thread per login): first it replays the deletions
//! the [`Journal`] says are owed to it for this mailbox, then it LISTs, and
//! drops from its answer whatever is still owed. The caller waits at most
//! `listing_timeout_ms` for all of them; a backend that is down, slow or
//! answers an error is left out of this session (soft failure: the reader
//! sees the rest, never an error). A worker that finishes late sends its
//! answer to a caller that has stopped listening: it is dropped. Each
//! backend's queue is bounded, and a worker drops a job whose deadline has
//! passed without starting it, so a blackholed backend costs each login at
//! most its time-out and never piles up work.
//!
//! [`merge`] is pure: one entry per message id (the same id on several
//! backends is one message, K copies), sorted by id — ids begin with their
//! arrival time, so this is oldest first and stable across sessions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};

use powermail_frontend::{BackendId, Cluster};
use powermail_proto::{BackendError, ErrorCode, ListEntry, MailboxName, MessageId};

use crate::journal::{Journal, Owed};
use crate::listing_cache::{Kept, ListingCache};

/// One message of the merged listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The message id (UIDL).
    pub msgid: MessageId,
    /// Its size in bytes (from the first backend that listed it).
    pub size_bytes: u64,
    /// The backends that listed it, in configured order.
    pub holders: Vec<BackendId>,
}

impl crate::session::Listing for Vec<Merged> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn entry(&self, index: usize) -> crate::session::Entry<'_> {
        let m = &self[index];
        crate::session::Entry {
            uid: m.msgid.as_str(),
            size_bytes: m.size_bytes,
        }
    }
}

/// What a login's listing found.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The merged messages, oldest first.
    pub messages: Arc<Vec<Merged>>,
    /// Backends whose listing is part of it, ascending.
    pub listed: Vec<BackendId>,
    /// Deletions replayed from the journal on the way.
    pub replayed: usize,
    /// What the [`ListingCache`] did for it.
    pub cache: CacheUse,
}

/// What the [`ListingCache`] did for a login.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheUse {
    /// Nothing was kept for the mailbox (or the cache is off).
    #[default]
    None,
    /// Every backend's generation held: the kept listing was used.
    Hit,
    /// Something was kept but a generation (or the backends) changed: listed again.
    Stale,
}

/// One backend's answer to a listing job.
#[derive(Debug)]
enum Answer {
    /// Its listing, and the mailbox generation it was read at.
    Listed {
        entries: Vec<ListEntry>,
        generation: Option<u64>,
        replayed: usize,
    },
    /// The generation asked about still holds: nothing listed.
    Unchanged,
}

/// Merges per-backend listings; see the module documentation. Linear in
/// the entries for listings sorted by id, as backends send them: one stable
/// sort of all the entries (which merges the sorted runs it finds), then
/// one pass that folds the copies of an id together; ids are moved, not
/// copied.
pub fn merge(mut per_backend: Vec<(BackendId, Vec<ListEntry>)>) -> Vec<Merged> {
    per_backend.sort_by_key(|(id, _)| *id);
    let total = per_backend.iter().map(|(_, e)| e.len()).sum();
    let mut all: Vec<(ListEntry, BackendId)> = Vec::with_capacity(total);
    for (backend, entries) in per_backend {
        all.extend(entries.into_iter().map(|e| (e, backend)));
    }
    // Stable: the copies of one id stay in backend order.
    all.sort_by(|a, b| a.0.msgid.cmp(&b.0.msgid));
    let mut out: Vec<Merged> = Vec::with_capacity(total);
    for (e, backend) in all {
        if let Some(m) = out.last_mut().filter(|m| m.msgid == e.msgid) {
            if m.size_bytes != e.size_bytes {
                log::warn!(
                    "msgid={} size {} on backend {backend}, {} elsewhere",
                    e.msgid,
                    e.size_bytes,
                    m.size_bytes
                );
            }
            if !m.holders.contains(&backend) {
                m.holders.push(backend);
            }
            continue;
        }
        out.push(Merged {
            msgid: e.msgid,
            size_bytes: e.size_bytes,
            holders: vec![backend],
        });
    }
    out
}

/// One backend's part: replay owed deletions, LIST, filter what is still owed.
fn list_one(
    cluster: &Arc<Cluster>,
    journal: &Journal,
    backend: BackendId,
    job: &Job,
) -> Result<Answer, BackendError> {
    let (mailbox, max_messages) = (&job.mailbox, job.max_messages);
    let name = cluster.spec(backend).name.clone();
    let mut conn = cluster
        .checkout(backend)
        .map_err(|e| BackendError::Protocol(e.to_string()))?;
    let owed = journal.owed(&name, mailbox.as_str());
    let mut done = Vec::new();
    for id in &owed {
        let Ok(msgid) = MessageId::parse(id) else {
            continue;
        };
        match conn.del(mailbox, &msgid) {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
            Err(e) => {
                cluster.report_error(backend, &e);
                return Err(e);
            }
        }
        done.push(Owed {
            backend: name.clone(),
            mailbox: mailbox.as_str().to_string(),
            msgid: id.clone(),
        });
    }
    if let Err(e) = journal.complete(&done) {
        log::error!("delete journal: cannot record replayed deletions: {e}");
    }
    // A kept listing to check (and nothing replayed just now, which would
    // have changed it): one USAGE says whether it still holds.
    if let (Some(kept), true) = (job.check, done.is_empty()) {
        let usage = conn
            .usage_send(mailbox)
            .and_then(|()| conn.usage_full_reply());
        match usage {
            Ok(u) if u.generation == Some(kept) => {
                conn.release();
                return Ok(Answer::Unchanged);
            }
            Ok(_) => {}
            Err(e) => {
                cluster.report_error(backend, &e);
                return Err(e);
            }
        }
    }
    let result = conn.list_with_generation(mailbox, max_messages);
    let (entries, generation) = match result {
        Ok(listed) => listed,
        Err(e) if e.code() == Some(ErrorCode::NotFound) => (Vec::new(), None),
        Err(e) => {
            cluster.report_error(backend, &e);
            return Err(e);
        }
    };
    conn.release();
    // Anything still owed (a replay that failed half-way cannot get here,
    // but another process may have added records meanwhile) stays hidden.
    let still_owed = journal.owed(&name, mailbox.as_str());
    // A listing with deletions still owed is not the backend's state at
    // its generation: not to be kept.
    let generation = generation.filter(|_| still_owed.is_empty());
    let entries = entries
        .into_iter()
        .filter(|e| !still_owed.iter().any(|id| id == e.msgid.as_str()))
        .collect();
    Ok(Answer::Listed {
        entries,
        generation,
        replayed: done.len(),
    })
}

/// One backend's answer.
type Part = (BackendId, Result<Answer, BackendError>);

/// A listing asked of one backend's workers.
struct Job {
    mailbox: MailboxName,
    max_messages: usize,
    /// The generation of a kept listing: answer [`Answer::Unchanged`] if it
    /// still holds, else list.
    check: Option<u64>,
    /// Past this instant nobody waits for the answer: the job is dropped.
    deadline: Instant,
    reply: Sender<Part>,
}

/// How the workers fared (for the admin port).
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Jobs dropped unstarted because their deadline had passed.
    pub stale_dropped: AtomicU64,
    /// Backends skipped by a login because their queue was full.
    pub queue_full: AtomicU64,
}

/// Long-lived listing workers, a fixed number per backend, each backend fed
/// through its own bounded queue; see the module documentation. Dropping
/// the pool ends the workers once their queues are empty.
pub struct ListPool {
    cluster: Arc<Cluster>,
    queues: Vec<Sender<Job>>,
    /// Merged listings of big mailboxes kept between logins (`None`: off).
    pub cache: Option<ListingCache>,
    /// Stale and refused jobs.
    pub counters: Arc<PoolCounters>,
}

impl ListPool {
    /// Starts `workers_per_backend` threads for every backend of `cluster`,
    /// each backend with a queue of `queue_max` jobs.
    pub fn start(
        cluster: &Arc<Cluster>,
        journal: &Arc<Journal>,
        workers_per_backend: usize,
        queue_max: usize,
        cache: Option<ListingCache>,
    ) -> std::io::Result<ListPool> {
        assert!(workers_per_backend >= 1 && queue_max >= 1);
        let counters = Arc::new(PoolCounters::default());
        let mut queues = Vec::with_capacity(cluster.len());
        for b in 0..cluster.len() {
            let (tx, rx) = channel::bounded::<Job>(queue_max);
            for w in 0..workers_per_backend {
                let (cluster, journal, rx, counters) = (
                    cluster.clone(),
                    journal.clone(),
                    rx.clone(),
                    counters.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("list-{b}-{w}"))
                    .spawn(move || work(&cluster, &journal, b, &rx, &counters))?;
            }
            queues.push(tx);
        }
        Ok(ListPool {
            cluster: cluster.clone(),
            queues,
            counters,
            cache,
        })
    }

    /// Lists `mailbox` on every readable backend in parallel, waiting at
    /// most `timeout`; see the module documentation. A mailbox whose merged
    /// listing is kept in the [`ListingCache`] is first only checked (one
    /// `USAGE` per backend): if every generation holds, that listing is it.
    pub fn list_all(
        &self,
        mailbox: &MailboxName,
        max_messages: usize,
        timeout: Duration,
    ) -> Listing {
        let deadline = Instant::now() + timeout;
        let backends = self.cluster.readable();
        let kept = self.cache.as_ref().and_then(|c| c.get(mailbox));
        let mut cache = CacheUse::None;
        if let Some(kept) = kept {
            cache = CacheUse::Stale;
            if kept.backends() == backends {
                let check = |b| {
                    kept.generations
                        .iter()
                        .find(|(k, _)| *k == b)
                        .map(|(_, g)| *g)
                };
                let parts = self.ask(mailbox, &backends, check, max_messages, deadline, timeout);
                let unchanged = parts
                    .iter()
                    .filter(|(_, a)| matches!(a, Answer::Unchanged))
                    .count();
                if unchanged == backends.len() {
                    return Listing {
                        messages: kept.messages,
                        listed: backends,
                        replayed: 0,
                        cache: CacheUse::Hit,
                    };
                }
            }
            if let Some(c) = &self.cache {
                c.forget(mailbox);
            }
        }
        let parts = self.ask(
            mailbox,
            &backends,
            |_| None,
            max_messages,
            deadline,
            timeout,
        );
        let mut listing = Listing {
            cache,
            ..Listing::default()
        };
        let mut generations = Vec::with_capacity(parts.len());
        let mut lists = Vec::with_capacity(parts.len());
        for (b, answer) in parts {
            if let Answer::Listed {
                entries,
                generation,
                replayed,
            } = answer
            {
                listing.replayed += replayed;
                listing.listed.push(b);
                lists.push((b, entries));
                if let Some(g) = generation {
                    generations.push((b, g));
                }
            }
        }
        listing.listed.sort_unstable();
        generations.sort_unstable();
        listing.messages = Arc::new(merge(lists));
        // Kept only when complete: every readable backend answered, each
        // with one generation for its whole listing, none over the limit.
        let complete = listing.listed == backends
            && generations.len() == backends.len()
            && listing.messages.len() < max_messages;
        if let (Some(c), true) = (&self.cache, complete) {
            c.put(
                mailbox,
                Kept {
                    generations,
                    messages: listing.messages.clone(),
                },
            );
        }
        listing
    }

    /// Sends one job per backend of `backends` (`check(b)`: the generation
    /// to check on `b`) and collects the answers that come by `deadline`.
    fn ask(
        &self,
        mailbox: &MailboxName,
        backends: &[BackendId],
        check: impl Fn(BackendId) -> Option<u64>,
        max_messages: usize,
        deadline: Instant,
        timeout: Duration,
    ) -> Vec<(BackendId, Answer)> {
        let (tx, rx) = channel::bounded::<Part>(backends.len().max(1));
        let mut asked = 0;
        for &b in backends {
            let Some(queue) = self.queues.get(b) else {
                continue;
            };
            let job = Job {
                mailbox: mailbox.clone(),
                max_messages,
                check: check(b),
                deadline,
                reply: tx.clone(),
            };
            match queue.try_send(job) {
                Ok(()) => asked += 1,
                Err(TrySendError::Full(_)) => {
                    self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                    log::info!(
                        "backend={} skipped for {mailbox}: listing queue full",
                        self.cluster.spec(b).name
                    );
                }
                Err(TrySendError::Disconnected(_)) => {
                    log::error!("listing workers of backend {b} are gone");
                }
            }
        }
        drop(tx);
        collect(&self.cluster, &rx, asked, mailbox, deadline, timeout)
    }
}

/// One worker: takes jobs until the pool is dropped.
fn work(
    cluster: &Arc<Cluster>,
    journal: &Journal,
    backend: BackendId,
    jobs: &Receiver<Job>,
    counters: &PoolCounters,
) {
    while let Ok(job) = jobs.recv() {
        if Instant::now() >= job.deadline {
            counters.stale_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let r = list_one(cluster, journal, backend, &job);
        // The caller may have given up waiting: then nobody listens.
        let _ = job.reply.try_send((backend, r));
    }
}

/// Waits for `asked` answers until `deadline`; a backend that errs or is
/// late is left out (logged).
fn collect(
    cluster: &Cluster,
    rx: &Receiver<Part>,
    asked: usize,
    mailbox: &MailboxName,
    deadline: Instant,
    timeout: Duration,
) -> Vec<(BackendId, Answer)> {
    let mut parts = Vec::with_capacity(asked);
    for _ in 0..asked {
        match rx.recv_deadline(deadline) {
            Ok((b, Ok(answer))) => parts.push((b, answer)),
            Ok((b, Err(e))) => {
                log::info!(
                    "backend={} skipped for {mailbox}: {e}",
                    cluster.spec(b).name
                );
            }
            Err(_) => {
                log::info!("listing {mailbox}: backends slower than {timeout:?} skipped");
                break;
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: &str, size: u64) -> ListEntry {
        ListEntry {
            msgid: MessageId::parse(id).unwrap(),
            size_bytes: size,
        }
    }

    #[test]
    fn merges_copies_and_sorts_by_id() {
        let parts = vec![
            (2, vec![e("0003.a.1", 30), e("0001.a.1", 10)]),
            (0, vec![e("0002.a.1", 20), e("0001.a.1", 10)]),
            (1, vec![]),
        ];
        let m = merge(parts);
        let ids: Vec<&str> = m.iter().map(|x| x.msgid.as_str()).collect();
        assert_eq!(ids, vec!["0001.a.1", "0002.a.1", "0003.a.1"]);
        assert_eq!(m[0].holders, vec![0, 2]);
        assert_eq!(m[1].holders, vec![0]);
        assert_eq!(m[2].holders, vec![2]);
        assert_eq!(m[2].size_bytes, 30);
        assert!(merge(Vec::new()).is_empty());
    }
}
