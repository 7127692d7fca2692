//! End-to-end tests: real `pplistener` processes (one per backend, so each
//! can be killed or switched read-only alone), a real `powersmtp` binary, a
//! temporary SQLite userbase, and real clients (Python's smtplib, raw
//! sockets, swaks when installed).
//!
//! The daemons are started by the shared test kit (`tests/kit`).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use powermail_proto::{BackendConn, MailboxName, MessageId};
use powermail_testkit::{
    admin_request, eventually, serial, BackendSpec, Frontend, FrontendSpec, Kind, Pplistener,
    PplistenerSpec,
};
use serde_json::{json, Value};

const SECRET: &str = "e2e-secret-0123456789";
const TIMEOUT: Duration = Duration::from_secs(30);
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp_client.py");

/// Starts `cmd` (a Python helper, not a daemon), waits for a stdout line
/// containing `ready` (returned), and keeps draining stdout afterwards.
fn spawn_and_wait(mut cmd: Command, ready: &str) -> (Child, Vec<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!(
                "process exited during start-up: {:?} {lines:?}",
                child.wait()
            );
        }
        lines.push(line.trim().to_string());
        if line.contains(ready) {
            break;
        }
    }
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    (child, lines)
}

/// One pplistener process with one backend (so each can be killed alone).
struct Backend {
    process: Pplistener,
    addr: SocketAddr,
    data: PathBuf,
}

impl Backend {
    fn start(root: &Path, i: usize) -> Backend {
        let data = root.join(format!("disk{i}"));
        let spec = PplistenerSpec {
            secret: SECRET.into(),
            admin_token: "tok".into(),
            extra: "[limits]\nfree_bytes_min = 0\n".into(),
            backends: vec![BackendSpec {
                extra: "cpu = 0\n".into(),
                ..BackendSpec::named(&format!("b{i}"), data.clone())
            }],
        };
        let process = Pplistener::start(root, &format!("pplistener{i}"), &spec);
        Backend {
            addr: process.backends[0],
            process,
            data,
        }
    }

    fn restart(&mut self) {
        self.process.restart();
    }

    fn kill(&mut self) {
        self.process.kill9();
    }

    fn conn(&self) -> BackendConn {
        BackendConn::connect(self.addr, SECRET.as_bytes(), TIMEOUT).expect("backend connect")
    }

    /// The stored file of `msgid` in `mailbox`, if this backend holds it.
    fn file(&self, mailbox: &str, msgid: &str) -> Option<PathBuf> {
        for l1 in std::fs::read_dir(self.data.join("mbox")).ok()? {
            for l2 in std::fs::read_dir(l1.ok()?.path()).ok()? {
                let p = l2.ok()?.path().join(mailbox).join(msgid);
                if p.exists() {
                    return Some(p);
                }
            }
        }
        None
    }
}

/// A test system: backends, userbase, powersmtp.
struct System {
    /// First, so the processes are gone before their directories.
    smtp: Frontend,
    backends: Vec<Backend>,
    port: u16,
    dir: tempfile::TempDir,
}

const USERS: [&str; 3] = ["alice@example.com", "bob@example.com", "carol@example.com"];

/// Mailboxes that forward: (name, target, keep a local copy).
const FORWARDERS: [(&str, &str, bool); 4] = [
    ("dave@example.com", "dave@elsewhere.example", false),
    ("erin@example.com", "erin@elsewhere.example", true),
    ("frank@example.com", "refuse@elsewhere.example", false),
    ("greg@example.com", "rejectdata@elsewhere.example", true),
];

impl System {
    /// `n` backends, K = `k`, `limits` TOML inside the [limits] table.
    fn start(n: usize, k: usize, limits: &str) -> System {
        System::start_with(n, k, limits, "")
    }

