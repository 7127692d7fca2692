//! The crash disk (issue #19): a FUSE file system that exposes one image
//! file and models a disk's volatile write cache, so a test can cut the
//! power under a real file system (on a loop device over the image) and see
//! what a real outage would leave.
//!
//! [`cache`] is the model (what survives a cut, what does not); [`fs`] is
//! its FUSE face; the `crashdisk` binary mounts it. See
//! `kernel-notes/README.md` ("The crash disk") for what it can and cannot
//! lose.

pub mod cache;
pub mod fs;

pub use cache::{CutMode, Disk, DiskConfig, DiskError, DiskStats};
pub use fs::CrashFs;
