//! powerpop end to end: real pplistener processes, a real SQLite userbase,
//! the real powerpop binary, Python's poplib as the client.

mod common;

use common::*;

const BOB: &str = "bob@example.org";

fn ids(out: &str) -> Vec<String> {
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

/// UIDL listing as [uid...] after logging in as bob.
const UIDLS: &str = "p.user('bob'); p.pass_('pw')\n\
    out([l.split()[1].decode() for l in p.uidl()[1]])\np.quit()";

#[test]
fn dedupes_k2_copies_and_numbers_stably() {
    let users = Users::new(&[(BOB, "pw")]);
    let (b0, b1) = (Backend::start(), Backend::start());
    b0.put(BOB, "0001.t.1", b"Subject: one\r\n\r\nboth\r\n");
    b1.put(BOB, "0001.t.1", b"Subject: one\r\n\r\nboth\r\n");
    b0.put(BOB, "0002.t.1", b"Subject: two\r\n\r\nonly b0\r\n");
    b1.put(BOB, "0003.t.1", b"Subject: three\r\n\r\nonly b1\r\n");
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0, &b1], state.path(), "");
    let out = pop.py("p.user('bob'); p.pass_('pw')\nout(p.stat())\n\
         out([l.decode() for l in p.list()[1]])\n\
         out([l.decode() for l in p.uidl()[1]])\np.quit()");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "[3, 74]");
    assert_eq!(lines[1], r#"["1 22", "2 25", "3 27"]"#);
    assert_eq!(lines[2], r#"["1 0001.t.1", "2 0002.t.1", "3 0003.t.1"]"#);
    // Same numbering and UIDLs in a second session, via user%domain.
    let again = pop.py("p.user('bob%example.org'); p.pass_('pw')\n\
         out([l.decode() for l in p.uidl()[1]])\np.quit()");
    assert_eq!(again.trim(), lines[2]);
    let stats = pop.stats();
    assert_eq!(stats["counters"]["logins_ok"], 2);
}

#[test]
fn a_mailbox_larger_than_one_list_page_is_merged_whole() {
    // b0 answers LIST in pages of 2: powerpop pages through it, and the
    // backend is not marked down for having more than one page.
    let users = Users::new(&[(BOB, "pw")]);
    let (b0, b1) = (
        Backend::start_with("[limits]\nlist_max_entries = 2\n"),
        Backend::start(),
    );
    for i in 1..=7 {
        b0.put(BOB, &format!("000{i}.t.1"), b"Subject: k\r\n\r\nx\r\n");
    }
    for i in [2, 5, 8] {
        b1.put(BOB, &format!("000{i}.t.1"), b"Subject: k\r\n\r\nx\r\n");
    }
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0, &b1], state.path(), "");
    let want: Vec<String> = (1..=8).map(|i| format!("000{i}.t.1")).collect();
    assert_eq!(ids(&pop.py(UIDLS)), want);
    assert_eq!(ids(&pop.py(UIDLS)), want, "and again: b0 is still up");
}

