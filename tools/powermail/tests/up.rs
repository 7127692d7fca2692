//! `powermail up` end to end: the supervisor starts the real daemons, a real
//! SMTP client delivers, a real POP3 client reads (K=2 copies shown once),
//! `ppadmin --data` adds a mailbox to the same userbase, LMTP delivers on its
//! own port, TLS works with no setup (STARTTLS, STLS and POP3S verified
//! against the self-signed certificate `powermail up` made), and SIGTERM
//! stops every child.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_powermail"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The daemons must sit next to `powermail`; build them if a plain
/// `cargo test -p powermail` did not.
fn ensure_siblings() {
    let missing = ["pplistener", "powersmtp", "powerpop", "ppadmin"]
        .iter()
        .any(|b| !bin_dir().join(b).exists());
    if missing {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "pplistener",
                "-p",
                "powersmtp",
                "-p",
                "powerpop",
                "-p",
                "ppadmin",
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A base port with `n` free consecutive ports after it.
fn free_range(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base < 60_000 && (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range");
}

fn python(script: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pids_with(needle: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle.to_str().unwrap()) {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn powermail_up_runs_the_whole_system_and_stops_cleanly() {
    ensure_siblings();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let (smtp, pop, base) = (free_port(), free_port(), free_range(3));
    let (lmtp, pop3s) = (free_port(), free_port());
    let (a1, a2, a3) = (free_port(), free_port(), free_port());
    let overrides = dir.path().join("up.toml");
    std::fs::write(
        &overrides,
        format!(
            "smtp_listen = \"127.0.0.1:{smtp}\"\npop_listen = \"127.0.0.1:{pop}\"\nbackend_base_port = {base}\n\
             lmtp_listen = \"127.0.0.1:{lmtp}\"\npop3s_listen = \"127.0.0.1:{pop3s}\"\n\
             pplistener_admin = \"127.0.0.1:{a1}\"\nsmtp_admin = \"127.0.0.1:{a2}\"\npop_admin = \"127.0.0.1:{a3}\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_powermail"))
        .args(["up", "--backends", "3", "--replicas", "2", "--data"])
        .arg(&data)
        .arg("--config")
        .arg(&overrides)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let _guard = StopOnDrop(child.id());
    let mut banner = String::new();
    while !banner.contains("Ctrl-C stops everything") {
        assert!(
            out.read_line(&mut banner).unwrap() > 0,
            "powermail exited: {banner}"
        );
    }
    let password = std::fs::read_to_string(data.join("etc/demo.password")).unwrap();
    assert!(
        banner.contains(&format!("password {}", password.trim())),
        "{banner}"
    );
    let cert = data.join("etc/tls/cert.pem");
    assert!(
        banner.contains(&format!(
            "certificate {}",
            cert.canonicalize().unwrap().display()
        )),
        "{banner}"
    );
    wait_for_port(smtp);
    wait_for_port(pop);
    wait_for_port(lmtp);
    wait_for_port(pop3s);

    // A new mailbox through ppadmin, on the same embedded userbase.
    let status = Command::new(bin_dir().join("ppadmin"))
        .arg("--data")
        .arg(&data)
        .args(["user", "add", "info@company.biz", "--password", "s3cret"])
        .status()
        .unwrap();
    assert!(status.success());

    let sent = python(&format!(
        "import smtplib\n\
         s = smtplib.SMTP('127.0.0.1', {smtp}, timeout=30)\n\
         print(s.sendmail('a@b.example', ['demo@powermail.test', 'info@company.biz'], 'Subject: up\\r\\n\\r\\nhello\\r\\n..dot\\r\\n'))\n\
         s.quit()"
    ));
    assert_eq!(sent.trim(), "{}", "both recipients accepted");
    // Health checks may lag behind the frontends' start: the POP side retries briefly.
    let read = python(&format!(
        "import poplib, time\n\
         for user, pw in (('demo@powermail.test', {pw:?}), ('info@company.biz', 's3cret')):\n\
         \x20   p = poplib.POP3('127.0.0.1', {pop}, timeout=30)\n\
         \x20   p.user(user); p.pass_(pw)\n\
         \x20   n = p.stat()[0]\n\
         \x20   body = b'\\n'.join(p.retr(1)[1]).decode() if n else ''\n\
         \x20   print(user, n, 'hello\\n..dot' in body)\n\
         \x20   p.quit()",
        pw = password.trim()
    ));
    assert_eq!(
        read.trim(),
        "demo@powermail.test 1 True\ninfo@company.biz 1 True",
        "K=2 copies listed once, exact text"
    );

    // LMTP on its own port, then TLS everywhere, verified against the
    // certificate made on first start (hostname localhost checked).
    let tls = python(&format!(
        "import smtplib, poplib, ssl\n\
         ctx = ssl.create_default_context(cafile={cert:?})\n\
         l = smtplib.LMTP('127.0.0.1', {lmtp}, timeout=30)\n\
         print('lmtp', l.sendmail('a@b.example', ['info@company.biz'], 'Subject: lmtp\\r\\n\\r\\nvia lmtp\\r\\n'))\n\
         l.quit()\n\
         s = smtplib.SMTP('localhost', {smtp}, timeout=30)\n\
         s.ehlo(); print('starttls', s.starttls(context=ctx)[0]); s.ehlo()\n\
         print('smtp tls', s.sock.version() is not None, s.sendmail('a@b.example', ['info@company.biz'], 'Subject: tls\\r\\n\\r\\nsecret\\r\\n'))\n\
         s.quit()\n\
         p = poplib.POP3('localhost', {pop}, timeout=30)\n\
         print('stls', p.stls(context=ctx)[:3]); p.user('info@company.biz'); p.pass_('s3cret')\n\
         print('pop stls', p.stat()[0]); p.quit()\n\
         p = poplib.POP3_SSL('localhost', {pop3s}, context=ctx, timeout=30)\n\
         p.user('info@company.biz'); p.pass_('s3cret')\n\
         n = p.stat()[0]\n\
         found = any(b'secret' in b'\\n'.join(p.retr(i)[1]) for i in range(1, n + 1))\n\
         print('pop3s', n, p.sock.version() is not None, found); p.quit()",
        cert = cert.display().to_string()
    ));
    assert_eq!(
        tls.trim(),
        "lmtp {}\nstarttls 220\nsmtp tls True {}\nstls b'+OK'\npop stls 3\npop3s 3 True True",
        "LMTP and TLS after `powermail up`"
    );

    // Exactly two backends hold the message.
    let holders = (0..3)
        .filter(|i| {
            let mbox = data.join(format!("disks/{i}/mbox"));
            walk(&mbox)
                .iter()
                .any(|p| p.to_string_lossy().contains("demo@powermail.test/"))
        })
        .count();
    assert_eq!(holders, 2);

    // SIGTERM stops everything.
    assert!(!pids_with(&data).is_empty());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "powermail did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<String> = pids_with(&data)
        .into_iter()
        .filter(|p| *p != std::process::id().to_string())
        .collect();
    assert!(left.is_empty(), "children still running: {left:?}");
}

/// SIGTERMs the supervisor if the test fails half way, so no daemon outlives it.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2); harmless if the process is already gone.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGTERM) };
    }
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(p) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}
