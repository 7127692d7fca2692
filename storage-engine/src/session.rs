//! One client connection: the thin I/O loop around the pure
//! [`Decoder`](powermail_proto::Decoder).
//!
//! [`Connection`] owns the socket and its buffers (reads are bounded by the
//! buffer, replies are queued and flushed before the next read, so pipelined
//! requests share one write). [`serve`] feeds the decoder's events to the
//! pure [`ConnState`] (the auth gate and the PUT lifecycle), does what it
//! says, and applies each request against the [`Store`](crate::store::Store);
//! every reply is written through `powermail_proto::reply`'s types. A body is written as it
//! arrives; `+OK` for a PUT is sent only once the body is durable and linked
//! into every mailbox, with the links durable too (by the body's own
//! `fdatasync` and the batch's directory fsyncs, or by the batch's one
//! `syncfs`: see [`crate::commit`]).

use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use powermail_proto::reply::{err_line, DELETED, PONG};
use powermail_proto::{
    auth, BodyHeader, Decoder, DirPage, ErrorCode, Event, Limits, ListEntry, ListPage, MailboxName,
    OkReply, PutReceipt, Removed, Reply, Request, Status, Usage,
};

use crate::backend::Ctx;
use crate::config::LimitsConfig;
use crate::conn_state::{self, Action, ConnState, Owned};
use crate::index::MailboxIndex;
use crate::stats::add;
use crate::store::Store;
use crate::writer::BodyWriter;

/// Size of a connection's read buffer; it must hold a full line.
const READ_BUF_BYTES: usize = 64 << 10;

/// The socket and its buffers.
struct Connection {
    stream: TcpStream,
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    wbuf: Vec<u8>,
}

impl Connection {
    fn pending(&self) -> &[u8] {
        &self.rbuf[self.start..self.end]
    }

