//! Mailbox locks: one POP3 session per mailbox at a time (RFC 1939 §8
//! "exclusive-access lock"); a second gets `-ERR [IN-USE]`. `ppadmin repair`
//! and `drain` take the same lock before they touch a mailbox.
//!
//! Three layers, taken in order, each released when the [`MailboxLock`] drops:
//!
//! 1. in the process, a mutex-protected map of locked mailbox names;
//! 2. across the processes of a host, an exclusive, non-blocking `flock` on
//!    `state_dir/locks/<fan>/<mailbox>`. The kernel drops it when the process
//!    dies, so a crash never leaves a mailbox locked. Lock files are never
//!    removed: removing one races with a process that has it open but not yet
//!    locked;
//! 3. across hosts, with a MySQL/MariaDB userbase, a **lease** row in the
//!    shared database (`mailbox_leases`, see `powermail_userbase`'s `lease`
//!    module): taken with one atomic statement, renewed by a background thread
//!    every third of `lock_lease_ms`, deleted at release. A host that dies
//!    stops renewing, and the mailbox is free again once the lease expired by
//!    the database's clock. If the database cannot answer when a lock is
//!    taken, the lock is refused ([`LockError::Unavailable`]): never granted
//!    on a guess. Before a session commits deletions it calls
//!    [`MailboxLock::confirm`], which renews the lease at once and fails if
//!    another holder has taken it over meanwhile.
//!
//! With SQLite (one file, one host) layer 3 is not used: layers 1 and 2 are
//! the whole lock, and every POP host must be the same host.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use powermail_proto::MailboxName;
use powermail_userbase::{Userbase, UserbaseError, LEASE_HOLDER_MAX_BYTES};

/// Shortest lease accepted, in milliseconds: renewals every third of it must
/// fit database round trips.
pub const LOCK_LEASE_MIN_MS: u64 = 300;

/// Why a lock could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be opened or locked.
    #[error("mailbox lock file: {0}")]
    Io(#[from] io::Error),
    /// The database holding the leases did not answer: nothing is granted.
    #[error("mailbox lease: {0}")]
    Unavailable(UserbaseError),
    /// Our lease was taken over by another holder (it expired while the
    /// database could not be reached, or its row was deleted by hand).
    #[error("mailbox lease lost: another holder has it now")]
    Lost,
}

/// The cross-host layer: leases in the shared userbase database.
pub struct LeaseConfig {
    /// The shared database (its `leases_span_hosts()` should be true).
    pub userbase: Arc<dyn Userbase>,
    /// How long a lease lasts without renewal (`lock_lease_ms`): how long the
    /// mailboxes of a host that died stay locked.
    pub lease_ms: u64,
}

struct LeaseLayer {
    userbase: Arc<dyn Userbase>,
    /// This process: `host:pid:random`.
    holder: String,
    lease_ms: u64,
}

/// What the table knows about one held lock.
#[derive(Debug, Default)]
struct HeldState {
    /// The lock has a lease row (layer 3).
    leased: AtomicBool,
    /// A renewal found the row gone or someone else's.
    lost: AtomicBool,
}

/// The lock table of one process.
pub struct Locks {
    held: Mutex<HashMap<String, Arc<HeldState>>>,
    dir: Option<PathBuf>,
    lease: Option<LeaseLayer>,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks")
            .field("dir", &self.dir)
            .field("holder", &self.lease.as_ref().map(|l| &l.holder))
            .finish()
    }
}

/// A held lock; dropping it releases every layer.
#[derive(Debug)]
pub struct MailboxLock {
    locks: Arc<Locks>,
    name: String,
    state: Arc<HeldState>,
    _file: Option<File>,
}

impl Drop for MailboxLock {
    fn drop(&mut self) {
        if self.state.leased.load(Ordering::Acquire) {
            if let Some(lease) = &self.locks.lease {
                if let Err(e) = lease.userbase.lease_release(&self.name, &lease.holder) {
                    // The row expires by itself after lock_lease_ms.
                    log::warn!("mailbox lease of {} not released: {e}", self.name);
                }
            }
        }
        self.locks.lock().remove(&self.name);
    }
}

impl MailboxLock {
    /// Checks the lock still holds, right before acting on it (deleting
    /// messages): renews the lease now. `Err(Lost)` if another holder has it,
    /// `Err(Unavailable)` if the database cannot say; without a lease, `Ok`.
    pub fn confirm(&self) -> Result<(), LockError> {
        if self.state.lost.load(Ordering::Acquire) {
            return Err(LockError::Lost);
        }
        let Some(lease) = &self.locks.lease else {
            return Ok(());
        };
        if !self.state.leased.load(Ordering::Acquire) {
            return Ok(());
        }
        match lease
            .userbase
            .lease_renew(&self.name, &lease.holder, lease.lease_ms)
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.state.lost.store(true, Ordering::Release);
                Err(LockError::Lost)
            }
            Err(e) => Err(LockError::Unavailable(e)),
        }
    }

    /// True once a renewal found the lease taken over.
    pub fn is_lost(&self) -> bool {
        self.state.lost.load(Ordering::Acquire)
    }
}

