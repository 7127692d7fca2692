//! The session driven by byte chunks against an in-memory store.

use super::*;
use crate::line::LineReader;

#[derive(Default)]
struct Fake {
    messages: Vec<(String, Vec<u8>)>,
    commits: Vec<Vec<usize>>,
    next_auth: Option<AuthResult>,
    logins: Vec<(String, String)>,
    refused_logins: Vec<String>,
}

impl Store for Fake {
    fn authenticate(&mut self, user: &str, password: &str) -> AuthResult {
        self.logins.push((user.into(), password.into()));
        if let Some(r) = self.next_auth.take() {
            return r;
        }
        if qualify(user, Some("example.org")).as_deref() == Some("bob@example.org")
            && password == "pw"
        {
            AuthResult::Ok(std::sync::Arc::new(
                self.messages
                    .iter()
                    .map(|(uid, body)| Listed {
                        uid: uid.clone(),
                        size_bytes: body.len() as u64,
                    })
                    .collect::<Vec<_>>(),
            ))
        } else {
            AuthResult::Bad
        }
    }

    fn refuse_login(&mut self, user: &str) {
        self.refused_logins.push(user.into());
    }

    fn retrieve(&mut self, index: usize, out: &mut dyn SpliceSink) -> Result<(), RetrieveError> {
        let body = &self.messages[index].1;
        if body == b"GONE" {
            return Err(RetrieveError::NotFound);
        }
        // Write in awkward pieces, as a socket would deliver them.
        for chunk in body.chunks(3) {
            match out.write_all(chunk) {
                Ok(()) => {}
                Err(e) if is_enough(&e) => return Ok(()),
                Err(e) => return Err(RetrieveError::Broken(e)),
            }
        }
        Ok(())
    }

    fn commit(&mut self, deleted: &[usize]) -> Result<(), String> {
        self.commits.push(deleted.to_vec());
        Ok(())
    }

    fn release(&mut self) {}
}

fn fake() -> Fake {
    Fake {
        messages: vec![
            (
                "m1".into(),
                b"Subject: one\r\n\r\nbody\r\n..dot\r\n".to_vec(),
            ),
            (
                "m2".into(),
                b"A: b\r\nC: d\r\n\r\nl1\r\nl2\r\nl3\r\n".to_vec(),
            ),
            ("m3".into(), b"no newline at end".to_vec()),
            ("m4".into(), b"GONE".to_vec()),
        ],
        ..Fake::default()
    }
}

/// Runs `input` through a line reader and a session in chunks of `chunk`.
fn run(store: Fake, input: &[u8], chunk: usize) -> (String, Fake) {
    let mut session = Session::new(store, SessionLimits::default());
    let mut out = session.greeting().as_bytes().to_vec();
    let mut reader = LineReader::new(255);
    'outer: for c in input.chunks(chunk) {
        reader.feed(c);
        while let Some(line) = reader.next_line() {
            if session.handle(line, &mut out).unwrap().close {
                break 'outer;
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), session.store)
}

fn every_chunking(store: impl Fn() -> Fake, input: &str) -> (String, Fake) {
    let (want, s) = run(store(), input.as_bytes(), input.len());
    let mut chunk = 1;
    while chunk <= 512 {
        let (got, _) = run(store(), input.as_bytes(), chunk);
        assert_eq!(got, want, "chunk size {chunk}");
        chunk *= 2;
    }
    (want, s)
}