    /// Reads more bytes; `Ok(0)` at end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            self.rbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // The decoder consumes any full line or body run, so a full buffer
        // here would mean a line longer than the buffer: the line limit is
        // far below it.
        assert!(self.end < self.rbuf.len(), "read buffer full");
        let n = self.stream.read(&mut self.rbuf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    fn queue(&mut self, s: &str) {
        self.wbuf.extend_from_slice(s.as_bytes());
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }
}

/// How long and how much a closing connection drains so its last reply is
/// not destroyed by a TCP reset (the client may still be sending a body).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_MAX_BYTES: usize = 16 << 20;

impl Connection {
    /// Shuts down the sending side and discards input for a bounded time, so
    /// that a client still writing reads our last reply instead of a reset.
    async fn linger(&mut self) -> io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write).await?;
        self.stream.set_read_timeout(Some(LINGER))?;
        let deadline = Instant::now() + LINGER;
        let mut drained = 0;
        while drained < LINGER_MAX_BYTES && Instant::now() < deadline {
            match self.stream.read(&mut self.rbuf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
        Ok(())
    }
}

/// The loop's side of a PUT being written: its body file and when it began.
struct Body {
    writer: Box<BodyWriter>,
    started: Instant,
}

/// A PUT as [`ConnState`] holds it.
type Put = conn_state::Put<Body>;

/// Deletes the nameless body file of a PUT that will not be stored.
async fn discard(body: Option<Body>) {
    if let Some(body) = body {
        body.writer.discard().await;
    }
}

/// Serves one accepted connection until it closes, errs or idles out.
pub async fn serve(ctx: Rc<Ctx>, stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let idle = Duration::from_millis(ctx.limits.idle_timeout_ms);
    if let Err(e) = stream
        .set_read_timeout(Some(idle))
        .and(stream.set_write_timeout(Some(idle)))
    {
        log::warn!(
            "backend={} client={peer}: cannot set time-outs: {e}",
            ctx.shared.name
        );
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut conn = Connection {
        stream,
        rbuf: vec![0; READ_BUF_BYTES],
        start: 0,
        end: 0,
        wbuf: Vec::new(),
    };
    match session(&ctx, &mut conn, &peer).await {
        Ok(()) => log::debug!("backend={} client={peer} closed", ctx.shared.name),
        Err(e) => log::info!(
            "backend={} client={peer} dropped: error={}",
            ctx.shared.name,
            powermail_admin::kv(&e.to_string())
        ),
    }
}

fn decoder_limits(l: &LimitsConfig) -> Limits {
    Limits {
        line_max_bytes: l.line_max_bytes.min(READ_BUF_BYTES / 2),
        mailboxes_per_put_max: l.mailboxes_per_put_max,
        chunk_max_bytes: l.chunk_max_bytes,
        message_max_bytes: l.message_max_bytes,
    }
}

async fn session(ctx: &Ctx, conn: &mut Connection, peer: &str) -> io::Result<()> {
    let mut state: ConnState<Body> =
        ConnState::new(auth::new_nonce(), ctx.limits.message_max_bytes);
    conn.queue(&state.greeting(&ctx.shared.name));
    conn.flush().await?;
    let mut decoder = Decoder::new(decoder_limits(&ctx.limits));
    loop {
        let (event, used) = match decoder.decode(conn.pending()) {
            Err(fatal) => {
                add(&ctx.shared.counters.protocol_errors, 1);
                let (body, line) = state.on_fatal(&fatal);
                discard(body).await;
                log::info!(
                    "backend={} client={peer} error={}",
                    ctx.shared.name,
                    powermail_admin::kv(&fatal.to_string())
                );
                conn.queue(&line);
                conn.flush().await?;
                return conn.linger().await;
            }
            Ok((Some(Event::Body(data)), used)) => {
                write_body(ctx, &mut state, data).await;
                conn.start += used;
                continue;
            }
            Ok((None, 0)) => {
                let between = !state.in_put() && !decoder.in_put();
                if !read_more(ctx, conn, between, peer).await? {
                    discard(state.take_writer()).await;
                    return Ok(());
                }
                continue;
            }
            Ok((event, used)) => (event.map(owned_event), used),
        };
        conn.start += used;
        let Some(event) = event else { continue };
        let action = state.on_event(event, &ctx.secret);
        if act(ctx, conn, &mut state, action, peer).await? == Flow::Close {
            return conn.flush().await;
        }
    }
}

/// Whether the connection goes on after an action.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// Does what the connection state said.
async fn act(
    ctx: &Ctx,
    conn: &mut Connection,
    state: &mut ConnState<Body>,
    action: Action<Body>,
    peer: &str,
) -> io::Result<Flow> {
    match action {
        Action::None => {}
        Action::Reply(line) => conn.queue(&line),
        Action::Invalid(line) => {
            add(&ctx.shared.counters.protocol_errors, 1);
            conn.queue(&line);
        }
        Action::Close(line) => {
            conn.queue(&line);
            return Ok(Flow::Close);
        }
        Action::AuthFailed(line) => {
            add(&ctx.shared.counters.auth_failures, 1);
            log::warn!("backend={} client={peer} auth=failed", ctx.shared.name);
            conn.queue(&line);
            return Ok(Flow::Close);
        }
        Action::Apply(req) => {
            let started = Instant::now();
            let verb = req.verb();
            apply(ctx, conn, req).await?;
            ctx.latencies
                .borrow_mut()
                .record(verb, started.elapsed().as_micros() as u64);
        }
        Action::StartPut(msgid, mailboxes) => {
            let opened = start_body(ctx);
            state.begin_put(Some((msgid, mailboxes)), opened);
        }
        Action::FinishPut(put) => {
            let reply = finish_put(ctx, put, peer).await;
            conn.queue(&reply);
        }
        Action::Aborted(body, line) => {
            discard(body).await;
            add(&ctx.shared.counters.put_errors, 1);
            conn.queue(&line);
        }
    }
    Ok(Flow::Continue)
}

/// Body bytes go straight from the read buffer to the DMA buffer; a write
/// error turns the PUT into a refusal (the rest of its body is dropped).
async fn write_body(ctx: &Ctx, state: &mut ConnState<Body>, data: &[u8]) {
    if let Some(body) = state.body(data.len()) {
        if let Err(e) = body.writer.write(data).await {
            discard(state.refuse_put(ErrorCode::Temp, format!("write failed: {e}"))).await;
            note_io_error(ctx, &e);
        }
    }
}

/// Flushes the replies and reads more input: `Ok(false)` at end of stream,
/// or when a drain starts while the client is `between` requests (inside
/// one — a PUT's body, a partial line — it reads on until it is done).
async fn read_more(
    ctx: &Ctx,
    conn: &mut Connection,
    between: bool,
    peer: &str,
) -> io::Result<bool> {
    conn.flush().await?;
    let read = if between && conn.pending().is_empty() {
        fill_unless_draining(conn, &ctx.drain).await
    } else {
        Some(conn.fill().await)
    };
    let Some(read) = read else {
        log::debug!("backend={} client={peer} closed: draining", ctx.shared.name);
        return Ok(false);
    };
    Ok(read? > 0)
}

/// [`Connection::fill`], or `None` once `drain` has started (also when it
/// starts while waiting for the client).
async fn fill_unless_draining(
    conn: &mut Connection,
    drain: &crate::drain::Drain,
) -> Option<io::Result<usize>> {
    if drain.started() {
        return None;
    }
    futures_lite::future::or(async { Some(conn.fill().await) }, async {
        drain.wait().await;
        None
    })
    .await
}

fn owned_event(e: Event<'_>) -> Owned {
    match e {
        Event::Request(r) => Owned::Request(r),
        Event::Invalid(e) => Owned::Invalid(e),
        Event::PutStart(p) => Owned::PutStart(p),
        Event::PutEnd => Owned::PutEnd,
        Event::PutAbort => Owned::PutAbort,
        Event::Body(_) => unreachable!("bodies are handled before conversion"),
    }
}

/// Starts the body of a PUT (its file is opened when needed: writer.rs), or
/// says why it is refused.
fn start_body(ctx: &Ctx) -> Result<Body, (ErrorCode, String)> {
    if ctx.shared.readonly() {
        return Err((
            ErrorCode::ReadOnly,
            format!("backend is read-only ({})", ctx.shared.mode()),
        ));
    }
    Ok(Body {
        writer: Box::new(BodyWriter::new(
            ctx.store.tmp_dir(),
            crate::writer::WRITE_UNIT_BYTES,
        )),
        started: Instant::now(),
    })
}

/// A full disk turns the backend read-only by itself.
fn note_io_error(ctx: &Ctx, e: &io::Error) {
    use std::sync::atomic::Ordering::Relaxed;
    if crate::backend::is_out_of_space(e) {
        ctx.shared.auto_readonly.store(true, Relaxed);
        log::error!("backend={} disk full: now read-only", ctx.shared.name);
    } else if crate::backend::is_disk_failure(e) && !ctx.shared.disk_failed.swap(true, Relaxed) {
        log::error!(
            "backend={} write or flush failed ({e}): now read-only, PUT/DEL refused until \
             READWRITE or a restart (check the disk and the file system)",
            ctx.shared.name
        );
    }
}

/// Refuses a change (DEL, DELM) on a backend whose disk failed: its
/// acknowledgement could not be believed. Returns whether it answered.
fn refuse_on_failed_disk(ctx: &Ctx, conn: &mut Connection) -> bool {
    if !ctx
        .shared
        .disk_failed
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return false;
    }
    conn.queue(&err_line(
        ErrorCode::ReadOnly,
        "backend disk failed: changes refused",
    ));
    true
}

async fn finish_put(ctx: &Ctx, put: Put, peer: &str) -> String {
    let c = &ctx.shared.counters;
    let (writer, msgid, mailboxes, started) = match put {
        Put::Writing {
            writer: Body { writer, started },
            msgid,
            mailboxes,
        } => (writer, msgid, mailboxes, started),
        Put::Refused { code, text } => {
            add(&c.put_errors, 1);
            return err_line(code, &text);
        }
    };
    let sync_body = ctx.shared.durability == crate::config::Durability::File;
    // The tail may go through the page cache where a flush writes it back
    // before the link exists (writer.rs, `Tail`).
    let tail = match sync_body || ctx.shared.flush_before_link {
        true => crate::writer::Tail::PageCache {
            whole_body_max_bytes: ctx.shared.page_cache_body_max_bytes,
        },
        false => crate::writer::Tail::PadAndTruncate,
    };
    let (file, size_bytes) = match writer.finish(sync_body, tail).await {
        Ok(done) => {
            if sync_body {
                c.flushed(&c.flushes_fdatasync, 1);
            }
            add(&c.bytes_in_direct, done.direct_bytes);
            (done.file, done.size_bytes)
        }
        Err(e) => {
            note_io_error(ctx, &e);
            add(&c.put_errors, 1);
            return err_line(ErrorCode::Temp, &format!("body write or sync failed: {e}"));
        }
    };
    let job = crate::store::LinkJob {
        fd: file.as_raw_fd(),
        msgid: msgid.clone(),
        mailboxes,
    };
    let mailbox_count = job.mailboxes.len();
    // Known before the first link exists, so a LIST never misses a message.
    {
        let mut known = ctx.known.borrow_mut();
        for m in &job.mailboxes {
            if !known.contains(m) {
                known.insert(m.clone());
            }
        }
    }
    // The file stays open until its links are made; then closing it only
    // drops this handle (or, if linking failed, frees the nameless body).
    let linked_mailboxes = job.mailboxes.clone();
    let linked = ctx.committer.link(job).await;
    file.close().await;
    for m in &linked_mailboxes {
        match &linked {
            // Linked now, or already (a retry), in every mailbox.
            Ok(_) => ctx
                .index
                .apply(m, crate::index::Op::Add(msgid.clone(), size_bytes)),
            // Some links may exist: walk again on the next touch.
            Err(_) => ctx.index.invalidate(m),
        }
    }
    match linked {
        Ok(out) => {
            add(&c.puts, 1);
            add(&c.bytes_in, size_bytes);
            add(&c.links_created, out.created);
            let us = started.elapsed().as_micros() as u64;
            ctx.latencies.borrow_mut().record("PUT", us);
            log::debug!(
                "backend={} client={peer} put msgid={msgid} size={size_bytes} mailboxes={} created={} existing={} copies={} us={us}",
                ctx.shared.name, mailbox_count, out.created, out.existing, out.extra_copies
            );
            PutReceipt {
                msgid,
                size_bytes,
                links_created: out.created,
            }
            .encode()
        }
        Err(e) => {
            note_io_error(ctx, &e);
            add(&c.put_errors, 1);
            log::error!(
                "backend={} put msgid={msgid} link or flush failed: {e}",
                ctx.shared.name
            );
            err_line(ErrorCode::Temp, &format!("link or flush failed: {e}"))
        }
    }
}

/// Runs `f` against the store on the blocking pool.
async fn blocking<T: Send + 'static>(
    ctx: &Ctx,
    f: impl FnOnce(&Store) -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let store = ctx.store.clone();
    glommio::executor().spawn_blocking(move || f(&store)).await
}

