//! What one connection has said so far, as a pure state machine: the auth
//! gate (greeting with its nonce → `AUTH` proof → authenticated) and the PUT
//! lifecycle (header → body chunks → `0` or `ABORT` → durable or forgotten).
//!
//! It owns no socket, no disk and no clock, so every rule of PPL/1's
//! connection can be unit-tested without starting a backend. The async loop
//! in [`crate::session`] feeds it the decoder's events and does what the
//! returned [`Action`] says; the body writer is a type parameter (`W`) that
//! the state only holds and hands back, never touches.

use powermail_proto::reply::{err_line, AUTHENTICATED, BYE};
use powermail_proto::{
    auth, ErrorCode, Fatal, Greeting, MailboxName, MessageId, OkReply, Reply, Request, RequestError,
};

/// Failed `AUTH` attempts (or requests before one) a connection may make:
/// the first closes it, so a client cannot guess proofs on one connection.
pub const AUTH_FAILURES_MAX: u32 = 1;

/// A decoder event with no borrow of the read buffer (bodies go apart,
/// through [`ConnState::body`]).
#[derive(Debug)]
pub enum Owned {
    /// A complete request other than PUT.
    Request(Request),
    /// A refused line.
    Invalid(RequestError),
    /// A PUT header with its mailboxes, or why it was refused.
    PutStart(Result<(MessageId, Vec<MailboxName>), RequestError>),
    /// `0`: store the body.
    PutEnd,
    /// `ABORT`: forget it.
    PutAbort,
}

/// A PUT whose body is arriving.
#[derive(Debug)]
pub enum Put<W> {
    /// Being written by `writer`.
    Writing {
        /// The body writer (the loop's; the state only holds it).
        writer: W,
        /// The id to link.
        msgid: MessageId,
        /// Where to link it.
        mailboxes: Vec<MailboxName>,
    },
    /// Refused already: the body is read and dropped, then `-ERR` answered.
    Refused {
        /// The reply code.
        code: ErrorCode,
        /// The reply text.
        text: String,
    },
}

/// What the connection loop must do after an event.
#[derive(Debug)]
pub enum Action<W> {
    /// Nothing (the event changed only the state).
    None,
    /// Queue this reply line and read on.
    Reply(String),
    /// Queue this refusal of a bad line (count a protocol error) and read on.
    Invalid(String),
    /// Queue this reply, flush and close (`QUIT`).
    Close(String),
    /// Authentication failed: count it, queue this reply, flush and close.
    AuthFailed(String),
    /// Run this request against the store (authenticated only).
    Apply(Request),
    /// Open a body writer for this PUT, or refuse it, and give the outcome
    /// to [`ConnState::begin_put`].
    StartPut(MessageId, Vec<MailboxName>),
    /// Make this PUT durable and answer it (or answer its refusal).
    FinishPut(Put<W>),
    /// The client aborted: discard the writer if any, count a PUT error,
    /// queue this reply.
    Aborted(Option<W>, String),
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct ConnState<W> {
    nonce: String,
    authenticated: bool,
    auth_failures: u32,
    put: Option<Put<W>>,
    body_bytes: u64,
    message_max_bytes: u64,
}

impl<W> ConnState<W> {
    /// A new connection that will send the greeting with `nonce` (fresh per
    /// connection) and accept bodies up to `message_max_bytes`.
    pub fn new(nonce: String, message_max_bytes: u64) -> ConnState<W> {
        ConnState {
            nonce,
            authenticated: false,
            auth_failures: 0,
            put: None,
            body_bytes: 0,
            message_max_bytes,
        }
    }

    /// The greeting line, CRLF included.
    pub fn greeting(&self, backend_name: &str) -> String {
        Greeting {
            backend_name: backend_name.to_string(),
            nonce: self.nonce.clone(),
        }
        .encode()
    }

    /// Whether a PUT's body is being received (or dropped after a refusal).
    pub fn in_put(&self) -> bool {
        self.put.is_some()
    }