#[test]
fn full_session_same_for_every_chunking() {
    let input = "CAPA\r\nUSER bob\r\nPASS pw\r\nSTAT\r\nLIST\r\nUIDL\r\nLIST 2\r\nUIDL 9\r\n\
                 RETR 1\r\nTOP 2 1\r\nTOP 2 0\r\nRETR 3\r\nDELE 1\r\nDELE 1\r\nSTAT\r\n\
                 RSET\r\nDELE 2\r\nRETR 2\r\nNOOP\r\nQUIT\r\nSTAT\r\n";
    let (out, store) = every_chunking(fake, input);
    let want = "+OK powerpop ready\r\n\
        +OK capability list follows\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
        PIPELINING\r\nTOP\r\nUIDL\r\nIMPLEMENTATION powerpop-0.1.0\r\n.\r\n\
        +OK send PASS\r\n\
        +OK maildrop has 4 messages (76 octets)\r\n\
        +OK 4 76\r\n\
        +OK 4 messages (76 octets)\r\n1 29\r\n2 26\r\n3 17\r\n4 4\r\n.\r\n\
        +OK 4 messages (76 octets)\r\n1 m1\r\n2 m2\r\n3 m3\r\n4 m4\r\n.\r\n\
        +OK 2 26\r\n\
        -ERR no such message\r\n\
        +OK 29 octets\r\nSubject: one\r\n\r\nbody\r\n..dot\r\n.\r\n\
        +OK top of message follows\r\nA: b\r\nC: d\r\n\r\nl1\r\n.\r\n\
        +OK top of message follows\r\nA: b\r\nC: d\r\n\r\n.\r\n\
        +OK 17 octets\r\nno newline at end\r\n.\r\n\
        +OK message 1 deleted\r\n\
        -ERR no such message\r\n\
        +OK 3 47\r\n\
        +OK maildrop has 4 messages (76 octets)\r\n\
        +OK message 2 deleted\r\n\
        -ERR no such message\r\n\
        +OK\r\n\
        +OK powerpop signing off (3 messages left)\r\n";
    assert_eq!(out, want);
    assert_eq!(store.commits, vec![vec![1]]);
}

#[test]
fn top_counts_lines_exactly() {
    let body = b"H: 1\r\nH2: x\r\n\r\na\r\n\r\nb\r\nc".to_vec();
    let store = || Fake {
        messages: vec![("m".into(), body.clone())],
        ..Fake::default()
    };
    for (n, want) in [
        (0, "H: 1\r\nH2: x\r\n\r\n"),
        (1, "H: 1\r\nH2: x\r\n\r\na\r\n"),
        (2, "H: 1\r\nH2: x\r\n\r\na\r\n\r\n"),
        (3, "H: 1\r\nH2: x\r\n\r\na\r\n\r\nb\r\n"),
        (4, "H: 1\r\nH2: x\r\n\r\na\r\n\r\nb\r\nc\r\n"),
        (99, "H: 1\r\nH2: x\r\n\r\na\r\n\r\nb\r\nc\r\n"),
    ] {
        let (out, _) = every_chunking(store, &format!("USER bob\r\nPASS pw\r\nTOP 1 {n}\r\n"));
        let body = out.split("follows\r\n").nth(1).unwrap();
        assert_eq!(body, format!("{want}.\r\n"), "TOP 1 {n}");
    }
}

#[test]
fn refusals_and_response_codes() {
    let (out, _) = every_chunking(
        fake,
        "STAT\r\nPASS x\r\nUSER bob\r\nPASS wrong\r\nRETR 1\r\nBOGUS\r\nAPOP a b\r\n",
    );
    assert_eq!(
        out,
        "+OK powerpop ready\r\n-ERR not logged in\r\n-ERR USER first\r\n+OK send PASS\r\n\
         -ERR [AUTH] authentication failed\r\n-ERR not logged in\r\n-ERR unknown command\r\n\
         -ERR APOP not supported, use USER/PASS or AUTH PLAIN\r\n"
    );
    for (result, text) in [
        (
            AuthResult::InUse,
            "-ERR [IN-USE] mailbox in use by another session",
        ),
        (
            AuthResult::Unavailable,
            "-ERR [SYS/TEMP] user database unavailable",
        ),
        (
            AuthResult::StorageUnavailable,
            "-ERR [SYS/TEMP] mailbox storage unavailable",
        ),
        (AuthResult::Locked, "-ERR [AUTH] too many failed logins"),
    ] {
        let store = || Fake {
            next_auth: Some(result.clone()),
            ..fake()
        };
        let (out, _) = every_chunking(store, "USER bob\r\nPASS pw\r\n");
        assert!(out.contains(text), "{out}");
    }
}

