//! Session tests: whole conversations fed in chunks of 1, 2, 4 … 512 bytes
//! must give the same replies and the same stored bytes.

use super::*;

#[derive(Default, Debug, PartialEq)]
struct Mock {
    begun: Vec<Envelope>,
    body: Vec<u8>,
    finished: u32,
    aborted: u32,
    fail_begin: bool,
    codes: Vec<u16>,
}

impl Delivery for Mock {
    fn lookup(&mut self, address: &str) -> RcptVerdict {
        match address.split('@').next().unwrap_or("") {
            "unknown" => RcptVerdict::Unknown,
            "full" => RcptVerdict::OverQuota,
            "dbdown" => RcptVerdict::TempFail,
            "off" => RcptVerdict::Disabled,
            "fwd" => RcptVerdict::Accept(None),
            "relaynak" => RcptVerdict::Refuse(Reply::new(550, "5.7.1 Relay said no")),
            _ => match MailboxName::parse(address) {
                Ok(m) => RcptVerdict::Accept(Some(m)),
                Err(_) => RcptVerdict::Unknown,
            },
        }
    }
    fn begin(&mut self, env: &Envelope) -> Result<(), Reply> {
        if self.fail_begin {
            return Err(Reply::new(451, "4.3.0 No backends"));
        }
        self.begun.push(env.clone());
        self.body.clear();
        Ok(())
    }
    fn chunk(&mut self, bytes: &[u8]) {
        self.body.extend_from_slice(bytes);
    }
    fn finish(&mut self) -> Reply {
        self.finished += 1;
        Reply::new(250, "2.0.0 Ok: queued as X")
    }
    /// Mailboxes named `quota…@` go over their quota with this message.
    fn finish_each(&mut self, rcpts: &[Option<MailboxName>]) -> Vec<Reply> {
        self.finished += 1;
        rcpts
            .iter()
            .map(|m| match m {
                Some(m) if m.as_str().starts_with("quota") => Reply::new(552, "5.2.2 Mailbox full"),
                Some(m) => Reply::new(250, format!("2.0.0 Ok: {m}")),
                None => Reply::new(250, "2.0.0 Ok: forwarded"),
            })
            .collect()
    }
    fn abort(&mut self) {
        self.aborted += 1;
        self.body.clear();
    }
    fn replied(&mut self, code: u16) {
        self.codes.push(code);
    }
}

fn limits() -> SessionLimits {
    SessionLimits {
        line_max_bytes: 128,
        message_max_bytes: 1000,
        recipients_max: 3,
        errors_max: 5,
    }
}

/// Runs `input` in chunks of `n`; returns the replies, the mock and whether
/// the session asked to close.
fn run_with(input: &[u8], n: usize, mock: Mock) -> (String, Mock, bool) {
    let s = Session::new("mx.test", "127.0.0.1:1", limits());
    run_session(s, input, n, mock)
}

fn run_session(mut s: Session, input: &[u8], n: usize, mut mock: Mock) -> (String, Mock, bool) {
    let mut out = Vec::new();
    s.greeting(&mut mock, &mut out);
    let mut closed = false;
    for chunk in input.chunks(n) {
        if s.feed(chunk, &mut mock, &mut out) == Flow::Close {
            closed = true;
            break;
        }
    }
    (String::from_utf8(out).unwrap(), mock, closed)
}

/// The same result for every chunk size; returns it.
fn run(input: &[u8]) -> (String, Mock, bool) {
    let whole = run_with(input, input.len(), Mock::default());
    let mut n = 1;
    while n <= 512 {
        let got = run_with(input, n, Mock::default());
        assert_eq!(got, whole, "chunk size {n}");
        n *= 2;
    }
    whole
}

fn codes(replies: &str) -> Vec<&str> {
    replies
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..3])
        .collect()
}

#[test]
fn pipelined_transaction() {
    let input = b"EHLO client.example\r\nMAIL FROM:<a@b.c> SIZE=100\r\nRCPT TO:<X@Y.z>\r\nRCPT TO:<unknown@y.z>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<w@y.z>\r\nDATA\r\nSubject: t\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n";
    let (out, mock, closed) = run(input);
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "250", "550", "250", "250", "354", "250", "221"]
    );
    assert!(out.contains("250-PIPELINING\r\n250-SIZE 1000\r\n"), "{out}");
    assert!(out.contains("550 5.1.1 "), "{out}");
    assert!(closed);
    assert_eq!(mock.begun.len(), 1);
    let env = &mock.begun[0];
    assert_eq!(env.from, "a@b.c");
    assert_eq!(env.helo, "client.example");
    assert!(!env.lmtp, "SMTP, not LMTP");
    let rcpts: Vec<&str> = env.rcpts.iter().map(|m| m.as_str()).collect();
    assert_eq!(rcpts, ["x@y.z", "w@y.z"], "deduplicated, normalised");
    assert_eq!(mock.body, b"Subject: t\r\n\r\n..dot\r\nbody\r\n");
    assert_eq!(mock.finished, 1);
}

