//! A blocking client of one backend connection, for the threaded frontends,
//! `ppadmin` and the tests.
//!
//! [`BackendConn`] owns the framing of the client side: callers deal in
//! mailboxes, ids and bytes, never in protocol lines. Every read of a reply
//! line is bounded, so even a misbehaving backend cannot make a frontend
//! buffer without limit.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::names::{MailboxName, MessageId};
use crate::reply::{
    BlockHeader, BodyHeader, DirPage, ErrorCode, Greeting, OkReply, Removed, Reply, ReplyError,
    Status, Usage, BLOCK_END,
};
use crate::request::{Request, DEL_MANY_MAX, GET_MANY_MAX};
use crate::splice::{relay, Pipe, SpliceSink};

pub use crate::reply::{ListEntry, ListPage, PutReceipt, LIST_MORE, REPLY_LINE_MAX_BYTES};

/// Longest `DELM` line [`BackendConn::del_many`] sends, CRLF included: below
/// pplistener's default `line_max_bytes` (1024).
pub const DEL_MANY_LINE_BYTES: usize = 1000;

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The connection failed or timed out: treat the backend as down.
    #[error("backend I/O: {0}")]
    Io(#[from] io::Error),
    /// The backend answered `-ERR`.
    #[error("backend refused [{}]: {text}", code.map(|c| c.as_str()).unwrap_or("?"))]
    Refused {
        /// The reply code, if known to this build.
        code: Option<ErrorCode>,
        /// The human text.
        text: String,
    },
    /// The backend said something that is not PPL/1.
    #[error("backend protocol error: {0}")]
    Protocol(String),
}

impl BackendError {
    /// The `-ERR` code, if this is a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            BackendError::Refused { code, .. } => *code,
            _ => None,
        }
    }
}

impl From<ReplyError> for BackendError {
    fn from(e: ReplyError) -> BackendError {
        match e {
            ReplyError::Refused { code, text } => BackendError::Refused { code, text },
            other => BackendError::Protocol(other.to_string()),
        }
    }
}

/// Result of a backend call.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Most lines a client reads from one `LIST` page (kept or dropped).
pub const LIST_PAGE_LINES_MAX: usize = 10_000_000;

/// Cuts the connection behind `handle` (from [`BackendConn::interrupt_handle`]):
/// `shutdown(2)` both ways, so a read or write blocked on it in another thread
/// fails at once instead of waiting for its time-out.
pub fn interrupt(handle: &TcpStream) {
    let _ = handle.shutdown(std::net::Shutdown::Both);
}

/// An authenticated connection to one backend.
#[derive(Debug)]
pub struct BackendConn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    backend_name: String,
    peer: SocketAddr,
}

impl BackendConn {
    /// Connects, reads the greeting, checks the protocol version and
    /// authenticates with `secret`. `timeout` bounds the connect and every
    /// later read and write.
    pub fn connect(
        addr: impl ToSocketAddrs,
        secret: &[u8],
        timeout: Duration,
    ) -> Result<BackendConn> {
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut conn = BackendConn {
            reader: BufReader::with_capacity(64 << 10, stream.try_clone()?),
            writer: BufWriter::with_capacity(64 << 10, stream),
            backend_name: String::new(),
            peer: addr,
        };
        let greeting: Greeting = conn.expect()?;
        let proof = crate::auth::proof(secret, &greeting.nonce);
        conn.backend_name = greeting.backend_name;
        conn.command(&Request::Auth { proof })?;
        Ok(conn)
    }

    /// The backend's name from its greeting.
    pub fn backend_name(&self) -> &str {
        &self.backend_name
    }

    /// The backend's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// A second handle on this connection's socket, for [`interrupt`]: another
    /// thread can then cut a request that waits on a backend gone silent.
    /// The handle keeps the socket (not the connection) open until dropped.
    pub fn interrupt_handle(&self) -> Result<TcpStream> {
        Ok(self.writer.get_ref().try_clone()?)
    }

