//! Starts real pplistener and powerpop processes on temporary directories
//! and free ports (through the shared test kit, `tests/kit`), and drives
//! powerpop with Python's `poplib` or a raw socket.

#![allow(dead_code, unused_imports)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use powermail_proto::{BackendConn, MailboxName, MessageId};
pub use powermail_testkit::{eventually, free_port, Pop as PopClient};
use powermail_testkit::{BackendSpec, Frontend, FrontendSpec, Kind, Pplistener, PplistenerSpec};

pub const SECRET: &str = "test-secret-0123456789";
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// One pplistener process serving one backend (so tests can kill one).
pub struct Backend {
    /// The process; first, so it is gone before its directory.
    pub process: Pplistener,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

// restart, kill9 and the rest of the daemon's methods.
powermail_testkit::deref_daemon!(Backend, process);

impl Backend {
    pub fn start() -> Backend {
        Backend::start_with("")
    }

    /// Starts with `tables` (e.g. `[limits]`) in its configuration.
    pub fn start_with(tables: &str) -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = PplistenerSpec {
            secret: SECRET.into(),
            admin_token: "tok".into(),
            extra: tables.into(),
            backends: vec![BackendSpec::new(dir.path().join("disk"))],
        };
        let process = Pplistener::start(dir.path(), "pplistener", &spec);
        Backend {
            addr: process.backends[0],
            process,
            dir,
        }
    }

    /// The stats of its one backend (GET /stats of its admin port).
    pub fn stats(&self) -> serde_json::Value {
        let (status, body) =
            powermail_testkit::admin_request(self.process.admin, "GET", "/stats", Some("tok"));
        assert_eq!(status, 200, "{body}");
        let stats: serde_json::Value = serde_json::from_str(&body).expect("stats JSON");
        stats["backends"][0].clone()
    }

    pub fn conn(&self) -> BackendConn {
        BackendConn::connect(self.addr, SECRET.as_bytes(), TIMEOUT).expect("connect")
    }

    pub fn put(&self, mailbox: &str, msgid: &str, body: &[u8]) {
        self.conn()
            .put(
                &MessageId::parse(msgid).unwrap(),
                &[MailboxName::parse(mailbox).unwrap()],
                body,
            )
            .expect("put");
    }

    /// Whether a message file exists under the data directory.
    pub fn has_file(&self, mailbox: &str, msgid: &str) -> bool {
        fn walk(dir: &Path, mailbox: &str, msgid: &str) -> bool {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return false;
            };
            rd.flatten().any(|e| {
                let p = e.path();
                (p.ends_with(Path::new(mailbox).join(msgid)) && p.is_file())
                    || (p.is_dir() && walk(&p, mailbox, msgid))
            })
        }
        walk(&self.dir.path().join("disk").join("mbox"), mailbox, msgid)
    }
}

/// A temporary SQLite userbase.
pub struct Users {
    pub dir: tempfile::TempDir,
    pub url: String,
}

impl Users {
    pub fn new(accounts: &[(&str, &str)]) -> Users {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("userbase.db").display());
        let ub = powermail_userbase::open(&url).unwrap();
        for (name, pw) in accounts {
            ub.add_mailbox(name, pw, 0).unwrap();
        }
        Users { dir, url }
    }
}

/// A running powerpop process.
pub struct Pop {
    /// The process; first, so it is gone before its directory.
    pub process: Frontend,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state_dir: PathBuf,
    /// powerpop's output (its log).
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pop {
    /// Starts powerpop over `backends`; `tables` is more TOML (top-level
    /// keys first, then tables such as `[limits]`).
    pub fn start(users: &Users, backends: &[&Backend], state_dir: &Path, tables: &str) -> Pop {
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        Pop::start_addrs(users, &addrs, state_dir, tables)
    }

    /// As [`Pop::start`], with the backends' addresses given (e.g. a proxy's).
    pub fn start_addrs(
        users: &Users,
        backends: &[SocketAddr],
        state_dir: &Path,
        tables: &str,
    ) -> Pop {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut extra = format!(
            "default_domain = \"example.org\"\nstate_dir = \"{}\"\n{tables}\n",
            state_dir.display()
        );
        if !tables.contains("[backend_pool]") {
            extra.push_str("\n[backend_pool]\nhealth_interval_ms = 100\nhealth_timeout_ms = 300\nconnect_timeout_ms = 500\n");
        }
        if !tables.contains("[throttle]") {
            extra.push_str("\n[throttle]\nfailure_delay_ms = 10\n");
        }
        let spec = FrontendSpec {
            kind: Kind::Pop,
            secret: SECRET.into(),
            admin_token: "tok".into(),
            userbase: users.url.clone(),
            extra,
            backends: backends
                .iter()
                .enumerate()
                .map(|(i, b)| (format!("b{i}"), *b, String::new()))
                .collect(),
        };
        let process = Frontend::start(dir.path(), "powerpop", &spec);
        Pop {
            addr: process.addr,
            admin: process.admin,
            state_dir: state_dir.to_path_buf(),
            log: dir.path().join("powerpop.log"),
            process,
            _dir: dir,
        }
    }

    /// Runs Python with `p` a connected `poplib.POP3`; returns its stdout.
    /// `out(x)` in the snippet prints `x` as JSON.
    pub fn py(&self, code: &str) -> String {
        py(self.addr, code)
    }

    /// GET /stats as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let (status, body) =
            powermail_testkit::admin_request(self.admin, "GET", "/stats", Some("tok"));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("stats JSON")
    }
}

const PRELUDE: &str = r#"
import poplib, json, sys, base64
def out(x):
    print(json.dumps(x))
def hexlines(lines):
    return [l.hex() for l in lines]
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=20)
"#;

/// Runs a poplib snippet against `addr`; panics with stderr on failure.
pub fn py(addr: SocketAddr, code: &str) -> String {
    let script = format!("{PRELUDE}{code}\n");
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        code
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A plain socket reading the greeting line.
pub fn raw_greeting(addr: SocketAddr) -> (TcpStream, String) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut l = String::new();
    let _ = r.read_line(&mut l);
    (s, l.trim_end().to_string())
}

/// A TCP proxy in front of a real backend that breaks every connection
/// once it has passed `cut_after_bytes` bytes towards the client (a backend
/// dying mid-answer, at a chosen byte). Runs until the test ends.
pub struct CuttingProxy {
    pub addr: SocketAddr,
    pub cut_after_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CuttingProxy {
    pub fn start(to: SocketAddr, cut_after_bytes: u64) -> CuttingProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicU64::new(cut_after_bytes));
        let limit = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let max = limit.load(Ordering::Relaxed);
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut passed = 0u64;
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let room = (max - passed).min(n as u64) as usize;
                        if client.write_all(&buf[..room]).is_err() {
                            break;
                        }
                        passed += room as u64;
                        if passed >= max {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy {
            addr,
            cut_after_bytes: cut,
        }
    }
}

/// A self-signed certificate made with the openssl tool, or `None` (with a
/// note) when it is not installed and this is not CI.
pub fn test_certificate(dir: &std::path::Path) -> Option<String> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=pop.test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    match made {
        Ok(o) if o.status.success() => Some(format!(
            "\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        )),
        other => {
            assert!(
                std::env::var_os("CI").is_none(),
                "openssl is required in CI: {other:?}"
            );
            eprintln!("NOTE: openssl cannot make a test certificate; TLS test skipped");
            None
        }
    }
}
