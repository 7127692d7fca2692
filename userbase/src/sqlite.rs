//! The embedded userbase: one SQLite file, nothing to install.
//!
//! Frontends are std-thread based and share one [`SqliteUserbase`], so connections come
//! from a small pool guarded by a mutex (a `rusqlite::Connection` must not be used from two
//! threads at once). The file runs in WAL mode so readers never wait for `ppadmin` writing,
//! and every connection has a busy timeout so a long writer turns into
//! [`UserbaseError::Unavailable`] after a bounded wait, never into a hang.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use crate::address::catch_all_for;
use crate::queries::{self as q, RawMailbox};
use crate::schema::{MIGRATIONS, SCHEMA_VERSION, SQLITE_VERSION_TABLE};
use crate::{
    check_quota, normalise_address, normalise_domain, parse_listen, password, render_forwards,
    wildcard_listen, Mailbox, Userbase, UserbaseError, VirtualServer,
};

/// How the SQLite userbase is opened. Every field has a default ([`SqliteConfig::new`]).
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file; created (with its schema) if missing, but its directory must exist.
    pub path: PathBuf,
    /// How long a statement waits for another writer's lock before failing (default 2 s).
    pub busy_timeout: Duration,
    /// Most connections open at once (default 4).
    pub max_connections: usize,
    /// How long a caller waits for a free connection before `Unavailable` (default 2 s).
    pub checkout_timeout: Duration,
}

impl SqliteConfig {
    /// Defaults for a database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            busy_timeout: Duration::from_secs(2),
            max_connections: 4,
            checkout_timeout: Duration::from_secs(2),
        }
    }
}

/// Connections not in use, and how many exist in total.
struct Pool {
    idle: Vec<Connection>,
    open: usize,
}

/// The SQLite implementation of [`Userbase`].
pub struct SqliteUserbase {
    config: SqliteConfig,
    pool: Mutex<Pool>,
    returned: Condvar,
}

impl std::fmt::Debug for SqliteUserbase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteUserbase")
            .field("path", &self.config.path)
            .finish()
    }
}

impl SqliteUserbase {
    /// Opens (creating if needed) the database and applies pending migrations.
    /// `Unavailable` if the file cannot be opened or is not a SQLite database;
    /// `Schema` if it was written by a newer version.
    pub fn open(config: SqliteConfig) -> Result<Self, UserbaseError> {
        let userbase = SqliteUserbase {
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            returned: Condvar::new(),
            config: SqliteConfig {
                max_connections: config.max_connections.max(1),
                ..config
            },
        };
        userbase.with_conn(|conn| userbase.migrate(conn))?;
        Ok(userbase)
    }

