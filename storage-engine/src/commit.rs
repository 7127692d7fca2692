//! Group commit of the link stage, and the durability of each batch.
//!
//! Finished bodies queue here and are linked into their mailboxes in
//! batches. What makes a batch durable depends on the backend's
//! `durability`:
//!
//! * `file` (default): each PUT made its own body durable (its `fdatasync`
//!   runs concurrently with everyone else's through io_uring); one task per
//!   executor links everything queued in one blocking call, then fsyncs each
//!   directory the batch touched once, all of them concurrently.
//! * `syncfs`: bodies are written without a sync, and one `syncfs(2)` makes
//!   every body, link and directory of a batch durable at once. As the call
//!   flushes the whole file system, the `syncfs` backends on one file
//!   system share one commit thread ([`FsCommitter`]), which links the
//!   PUTs of all of them and flushes once for all: two backends on one disk
//!   pay one device flush per batch, not one each. On a file system that
//!   does not order data before metadata (ext4 without a journal) the
//!   flushes are ordered and pipelined as [`FsCommitter`] describes.
//!
//! Durability per message, cost per batch. A PUT's reply waits for the batch
//! that holds its links. The queue is bounded by the connection limit: each
//! connection has at most one PUT waiting.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use crate::config::Durability;
use crate::stats::BackendShared;
use crate::store::{LinkJob, LinkOutcome, Store};

/// Most messages linked in one blocking call.
const BATCH_MAX: usize = 256;

/// A PUT queued on an executor's own link task (`durability = file`).
struct Waiting {
    job: LinkJob,
    done: LocalSender<io::Result<LinkOutcome>>,
}

/// The ordered pipeline's bookkeeping, apart from any I/O.
///
/// Each PUT is stamped with the number of flushes started when it queued.
/// A flush that starts later covers its body: once it ends, the PUT may be
/// linked before the next flush, and what was linked before a flush is
/// durable when that flush ends (a flush here is a `syncfs` and the device
/// flush after it: see [`FsCommitter`]). Flushes run one at a time, in
/// order. In the batch modes only [`Ordered::push`] and
/// [`Ordered::take_queued`] are used.
struct Ordered<Q> {
    /// Flushes started so far.
    flushes_started: u64,
    /// Bodies not yet covered by a flush, each with the count of flushes
    /// started when it queued (non-decreasing front to back).
    queued: VecDeque<(u64, Q)>,
    /// Bodies a finished flush covered: may be linked.
    covered: VecDeque<Q>,
}

