//! The admin port's HTTP server: one request per connection, bounded in every
//! dimension — concurrent connections, time per request, header and body size.
//!
//! It replaces `tiny_http` 0.12, which starts a thread for every connection it
//! accepts, without a limit, and sets no read time-out: a few thousand silent
//! connections would hold as many threads for ever. The admin port needs very
//! little of HTTP/1.x (a request line, two headers, a small body to skip), so
//! the whole server fits here and every limit is visible.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Limits of one admin port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections served at once (one thread each); beyond, a connection is
    /// answered `503 Service Unavailable` and closed.
    pub connections_max: usize,
    /// The longest one connection may take to send its request and read the
    /// answer, from its acceptance to the answer's last byte; then it is closed.
    pub request_timeout_ms: u64,
}

impl Default for AdminLimits {
    /// [`default_connections_max`] connections, [`default_request_timeout_ms`] per request.
    fn default() -> Self {
        AdminLimits {
            connections_max: default_connections_max(),
            request_timeout_ms: default_request_timeout_ms(),
        }
    }
}

/// The default `admin_connections_max`: 128, far above what monitoring and
/// operators need at once, small enough that the threads cost little.
pub fn default_connections_max() -> usize {
    128
}

/// The default `admin_request_timeout_ms`: 10 s.
pub fn default_request_timeout_ms() -> u64 {
    10_000
}

/// Longest request line or header line, CRLF included.
const LINE_MAX_BYTES: usize = 8 << 10;
/// Most header lines in one request.
const HEADERS_MAX: usize = 64;
/// Longest request body accepted (it is read and discarded).
pub(crate) const BODY_MAX_BYTES: u64 = 64 << 10;
/// Most bytes discarded after an error answer before the connection is
/// closed (so the client reads the answer instead of a reset).
const DRAIN_MAX_BYTES: u64 = 2 << 20;
/// Refused connections waiting for their `503`; beyond, they are just closed.
const REFUSE_QUEUE_MAX: usize = 16;
/// How long a refused connection is given to send its request and to read
/// the `503`.
const REFUSE_TIMEOUT: Duration = Duration::from_millis(200);
/// Stack of a connection thread (the handlers build small JSON documents).
const THREAD_STACK_BYTES: usize = 256 << 10;

/// One parsed request head.
pub(crate) struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// The `Authorization` header's value, if any.
    pub authorization: Option<String>,
}

/// An HTTP answer: status, content type, body.
pub(crate) type Answer = (u16, &'static str, String);

/// Reads from the socket with the time left before `deadline` as the read
/// time-out, so a client that trickles bytes cannot stretch a request.
struct DeadlineReader<'a> {
    sock: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.sock.set_read_timeout(Some(left))?;
        (&mut &*self.sock).read(buf)
    }
}

/// Writes all of `data` by `deadline` (a time-out per write alone would let a
/// slow reader restart it with every byte).
fn write_by(sock: &TcpStream, mut data: &[u8], deadline: Instant) -> io::Result<()> {
    while !data.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        sock.set_write_timeout(Some(left))?;
        match (&mut &*sock).write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Starts the accept loop on `listener`: each connection is served by
/// `handle` on a thread of its own, at most `limits.connections_max` at once.
pub(crate) fn serve<H>(listener: TcpListener, limits: AdminLimits, handle: H) -> io::Result<()>
where
    H: Fn(&Request) -> Answer + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    let (refuse_tx, refuse_rx) = sync_channel(REFUSE_QUEUE_MAX);
    thread::Builder::new()
        .name("admin-refuse".into())
        .stack_size(THREAD_STACK_BYTES)
        .spawn(move || refuse_all(refuse_rx))?;
    thread::Builder::new()
        .name("admin".into())
        .spawn(move || accept_loop(listener, limits, handle, refuse_tx))?;
    Ok(())
}

