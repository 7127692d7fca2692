//! Cut the power under pplistener, recover as after an outage, and prove
//! that `+OK` meant durable: every acknowledged message present in every
//! mailbox it was acknowledged for, byte-identical; nothing partial listed;
//! every acknowledged delete still deleted; the file system clean.
//!
//! Needs root (FUSE, loop devices, mount), `e2fsprogs` and `xfsprogs`
//! (.ci/run installs them); skips with a message when not root.
//! `PM_POWERCUT_CUTS` changes the cuts per file system (default 50),
//! `PM_POWERCUT_SEED` the seed (default: from the clock, printed),
//! `PM_POWERCUT_MODES` the crash disk's cut modes (e.g. `drop-all`),
//! `PM_POWERCUT_KEEP=1` keeps the image and logs for a post-mortem.

use std::io::Write;
use std::sync::Mutex;

use powermail_powercut::rig::{Durability, FsKind};
use powermail_powercut::suite::{self, RunConfig};

/// Cuts per file system unless `PM_POWERCUT_CUTS` says otherwise.
const CUTS_DEFAULT: usize = 50;

/// One stack at a time: they share the machine's 2 CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn cuts() -> usize {
    std::env::var("PM_POWERCUT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CUTS_DEFAULT)
}

fn seed() -> u64 {
    std::env::var("PM_POWERCUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn cut_the_power(fs: FsKind, durability: Durability) {
    let test = format!("powercut {}/{}", fs.name(), durability.name());
    if powermail_powercut::skip_unless_root(&test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = RunConfig {
        fs,
        durability,
        cuts: cuts(),
        seed: seed(),
    };
    let report = suite::run(&cfg);
    // Straight to stderr: libtest captures eprintln!, and this line is the result.
    let _ = writeln!(std::io::stderr(), "{}", report.line());
    assert!(
        report.clean(),
        "{test} (seed {}): {}",
        cfg.seed,
        report.line()
    );
    assert_eq!(report.cuts, cfg.cuts, "every cut was made");
    assert!(
        report.acked_puts > 0 && report.findings.checked > 0,
        "the clients got work done"
    );
}

/// Loses acknowledged messages today (found by this suite, issue #19): on
/// ext4 without a journal, fsync of a new file and of its directory does not
/// write the inode bitmap and the group descriptor's unused-inode mark, so
/// after a cut `e2fsck` clears the new directory entries ("has
/// deleted/unused inode"). See kernel-notes/README.md, "The crash disk".
/// Run it with `cargo test -p powermail-powercut --test powercut -- --ignored`.
#[test]
#[ignore = "ext4 without a journal loses fsynced new files at a power cut (issue #19 finding)"]
fn ext4_without_journal_file_durability() {
    cut_the_power(FsKind::Ext4NoJournal, Durability::File);
}

/// Measured 2026-11-30 after directories got a full fsync (commit.rs): 50 cuts,
/// 2,801 PUTs acknowledged, 1 lost, 2 resurrected deletes. Before that fix: 17
/// of 1,156 lost. See kernel-notes/README.md, "The crash disk".
#[test]
#[ignore = "loses 1 of ~2,800 acknowledged PUTs and resurrects acknowledged DELs (issue #19 finding, cause not found yet)"]
fn ext4_with_journal_file_durability() {
    cut_the_power(FsKind::Ext4Journal, Durability::File);
}

/// Measured 2026-11-30 after the directory fsync fix: 50 cuts, 2,800 PUTs,
/// 0 lost, 2 resurrected deletes (15 lost of 1,577 before the fix).
#[test]
#[ignore = "acknowledged DELs come back after a cut (1-2 per 50 cuts; issue #19 finding, cause not found yet)"]
fn xfs_file_durability() {
    cut_the_power(FsKind::Xfs, Durability::File);
}

/// `durability = "syncfs"`: one syncfs(2) per batch writes every dirty
/// metadata block of the backend's file system, bitmaps and group
/// descriptors included — so even ext4 without a journal can keep what it
/// acknowledged.
///
/// Measured 2026-11-30: 50 cuts, 2,454 PUTs, 0 lost, but 3 partial messages
/// listed and 1 resurrected delete: syncfs issues its device flush before it
/// writes the block device's buffers (the directory blocks), as the start-up
/// warning says. Use a journaled file system.
#[test]
#[ignore = "ext4 without a journal: partial messages and resurrected deletes after a cut (issue #19 finding)"]
fn ext4_without_journal_syncfs_durability() {
    cut_the_power(FsKind::Ext4NoJournal, Durability::Syncfs);
}

/// Measured 2026-11-30: 50 cuts, 2,001 PUTs, 0 lost, 1 resurrected delete.
#[test]
#[ignore = "acknowledged DELs come back after a cut (1-2 per 50 cuts; issue #19 finding, cause not found yet)"]
fn ext4_with_journal_syncfs_durability() {
    cut_the_power(FsKind::Ext4Journal, Durability::Syncfs);
}

/// Measured 2026-11-30: 50 cuts, 2,716 PUTs, 0 lost, 5 resurrected deletes.
#[test]
#[ignore = "acknowledged DELs come back after a cut (1-5 per 50 cuts; issue #19 finding, cause not found yet)"]
fn xfs_syncfs_durability() {
    cut_the_power(FsKind::Xfs, Durability::Syncfs);
}
