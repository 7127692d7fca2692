//! The FUSE face of one [`Disk`]: a flat directory with three files.
//!
//! * `disk.img` — the disk. Opened with `FOPEN_DIRECT_IO`, so the kernel's
//!   page cache never holds its data: every write of a loop device over it
//!   reaches [`Disk::write`], and every `fsync`/`fdatasync` (a device flush
//!   of the file system on the loop device) reaches [`Disk::flush`].
//! * `ctl` — write `cut` to cut the power now, `arm N` to cut it instead of
//!   completing the Nth flush from now, `freeze PID` to stop process PID
//!   (`SIGSTOP`, every thread) the instant before the power is cut, as a real
//!   outage stops the host's CPUs together with its disk (`freeze 0`: none).
//! * `status` — one `key value` line per counter of [`DiskStats`].

use std::ffi::OsStr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};

use crate::cache::{Disk, DiskError};

/// Name of the image file in the mount.
pub const IMAGE_NAME: &str = "disk.img";
/// Name of the control file.
pub const CTL_NAME: &str = "ctl";
/// Name of the status file.
pub const STATUS_NAME: &str = "status";
/// Longest command the control file accepts.
pub const CTL_MAX_BYTES: usize = 64;

const ROOT: u64 = 1;
const IMAGE: u64 = 2;
const CTL: u64 = 3;
const STATUS: u64 = 4;
const TTL: Duration = Duration::from_secs(1);

/// The file system: the disk behind a lock (fuser may call from several
/// threads; the disk is one device, so one request at a time is right).
pub struct CrashFs {
    disk: Mutex<Disk>,
    /// The process stopped at the cut (0: none).
    freeze_pid: std::sync::atomic::AtomicI32,
}

/// Longest wait for a frozen process's threads to stop.
pub const FREEZE_WAIT: Duration = Duration::from_secs(2);

/// Stops `pid` with `SIGSTOP` and waits (at most [`FREEZE_WAIT`]) until none
/// of its threads is running or in an interruptible sleep: each is stopped,
/// or in an uninterruptible wait (I/O) from which it stops before it returns
/// to user space. So no reply the process sends can follow what happens next.
/// Returns whether every thread got there in time.
pub fn freeze(pid: i32) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
        return false;
    }
    let started = std::time::Instant::now();
    while started.elapsed() < FREEZE_WAIT {
        if all_threads_held(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Whether every thread of `pid` is stopped (`T`, `t`), in an
/// uninterruptible wait (`D`), or gone.
fn all_threads_held(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // `tid (comm) S ...`: the state follows the last `)`.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_ascii_whitespace().next());
        matches!(state, None | Some("T" | "t" | "D" | "Z" | "X"))
    })
}

impl CrashFs {
    /// The file system over `disk`.
    pub fn new(disk: Disk) -> CrashFs {
        CrashFs {
            disk: Mutex::new(disk),
            freeze_pid: std::sync::atomic::AtomicI32::new(0),
        }
    }