#[test]
fn dead_backend_is_skipped_and_deletes_are_replayed() {
    let users = Users::new(&[(BOB, "pw")]);
    let (b0, mut b1) = (Backend::start(), Backend::start());
    for b in [&b0, &b1] {
        b.put(BOB, "0001.t.1", b"Subject: k2\r\n\r\nx\r\n");
    }
    b1.put(BOB, "0002.t.1", b"Subject: b1 only\r\n\r\ny\r\n");
    b0.put(BOB, "0003.t.1", b"Subject: b0 only\r\n\r\nz\r\n");
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0, &b1], state.path(), "");
    assert_eq!(ids(&pop.py(UIDLS)), ["0001.t.1", "0002.t.1", "0003.t.1"]);

    b1.kill9();
    // No error, just the messages of the live backend.
    assert_eq!(ids(&pop.py(UIDLS)), ["0001.t.1", "0003.t.1"]);
    // Delete the K=2 message while b1 (which holds a copy) is down.
    let out =
        pop.py("p.user('bob'); p.pass_('pw')\nout(p.dele(1).decode())\nout(p.quit().decode())");
    assert!(out.contains("+OK"), "{out}");
    assert!(!b0.has_file(BOB, "0001.t.1"), "deleted on the live backend");
    assert!(
        b1.has_file(BOB, "0001.t.1"),
        "b1 was down: copy still on disk"
    );
    assert_eq!(pop.stats()["gauges"]["deletes_owed"], 1);

    b1.restart();
    eventually(TIMEOUT, "b1 listed again", || {
        ids(&pop.py(UIDLS)).contains(&"0002.t.1".to_string())
    });
    assert_eq!(
        ids(&pop.py(UIDLS)),
        ["0002.t.1", "0003.t.1"],
        "deleted mail never comes back"
    );
    assert!(
        !b1.has_file(BOB, "0001.t.1"),
        "replayed DEL removed the file"
    );
    assert_eq!(pop.stats()["gauges"]["deletes_owed"], 0);
    assert!(
        pop.stats()["counters"]["deletes_replayed"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[test]
fn deletes_owed_survive_a_powerpop_restart() {
    let users = Users::new(&[(BOB, "pw")]);
    let (b0, mut b1) = (Backend::start(), Backend::start());
    for b in [&b0, &b1] {
        b.put(BOB, "0001.t.1", b"Subject: k2\r\n\r\nx\r\n");
    }
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0, &b1], state.path(), "");
    b1.kill9();
    pop.py("p.user('bob'); p.pass_('pw')\np.dele(1)\np.quit()");
    drop(pop);
    b1.restart();
    let pop = Pop::start(&users, &[&b0, &b1], state.path(), "");
    assert!(ids(&pop.py(UIDLS)).is_empty());
    assert!(!b1.has_file(BOB, "0001.t.1"));
}

/// Wire form: CRLF lines, lines starting with '.' doubled.
fn stuff(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        if l.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn hex_lines(out: &str) -> Vec<Vec<u8>> {
    let v: Vec<String> = serde_json::from_str(out).unwrap();
    v.iter()
        .map(|h| {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn retr_and_top_are_exact_on_dot_stuffed_and_binary_content() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let mut lines: Vec<Vec<u8>> = vec![
        b"Subject: dots".to_vec(),
        b"X-Bin: yes".to_vec(),
        b"".to_vec(),
        b".".to_vec(),
        b"..two".to_vec(),
        b".leading".to_vec(),
        b"".to_vec(),
    ];
    // Every byte value except CR and LF, in lines of varying length.
    let bytes: Vec<u8> = (0..=255u8).filter(|&b| b != b'\r' && b != b'\n').collect();
    for i in 0..40 {
        let start = (i * 7) % bytes.len();
        let mut l: Vec<u8> = bytes
            .iter()
            .cycle()
            .skip(start)
            .take(10 + i * 13)
            .copied()
            .collect();
        if i % 5 == 0 {
            l.insert(0, b'.');
        }
        lines.push(l);
    }
    let wire = stuff(&lines);
    b0.put(BOB, "0001.t.1", &wire);
    b0.put(BOB, "0002.t.1", b"Subject: no final CRLF\r\n\r\nlast line");
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0], state.path(), "");
    let out = pop.py("p.user('bob'); p.pass_('pw')\n\
         r = p.retr(1); out(hexlines(r[1])); out(r[2])\n\
         out(hexlines(p.top(1, 0)[1]))\n\
         out(hexlines(p.top(1, 5)[1]))\n\
         out(hexlines(p.retr(2)[1]))\n\
         out(hexlines(p.top(2, 0)[1]))\np.quit()");
    let o: Vec<&str> = out.lines().collect();
    assert_eq!(
        hex_lines(o[0]),
        lines,
        "RETR returns the unstuffed lines exactly"
    );
    // poplib counts the CRLFs but not the stuffing dots.
    let unstuffed: usize = lines.iter().map(|l| l.len() + 2).sum();
    assert_eq!(o[1].parse::<usize>().unwrap(), unstuffed);
    assert_eq!(
        hex_lines(o[2]),
        lines[..3],
        "TOP 0: headers and the blank line"
    );
    assert_eq!(hex_lines(o[3]), lines[..8], "TOP 5: plus five body lines");
    let last: Vec<Vec<u8>> = vec![
        b"Subject: no final CRLF".to_vec(),
        vec![],
        b"last line".to_vec(),
    ];
    assert_eq!(
        hex_lines(o[4]),
        last,
        "a CRLF is added before the terminator"
    );
    assert_eq!(hex_lines(o[5]), last[..2]);
    let stats = pop.stats();
    assert_eq!(stats["counters"]["messages_retrieved"], 5);
}

#[test]
fn auth_plain_with_initial_response_and_continuation() {
    let users = Users::new(&[(BOB, "pw pw")]);
    let b0 = Backend::start();
    b0.put(BOB, "0001.t.1", b"Subject: x\r\n\r\ny\r\n");
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0], state.path(), "");
    let out = pop.py(
        "caps = p.capa()\nout(sorted(caps.keys()))\n\
         tok = base64.b64encode(b'\\0bob@example.org\\0pw pw').decode()\n\
         out(p._shortcmd('AUTH PLAIN ' + tok).decode())\nout(p.stat())\np.quit()\n\
         q = poplib.POP3(sys.argv[1], int(sys.argv[2]))\n\
         q._putcmd('AUTH PLAIN'); out(q._getline()[0].decode())\n\
         out(q._shortcmd(tok).decode())\nq.quit()\n\
         r = poplib.POP3(sys.argv[1], int(sys.argv[2]))\n\
         try:\n    r._shortcmd('AUTH PLAIN ' + base64.b64encode(b'\\0bob@example.org\\0bad').decode())\n\
         except poplib.error_proto as e:\n    out(e.args[0].decode())\n",
    );
    let o: Vec<String> = out
        .lines()
        .map(
            |l| match serde_json::from_str::<serde_json::Value>(l).unwrap() {
                serde_json::Value::String(s) => s,
                v => v.to_string(),
            },
        )
        .collect();
    assert_eq!(
        o[0],
        r#"["AUTH-RESP-CODE","IMPLEMENTATION","PIPELINING","RESP-CODES","SASL","TOP","UIDL","USER"]"#
    );
    assert!(o[1].starts_with("+OK maildrop has 1 messages"), "{}", o[1]);
    assert_eq!(o[2], "[1,17]");
    assert_eq!(o[3], "+ ");
    assert!(o[4].starts_with("+OK"), "{}", o[4]);
    assert_eq!(o[5], "-ERR [AUTH] authentication failed");
}

