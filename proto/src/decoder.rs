//! The server side's incremental decoder: bytes in, events out.
//!
//! It owns no socket and no clock, so it can be unit-tested with any split of
//! the input and fuzzed. Memory is bounded by [`Limits`]: the decoder never
//! buffers input itself (the caller keeps its read buffer and drops what the
//! decoder says it consumed), and body bytes are handed out as slices of the
//! caller's buffer, so a 20 MiB message is never held whole.
//!
//! PUT body framing: after the header and its mailbox lines, the client sends
//! chunks `<len>\r\n<len bytes>`, ended by `0\r\n` (store it) or `ABORT\r\n`
//! (forget it). Chunked framing lets a frontend stream SMTP DATA before it
//! knows the message's size.

use crate::names::{MailboxName, MessageId};
use crate::request::{parse_line, Line, Request, RequestError};

/// Bounds on what one connection may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest command or mailbox line, without its line ending.
    pub line_max_bytes: usize,
    /// Most mailboxes in one PUT.
    pub mailboxes_per_put_max: usize,
    /// Largest body chunk.
    pub chunk_max_bytes: usize,
    /// Largest message body.
    pub message_max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            line_max_bytes: 1024,
            mailboxes_per_put_max: 10_000,
            chunk_max_bytes: 1 << 20,
            message_max_bytes: 64 << 20,
        }
    }
}

/// What the decoder found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete request other than PUT.
    Request(Request),
    /// A line that was refused; answer `-ERR` and go on.
    Invalid(RequestError),
    /// A PUT header with all its mailbox lines. Its body follows either way:
    /// on `Err` the server discards the body and answers `-ERR` at its end.
    PutStart(Result<(MessageId, Vec<MailboxName>), RequestError>),
    /// The next bytes of the PUT body.
    Body(&'a [u8]),
    /// The body is complete: store it.
    PutEnd,
    /// The client gave up on this PUT: forget it.
    PutAbort,
}

/// Errors after which the stream cannot be resynchronised: answer and close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    /// No line end within the line limit.
    #[error("line too long")]
    LineTooLong,
    /// A chunk header that is not a length, `0` or `ABORT`.
    #[error("bad chunk header")]
    BadChunk,
    /// A chunk over the chunk limit.
    #[error("chunk too big")]
    ChunkTooBig,
    /// The body went over the message size limit.
    #[error("message too big")]
    MessageTooBig,
    /// A PUT line whose mailbox count is unusable: its lines cannot be skipped.
    #[error("bad PUT: {0}")]
    BadPut(RequestError),
}

#[derive(Debug)]
enum State {
    Command,
    PutMailboxes {
        msgid: Result<MessageId, RequestError>,
        remaining: usize,
        mailboxes: Vec<MailboxName>,
    },
    ChunkHeader {
        body_bytes: u64,
    },
    ChunkData {
        remaining: usize,
        body_bytes: u64,
    },
}