/// Fan-out directory for a name (FNV-1a, 256 buckets).
fn fan(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:02x}", h & 0xff)
}

/// `host:pid:random`, at most [`LEASE_HOLDER_MAX_BYTES`].
fn holder_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown-host".to_string()
    };
    let tail = format!(":{}:{:016x}", std::process::id(), rand::random::<u64>());
    let room = LEASE_HOLDER_MAX_BYTES - tail.len();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != ':')
        .take(room)
        .collect();
    format!("{host}{tail}")
}

impl Locks {
    /// A lock table; with `dir`, also cross-process lock files under it.
    pub fn new(dir: Option<PathBuf>) -> Arc<Locks> {
        Arc::new(Locks {
            held: Mutex::new(HashMap::new()),
            dir,
            lease: None,
        })
    }

    /// A lock table with the cross-host lease layer too, and the thread that
    /// renews its leases every third of `lease.lease_ms` (it ends with the
    /// table). `lease_ms` is raised to [`LOCK_LEASE_MIN_MS`] if below.
    pub fn with_lease(dir: Option<PathBuf>, lease: LeaseConfig) -> io::Result<Arc<Locks>> {
        let lease_ms = lease.lease_ms.max(LOCK_LEASE_MIN_MS);
        let locks = Arc::new(Locks {
            held: Mutex::new(HashMap::new()),
            dir,
            lease: Some(LeaseLayer {
                userbase: lease.userbase,
                holder: holder_id(),
                lease_ms,
            }),
        });
        let weak = Arc::downgrade(&locks);
        let interval = Duration::from_millis(lease_ms / 3);
        std::thread::Builder::new()
            .name("lease-renew".into())
            .spawn(move || renew_loop(weak, interval))?;
        Ok(locks)
    }

    /// This process's lease holder id, if leases are on.
    pub fn holder(&self) -> Option<&str> {
        self.lease.as_ref().map(|l| l.holder.as_str())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<HeldState>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks `mailbox`: `Ok(None)` when another session (here, on this host
    /// or on another host) holds it.
    pub fn try_lock(
        self: &Arc<Self>,
        mailbox: &MailboxName,
    ) -> Result<Option<MailboxLock>, LockError> {
        let name = mailbox.as_str().to_string();
        let state = Arc::new(HeldState::default());
        {
            let mut held = self.lock();
            if held.contains_key(&name) {
                return Ok(None);
            }
            held.insert(name.clone(), state.clone());
        }
        // From here on, dropping `guard` undoes what was taken.
        let mut guard = MailboxLock {
            locks: self.clone(),
            name,
            state,
            _file: None,
        };
        if let Some(dir) = &self.dir {
            let dir = dir.join(fan(&guard.name));
            std::fs::create_dir_all(&dir)?;
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(&guard.name))?;
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(None)
                } else {
                    Err(e.into())
                };
            }
            guard._file = Some(file);
        }
        if let Some(lease) = &self.lease {
            match lease
                .userbase
                .lease_take(&guard.name, &lease.holder, lease.lease_ms)
            {
                Ok(true) => guard.state.leased.store(true, Ordering::Release),
                Ok(false) => return Ok(None),
                Err(e) => return Err(LockError::Unavailable(e)),
            }
        }
        Ok(Some(guard))
    }

    /// Mailboxes locked by this process.
    pub fn held(&self) -> usize {
        self.lock().len()
    }

    /// Renews every lease this table holds; marks the ones taken over lost.
    fn renew_all(&self) {
        let Some(lease) = &self.lease else { return };
        let held: Vec<(String, Arc<HeldState>)> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.leased.load(Ordering::Acquire) && !s.lost.load(Ordering::Acquire))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        for (name, state) in held {
            match lease
                .userbase
                .lease_renew(&name, &lease.holder, lease.lease_ms)
            {
                Ok(true) => {}
                // Released meanwhile (the map no longer has it), or taken over.
                Ok(false) => {
                    if self
                        .lock()
                        .get(&name)
                        .is_some_and(|s| Arc::ptr_eq(s, &state))
                    {
                        log::warn!("mailbox lease of {name} lost: another holder has it");
                        state.lost.store(true, Ordering::Release);
                    }
                }
                Err(e) => log::warn!("mailbox lease of {name} not renewed: {e}"),
            }
        }
    }
}

