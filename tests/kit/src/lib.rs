//! The one test kit every PowerMail suite uses (issue #17).
//!
//! Before it, six suites each had their own `free_port` (with two meanings of
//! "free"), binary lookup, readiness wait and launchers, and they drifted
//! apart. Here each exists once:
//!
//! * [`free_port`] / [`free_range`]: ports below the kernel's ephemeral range,
//!   never handed out twice in one process;
//! * [`bin`]: a workspace binary next to the test executable (built once if
//!   missing);
//! * [`eventually`]: the one bounded poll;
//! * [`Daemon`]: spawn a daemon, wait for its readiness line
//!   ([`powermail_admin::ReadyLine`]) and nothing else, kill it on drop; the
//!   typed launchers [`Pplistener`], [`Frontend`] (powersmtp, powerpop) and
//!   [`Up`] (`powermail up`) write the configuration first;
//! * [`Smtp`] and [`Pop`]: blocking clients that keep the exact wire bytes
//!   (suites that test real client behaviour keep Python's smtplib/poplib);
//! * [`DelayProxy`]: a TCP relay adding a one-way delay per direction (this
//!   kernel has no `netem`);
//! * [`admin`]: the admin-port client of the admin crate, re-exported;
//! * [`Mariadb`]: a private MariaDB (loopback or a cluster host);
//! * [`Haproxy`]: a real HAProxy in TCP mode (the PROXY-protocol suites);
//! * [`skip_unless_root`]: the one skip of the suites that need root;
//! * [`frontend_config`]: the configuration checks powersmtp and powerpop share.
//!
//! Everything that waits is bounded; a launcher that fails panics with the
//! daemon's log, because a test that cannot start its system has failed.

mod clients;
mod daemon;
pub mod delay;
pub mod frontend_config;
pub mod haproxy;
mod launch;
mod mariadb;
mod ports;
mod up;

pub use clients::{connect, Pop, Smtp};
pub use daemon::{bin, Daemon, START_TIMEOUT};
pub use delay::{DelayProxy, Delays};
pub use haproxy::{Haproxy, Route as HaproxyRoute};
pub use launch::{
    durability_line, BackendSpec, Frontend, FrontendSpec, Kind, Place, Pplistener, PplistenerSpec,
};
pub use mariadb::{mariadbd_installed, Mariadb, MARIADB_PASSWORD, MARIADB_USER};
pub use ports::{free_addr, free_port, free_range};
pub use powermail_admin::client as admin;
pub use powermail_admin::ReadyLine;
pub use up::Up;

use std::time::{Duration, Instant};

/// Implements `Deref` and `DerefMut` to [`Daemon`] for `$type` through its
/// field `$field` (a [`Daemon`] or a launcher holding one), so a suite's own
/// wrapper has the daemon's methods (restart, kill9, pid, log_text, ...).
#[macro_export]
macro_rules! deref_daemon {
    ($type:ty, $field:ident) => {
        impl ::std::ops::Deref for $type {
            type Target = $crate::Daemon;
            fn deref(&self) -> &$crate::Daemon {
                &self.$field
            }
        }

        impl ::std::ops::DerefMut for $type {
            fn deref_mut(&mut self) -> &mut $crate::Daemon {
                &mut self.$field
            }
        }
    };
}

/// Socket read/write time-out of the kit's clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval between two polls of [`eventually`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// One test at a time in this test process: suites that start many daemons
/// hold it for a whole test, so a small machine is not overrun (a test that
/// panicked while holding it does not block the next).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this process runs as root (namespaces, FUSE, loop devices).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints why `test` is skipped and returns true when not root; `needs`
/// says what for (`"ip netns, ip link"`). Under CI (`CI` set) a missing
/// privilege is a failure, not a skip: CI runs these suites as root.
pub fn skip_unless_root(test: &str, needs: &str) -> bool {
    if is_root() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root ({needs}) and CI runs it as root"
    );
    eprintln!("SKIPPED {test}: needs root ({needs})");
    true
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns true; panics naming
/// `what` if that has not happened within `timeout`.
pub fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        if start.elapsed() >= timeout {
            panic!("never happened within {timeout:?}: {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// One admin request to `addr`; (status, body). Panics if the port does
/// not answer (use [`admin::request`] to see the error instead).
pub fn admin_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let reply = admin::request(&addr.to_string(), token, method, path)
        .unwrap_or_else(|e| panic!("admin {method} {path}: {e}"));
    (reply.status, reply.body)
}
