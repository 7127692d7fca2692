//! Replies from a backend: `+OK <text>` or `-ERR [CODE] <text>`.
//!
//! The bracketed code is the contract (frontends branch on it, operators grep
//! for it); the text is for people. Codes are modelled on RFC 2449 response
//! codes.

use std::fmt;

/// The machine-readable reason in a `-ERR [CODE]` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not authenticated, or the proof was wrong.
    Auth,
    /// A syntax error or a command not valid in this state.
    Proto,
    /// A mailbox name or message id failed validation.
    BadName,
    /// No such message or mailbox.
    NotFound,
    /// The backend is read-only: PUT refused, everything else still works.
    ReadOnly,
    /// A message over the configured size limit.
    TooBig,
    /// Some other configured limit was hit (connections, recipients, ...).
    Limit,
    /// A temporary failure (I/O error, disk full); retry elsewhere or later.
    Temp,
    /// The client aborted the PUT it was sending.
    Aborted,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Auth => "AUTH",
            ErrorCode::Proto => "PROTO",
            ErrorCode::BadName => "BADNAME",
            ErrorCode::NotFound => "NOTFOUND",
            ErrorCode::ReadOnly => "READONLY",
            ErrorCode::TooBig => "TOOBIG",
            ErrorCode::Limit => "LIMIT",
            ErrorCode::Temp => "TEMP",
            ErrorCode::Aborted => "ABORTED",
        }
    }

    /// Parses a wire code; unknown codes are `None` (a newer backend).
    pub fn parse(s: &str) -> Option<ErrorCode> {
        Some(match s {
            "AUTH" => ErrorCode::Auth,
            "PROTO" => ErrorCode::Proto,
            "BADNAME" => ErrorCode::BadName,
            "NOTFOUND" => ErrorCode::NotFound,
            "READONLY" => ErrorCode::ReadOnly,
            "TOOBIG" => ErrorCode::TooBig,
            "LIMIT" => ErrorCode::Limit,
            "TEMP" => ErrorCode::Temp,
            "ABORTED" => ErrorCode::Aborted,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reply line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK <text>`.
    Ok(String),
    /// `-ERR [CODE] <text>`; `code` is `None` for a code this build does not know.
    Err(Option<ErrorCode>, String),
}

impl Reply {
    /// Parses one reply line (without its line ending). `None` if it is
    /// neither `+OK` nor `-ERR`.
    pub fn parse(line: &str) -> Option<Reply> {
        if let Some(rest) = line.strip_prefix("+OK") {
            return Some(Reply::Ok(rest.trim_start().to_string()));
        }
        let rest = line.strip_prefix("-ERR")?.trim_start();
        if let Some(inner) = rest.strip_prefix('[') {
            if let Some(end) = inner.find(']') {
                let code = ErrorCode::parse(&inner[..end]);
                return Some(Reply::Err(code, inner[end + 1..].trim_start().to_string()));
            }
        }
        Some(Reply::Err(None, rest.to_string()))
    }
}

/// Formats an error reply line, CRLF included.
pub fn err_line(code: ErrorCode, text: &str) -> String {
    format!("-ERR [{code}] {text}\r\n")
}

/// Formats a success reply line, CRLF included.
pub fn ok_line(text: &str) -> String {
    if text.is_empty() {
        "+OK\r\n".to_string()
    } else {
        format!("+OK {text}\r\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        assert_eq!(Reply::parse("+OK 3 12"), Some(Reply::Ok("3 12".into())));
        assert_eq!(Reply::parse("+OK"), Some(Reply::Ok(String::new())));
        let l = err_line(ErrorCode::ReadOnly, "backend is read-only");
        assert_eq!(
            Reply::parse(l.trim_end()),
            Some(Reply::Err(
                Some(ErrorCode::ReadOnly),
                "backend is read-only".into()
            ))
        );
        assert_eq!(
            Reply::parse("-ERR [NEWCODE] x"),
            Some(Reply::Err(None, "x".into()))
        );
        assert_eq!(Reply::parse("hello"), None);
    }
}