    /// Like [`System::start`], with `extra` TOML tables (before the backends).
    fn start_with(n: usize, k: usize, limits: &str, extra: &str) -> System {
        let dir = tempfile::tempdir().unwrap();
        let backends: Vec<Backend> = (0..n).map(|i| Backend::start(dir.path(), i)).collect();
        let db = dir.path().join("userbase.db");
        let url = format!("sqlite://{}", db.display());
        let ub = powermail_userbase::open(&url).expect("userbase");
        for u in USERS {
            ub.add_mailbox(u, "pw", 0).unwrap();
        }
        for (name, target, keep) in FORWARDERS {
            ub.add_mailbox(name, "pw", 0).unwrap();
            ub.set_forwards(name, vec![target.to_string()], keep)
                .unwrap();
        }
        drop(ub);
        let spec = FrontendSpec {
            kind: Kind::Smtp,
            secret: SECRET.into(),
            admin_token: "tok".into(),
            userbase: url,
            extra: format!(
                "hostname = \"mx.test\"\nfrontend_id = \"t1\"\nreplicas = {k}\n[limits]\n{limits}\n\
                 [backend_pool]\nhealth_interval_ms = 100\nhealth_timeout_ms = 500\n{extra}\n"
            ),
            backends: backends
                .iter()
                .enumerate()
                .map(|(i, b)| (format!("b{i}"), b.addr, String::new()))
                .collect(),
        };
        let smtp = Frontend::start(dir.path(), "powersmtp", &spec);
        System {
            port: smtp.addr.port(),
            smtp,
            backends,
            dir,
        }
    }

    /// One smtplib transaction.
    fn send(&self, from: &str, rcpts: &[&str], msg: &str) -> Value {
        self.send_with(from, &[], rcpts, msg)
    }

    /// One smtplib transaction with MAIL FROM parameters.
    fn send_with(&self, from: &str, mail_options: &[&str], rcpts: &[&str], msg: &str) -> Value {
        let spec = json!({"from": from, "mail_options": mail_options, "rcpts": rcpts, "msg": msg});
        self.send_spec(spec)
    }

