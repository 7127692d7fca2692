//! One backend = one glommio executor pinned to a CPU, with its own data
//! directory and its own port. Nothing is shared between executors on the
//! hot path: each accepts, reads, writes and counts on its own.
//!
//! Besides the accept loop, each executor runs one timer task that publishes
//! its latency histograms for the admin thread and checks free space (turning
//! the backend read-only under the configured floor, and back above it).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use glommio::io::DmaFile;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use powermail_admin::Latencies;

use crate::config::{Backend, LimitsConfig};
use crate::session::{serve, Ctx};
use crate::stats::{add, BackendShared};
use crate::store::Store;

/// How often latencies are published and free space is checked.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Everything an executor needs, moved into its thread.
pub struct Start {
    /// Which backend.
    pub backend: Backend,
    /// Its opened store.
    pub store: Store,
    /// Shared with the admin thread.
    pub shared: Arc<BackendShared>,
    /// The backend secret.
    pub secret: Vec<u8>,
    /// Limits.
    pub limits: LimitsConfig,
    /// Blocking pool size.
    pub blocking_threads: usize,
    /// Where to report "listening" or the start-up error.
    pub ready: SyncSender<Result<String, String>>,
    /// Mailboxes with a directory on this backend, scanned at start.
    pub known: std::collections::HashSet<powermail_proto::MailboxName>,
}

/// Starts the executor thread of one backend.
pub fn spawn(start: Start) -> anyhow::Result<glommio::ExecutorJoinHandle<()>> {
    let name = format!("ppl-{}", start.backend.name);
    let handle = LocalExecutorBuilder::new(Placement::Fixed(start.backend.cpu))
        .name(&name)
        .blocking_thread_pool_placement(PoolPlacement::Unbound(start.blocking_threads.max(1)))
        .spawn(move || async move { run(start).await })
        .map_err(|e| anyhow::anyhow!("starting executor {name}: {e}"))?;
    Ok(handle)
}

async fn run(start: Start) {
    let Start {
        backend,
        store,
        shared,
        secret,
        limits,
        ready,
        known,
        ..
    } = start;
    // glommio probes polled-I/O support on the first DmaFile it opens; an empty
    // file makes the probe lie on this kernel (see kernel-notes). Open a real one first.
    match DmaFile::open(store.probe_path()).await {
        Ok(f) => {
            let _ = f.read_at(0, 4096).await;
            let _ = f.close().await;
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{}: probe file: {e}", backend.name)));
            return;
        }
    }
    let listener = match TcpListener::bind(backend.listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "{}: bind {}: {e}",
                backend.name, backend.listen
            )));
            return;
        }
    };
    let max_conns = limits.connections_per_backend_max as u64;
    let committer = crate::commit::Committer::start(store.clone());
    let index = crate::index::SharedIndex::new(limits.index_entries_max);
    let ctx = Rc::new(Ctx {
        shared: shared.clone(),
        store,
        secret,
        limits,
        index,
        latencies: RefCell::new(Latencies::new()),
        committer,
        known: RefCell::new(known),
    });
    glommio::spawn_local(housekeeping(ctx.clone())).detach();
    let _ = ready.send(Ok(format!(
        "backend {} listening on {} data {} cpu {}",
        backend.name,
        backend.listen,
        backend.data_dir.display(),
        backend.cpu
    )));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::error!("backend={} accept failed: {e}", backend.name);
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let c = &shared.counters;
        if c.connections.load(Relaxed) >= max_conns {
            add(&c.connections_refused, 1);
            glommio::spawn_local(async move {
                use futures_lite::AsyncWriteExt;
                let mut s = stream;
                let line = powermail_proto::reply::err_line(
                    powermail_proto::ErrorCode::Limit,
                    "too many connections",
                );
                let _ = s.write_all(line.as_bytes()).await;
                let _ = s.close().await;
            })
            .detach();
            continue;
        }
        add(&c.connections, 1);
        add(&c.connections_total, 1);
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            serve(ctx.clone(), stream).await;
            ctx.shared.counters.connections.fetch_sub(1, Relaxed);
        })
        .detach();
    }
}

async fn housekeeping(ctx: Rc<Ctx>) {
    loop {
        if let Ok(mut published) = ctx.shared.latencies.lock() {
            published.clone_from(&ctx.latencies.borrow());
        }
        let ix = ctx.index.stats();
        let c = &ctx.shared.counters;
        c.index_mailboxes.store(ix.mailboxes as u64, Relaxed);
        c.index_entries.store(ix.entries as u64, Relaxed);
        c.index_builds.store(ix.builds, Relaxed);
        c.index_evictions.store(ix.evictions, Relaxed);
        let store = ctx.store.clone();
        if let Ok((free, total)) = glommio::executor()
            .spawn_blocking(move || store.space())
            .await
        {
            let s = &ctx.shared;
            s.free_bytes.store(free, Relaxed);
            s.total_bytes.store(total, Relaxed);
            let low = free < ctx.limits.free_bytes_min;
            if s.auto_readonly.swap(low, Relaxed) != low {
                log::warn!(
                    "backend={} free_bytes={free} floor={} mode={}",
                    s.name,
                    ctx.limits.free_bytes_min,
                    s.mode()
                );
            }
        }
        glommio::timer::sleep(HOUSEKEEPING_INTERVAL).await;
    }
}
