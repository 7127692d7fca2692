//! Writes one message body to an anonymous file (`O_TMPFILE`) with
//! `O_DIRECT` through io_uring, and (in `durability = "file"`) makes it
//! durable; in `syncfs` mode the batch's `syncfs` does that instead.
//!
//! The file has no name until the store links it into the mailboxes, so a
//! crash before that leaves nothing behind, and making it durable does not
//! involve any directory.
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
use std::path::Path;

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
pub struct BodyWriter {
    file: DmaFile,
    buf: Option<DmaBuffer>,
    fill_bytes: usize,
    pos_bytes: u64,
    buf_bytes: usize,
    direct_bytes: u64,
}

/// A body written by [`BodyWriter::finish`].
pub struct Finished {
    /// The still open, nameless file: link it, then close it.
    pub file: DmaFile,
    /// The body's size.
    pub size_bytes: u64,
    /// Of `size_bytes`, the bytes written with `O_DIRECT` (padding not
    /// counted); the rest went through the page cache.
    pub direct_bytes: u64,
}

impl BodyWriter {
    /// Creates an anonymous, linkable file on the file system of `dir`;
    /// bodies are written in units of `buf_bytes` (rounded up to the file's
    /// alignment).
    pub async fn create(dir: &Path, buf_bytes: usize) -> io::Result<BodyWriter> {
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .tmpfile(true)
            .tmpfile_linkable(true)
            .dma_open(dir)
            .await?;
        let buf_bytes = file.align_up(buf_bytes.max(1) as u64) as usize;
        Ok(BodyWriter {
            file,
            buf: None,
            fill_bytes: 0,
            pos_bytes: 0,
            buf_bytes,
            direct_bytes: 0,
        })
    }

    /// Appends `data`.
    pub async fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let buf = self
                .buf
                .get_or_insert_with(|| self.file.alloc_dma_buffer(self.buf_bytes));
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
        debug_assert_eq!(len as u64 % self.file.alignment(), 0);
        allocate(self.file.as_raw_fd(), self.pos_bytes, len as u64);
        self.write_direct(buf, self.pos_bytes).await?;
        self.pos_bytes += self.fill_bytes as u64;
        self.direct_bytes += self.fill_bytes as u64;
        self.fill_bytes = 0;
        Ok(())
    }

    /// Writes all of `buf` (an aligned length) at `at` with `O_DIRECT`.
    async fn write_direct(&self, buf: DmaBuffer, at: u64) -> io::Result<()> {
        let len = buf.len();
        if self.file.write_at(buf, at).await? != len {
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
    /// whole. [`Tail::PadAndTruncate`]: the tail is padded to the alignment,
    /// written with `O_DIRECT`, and the file truncated to its true size —
    /// which makes ext4 zero the rest of the last block in the page cache,
    /// *reading that block back from the disk* synchronously, for every
    /// message (7% of pplistener's CPU under `smtp-source`).
    pub async fn finish(mut self, sync: bool, tail: Tail) -> io::Result<Finished> {
        let size_bytes = self.pos_bytes + self.fill_bytes as u64;
        let (buf, whole_body_max) = match tail {
            Tail::PageCache {
                whole_body_max_bytes,
            } => (self.buf.take(), whole_body_max_bytes),
            Tail::PadAndTruncate => (None, 0),
        };
        if let Some(mut buf) = buf {
            let fd = self.file.as_raw_fd();
            if self.pos_bytes == 0 && self.fill_bytes <= whole_body_max {
                // No `fallocate`: delayed allocation places the whole body at
                // the flush, in one extent, already written (no unwritten
                // extent to convert after the write-back).
                if self.fill_bytes > 0 {
                    write_through_page_cache(fd, &buf.as_bytes()[..self.fill_bytes], 0)?;
                }
            } else {
                let align = self.file.alignment() as usize;
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
            let padded = self.file.align_up(self.fill_bytes as u64) as usize;
            if let Some(buf) = self.buf.as_mut() {
                buf.as_bytes_mut()[self.fill_bytes..padded].fill(0);
                buf.trim_to_size(padded);
            }
            self.flush_buffer().await?;
            // flush_buffer advanced by the true fill, so the position is exact.
            if !size_bytes.is_multiple_of(self.file.alignment()) {
                self.file.truncate(size_bytes).await?;
            }
        }
        debug_assert_eq!(self.pos_bytes, size_bytes);
        if sync {
            self.file.fdatasync().await?;
        }
        Ok(Finished {
            file: self.file,
            size_bytes,
            direct_bytes: self.direct_bytes,
        })
    }

    /// Abandons the body: closing a nameless file frees it.
    pub async fn discard(self) {
        let _ = self.file.close().await;
    }
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
        reported_bytes: u64,
        on_disk_bytes: u64,
        direct_bytes: u64,
        alignment: u64,
        back: Vec<u8>,
        sent: Vec<u8>,
    }

    /// Writes `size` bytes in pieces of `piece`, finishes, and reads the file
    /// back through its descriptor.
    fn round_trip(size: usize, piece: usize, unit: usize, tail: Tail) -> Seen {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let body: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = body.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut w = BodyWriter::create(&path, unit).await.expect("create");
                let alignment = w.file.alignment();
                for chunk in sent.chunks(piece.max(1)) {
                    w.write(chunk).await.expect("write");
                }
                let done = w.finish(false, tail).await.expect("finish");
                let fd = done.file.as_raw_fd();
                // SAFETY: a zeroed stat is a valid out-parameter.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: open fd, valid out-pointer.
                assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
                // A buffered descriptor of its own: this one may still be O_DIRECT.
                let back = std::fs::read(format!("/proc/self/fd/{fd}")).expect("read back");
                let _ = done.file.close().await;
                Seen {
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
                let seen = round_trip(size, piece, 65_536, tail);
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
            let seen = round_trip(size, 1000, 65_536, tail);
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
        }
    }
}
