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
//! the order the durability contract needs: aligned writes, the tail padded,
//! the file truncated to its true size, then one `fdatasync` that covers the
//! data and the size together. Bytes are copied once, from the socket buffer
//! into an aligned DMA buffer.

use std::io;
use std::path::Path;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions};

/// A body being written.
pub struct BodyWriter {
    file: DmaFile,
    buf: Option<DmaBuffer>,
    fill_bytes: usize,
    pos_bytes: u64,
    buf_bytes: usize,
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
        let written = self.file.write_at(buf, self.pos_bytes).await?;
        if written != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short O_DIRECT write",
            ));
        }
        self.pos_bytes += self.fill_bytes as u64;
        self.fill_bytes = 0;
        Ok(())
    }

    /// Writes the padded tail, truncates to the true size and, when `sync`,
    /// `fdatasync`s. Returns the still open file (link it, then close it)
    /// and the body size. Every write has completed when this returns `Ok`
    /// (io_uring completions awaited), so a later `syncfs` covers them;
    /// with `sync` the body is already durable.
    pub async fn finish(mut self, sync: bool) -> io::Result<(DmaFile, u64)> {
        let size_bytes = self.pos_bytes + self.fill_bytes as u64;
        if self.fill_bytes > 0 {
            let padded = self.file.align_up(self.fill_bytes as u64) as usize;
            if let Some(buf) = self.buf.as_mut() {
                buf.as_bytes_mut()[self.fill_bytes..padded].fill(0);
                buf.trim_to_size(padded);
            }
            self.flush_buffer().await?;
            // flush_buffer advanced by the true fill, so the position is exact.
            debug_assert_eq!(self.pos_bytes, size_bytes);
            if !size_bytes.is_multiple_of(self.file.alignment()) {
                self.file.truncate(size_bytes).await?;
            }
        }
        if sync {
            self.file.fdatasync().await?;
        }
        Ok((self.file, size_bytes))
    }

    /// Abandons the body: closing a nameless file frees it.
    pub async fn discard(self) {
        let _ = self.file.close().await;
    }
}