impl<Q> Ordered<Q> {
    fn new() -> Self {
        Ordered {
            flushes_started: 0,
            queued: VecDeque::new(),
            covered: VecDeque::new(),
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

    /// Every PUT in the pipeline: queued or covered.
    fn pending(&self) -> impl Iterator<Item = &Q> {
        self.queued.iter().map(|(_, q)| q).chain(&self.covered)
    }

    /// Nothing queued or covered: no flush is due.
    fn idle(&self) -> bool {
        self.queued.is_empty() && self.covered.is_empty()
    }

    /// Returns up to `max` covered PUTs, to be linked before the next flush.
    fn take_covered(&mut self, max: usize) -> Vec<Q> {
        let n = self.covered.len().min(max);
        self.covered.drain(..n).collect()
    }

    /// A flush is about to start (the links before it are made): it covers
    /// every body queued so far, those queued while the links were being
    /// made included.
    fn begin(&mut self) {
        self.flushes_started += 1;
    }

    /// Tests: [`take_covered`](Self::take_covered), then
    /// [`begin`](Self::begin), as if linking took no time.
    #[cfg(test)]
    fn start(&mut self, max: usize) -> Vec<Q> {
        let linked = self.take_covered(max);
        self.begin();
        linked
    }

    /// Bodies queued before the flush started last: what it covers.
    fn take_covered_by_last(&mut self) -> Vec<Q> {
        let started = self.flushes_started;
        let n = self.queued.iter().take_while(|(s, _)| *s < started).count();
        self.queued.drain(..n).map(|(_, q)| q).collect()
    }

    /// The flush started last ended well; `linked` was linked before it
    /// and is returned: durable now. The bodies it covered may be linked.
    fn done<L>(&mut self, linked: Vec<L>) -> Vec<L> {
        let covered = self.take_covered_by_last();
        self.covered.extend(covered);
        linked
    }

    /// The flush started last failed; `linked` was linked before it. Returns
    /// `linked`, which it was to make durable, and every body it was to
    /// cover: all of them fail (the error may have been theirs).
    fn failed<L>(&mut self, linked: Vec<L>) -> (Vec<L>, Vec<Q>) {
        (linked, self.take_covered_by_last())
    }
}

/// The link stage of one backend, as its executor sees it.
pub struct Committer(Kind);

enum Kind {
    /// `durability = file`: a task on this executor links each batch and
    /// fsyncs the directories it touched.
    Local {
        /// PUTs waiting for the next batch (only queued: no flush orders
        /// them here).
        state: RefCell<Ordered<Waiting>>,
        /// Wakes the task.
        doorbell: LocalSender<()>,
    },
    /// `durability = syncfs`: the commit thread of the backend's file
    /// system links and flushes, shared with every other `syncfs` backend
    /// on that file system.
    Shared {
        /// The file system's commit thread.
        fs: Arc<FsCommitter>,
        /// This backend's store, where its PUTs are linked (shared with
        /// each queued PUT without copying its paths).
        store: Arc<Store>,
        /// This backend's counters.
        shared: Arc<BackendShared>,
    },
}

impl Committer {
    /// Creates the link stage of a backend on the current executor: a local
    /// task in `file` mode, or a handle on `fs` (the commit thread of its
    /// file system, which `syncfs` mode requires).
    pub fn start(
        store: Store,
        shared: Arc<BackendShared>,
        fs: Option<Arc<FsCommitter>>,
    ) -> io::Result<Rc<Committer>> {
        match (shared.durability, fs) {
            (Durability::Syncfs, Some(fs)) => Ok(Rc::new(Committer(Kind::Shared {
                fs,
                store: Arc::new(store),
                shared,
            }))),
            (Durability::Syncfs, None) => Err(io::Error::other(
                "durability = syncfs without a commit thread for the file system",
            )),
            (Durability::File, _) => {
                let (doorbell, ring) = local_channel::new_bounded(1);
                let c = Rc::new(Committer(Kind::Local {
                    state: RefCell::new(Ordered::new()),
                    doorbell,
                }));
                glommio::spawn_local(run_file(store, shared, c.clone(), ring)).detach();
                Ok(c)
            }
        }
    }

    /// Links `job` as part of the next batch; returns once its links are durable.
    pub async fn link(&self, job: LinkJob) -> io::Result<LinkOutcome> {
        match &self.0 {
            Kind::Local { state, doorbell } => {
                let (done, result) = local_channel::new_bounded(1);
                state.borrow_mut().push(Waiting { job, done });
                // Full means the task is already due to wake: nothing to add.
                let _ = doorbell.try_send(());
                result
                    .recv()
                    .await
                    .unwrap_or_else(|| Err(io::Error::other("link task stopped")))
            }
            Kind::Shared { fs, store, shared } => fs.link(store, shared, job).await,
        }
    }
}

/// `durability = file`: link everything queued, then fsync each directory
/// the batch touched once (bodies were fdatasynced by their PUTs).
async fn run_file(
    store: Store,
    shared: Arc<BackendShared>,
    c: Rc<Committer>,
    ring: LocalReceiver<()>,
) {
    let Kind::Local { state, .. } = &c.0 else {
        return;
    };
    let counters = &shared.counters;
    while ring.recv().await.is_some() {
        loop {
            let batch = state.borrow_mut().take_queued(BATCH_MAX);
            if batch.is_empty() {
                break;
            }
            let (jobs, done): (Vec<LinkJob>, Vec<_>) =
                batch.into_iter().map(|w| (w.job, w.done)).unzip();
            counters.batch(jobs.len() as u64);
            let s = store.clone();
            let (mut results, dirs) = glommio::executor()
                .spawn_blocking(move || s.link_batch(&jobs, true))
                .await;
            debug_assert_eq!(results.len(), done.len());
            let copies: u64 = results.iter().flatten().map(|o| o.extra_copies).sum();
            counters.flushed(&counters.flushes_fdatasync, copies);
            counters.flushed(&counters.flushes_dir_fsync, dirs.len() as u64);
            if let Err(e) = sync_dirs(dirs).await {
                crate::stats::add(&counters.flush_errors, 1);
                log::error!(
                    "backend={} directory fsync failed, batch of {} refused: {e}",
                    shared.name,
                    done.len()
                );
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(flush_error("directory fsync", &e));
                }
            }
            for (d, r) in done.into_iter().zip(results) {
                let _ = d.try_send(r);
            }
        }
    }
}

/// Where a PUT's result goes: back to the task of its connection, on its
/// backend's executor.
type Reply = flume::Sender<io::Result<LinkOutcome>>;

/// A PUT queued on a file system's commit thread.
struct FsJob {
    store: Arc<Store>,
    shared: Arc<BackendShared>,
    job: LinkJob,
    reply: Reply,
}

/// A PUT the commit thread linked, waiting for the flush that makes it durable.
struct FsLinked {
    reply: Reply,
    result: io::Result<LinkOutcome>,
}

/// What the commit thread and the executors share.
struct FsState {
    ordered: Ordered<FsJob>,
    /// Every handle is gone: end once nothing waits.
    stop: bool,
    /// Tests: queue without starting a flush.
    paused: bool,
    /// The thread has ended: nothing queued would ever be served.
    ended: bool,
    /// Tests: the thread panics at its next step.
    #[cfg(test)]
    panic_next: bool,
}

struct FsInner {
    /// Names the group in logs: its backends, `+`-joined.
    label: String,
    /// Opened before any PUT: `syncfs` on it reports every writeback error
    /// on the file system since its previous call (Linux >= 5.8).
    fs: File,
    flush_before_link: bool,
    state: Mutex<FsState>,
    wake: Condvar,
    /// `syncfs` calls made (the initial one not counted).
    flushes: AtomicU64,
}

/// The commit thread of one file system: links the PUTs of every
/// `durability = syncfs` backend whose data directory is on it and makes
/// them durable together, one `syncfs(2)` per batch — the call flushes the
/// whole file system anyway, so two backends on one disk each running
/// their own would pay two device flushes where one covers both.
///
/// * A file system that orders data before metadata (journaled ext4, xfs):
///   the bodies were written (their writes completed) without a sync; the
///   thread links everything queued, then one `syncfs` makes every body,
///   link and directory of the batch durable at once.
/// * One that does not (ext4 without a journal, `flush_before_link`): ext4
///   writes the block device's buffers — directory blocks, inode tables,
///   bitmaps, group descriptors — at the end of `syncfs`, after its own
///   device flush, so each `syncfs` here is followed by an `fsync` of the
///   directory held open, whose device flush makes them durable (ext4
///   without a journal ends every `fsync` with one). A body may be linked
///   only after such a flush that *started* after its write completed, so
///   no link can reach the media ahead of its body; links are durable when
///   the flush after them ends. One batch alone costs two flushes (bodies,
///   then links); under load they are pipelined ([`Ordered`]): each flush
///   makes durable the links made just before it and covers the body of
///   every PUT queued before it started, while those links were being made
///   included.
///
/// A writeback error reported by a flush fails everything the flush was to
/// make durable or to cover, whichever backend it came from: nothing of it
/// is acknowledged.
pub struct FsCommitter {
    inner: Arc<FsInner>,
}

impl FsCommitter {
    /// Opens `dir` (any directory on the file system), runs one `syncfs` so
    /// that what the stores just created is durable before the first PUT,
    /// and starts the thread. `label` names the group in logs.
    pub fn start(dir: &Path, flush_before_link: bool, label: &str) -> io::Result<Arc<FsCommitter>> {
        let fs = File::open(dir)?;
        syncfs(&fs)?;
        let inner = Arc::new(FsInner {
            label: label.to_string(),
            fs,
            flush_before_link,
            state: Mutex::new(FsState {
                ordered: Ordered::new(),
                stop: false,
                paused: false,
                ended: false,
                #[cfg(test)]
                panic_next: false,
            }),
            wake: Condvar::new(),
            flushes: AtomicU64::new(0),
        });
        let t = inner.clone();
        std::thread::Builder::new()
            .name(format!("ppl-commit-{label}"))
            .spawn(move || t.run())?;
        Ok(Arc::new(FsCommitter { inner }))
    }

