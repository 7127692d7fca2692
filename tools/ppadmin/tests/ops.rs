//! ppadmin's store and runtime verbs against a real cluster started by `powermail up`
//! (pplistener with 3 backends, powersmtp, powerpop), driven by plain SMTP and POP3
//! clients over TCP:
//!
//! * `list` flags messages with fewer than K copies (a wiped backend), `repair` restores
//!   K copies of every message and a second run does nothing;
//! * `drain` empties a backend with nothing lost: the same message ids, each exactly once
//!   in the POP3 listing, each with K copies on the other backends;
//! * `disable` keeps new messages off a backend; `reload` changes a limit for new SMTP
//!   sessions while an open one keeps working; `loglevel` and `status` answer.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use powermail_testkit::{eventually, Pop, Smtp};

/// A running `powermail up` (the kit's), with ppadmin checks.
struct Up {
    up: powermail_testkit::Up,
    data: std::path::PathBuf,
    smtp: SocketAddr,
    pop: SocketAddr,
    base: u16,
}

impl Up {
    fn start(backends: u16, replicas: usize) -> Up {
        let up = powermail_testkit::Up::start(backends, replicas);
        // The frontends' first health checks.
        std::thread::sleep(Duration::from_millis(1500));
        Up {
            data: up.data.clone(),
            smtp: up.smtp,
            pop: up.pop,
            base: up.backend_base_port,
            up,
        }
    }

    /// Runs ppadmin, asserts the exit code, returns stdout.
    fn run(&self, code: i32, args: &[&str]) -> String {
        let out = self.up.ppadmin(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "ppadmin {args:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pid of the supervised daemon `name`.
    fn pid(&self, name: &str) -> Option<i32> {
        self.up.daemon_pid(name)
    }
}

/// Sends `n` messages to `rcpts`, one SMTP session.
fn deliver(smtp: SocketAddr, n: usize, rcpts: &[&str]) {
    let mut c = Smtp::connect(smtp).expect("SMTP");
    for i in 0..n {
        let wire = format!("Subject: m{i}\r\n\r\nbody {i}\r\n..dot line\r\n");
        let code = c
            .send("sender@example.org", rcpts, wire.as_bytes())
            .expect("SMTP transaction");
        assert_eq!(code, 250, "message {i}");
    }
    c.quit();
}

/// POP3 UIDLs of a mailbox, once the frontend lists `expected` messages: after a backend
/// restart its health checker needs a moment to see the backends up again, and until
/// then POP3 shows what it can reach (by design).
fn uidls(pop: SocketAddr, user: &str, password: &str, expected: usize) -> Vec<String> {
    // Bounded: after the last try the last listing is returned (and checked by the caller).
    let mut ids = Vec::new();
    for _ in 0..UIDL_TRIES_MAX {
        let mut c = Pop::login(pop, user, password).expect("POP3 login");
        ids = c
            .uidl()
            .expect("UIDL")
            .into_iter()
            .map(|(_, u)| u)
            .collect();
        if !ids.is_empty() {
            let body = c.retr(1).expect("RETR 1");
            let text = String::from_utf8_lossy(&body);
            assert!(text.contains("\r\nbody "), "{text}");
        }
        c.quit().expect("QUIT");
        if ids.len() == expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ids
}

/// Listings [`uidls`] tries (200 ms apart: about 15 s).
const UIDL_TRIES_MAX: usize = 75;

/// `list` output rows: (msgid, copies "n/K", holders, flag).
fn rows(listing: &str) -> Vec<(String, String, String, String)> {
    listing
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 5, "{l}");
            (f[0].into(), f[2].into(), f[3].into(), f[4].into())
        })
        .collect()
}

fn remove_contents(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("read disk").flatten() {
        let p = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).expect("wipe");
        } else {
            std::fs::remove_file(&p).expect("wipe");
        }
    }
}

/// `(messages, bytes)` of `mailbox` on backend `disk`, by a fresh walk of its directory.
fn walked_usage(data: &Path, disk: usize, mailbox: &str) -> (u64, u64) {
    let mbox = data.join(format!("disks/{disk}/mbox"));
    let Ok(l1s) = std::fs::read_dir(&mbox) else {
        return (0, 0);
    };
    for l1 in l1s {
        for l2 in std::fs::read_dir(l1.expect("readdir").path()).expect("readdir") {
            let dir = l2.expect("readdir").path().join(mailbox);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                let sizes: Vec<u64> = entries
                    .map(|e| e.expect("readdir").metadata().expect("stat").len())
                    .collect();
                return (sizes.len() as u64, sizes.iter().sum());
            }
        }
    }
    (0, 0)
}

/// Each backend's `USAGE` (from its index) equals a walk of its disk.
fn assert_usage_equals_walk(up: &Up, backends: usize, mailbox: &str) {
    let out = up.run(0, &["usage", mailbox]);
    for b in 0..backends {
        let (messages, bytes) = walked_usage(&up.data, b, mailbox);
        assert!(
            out.contains(&format!("b{b}\t{messages}\t{bytes}\n")),
            "b{b} holds {messages} messages, {bytes} bytes on disk:\n{out}"
        );
    }
}

