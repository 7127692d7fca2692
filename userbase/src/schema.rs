//! Versioned schema migrations, one SQL list per database dialect.
//!
//! The schema is the public interface of the userbase (operators `INSERT` into it by hand),
//! so it only changes through numbered migrations, applied in order when a userbase is
//! opened and recorded in `schema_version`. Each migration is documented in
//! `userbase/SCHEMA.md`; both dialects must keep identical semantics.

/// One numbered schema change.
pub(crate) struct Migration {
    /// Strictly increasing, starting at 1; recorded in `schema_version.version`.
    pub version: u32,
    /// One line for `schema_version.description` and logs.
    pub description: &'static str,
    /// Statements for SQLite, run in one transaction.
    pub sqlite: &'static [&'static str],
    /// Statements for MySQL/MariaDB (DDL commits implicitly there, so each statement must
    /// be safe to re-run: `IF NOT EXISTS`).
    pub mysql: &'static [&'static str],
}

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 4;

/// Creates the bookkeeping table itself (not a numbered migration).
pub(crate) const SQLITE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)";

/// MySQL twin of [`SQLITE_VERSION_TABLE`].
pub(crate) const MYSQL_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version INT UNSIGNED NOT NULL PRIMARY KEY,
    description VARCHAR(255) NOT NULL,
    applied_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin";

/// Every migration, in order.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "mailboxes table",
        sqlite: &["CREATE TABLE IF NOT EXISTS mailboxes (
            name TEXT NOT NULL PRIMARY KEY CHECK (name = lower(trim(name)) AND length(name) BETWEEN 3 AND 254),
            password TEXT NOT NULL,
            quota_bytes INTEGER NOT NULL DEFAULT 0 CHECK (quota_bytes >= 0),
            forwards TEXT NOT NULL DEFAULT '',
            keep_local_copy INTEGER NOT NULL DEFAULT 0 CHECK (keep_local_copy IN (0, 1)),
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
            updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"],
        mysql: &["CREATE TABLE IF NOT EXISTS mailboxes (
            name VARCHAR(254) NOT NULL PRIMARY KEY,
            password VARCHAR(255) NOT NULL,
            quota_bytes BIGINT NOT NULL DEFAULT 0,
            forwards VARCHAR(4096) NOT NULL DEFAULT '',
            keep_local_copy TINYINT(1) NOT NULL DEFAULT 0,
            enabled TINYINT(1) NOT NULL DEFAULT 1,
            created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
            updated_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
            CONSTRAINT mailboxes_name_normalised CHECK (name = LOWER(TRIM(name)) AND CHAR_LENGTH(name) >= 3),
            CONSTRAINT mailboxes_quota_non_negative CHECK (quota_bytes >= 0),
            CONSTRAINT mailboxes_keep_local_copy_bool CHECK (keep_local_copy IN (0, 1)),
            CONSTRAINT mailboxes_enabled_bool CHECK (enabled IN (0, 1))
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"],
    },
    Migration {
        version: 2,
        description: "virtual_servers table",
        sqlite: &["CREATE TABLE IF NOT EXISTS virtual_servers (
            listen TEXT NOT NULL PRIMARY KEY,
            domain TEXT NOT NULL CHECK (domain = lower(trim(domain)) AND length(domain) BETWEEN 1 AND 253),
            created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"],
        mysql: &["CREATE TABLE IF NOT EXISTS virtual_servers (
            listen VARCHAR(64) NOT NULL PRIMARY KEY,
            domain VARCHAR(253) NOT NULL,
            created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
            CONSTRAINT virtual_servers_domain_normalised CHECK (domain = LOWER(TRIM(domain)) AND CHAR_LENGTH(domain) >= 1)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"],
    },
    Migration {
        version: 3,
        description: "mailboxes.deliver_to for catch-all rows",
        sqlite: &["ALTER TABLE mailboxes ADD COLUMN deliver_to TEXT NOT NULL DEFAULT ''"],
        // MariaDB's IF NOT EXISTS keeps the statement safe to re-run.
        mysql: &["ALTER TABLE mailboxes ADD COLUMN IF NOT EXISTS deliver_to VARCHAR(254) NOT NULL DEFAULT ''"],
    },
    Migration {
        version: 4,
        description: "mailbox_leases table (the [IN-USE] lock across hosts)",
        // Unix milliseconds of the database's clock (see `lease.rs`).
        sqlite: &["CREATE TABLE IF NOT EXISTS mailbox_leases (
            mailbox TEXT NOT NULL PRIMARY KEY,
            holder TEXT NOT NULL CHECK (length(holder) BETWEEN 1 AND 128),
            expires_at_ms INTEGER NOT NULL)"],
        // UTC_TIMESTAMP(6) of the database server, whatever its time zone.
        mysql: &["CREATE TABLE IF NOT EXISTS mailbox_leases (
            mailbox VARCHAR(254) NOT NULL PRIMARY KEY,
            holder VARCHAR(128) NOT NULL,
            expires_at DATETIME(6) NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_dense_and_end_at_schema_version() {
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version as usize, index + 1);
            assert!(!migration.sqlite.is_empty() && !migration.mysql.is_empty());
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(SCHEMA_VERSION));
    }
}
