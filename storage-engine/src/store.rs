//! The on-disk layout of one backend, and every file-system call made on it
//! apart from the message body write (see [`crate::writer`]).
//!
//! ```text
//! DATA/.probe                     4 KiB, opened first by the executor (glommio probe workaround)
//! DATA/readonly                   present = an operator made this backend read-only
//! DATA/tmp/                      bodies being written (O_TMPFILE: nameless, gone on a crash);
//!                                 named extra copies past the link limit, removed at start-up
//! DATA/mbox/<h1>/<h2>/<mailbox>/<msgid>   one hard link per mailbox holding the message
//! ```
//!
//! `h1/h2` are the first two bytes of SHA-256(mailbox) in hex, so no
//! directory grows past ~65k entries of mailboxes. Mailbox names and message
//! ids reach a path only as [`MailboxName`] / [`MessageId`], which are
//! validated. The functions here block (link, readdir, fsync of directories):
//! the executor calls them through its blocking thread pool.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use powermail_proto::{MailboxName, MessageId};
use sha2::{Digest, Sha256};

/// Size of the probe file (the glommio start-up probe needs >= 4 KiB).
const PROBE_BYTES: usize = 4096;

/// One backend's directory tree.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    tmp: PathBuf,
    mbox: PathBuf,
    /// `linkat(fd, "", AT_EMPTY_PATH)` names a nameless body here (since
    /// Linux 6.10 for a file this process opened, or with
    /// `CAP_DAC_READ_SEARCH`); otherwise, or once it has been refused,
    /// `/proc/self/fd/N` is used.
    empty_path_link: Arc<AtomicBool>,
}

/// One durable body waiting to be linked into its mailboxes.
#[derive(Debug, Clone)]
pub struct LinkJob {
    /// The durable body: an open `O_TMPFILE`, nameless until linked
    /// (`AT_EMPTY_PATH`, or `/proc/self/fd/N`). The caller keeps it open
    /// until linked.
    pub fd: RawFd,
    /// Its id.
    pub msgid: MessageId,
    /// Where it goes.
    pub mailboxes: Vec<MailboxName>,
}

/// What linking a stored body into its mailboxes did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkOutcome {
    /// New links made.
    pub created: u64,
    /// Mailboxes that already held this id (a retried PUT): left as they were.
    pub existing: u64,
    /// Extra copies made because one inode hit the file system's link limit.
    pub extra_copies: u64,
}

impl Store {
    /// Opens (creating if needed) the tree under `root`, removes temporaries
    /// left by a crash, and makes sure the probe file exists.
    pub fn open(root: &Path) -> io::Result<(Store, usize)> {
        let store = Store {
            root: root.to_path_buf(),
            tmp: root.join("tmp"),
            mbox: root.join("mbox"),
            empty_path_link: Arc::new(AtomicBool::new(false)),
        };
        fs::create_dir_all(&store.tmp)?;
        fs::create_dir_all(&store.mbox)?;
        let mut removed = 0;
        for entry in fs::read_dir(&store.tmp)? {
            fs::remove_file(entry?.path())?;
            removed += 1;
        }
        let empty_path = store.probe_empty_path_link();
        store.empty_path_link.store(empty_path, Ordering::Relaxed);
        if removed > 0 {
            sync_dir(&store.tmp)?;
        }
        let probe = store.probe_path();
        if fs::metadata(&probe)
            .map(|m| m.len() < PROBE_BYTES as u64)
            .unwrap_or(true)
        {
            fs::write(&probe, vec![0u8; PROBE_BYTES])?;
        }
        sync_dir(root)?;
        Ok((store, removed))
    }

    /// Whether `linkat(AT_EMPTY_PATH)` can name a nameless file this
    /// process made: links one into `tmp/` and removes the name again.
    fn probe_empty_path_link(&self) -> bool {
        let Ok(file) = create_nameless(&self.tmp) else {
            return false;
        };
        let name = self.tmp.join(".linkat-probe");
        let linked = link_fd(file.as_raw_fd(), &name, true).is_ok();
        if linked {
            let _ = fs::remove_file(&name);
        }
        linked
    }

