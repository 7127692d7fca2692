//! Group commit of the link stage, and the durability of each batch.
//!
//! Finished bodies queue here, and one task per executor links everything
//! queued in one blocking call. What makes the batch durable depends on the
//! backend's `durability`:
//!
//! * `file` (default): each PUT made its own body durable (its `fdatasync`
//!   runs concurrently with everyone else's through io_uring); after the
//!   links, each touched directory is fsynced once for the whole batch, all
//!   of them concurrently through io_uring.
//! * `syncfs`: bodies were written (and their writes completed) without a
//!   sync; after the links, in the same blocking call, one `syncfs(2)` of the
//!   backend's file system makes every body, link and directory of the batch
//!   durable at once. The file descriptor it is called on is opened when the
//!   committer starts, before any PUT, so the file system's writeback error
//!   sequence (Linux >= 5.8) reports to it any error since the previous call:
//!   such an error fails the whole batch, nothing of it acknowledged.
//! * `syncfs` on a file system that does not order data before metadata
//!   (ext4 without a journal, where pplistener switches to this mode at
//!   start-up, `flush_before_link`): a body may be linked only after a
//!   `syncfs` that *started* after its write completed, so no link can reach
//!   the media ahead of its body; and a link is durable only after two
//!   `syncfs` calls that started after it (ext4 writes the block device's
//!   buffers — directory blocks, bitmaps, group descriptors — after its own
//!   device flush, so the second call is the flush that makes them durable).
//!   One batch alone costs three flushes (bodies, links, trailing). Under
//!   load the flushes are pipelined ([`Ordered`]): each `syncfs` is at once
//!   the trailing flush of the links made two calls before, the flush of the
//!   links made just before it, and the body flush of every PUT queued before
//!   it started — one flush per batch in steady state, never fewer flushes
//!   per message than the order needs.
//!
//! The committer also runs one `syncfs` when it starts, so the directories
//! the store just created are durable before the first PUT.
//!
//! Durability per message, cost per batch. A PUT's reply waits for the batch
//! that holds its links. The queue is bounded by the connection limit: each
//! connection has at most one PUT waiting.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use crate::config::Durability;
use crate::stats::BackendShared;
use crate::store::{LinkJob, LinkOutcome, Store};

/// Most messages linked in one blocking call.
const BATCH_MAX: usize = 256;

struct Waiting {
    job: LinkJob,
    done: LocalSender<io::Result<LinkOutcome>>,
}

/// A linked PUT and its result, waiting for the flushes that make it durable.
type Linked = (
    LocalSender<io::Result<LinkOutcome>>,
    io::Result<LinkOutcome>,
);

/// The ordered pipeline's bookkeeping, apart from any I/O.
///
/// Each PUT is stamped with the number of flushes started when it queued.
/// A flush that starts later covers its body: once it ends, the PUT may be
/// linked before the next flush. What was linked before a flush is durable
/// when the flush after that one ends. Flushes run one at a time, in order.
/// In the batch modes only [`Ordered::push`] and [`Ordered::take_queued`]
/// are used.
struct Ordered<Q, L> {
    /// Flushes started so far.
    flushes_started: u64,
    /// Bodies not yet covered by a flush, each with the count of flushes
    /// started when it queued (non-decreasing front to back).
    queued: VecDeque<(u64, Q)>,
    /// Bodies a finished flush covered: may be linked.
    covered: VecDeque<Q>,
    /// Linked before the last finished flush: durable after the next one.
    linked: Vec<L>,
}

impl<Q, L> Ordered<Q, L> {
    fn new() -> Self {
        Ordered {
            flushes_started: 0,
            queued: VecDeque::new(),
            covered: VecDeque::new(),
            linked: Vec::new(),
        }
    }

    /// Queues a PUT whose body write has completed.
    fn push(&mut self, q: Q) {
        self.queued.push_back((self.flushes_started, q));
    }

    /// Takes up to `max` queued PUTs regardless of flushes (batch modes).
    fn take_queued(&mut self, max: usize) -> Vec<Q> {
        let n = self.queued.len().min(max);
        self.queued.drain(..n).map(|(_, q)| q).collect()
    }

    /// Nothing queued, covered or waiting: no flush is due.
    fn idle(&self) -> bool {
        self.queued.is_empty() && self.covered.is_empty() && self.linked.is_empty()
    }

