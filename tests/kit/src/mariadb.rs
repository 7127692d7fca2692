//! A private MariaDB for the suites that need a real MySQL userbase: its own
//! data directory, socket and port, started with `.ci/mariadb.sh` (so CI and
//! the tests start it one way), which a test may kill with -9 and start
//! again. On this machine's loopback ([`Mariadb::start`]) or inside a
//! simulated host of tests/cluster ([`Mariadb::start_at`]: its namespace,
//! bound to its address). Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::launch::Place;

/// The longest a killed server takes to go away.
const GONE_WITHIN: Duration = Duration::from_secs(60);

/// The user every host may log in as (`'powermail'@'%'`), and its password.
pub const MARIADB_USER: &str = "powermail";
/// The password of [`MARIADB_USER`].
pub const MARIADB_PASSWORD: &str = "powermail-test-pass";

/// A running private MariaDB with one database.
pub struct Mariadb {
    dir: tempfile::TempDir,
    place: Place,
    port: u16,
    database: String,
}

impl Mariadb {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/mariadb.sh")
    }

    /// Starts a server on this machine's loopback (a free port) and creates
    /// `database` in it.
    pub fn start(database: &str) -> Mariadb {
        Mariadb::start_at(&Place::default(), database)
    }

    /// Starts a server at `place` (inside its namespace, bound to its
    /// address, on a free port) and creates `database` in it, with user
    /// [`MARIADB_USER`] allowed from anywhere.
    pub fn start_at(place: &Place, database: &str) -> Mariadb {
        assert!(
            !database.is_empty()
                && database
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "database name {database:?}: letters, digits and _ only"
        );
        let m = Mariadb {
            dir: tempfile::tempdir().expect("tempdir"),
            place: place.clone(),
            port: crate::free_port(),
            database: database.to_string(),
        };
        m.up();
        m.client(
            None,
            &format!(
                "CREATE DATABASE IF NOT EXISTS {database}; \
                 CREATE USER IF NOT EXISTS '{MARIADB_USER}'@'%' IDENTIFIED BY '{MARIADB_PASSWORD}'; \
                 GRANT ALL ON {database}.* TO '{MARIADB_USER}'@'%';"
            ),
        );
        m
    }

    /// The server's unix socket (a file: reachable from any namespace).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/mysqld.sock")
    }

    /// Runs `sql` with the `mariadb` client over the socket (as an
    /// operator would), in `database` when given.
    fn client(&self, database: Option<&str>, sql: &str) {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-uroot"])
            .args(database)
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-e", sql])
            .output()
            .expect("mariadb client");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `sql` in the test database.
    pub fn sql(&self, sql: &str) {
        self.client(Some(&self.database), sql);
    }

    /// Starts the server (again, after [`Mariadb::kill9`]).
    pub fn up(&self) {
        let mut cmd = match &self.place.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(Self::script());
                c
            }
            None => Command::new(Self::script()),
        };
        let out = cmd
            .arg("start")
            .env("PM_MARIADB_DIR", self.dir.path())
            .env("PM_MARIADB_PORT", self.port.to_string())
            .env("PM_MARIADB_BIND", self.place.ip.to_string())
            .env("PM_MARIADB_NO_TLS", "1")
            .output()
            .expect("mariadb.sh");
        assert!(
            out.status.success(),
            "mariadb.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        let pid =
            std::fs::read_to_string(self.dir.path().join("run/mysqld.pid")).unwrap_or_default();
        pid.trim().parse().ok()
    }

    /// `kill -9` of the server; returns once it is gone.
    pub fn kill9(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the server we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let start = Instant::now();
            // SAFETY: signal 0 only checks the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && start.elapsed() < GONE_WITHIN {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(self.dir.path().join("run/mysqld.pid"));
    }

    /// The userbase URL of the test database: as root on loopback (as the
    /// system suites always did), as [`MARIADB_USER`] at any other place.
    pub fn url(&self) -> String {
        let (ip, port, db) = (self.place.ip, self.port, &self.database);
        if ip.is_loopback() {
            format!("mysql://root@{ip}:{port}/{db}")
        } else {
            format!("mysql://{MARIADB_USER}:{MARIADB_PASSWORD}@{ip}:{port}/{db}")
        }
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Whether `mariadbd` is installed.
pub fn mariadbd_installed() -> bool {
    Command::new("sh")
        .args(["-c", "command -v mariadbd || test -x /usr/sbin/mariadbd"])
        .output()
        .is_ok_and(|o| o.status.success())
}
