//! A private MariaDB for the system suites: its own datadir, socket and
//! port, started with `.ci/mariadb.sh`, which a test may kill with -9 and
//! restart. Shared by the fault suite (database restart under load) and the
//! lease suite (two POP hosts on one database).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use powermail_testkit::free_port;

/// The longest a killed server takes to go away.
const GONE_WITHIN: Duration = Duration::from_secs(60);

/// A running private MariaDB with one database.
pub struct PrivateMariadb {
    dir: tempfile::TempDir,
    port: u16,
    database: String,
}

impl PrivateMariadb {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/mariadb.sh")
    }

    /// Starts a server and creates `database` in it.
    pub fn start(database: &str) -> PrivateMariadb {
        let m = PrivateMariadb {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            database: database.to_string(),
        };
        m.up();
        m.client(None, &format!("CREATE DATABASE IF NOT EXISTS {database}"));
        m
    }

    /// Runs `sql` with the `mariadb` client (as an operator would), in
    /// `database` when given.
    fn client(&self, database: Option<&str>, sql: &str) {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-uroot"])
            .args(database)
            .arg(format!(
                "--socket={}",
                self.dir.path().join("run/mysqld.sock").display()
            ))
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

    /// Starts the server (again, after [`PrivateMariadb::kill9`]).
    pub fn up(&self) {
        let out = Command::new(Self::script())
            .arg("start")
            .env("PM_MARIADB_DIR", self.dir.path())
            .env("PM_MARIADB_PORT", self.port.to_string())
            .env("PM_MARIADB_NO_TLS", "1")
            .output()
            .expect("mariadb.sh");
        assert!(
            out.status.success(),
            "mariadb.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `kill -9` of the server; returns once it is gone.
    pub fn kill9(&self) {
        let pid =
            std::fs::read_to_string(self.dir.path().join("run/mysqld.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
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

    /// The userbase URL of the test database.
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/{}", self.port, self.database)
    }
}

impl Drop for PrivateMariadb {
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
