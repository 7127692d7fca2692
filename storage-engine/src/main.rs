//! `pplistener`: PowerMail's message store.
//!
//! A very simple-minded file server for message files (seed 000), rebuilt
//! thread-per-core: one glommio executor per configured backend, each pinned
//! to a CPU and given its own data directory and port. See
//! `proto/PROTOCOL.md` for the wire protocol and `docs/ARCHITECTURE.md`
//! for where it sits.

mod backend;
mod commit;
mod config;
mod conn_state;
mod drain;
mod index;
mod session;
mod stats;
mod store;
mod writer;
mod zerocopy;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;

fn main() {
    let daemon = powermail_admin::daemon::Daemon {
        name: "pplistener",
        about: "PowerMail message store (one backend per CPU/disk)",
    };
    powermail_admin::daemon::run(&daemon, config::Config::parse, run);
}

/// Raises the soft open-file limit to the hard one: every connection, body
/// being written and directory being synced holds a descriptor.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit with a valid out-parameter.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::warn!("could not raise the open-file limit");
            }
        }
    }
}

/// Fits each backend's durability to its file system, then warns about each
/// `syncfs` backend whose data directory shares its file system with `/`
/// (its `syncfs` then also flushes everything else written there: correct,
/// but slower and unfair to the others; each backend on its own file system
/// is the intended deployment).
///
/// An ext4 without a journal orders nothing: `fsync` of a file and of its
/// directory writes neither the allocation bitmaps nor the group descriptors
/// nor, for a linked `O_TMPFILE`, the new link count, so after a power cut
/// `e2fsck` clears acknowledged messages (the power-cut suite lost 2,701 of
/// 6,356 links in 50 cuts with `durability = "file"`); and metadata written
/// back before a batch's flush can reach the media before the bodies it
/// points to (partial messages after a cut, with `syncfs` alone). There a
/// backend runs `syncfs` with its bodies flushed before they are linked and
/// a trailing device flush after each `syncfs` (which writes the block
/// device's buffers after its own flush): two steps per batch, and nothing
/// acknowledged or visible before it is whole on the media.
fn adapt_to_file_systems(backends: &mut [config::Backend]) {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    for b in backends.iter_mut() {
        if dev(&b.data_dir).is_some_and(ext4_without_journal) {
            log::warn!(
                "backend={} data_dir {} is an ext4 without a journal: durability={} cannot make \
                 new files durable there; using syncfs with bodies flushed before they are \
                 linked (two syncfs steps per batch; kernel-notes/README.md)",
                b.name,
                b.data_dir.display(),
                b.durability.as_str()
            );
            b.durability = config::Durability::Syncfs;
            b.flush_before_link = true;
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for b in backends.iter() {
        if dev(&b.data_dir).is_some_and(|d| mounted_with_discard(&mounts, d)) {
            log::warn!(
                "backend={} data_dir {} is mounted with online discard: every unlink (DEL, \
                 DELM) waits for a TRIM of its blocks; mount it without discard and run \
                 fstrim periodically (kernel-notes/README.md)",
                b.name,
                b.data_dir.display()
            );
        }
    }
    let root = dev(std::path::Path::new("/"));
    for b in backends.iter() {
        if b.durability != config::Durability::Syncfs {
            continue;
        }
        let Some(mine) = dev(&b.data_dir) else {
            continue;
        };
        if Some(mine) == root {
            log::warn!(
                "backend={} durability=syncfs but data_dir {} is on the root file system: \
                 each batch's syncfs flushes everything written there",
                b.name,
                b.data_dir.display()
            );
        }
    }
}

/// Starts one commit thread per file system holding `durability = syncfs`
/// backends, shared by all of them (one `syncfs` per batch for the whole
/// file system, not one per backend); returns each backend's, in order.
fn start_commit_threads(
    backends: &[config::Backend],
) -> anyhow::Result<Vec<Option<Arc<commit::FsCommitter>>>> {
    use std::os::unix::fs::MetadataExt;
    let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        if b.durability != config::Durability::Syncfs {
            continue;
        }
        let dev = std::fs::metadata(&b.data_dir)
            .with_context(|| format!("stat {}", b.data_dir.display()))?
            .dev();
        match groups.iter_mut().find(|(d, _)| *d == dev) {
            Some((_, members)) => members.push(i),
            None => groups.push((dev, vec![i])),
        }
    }
    let mut out = vec![None; backends.len()];
    for (_, members) in groups {
        let names: Vec<&str> = members.iter().map(|&i| backends[i].name.as_str()).collect();
        let label = names.join("+");
        let first = &backends[members[0]];
        // The same file system: the same answer for every member.
        let ordered = members.iter().any(|&i| backends[i].flush_before_link);
        let c = commit::FsCommitter::start(&first.data_dir, ordered, &label)
            .with_context(|| format!("opening {} for syncfs", first.data_dir.display()))?;
        if members.len() > 1 {
            log::info!(
                "backends {} share one file system: one commit thread links their PUTs and \
                 one syncfs per batch flushes them all",
                names.join(", ")
            );
        }
        for &i in &members {
            out[i] = Some(c.clone());
        }
    }
    Ok(out)
}

/// Whether the file system on device `dev` is mounted with online discard,
/// according to `mountinfo` (the text of `/proc/self/mountinfo`): one line
/// per mount, `major:minor` third, and after ` - ` the file system type,
/// the source and its super-block options, where ext4 and xfs show
/// `discard` (btrfs `discard=sync`; its `discard=async` does not make an
/// unlink wait). Unknown: false.
fn mounted_with_discard(mountinfo: &str, dev: u64) -> bool {
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    mountinfo.lines().any(|line| {
        let mut fields = line.split(' ');
        if fields.nth(2) != Some(want.as_str()) {
            return false;
        }
        let Some((mount, fs)) = line.split_once(" - ") else {
            return false;
        };
        let per_mount = mount.split(' ').nth(5).unwrap_or("");
        let per_fs = fs.split(' ').nth(2).unwrap_or("");
        per_mount
            .split(',')
            .chain(per_fs.split(','))
            .any(|o| o == "discard" || o == "discard=sync")
    })
}

/// Whether the file system on device `dev` is an ext4 with no journal, as
/// `/sys/fs/ext4/<device>/journal_task` tells (`<none>`). Unknown: false.
fn ext4_without_journal(dev: u64) -> bool {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let Ok(link) = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")) else {
        return false;
    };
    let Some(name) = link.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    std::fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task"))
        .map(|t| t.trim() == "<none>")
        .unwrap_or(false)
}

