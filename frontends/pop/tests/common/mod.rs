//! Starts real pplistener and powerpop processes on temporary directories
//! and free ports, and drives powerpop with Python's `poplib`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use powermail_proto::{BackendConn, MailboxName, MessageId};

pub const SECRET: &str = "test-secret-0123456789";
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `pplistener` binary next to this test's target dir, built if missing.
fn pplistener_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let bin = profile_dir.join("pplistener");
        if !bin.exists() {
            let target_dir = profile_dir.parent().unwrap();
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "pplistener"])
                .env("CARGO_TARGET_DIR", target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo build -p pplistener");
            assert!(status.success(), "building pplistener failed");
        }
        bin
    })
}

/// Waits for `want` lines containing one of `markers` on a child's stdout,
/// then keeps draining it.
fn wait_ready(child: &mut Child, markers: &[&str], want: usize) {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ready = 0;
    let mut line = String::new();
    while ready < want {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("process exited during start-up: {:?}", child.wait());
        }
        if markers.iter().any(|m| line.contains(m)) {
            ready += 1;
        }
    }
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
}

/// One pplistener process serving one backend (so tests can kill one).
pub struct Backend {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Backend {
    pub fn start() -> Backend {
        Backend::start_with("")
    }

    /// Starts with `tables` (e.g. `[limits]`) in its configuration.
    pub fn start_with(tables: &str) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin = free_port();
        let toml = format!(
            "secret = \"{SECRET}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nadmin_token = \"tok\"\n\
             {tables}\n[[backend]]\ndata_dir = \"{}\"\nlisten = \"{addr}\"\n",
            dir.path().join("disk").display()
        );
        let config = dir.path().join("pplistener.toml");
        std::fs::write(&config, toml).unwrap();
        let mut b = Backend {
            dir,
            config,
            addr,
            child: None,
        };
        b.restart();
        b
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = Command::new(pplistener_bin())
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pplistener");
        wait_ready(&mut child, &["listening on", "admin port on"], 2);
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
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

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
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
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state_dir: PathBuf,
    /// powerpop's stderr (its log).
    pub log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Pop {
    /// Starts powerpop over `backends`; `extra` is appended to the TOML
    /// top level before the tables (e.g. `default_domain = ...`), `tables`
    /// after (e.g. `[limits]`).
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
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut toml = format!(
            "listen = \"{addr}\"\nadmin_listen = \"{admin}\"\nadmin_token = \"tok\"\n\
             userbase = \"{}\"\ndefault_domain = \"example.org\"\nstate_dir = \"{}\"\n\
             secret = \"{SECRET}\"\n",
            users.url,
            state_dir.display()
        );
        toml.push_str(tables);
        if !tables.contains("[backend_pool]") {
            toml.push_str("\n[backend_pool]\nhealth_interval_ms = 100\nhealth_timeout_ms = 300\nconnect_timeout_ms = 500\n");
        }
        if !tables.contains("[throttle]") {
            toml.push_str("\n[throttle]\nfailure_delay_ms = 10\n");
        }
        for (i, b) in backends.iter().enumerate() {
            toml.push_str(&format!("\n[[backend]]\nname = \"b{i}\"\naddr = \"{b}\"\n"));
        }
        let config = dir.path().join("powerpop.toml");
        std::fs::write(&config, toml).unwrap();
        let log = dir.path().join("powerpop.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_powerpop"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start powerpop");
        wait_ready(&mut child, &["powerpop listening on", "admin port on"], 2);
        Pop {
            addr,
            admin,
            state_dir: state_dir.to_path_buf(),
            log,
            child,
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
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        write!(
            s,
            "GET /stats HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let body = resp.split_once("\r\n\r\n").unwrap().1;
        serde_json::from_str(body).unwrap()
    }
}

impl Drop for Pop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Polls `f` until it returns true (bounded).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < TIMEOUT {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never happened: {what}");
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

/// A POP3 client on a raw socket, for byte-exact answers.
pub struct RawPop {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawPop {
    /// Connects and reads the greeting.
    pub fn connect(addr: SocketAddr) -> RawPop {
        let (writer, greeting) = raw_greeting_stream(addr);
        assert!(greeting.0.starts_with("+OK"), "{}", greeting.0);
        RawPop {
            reader: greeting.1,
            writer,
        }
    }

    /// Connects and logs in with USER/PASS.
    pub fn login(addr: SocketAddr, user: &str, password: &str) -> RawPop {
        let mut p = RawPop::connect(addr);
        assert!(p.cmd(&format!("USER {user}")).starts_with("+OK"));
        let pass = p.cmd(&format!("PASS {password}"));
        assert!(pass.starts_with("+OK"), "{pass}");
        p
    }

    /// Sends one command line, returns the status line (CRLF removed).
    pub fn cmd(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    /// RETR `n`: the answer's bytes exactly as sent, between the status
    /// line and the terminating `.CRLF` (so still dot-stuffed), or the
    /// status line of a refusal.
    pub fn retr(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let status = self.cmd(&format!("RETR {n}"));
        if !status.starts_with("+OK") {
            return Err(status);
        }
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            let got = self.reader.read_until(b'\n', &mut line).unwrap();
            assert!(got > 0, "connection closed mid-answer");
            if line == b".\r\n" {
                return Ok(body);
            }
            body.extend_from_slice(&line);
        }
    }
}

fn raw_greeting_stream(addr: SocketAddr) -> (TcpStream, (String, BufReader<TcpStream>)) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut l = String::new();
    let _ = r.read_line(&mut l);
    (s, (l.trim_end().to_string(), r))
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
