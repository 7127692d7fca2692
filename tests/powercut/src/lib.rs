//! The cut-the-power suite's harness (issue #19): a crash disk (the
//! `crashdisk` FUSE daemon) under a loop device under a real file system
//! under one `pplistener` backend; a workload that records every
//! acknowledged PUT, DEL and DELM; and the check after each recovery.
//!
//! The suite itself is `tests/powercut.rs`. Everything here needs root
//! (FUSE, loop devices, mount); [`skip_unless_root`] says so clearly.

pub mod model;
pub mod rig;
pub mod suite;
pub mod workload;

/// Whether this process may mount, use loop devices and serve FUSE.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints why a test is skipped and returns true when not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!(
        "SKIPPED {test}: the power-cut suite needs root (FUSE, losetup, mount); CI runs it as root"
    );
    true
}
