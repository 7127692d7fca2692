//! POP3 session (line splitter, commands, AUTHORIZATION/TRANSACTION/UPDATE,
//! AUTH PLAIN, STLS) driven as the server drives it: never panics, gives the
//! same replies and the same store calls whether the input arrives whole or
//! split, keeps its buffered input bounded, never passes a login field with
//! CR, LF or NUL to the store, and acts on nothing once QUIT was answered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use powerpop::line::LineReader;
use powerpop::session::{
    is_enough, AuthResult, Listed, RetrieveError, Session, SessionLimits, SpliceSink, Store,
};

const LINE_MAX_BYTES: usize = 255;

/// An in-memory store recording every call made to it.
#[derive(Default, Debug, PartialEq)]
struct Mock {
    calls: Vec<String>,
}

const BODIES: [&[u8]; 3] = [
    b"Subject: a\r\n\r\nbody\r\n.dot\r\n",
    b"no end of line",
    b"X: y\r\n\r\n.\r\n..\r\n",
];

impl Store for Mock {
    fn authenticate(&mut self, user: &str, password: &str) -> AuthResult {
        for field in [user, password] {
            assert!(
                !field.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)),
                "a login field with CR, LF or NUL reached the store: {field:?}"
            );
        }
        self.calls.push(format!("auth {user:?} {password:?}"));
        match (user, password) {
            ("bob", "pw") => AuthResult::Ok(std::sync::Arc::new(
                BODIES
                    .iter()
                    .enumerate()
                    .map(|(i, b)| Listed {
                        uid: format!("m{i}"),
                        size_bytes: b.len() as u64,
                    })
                    .collect::<Vec<_>>(),
            )),
            ("busy", _) => AuthResult::InUse,
            ("old", "pw") => AuthResult::Proxied("+OK legacy".into()),
            _ => AuthResult::Bad,
        }
    }
    fn refuse_login(&mut self, user: &str) {
        self.calls.push(format!("refused {user:?}"));
    }
    fn retrieve(&mut self, index: usize, out: &mut dyn SpliceSink) -> Result<(), RetrieveError> {
        self.calls.push(format!("retr {index}"));
        for chunk in BODIES[index].chunks(4) {
            match out.write_all(chunk) {
                Ok(()) => {}
                Err(e) if is_enough(&e) => return Ok(()),
                Err(e) => return Err(RetrieveError::Broken(e)),
            }
        }
        Ok(())
    }
    fn commit(&mut self, deleted: &[usize]) -> Result<(), String> {
        self.calls.push(format!("commit {deleted:?}"));
        Ok(())
    }
    fn release(&mut self) {
        self.calls.push("release".into());
    }
}

/// What one run came to.
#[derive(Debug, PartialEq)]
struct Run {
    out: Vec<u8>,
    store: Mock,
    /// The step that ended the session, if one did: "close", "proxy", "stls".
    ended: Option<&'static str>,
}

/// Feeds `pieces` as the server's `drive` loop does, stopping where it
/// stops. After QUIT (or any close) the rest of the input is handed to the
/// session anyway, to check that it answers and does nothing.
fn run(pieces: &[&[u8]]) -> Run {
    let mut session = Session::new(Mock::default(), SessionLimits { errors_max: 8 });
    session.offer_stls();
    let mut out = session.greeting().as_bytes().to_vec();
    let mut lines = LineReader::new(LINE_MAX_BYTES);
    let mut ended = None;
    let mut after: Vec<u8> = Vec::new();
    for piece in pieces {
        lines.feed(piece);
        assert!(
            lines.buffered() <= LINE_MAX_BYTES + piece.len(),
            "buffered {} bytes",
            lines.buffered()
        );
        while let Some(line) = lines.next_line() {
            if ended.is_some() {
                // Past the end: drained only to feed it to the closed session.
                let calls = session.store_mut().calls.len();
                let step = session.handle(line, &mut after).expect("Vec write");
                assert!(step.close || step.proxy, "a closed session reopened");
                assert_eq!(
                    session.store_mut().calls.len(),
                    calls,
                    "acted on after close"
                );
                continue;
            }
            let step = session.handle(line, &mut out).expect("Vec write");
            if step.proxy {
                ended = Some("proxy");
            } else if step.starttls {
                // The server drops what follows STLS; so does this run.
                return Run {
                    out,
                    store: std::mem::take(session.store_mut()),
                    ended: Some("stls"),
                };
            } else if step.close {
                ended = Some("close");
            }
        }
    }
    assert!(
        after.is_empty(),
        "answered after the session ended: {after:?}"
    );
    if ended == Some("close") {
        assert!(session.closed());
    }
    Run {
        out,
        store: std::mem::take(session.store_mut()),
        ended,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let input = &data[2..];
    let a = (data[0] as usize).min(input.len());
    let b = (data[1] as usize * 4).min(input.len()).max(a);
    let whole = run(&[input]);
    assert_eq!(whole, run(&[&input[..a], &input[a..]]), "split at {a}");
    assert_eq!(
        whole,
        run(&[&input[..a], &input[a..b], &input[b..]]),
        "split at {a}, {b}"
    );
    let bytewise: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(whole, run(&bytewise), "split into bytes");
    // Every reply line ends in CRLF; commits happen once, at most.
    if !whole.out.is_empty() {
        assert!(whole.out.ends_with(b"\r\n"), "unterminated reply");
    }
    let commits = whole
        .store
        .calls
        .iter()
        .filter(|c| c.starts_with("commit"))
        .count();
    assert!(commits <= 1, "{:?}", whole.store.calls);
    if commits == 1 {
        assert_eq!(
            whole.ended,
            Some("close"),
            "commit without the session ending"
        );
    }
});
