//! The hostile-input suite (issue #6): for SMTP, POP3, the backend protocol
//! (PPL/1) and the admin ports — 1 MiB lines, NUL and 8-bit bytes, commands
//! out of order, pipelining floods, slow clients against every time-out,
//! more connections than the maximum, oversized messages, password
//! guessing, hostile mailbox names and a backend connection without the
//! secret. Each case must get a clear protocol error or a close, while a
//! "witness" client on the same daemon is served normally at the same time;
//! at the end every message stored before and during the cases is still
//! there, byte for byte.
//!
//! The cases every protocol must survive alike (a 1 MiB line, NUL and 8-bit
//! bytes, bare CR and LF, a huge count, slowloris) are one table,
//! [`Case`] x [`Proto`] (SMTP, LMTP, POP3, PPL/1); the tests per protocol
//! keep what only that protocol has.
//!
//! Hostile POP3 connections come from other loopback addresses
//! (127.0.0.2...) so that the per-IP login lock-out they provoke does not
//! lock out the witness on 127.0.0.1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::*;
use powermail_proto::{BackendConn, MailboxName, MessageId};

/// Writes a line to the real stderr (libtest captures only the print macros).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A raw client connection for hostile bytes.
struct Raw {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

/// Next source address for a hostile connection (127.0.0.2 ... 127.0.0.254).
fn next_source() -> Ipv4Addr {
    static NEXT: AtomicU8 = AtomicU8::new(2);
    Ipv4Addr::new(127, 0, 0, NEXT.fetch_add(1, Relaxed).clamp(2, 254))
}

/// A TCP connection from `src` (bound before connect) to `dst`.
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    connect_with(src, dst, None)
}

