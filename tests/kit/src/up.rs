//! `powermail up` under test: the whole system on free ports in a temporary
//! directory, ready when every supervised daemon has printed its readiness
//! line into its log, stopped with SIGTERM on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use powermail_admin::ReadyLine;

use crate::daemon::{bin, START_TIMEOUT};
use crate::ports::{free_addr, free_range};

/// The daemons `powermail up` supervises.
pub const UP_DAEMONS: [&str; 3] = ["pplistener", "powersmtp", "powerpop"];

/// The longest `powermail up` may take to stop after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Banner lines read before giving up on the start.
const BANNER_LINES_MAX: usize = 200;

/// A running `powermail up`.
pub struct Up {
    child: Option<Child>,
    /// Its `--data` directory.
    pub data: PathBuf,
    /// The SMTP port.
    pub smtp: SocketAddr,
    /// The POP3 port.
    pub pop: SocketAddr,
    /// The LMTP port.
    pub lmtp: SocketAddr,
    /// The POP3S port.
    pub pop3s: SocketAddr,
    /// Backend N listens on this port + N.
    pub backend_base_port: u16,
    /// What each daemon announced, in [`UP_DAEMONS`] order.
    pub ready: Vec<ReadyLine>,
    /// The banner it printed up to "Ctrl-C stops everything".
    pub banner: String,
    _dir: tempfile::TempDir,
}

impl Up {
    /// `powermail up --backends <backends> --replicas <replicas>` on free
    /// ports; returns when every daemon has announced it is ready.
    pub fn start(backends: u16, replicas: usize) -> Up {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("var");
        let (smtp, pop, lmtp, pop3s) = (free_addr(), free_addr(), free_addr(), free_addr());
        let base = free_range(backends);
        let (a1, a2, a3) = (free_addr(), free_addr(), free_addr());
        let overrides = dir.path().join("up.toml");
        std::fs::write(
            &overrides,
            format!(
                "smtp_listen = \"{smtp}\"\npop_listen = \"{pop}\"\nbackend_base_port = {base}\n\
                 lmtp_listen = \"{lmtp}\"\npop3s_listen = \"{pop3s}\"\n\
                 pplistener_admin = \"{a1}\"\nsmtp_admin = \"{a2}\"\npop_admin = \"{a3}\"\n"
            ),
        )
        .expect("write overrides");
        let mut child = Command::new(bin("powermail"))
            .args(["up", "--backends", &backends.to_string()])
            .args(["--replicas", &replicas.to_string(), "--data"])
            .arg(&data)
            .arg("--config")
            .arg(&overrides)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start powermail up");
        let out = child.stdout.take().expect("stdout");
        let mut up = Up {
            child: Some(child),
            data,
            smtp,
            pop,
            lmtp,
            pop3s,
            backend_base_port: base,
            ready: Vec::new(),
            banner: String::new(),
            _dir: dir,
        };
        up.banner = read_banner(out);
        let logs = up.data.join("log");
        for name in UP_DAEMONS {
            let line = wait_ready_in(&logs.join(format!("{name}.log")), name);
            up.ready.push(line);
        }
        up
    }

    /// Runs `ppadmin --data <data> <args>`.
    pub fn ppadmin(&self, args: &[&str]) -> Output {
        Command::new(bin("ppadmin"))
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run ppadmin")
    }

    /// The supervisor's process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The pid of the supervised daemon `name`, found by its configuration
    /// file on its command line (it changes when the supervisor restarts it).
    pub fn daemon_pid(&self, name: &str) -> Option<i32> {
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

    /// SIGTERM, then waits at most [`STOP_TIMEOUT`]; the exit status, or
    /// `None` if it had to be killed (or was stopped before).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads the supervisor's stdout up to its "Ctrl-C stops everything" line,
/// then keeps draining it in a thread so it never blocks on a full pipe.
fn read_banner(out: std::process::ChildStdout) -> String {
    let mut out = BufReader::new(out);
    let mut banner = String::new();
    for _ in 0..BANNER_LINES_MAX {
        if banner.contains("Ctrl-C stops everything") {
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return banner;
        }
        let n = out.read_line(&mut banner).expect("read banner");
        assert!(n > 0, "powermail exited: {banner}");
    }
    panic!("no \"Ctrl-C stops everything\" in the banner: {banner}");
}

/// Waits at most [`START_TIMEOUT`] for `daemon`'s readiness line in `log`.
fn wait_ready_in(log: &Path, daemon: &str) -> ReadyLine {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find_map(|l| ReadyLine::parse(l).filter(|r| r.daemon == daemon))
        {
            return line;
        }
        assert!(
            start.elapsed() < START_TIMEOUT,
            "{daemon} never got ready; {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
