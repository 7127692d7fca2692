//! One file system's run: format a crash-disk image, then `cuts` times:
//! recover as after an outage, start `pplistener`, check the store against
//! everything acknowledged so far, run the clients, cut the power (at the
//! Nth flush of a sweep, or after a random time; the crash disk freezes the
//! backend the instant before, as an outage stops the CPUs with the disk),
//! `kill -9` the backend and tear the stack down. A last recovery and check follow the last cut.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::Findings;
use crate::rig::{unmount, CrashDisk, Durability, FsKind, Listener, LoopDev};
use crate::workload::{Shared, Workload};

/// Clients of a concurrent cycle.
pub const WRITERS: usize = 8;
/// Every this-many-th cycle runs a single writer (on a journaled file
/// system one message's flush commits everyone's metadata and could hide a
/// missing directory fsync).
pub const SINGLE_WRITER_EVERY: usize = 4;
/// Longest a cycle's clients run before the power is cut anyway.
pub const LOAD_MAX: Duration = Duration::from_secs(3);
/// Range of the random cut times, in ms after the clients start.
pub const CUT_AFTER_MS: std::ops::Range<u64> = 20..700;
/// How long replies sent before the cut may still arrive before the kill.
pub const AFTER_CUT: Duration = Duration::from_millis(100);
/// The crash disk's cut modes, used in turn.
pub const CUT_MODES: [&str; 3] = ["drop-all", "random-subset", "reorder"];

/// The cut modes of a run: `PM_POWERCUT_MODES` (comma-separated crash-disk
/// `--cut-mode` names), else all of [`CUT_MODES`].
pub fn cut_modes() -> Vec<String> {
    match std::env::var("PM_POWERCUT_MODES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|m| m.trim().to_string()).collect(),
        _ => CUT_MODES.iter().map(|m| m.to_string()).collect(),
    }
}

/// What one run is.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The file system.
    pub fs: FsKind,
    /// The backends' durability mode.
    pub durability: Durability,
    /// Backends in the one pplistener, all on the crash disk's file system
    /// (each with its own clients and model); more than one shares one
    /// commit thread and one `syncfs` per batch in `syncfs` mode.
    pub backends: usize,
    /// Power cuts to make.
    pub cuts: usize,
    /// Seed of every random choice (printed, so a failure can be re-run).
    pub seed: u64,
}

/// What one run found (printed per file system).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `fs/durability`.
    pub name: String,
    /// Power cuts made.
    pub cuts: usize,
    /// Cuts made at a flush of the sweep (the rest at a random time).
    pub cuts_at_flush: usize,
    /// Recoveries where the repairing fsck changed something.
    pub repairs: usize,
    /// Acknowledged PUTs, their links, and acknowledged deletions.
    pub acked_puts: u64,
    /// Links of acknowledged PUTs.
    pub acked_links: u64,
    /// Acknowledged DEL/DELM links.
    pub acked_dels: u64,
    /// Sum of all checks.
    pub findings: Findings,
    /// Temporaries found in `tmp/` after a restart.
    pub temporaries: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    /// One line for the log.
    pub fn line(&self) -> String {
        format!(
            "powercut {}: cuts {} ({} at a flush), acknowledged {} PUTs / {} links / {} deletes, \
             checked {}, lost {}, partial {}, resurrected deletes {}, unknown {}, temporaries {}, \
             fsck repairs {}, {:.1} s",
            self.name,
            self.cuts,
            self.cuts_at_flush,
            self.acked_puts,
            self.acked_links,
            self.acked_dels,
            self.findings.checked,
            self.findings.lost,
            self.findings.partial,
            self.findings.resurrected,
            self.findings.unknown,
            self.temporaries,
            self.repairs,
            self.elapsed.as_secs_f64()
        )
    }

    /// Whether nothing was lost, torn, resurrected or left behind.
    pub fn clean(&self) -> bool {
        self.findings.clean() && self.temporaries == 0
    }
}

/// Flush count of sweep step `i`: dense at the start of a burst, then
/// spreading out.
pub fn sweep_flush(i: usize) -> u64 {
    let i = i as u64;
    1 + (i * i * 3 + i * 7) % 97
}

struct Paths {
    root: PathBuf,
    image: PathBuf,
    fuse: PathBuf,
    mnt: PathBuf,
}

