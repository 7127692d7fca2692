//! SMTP session (commands, state machine, DATA): never panics, answers with
//! well-formed replies only, gives the same replies and stores the same
//! bytes whether the input arrives whole or split, and stores only what
//! ended with a lone `CRLF.CRLF` (nothing smuggled).
#![no_main]
use libfuzzer_sys::fuzz_target;
use powermail_proto::MailboxName;
use powersmtp::session::{Delivery, Envelope, Flow, RcptVerdict, Reply, Session, SessionLimits};

#[derive(Default, Debug, PartialEq)]
struct Mock {
    body: Vec<u8>,
    stored: Vec<Vec<u8>>,
    begun: usize,
    aborted: usize,
}

impl Delivery for Mock {
    fn lookup(&mut self, address: &str) -> RcptVerdict {
        match MailboxName::parse(address) {
            Ok(m) if !address.starts_with("unknown") => RcptVerdict::Accept(Some(m)),
            _ => RcptVerdict::Unknown,
        }
    }
    fn begin(&mut self, _env: &Envelope) -> Result<(), Reply> {
        self.begun += 1;
        self.body.clear();
        Ok(())
    }
    fn chunk(&mut self, bytes: &[u8]) {
        self.body.extend_from_slice(bytes);
    }
    fn finish(&mut self) -> Reply {
        self.stored.push(std::mem::take(&mut self.body));
        Reply::new(250, "2.0.0 Ok")
    }
    fn abort(&mut self) {
        self.aborted += 1;
        self.body.clear();
    }
}

fn run(pieces: &[&[u8]]) -> (Vec<u8>, Mock, bool) {
    let limits = SessionLimits {
        line_max_bytes: 512,
        message_max_bytes: 4096,
        recipients_max: 4,
        errors_max: 8,
    };
    let mut s = Session::new("mx.fuzz", "127.0.0.1:1", limits);
    let mut mock = Mock::default();
    let mut out = Vec::new();
    s.greeting(&mut mock, &mut out);
    for piece in pieces {
        if s.feed(piece, &mut mock, &mut out) != Flow::Continue {
            return (out, mock, true);
        }
    }
    (out, mock, false)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let split = (data[0] as usize).min(input.len());
    let whole = run(&[input]);
    assert_eq!(whole, run(&[&input[..split], &input[split..]]));
    let (out, mock, _) = whole;
    // Every reply line: three digits, then ' ' or '-', CRLF-terminated.
    for line in out.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {line:?}");
        assert!(
            line.len() >= 5 && line[..3].iter().all(u8::is_ascii_digit),
            "{line:?}"
        );
        assert!(line[3] == b' ' || line[3] == b'-', "{line:?}");
    }
    for m in &mock.stored {
        assert!(m.len() <= 4096, "a message over the limit was stored");
        assert!(
            !m.windows(5).any(|w| w == b"\r\n.\r\n"),
            "a stored message ends early"
        );
    }
});
