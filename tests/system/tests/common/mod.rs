//! The system-test harness: starts real `pplistener` (one process per
//! backend, so one can be killed alone), `powersmtp` and `powerpop` processes
//! from the target directory on temporary directories and free ports, and
//! offers small blocking SMTP and POP3 clients written on `TcpStream` that
//! keep the exact wire bytes (so stored and retrieved messages can be hashed).

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use powermail_proto::BackendConn;
use sha2::{Digest, Sha256};

/// The backends' shared secret.
pub const SECRET: &str = "systest-secret-0123456789";
/// Bearer token of every admin port.
pub const TOKEN: &str = "systest-admin-token";
/// Socket read/write time-out of the test clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest any bounded wait of the suite waits.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Domain of every test mailbox.
pub const DOMAIN: &str = "sys.test";

/// The tests start many processes on a small machine: one test at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("local_addr")
        .port()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The directory of the workspace binaries (target/<profile>), which are
/// built there if a plain `cargo test -p powermail-systests` did not.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    BUILD.call_once(|| {
        let missing = ["pplistener", "powersmtp", "powerpop"]
            .iter()
            .any(|b| !dir.join(b).exists());
        if missing {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "-q",
                "-p",
                "pplistener",
                "-p",
                "powersmtp",
                "-p",
                "powerpop",
            ])
            .env("CARGO_TARGET_DIR", dir.parent().expect("target"))
            .current_dir(env!("CARGO_MANIFEST_DIR"));
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cargo build");
            assert!(status.success(), "building the daemons failed");
        }
    });
    let b = dir.join(name);
    assert!(b.exists(), "{} missing", b.display());
    b
}

/// Starts `cmd` (stderr appended to `log`), waits until its stdout has shown
/// a line containing each of `markers`, then keeps draining stdout.
fn spawn_ready(mut cmd: Command, log: &Path, markers: &[&str]) -> Child {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .expect("spawn daemon");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = vec![false; markers.len()];
    let mut lines = Vec::new();
    while !seen.iter().all(|s| *s) {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            let status = child.wait();
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            panic!(
                "daemon exited during start-up: {status:?}\nstdout: {lines:?}\nlog:\n{log_text}"
            );
        }
        for (m, s) in markers.iter().zip(seen.iter_mut()) {
            *s |= line.contains(m);
        }
        lines.push(line);
    }
    std::thread::spawn(move || {
        let _ = io::copy(&mut out, &mut io::sink());
    });
    child
}

/// kill -9 and reap.
fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// One pplistener process serving one backend.
pub struct Backend {
    /// Name in the frontends' configs (`b<i>`).
    pub name: String,
    /// PPL/1 address.
    pub addr: SocketAddr,
    /// Admin port.
    pub admin: SocketAddr,
    /// The backend's data directory.
    pub data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
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

impl Backend {
    /// Writes the config of backend `i` under `root` (data in `data`,
    /// `limits` lines inside `[limits]`) and starts it.
    pub fn start(root: &Path, i: usize, data: PathBuf, limits: &str) -> Backend {
        let addr = free_addr();
        let admin = free_addr();
        let config = root.join(format!("pplistener-b{i}.toml"));
        let floor = if limits.contains("free_bytes_min") {
            ""
        } else {
            "free_bytes_min = 0\n"
        };
        std::fs::write(
            &config,
            format!(
                "secret = \"{SECRET}\"\nadmin_listen = \"{admin}\"\nadmin_token = \"{TOKEN}\"\n\
                 [limits]\n{floor}{limits}\n\
                 [[backend]]\nname = \"b{i}\"\ndata_dir = \"{}\"\nlisten = \"{addr}\"\ncpu = {}\n{}",
                data.display(),
                i % 2,
                durability_line()
            ),
        )
        .expect("write config");
        let mut b = Backend {
            name: format!("b{i}"),
            addr,
            admin,
            data,
            config,
            log: root.join(format!("pplistener-b{i}.log")),
            child: None,
        };
        b.restart();
        b
    }

    /// Starts the process again (after [`Backend::kill9`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let mut cmd = Command::new(bin("pplistener"));
        cmd.arg("--config").arg(&self.config);
        self.child = Some(spawn_ready(
            cmd,
            &self.log,
            &["listening on", "admin port on"],
        ));
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// An authenticated PPL/1 connection.
    pub fn conn(&self) -> BackendConn {
        BackendConn::connect(self.addr, SECRET.as_bytes(), IO_TIMEOUT).expect("backend connect")
    }

