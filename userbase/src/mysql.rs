//! The production userbase: MySQL or MariaDB, shared by every frontend host.
//!
//! Connections come from a bounded `mysql::Pool`; every connect, read and write has a
//! timeout, and waiting for a pooled connection is bounded too, so a dead or overloaded
//! server turns into [`UserbaseError::Unavailable`] within a few seconds instead of
//! hanging a frontend thread. Once a call has lost the server (no answer: I/O error,
//! time-out), the calls of the next second fail at once (`OUTAGE_HOLD`), so during an
//! outage only one lookup at a time pays the time-outs (tests/cluster, the database host
//! partitioned under load).
//!
//! URL: `mysql://user:pass@host:port/db?connect_timeout_ms=2000&read_timeout_ms=2000&write_timeout_ms=2000&pool_min=1&pool_max=8&pool_wait_ms=2000&tls=false`.
//! The listed parameters are ours (see [`MysqlConfig`]); any other parameter is passed to
//! the `mysql` crate unchanged (e.g. `socket=...`, `prefer_socket=false`).

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use mysql::consts::CapabilityFlags;
use mysql::prelude::Queryable;
use mysql::{params::Params, Opts, OptsBuilder, Pool, PoolConstraints, PooledConn};

use crate::address::catch_all_for;
use crate::queries::{self as q, RawMailbox};
use crate::schema::{MIGRATIONS, MYSQL_VERSION_TABLE, SCHEMA_VERSION};
use crate::{
    check_quota, normalise_address, normalise_domain, parse_listen, password, render_forwards,
    wildcard_listen, Mailbox, Userbase, UserbaseError, VirtualServer,
};

/// MySQL server error: duplicate key.
const ER_DUP_ENTRY: u16 = 1062;
/// MariaDB / MySQL server errors: CHECK constraint violated.
const ER_CONSTRAINT_FAILED: [u16; 2] = [4025, 3819];
/// Name of the advisory lock that serialises migrations between processes.
const MIGRATION_LOCK: &str = "powermail_userbase_migrate";
/// While the server cannot be reached, a new connection attempt at most this often
/// (lazily opened userbases; calls in between get the last error).
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// After a call lost the server (I/O error, time-out), calls within this long
/// fail at once instead of each paying the connect and read time-outs again;
/// the first call after it probes the server. One lookup of a session that
/// makes several therefore waits for one time-out, not one per query.
const OUTAGE_HOLD: Duration = Duration::from_millis(1000);
/// Seconds to wait for [`MIGRATION_LOCK`].
const MIGRATION_LOCK_TIMEOUT_S: u32 = 10;

/// How the MySQL userbase connects. [`MysqlConfig::from_url`] fills it from URL parameters.
#[derive(Debug, Clone)]
pub struct MysqlConfig {
    /// The URL without our own parameters, handed to the `mysql` crate.
    pub url: String,
    /// TCP connect timeout (`connect_timeout_ms`, default 2000).
    pub connect_timeout: Duration,
    /// Socket read timeout (`read_timeout_ms`, default 2000).
    pub read_timeout: Duration,
    /// Socket write timeout (`write_timeout_ms`, default 2000).
    pub write_timeout: Duration,
    /// Connections kept open when idle (`pool_min`, default 1).
    pub pool_min: usize,
    /// Most connections open at once (`pool_max`, default 8).
    pub pool_max: usize,
    /// How long a caller waits for a free pooled connection (`pool_wait_ms`, default 2000).
    pub pool_wait: Duration,
    /// Require TLS (`tls=true`; needs the `mysql-tls` cargo feature). Default false.
    /// Server certificates are verified against the built-in roots unless the URL also
    /// carries the `mysql` crate's own TLS parameters (`root_cert_path=/ca.pem`, ...),
    /// which are kept as given.
    pub tls: bool,
}

