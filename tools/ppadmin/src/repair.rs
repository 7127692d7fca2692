//! `ppadmin repair` and `ppadmin drain BACKEND`: put copies back where K say they belong.
//!
//! Both are one loop over mailboxes: merge the mailbox's `LIST` on every backend by
//! message id ([`Store::holders`]), and for each message with fewer than K copies GET it
//! from a holder and PUT it — same bytes, same id, one mailbox — to a writable backend that
//! lacks it, until it has K. PUT is durable before `+OK` and idempotent, so the loop is
//! safe to interrupt and re-run: it only ever does what is still missing (resumable).
//!
//! `drain` first switches the backend read-only (PPL/1 `READONLY`, persisted), then for
//! every message on it makes sure K *other* backends hold it, and only after those copies
//! are acknowledged deletes it from the drained backend. POP3 merges listings by message
//! id, so during the move a reader sees each message exactly once. Passes repeat until one
//! finds nothing left, which also catches a PUT that was already under way when the
//! switch happened. Empty mailbox directories are left on the drained disk: removing one
//! (`NUKE`) could race such a late PUT, and the disk is being retired anyway.
//!
//! A POP3 reader deleting a message while it is being copied would see it come back. So
//! each mailbox is worked on under the same lock a POP3 session takes
//! (`powermail_frontend::lock`): the `flock` when powerpop's lock directory is known (same
//! host), and the lease row in the userbase when powerpop's userbase is MySQL/MariaDB (any
//! host); a mailbox whose lock is not free within `--lock-wait-ms` is skipped and
//! reported busy, for the next run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use powermail_frontend::lock::{LeaseConfig, Locks, MailboxLock};
use powermail_proto::{BackendError, ErrorCode, MailboxName, MessageId};

use crate::cluster::ClusterInfo;
use crate::inspect::mailbox;
use crate::store::{human_bytes, Bid, Holders, Store};

/// Most drain passes (each one re-reads the drained backend's DIR).
const DRAIN_PASSES_MAX: usize = 100;

/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What a run did.
#[derive(Debug, Default)]
pub struct Tally {
    /// Mailboxes looked at.
    pub mailboxes: usize,
    /// Messages looked at.
    pub messages: u64,
    /// Copies made.
    pub copied: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Messages deleted from a drained backend (after K copies elsewhere).
    pub moved: u64,
    /// Messages still short of K copies (no writable backend left to take one).
    pub short: u64,
    /// Copies or deletions that failed.
    pub failed: u64,
    /// Mailboxes skipped because a POP3 session held them.
    pub busy: u64,
    /// Messages that every source answered `NOTFOUND` for between the listing and the
    /// copy: deleted meanwhile (a replayed deletion, a refused message's copies cleaned
    /// up), so there is nothing to repair.
    pub vanished: u64,
}

impl Tally {
    /// True when nothing was left undone.
    pub fn complete(&self) -> bool {
        self.short == 0 && self.failed == 0 && self.busy == 0
    }
}

/// powerpop's mailbox locks, when ppadmin runs on the same host.
pub struct PopLocks {
    locks: Option<Arc<Locks>>,
    wait: Duration,
}