    /// Every stored (mailbox, msgid) link, from the data directory.
    pub fn links(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mbox = self.data.join("mbox");
        for l1 in read_dir(&mbox) {
            for l2 in read_dir(&l1) {
                for mailbox in read_dir(&l2) {
                    let name = file_name(&mailbox);
                    for msg in read_dir(&mailbox) {
                        out.push((name.clone(), file_name(&msg)));
                    }
                }
            }
        }
        out
    }

    /// Entries in the data directory's `tmp/` (named temporaries; bodies
    /// being written have none).
    pub fn temp_files(&self) -> usize {
        read_dir(&self.data.join("tmp")).len()
    }

    /// The mode this backend reports in STATUS (`rw`, `ro`, `ro-auto`).
    pub fn mode(&self) -> String {
        let status = self.conn().status().expect("STATUS");
        status
            .into_iter()
            .find(|(k, _)| k == "mode")
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The configuration file it was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The log file (stderr) of this backend.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn read_dir(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Which frontend a [`Frontend`] runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// powersmtp
    Smtp,
    /// powerpop
    Pop,
}

/// A running powersmtp or powerpop.
pub struct Frontend {
    /// Which daemon.
    pub kind: Kind,
    /// Client port.
    pub addr: SocketAddr,
    /// Admin port.
    pub admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// `[backend_pool]` for quick failure detection in tests.
const POOL: &str = "\n[backend_pool]\nhealth_interval_ms = 100\nhealth_timeout_ms = 500\nconnect_timeout_ms = 1000\nio_timeout_ms = 10000\nping_after_idle_ms = 500\n";

impl Frontend {
    /// powersmtp over `backends` with K = `k`, its undo journal in
    /// `root/smtpstate` (replayed every 200 ms). `limits` goes inside
    /// `[limits]`; `tables` are more TOML, top-level keys first, then tables
    /// (a `[backend_pool]` there replaces the quick default); `priorities`
    /// (by index) default to 0.
    pub fn smtp(
        root: &Path,
        backends: &[&Backend],
        userbase: &str,
        k: usize,
        limits: &str,
        tables: &str,
        priorities: &[i32],
    ) -> Frontend {
        Frontend::smtp_top(root, backends, userbase, k, "", limits, tables, priorities)
    }

    /// Like [`Frontend::smtp`], with `top` TOML lines before every table
    /// (e.g. `lmtp_listen = "..."`).
    #[allow(clippy::too_many_arguments)]
    pub fn smtp_top(
        root: &Path,
        backends: &[&Backend],
        userbase: &str,
        k: usize,
        top: &str,
        limits: &str,
        tables: &str,
        priorities: &[i32],
    ) -> Frontend {
        let addr = free_addr();
        let admin = free_addr();
        let state = root.join("smtpstate");
        let mut toml = format!(
            "listen = \"{addr}\"\nhostname = \"mx.sys.test\"\nfrontend_id = \"sys1\"\n\
             admin_listen = \"{admin}\"\nadmin_token = \"{TOKEN}\"\nuserbase = \"{userbase}\"\n\
             replicas = {k}
secret = \"{SECRET}\"
state_dir = \"{}\"
\
             undo_replay_interval_ms = 200
{top}
{tables}
[limits]
{limits}
",
            state.display()
        );
        if !tables.contains("[backend_pool]") {
            toml.push_str(POOL);
        }
        for (i, b) in backends.iter().enumerate() {
            toml.push_str(&format!(
                "\n[[backend]]\nname = \"{}\"\naddr = \"{}\"\npriority = {}\n",
                b.name,
                b.addr,
                priorities.get(i).copied().unwrap_or(0)
            ));
        }
        Frontend::launch(root, Kind::Smtp, addr, admin, &toml)
    }

    /// powerpop over `backends`, state in `root/popstate`. `limits` goes
    /// inside `[limits]`; `tables` as for [`Frontend::smtp`] (a `[throttle]`
    /// there replaces the fast-failure default).
    pub fn pop(
        root: &Path,
        backends: &[&Backend],
        userbase: &str,
        limits: &str,
        tables: &str,
    ) -> Frontend {
        let addr = free_addr();
        let admin = free_addr();
        let state = root.join("popstate");
        let mut toml = format!(
            "listen = \"{addr}\"\nadmin_listen = \"{admin}\"\nadmin_token = \"{TOKEN}\"\n\
             userbase = \"{userbase}\"\ndefault_domain = \"{DOMAIN}\"\nstate_dir = \"{}\"\n\
             secret = \"{SECRET}\"\n{tables}\n[limits]\n{limits}\n",
            state.display()
        );
        if !tables.contains("[backend_pool]") {
            toml.push_str(POOL);
        }
        if !tables.contains("[throttle]") {
            toml.push_str("\n[throttle]\nfailure_delay_ms = 10\n");
        }
        for b in backends {
            toml.push_str(&format!(
                "\n[[backend]]\nname = \"{}\"\naddr = \"{}\"\n",
                b.name, b.addr
            ));
        }
        Frontend::launch(root, Kind::Pop, addr, admin, &toml)
    }

    fn launch(
        root: &Path,
        kind: Kind,
        addr: SocketAddr,
        admin: SocketAddr,
        toml: &str,
    ) -> Frontend {
        let name = match kind {
            Kind::Smtp => "powersmtp",
            Kind::Pop => "powerpop",
        };
        let config = root.join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("write config");
        let mut f = Frontend {
            kind,
            addr,
            admin,
            config,
            log: root.join(format!("{name}.log")),
            child: None,
        };
        f.restart();
        f
    }

    /// Starts the process again (after [`Frontend::kill9`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let name = match self.kind {
            Kind::Smtp => "powersmtp",
            Kind::Pop => "powerpop",
        };
        let mut cmd = Command::new(bin(name));
        cmd.arg("--config").arg(&self.config);
        self.child = Some(spawn_ready(
            cmd,
            &self.log,
            &["listening on", "admin port on"],
        ));
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Waits (at most [`DEADLINE`]) for the process to end; its exit status.
    pub fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The log file (stderr) of this daemon.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A top-level counter of the admin port's `/stats` (`"key":N`), if the port
    /// answers and has it.
    pub fn stat(&self, key: &str) -> Option<u64> {
        let (code, body) = http(self.admin, "GET", "/stats", Some(TOKEN)).ok()?;
        if code != 200 {
            return None;
        }
        let at = body.find(&format!("\"{key}\":"))? + key.len() + 3;
        // The admin port may pretty-print: skip blanks after the colon.
        let digits: String = body[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `n` mailboxes `u<i>@sys.test` with password `pw-<i>` in a new SQLite
/// userbase under `root`; returns its URL.
pub fn sqlite_userbase(root: &Path, n: usize) -> String {
    let url = format!("sqlite://{}", root.join("userbase.db").display());
    add_users(&url, n);
    url
}

/// Adds mailboxes `u<i>@sys.test` (password `pw-<i>`) to the userbase at `url`.
pub fn add_users(url: &str, n: usize) {
    let ub = powermail_userbase::open(url).expect("userbase");
    for i in 0..n {
        ub.add_mailbox(&user(i), &password(i), 0)
            .expect("add mailbox");
    }
}

/// Mailbox `i`.
pub fn user(i: usize) -> String {
    format!("u{i}@{DOMAIN}")
}

/// Password of mailbox `i`.
pub fn password(i: usize) -> String {
    format!("pw-{i}")
}

/// Backends, userbase, powersmtp and powerpop in one temporary directory.
pub struct System {
    /// Backend processes, `b0`...
    pub backends: Vec<Backend>,
    /// powersmtp.
    pub smtp: Frontend,
    /// powerpop.
    pub pop: Frontend,
    /// Userbase URL.
    pub userbase: String,
    /// Last, so the processes are gone before their directories.
    pub dir: tempfile::TempDir,
}

impl System {
    /// `n` backends, K = `k`, `users` mailboxes in SQLite, default limits.
    pub fn start(n: usize, k: usize, users: usize) -> System {
        System::start_with(n, k, users, "", "", "")
    }

    /// Like [`System::start`], with `[limits]` lines for each daemon.
    pub fn start_with(
        n: usize,
        k: usize,
        users: usize,
        backend_limits: &str,
        smtp_limits: &str,
        pop_limits: &str,
    ) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let backends: Vec<Backend> = (0..n)
            .map(|i| {
                Backend::start(
                    dir.path(),
                    i,
                    dir.path().join(format!("disk{i}")),
                    backend_limits,
                )
            })
            .collect();
        let userbase = sqlite_userbase(dir.path(), users);
        let refs: Vec<&Backend> = backends.iter().collect();
        let smtp = Frontend::smtp(dir.path(), &refs, &userbase, k, smtp_limits, "", &[]);
        let pop = Frontend::pop(dir.path(), &refs, &userbase, pop_limits, "");
        System {
            backends,
            smtp,
            pop,
            userbase,
            dir,
        }
    }

    /// Every daemon's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for b in &self.backends {
            s.push_str(&format!("--- {}\n{}", b.name, b.log_text()));
        }
        s.push_str(&format!("--- powersmtp\n{}", self.smtp.log_text()));
        s.push_str(&format!("--- powerpop\n{}", self.pop.log_text()));
        s
    }
}

/// Polls `f` until it is true, for at most [`DEADLINE`].
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never happened within {DEADLINE:?}: {what}");
}

/// A connected socket with both time-outs set.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// A blocking SMTP client that sends exactly the bytes it is given.
pub struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    /// Connects, reads the greeting and says EHLO; fails unless both are 2xx.
    pub fn connect(addr: SocketAddr) -> io::Result<Smtp> {
        let s = connect(addr)?;
        let mut c = Smtp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let (code, text) = c.reply()?;
        if code != 220 {
            return Err(io::Error::other(format!("greeting {code} {text}")));
        }
        let (code, text) = c.cmd("EHLO client.sys.test")?;
        if code != 250 {
            return Err(io::Error::other(format!("EHLO {code} {text}")));
        }
        Ok(c)
    }

