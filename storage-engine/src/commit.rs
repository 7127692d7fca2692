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
//!   On a file system that does not order data before metadata (ext4
//!   without a journal, where pplistener switches to this mode at start-up)
//!   a first `syncfs` makes the bodies durable *before* they are linked, so
//!   no link can reach the media ahead of its body, and a last one after the
//!   links' `syncfs` flushes what that one wrote after its own device flush
//!   (ext4 writes the block device's buffers — directory blocks, bitmaps,
//!   group descriptors — last): three flushes per batch.
//!   The committer also runs one `syncfs` when it starts, so the directories
//!   the store just created are durable before the first PUT.
//!
//! Durability per message, cost per batch. A PUT's reply waits for the batch
//! that holds its links. The queue is bounded by the connection limit: each
//! connection has at most one PUT waiting.

use std::cell::RefCell;
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

/// The per-executor link queue.
pub struct Committer {
    queue: RefCell<Vec<Waiting>>,
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
            queue: RefCell::new(Vec::new()),
            doorbell,
        });
        glommio::spawn_local(run(store, shared, syncfs_on, c.clone(), ring)).detach();
        Ok(c)
    }

    /// Links `job` as part of the next batch; returns once its links are durable.
    pub async fn link(&self, job: LinkJob) -> io::Result<LinkOutcome> {
        let (done, result) = local_channel::new_bounded(1);
        self.queue.borrow_mut().push(Waiting { job, done });
        // Full means the task is already due to wake: nothing to add.
        let _ = self.doorbell.try_send(());
        result
            .recv()
            .await
            .unwrap_or_else(|| Err(io::Error::other("link task stopped")))
    }
}

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
            let batch: Vec<Waiting> = {
                let mut q = c.queue.borrow_mut();
                let n = q.len().min(BATCH_MAX);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            let (jobs, done): (Vec<LinkJob>, Vec<_>) =
                batch.into_iter().map(|w| (w.job, w.done)).unzip();
            counters.batch(jobs.len() as u64);
            let s = store.clone();
            let fs = syncfs_on.clone();
            let flush_first = shared.flush_before_link && fs.is_some();
            // (Bodies' flush,) links, then (syncfs mode) the flush, in one
            // trip to the pool.
            let (mut results, dirs, synced) = glommio::executor()
                .spawn_blocking(move || {
                    if let (true, Some(f)) = (flush_first, &fs) {
                        if let Err(e) = syncfs(f) {
                            let failed = jobs
                                .iter()
                                .map(|_| Err(flush_error("syncfs before linking", &e)))
                                .collect::<Vec<_>>();
                            return (failed, Default::default(), Some(Err(e)));
                        }
                    }
                    // A copy made past the link limit is a new body: it gets
                    // its own fdatasync unless one syncfs covers it in order.
                    let (results, dirs) = s.link_batch(&jobs, fs.is_none() || flush_first);
                    let synced = match &fs {
                        // Without a journal, syncfs writes the block device's
                        // buffers (directory blocks, bitmaps, group
                        // descriptors) after its own device flush: a second
                        // syncfs is the flush that makes them durable.
                        Some(f) if results.iter().any(|r| r.is_ok()) => {
                            Some(syncfs(f).and_then(|()| match flush_first {
                                true => syncfs(f),
                                false => Ok(()),
                            }))
                        }
                        _ => None,
                    };
                    (results, dirs, synced)
                })
                .await;
            if flush_first {
                // The bodies' flush, and the trailing one after the links.
                counters.flushed(&counters.flushes_syncfs, 2);
            }
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
    use std::os::unix::fs::OpenOptionsExt;
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
                        let mut f = std::fs::OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_TMPFILE)
                            .mode(0o600)
                            .open(store.tmp_dir())
                            .expect("O_TMPFILE");
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