impl MysqlConfig {
    /// Splits our parameters off a `mysql://` URL. `InvalidUrl` for a malformed value.
    pub fn from_url(url: &str) -> Result<Self, UserbaseError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut config = MysqlConfig {
            url: base.to_string(),
            connect_timeout: Duration::from_millis(2000),
            read_timeout: Duration::from_millis(2000),
            write_timeout: Duration::from_millis(2000),
            pool_min: 1,
            pool_max: 8,
            pool_wait: Duration::from_millis(2000),
            tls: false,
        };
        let mut passed_on = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let millis = || {
                value
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| {
                        UserbaseError::InvalidUrl(format!(
                            "{key}={value}: not a number of milliseconds"
                        ))
                    })
            };
            let count = || {
                value
                    .parse::<usize>()
                    .map_err(|_| UserbaseError::InvalidUrl(format!("{key}={value}: not a count")))
            };
            match key {
                "connect_timeout_ms" => config.connect_timeout = millis()?,
                "read_timeout_ms" => config.read_timeout = millis()?,
                "write_timeout_ms" => config.write_timeout = millis()?,
                "pool_wait_ms" => config.pool_wait = millis()?,
                "pool_min" => config.pool_min = count()?,
                "pool_max" => config.pool_max = count()?,
                "tls" => {
                    config.tls = value.parse().map_err(|_| {
                        UserbaseError::InvalidUrl(format!("tls={value}: not true/false"))
                    })?
                }
                _ => passed_on.push(pair),
            }
        }
        if !passed_on.is_empty() {
            config.url = format!("{base}?{}", passed_on.join("&"));
        }
        Ok(config)
    }

    /// Connection options for the `mysql` crate.
    fn opts(&self) -> Result<Opts, UserbaseError> {
        let opts =
            Opts::from_url(&self.url).map_err(|e| UserbaseError::InvalidUrl(format!("{e}")))?;
        // TLS parameters of the mysql crate in the URL (root_cert_path=...) already
        // configure TLS; `tls=true` must not replace them with defaults.
        let tls_configured = opts.get_ssl_opts().is_some();
        let constraints =
            PoolConstraints::new(self.pool_min, self.pool_max.max(1)).ok_or_else(|| {
                UserbaseError::InvalidUrl(format!(
                    "pool_min {} > pool_max {}",
                    self.pool_min, self.pool_max
                ))
            })?;
        // No COM_RESET_CONNECTION when a connection returns to the pool: we keep no session
        // state, and resetting would drop the server-side prepared statements, making every
        // look-up prepare its statement again (measured here: 3-4x fewer look-ups/s).
        let pool_opts = opts
            .get_pool_opts()
            .clone()
            .with_constraints(constraints)
            .with_reset_connection(false);
        let builder = OptsBuilder::from_opts(opts)
            .tcp_connect_timeout(Some(self.connect_timeout))
            .read_timeout(Some(self.read_timeout))
            .write_timeout(Some(self.write_timeout))
            .pool_opts(pool_opts)
            // UPDATE must report rows *matched*, not changed, or setting a value to what it
            // already is would look like "no such mailbox".
            .additional_capabilities(CapabilityFlags::CLIENT_FOUND_ROWS);
        Ok(self.with_tls(builder, tls_configured)?.into())
    }

    #[cfg(feature = "mysql-tls")]
    fn with_tls(
        &self,
        builder: OptsBuilder,
        tls_configured: bool,
    ) -> Result<OptsBuilder, UserbaseError> {
        Ok(if self.tls && !tls_configured {
            builder.ssl_opts(mysql::SslOpts::default())
        } else {
            builder
        })
    }

    #[cfg(not(feature = "mysql-tls"))]
    fn with_tls(
        &self,
        builder: OptsBuilder,
        _tls_configured: bool,
    ) -> Result<OptsBuilder, UserbaseError> {
        if self.tls {
            return Err(UserbaseError::InvalidUrl(
                "tls=true needs powermail-userbase built with the `mysql-tls` feature".into(),
            ));
        }
        Ok(builder)
    }

    /// The URL with any password replaced, for messages and logs.
    fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return self.url.clone();
        };
        match rest.split_once('@') {
            Some((credentials, host)) => match credentials.split_once(':') {
                Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://{credentials}@{host}"),
            },
            None => self.url.clone(),
        }
    }
}