    /// One smtplib transaction described by `spec` (see smtp_client.py).
    fn send_spec(&self, spec: Value) -> Value {
        let spec = spec.to_string();
        let out = Command::new("python3")
            .args([CLIENT, "send", "127.0.0.1", &self.port.to_string(), &spec])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Raw bytes in one write; everything the server said until it closed.
    fn raw(&self, payload: &[u8]) -> String {
        let mut child = Command::new("python3")
            .args([CLIENT, "raw", "127.0.0.1", &self.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(payload).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    /// The stored bytes of every copy of `msgid` in `mailbox`, one per
    /// backend that holds it.
    fn copies(&self, mailbox: &str, msgid: &str) -> Vec<Vec<u8>> {
        let (mb, id) = (
            MailboxName::parse(mailbox).unwrap(),
            MessageId::parse(msgid).unwrap(),
        );
        self.holders(mailbox, msgid)
            .into_iter()
            .map(|i| self.backends[i].conn().get(&mb, &id).unwrap())
            .collect()
    }

    /// Backends holding `msgid` for `mailbox`.
    fn holders(&self, mailbox: &str, msgid: &str) -> Vec<usize> {
        (0..self.backends.len())
            .filter(|&i| self.backends[i].file(mailbox, msgid).is_some())
            .collect()
    }

    fn admin_get(&self, path: &str) -> String {
        let (status, body) = admin_request(self.smtp.admin, "GET", path, Some("tok"));
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// Waits until the admin port shows backend `i` with `health`.
    fn wait_health(&self, i: usize, health: &str) {
        eventually(TIMEOUT, &format!("backend {i} becomes {health}"), || {
            let v: Value = serde_json::from_str(&self.admin_get("/stats")).unwrap_or_default();
            v["backends"][i]["health"] == health
        });
    }
}

/// The message id from "250 2.0.0 Ok: queued as <id>".
fn queued_id(data: &Value) -> String {
    assert_eq!(data[0], 250, "{data}");
    let text = data[1].as_str().unwrap();
    text.rsplit(' ').next().unwrap().to_string()
}

/// Splits a stored message into its Received header and the rest.
fn split_received(stored: &[u8]) -> (String, Vec<u8>) {
    let text = String::from_utf8_lossy(stored);
    let end = text.find(" +0000\r\n").expect("Received header date") + " +0000\r\n".len();
    (text[..end].to_string(), stored[end..].to_vec())
}

const MSG: &str = "From: a@sender.example\r\nSubject: test\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\nlast\r\n";
/// MSG as smtplib sends it: dot-stuffed, without the final ".CRLF".
const MSG_WIRE: &str = "From: a@sender.example\r\nSubject: test\r\n\r\nline one\r\n..leading dot\r\n...two dots\r\nlast\r\n";

#[test]
fn single_recipient_k2_over_3_stores_wire_form_on_exactly_two() {
    let _g = serial();
    let sys = System::start(3, 2, "");
    let r = sys.send("a@sender.example", &["Alice@Example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 250, "{r}");
    let id = queued_id(&r["data"]);
    let copies = sys.copies("alice@example.com", &id);
    assert_eq!(copies.len(), 2);
    for stored in copies {
        let (received, body) = split_received(&stored);
        assert!(received.starts_with("Received: from "), "{received:?}");
        assert!(
            received.contains(&format!(
                "by mx.test (powersmtp) with ESMTP id {id}\r\n\tfor <alice@example.com>; "
            )),
            "{received:?}"
        );
        assert_eq!(String::from_utf8(body).unwrap(), MSG_WIRE);
    }
    let stats: Value = serde_json::from_str(&sys.admin_get("/stats")).unwrap();
    assert_eq!(stats["counters"]["messages"], 1, "{stats}");
    assert!(stats["latency"]["backend_put"]["count"] == 2, "{stats}");
    // Latency-aware selection: every backend has a latency (its health
    // checks at least) and nothing in flight once the message is stored.
    for i in 0..3 {
        let b = &stats["backends"][i];
        assert!(b["latency_ewma_us"].as_u64().is_some(), "{stats}");
        assert_eq!(b["gauges"]["in_flight"], 0, "{stats}");
    }
    let metrics = sys.admin_get("/metrics");
    assert!(
        metrics.contains("powersmtp_backend_in_flight{backend=\"b0\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("powersmtp_backend_latency_seconds{backend="),
        "{metrics}"
    );
    assert!(metrics.contains("powersmtp_messages_total 1"), "{metrics}");
    // Every counter and gauge of /stats is in /metrics and vice versa (the
    // latency EWMA is each backend's latency_ewma_us, in seconds here).
    let mut from_text = powermail_admin::families_in_text(&metrics);
    assert!(
        from_text.remove("powersmtp_backend_latency_seconds"),
        "{metrics}"
    );
    assert_eq!(
        powermail_admin::families_in_stats(&stats, "powersmtp", "powersmtp_backend"),
        from_text,
        "{stats}\n{metrics}"
    );
    assert!(
        metrics.contains("powersmtp_replies_total{class=\"2xx\"}"),
        "{metrics}"
    );
    let config = sys.admin_get("/config");
    assert!(config.contains("\"replicas\": 2"), "{config}");
    assert!(
        !config.contains(SECRET),
        "no secret on the admin port: {config}"
    );
}

#[test]
fn multi_recipient_is_one_put_per_backend_with_hardlinks() {
    let _g = serial();
    let sys = System::start(3, 2, "");
    let r = sys.send(
        "",
        &[
            "alice@example.com",
            "nobody@example.com",
            "bob@example.com",
            "carol@example.com",
        ],
        MSG,
    );
    assert_eq!(r["rcpts"][1][0], 550, "{r}");
    assert!(
        r["rcpts"][1][1].as_str().unwrap().starts_with("5.1.1"),
        "{r}"
    );
    let id = queued_id(&r["data"]);
    let holders = sys.holders("alice@example.com", &id);
    assert_eq!(holders.len(), 2);
    for &i in &holders {
        let md: Vec<_> = ["alice@example.com", "bob@example.com", "carol@example.com"]
            .iter()
            .map(|m| std::fs::metadata(sys.backends[i].file(m, &id).expect("linked")).unwrap())
            .collect();
        assert!(md.iter().all(|m| m.ino() == md[0].ino()), "one inode");
        assert!(md.iter().all(|m| m.nlink() == 3), "three links");
    }
    assert_eq!(sys.holders("bob@example.com", &id), holders);
    // No "for <...>" with several recipients.
    let stored = sys.backends[holders[0]]
        .conn()
        .get(
            &MailboxName::parse("bob@example.com").unwrap(),
            &MessageId::parse(&id).unwrap(),
        )
        .unwrap();
    let (received, body) = split_received(&stored);
    assert!(!received.contains("for <"), "{received}");
    assert_eq!(body, MSG_WIRE.as_bytes());
}

#[test]
fn backends_down_and_read_only() {
    let _g = serial();
    let mut sys = System::start(3, 2, "");
    // Read-only backend 0 is skipped: every copy goes to 1 and 2.
    sys.backends[0].conn().set_readonly(true).unwrap();
    sys.wait_health(0, "readonly");
    for _ in 0..4 {
        let id = queued_id(&sys.send("a@b.c", &["alice@example.com"], MSG)["data"]);
        assert_eq!(sys.holders("alice@example.com", &id), vec![1, 2]);
    }
    sys.backends[0].conn().set_readonly(false).unwrap();
    sys.wait_health(0, "up");
    // Backend 1 killed: still two copies, on 0 and 2.
    sys.backends[1].kill();
    sys.wait_health(1, "down");
    for _ in 0..4 {
        let id = queued_id(&sys.send("a@b.c", &["alice@example.com"], MSG)["data"]);
        assert_eq!(sys.holders("alice@example.com", &id), vec![0, 2]);
    }
    // Killed without waiting for the health checker: the next message falls
    // back or fails with 451, never 250 with fewer than K copies.
    sys.backends[2].kill();
    let r = sys.send("a@b.c", &["alice@example.com"], MSG);
    assert_eq!(r["data"][0], 451, "{r}");
    assert!(r["data"][1].as_str().unwrap().starts_with("4.3.0"), "{r}");
    // All down.
    sys.backends[0].kill();
    sys.wait_health(0, "down");
    let r = sys.send("a@b.c", &["alice@example.com"], MSG);
    assert_eq!(r["data"][0], 451, "{r}");
    // Back up: delivery resumes, and no partial copies were left behind.
    for b in sys.backends.iter_mut() {
        b.restart();
    }
    sys.wait_health(2, "up");
    sys.wait_health(1, "up");
    let id = queued_id(&sys.send("a@b.c", &["alice@example.com"], MSG)["data"]);
    assert_eq!(sys.holders("alice@example.com", &id).len(), 2);
    let mbox = MailboxName::parse("alice@example.com").unwrap();
    let total: usize = sys
        .backends
        .iter()
        .map(|b| b.conn().list(&mbox, 100).unwrap().len())
        .sum();
    assert_eq!(
        total,
        2 * (4 + 4 + 1),
        "only accepted messages are stored, K times each"
    );
}

#[test]
fn size_limits() {
    let _g = serial();
    let sys = System::start(2, 1, "message_max_bytes = 10000");
    // SIZE= declared at MAIL: refused there.
    let big = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(20_000));
    let r = sys.send_with("a@b.c", &["SIZE=20020"], &["alice@example.com"], &big);
    assert_eq!(r["mail"][0], 552, "{r}");
    assert!(r["mail"][1].as_str().unwrap().starts_with("5.3.4"), "{r}");
    // Not declared: refused at the end of DATA.
    let r = sys.send("a@b.c", &["alice@example.com"], &big);
    assert_eq!(r["data"][0], 552, "{r}");
    // Without SIZE=, refused at the end of DATA; the session goes on.
    let mut raw =
        b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n".to_vec();
    raw.extend_from_slice(big.as_bytes());
    raw.extend_from_slice(b".\r\nNOOP\r\nQUIT\r\n");
    let out = sys.raw(&raw);
    assert!(out.contains("\r\n552 5.3.4 "), "{out}");
    assert!(out.ends_with("250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"), "{out}");
    let mbox = MailboxName::parse("alice@example.com").unwrap();
    for b in &sys.backends {
        assert!(b.conn().list(&mbox, 10).unwrap().is_empty());
    }
}

#[test]
fn pipelining_and_smuggling() {
    let _g = serial();
    let sys = System::start(2, 1, "");
    let raw = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<zed@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nSubject: p\r\n\r\nhi\n.\r\nMAIL FROM:<evil@x>\r\n.\r\nQUIT\r\n";
    let out = sys.raw(raw);
    let codes: Vec<&str> = out
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..3])
        .collect();
    assert_eq!(
        codes,
        ["220", "250", "250", "250", "550", "250", "354", "250", "221"],
        "{out}"
    );
    assert!(out.contains("250-PIPELINING"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("250 2.0.0 Ok: queued as "))
        .unwrap();
    let holders = sys.holders("alice@example.com", id);
    assert_eq!(holders.len(), 1);
    let stored = sys.backends[holders[0]]
        .conn()
        .get(
            &MailboxName::parse("bob@example.com").unwrap(),
            &MessageId::parse(id).unwrap(),
        )
        .unwrap();
    let (_, body) = split_received(&stored);
    assert_eq!(
        body,
        b"Subject: p\r\n\r\nhi\r\n..\r\nMAIL FROM:<evil@x>\r\n"
    );
}

#[test]
fn over_max_connections_gets_421() {
    let _g = serial();
    let sys = System::start(1, 1, "connections_max = 2");
    let out = Command::new("python3")
        .args([CLIENT, "hold", "127.0.0.1", &sys.port.to_string(), "3"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("220 ") && lines[1].starts_with("220 "),
        "{text}"
    );
    assert!(lines[2].starts_with("421 4.3.2"), "{text}");
    // Slots are given back when sessions end.
    std::thread::sleep(Duration::from_millis(200));
    let r = sys.send("a@b.c", &["alice@example.com"], MSG);
    queued_id(&r["data"]);
}

#[test]
fn swaks_delivers() {
    let _g = serial();
    if Command::new("swaks").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "swaks is required in CI");
        eprintln!("NOTE: swaks not installed; swaks_delivers skipped");
        return;
    }
    let sys = System::start(2, 2, "");
    let out = Command::new("swaks")
        .args([
            "--server",
            "127.0.0.1",
            "--port",
            &sys.port.to_string(),
            "--to",
            "alice@example.com,bob@example.com",
            "--from",
            "swaks@sender.example",
            "--pipeline",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .lines()
        .find_map(|l| l.split("250 2.0.0 Ok: queued as ").nth(1))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(sys.holders("alice@example.com", id.trim()), vec![0, 1]);
    assert_eq!(sys.holders("bob@example.com", id.trim()), vec![0, 1]);
}

#[test]
fn userbase_unreadable_gives_451_at_rcpt() {
    let _g = serial();
    let sys = System::start(1, 1, "");
    let ok = sys.send("a@b.c", &["alice@example.com"], MSG);
    queued_id(&ok["data"]);
    // Corrupt the database under the running frontend: bob was never looked
    // up, so the cache cannot answer and the database cannot either.
    for f in ["userbase.db", "userbase.db-wal", "userbase.db-shm"] {
        let path = sys.dir.path().join(f);
        if path.exists() {
            std::fs::write(&path, vec![0x55u8; 64 << 10]).unwrap();
        }
    }
    let r = sys.send("a@b.c", &["bob@example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 451, "{r}");
    assert!(
        r["rcpts"][0][1].as_str().unwrap().starts_with("4.3.0"),
        "{r}"
    );
}

#[test]
fn quota_at_rcpt_and_at_end_of_data() {
    let _g = serial();
    // No caching, so quota changes made below are seen at once.
    let sys = System::start_with(
        2,
        2,
        "",
        "[userbase_cache]\npositive_ttl_ms = 0\nnegative_ttl_ms = 0",
    );
    for _ in 0..2 {
        queued_id(&sys.send("a@b.c", &["alice@example.com"], MSG)["data"]);
    }
    let mbox = MailboxName::parse("alice@example.com").unwrap();
    let used: u64 = sys.backends[0]
        .conn()
        .list(&mbox, 10)
        .unwrap()
        .iter()
        .map(|e| e.size_bytes)
        .sum();
    let url = format!("sqlite://{}", sys.dir.path().join("userbase.db").display());
    let ub = powermail_userbase::open(&url).unwrap();
    // Already over: 552 at RCPT.
    ub.set_quota("alice@example.com", used).unwrap();
    let r = sys.send("a@b.c", &["alice@example.com", "bob@example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 552, "{r}");
    assert!(
        r["rcpts"][0][1].as_str().unwrap().starts_with("5.2.2"),
        "{r}"
    );
    queued_id(&r["data"]);
    // Room for less than this message: 552 at the end of DATA, nothing stored.
    ub.set_quota("alice@example.com", used + 50).unwrap();
    let r = sys.send("a@b.c", &["alice@example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 250, "{r}");
    assert_eq!(r["data"][0], 552, "{r}");
    assert!(r["data"][1].as_str().unwrap().starts_with("5.2.2"), "{r}");
    assert_eq!(sys.backends[0].conn().list(&mbox, 10).unwrap().len(), 2);
    // Room enough.
    ub.set_quota("alice@example.com", used * 2).unwrap();
    queued_id(&sys.send("a@b.c", &["alice@example.com"], MSG)["data"]);
}

/// The usage read for a quota is kept between transactions (no USAGE round trip), grows
/// with what this frontend stores, and never refuses by itself: a kept figure at or
/// over the quota is read again first, so a deletion behind its back is seen.
#[test]
fn kept_quota_usage_accepts_without_asking_and_refuses_only_when_fresh() {
    let _g = serial();
    let sys = System::start_with(
        2,
        2,
        "",
        "[userbase_cache]\npositive_ttl_ms = 0\nnegative_ttl_ms = 0\n\
         [quota]\nusage_cache_ms = 600000",
    );
    let url = format!("sqlite://{}", sys.dir.path().join("userbase.db").display());
    let ub = powermail_userbase::open(&url).unwrap();
    ub.set_quota("alice@example.com", 1 << 30).unwrap();
    let usage_checks = || -> (u64, u64) {
        let v: Value = serde_json::from_str(&sys.admin_get("/stats")).unwrap();
        let c = &v["counters"];
        (
            c["quota_usage_reads"].as_u64().unwrap(),
            c["quota_usage_kept"].as_u64().unwrap(),
        )
    };
    for _ in 0..3 {
        queued_id(&sys.send("a@b.c", &["alice@example.com"], MSG)["data"]);
    }
    assert_eq!(usage_checks(), (1, 2), "one USAGE, then the kept figure");
    let mbox = MailboxName::parse("alice@example.com").unwrap();
    let listed = sys.backends[0].conn().list(&mbox, 10).unwrap();
    assert_eq!(listed.len(), 3);
    let used: u64 = listed.iter().map(|e| e.size_bytes).sum();
    // The kept figure counts the three messages stored since it was read: with the
    // quota at what they use, the next RCPT is refused, on a fresh reading.
    ub.set_quota("alice@example.com", used).unwrap();
    let r = sys.send("a@b.c", &["alice@example.com", "bob@example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 552, "{r}");
    assert_eq!(usage_checks(), (2, 3));
    // One message deleted behind the frontend's back (as a POP3 session does): the kept
    // figure would refuse, so it is read again, and the recipient is accepted.
    for b in &sys.backends {
        b.conn().del(&mbox, &listed[0].msgid).unwrap();
    }
    let r = sys.send("a@b.c", &["alice@example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 250, "{r}");
    queued_id(&r["data"]);
    assert_eq!(usage_checks(), (3, 4));
}

/// Reads the messages the sink accepted: (recipients, bytes).
fn sunk(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let b = std::fs::read(p).unwrap();
            let nl = b.iter().position(|&c| c == b'\n').unwrap();
            (
                String::from_utf8(b[..nl].to_vec()).unwrap(),
                b[nl + 1..].to_vec(),
            )
        })
        .collect()
}

#[test]
fn forwards_through_the_relay_inside_the_transaction() {
    let _g = serial();
    let sink_dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("python3");
    cmd.args([CLIENT, "sink"]).arg(sink_dir.path());
    let (mut sink, lines) = spawn_and_wait(cmd, "sink listening on");
    let port = lines
        .last()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let sys = System::start_with(
        2,
        2,
        "",
        &format!("[forward]\nrelay = \"127.0.0.1:{port}\"\ntimeout_ms = 5000"),
    );
    // Forward only: relayed, no local copy.
    let r = sys.send("s@sender.example", &["dave@example.com"], MSG);
    let id = queued_id(&r["data"]);
    assert!(sys.holders("dave@example.com", &id).is_empty());
    let got = sunk(sink_dir.path());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "dave@elsewhere.example");
    let (received, body) = split_received(&got[0].1);
    assert!(received.contains(&format!("id {id}")), "{received}");
    assert_eq!(body, MSG_WIRE.as_bytes());
    // Forward and keep a local copy, together with a plain local recipient.
    let r = sys.send(
        "s@sender.example",
        &["erin@example.com", "alice@example.com"],
        MSG,
    );
    let id = queued_id(&r["data"]);
    assert_eq!(sys.holders("erin@example.com", &id), vec![0, 1]);
    assert_eq!(sys.holders("alice@example.com", &id), vec![0, 1]);
    assert_eq!(sunk(sink_dir.path()).len(), 2);
    // The relay refuses the target: its answer is the answer to RCPT.
    let r = sys.send("s@sender.example", &["frank@example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 550, "{r}");
    assert!(
        r["rcpts"][0][1].as_str().unwrap().starts_with("5.7.1"),
        "{r}"
    );
    // The relay refuses the message: 554, and the local copies are removed.
    let r = sys.send("s@sender.example", &["greg@example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 250, "{r}");
    assert_eq!(r["data"][0], 554, "{r}");
    let mbox = MailboxName::parse("greg@example.com").unwrap();
    for b in &sys.backends {
        assert!(b.conn().list(&mbox, 10).unwrap().is_empty());
    }
    // The relay gone: 451 at RCPT, nothing lost.
    sink.kill().unwrap();
    sink.wait().unwrap();
    let r = sys.send("s@sender.example", &["dave@example.com"], MSG);
    assert_eq!(r["rcpts"][0][0], 451, "{r}");
    assert_eq!(sunk(sink_dir.path()).len(), 2);
}

#[test]
fn starttls() {
    let _g = serial();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=mx.test",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    match made {
        Ok(o) if o.status.success() => {}
        other => {
            assert!(
                std::env::var_os("CI").is_none(),
                "openssl is required in CI: {other:?}"
            );
            eprintln!("NOTE: openssl cannot make a test certificate; starttls skipped");
            return;
        }
    }
    let tls = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"",
        cert.display(),
        key.display()
    );
    let sys = System::start_with(1, 1, "", &tls);
    let r = sys.send_spec(
        json!({"from": "a@b.c", "rcpts": ["alice@example.com"], "msg": MSG, "tls": true}),
    );
    assert_eq!(r["starttls"], 220, "{r}");
    assert_eq!(r["ehlo"], 250, "{r}");
    let id = queued_id(&r["data"]);
    let stored = sys.backends[0]
        .conn()
        .get(
            &MailboxName::parse("alice@example.com").unwrap(),
            &MessageId::parse(&id).unwrap(),
        )
        .unwrap();
    let (received, body) = split_received(&stored);
    assert!(received.contains("with ESMTPS id"), "{received}");
    assert_eq!(body, MSG_WIRE.as_bytes());
    // Plain text still works, and the injection of commands behind STARTTLS
    // is ignored (the raw client never completes the handshake).
    let out = sys.raw(b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n");
    assert!(out.contains("250-STARTTLS\r\n"), "{out}");
    assert!(out.ends_with("220 2.0.0 Ready to start TLS\r\n"), "{out}");
}

/// A sender that writes in small segments (as Postfix's `smtp-source` does):
/// the body crosses several 64 KiB backend chunks at odd offsets and must be
/// stored byte for byte on both copies.
#[test]
fn small_segments_across_backend_chunks_are_stored_byte_for_byte() {
    let _g = serial();
    let sys = System::start(2, 2, "");
    let mut body = String::from("From: a@sender.example\r\nSubject: segments\r\n\r\n");
    let mut i = 0u64;
    while body.len() < 200_000 {
        body.push_str(&format!(
            "line {i:07} {}\r\n",
            "x".repeat((i % 61) as usize)
        ));
        i += 1;
    }
    let s = std::net::TcpStream::connect(("127.0.0.1", sys.port)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let expect = |r: &mut BufReader<std::net::TcpStream>, code: &str| loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "wanted {code}, got {line:?}");
        if line.as_bytes().get(3) == Some(&b' ') {
            return line;
        }
    };
    expect(&mut r, "220");
    for (cmd, code) in [
        ("EHLO seg.test\r\n", "250"),
        ("MAIL FROM:<a@sender.example>\r\n", "250"),
        ("RCPT TO:<alice@example.com>\r\n", "250"),
        ("DATA\r\n", "354"),
    ] {
        w.write_all(cmd.as_bytes()).unwrap();
        expect(&mut r, code);
    }
    for seg in body.as_bytes().chunks(97) {
        w.write_all(seg).unwrap();
    }
    w.write_all(b".\r\n").unwrap();
    let done = expect(&mut r, "250");
    let id = done.trim_end().rsplit(' ').next().unwrap().to_string();
    let copies = sys.copies("alice@example.com", &id);
    assert_eq!(copies.len(), 2);
    for stored in copies {
        let (_, got) = split_received(&stored);
        assert_eq!(got.len(), body.len());
        assert!(got == body.as_bytes(), "stored body differs");
    }
}