    /// Queues a PUT of the backend owning `store` and `shared`; returns once
    /// its links are durable.
    async fn link(
        &self,
        store: &Arc<Store>,
        shared: &Arc<BackendShared>,
        job: LinkJob,
    ) -> io::Result<LinkOutcome> {
        let (reply, result) = flume::bounded(1);
        {
            let mut s = self.inner.lock();
            if s.ended {
                return Err(io::Error::other("commit thread stopped"));
            }
            s.ordered.push(FsJob {
                store: store.clone(),
                shared: shared.clone(),
                job,
                reply,
            });
        }
        self.inner.wake.notify_one();
        result
            .recv_async()
            .await
            .unwrap_or_else(|_| Err(io::Error::other("commit thread stopped")))
    }

    /// `syncfs` calls made for PUTs so far, for all the group's backends.
    #[cfg(test)]
    fn flushes(&self) -> u64 {
        self.inner.flushes.load(Relaxed)
    }

    /// The backends it serves, `+`-joined.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Tests: while paused, PUTs queue and no flush starts.
    #[cfg(test)]
    fn pause(&self, on: bool) {
        self.inner.lock().paused = on;
        self.inner.wake.notify_one();
    }

    /// Tests: the thread panics at its next step.
    #[cfg(test)]
    fn panic_next(&self) {
        self.inner.lock().panic_next = true;
    }