#[test]
fn sequence_errors() {
    let input = b"MAIL FROM:<a@b.c>\r\nHELO x\r\nRCPT TO:<x@y.z>\r\nDATA\r\nMAIL FROM:<>\r\nMAIL FROM:<>\r\nDATA\r\nRSET\r\nNOOP\r\nVRFY x\r\nQUIT\r\n";
    let (out, mock, closed) = run(input);
    // The fifth refusal reaches errors_max: 421 and close.
    assert_eq!(
        codes(&out),
        ["220", "503", "250", "503", "503", "250", "503", "554", "421"]
    );
    assert!(mock.begun.is_empty());
    assert!(closed);
    let (out, _, _) = run(b"HELO x\r\nRSET\r\nNOOP\r\nVRFY x\r\nHELP\r\nQUIT\r\n");
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "250", "252", "214", "221"]
    );
}

#[test]
fn rcpt_verdicts_and_recipient_limit() {
    let input = b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<full@y.z>\r\nRCPT TO:<dbdown@y.z>\r\nRCPT TO:<off@y.z>\r\nRCPT TO:<a@y.z>\r\nRCPT TO:<b@y.z>\r\nRCPT TO:<c@y.z>\r\nRCPT TO:<d@y.z>\r\n";
    let (out, _, _) = run(input);
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "552", "451", "550", "250", "250", "250", "452"]
    );
    assert!(out.contains("552 5.2.2"), "{out}");
    assert!(out.contains("451 4.3.0"), "{out}");
    assert!(out.contains("452 4.5.3"), "{out}");
}

#[test]
fn size_declared_too_big() {
    let (out, _, _) = run(b"EHLO x\r\nMAIL FROM:<a@b.c> SIZE=1001\r\n");
    assert_eq!(codes(&out), ["220", "250", "552"]);
    assert!(out.contains("552 5.3.4"));
}

#[test]
fn size_exceeded_during_data() {
    let mut input = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n".to_vec();
    for _ in 0..30 {
        input.extend_from_slice(&[b'a'; 48]);
        input.extend_from_slice(b"\r\n");
    }
    input.extend_from_slice(b".\r\nNOOP\r\n");
    let (out, mock, closed) = run(&input);
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "250", "354", "552", "250"]
    );
    assert_eq!(mock.aborted, 1);
    assert_eq!(mock.finished, 0);
    assert!(mock.body.is_empty());
    assert!(!closed);
}

#[test]
fn smuggled_commands_stay_in_the_message() {
    let input = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nhi\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nevil\r\n.\r\n";
    let (out, mock, _) = run(input);
    assert_eq!(codes(&out), ["220", "250", "250", "250", "354", "250"]);
    assert_eq!(mock.begun.len(), 1);
    assert_eq!(
        mock.body,
        b"hi\r\n..\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nevil\r\n"
    );
    let input = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nhi\r.\r\nRSET\r\n.\r\n";
    let (out, mock, _) = run(input);
    assert_eq!(codes(&out), ["220", "250", "250", "250", "354", "250"]);
    assert_eq!(mock.body, b"hi\r\n..\r\nRSET\r\n");
}

#[test]
fn long_lines_and_error_limit() {
    let mut input = b"EHLO x\r\n".to_vec();
    input.extend_from_slice(&[b'A'; 300]);
    input.extend_from_slice(b"\r\nNOOP\r\n");
    let (out, _, closed) = run(&input);
    assert_eq!(codes(&out), ["220", "250", "500", "250"]);
    assert!(out.contains("500 5.5.6"), "{out}");
    assert!(!closed);
    let (out, _, closed) = run(b"FOO\r\nBAR\r\nBAZ\r\nQUX\r\nQUUX\r\nNOOP\r\n");
    assert_eq!(
        codes(&out),
        ["220", "500", "500", "500", "500", "500", "421"]
    );
    assert!(closed);
}

#[test]
fn data_refused_when_backends_unavailable() {
    let input = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nQUIT\r\n";
    let mock = Mock {
        fail_begin: true,
        ..Mock::default()
    };
    let (out, _, _) = run_with(input, 3, mock);
    assert_eq!(codes(&out), ["220", "250", "250", "250", "451", "221"]);
}