/// The MySQL/MariaDB implementation of [`Userbase`].
///
/// Opened eagerly ([`MysqlUserbase::open`]: connect and migrate now, for tools) or
/// lazily ([`MysqlUserbase::open_lazy`], for daemons): then the pool is made on the
/// first call that finds the server up, and every call before that fails with
/// [`UserbaseError::Unavailable`], so a frontend starts, answers "try again later"
/// while the database is down, and serves as soon as it is back.
pub struct MysqlUserbase {
    opts: Opts,
    /// Made once, by the first call that reaches the server (and finds the schema right).
    pool: OnceLock<Pool>,
    /// Serialises the attempts to make `pool`; holds the last failed attempt.
    connecting: Mutex<Option<(Instant, UserbaseError)>>,
    /// When a call last lost the server (see [`OUTAGE_HOLD`]); `None` while
    /// it answers.
    outage: Mutex<Option<Instant>>,
    /// Whether this process may bring the schema up to date (else it only checks it).
    migrate: bool,
    pool_wait: Duration,
    label: String,
}

impl std::fmt::Debug for MysqlUserbase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlUserbase")
            .field("url", &self.label)
            .finish()
    }
}

impl MysqlUserbase {
    /// Connects and applies pending migrations. `Unavailable` if the server cannot be
    /// reached or refuses us; `InvalidUrl` for bad options; `Schema` if the database was
    /// written by a newer version.
    pub fn open(config: MysqlConfig) -> Result<Self, UserbaseError> {
        let userbase = Self::open_lazy(config, true)?;
        userbase.pool()?;
        Ok(userbase)
    }

    /// Checks the options but connects only when first used (see the type's
    /// documentation). With `migrate` the first connection brings the schema up to
    /// [`SCHEMA_VERSION`]; without, a database at an older version is
    /// `Unavailable` ("run `ppadmin userbase migrate`") until someone migrates it.
    /// Fails only with `InvalidUrl`.
    pub fn open_lazy(config: MysqlConfig, migrate: bool) -> Result<Self, UserbaseError> {
        Ok(MysqlUserbase {
            opts: config.opts()?,
            pool: OnceLock::new(),
            connecting: Mutex::new(None),
            outage: Mutex::new(None),
            migrate,
            pool_wait: config.pool_wait,
            label: config.redacted(),
        })
    }

