//! One backend = one glommio executor pinned to a CPU, with its own data
//! directory and its own port. Nothing is shared between executors on the
//! hot path: each accepts, reads, writes and counts on its own.
//!
//! Besides the accept loop, each executor runs one timer task that publishes
//! its latency histograms for the admin thread and checks free space and inodes
//! (turning the backend read-only under either floor, and back only once a real
//! write succeeds again).
//!
//! [`Ctx`], built here once per executor, is what that executor's
//! connections share: the store, the limits, the commit queue, the index.

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
use powermail_proto::MailboxName;

use crate::config::{Backend, LimitsConfig};
use crate::drain::Drain;
use crate::session::serve;
use crate::stats::{add, BackendShared};
use crate::store::{Space, Store};

/// How often latencies are published and free space is checked.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// What one backend's connections share (all on the same executor).
pub struct Ctx {
    /// Shared with the admin thread.
    pub shared: Arc<BackendShared>,
    /// The on-disk store.
    pub store: Store,
    /// The backend secret.
    pub secret: Vec<u8>,
    /// Limits.
    pub limits: LimitsConfig,
    /// This executor's latency histograms (published by a timer).
    pub latencies: RefCell<Latencies>,
    /// The group-commit queue of the link stage.
    pub committer: Rc<crate::commit::Committer>,
    /// Mailboxes that have a directory on this backend (scanned at start,
    /// grown by PUT before it links, shrunk by NUKE). Anything else is empty.
    pub known: RefCell<std::collections::HashSet<MailboxName>>,
    /// Messages and usage of the mailboxes touched lately: LIST and USAGE
    /// are answered from it (see [`crate::index`]).
    pub index: crate::index::SharedIndex,
    /// This executor's graceful stop: once started, a connection between
    /// requests is closed (see [`crate::drain`]).
    pub drain: Rc<crate::drain::Drain>,
}

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
    /// The process-wide stop request (SIGTERM): this executor drains on it.
    pub stop: Arc<crate::drain::Stop>,
    /// `durability = syncfs`: the commit thread of its file system.
    pub fs_committer: Option<Arc<crate::commit::FsCommitter>>,
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
        stop,
        fs_committer,
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
    let listener = match listen_when_free(backend.listen, &backend.name).await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "{}: bind {}: {e}",
                backend.name, backend.listen
            )));
            return;
        }
    };
    let committer =
        match crate::commit::Committer::start(store.clone(), shared.clone(), fs_committer) {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(format!("{}: {e}", backend.name)));
                return;
            }
        };
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
        drain: Rc::new(Drain::default()),
    });
    glommio::spawn_local(housekeeping(ctx.clone())).detach();
    glommio::spawn_local(crate::drain::watch(stop, ctx.drain.clone())).detach();
    let _ = ready.send(Ok(format!(
        "backend {} listening on {} data {} cpu {} durability {}",
        backend.name,
        backend.listen,
        backend.data_dir.display(),
        backend.cpu,
        backend.durability.as_str()
    )));
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            ctx.drain.wait().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { break };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::error!("backend={} accept failed: {e}", backend.name);
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let c = &shared.counters;
        if c.connections.load(Relaxed) >= shared.connections_max.load(Relaxed) {
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
    drain(listener, &ctx).await;
}

/// Stops accepting (the listener is closed, so the kernel refuses new
/// connections) and waits until this backend's open connections have ended:
/// idle ones close at once, the others after their request (see
/// [`crate::drain`]). The grace period is enforced by the process, not here.
/// The backend's listening socket, bound the way the frontends' are:
/// `SO_REUSEADDR`, so a restart binds at once over connections of the last
/// run still in TIME_WAIT; no `SO_REUSEPORT` (glommio's `bind` sets it), so a
/// second pplistener started with the same config fails to bind instead of
/// silently sharing the port.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    // SAFETY: the fd is a bound, listening TCP socket that we own and hand
    // over whole.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// How long a backend waits at start-up for its port to be let go.
const BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Between two tries.
const BIND_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// [`listen`], waiting up to [`BIND_WAIT`] while the port is in use. A
/// pplistener killed a moment ago still holds its listening sockets after
/// it has been reaped: the kernel tears a dead process's io_uring down
/// asynchronously, and a pending accept keeps the socket until then
/// (measured here: the port was still taken in 37 of 40 restarts right
/// after `kill -9` and `wait`, for 5–10 ms). A restart by systemd, or by a
/// test, must not fail on that. A port that another program holds is
/// reported after the wait, as before.
async fn listen_when_free(addr: std::net::SocketAddr, name: &str) -> std::io::Result<TcpListener> {
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        match listen(addr) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < BIND_WAIT =>
            {
                if !told {
                    log::warn!(
                        "backend={name} {addr} is still in use (a pplistener that just exited \
                         keeps it until its io_uring is torn down); retrying for up to {} s",
                        BIND_WAIT.as_secs()
                    );
                    told = true;
                }
                glommio::timer::sleep(BIND_RETRY).await;
            }
            other => return other,
        }
    }
}

async fn drain(listener: TcpListener, ctx: &Ctx) {
    drop(listener);
    let c = &ctx.shared.counters;
    log::info!(
        "backend={} drain: stopped accepting; connections={}",
        ctx.shared.name,
        c.connections.load(Relaxed)
    );
    while c.connections.load(Relaxed) > 0 {
        glommio::timer::sleep(crate::drain::STOP_POLL).await;
    }
    log::info!("backend={} drained", ctx.shared.name);
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
        let s = &ctx.shared;
        // The byte floor is reloadable (SIGHUP); the rest of the limits are not.
        let mut limits = ctx.limits.clone();
        limits.free_bytes_min = s.free_bytes_min.load(Relaxed);
        let floor_bytes = limits.free_bytes_min;
        let was = s.auto_readonly.load(Relaxed);
        let checked = glommio::executor()
            .spawn_blocking(move || {
                let space = store.space()?;
                let next = auto_readonly_after(was, &space, &limits, || probe_write(&store));
                Ok::<_, std::io::Error>((space, next))
            })
            .await;
        match checked {
            Ok((space, next)) => {
                s.free_bytes.store(space.free_bytes, Relaxed);
                s.total_bytes.store(space.total_bytes, Relaxed);
                if s.auto_readonly.swap(next, Relaxed) != next {
                    log::warn!(
                        "backend={} free_bytes={} floor={} free_inodes={} inode_floor={} mode={}",
                        s.name,
                        space.free_bytes,
                        floor_bytes,
                        space.free_inodes,
                        ctx.limits.free_inodes_min,
                        s.mode()
                    );
                }
            }
            Err(e) => log::error!("backend={} statvfs failed: {e}", s.name),
        }
        glommio::timer::sleep(HOUSEKEEPING_INTERVAL).await;
    }
}

/// True for "no space" errors: ENOSPC (bytes or inodes) and EDQUOT, whether raw or
/// as glommio hands them over (a new `io::Error` keeping only the kind).
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

/// Whether `e` says the disk or its file system failed (`EIO`, or `EROFS`
/// from a file system that remounted itself read-only after an error).
/// glommio's errors reach us as `io::Error::new(kind, text)` with the errno
/// only in the text (`... (os error 5)`), so that is read too.
pub fn is_disk_failure(e: &std::io::Error) -> bool {
    if let Some(code) = e.raw_os_error() {
        return code == libc::EIO || code == libc::EROFS;
    }
    if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
        return true;
    }
    let text = e.to_string();
    text.contains("(os error 5)") || text.contains("(os error 30)")
}

/// Size of the probe write that must succeed before an ro-auto backend takes PUTs again.
const PROBE_WRITE_BYTES: usize = 4096;

