//! The daemons as systemd runs them, on the real binaries: the `READY=1`
//! readiness notification on `NOTIFY_SOCKET` (sent only once the ports are
//! open), and the graceful stop on SIGTERM (no new sessions, open
//! transactions finished, idle sessions told `421`, the process gone within
//! `shutdown_grace_ms`).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use common::*;

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on a child of this test.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill {pid}");
}

/// Starts `name --config config` with `NOTIFY_SOCKET` set to a socket this
/// test listens on; returns the notification and the child.
fn start_notified(
    root: &std::path::Path,
    name: &str,
    config: &std::path::Path,
) -> (String, std::process::Child) {
    let sock_path = root.join(format!("{name}.notify"));
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let child = Command::new(powermail_testkit::bin(name))
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("no notification within the deadline");
    (String::from_utf8_lossy(&buf[..n]).into_owned(), child)
}

/// The readiness line a notification carries as its STATUS.
fn status_line(state: &str) -> powermail_testkit::ReadyLine {
    let status = state
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS in {state:?}"));
    powermail_testkit::ReadyLine::parse(status)
        .unwrap_or_else(|| panic!("STATUS is not the readiness line: {state:?}"))
}

#[test]
fn every_daemon_notifies_systemd_once_its_ports_are_open() {
    let _g = serial();
    let mut sys = System::start(1, 1, 1);
    let root = sys.dir.path().to_path_buf();
    let backend_addr = sys.backends[0].addr;
    sys.backends[0].kill9();
    let (state, mut ppl) = start_notified(&root, "pplistener", &root.join("pplistener-b0.toml"));
    assert!(state.starts_with("READY=1\n"), "{state:?}");
    let ready = status_line(&state);
    assert_eq!((ready.daemon.as_str(), ready.pid), ("pplistener", ppl.id()));
    assert_eq!(ready.addr("b0"), Some(backend_addr), "{state:?}");
    assert!(connect(backend_addr).is_ok(), "backend port open at READY");

    sys.smtp.kill9();
    let (state, mut smtp) = start_notified(&root, "powersmtp", &root.join("powersmtp.toml"));
    assert!(state.starts_with("READY=1\n"), "{state:?}");
    let ready = status_line(&state);
    assert_eq!((ready.daemon.as_str(), ready.pid), ("powersmtp", smtp.id()));
    assert_eq!(ready.addr("smtp"), Some(sys.smtp.addr), "{state:?}");
    let mut greeting = String::new();
    BufReader::new(connect(sys.smtp.addr).expect("SMTP port open at READY"))
        .read_line(&mut greeting)
        .expect("greeting");
    assert!(greeting.starts_with("220 "), "{greeting}");

    sys.pop.kill9();
    let (state, mut pop) = start_notified(&root, "powerpop", &root.join("powerpop.toml"));
    assert!(state.starts_with("READY=1\n"), "{state:?}");
    let ready = status_line(&state);
    assert_eq!((ready.daemon.as_str(), ready.pid), ("powerpop", pop.id()));
    assert_eq!(ready.addr("pop3"), Some(sys.pop.addr), "{state:?}");
    assert!(connect(sys.pop.addr).is_ok(), "POP3 port open at READY");
    for c in [&mut pop, &mut smtp, &mut ppl] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn powersmtp_sigterm_finishes_the_open_transaction_and_refuses_the_rest() {
    let _g = serial();
    let mut sys = System::start(1, 1, 1);
    let addr = sys.smtp.addr;
    let mut busy = Smtp::connect(addr).expect("connect");
    assert_eq!(busy.cmd("MAIL FROM:<a@example.org>").expect("MAIL").0, 250);
    assert_eq!(
        busy.cmd(&format!("RCPT TO:<{}>", user(0))).expect("RCPT").0,
        250
    );
    let mut idle = Smtp::connect(addr).expect("connect");

    sigterm(sys.smtp.pid().expect("running"));
    // The idle session is told at once, without sending anything.
    let (code, text) = idle.reply().expect("421 to the idle session");
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("4.3.2"), "{text}");
    // No new sessions.
    let mut greeting = String::new();
    let refused = match connect(addr) {
        Ok(s) => {
            let _ = BufReader::new(s).read_line(&mut greeting);
            greeting.starts_with("421 ")
        }
        Err(_) => true,
    };
    assert!(refused, "a new session was served: {greeting}");
    // The open transaction completes: 250 only with the copy durable.
    let wire = message("sigterm-1", 2000);
    assert_eq!(busy.cmd("DATA").expect("DATA").0, 354);
    busy.raw(&wire).expect("body");
    busy.raw(b".\r\n").expect("dot");
    let (code, text) = busy.reply().expect("reply to DATA");
    assert_eq!(code, 250, "{text}\n{}", sys.logs());
    let (code, _) = busy.reply().expect("then 421");
    assert_eq!(code, 421);
    let status = sys.smtp.wait_exit(DEADLINE).expect("powersmtp exits");
    assert!(status.success(), "{status}");
    assert!(sys.smtp.log_text().contains("SIGTERM"), "logged");

    let mut pop = pop_login(sys.pop.addr, 0).expect("pop");
    let uidl = pop.uidl().expect("uidl");
    assert_eq!(uidl.len(), 1);
    let got = pop.retr(uidl[0].0).expect("retr");
    assert_eq!(identify(&got).expect("id").0, "sigterm-1");
    assert!(got.ends_with(&wire), "stored byte for byte");
}