fn accept_loop<H>(
    listener: TcpListener,
    limits: AdminLimits,
    handle: Arc<H>,
    refuse_tx: SyncSender<TcpStream>,
) where
    H: Fn(&Request) -> Answer + Send + Sync + 'static,
{
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("admin: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= limits.connections_max {
            open.fetch_sub(1, Ordering::SeqCst);
            log::debug!("admin: connections_max reached, refusing a connection");
            // A full queue means a flood: those are closed without an answer.
            let _ = refuse_tx.try_send(stream);
            continue;
        }
        let (open2, handle) = (open.clone(), handle.clone());
        let deadline = Instant::now() + Duration::from_millis(limits.request_timeout_ms);
        let spawned = thread::Builder::new()
            .name("admin-conn".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || {
                if let Err(e) = converse(&stream, deadline, handle.as_ref()) {
                    log::debug!("admin: connection ended: {e}");
                }
                open2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::warn!("admin: cannot start a connection thread: {e}");
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answers each queued connection `503` (briefly: see [`REFUSE_TIMEOUT`]).
fn refuse_all(queue: Receiver<TcpStream>) {
    for stream in queue {
        let deadline = Instant::now() + REFUSE_TIMEOUT;
        // The request, most likely already sent: read it so that closing
        // does not reset the connection before the client reads the 503.
        let mut buf = [0u8; 4096];
        let _ = DeadlineReader {
            sock: &stream,
            deadline,
        }
        .read(&mut buf);
        let answer = (
            503,
            "text/plain",
            "too many admin connections\n".to_string(),
        );
        let _ = respond(&stream, &answer, deadline + REFUSE_TIMEOUT);
        finish(&stream, deadline + 2 * REFUSE_TIMEOUT);
    }
}

/// Serves the one request of a connection, all by `deadline`.
fn converse<H>(sock: &TcpStream, deadline: Instant, handle: &H) -> io::Result<()>
where
    H: Fn(&Request) -> Answer,
{
    let mut reader = BufReader::new(DeadlineReader { sock, deadline });
    let answer = match read_request(&mut reader) {
        Ok(req) => handle(&req),
        Err(Refusal::Io(e)) => return Err(e),
        Err(Refusal::Status(status, why)) => {
            let answer = (status, "text/plain", format!("{why}\n"));
            respond(sock, &answer, deadline)?;
            finish(sock, deadline);
            return Ok(());
        }
    };
    respond(sock, &answer, deadline)?;
    finish(sock, deadline);
    Ok(())
}

/// Why a request is not served.
enum Refusal {
    /// The connection failed or timed out: nothing to answer.
    Io(io::Error),
    /// Answer with this status and reason, then close.
    Status(u16, &'static str),
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        Refusal::Io(e)
    }
}

/// Reads one CRLF-terminated line of at most [`LINE_MAX_BYTES`], without it.
fn read_line<R: BufRead>(r: &mut R) -> Result<String, Refusal> {
    let mut line = Vec::new();
    let n = r.take(LINE_MAX_BYTES as u64).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(Refusal::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if line.last() != Some(&b'\n') {
        if n < LINE_MAX_BYTES {
            return Err(Refusal::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        return Err(Refusal::Status(431, "header line too long"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if line
        .iter()
        .any(|&b| b == 0 || (b < b' ' && b != b'\t') || b == 0x7f)
    {
        return Err(Refusal::Status(400, "control characters in the request"));
    }
    String::from_utf8(line).map_err(|_| Refusal::Status(400, "request is not UTF-8"))
}

/// Reads a request head and skips its body.
fn read_request<R: BufRead>(r: &mut R) -> Result<Request, Refusal> {
    let line = read_line(r)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Status(400, "malformed request line"));
    };
    if version != "HTTP/1.0" && version != "HTTP/1.1" {
        return Err(Refusal::Status(505, "HTTP/1.0 or HTTP/1.1 only"));
    }
    if method.is_empty() || !target.starts_with('/') {
        return Err(Refusal::Status(400, "malformed request line"));
    }
    let mut req = Request {
        method: method.to_string(),
        target: target.to_string(),
        authorization: None,
    };
    let mut body_bytes = 0u64;
    for _ in 0..=HEADERS_MAX {
        let line = read_line(r)?;
        if line.is_empty() {
            if body_bytes > BODY_MAX_BYTES {
                return Err(Refusal::Status(413, "request body too large"));
            }
            io::copy(&mut r.take(body_bytes), &mut io::sink())?;
            return Ok(req);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(Refusal::Status(400, "malformed header"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("authorization") {
            req.authorization = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            body_bytes = value
                .parse()
                .map_err(|_| Refusal::Status(400, "bad Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refusal::Status(411, "Content-Length required"));
        }
    }
    Err(Refusal::Status(431, "too many header lines"))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes `answer` with `Connection: close`.
fn respond(sock: &TcpStream, answer: &Answer, deadline: Instant) -> io::Result<()> {
    let (status, content_type, body) = answer;
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        reason(*status),
        body.len()
    );
    write_by(sock, head.as_bytes(), deadline)?;
    write_by(sock, body.as_bytes(), deadline)
}

/// Ends the connection after an answer: the answer is followed by FIN, and
/// what the client still sends is discarded (bounded) until it closes, so
/// that closing does not reset the connection under the unread answer.
fn finish(sock: &TcpStream, deadline: Instant) {
    let _ = sock.shutdown(Shutdown::Write);
    let _ = io::copy(
        &mut DeadlineReader { sock, deadline }.take(DRAIN_MAX_BYTES),
        &mut io::sink(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, u16> {
        read_request(&mut &raw[..]).map_err(|e| match e {
            Refusal::Status(s, _) => s,
            Refusal::Io(_) => 0,
        })
    }

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        let r = parse(b"POST /control/x?a=1 HTTP/1.1\r\nAuthorization: Bearer t\r\nContent-Length: 3\r\n\r\nabc").unwrap();
        assert_eq!(
            (r.method.as_str(), r.target.as_str()),
            ("POST", "/control/x?a=1")
        );
        assert_eq!(r.authorization.as_deref(), Some("Bearer t"));
        assert_eq!(parse(b"GET /stats HTTP/9.9\r\n\r\n").err(), Some(505));
        assert_eq!(parse(b"GET /st\0ats HTTP/1.0\r\n\r\n").err(), Some(400));
        assert_eq!(parse(b"\xff\xfe garbage\r\n\r\n").err(), Some(400));
        assert_eq!(
            parse(b"GET /stats HTTP/1.0\r\n").err(),
            Some(0),
            "EOF in the head"
        );
        let mut long = b"GET /stats HTTP/1.0\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'A', LINE_MAX_BYTES));
        assert_eq!(parse(&long).err(), Some(431));
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            BODY_MAX_BYTES + 1
        );
        assert_eq!(parse(big.as_bytes()).err(), Some(413));
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(chunked).err(), Some(411));
        let many = format!(
            "GET / HTTP/1.0\r\n{}\r\n",
            "X: y\r\n".repeat(HEADERS_MAX + 1)
        );
        assert_eq!(parse(many.as_bytes()).err(), Some(431));
    }
}