#[test]
fn in_use_across_two_powerpop_processes() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let state = tempfile::tempdir().unwrap();
    let pop1 = Pop::start(&users, &[&b0], state.path(), "");
    let pop2 = Pop::start(&users, &[&b0], state.path(), "");
    let code = format!(
        "p.user('bob'); p.pass_('pw')\n\
         q = poplib.POP3('{}', {})\nq.user('bob')\n\
         try:\n    q.pass_('pw'); out('no error')\n\
         except poplib.error_proto as e:\n    out(e.args[0].decode())\n\
         r = poplib.POP3(sys.argv[1], int(sys.argv[2]))\nr.user('bob')\n\
         try:\n    r.pass_('pw'); out('no error')\n\
         except poplib.error_proto as e:\n    out(e.args[0].decode())\n\
         p.quit()\nq2 = poplib.POP3('{}', {})\nq2.user('bob')\nout(q2.pass_('pw').decode())\nq2.quit()",
        pop2.addr.ip(),
        pop2.addr.port(),
        pop2.addr.ip(),
        pop2.addr.port()
    );
    let out = pop1.py(&code);
    let o: Vec<&str> = out.lines().collect();
    assert_eq!(
        o[0], "\"-ERR [IN-USE] mailbox in use by another session\"",
        "other process"
    );
    assert_eq!(
        o[1], "\"-ERR [IN-USE] mailbox in use by another session\"",
        "same process"
    );
    assert!(o[2].contains("+OK"), "free again after QUIT: {}", o[2]);
}

#[test]
fn throttling_after_bad_passwords() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(
        &users,
        &[&b0],
        state.path(),
        "\n[throttle]\nfailure_delay_ms = 100\nfailures_max = 3\nwindow_ms = 60000\nlockout_ms = 60000\n",
    );
    let out = pop.py(r#"
import time
res = []
for pw in ['a', 'b', 'c', 'pw']:
    p.user('bob')
    t = time.time()
    try:
        res.append(p.pass_(pw).decode())
    except poplib.error_proto as e:
        res.append(e.args[0].decode())
    res.append(time.time() - t >= 0.09)
out(res)
"#);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v[0], "-ERR [AUTH] authentication failed");
    assert_eq!(v[1], true, "failures are delayed");
    assert_eq!(v[4], "-ERR [AUTH] authentication failed");
    assert_eq!(
        v[6], "-ERR [AUTH] too many failed logins, try again later",
        "even the right password is refused during the lock-out"
    );
    assert_eq!(pop.stats()["counters"]["logins_locked_out"], 1);
}