/// The directory walk that builds the index of `mailbox` (on the blocking pool).
fn walker<'a>(
    ctx: &'a Ctx,
    mailbox: &'a MailboxName,
) -> impl Fn() -> futures_lite::future::BoxedLocal<io::Result<MailboxIndex>> + 'a {
    move || {
        let store = ctx.store.clone();
        let mailbox = mailbox.clone();
        Box::pin(async move {
            // The walk and the index's build both run on the blocking pool.
            glommio::executor()
                .spawn_blocking(move || {
                    store
                        .list(&mailbox, usize::MAX)
                        .map(MailboxIndex::from_walk)
                })
                .await
        })
    }
}

fn io_err_line(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::NotFound {
        err_line(ErrorCode::NotFound, "no such message")
    } else {
        err_line(ErrorCode::Temp, &e.to_string())
    }
}

/// Answers requests about a mailbox that has no directory on this backend
/// from memory: most POP3 logins find an empty mailbox (POPular measured
/// 80%), and those must cost no disk access. Returns whether it answered.
fn answer_unknown_mailbox(ctx: &Ctx, conn: &mut Connection, req: &Request) -> bool {
    let mailbox = match req {
        Request::List { mailbox, .. }
        | Request::Usage { mailbox }
        | Request::Get { mailbox, .. }
        | Request::GetMany { mailbox, .. }
        | Request::Del { mailbox, .. }
        | Request::DelMany { mailbox, .. } => mailbox,
        _ => return false,
    };
    if ctx.known.borrow().contains(mailbox) {
        return false;
    }
    add(&ctx.shared.counters.empty_fast_path, 1);
    match req {
        Request::List { .. } => {
            add(&ctx.shared.counters.lists, 1);
            let empty = ListPage {
                entries: Vec::new(),
                more: false,
                generation: Some(crate::index::GENERATION_EMPTY),
            };
            conn.queue(&empty.encode());
        }
        Request::Usage { .. } => conn.queue(
            &Usage {
                messages: 0,
                size_bytes: 0,
                generation: Some(crate::index::GENERATION_EMPTY),
            }
            .encode(),
        ),
        Request::DelMany { .. } => conn.queue(&Removed { count: 0 }.encode()),
        Request::GetMany { msgids, .. } => {
            for id in msgids {
                conn.queue(&err_line(ErrorCode::NotFound, id.as_str()));
            }
        }
        _ => conn.queue(&err_line(ErrorCode::NotFound, "no such message")),
    }
    true
}

