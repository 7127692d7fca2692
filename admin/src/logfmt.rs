//! Safe values for the `key=value` log lines every daemon writes.
//!
//! Operators parse these lines with the tools they use for Postfix and
//! Dovecot logs: one record per line, fields separated by spaces, a value
//! either a bare token or a double-quoted string with backslash escapes. A
//! value the client chose (a user name, an EHLO name, an address, a remote
//! server's error text) must not be able to end the line, start a field of
//! its own or break the quoting. [`kv`] renders any value so it cannot:
//!
//! * a non-empty value made only of printable ASCII other than space, `"`,
//!   `\` and `=` is written as it is (`user=bob@example.org`);
//! * anything else is written between double quotes, with `\"`, `\\`, `\r`,
//!   `\n`, `\t` for those bytes and `\xNN` for every other control byte and
//!   every byte of a non-ASCII character (`user="a b\r\nstatus=ok"`);
//! * the empty value is `""`;
//! * at most [`LOG_VALUE_MAX_BYTES`] bytes of the value are written; a
//!   longer one is cut and ends in `...` inside the quotes.
//!
//! The output is plain ASCII, so every record is exactly one line.

use std::fmt;

/// Longest part of one value written to a log line, in bytes.
pub const LOG_VALUE_MAX_BYTES: usize = 512;

/// A value rendered safely for a `key=value` log line; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct LogValue<'a>(&'a [u8]);

/// Wraps `value` (text or bytes) for a `key=value` log line:
/// `log::info!("user={}", kv(user))`.
pub fn kv<T: AsRef<[u8]> + ?Sized>(value: &T) -> LogValue<'_> {
    LogValue(value.as_ref())
}

/// Whether `b` may appear in a value written without quotes.
fn is_bare(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'=')
}

impl fmt::Display for LogValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cut = self.0.len() > LOG_VALUE_MAX_BYTES;
        let value = &self.0[..self.0.len().min(LOG_VALUE_MAX_BYTES)];
        if !value.is_empty() && !cut && value.iter().all(|&b| is_bare(b)) {
            // Only printable ASCII: valid UTF-8 by construction.
            return f.write_str(std::str::from_utf8(value).map_err(|_| fmt::Error)?);
        }
        f.write_str("\"")?;
        for &b in value {
            match b {
                b'"' => f.write_str("\\\"")?,
                b'\\' => f.write_str("\\\\")?,
                b'\r' => f.write_str("\\r")?,
                b'\n' => f.write_str("\\n")?,
                b'\t' => f.write_str("\\t")?,
                b' ' => f.write_str(" ")?,
                b if b.is_ascii_graphic() => write!(f, "{}", b as char)?,
                b => write!(f, "\\x{b:02x}")?,
            }
        }
        if cut {
            f.write_str("...")?;
        }
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> String {
        kv(v).to_string()
    }

    #[test]
    fn plain_values_stay_bare() {
        assert_eq!(s("bob@example.org"), "bob@example.org");
        assert_eq!(s("<a.b+c@x.org>"), "<a.b+c@x.org>");
        assert_eq!(s("127.0.0.1:25"), "127.0.0.1:25");
        assert_eq!(s("-"), "-");
    }

    #[test]
    fn hostile_values_are_quoted_and_escaped() {
        for (value, want) in [
            ("", "\"\""),
            ("a b", "\"a b\""),
            ("x\r\nstatus=sent", "\"x\\r\\nstatus=sent\""),
            ("a=b", "\"a=b\""),
            ("say \"hi\"", "\"say \\\"hi\\\"\""),
            ("back\\slash", "\"back\\\\slash\""),
            ("nul\0bell\x07del\x7f", "\"nul\\x00bell\\x07del\\x7f\""),
            ("tab\there", "\"tab\\there\""),
            ("é", "\"\\xc3\\xa9\""),
            ("\u{2028}line sep", "\"\\xe2\\x80\\xa8line sep\""),
        ] {
            assert_eq!(s(value), want, "{value:?}");
        }
        // Invalid UTF-8 bytes too.
        assert_eq!(kv(&b"a\xffb"[..]).to_string(), "\"a\\xffb\"");
    }

    #[test]
    fn output_is_one_line_of_ascii_and_parses_back() {
        let hostile = "u\"s\\e r=1\r\n\0\u{85}é";
        let out = s(hostile);
        assert!(
            out.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
            "{out}"
        );
        // Undo the escaping as a log parser would.
        let inner = out.strip_prefix('"').unwrap().strip_suffix('"').unwrap();
        let mut back = Vec::new();
        let mut it = inner.bytes();
        while let Some(b) = it.next() {
            if b != b'\\' {
                back.push(b);
                continue;
            }
            match it.next().unwrap() {
                b'r' => back.push(b'\r'),
                b'n' => back.push(b'\n'),
                b't' => back.push(b'\t'),
                b'x' => {
                    let hex = [it.next().unwrap(), it.next().unwrap()];
                    let hex = std::str::from_utf8(&hex).unwrap();
                    back.push(u8::from_str_radix(hex, 16).unwrap());
                }
                other => back.push(other),
            }
        }
        assert_eq!(back, hostile.as_bytes());
    }

    #[test]
    fn long_values_are_cut() {
        let long = "a".repeat(LOG_VALUE_MAX_BYTES + 1);
        let out = s(&long);
        assert_eq!(out.len(), LOG_VALUE_MAX_BYTES + 5, "quotes and ...");
        assert!(out.starts_with("\"aaa") && out.ends_with("a...\""));
        assert_eq!(s(&long[1..]), long[1..]);
    }
}