#[test]
fn max_connections() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(
        &users,
        &[&b0],
        state.path(),
        "\n[limits]\nconnections_max = 2\n",
    );
    let (_a, ga) = raw_greeting(pop.addr);
    let (_b, gb) = raw_greeting(pop.addr);
    assert!(ga.starts_with("+OK") && gb.starts_with("+OK"));
    let (_c, gc) = raw_greeting(pop.addr);
    assert_eq!(gc, "-ERR [SYS/TEMP] too many connections");
    drop((_a, _b));
    eventually(TIMEOUT, "a slot frees up", || {
        raw_greeting(pop.addr).1.starts_with("+OK")
    });
    assert!(
        pop.stats()["counters"]["connections_refused"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[test]
fn empty_mailbox_and_virtual_domain() {
    let users = Users::new(&[(BOB, "pw"), ("carol@other.test", "pw2")]);
    let b0 = Backend::start();
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0], state.path(), "");
    // Map powerpop's listening address to other.test: bare names go there.
    let ub = powermail_userbase::open(&users.url).unwrap();
    ub.add_virtual_server(&pop.addr, "other.test").unwrap();
    let out = pop.py("p.user('carol'); p.pass_('pw2')\nout(p.stat())\np.quit()");
    assert_eq!(out.trim(), "[0, 0]");
    assert_eq!(pop.stats()["counters"]["empty_mailbox_logins"], 1);
}

#[test]
fn stls_and_implicit_tls() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    b0.put(BOB, "0001.t.1", b"Subject: secret\r\n\r\nover TLS\r\n");
    let certs = tempfile::tempdir().unwrap();
    let Some(tls) = test_certificate(certs.path()) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let tls_port = free_port();
    let tables = format!("tls_listen = \"127.0.0.1:{tls_port}\"\n{tls}");
    let pop = Pop::start(&users, &[&b0], state.path(), &tables);
    let out = pop.py(&format!(
        r#"
import ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
out('STLS' in p.capa())
out(p.stls(context=ctx).decode())
out('STLS' in p.capa())
p.user('bob'); p.pass_('pw')
out(b'\n'.join(p.retr(1)[1]).decode())
p.quit()
s = poplib.POP3_SSL('127.0.0.1', {tls_port}, context=ctx)
out('STLS' in s.capa())
s.user('bob'); s.pass_('pw')
out(s.stat())
s.quit()
"#
    ));
    let o: Vec<&str> = out.lines().collect();
    assert_eq!(o[0], "true", "STLS offered");
    assert_eq!(o[1], "\"+OK begin TLS negotiation\"");
    assert_eq!(o[2], "false", "not offered again inside TLS");
    assert_eq!(o[3], "\"Subject: secret\\n\\nover TLS\"");
    assert_eq!(o[4], "false", "no STLS on the implicit-TLS port");
    assert_eq!(o[5], "[1, 29]");
}

#[test]
fn idle_sessions_time_out() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(
        &users,
        &[&b0],
        state.path(),
        "\n[limits]\nidle_timeout_ms = 300\n",
    );
    let (s, greeting) = raw_greeting(pop.addr);
    assert!(greeting.starts_with("+OK"));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut &s, &mut rest).unwrap();
    assert_eq!(rest, "-ERR idle time-out, closing\r\n");
    assert_eq!(pop.stats()["counters"]["idle_timeouts"], 1);
}

