//! The stack under test, one layer per type: [`CrashDisk`] (the FUSE daemon
//! holding the image), [`LoopDev`] (a loop device over the image),
//! [`FsKind`] (mkfs, fsck and mount of the file system on it) and
//! [`Listener`] (one `pplistener` backend on that file system).
//!
//! Every wait is bounded by [`DEADLINE`]; every failed command panics with
//! its output, so a broken step shows what broke.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use powermail_proto::BackendConn;
use powermail_testkit::{BackendSpec, Pplistener, PplistenerSpec};

/// The longest any bounded wait of the rig waits.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// The backends' shared secret.
pub const SECRET: &str = "powercut-secret-0123456789";
/// Socket time-out of every client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A workspace binary (target/<profile>/NAME): the test kit's lookup.
pub use powermail_testkit::{bin, free_addr};

/// Runs `cmd`; returns its output whatever the exit code.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is the tool installed?)"))
}

/// Runs `cmd` and panics with its output unless it exits 0.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `path` is a mount point right now.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want.as_ref()))
}

/// Unmounts `path` (lazily if a plain umount fails); no-op if not mounted.
pub fn unmount(path: &Path) {
    if !is_mounted(path) {
        return;
    }
    if !output(Command::new("umount").arg(path)).status.success() {
        let _ = output(Command::new("umount").arg("-l").arg(path));
    }
}

/// The crash disk's counters, read from its `status` file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStatus {
    /// Flushes completed since the daemon started.
    pub flushes: u64,
    /// Whether the power is cut.
    pub cut: bool,
    /// Writes lost at the cut.
    pub lost_writes: u64,
}

/// One `crashdisk` daemon: `mount/disk.img` over the backing `image`.
pub struct CrashDisk {
    mount: PathBuf,
    child: Option<Child>,
}

impl CrashDisk {
    /// Mounts the crash disk over `image` at `mount`; `mode` is the
    /// daemon's `--cut-mode`, `seed` its random seed.
    pub fn start(image: &Path, mount: &Path, mode: &str, seed: u64, log: &Path) -> CrashDisk {
        std::fs::create_dir_all(mount).expect("mkdir fuse mount");
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("crashdisk log");
        let child = Command::new(bin("crashdisk"))
            .arg("--image")
            .arg(image)
            .arg("--mount")
            .arg(mount)
            .args(["--cut-mode", mode, "--seed", &seed.to_string()])
            .stdin(Stdio::null())
            .stdout(err.try_clone().expect("dup log"))
            .stderr(err)
            .spawn()
            .expect("spawn crashdisk");
        let mut disk = CrashDisk {
            mount: mount.to_path_buf(),
            child: Some(child),
        };
        let started = Instant::now();
        while !is_mounted(mount) || !disk.image().exists() {
            if let Some(c) = disk.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "crashdisk exited at start ({status}): {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            }
            assert!(started.elapsed() < DEADLINE, "crashdisk did not mount");
            std::thread::sleep(Duration::from_millis(10));
        }
        disk
    }

    /// The image file as the loop device sees it.
    pub fn image(&self) -> PathBuf {
        self.mount.join("disk.img")
    }

    fn ctl(&self, command: &str) {
        std::fs::write(self.mount.join("ctl"), command).expect("write crashdisk ctl");
    }

    /// Freezes process `pid` (every thread, `SIGSTOP`) the instant before
    /// the power is cut, whether by [`CrashDisk::cut`] or at an armed flush:
    /// a real outage stops the CPUs with the disk, so nothing the process
    /// learns after the cut (a failed flush, or a directory fsync that
    /// succeeds because a failed log write already unpinned the directory)
    /// can reach a client as an acknowledgement.
    pub fn freeze_at_cut(&self, pid: u32) {
        self.ctl(&format!("freeze {pid}\n"));
    }

    /// Cuts the power now.
    pub fn cut(&self) {
        self.ctl("cut\n");
    }

    /// Cuts the power instead of completing the `n`th flush from now.
    pub fn arm(&self, n: u64) {
        self.ctl(&format!("arm {n}\n"));
    }