    /// A flush is about to start: returns up to `max` covered PUTs, to be
    /// linked before it (in the same blocking call).
    fn start(&mut self, max: usize) -> Vec<Q> {
        self.flushes_started += 1;
        let n = self.covered.len().min(max);
        self.covered.drain(..n).collect()
    }

    /// Bodies queued before the flush started last: what it covers.
    fn take_covered_by_last(&mut self) -> Vec<Q> {
        let started = self.flushes_started;
        let n = self.queued.iter().take_while(|(s, _)| *s < started).count();
        self.queued.drain(..n).map(|(_, q)| q).collect()
    }

    /// The flush started last ended well; `linked` was linked before it.
    /// Returns the PUTs now durable (linked before the previous flush).
    fn done(&mut self, linked: Vec<L>) -> Vec<L> {
        let covered = self.take_covered_by_last();
        self.covered.extend(covered);
        std::mem::replace(&mut self.linked, linked)
    }

    /// The flush started last failed; `linked` was linked before it. Returns
    /// every linked PUT it was to make durable and every body it was to
    /// cover: all of them fail (the error may have been theirs).
    fn failed(&mut self, mut linked: Vec<L>) -> (Vec<L>, Vec<Q>) {
        linked.append(&mut self.linked);
        (linked, self.take_covered_by_last())
    }
}

/// The per-executor link queue.
pub struct Committer {
    state: RefCell<Ordered<Waiting, Linked>>,
    doorbell: LocalSender<()>,
}

impl Committer {
    /// Creates the queue and starts its task on the current executor. In
    /// `syncfs` mode this opens the data directory for the batch's `syncfs`.
    pub fn start(store: Store, shared: Arc<BackendShared>) -> io::Result<Rc<Committer>> {
        let syncfs_on = match shared.durability {
            Durability::File => None,
            Durability::Syncfs => {
                let f = File::open(store.root())?;
                syncfs(&f)?;
                Some(Arc::new(f))
            }
        };
        let (doorbell, ring) = local_channel::new_bounded(1);
        let c = Rc::new(Committer {
            state: RefCell::new(Ordered::new()),
            doorbell,
        });
        match syncfs_on {
            Some(f) if shared.flush_before_link => {
                glommio::spawn_local(run_ordered(store, shared, f, c.clone(), ring)).detach();
            }
            f => {
                glommio::spawn_local(run(store, shared, f, c.clone(), ring)).detach();
            }
        }
        Ok(c)
    }

    /// Links `job` as part of the next batch; returns once its links are durable.
    pub async fn link(&self, job: LinkJob) -> io::Result<LinkOutcome> {
        let (done, result) = local_channel::new_bounded(1);
        self.state.borrow_mut().push(Waiting { job, done });
        // Full means the task is already due to wake: nothing to add.
        let _ = self.doorbell.try_send(());
        result
            .recv()
            .await
            .unwrap_or_else(|| Err(io::Error::other("link task stopped")))
    }
}

/// The ordered pipeline (`flush_before_link`): one `syncfs` after another
/// while anything waits, each preceded by the links of the PUTs the one
/// before it covered, in one trip to the blocking pool.
async fn run_ordered(
    store: Store,
    shared: Arc<BackendShared>,
    fs: Arc<File>,
    c: Rc<Committer>,
    ring: LocalReceiver<()>,
) {
    let counters = &shared.counters;
    loop {
        if c.state.borrow().idle() {
            if ring.recv().await.is_none() {
                return;
            }
            continue;
        }
        let batch = c.state.borrow_mut().start(BATCH_MAX);
        let (jobs, done): (Vec<LinkJob>, Vec<_>) =
            batch.into_iter().map(|w| (w.job, w.done)).unzip();
        if !jobs.is_empty() {
            counters.batch(jobs.len() as u64);
        }
        let s = store.clone();
        let f = fs.clone();
        let (results, synced) = glommio::executor()
            .spawn_blocking(move || {
                // A copy made past the link limit is a new body: it gets
                // its own fdatasync, as no earlier flush covered it.
                (s.link_batch(&jobs, true).0, syncfs(&f))
            })
            .await;
        counters.flushed(&counters.flushes_syncfs, 1);
        debug_assert_eq!(results.len(), done.len());
        let linked: Vec<Linked> = done.into_iter().zip(results).collect();
        let e = match synced {
            Ok(()) => {
                let durable = c.state.borrow_mut().done(linked);
                for (d, r) in durable {
                    let _ = d.try_send(r);
                }
                continue;
            }
            Err(e) => e,
        };
        crate::stats::add(&counters.flush_errors, 1);
        let (linked, uncovered) = c.state.borrow_mut().failed(linked);
        log::error!(
            "backend={} syncfs failed, {} linked and {} queued PUTs refused: {e}",
            shared.name,
            linked.len(),
            uncovered.len()
        );
        for (d, r) in linked {
            let _ = d.try_send(r.and_then(|_| Err(flush_error("syncfs", &e))));
        }
        for w in uncovered {
            let _ = w
                .done
                .try_send(Err(flush_error("syncfs before linking", &e)));
        }
    }
}