/// A tiny legacy POP3 server: one account `old`/`secret` with one message.
const LEGACY: &str = r#"
import socket, sys, threading
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
MSG = b'Subject: from the old server\r\n\r\nhello\r\n'
def serve(c):
    f = c.makefile('rb')
    c.sendall(b'+OK legacy ready\r\n')
    user = None
    for line in f:
        cmd = line.strip().split(b' ', 1)
        verb = cmd[0].upper()
        if verb == b'USER':
            user = cmd[1]; c.sendall(b'+OK\r\n')
        elif verb == b'PASS':
            if user == b'old' and cmd[1] == b'secret':
                c.sendall(b'+OK legacy maildrop locked\r\n')
            else:
                c.sendall(b'-ERR [AUTH] legacy says no\r\n')
        elif verb == b'STAT':
            c.sendall(b'+OK 1 %d\r\n' % len(MSG))
        elif verb == b'RETR':
            c.sendall(b'+OK\r\n' + MSG + b'.\r\n')
        elif verb == b'QUIT':
            c.sendall(b'+OK bye\r\n'); break
        else:
            c.sendall(b'-ERR\r\n')
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

struct Legacy(std::process::Child, u16);

impl Drop for Legacy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn legacy() -> Legacy {
    let mut child = std::process::Command::new("python3")
        .args(["-c", LEGACY])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line.trim().parse().unwrap();
    Legacy(child, port)
}

#[test]
fn unknown_users_are_proxied_to_the_fallback_server() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    b0.put(BOB, "0001.t.1", b"Subject: new\r\n\r\nx\r\n");
    let old = legacy();
    let state = tempfile::tempdir().unwrap();
    let tables = format!("\n[fallback]\naddr = \"127.0.0.1:{}\"\n", old.1);
    let pop = Pop::start(&users, &[&b0], state.path(), &tables);
    let out = pop.py(r#"
p.user('old'); out(p.pass_('secret').decode())
out(p.stat())
out(b'\n'.join(p.retr(1)[1]).decode())
out(p.quit().decode())
q = poplib.POP3(sys.argv[1], int(sys.argv[2]))
q.user('old')
try:
    q.pass_('wrong')
except poplib.error_proto as e:
    out(e.args[0].decode())
q.user('bob'); q.pass_('pw'); out(q.stat()); q.quit()
"#);
    let o: Vec<&str> = out.lines().collect();
    assert_eq!(o[0], "\"+OK legacy maildrop locked\"");
    assert_eq!(o[1], "[1, 39]");
    assert_eq!(o[2], "\"Subject: from the old server\\n\\nhello\"");
    assert_eq!(o[3], "\"+OK bye\"");
    assert_eq!(o[4], "\"-ERR [AUTH] authentication failed\"");
    assert_eq!(o[5], "[1, 19]", "userbase users are served here");
}

#[test]
fn top_of_a_big_message_stops_early_and_the_session_goes_on() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for i in 0..100_000 {
        big.extend_from_slice(format!("line {i:06} of a big message\r\n").as_bytes());
    }
    b0.put(BOB, "0001.t.1", &big);
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0], state.path(), "");
    let out = pop.py("p.user('bob'); p.pass_('pw')\n\
         for _ in range(3):\n    out([l.decode() for l in p.top(1, 2)[1]])\n\
         r = p.retr(1); out([len(r[1]), r[2]])\np.quit()");
    let o: Vec<&str> = out.lines().collect();
    for l in &o[..3] {
        assert_eq!(
            *l,
            r#"["Subject: big", "", "line 000000 of a big message", "line 000001 of a big message"]"#
        );
    }
    assert_eq!(o[3], format!("[100002, {}]", big.len()));
}

/// Connects to `addr` with a receive buffer of `rcvbuf_bytes`, set before the
/// connection so the advertised window stays small.
fn connect_small_window(addr: std::net::SocketAddr, rcvbuf_bytes: i32) -> std::net::TcpStream {
    use std::os::unix::io::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("IPv4 test address expected");
    };
    // SAFETY: socket/setsockopt/connect on a descriptor owned by the returned
    // stream; the structs are fully initialised and sized for each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf_bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    }
}