    /// The daemon's counters.
    pub fn status(&self) -> DiskStatus {
        let text = std::fs::read_to_string(self.mount.join("status")).expect("crashdisk status");
        let mut s = DiskStatus::default();
        for line in text.lines() {
            let mut kv = line.splitn(2, ' ');
            let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                continue;
            };
            let v = v.trim();
            match k {
                "flushes" => s.flushes = v.parse().unwrap_or(0),
                "cut" => s.cut = v == "1",
                "lost_writes" => s.lost_writes = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        s
    }

    /// Unmounts and waits for the daemon to exit (a clean stop keeps what
    /// is cached; after a cut nothing is).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        unmount(&self.mount);
        if let Some(mut c) = self.child.take() {
            let started = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if started.elapsed() > DEADLINE {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("crashdisk did not exit after its unmount");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for CrashDisk {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unmount(&self.mount);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loop device over a file; detached on drop.
pub struct LoopDev {
    /// `/dev/loopN`.
    pub dev: PathBuf,
}

impl LoopDev {
    /// `losetup --find --show file`.
    pub fn attach(file: &Path) -> LoopDev {
        let out = run(Command::new("losetup").args(["--find", "--show"]).arg(file));
        LoopDev {
            dev: PathBuf::from(out.trim()),
        }
    }

    /// Detaches and waits until the device let go of its file.
    pub fn detach(mut self) {
        self.detach_inner();
    }

    fn detach_inner(&mut self) {
        if self.dev.as_os_str().is_empty() {
            return;
        }
        let _ = output(Command::new("losetup").arg("-d").arg(&self.dev));
        let name = self
            .dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
        let started = Instant::now();
        while backing.exists() && started.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.dev = PathBuf::new();
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        self.detach_inner();
    }
}

/// A file system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext4 without a journal (`-O ^has_journal`), like this machine's root.
    Ext4NoJournal,
    /// ext4 with its journal (data=ordered).
    Ext4Journal,
    /// xfs.
    Xfs,
}

/// What a recovery found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery {
    /// Whether the repairing fsck changed anything (expected after a cut
    /// without a journal; never an error by itself).
    pub repaired: bool,
}

impl FsKind {
    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4NoJournal => "ext4-nojournal",
            FsKind::Ext4Journal => "ext4-journal",
            FsKind::Xfs => "xfs",
        }
    }

    /// Size of the image: xfs wants at least 300 MiB.
    pub fn image_size_bytes(self) -> u64 {
        match self {
            FsKind::Xfs => 320 << 20,
            _ => 192 << 20,
        }
    }

    /// Makes the file system on `dev` (no discard: the crash disk has none;
    /// no lazy init: no background writer).
    pub fn mkfs(self, dev: &Path) {
        let mut cmd = match self {
            FsKind::Ext4NoJournal | FsKind::Ext4Journal => {
                let mut c = Command::new("mkfs.ext4");
                c.args([
                    "-q",
                    "-F",
                    "-E",
                    "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                ]);
                if self == FsKind::Ext4NoJournal {
                    c.args(["-O", "^has_journal"]);
                }
                c
            }
            FsKind::Xfs => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-q", "-f", "-K"]);
                c
            }
        };
        run(cmd.arg(dev));
    }

    /// Recovers `dev` as after an outage and proves it clean: ext4 gets
    /// `e2fsck -fy` then `e2fsck -fn` (must find nothing); xfs replays its
    /// log by a mount at `mnt` and must then pass `xfs_repair -n`.
    pub fn recover(self, dev: &Path, mnt: &Path) -> Recovery {
        match self {
            FsKind::Ext4NoJournal | FsKind::Ext4Journal => {
                let out = output(Command::new("e2fsck").arg("-fy").arg(dev));
                let code = out.status.code().unwrap_or(-1);
                assert!(
                    (0..=3).contains(&code),
                    "e2fsck -fy {} could not repair (exit {code}):\n{}{}",
                    dev.display(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                if code != 0 {
                    eprintln!(
                        "e2fsck -fy repaired:\n{}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
                run(Command::new("e2fsck").arg("-fn").arg(dev));
                Recovery {
                    repaired: code != 0,
                }
            }
            FsKind::Xfs => {
                self.mount(dev, mnt);
                unmount(mnt);
                run(Command::new("xfs_repair").arg("-n").arg(dev));
                Recovery::default()
            }
        }
    }

    /// Mounts `dev` at `mnt`.
    pub fn mount(self, dev: &Path, mnt: &Path) {
        std::fs::create_dir_all(mnt).expect("mkdir mount");
        let fstype = match self {
            FsKind::Xfs => "xfs",
            _ => "ext4",
        };
        run(Command::new("mount").args(["-t", fstype]).arg(dev).arg(mnt));
    }
}

/// How a backend makes a PUT durable (`[[backend]] durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync per body and fsync per directory (the default).
    File,
    /// One syncfs(2) per batch.
    Syncfs,
}

impl Durability {
    /// Name in reports and in the config.
    pub fn name(self) -> &'static str {
        match self {
            Durability::File => "file",
            Durability::Syncfs => "syncfs",
        }
    }
}

/// One `pplistener` process with one backend or more (the test kit's
/// launcher).
pub struct Listener {
    /// The first backend's PPL/1 address.
    pub addr: SocketAddr,
    /// The first backend's data directory.
    pub data: PathBuf,
    /// Every backend's PPL/1 address, in order.
    pub addrs: Vec<SocketAddr>,
    /// Every backend's data directory, in order.
    pub datas: Vec<PathBuf>,
    process: Pplistener,
}

impl Listener {
    /// Writes a config for backend `name` on `data` (under `root`) and
    /// starts it; returns once it is ready.
    pub fn start(root: &Path, name: &str, data: &Path, durability: Durability) -> Listener {
        Listener::start_backends(root, name, &[data.to_path_buf()], durability)
    }

    /// One process with a backend on each of `datas`, named `name`, then
    /// `name1`, `name2`...: on one file system they share its commit thread.
    pub fn start_backends(
        root: &Path,
        name: &str,
        datas: &[PathBuf],
        durability: Durability,
    ) -> Listener {
        let mode = match durability {
            // The default; written out only when asked for, so the suite
            // also runs against builds that predate the setting.
            Durability::File => String::new(),
            Durability::Syncfs => "durability = \"syncfs\"\n".to_string(),
        };
        let backends = datas
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let named = match i {
                    0 => name.to_string(),
                    _ => format!("{name}{i}"),
                };
                BackendSpec {
                    extra: format!("cpu = 0\n{mode}"),
                    ..BackendSpec::named(&named, data.clone())
                }
            })
            .collect();
        let spec = PplistenerSpec {
            secret: SECRET.into(),
            admin_token: "powercut-admin-token".into(),
            extra: "blocking_threads = 8\n[limits]\nfree_bytes_min = 0\n".into(),
            backends,
        };
        let process = Pplistener::start(root, &format!("pplistener-{name}"), &spec);
        Listener {
            addr: process.backends[0],
            data: datas[0].clone(),
            addrs: process.backends.clone(),
            datas: datas.to_vec(),
            process,
        }
    }

    /// The process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.process.pid().unwrap_or(0)
    }

    /// An authenticated connection to the first backend.
    pub fn conn(&self) -> BackendConn {
        self.conn_to(0)
    }

    /// An authenticated connection to backend `i`.
    pub fn conn_to(&self, i: usize) -> BackendConn {
        BackendConn::connect(self.addrs[i], SECRET.as_bytes(), IO_TIMEOUT).expect("backend connect")
    }

    /// Entries left in the data directories' `tmp/`.
    pub fn temp_files(&self) -> usize {
        self.datas
            .iter()
            .map(|d| {
                std::fs::read_dir(d.join("tmp"))
                    .map(|rd| rd.count())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }
}
