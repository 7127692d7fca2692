//! Zero-copy relay of GET bodies: bytes move from the backend socket into a
//! pipe and from the pipe to the client socket with `splice(2)`, never
//! through user space.
//!
//! The destination decides whether it can take bytes that way
//! ([`SpliceSink`]): a plain client socket can, a TLS session or a TOP
//! (which must count lines) cannot, and then the body is copied as before.
//! [`BackendConn::read_body_into`](crate::BackendConn::read_body_into)
//! drives it.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes a relay pipe holds (`F_SETPIPE_SZ`; the default is 64 KiB, the
/// unprivileged ceiling `/proc/sys/fs/pipe-max-size` is 1 MiB by default).
pub const PIPE_BYTES: usize = 256 << 10;

/// A destination for message bodies that may accept bytes straight from a
/// pipe. Every method but [`Write`]'s has a default that says "copy".
pub trait SpliceSink: Write {
    /// True when the bytes written from now on may be moved with
    /// [`splice_from`](Self::splice_from): everything written before has
    /// been flushed to the destination. `false` (the default) means copy.
    fn can_splice(&mut self) -> io::Result<bool> {
        Ok(false)
    }

    /// Moves up to `len` bytes from the read end of a pipe to the
    /// destination; returns how many moved (at least 1). Only called after
    /// [`can_splice`](Self::can_splice) said `true`.
    fn splice_from(&mut self, pipe: RawFd, len: usize) -> io::Result<usize> {
        let _ = (pipe, len);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this destination cannot splice",
        ))
    }
}

impl SpliceSink for Vec<u8> {}

impl<S: SpliceSink + ?Sized> SpliceSink for &mut S {
    fn can_splice(&mut self) -> io::Result<bool> {
        (**self).can_splice()
    }

    fn splice_from(&mut self, pipe: RawFd, len: usize) -> io::Result<usize> {
        (**self).splice_from(pipe, len)
    }
}

/// A pipe for one relay: dropped (both ends closed) when the relay ends, so
/// bytes left in it by a failed relay never reach another message.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A new pipe, enlarged to [`PIPE_BYTES`] where the system allows.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A smaller pipe still works (more, smaller splices): ignore failure.
        // SAFETY: fcntl on an open descriptor with an int argument.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as i32) };
        Ok(Pipe { read, write })
    }

    /// The read end (for [`SpliceSink::splice_from`]).
    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Moves up to `len` bytes from socket `from` into the pipe; 0 means the
    /// peer closed. The socket's receive time-out applies.
    pub fn fill_from(&self, from: RawFd, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_raw_fd(), len)
    }
}

/// One `splice(2)` call, retried on `EINTR`; `EAGAIN` (a socket time-out)
/// is reported as [`io::ErrorKind::TimedOut`].
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: plain descriptors and null offsets (both ends are pipes or
        // sockets, which have no file position).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "splice: socket time-out",
                ))
            }
            _ => return Err(e),
        }
    }
}

/// Moves exactly `len` bytes from socket `from` to `to` through `pipe`.
/// `Err` leaves an unknown number of bytes moved: the caller must give up
/// both connections.
pub fn relay(from: RawFd, pipe: &Pipe, to: &mut dyn SpliceSink, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let want = usize::try_from(len).unwrap_or(usize::MAX).min(PIPE_BYTES);
        let mut filled = pipe.fill_from(from, want)?;
        if filled == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend closed mid-body",
            ));
        }
        len -= filled as u64;
        while filled > 0 {
            let moved = to.splice_from(pipe.read_fd(), filled)?;
            if moved == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            filled -= moved;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    /// A sink that takes spliced bytes into a socket pair and reads them back.
    struct SocketSink {
        into: TcpStream,
        written: Vec<u8>,
    }

    impl Write for SocketSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl SpliceSink for SocketSink {
        fn can_splice(&mut self) -> io::Result<bool> {
            Ok(true)
        }
        fn splice_from(&mut self, pipe: RawFd, len: usize) -> io::Result<usize> {
            splice(pipe, self.into.as_raw_fd(), len)
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn relays_exactly_the_bytes_asked_for() {
        let (mut src_w, src_r) = pair();
        let (dst_w, mut dst_r) = pair();
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let tail = b"NEXT";
        let sender = {
            let mut all = body.clone();
            all.extend_from_slice(tail);
            std::thread::spawn(move || src_w.write_all(&all).unwrap())
        };
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 3_000_000];
            dst_r.read_exact(&mut got).unwrap();
            got
        });
        let mut sink = SocketSink {
            into: dst_w,
            written: Vec::new(),
        };
        relay(
            src_r.as_raw_fd(),
            &Pipe::new().unwrap(),
            &mut sink,
            body.len() as u64,
        )
        .unwrap();
        sender.join().unwrap();
        assert!(reader.join().unwrap() == body);
        // What follows the body stays in the source socket.
        let mut rest = [0u8; 4];
        (&src_r).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, tail);
    }

    #[test]
    fn a_source_closing_early_is_an_error() {
        let (mut src_w, src_r) = pair();
        let (dst_w, _dst_r) = pair();
        src_w.write_all(b"short").unwrap();
        drop(src_w);
        let mut sink = SocketSink {
            into: dst_w,
            written: Vec::new(),
        };
        let e = relay(src_r.as_raw_fd(), &Pipe::new().unwrap(), &mut sink, 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