/// The batch modes (`file`, and `syncfs` where the file system orders data
/// before metadata): link everything queued, then make it durable.
async fn run(
    store: Store,
    shared: Arc<BackendShared>,
    syncfs_on: Option<Arc<File>>,
    c: Rc<Committer>,
    ring: LocalReceiver<()>,
) {
    let counters = &shared.counters;
    while ring.recv().await.is_some() {
        loop {
            let batch = c.state.borrow_mut().take_queued(BATCH_MAX);
            if batch.is_empty() {
                break;
            }
            let (jobs, done): (Vec<LinkJob>, Vec<_>) =
                batch.into_iter().map(|w| (w.job, w.done)).unzip();
            counters.batch(jobs.len() as u64);
            let s = store.clone();
            let fs = syncfs_on.clone();
            // Links, then (syncfs mode) the flush, in one trip to the pool.
            let (mut results, dirs, synced) = glommio::executor()
                .spawn_blocking(move || {
                    let (results, dirs) = s.link_batch(&jobs, fs.is_none());
                    let synced = match &fs {
                        Some(f) if results.iter().any(|r| r.is_ok()) => Some(syncfs(f)),
                        _ => None,
                    };
                    (results, dirs, synced)
                })
                .await;
            debug_assert_eq!(results.len(), done.len());
            let flushed = match synced {
                Some(r) => {
                    counters.flushed(&counters.flushes_syncfs, 1);
                    r.map_err(|e| ("syncfs", e))
                }
                None if syncfs_on.is_none() => {
                    let copies: u64 = results.iter().flatten().map(|o| o.extra_copies).sum();
                    counters.flushed(&counters.flushes_fdatasync, copies);
                    counters.flushed(&counters.flushes_dir_fsync, dirs.len() as u64);
                    sync_dirs(dirs).await.map_err(|e| ("directory fsync", e))
                }
                // syncfs mode and nothing linked: nothing to make durable.
                None => Ok(()),
            };
            if let Err((what, e)) = flushed {
                crate::stats::add(&counters.flush_errors, 1);
                log::error!(
                    "backend={} {what} failed, batch of {} refused: {e}",
                    shared.name,
                    done.len()
                );
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(flush_error(what, &e));
                }
            }
            for (d, r) in done.into_iter().zip(results) {
                let _ = d.try_send(r);
            }
        }
    }
}

/// The error a PUT gets when its batch's flush failed: the OS error itself
/// where there is one (so a full disk still turns the backend read-only; the
/// log names the flush), else the flush named in the text.
fn flush_error(what: &str, e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), format!("{what}: {e}")),
    }
}

/// `syncfs(2)` of the file system holding `f`: writes back every dirty inode
/// and the journal, flushes the device, and reports writeback errors seen
/// on that file system since the last call on `f` (Linux >= 5.8).
pub fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: a valid open descriptor, owned by `f` for the whole call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Directory fsyncs in flight at once (each holds an open directory).
const DIR_SYNCS_IN_FLIGHT_MAX: usize = 64;