/// SIGHUP: re-reads the configuration file and applies the connection limit,
/// the read-only floor (`free_bytes_min`, checked again within a second) and
/// the log level; other changes are logged as needing a restart. A file that
/// does not read or parse changes nothing.
fn reload(path: &std::path::Path, backends: &[Arc<stats::BackendShared>]) {
    let parsed = std::fs::read_to_string(path)
        .map_err(anyhow::Error::from)
        .and_then(|t| config::Config::parse(&t));
    let cfg = match parsed {
        Ok(c) => c,
        Err(e) => {
            log::error!(
                "reload of {} failed, configuration unchanged: {e:#}",
                path.display()
            );
            return;
        }
    };
    let mut applied = Vec::new();
    if let Ok(Some(level)) = cfg.log_filter() {
        if log::max_level() != level {
            applied.push(format!("log_level -> {level}"));
        }
        log::set_max_level(level);
    }
    let l = &cfg.limits;
    for b in backends {
        let old_max = b
            .connections_max
            .swap(l.connections_per_backend_max as u64, Ordering::Relaxed);
        let old_floor = b.free_bytes_min.swap(l.free_bytes_min, Ordering::Relaxed);
        if old_max != l.connections_per_backend_max as u64 {
            applied.push(format!(
                "{}: limits.connections_per_backend_max {old_max} -> {}",
                b.name, l.connections_per_backend_max
            ));
        }
        if old_floor != l.free_bytes_min {
            applied.push(format!(
                "{}: limits.free_bytes_min {old_floor} -> {}",
                b.name, l.free_bytes_min
            ));
        }
    }
    log::warn!(
        "reload: applied [{}]; other limits (sizes, time-outs), backends, secret and admin port need a restart",
        applied.join("; ")
    );
}

