//! Mailbox leases: the `[IN-USE]` lock of POP3 sessions, shared by every host that uses
//! the same database.
//!
//! One row of `mailbox_leases` per locked mailbox: the mailbox, the holder (one id per
//! process: host, pid and a random part) and when the lease ends, by the **database's**
//! clock (hosts' clocks never enter). The primary key on `mailbox` is what makes two
//! holders impossible: taking is one `INSERT` (a duplicate key means "held"), or one
//! `UPDATE ... WHERE expires_at <= now` of an expired row, each a single atomic statement.
//! A holder renews well before the end ([`Userbase::lease_renew`]) and deletes its row
//! when the session ends; a holder that died simply stops renewing, and its row may be
//! taken over once it expired. No `GET_LOCK()`: it is per server connection and Galera
//! does not replicate it; a row is replicated like any other write.
//!
//! [`Userbase::lease_renew`]: crate::Userbase::lease_renew

use crate::{normalise_address, UserbaseError};

/// Longest holder id, in bytes (the column is `VARCHAR(128)`).
pub const LEASE_HOLDER_MAX_BYTES: usize = 128;

/// Longest lease accepted, in milliseconds (one hour): a lease is a crash bound, and a
/// longer one would keep a dead host's mailbox locked for longer than anyone would wait.
pub const LEASE_MAX_MS: u64 = 3_600_000;

/// Checks the arguments of a lease call; returns the normalised mailbox name.
pub(crate) fn check(mailbox: &str, holder: &str, lease_ms: u64) -> Result<String, UserbaseError> {
    let mailbox = normalise_address(mailbox)?;
    if holder.is_empty() || holder.len() > LEASE_HOLDER_MAX_BYTES {
        return Err(UserbaseError::InvalidValue(format!(
            "lease holder id is {} bytes, must be 1 to {LEASE_HOLDER_MAX_BYTES}",
            holder.len()
        )));
    }
    if lease_ms == 0 || lease_ms > LEASE_MAX_MS {
        return Err(UserbaseError::InvalidValue(format!(
            "lease of {lease_ms} ms, must be 1 to {LEASE_MAX_MS}"
        )));
    }
    Ok(mailbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_bounded() {
        assert_eq!(
            check("Bob@Example.org", "h:1:ab", 1000).expect("valid"),
            "bob@example.org"
        );
        assert!(check("bob@example.org", "", 1000).is_err());
        assert!(check("bob@example.org", &"x".repeat(129), 1000).is_err());
        assert!(check("bob@example.org", "h", 0).is_err());
        assert!(check("bob@example.org", "h", LEASE_MAX_MS + 1).is_err());
        assert!(check("no at sign", "h", 1000).is_err());
    }
}
