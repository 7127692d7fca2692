//! One POP3 session as a state machine: AUTHORIZATION, TRANSACTION, UPDATE
//! (RFC 1939 §3), with CAPA (RFC 2449) and AUTH PLAIN (RFC 5034).
//!
//! The session owns the protocol — what is valid in which state, message
//! numbering, deletion marks, the exact reply texts and response codes, the
//! framing of multi-line replies — and nothing else. Everything that needs
//! the network, the disk or a clock is behind the [`Store`] trait: checking a
//! login (and listing the mailbox), fetching one message, committing the
//! deletions. The server implements it over the userbase and the backends;
//! the tests implement it in memory and drive the session with byte chunks.

use std::io::{self, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

pub use powermail_proto::SpliceSink;

use crate::command::{Command, CommandError};
use crate::line::Line;
use crate::sasl;

/// One message of the listing, as the store found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Unique id: the message id, also the UIDL.
    pub uid: String,
    /// Size in bytes, as stored (wire form).
    pub size_bytes: u64,
}

/// One message of a [`Listing`] as the session reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Unique id: the message id, also the UIDL.
    pub uid: &'a str,
    /// Size in bytes, as stored (wire form).
    pub size_bytes: u64,
}

/// A mailbox listing, oldest first, shared rather than copied: the server
/// hands the session the merged listing it keeps (a 50,000-message mailbox
/// is not turned into 50,000 new strings at every login).
pub trait Listing: Send + Sync + std::fmt::Debug {
    /// How many messages.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Message `index` (below [`len`](Self::len)).
    fn entry(&self, index: usize) -> Entry<'_>;
}

impl Listing for Vec<Listed> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn entry(&self, index: usize) -> Entry<'_> {
        let m = &self[index];
        Entry {
            uid: &m.uid,
            size_bytes: m.size_bytes,
        }
    }
}

/// What a login attempt came to.
#[derive(Debug, Clone)]
pub enum AuthResult {
    /// Logged in and locked; the mailbox listing, oldest first.
    Ok(Arc<dyn Listing>),
    /// Unknown user or wrong password: `-ERR [AUTH]`.
    Bad,
    /// Too many recent failures from this client or for this account.
    Locked,
    /// Another session holds the mailbox: `-ERR [IN-USE]`.
    InUse,
    /// The userbase could not answer: `-ERR [SYS/TEMP]`.
    Unavailable,
    /// No backend answered for the mailbox in time (all down, or all slower
    /// than `listing_timeout_ms`): `-ERR [SYS/TEMP]`, never an empty maildrop.
    StorageUnavailable,
    /// Not in the userbase, but the fallback (legacy) server accepted the
    /// login: its reply line (without CRLF) goes to the client, then the I/O
    /// loop relays bytes both ways until either side closes.
    Proxied(String),
}

