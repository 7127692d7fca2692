//! The SQL both backends run, written once with positional `?` parameters.
//!
//! Keeping the statements in one place is what keeps SQLite and MySQL semantics identical;
//! every value travels as a bound parameter, never inside the SQL text.

/// Columns of a mailbox row, in the order [`crate::Mailbox`] is built from.
macro_rules! mailbox_columns {
    () => {
        "name, password, quota_bytes, forwards, keep_local_copy, enabled, deliver_to"
    };
}

/// Exact row or catch-all, exact first. Parameters: name, catch-all name, name.
pub(crate) const LOOKUP: &str = concat!(
    "SELECT ",
    mailbox_columns!(),
    " FROM mailboxes WHERE name = ? OR name = ? ORDER BY CASE WHEN name = ? THEN 0 ELSE 1 END LIMIT 1"
);
/// Exact row. Parameter: name.
pub(crate) const GET: &str = concat!(
    "SELECT ",
    mailbox_columns!(),
    " FROM mailboxes WHERE name = ?"
);
/// All rows. No parameters.
pub(crate) const LIST: &str = concat!(
    "SELECT ",
    mailbox_columns!(),
    " FROM mailboxes ORDER BY name"
);
/// Parameters: name, password hash, quota.
pub(crate) const INSERT: &str =
    "INSERT INTO mailboxes (name, password, quota_bytes) VALUES (?, ?, ?)";
/// Parameter: name.
pub(crate) const DELETE: &str = "DELETE FROM mailboxes WHERE name = ?";
/// Parameters: hash, name.
pub(crate) const SET_PASSWORD: &str =
    "UPDATE mailboxes SET password = ?, updated_at = CURRENT_TIMESTAMP WHERE name = ?";
/// Parameters: quota, name.
pub(crate) const SET_QUOTA: &str =
    "UPDATE mailboxes SET quota_bytes = ?, updated_at = CURRENT_TIMESTAMP WHERE name = ?";
/// Parameters: forwards text, keep_local_copy, name.
pub(crate) const SET_FORWARDS: &str =
    "UPDATE mailboxes SET forwards = ?, keep_local_copy = ?, updated_at = CURRENT_TIMESTAMP WHERE name = ?";
/// Parameters: deliver_to, name.
pub(crate) const SET_DELIVER_TO: &str =
    "UPDATE mailboxes SET deliver_to = ?, updated_at = CURRENT_TIMESTAMP WHERE name = ?";
/// Parameters: enabled, name.
pub(crate) const SET_ENABLED: &str =
    "UPDATE mailboxes SET enabled = ?, updated_at = CURRENT_TIMESTAMP WHERE name = ?";
/// Exact listen address or wildcard, exact first. Parameters: listen, wildcard, listen.
pub(crate) const VIRTUAL_DOMAIN: &str =
    "SELECT domain FROM virtual_servers WHERE listen = ? OR listen = ? \
     ORDER BY CASE WHEN listen = ? THEN 0 ELSE 1 END LIMIT 1";
/// Parameters: listen, domain.
pub(crate) const INSERT_VIRTUAL: &str =
    "INSERT INTO virtual_servers (listen, domain) VALUES (?, ?)";
/// Parameter: listen.
pub(crate) const DELETE_VIRTUAL: &str = "DELETE FROM virtual_servers WHERE listen = ?";
/// No parameters.
pub(crate) const LIST_VIRTUAL: &str = "SELECT listen, domain FROM virtual_servers ORDER BY listen";
/// Highest applied migration. No parameters.
pub(crate) const MAX_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM schema_version";
/// Parameters: version, description.
pub(crate) const RECORD_VERSION: &str =
    "INSERT INTO schema_version (version, description) VALUES (?, ?)";

/// Mailbox leases (`lease.rs`): the same four statements per dialect, because "now" is
/// spelled differently. Every "now" is the database's clock, never a host's.
pub(crate) mod lease {
    /// A new lease. Parameters: mailbox, holder, lease in microseconds.
    pub(crate) const MYSQL_INSERT: &str =
        "INSERT INTO mailbox_leases (mailbox, holder, expires_at) \
         VALUES (?, ?, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND)";
    /// Takes over an expired lease. Parameters: holder, lease in microseconds, mailbox.
    pub(crate) const MYSQL_TAKEOVER: &str = "UPDATE mailbox_leases \
         SET holder = ?, expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
         WHERE mailbox = ? AND expires_at <= UTC_TIMESTAMP(6)";
    /// Extends our own lease. Parameters: lease in microseconds, mailbox, holder.
    pub(crate) const MYSQL_RENEW: &str = "UPDATE mailbox_leases \
         SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
         WHERE mailbox = ? AND holder = ?";
    /// Unix milliseconds now, by SQLite's clock.
    macro_rules! sqlite_now_ms {
        () => {
            "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"
        };
    }
    /// SQLite twin of [`MYSQL_INSERT`]; the lease in milliseconds.
    pub(crate) const SQLITE_INSERT: &str = concat!(
        "INSERT INTO mailbox_leases (mailbox, holder, expires_at_ms) VALUES (?, ?, ",
        sqlite_now_ms!(),
        " + ?)"
    );
    /// SQLite twin of [`MYSQL_TAKEOVER`]; the lease in milliseconds.
    pub(crate) const SQLITE_TAKEOVER: &str = concat!(
        "UPDATE mailbox_leases SET holder = ?, expires_at_ms = ",
        sqlite_now_ms!(),
        " + ? WHERE mailbox = ? AND expires_at_ms <= ",
        sqlite_now_ms!()
    );
    /// SQLite twin of [`MYSQL_RENEW`]; the lease in milliseconds.
    pub(crate) const SQLITE_RENEW: &str = concat!(
        "UPDATE mailbox_leases SET expires_at_ms = ",
        sqlite_now_ms!(),
        " + ? WHERE mailbox = ? AND holder = ?"
    );
    /// Ends our own lease (both dialects). Parameters: mailbox, holder.
    pub(crate) const RELEASE: &str = "DELETE FROM mailbox_leases WHERE mailbox = ? AND holder = ?";
}

/// A mailbox row as the databases return it, before range checks.
pub(crate) struct RawMailbox {
    pub name: String,
    pub password: String,
    pub quota_bytes: i64,
    pub forwards: String,
    pub keep_local_copy: i64,
    pub enabled: i64,
    pub deliver_to: String,
}

impl RawMailbox {
    /// Checks the values a hand-written row could get wrong and builds the mailbox.
    pub(crate) fn into_mailbox(self) -> Result<crate::Mailbox, crate::UserbaseError> {
        let quota_bytes = u64::try_from(self.quota_bytes)
            .map_err(|_| crate::UserbaseError::Data(format!("negative quota for {}", self.name)))?;
        Ok(crate::Mailbox {
            forwards: crate::parse_forwards(&self.forwards),
            name: self.name,
            password_hash: self.password,
            quota_bytes,
            keep_local_copy: self.keep_local_copy != 0,
            enabled: self.enabled != 0,
            deliver_to: match self.deliver_to.trim() {
                "" => None,
                target => Some(target.to_string()),
            },
        })
    }
}