/// Incremental decoder of one connection's requests.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    state: State,
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            state: State::Command,
        }
    }

    /// Whether the decoder is inside a PUT (between its header and its end).
    pub fn in_put(&self) -> bool {
        !matches!(self.state, State::Command)
    }

    /// Decodes at most one line or one run of body bytes from the front of
    /// `buf`.
    ///
    /// Returns how many bytes of `buf` were consumed (the caller drops them)
    /// and the event they completed, if any. `(None, 0)` means "read more";
    /// `(None, n)` means progress without an event yet (call again).
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<(Option<Event<'a>>, usize), Fatal> {
        if let State::ChunkData {
            remaining,
            body_bytes,
        } = &mut self.state
        {
            let n = (*remaining).min(buf.len());
            if n == 0 {
                return Ok((None, 0));
            }
            *remaining -= n;
            if *remaining == 0 {
                self.state = State::ChunkHeader {
                    body_bytes: *body_bytes,
                };
            }
            return Ok((Some(Event::Body(&buf[..n])), n));
        }
        let Some((line, used)) = self.take_line(buf)? else {
            return Ok((None, 0));
        };
        let event = match std::mem::replace(&mut self.state, State::Command) {
            State::Command => self.command(line)?,
            State::PutMailboxes {
                msgid,
                remaining,
                mut mailboxes,
            } => {
                let msgid = match MailboxName::parse_bytes(line) {
                    Ok(m) => {
                        mailboxes.push(m);
                        msgid
                    }
                    Err(e) => msgid.and(Err(RequestError::BadName(e))),
                };
                if remaining > 1 {
                    self.state = State::PutMailboxes {
                        msgid,
                        remaining: remaining - 1,
                        mailboxes,
                    };
                    None
                } else {
                    self.state = State::ChunkHeader { body_bytes: 0 };
                    Some(Event::PutStart(msgid.map(|id| (id, mailboxes))))
                }
            }
            State::ChunkHeader { body_bytes } => self.chunk_header(line, body_bytes)?,
            State::ChunkData { .. } => unreachable!("handled above"),
        };
        Ok((event, used))
    }

    fn take_line<'a>(&self, buf: &'a [u8]) -> Result<Option<(&'a [u8], usize)>, Fatal> {
        let window = &buf[..buf.len().min(self.limits.line_max_bytes + 2)];
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = &buf[..i];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.len() > self.limits.line_max_bytes {
                    return Err(Fatal::LineTooLong);
                }
                Ok(Some((line, i + 1)))
            }
            None if window.len() > self.limits.line_max_bytes + 1 => Err(Fatal::LineTooLong),
            None => Ok(None),
        }
    }

    fn command<'a>(&mut self, line: &[u8]) -> Result<Option<Event<'a>>, Fatal> {
        let is_put = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"PUT ");
        match parse_line(line, self.limits.mailboxes_per_put_max) {
            Ok(Line::Complete(req)) => Ok(Some(Event::Request(req))),
            Ok(Line::PutHeader(msgid, count)) => {
                debug_assert!(count >= 1 && count <= self.limits.mailboxes_per_put_max);
                self.state = State::PutMailboxes {
                    msgid: msgid.map_err(RequestError::from),
                    remaining: count,
                    mailboxes: Vec::with_capacity(count.min(64)),
                };
                Ok(None)
            }
            Err(e) if is_put => Err(Fatal::BadPut(e)),
            Err(e) => Ok(Some(Event::Invalid(e))),
        }
    }

    fn chunk_header<'a>(
        &mut self,
        line: &[u8],
        body_bytes: u64,
    ) -> Result<Option<Event<'a>>, Fatal> {
        if line.eq_ignore_ascii_case(b"ABORT") {
            return Ok(Some(Event::PutAbort));
        }
        let len = std::str::from_utf8(line)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or(Fatal::BadChunk)?;
        if len == 0 {
            return Ok(Some(Event::PutEnd));
        }
        if len > self.limits.chunk_max_bytes {
            return Err(Fatal::ChunkTooBig);
        }
        let body_bytes = body_bytes + len as u64;
        if body_bytes > self.limits.message_max_bytes {
            return Err(Fatal::MessageTooBig);
        }
        self.state = State::ChunkData {
            remaining: len,
            body_bytes,
        };
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events with body bytes merged, so that any split of the input must
    /// give the same list.
    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Request(Request),
        Invalid(RequestError),
        PutStart(Result<(MessageId, Vec<MailboxName>), RequestError>),
        Body(Vec<u8>),
        PutEnd,
        PutAbort,
        Fatal(Fatal),
    }

    fn run(input: &[u8], piece_bytes: usize, limits: Limits) -> Vec<Owned> {
        let mut d = Decoder::new(limits);
        let mut out: Vec<Owned> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        for piece in input.chunks(piece_bytes) {
            buf.extend_from_slice(piece);
            loop {
                match d.decode(&buf) {
                    Err(f) => {
                        out.push(Owned::Fatal(f));
                        return out;
                    }
                    Ok((None, 0)) => break,
                    Ok((ev, n)) => {
                        match ev {
                            None => {}
                            Some(Event::Body(b)) => match out.last_mut() {
                                Some(Owned::Body(v)) => v.extend_from_slice(b),
                                _ => out.push(Owned::Body(b.to_vec())),
                            },
                            Some(Event::Request(r)) => out.push(Owned::Request(r)),
                            Some(Event::Invalid(e)) => out.push(Owned::Invalid(e)),
                            Some(Event::PutStart(p)) => out.push(Owned::PutStart(p)),
                            Some(Event::PutEnd) => out.push(Owned::PutEnd),
                            Some(Event::PutAbort) => out.push(Owned::PutAbort),
                        }
                        buf.drain(..n);
                    }
                }
            }
        }
        out
    }

    fn all_splits(input: &[u8], limits: Limits) -> Vec<Owned> {
        let whole = run(input, input.len().max(1), limits);
        for piece in [1, 2, 3, 4, 7, 8, 16, 64, 512] {
            assert_eq!(
                run(input, piece, limits),
                whole,
                "split into {piece}-byte pieces"
            );
        }
        whole
    }

    fn mb(s: &str) -> MailboxName {
        MailboxName::parse(s).unwrap()
    }

    #[test]
    fn put_with_chunks_and_other_commands() {
        let body: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let mut input = b"PING\r\nput m1 2\r\nA@x.org\r\nb@x.org\r\n".to_vec();
        input.extend_from_slice(b"1000\r\n");
        input.extend_from_slice(&body[..1000]);
        input.extend_from_slice(b"2000\r\n");
        input.extend_from_slice(&body[1000..]);
        input.extend_from_slice(b"0\r\nLIST a@x.org\nQUIT\r\n");
        let ev = all_splits(&input, Limits::default());
        let id = MessageId::parse("m1").unwrap();
        assert_eq!(
            ev,
            vec![
                Owned::Request(Request::Ping),
                Owned::PutStart(Ok((id, vec![mb("a@x.org"), mb("b@x.org")]))),
                Owned::Body(body),
                Owned::PutEnd,
                Owned::Request(Request::List {
                    mailbox: mb("a@x.org"),
                    after: None,
                }),
                Owned::Request(Request::Quit),
            ]
        );
    }

    #[test]
    fn bad_names_in_put_keep_the_stream_in_sync() {
        let input = b"PUT ../x 2\r\na@b\r\n../etc@b\r\n3\r\nabc0\r\nABORT\r\nPING\r\n";
        let ev = all_splits(input, Limits::default());
        assert!(matches!(
            ev[0],
            Owned::PutStart(Err(RequestError::BadName(_)))
        ));
        assert_eq!(ev[1], Owned::Body(b"abc".to_vec()));
        assert_eq!(ev[2], Owned::PutEnd);
        // After a completed PUT, "ABORT" is an unknown command, not a chunk.
        assert_eq!(ev[3], Owned::Invalid(RequestError::UnknownVerb));
        assert_eq!(ev[4], Owned::Request(Request::Ping));
    }

    /// DELM and GETM share one argument rule: a mailbox, then 1 to their
    /// maximum of ids, each validated.
    #[test]
    fn multi_id_verbs_take_one_to_max_ids_and_check_each() {
        type Make = fn(MailboxName, Vec<MessageId>) -> Request;
        let verbs: [(&str, usize, Make); 2] = [
            ("DELM", crate::request::DEL_MANY_MAX, |mailbox, msgids| {
                Request::DelMany { mailbox, msgids }
            }),
            ("GETM", crate::request::GET_MANY_MAX, |mailbox, msgids| {
                Request::GetMany { mailbox, msgids }
            }),
        ];
        for (verb, max, make) in verbs {
            let many: String = (0..=max).map(|i| format!(" m{i}")).collect();
            let lower = verb.to_lowercase();
            let input = format!(
                "{verb} a@b\r\n{verb} a@b m1 ../x\r\n{verb} a@b{many}\r\n{lower} a@b m1 m2\r\n"
            );
            let limits = Limits {
                line_max_bytes: 4096,
                ..Limits::default()
            };
            let ev = all_splits(input.as_bytes(), limits);
            assert!(
                matches!(ev[0], Owned::Invalid(RequestError::Syntax(_))),
                "{verb}"
            );
            assert!(
                matches!(ev[1], Owned::Invalid(RequestError::BadName(_))),
                "{verb}"
            );
            assert!(
                matches!(ev[2], Owned::Invalid(RequestError::Syntax(_))),
                "{verb}"
            );
            let ids = vec![
                MessageId::parse("m1").unwrap(),
                MessageId::parse("m2").unwrap(),
            ];
            assert_eq!(ev[3], Owned::Request(make(mb("a@b"), ids)), "{verb}");
        }
    }

    #[test]
    fn abort_and_invalid_lines() {
        let input =
            b"FROB\r\nGET a@b\r\nGET a@b ../x\r\nPUT m 1\r\na@b\r\n2\r\nxyABORT\r\nDIR a@b c@d\r\n";
        let ev = all_splits(input, Limits::default());
        assert_eq!(ev[0], Owned::Invalid(RequestError::UnknownVerb));
        assert!(matches!(ev[1], Owned::Invalid(RequestError::Syntax(_))));
        assert!(matches!(ev[2], Owned::Invalid(RequestError::BadName(_))));
        assert!(matches!(ev[3], Owned::PutStart(Ok(_))));
        assert_eq!(ev[4], Owned::Body(b"xy".to_vec()));
        assert_eq!(ev[5], Owned::PutAbort);
        assert!(matches!(ev[6], Owned::Invalid(RequestError::Syntax(_))));
    }

    #[test]
    fn limits_are_fatal_where_the_stream_cannot_resync() {
        let limits = Limits {
            line_max_bytes: 16,
            mailboxes_per_put_max: 2,
            chunk_max_bytes: 8,
            message_max_bytes: 10,
        };
        let long = [b'A'; 100];
        assert_eq!(
            all_splits(&long, limits),
            vec![Owned::Fatal(Fatal::LineTooLong)]
        );
        let ev = all_splits(b"PUT m 3\r\n", limits);
        assert_eq!(
            ev,
            vec![Owned::Fatal(Fatal::BadPut(RequestError::TooManyMailboxes))]
        );
        let ev = all_splits(b"PUT m x\r\n", limits);
        assert!(matches!(ev[0], Owned::Fatal(Fatal::BadPut(_))));
        let ev = all_splits(b"PUT m 1\r\na@b\r\n9\r\n", limits);
        assert_eq!(ev.last(), Some(&Owned::Fatal(Fatal::ChunkTooBig)));
        let ev = all_splits(b"PUT m 1\r\na@b\r\n8\r\n12345678", limits);
        assert_eq!(ev.last(), Some(&Owned::Body(b"12345678".to_vec())));
        let ev = all_splits(b"PUT m 1\r\na@b\r\n8\r\n12345678\r\n3\r\n", limits);
        assert_eq!(ev.last(), Some(&Owned::Fatal(Fatal::BadChunk)));
        let ev = all_splits(b"PUT m 1\r\na@b\r\n8\r\n123456783\r\n", limits);
        assert_eq!(ev.last(), Some(&Owned::Fatal(Fatal::MessageTooBig)));
        let ev = all_splits(b"PUT m 1\r\na@b\r\n-1\r\n", limits);
        assert_eq!(ev.last(), Some(&Owned::Fatal(Fatal::BadChunk)));
    }

    #[test]
    fn encode_and_decode_agree() {
        let reqs = vec![
            Request::Auth { proof: "ab".into() },
            Request::List {
                mailbox: mb("a@b"),
                after: None,
            },
            Request::List {
                mailbox: mb("a@b"),
                after: Some(MessageId::parse("0001.f.1").unwrap()),
            },
            Request::Get {
                mailbox: mb("a@b"),
                msgid: MessageId::parse("m").unwrap(),
            },
            Request::Del {
                mailbox: mb("a@b"),
                msgid: MessageId::parse("m").unwrap(),
            },
            Request::DelMany {
                mailbox: mb("a@b"),
                msgids: vec![
                    MessageId::parse("m").unwrap(),
                    MessageId::parse("n.1").unwrap(),
                ],
            },
            Request::GetMany {
                mailbox: mb("a@b"),
                msgids: vec![MessageId::parse("m").unwrap()],
            },
            Request::Usage { mailbox: mb("a@b") },
            Request::Nuke { mailbox: mb("a@b") },
            Request::Dir { after: None },
            Request::Dir {
                after: Some(mb("a@b")),
            },
            Request::Status,
            Request::ReadOnly,
            Request::ReadWrite,
            Request::Ping,
            Request::Quit,
        ];
        let input: String = reqs.iter().map(Request::encode).collect();
        let ev = all_splits(input.as_bytes(), Limits::default());
        let want: Vec<Owned> = reqs.into_iter().map(Owned::Request).collect();
        assert_eq!(ev, want);
    }

    #[test]
    fn list_takes_one_optional_id_after_the_mailbox() {
        let ev = all_splits(
            b"LIST a@b m1 m2\r\nLIST a@b ../x\r\nLIST\r\n",
            Limits::default(),
        );
        assert!(matches!(ev[0], Owned::Invalid(RequestError::Syntax(_))));
        assert!(matches!(ev[1], Owned::Invalid(RequestError::BadName(_))));
        assert!(matches!(ev[2], Owned::Invalid(RequestError::Syntax(_))));
    }
}
