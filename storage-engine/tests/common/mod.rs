//! Starts the real `pplistener` binary on temporary directories and free
//! ports (through the shared test kit, `tests/kit`), for the integration
//! tests; adds what only these tests look at (raw PPL/1 sockets, the files
//! under a data directory).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use powermail_proto::BackendConn;
use powermail_testkit::{durability_line, BackendSpec, Pplistener, PplistenerSpec};

pub const SECRET: &str = "test-secret-0123456789";
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// The admin port's token.
pub const TOKEN: &str = "tok";

/// A running pplistener process.
pub struct Listener {
    /// The process; first, so it is gone before its directory.
    pub process: Pplistener,
    pub backends: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

// restart (returns when ready), kill9, signal, wait_exit and the rest of
// the daemon's methods.
powermail_testkit::deref_daemon!(Listener, process);

impl Listener {
    /// Starts `n` backends; `extra` is appended to the TOML (e.g. `[limits]`).
    /// Their durability mode comes from `PM_TEST_DURABILITY` (see [`durability_line`]).
    pub fn start(n: usize, extra: &str) -> Listener {
        Listener::start_in(n, extra, &durability_line())
    }

    /// [`Listener::start`] with `durability` (a TOML line, or empty) in each `[[backend]]`.
    pub fn start_in(n: usize, extra: &str, durability: &str) -> Listener {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = PplistenerSpec {
            secret: SECRET.into(),
            admin_token: TOKEN.into(),
            extra: extra.into(),
            backends: (0..n)
                .map(|i| BackendSpec {
                    extra: durability.into(),
                    ..BackendSpec::new(dir.path().join(format!("disk{i}")))
                })
                .collect(),
        };
        let process = Pplistener::start(dir.path(), "pplistener", &spec);
        Listener {
            backends: process.backends.clone(),
            admin: process.admin,
            process,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid().expect("running")
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
        powermail_testkit::admin_request(self.admin, method, path, token)
    }

    /// One counter or gauge of one backend from the admin port's `/stats`.
    pub fn stat(&self, backend: usize, name: &str) -> u64 {
        let (status, body) = self.admin("GET", "/stats", Some("tok"));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let b = &v["backends"][backend];
        b["counters"][name]
            .as_u64()
            .or_else(|| b["gauges"][name].as_u64())
            .unwrap_or_else(|| panic!("no counter or gauge {name} in {body}"))
    }

    /// Waits (bounded) until the admin port reports `n` open connections on `backend`.
    pub fn wait_for_connections(&self, backend: usize, n: u64) {
        let what = format!("backend {backend} reaches {n} connections");
        powermail_testkit::eventually(TIMEOUT, &what, || {
            let (_, body) = self.admin("GET", "/stats", Some(TOKEN));
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["backends"][backend]["gauges"]["connections"] == n
        });
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
