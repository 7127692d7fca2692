//! The userbase: the single source of truth about mailboxes.
//!
//! Every frontend (SMTP in, POP3 out) asks this crate two questions — "does this address
//! exist, and where does its mail go?" and "is this the right password?" — and the operator
//! changes the answers with `ppadmin` or with plain SQL. Adding a working mailbox is ONE
//! SQL `INSERT` (see `userbase/README.md`): every other column has a default.
//!
//! Two implementations sit behind the [`Userbase`] trait, with the same schema
//! (`userbase/SCHEMA.md`) and the same test suite:
//!
//! * SQLite ([`SqliteUserbase`]) — embedded, a single file, nothing to install;
//! * MySQL/MariaDB ([`MysqlUserbase`]) — production, shared by every frontend host.
//!
//! [`open`] picks one from a URL. [`CachedUserbase`] wraps either with a bounded,
//! time-limited cache, because frontends look up the same few addresses over and over.
//!
//! Failure is never confused with absence: a database that is down, slow or broken gives
//! [`UserbaseError::Unavailable`] (frontends answer with a temporary 4xx), never `Ok(None)`
//! (which would make SMTP bounce mail for a mailbox that exists).
//!
//! ```no_run
//! let ub = powermail_userbase::open("sqlite:///var/lib/powermail/userbase.db")?;
//! ub.add_mailbox("info@company.biz", "secret", 0)?;
//! assert!(ub.authenticate("Info@Company.biz", "secret")?.is_some());
//! # Ok::<(), powermail_userbase::UserbaseError>(())
//! ```

#![deny(missing_docs)]

mod address;
mod cache;
mod error;
mod lease;
mod mysql;
pub mod password;
mod queries;
mod schema;
mod sqlite;
mod url;

pub use address::{is_catch_all, normalise_address, MAX_ADDRESS_BYTES};
pub use cache::{CacheConfig, CacheStats, CachedUserbase, Clock, SystemClock};
pub use error::UserbaseError;
pub use lease::{LEASE_HOLDER_MAX_BYTES, LEASE_MAX_MS};
pub use mysql::{MysqlConfig, MysqlUserbase};
pub use schema::SCHEMA_VERSION;
pub use sqlite::{SqliteConfig, SqliteUserbase};
pub use url::{open, open_lazy};

use std::net::SocketAddr;

/// Longest forwards list accepted, in bytes of its stored text form (comma-separated).
pub const MAX_FORWARDS_BYTES: usize = 4096;

/// Largest quota that can be stored: both databases keep it in a signed 64-bit column.
pub const MAX_QUOTA_BYTES: u64 = i64::MAX as u64;

/// One mailbox, as stored in the `mailboxes` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// Normalised full address, lower-case (`info@company.biz`), or `*@domain` for a
    /// catch-all row.
    pub name: String,
    /// Password hash in Dovecot `{SCHEME}...` form; see [`password::verify`].
    pub password_hash: String,
    /// Quota in bytes; 0 means unlimited.
    pub quota_bytes: u64,
    /// Addresses mail is forwarded to; empty means "deliver locally only".
    pub forwards: Vec<String>,
    /// With forwards: also keep a copy in this mailbox. Ignored when `forwards` is empty
    /// (mail is then always delivered locally).
    pub keep_local_copy: bool,
    /// A disabled mailbox neither receives nor authenticates; callers decide what to answer.
    pub enabled: bool,
    /// Catch-all rows only: the mailbox that receives mail for addresses of the domain
    /// that have no row of their own (column `deliver_to`, `''` = none). [`Userbase::lookup`]
    /// follows it and returns that mailbox. Ignored on other rows.
    pub deliver_to: Option<String>,
}

/// A listening address mapped to the domain that unqualified user names belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    /// The address a frontend listens on, e.g. `127.0.0.1:1110`.
    pub listen: SocketAddr,
    /// The default domain for logins on that address, e.g. `server1.example`.
    pub domain: String,
}

/// The questions frontends ask and the changes the operator makes.
///
/// Every method fails with [`UserbaseError::Unavailable`] when the database cannot answer;
/// `Ok(None)` always means "the database answered: there is no such thing".
/// Names are normalised with [`normalise_address`] before use, so look-ups are
/// case-insensitive and invalid names fail with [`UserbaseError::InvalidName`].
pub trait Userbase: Send + Sync {
    /// The mailbox for `address`: the exact row, else the catch-all row `*@domain`.
    /// An enabled catch-all with a `deliver_to` is followed: the named mailbox is
    /// returned (its quota, forwards and flags apply); a `deliver_to` naming no
    /// mailbox, or another catch-all, is [`UserbaseError::Data`] (frontends answer
    /// with a temporary error until the row is fixed, they never bounce the mail).
    /// Disabled mailboxes are returned with `enabled == false`; the caller decides.
    /// `Ok(None)` means no such mailbox and no catch-all.
    fn lookup(&self, address: &str) -> Result<Option<Mailbox>, UserbaseError>;

    /// The row named exactly `name` (no catch-all fallback); `Ok(None)` if absent.
    fn get_mailbox(&self, name: &str) -> Result<Option<Mailbox>, UserbaseError>;