    /// Reads one (possibly multi-line) reply: its code and last line.
    pub fn reply(&mut self) -> io::Result<(u16, String)> {
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, line.trim_end().to_string()));
            }
        }
    }

    /// Sends one command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> io::Result<(u16, String)> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// Writes raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)
    }

    /// One transaction of `wire` (dot-stuffed, CRLF-terminated) to `rcpts`;
    /// returns the final code (the first refusal if any step is refused).
    pub fn send(&mut self, from: &str, rcpts: &[&str], wire: &[u8]) -> io::Result<u16> {
        let (code, _) = self.cmd(&format!("MAIL FROM:<{from}>"))?;
        if code != 250 {
            self.cmd("RSET")?;
            return Ok(code);
        }
        for r in rcpts {
            let (code, _) = self.cmd(&format!("RCPT TO:<{r}>"))?;
            if code != 250 {
                self.cmd("RSET")?;
                return Ok(code);
            }
        }
        let (code, _) = self.cmd("DATA")?;
        if code != 354 {
            self.cmd("RSET")?;
            return Ok(code);
        }
        let mut data = Vec::with_capacity(wire.len() + 3);
        data.extend_from_slice(wire);
        data.extend_from_slice(b".\r\n");
        self.w.write_all(&data)?;
        Ok(self.reply()?.0)
    }

    /// QUIT, ignoring the outcome.
    pub fn quit(mut self) {
        let _ = self.cmd("QUIT");
    }
}