    /// Freezes the configured process, if any (the power is about to go).
    fn freeze_host(&self) {
        let pid = self.freeze_pid.load(std::sync::atomic::Ordering::SeqCst);
        if pid > 0 && !freeze(pid) {
            log::warn!("process {pid} did not stop within {FREEZE_WAIT:?} of the cut");
        }
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power (what `ctl` does on `cut`), freezing the configured
    /// process first.
    pub fn cut(&self) -> Result<(), DiskError> {
        let mut disk = self.disk();
        if !disk.stats().cut {
            self.freeze_host();
        }
        disk.cut()
    }

    /// Writes the cache back if the power is on (a clean unmount).
    pub fn shutdown(&self) -> Result<(), DiskError> {
        self.disk().shutdown()
    }

    fn status_text(&self) -> String {
        let disk = self.disk();
        let s = disk.stats();
        format!(
            "flushes {}\nwrites {}\npending_writes {}\npending_bytes {}\nwritebacks {}\ncut {}\n\
             lost_writes {}\nlanded_writes {}\narmed_at_flush {}\n",
            s.flushes,
            s.writes,
            s.pending_writes,
            s.pending_bytes,
            s.writebacks,
            u8::from(s.cut),
            s.lost_writes,
            s.landed_writes,
            disk.armed_at_flush()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
        )
    }

    /// Runs one control command (`cut`, `arm N`, or `freeze PID`).
    pub fn control(&self, command: &[u8]) -> Result<(), Errno> {
        let text = std::str::from_utf8(command).map_err(|_| Errno::EINVAL)?;
        let mut words = text.split_ascii_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("cut"), None, None) => self.cut().map_err(|e| Errno::from_i32(e.errno())),
            (Some("freeze"), Some(pid), None) => {
                let pid: i32 = pid.parse().map_err(|_| Errno::EINVAL)?;
                if pid < 0 {
                    return Err(Errno::EINVAL);
                }
                self.freeze_pid
                    .store(pid, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
            (Some("arm"), Some(n), None) => {
                let n: u64 = n.parse().map_err(|_| Errno::EINVAL)?;
                if n == 0 {
                    return Err(Errno::EINVAL);
                }
                self.disk().arm(n);
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// One flush of the image (or the armed cut instead, freezing the
    /// configured process first).
    pub fn flush_image(&self) -> Result<(), DiskError> {
        let mut disk = self.disk();
        let s = disk.stats();
        if !s.cut && disk.armed_at_flush() == Some(s.flushes + 1) {
            self.freeze_host();
        }
        disk.flush()
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size) = match ino {
            ROOT => (FileType::Directory, 0o755, 0),
            IMAGE => (FileType::RegularFile, 0o600, self.disk().size_bytes()),
            CTL => (FileType::RegularFile, 0o200, 0),
            STATUS => (FileType::RegularFile, 0o444, 0),
            _ => return None,
        };
        let now = SystemTime::UNIX_EPOCH;
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn by_name(name: &OsStr) -> Option<u64> {
    match name.to_str()? {
        IMAGE_NAME => Some(IMAGE),
        CTL_NAME => Some(CTL),
        STATUS_NAME => Some(STATUS),
        _ => None,
    }
}

fn errno(e: &DiskError) -> Errno {
    Errno::from_i32(e.errno())
}

impl Filesystem for CrashFs {
    /// Unmounted: a clean stop writes the cache back (after a cut, a no-op).
    fn destroy(&mut self) {
        let disk = self.disk.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = disk.shutdown() {
            log::error!("writing the cache back at unmount: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0, by_name(name).and_then(|ino| self.attr(ino))) {
            (ROOT, Some(attr)) => reply.entry(&TTL, &attr, fuser::Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The disk has a fixed size; truncating `ctl` (O_TRUNC) is harmless.
        let Some(attr) = self.attr(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match size {
            Some(s) if ino.0 == IMAGE && s != attr.size => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino.0 {
            IMAGE | CTL | STATUS => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match ino.0 {
            IMAGE => {
                let mut disk = self.disk();
                let len = u64::from(size).min(disk.size_bytes().saturating_sub(offset)) as u32;
                match disk.read(offset, len) {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            STATUS => {
                let text = self.status_text().into_bytes();
                let from = (offset as usize).min(text.len());
                let to = (from + size as usize).min(text.len());
                reply.data(&text[from..to]);
            }
            _ => reply.error(Errno::EACCES),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match ino.0 {
            IMAGE => match self.disk().write(offset, data) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(errno(&e)),
            },
            CTL if data.len() <= CTL_MAX_BYTES => match self.control(data) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(e),
            },
            CTL => reply.error(Errno::EFBIG),
            _ => reply.error(Errno::EACCES),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) of the image: a flush, as the issue asks (a loop device
        // closes its file only when detached).
        if ino.0 != IMAGE {
            return reply.ok();
        }
        match self.flush_image() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 != IMAGE {
            return reply.ok();
        }
        match self.flush_image() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (IMAGE, FileType::RegularFile, IMAGE_NAME),
            (CTL, FileType::RegularFile, CTL_NAME),
            (STATUS, FileType::RegularFile, STATUS_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::DiskConfig;

    fn state_of(pid: u32) -> String {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after = stat.rfind(')').expect("comm") + 1;
        stat[after..]
            .split_ascii_whitespace()
            .next()
            .expect("state")
            .to_string()
    }

    fn fs_over_temp_disk(config: DiskConfig) -> (tempfile::NamedTempFile, CrashFs) {
        let f = tempfile::NamedTempFile::new().expect("temp");
        f.as_file().set_len(1 << 20).expect("size");
        let disk = Disk::new(f.reopen().expect("reopen"), config).expect("disk");
        (f, CrashFs::new(disk))
    }

    /// A child that is killed and reaped even when the test fails.
    struct Sleeper(std::process::Child);

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A `sleep 60` child, returned once it sleeps in `nanosleep` (`S`): a
    /// child still starting up can be in `D` (paging in), which [`freeze`]
    /// rightly counts as held but which is not yet `T`.
    fn sleeper() -> Sleeper {
        let child = Sleeper(
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("spawn sleep"),
        );
        let pid = child.0.id();
        let started = std::time::Instant::now();
        while state_of(pid) != "S" {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sleep never went to sleep"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    #[test]
    fn a_cut_freezes_the_named_process_first_and_only_then() {
        let (_f, fs) = fs_over_temp_disk(DiskConfig::default());
        let child = sleeper();
        let pid = child.0.id();
        fs.control(format!("freeze {pid}").as_bytes())
            .expect("freeze command");
        assert_ne!(state_of(pid), "T", "naming the process does not stop it");
        fs.control(b"cut").expect("cut");
        assert_eq!(state_of(pid), "T", "stopped by the time the cut is made");
    }

    #[test]
    fn an_armed_cut_freezes_at_its_flush_not_before() {
        let (_f, fs) = fs_over_temp_disk(DiskConfig::default());
        let child = sleeper();
        let pid = child.0.id();
        fs.control(format!("freeze {pid}").as_bytes())
            .expect("freeze command");
        fs.control(b"arm 2").expect("arm");
        fs.flush_image().expect("first flush completes");
        assert_ne!(state_of(pid), "T", "still running after a completed flush");
        assert!(fs.flush_image().is_err(), "the armed flush cuts instead");
        assert_eq!(state_of(pid), "T");
    }

    #[test]
    fn bad_freeze_commands_are_refused() {
        let (_f, fs) = fs_over_temp_disk(DiskConfig::default());
        for bad in ["freeze", "freeze -3", "freeze x", "freeze 1 2"] {
            assert!(fs.control(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
