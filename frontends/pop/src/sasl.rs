//! SASL PLAIN (RFC 4616) as used by POP3 AUTH (RFC 5034): a base64 message
//! `authzid NUL authcid NUL passwd`. A small strict base64 decoder lives here
//! rather than a dependency: this is its only use.

/// Longest decoded PLAIN message accepted, in bytes.
const PLAIN_MAX_BYTES: usize = 1024;

fn sextet(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// Decodes standard, padded base64; `None` on any malformation.
pub fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() & 3 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.len() / 4;
    for (q, quad) in text.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return None;
        }
        let mut v: u32 = 0;
        for &c in &quad[..4 - pad] {
            v = (v << 6) | sextet(c)?;
        }
        v <<= 6 * pad as u32;
        let bytes = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Whether `field` may travel as (part of) one protocol line: no CR, LF or
/// NUL anywhere. Every login field is checked with this before it is used,
/// relayed or logged as a name (see docs/SECURITY.md, "Injection").
pub fn is_line_safe(field: &str) -> bool {
    !field.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// Why a PLAIN response was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlainError {
    /// Not base64, too long, not UTF-8, wrong number of fields, or an
    /// authorisation identity other than the user.
    Malformed,
    /// Well-formed, but a field holds CR or LF: a login attempt that must
    /// fail (and count as one). Carries the identity as decoded, for the
    /// throttle's key; it must never be written anywhere unescaped.
    LineBreak(String),
}

/// Decodes a PLAIN response (`=` is the empty response) into the
/// authentication identity and the password. An authorisation identity other
/// than empty or the authentication identity is refused (no proxy logins), and
/// so is CR or LF in any field (NUL is the separator, so a fourth field is
/// malformed).
pub fn decode_plain(response: &[u8]) -> Result<(String, String), PlainError> {
    let raw = if response == b"=" {
        Vec::new()
    } else {
        base64_decode(response).ok_or(PlainError::Malformed)?
    };
    if raw.len() > PLAIN_MAX_BYTES {
        return Err(PlainError::Malformed);
    }
    let text = String::from_utf8(raw).map_err(|_| PlainError::Malformed)?;
    let mut parts = text.split('\0');
    let (Some(authz), Some(authc), Some(pass)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(PlainError::Malformed);
    };
    if parts.next().is_some() || authc.is_empty() || (!authz.is_empty() && authz != authc) {
        return Err(PlainError::Malformed);
    }
    if !(is_line_safe(authz) && is_line_safe(authc) && is_line_safe(pass)) {
        return Err(PlainError::LineBreak(authc.to_string()));
    }
    Ok((authc.to_string(), pass.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors() {
        // RFC 4648 §10.
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_decode(enc.as_bytes()).unwrap(), plain.as_bytes());
        }
        for bad in ["Zg", "Zg=a", "Z===", "Zg==Zg==", "Zm9v!A==", "===="] {
            assert!(base64_decode(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn plain_messages() {
        // "\0tim\0tanstaaftanstaaf" from RFC 4616.
        assert_eq!(
            decode_plain(b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm"),
            Ok(("tim".into(), "tanstaaftanstaaf".into()))
        );
        // "tim\0tim\0pw": authzid equal to authcid is fine.
        assert_eq!(
            decode_plain(b"dGltAHRpbQBwdw=="),
            Ok(("tim".into(), "pw".into()))
        );
        // "bob\0tim\0pw": acting as someone else is not.
        assert_eq!(
            decode_plain(b"Ym9iAHRpbQBwdw=="),
            Err(PlainError::Malformed)
        );
        assert_eq!(decode_plain(b"="), Err(PlainError::Malformed));
        assert_eq!(decode_plain(b"not base64"), Err(PlainError::Malformed));
    }

    fn b64(raw: &[u8]) -> Vec<u8> {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        for c in raw.chunks(3) {
            let v = c
                .iter()
                .enumerate()
                .fold(0u32, |v, (i, &b)| v | (b as u32) << (16 - 8 * i));
            for i in 0..4 {
                out.push(if i <= c.len() {
                    ABC[(v >> (18 - 6 * i)) as usize & 63]
                } else {
                    b'='
                });
            }
        }
        out
    }

    #[test]
    fn line_breaks_in_any_field_are_refused() {
        for raw in [
            &b"\0old\r\nDELE 1\0pw"[..],
            b"\0old\0wrong\r\nPASS secret",
            b"\0old\0wrong\rPASS secret",
            b"\0old\nNOOP\0pw",
            b"old\r\0old\r\0pw",
        ] {
            assert!(
                matches!(decode_plain(&b64(raw)), Err(PlainError::LineBreak(_))),
                "{raw:?}"
            );
        }
        // A NUL inside a field is a fourth field: malformed.
        assert_eq!(
            decode_plain(&b64(b"\0old\0pw\0DELE 1")),
            Err(PlainError::Malformed)
        );
        assert_eq!(
            decode_plain(&b64(b"\0old\0p w")),
            Ok(("old".into(), "p w".into()))
        );
        assert!(!is_line_safe("a\0b") && !is_line_safe("a\rb") && is_line_safe("a b"));
    }
}
