//! Writes one message body to an anonymous file (`O_TMPFILE`) with
//! `O_DIRECT` through io_uring, and (in `durability = "file"`) makes it
//! durable; in `syncfs` mode the batch's `syncfs` does that instead.
//!
//! The file has no name until the store links it into the mailboxes, so a
//! crash before that leaves nothing behind, and making it durable does not
//! involve any directory. It is opened only once it is needed (a full write
//! unit, or the end of the body), and a small body bound for the page cache
//! gets a plain descriptor instead of a `DmaFile` ([`BodyWriter`]).
//!
//! glommio's `DmaStreamWriter` syncs *before* it truncates the padded tail on
//! close, so a crash could leave a file with NUL padding; this writer keeps
//! the order the durability contract needs: aligned writes, the tail written
//! so that the file has its true size (through the page cache, or padded and
//! truncated: [`Tail`]), then one `fdatasync` (or the batch's `syncfs`) that
//! covers the data and the size together. Bytes are copied once, from the socket buffer
//! into an aligned DMA buffer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use glommio::io::{DmaBuffer, DmaFile, OpenOptions};

/// How [`BodyWriter::finish`] writes the tail that does not fill an
/// `O_DIRECT` alignment unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Through the page cache: the file has its true size at once. Safe only
    /// where the tail's writeback is made durable *before* the body is linked:
    /// `durability = "file"` (the body's `fdatasync`) and ordered `syncfs`
    /// (the flush that covers the body writes the page back first). With
    /// plain `syncfs` on a journaled ext4 or xfs the link can be committed
    /// while the tail is still delayed allocation, and the power-cut suite
    /// found messages listed without their tails.
    ///
    /// Where the tail may go through the page cache, so may a whole body that
    /// is small: one that fits `whole_body_max_bytes` and was never flushed
    /// by [`BodyWriter::write`] (so at most [`WRITE_UNIT_BYTES`]) is written
    /// in one `pwrite` through the page cache, with no `fallocate` and no
    /// byte of it with `O_DIRECT`. The flush that covers it allocates it in
    /// one extent and writes it back in one device write (with `O_DIRECT` a
    /// small body cost two: its aligned part at once, its tail's page at the
    /// flush), and it stays cached for the POP fetch that usually follows.
    /// 0: every body with `O_DIRECT`.
    PageCache {
        /// Largest body written wholly through the page cache, in bytes.
        whole_body_max_bytes: usize,
    },
    /// Padded and written with `O_DIRECT`, then the file truncated to size:
    /// every byte and the size are on the disk, or in the journal, before the
    /// link, at the cost of a read of the last block.
    PadAndTruncate,
}

/// The aligned unit in which [`BodyWriter::write`] writes a body with
/// `O_DIRECT` as it arrives: a larger body has been partly written when it
/// ends, so no larger one can go wholly through the page cache.
pub const WRITE_UNIT_BYTES: usize = 128 << 10;

/// A body being written.
///
/// The file is opened only when it is needed: at the first full write unit,
/// or at [`BodyWriter::finish`]. Until then the bytes wait in memory (at most
/// one unit, as the `O_DIRECT` buffer would hold them), so a small body that
/// goes through the page cache whole never needs a [`DmaFile`]: it is opened
/// with a plain `open(O_TMPFILE)` and written with one `pwrite`. glommio's
/// `DmaFile` open goes through io_uring, where `OPENAT` of an `O_TMPFILE` and
/// the `STATX` glommio adds are both handed to an io-wq worker thread: two
/// thread wake-ups per PUT (perf: 10% of pplistener's CPU under
/// `smtp-source`), for a file that sees no `O_DIRECT` write.
pub struct BodyWriter {
    dir: PathBuf,
    /// Bytes not yet in a DMA buffer (only while `file` is `None`).
    pending: Vec<u8>,
    file: Option<DmaFile>,
    buf: Option<DmaBuffer>,
    fill_bytes: usize,
    pos_bytes: u64,
    buf_bytes: usize,
    direct_bytes: u64,
}

/// The open, nameless file of a body.
pub enum BodyFile {
    /// Opened through glommio: written (partly) with `O_DIRECT`, or synced
    /// through io_uring.
    Direct(DmaFile),
    /// Opened and written through the page cache only.
    Buffered(std::fs::File),
}

