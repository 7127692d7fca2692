//! Group commit of the link stage.
//!
//! Each PUT makes its own body durable (its `fdatasync` runs concurrently with
//! everyone else's through io_uring). Linking is different: linking and
//! fsyncing directories one message at a time costs a thread hand-off and a
//! directory flush per message. So finished bodies queue here, and one task
//! per executor links everything queued in one blocking call, then fsyncs
//! each touched directory once for the whole batch, all of them concurrently
//! through io_uring. Durability per message, cost per batch.
//!
//! The queue is bounded by the connection limit: each connection has at most
//! one PUT waiting.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

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
    /// Creates the queue and starts its task on the current executor.
    pub fn start(store: Store) -> Rc<Committer> {
        let (doorbell, ring) = local_channel::new_bounded(1);
        let c = Rc::new(Committer {
            queue: RefCell::new(Vec::new()),
            doorbell,
        });
        glommio::spawn_local(run(store, c.clone(), ring)).detach();
        c
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

async fn run(store: Store, c: Rc<Committer>, ring: LocalReceiver<()>) {
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
            let s = store.clone();
            let (mut results, dirs) = glommio::executor()
                .spawn_blocking(move || s.link_batch(&jobs))
                .await;
            debug_assert_eq!(results.len(), done.len());
            if let Err(e) = sync_dirs(dirs).await {
                log::error!(
                    "directory fsync failed, batch of {} refused: {e}",
                    done.len()
                );
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(io::Error::new(e.kind(), format!("directory fsync: {e}")));
                }
            }
            for (d, r) in done.into_iter().zip(results) {
                let _ = d.try_send(r);
            }
        }
    }
}

/// Directory fsyncs in flight at once (each holds an open directory).
const DIR_SYNCS_IN_FLIGHT_MAX: usize = 64;

/// fsyncs every directory through io_uring, up to
/// [`DIR_SYNCS_IN_FLIGHT_MAX`] at a time.
async fn sync_dirs(dirs: Vec<std::path::PathBuf>) -> io::Result<()> {
    let mut first_error = None;
    for chunk in dirs.chunks(DIR_SYNCS_IN_FLIGHT_MAX) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|d| {
                glommio::spawn_local(async move {
                    let dir = glommio::io::Directory::open(&d).await?;
                    let r = dir.sync().await;
                    let _ = dir.close().await;
                    r.map_err(io::Error::from)
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