/// A held mailbox lock (or nothing, when the lock directory is unknown).
pub struct Held(#[allow(dead_code)] Option<MailboxLock>);

impl PopLocks {
    /// The lock table of `info`'s powerpop, waiting up to `wait` for a busy mailbox.
    /// Fails only for a userbase URL that cannot be understood.
    pub fn new(info: &ClusterInfo, wait: Duration) -> anyhow::Result<PopLocks> {
        let dir = info.pop_lock_dir.clone();
        let userbase = match &info.pop_userbase {
            Some(url) => Some(
                powermail_userbase::open_lazy(url, false)
                    .with_context(|| "opening powerpop's userbase for the mailbox leases")?,
            ),
            None => None,
        };
        let locks = match userbase {
            Some(ub) if ub.leases_span_hosts() => {
                let lease = LeaseConfig {
                    userbase: Arc::from(ub),
                    lease_ms: info.lock_lease_ms,
                };
                Some(Locks::with_lease(dir, lease)?)
            }
            _ => dir.map(|d| Locks::new(Some(d))),
        };
        Ok(PopLocks { locks, wait })
    }

    /// Takes `mailbox`'s lock; `Ok(None)` when a POP3 session kept it for the whole wait.
    fn acquire(&self, mailbox: &MailboxName) -> anyhow::Result<Option<Held>> {
        let Some(locks) = &self.locks else {
            return Ok(Some(Held(None)));
        };
        let deadline = Instant::now() + self.wait;
        loop {
            if let Some(lock) = locks
                .try_lock(mailbox)
                .with_context(|| format!("locking {mailbox}"))?
            {
                return Ok(Some(Held(Some(lock))));
            }
            if Instant::now() >= deadline {
                eprintln!("ppadmin: {mailbox} is in use by a POP3 session; skipped");
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Warns when a powerpop owes deletions to backends: a message a reader deleted while a
/// backend was down is still on that backend until powerpop replays the deletion, and
/// a copy made from it now would bring it back.
fn warn_owed_deletes(info: &ClusterInfo) {
    for d in info
        .daemons
        .iter()
        .filter(|d| d.name.starts_with("powerpop"))
    {
        let owed =
            powermail_admin::client::get_json(&d.addr, info.token_for(d).as_deref(), "/stats")
                .ok()
                .and_then(|v| v["gauges"]["deletes_owed"].as_u64())
                .unwrap_or(0);
        if owed > 0 {
            eprintln!(
                "ppadmin: warning: {} owes {owed} deletions to backends (replayed when those mailboxes are next read); messages they concern may be copied back",
                d.name
            );
        }
    }
}

/// Prints progress on stderr at most once per [`PROGRESS_EVERY`].
struct Progress {
    what: String,
    total: usize,
    last: Instant,
}

impl Progress {
    fn new(what: String, total: usize) -> Progress {
        Progress {
            what,
            total,
            last: Instant::now(),
        }
    }

    fn tick(&mut self, done: usize, t: &Tally, force: bool) {
        if force || self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            eprintln!(
                "{}: {done}/{} mailboxes, {} messages, {} copies made ({}), {} moved, {} short, {} failed, {} busy, {} vanished",
                self.what,
                self.total,
                t.messages,
                t.copied,
                human_bytes(t.bytes),
                t.moved,
                t.short,
                t.failed,
                t.busy,
                t.vanished
            );
        }
    }
}

/// Picks the writable backend to take a new copy: not a holder, not excluded, and the one
/// that received fewest copies in this run (spreads the load over the survivors).
fn pick_target(
    store: &Store<'_>,
    have: &Holders,
    excluded: &BTreeSet<Bid>,
    given: &BTreeMap<Bid, u64>,
) -> Option<Bid> {
    store
        .writable()
        .into_iter()
        .filter(|b| !have.on(*b) && !excluded.contains(b))
        .min_by_key(|b| (given.get(b).copied().unwrap_or(0), *b))
}

/// The state of one run: K, what it did, and how many copies each backend took.
struct Mover {
    k: usize,
    tally: Tally,
    given: BTreeMap<Bid, u64>,
}

impl Mover {
    fn new(k: usize) -> Mover {
        Mover {
            k,
            tally: Tally::default(),
            given: BTreeMap::new(),
        }
    }

    /// Brings one message of `mailbox` up to K copies among the backends in `have`,
    /// reading from the first of `sources` that works. Targets are writable backends, so
    /// a drained (read-only) backend is never one. Returns the holders afterwards.
    fn replicate(
        &mut self,
        store: &mut Store<'_>,
        mailbox: &MailboxName,
        msgid: &MessageId,
        mut have: Holders,
        sources: &[Bid],
    ) -> Holders {
        let mut excluded = BTreeSet::new();
        while have.copies() < self.k {
            let Some(target) = pick_target(store, &have, &excluded, &self.given) else {
                self.tally.short += 1;
                break;
            };
            let mut done = false;
            let mut not_found = 0;
            for &source in sources {
                match store.copy(mailbox, msgid, source, target) {
                    Ok(n) => {
                        have.0.push((target, n));
                        self.tally.copied += 1;
                        self.tally.bytes += n;
                        *self.given.entry(target).or_default() += 1;
                        done = true;
                        break;
                    }
                    Err(e) if is_not_found(&e) => not_found += 1,
                    Err(e) => eprintln!(
                        "ppadmin: copy {mailbox} {msgid} {} -> {}: {e:#}",
                        store.name(source),
                        store.name(target)
                    ),
                }
            }
            if !done && not_found == sources.len() {
                self.tally.vanished += 1;
                break;
            }
            if !done {
                self.tally.failed += 1;
                // Try another target (a source or target that broke is marked down by `call`).
                excluded.insert(target);
            }
        }
        have
    }
}

/// True when a copy failed because its source no longer holds the message.
fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<BackendError>()
        .is_some_and(|b| b.code() == Some(ErrorCode::NotFound))
}

/// `repair [--mailbox M]`: every message (of every mailbox, or of `only`) up to K copies.
pub fn repair(info: &ClusterInfo, only: Option<&str>, locks: &PopLocks) -> anyhow::Result<Tally> {
    let k = info.replicas;
    warn_owed_deletes(info);
    let mut store = Store::open(info);
    let mailboxes: Vec<MailboxName> = match only {
        Some(m) => vec![mailbox(m)?],
        None => store.dir_all().into_keys().collect(),
    };
    if store.writable().len() < k {
        eprintln!(
            "ppadmin: only {} writable backends for K = {k}: some messages will stay short",
            store.writable().len()
        );
    }
    let mut run = Mover::new(k);
    let mut progress = Progress::new("repair".into(), mailboxes.len());
    for (i, mb) in mailboxes.iter().enumerate() {
        let Some(_held) = locks.acquire(mb)? else {
            run.tally.busy += 1;
            continue;
        };
        for (msgid, h) in store.holders(mb) {
            run.tally.messages += 1;
            if h.copies() < k {
                let sources: Vec<Bid> = h.0.iter().map(|(b, _)| *b).collect();
                run.replicate(&mut store, mb, &msgid, h, &sources);
            }
        }
        run.tally.mailboxes += 1;
        progress.tick(i + 1, &run.tally, false);
    }
    progress.tick(mailboxes.len(), &run.tally, true);
    Ok(run.tally)
}

/// `drain BACKEND`: read-only, then every message moved to others (keeping K), then
/// deleted from it.
pub fn drain(info: &ClusterInfo, name: &str, locks: &PopLocks) -> anyhow::Result<Tally> {
    let k = info.replicas;
    warn_owed_deletes(info);
    let wanted = info.backend(name)?.name.clone();
    let d = info
        .backends
        .iter()
        .position(|b| b.name == wanted)
        .expect("found by name above");
    let mut store = Store::open(info);
    if store.mode(d).is_none() {
        bail!("backend {wanted} is down: nothing can be read from it (use `repair` if it is lost for good)");
    }
    store.set_readonly(d, true)?;
    eprintln!("drain {wanted}: now read-only");
    let others = store.writable().len();
    if others < k {
        eprintln!(
            "ppadmin: only {others} other writable backends for K = {k}: messages that cannot get K copies elsewhere stay on {wanted}"
        );
    }
    let mut run = Mover::new(k);
    for pass in 1..=DRAIN_PASSES_MAX {
        let mailboxes = store.dir_of(d)?;
        let moved_before = run.tally.moved;
        run.tally.busy = 0;
        let mut left = 0u64;
        let mut progress = Progress::new(format!("drain {wanted} pass {pass}"), mailboxes.len());
        for (i, mb) in mailboxes.iter().enumerate() {
            let Some(_held) = locks.acquire(mb)? else {
                run.tally.busy += 1;
                left += 1;
                continue;
            };
            for (msgid, h) in store.holders(mb) {
                if !h.on(d) {
                    continue;
                }
                left += 1;
                run.tally.messages += 1;
                let elsewhere = Holders(h.0.iter().copied().filter(|(b, _)| *b != d).collect());
                // The drained copy first: it is the one known to be readable right now.
                let mut sources = vec![d];
                sources.extend(elsewhere.0.iter().map(|(b, _)| *b));
                let after = run.replicate(&mut store, mb, &msgid, elsewhere, &sources);
                if after.copies() < k {
                    continue;
                }
                match store.call(d, |c| c.del(mb, &msgid)) {
                    Ok(()) => run.tally.moved += 1,
                    Err(e) => {
                        run.tally.failed += 1;
                        eprintln!("ppadmin: DEL {mb} {msgid} on {wanted}: {e:#}");
                    }
                }
            }
            run.tally.mailboxes += 1;
            progress.tick(i + 1, &run.tally, false);
        }
        progress.tick(mailboxes.len(), &run.tally, true);
        if left == 0 {
            eprintln!("drain {wanted}: empty");
            return Ok(run.tally);
        }
        if run.tally.moved == moved_before {
            // Messages left and none could move: another pass would do the same.
            break;
        }
    }
    Ok(run.tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_answering_notfound_is_told_apart_from_a_failure() {
        let gone: anyhow::Error = Err::<(), _>(BackendError::Refused {
            code: Some(ErrorCode::NotFound),
            text: "no such message".into(),
        })
        .context("backend b0")
        .unwrap_err();
        assert!(is_not_found(&gone));
        let temp: anyhow::Error = Err::<(), _>(BackendError::Refused {
            code: Some(ErrorCode::Temp),
            text: "busy".into(),
        })
        .context("backend b0")
        .unwrap_err();
        assert!(!is_not_found(&temp));
        assert!(!is_not_found(&anyhow::anyhow!("backend b0 is down")));
    }
}