impl BodyFile {
    /// Closes the file (a nameless one is freed).
    pub async fn close(self) {
        match self {
            BodyFile::Direct(file) => {
                let _ = file.close().await;
            }
            BodyFile::Buffered(file) => drop(file),
        }
    }
}

impl AsRawFd for BodyFile {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            BodyFile::Direct(file) => file.as_raw_fd(),
            BodyFile::Buffered(file) => file.as_raw_fd(),
        }
    }
}

/// A body written by [`BodyWriter::finish`].
pub struct Finished {
    /// The still open, nameless file: link it, then close it.
    pub file: BodyFile,
    /// The body's size.
    pub size_bytes: u64,
    /// Of `size_bytes`, the bytes written with `O_DIRECT` (padding not
    /// counted); the rest went through the page cache.
    pub direct_bytes: u64,
}

/// The alignment every `O_DIRECT` unit is rounded to before the file is open
/// (and its own alignment known): a multiple of any block size up to a page.
const PRE_OPEN_ALIGNMENT: usize = 4096;

impl BodyWriter {
    /// A body to be written to an anonymous, linkable file on the file
    /// system of `dir`, in units of `buf_bytes` (rounded up to the file's
    /// alignment). Nothing is opened yet.
    pub fn new(dir: &Path, buf_bytes: usize) -> BodyWriter {
        let buf_bytes = buf_bytes.max(1).next_multiple_of(PRE_OPEN_ALIGNMENT);
        BodyWriter {
            dir: dir.to_path_buf(),
            pending: Vec::new(),
            file: None,
            buf: None,
            fill_bytes: 0,
            pos_bytes: 0,
            buf_bytes,
            direct_bytes: 0,
        }
    }