impl PartialEq for AuthResult {
    fn eq(&self, other: &AuthResult) -> bool {
        use AuthResult::*;
        match (self, other) {
            (Ok(a), Ok(b)) => a.len() == b.len() && (0..a.len()).all(|i| a.entry(i) == b.entry(i)),
            (Bad, Bad)
            | (Locked, Locked)
            | (InUse, InUse)
            | (Unavailable, Unavailable)
            | (StorageUnavailable, StorageUnavailable) => true,
            (Proxied(a), Proxied(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for AuthResult {}

/// Why a message could not be sent.
#[derive(Debug)]
pub enum RetrieveError {
    /// No backend holds it any more.
    NotFound,
    /// Every holder failed before sending anything; try later.
    Unavailable,
    /// Bytes were already sent when the source failed: the session must end.
    Broken(io::Error),
}

/// The effects a session needs; see the module documentation.
pub trait Store {
    /// Checks `user` (as typed: `name`, `name@domain` or `name%domain`) and
    /// `password`; on success locks the mailbox and lists it.
    fn authenticate(&mut self, user: &str, password: &str) -> AuthResult;
    /// A login the session refused without asking [`Store::authenticate`]:
    /// a field held CR, LF or NUL. It counts as a failed guess (throttle,
    /// counters) for `user` as typed; `user` is hostile and must be escaped
    /// wherever it is written.
    fn refuse_login(&mut self, user: &str);
    /// Writes the stored bytes of listing entry `index` to `out` (zero copy
    /// where `out` can take spliced bytes: see [`SpliceSink`]).
    fn retrieve(&mut self, index: usize, out: &mut dyn SpliceSink) -> Result<(), RetrieveError>;
    /// Deletes the listing entries `deleted` (UPDATE state). `Err` text is
    /// sent to the client after `-ERR [SYS/TEMP] `.
    fn commit(&mut self, deleted: &[usize]) -> Result<(), String>;
    /// Releases the mailbox lock: called at QUIT before the reply is sent,
    /// so a client that reconnects at once finds the mailbox free.
    fn release(&mut self);
}

/// Session limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Refused commands before the session is closed.
    pub errors_max: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits { errors_max: 20 }
    }
}

/// What the I/O loop should do after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The command's name, for latency statistics.
    pub op: &'static str,
    /// Close the connection now (the reply is written).
    pub close: bool,
    /// STLS was accepted: start the TLS handshake now, after discarding any
    /// input that followed the command (RFC 2595 §4), then call
    /// [`Session::tls_started`].
    pub starttls: bool,
    /// The login was handed to the fallback server: relay bytes from now on.
    pub proxy: bool,
}

/// Counters of one session, for its log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Messages in the listing at login.
    pub messages: usize,
    /// RETR (and TOP) that succeeded.
    pub retrieved: u64,
    /// Of which TOP.
    pub top: u64,
    /// Bytes of message data sent (RETR and TOP).
    pub bytes_sent: u64,
    /// Messages deleted at QUIT.
    pub deleted: usize,
    /// Failed login attempts.
    pub auth_failures: u32,
}

#[derive(Debug)]
enum State {
    Authorization {
        /// Name given by USER, waiting for PASS.
        user: Option<String>,
        /// AUTH PLAIN sent `+ `; the next line is the response.
        sasl_pending: bool,
    },
    Transaction,
    Closed,
}

/// The `IMPLEMENTATION` capability.
pub const IMPLEMENTATION: &str = concat!("powerpop-", env!("CARGO_PKG_VERSION"));

/// One POP3 session; see the module documentation.
#[derive(Debug)]
pub struct Session<S: Store> {
    store: S,
    limits: SessionLimits,
    state: State,
    messages: Arc<dyn Listing>,
    deleted: Vec<bool>,
    errors: u32,
    user: Option<String>,
    counters: SessionCounters,
    /// STLS may be offered (a certificate is configured).
    stls_offered: bool,
    /// The connection is encrypted (after STLS or on the implicit-TLS port).
    tls_active: bool,
    /// Plain-text logins (USER/PASS, AUTH PLAIN) are refused until TLS is up.
    plaintext_refused: bool,
    /// The last login went to the fallback server.
    proxied: bool,
}

fn no_such_message() -> &'static str {
    "-ERR no such message\r\n"
}

impl<S: Store> Session<S> {
    /// A new session in the AUTHORIZATION state.
    pub fn new(store: S, limits: SessionLimits) -> Session<S> {
        Session {
            store,
            limits,
            state: State::Authorization {
                user: None,
                sasl_pending: false,
            },
            messages: Arc::new(Vec::<Listed>::new()),
            deleted: Vec::new(),
            errors: 0,
            user: None,
            counters: SessionCounters::default(),
            stls_offered: false,
            tls_active: false,
            plaintext_refused: false,
            proxied: false,
        }
    }

    /// Offers STLS (RFC 2595) in CAPA and accepts it before login.
    pub fn offer_stls(&mut self) {
        self.stls_offered = true;
    }

    /// Refuses plain-text logins (USER/PASS, AUTH PLAIN) until TLS is up,
    /// with `-ERR [AUTH]`, and stops advertising them in CAPA: passwords
    /// must not cross the network in the clear (docs/SECURITY.md).
    pub fn refuse_plaintext_auth(&mut self) {
        self.plaintext_refused = true;
    }

    /// Whether a plain-text login would be refused now.
    fn plaintext_blocked(&self) -> bool {
        self.plaintext_refused && !self.tls_active
    }