#[test]
fn list_flags_repair_restores_and_drain_moves_everything() {
    let up = Up::start(3, 2);
    let (mb, pw) = ("info@company.biz", "s3cret");
    up.run(0, &["user", "add", mb, "--password", pw]);
    up.run(0, &["user", "add", "sales@company.biz", "--password", "x"]);
    deliver(up.smtp, 12, &[mb]);
    deliver(up.smtp, 4, &[mb, "sales@company.biz"]);
    let before = rows(&up.run(0, &["list", mb]));
    assert_eq!(before.len(), 16);
    assert!(
        before.iter().all(|r| r.1 == "2/2" && r.3 == "ok"),
        "{before:?}"
    );

    // Backend b1's disk is lost: pplistener dies, the disk comes back empty, the
    // supervisor restarts pplistener.
    // The supervisor is paused meanwhile: a restart while the disk is being emptied
    // would find half of it (a race that failed about one run in three here).
    let supervisor = up.up.pid().expect("powermail running") as libc::pid_t;
    let pid = up.pid("pplistener").expect("pplistener running");
    // SAFETY: kill(2) on processes of this test's own cluster.
    unsafe {
        libc::kill(supervisor, libc::SIGSTOP);
        libc::kill(pid, libc::SIGKILL);
    }
    remove_contents(&up.data.join("disks/1"));
    // SAFETY: as above.
    unsafe { libc::kill(supervisor, libc::SIGCONT) };
    std::thread::sleep(Duration::from_millis(500));
    eventually(Duration::from_secs(30), "pplistener back", || {
        std::net::TcpStream::connect(("127.0.0.1", up.base + 1)).is_ok()
    });
    let out = up.run(2, &["list", mb]);
    let under = rows(&out).into_iter().filter(|r| r.3 == "UNDER").count();
    let on_b1 = before.iter().filter(|r| r.2.contains("b1")).count();
    assert!(on_b1 > 0, "K=2 of 3 backends: b1 held some of 16");
    assert_eq!(under, on_b1, "{out}");
    assert!(
        out.contains(&format!("{on_b1} with fewer than 2 copies")),
        "{out}"
    );

    // A POP3 reader holds the mailbox: repair leaves it alone and says so. Until
    // powerpop's health checks see the restarted backends, a login is refused with
    // [SYS/TEMP] (no backend to list the mailbox), never given an empty maildrop.
    let mut reader = None;
    eventually(Duration::from_secs(30), "POP3 login", || {
        reader = Pop::login(up.pop, mb, pw).ok();
        reader.is_some()
    });
    let reader = reader.expect("POP3 login");
    let out = up.run(2, &["repair", "--lock-wait-ms", "200"]);
    assert!(out.contains("1 busy"), "{out}");
    let still = rows(&up.run(2, &["list", mb]));
    assert_eq!(still.iter().filter(|r| r.3 == "UNDER").count(), on_b1);
    assert!(reader.quit().expect("QUIT").starts_with("+OK"));

    let out = up.run(0, &["repair"]);
    assert!(out.contains("0 short of K, 0 failed, 0 busy"), "{out}");
    let after = rows(&up.run(0, &["list", mb]));
    assert_eq!(after.len(), 16);
    assert!(
        after.iter().all(|r| r.1 == "2/2" && r.3 == "ok"),
        "{after:?}"
    );
    let sales = rows(&up.run(0, &["list", "sales@company.biz"]));
    assert!(sales.iter().all(|r| r.1 == "2/2"), "{sales:?}");
    // Resumable and idempotent: nothing left to do.
    assert!(up.run(0, &["repair"]).contains(" 0 copies made"));
    // The backends' indexes (b1's rebuilt after its restart) saw every copy.
    assert_usage_equals_walk(&up, 3, mb);
    assert_usage_equals_walk(&up, 3, "sales@company.biz");

    // Drain b0: nothing may stay on it, nothing may be lost or shown twice.
    let ids_before: Vec<String> = after.iter().map(|r| r.0.clone()).collect();
    let out = up.run(0, &["drain", "b0"]);
    assert!(out.contains("0 short of K, 0 failed"), "{out}");
    let drained = rows(&up.run(0, &["list", mb]));
    let ids_after: Vec<String> = drained.iter().map(|r| r.0.clone()).collect();
    assert_eq!(ids_before, ids_after, "same messages after the drain");
    assert!(
        drained
            .iter()
            .all(|r| r.1 == "2/2" && r.2 == "b1,b2" && r.3 == "ok"),
        "{drained:?}"
    );
    let usage = up.run(0, &["usage", mb]);
    assert!(usage.contains("b0\t0\t0"), "{usage}");
    assert_usage_equals_walk(&up, 3, mb);
    let mut pop_ids = uidls(up.pop, mb, pw, 16);
    assert_eq!(pop_ids.len(), 16, "each message exactly once in POP3");
    pop_ids.sort();
    assert_eq!(pop_ids, ids_after);
    assert!(up.run(0, &["status", "--interval-ms", "0"]).contains("ro"));
}