    /// Opens the file through glommio and moves the pending bytes into a
    /// DMA buffer (they are fewer than one unit: nothing is written yet);
    /// from then on the body is written as it arrives.
    async fn open_direct(&mut self) -> io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .tmpfile(true)
            .tmpfile_linkable(true)
            .mode(crate::store::BODY_MODE)
            .dma_open(&self.dir)
            .await?;
        self.buf_bytes = file.align_up(self.buf_bytes as u64) as usize;
        let pending = std::mem::take(&mut self.pending);
        if !pending.is_empty() {
            let mut buf = file.alloc_dma_buffer(self.buf_bytes);
            buf.as_bytes_mut()[..pending.len()].copy_from_slice(&pending);
            self.fill_bytes = pending.len();
            self.buf = Some(buf);
        }
        self.file = Some(file);
        Ok(())
    }

    /// The file opened by [`BodyWriter::open_direct`].
    fn dma(&self) -> io::Result<&DmaFile> {
        self.file.as_ref().ok_or_else(not_open)
    }

    /// Appends `data`.
    pub async fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            if self.pending.len() + data.len() < self.buf_bytes {
                self.pending.extend_from_slice(data);
                return Ok(());
            }
            self.open_direct().await?;
        }
        while !data.is_empty() {
            // Not `dma()`: that would borrow all of `self` beside `self.buf`.
            let file = self.file.as_ref().ok_or_else(not_open)?;
            let buf = self
                .buf
                .get_or_insert_with(|| file.alloc_dma_buffer(self.buf_bytes));
            let n = data.len().min(buf.len() - self.fill_bytes);
            buf.as_bytes_mut()[self.fill_bytes..self.fill_bytes + n].copy_from_slice(&data[..n]);
            self.fill_bytes += n;
            data = &data[n..];
            if self.fill_bytes == self.buf_bytes {
                self.flush_buffer().await?;
            }
        }
        Ok(())
    }

    /// Writes the buffer (its whole, aligned length) at the current position.
    async fn flush_buffer(&mut self) -> io::Result<()> {
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        let len = buf.len();
        let file = self.dma()?;
        debug_assert_eq!(len as u64 % file.alignment(), 0);
        allocate(file.as_raw_fd(), self.pos_bytes, len as u64);
        self.write_direct(buf, self.pos_bytes).await?;
        self.pos_bytes += self.fill_bytes as u64;
        self.direct_bytes += self.fill_bytes as u64;
        self.fill_bytes = 0;
        Ok(())
    }

    /// Writes all of `buf` (an aligned length) at `at` with `O_DIRECT`.
    async fn write_direct(&self, buf: DmaBuffer, at: u64) -> io::Result<()> {
        let len = buf.len();
        if self.dma()?.write_at(buf, at).await? != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short O_DIRECT write",
            ));
        }
        Ok(())
    }

    /// Writes what is left and, when `sync`, `fdatasync`s. Returns the still
    /// open file (link it, then close it), the body size and how it was
    /// written ([`Finished`]). Every write has
    /// completed when this returns `Ok` (io_uring completions awaited), so a
    /// later `syncfs` covers them; with `sync` the body is already durable.
    ///
    /// [`Tail::PageCache`]: the aligned part of what is left goes with
    /// `O_DIRECT`, and the tail that does not fill an alignment unit through
    /// the page cache (`O_DIRECT` cleared on the descriptor), so the file has
    /// its true size at once; a small body goes through the page cache
    /// whole, and without `sync` through a plain descriptor
    /// ([`BodyFile::Buffered`]: no io_uring open). [`Tail::PadAndTruncate`]:
    /// the tail is padded to the alignment,
    /// written with `O_DIRECT`, and the file truncated to its true size —
    /// which makes ext4 zero the rest of the last block in the page cache,
    /// *reading that block back from the disk* synchronously, for every
    /// message (7% of pplistener's CPU under `smtp-source`).
    pub async fn finish(mut self, sync: bool, tail: Tail) -> io::Result<Finished> {
        let whole_body_max = match tail {
            Tail::PageCache {
                whole_body_max_bytes,
            } => Some(whole_body_max_bytes),
            Tail::PadAndTruncate => None,
        };
        if self.file.is_none() {
            if !sync && whole_body_max.is_some_and(|max| self.pending.len() <= max) {
                return self.finish_buffered();
            }
            self.open_direct().await?;
        }
        let size_bytes = self.pos_bytes + self.fill_bytes as u64;
        let buf = match whole_body_max {
            Some(_) => self.buf.take(),
            None => None,
        };
        if let Some(mut buf) = buf {
            let fd = self.dma()?.as_raw_fd();
            if self.pos_bytes == 0 && whole_body_max.is_some_and(|max| self.fill_bytes <= max) {
                // No `fallocate`: delayed allocation places the whole body at
                // the flush, in one extent, already written (no unwritten
                // extent to convert after the write-back).
                if self.fill_bytes > 0 {
                    write_through_page_cache(fd, &buf.as_bytes()[..self.fill_bytes], 0)?;
                }
            } else {
                let align = self.dma()?.alignment() as usize;
                let direct = self.fill_bytes / align * align;
                let rest = buf.as_bytes()[direct..self.fill_bytes].to_vec();
                allocate(fd, self.pos_bytes, self.fill_bytes as u64);
                if direct > 0 {
                    buf.trim_to_size(direct);
                    self.write_direct(buf, self.pos_bytes).await?;
                    self.direct_bytes += direct as u64;
                }
                if !rest.is_empty() {
                    write_through_page_cache(fd, &rest, self.pos_bytes + direct as u64)?;
                }
            }
            self.pos_bytes += self.fill_bytes as u64;
            self.fill_bytes = 0;
        } else if self.fill_bytes > 0 {
            let padded = self.dma()?.align_up(self.fill_bytes as u64) as usize;
            if let Some(buf) = self.buf.as_mut() {
                buf.as_bytes_mut()[self.fill_bytes..padded].fill(0);
                buf.trim_to_size(padded);
            }
            self.flush_buffer().await?;
            // flush_buffer advanced by the true fill, so the position is exact.
            let file = self.dma()?;
            if !size_bytes.is_multiple_of(file.alignment()) {
                file.truncate(size_bytes).await?;
            }
        }
        debug_assert_eq!(self.pos_bytes, size_bytes);
        let file = self.file.take().ok_or_else(not_open)?;
        if sync {
            file.fdatasync().await?;
        }
        Ok(Finished {
            file: BodyFile::Direct(file),
            size_bytes,
            direct_bytes: self.direct_bytes,
        })
    }

    /// A small body that never filled a unit, without `sync`: a plain
    /// `open(O_TMPFILE)` and one `pwrite` through the page cache, done here
    /// on the executor (each a short call that does not wait for the
    /// device). No `fallocate`: delayed allocation places the whole body at
    /// the flush, in one extent.
    fn finish_buffered(self) -> io::Result<Finished> {
        let file = crate::store::create_nameless(&self.dir)?;
        file.write_all_at(&self.pending, 0)?;
        Ok(Finished {
            file: BodyFile::Buffered(file),
            size_bytes: self.pending.len() as u64,
            direct_bytes: 0,
        })
    }

    /// Abandons the body: closing a nameless file frees it.
    pub async fn discard(self) {
        if let Some(file) = self.file {
            let _ = file.close().await;
        }
    }
}

