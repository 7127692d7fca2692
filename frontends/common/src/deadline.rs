//! Writes held to a deadline: a reply (a whole POP3 RETR included) must be on
//! the wire by a given instant, however slowly the client reads.
//!
//! A socket's send time-out (`SO_SNDTIMEO`, [`TcpStream::set_write_timeout`])
//! bounds one `write()` call only. A client that reads a trickle lets every
//! call make a little progress, and each new call starts the clock again, so a
//! reply of megabytes could be stretched for hours. [`DeadlineWrite`] sets the
//! socket's time-out to the time *left* before every system call and fails with
//! [`io::ErrorKind::TimedOut`] once none is left: the whole reply then takes at
//! most as long as the caller allowed.

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

/// A client stream whose writes can be held to a deadline.
pub trait DeadlineWrite {
    /// Writes all of `data` to the socket (over TLS: encrypts it and sends the
    /// records, nothing stays buffered). Fails with [`io::ErrorKind::TimedOut`]
    /// when that is not done by `deadline`, or with the socket's own error; how
    /// much went out is then unknown and the connection should be closed.
    fn write_all_by(&mut self, data: &[u8], deadline: Instant) -> io::Result<()>;

    /// Writes `first` then `second` as [`write_all_by`](Self::write_all_by)
    /// does, in one system call where the stream can (a plain socket:
    /// `sendmsg(2)` with both): a reply's buffered start and a large body
    /// leave as one send, not two.
    fn write_two_by(&mut self, first: &[u8], second: &[u8], deadline: Instant) -> io::Result<()> {
        self.write_all_by(first, deadline)?;
        self.write_all_by(second, deadline)
    }

    /// True when [`splice_from_by`](Self::splice_from_by) works: bytes can
    /// go to the socket straight from a pipe (plain TCP, not TLS).
    fn can_splice(&self) -> bool {
        false
    }

    /// Moves up to `len` bytes from the read end of a pipe to the socket
    /// (`splice(2)`, zero copy) by `deadline`; returns how many moved.
    fn splice_from_by(&mut self, pipe: RawFd, len: usize, deadline: Instant) -> io::Result<usize> {
        let _ = (pipe, len, deadline);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this stream cannot splice",
        ))
    }
}

/// Sets the socket's send time-out to the time left before `deadline`.
fn arm(sock: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out_now());
    }
    // std rounds a non-zero duration up to at least 1 µs (0 would mean "never").
    sock.set_write_timeout(Some(left))
}

/// The kernel reports an expired `SO_SNDTIMEO` as `EAGAIN`: call it a time-out.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        timed_out_now()
    } else {
        e
    }
}

/// Sends what the socket takes at once of `bufs`, in order (`sendmsg(2)`
/// with `MSG_DONTWAIT`); returns how much. Most replies fit the send buffer
/// whole, and a send that cannot block needs no time-out: no `setsockopt`
/// for them (it was one per reply, a tenth of a frontend's system calls per
/// SMTP transaction).
fn send_now(sock: &TcpStream, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with struct iovec; sendmsg only reads them.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `msg` points at `bufs`, valid for the call; the fd is open.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
        _ => Err(e),
    }
}

impl DeadlineWrite for &TcpStream {
    fn write_two_by(&mut self, first: &[u8], second: &[u8], deadline: Instant) -> io::Result<()> {
        if first.is_empty() {
            return self.write_all_by(second, deadline);
        }
        if Instant::now() >= deadline {
            return Err(timed_out_now());
        }
        let mut bufs = [io::IoSlice::new(first), io::IoSlice::new(second)];
        let mut bufs = &mut bufs[..];
        let sent = send_now(self, bufs)?;
        io::IoSlice::advance_slices(&mut bufs, sent);
        while !bufs.is_empty() {
            arm(self, deadline)?;
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timed_out(e)),
            }
        }
        Ok(())
    }

    fn write_all_by(&mut self, mut data: &[u8], deadline: Instant) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(timed_out_now());
        }
        data = &data[send_now(self, &[io::IoSlice::new(data)])?..];
        while !data.is_empty() {
            arm(self, deadline)?;
            match self.write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timed_out(e)),
            }
        }
        Ok(())
    }

    fn can_splice(&self) -> bool {
        true
    }

    fn splice_from_by(&mut self, pipe: RawFd, len: usize, deadline: Instant) -> io::Result<usize> {
        arm(self, deadline)?;
        powermail_proto::splice::splice(pipe, self.as_raw_fd(), len).map_err(|e| {
            if e.kind() == io::ErrorKind::TimedOut {
                timed_out_now()
            } else {
                e
            }
        })
    }
}