#[test]
fn auth_plain_initial_and_continuation() {
    // "\0bob\0pw"
    let (out, store) = every_chunking(fake, "AUTH PLAIN AGJvYgBwdw==\r\nSTAT\r\n");
    assert!(
        out.ends_with("+OK maildrop has 4 messages (76 octets)\r\n+OK 4 76\r\n"),
        "{out}"
    );
    assert_eq!(store.logins, vec![("bob".into(), "pw".into())]);
    let (out, _) = every_chunking(fake, "AUTH PLAIN\r\nAGJvYgBwdw==\r\nSTAT\r\n");
    assert!(out.contains("+ \r\n+OK maildrop has 4"), "{out}");
    let (out, _) = every_chunking(fake, "AUTH PLAIN\r\n*\r\nSTAT\r\n");
    assert!(out.ends_with("-ERR authentication cancelled\r\n-ERR not logged in\r\n"));
    let (out, _) = every_chunking(fake, "AUTH PLAIN !!!!\r\nAUTH CRAM-MD5\r\n");
    assert!(out.contains("-ERR [AUTH] malformed PLAIN response\r\n-ERR unsupported SASL"));
}

#[test]
fn gone_message_and_long_lines() {
    let long = "x".repeat(1000);
    let (out, _) = every_chunking(
        fake,
        &format!("USER bob\r\nPASS pw\r\nRETR 4\r\n{long}\r\nNOOP\r\n"),
    );
    assert!(
        out.ends_with("-ERR message no longer available\r\n-ERR line too long\r\n+OK\r\n"),
        "{out}"
    );
}

#[test]
fn too_many_errors_close_the_session() {
    let (out, _) = every_chunking(fake, &"BAD\r\n".repeat(30));
    assert_eq!(out.matches("-ERR unknown command").count(), 20);
    assert!(out.ends_with("-ERR too many errors, closing\r\n"));
}

#[test]
fn user_names_are_qualified() {
    assert_eq!(qualify("bob", Some("x.org")).unwrap(), "bob@x.org");
    assert_eq!(qualify("bob%y.org", Some("x.org")).unwrap(), "bob@y.org");
    assert_eq!(qualify("bob@z.org", Some("x.org")).unwrap(), "bob@z.org");
    assert_eq!(qualify("bob", None), None);
}

#[test]
fn stls_offered_once_and_resets_the_session() {
    let mut session = Session::new(fake(), SessionLimits::default());
    let mut out = Vec::new();
    let line = |s: &str| Line::Complete(s.as_bytes().to_vec());
    session.handle(line("USER bob"), &mut out).unwrap();
    session.handle(line("STLS"), &mut out).unwrap();
    assert!(String::from_utf8_lossy(&out).ends_with("-ERR STLS not available\r\n"));
    session.offer_stls();
    out.clear();
    session.handle(line("CAPA"), &mut out).unwrap();
    assert!(String::from_utf8_lossy(&out).contains("\r\nSTLS\r\n"));
    out.clear();
    let step = session.handle(line("STLS"), &mut out).unwrap();
    assert!(step.starttls && !step.close);
    assert_eq!(out, b"+OK begin TLS negotiation\r\n");
    session.tls_started();
    out.clear();
    // The USER given before TLS is forgotten.
    session.handle(line("PASS pw"), &mut out).unwrap();
    session.handle(line("CAPA"), &mut out).unwrap();
    session.handle(line("STLS"), &mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("-ERR USER first\r\n"), "{text}");
    assert!(!text.contains("\r\nSTLS\r\n"), "{text}");
    assert!(text.ends_with("-ERR STLS not available\r\n"), "{text}");
}

#[test]
fn proxied_login_hands_over_the_connection() {
    let mut session = Session::new(
        Fake {
            next_auth: Some(AuthResult::Proxied("+OK legacy maildrop ready".into())),
            ..fake()
        },
        SessionLimits::default(),
    );
    let mut out = Vec::new();
    let line = |s: &str| Line::Complete(s.as_bytes().to_vec());
    session.handle(line("USER old"), &mut out).unwrap();
    let step = session.handle(line("PASS pw"), &mut out).unwrap();
    assert!(step.proxy && !step.close, "{step:?}");
    assert!(String::from_utf8_lossy(&out).ends_with("+OK legacy maildrop ready\r\n"));
}

