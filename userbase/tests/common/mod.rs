//! Test backends: the same cases run against a fresh SQLite file and a fresh MySQL/MariaDB
//! database each. MySQL comes from `PM_TEST_MYSQL_URL` (start one with `.ci/mariadb.sh start`).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use powermail_userbase::{open, Clock, Userbase};

/// Everything a case needs from a database besides the [`Userbase`] API.
pub trait Backend {
    /// URL of this test's database.
    fn url(&self) -> String;
    /// A fresh handle on this test's database (migrations applied).
    fn userbase(&self) -> Box<dyn Userbase> {
        open(&self.url()).unwrap_or_else(|e| panic!("open {}: {e}", self.url()))
    }
    /// Runs SQL outside the userbase (what an operator's SQL client does).
    fn exec(&self, sql: &str);
    /// Inserts a mailbox row by hand with only name and password, as the README shows
    /// (values bound as parameters).
    fn insert(&self, name: &str, password: &str);
    /// `SELECT COUNT(*) FROM table`.
    fn count(&self, table: &str) -> i64;
    /// A URL of the same kind that cannot be reached or opened.
    fn unreachable_urls(&self) -> Vec<String>;
}

/// A temporary directory with `userbase.db`.
pub struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    pub fn new() -> Self {
        Sqlite {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("userbase.db")
    }

    fn conn(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.path()).expect("open sqlite");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        conn
    }
}

impl Backend for Sqlite {
    fn url(&self) -> String {
        format!("sqlite://{}", self.path().display())
    }

    fn exec(&self, sql: &str) {
        self.conn()
            .execute_batch(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn insert(&self, name: &str, password: &str) {
        self.conn()
            .execute(
                "INSERT INTO mailboxes (name, password) VALUES (?1, ?2)",
                (name, password),
            )
            .expect("insert");
    }

    fn count(&self, table: &str) -> i64 {
        self.conn()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .expect("count")
    }

    fn unreachable_urls(&self) -> Vec<String> {
        let corrupt = self.dir.path().join("corrupt.db");
        std::fs::write(&corrupt, "this is not a SQLite database\n".repeat(200))
            .expect("write corrupt file");
        vec![
            format!(
                "sqlite://{}/no/such/dir/userbase.db",
                self.dir.path().display()
            ),
            format!("sqlite://{}", corrupt.display()),
            // A directory is not a database file either.
            format!("sqlite://{}", self.dir.path().display()),
        ]
    }
}

/// A fresh database named after the test on the server in `PM_TEST_MYSQL_URL`.
pub struct Mysql {
    url: String,
}

/// The server URL, or `None` (after saying so) when MySQL tests are to be skipped.
/// Panics when `CI` is set but `PM_TEST_MYSQL_URL` is not: CI must not skip half the suite.
pub fn mysql_base_url() -> Option<String> {
    match std::env::var("PM_TEST_MYSQL_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI is set but PM_TEST_MYSQL_URL is unset: run `.ci/mariadb.sh start` and export the URL it prints")
        }
        _ => {
            eprintln!("skipping MySQL: PM_TEST_MYSQL_URL unset");
            None
        }
    }
}

/// Splits `mysql://user@host:port/db?params` into (server URL without db, db, params).
fn split_mysql_url(url: &str) -> (String, String, String) {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let after_scheme = base
        .strip_prefix("mysql://")
        .expect("PM_TEST_MYSQL_URL must start with mysql://");
    let (authority, db) = after_scheme.split_once('/').unwrap_or((after_scheme, ""));
    (
        format!("mysql://{authority}/"),
        db.to_string(),
        query.to_string(),
    )
}

impl Mysql {
    /// Creates (dropping any leftover) database `<db>_<test>`; `None` if MySQL is skipped.
    pub fn new(test: &str) -> Option<Self> {
        let url = mysql_base_url()?;
        let (server, db, query) = split_mysql_url(&url);
        let prefix = if db.is_empty() {
            "powermail_test".to_string()
        } else {
            db
        };
        let name: String = format!("{prefix}_{test}").chars().take(64).collect();
        let mut conn = mysql::Conn::new(mysql::Opts::from_url(&server).expect("server url"))
            .unwrap_or_else(|e| panic!("connect to {server}: {e}"));
        conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
            .expect("drop db");
        conn.query_drop(format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
            .expect("create db");
        let url = if query.is_empty() {
            format!("{server}{name}")
        } else {
            format!("{server}{name}?{query}")
        };
        Some(Mysql { url })
    }

    fn conn(&self) -> mysql::Conn {
        let (server, db, _) = split_mysql_url(&self.url);
        mysql::Conn::new(mysql::Opts::from_url(&format!("{server}{db}")).expect("url"))
            .expect("connect")
    }
}

impl Backend for Mysql {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn exec(&self, sql: &str) {
        self.conn()
            .query_drop(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn insert(&self, name: &str, password: &str) {
        self.conn()
            .exec_drop(
                "INSERT INTO mailboxes (name, password) VALUES (?, ?)",
                (name, password),
            )
            .expect("insert");
    }

    fn count(&self, table: &str) -> i64 {
        let count: Option<i64> = self
            .conn()
            .query_first(format!("SELECT COUNT(*) FROM {table}"))
            .expect("count");
        count.unwrap_or(0)
    }

    fn unreachable_urls(&self) -> Vec<String> {
        vec![
            // Nothing listens on port 1: connection refused.
            "mysql://root@127.0.0.1:1/powermail_test?connect_timeout_ms=500".to_string(),
            // The server is up but the database does not exist.
            format!(
                "{}_missing_db",
                self.url.split('?').next().unwrap_or(&self.url)
            ),
        ]
    }
}

/// A clock the test moves by hand.
pub struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    pub fn new() -> Self {
        ManualClock {
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    pub fn advance(&self, by: Duration) {
        *self.offset.lock().expect("clock lock") += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.offset.lock().expect("clock lock")
    }
}
