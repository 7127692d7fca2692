//! Choosing a userbase from one configuration string.
//!
//! Daemons and `ppadmin` all take a single `userbase = "..."` setting; this is where its
//! forms are defined.

use crate::{MysqlConfig, MysqlUserbase, SqliteConfig, SqliteUserbase, Userbase, UserbaseError};

/// Opens a userbase from a URL and applies pending schema migrations:
///
/// * `sqlite:///abs/path.db` — absolute path (three slashes);
/// * `sqlite://relative.db` — path relative to the current directory;
/// * `mysql://user:pass@host:port/db[?params]` — see [`MysqlConfig`] for the parameters.
///
/// Fails with `InvalidUrl` for another scheme or a malformed URL, and `Unavailable` if the
/// database cannot be reached or opened.
pub fn open(url: &str) -> Result<Box<dyn Userbase>, UserbaseError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(UserbaseError::InvalidUrl(format!("{url}: no file name")));
        }
        return Ok(Box::new(SqliteUserbase::open(SqliteConfig::new(path))?));
    }
    if url.starts_with("mysql://") {
        return Ok(Box::new(MysqlUserbase::open(MysqlConfig::from_url(url)?)?));
    }
    Err(UserbaseError::InvalidUrl(format!(
        "{url}: expected sqlite:// or mysql://"
    )))
}

/// Opens a userbase for a daemon: like [`open`], but a MySQL server that is down does
/// not fail it. The connection is made on first use and retried on every call until
/// the server answers (calls fail with `Unavailable` meanwhile), and the schema is
/// migrated only when `migrate` is true; otherwise an older schema is `Unavailable`
/// until `ppadmin userbase migrate` ran. SQLite is a local file: opened (and migrated)
/// at once, as by [`open`].
pub fn open_lazy(url: &str, migrate: bool) -> Result<Box<dyn Userbase>, UserbaseError> {
    if url.starts_with("mysql://") {
        let config = MysqlConfig::from_url(url)?;
        return Ok(Box::new(MysqlUserbase::open_lazy(config, migrate)?));
    }
    open(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_schemes_are_rejected() {
        for url in ["", "postgres://x/y", "sqlite:", "sqlite://", "/tmp/x.db"] {
            assert!(
                matches!(open(url), Err(UserbaseError::InvalidUrl(_))),
                "{url:?}"
            );
        }
    }
}