    /// Tests: PUTs queued and not yet taken by a flush.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.inner.lock().ordered.queued.len()
    }
}

impl Drop for FsCommitter {
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.wake.notify_one();
    }
}

impl FsInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, FsState> {
        // The state holds no invariant a panic could break half-way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The thread: one step per flush while anything waits. However it
    /// ends (a panic included), what waits fails and later PUTs are refused
    /// at once rather than queued for nobody.
    fn run(&self) {
        struct Ended<'a>(&'a FsInner);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                let mut s = self.0.lock();
                s.ended = true;
                if !s.stop {
                    log::error!(
                        "commit={} thread ended; its backends refuse PUTs",
                        self.0.label
                    );
                }
                // Dropping the replies fails their PUTs ("commit thread stopped").
                s.ordered = Ordered::new();
            }
        }
        let _ended = Ended(self);
        loop {
            let jobs = {
                let mut s = self.lock();
                while s.paused || s.ordered.idle() {
                    if s.stop && s.ordered.idle() {
                        return;
                    }
                    s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                #[cfg(test)]
                if std::mem::take(&mut s.panic_next) {
                    drop(s);
                    panic!("test: commit thread panics");
                }
                if self.flush_before_link {
                    s.ordered.take_covered(BATCH_MAX)
                } else {
                    s.ordered.take_queued(BATCH_MAX)
                }
            };
            if self.flush_before_link {
                self.step_ordered(jobs);
            } else {
                self.step_batch(jobs);
            }
        }
    }

    /// `syncfs`, counted on the group and on each backend it served. On a
    /// file system that does not order metadata (`flush_before_link`), an
    /// `fsync` of the directory held open follows it: ext4 without a journal
    /// always ends that call with a device flush, which makes durable what
    /// `syncfs` wrote after its own flush (see [`FsCommitter`]).
    fn flush(&self, involved: &[Arc<BackendShared>]) -> io::Result<()> {
        let mut r = syncfs(&self.fs);
        self.flushes.fetch_add(1, Relaxed);
        let trailing = self.flush_before_link && r.is_ok();
        if trailing {
            r = self.fs.sync_all();
        }
        for b in involved {
            b.counters.flushed(&b.counters.flushes_syncfs, 1);
            if trailing {
                b.counters.flushed(&b.counters.flushes_trailing, 1);
            }
            if r.is_err() {
                crate::stats::add(&b.counters.flush_errors, 1);
            }
        }
        r
    }

    /// Batch mode: link everything taken, then one flush if anything linked.
    fn step_batch(&self, jobs: Vec<FsJob>) {
        let (mut linked, involved) = link_all(jobs, false);
        if linked.iter().any(|l| l.result.is_ok()) {
            if let Err(e) = self.flush(&involved) {
                log::error!(
                    "commit={} syncfs failed, batch of {} refused: {e}",
                    self.label,
                    linked.len()
                );
                for l in linked.iter_mut().filter(|l| l.result.is_ok()) {
                    l.result = Err(flush_error("syncfs", &e));
                }
            }
        }
        for l in linked {
            let _ = l.reply.try_send(l.result);
        }
    }

    /// Ordered mode: link what earlier flushes covered, then one flush,
    /// which also covers every body queued until it starts.
    fn step_ordered(&self, jobs: Vec<FsJob>) {
        // A copy made past the link limit is a new body: it gets its own
        // fdatasync, as no earlier flush covered it.
        let (linked, mut involved) = link_all(jobs, true);
        {
            // Everything still in the pipeline is served by this flush too.
            let mut s = self.lock();
            s.ordered.begin();
            s.ordered
                .pending()
                .for_each(|j| note(&mut involved, &j.shared));
        }
        let synced = self.flush(&involved);
        let mut s = self.lock();
        let e = match synced {
            Ok(()) => {
                let durable = s.ordered.done(linked);
                drop(s);
                for l in durable {
                    let _ = l.reply.try_send(l.result);
                }
                return;
            }
            Err(e) => e,
        };
        let (linked, uncovered) = s.ordered.failed(linked);
        drop(s);
        log::error!(
            "commit={} syncfs failed, {} linked and {} queued PUTs refused: {e}",
            self.label,
            linked.len(),
            uncovered.len()
        );
        for l in linked {
            let _ = l
                .reply
                .try_send(l.result.and_then(|_| Err(flush_error("syncfs", &e))));
        }
        for j in uncovered {
            let _ = j
                .reply
                .try_send(Err(flush_error("syncfs before linking", &e)));
        }
    }
}