/// A blocking POP3 client that keeps the raw (dot-stuffed) message bytes.
pub struct Pop {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Pop {
    /// Connects and reads the greeting (must be +OK).
    pub fn connect(addr: SocketAddr) -> io::Result<Pop> {
        let s = connect(addr)?;
        let mut c = Pop {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let g = c.line()?;
        if !g.starts_with("+OK") {
            return Err(io::Error::other(format!("greeting {g}")));
        }
        Ok(c)
    }

    /// Connects and logs in as mailbox `i`.
    pub fn login(addr: SocketAddr, i: usize) -> io::Result<Pop> {
        let mut c = Pop::connect(addr)?;
        c.auth(&user(i), &password(i))?;
        Ok(c)
    }

    /// USER + PASS; an error unless both are +OK.
    pub fn auth(&mut self, user: &str, pass: &str) -> io::Result<()> {
        let r = self.cmd(&format!("USER {user}"))?;
        if !r.starts_with("+OK") {
            return Err(io::Error::other(format!("USER: {r}")));
        }
        let r = self.cmd(&format!("PASS {pass}"))?;
        if !r.starts_with("+OK") {
            return Err(io::Error::other(format!("PASS: {r}")));
        }
        Ok(())
    }

    /// One reply line, without CRLF.
    pub fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_string())
    }

    /// Sends a command, returns the status line.
    pub fn cmd(&mut self, line: &str) -> io::Result<String> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.line()
    }

    /// Writes raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)
    }

    /// Sends a command with a multi-line answer; returns the status line and
    /// the raw bytes up to (not including) the terminating `.CRLF`.
    pub fn multi(&mut self, line: &str) -> io::Result<(String, Vec<u8>)> {
        let status = self.cmd(line)?;
        if !status.starts_with("+OK") {
            return Ok((status, Vec::new()));
        }
        let mut body = Vec::new();
        loop {
            let mut l = Vec::new();
            if self.r.read_until(b'\n', &mut l)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if l == b".\r\n" {
                return Ok((status, body));
            }
            body.extend_from_slice(&l);
        }
    }

    /// UIDL: (message number, unique id).
    pub fn uidl(&mut self) -> io::Result<Vec<(usize, String)>> {
        let (status, body) = self.multi("UIDL")?;
        if !status.starts_with("+OK") {
            return Err(io::Error::other(format!("UIDL: {status}")));
        }
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| {
                let (n, u) = l.split_once(' ')?;
                Some((n.parse().ok()?, u.to_string()))
            })
            .collect())
    }

    /// RETR `n`: the raw stored bytes.
    pub fn retr(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let (status, body) = self.multi(&format!("RETR {n}"))?;
        if !status.starts_with("+OK") {
            return Err(io::Error::other(format!("RETR {n}: {status}")));
        }
        Ok(body)
    }

    /// QUIT; returns its status line.
    pub fn quit(mut self) -> io::Result<String> {
        self.cmd("QUIT")
    }
}

