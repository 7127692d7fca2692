//! One SMTP session as a pure state machine: bytes in, replies out.
//!
//! The same machine speaks LMTP (RFC 2033, [`Session::new_lmtp`]): LHLO
//! instead of EHLO/HELO, and after the end of DATA one reply per accepted
//! recipient, in RCPT order, each decided on its own.
//!
//! No sockets, no clock, no database here. The I/O loop ([`crate::server`])
//! feeds whatever bytes it read to [`Session::feed`] and writes back what
//! it appended to `out`; everything that needs the outside world (recipient
//! look-up, storing the message) goes through the [`Delivery`] trait, which
//! tests replace with a mock. Commands are parsed by `smtp-proto` from
//! complete, bounded lines framed here; DATA goes through
//! [`DataReceiver`](crate::data::DataReceiver) and is streamed to the
//! delivery in chunks, never held whole.
//!
//! PIPELINING needs nothing special: every complete command in the input is
//! answered in order, and the caller flushes the replies when it has no more
//! input to feed.

use powermail_proto::MailboxName;
use smtp_proto::{Error as ParseError, Request, MAIL_SMTPUTF8};

use crate::data::DataReceiver;

/// Limits enforced by a session, each answered with a clear reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    /// Longest command line including CRLF (RFC 5321 says 512; extensions
    /// and SMTPUTF8 addresses need more). Beyond: `500 5.5.6`.
    pub line_max_bytes: usize,
    /// Largest message in stored bytes (Received header excluded). Beyond:
    /// `552 5.3.4`, at MAIL (SIZE=) or at the end of DATA. Keep it below
    /// the backends' `message_max_bytes` less a few KiB for the Received
    /// header, or big messages get a (retried) 451 instead of a 552.
    pub message_max_bytes: u64,
    /// Most accepted recipients per message. Beyond: `452 4.5.3`.
    pub recipients_max: usize,
    /// Most refused commands per session before `421` and close.
    pub errors_max: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            line_max_bytes: 2048,
            // pplistener's default limit (64 MiB) less room for the Received header.
            message_max_bytes: (64 << 20) - (64 << 10),
            recipients_max: 100,
            errors_max: 20,
        }
    }
}

/// A reply: code and text (the text starts with the enhanced status code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit SMTP code.
    pub code: u16,
    /// Text after the code.
    pub text: String,
}

impl Reply {
    /// A reply with code and text.
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            text: text.into(),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("{} {}\r\n", self.code, self.text).as_bytes());
    }
}

/// What the userbase said about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptVerdict {
    /// Accepted: deliver into this mailbox, or (`None`) only forward it,
    /// which the delivery arranged itself.
    Accept(Option<MailboxName>),
    /// No such mailbox: `550 5.1.1`.
    Unknown,
    /// The mailbox exists but is disabled: `550 5.2.1`.
    Disabled,
    /// The mailbox is over its quota: `552 5.2.2`.
    OverQuota,
    /// The userbase could not answer: `451 4.3.0`.
    TempFail,
    /// Refused with this reply (e.g. the forwarding relay's answer).
    Refuse(Reply),
}

/// The envelope of the message being received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The client's address (`ip:port`).
    pub client: String,
    /// The name given in EHLO/HELO.
    pub helo: String,
    /// True after EHLO (ESMTP), false after HELO.
    pub esmtp: bool,
    /// The session speaks LMTP (RFC 2033): the trace header says `with LMTP`.
    pub lmtp: bool,
    /// The reverse path (empty for the null sender `<>`).
    pub from: String,
    /// SMTPUTF8 was requested at MAIL.
    pub smtputf8: bool,
    /// The session runs over TLS (after STARTTLS).
    pub tls: bool,
    /// Accepted local mailboxes, each once, in RCPT order.
    pub rcpts: Vec<MailboxName>,
    /// Accepted recipients, forward-only ones included.
    pub accepted: usize,
}