    /// The pool, made (connect, then migrate or check the schema) if not yet.
    fn pool(&self) -> Result<&Pool, UserbaseError> {
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        let mut last_failure = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        // While the server is down, callers get the last error at once instead of
        // each trying to connect again.
        if let Some((at, error)) = last_failure.as_ref() {
            if at.elapsed() < CONNECT_RETRY_INTERVAL {
                return Err(error.clone());
            }
        }
        match self.make_pool() {
            Ok(pool) => {
                *last_failure = None;
                Ok(self.pool.get_or_init(|| pool))
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Connects, then migrates or checks the schema.
    fn make_pool(&self) -> Result<Pool, UserbaseError> {
        let label = &self.label;
        let pool = Pool::new(self.opts.clone())
            .map_err(|e| UserbaseError::Unavailable(format!("mysql {label}: {e}")))?;
        let mut conn = pool
            .try_get_conn(self.pool_wait)
            .map_err(|e| self.error(e, ""))?;
        if self.migrate {
            self.migrate(&mut conn)?;
        } else {
            self.check_version(&mut conn)?;
        }
        drop(conn);
        Ok(pool)
    }

    /// Refuses a schema this program cannot use, without changing it.
    fn check_version(&self, conn: &mut PooledConn) -> Result<(), UserbaseError> {
        let label = &self.label;
        let current: Option<i64> = conn.query_first(q::MAX_VERSION).map_err(|e| {
            UserbaseError::Unavailable(format!(
                "mysql {label}: no schema version ({e}); run `ppadmin userbase migrate`"
            ))
        })?;
        let current = current.unwrap_or(0);
        if current > i64::from(SCHEMA_VERSION) {
            return Err(UserbaseError::Schema(format!(
                "{label} has schema version {current}, this program knows up to {SCHEMA_VERSION}"
            )));
        }
        if current < i64::from(SCHEMA_VERSION) {
            return Err(UserbaseError::Unavailable(format!(
                "mysql {label}: schema version {current}, this program needs {SCHEMA_VERSION}; \
                 run `ppadmin userbase migrate` (or set userbase_migrate = true)"
            )));
        }
        Ok(())
    }

    /// Brings the schema up to [`SCHEMA_VERSION`] under an advisory lock (MySQL DDL cannot
    /// be rolled back, so the lock, not a transaction, keeps two openers apart).
    fn migrate(&self, conn: &mut PooledConn) -> Result<(), UserbaseError> {
        let locked: Option<i64> = conn
            .exec_first(
                "SELECT GET_LOCK(?, ?)",
                (MIGRATION_LOCK, MIGRATION_LOCK_TIMEOUT_S),
            )
            .map_err(|e| self.error(e, ""))?;
        if locked != Some(1) {
            return Err(UserbaseError::Unavailable(format!(
                "mysql {}: migration lock busy",
                self.label
            )));
        }
        let result = self.migrate_locked(conn);
        let released = conn.exec_drop("SELECT RELEASE_LOCK(?)", (MIGRATION_LOCK,));
        result?;
        released.map_err(|e| self.error(e, ""))
    }

    fn migrate_locked(&self, conn: &mut PooledConn) -> Result<(), UserbaseError> {
        conn.query_drop(MYSQL_VERSION_TABLE)
            .map_err(|e| self.error(e, ""))?;
        let current: Option<i64> = conn
            .query_first(q::MAX_VERSION)
            .map_err(|e| self.error(e, ""))?;
        let current = current.unwrap_or(0);
        if current > i64::from(SCHEMA_VERSION) {
            return Err(UserbaseError::Schema(format!(
                "{} has schema version {current}, this program knows up to {SCHEMA_VERSION}",
                self.label
            )));
        }
        for migration in MIGRATIONS.iter().filter(|m| i64::from(m.version) > current) {
            log::info!(
                "userbase {}: migration {} ({})",
                self.label,
                migration.version,
                migration.description
            );
            for statement in migration.mysql {
                conn.query_drop(statement).map_err(|e| {
                    UserbaseError::Schema(format!("migration {}: {e}", migration.version))
                })?;
            }
            conn.exec_drop(
                q::RECORD_VERSION,
                (migration.version, migration.description),
            )
            .map_err(|e| self.error(e, ""))?;
        }
        Ok(())
    }

    /// A pooled connection, waiting at most `pool_wait_ms`; at once
    /// `Unavailable` within [`OUTAGE_HOLD`] of a call that lost the server.
    fn conn(&self) -> Result<PooledConn, UserbaseError> {
        let since = *self.outage.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = since {
            if at.elapsed() < OUTAGE_HOLD {
                return Err(UserbaseError::Unavailable(format!(
                    "mysql {}: unreachable {} ms ago, next try within {} ms",
                    self.label,
                    at.elapsed().as_millis(),
                    OUTAGE_HOLD.as_millis()
                )));
            }
        }
        let conn = self
            .pool()?
            .try_get_conn(self.pool_wait)
            .map_err(|e| self.error(e, ""))?;
        *self.outage.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(conn)
    }

    /// Maps a driver error: duplicate key → `Exists(what)`, CHECK violation →
    /// `InvalidValue`, everything else (I/O, timeout, refused, server errors) → `Unavailable`.
    fn error(&self, err: mysql::Error, what: &str) -> UserbaseError {
        if let mysql::Error::MySqlError(server) = &err {
            if server.code == ER_DUP_ENTRY {
                return UserbaseError::Exists(what.to_string());
            }
            if ER_CONSTRAINT_FAILED.contains(&server.code) {
                return UserbaseError::InvalidValue(format!("{what}: {err}"));
            }
        }
        if matches!(err, mysql::Error::IoError(_) | mysql::Error::DriverError(_)) {
            // No answer from the server: unreachable, silent, or every
            // connection stuck.
            *self.outage.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        UserbaseError::Unavailable(format!("mysql {}: {err}", self.label))
    }

    /// Runs one `UPDATE`/`DELETE`/`INSERT`; returns rows matched.
    fn execute(&self, sql: &str, params: Params, what: &str) -> Result<u64, UserbaseError> {
        let mut conn = self.conn()?;
        conn.exec_drop(sql, params)
            .map_err(|e| self.error(e, what))?;
        Ok(conn.affected_rows())
    }

    /// Like [`Self::execute`], `NotFound(name)` if no row matched.
    fn change(&self, sql: &str, params: Params, name: &str) -> Result<(), UserbaseError> {
        if self.execute(sql, params, name)? == 0 {
            return Err(UserbaseError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Runs a mailbox `SELECT`, returning all rows.
    fn select(&self, sql: &str, params: Params) -> Result<Vec<Mailbox>, UserbaseError> {
        type Row = (String, String, i64, String, i64, i64, String);
        let rows: Vec<Row> = self
            .conn()?
            .exec(sql, params)
            .map_err(|e| self.error(e, ""))?;
        rows.into_iter()
            .map(
                |(name, password, quota_bytes, forwards, keep_local_copy, enabled, deliver_to)| {
                    RawMailbox {
                        name,
                        password,
                        quota_bytes,
                        forwards,
                        keep_local_copy,
                        enabled,
                        deliver_to,
                    }
                    .into_mailbox()
                },
            )
            .collect()
    }
}

impl Userbase for MysqlUserbase {
    fn lookup(&self, address: &str) -> Result<Option<Mailbox>, UserbaseError> {
        let name = normalise_address(address)?;
        let catch_all = catch_all_for(&name).unwrap_or_else(|| name.clone());
        let found = self
            .select(q::LOOKUP, (name.as_str(), catch_all, name.as_str()).into())?
            .into_iter()
            .next();
        crate::resolve_catch_all(self, found)
    }

    fn get_mailbox(&self, name: &str) -> Result<Option<Mailbox>, UserbaseError> {
        let name = normalise_address(name)?;
        Ok(self.select(q::GET, (name,).into())?.into_iter().next())
    }

    fn virtual_domain(&self, listen: &SocketAddr) -> Result<Option<String>, UserbaseError> {
        let exact = listen.to_string();
        let wildcard = wildcard_listen(listen).to_string();
        self.conn()?
            .exec_first(
                q::VIRTUAL_DOMAIN,
                (exact.as_str(), wildcard, exact.as_str()),
            )
            .map_err(|e| self.error(e, ""))
    }

    fn add_mailbox(
        &self,
        name: &str,
        password: &str,
        quota_bytes: u64,
    ) -> Result<Mailbox, UserbaseError> {
        let name = normalise_address(name)?;
        let quota = check_quota(quota_bytes)?;
        self.execute(
            q::INSERT,
            (name.as_str(), password::hash(password), quota).into(),
            &name,
        )?;
        self.get_mailbox(&name)?.ok_or_else(|| {
            UserbaseError::Unavailable(format!("{name} vanished right after insert"))
        })
    }

    fn delete_mailbox(&self, name: &str) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        self.change(q::DELETE, (name.as_str(),).into(), &name)
    }

    fn set_password(&self, name: &str, password: &str) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        self.change(
            q::SET_PASSWORD,
            (password::hash(password), name.as_str()).into(),
            &name,
        )
    }

    fn set_quota(&self, name: &str, quota_bytes: u64) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        self.change(
            q::SET_QUOTA,
            (check_quota(quota_bytes)?, name.as_str()).into(),
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
        self.change(
            q::SET_FORWARDS,
            (text, keep_local_copy, name.as_str()).into(),
            &name,
        )
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), UserbaseError> {
        let name = normalise_address(name)?;
        self.change(q::SET_ENABLED, (enabled, name.as_str()).into(), &name)
    }

    fn set_deliver_to(&self, name: &str, target: Option<&str>) -> Result<(), UserbaseError> {
        let (name, target) = crate::check_deliver_to(name, target)?;
        self.change(q::SET_DELIVER_TO, (target, name.as_str()).into(), &name)
    }

    fn list_mailboxes(&self) -> Result<Vec<Mailbox>, UserbaseError> {
        self.select(q::LIST, Params::Empty)
    }

    fn add_virtual_server(&self, listen: &SocketAddr, domain: &str) -> Result<(), UserbaseError> {
        let domain = normalise_domain(domain)?;
        let listen = listen.to_string();
        self.execute(q::INSERT_VIRTUAL, (listen.as_str(), domain).into(), &listen)?;
        Ok(())
    }

    fn delete_virtual_server(&self, listen: &SocketAddr) -> Result<(), UserbaseError> {
        let listen = listen.to_string();
        self.change(q::DELETE_VIRTUAL, (listen.as_str(),).into(), &listen)
    }

    fn list_virtual_servers(&self) -> Result<Vec<VirtualServer>, UserbaseError> {
        let rows: Vec<(String, String)> = self
            .conn()?
            .query(q::LIST_VIRTUAL)
            .map_err(|e| self.error(e, ""))?;
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
        let lease_us = lease_ms * 1000;
        let insert = (mailbox.as_str(), holder, lease_us).into();
        match self.execute(q::lease::MYSQL_INSERT, insert, &mailbox) {
            Ok(_) => Ok(true),
            // A row exists: ours to take only if it has expired.
            Err(UserbaseError::Exists(_)) => {
                let takeover = (holder, lease_us, mailbox.as_str()).into();
                Ok(self.execute(q::lease::MYSQL_TAKEOVER, takeover, &mailbox)? == 1)
            }
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
        let params = (lease_ms * 1000, mailbox.as_str(), holder).into();
        // CLIENT_FOUND_ROWS: a renewal that lands on the same microsecond still counts.
        Ok(self.execute(q::lease::MYSQL_RENEW, params, &mailbox)? == 1)
    }

    fn lease_release(&self, mailbox: &str, holder: &str) -> Result<(), UserbaseError> {
        let mailbox = crate::lease::check(mailbox, holder, 1)?;
        self.execute(
            q::lease::RELEASE,
            (mailbox.as_str(), holder).into(),
            &mailbox,
        )?;
        Ok(())
    }

    fn leases_span_hosts(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_parameters_are_split_off() {
        let config = MysqlConfig::from_url(
            "mysql://u:p@h:3306/db?connect_timeout_ms=50&pool_max=3&prefer_socket=false&read_timeout_ms=7",
        )
        .expect("valid");
        assert_eq!(config.url, "mysql://u:p@h:3306/db?prefer_socket=false");
        assert_eq!(config.connect_timeout, Duration::from_millis(50));
        assert_eq!(config.read_timeout, Duration::from_millis(7));
        assert_eq!(config.pool_max, 3);
        assert_eq!(
            config.redacted(),
            "mysql://u:***@h:3306/db?prefer_socket=false"
        );
        assert!(config.opts().is_ok());
    }

    #[test]
    fn bad_parameters_are_invalid_url() {
        for url in [
            "mysql://h/db?pool_max=x",
            "mysql://h/db?read_timeout_ms=-1",
            "mysql://h/db?tls=maybe",
        ] {
            assert!(
                matches!(
                    MysqlConfig::from_url(url),
                    Err(UserbaseError::InvalidUrl(_))
                ),
                "{url}"
            );
        }
        let config = MysqlConfig::from_url("mysql://h/db?pool_min=5&pool_max=2").expect("parses");
        assert!(matches!(config.opts(), Err(UserbaseError::InvalidUrl(_))));
    }
}