#[test]
fn smtputf8_and_8bitmime_are_accepted() {
    let input = "EHLO x\r\nMAIL FROM:<jö@b.c> BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<ü@y.z>\r\nDATA\r\nñ\r\n.\r\n";
    let (out, mock, _) = run(input.as_bytes());
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "250", "354", "250"],
        "{out}"
    );
    assert!(mock.begun[0].smtputf8);
    assert_eq!(mock.begun[0].rcpts[0].as_str(), "ü@y.z");
    assert!(mock.codes.iter().filter(|&&c| c == 250).count() >= 4);
}

#[test]
fn connection_lost_in_data_aborts() {
    let mut s = Session::new("mx.test", "c", limits());
    let mut mock = Mock::default();
    let mut out = Vec::new();
    s.feed(
        b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\npart",
        &mut mock,
        &mut out,
    );
    assert!(s.in_data());
    s.lost(&mut mock);
    assert_eq!(mock.aborted, 1);
}

#[test]
fn forward_only_recipients_count_but_are_not_local() {
    let input = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<relaynak@y.z>\r\nRCPT TO:<fwd@y.z>\r\nDATA\r\nhi\r\n.\r\n";
    let (out, mock, _) = run(input);
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "550", "250", "354", "250"]
    );
    assert!(out.contains("550 5.7.1 Relay said no"), "{out}");
    assert_eq!(mock.begun[0].accepted, 1);
    assert!(mock.begun[0].rcpts.is_empty());
}

#[test]
fn starttls_discards_pipelined_plain_text_and_starts_over() {
    let mut s = Session::new("mx.test", "c", limits());
    let mut mock = Mock::default();
    let mut out = Vec::new();
    assert_eq!(
        s.feed(b"EHLO x\r\nSTARTTLS\r\n", &mut mock, &mut out),
        Flow::Continue
    );
    assert!(
        String::from_utf8_lossy(&out).contains("502 5.5.1"),
        "not offered"
    );
    s.offer_starttls();
    out.clear();
    assert_eq!(s.feed(b"EHLO x\r\n", &mut mock, &mut out), Flow::Continue);
    assert!(String::from_utf8_lossy(&out).contains("250-STARTTLS\r\n"));
    out.clear();
    let flow = s.feed(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n", &mut mock, &mut out);
    assert_eq!(flow, Flow::StartTls);
    assert_eq!(out, b"220 2.0.0 Ready to start TLS\r\n");
    s.tls_started();
    out.clear();
    s.feed(b"MAIL FROM:<a@b.c>\r\nEHLO x\r\nSTARTTLS\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n.\r\n", &mut mock, &mut out);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(
        codes(&text),
        ["503", "250", "502", "250", "250", "354", "250"],
        "{text}"
    );
    assert!(!text.contains("STARTTLS"), "not offered again: {text}");
    assert!(mock.begun[0].tls);
}

#[test]
fn nul_bytes_in_commands_are_refused() {
    let (out, mock, _) = run(b"HELO a\0b\r\nEHLO ok\r\nMAIL FROM:<a\0@b.c>\r\nQUIT\r\n");
    assert_eq!(codes(&out), ["220", "500", "250", "500", "221"], "{out}");
    assert!(
        out.contains("500 5.5.2 Syntax error, NUL byte in command"),
        "{out}"
    );
    assert!(mock.begun.is_empty());
}

#[test]
fn bare_cr_inside_a_command_is_refused_not_dropped() {
    let (out, mock, _) =
        run(b"EHLO ok\r\nNO\rOP\r\nMAIL FROM:<a@b.c>\rRCPT TO:<x@y.z>\r\nNOOP\r\nQUIT\r\n");
    assert_eq!(
        codes(&out),
        ["220", "250", "500", "500", "250", "221"],
        "{out}"
    );
    assert!(
        out.contains("500 5.5.2 Syntax error, bare CR in command"),
        "{out}"
    );
    assert!(mock.begun.is_empty(), "no MAIL was smuggled in");
}

/// LMTP: the same result for every chunk size; returns it.
fn run_lmtp(input: &[u8]) -> (String, Mock, bool) {
    let lmtp = || Session::new_lmtp("mx.test", "127.0.0.1:1", limits());
    let whole = run_session(lmtp(), input, input.len(), Mock::default());
    let mut n = 1;
    while n <= 512 {
        let got = run_session(lmtp(), input, n, Mock::default());
        assert_eq!(got, whole, "chunk size {n}");
        n *= 2;
    }
    whole
}

#[test]
fn lmtp_one_reply_per_accepted_recipient_in_rcpt_order() {
    let input = b"LHLO mx.example\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<unknown@y.z>\r\nRCPT TO:<quota@y.z>\r\nRCPT TO:<fwd@y.z>\r\nRCPT TO:<X@y.z>\r\nDATA\r\nSubject: t\r\n\r\nbody\r\n.\r\nQUIT\r\n";
    let (out, mock, closed) = run_lmtp(input);
    assert!(out.starts_with("220 mx.test LMTP "), "{out}");
    assert!(out.contains("250-PIPELINING\r\n"), "{out}");
    assert_eq!(
        codes(&out),
        // recipients_max is 3: the fourth accepted one gets 452, and no reply after DATA.
        [
            "220", "250", "250", "250", "550", "250", "250", "452", "354", "250", "552", "250",
            "221"
        ]
    );
    let after_data: Vec<&str> = out.split("354 ").nth(1).unwrap().lines().skip(1).collect();
    assert_eq!(
        after_data,
        [
            "250 2.0.0 Ok: x@y.z",
            "552 5.2.2 Mailbox full",
            "250 2.0.0 Ok: forwarded",
            "221 2.0.0 Bye",
        ]
    );
    assert!(closed);
    assert_eq!(mock.finished, 1);
    let rcpts: Vec<&str> = mock.begun[0].rcpts.iter().map(|m| m.as_str()).collect();
    assert_eq!(rcpts, ["x@y.z", "quota@y.z"], "one copy per local mailbox");
    assert!(mock.begun[0].lmtp, "the envelope says LMTP (trace header)");
    assert_eq!(mock.body, b"Subject: t\r\n\r\nbody\r\n");
}

#[test]
fn lmtp_refuses_helo_and_ehlo_and_needs_lhlo() {
    let input = b"EHLO a\r\nHELO a\r\nMAIL FROM:<a@b.c>\r\nLHLO a\r\nMAIL FROM:<a@b.c>\r\nQUIT\r\n";
    let (out, mock, _) = run_lmtp(input);
    assert_eq!(
        codes(&out),
        ["220", "500", "500", "503", "250", "250", "221"]
    );
    assert!(out.contains("503 5.5.1 Send LHLO first"), "{out}");
    assert!(mock.begun.is_empty());
    // And plain SMTP still refuses LHLO.
    let (out, _, _) = run(b"LHLO a\r\nQUIT\r\n");
    assert_eq!(codes(&out), ["220", "500", "221"]);
}

#[test]
fn lmtp_data_without_recipients_is_503_and_too_big_is_552_for_each() {
    let input = b"LHLO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<unknown@y.z>\r\nDATA\r\nRSET\r\nQUIT\r\n";
    let (out, mock, _) = run_lmtp(input);
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "550", "503", "250", "221"]
    );
    assert_eq!(mock.finished, 0);
    let mut input =
        b"LHLO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<w@y.z>\r\nDATA\r\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 2000));
    input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
    let (out, mock, _) = run_lmtp(&input);
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "250", "250", "354", "552", "552", "221"]
    );
    assert_eq!(mock.finished, 0);
    assert_eq!(mock.aborted, 1);
}

