//! `powermail up` end to end: the supervisor starts the real daemons, a real
//! SMTP client delivers, a real POP3 client reads (K=2 copies shown once),
//! `ppadmin --data` adds a mailbox to the same userbase, LMTP delivers on its
//! own port, TLS works with no setup (STARTTLS, STLS and POP3S verified
//! against the self-signed certificate `powermail up` made), and SIGTERM
//! stops every child.

use std::path::{Path, PathBuf};
use std::process::Command;

use powermail_testkit::Up;

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
    // Returns once every daemon has printed its readiness line.
    let mut up = Up::start(3, 2);
    let (data, banner) = (up.data.clone(), up.banner.clone());
    let (smtp, pop) = (up.smtp.port(), up.pop.port());
    let (lmtp, pop3s) = (up.lmtp.port(), up.pop3s.port());
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
    // A new mailbox through ppadmin, on the same embedded userbase.
    let out = up.ppadmin(&["user", "add", "info@company.biz", "--password", "s3cret"]);
    assert!(out.status.success(), "{out:?}");

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
    let status = up.stop().expect("powermail stops within the deadline");
    assert!(status.success(), "{status}");
    let left: Vec<String> = pids_with(&data)
        .into_iter()
        .filter(|p| *p != std::process::id().to_string())
        .collect();
    assert!(left.is_empty(), "children still running: {left:?}");
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