    /// The connection is now encrypted: STLS is no longer offered and, as
    /// RFC 2595 §4 requires, anything the client said before is forgotten.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.state = State::Authorization {
            user: None,
            sasl_pending: false,
        };
    }

    /// True on an encrypted connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The greeting line to send first.
    pub fn greeting(&self) -> &'static str {
        "+OK powerpop ready\r\n"
    }

    /// The user that logged in (as typed), if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// True once logged in (TRANSACTION or later).
    pub fn authenticated(&self) -> bool {
        self.user.is_some()
    }

    /// True after QUIT, a fatal error or too many errors.
    pub fn closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The session's counters.
    pub fn counters(&self) -> &SessionCounters {
        &self.counters
    }

    /// The store (e.g. to release its lock).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Handles one line from the client, writing the whole reply to `out`.
    /// An `Err` is an I/O error on `out`: the connection is gone.
    pub fn handle<W: SpliceSink>(&mut self, line: Line, out: &mut W) -> io::Result<Step> {
        let step = self.dispatch(line, out)?;
        if self.errors >= self.limits.errors_max && !self.closed() {
            out.write_all(b"-ERR too many errors, closing\r\n")?;
            self.state = State::Closed;
        }
        Ok(Step {
            close: self.closed() && !self.proxied,
            proxy: self.proxied,
            ..step
        })
    }

    fn step(op: &'static str) -> Step {
        Step {
            op,
            close: false,
            starttls: false,
            proxy: false,
        }
    }

    fn refuse<W: SpliceSink>(&mut self, out: &mut W, text: &str) -> io::Result<()> {
        self.errors += 1;
        write!(out, "-ERR {text}\r\n")
    }

    fn dispatch<W: SpliceSink>(&mut self, line: Line, out: &mut W) -> io::Result<Step> {
        if let State::Closed = self.state {
            // After QUIT (or a proxied login, or too many errors) nothing
            // is answered and nothing is done, whatever the line holds.
            return Ok(Step {
                op: "error",
                close: true,
                starttls: false,
                proxy: false,
            });
        }
        let line = match line {
            Line::Complete(l) => l,
            Line::TooLong => {
                self.cancel_sasl();
                self.refuse(out, "line too long")?;
                return Ok(Self::step("error"));
            }
        };
        if line.contains(&0) {
            // No POP3 command or SASL response has a NUL; it would only
            // truncate names further down (C strings, logs).
            self.cancel_sasl();
            self.refuse(out, "NUL byte in command")?;
            return Ok(Self::step("error"));
        }
        if let State::Authorization {
            sasl_pending: true, ..
        } = self.state
        {
            self.cancel_sasl();
            return self.sasl_response(&line, out).map(|_| Self::step("AUTH"));
        }
        let cmd = match Command::parse(&line) {
            Ok(c) => c,
            Err(CommandError::Unknown) => {
                self.refuse(out, "unknown command")?;
                return Ok(Self::step("error"));
            }
            Err(CommandError::Syntax(why)) => {
                self.refuse(out, why)?;
                return Ok(Self::step("error"));
            }
        };
        match self.state {
            State::Authorization { .. } => self.authorization(cmd, out),
            State::Transaction => self.transaction(cmd, out),
            State::Closed => Ok(Step {
                op: "error",
                close: true,
                starttls: false,
                proxy: false,
            }),
        }
    }

    fn cancel_sasl(&mut self) {
        if let State::Authorization { sasl_pending, .. } = &mut self.state {
            *sasl_pending = false;
        }
    }

    fn capa<W: SpliceSink>(&self, out: &mut W) -> io::Result<()> {
        out.write_all(b"+OK capability list follows\r\n")?;
        if !self.authenticated() && !self.plaintext_blocked() {
            out.write_all(b"USER\r\nSASL PLAIN\r\n")?;
        }
        if !self.authenticated() && self.stls_offered && !self.tls_active {
            out.write_all(b"STLS\r\n")?;
        }
        write!(
            out,
            "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nTOP\r\nUIDL\r\n\
             IMPLEMENTATION {IMPLEMENTATION}\r\n.\r\n"
        )
    }

    fn authorization<W: SpliceSink>(&mut self, cmd: Command, out: &mut W) -> io::Result<Step> {
        let op = match cmd {
            Command::Capa => {
                self.capa(out)?;
                "CAPA"
            }
            Command::Noop => {
                // Not valid before login (RFC 1939), but harmless.
                out.write_all(b"+OK\r\n")?;
                "NOOP"
            }
            Command::Quit => {
                out.write_all(b"+OK powerpop signing off\r\n")?;
                self.state = State::Closed;
                "QUIT"
            }
            Command::User(_) | Command::Pass(_) | Command::Auth { .. }
                if self.plaintext_blocked() =>
            {
                self.refuse(
                    out,
                    "[AUTH] plain-text login disallowed on an unencrypted connection, use STLS",
                )?;
                "AUTH"
            }
            Command::User(name) => {
                self.state = State::Authorization {
                    user: Some(name),
                    sasl_pending: false,
                };
                out.write_all(b"+OK send PASS\r\n")?;
                "USER"
            }
            Command::Pass(password) => {
                let user = match &mut self.state {
                    State::Authorization { user, .. } => user.take(),
                    _ => None,
                };
                match user {
                    Some(user) => self.login(&user, &password, out)?,
                    None => self.refuse(out, "USER first")?,
                }
                "PASS"
            }
            Command::Auth { mechanism, initial } => {
                self.auth(mechanism, initial, out)?;
                "AUTH"
            }
            Command::Apop => {
                self.refuse(out, "APOP not supported, use USER/PASS or AUTH PLAIN")?;
                "APOP"
            }
            Command::Stls if self.stls_offered && !self.tls_active => {
                out.write_all(b"+OK begin TLS negotiation\r\n")?;
                return Ok(Step {
                    op: "STLS",
                    close: false,
                    starttls: true,
                    proxy: false,
                });
            }
            Command::Stls => {
                self.refuse(out, "STLS not available")?;
                "STLS"
            }
            _ => {
                self.refuse(out, "not logged in")?;
                "error"
            }
        };
        Ok(Self::step(op))
    }

    fn auth<W: SpliceSink>(
        &mut self,
        mechanism: Option<String>,
        initial: Option<String>,
        out: &mut W,
    ) -> io::Result<()> {
        match (mechanism.as_deref(), initial) {
            // The pre-RFC 5034 listing form some clients still send.
            (None, _) => out.write_all(b"+OK\r\nPLAIN\r\n.\r\n"),
            (Some("PLAIN"), Some(initial)) => self.sasl_response(initial.as_bytes(), out),
            (Some("PLAIN"), None) => {
                self.state = State::Authorization {
                    user: None,
                    sasl_pending: true,
                };
                out.write_all(b"+ \r\n")
            }
            (Some(_), _) => self.refuse(out, "unsupported SASL mechanism"),
        }
    }

    fn sasl_response<W: SpliceSink>(&mut self, response: &[u8], out: &mut W) -> io::Result<()> {
        if response == b"*" {
            return self.refuse(out, "authentication cancelled");
        }
        match sasl::decode_plain(response) {
            Ok((user, password)) => self.login(&user, &password, out),
            Err(sasl::PlainError::LineBreak(user)) => self.refuse_hostile_login(&user, out),
            Err(sasl::PlainError::Malformed) => {
                self.counters.auth_failures += 1;
                self.refuse(out, "[AUTH] malformed PLAIN response")
            }
        }
    }

    fn login<W: SpliceSink>(&mut self, user: &str, password: &str, out: &mut W) -> io::Result<()> {
        // The one field check for every way in (USER/PASS, AUTH PLAIN): a
        // field that could end a line here could start a command on the
        // fallback server or a line in the log. Refused as a failed guess.
        if !(sasl::is_line_safe(user) && sasl::is_line_safe(password)) {
            return self.refuse_hostile_login(user, out);
        }
        let reply = match self.store.authenticate(user, password) {
            AuthResult::Ok(listing) => {
                let total: u64 = (0..listing.len())
                    .map(|i| listing.entry(i).size_bytes)
                    .sum();
                self.deleted = vec![false; listing.len()];
                self.counters.messages = listing.len();
                self.messages = listing;
                self.user = Some(user.to_string());
                self.state = State::Transaction;
                return write!(
                    out,
                    "+OK maildrop has {} messages ({total} octets)\r\n",
                    self.messages.len()
                );
            }
            AuthResult::Proxied(reply) => {
                self.user = Some(user.to_string());
                self.proxied = true;
                self.state = State::Closed;
                return write!(out, "{reply}\r\n");
            }
            AuthResult::Bad => "[AUTH] authentication failed",
            AuthResult::Locked => "[AUTH] too many failed logins, try again later",
            AuthResult::InUse => "[IN-USE] mailbox in use by another session",
            AuthResult::Unavailable => "[SYS/TEMP] user database unavailable, try again later",
            AuthResult::StorageUnavailable => {
                "[SYS/TEMP] mailbox storage unavailable, try again later"
            }
        };
        self.counters.auth_failures += 1;
        self.refuse(out, reply)
    }

    /// Refuses a login whose fields hold CR, LF or NUL, counted as a failed
    /// guess, with the same reply a wrong password gets.
    fn refuse_hostile_login<W: SpliceSink>(&mut self, user: &str, out: &mut W) -> io::Result<()> {
        self.store.refuse_login(user);
        self.counters.auth_failures += 1;
        self.refuse(out, "[AUTH] authentication failed")
    }

    /// Maps a client message number to a live listing index.
    fn index(&self, n: u64) -> Option<usize> {
        let i = usize::try_from(n).ok()?.checked_sub(1)?;
        (i < self.messages.len() && !self.deleted[i]).then_some(i)
    }

    fn live(&self) -> impl Iterator<Item = (usize, Entry<'_>)> {
        (0..self.messages.len())
            .filter(|i| !self.deleted[*i])
            .map(|i| (i, self.messages.entry(i)))
    }

    fn maildrop(&self) -> (usize, u64) {
        self.live()
            .fold((0, 0), |(n, b), (_, m)| (n + 1, b + m.size_bytes))
    }

    fn transaction<W: SpliceSink>(&mut self, cmd: Command, out: &mut W) -> io::Result<Step> {
        let op = match cmd {
            Command::Capa => {
                self.capa(out)?;
                "CAPA"
            }
            Command::Noop => {
                out.write_all(b"+OK\r\n")?;
                "NOOP"
            }
            Command::Stat => {
                let (n, bytes) = self.maildrop();
                write!(out, "+OK {n} {bytes}\r\n")?;
                "STAT"
            }
            Command::List(arg) => {
                self.list(arg, out, |m, line| {
                    line.extend_from_slice(itoa::Buffer::new().format(m.size_bytes).as_bytes())
                })?;
                "LIST"
            }
            Command::Uidl(arg) => {
                self.list(arg, out, |m, line| line.extend_from_slice(m.uid.as_bytes()))?;
                "UIDL"
            }
            Command::Dele(n) => {
                match self.index(n) {
                    Some(i) => {
                        self.deleted[i] = true;
                        write!(out, "+OK message {n} deleted\r\n")?;
                    }
                    None => self.refuse(out, "no such message")?,
                }
                "DELE"
            }
            Command::Rset => {
                self.deleted.iter_mut().for_each(|d| *d = false);
                let (n, bytes) = self.maildrop();
                write!(out, "+OK maildrop has {n} messages ({bytes} octets)\r\n")?;
                "RSET"
            }
            Command::Retr(n) => {
                self.send(n, None, out)?;
                "RETR"
            }
            Command::Top(n, lines) => {
                self.send(n, Some(lines), out)?;
                "TOP"
            }
            Command::Quit => {
                self.update(out)?;
                "QUIT"
            }
            Command::User(_) | Command::Pass(_) | Command::Auth { .. } | Command::Apop => {
                self.refuse(out, "already logged in")?;
                "error"
            }
            Command::Stls => {
                self.refuse(out, "STLS only before login")?;
                "STLS"
            }
        };
        Ok(Self::step(op))
    }

    fn list<W: SpliceSink>(
        &mut self,
        arg: Option<u64>,
        out: &mut W,
        column: impl Fn(Entry<'_>, &mut Vec<u8>),
    ) -> io::Result<()> {
        match arg {
            Some(n) => match self.index(n) {
                Some(i) => {
                    let mut line = format!("+OK {n} ").into_bytes();
                    column(self.messages.entry(i), &mut line);
                    line.extend_from_slice(b"\r\n");
                    out.write_all(&line)
                }
                None => self.refuse(out, "no such message"),
            },
            None => {
                // Lines written into one buffer, handed over 64 KiB at a
                // time: a 50,000-message listing is ~20 writes, no
                // allocation or formatting machinery per line.
                const CHUNK_BYTES: usize = 64 * 1024;
                let (n, bytes) = self.maildrop();
                let mut block = Vec::with_capacity(CHUNK_BYTES + 256);
                write!(block, "+OK {n} messages ({bytes} octets)\r\n")?;
                let mut number = itoa::Buffer::new();
                for (i, m) in self.live() {
                    block.extend_from_slice(number.format(i + 1).as_bytes());
                    block.push(b' ');
                    column(m, &mut block);
                    block.extend_from_slice(b"\r\n");
                    if block.len() >= CHUNK_BYTES {
                        out.write_all(&block)?;
                        block.clear();
                    }
                }
                block.extend_from_slice(b".\r\n");
                out.write_all(&block)
            }
        }
    }

    fn send<W: SpliceSink>(&mut self, n: u64, top: Option<u64>, out: &mut W) -> io::Result<()> {
        let Some(i) = self.index(n) else {
            self.errors += 1;
            return out.write_all(no_such_message().as_bytes());
        };
        let header = match top {
            None => format!("+OK {} octets\r\n", self.messages.entry(i).size_bytes),
            Some(_) => "+OK top of message follows\r\n".to_string(),
        };
        let mut body = BodyWriter::new(out, header, top);
        match self.store.retrieve(i, &mut body) {
            Ok(()) => {
                let sent = body.finish()?;
                self.counters.retrieved += 1;
                self.counters.top += u64::from(top.is_some());
                self.counters.bytes_sent += sent;
                Ok(())
            }
            Err(RetrieveError::Broken(e)) => {
                // Part of the message is on the wire: nothing sensible can
                // follow it, so end the session (without UPDATE).
                log::warn!(
                    "message {} broke off mid-stream: {e}",
                    self.messages.entry(i).uid
                );
                self.state = State::Closed;
                Ok(())
            }
            Err(RetrieveError::NotFound) => {
                drop(body);
                self.refuse(out, "message no longer available")
            }
            Err(RetrieveError::Unavailable) => {
                drop(body);
                self.refuse(out, "[SYS/TEMP] message temporarily unavailable")
            }
        }
    }

    fn update<W: SpliceSink>(&mut self, out: &mut W) -> io::Result<()> {
        let deleted: Vec<usize> = (0..self.messages.len())
            .filter(|&i| self.deleted[i])
            .collect();
        self.state = State::Closed;
        let result = if deleted.is_empty() {
            Ok(())
        } else {
            self.store.commit(&deleted)
        };
        self.store.release();
        match result {
            Ok(()) => {
                self.counters.deleted = deleted.len();
                let (n, _) = self.maildrop();
                write!(out, "+OK powerpop signing off ({n} messages left)\r\n")
            }
            Err(why) => write!(out, "-ERR [SYS/TEMP] {why}\r\n"),
        }
    }
}