/// Starts the backends from `cfg` (read from `args.config`) and serves until a stop
/// signal has drained them; with `--check`, only checks the configuration.
fn run(cfg: config::Config, args: powermail_admin::daemon::Invocation) -> anyhow::Result<()> {
    raise_fd_limit();
    let secret = cfg.secret()?;
    if let Some(level) = cfg.log_filter()? {
        log::set_max_level(level);
    }
    let online: Vec<usize> = glommio::CpuSet::online()
        .map_err(|e| anyhow::anyhow!("online CPUs: {e}"))?
        .into_iter()
        .map(|l| l.cpu)
        .collect();
    let mut backends = cfg.resolve_backends(&online)?;
    if args.check {
        println!("configuration OK: {} backends", backends.len());
        return Ok(());
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(backends.len());
    let stop = Arc::new(drain::Stop::default());
    let mut stores = Vec::with_capacity(backends.len());
    for b in &backends {
        stores.push(
            store::Store::open(&b.data_dir)
                .with_context(|| format!("opening {}", b.data_dir.display()))?,
        );
    }
    // After the stores exist: their directories name the file systems.
    adapt_to_file_systems(&mut backends);
    let commit_threads = start_commit_threads(&backends)?;
    let mut shared_all = Vec::new();
    let mut handles = Vec::new();
    for ((b, (store, removed)), fs_committer) in backends.iter().zip(stores).zip(commit_threads) {
        if removed > 0 {
            log::warn!(
                "backend={} removed {removed} temporary files left by a crash",
                b.name
            );
        }
        let known: std::collections::HashSet<_> = store
            .mailboxes(usize::MAX)
            .with_context(|| format!("scanning {}", b.data_dir.display()))?
            .into_iter()
            .collect();
        log::info!(
            "backend={} holds {} mailboxes; bodies named by {}",
            b.name,
            known.len(),
            match store.links_with_empty_path() {
                true => "linkat(AT_EMPTY_PATH)",
                false => "linkat(/proc/self/fd/N)",
            }
        );
        let marker = store.readonly_marker();
        let shared = Arc::new(stats::BackendShared {
            name: b.name.clone(),
            listen: b.listen,
            data_dir: b.data_dir.clone(),
            cpu: b.cpu,
            durability: b.durability,
            flush_before_link: b.flush_before_link,
            commit_group: fs_committer
                .as_ref()
                .map(|c| c.label().to_string())
                .unwrap_or_default(),
            page_cache_body_max_bytes: cfg.page_cache_body_max_bytes,
            operator_readonly: AtomicBool::new(marker.exists()),
            auto_readonly: AtomicBool::new(false),
            disk_failed: AtomicBool::new(false),
            free_bytes: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            counters: Default::default(),
            latencies: Mutex::new(Default::default()),
            readonly_marker: marker,
            connections_max: AtomicU64::new(cfg.limits.connections_per_backend_max as u64),
            free_bytes_min: AtomicU64::new(cfg.limits.free_bytes_min),
        });
        shared_all.push(shared.clone());
        handles.push(backend::spawn(backend::Start {
            backend: b.clone(),
            store,
            shared,
            secret: secret.clone(),
            limits: cfg.limits.clone(),
            blocking_threads: cfg.blocking_threads,
            ready: ready_tx.clone(),
            known,
            stop: stop.clone(),
            fs_committer,
        })?);
    }
    for _ in &backends {
        match ready_rx.recv() {
            Ok(Ok(line)) => {
                log::info!("{line}");
                println!("pplistener: {line}");
            }
            Ok(Err(e)) => anyhow::bail!(e),
            Err(_) => anyhow::bail!("a backend executor died during start-up"),
        }
    }
    let shared_all_for_reload = shared_all.clone();
    let mut config_json = serde_json::json!({
        "backends": backends.iter().map(|b| serde_json::json!({
            "name": b.name, "listen": b.listen.to_string(), "data_dir": b.data_dir.display().to_string(), "cpu": b.cpu,
        })).collect::<Vec<_>>(),
        "limits": format!("{:?}", cfg.limits),
        "blocking_threads": cfg.blocking_threads,
        "shutdown_grace_ms": cfg.shutdown_grace_ms,
        "durability": backends.iter().map(|b| b.durability.as_str()).collect::<Vec<_>>(),
    });
    if let (Some(all), serde_json::Value::Object(admin)) =
        (config_json.as_object_mut(), cfg.admin.public_json())
    {
        all.extend(admin);
    }
    let handler = Arc::new(stats::Process {
        backends: shared_all.clone(),
        config: config_json,
    });
    let mut admin_addr = None;
    if let Some(server) = cfg.admin.start(&secret, handler)? {
        println!("pplistener: admin port on {}", server.local_addr());
        admin_addr = Some(server.local_addr());
    }
    let (path, all) = (args.config.clone(), shared_all_for_reload);
    powermail_admin::signals::on_sighup(move || reload(&path, &all))?;
    let grace = std::time::Duration::from_millis(cfg.shutdown_grace_ms);
    drain::on_stop_signal(stop.clone(), shared_all.clone(), grace)?;
    let mut listen: Vec<(&str, std::net::SocketAddr)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.listen))
        .collect();
    listen.extend(admin_addr.map(|a| ("admin", a)));
    powermail_admin::announce_ready("pplistener", &listen);
    // An executor returns only once it has drained after a stop request.
    for h in handles {
        h.join()
            .map_err(|e| anyhow::anyhow!("executor failed: {e:?}"))?;
    }
    stop.finish(&shared_all, "drained");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict
43 27 7:0 / /srv/mail/0 rw,relatime - ext4 /dev/loop0 rw
44 27 7:1 / /srv/mail/1 rw,noatime - btrfs /dev/loop1 rw,discard=async,space_cache=v2
45 27 7:2 / /srv/mail/2 rw,noatime - xfs /dev/loop2 rw,attr2,discard,inode64
";

    #[test]
    fn online_discard_is_read_from_mountinfo() {
        let dev = |major, minor| libc::makedev(major, minor);
        assert!(mounted_with_discard(MOUNTINFO, dev(254, 0)));
        assert!(!mounted_with_discard(MOUNTINFO, dev(7, 0)));
        assert!(!mounted_with_discard(MOUNTINFO, dev(7, 1)), "async discard");
        assert!(mounted_with_discard(MOUNTINFO, dev(7, 2)));
        assert!(!mounted_with_discard(MOUNTINFO, dev(8, 0)), "not mounted");
        assert!(!mounted_with_discard("garbage\n\n", dev(254, 0)));
    }
}