#[test]
fn plaintext_logins_need_tls_when_refused() {
    let mut session = Session::new(fake(), SessionLimits::default());
    session.offer_stls();
    session.refuse_plaintext_auth();
    let mut out = Vec::new();
    let line = |s: &str| Line::Complete(s.as_bytes().to_vec());
    for cmd in ["CAPA", "USER bob", "PASS pw", "AUTH PLAIN AGJvYgBwdw=="] {
        session.handle(line(cmd), &mut out).unwrap();
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        !text.contains("\r\nUSER\r\n") && !text.contains("SASL PLAIN"),
        "{text}"
    );
    assert!(text.contains("\r\nSTLS\r\n"), "{text}");
    assert_eq!(
        text.matches("-ERR [AUTH] plain-text login disallowed")
            .count(),
        3,
        "{text}"
    );
    assert!(!session.authenticated());
    // Once TLS is up, the same login works.
    session.handle(line("STLS"), &mut out).unwrap();
    session.tls_started();
    out.clear();
    session.handle(line("CAPA"), &mut out).unwrap();
    session.handle(line("USER bob"), &mut out).unwrap();
    session.handle(line("PASS pw"), &mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("\r\nUSER\r\n"), "{text}");
    assert!(session.authenticated(), "{text}");
}

#[test]
fn nul_bytes_in_commands_are_refused() {
    let mut session = Session::new(fake(), SessionLimits::default());
    let mut out = Vec::new();
    let line = |s: &[u8]| Line::Complete(s.to_vec());
    session.handle(line(b"USER bob\0x"), &mut out).unwrap();
    session.handle(line(b"PASS pw"), &mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("-ERR NUL byte in command\r\n"), "{text}");
    assert!(text.ends_with("-ERR USER first\r\n"), "{text}");
    assert!(!session.authenticated());
}

#[test]
fn line_breaks_in_login_fields_are_failed_guesses_never_tried() {
    // A bare CR in PASS (the line reader only strips the final one), and
    // AUTH PLAIN fields with CR/LF once decoded ("\0old\r\nDELE 1\0pw",
    // "\0old\0pw\rNOOP"): none reaches `authenticate`, each is counted.
    // A CR inside a USER name splits it in two: a syntax error, no guess.
    let input = "USER old\rDELE 1\r\nPASS pw\r\n\
                 USER old\r\nPASS wrong\rPASS secret\r\n\
                 AUTH PLAIN AG9sZA0KREVMRSAxAHB3\r\n\
                 AUTH PLAIN\r\nAG9sZABwdw1OT09Q\r\n\
                 USER bob\r\nPASS pw\r\n";
    let (out, store) = every_chunking(fake, input);
    assert!(
        out.starts_with("+OK powerpop ready\r\n-ERR USER needs one name\r\n-ERR USER first\r\n"),
        "{out}"
    );
    assert_eq!(
        out.matches("-ERR [AUTH] authentication failed\r\n").count(),
        3,
        "{out}"
    );
    assert!(
        out.ends_with("+OK maildrop has 4 messages (76 octets)\r\n"),
        "{out}"
    );
    assert_eq!(store.logins, vec![("bob".to_string(), "pw".to_string())]);
    assert_eq!(store.refused_logins, vec!["old", "old\r\nDELE 1", "old"]);
}

#[test]
fn nothing_is_answered_or_done_after_quit() {
    let mut session = Session::new(fake(), SessionLimits::default());
    let mut out = Vec::new();
    let line = |s: &[u8]| Line::Complete(s.to_vec());
    session.handle(line(b"USER bob"), &mut out).unwrap();
    session.handle(line(b"PASS pw"), &mut out).unwrap();
    session.handle(line(b"DELE 1"), &mut out).unwrap();
    assert!(session.handle(line(b"QUIT"), &mut out).unwrap().close);
    out.clear();
    for l in [
        Line::TooLong,
        line(b"RETR\0 1"),
        line(b"DELE 2"),
        line(b"QUIT"),
    ] {
        assert!(session.handle(l, &mut out).unwrap().close);
    }
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert_eq!(session.store.commits, vec![vec![0]]);
}