    /// The next event: checks the auth gate, then says what to do.
    pub fn on_event(&mut self, event: Owned, secret: &[u8]) -> Action<W> {
        if !self.authenticated {
            return self.before_auth(event, secret);
        }
        match event {
            Owned::Request(Request::Quit) => Action::Close(Reply::ok(BYE).encode()),
            Owned::Request(Request::Auth { .. }) => {
                Action::Reply(err_line(ErrorCode::Proto, "already authenticated"))
            }
            Owned::Request(req) => Action::Apply(req),
            Owned::Invalid(e) => Action::Invalid(err_line(invalid_code(&e), &e.to_string())),
            Owned::PutStart(Ok((msgid, mailboxes))) => Action::StartPut(msgid, mailboxes),
            Owned::PutStart(Err(e)) => {
                self.begin_put(None, Err((ErrorCode::BadName, e.to_string())));
                Action::None
            }
            Owned::PutEnd => match self.take_put() {
                Some(put) => Action::FinishPut(put),
                None => Action::Reply(err_line(ErrorCode::Proto, "no PUT in progress")),
            },
            Owned::PutAbort => Action::Aborted(
                self.take_writer(),
                err_line(ErrorCode::Aborted, "PUT aborted by client"),
            ),
        }
    }

    fn before_auth(&mut self, event: Owned, secret: &[u8]) -> Action<W> {
        match event {
            Owned::Request(Request::Auth { proof })
                if auth::verify(secret, &self.nonce, &proof) =>
            {
                self.authenticated = true;
                Action::Reply(Reply::ok(AUTHENTICATED).encode())
            }
            Owned::Request(Request::Quit) => Action::Close(Reply::ok(BYE).encode()),
            _ => {
                self.auth_failures += 1;
                debug_assert!(self.auth_failures <= AUTH_FAILURES_MAX);
                Action::AuthFailed(err_line(
                    ErrorCode::Auth,
                    "authentication required; closing",
                ))
            }
        }
    }

    /// Starts the PUT the loop opened a writer for (`Ok`), or refuses it
    /// (`Err`: its body is then read and dropped). `target` is the id and
    /// mailboxes of [`Action::StartPut`].
    pub fn begin_put(
        &mut self,
        target: Option<(MessageId, Vec<MailboxName>)>,
        opened: Result<W, (ErrorCode, String)>,
    ) {
        assert!(self.put.is_none(), "a PUT began inside another");
        self.body_bytes = 0;
        self.put = Some(match (opened, target) {
            (Ok(writer), Some((msgid, mailboxes))) => Put::Writing {
                writer,
                msgid,
                mailboxes,
            },
            (Ok(_), None) => unreachable!("a writer for no PUT"),
            (Err((code, text)), _) => Put::Refused { code, text },
        });
    }

    /// Counts `len` more body bytes and returns the writer they go to, if
    /// the PUT is being written (none when it was refused).
    pub fn body(&mut self, len: usize) -> Option<&mut W> {
        self.body_bytes += len as u64;
        // The decoder refuses a body over the limit before it gets here.
        debug_assert!(self.body_bytes <= self.message_max_bytes);
        match &mut self.put {
            Some(Put::Writing { writer, .. }) => Some(writer),
            _ => None,
        }
    }

    /// Turns the PUT being written into a refusal (the body is still read
    /// and dropped) and returns its writer to discard.
    pub fn refuse_put(&mut self, code: ErrorCode, text: String) -> Option<W> {
        let writer = self.take_writer();
        self.put = Some(Put::Refused { code, text });
        writer
    }

    /// Ends the PUT, if any, returning its writer to discard (the connection
    /// is closing).
    pub fn take_writer(&mut self) -> Option<W> {
        match self.take_put() {
            Some(Put::Writing { writer, .. }) => Some(writer),
            _ => None,
        }
    }

    fn take_put(&mut self) -> Option<Put<W>> {
        self.body_bytes = 0;
        self.put.take()
    }

