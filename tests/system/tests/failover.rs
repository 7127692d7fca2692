//! Issue #15: a backend that goes silent mid-request (a partition drops its
//! packets: no RST, no FIN) must not stall a transaction for `io_timeout_ms`.
//! When the health checker marks it down, the frontends cut the connections in
//! use to it (`frontends/common/src/cluster.rs`), so the SMTP transaction gets
//! its final reply, and a POP RETR its answer, within a couple of seconds.
//!
//! The partition is the test kit's TCP relay ([`DelayProxy`], no delay)
//! between the frontends and one backend: it forwards both ways until told to
//! blackhole, then reads and discards everything in both directions without
//! closing anything.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use powermail_testkit::{DelayProxy, Delays};

/// The frontends' per-request time-out: long, as for honest slow fsyncs.
const IO_TIMEOUT_MS: u64 = 60_000;
/// The upper bound a reply must meet: far below `IO_TIMEOUT_MS`, far above
/// one health check (`health_interval_ms + health_timeout_ms` = 1 s here), so
/// only the stall can break it.
const REPLY_BOUND: Duration = Duration::from_secs(15);

/// Quick health checks, a long io time-out.
fn pool_table() -> String {
    format!(
        "[backend_pool]\nhealth_interval_ms = 500\nhealth_timeout_ms = 500\n\
         connect_timeout_ms = 1000\nio_timeout_ms = {IO_TIMEOUT_MS}\nping_after_idle_ms = 500\n"
    )
}

/// Writes a line to the real stderr (libtest captures only the print macros).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Sends `body` from the suite's sender to user 0 in session `c`; the code.
fn send(c: &mut Smtp, body: &[u8]) -> u16 {
    c.send("a@sender.test", &[&user(0)], body).expect("send")
}

/// Two backends; b1 sits behind a silenceable [`DelayProxy`] and has the higher priority,
/// so with K=1 every message goes to it while it is up.
struct Setup {
    backends: Vec<Backend>,
    proxy: DelayProxy,
    userbase: String,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut backends: Vec<Backend> = (0..2)
            .map(|i| Backend::start(dir.path(), i, dir.path().join(format!("disk{i}")), ""))
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let proxy = DelayProxy::start(listener, backends[1].addr, Delays::both(Duration::ZERO))
            .expect("proxy");
        // The frontends (and the test's own checks) reach b1 through the proxy.
        backends[1].addr = proxy.addr;
        let userbase = sqlite_userbase(dir.path(), 1);
        Setup {
            backends,
            proxy,
            userbase,
            dir,
        }
    }

    fn smtp(&self) -> Frontend {
        self.smtp_k(1)
    }

    fn smtp_k(&self, k: usize) -> Frontend {
        let refs: Vec<&Backend> = self.backends.iter().collect();
        Frontend::smtp(
            self.dir.path(),
            &refs,
            &self.userbase,
            k,
            "",
            &pool_table(),
            &[0, 10],
        )
    }

    /// Stores test message `id` of about `size` bytes for user 0 through a
    /// powersmtp at K=`k` that is gone afterwards; returns the message.
    fn store(&self, k: usize, id: &str, size: usize) -> Vec<u8> {
        let smtp = self.smtp_k(k);
        let mut c = Smtp::connect(smtp.addr).expect("connect");
        let body = message(id, size);
        assert_eq!(send(&mut c, &body), 250, "{}", smtp.log_text());
        c.quit();
        body
    }

    fn pop(&self) -> Frontend {
        let refs: Vec<&Backend> = self.backends.iter().collect();
        Frontend::pop(self.dir.path(), &refs, &self.userbase, "", &pool_table())
    }
}