    /// Checks a login. Returns the mailbox if `address` names an existing, enabled,
    /// non-catch-all mailbox and `password` matches its hash (compared in constant time);
    /// `Ok(None)` if the mailbox is unknown, disabled, or the password is wrong.
    fn authenticate(
        &self,
        address: &str,
        password: &str,
    ) -> Result<Option<Mailbox>, UserbaseError> {
        let name = match normalise_address(address) {
            Ok(name) if !is_catch_all(&name) => name,
            // A name that cannot exist cannot log in; that is an answer, not a failure.
            _ => return Ok(None),
        };
        Ok(self.get_mailbox(&name)?.filter(|mailbox| {
            mailbox.enabled && password::verify(&mailbox.password_hash, password)
        }))
    }

    /// The default domain for a listening address (e.g. `127.0.0.1:1110` →
    /// `server1.example`). An exact row wins; else a row for the unspecified address
    /// (`0.0.0.0` or `[::]`) on the same port; else `Ok(None)`.
    fn virtual_domain(&self, listen: &SocketAddr) -> Result<Option<String>, UserbaseError>;

    /// Creates a mailbox with the password hashed by [`password::hash`]. Fails with
    /// [`UserbaseError::Exists`] if the name is taken.
    fn add_mailbox(
        &self,
        name: &str,
        password: &str,
        quota_bytes: u64,
    ) -> Result<Mailbox, UserbaseError>;

    /// Deletes a mailbox row (not its stored mail). [`UserbaseError::NotFound`] if absent.
    fn delete_mailbox(&self, name: &str) -> Result<(), UserbaseError>;

    /// Replaces the password (hashed by [`password::hash`]). `NotFound` if absent.
    fn set_password(&self, name: &str, password: &str) -> Result<(), UserbaseError>;

    /// Sets the quota in bytes (0 = unlimited). `NotFound` if absent, `InvalidValue` above
    /// [`MAX_QUOTA_BYTES`].
    fn set_quota(&self, name: &str, quota_bytes: u64) -> Result<(), UserbaseError>;

    /// Replaces the forwards (each normalised; an empty list stops forwarding).
    /// `NotFound` if absent, `InvalidName` for a bad target, `InvalidValue` if the list is
    /// longer than [`MAX_FORWARDS_BYTES`].
    fn set_forwards(
        &self,
        name: &str,
        forwards: Vec<String>,
        keep_local_copy: bool,
    ) -> Result<(), UserbaseError>;

    /// Enables or disables a mailbox. `NotFound` if absent.
    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), UserbaseError>;

    /// Sets (or with `None` clears) where the catch-all row `name` (`*@domain`)
    /// delivers: an ordinary mailbox. `InvalidName` if `name` is not a catch-all or
    /// `target` is one, `NotFound` if the row is absent. The target's existence is
    /// checked at delivery (see [`Userbase::lookup`]).
    fn set_deliver_to(&self, name: &str, target: Option<&str>) -> Result<(), UserbaseError>;

    /// Every mailbox, sorted by name.
    fn list_mailboxes(&self) -> Result<Vec<Mailbox>, UserbaseError>;

    /// Maps a listening address to a default domain. `Exists` if the address is mapped.
    fn add_virtual_server(&self, listen: &SocketAddr, domain: &str) -> Result<(), UserbaseError>;

    /// Removes a mapping. `NotFound` if absent.
    fn delete_virtual_server(&self, listen: &SocketAddr) -> Result<(), UserbaseError>;

    /// Every mapping, sorted by listening address text.
    fn list_virtual_servers(&self) -> Result<Vec<VirtualServer>, UserbaseError>;

    /// Takes the lease on `mailbox` for `holder` (at most [`LEASE_HOLDER_MAX_BYTES`]) for
    /// `lease_ms` milliseconds of the database's clock (1 to [`LEASE_MAX_MS`]): `Ok(true)`
    /// when there was no lease or only an expired one, `Ok(false)` while another holder's
    /// lease runs. Two holders can never both get `true` (see the `lease` module).
    /// `Unavailable` when the database cannot answer: the caller must not go ahead.
    fn lease_take(&self, mailbox: &str, holder: &str, lease_ms: u64)
        -> Result<bool, UserbaseError>;

    /// Extends `holder`'s lease on `mailbox` to `lease_ms` from now. `Ok(false)` when
    /// `holder` no longer has it (expired and taken over, or deleted by hand).
    fn lease_renew(
        &self,
        mailbox: &str,
        holder: &str,
        lease_ms: u64,
    ) -> Result<bool, UserbaseError>;

    /// Ends `holder`'s lease on `mailbox` (nothing happens if it has none).
    fn lease_release(&self, mailbox: &str, holder: &str) -> Result<(), UserbaseError>;

    /// Whether leases are seen by other hosts: true for MySQL/MariaDB (a server every host
    /// shares), false for SQLite (a local file: one host only, its frontends lock with
    /// `flock` instead).
    fn leases_span_hosts(&self) -> bool;
}