/// Whether a small write really succeeds now: a nameless `O_TMPFILE` in `tmp/` (it
/// needs an inode, like every message) holding [`PROBE_WRITE_BYTES`], gone on close.
/// Statistics cannot show a quota (EDQUOT) nor the blocks ext4 keeps for itself;
/// this write can.
fn probe_write(store: &Store) -> bool {
    use std::io::Write;
    let written = crate::store::create_nameless(store.tmp_dir())
        .and_then(|mut f| f.write_all(&[0u8; PROBE_WRITE_BYTES]));
    written.is_ok()
}

/// The automatic read-only flag after a housekeeping tick.
///
/// Below either floor (`free_bytes_min`, `free_inodes_min`) the backend is
/// read-only. Above both it leaves ro-auto only when a real write succeeds
/// (`probe`, called only then): ro-auto set by an ENOSPC or EDQUOT write
/// (see `session::note_io_error`) thus lasts until space is really back, even
/// with a floor of 0, on a full quota or with no inodes left, instead of
/// flapping back to rw every tick. An operator's READWRITE clears it at once.
fn auto_readonly_after(
    was_readonly: bool,
    space: &Space,
    limits: &LimitsConfig,
    probe: impl FnOnce() -> bool,
) -> bool {
    let below =
        space.free_bytes < limits.free_bytes_min || space.free_inodes < limits.free_inodes_min;
    if below {
        return true;
    }
    was_readonly && !probe()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(free_bytes: u64, free_inodes: u64) -> Space {
        Space {
            free_bytes,
            total_bytes: 1 << 30,
            free_inodes,
        }
    }

    #[test]
    fn floors_and_probe_decide_ro_auto() {
        let limits = LimitsConfig {
            free_bytes_min: 1000,
            free_inodes_min: 10,
            ..LimitsConfig::default()
        };
        let never = || -> bool { panic!("probe not expected") };
        // Under either floor: read-only, no probe.
        assert!(auto_readonly_after(false, &space(999, 100), &limits, never));
        assert!(auto_readonly_after(false, &space(5000, 9), &limits, never));
        // Above both floors and writable: stays writable, no probe.
        assert!(!auto_readonly_after(
            false,
            &space(5000, 100),
            &limits,
            never
        ));
        // ro-auto (an ENOSPC write) above both floors: only a write that works clears it.
        assert!(auto_readonly_after(
            true,
            &space(5000, 100),
            &limits,
            || false
        ));
        assert!(!auto_readonly_after(
            true,
            &space(5000, 100),
            &limits,
            || true
        ));
        // Floors of 0 no longer clear an ENOSPC read-only by themselves.
        let zero = LimitsConfig {
            free_bytes_min: 0,
            free_inodes_min: 0,
            ..LimitsConfig::default()
        };
        assert!(auto_readonly_after(true, &space(0, 0), &zero, || false));
    }

    #[test]
    fn out_of_space_is_recognised_raw_and_wrapped() {
        use std::io::{Error, ErrorKind};
        assert!(is_out_of_space(&Error::from_raw_os_error(libc::ENOSPC)));
        assert!(is_out_of_space(&Error::from_raw_os_error(libc::EDQUOT)));
        // glommio's EnhancedIoError becomes io::Error::new(kind, text): no errno left.
        let wrapped = Error::new(ErrorKind::StorageFull, "op: Creating path ...");
        assert!(is_out_of_space(&wrapped));
        assert!(!is_out_of_space(&Error::from_raw_os_error(libc::EIO)));
        assert!(!is_out_of_space(&Error::other("x")));
    }

    #[test]
    fn disk_failures_are_recognised_raw_and_wrapped() {
        use std::io::Error;
        assert!(is_disk_failure(&Error::from_raw_os_error(libc::EIO)));
        assert!(is_disk_failure(&Error::from_raw_os_error(libc::EROFS)));
        let eio = Error::from_raw_os_error(libc::EIO);
        let wrapped = Error::other(format!("op: Writing to /x: {eio}"));
        assert!(is_disk_failure(&wrapped), "{wrapped}");
        assert!(!is_disk_failure(&Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_disk_failure(&Error::from_raw_os_error(libc::ENOENT)));
        assert!(!is_disk_failure(&Error::other("os error 50")));
    }
}
