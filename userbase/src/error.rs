//! Errors of the userbase.
//!
//! The one distinction that matters to frontends is [`UserbaseError::Unavailable`] (the
//! database could not answer: say "try again later") versus everything else (the question
//! itself was wrong). "No such mailbox" is not an error at all but `Ok(None)`.

/// What can go wrong when asking or changing the userbase.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UserbaseError {
    /// The database is down, timed out, refused us, or its file is unreadable or corrupt.
    /// Frontends answer with a temporary failure (SMTP 4xx, POP3 `-ERR [SYS/TEMP]`).
    #[error("userbase unavailable: {0}")]
    Unavailable(String),
    /// The address is not a valid mailbox name (see [`crate::normalise_address`]).
    #[error("invalid mailbox name: {0}")]
    InvalidName(String),
    /// A value other than a name is out of range (quota, forwards list length, ...).
    #[error("invalid value: {0}")]
    InvalidValue(String),
    /// A mailbox or virtual server with this name already exists.
    #[error("already exists: {0}")]
    Exists(String),
    /// The mailbox or virtual server to change does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The userbase URL given to [`crate::open`] cannot be understood.
    #[error("invalid userbase URL: {0}")]
    InvalidUrl(String),
    /// The database schema is newer than this program, or a migration failed.
    #[error("userbase schema: {0}")]
    Schema(String),
    /// A stored row holds a value this program cannot read (e.g. a negative quota).
    #[error("bad data in userbase: {0}")]
    Data(String),
}

impl UserbaseError {
    /// True for failures a caller should retry later rather than report as final.
    pub fn is_temporary(&self) -> bool {
        matches!(self, UserbaseError::Unavailable(_))
    }
}