/// Frames one message for RETR or TOP on its way to the client: sends the
/// `+OK` line before the first byte (so a holder failing before any byte can
/// be replaced by the next), cuts TOP after the blank line and `n` body
/// lines, and completes a last line lacking its CRLF. The bytes are stored
/// dot-stuffed already, so they pass through unchanged.
struct BodyWriter<'a, W: SpliceSink> {
    out: &'a mut W,
    header: Option<String>,
    /// Body lines still wanted (TOP); `None` for the whole message.
    lines_left: Option<u64>,
    in_headers: bool,
    /// Bytes of the current line so far, and whether its first was CR.
    line_bytes: u64,
    first_was_cr: bool,
    /// TOP has everything it wants; the rest is drained and dropped.
    done: bool,
    last_two: [u8; 2],
    written: u64,
}

impl<'a, W: SpliceSink> BodyWriter<'a, W> {
    fn new(out: &'a mut W, header: String, top: Option<u64>) -> Self {
        BodyWriter {
            out,
            header: Some(header),
            lines_left: top,
            in_headers: true,
            line_bytes: 0,
            first_was_cr: false,
            done: false,
            last_two: [0, 0],
            written: 0,
        }
    }

    /// How much of `buf` TOP still wants (all of it for RETR).
    fn cut(&mut self, buf: &[u8]) -> usize {
        let Some(mut left) = self.lines_left else {
            return buf.len();
        };
        for (i, &b) in buf.iter().enumerate() {
            if b != b'\n' {
                if self.line_bytes == 0 {
                    self.first_was_cr = b == b'\r';
                }
                self.line_bytes += 1;
                continue;
            }
            let blank = self.line_bytes == 0 || (self.line_bytes == 1 && self.first_was_cr);
            self.line_bytes = 0;
            if self.in_headers {
                if blank {
                    self.in_headers = false;
                    if left == 0 {
                        self.done = true;
                        return i + 1;
                    }
                }
            } else {
                left -= 1;
                self.lines_left = Some(left);
                if left == 0 {
                    self.done = true;
                    return i + 1;
                }
            }
        }
        buf.len()
    }