/// fsyncs every directory, up to [`DIR_SYNCS_IN_FLIGHT_MAX`] at a time, on
/// the executor's blocking pool (which bounds how many run at once).
///
/// A full `fsync(2)`, not glommio's `Directory::sync`: that is an io_uring
/// `fdatasync`, and on ext4 an fdatasync of a directory whose size did not
/// change (a new entry in an existing block) may return without committing
/// the journal transaction that holds the entry — the power-cut suite
/// (`tests/powercut`) lost acknowledged messages that way.
async fn sync_dirs(dirs: Vec<std::path::PathBuf>) -> io::Result<()> {
    let mut first_error = None;
    for chunk in dirs.chunks(DIR_SYNCS_IN_FLIGHT_MAX) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|d| {
                glommio::spawn_local(async move {
                    glommio::executor()
                        .spawn_blocking(move || crate::store::sync_dir(&d))
                        .await
                })
            })
            .collect();
        for t in tasks {
            if let Err(e) = t.await {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Counters;
    use powermail_proto::{MailboxName, MessageId};
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

    /// PUTs queued before the committer first runs: one batch.
    const PUTS: usize = 16;

    fn shared(
        durability: Durability,
        flush_before_link: bool,
        dir: &std::path::Path,
    ) -> Arc<BackendShared> {
        Arc::new(BackendShared {
            name: "t".into(),
            listen: "127.0.0.1:1".parse().expect("address"),
            data_dir: dir.to_path_buf(),
            cpu: 0,
            durability,
            flush_before_link,
            page_cache_body_max_bytes: 0,
            operator_readonly: AtomicBool::new(false),
            auto_readonly: AtomicBool::new(false),
            disk_failed: AtomicBool::new(false),
            free_bytes: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            counters: Counters::default(),
            latencies: Default::default(),
            readonly_marker: dir.join("readonly"),
            connections_max: AtomicU64::new(1),
            free_bytes_min: AtomicU64::new(0),
        })
    }

    /// Queues `PUTS` bodies (written like the writer does in this mode) to
    /// one new mailbox at once and returns the counters afterwards.
    fn batch_of_puts(durability: Durability, flush_before_link: bool) -> Arc<BackendShared> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open store");
        let shared = shared(durability, flush_before_link, dir.path());
        let s = shared.clone();
        glommio::LocalExecutorBuilder::default()
            .blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(1))
            .spawn(move || async move {
                let committer = Committer::start(store.clone(), s).expect("committer");
                let bodies: Vec<File> = (0..PUTS)
                    .map(|i| {
                        let mut f =
                            crate::store::create_nameless(store.tmp_dir()).expect("O_TMPFILE");
                        f.write_all(format!("body {i}").as_bytes()).expect("write");
                        if durability == Durability::File {
                            f.sync_data().expect("fdatasync");
                        }
                        f
                    })
                    .collect();
                // Every link() queues before the committer task first runs.
                let tasks: Vec<_> = bodies
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let job = LinkJob {
                            fd: f.as_raw_fd(),
                            msgid: MessageId::parse(&format!("m{i}")).expect("id"),
                            mailboxes: vec![MailboxName::parse("a@x").expect("name")],
                        };
                        let c = committer.clone();
                        glommio::spawn_local(async move { c.link(job).await })
                    })
                    .collect();
                for t in tasks {
                    assert_eq!(t.await.expect("linked").created, 1);
                }
                let listed = store
                    .list(&MailboxName::parse("a@x").expect("name"), 100)
                    .expect("list");
                assert_eq!(listed.len(), PUTS);
                drop(bodies);
            })
            .expect("executor")
            .join()
            .expect("join");
        shared
    }

    /// Runs flushes until nothing waits, as `run_ordered` does, with every
    /// PUT linked as soon as it may be; returns the flushes it took and what
    /// each flush made durable.
    fn drain(o: &mut Ordered<u32, u32>) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        while !o.idle() {
            let linked = o.start(usize::MAX);
            out.push(o.done(linked));
        }
        out
    }

    #[test]
    fn one_put_alone_takes_three_flushes_in_order() {
        let mut o: Ordered<u32, u32> = Ordered::new();
        o.push(1);
        // Flush 1 covers the body; nothing may be linked before it.
        assert!(o.start(8).is_empty());
        assert!(o.done(vec![]).is_empty());
        // Linked before flush 2, durable only after flush 3.
        assert_eq!(o.start(8), vec![1]);
        assert!(o.done(vec![10]).is_empty());
        assert!(o.start(8).is_empty());
        assert_eq!(o.done(vec![]), vec![10]);
        assert!(o.idle());
    }

    #[test]
    fn a_put_queued_during_a_flush_is_not_covered_by_it() {
        let mut o: Ordered<u32, u32> = Ordered::new();
        o.push(1);
        assert!(o.start(8).is_empty());
        o.push(2); // after flush 1 started: its body is not covered by it
        assert!(o.done(vec![]).is_empty());
        assert_eq!(o.start(8), vec![1], "only 1 may be linked before flush 2");
        assert!(o.done(vec![10]).is_empty());
        assert_eq!(o.start(8), vec![2]);
        assert_eq!(o.done(vec![20]), vec![10]);
        assert_eq!(drain(&mut o), vec![vec![20]]);
    }

    #[test]
    fn under_load_each_flush_serves_three_batches() {
        let mut o: Ordered<u32, u32> = Ordered::new();
        let mut flushes = 0;
        let mut durable = Vec::new();
        // Ten batches of 4, each queued while the previous flush runs.
        for b in 0..10u32 {
            let linked = o.start(usize::MAX);
            flushes += 1;
            for i in 0..4 {
                o.push(b * 4 + i);
            }
            durable.extend(o.done(linked));
        }
        let tail = drain(&mut o);
        flushes += tail.len();
        durable.extend(tail.into_iter().flatten());
        // 10 flushes in the loop (the first one had nothing to do) + 3 to
        // empty the pipe: 13 for 10 batches, against 30 one batch at a time.
        assert_eq!(flushes, 13);
        let want: Vec<u32> = (0..40).collect();
        assert_eq!(durable, want, "every PUT durable, in order, once");
    }

    #[test]
    fn start_links_at_most_max_and_keeps_the_rest_covered() {
        let mut o: Ordered<u32, u32> = Ordered::new();
        for i in 0..5 {
            o.push(i);
        }
        assert!(o.start(2).is_empty());
        assert!(o.done(vec![]).is_empty());
        assert_eq!(o.start(2), vec![0, 1]);
        assert!(o.done(vec![]).is_empty());
        assert_eq!(o.start(2), vec![2, 3]);
        assert!(o.done(vec![]).is_empty());
        assert_eq!(o.start(2), vec![4]);
    }

    #[test]
    fn a_failed_flush_fails_what_it_was_to_make_durable_or_cover() {
        let mut o: Ordered<u32, u32> = Ordered::new();
        o.push(1);
        assert!(o.start(8).is_empty());
        assert!(o.done(vec![]).is_empty());
        assert_eq!(o.start(8), vec![1]);
        assert!(o.done(vec![10]).is_empty());
        o.push(2); // queued before flush 3: flush 3 is to cover it
        assert!(o.start(8).is_empty());
        o.push(3); // queued during flush 3: a later flush covers it
        let (linked, uncovered) = o.failed(vec![]);
        assert_eq!(linked, vec![10]);
        assert_eq!(uncovered, vec![2]);
        // 3 still goes through: flush, link, flush, flush.
        assert_eq!(drain(&mut o), vec![vec![], vec![], vec![3u32]]);
        assert!(o.idle());
    }

    #[test]
    fn a_batch_costs_one_syncfs() {
        let s = batch_of_puts(Durability::Syncfs, false);
        let c = &s.counters;
        assert_eq!(c.batches.load(Relaxed), 1);
        assert_eq!(c.batch_puts.load(Relaxed), PUTS as u64);
        assert_eq!(c.flushes_syncfs.load(Relaxed), 1);
        assert_eq!(c.flushes.load(Relaxed), 1, "one flush for {PUTS} PUTs");
        assert_eq!(c.flush_errors.load(Relaxed), 0);
    }

    #[test]
    fn a_batch_in_file_mode_fsyncs_each_touched_directory_once() {
        let s = batch_of_puts(Durability::File, false);
        let c = &s.counters;
        assert_eq!(c.batches.load(Relaxed), 1);
        assert_eq!(c.batch_puts.load(Relaxed), PUTS as u64);
        assert_eq!(c.flushes_syncfs.load(Relaxed), 0);
        // mbox/, mbox/h1/, mbox/h1/h2/ (each got a new entry) and the mailbox.
        assert_eq!(c.flushes_dir_fsync.load(Relaxed), 4);
        // Body fdatasyncs are counted by the session, not here.
        assert_eq!(c.flushes.load(Relaxed), 4);
    }

    #[test]
    fn without_ordering_a_batch_flushes_its_bodies_before_linking_them() {
        let s = batch_of_puts(Durability::Syncfs, true);
        let c = &s.counters;
        assert_eq!(c.batches.load(Relaxed), 1);
        assert_eq!(c.batch_puts.load(Relaxed), PUTS as u64);
        assert_eq!(c.flushes_syncfs.load(Relaxed), 3, "bodies, links, trailing");
        assert_eq!(c.flushes.load(Relaxed), 3, "three flushes for {PUTS} PUTs");
        assert_eq!(c.flushes_dir_fsync.load(Relaxed), 0);
        assert_eq!(c.flush_errors.load(Relaxed), 0);
    }
}
