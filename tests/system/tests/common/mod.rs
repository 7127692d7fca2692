//! The system-test harness: starts real `pplistener` (one process per
//! backend, so one can be killed alone), `powersmtp` and `powerpop` processes
//! through the shared test kit (`tests/kit`: free ports, the readiness line,
//! kill on drop), and adds what these suites share: the system layout, the
//! test mailboxes, identified test messages and their hashes.

#![allow(dead_code, unused_imports)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use powermail_proto::BackendConn;
use powermail_testkit::{BackendSpec, FrontendSpec, Pplistener, PplistenerSpec};
use sha2::{Digest, Sha256};

pub use powermail_testkit::{
    connect, durability_line, eventually, free_addr, free_port, serial, Kind, Pop, Smtp, IO_TIMEOUT,
};

/// The backends' shared secret.
pub const SECRET: &str = "systest-secret-0123456789";
/// Bearer token of every admin port.
pub const TOKEN: &str = "systest-admin-token";
/// The longest any bounded wait of the suite waits.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Domain of every test mailbox.
pub const DOMAIN: &str = "sys.test";

/// One pplistener process serving one backend.
pub struct Backend {
    /// The process (restart, kill9, alive, pid, log_text, config_path).
    pub process: Pplistener,
    /// Name in the frontends' configs (`b<i>`).
    pub name: String,
    /// PPL/1 address.
    pub addr: SocketAddr,
    /// Admin port.
    pub admin: SocketAddr,
    /// The backend's data directory.
    pub data: PathBuf,
}

powermail_testkit::deref_daemon!(Backend, process);

impl Backend {
    /// Writes the config of backend `i` under `root` (data in `data`,
    /// `limits` lines inside `[limits]`) and starts it.
    pub fn start(root: &Path, i: usize, data: PathBuf, limits: &str) -> Backend {
        let floor = if limits.contains("free_bytes_min") {
            ""
        } else {
            "free_bytes_min = 0\n"
        };
        let name = format!("b{i}");
        let mut backend = BackendSpec::named(&name, data.clone());
        backend.extra = format!("cpu = {}\n{}", i % 2, durability_line());
        let spec = PplistenerSpec {
            secret: SECRET.into(),
            admin_token: TOKEN.into(),
            extra: format!("[limits]\n{floor}{limits}\n"),
            backends: vec![backend],
        };
        let process = Pplistener::start(root, &format!("pplistener-{name}"), &spec);
        Backend {
            addr: process.backends[0],
            admin: process.admin,
            process,
            name,
            data,
        }
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

/// A running powersmtp or powerpop (with the kit's [`Daemon`] methods:
/// restart, kill9, alive, pid, wait_exit, log_text).
///
/// [`Daemon`]: powermail_testkit::Daemon
pub struct Frontend {
    /// The process.
    pub process: powermail_testkit::Frontend,
    /// Which daemon.
    pub kind: Kind,
    /// Client port.
    pub addr: SocketAddr,
    /// Admin port.
    pub admin: SocketAddr,
}

powermail_testkit::deref_daemon!(Frontend, process);

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
        let state = root.join("smtpstate");
        let mut extra = format!(
            "hostname = \"mx.sys.test\"\nfrontend_id = \"sys1\"\nreplicas = {k}\n\
             state_dir = \"{}\"\nundo_replay_interval_ms = 200\n{top}\n{tables}\n\
             [limits]\n{limits}\n",
            state.display()
        );
        if !tables.contains("[backend_pool]") {
            extra.push_str(POOL);
        }
        let backends = backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let priority = priorities.get(i).copied().unwrap_or(0);
                (b.name.clone(), b.addr, format!("priority = {priority}\n"))
            })
            .collect();
        Frontend::launch(root, Kind::Smtp, userbase, extra, backends)
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
        let state = root.join("popstate");
        let mut extra = format!(
            "default_domain = \"{DOMAIN}\"\nstate_dir = \"{}\"\n{tables}\n[limits]\n{limits}\n",
            state.display()
        );
        if !tables.contains("[backend_pool]") {
            extra.push_str(POOL);
        }
        if !tables.contains("[throttle]") {
            extra.push_str("\n[throttle]\nfailure_delay_ms = 10\n");
        }
        let backends = backends
            .iter()
            .map(|b| (b.name.clone(), b.addr, String::new()))
            .collect();
        Frontend::launch(root, Kind::Pop, userbase, extra, backends)
    }

    fn launch(
        root: &Path,
        kind: Kind,
        userbase: &str,
        extra: String,
        backends: Vec<(String, SocketAddr, String)>,
    ) -> Frontend {
        let spec = FrontendSpec {
            kind,
            secret: SECRET.into(),
            admin_token: TOKEN.into(),
            userbase: userbase.into(),
            extra,
            backends,
        };
        let process = powermail_testkit::Frontend::start(root, kind.binary(), &spec);
        Frontend {
            kind,
            addr: process.addr,
            admin: process.admin,
            process,
        }
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

/// The lines a [`System`]'s daemons get beyond the defaults.
#[derive(Debug, Default, Clone)]
pub struct SystemSpec {
    /// Each backend's `[limits]` lines.
    pub backend_limits: String,
    /// powersmtp's `[limits]` lines.
    pub smtp_limits: String,
    /// powerpop's `[limits]` lines.
    pub pop_limits: String,
    /// powersmtp's top-level lines (`lmtp_listen = "..."`).
    pub smtp_top: String,
    /// powerpop's other tables (`[throttle]`).
    pub pop_tables: String,
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
        let spec = SystemSpec {
            backend_limits: backend_limits.into(),
            smtp_limits: smtp_limits.into(),
            pop_limits: pop_limits.into(),
            ..SystemSpec::default()
        };
        System::start_spec(n, k, users, &spec)
    }

    /// Like [`System::start`], with every daemon's extra lines in `spec`.
    pub fn start_spec(n: usize, k: usize, users: usize, spec: &SystemSpec) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let backends: Vec<Backend> = (0..n)
            .map(|i| {
                Backend::start(
                    dir.path(),
                    i,
                    dir.path().join(format!("disk{i}")),
                    &spec.backend_limits,
                )
            })
            .collect();
        let userbase = sqlite_userbase(dir.path(), users);
        let refs: Vec<&Backend> = backends.iter().collect();
        let smtp = Frontend::smtp_top(
            dir.path(),
            &refs,
            &userbase,
            k,
            &spec.smtp_top,
            &spec.smtp_limits,
            "",
            &[],
        );
        let pop = Frontend::pop(
            dir.path(),
            &refs,
            &userbase,
            &spec.pop_limits,
            &spec.pop_tables,
        );
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

/// Connects to POP3 at `addr` and logs in as mailbox `i`.
pub fn pop_login(addr: SocketAddr, i: usize) -> io::Result<Pop> {
    Pop::login(addr, &user(i), &password(i))
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
                let mut c = pop_login(pop, i).expect("POP login");
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

/// One request to an admin port (the admin crate's client); the status
/// code and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> io::Result<(u16, String)> {
    let reply = powermail_testkit::admin::request(&addr.to_string(), token, method, path)
        .map_err(io::Error::other)?;
    Ok((reply.status, reply.body))
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