    fn emit(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(h) = self.header.take() {
            self.out.write_all(h.as_bytes())?;
        }
        if data.is_empty() {
            return Ok(());
        }
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.last_two = match data {
            [.., a, b] => [*a, *b],
            [b] => [self.last_two[1], *b],
            [] => self.last_two,
        };
        Ok(())
    }

    /// Ends the reply: header if nothing was sent, CRLF if the last line
    /// lacks one, then the terminating `.`. Returns the message bytes sent.
    fn finish(mut self) -> io::Result<u64> {
        self.emit(&[])?;
        if self.written > 0 && self.last_two != *b"\r\n" {
            self.out.write_all(b"\r\n")?;
        }
        self.out.write_all(b".\r\n")?;
        Ok(self.written)
    }
}

/// The error a TOP body writer returns once it has all the lines it wants:
/// the store stops reading the message (see [`is_enough`]).
#[derive(Debug)]
struct Enough;

impl std::fmt::Display for Enough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TOP has all the lines it wants")
    }
}

impl std::error::Error for Enough {}

/// True when a write to the `out` of [`Store::retrieve`] failed only because
/// TOP needs no more bytes: the store should stop reading the message,
/// count it as sent (and not reuse a connection left mid-message).
pub fn is_enough(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Enough>())
}

