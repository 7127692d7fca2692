//! Mailbox names and message ids: the only strings that ever become parts of
//! a path on a backend.
//!
//! Both are validated here, once, in the shared crate, so that the frontend
//! that builds a request and the backend that serves it agree byte for byte
//! on what is acceptable. A value of type [`MailboxName`] or [`MessageId`] is
//! proof that the check ran: code that builds paths takes these types, never
//! `&str`.

use std::fmt;

/// Longest mailbox name, in bytes. ext4 allows 255-byte file names; an
/// address is at most 254 octets (RFC 5321 §4.5.3.1.3 path limit minus `<>`).
pub const MAILBOX_NAME_MAX_BYTES: usize = 254;

/// Longest message id, in bytes.
pub const MESSAGE_ID_MAX_BYTES: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or longer than the limit.
    #[error("name length {0} out of range")]
    Length(usize),
    /// A byte that may not appear (control, space, `/`, `\`, NUL, ...).
    #[error("forbidden byte 0x{0:02x} in name")]
    ForbiddenByte(u8),
    /// Not of the form `local@domain` with exactly one `@`.
    #[error("mailbox name must be local@domain")]
    NotAnAddress,
    /// A leading dot, which would hide the entry or make `.`/`..`.
    #[error("name may not start with '.'")]
    LeadingDot,
    /// Not valid UTF-8.
    #[error("name is not UTF-8")]
    NotUtf8,
}

/// A validated, normalised (lower-case) mailbox name such as `info@company.biz`.
///
/// Invariant: 1..=254 bytes of UTF-8, exactly one `@` with a non-empty part on
/// each side, no ASCII control characters, space, `/`, `\`, `"` or NUL, and no
/// leading `.`. Safe to use as one path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxName(String);

impl MailboxName {
    /// Validates and lower-cases `raw`.
    ///
    /// Fails with a [`NameError`] saying which rule was broken.
    pub fn parse(raw: &str) -> Result<MailboxName, NameError> {
        let len = raw.len();
        if len == 0 || len > MAILBOX_NAME_MAX_BYTES {
            return Err(NameError::Length(len));
        }
        for &b in raw.as_bytes() {
            if b < 0x21 || b == 0x7f || b == b'/' || b == b'\\' || b == b'"' {
                return Err(NameError::ForbiddenByte(b));
            }
        }
        if raw.starts_with('.') {
            return Err(NameError::LeadingDot);
        }
        let mut parts = raw.split('@');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(local), Some(domain), None) if !local.is_empty() && !domain.is_empty() => {}
            _ => return Err(NameError::NotAnAddress),
        }
        let name = raw.to_lowercase();
        // Unicode lower-casing can change the length; re-check the bound.
        if name.len() > MAILBOX_NAME_MAX_BYTES {
            return Err(NameError::Length(name.len()));
        }
        Ok(MailboxName(name))
    }

    /// Like [`MailboxName::parse`], from raw bytes off the wire.
    pub fn parse_bytes(raw: &[u8]) -> Result<MailboxName, NameError> {
        let s = std::str::from_utf8(raw).map_err(|_| NameError::NotUtf8)?;
        MailboxName::parse(s)
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MailboxName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated message id: the file name of a message on every backend, and
/// its POP3 UIDL.
///
/// Invariant: 1..=64 bytes from `[A-Za-z0-9._-]`, not starting with `.`.
/// Ids made by [`MessageId::generate`] sort by arrival time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(String);

impl MessageId {
    /// Validates `raw` (case is kept: ids are compared exactly).
    pub fn parse(raw: &str) -> Result<MessageId, NameError> {
        let len = raw.len();
        if len == 0 || len > MESSAGE_ID_MAX_BYTES {
            return Err(NameError::Length(len));
        }
        if let Some(&b) = raw
            .as_bytes()
            .iter()
            .find(|&&b| !(b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'))
        {
            return Err(NameError::ForbiddenByte(b));
        }
        if raw.starts_with('.') {
            return Err(NameError::LeadingDot);
        }
        Ok(MessageId(raw.to_string()))
    }

    /// Like [`MessageId::parse`], from raw bytes off the wire.
    pub fn parse_bytes(raw: &[u8]) -> Result<MessageId, NameError> {
        let s = std::str::from_utf8(raw).map_err(|_| NameError::NotUtf8)?;
        MessageId::parse(s)
    }

    /// A new id, unique across the system as long as `frontend_id` is unique
    /// per frontend process and `counter` never repeats within it: the time in
    /// microseconds (16 hex digits, so ids sort by time), the frontend id and
    /// the counter.
    ///
    /// `frontend_id` is reduced to its id-safe characters and 16 bytes.
    pub fn generate(unix_time_us: u64, frontend_id: &str, counter: u64) -> MessageId {
        let frontend: String = frontend_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(16)
            .collect();
        let id = format!("{unix_time_us:016x}.{frontend}.{counter:x}");
        debug_assert!(MessageId::parse(&id).is_ok());
        MessageId(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_names_are_normalised() {
        let n = MailboxName::parse("Info@Company.BIZ").unwrap();
        assert_eq!(n.as_str(), "info@company.biz");
        assert!(MailboxName::parse("a+tag@b.c").is_ok());
        assert!(MailboxName::parse("o'brien@b.c").is_ok());
    }

    #[test]
    fn hostile_mailbox_names_are_refused() {
        let long = format!("{}@b.c", "a".repeat(300));
        let cases: &[&str] = &[
            "",
            "../../etc/passwd@x",
            "a/b@c",
            "..@x",
            ".hidden@x",
            "a\0b@c",
            "a b@c",
            "a\r\n@c",
            "noat",
            "a@b@c",
            "@b",
            "a@",
            "a\\b@c",
            "a\"b@c",
            &long,
        ];
        for c in cases {
            assert!(MailboxName::parse(c).is_err(), "accepted {c:?}");
        }
        assert_eq!(MailboxName::parse_bytes(b"\xff@x"), Err(NameError::NotUtf8));
    }

    #[test]
    fn message_ids() {
        assert!(MessageId::parse("0001.f1.1").is_ok());
        for bad in ["", ".x", "a/b", "a b", "..", "a\0", &"x".repeat(65)] {
            assert!(MessageId::parse(bad).is_err(), "accepted {bad:?}");
        }
        let a = MessageId::generate(1, "smtp/1 x", 7);
        let b = MessageId::generate(2, "smtp/1 x", 0);
        assert_eq!(a.as_str(), "0000000000000001.smtp1x.7");
        assert!(a < b, "ids sort by time");
    }
}