/// The same as for a borrowed stream (a session may hold either).
impl DeadlineWrite for TcpStream {
    fn write_all_by(&mut self, data: &[u8], deadline: Instant) -> io::Result<()> {
        (&*self).write_all_by(data, deadline)
    }

    fn write_two_by(&mut self, first: &[u8], second: &[u8], deadline: Instant) -> io::Result<()> {
        (&*self).write_two_by(first, second, deadline)
    }

    fn can_splice(&self) -> bool {
        true
    }

    fn splice_from_by(&mut self, pipe: RawFd, len: usize, deadline: Instant) -> io::Result<usize> {
        (&*self).splice_from_by(pipe, len, deadline)
    }
}

/// The error of a reply not sent by its deadline.
fn timed_out_now() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "reply not sent by its deadline")
}

impl DeadlineWrite for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn write_all_by(&mut self, mut data: &[u8], deadline: Instant) -> io::Result<()> {
        loop {
            // Records rustls still holds go first: its buffer is bounded, so
            // plaintext is only taken once there is room.
            while self.conn.wants_write() {
                arm(&self.sock, deadline)?;
                match self.conn.write_tls(&mut self.sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(timed_out(e)),
                }
            }
            if data.is_empty() {
                return Ok(());
            }
            match self.conn.writer().write(data)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => data = &data[n..],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Duration;

    /// A peer that reads a few bytes now and then cannot stretch a reply past
    /// its deadline (a per-write time-out would restart with every read).
    #[test]
    fn a_trickle_reader_does_not_extend_the_deadline() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 64];
                let mut got = 0usize;
                // Stops when told: what the kernels buffered would take
                // minutes to trickle out.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                got
            })
        };
        let mut s = TcpStream::connect(addr).unwrap();
        let data = vec![b'x'; 64 << 20];
        let started = Instant::now();
        let e = s
            .write_all_by(&data, started + Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Generous: the point is that it ends, not how precisely.
        assert!(started.elapsed() < Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() < data.len());
    }

    /// A reply the send buffer takes whole goes out without a time-out, and
    /// every byte arrives in order with the blocking rest of a larger one.
    #[test]
    fn small_and_large_replies_arrive_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            got
        });
        let large: Vec<u8> = (0..(8 << 20)).map(|i: u32| (i % 251) as u8).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        s.write_all_by(b"250 OK\r\n", deadline).unwrap();
        s.write_all_by(&large, deadline).unwrap();
        s.write_two_by(b"+OK two\r\n", &large, deadline).unwrap();
        s.write_two_by(b"", b"+OK", deadline).unwrap();
        s.write_two_by(b"\r\n", b"", deadline).unwrap();
        s.write_all_by(b"221 bye\r\n", deadline).unwrap();
        drop(s);
        let got = reader.join().unwrap();
        let mut want = b"250 OK\r\n".to_vec();
        want.extend_from_slice(&large);
        want.extend_from_slice(b"+OK two\r\n");
        want.extend_from_slice(&large);
        want.extend_from_slice(b"+OK\r\n");
        want.extend_from_slice(b"221 bye\r\n");
        assert!(
            got == want,
            "{} bytes arrived, {} sent",
            got.len(),
            want.len()
        );
    }

    #[test]
    fn a_passed_deadline_fails_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let e = s.write_all_by(b"late", Instant::now()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        s.write_all_by(b"", Instant::now()).unwrap();
    }
}