    /// Whether bodies are named with `AT_EMPTY_PATH` (see [`Store::open`]).
    pub fn links_with_empty_path(&self) -> bool {
        self.empty_path_link.load(Ordering::Relaxed)
    }

    /// The probe file the executor opens first.
    pub fn probe_path(&self) -> PathBuf {
        self.root.join(".probe")
    }

    /// The marker whose presence means "an operator set read-only".
    pub fn readonly_marker(&self) -> PathBuf {
        self.root.join("readonly")
    }

    /// The directory that holds bodies being written.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// A fresh temporary path (for the extra copy past the link limit).
    pub fn temp_path(&self, msgid: &MessageId) -> PathBuf {
        let nonce: u64 = rand::random();
        self.tmp.join(format!("{msgid}.{nonce:016x}"))
    }

    /// The directory of one mailbox.
    pub fn mailbox_dir(&self, mailbox: &MailboxName) -> PathBuf {
        let h = Sha256::digest(mailbox.as_str().as_bytes());
        self.mbox
            .join(format!("{:02x}", h[0]))
            .join(format!("{:02x}", h[1]))
            .join(mailbox.as_str())
    }

    /// Writes `body` to a nameless file and links it into every mailbox as
    /// `msgid`, durably (what a PUT does, without io_uring).
    #[cfg(test)]
    pub fn store_body(
        &self,
        body: &[u8],
        msgid: &MessageId,
        mailboxes: &[MailboxName],
    ) -> io::Result<LinkOutcome> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut file = create_nameless(&self.tmp)?;
        file.write_all(body)?;
        file.sync_data()?;
        let job = LinkJob {
            fd: file.as_raw_fd(),
            msgid: msgid.clone(),
            mailboxes: mailboxes.to_vec(),
        };
        let (mut results, dirs) = self.link_batch(std::slice::from_ref(&job), true);
        for d in dirs {
            sync_dir(&d)?;
        }
        results.pop().expect("one result per job")
    }

    /// The link stage of a batch: links every job's durable body into its
    /// mailboxes and removes the temporary names. Returns one result per job,
    /// in order, and the directories that must be fsynced (once each, for the
    /// whole batch) before any of the jobs may be acknowledged.
    ///
    /// Mailboxes that already hold the id are left alone (PUT is idempotent:
    /// ids are unique and bodies immutable). On `EMLINK` a second copy of the
    /// body is made and linking goes on from it; `sync_copies` says whether
    /// such a copy gets its own `fdatasync` (not when a `syncfs` of the whole
    /// file system follows the batch).
    pub fn link_batch(
        &self,
        jobs: &[LinkJob],
        sync_copies: bool,
    ) -> (Vec<io::Result<LinkOutcome>>, Vec<PathBuf>) {
        let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
        let mut temps: Vec<PathBuf> = Vec::new();
        let results: Vec<io::Result<LinkOutcome>> = jobs
            .iter()
            .map(|job| self.link_one(job, sync_copies, &mut dirs, &mut temps))
            .collect();
        // Extra copies past the link limit are named temporaries: their names
        // are not needed for durability, and any that survives a crash is
        // removed at start-up.
        for t in temps {
            if let Err(e) = fs::remove_file(&t) {
                log::warn!("removing {}: {e}", t.display());
            }
        }
        (results, dirs.into_iter().collect())
    }

    fn link_one(
        &self,
        job: &LinkJob,
        sync_copies: bool,
        dirs: &mut BTreeSet<PathBuf>,
        temps: &mut Vec<PathBuf>,
    ) -> io::Result<LinkOutcome> {
        let mut out = LinkOutcome::default();
        // Past the link limit, linking goes on from a named copy.
        let mut copy: Option<PathBuf> = None;
        for mailbox in &job.mailboxes {
            let dir = self.mailbox_dir(mailbox);
            let target = dir.join(job.msgid.as_str());
            loop {
                // The mailbox's directory is created only when a link into
                // it fails for want of it: no lookup per link.
                let linked = match self.link_body(job.fd, copy.as_deref(), &target) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.ensure_dir(&dir, dirs)?;
                        self.link_body(job.fd, copy.as_deref(), &target)
                    }
                    linked => linked,
                };
                match linked {
                    Ok(()) => out.created += 1,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => out.existing += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                        let next = self.temp_path(&job.msgid);
                        match &copy {
                            Some(from) => fs::copy(from, &next)?,
                            None => fs::copy(proc_fd_path(job.fd), &next)?,
                        };
                        if sync_copies {
                            File::open(&next)?.sync_data()?;
                        }
                        temps.push(next.clone());
                        copy = Some(next);
                        out.extra_copies += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                break;
            }
            dirs.insert(dir);
        }
        Ok(out)
    }

    /// Gives the body `dst` as a name: from its named `copy` if there is
    /// one, else from the open nameless file `fd`, with `AT_EMPTY_PATH`
    /// where the probe found it allowed and through `/proc/self/fd/N`
    /// otherwise. `AT_EMPTY_PATH` is refused with `ENOENT`, as a missing
    /// directory is; where the directory exists, that refusal turns it off.
    fn link_body(&self, fd: RawFd, copy: Option<&Path>, dst: &Path) -> io::Result<()> {
        if let Some(from) = copy {
            return fs::hard_link(from, dst);
        }
        if !self.links_with_empty_path() {
            return link_fd(fd, dst, false);
        }
        match link_fd(fd, dst, true) {
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && dst.parent().is_some_and(Path::is_dir) =>
            {
                let by_proc = link_fd(fd, dst, false);
                if by_proc.is_ok() {
                    log::warn!(
                        "{}: linkat(AT_EMPTY_PATH) refused; naming bodies through /proc/self/fd",
                        self.root.display()
                    );
                    self.empty_path_link.store(false, Ordering::Relaxed);
                }
                by_proc
            }
            linked => linked,
        }
    }

    /// Creates `dir` and any missing parents under `mbox/`. The parent of
    /// every directory created goes into `dirs`, to be fsynced with the batch
    /// (nothing is acknowledged before that, so the order does not matter).
    fn ensure_dir(&self, dir: &Path, dirs: &mut BTreeSet<PathBuf>) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let parent = dir
            .parent()
            .ok_or_else(|| io::Error::other("mailbox dir has no parent"))?;
        if parent != self.mbox {
            self.ensure_dir(parent, dirs)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => {
                dirs.insert(parent.to_path_buf());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The messages of a mailbox, `(id, size)`, sorted by id (= by arrival
    /// for generated ids), at most `max` of them. A missing mailbox is empty.
    pub fn list(&self, mailbox: &MailboxName, max: usize) -> io::Result<Vec<(MessageId, u64)>> {
        let entries = match fs::read_dir(self.mailbox_dir(mailbox)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| MessageId::parse(n).ok())
            else {
                continue;
            };
            let size = match entry.metadata() {
                Ok(m) => m.len(),
                // Deleted between readdir and stat: not listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push((id, size));
        }
        out.sort_unstable();
        out.truncate(max);
        Ok(out)
    }

    /// Opens one message for reading; returns the file and its size (see
    /// [`open_for_reading`]).
    pub fn open_message(
        &self,
        mailbox: &MailboxName,
        msgid: &MessageId,
    ) -> io::Result<(File, u64)> {
        let path = self.mailbox_dir(mailbox).join(msgid.as_str());
        open_for_reading(libc::AT_FDCWD, path.as_os_str().as_bytes())
    }

    /// Opens several messages of one mailbox for reading, as
    /// [`Store::open_message`] does one: the mailbox's directory is opened
    /// once and each name resolved against it (no path walk per message).
    /// One result per id, in order.
    pub fn open_messages(
        &self,
        mailbox: &MailboxName,
        msgids: &[MessageId],
    ) -> Vec<io::Result<(File, u64)>> {
        let dir = match File::open(self.mailbox_dir(mailbox)) {
            Ok(dir) => dir,
            Err(e) => {
                return msgids
                    .iter()
                    .map(|_| {
                        Err(e.raw_os_error().map_or_else(
                            || io::Error::new(e.kind(), e.to_string()),
                            io::Error::from_raw_os_error,
                        ))
                    })
                    .collect();
            }
        };
        msgids
            .iter()
            .map(|msgid| open_for_reading(dir.as_raw_fd(), msgid.as_str().as_bytes()))
            .collect()
    }

    /// Removes one message from one mailbox, durably. `NotFound` if absent.
    pub fn delete(&self, mailbox: &MailboxName, msgid: &MessageId) -> io::Result<()> {
        let mut r = Remover::open(&self.mailbox_dir(mailbox))?;
        r.remove(msgid.as_str().as_bytes())?;
        r.sync()
    }

    /// Removes each of `msgids` that `mailbox` holds, then syncs the directory
    /// once; returns how many were removed, and the removed files, still
    /// open: their removal is durable, and dropping them frees their blocks
    /// (see [`Released`]). Missing ids are skipped: a retried or replayed
    /// deletion is not an error.
    pub fn delete_many(
        &self,
        mailbox: &MailboxName,
        msgids: &[MessageId],
    ) -> io::Result<(u64, Released)> {
        let mut r = match Remover::open(&self.mailbox_dir(mailbox)) {
            Ok(r) => r,
            // No directory: none of them is here.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, Released::default())),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for msgid in msgids {
            match r.remove(msgid.as_str().as_bytes()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    r.sync()?;
                    return Err(e);
                }
            }
        }
        Ok((removed, r.finish()?))
    }

    /// `(messages, bytes)` of a mailbox, by a walk (the server answers USAGE
    /// from its index; this is the reference the tests compare it with).
    #[cfg(test)]
    pub fn usage(&self, mailbox: &MailboxName) -> io::Result<(u64, u64)> {
        let list = self.list(mailbox, usize::MAX)?;
        Ok((list.len() as u64, list.iter().map(|(_, s)| s).sum()))
    }

    /// Removes a whole mailbox; returns how many messages it held.
    pub fn nuke(&self, mailbox: &MailboxName) -> io::Result<u64> {
        let dir = self.mailbox_dir(mailbox);
        let mut removed = 0;
        match fs::read_dir(&dir) {
            Ok(entries) => {
                let mut r = Remover::open(&dir)?;
                for entry in entries {
                    r.remove(entry?.file_name().as_bytes())?;
                    removed += 1;
                }
                r.sync()?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        }
        fs::remove_dir(&dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(removed)
    }

    /// Every mailbox that has a directory here (at most `max`).
    pub fn mailboxes(&self, max: usize) -> io::Result<Vec<MailboxName>> {
        let mut out = Vec::new();
        'walk: for l1 in fs::read_dir(&self.mbox)? {
            for l2 in fs::read_dir(l1?.path())? {
                for m in fs::read_dir(l2?.path())? {
                    if let Some(name) = m?
                        .file_name()
                        .to_str()
                        .and_then(|n| MailboxName::parse(n).ok())
                    {
                        out.push(name);
                        if out.len() >= max {
                            break 'walk;
                        }
                    }
                }
            }
        }
        // Sorted whether or not the limit cut the walk short.
        out.sort_unstable();
        Ok(out)
    }

    /// The first `max` mailboxes in name order that sort after `after` (from the
    /// first when `None`): one page of `DIR`. Walks every mailbox directory and
    /// keeps only the page, so memory stays bounded by `max` whatever the store holds.
    pub fn mailboxes_after(
        &self,
        max: usize,
        after: Option<&MailboxName>,
    ) -> io::Result<Vec<MailboxName>> {
        let mut page = std::collections::BTreeSet::new();
        for l1 in fs::read_dir(&self.mbox)? {
            for l2 in fs::read_dir(l1?.path())? {
                for m in fs::read_dir(l2?.path())? {
                    let Some(name) = m?
                        .file_name()
                        .to_str()
                        .and_then(|n| MailboxName::parse(n).ok())
                    else {
                        continue;
                    };
                    if after.is_some_and(|a| name <= *a) {
                        continue;
                    }
                    page.insert(name);
                    if page.len() > max {
                        page.pop_last();
                    }
                }
            }
        }
        Ok(page.into_iter().collect())
    }

    /// Free and total bytes and free inodes of the file system holding the store.
    pub fn space(&self) -> io::Result<Space> {
        statvfs(&self.root)
    }

    /// Link count of a stored message.
    #[cfg(test)]
    pub fn link_count(&self, mailbox: &MailboxName, msgid: &MessageId) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(fs::metadata(self.mailbox_dir(mailbox).join(msgid.as_str()))?.nlink())
    }
}

/// `/proc/self/fd/N`: the path that names an open file, nameless or not.
fn proc_fd_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Gives the open file `fd` the name `dst` (`linkat(2)`): with
/// `AT_EMPTY_PATH` on the descriptor itself, or through `/proc/self/fd/N`
/// with `AT_SYMLINK_FOLLOW`, which needs no privilege on any kernel.
fn link_fd(fd: RawFd, dst: &Path, empty_path: bool) -> io::Result<()> {
    let cstr = |p: &[u8]| {
        std::ffi::CString::new(p)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
    };
    let d = cstr(dst.as_os_str().as_bytes())?;
    let r = if empty_path {
        // SAFETY: a valid C string and an empty one; `fd` is open.
        unsafe {
            libc::linkat(
                fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                d.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        }
    } else {
        let s = cstr(proc_fd_path(fd).as_os_str().as_bytes())?;
        // SAFETY: two valid C strings; AT_FDCWD for both directories.
        unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                s.as_ptr(),
                libc::AT_FDCWD,
                d.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The mode of every message file: the mail is for its owner only.
pub const BODY_MODE: libc::mode_t = 0o600;

/// Creates a nameless file (`O_TMPFILE`, [`BODY_MODE`]) in `dir`, open for
/// writing: a body, or a probe, that vanishes on close unless linked.
pub fn create_nameless(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(BODY_MODE)
        .open(dir)
}

/// Makes a directory's entries durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Files held open at most by one [`Remover`] before it syncs its directory.
const REMOVER_PINNED_MAX: usize = 1024;

/// Removes files from one directory so that no block of theirs can be
/// reused before their removal is durable.
///
/// Unlinking a message's last name frees its blocks at once, and a body
/// written the next moment may get them; its `O_DIRECT` data and the flush
/// that covers it can reach the disk before the directory block that no
/// longer names the deleted message. After a power cut in between, the
/// message — its delete never acknowledged — is listed again with another
/// message's bytes (the power-cut suite found exactly that on an ext4
/// without a journal). So each file is held open (`O_PATH`, which keeps the
/// inode and its blocks) from before its unlink until the directory's
/// `fsync` has made the removal durable; only then are its blocks freed.
/// Names are resolved against the directory's descriptor: no path walk per
/// file.
struct Remover {
    dir: File,
    pinned: Vec<File>,
}

impl Remover {
    /// Opens `dir`; `NotFound` if it does not exist.
    fn open(dir: &Path) -> io::Result<Remover> {
        Ok(Remover {
            dir: File::open(dir)?,
            pinned: Vec::new(),
        })
    }

    /// Unlinks `name` (one path component: callers pass validated message
    /// ids or names read from the directory); `NotFound` if it is not there.
    fn remove(&mut self, name: &[u8]) -> io::Result<()> {
        if self.pinned.len() >= REMOVER_PINNED_MAX {
            self.sync()?;
        }
        let name = std::ffi::CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))?;
        let dir = self.dir.as_raw_fd();
        let open = || {
            // SAFETY: a valid directory fd and NUL-terminated name; the new fd is owned below.
            let fd = unsafe {
                libc::openat(
                    dir,
                    name.as_ptr(),
                    libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            match fd {
                -1 => Err(io::Error::last_os_error()),
                fd => Ok(fd),
            }
        };
        let fd = match open() {
            // Out of descriptors: let go of those held (after their sync), once.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                    && !self.pinned.is_empty() =>
            {
                self.sync()?;
                open()?
            }
            r => r?,
        };
        // SAFETY: `fd` was just opened and is owned by nobody else.
        self.pinned.push(unsafe { File::from_raw_fd(fd) });
        // SAFETY: as for openat.
        if unsafe { libc::unlinkat(dir, name.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes every removal durable (one `fsync` of the directory) and hands
    /// over the removed files instead of closing them here.
    fn finish(mut self) -> io::Result<Released> {
        if !self.pinned.is_empty() {
            self.dir.sync_all()?;
        }
        Ok(Released(std::mem::take(&mut self.pinned)))
    }

    /// Makes every removal so far durable (one `fsync` of the directory),
    /// then lets their blocks go.
    fn sync(&mut self) -> io::Result<()> {
        if self.pinned.is_empty() {
            return Ok(());
        }
        self.dir.sync_all()?;
        self.pinned.clear();
        Ok(())
    }
}

/// Removed files whose removal is durable, still open. Dropping them frees
/// their blocks: the last close of an unlinked file truncates it, and on a
/// file system mounted with `discard` and no journal it waits for the
/// device's discard of every extent (measured: the largest part of a POP3
/// drain's cost in pplistener). Callers answer first and drop these after.
#[derive(Debug, Default)]
pub struct Released(Vec<File>);

impl Released {
    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Opens `name` (relative to the directory `dir`, or to the working
/// directory with `AT_FDCWD`) for reading; returns the file and its size.
///
/// With `O_NOATIME`: under `relatime` the first read of every new message
/// would otherwise update its access time (its atime is older than its
/// mtime), dirtying an inode that is often unlinked right after (a POP3
/// drain) only for it to be written back. The flag needs the file's owner
/// or `CAP_FOWNER`; without them (`EPERM`) the file is opened as usual.
/// `O_NOFOLLOW`: a message file is never a symbolic link.
fn open_for_reading(dir: RawFd, name: &[u8]) -> io::Result<(File, u64)> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))?;
    let open = |extra: libc::c_int| {
        // SAFETY: `dir` is a directory fd or AT_FDCWD, `name` is NUL-terminated;
        // the new fd is owned below.
        let fd = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    };
    let file = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
        opened => opened?,
    };
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// What `statvfs(2)` says of a file system, as this (unprivileged) process sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes available (`f_bavail` blocks).
    pub free_bytes: u64,
    /// Size of the file system in bytes.
    pub total_bytes: u64,
    /// Inodes available (`f_favail`): every message and mailbox directory takes one.
    pub free_inodes: u64,
}

/// Free and total bytes and free inodes of the file system holding `path`.
pub fn statvfs(path: &Path) -> io::Result<Space> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = s.f_frsize as u64;
    Ok(Space {
        free_bytes: (s.f_bavail as u64).saturating_mul(frsize),
        total_bytes: (s.f_blocks as u64).saturating_mul(frsize),
        free_inodes: s.f_favail as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> MailboxName {
        MailboxName::parse(s).unwrap()
    }

    fn msgids(ids: &[&str]) -> Vec<MessageId> {
        ids.iter().map(|i| MessageId::parse(i).unwrap()).collect()
    }

    #[test]
    fn a_remover_keeps_each_file_until_its_removal_is_synced() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"body a").unwrap();
        fs::write(dir.path().join("b"), b"body b").unwrap();
        let mut r = Remover::open(dir.path()).unwrap();
        r.remove(b"a").unwrap();
        assert!(!dir.path().join("a").exists(), "the name is gone at once");
        assert_eq!(r.pinned.len(), 1);
        // Nameless but alive: its blocks cannot be handed out yet.
        assert_eq!(r.pinned[0].metadata().unwrap().nlink(), 0);
        let e = r.remove(b"missing").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(r.pinned.len(), 1, "nothing held for a missing name");
        r.sync().unwrap();
        assert!(r.pinned.is_empty(), "let go once the removal is durable");
        assert!(dir.path().join("b").exists());
    }

    #[test]
    fn a_remover_syncs_before_it_holds_more_than_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..=REMOVER_PINNED_MAX {
            fs::write(dir.path().join(i.to_string()), b"x").unwrap();
        }
        let mut r = Remover::open(dir.path()).unwrap();
        for i in 0..=REMOVER_PINNED_MAX {
            r.remove(i.to_string().as_bytes()).unwrap();
            assert!(r.pinned.len() <= REMOVER_PINNED_MAX);
        }
        assert_eq!(r.pinned.len(), 1, "synced and let go when full");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn link_list_delete_nuke() {
        let dir = tempfile::tempdir().unwrap();
        let (store, removed) = Store::open(dir.path()).unwrap();
        assert_eq!(removed, 0);
        let id = MessageId::parse("m1").unwrap();
        let boxes = [mb("a@x"), mb("b@x"), mb("c@x")];
        let out = store.store_body(b"hello", &id, &boxes).unwrap();
        assert_eq!(
            out,
            LinkOutcome {
                created: 3,
                existing: 0,
                extra_copies: 0
            }
        );
        assert_eq!(
            fs::read_dir(store.tmp_dir()).unwrap().count(),
            0,
            "nothing named in tmp/"
        );
        assert_eq!(store.link_count(&boxes[0], &id).unwrap(), 3);
        assert_eq!(store.list(&boxes[1], 10).unwrap(), vec![(id.clone(), 5)]);
        store.delete(&boxes[0], &id).unwrap();
        assert_eq!(store.link_count(&boxes[1], &id).unwrap(), 2);
        assert_eq!(
            store.delete(&boxes[0], &id).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(store.usage(&boxes[2]).unwrap(), (1, 5));
        assert_eq!(store.mailboxes(100).unwrap().len(), 3);
        // DIR pages: name order, bounded, resumed after the last name.
        let all = store.mailboxes_after(100, None).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        let first = store.mailboxes_after(2, None).unwrap();
        assert_eq!(first, all[..2]);
        let rest = store.mailboxes_after(2, first.last()).unwrap();
        assert_eq!(rest, all[2..]);
        assert!(store.mailboxes_after(2, rest.last()).unwrap().is_empty());
        assert_eq!(store.nuke(&boxes[2]).unwrap(), 1);
        assert_eq!(store.list(&boxes[2], 10).unwrap(), vec![]);
        assert_eq!(store.link_count(&boxes[1], &id).unwrap(), 1);
    }

    /// Both ways of naming a nameless body give the same tree: into a new
    /// mailbox (its directory made, and the parents of what was made listed
    /// for the batch fsync) and into an existing one (its directory listed).
    #[test]
    fn bodies_are_named_the_same_with_or_without_empty_path() {
        use std::io::Write;
        for empty_path in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = Store::open(dir.path()).unwrap();
            if !store.links_with_empty_path() {
                assert!(empty_path, "only the probe turns it off");
                eprintln!("linkat(AT_EMPTY_PATH) refused here: the /proc path only");
                continue;
            }
            store.empty_path_link.store(empty_path, Ordering::Relaxed);
            let (old, new) = (mb("old@x"), mb("new@x"));
            store
                .store_body(
                    b"first",
                    &MessageId::parse("m0").unwrap(),
                    std::slice::from_ref(&old),
                )
                .unwrap();
            let mut file = create_nameless(store.tmp_dir()).unwrap();
            file.write_all(b"second").unwrap();
            let id = MessageId::parse("m1").unwrap();
            let job = LinkJob {
                fd: file.as_raw_fd(),
                msgid: id.clone(),
                mailboxes: vec![old.clone(), new.clone()],
            };
            let (results, dirs) = store.link_batch(std::slice::from_ref(&job), true);
            let out = results.into_iter().next().unwrap().unwrap();
            assert_eq!((out.created, out.existing, out.extra_copies), (2, 0, 0));
            assert_eq!(store.links_with_empty_path(), empty_path, "not turned off");
            let new_dir = store.mailbox_dir(&new);
            let mut want: BTreeSet<PathBuf> = [store.mailbox_dir(&old), new_dir.clone()].into();
            want.insert(new_dir.parent().unwrap().to_path_buf());
            assert!(
                dirs.iter()
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .is_superset(&want),
                "{dirs:?} lacks some of {want:?}"
            );
            assert_eq!(store.list(&new, 10).unwrap(), vec![(id.clone(), 6)]);
            assert_eq!(store.link_count(&old, &id).unwrap(), 2);
            assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
        }
    }

    #[test]
    fn retried_put_is_idempotent_and_temporaries_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let id = MessageId::parse("m1").unwrap();
        for expect_created in [1, 0] {
            let out = store.store_body(b"x", &id, &[mb("a@x")]).unwrap();
            assert_eq!(out.created, expect_created);
        }
        assert_eq!(store.list(&mb("a@x"), 10).unwrap().len(), 1);
        fs::write(store.temp_path(&id), b"partial").unwrap();
        drop(store);
        let (_, removed) = Store::open(dir.path()).unwrap();
        assert_eq!(removed, 1);
    }

    /// Reading a message leaves its access time alone, where `relatime` would
    /// have updated it (the atime is set older than the mtime first).
    #[test]
    fn reading_a_message_does_not_touch_its_atime() {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let id = MessageId::parse("m1").unwrap();
        let a = mb("a@x");
        store
            .store_body(b"hello", &id, std::slice::from_ref(&a))
            .unwrap();
        let path = store.mailbox_dir(&a).join(id.as_str());
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let f = File::options().write(true).open(&path).unwrap();
        f.set_times(fs::FileTimes::new().set_accessed(old)).unwrap();
        drop(f);
        let before = fs::metadata(&path).unwrap().atime();
        assert_eq!(before, 1_000_000);
        let (mut file, size) = store.open_message(&a, &id).unwrap();
        let mut body = Vec::new();
        file.read_to_end(&mut body).unwrap();
        assert_eq!((size, body.as_slice()), (5, &b"hello"[..]));
        assert_eq!(fs::metadata(&path).unwrap().atime(), before);
        let (mut file, _) = store.open_messages(&a, &[id]).pop().unwrap().unwrap();
        file.read_to_end(&mut Vec::new()).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().atime(),
            before,
            "batch opens too"
        );
    }

    /// A batch open answers as one open per message: body and size, or
    /// `NotFound` for a missing message or mailbox.
    #[test]
    fn a_batch_open_answers_as_single_opens_do() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let a = mb("a@x");
        let ids = msgids(&["m1", "m2", "m3"]);
        store
            .store_body(b"one", &ids[0], std::slice::from_ref(&a))
            .unwrap();
        store
            .store_body(b"three", &ids[2], std::slice::from_ref(&a))
            .unwrap();
        let read = |o: io::Result<(File, u64)>| {
            o.map(|(mut f, size)| {
                let mut body = Vec::new();
                f.read_to_end(&mut body).unwrap();
                (size, body)
            })
            .map_err(|e| e.kind())
        };
        let got: Vec<_> = store
            .open_messages(&a, &ids)
            .into_iter()
            .map(read)
            .collect();
        let single: Vec<_> = ids
            .iter()
            .map(|id| read(store.open_message(&a, id)))
            .collect();
        assert_eq!(got, single);
        assert_eq!(got[0], Ok((3, b"one".to_vec())));
        assert_eq!(got[1], Err(io::ErrorKind::NotFound));
        let none = store.open_messages(&mb("nobody@x"), &ids);
        assert!(none
            .iter()
            .all(|o| o.as_ref().unwrap_err().kind() == io::ErrorKind::NotFound));
    }

    /// A batch delete is durable when it returns and hands back the removed
    /// files, still open (their blocks are freed when they are dropped).
    #[test]
    fn a_batch_delete_hands_back_the_removed_files() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let a = mb("a@x");
        let ids = msgids(&["m1", "m2", "m3"]);
        for id in &ids[..2] {
            store
                .store_body(b"x", id, std::slice::from_ref(&a))
                .unwrap();
        }
        let (n, released) = store.delete_many(&a, &ids).unwrap();
        assert_eq!(n, 2, "the missing one is skipped");
        assert_eq!(released.0.len(), 2);
        assert!(released
            .0
            .iter()
            .all(|f| f.metadata().unwrap().nlink() == 0));
        assert_eq!(store.list(&a, 10).unwrap(), vec![]);
        let (n, released) = store.delete_many(&mb("nobody@x"), &ids).unwrap();
        assert_eq!((n, released.is_empty()), (0, true));
    }
}
