//! LMTP (RFC 2033) into powersmtp, end to end on the real binaries:
//! Python's `smtplib.LMTP` with accepted and refused recipients in one
//! transaction (one reply each after DATA, a full mailbox refusing only
//! itself), the message then read over POP3 byte for byte; and a real
//! Postfix (a private instance in a temporary directory) relaying to it with
//! `lmtp:inet:127.0.0.1:PORT`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A mailbox whose quota (bytes) is smaller than the test message: accepted
/// at RCPT (empty), refused at the end of DATA.
const SMALL: &str = "small@sys.test";
const SMALL_QUOTA_BYTES: u64 = 200;

/// Backends, userbase (`u0..u2` and [`SMALL`]), powersmtp with an LMTP
/// listener, powerpop.
struct LmtpSystem {
    backends: Vec<Backend>,
    smtp: Frontend,
    pop: Frontend,
    lmtp: SocketAddr,
    dir: tempfile::TempDir,
}

impl LmtpSystem {
    fn start(n: usize, k: usize) -> LmtpSystem {
        let dir = tempfile::tempdir().expect("tempdir");
        let backends: Vec<Backend> = (0..n)
            .map(|i| Backend::start(dir.path(), i, dir.path().join(format!("disk{i}")), ""))
            .collect();
        let userbase = sqlite_userbase(dir.path(), 3);
        let ub = powermail_userbase::open(&userbase).expect("userbase");
        ub.add_mailbox(SMALL, "pw-small", SMALL_QUOTA_BYTES)
            .expect("add small");
        drop(ub);
        let refs: Vec<&Backend> = backends.iter().collect();
        let lmtp = free_addr();
        let top = format!("lmtp_listen = \"{lmtp}\"");
        let smtp = Frontend::smtp_top(dir.path(), &refs, &userbase, k, &top, "", "", &[]);
        let pop = Frontend::pop(dir.path(), &refs, &userbase, "", "");
        LmtpSystem {
            backends,
            smtp,
            pop,
            lmtp,
            dir,
        }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for b in &self.backends {
            s.push_str(&format!("--- {}\n{}", b.name, b.log_text()));
        }
        s.push_str(&format!("--- powersmtp\n{}", self.smtp.log_text()));
        s.push_str(&format!("--- powerpop\n{}", self.pop.log_text()));
        s
    }
}

/// Every message of mailbox `i` over POP3: the raw RETR bytes.
fn pop_messages(pop: SocketAddr, i: usize) -> Vec<Vec<u8>> {
    let mut c = pop_login(pop, i).expect("pop login");
    let uidl = c.uidl().expect("uidl");
    let out = uidl
        .iter()
        .map(|(n, _)| c.retr(*n).expect("retr"))
        .collect();
    c.quit().expect("quit");
    out
}

/// The test message, as the client hands it over (not dot-stuffed) and in
/// wire form (dot-stuffed, as stored and as RETR sends it).
fn test_message(id: &str) -> (Vec<u8>, Vec<u8>) {
    let plain = format!(
        "From: a@example.org\r\nSubject: lmtp {id}\r\n{ID_HEADER}{id}\r\n\r\n.leading dot\r\nline two\r\n{}\r\n",
        "x".repeat(300)
    );
    let wire = plain.replace("\r\n.", "\r\n..");
    (plain.into_bytes(), wire.into_bytes())
}

#[test]
fn lmtp_mixed_recipients_each_get_their_reply_and_pop_reads_it_back() {
    let _g = serial();
    let sys = LmtpSystem::start(2, 2);
    let (plain, wire) = test_message("lmtp-1");
    let msg_file = sys.dir.path().join("msg.eml");
    std::fs::write(&msg_file, &plain).expect("write message");
    // RCPT order: u0, nobody (550 at RCPT), small (552 after DATA), u1, u0
    // again (same mailbox: one copy, two replies).
    let script = r#"
import smtplib, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
msg = open(path, 'rb').read()
c = smtplib.LMTP(host, port, timeout=30)
code, text = c.ehlo()
assert code == 250, (code, text)
assert c.does_esmtp and c.has_extn('pipelining'), c.esmtp_features
print('MAIL', c.mail('sender@example.org')[0])
accepted = 0
for r in ['u0@sys.test', 'nobody@sys.test', 'small@sys.test', 'u1@sys.test', 'U0@sys.test']:
    code, text = c.rcpt(r)
    print('RCPT', r, code)
    accepted += code == 250
code, text = c.data(msg)
print('DATA', code, text.decode())
for _ in range(accepted - 1):
    code, text = c.getreply()
    print('DATA', code, text.decode())
print('QUIT', c.quit()[0])
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(sys.lmtp.ip().to_string())
        .arg(sys.lmtp.port().to_string())
        .arg(&msg_file)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sys.logs()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        &lines[..6],
        [
            "MAIL 250",
            "RCPT u0@sys.test 250",
            "RCPT nobody@sys.test 550",
            "RCPT small@sys.test 250",
            "RCPT u1@sys.test 250",
            "RCPT U0@sys.test 250",
        ],
        "{stdout}"
    );
    let data: Vec<&str> = lines[6..10].iter().map(|l| &l[..8]).collect();
    assert_eq!(
        data,
        ["DATA 250", "DATA 552", "DATA 250", "DATA 250"],
        "{stdout}\n{}",
        sys.logs()
    );
    assert!(lines[7].contains("5.2.2"), "{stdout}");
    assert_eq!(lines[10], "QUIT 221");

    // Byte for byte over POP3: the Received header, then exactly the wire form.
    for i in [0, 1] {
        let msgs = pop_messages(sys.pop.addr, i);
        assert_eq!(msgs.len(), 1, "u{i} has one copy\n{}", sys.logs());
        let got = &msgs[0];
        assert!(got.starts_with(b"Received: from "), "u{i}");
        assert!(
            got.ends_with(&wire),
            "u{i}: stored bytes differ\n{}",
            String::from_utf8_lossy(got)
        );
        let header_bytes = got.len() - wire.len();
        assert!(
            got[..header_bytes].windows(9).any(|w| w == b"powersmtp"),
            "u{i}"
        );
        // RFC 3848: mail handed over LMTP is traced `with LMTP`, not ESMTP.
        let header = String::from_utf8_lossy(&got[..header_bytes]);
        assert!(header.contains(" with LMTP id "), "u{i}: {header}");
    }
    // K = 2: each backend holds u0's and u1's link; none for the full mailbox.
    for b in &sys.backends {
        let links = b.links();
        for m in ["u0@sys.test", "u1@sys.test"] {
            assert_eq!(
                links.iter().filter(|(mb, _)| mb == m).count(),
                1,
                "{} {m}: {links:?}",
                b.name
            );
        }
        assert!(
            links.iter().all(|(mb, _)| mb != SMALL),
            "{}: the refused mailbox kept a copy: {links:?}",
            b.name
        );
    }
    let mut c = Pop::connect(sys.pop.addr).expect("pop");
    c.auth(SMALL, "pw-small").expect("login small");
    assert_eq!(c.uidl().expect("uidl").len(), 0, "small got nothing");
}

