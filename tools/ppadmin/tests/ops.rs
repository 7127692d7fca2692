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

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ppadmin"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// The daemons must sit next to ppadmin; build them if `cargo test -p ppadmin` did not.
fn ensure_siblings() {
    let names = ["powermail", "pplistener", "powersmtp", "powerpop"];
    if names.iter().any(|b| !bin_dir().join(b).exists()) {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.arg("build");
        for n in names {
            cmd.args(["-p", n]);
        }
        assert!(cmd.status().expect("cargo build").success());
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A base port with `n` free consecutive ports after it, below the ephemeral range
/// (32768 and up on Linux): a restarted backend must get its port back, and a port in the
/// ephemeral range may meanwhile be some outgoing connection's source port.
fn free_range(n: u16) -> u16 {
    let seed = u32::from(free_port()) ^ std::process::id();
    for i in 0..1000u32 {
        let base = 20_000 + ((seed.wrapping_mul(7919) + i * 97) % 12_000) as u16;
        if (0..n).all(|k| TcpListener::bind(("127.0.0.1", base + k)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range");
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `powermail up`, stopped (SIGTERM) when dropped.
struct Up {
    child: Child,
    data: PathBuf,
    smtp: u16,
    pop: u16,
    base: u16,
    _dir: tempfile::TempDir,
}

impl Up {
    fn start(backends: u16, replicas: usize) -> Up {
        ensure_siblings();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("var");
        let (smtp, pop, base) = (free_port(), free_port(), free_range(backends));
        let (a1, a2, a3) = (free_port(), free_port(), free_port());
        let overrides = dir.path().join("up.toml");
        std::fs::write(
            &overrides,
            format!(
                "smtp_listen = \"127.0.0.1:{smtp}\"\npop_listen = \"127.0.0.1:{pop}\"\nbackend_base_port = {base}\n\
                 pplistener_admin = \"127.0.0.1:{a1}\"\nsmtp_admin = \"127.0.0.1:{a2}\"\npop_admin = \"127.0.0.1:{a3}\"\n"
            ),
        )
        .expect("write overrides");
        let mut child = Command::new(bin_dir().join("powermail"))
            .args(["up", "--backends", &backends.to_string()])
            .args(["--replicas", &replicas.to_string(), "--data"])
            .arg(&data)
            .arg("--config")
            .arg(&overrides)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start powermail up");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let up = Up {
            child,
            data,
            smtp,
            pop,
            base,
            _dir: dir,
        };
        let mut banner = String::new();
        while !banner.contains("Ctrl-C stops everything") {
            assert!(
                out.read_line(&mut banner).expect("read banner") > 0,
                "powermail exited: {banner}"
            );
        }
        for port in [smtp, pop, a1, a2, a3] {
            wait_for_port(port);
        }
        // Keep draining the supervisor's output so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        // The frontends' first health checks.
        std::thread::sleep(Duration::from_millis(1500));
        up
    }

    fn ppadmin(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("ppadmin"))
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run ppadmin")
    }

    /// Runs ppadmin, asserts the exit code, returns stdout.
    fn run(&self, code: i32, args: &[&str]) -> String {
        let out = self.ppadmin(args);
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
        let config = self.data.join(format!("etc/{name}.toml"));
        let needle = config.to_string_lossy().into_owned();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains(name) && cmdline.contains(&needle))
                .then(|| e.file_name().to_string_lossy().parse().ok())
                .flatten()
        })
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line-based client for SMTP and POP3.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Client {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("read");
        l
    }

    /// An SMTP reply (all lines of a multi-line one).
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "connection closed after {all:?}");
            all.push_str(&l);
            if l.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).expect("write");
    }

    /// Sends a command and returns the (SMTP) reply.
    fn cmd(&mut self, text: &str) -> String {
        self.send(&format!("{text}\r\n"));
        self.reply()
    }

    /// One message in this SMTP session; returns the final reply.
    fn mail(&mut self, rcpts: &[&str], body: &str) -> String {
        assert!(self
            .cmd("MAIL FROM:<sender@example.org>")
            .starts_with("250"));
        for r in rcpts {
            assert!(self.cmd(&format!("RCPT TO:<{r}>")).starts_with("250"));
        }
        assert!(self.cmd("DATA").starts_with("354"));
        self.cmd(&format!("{body}\r\n."))
    }

    /// A POP3 multi-line answer's lines (after `+OK`).
    fn pop_lines(&mut self, text: &str) -> Vec<String> {
        self.send(&format!("{text}\r\n"));
        let first = self.line();
        assert!(first.starts_with("+OK"), "{text}: {first}");
        let mut out = Vec::new();
        loop {
            let l = self.line();
            let l = l.trim_end();
            if l == "." {
                return out;
            }
            out.push(l.to_string());
        }
    }
}