/// [`connect_from`] with a fixed receive buffer of `rcvbuf` bytes (which
/// turns off the kernel's autotuning, up to 32 MiB on loopback here), so
/// that a client that stops reading makes the server's writes block.
fn connect_with(src: Ipv4Addr, dst: SocketAddr, rcvbuf: Option<i32>) -> std::io::Result<TcpStream> {
    // SAFETY: plain socket/bind/connect on a descriptor we own; the structs
    // are fully initialised and sized for the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let sa = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        if let Some(bytes) = rcvbuf {
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &bytes as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sa(src, 0);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let SocketAddr::V4(d) = dst else {
            return Err(std::io::Error::other("IPv4 only"));
        };
        let remote = sa(*d.ip(), d.port());
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

impl Raw {
    /// Connects from 127.0.0.1; `greeting` lines are read and returned.
    fn open(addr: SocketAddr, greeting: bool) -> (Raw, String) {
        Raw::wrap(connect(addr).expect("connect"), greeting)
    }

    /// Connects from a fresh loopback source address.
    fn open_elsewhere(addr: SocketAddr, greeting: bool) -> (Raw, String) {
        Raw::wrap(
            connect_from(next_source(), addr).expect("connect"),
            greeting,
        )
    }

    fn wrap(s: TcpStream, greeting: bool) -> (Raw, String) {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut raw = Raw {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: s,
        };
        let g = if greeting {
            raw.line().unwrap_or_default()
        } else {
            String::new()
        };
        (raw, g)
    }

    /// One line (CRLF trimmed); `None` when the server closed (or reset)
    /// the connection or went silent for 20 s.
    fn line(&mut self) -> Option<String> {
        let mut l = Vec::new();
        match self.r.read_until(b'\n', &mut l) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(String::from_utf8_lossy(&l).trim_end().to_string()),
        }
    }

    /// One SMTP reply (continuation lines skipped): its last line.
    fn smtp_reply(&mut self) -> Option<String> {
        loop {
            let l = self.line()?;
            if l.as_bytes().get(3) != Some(&b'-') {
                return Some(l);
            }
        }
    }

    /// Writes bytes; false if the server already closed.
    fn send(&mut self, b: &[u8]) -> bool {
        self.w.write_all(b).is_ok()
    }

    /// Writes `b` from another thread (for inputs bigger than the socket
    /// buffers, which the server may refuse before reading them all).
    fn send_in_background(&self, b: Vec<u8>) -> std::thread::JoinHandle<()> {
        let mut w = self.w.try_clone().expect("clone");
        std::thread::spawn(move || {
            let _ = w.write_all(&b);
        })
    }

    /// Reads until the server closes; true if it did within `limit`.
    fn closed_within(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        let _ = self.w.set_read_timeout(Some(limit));
        let mut buf = [0u8; 65536];
        loop {
            match self.r.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {
                    if start.elapsed() > limit {
                        return false;
                    }
                }
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }
}

/// Opens connections until `n` are greeted with `welcome` (a slot freed by
/// an earlier client may be released a moment after its close, so a
/// refused one is retried, boundedly).
fn fill_slots(n: usize, open: impl Fn() -> (Raw, String), welcome: &str) -> Vec<Raw> {
    let mut held = Vec::new();
    let start = Instant::now();
    while held.len() < n {
        assert!(start.elapsed() < DEADLINE, "could not take {n} connections");
        let (c, g) = open();
        if g.starts_with(welcome) {
            held.push(c);
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    held
}

/// The tally of a suite.
#[derive(Default)]
struct Tally {
    cases: usize,
    refused: usize,
    closed: usize,
    witness: usize,
}

impl Tally {
    /// `reply` of case `what` must be a refusal (per `is_refusal`) or a close.
    fn expect(&mut self, what: &str, reply: Option<String>, is_refusal: fn(&str) -> bool) {
        self.cases += 1;
        match reply {
            None => self.closed += 1,
            Some(l) => {
                assert!(
                    is_refusal(&l),
                    "{what}: expected a refusal or a close, got {l:?}"
                );
                self.refused += 1;
            }
        }
    }
}

impl Tally {
    /// The suite's line on stderr (`lost=0`: callers verify the witness first).
    fn report(&self, suite: &str) {
        report(&format!(
            "hostile {suite}: cases={} refused={} closed={} witness_served={} lost=0",
            self.cases, self.refused, self.closed, self.witness
        ));
    }
}

/// Every link on every backend is in the witness's mailbox (no hostile
/// recipient or name got anything stored).
fn assert_only_witness_mail(sys: &System) {
    for b in &sys.backends {
        for (mailbox, _) in b.links() {
            assert_eq!(mailbox, user(0), "only the witness mailbox holds mail");
        }
    }
}

fn smtp_refusal(l: &str) -> bool {
    l.starts_with('4') || l.starts_with('5')
}

fn pop_refusal(l: &str) -> bool {
    l.starts_with("-ERR")
}

fn http_refusal(l: &str) -> bool {
    l.starts_with("HTTP/1.") && matches!(l.as_bytes().get(9), Some(b'4') | Some(b'5'))
}

/// The witness: a normal client of every port, served while a hostile one
/// is connected. Delivers one message to mailbox 0 and remembers it.
struct Witness {
    n: AtomicUsize,
    sent: std::sync::Mutex<Vec<(String, [u8; 32])>>,
}

impl Witness {
    fn new() -> Witness {
        Witness {
            n: AtomicUsize::new(0),
            sent: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// One SMTP delivery, one POP3 login, one PPL/1 PING on every backend
    /// and one GET /stats on every admin port; panics unless all succeed.
    fn check(&self, sys: &System, tally: &mut Tally) {
        let id = format!("witness-{}", self.n.fetch_add(1, Relaxed));
        let msg = message(&id, 800);
        let mut c = Smtp::connect(sys.smtp.addr).expect("witness: SMTP connect");
        let code = c
            .send("w@sender.test", &[&user(0)], &msg)
            .expect("witness: SMTP");
        assert_eq!(code, 250, "witness: SMTP delivery\n{}", sys.logs());
        c.quit();
        self.sent.lock().expect("lock").push((id, sha(&msg)));
        let mut p = pop_login(sys.pop.addr, 0).expect("witness: POP login");
        assert!(p.cmd("STAT").expect("STAT").starts_with("+OK"));
        p.quit().expect("witness: QUIT");
        for b in &sys.backends {
            let mut conn = BackendConn::connect(b.addr, SECRET.as_bytes(), IO_TIMEOUT)
                .expect("witness: backend connect");
            conn.ping().expect("witness: PING");
        }
        let mut admins = vec![sys.smtp.admin, sys.pop.admin];
        admins.extend(sys.backends.iter().map(|b| b.admin));
        for a in admins {
            let (code, _) = http(a, "GET", "/stats", Some(TOKEN)).expect("witness: admin");
            assert_eq!(code, 200, "witness: GET /stats on {a}");
        }
        tally.witness += 1;
    }

    /// Everything the witness delivered is in mailbox 0, byte for byte.
    fn verify(&self, sys: &System) {
        let got = retrieve_all(sys.pop.addr, 1, 1);
        for (id, hash) in self.sent.lock().expect("lock").iter() {
            let copies = got.get(id).map(Vec::as_slice).unwrap_or_default();
            assert_eq!(copies.len(), 1, "{id} lost or duplicated");
            assert_eq!(&copies[0].2, hash, "{id} changed");
        }
    }
}

const BACKEND_LIMITS: &str =
    "connections_per_backend_max = 48\nidle_timeout_ms = 3000\nmessage_max_bytes = 33554432\n";
const SMTP_LIMITS: &str = "connections_max = 8\nmessage_max_bytes = 65536\nerrors_max = 10\n\
                           command_timeout_ms = 1500\ndata_timeout_ms = 1500\n";
const POP_LIMITS: &str = "connections_max = 8\nidle_timeout_ms = 1500\nsend_timeout_ms = 1500\n";
const POP_THROTTLE: &str =
    "[throttle]\nfailure_delay_ms = 10\nfailures_max = 5\nwindow_ms = 60000\nlockout_ms = 60000\n";

fn system() -> System {
    let spec = SystemSpec {
        backend_limits: BACKEND_LIMITS.into(),
        smtp_limits: SMTP_LIMITS.into(),
        pop_limits: POP_LIMITS.into(),
        smtp_top: format!("lmtp_listen = \"{}\"", free_addr()),
        pop_tables: POP_THROTTLE.into(),
    };
    System::start_spec(2, 1, 4, &spec)
}

/// The start of every test here: one test at a time, a fresh [`system`],
/// and the witness served once before any hostile byte.
fn begin() -> (std::sync::MutexGuard<'static, ()>, System, Witness, Tally) {
    let guard = serial();
    let sys = system();
    let w = Witness::new();
    let mut t = Tally::default();
    w.check(&sys, &mut t);
    (guard, sys, w, t)
}

/// Hostile mailbox names (for RCPT, USER, LIST).
fn hostile_names() -> Vec<Vec<u8>> {
    vec![
        b"../../etc/passwd@sys.test".to_vec(),
        b"a/b@sys.test".to_vec(),
        b"/abs@sys.test".to_vec(),
        b"nul\0byte@sys.test".to_vec(),
        format!("{}@sys.test", "x".repeat(300)).into_bytes(),
        b"o'hara\"--@sys.test".to_vec(),
        b"x'; DROP TABLE mailboxes; --@sys.test".to_vec(),
        b"u0@sys.test' OR '1'='1".to_vec(),
        b"\xff\xfe@sys.test".to_vec(),
        b"..@sys.test".to_vec(),
    ]
}

fn mib_line(prefix: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend(std::iter::repeat_n(b'A', 1 << 20));
    v.extend_from_slice(b"\r\n");
    v
}

/// A protocol every generic hostile [`Case`] runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Smtp,
    Lmtp,
    Pop3,
    /// The backend protocol, after AUTH.
    Ppl,
}

impl Proto {
    const ALL: [Proto; 4] = [Proto::Smtp, Proto::Lmtp, Proto::Pop3, Proto::Ppl];

    /// A connection in the state where commands are read: SMTP after EHLO,
    /// LMTP after LHLO, POP3 greeted (from another loopback address, see the
    /// module doc), PPL/1 authenticated.
    fn open(self, sys: &System) -> Raw {
        let hello = |addr, cmd: &[u8]| {
            let (mut c, g) = Raw::open(addr, true);
            assert!(g.starts_with("220"), "{self:?} greeting: {g}");
            c.send(cmd);
            let r = c.smtp_reply().unwrap_or_default();
            assert!(r.starts_with("250"), "{self:?} hello: {r}");
            c
        };
        match self {
            Proto::Smtp => hello(sys.smtp.addr, b"EHLO x\r\n"),
            Proto::Lmtp => hello(sys.smtp.addr("lmtp"), b"LHLO x\r\n"),
            Proto::Pop3 => {
                let (c, g) = Raw::open_elsewhere(sys.pop.addr, true);
                assert!(g.starts_with("+OK"), "POP3 greeting: {g}");
                c
            }
            Proto::Ppl => ppl_authenticated(sys.backends[0].addr),
        }
    }

    /// Whether `line` is this protocol's refusal.
    fn refusal(self) -> fn(&str) -> bool {
        match self {
            Proto::Smtp | Proto::Lmtp => smtp_refusal,
            Proto::Pop3 | Proto::Ppl => pop_refusal,
        }
    }

    /// A command whose count is far beyond every limit (and beyond u64).
    fn huge_count(self) -> &'static [u8] {
        match self {
            Proto::Smtp | Proto::Lmtp => b"BDAT 99999999999999999999999 LAST\r\n",
            Proto::Pop3 => b"TOP 99999999999999999999999 99999999999999999999999\r\n",
            // (A huge LIST maximum is clamped, not refused: `+OK 0`.)
            Proto::Ppl => b"PUT huge 99999999999999999999999\r\n",
        }
    }
}

/// The longest a silent or half-sent client may stay connected (command,
/// idle and AUTH time-outs are 1.5 to 3 s in [`system`]).
const IDLE_LIMIT: Duration = Duration::from_secs(15);

/// The hostile inputs every protocol must survive the same way.
#[derive(Clone, Copy, Debug)]
enum Case {
    /// A 1 MiB command line.
    LongLine,
    /// A NUL byte inside a verb.
    Nul,
    /// A line of bytes that are not ASCII.
    EightBit,
    /// A bare CR inside a line: a refusal however it is read (as a line
    /// end, dropped, or kept, `XX`, `YY` and `XXYY` are no verbs). powersmtp
    /// refuses any line with one (`500 5.5.2 ... bare CR`).
    BareCr,
    /// A bare LF inside a line (the same, for a lone LF).
    BareLf,
    /// A count beyond every limit ([`Proto::huge_count`]).
    HugeCount,
    /// Slowloris: half a command, then silence.
    Slowloris,
}

impl Case {
    const ALL: [Case; 7] = [
        Case::LongLine,
        Case::Nul,
        Case::EightBit,
        Case::BareCr,
        Case::BareLf,
        Case::HugeCount,
        Case::Slowloris,
    ];

    /// The bytes this case sends in `proto`.
    fn bytes(self, proto: Proto) -> Vec<u8> {
        match self {
            Case::LongLine => mib_line(b"NOOP "),
            Case::Nul => b"NO\0OP\r\n".to_vec(),
            Case::EightBit => b"\xff\xfe\xfd\r\n".to_vec(),
            Case::BareCr => b"XX\rYY\r\n".to_vec(),
            Case::BareLf => b"XX\nYY\r\n".to_vec(),
            Case::HugeCount => proto.huge_count().to_vec(),
            Case::Slowloris => b"NOO".to_vec(),
        }
    }

    /// Runs the case on a fresh connection of `proto` while the witness is
    /// served; panics unless the answer is `proto`'s refusal (or a close) or,
    /// for a slow client, the connection is closed in time.
    fn run(self, proto: Proto, sys: &System, w: &Witness, t: &mut Tally) {
        let what = format!("{self:?} on {proto:?}");
        let mut c = proto.open(sys);
        // Bigger than the socket buffers: written while the server refuses.
        let writer = c.send_in_background(self.bytes(proto));
        w.check(sys, t);
        match self {
            Case::Slowloris => {
                t.cases += 1;
                t.closed += 1;
                assert!(c.closed_within(IDLE_LIMIT), "{what}: not closed");
            }
            _ => {
                let reply = match proto {
                    Proto::Smtp | Proto::Lmtp => c.smtp_reply(),
                    Proto::Pop3 | Proto::Ppl => c.line(),
                };
                t.expect(&what, reply, proto.refusal());
            }
        }
        drop(c);
        let _ = writer.join();
    }
}

#[test]
fn every_hostile_case_on_every_protocol() {
    let (_g, sys, w, mut t) = begin();
    for proto in Proto::ALL {
        for case in Case::ALL {
            case.run(proto, &sys, &w, &mut t);
        }
    }
    // Nothing was stored by the cases, and the witness lost nothing.
    assert_only_witness_mail(&sys);
    w.verify(&sys);
    t.report(&format!(
        "table ({} protocols x {} cases)",
        Proto::ALL.len(),
        Case::ALL.len()
    ));
}

#[test]
fn smtp_hostile_input() {
    let (_g, sys, w, mut t) = begin();
    let addr = sys.smtp.addr;

    // (Long lines, NUL, 8-bit, bare CR/LF, huge counts and slowloris are in
    // the table of every_hostile_case_on_every_protocol.)
    // NUL and 8-bit bytes in arguments, then out-of-order commands.
    let (mut c, _) = Raw::open(addr, true);
    for cmd in [
        &b"HELO a\0b\r\n"[..],
        b"EH\xffLO x\r\n",
        b"MAIL FROM:<\0@x>\r\n",
        b"DATA\r\n",
        b"RCPT TO:<u0@sys.test>\r\n",
        b"BDAT 10 LAST\r\n",
        b"AUTH PLAIN AHUwAHB3LTA=\r\n",
    ] {
        c.send(cmd);
        w.check(&sys, &mut t);
        t.expect(&format!("{cmd:?}"), c.line(), smtp_refusal);
    }

    // Hostile names in RCPT (after a valid MAIL); SQL quotes included.
    for name in hostile_names() {
        let (mut c, _) = Raw::open(addr, true);
        c.send(b"EHLO x\r\nMAIL FROM:<a@sender.test>\r\n");
        assert!(c.smtp_reply().is_some_and(|l| l.starts_with("250")));
        assert!(c.smtp_reply().is_some_and(|l| l.starts_with("250")));
        let mut cmd = b"RCPT TO:<".to_vec();
        cmd.extend_from_slice(&name);
        cmd.extend_from_slice(b">\r\n");
        c.send(&cmd);
        let r = c.smtp_reply();
        assert!(
            r.as_deref().is_none_or(|l| l.starts_with('5')),
            "RCPT {name:?} must be refused permanently: {r:?}"
        );
        t.expect("hostile RCPT", r, smtp_refusal);
    }
    w.check(&sys, &mut t);

    // Guessing AUTH (not offered): errors_max closes the session.
    let (mut c, _) = Raw::open(addr, true);
    let mut closed = false;
    for _ in 0..30 {
        if !c.send(b"AUTH LOGIN dXNlcg==\r\n") {
            closed = true;
            break;
        }
        match c.line() {
            None => {
                closed = true;
                break;
            }
            Some(l) => assert!(smtp_refusal(&l), "{l}"),
        }
    }
    assert!(closed, "errors_max ends an AUTH brute force");
    t.expect("AUTH brute force", None, smtp_refusal);
    w.check(&sys, &mut t);

    // A pipelining flood: 100,000 NOOPs written without reading.
    let (mut c, _) = Raw::open(addr, true);
    let flood = b"NOOP\r\n".repeat(100_000);
    let writer = c.send_in_background(flood);
    w.check(&sys, &mut t);
    let mut answered = 0;
    while let Some(l) = c.line() {
        if l.starts_with('4') {
            break; // closed with a reason: allowed
        }
        assert!(l.starts_with("250"), "{l}");
        answered += 1;
        if answered == 100_000 {
            break;
        }
    }
    let _ = writer.join();
    t.cases += 1;
    report(&format!(
        "hostile smtp: NOOP flood answered {answered}/100000"
    ));

    // Over the size limit: announced (MAIL SIZE=) and not announced.
    drop(c);
    let (mut c, _) = Raw::open(addr, true);
    c.send(b"EHLO x\r\n");
    c.smtp_reply();
    c.send(b"MAIL FROM:<a@sender.test> SIZE=10000000\r\n");
    t.expect("SIZE over the limit", c.line(), smtp_refusal);
    let mut s = Smtp::connect(addr).expect("connect");
    let big = message("too-big", 200_000);
    let code = s.send("a@sender.test", &[&user(1)], &big).expect("send");
    assert_eq!(code, 552, "over message_max_bytes");
    t.cases += 1;
    t.refused += 1;
    drop((c, s));
    w.check(&sys, &mut t);

    // A slow client silent in the middle of DATA.
    let (mut mid, _) = Raw::open(addr, true);
    mid.send(
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<u1@sys.test>\r\nDATA\r\nSubject: half\r\n",
    );
    w.check(&sys, &mut t);
    assert!(
        mid.closed_within(IDLE_LIMIT),
        "data_timeout_ms closes stalled DATA"
    );
    t.cases += 1;
    t.closed += 1;

    // More connections than connections_max (8).
    let held = fill_slots(8, || Raw::open(addr, true), "220");
    let (mut extra, g) = Raw::open(addr, false);
    let g = if g.is_empty() { extra.line() } else { Some(g) };
    assert!(
        g.as_deref().is_some_and(|l| l.starts_with("421")),
        "over connections_max: {g:?}"
    );
    t.expect("connections_max", g, smtp_refusal);
    drop(held);
    drop(extra);
    // The slots free up as the daemon notices the closes.
    eventually(DEADLINE, "a slot is free again", || {
        Smtp::connect(addr).is_ok()
    });
    w.check(&sys, &mut t);

    // Nothing for hostile recipients was stored, and the witness lost nothing.
    assert_only_witness_mail(&sys);
    w.verify(&sys);
    t.report("smtp");
}

#[test]
fn pop_hostile_input() {
    let (_g, sys, w, mut t) = begin();
    let addr = sys.pop.addr;
    // A big message for mailbox 1, stored straight on a backend (powersmtp's
    // size limit is small here), for the slow-reader case.
    let big = message("big", 24 << 20);
    sys.backends[0]
        .conn()
        .put(
            &MessageId::parse("big").expect("id"),
            &[MailboxName::parse(&user(1)).expect("name")],
            &big,
        )
        .expect("PUT big");

    // NUL in an argument and out-of-order commands (the generic cases are
    // in every_hostile_case_on_every_protocol).
    let (mut c, _) = Raw::open_elsewhere(addr, true);
    for cmd in [
        &b"RETR 1\r\n"[..],
        b"PASS x\r\n",
        b"DELE 1\r\n",
        b"USER a\0b\r\n",
        b"STAT\0\r\n",
    ] {
        c.send(cmd);
        w.check(&sys, &mut t);
        t.expect(&format!("{cmd:?}"), c.line(), pop_refusal);
    }

    // Hostile names as USER: the login fails (USER may be +OK, PASS is not).
    for name in hostile_names() {
        let (mut c, _) = Raw::open_elsewhere(addr, true);
        let mut cmd = b"USER ".to_vec();
        cmd.extend_from_slice(&name);
        cmd.extend_from_slice(b"\r\n");
        c.send(&cmd);
        let r = c.line();
        let r = if r.as_deref().is_some_and(|l| l.starts_with("+OK")) {
            c.send(b"PASS pw-0\r\n");
            c.line()
        } else {
            r
        };
        t.expect(&format!("USER {name:?}"), r, pop_refusal);
    }
    w.check(&sys, &mut t);

    // Password guessing on mailbox 2 from one address: lock-out, then even
    // the right password is refused; the witness (another IP, another
    // account) is not affected.
    let src = next_source();
    let mut locked = false;
    for i in 0..12 {
        let (mut c, _) = Raw::wrap(connect_from(src, addr).expect("connect"), true);
        c.send(format!("USER {}\r\nPASS guess-{i}\r\n", user(2)).as_bytes());
        let _ = c.line();
        let r = c.line().unwrap_or_default();
        assert!(r.starts_with("-ERR"), "{r}");
        locked |= r.contains("too many");
    }
    assert!(locked, "failures_max locks out a brute force");
    let (mut c, _) = Raw::wrap(connect_from(src, addr).expect("connect"), true);
    c.send(format!("USER {}\r\nPASS {}\r\n", user(2), password(2)).as_bytes());
    let _ = c.line();
    t.expect("locked out", c.line(), pop_refusal);
    w.check(&sys, &mut t);

    // A pipelining flood after login.
    let (mut c, _) = Raw::open_elsewhere(addr, true);
    c.send(format!("USER {}\r\nPASS {}\r\n", user(3), password(3)).as_bytes());
    assert!(c.line().is_some_and(|l| l.starts_with("+OK")));
    assert!(
        c.line().is_some_and(|l| l.starts_with("+OK")),
        "login of mailbox 3"
    );
    let writer = c.send_in_background(b"NOOP\r\n".repeat(100_000));
    w.check(&sys, &mut t);
    let mut answered = 0;
    while let Some(l) = c.line() {
        assert!(l.starts_with("+OK"), "{l}");
        answered += 1;
        if answered == 100_000 {
            break;
        }
    }
    let _ = writer.join();
    t.cases += 1;
    report(&format!(
        "hostile pop: NOOP flood answered {answered}/100000"
    ));

    // Slow clients: idle after login, and a reader that never reads a
    // 24 MiB RETR (send_timeout_ms).
    let (mut idle_auth, _) = Raw::open_elsewhere(addr, true);
    idle_auth.send(format!("USER {}\r\nPASS {}\r\n", user(3), password(3)).as_bytes());
    let (mut stalled, _) = Raw::wrap(
        connect_with(next_source(), addr, Some(64 << 10)).expect("connect"),
        true,
    );
    stalled.send(format!("USER {}\r\nPASS {}\r\nRETR 1\r\n", user(1), password(1)).as_bytes());
    std::thread::sleep(Duration::from_secs(3));
    w.check(&sys, &mut t);
    assert!(
        idle_auth.closed_within(IDLE_LIMIT),
        "idle_timeout_ms after login"
    );
    // send_timeout_ms is a deadline for the whole answer (trickles of window
    // do not restart it): the RETR is cut about 1.5 s after it began.
    eventually(DEADLINE, "powerpop gives up on the stalled reader", || {
        sys.pop.log_text().contains("broke off mid-stream")
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match stalled.r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(
        got < big.len(),
        "send_timeout_ms cut the stalled RETR ({got} bytes)"
    );
    t.cases += 2;
    t.closed += 2;

    // More connections than connections_max (8).
    let held = fill_slots(8, || Raw::open_elsewhere(addr, true), "+OK");
    let (mut extra, g) = Raw::open_elsewhere(addr, true);
    let g = if g.is_empty() { extra.line() } else { Some(g) };
    t.expect("connections_max", g, pop_refusal);
    drop(held);
    drop(extra);
    eventually(DEADLINE, "a slot is free again", || {
        Pop::connect(addr).is_ok()
    });
    w.check(&sys, &mut t);

    // Nothing was lost: the big message is whole, the witness's are there.
    let got = retrieve_all(addr, 2, 1);
    assert_eq!(got["big"][0].2, sha(&big), "the big message is intact");
    w.verify(&sys);
    t.report("pop");
}

/// A raw PPL/1 connection that has passed AUTH.
fn ppl_authenticated(addr: SocketAddr) -> Raw {
    let (mut c, g) = Raw::open(addr, true);
    let nonce = g
        .split(' ')
        .nth(3)
        .expect("nonce in the greeting")
        .to_string();
    let proof = powermail_proto::auth::proof(SECRET.as_bytes(), &nonce);
    c.send(format!("AUTH {proof}\r\n").as_bytes());
    let r = c.line().unwrap_or_default();
    assert!(r.starts_with("+OK"), "AUTH: {r}");
    c
}

#[test]
fn backend_protocol_hostile_input() {
    let (_g, sys, w, mut t) = begin();
    let addr = sys.backends[0].addr;
    let before: Vec<_> = sys.backends.iter().map(Backend::links).collect();

    // Without the secret: every verb refused, connection closed.
    for cmd in [
        &b"LIST u0@sys.test\r\n"[..],
        b"DIR\r\n",
        b"PUT x 1\r\n",
        b"READONLY\r\n",
        b"AUTH 00\r\n",
        b"AUTH 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n",
    ] {
        let (mut c, g) = Raw::open(addr, true);
        assert!(g.starts_with("+OK PPL/1"), "{g}");
        c.send(cmd);
        w.check(&sys, &mut t);
        let r = c.line();
        assert!(
            r.as_deref().is_none_or(|l| l.contains("[AUTH]")),
            "{cmd:?}: {r:?}"
        );
        t.expect(&format!("unauthenticated {cmd:?}"), r, pop_refusal);
        assert!(
            c.closed_within(Duration::from_secs(10)),
            "closed after [AUTH]"
        );
    }
    // A replayed proof from another connection's nonce.
    let (_, g) = Raw::open(addr, true);
    let old = powermail_proto::auth::proof(SECRET.as_bytes(), g.split(' ').nth(3).unwrap_or(""));
    let (mut c, _) = Raw::open(addr, true);
    c.send(format!("AUTH {old}\r\n").as_bytes());
    t.expect("replayed AUTH", c.line(), pop_refusal);

    // A 1 MiB line before AUTH (after AUTH it is in the table of
    // every_hostile_case_on_every_protocol).
    let (mut c, _) = Raw::open(addr, true);
    let writer = c.send_in_background(mib_line(b"AUTH "));
    w.check(&sys, &mut t);
    t.expect("1 MiB line before AUTH", c.line(), pop_refusal);
    drop(writer);

    // NUL, unknown verbs, hostile names, after AUTH.
    let mut c = ppl_authenticated(addr);
    let mut cmds: Vec<Vec<u8>> = vec![
        b"LIST\r\n".to_vec(),
        b"GET u0@sys.test\r\n".to_vec(),
        b"FROB\r\n".to_vec(),
        b"L\0IST u0@sys.test\r\n".to_vec(),
        b"GET u0@sys.test ../../../etc/passwd\r\n".to_vec(),
        b"DEL u0@sys.test a/b\r\n".to_vec(),
    ];
    for name in hostile_names() {
        for verb in [&b"LIST "[..], b"USAGE ", b"NUKE "] {
            let mut cmd = verb.to_vec();
            cmd.extend_from_slice(&name);
            cmd.extend_from_slice(b"\r\n");
            cmds.push(cmd);
        }
    }
    for cmd in &cmds {
        if !c.send(cmd) {
            c = ppl_authenticated(addr);
            c.send(cmd);
        }
        let r = c.line();
        if r.is_none() {
            c = ppl_authenticated(addr);
        }
        t.expect(&format!("{cmd:?}"), r, pop_refusal);
    }
    // PUTs with a bad id or bad mailbox lines: refused after the (empty) body.
    let mut puts: Vec<Vec<u8>> = vec![b"PUT ../x 1\r\nu0@sys.test\r\n0\r\n".to_vec()];
    for name in hostile_names().into_iter().filter(|n| !n.contains(&0)) {
        let mut p = b"PUT okid 1\r\n".to_vec();
        p.extend_from_slice(&name);
        p.extend_from_slice(b"\r\n5\r\nhello0\r\n");
        puts.push(p);
    }
    for p in &puts {
        let mut c = ppl_authenticated(addr);
        c.send(p);
        let r = c.line();
        assert!(
            r.as_deref().is_none_or(|l| l.starts_with("-ERR")),
            "{p:?}: {r:?}"
        );
        t.expect("hostile PUT", r, pop_refusal);
    }
    w.check(&sys, &mut t);

    // A pipelining flood of PINGs.
    let c = ppl_authenticated(addr);
    let mut c = c;
    let writer = c.send_in_background(b"PING\r\n".repeat(100_000));
    w.check(&sys, &mut t);
    let mut answered = 0;
    while let Some(l) = c.line() {
        assert!(l.starts_with("+OK"), "{l}");
        answered += 1;
        if answered == 100_000 {
            break;
        }
    }
    let _ = writer.join();
    t.cases += 1;
    report(&format!(
        "hostile ppl: PING flood answered {answered}/100000"
    ));

    // Over message_max_bytes (32 MiB here): [TOOBIG], nothing stored.
    let mut conn = sys.backends[0].conn();
    let mb = MailboxName::parse(&user(3)).expect("name");
    conn.put_begin(
        &MessageId::parse("huge").expect("id"),
        std::slice::from_ref(&mb),
    )
    .expect("PUT");
    let chunk = vec![b'x'; 1 << 20];
    let mut refused = None;
    for _ in 0..40 {
        if let Err(e) = conn.put_chunk(&chunk) {
            refused = Some(e.to_string());
            break;
        }
    }
    let r = match refused {
        Some(e) => e,
        None => conn
            .put_end()
            .and_then(|_| conn.put_reply())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    };
    assert!(
        r.contains("TOOBIG") || r.contains("closed") || r.contains("reset") || r.contains("pipe"),
        "{r}"
    );
    t.cases += 1;
    t.refused += 1;
    assert!(sys.backends[0]
        .conn()
        .list(&mb, 10)
        .expect("LIST")
        .is_empty());

    // Slow clients: silent before AUTH, stalled in a PUT body (silent after
    // AUTH is in the table).
    let (mut idle, _) = Raw::open(addr, true);
    let mut stalled = ppl_authenticated(addr);
    stalled.send(b"PUT stalled 1\r\nu3@sys.test\r\n");
    w.check(&sys, &mut t);
    for (what, c) in [("before AUTH", &mut idle), ("mid-PUT", &mut stalled)] {
        assert!(c.closed_within(IDLE_LIMIT), "idle_timeout_ms {what}");
    }
    t.cases += 2;
    t.closed += 2;
    assert!(sys.backends[0]
        .conn()
        .list(&mb, 10)
        .expect("LIST")
        .is_empty());

    // More connections than connections_per_backend_max (48).
    let held: Vec<(Raw, String)> = (0..60).map(|_| Raw::open(addr, true)).collect();
    let refused = held
        .iter()
        .filter(|(_, g)| g.contains("[LIMIT]") || g.is_empty())
        .count();
    assert!(
        refused >= 60 - 48,
        "over the connection limit: {refused} refused"
    );
    t.cases += 1;
    t.refused += 1;
    drop(held);
    eventually(DEADLINE, "a slot is free again", || {
        BackendConn::connect(addr, SECRET.as_bytes(), IO_TIMEOUT)
            .and_then(|mut c| c.ping())
            .is_ok()
    });
    // The frontends' health checks were refused too: let them see it up again.
    std::thread::sleep(Duration::from_secs(1));
    w.check(&sys, &mut t);

    // Nothing stored before was lost, no stray names appeared on disk.
    for (b, old) in sys.backends.iter().zip(&before) {
        let now = b.links();
        for l in old {
            assert!(now.contains(l), "{l:?} lost on {}", b.name);
        }
        for (mailbox, _) in &now {
            assert_eq!(mailbox, &user(0), "only the witness mailbox holds mail");
        }
        let top: Vec<String> = std::fs::read_dir(&b.data)
            .expect("data dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            top.iter().all(
                |n| ["mbox", "tmp", ".probe", "readonly"].contains(&n.as_str())
                    || n.starts_with('.')
            ),
            "{top:?}"
        );
    }
    w.verify(&sys);
    t.report("ppl");
}

#[test]
fn admin_port_hostile_input() {
    let _g = serial();
    let sys = system();
    let w = Witness::new();
    let mut t = Tally::default();
    let mut ports = vec![("powersmtp", sys.smtp.admin), ("powerpop", sys.pop.admin)];
    ports.push(("pplistener", sys.backends[0].admin));
    w.check(&sys, &mut t);
    for (name, addr) in ports {
        // No token, a wrong token, many wrong tokens: 401 and nothing done.
        for token in [None, Some("wrong"), Some("")] {
            for (method, path) in [
                ("GET", "/stats"),
                ("GET", "/config"),
                ("POST", "/control/loglevel?level=trace"),
                ("POST", "/control/readonly?backend=b0"),
            ] {
                let (code, _) = http(addr, method, path, token).expect("admin");
                assert_eq!(code, 401, "{name} {method} {path} with {token:?}");
                t.cases += 1;
                t.refused += 1;
            }
        }
        for i in 0..200 {
            let (code, _) =
                http(addr, "GET", "/stats", Some(&format!("guess-{i}"))).expect("admin");
            assert_eq!(code, 401);
        }
        t.cases += 1;
        t.refused += 1;
        // Hostile parameters with the token: refused, not acted upon.
        for path in [
            "/control/readonly?backend=../../x",
            "/control/readonly?backend=%00",
            "/control/loglevel?level=%27;--",
            "/../../etc/passwd",
        ] {
            let (code, _) = http(addr, "POST", path, Some(TOKEN)).expect("admin");
            assert!((400..500).contains(&code), "{name} {path}: {code}");
            t.cases += 1;
            t.refused += 1;
        }
        // A 1 MiB header line, NUL in the request line, garbage first.
        for req in [
            {
                let mut v = b"GET /stats HTTP/1.0\r\nX-Big: ".to_vec();
                v.extend(std::iter::repeat_n(b'A', 1 << 20));
                v.extend_from_slice(b"\r\n\r\n");
                v
            },
            b"GET /st\0ats HTTP/1.0\r\n\r\n".to_vec(),
            b"\xff\xfe garbage\r\n\r\n".to_vec(),
            b"GET /stats HTTP/9.9\r\nAuthorization: Bearer \0\r\n\r\n".to_vec(),
        ] {
            let (mut c, _) = Raw::open(addr, false);
            let writer = c.send_in_background(req);
            w.check(&sys, &mut t);
            t.expect(&format!("{name} malformed request"), c.line(), http_refusal);
            drop(writer);
        }
        // Slow clients: half a request line; a request whose body never comes.
        let (mut half, _) = Raw::open(addr, false);
        half.send(b"GET /sta");
        let (mut body, _) = Raw::open(addr, false);
        body.send(format!("POST /control/loglevel?level=info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\nabc").as_bytes());
        std::thread::sleep(Duration::from_millis(300));
        w.check(&sys, &mut t);
        t.cases += 2;
        // Many connections at once, all silent.
        let held: Vec<(Raw, String)> = (0..100).map(|_| Raw::open(addr, false)).collect();
        w.check(&sys, &mut t);
        t.cases += 1;
        drop(held);
        drop(half);
        drop(body);
    }
    w.verify(&sys);
    t.report("admin");
}
