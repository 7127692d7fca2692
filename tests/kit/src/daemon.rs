//! One daemon process under test: spawned from the workspace binaries,
//! waited for until it prints its readiness line, killed on drop.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Once};
use std::time::{Duration, Instant};

use powermail_admin::ReadyLine;

/// The longest a daemon may take from spawn to its readiness line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Stdout lines read while waiting for the readiness line.
const START_LINES_MAX: usize = 10_000;

/// The workspace binaries the suites start.
const BINARIES: [&str; 5] = [
    "pplistener",
    "powersmtp",
    "powerpop",
    "ppadmin",
    "powermail",
];

/// The workspace binary `name`: `target/<profile>/<name>`, next to the
/// directory of the running test executable (`target/<profile>/deps/`).
/// If `name` or one of the daemons is missing, `cargo build --workspace
/// --bins` runs (once for the whole process).
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    BUILD.call_once(|| {
        let wanted = BINARIES.iter().chain(std::iter::once(&name));
        if wanted.into_iter().all(|b| dir.join(b).exists()) {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "--workspace", "--bins"])
            .env("CARGO_TARGET_DIR", dir.parent().expect("target"))
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    let b = dir.join(name);
    assert!(b.exists(), "{} missing", b.display());
    b
}

/// A running daemon (`pplistener`, `powersmtp` or `powerpop`) started with
/// `--config <file>`; its stdout and stderr go to its log file.
pub struct Daemon {
    name: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    ready: Option<ReadyLine>,
    /// The network namespace it runs in (`ip netns exec`), if not this one.
    netns: Option<String>,
}

impl Daemon {
    /// Starts binary `name` with `config`, appending its output to `log`,
    /// and returns once it has printed its readiness line.
    pub fn start(name: &str, config: &Path, log: &Path) -> Daemon {
        Daemon::start_in(None, name, config, log)
    }

    /// The same, inside network namespace `netns` when given (a simulated
    /// host of tests/cluster): `ip netns exec` replaces itself with the
    /// daemon, so the pid is the daemon's.
    pub fn start_in(netns: Option<&str>, name: &str, config: &Path, log: &Path) -> Daemon {
        let mut d = Daemon {
            name: name.to_string(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            child: None,
            ready: None,
            netns: netns.map(str::to_string),
        };
        d.restart();
        d
    }

    /// Starts the process again (after [`Daemon::kill9`] or an exit).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin(&self.name));
                c
            }
            None => Command::new(bin(&self.name)),
        };
        let mut child = cmd
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(log.try_clone().expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.name));
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let name = self.name.clone();
        std::thread::spawn(move || copy_until_ready(&name, out, log, tx));
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(ready) if ready.pid == child.id() => {
                self.ready = Some(ready);
                self.child = Some(child);
            }
            outcome => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "{} did not get ready ({outcome:?}, exit {status:?}); log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
        }
    }

    /// What the daemon announced when it got ready (the last start).
    pub fn ready(&self) -> &ReadyLine {
        self.ready.as_ref().expect("started")
    }

    /// The address the daemon announced for `role` (`smtp`, `lmtp`, `pop3`,
    /// `pop3s`, `admin`, or a backend's name); panics if it has none.
    pub fn addr(&self, role: &str) -> SocketAddr {
        self.ready()
            .addr(role)
            .unwrap_or_else(|| panic!("{} announced no {role} address", self.name))
    }

    /// `kill -9` and reap; nothing if not running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the running process.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits at most `timeout` for the process to end; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The configuration file it runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Everything the daemon wrote (stdout and stderr) so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Copies the daemon's stdout into its log, sends its readiness line once,
/// and keeps draining so the daemon never blocks on a full pipe.
fn copy_until_ready(
    name: &str,
    out: std::process::ChildStdout,
    mut log: std::fs::File,
    tx: mpsc::Sender<ReadyLine>,
) {
    let mut out = BufReader::new(out);
    let mut waiting = true;
    let mut lines = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        match out.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let _ = log.write_all(line.as_bytes());
        lines += 1;
        if waiting {
            if let Some(ready) = ReadyLine::parse(&line).filter(|r| r.daemon == name) {
                let _ = tx.send(ready);
                waiting = false;
            } else if lines >= START_LINES_MAX {
                return;
            }
        }
    }
}