#[test]
fn disable_reload_loglevel_and_status() {
    let up = Up::start(2, 1);
    let mb = "demo@powermail.test";
    let out = up.run(0, &["disable", "b0"]);
    assert!(out.contains("powersmtp\tbackend b0 disabled"), "{out}");
    deliver(up.smtp, 6, &[mb]);
    let listed = rows(&up.run(0, &["list", mb]));
    assert_eq!(listed.len(), 6);
    assert!(listed.iter().all(|r| r.2 == "b1"), "{listed:?}");
    let status = up.run(0, &["status", "--interval-ms", "0"]);
    assert!(
        status.contains("powersmtp,powerpop"),
        "disabled in both:\n{status}"
    );
    up.run(0, &["enable", "b0"]);
    up.run(1, &["disable", "nosuch"]);

    // An SMTP session open across the reload.
    let mut open = Smtp::greet(up.smtp).expect("SMTP");
    let (_, ehlo) = open.cmd_lines("EHLO before.example").expect("EHLO");
    assert!(!ehlo.iter().any(|l| l.ends_with("SIZE 50000")), "{ehlo:?}");
    let path = up.data.join("etc/powersmtp.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let at = text.find("[[backend]]").expect("backend table");
    let edited = format!(
        "{}[limits]\nmessage_max_bytes = 50000\n\n{}",
        &text[..at],
        &text[at..]
    );
    std::fs::write(&path, edited).expect("edit config");
    let out = up.run(0, &["reload", "--daemon", "powersmtp"]);
    assert!(out.contains("1 change(s) applied"), "{out}");
    // The open session was not dropped and keeps working.
    let wire = b"Subject: across reload\r\n\r\nbody across\r\n";
    let code = open.send("sender@example.org", &[mb], wire).expect("send");
    assert_eq!(code, 250);
    open.quit();
    // A new session gets the new limit.
    let mut fresh = Smtp::greet(up.smtp).expect("SMTP");
    let (_, ehlo) = fresh.cmd_lines("EHLO after.example").expect("EHLO");
    assert!(ehlo.iter().any(|l| l.ends_with("SIZE 50000")), "{ehlo:?}");
    fresh.quit();
    assert!(up.run(0, &["reload"]).contains("powerpop\treloaded"));
    // SIGHUP does the same as the admin call.
    let path = up.data.join("etc/powerpop.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let at = text.find("[[backend]]").expect("backend table");
    let edited = format!("{}[limits]\nerrors_max = 7\n\n{}", &text[..at], &text[at..]);
    std::fs::write(&path, edited).expect("edit config");
    let pid = up.pid("powerpop").expect("powerpop running");
    // SAFETY: kill(2) on a process of this test's own cluster.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let log_path = up.data.join("log/powerpop.log");
    eventually(Duration::from_secs(10), "reload after SIGHUP", || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("reload: applied [limits.errors_max: 20 -> 7]")
    });
    let stats = up.run(0, &["stats", "--daemon", "powerpop"]);
    assert!(stats.contains("\"powerpop\""), "{stats}");

    // A mailbox deleted from the userbase leaves its mail: orphans finds it, purge removes it.
    up.run(0, &["user", "add", "gone@x.org", "--password", "x"]);
    deliver(up.smtp, 2, &["gone@x.org"]);
    up.run(0, &["user", "del", "gone@x.org"]);
    let out = up.run(0, &["orphans"]);
    assert!(out.starts_with("gone@x.org\t"), "{out}");
    assert!(out.contains("# 1 orphan mailboxes"), "{out}");
    assert!(up.run(0, &["purge"]).contains("would purge gone@x.org"));
    assert!(
        up.run(0, &["dir"]).contains("gone@x.org"),
        "dry run keeps it"
    );
    let out = up.run(0, &["purge", "--yes"]);
    assert!(out.contains("2 messages removed"), "{out}");
    assert!(up.run(0, &["orphans"]).contains("# 0 orphan mailboxes"));
    assert!(!up.run(0, &["dir"]).contains("gone@x.org"));

    let out = up.run(0, &["loglevel", "debug"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    up.run(0, &["loglevel", "info"]);
    let status = up.run(0, &["status", "--interval-ms", "200"]);
    for want in ["b0", "b1", "powersmtp", "powerpop", "latency"] {
        assert!(status.contains(want), "{want} missing:\n{status}");
    }
    let log = std::fs::read_to_string(up.data.join("log/powersmtp.log")).expect("log");
    assert!(
        log.lines().any(|l| l.contains("session=")
            && l.contains("msgid=")
            && l.contains("status=sent(250)")
            && l.contains("copies=1")),
        "{log}"
    );
}