/// Runs one file system's cuts; returns the report (the caller asserts).
pub fn run(cfg: &RunConfig) -> Report {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("powercut-")
        .tempdir()
        .expect("tempdir");
    let paths = Paths {
        root: dir.path().to_path_buf(),
        image: dir.path().join("backing.img"),
        fuse: dir.path().join("fuse"),
        mnt: dir.path().join("fs"),
    };
    let backends = cfg.backends.max(1);
    let mut report = Report {
        name: match backends {
            1 => format!("{}/{}", cfg.fs.name(), cfg.durability.name()),
            n => format!("{}/{} x{n} backends", cfg.fs.name(), cfg.durability.name()),
        },
        ..Report::default()
    };
    eprintln!(
        "powercut {}: seed {} in {}",
        report.name,
        cfg.seed,
        paths.root.display()
    );
    format(cfg.fs, &paths);
    let modes = cut_modes();
    // One model per backend: each has its own store and its own clients.
    let models: Vec<Arc<Shared>> = (0..backends).map(|_| Arc::default()).collect();
    let datas: Vec<PathBuf> = (0..backends)
        .map(|i| match i {
            0 => paths.mnt.join("data"),
            _ => paths.mnt.join(format!("data{i}")),
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    for cycle in 0..=cfg.cuts {
        let mode = modes[cycle % modes.len()].clone();
        let disk = CrashDisk::start(
            &paths.image,
            &paths.fuse,
            &mode,
            rng.gen(),
            &paths.root.join("crashdisk.log"),
        );
        let lo = LoopDev::attach(&disk.image());
        let recovery = cfg.fs.recover(&lo.dev, &paths.mnt);
        report.repairs += usize::from(recovery.repaired);
        cfg.fs.mount(&lo.dev, &paths.mnt);
        let mut listener = Listener::start_backends(&paths.root, "b0", &datas, cfg.durability);
        report.temporaries += listener.temp_files();
        disk.freeze_at_cut(listener.pid());
        if backends > 1 && cfg.durability == Durability::Syncfs {
            let log = listener.log_text();
            assert!(
                log.contains("share one file system"),
                "pplistener did not give its backends one commit thread:\n{log}"
            );
        }
        if cfg.fs == FsKind::Ext4NoJournal {
            let log = listener.log_text();
            assert!(
                log.contains("is an ext4 without a journal"),
                "pplistener did not switch to ordered syncfs on ext4 without a journal:\n{log}"
            );
        }
        for (i, shared) in models.iter().enumerate() {
            let found = shared
                .model()
                .check(&mut listener.conn_to(i))
                .unwrap_or_else(|e| {
                    panic!(
                        "{} cycle {cycle} backend {i}: check failed: {e}\n{}",
                        report.name,
                        listener.log_text()
                    )
                });
            add(&mut report.findings, &found);
            if !found.clean() {
                let before = &modes[(cycle + modes.len() - 1) % modes.len()];
                eprintln!(
                    "{} cycle {cycle} backend {i} (after a {before} cut): {found:?}",
                    report.name
                );
            }
        }
        if cycle == cfg.cuts {
            listener.kill9();
            unmount(&paths.mnt);
            lo.detach();
            disk.stop();
            break;
        }
        let writers = if cycle % SINGLE_WRITER_EVERY == SINGLE_WRITER_EVERY - 1 {
            1
        } else {
            WRITERS
        };
        let at_flush = cycle % 2 == 0;
        for shared in &models {
            let mut model = shared.model();
            model.cycle = cycle;
            model.cut = false;
        }
        let loads: Vec<Workload> = models
            .iter()
            .zip(&listener.addrs)
            .map(|(shared, addr)| {
                let each = writers.div_ceil(backends);
                Workload::start(shared.clone(), *addr, each, cycle, rng.gen())
            })
            .collect();
        let load_started = Instant::now();
        if at_flush {
            disk.arm(sweep_flush(cycle / 2));
            while !disk.status().cut && load_started.elapsed() < LOAD_MAX {
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            std::thread::sleep(Duration::from_millis(rng.gen_range(CUT_AFTER_MS)));
        }
        let cut_by_flush = disk.status().cut;
        disk.cut();
        for shared in &models {
            shared.model().cut = true;
        }
        let status = disk.status();
        eprintln!(
            "{} cycle {cycle}: {writers} writer(s), cut ({mode}) after {} flushes, {} writes lost",
            report.name, status.flushes, status.lost_writes
        );
        report.cuts_at_flush += usize::from(at_flush && cut_by_flush);
        report.cuts += 1;
        std::thread::sleep(AFTER_CUT);
        listener.kill9();
        for load in loads {
            load.stop();
        }
        unmount(&paths.mnt);
        lo.detach();
        disk.stop();
    }
    if std::env::var_os("PM_POWERCUT_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("powercut: kept {}", kept.display());
    }
    for shared in &models {
        let model = shared.model();
        report.acked_puts += model.acked_puts;
        report.acked_links += model.acked_links;
        report.acked_dels += model.acked_dels;
    }
    report.elapsed = started.elapsed();
    report
}

fn add(total: &mut Findings, f: &Findings) {
    total.checked += f.checked;
    total.lost += f.lost;
    total.partial += f.partial;
    total.resurrected += f.resurrected;
    total.unknown += f.unknown;
}

/// A fresh image with the file system on it, all of it durable.
fn format(fs: FsKind, paths: &Paths) {
    let image = std::fs::File::create(&paths.image).expect("create image");
    image.set_len(fs.image_size_bytes()).expect("size image");
    drop(image);
    let disk = CrashDisk::start(
        &paths.image,
        &paths.fuse,
        "drop-all",
        0,
        &paths.root.join("crashdisk.log"),
    );
    let lo = LoopDev::attach(&disk.image());
    fs.mkfs(&lo.dev);
    lo.detach();
    disk.stop();
}