/// Renews the leases of the table behind `weak` every `interval` until the
/// table is gone.
fn renew_loop(weak: Weak<Locks>, interval: Duration) {
    loop {
        std::thread::sleep(interval);
        let Some(locks) = weak.upgrade() else { return };
        locks.renew_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> MailboxName {
        MailboxName::parse(s).expect("valid name")
    }

    #[test]
    fn second_lock_fails_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = Locks::new(Some(dir.path().to_path_buf()));
        // A second table on the same directory stands for another process:
        // flock locks belong to open files, so it conflicts the same way.
        let b = Locks::new(Some(dir.path().to_path_buf()));
        let m = name("bob@example.org");
        let held = a.try_lock(&m).unwrap().expect("free");
        assert!(a.try_lock(&m).unwrap().is_none(), "in-process layer");
        assert!(b.try_lock(&m).unwrap().is_none(), "flock layer");
        drop(held);
        assert_eq!(a.held(), 0);
        let again = b.try_lock(&m).unwrap();
        assert!(again.is_some());
        let mem = Locks::new(None);
        let _x = mem.try_lock(&m).unwrap().unwrap();
        assert!(mem.try_lock(&m).unwrap().is_none());
    }

    /// Two "hosts" (separate lock directories, so flock cannot see each
    /// other) sharing one database: only the lease keeps them apart. The
    /// lease SQL is the same on SQLite, so a SQLite file stands in here; the
    /// MariaDB case is `tests/system/tests/lease.rs`.
    fn two_hosts(lease_ms: u64) -> (tempfile::TempDir, Arc<Locks>, Arc<Locks>, Arc<dyn Userbase>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ub.db").display());
        let ub: Arc<dyn Userbase> = Arc::from(powermail_userbase::open(&url).expect("open"));
        let host = |n: &str| {
            Locks::with_lease(
                Some(dir.path().join(n)),
                LeaseConfig {
                    userbase: ub.clone(),
                    lease_ms,
                },
            )
            .expect("locks")
        };
        let (a, b) = (host("a"), host("b"));
        (dir, a, b, ub)
    }

    #[test]
    fn lease_keeps_hosts_apart_and_is_released_on_drop() {
        let (_dir, a, b, _ub) = two_hosts(60_000);
        assert_ne!(a.holder(), b.holder());
        let m = name("carol@example.org");
        let held = a.try_lock(&m).unwrap().expect("free");
        assert!(
            b.try_lock(&m).unwrap().is_none(),
            "the other host sees the lease"
        );
        held.confirm().expect("still ours");
        drop(held);
        let on_b = b.try_lock(&m).unwrap().expect("released at drop");
        assert!(a.try_lock(&m).unwrap().is_none());
        assert_eq!(a.held(), 0, "a refused lease leaves nothing held");
        drop(on_b);
    }

    #[test]
    fn a_lease_taken_over_fails_confirm() {
        let (_dir, a, b, ub) = two_hosts(60_000);
        let m = name("dave@example.org");
        let held = a.try_lock(&m).unwrap().expect("free");
        // The operator deletes the row (or it expired and was taken): b wins.
        ub.lease_release(m.as_str(), a.holder().expect("holder"))
            .expect("delete");
        let _on_b = b.try_lock(&m).unwrap().expect("row gone");
        assert!(matches!(held.confirm(), Err(LockError::Lost)));
        assert!(held.is_lost());
        // Dropping a lost lock must not delete b's row.
        drop(held);
        assert!(a.try_lock(&m).unwrap().is_none(), "b still holds it");
    }

    #[test]
    fn leases_are_renewed_while_held() {
        const LEASE_MS: u64 = 1500;
        let (_dir, a, b, _ub) = two_hosts(LEASE_MS);
        let m = name("erin@example.org");
        let held = a.try_lock(&m).unwrap().expect("free");
        // Three lease lengths: without renewal b would get it.
        for _ in 0..9 {
            std::thread::sleep(Duration::from_millis(LEASE_MS / 3));
            assert!(b.try_lock(&m).unwrap().is_none(), "renewed in time");
        }
        assert!(!held.is_lost());
        drop(held);
        assert!(b.try_lock(&m).unwrap().is_some());
    }

    #[test]
    fn an_unreachable_database_refuses_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let url = "mysql://root@127.0.0.1:1/none?connect_timeout_ms=200";
        let ub: Arc<dyn Userbase> =
            Arc::from(powermail_userbase::open_lazy(url, false).expect("lazy"));
        let locks = Locks::with_lease(
            Some(dir.path().to_path_buf()),
            LeaseConfig {
                userbase: ub,
                lease_ms: 60_000,
            },
        )
        .expect("locks");
        let m = name("frank@example.org");
        assert!(matches!(locks.try_lock(&m), Err(LockError::Unavailable(_))));
        assert_eq!(locks.held(), 0, "nothing stays held");
        // The flock layer was released too: a plain table on the same dir gets it.
        let plain = Locks::new(Some(dir.path().to_path_buf()));
        assert!(plain.try_lock(&m).unwrap().is_some());
    }

    #[test]
    fn holder_ids_are_bounded_and_distinct() {
        let (x, y) = (holder_id(), holder_id());
        assert_ne!(x, y);
        assert!(x.len() <= LEASE_HOLDER_MAX_BYTES);
        assert_eq!(x.matches(':').count(), 2, "{x}");
    }
}
