//! Mailbox locks: one POP3 session per mailbox at a time (RFC 1939 §8
//! "exclusive-access lock"); a second gets `-ERR [IN-USE]`.
//!
//! Two layers, taken in order:
//!
//! 1. in the process, a mutex-protected set of locked mailbox names;
//! 2. across the powerpop processes of a host, an exclusive, non-blocking
//!    `flock` on `state_dir/locks/<fan>/<mailbox>`. The kernel drops the lock
//!    when the process dies, so a crash never leaves a mailbox locked. Lock
//!    files are never removed: removing one races with a process that has it
//!    open but not yet locked.
//!
//! Across hosts, `flock` on a shared NFS state directory is not to be relied
//! upon; see `frontends/pop/README.md` for the backend-held lock that would
//! close that gap.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use powermail_proto::MailboxName;

/// The lock table of one process.
#[derive(Debug)]
pub struct Locks {
    held: Mutex<HashSet<String>>,
    dir: Option<PathBuf>,
}

/// A held lock; dropping it releases both layers.
#[derive(Debug)]
pub struct MailboxLock {
    locks: Arc<Locks>,
    name: String,
    _file: Option<File>,
}

impl Drop for MailboxLock {
    fn drop(&mut self) {
        self.locks.lock().remove(&self.name);
    }
}

/// Fan-out directory for a name (FNV-1a, 256 buckets).
fn fan(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:02x}", h & 0xff)
}

impl Locks {
    /// A lock table; with `dir`, also cross-process lock files under it.
    pub fn new(dir: Option<PathBuf>) -> Arc<Locks> {
        Arc::new(Locks {
            held: Mutex::new(HashSet::new()),
            dir,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks `mailbox`: `Ok(None)` when another session holds it.
    pub fn try_lock(self: &Arc<Self>, mailbox: &MailboxName) -> io::Result<Option<MailboxLock>> {
        let name = mailbox.as_str().to_string();
        if !self.lock().insert(name.clone()) {
            return Ok(None);
        }
        // From here on, dropping `guard` undoes the in-process layer.
        let mut guard = MailboxLock {
            locks: self.clone(),
            name,
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
                    Err(e)
                };
            }
            guard._file = Some(file);
        }
        Ok(Some(guard))
    }

    /// Mailboxes locked by this process.
    pub fn held(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = Locks::new(Some(dir.path().to_path_buf()));
        // A second table on the same directory stands for another process:
        // flock locks belong to open files, so it conflicts the same way.
        let b = Locks::new(Some(dir.path().to_path_buf()));
        let m = MailboxName::parse("bob@example.org").unwrap();
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
}
