//! The legacy POP3 server behind powerpop: a user the userbase does not
//! know logs in there with what they typed (`[fallback]` in the config),
//! and the connection is then relayed byte for byte.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::Duration;

use powermail_admin::kv;

use crate::session::{AuthResult, Session};
use crate::store::LiveStore;

/// Relays bytes between the client and the fallback server until either
/// closes or both are idle for `idle`.
pub(crate) fn relay<S: Read + Write>(
    client: &mut S,
    client_fd: RawFd,
    session: &mut Session<LiveStore>,
    idle: Duration,
) -> io::Result<&'static str> {
    let Some(upstream) = session.store_mut().upstream.take() else {
        return Ok("closed");
    };
    // Big enough for a whole TLS record's plaintext in one read, so none
    // stays buffered inside rustls where poll cannot see it.
    let mut buf = vec![0u8; 64 << 10];
    let idle_ms = libc::c_int::try_from(idle.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: client_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: upstream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, idle_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Ok("proxy-timeout");
        }
        if fds[0].revents != 0 {
            let n = client.read(&mut buf)?;
            if n == 0 {
                return Ok("proxied");
            }
            (&upstream).write_all(&buf[..n])?;
        }
        if fds[1].revents != 0 {
            let n = (&upstream).read(&mut buf)?;
            if n == 0 {
                return Ok("proxied");
            }
            client.write_all(&buf[..n])?;
            client.flush()?;
        }
    }
}

/// Longest reply line read from the fallback server during the login.
const FALLBACK_LINE_MAX_BYTES: usize = 1024;

/// Reads one CRLF line byte by byte (so nothing after it is consumed).
fn read_reply(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < FALLBACK_LINE_MAX_BYTES {
        if s.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    Err(io::Error::other("fallback reply line too long"))
}

/// `VERB arg\r\n` for the fallback server; `None` when `arg` holds CR, LF
/// or NUL, which would let the client put a command of its own on that wire.
fn fallback_line(verb: &str, arg: &str) -> Option<Vec<u8>> {
    crate::sasl::is_line_safe(arg).then(|| format!("{verb} {arg}\r\n").into_bytes())
}

impl LiveStore {
    /// Logs in to the fallback server with what the client typed.
    pub(crate) fn proxy_login(
        &mut self,
        fallback: &crate::config::FallbackSettings,
        user: &str,
        password: &str,
    ) -> AuthResult {
        // The one guard at the relay: only lines the client sent as one line
        // go to the legacy server, whatever the checks before this missed.
        let (Some(user_line), Some(pass_line)) =
            (fallback_line("USER", user), fallback_line("PASS", password))
        else {
            log::warn!("fallback login refused: CR, LF or NUL in a field");
            return AuthResult::Bad;
        };
        let timeout = Duration::from_millis(fallback.timeout_ms);
        let attempt = || -> io::Result<Option<(TcpStream, String)>> {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&fallback.addr)?
                .next()
                .ok_or_else(|| io::Error::other("fallback address does not resolve"))?;
            let mut s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            if !read_reply(&mut s)?.starts_with("+OK") {
                return Err(io::Error::other("fallback greeting is not +OK"));
            }
            s.write_all(&user_line)?;
            if !read_reply(&mut s)?.starts_with("+OK") {
                return Ok(None);
            }
            s.write_all(&pass_line)?;
            let reply = read_reply(&mut s)?;
            Ok(reply.starts_with("+OK").then_some((s, reply)))
        };
        match attempt() {
            Ok(Some((s, reply))) => {
                let idle = self.shared.limits.get().idle_timeout();
                let _ = s.set_read_timeout(Some(idle));
                self.upstream = Some(s);
                log::info!(
                    "login proxied user={} client={} fallback={}",
                    kv(user),
                    self.client,
                    kv(&fallback.addr)
                );
                AuthResult::Proxied(reply)
            }
            Ok(None) => AuthResult::Bad,
            Err(e) => {
                log::warn!(
                    "fallback={} unavailable: error={}",
                    kv(&fallback.addr),
                    kv(&e.to_string())
                );
                AuthResult::Unavailable
            }
        }
    }
}