/// Sends `n` messages to `rcpts`, one SMTP session.
fn deliver(smtp: u16, n: usize, rcpts: &[&str]) {
    let mut c = Client::connect(smtp);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO test.example").starts_with("250"));
    for i in 0..n {
        let r = c.mail(
            rcpts,
            &format!("Subject: m{i}\r\n\r\nbody {i}\r\n..dot line"),
        );
        assert!(r.starts_with("250"), "message {i}: {r}");
    }
    c.cmd("QUIT");
}

/// POP3 UIDLs of a mailbox, once the frontend lists `expected` messages: after a backend
/// restart its health checker needs a moment to see the backends up again, and until
/// then POP3 shows what it can reach (by design).
fn uidls(pop: u16, user: &str, password: &str, expected: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut c = Client::connect(pop);
        assert!(c.line().starts_with("+OK"));
        c.send(&format!("USER {user}\r\n"));
        assert!(c.line().starts_with("+OK"));
        c.send(&format!("PASS {password}\r\n"));
        let ok = c.line();
        assert!(ok.starts_with("+OK"), "login: {ok}");
        let ids: Vec<String> = c
            .pop_lines("UIDL")
            .iter()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        if ids.len() == expected || Instant::now() > deadline {
            if !ids.is_empty() {
                let body = c.pop_lines("RETR 1");
                assert!(body.iter().any(|l| l.starts_with("body ")), "{body:?}");
            }
            c.send("QUIT\r\n");
            return ids;
        }
        c.send("QUIT\r\n");
        std::thread::sleep(Duration::from_millis(200));
    }
}

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
    let pid = up.pid("pplistener").expect("pplistener running");
    // SAFETY: kill(2) on a process of this test's own cluster.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    remove_contents(&up.data.join("disks/1"));
    std::thread::sleep(Duration::from_millis(500));
    wait_for_port(up.base + 1);
    let out = up.run(2, &["list", mb]);
    let under = rows(&out).into_iter().filter(|r| r.3 == "UNDER").count();
    let on_b1 = before.iter().filter(|r| r.2.contains("b1")).count();
    assert!(on_b1 > 0, "K=2 of 3 backends: b1 held some of 16");
    assert_eq!(under, on_b1, "{out}");
    assert!(
        out.contains(&format!("{on_b1} with fewer than 2 copies")),
        "{out}"
    );

    // A POP3 reader holds the mailbox: repair leaves it alone and says so.
    let mut reader = Client::connect(up.pop);
    assert!(reader.line().starts_with("+OK"));
    reader.send(&format!("USER {mb}\r\nPASS {pw}\r\n"));
    assert!(reader.line().starts_with("+OK"));
    assert!(reader.line().starts_with("+OK"), "logged in");
    let out = up.run(2, &["repair", "--lock-wait-ms", "200"]);
    assert!(out.contains("1 busy"), "{out}");
    let still = rows(&up.run(2, &["list", mb]));
    assert_eq!(still.iter().filter(|r| r.3 == "UNDER").count(), on_b1);
    reader.send("QUIT\r\n");
    assert!(reader.line().starts_with("+OK"));
    drop(reader);

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
    let mut open = Client::connect(up.smtp);
    assert!(open.reply().starts_with("220"));
    let ehlo = open.cmd("EHLO before.example");
    assert!(!ehlo.contains("SIZE 50000\r\n"), "{ehlo}");
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
    let r = open.mail(&[mb], "Subject: across reload\r\n\r\nbody across");
    assert!(r.starts_with("250"), "{r}");
    open.cmd("QUIT");
    // A new session gets the new limit.
    let mut fresh = Client::connect(up.smtp);
    assert!(fresh.reply().starts_with("220"));
    let ehlo = fresh.cmd("EHLO after.example");
    assert!(ehlo.contains("SIZE 50000"), "{ehlo}");
    fresh.cmd("QUIT");
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("reload: applied [limits.errors_max: 20 -> 7]")
    {
        assert!(Instant::now() < deadline, "no reload after SIGHUP");
        std::thread::sleep(Duration::from_millis(50));
    }
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