async fn apply(ctx: &Ctx, conn: &mut Connection, req: Request) -> io::Result<()> {
    let c = &ctx.shared.counters;
    let max = ctx.limits.list_max_entries;
    if answer_unknown_mailbox(ctx, conn, &req) {
        return Ok(());
    }
    match req {
        Request::List { mailbox, after } => {
            add(&c.lists, 1);
            // The lines are written straight from the index: no copy of the
            // ids, no allocation per entry (a page can hold 50,000).
            let page = ctx
                .index
                .view(&mailbox, walker(ctx, &mailbox), |m| {
                    let mut lines = Vec::new();
                    let (n, more) = m.page_each(after.as_ref(), max, |id, size| {
                        ListEntry::write_line(id, size, &mut lines)
                    });
                    (lines, n, more, m.generation())
                })
                .await;
            match page {
                Ok((lines, n, more, generation)) => {
                    let block = ListPage::encode_lines(n as u64, more, Some(generation), &lines);
                    conn.wbuf.extend_from_slice(&block);
                }
                Err(e) => conn.queue(&io_err_line(&e)),
            }
        }
        Request::Get { mailbox, msgid } => {
            // Replies queued before this one go first; then one trip to the
            // blocking pool opens the file, writes the +OK line and sendfiles
            // the body (the socket is not touched by the executor meanwhile).
            conn.flush().await?;
            let sock = conn.stream.as_raw_fd();
            let timeout = Duration::from_millis(ctx.limits.idle_timeout_ms);
            let store = ctx.store.clone();
            let opened = glommio::executor()
                .spawn_blocking(move || -> io::Result<io::Result<u64>> {
                    let (file, size) = match store.open_message(&mailbox, &msgid) {
                        Ok(opened) => opened,
                        Err(e) => return Ok(Err(e)),
                    };
                    let header = BodyHeader { size_bytes: size }.encode();
                    crate::zerocopy::send_all(sock, header.as_bytes(), size > 0, timeout)?;
                    crate::zerocopy::sendfile_all(sock, &file, size, timeout)?;
                    Ok(Ok(size))
                })
                .await?;
            match opened {
                Ok(size) => {
                    add(&c.gets, 1);
                    add(&c.bytes_out, size);
                }
                Err(e) => conn.queue(&io_err_line(&e)),
            }
        }
        Request::GetMany { mailbox, msgids } => {
            // As GET, for the whole batch in one trip to the blocking pool:
            // each message's +OK line and body (sendfile), or its refusal.
            conn.flush().await?;
            let sock = conn.stream.as_raw_fd();
            let timeout = Duration::from_millis(ctx.limits.idle_timeout_ms);
            let store = ctx.store.clone();
            let (gets, bytes) = glommio::executor()
                .spawn_blocking(move || -> io::Result<(u64, u64)> {
                    let (mut gets, mut bytes) = (0, 0);
                    // Full segments only until the batch is sent (or fails).
                    let _cork = crate::zerocopy::Cork::on(sock);
                    // Open the whole batch and start every read first (bodies
                    // are O_DIRECT-written, not cached), then send in order.
                    let opened = store.open_messages(&mailbox, &msgids);
                    for (file, size) in opened.iter().flatten() {
                        crate::zerocopy::will_need(file, *size);
                    }
                    for (msgid, o) in msgids.iter().zip(opened) {
                        match o {
                            Ok((file, size)) => {
                                let header = BodyHeader { size_bytes: size }.encode();
                                crate::zerocopy::send_all(sock, header.as_bytes(), true, timeout)?;
                                crate::zerocopy::sendfile_all(sock, &file, size, timeout)?;
                                gets += 1;
                                bytes += size;
                            }
                            Err(e) => {
                                let line = if e.kind() == io::ErrorKind::NotFound {
                                    err_line(ErrorCode::NotFound, msgid.as_str())
                                } else {
                                    err_line(ErrorCode::Temp, &format!("{msgid}: {e}"))
                                };
                                crate::zerocopy::send_all(sock, line.as_bytes(), false, timeout)?;
                            }
                        }
                    }
                    Ok((gets, bytes))
                })
                .await?;
            add(&c.gets, gets);
            add(&c.bytes_out, bytes);
        }
        Request::Del { mailbox, msgid } => {
            if refuse_on_failed_disk(ctx, conn) {
                return Ok(());
            }
            let (m, id) = (mailbox.clone(), msgid.clone());
            let deleted = blocking(ctx, move |s| s.delete(&m, &id)).await;
            match &deleted {
                Ok(()) => ctx.index.apply(&mailbox, crate::index::Op::Remove(msgid)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    note_io_error(ctx, e);
                    ctx.index.invalidate(&mailbox)
                }
            }
            match deleted {
                Ok(()) => {
                    add(&c.dels, 1);
                    conn.queue(&Reply::ok(DELETED).encode());
                }
                Err(e) => conn.queue(&io_err_line(&e)),
            }
        }
        Request::DelMany { mailbox, msgids } => {
            if refuse_on_failed_disk(ctx, conn) {
                return Ok(());
            }
            let (m, ids) = (mailbox.clone(), msgids.clone());
            let deleted = blocking(ctx, move |s| s.delete_many(&m, &ids)).await;
            match &deleted {
                // Every id is gone now (missing ones were already).
                Ok(_) => {
                    for id in msgids {
                        ctx.index.apply(&mailbox, crate::index::Op::Remove(id));
                    }
                }
                Err(e) => {
                    note_io_error(ctx, e);
                    ctx.index.invalidate(&mailbox)
                }
            }
            match deleted {
                Ok((n, released)) => {
                    add(&c.dels, n);
                    conn.queue(&Removed { count: n }.encode());
                    // Their removal is durable: answer without waiting for
                    // their blocks to be freed (and discarded) on close.
                    if !released.is_empty() {
                        glommio::spawn_local(async move {
                            glommio::executor()
                                .spawn_blocking(move || drop(released))
                                .await
                        })
                        .detach();
                    }
                }
                Err(e) => conn.queue(&io_err_line(&e)),
            }
        }
        Request::Usage { mailbox } => {
            let usage = ctx
                .index
                .view(&mailbox, walker(ctx, &mailbox), |m| {
                    (m.usage(), m.generation())
                })
                .await;
            match usage {
                Ok(((messages, size_bytes), generation)) => conn.queue(
                    &Usage {
                        messages,
                        size_bytes,
                        generation: Some(generation),
                    }
                    .encode(),
                ),
                Err(e) => conn.queue(&io_err_line(&e)),
            }
        }
        Request::Nuke { mailbox } => match blocking(ctx, {
            let mailbox = mailbox.clone();
            move |s| s.nuke(&mailbox)
        })
        .await
        {
            Ok(n) => {
                ctx.index.invalidate(&mailbox);
                ctx.known.borrow_mut().remove(&mailbox);
                conn.queue(&Removed { count: n }.encode())
            }
            Err(e) => {
                ctx.index.invalidate(&mailbox);
                conn.queue(&io_err_line(&e))
            }
        },
        Request::Dir { after } => {
            match blocking(ctx, move |s| s.mailboxes_after(max, after.as_ref())).await {
                Ok(mailboxes) => conn.queue(&DirPage { mailboxes }.encode()),
                Err(e) => conn.queue(&io_err_line(&e)),
            }
        }
        Request::Status => {
            let s = &ctx.shared;
            let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let status = Status::of_backend(
                &s.name,
                s.mode(),
                l(&s.free_bytes),
                l(&s.total_bytes),
                l(&c.connections),
                l(&c.puts),
            );
            conn.queue(&status.encode());
        }
        Request::ReadOnly | Request::ReadWrite => {
            let on = matches!(req, Request::ReadOnly);
            let shared = ctx.shared.clone();
            match glommio::executor()
                .spawn_blocking(move || shared.set_operator_readonly(on))
                .await
            {
                Ok(()) => conn.queue(&Reply::ok(ctx.shared.mode()).encode()),
                Err(e) => conn.queue(&err_line(ErrorCode::Temp, &e.to_string())),
            }
        }
        Request::Ping => conn.queue(&Reply::ok(PONG).encode()),
        Request::Auth { .. } | Request::Put { .. } | Request::Quit => {
            unreachable!("answered by the connection state")
        }
    }
    Ok(())
}