/// A client that reads a big RETR a few bytes at a time is cut off once
/// `send_timeout_ms` has passed since the answer began — its trickle of
/// progress does not restart the clock — while another client is served.
#[test]
fn a_trickle_reader_is_cut_off_by_the_send_deadline() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    const ALICE: &str = "alice@example.org";
    let users = Users::new(&[(BOB, "pw"), (ALICE, "pw")]);
    let b0 = Backend::start();
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 16 << 20 {
        big.extend_from_slice(b"a line of a big message that a slow reader will never finish\r\n");
    }
    b0.put(BOB, "0001.slow.1", &big);
    b0.put(ALICE, "0001.fast.1", b"Subject: small\r\n\r\nserved\r\n");
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(
        &users,
        &[&b0],
        state.path(),
        "\n[limits]\nsend_timeout_ms = 1000\n",
    );

    let mut slow = connect_small_window(pop.addr, 4096);
    slow.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    slow.write_all(b"USER bob\r\nPASS pw\r\nRETR 1\r\n")
        .unwrap();
    let started = Instant::now();
    // A few bytes every 50 ms: ~320 B/s, the 16 MiB would take over 14 hours,
    // and each read lets the server make a little progress.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let mut s = slow.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            let mut got = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            got
        })
    };

    // Another client is served meanwhile.
    let out = pop.py("p.user('alice'); p.pass_('pw')\nout(p.retr(1)[1][-1].decode())\np.quit()");
    assert_eq!(out.trim(), "\"served\"");

    // Both sessions end: alice's by QUIT, bob's by the send deadline.
    let ended = |pop: &Pop| pop.stats()["counters"]["sessions"].as_u64().unwrap_or(0);
    while ended(&pop) < 2 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut_after = started.elapsed();
    assert!(
        ended(&pop) >= 2,
        "the trickle reader still held its session after {cut_after:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let trickled = trickle.join().unwrap();
    // Whatever the kernel still had queued arrives, then the end: far less
    // than the message.
    let mut rest = Vec::new();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        trickled + rest.len() < big.len(),
        "the whole message went out ({} bytes)",
        trickled + rest.len()
    );
    eventually(TIMEOUT, "no connection left open", || {
        pop.stats()["gauges"]["connections"] == 0
    });
}