/// Header that identifies every test message.
pub const ID_HEADER: &str = "X-Fault-Id: ";

/// A test message in wire form (CRLF, one dot-stuffed line), about `size`
/// bytes, identified by `id`.
pub fn message(id: &str, size: usize) -> Vec<u8> {
    let mut m =
        format!("{ID_HEADER}{id}\r\nSubject: fault suite {id}\r\n\r\n..a dot-stuffed line\r\n")
            .into_bytes();
    let mut seed = Sha256::digest(id.as_bytes()).to_vec();
    while m.len() < size {
        seed = Sha256::digest(&seed).to_vec();
        m.extend_from_slice(hex::encode(&seed).as_bytes());
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// SHA-256 of a message from its [`ID_HEADER`] on (the frontend prepends
/// a `Received:` header), with the id; `None` if it has no such header.
pub fn identify(raw: &[u8]) -> Option<(String, [u8; 32])> {
    let needle = format!("\r\n{ID_HEADER}");
    let at = if raw.starts_with(ID_HEADER.as_bytes()) {
        0
    } else {
        raw.windows(needle.len())
            .position(|w| w == needle.as_bytes())?
            + 2
    };
    let rest = &raw[at..];
    let end = rest.iter().position(|&b| b == b'\r')?;
    let id = String::from_utf8_lossy(&rest[ID_HEADER.len()..end]).into_owned();
    Some((id, Sha256::digest(rest).into()))
}

/// SHA-256 of bytes.
pub fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// What POP shows of some mailboxes: for every test id, each copy's
/// (mailbox, uidl, hash).
pub type Retrieved = HashMap<String, Vec<(usize, String, [u8; 32])>>;

/// Logs into mailboxes `0..users` (with `threads` sessions at a time),
/// RETRs everything, and groups it by test id. Messages without an id are
/// counted under the empty id.
pub fn retrieve_all(pop: SocketAddr, users: usize, threads: usize) -> Retrieved {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = Mutex::new(Retrieved::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= users {
                    return;
                }
                let mut c = Pop::login(pop, i).expect("POP login");
                let list = c.uidl().expect("UIDL");
                let mut mine = Vec::new();
                for (n, uid) in list {
                    let raw = c.retr(n).expect("RETR");
                    let (id, hash) = identify(&raw).unwrap_or_default();
                    mine.push((id, (i, uid, hash)));
                }
                c.quit().expect("QUIT");
                let mut all = out.lock().expect("lock");
                for (id, v) in mine {
                    all.entry(id).or_default().push(v);
                }
            });
        }
    });
    out.into_inner().expect("lock")
}

/// One HTTP/1.0 request to an admin port; returns the status code and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut s = connect(addr)?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let code = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// A small ext4 image mounted on a loop device at a directory; unmounted on drop.
/// Needs root, `mkfs.ext4` and loop devices (the disk-full cases; `PM_SKIP_DISKFULL=1`
/// skips them).
pub struct SmallDisk {
    image: PathBuf,
    /// The mount point.
    pub dir: PathBuf,
}

impl SmallDisk {
    /// `size_mib` MiB of ext4 under `root` with mkfs's default inode count.
    pub fn mount(root: &Path, size_mib: u64) -> SmallDisk {
        SmallDisk::mount_with(root, size_mib, None)
    }

    /// Like [`SmallDisk::mount`], with about `inodes` inodes (`mkfs.ext4 -N`) when set:
    /// a file system that runs out of inodes long before it runs out of bytes.
    pub fn mount_with(root: &Path, size_mib: u64, inodes: Option<u32>) -> SmallDisk {
        let image = root.join("small.img");
        let dir = root.join("small");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .expect("image");
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(
                out.status.success(),
                "{cmd:?}: {} (the disk-full cases need root, mkfs.ext4 and loop devices; \
                 PM_SKIP_DISKFULL=1 skips them)",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F"]);
        if let Some(n) = inodes {
            mkfs.arg("-N").arg(n.to_string());
        }
        run(mkfs.arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&dir));
        SmallDisk { image, dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}