/// A PUT open on the backend when it goes silent: the transaction gets its
/// final reply (451, or 250 had it failed over) within [`REPLY_BOUND`], not
/// after `io_timeout_ms`; the next one is accepted by the other backend.
#[test]
fn smtp_transaction_on_a_blackholed_backend_ends_quickly() {
    let _g = serial();
    let s = Setup::start();
    let smtp = s.smtp();
    let mut c = Smtp::connect(smtp.addr).expect("connect");
    let warm = send(&mut c, &message("before-cut", 800));
    assert_eq!(warm, 250, "both backends up");
    assert_eq!(c.cmd("MAIL FROM:<a@sender.test>").expect("mail").0, 250);
    assert_eq!(
        c.cmd(&format!("RCPT TO:<{}>", user(0))).expect("rcpt").0,
        250
    );
    assert_eq!(c.cmd("DATA").expect("data").0, 354);
    let body = message("mid-cut", 200_000);
    let (first, rest) = body.split_at(100_000);
    c.raw(first).expect("first half");
    std::thread::sleep(Duration::from_millis(300));
    s.proxy.blackhole();
    let cut_at = Instant::now();
    c.raw(rest).expect("second half");
    c.raw(b".\r\n").expect("end of data");
    let reply = c.reply();
    let waited = cut_at.elapsed();
    let (code, text) = reply
        .unwrap_or_else(|e| panic!("no final reply after {waited:?}: {e}\n{}", smtp.log_text()));
    assert!(
        waited < REPLY_BOUND,
        "final reply after {waited:?} (io_timeout_ms = {IO_TIMEOUT_MS})"
    );
    assert!(code == 250 || code == 451, "{code} {text}");
    // b1 is down now: the next transaction goes to b0.
    let next = send(&mut c, &message("after-cut", 800));
    assert_eq!(next, 250, "{}", smtp.log_text());
    c.quit();
    report(&format!(
        "failover smtp: reply {code} {:.1} s after the cut (io_timeout_ms {IO_TIMEOUT_MS}), next transaction 250 via the other backend",
        waited.as_secs_f64()
    ));
}

/// A RETR from a backend gone silent: the session gets an answer within
/// [`REPLY_BOUND`], and a new login lists within `listing_timeout_ms` plus
/// slack, however long `io_timeout_ms` is.
#[test]
fn pop_retr_and_list_on_a_blackholed_backend_end_quickly() {
    let _g = serial();
    let s = Setup::start();
    // K=1 with b1 preferred: the message lives on b1 only.
    s.store(1, "on-b1", 300_000);
    let pop = s.pop();
    let mut p = pop_login(pop.addr, 0).expect("login");
    assert_eq!(p.uidl().expect("uidl").len(), 1);
    s.proxy.blackhole();
    let cut_at = Instant::now();
    let retr = p.cmd("RETR 1");
    let waited = cut_at.elapsed();
    let status =
        retr.unwrap_or_else(|e| panic!("no RETR answer after {waited:?}: {e}\n{}", pop.log_text()));
    assert!(waited < REPLY_BOUND, "RETR answered after {waited:?}");
    // The only holder is gone: a temporary error, the session lives on.
    assert!(status.starts_with("-ERR"), "{status}");
    assert!(p.cmd("NOOP").expect("noop").starts_with("+OK"));
    // QUIT releases the mailbox lock before it answers; a dropped socket
    // releases it only when the server notices, which can be after the next
    // login (that raced: -ERR [IN-USE] under load).
    let bye = p.quit().expect("quit");
    assert!(bye.starts_with("+OK"), "{bye}");
    let login_at = Instant::now();
    let mut again = pop_login(pop.addr, 0).expect("login while b1 is silent");
    let listed = again.uidl().expect("uidl").len();
    let login_waited = login_at.elapsed();
    assert!(
        login_waited < REPLY_BOUND,
        "login and UIDL took {login_waited:?}"
    );
    assert_eq!(listed, 0, "b1's message is not listed while it is cut off");
    again.quit().expect("quit");
    report(&format!(
        "failover pop: RETR answered {:.1} s after the cut ({status}), next login+UIDL {:.1} s",
        waited.as_secs_f64(),
        login_waited.as_secs_f64()
    ));
}

/// A message with a copy on each backend, b1 silent: RETR is served by b0
/// (a holder marked down is tried last), within [`REPLY_BOUND`].
#[test]
fn pop_retr_of_a_message_with_a_live_copy_is_served() {
    let _g = serial();
    let s = Setup::start();
    let body = s.store(2, "on-both", 50_000);
    let pop = s.pop();
    let mut p = pop_login(pop.addr, 0).expect("login");
    assert_eq!(p.uidl().expect("uidl").len(), 1);
    s.proxy.blackhole();
    let cut_at = Instant::now();
    let got = p.retr(1);
    let waited = cut_at.elapsed();
    let got = got.unwrap_or_else(|e| panic!("RETR after {waited:?}: {e}\n{}", pop.log_text()));
    assert!(waited < REPLY_BOUND, "RETR answered after {waited:?}");
    let (id, hash) = identify(&got).expect("a test message");
    assert_eq!(
        (id.as_str(), hash),
        ("on-both", sha(&body)),
        "the live copy, byte for byte"
    );
    p.quit().expect("quit");
    report(&format!(
        "failover pop K=2: RETR served by the live copy {:.1} s after the cut",
        waited.as_secs_f64()
    ));
}