/// Follows an enabled catch-all row's `deliver_to` (one step: the target must be an
/// ordinary mailbox). Used by every implementation's `lookup`.
pub(crate) fn resolve_catch_all<U: Userbase + ?Sized>(
    userbase: &U,
    found: Option<Mailbox>,
) -> Result<Option<Mailbox>, UserbaseError> {
    let Some(row) = found else {
        return Ok(None);
    };
    let target = match &row.deliver_to {
        Some(target) if row.enabled && is_catch_all(&row.name) => target,
        _ => return Ok(Some(row)),
    };
    let broken = |why: &str| {
        UserbaseError::Data(format!(
            "catch-all {} delivers to {target:?}, which {why}",
            row.name
        ))
    };
    let name = normalise_address(target).map_err(|_| broken("is not an address"))?;
    if is_catch_all(&name) {
        return Err(broken("is a catch-all itself"));
    }
    match userbase.get_mailbox(&name)? {
        Some(mailbox) => Ok(Some(mailbox)),
        None => Err(broken("does not exist")),
    }
}

/// Checks a `set_deliver_to` call; returns (catch-all name, stored target text).
pub(crate) fn check_deliver_to(
    name: &str,
    target: Option<&str>,
) -> Result<(String, String), UserbaseError> {
    let name = normalise_address(name)?;
    if !is_catch_all(&name) {
        return Err(UserbaseError::InvalidName(format!(
            "deliver_to is for catch-all rows (*@domain), not {name}"
        )));
    }
    let target = match target {
        None => String::new(),
        Some(t) => {
            let t = normalise_address(t)?;
            if is_catch_all(&t) {
                return Err(UserbaseError::InvalidName(format!(
                    "a catch-all cannot deliver to a catch-all: {t}"
                )));
            }
            t
        }
    };
    Ok((name, target))
}

/// Checks a quota against what the databases can store.
pub(crate) fn check_quota(quota_bytes: u64) -> Result<i64, UserbaseError> {
    i64::try_from(quota_bytes).map_err(|_| {
        UserbaseError::InvalidValue(format!(
            "quota {quota_bytes} exceeds {MAX_QUOTA_BYTES} bytes"
        ))
    })
}

/// Normalises a domain name for the `virtual_servers` table (same rules as the domain of an
/// address).
pub(crate) fn normalise_domain(domain: &str) -> Result<String, UserbaseError> {
    let address = normalise_address(&format!("x@{domain}"))?;
    Ok(address[2..].to_string())
}

/// Turns the stored forwards text (comma- or newline-separated) into a list.
pub(crate) fn parse_forwards(text: &str) -> Vec<String> {
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|target| !target.is_empty())
        .map(str::to_string)
        .collect()
}

/// Validates forwards and renders them in their stored text form.
pub(crate) fn render_forwards(forwards: &[String]) -> Result<String, UserbaseError> {
    let mut targets = Vec::with_capacity(forwards.len());
    for target in forwards {
        let target = normalise_address(target)?;
        if is_catch_all(&target) {
            return Err(UserbaseError::InvalidName(format!(
                "cannot forward to a catch-all: {target}"
            )));
        }
        targets.push(target);
    }
    let text = targets.join(",");
    if text.len() > MAX_FORWARDS_BYTES {
        return Err(UserbaseError::InvalidValue(format!(
            "forwards list is {} bytes, limit {MAX_FORWARDS_BYTES}",
            text.len()
        )));
    }
    Ok(text)
}

/// The unspecified address on the same port, used as the fallback virtual server.
pub(crate) fn wildcard_listen(listen: &SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = match listen {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, listen.port())
}

/// Parses a `listen` column value.
pub(crate) fn parse_listen(text: &str) -> Result<SocketAddr, UserbaseError> {
    text.parse().map_err(|_| {
        UserbaseError::Data(format!(
            "virtual_servers.listen is not an ip:port: {text:?}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_round_trip() {
        let text = render_forwards(&["A@B.c".into(), " d@e.f ".into()]).expect("valid");
        assert_eq!(text, "a@b.c,d@e.f");
        assert_eq!(parse_forwards("a@b.c,\n d@e.f\n\n"), vec!["a@b.c", "d@e.f"]);
        assert!(render_forwards(&["*@x.y".into()]).is_err());
        assert!(render_forwards(&["nonsense".into()]).is_err());
    }

    #[test]
    fn forwards_bounded() {
        let many: Vec<String> = (0..1000).map(|i| format!("user{i}@example.org")).collect();
        assert!(matches!(
            render_forwards(&many),
            Err(UserbaseError::InvalidValue(_))
        ));
    }

    #[test]
    fn wildcard_keeps_port_and_family() {
        let v4: SocketAddr = "127.0.0.1:1110".parse().expect("addr");
        assert_eq!(wildcard_listen(&v4).to_string(), "0.0.0.0:1110");
        let v6: SocketAddr = "[::1]:25".parse().expect("addr");
        assert_eq!(wildcard_listen(&v6).to_string(), "[::]:25");
    }

    #[test]
    fn quota_bound() {
        assert_eq!(check_quota(0).expect("ok"), 0);
        assert!(check_quota(u64::MAX).is_err());
    }
}
