//! Starts the real `pplistener` binary on temporary directories and free
//! ports, for the integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use powermail_proto::BackendConn;

pub const SECRET: &str = "test-secret-0123456789";
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A running pplistener process.
pub struct Listener {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub backends: Vec<SocketAddr>,
    pub admin: SocketAddr,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `durability` line for each `[[backend]]` table: `PM_TEST_DURABILITY`
/// (`file` or `syncfs`) runs a suite in that mode; unset, the default (`file`).
pub fn durability_line() -> String {
    match std::env::var("PM_TEST_DURABILITY") {
        Ok(m) if m == "file" || m == "syncfs" => format!("durability = \"{m}\"\n"),
        Ok(m) if m.is_empty() => String::new(),
        Ok(m) => panic!("PM_TEST_DURABILITY={m:?}: use file or syncfs"),
        Err(_) => String::new(),
    }
}

impl Listener {
    /// Starts `n` backends; `extra` is appended to the TOML (e.g. `[limits]`).
    /// Their durability mode comes from `PM_TEST_DURABILITY` (see [`durability_line`]).
    pub fn start(n: usize, extra: &str) -> Listener {
        Listener::start_in(n, extra, &durability_line())
    }

    /// [`Listener::start`] with `durability` (a TOML line, or empty) in each `[[backend]]`.
    pub fn start_in(n: usize, extra: &str, durability: &str) -> Listener {
        let dir = tempfile::tempdir().unwrap();
        let backends: Vec<SocketAddr> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
            .collect();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut toml =
            format!("secret = \"{SECRET}\"\nadmin_listen = \"{admin}\"\nadmin_token = \"tok\"\n");
        toml.push_str(extra);
        toml.push('\n');
        for (i, a) in backends.iter().enumerate() {
            toml.push_str(&format!(
                "[[backend]]\ndata_dir = \"{}\"\nlisten = \"{a}\"\n{}",
                dir.path().join(format!("disk{i}")).display(),
                durability
            ));
        }
        let config = dir.path().join("pplistener.toml");
        std::fs::write(&config, toml).unwrap();
        let mut l = Listener {
            dir,
            config,
            backends,
            admin,
            child: None,
        };
        l.restart();
        l
    }

    /// (Re)starts the process and waits until every backend listens.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = Command::new(env!("CARGO_BIN_EXE_pplistener"))
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pplistener");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut ready = 0;
        let mut line = String::new();
        while ready < self.backends.len() + 1 {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("pplistener exited during start-up: {:?}", child.wait());
            }
            if line.contains("listening on") || line.contains("admin port on") {
                ready += 1;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        self.child = Some(child);
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the running process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits at most `timeout` for the process to exit: its status (the
    /// process is then gone, [`Listener::restart`] may follow), or `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn data_dir(&self, backend: usize) -> PathBuf {
        self.dir.path().join(format!("disk{backend}"))
    }

    pub fn conn(&self, backend: usize) -> BackendConn {
        BackendConn::connect(self.backends[backend], SECRET.as_bytes(), TIMEOUT).expect("connect")
    }

    /// A raw, authenticated socket for tests that send what the client refuses to.
    pub fn raw(&self, backend: usize) -> Raw {
        let mut r = Raw::connect(self.backends[backend]);
        let greeting = r.line();
        let nonce = greeting.split_whitespace().nth(3).unwrap().to_string();
        r.send(&format!(
            "AUTH {}\r\n",
            powermail_proto::auth::proof(SECRET.as_bytes(), &nonce)
        ));
        assert_eq!(r.line(), "+OK authenticated");
        r
    }

    /// An admin HTTP request; returns (status, body).
    pub fn admin(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// One counter of one backend from the admin port's `/stats`.
    pub fn stat(&self, backend: usize, name: &str) -> u64 {
        let (status, body) = self.admin("GET", "/stats", Some("tok"));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["backends"][backend][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {body}"))
    }

    /// Waits (bounded) until the admin port reports `n` open connections on `backend`.
    pub fn wait_for_connections(&self, backend: usize, n: u64) {
        for _ in 0..500 {
            let (_, body) = self.admin("GET", "/stats", Some("tok"));
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["backends"][backend]["connections"] == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("backend {backend} never reached {n} connections");
    }

    /// Nameless bodies (`O_TMPFILE`) the process has open on a backend's disk
    /// right now: PUTs being written.
    pub fn bodies_being_written(&self, backend: usize) -> usize {
        let tmp = self.data_dir(backend).join("tmp");
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return 0;
        };
        fds.flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|target| {
                target.starts_with(&tmp) && target.to_string_lossy().ends_with("(deleted)")
            })
            .count()
    }

    /// Files left in a backend's tmp directory.
    pub fn temp_files(&self, backend: usize) -> usize {
        std::fs::read_dir(self.data_dir(backend).join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The path of a stored message under a backend's data directory.
    pub fn message_path(&self, backend: usize, mailbox: &str, msgid: &str) -> PathBuf {
        find_file(&self.data_dir(backend).join("mbox"), mailbox, msgid).expect("message file")
    }
}

fn find_file(mbox: &Path, mailbox: &str, msgid: &str) -> Option<PathBuf> {
    for l1 in std::fs::read_dir(mbox).ok()? {
        for l2 in std::fs::read_dir(l1.ok()?.path()).ok()? {
            let p = l2.ok()?.path().join(mailbox).join(msgid);
            if p.exists() {
                return Some(p);
            }
        }
    }
    None
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A plain socket with line helpers.
pub struct Raw {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    pub fn send(&mut self, s: &str) {
        self.stream.write_all(s.as_bytes()).unwrap();
    }

    pub fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(b)
    }

    /// One line without its CRLF; empty string at end of stream.
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        let _ = self.reader.read_line(&mut l);
        l.trim_end_matches(['\r', '\n']).to_string()
    }

    /// Exactly `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.reader.read_exact(&mut b).unwrap();
        b
    }

    /// Whether the server closed the connection (reads EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
    }
}

/// Deterministic pseudo-random bytes (all 256 values, CR/LF/NUL included).
pub fn body(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