/// A fake legacy POP3 server in this process that records every byte it
/// receives. It is as lenient as old servers are: a bare CR also ends a
/// line, and it answers `+OK` to any command but a wrong PASS — so a command
/// smuggled into a login field would be answered and taken for the PASS
/// reply.
struct Recorder {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

fn recorder() -> Recorder {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let log = log.clone();
            std::thread::spawn(move || {
                let _ = conn.write_all(b"+OK legacy ready\r\n");
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while matches!(conn.read(&mut byte), Ok(1)) {
                    log.lock().unwrap().push(byte[0]);
                    if byte[0] != b'\r' && byte[0] != b'\n' {
                        line.push(byte[0]);
                        continue;
                    }
                    if line.is_empty() {
                        continue;
                    }
                    let reply: &[u8] = match &line[..] {
                        l if l.starts_with(b"PASS ") && l != b"PASS secret" => b"-ERR no\r\n",
                        _ => b"+OK\r\n",
                    };
                    line.clear();
                    if conn.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Recorder { port, seen }
}

/// Sends `line` + CRLF and reads one reply line (byte by byte: nothing past
/// it is consumed).
fn say(s: &mut std::net::TcpStream, line: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut l = line.to_vec();
    l.extend_from_slice(b"\r\n");
    s.write_all(&l).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed after {reply:?}");
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).trim_end().to_string()
}

#[test]
fn login_fields_cannot_inject_commands_into_the_fallback_server() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let old = recorder();
    let state = tempfile::tempdir().unwrap();
    let tables = format!(
        "\n[fallback]\naddr = \"127.0.0.1:{}\"\n\
         [throttle]\nfailure_delay_ms = 1\nfailures_max = 100\n",
        old.port
    );
    let pop = Pop::start(&users, &[&b0], state.path(), &tables);
    let (mut s, greeting) = raw_greeting(pop.addr);
    assert!(greeting.starts_with("+OK"), "{greeting}");
    const FAILED: &str = "-ERR [AUTH] authentication failed";
    let hostile: [(&[&[u8]], &str); 5] = [
        // AUTH PLAIN "\0old\r\nNOOP\0wrong" and "\0old\0wrong\r\nNOOP".
        (&[b"AUTH PLAIN AG9sZA0KTk9PUAB3cm9uZw=="], FAILED),
        (&[b"AUTH PLAIN AG9sZAB3cm9uZw0KTk9PUA=="], FAILED),
        // The same in a continuation line.
        (&[b"AUTH PLAIN", b"AG9sZAB3cm9uZw0KTk9PUA=="], FAILED),
        // A bare CR in PASS (the rest of the line is the password).
        (&[b"USER old", b"PASS wrong\rNOOP"], FAILED),
        // A bare CR in USER splits the name: a syntax error, then no USER.
        (&[b"USER old\rNOOP", b"PASS wrong"], "-ERR USER first"),
    ];
    for (attempt, want) in hostile {
        let mut reply = String::new();
        for line in attempt {
            reply = say(&mut s, line);
        }
        assert_eq!(reply, want, "{attempt:?}");
    }
    let seen = String::from_utf8_lossy(&old.seen.lock().unwrap()).into_owned();
    assert!(
        !seen.contains("NOOP"),
        "an injected command reached the legacy server: {seen:?}"
    );
    assert_eq!(
        pop.stats()["counters"]["logins_failed"],
        4,
        "every hostile login is a counted failed guess"
    );
    // The fallback itself still works for a clean login.
    let (mut s, _) = raw_greeting(pop.addr);
    assert_eq!(say(&mut s, b"USER old"), "+OK send PASS");
    assert_eq!(say(&mut s, b"PASS secret"), "+OK");
    // The recorder answers at the CR, before it has read the LF: wait for it.
    eventually(TIMEOUT, "the clean login reaches the legacy server", || {
        String::from_utf8_lossy(&old.seen.lock().unwrap()).ends_with("USER old\r\nPASS secret\r\n")
    });
}

#[test]
fn hostile_user_names_stay_on_one_log_line() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0], state.path(), "");
    let (mut s, _) = raw_greeting(pop.addr);
    // AUTH PLAIN "\0x\r\nsession=1 user=forged status=quit\0pw" (refused: CR/LF)
    // and USER 'evil"forged=1\' / PASS (unknown user; quote, `=`, backslash).
    assert_eq!(
        say(
            &mut s,
            b"AUTH PLAIN AHgNCnNlc3Npb249MSB1c2VyPWZvcmdlZCBzdGF0dXM9cXVpdABwdw=="
        ),
        "-ERR [AUTH] authentication failed"
    );
    assert_eq!(say(&mut s, b"USER evil\"forged=1\\"), "+OK send PASS");
    assert_eq!(say(&mut s, b"PASS pw"), "-ERR [AUTH] authentication failed");
    assert_eq!(say(&mut s, b"QUIT"), "+OK powerpop signing off");
    eventually(TIMEOUT, "the session line", || {
        std::fs::read_to_string(&pop.log).is_ok_and(|l| l.contains("status=quit"))
    });
    let log = std::fs::read_to_string(&pop.log).unwrap();
    let forged: Vec<&str> = log.lines().filter(|l| l.contains("forged")).collect();
    assert_eq!(forged.len(), 2, "{log}");
    assert!(
        forged[0].contains(r#"user="x\r\nsession=1 user=forged status=quit"#),
        "{log}"
    );
    assert!(forged[1].contains(r#"user="evil\"forged=1\\"#), "{log}");
}

#[test]
fn no_backend_answering_is_a_temporary_error_not_an_empty_maildrop() {
    let users = Users::new(&[(BOB, "pw")]);
    let (mut b0, mut b1) = (Backend::start(), Backend::start());
    b0.put(BOB, "0001.t.1", b"Subject: b0\r\n\r\nx\r\n");
    b1.put(BOB, "0002.t.1", b"Subject: b1\r\n\r\ny\r\n");
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(&users, &[&b0, &b1], state.path(), "");
    assert_eq!(ids(&pop.py(UIDLS)), ["0001.t.1", "0002.t.1"]);

    b0.kill9();
    b1.kill9();
    let login = "p.user('bob')\ntry:\n    out(p.pass_('pw').decode())\n\
                 except poplib.error_proto as e:\n    out(str(e))\np.quit()";
    let out = pop.py(login);
    assert!(
        out.contains("[SYS/TEMP] mailbox storage unavailable"),
        "no backend listed the mailbox, yet: {out}"
    );
    assert!(!out.contains("maildrop has 0"), "{out}");
    assert!(pop.stats()["counters"]["logins_storage_unavailable"].as_u64() >= Some(1));

    // The refused login held no lock: once storage is back, the mailbox opens whole.
    b0.restart();
    b1.restart();
    eventually(TIMEOUT, "both backends listed again", || {
        ids(&pop.py(UIDLS)) == ["0001.t.1", "0002.t.1"]
    });
}