    /// Brings the schema up to [`SCHEMA_VERSION`] in one immediate transaction, so two
    /// processes opening a fresh file at once do not both migrate.
    fn migrate(&self, conn: &mut Connection) -> Result<(), UserbaseError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.error(e, ""))?;
        tx.execute_batch(SQLITE_VERSION_TABLE)
            .map_err(|e| self.error(e, ""))?;
        let current: i64 = tx
            .query_row(q::MAX_VERSION, [], |row| row.get(0))
            .map_err(|e| self.error(e, ""))?;
        if current > i64::from(SCHEMA_VERSION) {
            return Err(UserbaseError::Schema(format!(
                "{} has schema version {current}, this program knows up to {SCHEMA_VERSION}",
                self.config.path.display()
            )));
        }
        for migration in MIGRATIONS.iter().filter(|m| i64::from(m.version) > current) {
            log::info!(
                "userbase {}: migration {} ({})",
                self.config.path.display(),
                migration.version,
                migration.description
            );
            for statement in migration.sqlite {
                tx.execute_batch(statement).map_err(|e| {
                    UserbaseError::Schema(format!("migration {}: {e}", migration.version))
                })?;
            }
            tx.execute(
                q::RECORD_VERSION,
                params![migration.version, migration.description],
            )
            .map_err(|e| self.error(e, ""))?;
        }
        tx.commit().map_err(|e| self.error(e, ""))
    }

    /// Opens one connection with the pragmas every connection needs.
    fn connect(&self) -> Result<Connection, UserbaseError> {
        let conn = Connection::open(&self.config.path).map_err(|e| self.error(e, ""))?;
        conn.busy_timeout(self.config.busy_timeout)
            .map_err(|e| self.error(e, ""))?;
        // Reading journal_mode is also the first real read of the file: a corrupt or
        // non-SQLite file fails here, at open time.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(|e| self.error(e, ""))?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!(
                "userbase {}: journal_mode is {mode}, not wal",
                self.config.path.display()
            );
        }
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(|e| self.error(e, ""))?;
        Ok(conn)
    }

    /// Runs `f` with a pooled connection. A connection that saw an `Unavailable` error is
    /// closed rather than reused, in case its state is what broke.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, UserbaseError>,
    ) -> Result<T, UserbaseError> {
        let mut conn = self.checkout()?;
        let result = f(&mut conn);
        let mut pool = self.lock_pool();
        if matches!(result, Err(UserbaseError::Unavailable(_))) {
            pool.open -= 1;
        } else {
            pool.idle.push(conn);
        }
        drop(pool);
        self.returned.notify_one();
        result
    }

    /// Takes an idle connection, opens a new one below the bound, or waits for one.
    fn checkout(&self) -> Result<Connection, UserbaseError> {
        let deadline = Instant::now() + self.config.checkout_timeout;
        let mut pool = self.lock_pool();
        loop {
            if let Some(conn) = pool.idle.pop() {
                return Ok(conn);
            }
            if pool.open < self.config.max_connections {
                pool.open += 1;
                drop(pool);
                let connected = self.connect();
                if connected.is_err() {
                    self.lock_pool().open -= 1;
                    self.returned.notify_one();
                }
                return connected;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(UserbaseError::Unavailable(format!(
                    "sqlite {}: no free connection within {:?}",
                    self.config.path.display(),
                    self.config.checkout_timeout
                )));
            }
            pool = match self.returned.wait_timeout(pool, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// The pool lock; a panic elsewhere while holding it leaves the pool consistent (every
    /// change is a single push/pop/counter update), so poisoning is ignored.
    fn lock_pool(&self) -> MutexGuard<'_, Pool> {
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Maps a SQLite error: unique violations become `Exists(what)`, other constraint
    /// violations `InvalidValue`, everything else (I/O, busy, corrupt, missing table)
    /// `Unavailable`.
    fn error(&self, err: rusqlite::Error, what: &str) -> UserbaseError {
        if let rusqlite::Error::SqliteFailure(code, _) = &err {
            if code.code == ErrorCode::ConstraintViolation {
                return match code.extended_code {
                    rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    | rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE => {
                        UserbaseError::Exists(what.to_string())
                    }
                    _ => UserbaseError::InvalidValue(format!("{what}: {err}")),
                };
            }
        }
        UserbaseError::Unavailable(format!("sqlite {}: {err}", self.config.path.display()))
    }

    /// Runs one `INSERT`/`UPDATE`/`DELETE`; returns the rows changed.
    fn rows(
        &self,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
        what: &str,
    ) -> Result<usize, UserbaseError> {
        self.with_conn(|conn| {
            let mut statement = conn.prepare_cached(sql).map_err(|e| self.error(e, what))?;
            statement.execute(params).map_err(|e| self.error(e, what))
        })
    }

    /// Runs one `UPDATE`/`DELETE` on a mailbox; `NotFound` if no row matched.
    fn change(
        &self,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
        name: &str,
    ) -> Result<(), UserbaseError> {
        let changed = self.with_conn(|conn| {
            let mut statement = conn.prepare_cached(sql).map_err(|e| self.error(e, name))?;
            statement.execute(params).map_err(|e| self.error(e, name))
        })?;
        if changed == 0 {
            return Err(UserbaseError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Runs a mailbox `SELECT` returning at most one row.
    fn select_one(
        &self,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<Option<Mailbox>, UserbaseError> {
        let raw = self.with_conn(|conn| {
            let mut statement = conn.prepare_cached(sql).map_err(|e| self.error(e, ""))?;
            statement
                .query_row(params, raw_mailbox)
                .optional()
                .map_err(|e| self.error(e, ""))
        })?;
        raw.map(RawMailbox::into_mailbox).transpose()
    }
}

/// Reads the columns of [`q::LOOKUP`]-style queries.
fn raw_mailbox(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawMailbox> {
    Ok(RawMailbox {
        name: row.get(0)?,
        password: row.get(1)?,
        quota_bytes: row.get(2)?,
        forwards: row.get(3)?,
        keep_local_copy: row.get(4)?,
        enabled: row.get(5)?,
        deliver_to: row.get(6)?,
    })
}

impl Userbase for SqliteUserbase {
    fn lookup(&self, address: &str) -> Result<Option<Mailbox>, UserbaseError> {
        let name = normalise_address(address)?;
        let catch_all = catch_all_for(&name).unwrap_or_else(|| name.clone());
        let found = self.select_one(q::LOOKUP, params![name, catch_all, name])?;
        crate::resolve_catch_all(self, found)
    }

    fn get_mailbox(&self, name: &str) -> Result<Option<Mailbox>, UserbaseError> {
        let name = normalise_address(name)?;
        self.select_one(q::GET, params![name])
    }

    fn virtual_domain(&self, listen: &SocketAddr) -> Result<Option<String>, UserbaseError> {
        let exact = listen.to_string();
        let wildcard = wildcard_listen(listen).to_string();
        self.with_conn(|conn| {
            let mut statement = conn
                .prepare_cached(q::VIRTUAL_DOMAIN)
                .map_err(|e| self.error(e, ""))?;
            statement
                .query_row(params![exact, wildcard, exact], |row| row.get(0))
                .optional()
                .map_err(|e| self.error(e, ""))
        })
    }

    fn add_mailbox(
        &self,
        name: &str,
        password: &str,
        quota_bytes: u64,
    ) -> Result<Mailbox, UserbaseError> {
        let name = normalise_address(name)?;
        let quota = check_quota(quota_bytes)?;
        let hash = password::hash(password);
        self.with_conn(|conn| {
            let mut statement = conn
                .prepare_cached(q::INSERT)
                .map_err(|e| self.error(e, &name))?;
            statement
                .execute(params![name, hash, quota])
                .map_err(|e| self.error(e, &name))
        })?;
        self.get_mailbox(&name)?.ok_or_else(|| {
            UserbaseError::Unavailable(format!("{name} vanished right after insert"))
        })
    }

    fn delete_mailbox(&self, name: &str) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        self.change(q::DELETE, params![name], &name)
    }

    fn set_password(&self, name: &str, password: &str) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        self.change(
            q::SET_PASSWORD,
            params![password::hash(password), name],
            &name,
        )
    }

    fn set_quota(&self, name: &str, quota_bytes: u64) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        self.change(
            q::SET_QUOTA,
            params![check_quota(quota_bytes)?, name],
            &name,
        )
    }

    fn set_forwards(
        &self,
        name: &str,
        forwards: Vec<String>,
        keep_local_copy: bool,
    ) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        let text = render_forwards(&forwards)?;
        self.change(q::SET_FORWARDS, params![text, keep_local_copy, name], &name)
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        self.change(q::SET_ENABLED, params![enabled, name], &name)
    }

    fn set_deliver_to(&self, name: &str, target: Option<&str>) -> Result<(), UserbaseError> {
        let (name, target) = crate::check_deliver_to(name, target)?;
        self.change(q::SET_DELIVER_TO, params![target, name], &name)
    }

    fn list_mailboxes(&self) -> Result<Vec<Mailbox>, UserbaseError> {
        let raws = self.with_conn(|conn| {
            let mut statement = conn
                .prepare_cached(q::LIST)
                .map_err(|e| self.error(e, ""))?;
            let rows = statement
                .query_map([], raw_mailbox)
                .map_err(|e| self.error(e, ""))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.error(e, ""))
        })?;
        raws.into_iter().map(RawMailbox::into_mailbox).collect()
    }

    fn add_virtual_server(&self, listen: &SocketAddr, domain: &str) -> Result<(), UserbaseError> {
        let domain = normalise_domain(domain)?;
        let listen = listen.to_string();
        self.with_conn(|conn| {
            let mut statement = conn
                .prepare_cached(q::INSERT_VIRTUAL)
                .map_err(|e| self.error(e, &listen))?;
            statement
                .execute(params![listen, domain])
                .map_err(|e| self.error(e, &listen))
        })?;
        Ok(())
    }

    fn delete_virtual_server(&self, listen: &SocketAddr) -> Result<(), UserbaseError> {
        let listen = listen.to_string();
        self.change(q::DELETE_VIRTUAL, params![listen], &listen)
    }

    fn list_virtual_servers(&self) -> Result<Vec<VirtualServer>, UserbaseError> {
        let rows: Vec<(String, String)> = self.with_conn(|conn| {
            let mut statement = conn
                .prepare_cached(q::LIST_VIRTUAL)
                .map_err(|e| self.error(e, ""))?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(|e| self.error(e, ""))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.error(e, ""))
        })?;
        rows.into_iter()
            .map(|(listen, domain)| {
                Ok(VirtualServer {
                    listen: parse_listen(&listen)?,
                    domain,
                })
            })
            .collect()
    }

    fn lease_take(
        &self,
        mailbox: &str,
        holder: &str,
        lease_ms: u64,
    ) -> Result<bool, UserbaseError> {
        let mailbox = crate::lease::check(mailbox, holder, lease_ms)?;
        let lease_ms = lease_ms as i64; // at most LEASE_MAX_MS
        match self.rows(
            q::lease::SQLITE_INSERT,
            params![mailbox, holder, lease_ms],
            &mailbox,
        ) {
            Ok(_) => Ok(true),
            // A row exists: ours to take only if it has expired.
            Err(UserbaseError::Exists(_)) => Ok(self.rows(
                q::lease::SQLITE_TAKEOVER,
                params![holder, lease_ms, mailbox],
                &mailbox,
            )? == 1),
            Err(e) => Err(e),
        }
    }

    fn lease_renew(
        &self,
        mailbox: &str,
        holder: &str,
        lease_ms: u64,
    ) -> Result<bool, UserbaseError> {
        let mailbox = crate::lease::check(mailbox, holder, lease_ms)?;
        let params = params![lease_ms as i64, mailbox, holder];
        Ok(self.rows(q::lease::SQLITE_RENEW, params, &mailbox)? == 1)
    }

    fn lease_release(&self, mailbox: &str, holder: &str) -> Result<(), UserbaseError> {
        let mailbox = crate::lease::check(mailbox, holder, 1)?;
        self.rows(q::lease::RELEASE, params![mailbox, holder], &mailbox)?;
        Ok(())
    }

    fn leases_span_hosts(&self) -> bool {
        false
    }
}
