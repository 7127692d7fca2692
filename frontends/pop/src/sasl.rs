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

/// Decodes a PLAIN response (`=` is the empty response) into the
/// authentication identity and the password. An authorisation identity other
/// than empty or the authentication identity is refused (no proxy logins).
pub fn decode_plain(response: &[u8]) -> Option<(String, String)> {
    let raw = if response == b"=" {
        Vec::new()
    } else {
        base64_decode(response)?
    };
    if raw.len() > PLAIN_MAX_BYTES {
        return None;
    }
    let text = String::from_utf8(raw).ok()?;
    let mut parts = text.split('\0');
    let (authz, authc, pass) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || authc.is_empty() || (!authz.is_empty() && authz != authc) {
        return None;
    }
    Some((authc.to_string(), pass.to_string()))
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
            Some(("tim".into(), "tanstaaftanstaaf".into()))
        );
        // "tim\0tim\0pw": authzid equal to authcid is fine.
        assert_eq!(
            decode_plain(b"dGltAHRpbQBwdw=="),
            Some(("tim".into(), "pw".into()))
        );
        // "bob\0tim\0pw": acting as someone else is not.
        assert_eq!(decode_plain(b"Ym9iAHRpbQBwdw=="), None);
        assert_eq!(decode_plain(b"="), None);
        assert_eq!(decode_plain(b"not base64"), None);
    }
}
