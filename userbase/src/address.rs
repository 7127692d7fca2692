//! Mailbox names: one canonical spelling per mailbox.
//!
//! Addresses arrive from SMTP envelopes, POP3 logins, `ppadmin` and hand-written SQL in
//! every mix of case and surrounding blanks. The database compares names byte for byte,
//! so everything is normalised here first; that is also what keeps a `*` or `%` typed by a
//! client from ever acting as a pattern.

use crate::UserbaseError;

/// Longest address accepted, in bytes (RFC 5321's path limit minus the angle brackets).
pub const MAX_ADDRESS_BYTES: usize = 254;

/// The local part that marks a catch-all row (`*@domain`).
const CATCH_ALL_LOCAL: &str = "*";

/// Normalises an address: trimmed, lower-case, exactly one `@` with a non-empty local part
/// and domain, at most [`MAX_ADDRESS_BYTES`] bytes, and no control characters, blanks,
/// `/`, `,` or NUL. `*` is allowed only as the whole local part (a catch-all row,
/// `*@domain`), never in the domain or mixed with other characters.
///
/// Fails with [`UserbaseError::InvalidName`] naming the problem.
pub fn normalise_address(s: &str) -> Result<String, UserbaseError> {
    let name = s.trim().to_lowercase();
    let invalid = |why: &str| {
        Err(UserbaseError::InvalidName(format!(
            "{why}: {:?}",
            truncate(&name)
        )))
    };
    if name.len() > MAX_ADDRESS_BYTES {
        return invalid("longer than 254 bytes");
    }
    if let Some(bad) = name
        .chars()
        .find(|&c| c.is_control() || c.is_whitespace() || matches!(c, '/' | ',' | '\0'))
    {
        return invalid(&format!("contains forbidden character {bad:?}"));
    }
    let Some((local, domain)) = name.split_once('@') else {
        return invalid("no '@'");
    };
    if domain.contains('@') {
        return invalid("more than one '@'");
    }
    if local.is_empty() || domain.is_empty() {
        return invalid("empty local part or domain");
    }
    if domain.contains('*') || (local.contains('*') && local != CATCH_ALL_LOCAL) {
        return invalid("'*' is only allowed as the whole local part of a catch-all");
    }
    Ok(name)
}

/// True if a normalised name is a catch-all row (`*@domain`).
pub fn is_catch_all(name: &str) -> bool {
    name.split_once('@')
        .is_some_and(|(local, _)| local == CATCH_ALL_LOCAL)
}

/// The catch-all row name for a normalised address.
pub(crate) fn catch_all_for(name: &str) -> Option<String> {
    let (_, domain) = name.split_once('@')?;
    Some(format!("{CATCH_ALL_LOCAL}@{domain}"))
}

/// Keeps error messages short even for hostile input.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_blanks() {
        assert_eq!(
            normalise_address("  Info@Company.BIZ \n").expect("valid"),
            "info@company.biz"
        );
        assert_eq!(
            normalise_address("*@Company.biz").expect("valid"),
            "*@company.biz"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "@",
            "a@",
            "@b",
            "ab",
            "a@b@c",
            "a b@c",
            "a@b c",
            "a\0@b",
            "a/b@c",
            "a@b/c",
            "a,b@c",
            "a\t@b",
            "**@b",
            "a*@b",
            "a@*",
            "a@b*",
            "x\u{7f}@b",
        ] {
            assert!(
                matches!(normalise_address(bad), Err(UserbaseError::InvalidName(_))),
                "{bad:?} should be invalid"
            );
        }
    }

    #[test]
    fn length_limit() {
        let ok = format!("{}@b.c", "a".repeat(MAX_ADDRESS_BYTES - 4));
        assert!(normalise_address(&ok).is_ok());
        let long = format!("{}@b.c", "a".repeat(MAX_ADDRESS_BYTES - 3));
        assert!(normalise_address(&long).is_err());
    }

    #[test]
    fn sql_metacharacters_are_just_characters() {
        let name = normalise_address("x';DROP_TABLE%\"\\@a.b").expect("valid");
        assert_eq!(name, "x';drop_table%\"\\@a.b");
    }

    #[test]
    fn catch_all_helpers() {
        assert!(is_catch_all("*@a.b"));
        assert!(!is_catch_all("a@a.b"));
        assert_eq!(catch_all_for("a@a.b").as_deref(), Some("*@a.b"));
    }
}