/// The outside world of a session.
pub trait Delivery {
    /// Looks up one recipient address (as given, without `<>`).
    fn lookup(&mut self, address: &str) -> RcptVerdict;
    /// Starts storing a message for `env`. `Err` is the reply to DATA
    /// (e.g. `451 4.3.0` when fewer than K backends are available).
    fn begin(&mut self, env: &Envelope) -> Result<(), Reply>;
    /// The next stored bytes of the message (wire form).
    fn chunk(&mut self, bytes: &[u8]);
    /// The message ended: make it durable and return the reply to send.
    fn finish(&mut self) -> Reply;
    /// LMTP (RFC 2033): the message ended; make it durable and return one
    /// reply per accepted recipient, in RCPT order (`rcpts[i]` is the
    /// mailbox of the i-th accepted RCPT, `None` for a forward-only one),
    /// so that one recipient can be refused (e.g. its mailbox would go over
    /// its quota) while the others get their `250`. The default gives every
    /// recipient the reply of [`Delivery::finish`].
    fn finish_each(&mut self, rcpts: &[Option<MailboxName>]) -> Vec<Reply> {
        let r = self.finish();
        vec![r; rcpts.len()]
    }
    /// Abandons the message being stored (too big, connection lost).
    fn abort(&mut self);
    /// A transaction began: MAIL from `from` accepted. Any previous
    /// transaction is over.
    fn transaction_started(&mut self, _from: &str) {}
    /// Called for every reply the session sends (statistics).
    fn replied(&mut self, _code: u16) {}
}

/// What the caller does after [`Session::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// Send the replies, then close the connection.
    Close,
    /// Send the replies, start TLS, then call [`Session::tls_started`].
    /// Input after STARTTLS was discarded (RFC 3207 §5: no command may be
    /// smuggled from the plain-text phase into the TLS one).
    StartTls,
}

#[derive(Debug)]
enum Phase {
    /// Reading command lines.
    Command,
    /// Discarding the rest of an over-long command line.
    SkipLine,
    /// Receiving the message.
    Data {
        receiver: DataReceiver,
        size_bytes: u64,
        too_big: bool,
    },
    /// STARTTLS accepted: the rest of the plain-text input is ignored.
    StartTls,
    /// QUIT seen or fatal error: everything else is ignored.
    Closed,
}

/// One SMTP session.
#[derive(Debug)]
pub struct Session {
    hostname: String,
    limits: SessionLimits,
    phase: Phase,
    line: Vec<u8>,
    /// `Some` after EHLO/HELO.
    greeted: bool,
    /// `Some` between MAIL and the end of the transaction.
    mail: Option<Envelope>,
    helo: String,
    esmtp: bool,
    client: String,
    errors: u32,
    data_out: Vec<u8>,
    /// STARTTLS is offered (a certificate is configured).
    tls_offered: bool,
    /// TLS is running.
    tls_active: bool,
    /// LMTP (RFC 2033) instead of SMTP: LHLO, one reply per recipient.
    lmtp: bool,
    /// LMTP: the mailbox of every accepted RCPT of this transaction, in
    /// order (`None`: forward-only), one reply each after DATA.
    accepted_rcpts: Vec<Option<MailboxName>>,
}

impl Session {
    /// A new session for a client at `client` (`ip:port`), this server
    /// calling itself `hostname`.
    pub fn new(hostname: &str, client: &str, limits: SessionLimits) -> Session {
        Session {
            hostname: hostname.to_string(),
            limits,
            phase: Phase::Command,
            line: Vec::new(),
            greeted: false,
            mail: None,
            helo: String::new(),
            esmtp: false,
            client: client.to_string(),
            errors: 0,
            data_out: Vec::new(),
            tls_offered: false,
            tls_active: false,
            lmtp: false,
            accepted_rcpts: Vec::new(),
        }
    }

    /// A new LMTP (RFC 2033) session: the client greets with LHLO (HELO
    /// and EHLO are refused) and gets one reply per accepted recipient
    /// after the end of DATA, each from [`Delivery::finish_each`].
    pub fn new_lmtp(hostname: &str, client: &str, limits: SessionLimits) -> Session {
        Session {
            lmtp: true,
            ..Session::new(hostname, client, limits)
        }
    }

    /// Offers STARTTLS (the caller can run a TLS handshake).
    pub fn offer_starttls(&mut self) {
        self.tls_offered = true;
    }