impl<W: SpliceSink> Write for BodyWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.done {
            let n = self.cut(buf);
            self.emit(&buf[..n])?;
        }
        if self.done {
            return Err(io::Error::other(Enough));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A whole message (RETR, not TOP) may go to the client zero copy: the
/// `+OK` line and anything buffered are flushed first; the bytes spliced are
/// counted as sent. The store writes the message's last bytes through
/// [`Write`], so the check for a final CRLF still sees them.
impl<W: SpliceSink> SpliceSink for BodyWriter<'_, W> {
    fn can_splice(&mut self) -> io::Result<bool> {
        if self.lines_left.is_some() || self.done {
            return Ok(false);
        }
        if let Some(h) = self.header.take() {
            self.out.write_all(h.as_bytes())?;
        }
        self.out.can_splice()
    }

    fn splice_from(&mut self, pipe: RawFd, len: usize) -> io::Result<usize> {
        let moved = self.out.splice_from(pipe, len)?;
        self.written += moved as u64;
        Ok(moved)
    }
}

/// `user%domain` → `user@domain`; a bare `user` takes `default_domain`
/// (the virtual server's); `None` when a bare name has no domain to take.
pub fn qualify(user: &str, default_domain: Option<&str>) -> Option<String> {
    if user.contains('@') {
        return Some(user.to_string());
    }
    if let Some((local, domain)) = user.rsplit_once('%') {
        return Some(format!("{local}@{domain}"));
    }
    default_domain.map(|d| format!("{user}@{d}"))
}

#[cfg(test)]
mod tests;