    /// Changes the time-out for reads and writes (e.g. a long one for a big GET).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.writer.get_ref().set_read_timeout(Some(timeout))?;
        self.writer.get_ref().set_write_timeout(Some(timeout))?;
        Ok(())
    }

    fn read_line(&mut self) -> Result<String> {
        let mut line = Vec::new();
        self.fill_line(&mut line)?;
        String::from_utf8(line).map_err(|_| BackendError::Protocol("reply not UTF-8".into()))
    }

    /// Reads one line into `line` (emptied first), without its line ending.
    fn fill_line(&mut self, line: &mut Vec<u8>) -> Result<()> {
        line.clear();
        let n = (&mut self.reader)
            .take(REPLY_LINE_MAX_BYTES as u64)
            .read_until(b'\n', line)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "backend closed").into());
        }
        if line.last() != Some(&b'\n') {
            return Err(BackendError::Protocol("reply line too long".into()));
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(())
    }

    /// Reads one reply line carrying no values: the text after `+OK`, or
    /// the refusal.
    fn reply(&mut self) -> Result<String> {
        let line = self.read_line()?;
        match Reply::parse(&line) {
            Some(Reply::Ok(text)) => Ok(text),
            Some(Reply::Err(code, text)) => Err(BackendError::Refused { code, text }),
            None => Err(ReplyError::NotAReply(line).into()),
        }
    }

    /// Reads one reply line as the `+OK` of `T`, or the refusal.
    fn expect<T: OkReply>(&mut self) -> Result<T> {
        let line = self.read_line()?;
        Ok(Reply::expect(&line)?)
    }

    /// Sends one request.
    fn send(&mut self, req: &Request) -> Result<()> {
        self.writer.write_all(req.encode().as_bytes())?;
        self.writer.flush()?;
        Ok(())
    }

    /// Sends one request and reads its one-line reply carrying no values.
    fn command(&mut self, req: &Request) -> Result<String> {
        self.send(req)?;
        self.reply()
    }

    /// Sends one request and reads its reply as `T`.
    fn call<T: OkReply>(&mut self, req: &Request) -> Result<T> {
        self.send(req)?;
        self.expect()
    }

    /// Reads the lines of a block after its header up to [`BLOCK_END`],
    /// giving each to `each`; at most `lines_max` lines are read. Returns
    /// how many lines there were.
    fn block(&mut self, lines_max: usize, mut each: impl FnMut(&str) -> Result<()>) -> Result<u64> {
        let mut read = 0u64;
        // One buffer for every line of the block (a LIST page can hold 50,000).
        let mut buf = Vec::with_capacity(128);
        loop {
            self.fill_line(&mut buf)?;
            let line = std::str::from_utf8(&buf)
                .map_err(|_| BackendError::Protocol("reply not UTF-8".into()))?;
            if line == BLOCK_END {
                return Ok(read);
            }
            if read >= lines_max as u64 {
                return Err(BackendError::Protocol("too many lines".into()));
            }
            read += 1;
            each(line)?;
        }
    }

    /// Starts a PUT: sends the header and the mailbox lines. Follow with
    /// [`put_chunk`](Self::put_chunk)s and [`put_end`](Self::put_end) or
    /// [`put_abort`](Self::put_abort), then [`put_reply`](Self::put_reply).
    pub fn put_begin(&mut self, msgid: &MessageId, mailboxes: &[MailboxName]) -> Result<()> {
        assert!(!mailboxes.is_empty(), "a PUT needs at least one mailbox");
        let req = Request::Put {
            msgid: msgid.clone(),
            mailboxes: mailboxes.to_vec(),
        };
        self.writer.write_all(req.encode().as_bytes())?;
        Ok(())
    }

    /// Sends the next body bytes (buffered; empty `data` sends nothing).
    pub fn put_chunk(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        write!(self.writer, "{}\r\n", data.len())?;
        self.writer.write_all(data)?;
        Ok(())
    }

    /// Ends the body and flushes: the backend now makes the message durable.
    pub fn put_end(&mut self) -> Result<()> {
        self.writer.write_all(b"0\r\n")?;
        self.writer.flush()?;
        Ok(())
    }

    /// Abandons the PUT being sent; its reply is `-ERR [ABORTED]`.
    pub fn put_abort(&mut self) -> Result<()> {
        self.writer.write_all(b"ABORT\r\n")?;
        self.writer.flush()?;
        Ok(())
    }

    /// Reads the reply to a finished PUT: `Ok` only once the message is durable.
    pub fn put_reply(&mut self) -> Result<PutReceipt> {
        self.expect()
    }

    /// Stores `body` as `msgid` in every mailbox, in one call.
    pub fn put(
        &mut self,
        msgid: &MessageId,
        mailboxes: &[MailboxName],
        body: &[u8],
    ) -> Result<PutReceipt> {
        self.put_begin(msgid, mailboxes)?;
        for chunk in body.chunks(256 << 10) {
            self.put_chunk(chunk)?;
        }
        self.put_end()?;
        self.put_reply()
    }

    /// Lists a whole mailbox, oldest first, paging through it (`LIST` with a
    /// start id) as the backend asks: the first `max_messages` entries at most.
    /// A mailbox larger than that is cut short, not an error: the caller sees
    /// its oldest `max_messages` messages and the backend stays usable.
    pub fn list(&mut self, mailbox: &MailboxName, max_messages: usize) -> Result<Vec<ListEntry>> {
        self.list_with_generation(mailbox, max_messages)
            .map(|(all, _)| all)
    }

    /// As [`list`](Self::list), with the mailbox's generation
    /// ([`Usage::generation`]) the listing was read at: `Some` only when
    /// every page came with the same one, so the listing is one consistent
    /// state of the mailbox.
    pub fn list_with_generation(
        &mut self,
        mailbox: &MailboxName,
        max_messages: usize,
    ) -> Result<(Vec<ListEntry>, Option<u64>)> {
        let mut all: Vec<ListEntry> = Vec::new();
        let mut generation = None;
        let mut first_page = true;
        loop {
            let after = all.last().map(|e| e.msgid.clone());
            let left = max_messages.saturating_sub(all.len());
            let page = self.list_page(mailbox, after.as_ref(), left)?;
            if let (Some(first), Some(after)) = (page.entries.first(), after.as_ref()) {
                // A backend that ignored the start id would repeat itself for ever.
                if first.msgid <= *after {
                    return Err(BackendError::Protocol(format!(
                        "LIST {mailbox} {after} answered out of order"
                    )));
                }
            }
            if first_page {
                generation = page.generation;
                first_page = false;
            } else if page.generation != generation {
                generation = None;
            }
            let progressed = !page.entries.is_empty();
            all.extend(page.entries);
            if !page.more || all.len() >= max_messages {
                all.truncate(max_messages);
                return Ok((all, generation));
            }
            if !progressed {
                return Err(BackendError::Protocol(format!(
                    "LIST {mailbox}: an empty page said more follow"
                )));
            }
        }
    }

    /// One page of a mailbox listing: the messages after `after` (from the
    /// first when `None`), sorted by id, as many as the backend's
    /// `list_max_entries`; the first `keep_max` of them are kept (the rest of
    /// the page is read and dropped, at most [`LIST_PAGE_LINES_MAX`] lines).
    pub fn list_page(
        &mut self,
        mailbox: &MailboxName,
        after: Option<&MessageId>,
        keep_max: usize,
    ) -> Result<ListPage> {
        let header: BlockHeader = self.call(&Request::List {
            mailbox: mailbox.clone(),
            after: after.cloned(),
        })?;
        let mut entries = Vec::new();
        let read = self.block(LIST_PAGE_LINES_MAX, |line| {
            if entries.len() < keep_max {
                entries.push(ListEntry::parse(line)?);
            }
            Ok(())
        })?;
        if header.count != read {
            return Err(BackendError::Protocol(format!(
                "LIST announced {} lines but sent {read}",
                header.count
            )));
        }
        Ok(ListPage {
            entries,
            more: header.more,
            generation: header.generation,
        })
    }

    /// Sends GET and returns the size announced; exactly that many body
    /// bytes must then be read with [`read_body`](Self::read_body).
    pub fn get_begin(&mut self, mailbox: &MailboxName, msgid: &MessageId) -> Result<u64> {
        let header: BodyHeader = self.call(&Request::Get {
            mailbox: mailbox.clone(),
            msgid: msgid.clone(),
        })?;
        Ok(header.size_bytes)
    }

    /// Copies exactly `size_bytes` body bytes of a GET to `out`.
    pub fn read_body<W: Write + ?Sized>(&mut self, size_bytes: u64, out: &mut W) -> Result<()> {
        let copied = io::copy(&mut (&mut self.reader).take(size_bytes), out)?;
        if copied != size_bytes {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short GET body").into());
        }
        Ok(())
    }

    /// Moves exactly `size_bytes` body bytes of a GET to `out`, zero copy
    /// when `out` can take spliced bytes and the body is at least
    /// `splice_min_bytes`: what is already buffered here is written first,
    /// then the bytes move from the backend socket with `splice(2)`, and the
    /// last two bytes are always written through [`Write`] (so `out` sees
    /// how the message ends). Otherwise the same as
    /// [`read_body`](Self::read_body). Returns the bytes spliced.
    pub fn read_body_into(
        &mut self,
        size_bytes: u64,
        splice_min_bytes: u64,
        out: &mut dyn SpliceSink,
    ) -> Result<u64> {
        if size_bytes < splice_min_bytes.max(3) {
            self.read_body(size_bytes, out)?;
            return Ok(0);
        }
        let buffered = self.reader.buffer();
        let head = buffered.len().min((size_bytes - 2) as usize);
        out.write_all(&buffered[..head])?;
        self.reader.consume(head);
        let middle = size_bytes - 2 - head as u64;
        let mut spliced = 0;
        if middle > 0 {
            if out.can_splice()? {
                let pipe = Pipe::new()?;
                relay(self.reader.get_ref().as_raw_fd(), &pipe, out, middle)?;
                spliced = middle;
            } else {
                self.read_body(middle, out)?;
            }
        }
        self.read_body(2, out)?;
        Ok(spliced)
    }

    /// Reads exactly `size_bytes` body bytes of a GET into a new buffer of
    /// that size: what is already buffered is taken first, the rest is read
    /// from the socket straight into the buffer (no pass through the reader's
    /// own buffer, so each byte is copied once, by the kernel).
    fn read_body_owned(&mut self, size_bytes: u64) -> Result<Vec<u8>> {
        let size = usize::try_from(size_bytes)
            .map_err(|_| BackendError::Protocol(format!("body of {size_bytes} bytes")))?;
        let mut body = Vec::with_capacity(size);
        let buffered = self.reader.buffer();
        let head = buffered.len().min(size);
        body.extend_from_slice(&buffered[..head]);
        self.reader.consume(head);
        let rest = (size - head) as u64;
        let read = self.reader.get_mut().take(rest).read_to_end(&mut body)?;
        if read as u64 != rest {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short GET body").into());
        }
        Ok(body)
    }

    /// Fetches one message into memory (tests and tools; frontends stream).
    pub fn get(&mut self, mailbox: &MailboxName, msgid: &MessageId) -> Result<Vec<u8>> {
        let size = self.get_begin(mailbox, msgid)?;
        let mut body = Vec::with_capacity(size.min(64 << 20) as usize);
        self.read_body(size, &mut body)?;
        Ok(body)
    }

    /// Fetches several messages of `mailbox` into memory in one round trip
    /// (`GETM` lines of up to [`DEL_MANY_LINE_BYTES`], sent together), calling
    /// `each(i, body)` as message `msgids[i]` arrives, in order: `Ok(bytes)`,
    /// or the backend's refusal for that id (`NOTFOUND`, `TEMP`). At most
    /// `bytes_max` body bytes in all are accepted; a backend announcing more
    /// is a protocol error. A backend without `GETM` gets one `GET` each.
    ///
    /// `Err` means the connection failed part-way (drop it): the messages
    /// already given to `each` are complete and exact.
    pub fn get_many(
        &mut self,
        mailbox: &MailboxName,
        msgids: &[&MessageId],
        bytes_max: u64,
        mut each: impl FnMut(usize, Result<Vec<u8>>),
    ) -> Result<()> {
        let mut lines = Vec::new();
        let mut rest = msgids;
        while !rest.is_empty() {
            let mut line_bytes = "GETM ".len() + mailbox.as_str().len() + 2;
            let mut n = 0;
            while n < rest.len() && n < GET_MANY_MAX {
                line_bytes += 1 + rest[n].as_str().len();
                if n > 0 && line_bytes > DEL_MANY_LINE_BYTES {
                    break;
                }
                n += 1;
            }
            let (batch, tail) = rest.split_at(n);
            lines.push(batch.len());
            let req = Request::GetMany {
                mailbox: mailbox.clone(),
                msgids: batch.iter().map(|id| (*id).clone()).collect(),
            };
            self.writer.write_all(req.encode().as_bytes())?;
            rest = tail;
        }
        self.writer.flush()?;
        let mut left = bytes_max;
        let mut index = 0;
        for (line, &count) in lines.iter().enumerate() {
            for k in 0..count {
                match self.expect::<BodyHeader>() {
                    Ok(BodyHeader { size_bytes: size }) => {
                        if size > left {
                            return Err(BackendError::Protocol(format!(
                                "GETM answer of {size} bytes over the {bytes_max} asked for"
                            )));
                        }
                        left -= size;
                        each(index, Ok(self.read_body_owned(size)?));
                    }
                    // A backend without GETM refuses each line once: read
                    // the other lines' refusals, then fetch one by one.
                    Err(e) if k == 0 && e.code() == Some(ErrorCode::Proto) => {
                        for _ in line + 1..lines.len() {
                            let _ = self.reply();
                        }
                        for (i, id) in msgids.iter().enumerate().skip(index) {
                            match self.get_begin(mailbox, id) {
                                Ok(size) if size > left => {
                                    return Err(BackendError::Protocol(format!(
                                        "GET answer of {size} bytes over the {bytes_max} asked for"
                                    )))
                                }
                                Ok(size) => {
                                    left -= size;
                                    each(i, Ok(self.read_body_owned(size)?));
                                }
                                Err(e @ BackendError::Refused { .. }) => each(i, Err(e)),
                                Err(e) => return Err(e),
                            }
                        }
                        return Ok(());
                    }
                    Err(e @ BackendError::Refused { .. }) => each(index, Err(e)),
                    Err(e) => return Err(e),
                }
                index += 1;
            }
        }
        Ok(())
    }

    /// Removes `msgid` from `mailbox`.
    pub fn del(&mut self, mailbox: &MailboxName, msgid: &MessageId) -> Result<()> {
        self.command(&Request::Del {
            mailbox: mailbox.clone(),
            msgid: msgid.clone(),
        })
        .map(drop)
    }

    /// Removes every message of `msgids` from `mailbox` with as few directory
    /// syncs as the command line allows (`DELM`, up to [`DEL_MANY_LINE_BYTES`]
    /// per line); ids not present are skipped. Returns how many were removed.
    /// A backend without `DELM` gets one `DEL` per message.
    pub fn del_many(&mut self, mailbox: &MailboxName, msgids: &[&MessageId]) -> Result<u64> {
        let lines = self.del_many_send(mailbox, msgids)?;
        self.del_many_reply(mailbox, msgids, lines)
    }

    /// Sends the `DELM` lines of [`del_many`](Self::del_many) together without
    /// waiting for their replies, so that a caller can delete on several
    /// backends at once; returns how many lines were sent, for
    /// [`del_many_reply`](Self::del_many_reply).
    pub fn del_many_send(&mut self, mailbox: &MailboxName, msgids: &[&MessageId]) -> Result<usize> {
        let mut lines = 0;
        let mut rest = msgids;
        while !rest.is_empty() {
            let mut line_bytes = "DELM ".len() + mailbox.as_str().len() + 2;
            let mut n = 0;
            while n < rest.len() && n < DEL_MANY_MAX {
                line_bytes += 1 + rest[n].as_str().len();
                if n > 0 && line_bytes > DEL_MANY_LINE_BYTES {
                    break;
                }
                n += 1;
            }
            let (batch, tail) = rest.split_at(n);
            let req = Request::DelMany {
                mailbox: mailbox.clone(),
                msgids: batch.iter().map(|id| (*id).clone()).collect(),
            };
            self.writer.write_all(req.encode().as_bytes())?;
            lines += 1;
            rest = tail;
        }
        self.writer.flush()?;
        Ok(lines)
    }

    /// Reads the replies to the `lines` `DELM` lines that
    /// [`del_many_send`](Self::del_many_send) sent for `msgids`; returns how
    /// many messages were removed. A backend that does not know `DELM`
    /// (every line refused as a protocol error) gets one `DEL` per message.
    pub fn del_many_reply(
        &mut self,
        mailbox: &MailboxName,
        msgids: &[&MessageId],
        lines: usize,
    ) -> Result<u64> {
        let mut removed = 0;
        let mut unknown = false;
        for _ in 0..lines {
            match self.expect::<Removed>() {
                Ok(r) => removed += r.count,
                Err(e) if e.code() == Some(ErrorCode::Proto) => unknown = true,
                Err(e) => return Err(e),
            }
        }
        if unknown {
            for id in msgids {
                match self.del(mailbox, id) {
                    Ok(()) => removed += 1,
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }

    /// `(messages, bytes)` of a mailbox on this backend.
    pub fn usage(&mut self, mailbox: &MailboxName) -> Result<(u64, u64)> {
        self.usage_send(mailbox)?;
        self.usage_reply()
    }

    /// Sends `USAGE` without waiting for the reply, so that a caller can ask
    /// several backends at once; read it with [`usage_reply`](Self::usage_reply).
    pub fn usage_send(&mut self, mailbox: &MailboxName) -> Result<()> {
        let req = Request::Usage {
            mailbox: mailbox.clone(),
        };
        self.send(&req)
    }

    /// Reads the reply to a [`usage_send`](Self::usage_send): `(messages, bytes)`.
    pub fn usage_reply(&mut self) -> Result<(u64, u64)> {
        let usage = self.usage_full_reply()?;
        Ok((usage.messages, usage.size_bytes))
    }

    /// Reads the reply to a [`usage_send`](Self::usage_send), generation included.
    pub fn usage_full_reply(&mut self) -> Result<Usage> {
        self.expect()
    }

    /// Removes a whole mailbox from this backend; returns the messages removed.
    pub fn nuke(&mut self, mailbox: &MailboxName) -> Result<u64> {
        let removed: Removed = self.call(&Request::Nuke {
            mailbox: mailbox.clone(),
        })?;
        Ok(removed.count)
    }

    /// The mailboxes this backend holds (at most `max_mailboxes`).
    pub fn dir(&mut self, max_mailboxes: usize) -> Result<Vec<MailboxName>> {
        self.dir_after(None, max_mailboxes)
    }

    /// One page of the mailboxes this backend holds, in name order: those after
    /// `after` (all from the first when `None`), as many as the backend's
    /// `list_max_entries` (at most `max_mailboxes` accepted). An empty page means
    /// the end; otherwise ask again with the last name.
    pub fn dir_after(
        &mut self,
        after: Option<&MailboxName>,
        max_mailboxes: usize,
    ) -> Result<Vec<MailboxName>> {
        let header: BlockHeader = self.call(&Request::Dir {
            after: after.cloned(),
        })?;
        let mut mailboxes = Vec::new();
        let read = self.block(max_mailboxes, |line| {
            mailboxes.push(DirPage::parse_line(line)?);
            Ok(())
        })?;
        if header.count != read {
            return Err(BackendError::Protocol(format!(
                "DIR announced {} lines but sent {read}",
                header.count
            )));
        }
        Ok(mailboxes)
    }

    /// The backend's status line as `key=value` pairs.
    pub fn status(&mut self) -> Result<Vec<(String, String)>> {
        let status: Status = self.call(&Request::Status)?;
        Ok(status.pairs)
    }

    /// Switches the backend to read-only (`true`) or read-write.
    pub fn set_readonly(&mut self, readonly: bool) -> Result<()> {
        let req = if readonly {
            Request::ReadOnly
        } else {
            Request::ReadWrite
        };
        self.command(&req).map(drop)
    }

    /// Liveness check.
    pub fn ping(&mut self) -> Result<()> {
        self.command(&Request::Ping).map(drop)
    }

    /// Says goodbye (errors ignored: the connection is being dropped anyway).
    pub fn quit(mut self) {
        let _ = self.command(&Request::Quit);
    }
}
