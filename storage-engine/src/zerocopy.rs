//! Sends a stored message to a socket with `sendfile(2)`: the bytes go from
//! the page cache to the socket without passing through user space.
//!
//! glommio has no sendfile, and its sockets are non-blocking, so this runs on
//! the executor's blocking thread pool: `sendfile` until `EAGAIN`, then
//! `poll(POLLOUT)` with the connection's time-out, then again. The connection's
//! task awaits it, so nothing else touches the socket meanwhile.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

/// Largest single `sendfile` call.
const SENDFILE_CHUNK_BYTES: usize = 1 << 20;

/// Sends `size_bytes` of `file` from offset 0 to the socket `sock`.
/// Fails with `TimedOut` if the peer stops reading for `timeout`.
pub fn sendfile_all(
    sock: RawFd,
    file: &File,
    size_bytes: u64,
    timeout: Duration,
) -> io::Result<()> {
    let mut offset: libc::off_t = 0;
    let end = size_bytes as libc::off_t;
    while offset < end {
        let want = ((end - offset) as usize).min(SENDFILE_CHUNK_BYTES);
        // SAFETY: both fds are open for the duration of the call; offset is a valid out-parameter.
        let n = unsafe { libc::sendfile(sock, file.as_raw_fd(), &mut offset, want) };
        if n > 0 {
            continue;
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shorter than its size",
            ));
        }
        wait_after_error(sock, timeout)?;
    }
    Ok(())
}

/// Asks the kernel to start reading all of `file` into the page cache now
/// (`posix_fadvise(POSIX_FADV_WILLNEED)`: the reads are queued, the call does
/// not wait for them). Bodies are written with `O_DIRECT`, so a stored message
/// is not in the page cache: for a GETM batch, announcing every file before
/// the first `sendfile` lets the disk read them in parallel instead of one
/// `sendfile` waiting for each in turn. Advice only: an error changes nothing.
pub fn will_need(file: &File, size_bytes: u64) {
    // SAFETY: the fd is open; the call reads no memory of ours.
    let _ = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            0,
            size_bytes.min(i64::MAX as u64) as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
}

/// Holds `TCP_CORK` on a socket while it lives: the kernel sends only full
/// segments, so a `GETM` batch of small messages (a reply line and a
/// `sendfile` each) leaves as a few 64 KiB segments instead of two small
/// ones per message — one wake-up and one read on the frontend per segment,
/// not per message. Dropping it uncorks, which sends what is left at once.
/// Best effort: a socket that refuses the option is only slower.
pub struct Cork(RawFd);

impl Cork {
    /// Corks `sock` (an open TCP socket that outlives the guard).
    pub fn on(sock: RawFd) -> Cork {
        set_cork(sock, 1);
        Cork(sock)
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        set_cork(self.0, 0);
    }
}

fn set_cork(sock: RawFd, on: libc::c_int) {
    // SAFETY: `on` is a valid c_int for the duration of the call; the fd is open.
    let _ = unsafe {
        libc::setsockopt(
            sock,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Writes all of `data` to the non-blocking socket `sock`, waiting for
/// `POLLOUT` on `EAGAIN` (at most `timeout` per wait). For the reply line that
/// precedes a [`sendfile_all`], from the same blocking-pool call. With
/// `more` (a body follows) it is sent with `MSG_MORE`, so the line leaves in
/// the body's first segment instead of a segment of its own.
pub fn send_all(sock: RawFd, mut data: &[u8], more: bool, timeout: Duration) -> io::Result<()> {
    let flags = match more {
        true => libc::MSG_NOSIGNAL | libc::MSG_MORE,
        false => libc::MSG_NOSIGNAL,
    };
    while !data.is_empty() {
        // SAFETY: `data` is a valid buffer for its length; the fd is open.
        let n = unsafe { libc::send(sock, data.as_ptr().cast(), data.len(), flags) };
        if n > 0 {
            data = &data[n as usize..];
            continue;
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        wait_after_error(sock, timeout)?;
    }
    Ok(())
}

/// After a failed call on the non-blocking socket: waits for room on `EAGAIN`,
/// returns at once on `EINTR` (the caller retries), fails on anything else.
fn wait_after_error(sock: RawFd, timeout: Duration) -> io::Result<()> {
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) => wait_writable(sock, timeout),
        Some(libc::EINTR) => Ok(()),
        _ => Err(err),
    }
}

fn wait_writable(sock: RawFd, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: sock,
        events: libc::POLLOUT,
        revents: 0,
    };
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r > 0 {
            return Ok(());
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading",
            ));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}