/// Adds `b` to `list` once.
fn note(list: &mut Vec<Arc<BackendShared>>, b: &Arc<BackendShared>) {
    if !list.iter().any(|x| Arc::ptr_eq(x, b)) {
        list.push(b.clone());
    }
}

/// Links `jobs`, one `link_batch` per backend (each batch counted on its
/// backend); returns the results and the backends that had any.
fn link_all(jobs: Vec<FsJob>, sync_copies: bool) -> (Vec<FsLinked>, Vec<Arc<BackendShared>>) {
    let mut backends: Vec<Arc<BackendShared>> = Vec::new();
    for j in &jobs {
        note(&mut backends, &j.shared);
    }
    let mut out = Vec::with_capacity(jobs.len());
    let mut rest = jobs;
    for b in &backends {
        let (mine, others): (Vec<FsJob>, Vec<FsJob>) =
            rest.into_iter().partition(|j| Arc::ptr_eq(&j.shared, b));
        rest = others;
        let Some(store) = mine.first().map(|j| j.store.clone()) else {
            continue;
        };
        b.counters.batch(mine.len() as u64);
        let (links, replies): (Vec<LinkJob>, Vec<Reply>) =
            mine.into_iter().map(|j| (j.job, j.reply)).unzip();
        let (results, _dirs) = store.link_batch(&links, sync_copies);
        debug_assert_eq!(results.len(), replies.len());
        out.extend(
            replies
                .into_iter()
                .zip(results)
                .map(|(reply, result)| FsLinked { reply, result }),
        );
    }
    (out, backends)
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
            commit_group: "t".into(),
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
    /// one new mailbox at once on each of `backends` backends (their stores
    /// on one file system) and returns their counters afterwards, with the
    /// `syncfs` calls of their commit thread (`syncfs` mode).
    fn batch_of_puts_on(
        durability: Durability,
        flush_before_link: bool,
        backends: usize,
    ) -> (Vec<Arc<BackendShared>>, u64) {
        let dirs: Vec<_> = (0..backends)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let stores: Vec<Store> = dirs
            .iter()
            .map(|d| Store::open(d.path()).expect("open store").0)
            .collect();
        let all: Vec<_> = dirs
            .iter()
            .map(|d| shared(durability, flush_before_link, d.path()))
            .collect();
        let fs = match durability {
            Durability::Syncfs => Some(
                FsCommitter::start(dirs[0].path(), flush_before_link, "t").expect("commit thread"),
            ),
            Durability::File => None,
        };
        let s = all.clone();
        let f = fs.clone();
        glommio::LocalExecutorBuilder::default()
            .blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(1))
            .spawn(move || async move {
                if let Some(fs) = &f {
                    fs.pause(true);
                }
                let mut bodies = Vec::new();
                let mut tasks = Vec::new();
                for (store, shared) in stores.iter().zip(s) {
                    let committer =
                        Committer::start(store.clone(), shared, f.clone()).expect("committer");
                    for i in 0..PUTS {
                        let mut body =
                            crate::store::create_nameless(store.tmp_dir()).expect("O_TMPFILE");
                        body.write_all(format!("body {i}").as_bytes())
                            .expect("write");
                        if durability == Durability::File {
                            body.sync_data().expect("fdatasync");
                        }
                        let job = LinkJob {
                            fd: body.as_raw_fd(),
                            msgid: MessageId::parse(&format!("m{i}")).expect("id"),
                            mailboxes: vec![MailboxName::parse("a@x").expect("name")],
                        };
                        bodies.push(body);
                        let c = committer.clone();
                        tasks.push(glommio::spawn_local(async move { c.link(job).await }));
                    }
                }
                // Every link() queues before a flush starts: the local task
                // first runs after them, the commit thread once unpaused.
                if let Some(fs) = &f {
                    while fs.queued() < tasks.len() {
                        futures_lite::future::yield_now().await;
                    }
                    fs.pause(false);
                }
                for t in tasks {
                    assert_eq!(t.await.expect("linked").created, 1);
                }
                for store in &stores {
                    let listed = store
                        .list(&MailboxName::parse("a@x").expect("name"), 100)
                        .expect("list");
                    assert_eq!(listed.len(), PUTS);
                }
                drop(bodies);
            })
            .expect("executor")
            .join()
            .expect("join");
        (all, fs.map_or(0, |f| f.flushes()))
    }

    /// [`batch_of_puts_on`] one backend: its counters.
    fn batch_of_puts(durability: Durability, flush_before_link: bool) -> Arc<BackendShared> {
        let (mut all, _) = batch_of_puts_on(durability, flush_before_link, 1);
        all.remove(0)
    }

    /// Runs flushes until nothing waits, as the commit thread does, with every
    /// PUT linked as soon as it may be; returns the flushes it took and what
    /// each flush made durable.
    fn drain(o: &mut Ordered<u32>) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        while !o.idle() {
            let linked = o.start(usize::MAX);
            out.push(o.done(linked));
        }
        out
    }

    #[test]
    fn one_put_alone_takes_two_flushes_in_order() {
        let mut o: Ordered<u32> = Ordered::new();
        o.push(1);
        // Flush 1 covers the body; nothing may be linked before it.
        assert!(o.start(8).is_empty());
        assert!(o.done(Vec::<u32>::new()).is_empty());
        // Linked before flush 2, durable once it ends.
        assert_eq!(o.start(8), vec![1]);
        assert_eq!(o.done(vec![10]), vec![10]);
        assert!(o.idle());
    }

    #[test]
    fn a_put_queued_during_a_flush_is_not_covered_by_it() {
        let mut o: Ordered<u32> = Ordered::new();
        o.push(1);
        assert!(o.start(8).is_empty());
        o.push(2); // after flush 1 started: its body is not covered by it
        assert!(o.done(Vec::<u32>::new()).is_empty());
        assert_eq!(o.start(8), vec![1], "only 1 may be linked before flush 2");
        assert_eq!(o.done(vec![10]), vec![10]);
        assert_eq!(o.start(8), vec![2]);
        assert_eq!(o.done(vec![20]), vec![20]);
        assert!(o.idle());
    }

    #[test]
    fn a_put_queued_while_links_are_made_is_covered_by_the_flush_after_them() {
        let mut o: Ordered<u32> = Ordered::new();
        o.push(1);
        assert!(o.start(8).is_empty());
        assert!(o.done(Vec::<u32>::new()).is_empty());
        assert_eq!(o.take_covered(8), vec![1]);
        o.push(2); // while 1 is being linked, before flush 2 starts
        o.begin();
        assert_eq!(o.done(vec![10]), vec![10]);
        assert_eq!(
            o.start(8),
            vec![2],
            "flush 2 covered 2: linked before flush 3"
        );
        assert_eq!(o.done(vec![20]), vec![20]);
        assert!(o.idle());
    }

    #[test]
    fn under_load_each_flush_serves_two_batches() {
        let mut o: Ordered<u32> = Ordered::new();
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
        // 10 flushes in the loop (the first one had nothing to do) + 2 to
        // empty the pipe: 12 for 10 batches, against 20 one batch at a time.
        assert_eq!(flushes, 12);
        let want: Vec<u32> = (0..40).collect();
        assert_eq!(durable, want, "every PUT durable, in order, once");
    }

    #[test]
    fn start_links_at_most_max_and_keeps_the_rest_covered() {
        let mut o: Ordered<u32> = Ordered::new();
        for i in 0..5 {
            o.push(i);
        }
        assert!(o.start(2).is_empty());
        assert!(o.done(Vec::<u32>::new()).is_empty());
        assert_eq!(o.start(2), vec![0, 1]);
        assert!(o.done(Vec::<u32>::new()).is_empty());
        assert_eq!(o.start(2), vec![2, 3]);
        assert!(o.done(Vec::<u32>::new()).is_empty());
        assert_eq!(o.start(2), vec![4]);
    }

    #[test]
    fn a_failed_flush_fails_what_it_was_to_make_durable_or_cover() {
        let mut o: Ordered<u32> = Ordered::new();
        o.push(1);
        assert!(o.start(8).is_empty());
        assert!(o.done(Vec::<u32>::new()).is_empty());
        o.push(2); // queued before flush 2 starts: flush 2 is to cover it
        assert_eq!(o.start(8), vec![1], "1 is linked before flush 2");
        o.push(3); // queued during flush 2: a later flush covers it
        let (linked, uncovered) = o.failed(vec![10]);
        assert_eq!(linked, vec![10]);
        assert_eq!(uncovered, vec![2]);
        // 3 still goes through: flush, link, flush.
        assert_eq!(drain(&mut o), vec![vec![], vec![3u32]]);
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
    fn two_backends_on_one_file_system_share_one_syncfs_per_batch() {
        let (all, flushes) = batch_of_puts_on(Durability::Syncfs, false, 2);
        assert_eq!(flushes, 1, "one syncfs for both backends' {PUTS} PUTs");
        for s in &all {
            let c = &s.counters;
            assert_eq!(c.batches.load(Relaxed), 1);
            assert_eq!(c.batch_puts.load(Relaxed), PUTS as u64);
            assert_eq!(
                c.flushes_syncfs.load(Relaxed),
                1,
                "the shared flush served it"
            );
            assert_eq!(c.flush_errors.load(Relaxed), 0);
        }
    }

    #[test]
    fn two_backends_share_the_ordered_flushes_too() {
        let (all, flushes) = batch_of_puts_on(Durability::Syncfs, true, 2);
        assert_eq!(flushes, 2, "bodies, then links: for both backends");
        for s in &all {
            let c = &s.counters;
            assert_eq!(c.batches.load(Relaxed), 1);
            assert_eq!(c.flushes_syncfs.load(Relaxed), 2);
            assert_eq!(c.flushes_trailing.load(Relaxed), 2);
        }
    }

    #[test]
    fn puts_fail_rather_than_wait_once_the_commit_thread_has_died() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open store");
        let s = shared(Durability::Syncfs, false, dir.path());
        let fs = FsCommitter::start(dir.path(), false, "t").expect("commit thread");
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let committer = Committer::start(store.clone(), s, Some(fs.clone())).expect("c");
                let job = |i: usize, f: &File| LinkJob {
                    fd: f.as_raw_fd(),
                    msgid: MessageId::parse(&format!("m{i}")).expect("id"),
                    mailboxes: vec![MailboxName::parse("a@x").expect("name")],
                };
                let body = crate::store::create_nameless(store.tmp_dir()).expect("O_TMPFILE");
                fs.panic_next();
                let first = committer.link(job(0, &body)).await;
                assert!(first.is_err(), "the PUT waiting on the dead thread fails");
                let later = committer.link(job(1, &body)).await;
                assert!(
                    later.is_err(),
                    "a later PUT is refused, not queued for nobody"
                );
                let listed = store.list(&MailboxName::parse("a@x").expect("name"), 10);
                assert!(
                    listed.map(|l| l.is_empty()).unwrap_or(true),
                    "nothing linked"
                );
            })
            .expect("executor")
            .join()
            .expect("join");
    }

    #[test]
    fn without_ordering_a_batch_flushes_its_bodies_before_linking_them() {
        let s = batch_of_puts(Durability::Syncfs, true);
        let c = &s.counters;
        assert_eq!(c.batches.load(Relaxed), 1);
        assert_eq!(c.batch_puts.load(Relaxed), PUTS as u64);
        assert_eq!(c.flushes_syncfs.load(Relaxed), 2, "bodies, then links");
        assert_eq!(c.flushes_trailing.load(Relaxed), 2, "one after each syncfs");
        assert_eq!(
            c.flushes.load(Relaxed),
            4,
            "four device flushes for {PUTS} PUTs"
        );
        assert_eq!(c.flushes_dir_fsync.load(Relaxed), 0);
        assert_eq!(c.flush_errors.load(Relaxed), 0);
    }
}