    /// TLS is up after [`Flow::StartTls`]: the session starts over (RFC 3207
    /// §4.2: the client must say EHLO again).
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.greeted = false;
        self.mail = None;
        self.accepted_rcpts.clear();
        self.line.clear();
        self.phase = Phase::Command;
    }

    /// The `220` greeting.
    pub fn greeting<D: Delivery>(&mut self, d: &mut D, out: &mut Vec<u8>) {
        let kind = if self.lmtp { "LMTP" } else { "ESMTP" };
        let r = Reply::new(220, format!("{} {kind} powersmtp", self.hostname));
        self.send(d, out, r);
    }

    /// True while receiving a message (the I/O loop uses the DATA time-out).
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data { .. })
    }

    /// True between MAIL and the reply to the end of DATA: a transaction
    /// that a graceful stop lets finish.
    pub fn in_transaction(&self) -> bool {
        self.mail.is_some() || self.in_data()
    }

    /// The server is stopping (SIGTERM) and this session has no open
    /// transaction: `421 4.3.2` and close.
    pub fn shutting_down<D: Delivery>(&mut self, d: &mut D, out: &mut Vec<u8>) {
        self.lost(d);
        let r = Reply::new(
            421,
            format!("4.3.2 {} Service shutting down", self.hostname),
        );
        self.send(d, out, r);
    }

    /// The client went silent too long: `421 4.4.2` and close.
    pub fn timed_out<D: Delivery>(&mut self, d: &mut D, out: &mut Vec<u8>) {
        self.lost(d);
        let r = Reply::new(421, format!("4.4.2 {} Timeout, closing", self.hostname));
        self.send(d, out, r);
    }

    /// The connection is gone: abandon any message being received.
    pub fn lost<D: Delivery>(&mut self, d: &mut D) {
        if let Phase::Data { too_big: false, .. } = self.phase {
            d.abort();
        }
        self.phase = Phase::Closed;
    }

    /// Processes `input`, appending replies to `out`.
    pub fn feed<D: Delivery>(&mut self, input: &[u8], d: &mut D, out: &mut Vec<u8>) -> Flow {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match &mut self.phase {
                Phase::Closed | Phase::StartTls => break,
                Phase::Data { .. } => pos += self.feed_data(rest, d, out),
                Phase::SkipLine => match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        pos += i + 1;
                        self.phase = Phase::Command;
                        self.refuse(d, out, Reply::new(500, "5.5.6 Line too long"));
                    }
                    None => pos = input.len(),
                },
                Phase::Command => {
                    let room = self.limits.line_max_bytes - self.line.len();
                    match rest.iter().take(room).position(|&b| b == b'\n') {
                        Some(i) => {
                            self.line.extend_from_slice(&rest[..=i]);
                            pos += i + 1;
                            let line = std::mem::take(&mut self.line);
                            self.command(&line, d, out);
                        }
                        None if rest.len() < room => {
                            self.line.extend_from_slice(rest);
                            pos = input.len();
                        }
                        None => {
                            self.line.clear();
                            pos += room;
                            self.phase = Phase::SkipLine;
                        }
                    }
                }
            }
        }
        match self.phase {
            Phase::Closed => Flow::Close,
            Phase::StartTls => Flow::StartTls,
            _ => Flow::Continue,
        }
    }

    fn feed_data<D: Delivery>(&mut self, input: &[u8], d: &mut D, out: &mut Vec<u8>) -> usize {
        let Phase::Data {
            receiver,
            size_bytes,
            too_big,
        } = &mut self.phase
        else {
            unreachable!("feed_data outside DATA");
        };
        self.data_out.clear();
        let (used, ended) = receiver.ingest(input, &mut self.data_out);
        *size_bytes += self.data_out.len() as u64;
        if !*too_big {
            if *size_bytes > self.limits.message_max_bytes {
                *too_big = true;
                d.abort();
            } else {
                d.chunk(&self.data_out);
            }
        }
        if ended {
            let too_big = *too_big;
            self.phase = Phase::Command;
            self.mail = None;
            let rcpts = std::mem::take(&mut self.accepted_rcpts);
            let big = Reply::new(552, "5.3.4 Message size exceeds fixed maximum message size");
            if !self.lmtp {
                let reply = if too_big { big } else { d.finish() };
                self.send(d, out, reply);
            } else {
                let mut replies = if too_big {
                    vec![big; rcpts.len()]
                } else {
                    d.finish_each(&rcpts)
                };
                // Exactly one reply per accepted recipient, whatever the
                // delivery returned: the client counts them.
                let fill = Reply::new(451, "4.3.0 Internal error: no reply for this recipient");
                replies.resize(rcpts.len(), fill);
                for r in replies {
                    self.send(d, out, r);
                }
            }
        }
        used
    }

    fn send<D: Delivery>(&mut self, d: &mut D, out: &mut Vec<u8>, r: Reply) {
        d.replied(r.code);
        r.write(out);
    }

    /// A refusal that counts towards `errors_max`.
    fn refuse<D: Delivery>(&mut self, d: &mut D, out: &mut Vec<u8>, r: Reply) {
        self.send(d, out, r);
        self.errors += 1;
        if self.errors >= self.limits.errors_max {
            let r = Reply::new(421, "4.7.0 Too many errors, closing");
            self.send(d, out, r);
            self.phase = Phase::Closed;
        }
    }

    fn command<D: Delivery>(&mut self, line: &[u8], d: &mut D, out: &mut Vec<u8>) {
        if line.contains(&0) {
            // No command may carry a NUL (RFC 5321 4.1.1: printable text);
            // a HELO name with one would end up in the Received header.
            let r = Reply::new(500, "5.5.2 Syntax error, NUL byte in command");
            return self.refuse(d, out, r);
        }
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.contains(&b'\r') {
            // RFC 5321 2.3.8: CR only as part of CRLF. Read any other way
            // (dropped: `NO\rOP` would run NOOP) it smuggles one command
            // past a filter that reads another.
            let r = Reply::new(500, "5.5.2 Syntax error, bare CR in command");
            return self.refuse(d, out, r);
        }
        match Request::parse(&mut line.iter()) {
            Ok(req) => self.request(req, d, out),
            Err(e) => {
                let r = match e {
                    ParseError::UnknownCommand => {
                        Reply::new(500, "5.5.2 Syntax error, command unrecognized")
                    }
                    ParseError::InvalidSenderAddress => {
                        Reply::new(501, "5.1.7 Bad sender address syntax")
                    }
                    ParseError::InvalidRecipientAddress => {
                        Reply::new(501, "5.1.3 Bad recipient address syntax")
                    }
                    ParseError::UnsupportedParameter { param } => Reply::new(
                        555,
                        format!("5.5.4 Unsupported parameter {}", printable(&param)),
                    ),
                    ParseError::InvalidParameter { param } => {
                        Reply::new(501, format!("5.5.4 Invalid parameter {param}"))
                    }
                    ParseError::SyntaxError { syntax } => {
                        Reply::new(501, format!("5.5.4 Syntax: {syntax}"))
                    }
                    _ => Reply::new(501, "5.5.4 Syntax error"),
                };
                self.refuse(d, out, r);
            }
        }
    }

    fn request<D: Delivery>(&mut self, req: Request<String>, d: &mut D, out: &mut Vec<u8>) {
        let r = match req {
            Request::Ehlo { .. } | Request::Helo { .. } if self.lmtp => {
                return self.refuse(d, out, Reply::new(500, "5.5.1 This is LMTP, use LHLO"))
            }
            Request::Lhlo { host } if self.lmtp => return self.ehlo(host, true, d, out),
            Request::Ehlo { host } => return self.ehlo(host, true, d, out),
            Request::Helo { host } => return self.ehlo(host, false, d, out),
            Request::Mail { from } => {
                if !self.greeted {
                    let first = if self.lmtp { "LHLO" } else { "EHLO/HELO" };
                    let r = Reply::new(503, format!("5.5.1 Send {first} first"));
                    return self.refuse(d, out, r);
                }
                if self.mail.is_some() {
                    return self.refuse(d, out, Reply::new(503, "5.5.1 Nested MAIL command"));
                }
                if from.size as u64 > self.limits.message_max_bytes {
                    return self.refuse(
                        d,
                        out,
                        Reply::new(552, "5.3.4 Message size exceeds fixed maximum message size"),
                    );
                }
                self.mail = Some(Envelope {
                    client: self.client.clone(),
                    helo: self.helo.clone(),
                    esmtp: self.esmtp,
                    lmtp: self.lmtp,
                    from: from.address,
                    smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
                    tls: self.tls_active,
                    rcpts: Vec::new(),
                    accepted: 0,
                });
                self.accepted_rcpts.clear();
                d.transaction_started(&self.mail.as_ref().expect("just set").from);
                Reply::new(250, "2.1.0 Ok")
            }
            Request::Rcpt { to } => return self.rcpt(&to.address, d, out),
            Request::Data => return self.data(d, out),
            Request::Rset => {
                self.mail = None;
                self.accepted_rcpts.clear();
                Reply::new(250, "2.0.0 Ok")
            }
            Request::Noop { .. } => Reply::new(250, "2.0.0 Ok"),
            Request::Quit => {
                self.send(d, out, Reply::new(221, "2.0.0 Bye"));
                self.phase = Phase::Closed;
                return;
            }
            Request::Help { .. } => Reply::new(
                214,
                "2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY",
            ),
            Request::Vrfy { .. } => {
                Reply::new(252, "2.5.2 Cannot VRFY user, but will accept message")
            }
            Request::Lhlo { .. } => {
                return self.refuse(d, out, Reply::new(500, "5.5.1 This is SMTP, not LMTP"))
            }
            Request::StartTls if self.tls_offered && !self.tls_active => {
                self.send(d, out, Reply::new(220, "2.0.0 Ready to start TLS"));
                self.line.clear();
                self.phase = Phase::StartTls;
                return;
            }
            Request::StartTls
            | Request::Auth { .. }
            | Request::Bdat { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                return self.refuse(d, out, Reply::new(502, "5.5.1 Command not implemented"))
            }
        };
        self.send(d, out, r);
    }

    fn ehlo<D: Delivery>(&mut self, host: String, esmtp: bool, d: &mut D, out: &mut Vec<u8>) {
        self.greeted = true;
        self.helo = printable(&host);
        self.esmtp = esmtp;
        self.mail = None;
        self.accepted_rcpts.clear();
        if !esmtp {
            let r = Reply::new(250, self.hostname.clone());
            return self.send(d, out, r);
        }
        d.replied(250);
        let mut lines = vec![
            self.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.limits.message_max_bytes),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.tls_offered && !self.tls_active {
            lines.push("STARTTLS".into());
        }
        lines.push("SMTPUTF8".into());
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
    }

    fn rcpt<D: Delivery>(&mut self, address: &str, d: &mut D, out: &mut Vec<u8>) {
        let Some(mail) = &self.mail else {
            return self.refuse(d, out, Reply::new(503, "5.5.1 Need MAIL before RCPT"));
        };
        if mail.accepted >= self.limits.recipients_max {
            return self.send(d, out, Reply::new(452, "4.5.3 Too many recipients"));
        }
        if address.is_empty() {
            return self.refuse(
                d,
                out,
                Reply::new(501, "5.1.3 Bad recipient address syntax"),
            );
        }
        let r = match d.lookup(address) {
            RcptVerdict::Accept(mailbox) => {
                let mail = self.mail.as_mut().expect("checked above");
                mail.accepted += 1;
                if self.lmtp {
                    self.accepted_rcpts.push(mailbox.clone());
                }
                if let Some(m) = mailbox {
                    if !mail.rcpts.contains(&m) {
                        mail.rcpts.push(m);
                    }
                }
                Reply::new(250, "2.1.5 Ok")
            }
            RcptVerdict::Refuse(r) => r,
            RcptVerdict::Unknown => Reply::new(550, "5.1.1 No such user here"),
            RcptVerdict::Disabled => Reply::new(550, "5.2.1 Mailbox disabled"),
            RcptVerdict::OverQuota => Reply::new(552, "5.2.2 Mailbox full"),
            RcptVerdict::TempFail => {
                Reply::new(451, "4.3.0 Recipient lookup failed, try again later")
            }
        };
        self.send(d, out, r);
    }

    fn data<D: Delivery>(&mut self, d: &mut D, out: &mut Vec<u8>) {
        let Some(mail) = &self.mail else {
            return self.refuse(d, out, Reply::new(503, "5.5.1 Need MAIL before DATA"));
        };
        if mail.accepted == 0 {
            // RFC 2033 §4.2: with no accepted RCPT, LMTP's DATA fails with 503.
            let code = if self.lmtp { 503 } else { 554 };
            return self.refuse(d, out, Reply::new(code, "5.5.1 No valid recipients"));
        }
        match d.begin(mail) {
            Ok(()) => {
                self.phase = Phase::Data {
                    receiver: DataReceiver::new(),
                    size_bytes: 0,
                    too_big: false,
                };
                self.send(d, out, Reply::new(354, "End data with <CR><LF>.<CR><LF>"));
            }
            Err(r) => {
                self.mail = None;
                self.accepted_rcpts.clear();
                self.send(d, out, r);
            }
        }
    }
}

/// Keeps printable ASCII (and UTF-8 above it) of client-supplied text for
/// replies, headers and logs; control characters become `?`.
pub fn printable(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests;
