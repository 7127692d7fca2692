//! `pplistener`: PowerMail's message store.
//!
//! A very simple-minded file server for message files (seed 000), rebuilt
//! thread-per-core: one glommio executor per configured backend, each pinned
//! to a CPU and given its own data directory and port. See
//! `storage-engine/PROTOCOL.md` for the wire protocol and `docs/ARCHITECTURE.md`
//! for where it sits.

mod backend;
mod commit;
mod config;
mod index;
mod session;
mod stats;
mod store;
mod writer;
mod zerocopy;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "pplistener",
    version,
    about = "PowerMail message store (one backend per CPU/disk)"
)]
struct Args {
    /// TOML configuration file (see examples/pplistener.toml).
    #[arg(long)]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() {
    powermail_admin::init_logging();
    if let Err(e) = run(Args::parse()) {
        log::error!("pplistener: {e:#}");
        eprintln!("pplistener: {e:#}");
        std::process::exit(1);
    }
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

fn run(args: Args) -> anyhow::Result<()> {
    raise_fd_limit();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg = config::Config::parse(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    let secret = cfg.secret()?;
    let online: Vec<usize> = glommio::CpuSet::online()
        .map_err(|e| anyhow::anyhow!("online CPUs: {e}"))?
        .into_iter()
        .map(|l| l.cpu)
        .collect();
    let backends = cfg.resolve_backends(&online)?;
    if args.check {
        println!("configuration OK: {} backends", backends.len());
        return Ok(());
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(backends.len());
    let mut shared_all = Vec::new();
    let mut handles = Vec::new();
    for b in &backends {
        let (store, removed) = store::Store::open(&b.data_dir)
            .with_context(|| format!("opening {}", b.data_dir.display()))?;
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
        log::info!("backend={} holds {} mailboxes", b.name, known.len());
        let marker = store.readonly_marker();
        let shared = Arc::new(stats::BackendShared {
            name: b.name.clone(),
            listen: b.listen,
            data_dir: b.data_dir.clone(),
            cpu: b.cpu,
            operator_readonly: AtomicBool::new(marker.exists()),
            auto_readonly: AtomicBool::new(false),
            free_bytes: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            counters: Default::default(),
            latencies: Mutex::new(Default::default()),
            readonly_marker: marker,
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
    if let Some(listen) = &cfg.admin_listen {
        let token = match &cfg.admin_token {
            Some(t) => t.clone(),
            None => String::from_utf8_lossy(&secret).into_owned(),
        };
        let config_json = serde_json::json!({
            "backends": backends.iter().map(|b| serde_json::json!({
                "name": b.name, "listen": b.listen.to_string(), "data_dir": b.data_dir.display().to_string(), "cpu": b.cpu,
            })).collect::<Vec<_>>(),
            "limits": format!("{:?}", cfg.limits),
            "blocking_threads": cfg.blocking_threads,
        });
        let handler = Arc::new(stats::Process {
            backends: shared_all,
            config: config_json,
        });
        let server = powermail_admin::spawn(listen, &token, handler, cfg.admin_limits())?;
        println!("pplistener: admin port on {}", server.local_addr());
    }
    for h in handles {
        h.join()
            .map_err(|e| anyhow::anyhow!("executor failed: {e:?}"))?;
    }
    Ok(())
}
