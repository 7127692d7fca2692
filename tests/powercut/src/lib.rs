//! The cut-the-power suite's harness (issue #19): a crash disk (the
//! `crashdisk` FUSE daemon) under a loop device under a real file system
//! under one `pplistener` backend; a workload that records every
//! acknowledged PUT, DEL and DELM; and the check after each recovery.
//!
//! The suite itself is `tests/powercut.rs`. Everything here needs root
//! (FUSE, loop devices, mount); the test kit's `skip_unless_root` says so.

pub mod model;
pub mod rig;
pub mod suite;
pub mod workload;