/// The error of a `DmaFile` step before [`BodyWriter::open_direct`] (a bug).
fn not_open() -> io::Error {
    io::Error::other("body file not open")
}

/// Clears `O_DIRECT` on `fd` and writes all of `data` at `offset` through the
/// page cache. Less than one alignment unit, into the file's last block
/// (already allocated by [`allocate`]): a copy into one page, no device I/O
/// until the flush.
fn write_through_page_cache(fd: RawFd, data: &[u8], offset: u64) -> io::Result<()> {
    // SAFETY: fcntl on an open descriptor, no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Borrowed, not owned: the DmaFile closes the descriptor.
    // SAFETY: `fd` is open for the duration of the call and not closed here.
    let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    file.write_all_at(data, offset)
}

/// Allocates `len_bytes` at `offset` in one `fallocate`, and extends the
/// file's size to cover them, before they are written.
///
/// * The `O_DIRECT` write that follows is then an overwrite, not an
///   extending write: ext4 refuses an extending write under `IOCB_NOWAIT`,
///   so io_uring handed every body write to a worker thread (one
///   `io_uring_queue_async_work` per PUT, measured with `perf`), with the
///   wake-ups and task-work that cost. An overwrite of allocated blocks is
///   issued inline.
/// * The blocks of a body's last piece are contiguous and one extent: the
///   `O_DIRECT` part and the page-cache tail written into them after. Left
///   to itself the tail was allocated apart, at writeback; most messages
///   then had two extents, and deleting one cost two discards instead of one
///   (the device counted 25,930 discards for 15,000 messages, and the POP
///   drain ran 25% slower).
///
/// The size is true as soon as the last piece is allocated (callers never
/// allocate past the body's end but for the `O_DIRECT` padding, which
/// [`Tail::PadAndTruncate`] truncates), and the file has no name until it is
/// complete and flushed. Advice in effect: if the file system refuses, the
/// writes still allocate and extend.
fn allocate(fd: RawFd, offset: u64, len_bytes: u64) {
    if len_bytes == 0 {
        return;
    }
    if let (Ok(at), Ok(len)) = (
        libc::off_t::try_from(offset),
        libc::off_t::try_from(len_bytes),
    ) {
        // SAFETY: fallocate on an open descriptor, no pointers.
        let _ = unsafe { libc::fallocate(fd, 0, at, len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`round_trip`] saw.
    struct Seen {
        /// Opened and written with a plain descriptor ([`BodyFile::Buffered`]).
        buffered: bool,
        reported_bytes: u64,
        on_disk_bytes: u64,
        direct_bytes: u64,
        alignment: u64,
        back: Vec<u8>,
        sent: Vec<u8>,
    }

    /// Writes `size` bytes in pieces of `piece`, finishes (with `sync`, as
    /// `durability = "file"` does), and reads the file
    /// back through its descriptor.
    fn round_trip(size: usize, piece: usize, unit: usize, tail: Tail, sync: bool) -> Seen {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let body: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = body.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                // The alignment a body file of this directory gets.
                let alignment = OpenOptions::new()
                    .write(true)
                    .tmpfile(true)
                    .dma_open(&path)
                    .await
                    .expect("probe file")
                    .alignment();
                let mut w = BodyWriter::new(&path, unit);
                for chunk in sent.chunks(piece.max(1)) {
                    w.write(chunk).await.expect("write");
                }
                let done = w.finish(sync, tail).await.expect("finish");
                let buffered = matches!(done.file, BodyFile::Buffered(_));
                let fd = done.file.as_raw_fd();
                // SAFETY: a zeroed stat is a valid out-parameter.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: open fd, valid out-pointer.
                assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
                // A buffered descriptor of its own: this one may still be O_DIRECT.
                let back = std::fs::read(format!("/proc/self/fd/{fd}")).expect("read back");
                done.file.close().await;
                Seen {
                    buffered,
                    reported_bytes: done.size_bytes,
                    on_disk_bytes: st.st_size as u64,
                    direct_bytes: done.direct_bytes,
                    alignment,
                    back,
                    sent,
                }
            })
            .expect("executor")
            .join()
            .expect("join")
    }

    #[test]
    fn a_body_has_its_true_size_and_bytes_whatever_its_tail() {
        for &(size, piece) in &[
            (0, 1),
            (1, 1),
            (100, 7),
            (511, 100),
            (512, 512),
            (513, 1),
            (4095, 1000),
            (4096, 4096),
            (4097, 3),
            (70_001, 4096),
            (131_072, 65_536),
            (200_000, 999),
        ] {
            for tail in [
                Tail::PageCache {
                    whole_body_max_bytes: 0,
                },
                Tail::PageCache {
                    whole_body_max_bytes: WRITE_UNIT_BYTES,
                },
                Tail::PadAndTruncate,
            ] {
                let seen = round_trip(size, piece, 65_536, tail, false);
                assert_eq!(
                    seen.reported_bytes, size as u64,
                    "reported size of {size}, {tail:?}"
                );
                assert_eq!(
                    seen.on_disk_bytes, size as u64,
                    "file size of {size}, {tail:?}"
                );
                assert!(
                    seen.back == seen.sent,
                    "bytes of a {size}-byte body, {tail:?}"
                );
            }
        }
    }

    /// Which bytes go with `O_DIRECT` and which through the page cache. (What
    /// the kernel then keeps cached is its own business, not asserted here:
    /// a test that asked it, with `RWF_NOWAIT` reads, failed once in CI and
    /// never here.)
    #[test]
    fn a_small_body_goes_through_the_page_cache_whole_a_larger_one_with_o_direct() {
        let small = Tail::PageCache {
            whole_body_max_bytes: 32 << 10,
        };
        let none = Tail::PageCache {
            whole_body_max_bytes: 0,
        };
        // What goes with O_DIRECT: nothing, the aligned part, or every byte.
        #[derive(Debug, Clone, Copy)]
        enum Direct {
            No,
            Aligned,
            All,
        }
        for &(size, tail, direct) in &[
            (4396, small, Direct::No),
            (32 << 10, small, Direct::No),
            ((32 << 10) + 1, small, Direct::Aligned),
            (4396, none, Direct::Aligned),
            (4396, Tail::PadAndTruncate, Direct::All),
            (200_000, small, Direct::Aligned),
            (200_000, Tail::PadAndTruncate, Direct::All),
        ] {
            let seen = round_trip(size, 1000, 65_536, tail, false);
            assert_eq!(
                (seen.reported_bytes, seen.on_disk_bytes),
                (size as u64, size as u64),
                "{size}, {tail:?}"
            );
            assert!(
                seen.back == seen.sent,
                "bytes of a {size}-byte body, {tail:?}"
            );
            let size = size as u64;
            let expected = match direct {
                Direct::No => 0,
                Direct::Aligned => size - size % seen.alignment,
                Direct::All => size,
            };
            assert_eq!(
                seen.direct_bytes, expected,
                "bytes of a {size}-byte body written with O_DIRECT, {tail:?} (alignment {})",
                seen.alignment
            );
            // A body with no byte for O_DIRECT never opens a DmaFile.
            assert_eq!(
                seen.buffered,
                matches!(direct, Direct::No),
                "{size}-byte body, {tail:?}: opened with a plain descriptor"
            );
        }
    }

    /// A small body that must be synced on its own is still written through
    /// the page cache whole, from a file opened through glommio (whose
    /// `fdatasync` goes through io_uring, not blocking the executor).
    #[test]
    fn a_small_body_synced_on_its_own_is_opened_through_glommio() {
        let small = Tail::PageCache {
            whole_body_max_bytes: 32 << 10,
        };
        for size in [0, 100, 4396, 32 << 10] {
            let seen = round_trip(size, 1000, 65_536, small, true);
            assert!(!seen.buffered, "{size}-byte body opened through glommio");
            assert_eq!(seen.direct_bytes, 0, "{size}-byte body: no O_DIRECT byte");
            assert_eq!(
                (seen.reported_bytes, seen.on_disk_bytes),
                (size as u64, size as u64)
            );
            assert!(seen.back == seen.sent, "bytes of a {size}-byte body");
        }
    }
}