/// A private Postfix instance (its own config, queue and data directories)
/// relaying every `sys.test` recipient to `lmtp`; stopped on drop.
struct Postfix {
    etc: PathBuf,
    log: PathBuf,
    smtp: SocketAddr,
}

impl Postfix {
    fn start(root: &Path, lmtp: SocketAddr) -> Postfix {
        let root = root.join("postfix");
        let (etc, queue, data) = (root.join("etc"), root.join("queue"), root.join("data"));
        for d in [&etc, &queue, &data] {
            std::fs::create_dir_all(d).expect("postfix dirs");
        }
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(&data)
            .status()
            .expect("chown");
        assert!(chown.success(), "chown postfix {}", data.display());
        let smtp = free_addr();
        let log = root.join("maillog");
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             mail_owner = postfix\n\
             myhostname = relay.sys.test\n\
             mydomain = sys.test\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mydestination =\n\
             local_recipient_maps =\n\
             alias_maps =\n\
             alias_database =\n\
             relay_domains = {DOMAIN}\n\
             relay_transport = lmtp:inet:{lmtp}\n\
             default_transport = error:no mail leaves this test\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             lmtp_host_lookup = native\n\
             maillog_file_prefixes = {root}\n\
             maillog_file = {log}\n",
            queue = queue.display(),
            data = data.display(),
            root = root.display(),
            log = log.display(),
        );
        std::fs::write(etc.join("main.cf"), main_cf).expect("main.cf");
        let services = [
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "lmtp unix - - n - - lmtp",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ];
        let master_cf = format!("{smtp} inet n - n - - smtpd\n{}\n", services.join("\n"));
        std::fs::write(etc.join("master.cf"), master_cf).expect("master.cf");
        let pf = Postfix { etc, log, smtp };
        let out = pf.command("start");
        assert!(
            out.status.success(),
            "postfix start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            pf.log_text()
        );
        eventually(DEADLINE, "postfix listens", || connect(pf.smtp).is_ok());
        pf
    }

    fn command(&self, what: &str) -> std::process::Output {
        Command::new("postfix")
            .arg("-c")
            .arg(&self.etc)
            .arg(what)
            .output()
            .expect("postfix (apt-get install postfix)")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.command("stop");
    }
}

#[test]
fn postfix_relays_to_powersmtp_over_lmtp() {
    let _g = serial();
    assert!(
        Path::new("/usr/sbin/postfix").exists(),
        "this test needs Postfix: apt-get install postfix (.ci/run does)"
    );
    let sys = LmtpSystem::start(2, 1);
    let pf = Postfix::start(sys.dir.path(), sys.lmtp);
    let (_, wire) = test_message("postfix-1");
    let mut smtp = Smtp::connect(pf.smtp).expect("connect postfix");
    let code = smtp
        .send("sender@example.org", &["u0@sys.test", "u2@sys.test"], &wire)
        .expect("send through postfix");
    assert_eq!(code, 250, "postfix accepted\n{}", pf.log_text());
    smtp.quit();
    for i in [0, 2] {
        eventually(
            DEADLINE,
            &format!("u{i} receives the relayed message"),
            || pop_messages(sys.pop.addr, i).len() == 1,
        );
        let msgs = pop_messages(sys.pop.addr, i);
        let got = &msgs[0];
        // Postfix adds its own headers (Received, and Message-Id and Date at
        // the end of the header block); the body arrives byte for byte.
        let (id, _) = identify(got).expect("identifying header");
        assert_eq!(id, "postfix-1");
        let body = |m: &[u8]| {
            let at = m
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("header end");
            m[at + 4..].to_vec()
        };
        assert_eq!(body(got), body(&wire), "u{i}: body changed on the way");
        let text = String::from_utf8_lossy(got);
        assert!(
            text.contains("with LMTP") || text.contains("(powersmtp)"),
            "{text}"
        );
        assert!(
            text.contains("relay.sys.test"),
            "postfix's Received: {text}"
        );
    }
    let log = pf.log_text();
    assert!(
        log.contains(&format!("relay={}", sys.lmtp.ip())) && log.contains("status=sent"),
        "postfix log shows delivery over LMTP:\n{log}"
    );
}