#[test]
fn powersmtp_sigterm_cuts_a_stuck_transaction_after_the_grace_period() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Backend::start(dir.path(), 0, dir.path().join("disk0"), "");
    let userbase = sqlite_userbase(dir.path(), 1);
    let top = "shutdown_grace_ms = 300";
    let mut smtp = Frontend::smtp_top(dir.path(), &[&b], &userbase, 1, top, "", "", &[]);
    let mut stuck = Smtp::connect(smtp.addr).expect("connect");
    assert_eq!(stuck.cmd("MAIL FROM:<a@example.org>").expect("MAIL").0, 250);
    assert_eq!(
        stuck
            .cmd(&format!("RCPT TO:<{}>", user(0)))
            .expect("RCPT")
            .0,
        250
    );
    assert_eq!(stuck.cmd("DATA").expect("DATA").0, 354);
    stuck.raw(b"Subject: never ends\r\n\r\nhalf").expect("part");
    sigterm(smtp.pid().expect("running"));
    let status = smtp
        .wait_exit(DEADLINE)
        .expect("exits after the grace period");
    assert!(status.success(), "{status}");
    assert!(
        stuck.reply().is_err(),
        "the cut transaction got no reply (no 250)"
    );
    assert!(smtp.log_text().contains("cut off"), "{}", smtp.log_text());
    assert!(
        b.links().is_empty(),
        "nothing stored for the cut message: {:?}",
        b.links()
    );
}

#[test]
fn powerpop_sigterm_lets_the_open_session_finish_and_refuses_new_ones() {
    let _g = serial();
    let mut sys = System::start(1, 1, 1);
    let mut smtp = Smtp::connect(sys.smtp.addr).expect("smtp");
    let sent = smtp
        .send("a@example.org", &[&user(0)], &message("pop-term", 500))
        .expect("send");
    assert_eq!(sent, 250);
    smtp.quit();
    let mut open = pop_login(sys.pop.addr, 0).expect("login");
    assert_eq!(open.uidl().expect("uidl").len(), 1);

    sigterm(sys.pop.pid().expect("running"));
    eventually(DEADLINE, "new POP3 sessions are refused", || {
        let mut line = String::new();
        match connect(sys.pop.addr) {
            Ok(s) => {
                let _ = BufReader::new(s).read_line(&mut line);
                line.starts_with("-ERR [SYS/TEMP]")
            }
            Err(_) => true,
        }
    });
    // The open session goes on to its end: its DELE is applied at QUIT.
    assert!(open.cmd("DELE 1").expect("DELE").starts_with("+OK"));
    assert!(open.quit().expect("QUIT").starts_with("+OK"));
    let status = sys.pop.wait_exit(DEADLINE).expect("powerpop exits");
    assert!(status.success(), "{status}");
    eventually(
        DEADLINE,
        "the DELE of the finished session was applied",
        || sys.backends[0].links().is_empty(),
    );
}

fn sighup(pid: u32) {
    // SAFETY: kill(2) on a child of this test.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP {pid}");
}

#[test]
fn pplistener_sighup_applies_the_floor_the_connection_limit_and_the_log_level() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Backend::start(dir.path(), 0, dir.path().join("disk0"), "");
    assert_eq!(b.mode(), "rw");
    let config = b.config_path().to_path_buf();
    let original = std::fs::read_to_string(&config).expect("config");
    let pid = b.pid().expect("running");

    // A floor above any disk: read-only by itself; one connection at most.
    let strict = original.replace(
        "free_bytes_min = 0\n",
        "free_bytes_min = 1125899906842624\nconnections_per_backend_max = 1\n",
    );
    assert_ne!(strict, original);
    std::fs::write(
        &config,
        strict.replace("[limits]", "log_level = \"debug\"\n[limits]"),
    )
    .expect("write");
    sighup(pid);
    eventually(DEADLINE, "the new floor turns the backend ro-auto", || {
        let Ok(mut first) = connect_backend(&b) else {
            return false;
        };
        let mode = mode_of(&mut first);
        // `first` holds the one allowed connection: a second is refused.
        mode == "ro-auto" && connect_backend(&b).is_err()
    });
    assert!(b.log_text().contains("reload: applied"), "{}", b.log_text());
    assert!(
        b.log_text().contains("log_level -> DEBUG"),
        "{}",
        b.log_text()
    );

    // A file that does not parse changes nothing.
    std::fs::write(&config, "this is not toml [").expect("write");
    sighup(pid);
    eventually(DEADLINE, "the failed reload is logged", || {
        b.log_text().contains("configuration unchanged")
    });
    eventually(DEADLINE, "still ro-auto", || {
        connect_backend(&b).is_ok_and(|mut c| mode_of(&mut c) == "ro-auto")
    });

    std::fs::write(&config, &original).expect("write");
    sighup(pid);
    eventually(DEADLINE, "back to rw and more than one connection", || {
        let (Ok(mut one), Ok(_two)) = (connect_backend(&b), connect_backend(&b)) else {
            return false;
        };
        mode_of(&mut one) == "rw"
    });
}

fn connect_backend(b: &Backend) -> Result<powermail_proto::BackendConn, String> {
    powermail_proto::BackendConn::connect(b.addr, SECRET.as_bytes(), IO_TIMEOUT)
        .map_err(|e| e.to_string())
}

fn mode_of(c: &mut powermail_proto::BackendConn) -> String {
    c.status()
        .ok()
        .and_then(|s| s.into_iter().find(|(k, _)| k == "mode"))
        .map(|(_, v)| v)
        .unwrap_or_default()
}