    /// A framing error: returns the writer to discard and the last reply
    /// before the connection is closed.
    pub fn on_fatal(&mut self, fatal: &Fatal) -> (Option<W>, String) {
        let code = match fatal {
            Fatal::MessageTooBig => ErrorCode::TooBig,
            Fatal::BadPut(RequestError::TooManyMailboxes) => ErrorCode::Limit,
            _ => ErrorCode::Proto,
        };
        (
            self.take_writer(),
            err_line(code, &format!("{fatal}; closing")),
        )
    }
}

fn invalid_code(e: &RequestError) -> ErrorCode {
    match e {
        RequestError::BadName(_) => ErrorCode::BadName,
        _ => ErrorCode::Proto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"s3cret";

    /// The writer stands in for a body file: it keeps what it was given.
    type State = ConnState<Vec<u8>>;

    fn state() -> State {
        ConnState::new("n0nce".into(), 100)
    }

    fn good_auth(s: &State) -> Owned {
        Owned::Request(Request::Auth {
            proof: auth::proof(SECRET, &s.nonce),
        })
    }

    fn authed() -> State {
        let mut s = state();
        let auth = good_auth(&s);
        assert!(
            matches!(s.on_event(auth, SECRET), Action::Reply(l) if l == "+OK authenticated\r\n")
        );
        s
    }

    fn id(s: &str) -> MessageId {
        MessageId::parse(s).unwrap()
    }

    fn mbox() -> Vec<MailboxName> {
        vec![MailboxName::parse("a@b.org").unwrap()]
    }

    #[test]
    fn greeting_carries_the_nonce() {
        let s = state();
        assert_eq!(s.greeting("b1"), "+OK PPL/1 b1 n0nce\r\n");
        assert!(!s.authenticated);
    }

    #[test]
    fn good_proof_opens_the_gate() {
        let mut s = authed();
        assert!(s.authenticated);
        assert!(matches!(
            s.on_event(Owned::Request(Request::Ping), SECRET),
            Action::Apply(Request::Ping)
        ));
        let again = good_auth(&s);
        assert!(
            matches!(s.on_event(again, SECRET), Action::Reply(l) if l.starts_with("-ERR [PROTO]"))
        );
    }

    #[test]
    fn anything_but_a_good_proof_closes_the_gate() {
        let wrong_proof = Owned::Request(Request::Auth {
            proof: auth::proof(b"other", "n0nce"),
        });
        let other_nonce = Owned::Request(Request::Auth {
            proof: auth::proof(SECRET, "replayed"),
        });
        for event in [
            wrong_proof,
            other_nonce,
            Owned::Request(Request::Ping),
            Owned::Request(Request::Status),
            Owned::Invalid(RequestError::UnknownVerb),
            Owned::PutStart(Ok((id("m"), mbox()))),
            Owned::PutEnd,
        ] {
            let mut s = state();
            let action = s.on_event(event, SECRET);
            assert!(
                matches!(&action, Action::AuthFailed(l) if l.starts_with("-ERR [AUTH]")),
                "{action:?}"
            );
            assert!(!s.authenticated);
            assert_eq!(s.auth_failures, AUTH_FAILURES_MAX);
        }
    }

    #[test]
    fn quit_closes_before_and_after_auth() {
        let mut s = state();
        let quit = || Owned::Request(Request::Quit);
        assert!(matches!(s.on_event(quit(), SECRET), Action::Close(l) if l == "+OK bye\r\n"));
        let mut s = authed();
        assert!(matches!(s.on_event(quit(), SECRET), Action::Close(l) if l == "+OK bye\r\n"));
    }

    #[test]
    fn put_lifecycle_writes_then_finishes() {
        let mut s = authed();
        let Action::StartPut(msgid, mailboxes) =
            s.on_event(Owned::PutStart(Ok((id("m1"), mbox()))), SECRET)
        else {
            panic!("expected StartPut");
        };
        s.begin_put(Some((msgid, mailboxes)), Ok(Vec::new()));
        assert!(s.in_put());
        for chunk in [&b"hello "[..], b"world"] {
            s.body(chunk.len())
                .expect("writing")
                .extend_from_slice(chunk);
        }
        assert_eq!(s.body_bytes, 11);
        match s.on_event(Owned::PutEnd, SECRET) {
            Action::FinishPut(Put::Writing {
                writer,
                msgid,
                mailboxes,
            }) => {
                assert_eq!(writer, b"hello world");
                assert_eq!(msgid, id("m1"));
                assert_eq!(mailboxes, mbox());
            }
            other => panic!("{other:?}"),
        }
        assert!(!s.in_put());
        assert_eq!(s.body_bytes, 0);
    }

    #[test]
    fn refused_put_drops_its_body_and_answers_at_the_end() {
        let mut s = authed();
        let bad = RequestError::BadName(powermail_proto::NameError::LeadingDot);
        assert!(matches!(
            s.on_event(Owned::PutStart(Err(bad)), SECRET),
            Action::None
        ));
        assert!(s.in_put(), "the body must still be consumed");
        assert!(s.body(5).is_none(), "a refused body goes nowhere");
        match s.on_event(Owned::PutEnd, SECRET) {
            Action::FinishPut(Put::Refused { code, .. }) => assert_eq!(code, ErrorCode::BadName),
            other => panic!("{other:?}"),
        }
        // Read-only or no body file: the loop refuses when opening.
        s.begin_put(None, Err((ErrorCode::ReadOnly, "ro".into())));
        assert!(matches!(
            s.on_event(Owned::PutEnd, SECRET),
            Action::FinishPut(Put::Refused {
                code: ErrorCode::ReadOnly,
                ..
            })
        ));
    }

    #[test]
    fn write_error_turns_the_put_into_a_refusal() {
        let mut s = authed();
        s.begin_put(Some((id("m"), mbox())), Ok(b"part".to_vec()));
        let writer = s.refuse_put(ErrorCode::Temp, "write failed".into());
        assert_eq!(writer.as_deref(), Some(&b"part"[..]));
        assert!(s.body(3).is_none());
        assert!(matches!(
            s.on_event(Owned::PutEnd, SECRET),
            Action::FinishPut(Put::Refused {
                code: ErrorCode::Temp,
                ..
            })
        ));
    }

    #[test]
    fn abort_hands_back_the_writer() {
        let mut s = authed();
        s.begin_put(Some((id("m"), mbox())), Ok(b"x".to_vec()));
        match s.on_event(Owned::PutAbort, SECRET) {
            Action::Aborted(Some(w), line) => {
                assert_eq!(w, b"x");
                assert_eq!(line, "-ERR [ABORTED] PUT aborted by client\r\n");
            }
            other => panic!("{other:?}"),
        }
        assert!(!s.in_put());
        // An end with no PUT is a protocol error, not a crash.
        assert!(matches!(
            s.on_event(Owned::PutEnd, SECRET),
            Action::Reply(l) if l == "-ERR [PROTO] no PUT in progress\r\n"
        ));
    }

    #[test]
    fn fatal_errors_map_to_their_codes_and_release_the_writer() {
        let mut s = authed();
        s.begin_put(Some((id("m"), mbox())), Ok(Vec::new()));
        let (w, line) = s.on_fatal(&Fatal::MessageTooBig);
        assert!(w.is_some());
        assert_eq!(line, "-ERR [TOOBIG] message too big; closing\r\n");
        let (w, line) = s.on_fatal(&Fatal::BadPut(RequestError::TooManyMailboxes));
        assert!(w.is_none());
        assert!(line.starts_with("-ERR [LIMIT] "));
        let (_, line) = s.on_fatal(&Fatal::LineTooLong);
        assert_eq!(line, "-ERR [PROTO] line too long; closing\r\n");
    }

    #[test]
    fn invalid_lines_keep_the_connection() {
        let mut s = authed();
        let bad = RequestError::BadName(powermail_proto::NameError::LeadingDot);
        assert!(matches!(
            s.on_event(Owned::Invalid(bad), SECRET),
            Action::Invalid(l) if l.starts_with("-ERR [BADNAME]")
        ));
        assert!(matches!(
            s.on_event(Owned::Invalid(RequestError::UnknownVerb), SECRET),
            Action::Invalid(l) if l == "-ERR [PROTO] unknown command\r\n"
        ));
        assert!(s.authenticated);
    }
}