#[test]
fn lmtp_rset_forgets_recipients_between_transactions() {
    let input = b"LHLO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<w@y.z>\r\nRSET\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<quota@y.z>\r\nDATA\r\nhi\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<w@y.z>\r\nDATA\r\nho\r\n.\r\nQUIT\r\n";
    let (out, mock, _) = run_lmtp(input);
    assert_eq!(
        codes(&out),
        [
            "220", "250", "250", "250", "250", "250", "250", "250", "354", "552", "250", "250",
            "354", "250", "221"
        ]
    );
    assert!(out.contains("250 2.0.0 Ok: w@y.z\r\n221"), "{out}");
    assert_eq!(mock.finished, 2);
}

#[test]
fn shutdown_waits_for_the_transaction_then_says_421() {
    let mut mock = Mock::default();
    let mut s = Session::new("mx.test", "127.0.0.1:1", limits());
    let mut out = Vec::new();
    s.greeting(&mut mock, &mut out);
    assert!(!s.in_transaction());
    s.feed(b"EHLO a\r\nMAIL FROM:<a@b.c>\r\n", &mut mock, &mut out);
    assert!(s.in_transaction(), "MAIL opens it");
    s.feed(b"RCPT TO:<x@y.z>\r\nDATA\r\nhalf", &mut mock, &mut out);
    assert!(s.in_transaction() && s.in_data());
    s.feed(b"\r\n.\r\n", &mut mock, &mut out);
    assert!(!s.in_transaction(), "the reply to DATA ends it");
    out.clear();
    s.shutting_down(&mut mock, &mut out);
    assert_eq!(out, b"421 4.3.2 mx.test Service shutting down\r\n");
    assert_eq!(s.feed(b"NOOP\r\n", &mut mock, &mut out), Flow::Close);
    assert_eq!(mock.finished, 1);
    assert_eq!(mock.aborted, 0);
}
