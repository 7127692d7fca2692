//! Shared-secret authentication of a backend connection.
//!
//! A backend must never be an open file server, and the secret must never
//! cross the wire: the greeting carries a fresh random nonce, and the client
//! proves it knows the secret with HMAC-SHA256(secret, "PPL/1 " + nonce).
//! The backend checks the proof in constant time.
//!
//! Every process reads the secret with [`load_secret`], so pplistener, the
//! frontends and ppadmin derive the same key from the same configuration.

use std::io::Read;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Bytes of randomness in a greeting nonce.
pub const NONCE_BYTES: usize = 16;

/// A fresh random nonce, hex encoded.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn mac(secret: &[u8], nonce: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(crate::VERSION.as_bytes());
    mac.update(b" ");
    mac.update(nonce.as_bytes());
    mac
}

/// The proof a client sends in `AUTH <proof>`, hex encoded.
pub fn proof(secret: &[u8], nonce: &str) -> String {
    hex::encode(mac(secret, nonce).finalize().into_bytes())
}

/// Whether `proof_hex` proves knowledge of `secret` for `nonce`
/// (constant-time comparison).
pub fn verify(secret: &[u8], nonce: &str, proof_hex: &str) -> bool {
    match hex::decode(proof_hex) {
        Ok(bytes) => mac(secret, nonce).verify_slice(&bytes).is_ok(),
        Err(_) => false,
    }
}

/// Shortest secret accepted, in bytes (after trimming).
pub const SECRET_MIN_BYTES: usize = 16;
/// Longest secret file read, in bytes.
pub const SECRET_FILE_MAX_BYTES: u64 = 4096;

/// Why the backend secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Neither or both of `secret` and `secret_file` are set.
    #[error("set exactly one of secret and secret_file")]
    NotExactlyOne,
    /// The secret file could not be read.
    #[error("secret_file {path}: {source}")]
    Read {
        /// The file named in the configuration.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// The secret file is larger than [`SECRET_FILE_MAX_BYTES`].
    #[error("secret_file {0}: longer than {SECRET_FILE_MAX_BYTES} bytes")]
    FileTooLong(PathBuf),
    /// Fewer than [`SECRET_MIN_BYTES`] bytes once trimmed.
    #[error("the secret must be at least {SECRET_MIN_BYTES} bytes (it has {0} after trimming)")]
    TooShort(usize),
}

/// The one rule for the backend secret, used by pplistener, both frontends
/// and ppadmin: exactly one of `inline` (the `secret` setting) and `file`
/// (`secret_file`) is given; leading and trailing ASCII whitespace (space,
/// tab, CR, LF, form feed) is removed from either, so `echo secret > file`,
/// a CRLF file and a pasted value with a stray space all give the same key;
/// what remains is the key, and must be at least [`SECRET_MIN_BYTES`] long.
/// Whitespace inside the secret is kept.
pub fn load_secret(inline: Option<&str>, file: Option<&Path>) -> Result<Vec<u8>, SecretError> {
    let raw = match (inline, file) {
        (Some(s), None) => s.as_bytes().to_vec(),
        (None, Some(path)) => read_secret_file(path)?,
        _ => return Err(SecretError::NotExactlyOne),
    };
    let key = raw.trim_ascii().to_vec();
    if key.len() < SECRET_MIN_BYTES {
        return Err(SecretError::TooShort(key.len()));
    }
    Ok(key)
}

fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    let read_error = |source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut raw = Vec::new();
    file.take(SECRET_FILE_MAX_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(read_error)?;
    if raw.len() as u64 > SECRET_FILE_MAX_BYTES {
        return Err(SecretError::FileTooLong(path.to_path_buf()));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_secret_rule_for_inline_values_and_files() {
        let want = b"0123456789 abcdef".to_vec();
        let dir = std::env::temp_dir().join(format!("pm-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, text) in [
            "0123456789 abcdef",
            "0123456789 abcdef\n",
            "0123456789 abcdef\r\n",
            "  \t0123456789 abcdef \r\n\n",
        ]
        .iter()
        .enumerate()
        {
            let path = dir.join(format!("s{i}"));
            std::fs::write(&path, text).unwrap();
            assert_eq!(load_secret(None, Some(&path)).unwrap(), want, "{text:?}");
            assert_eq!(load_secret(Some(text), None).unwrap(), want, "{text:?}");
        }
        let short = dir.join("short");
        std::fs::write(&short, "  0123456789abcde\n").unwrap();
        assert!(matches!(
            load_secret(None, Some(&short)),
            Err(SecretError::TooShort(15))
        ));
        let long = dir.join("long");
        std::fs::write(&long, vec![b'x'; SECRET_FILE_MAX_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            load_secret(None, Some(&long)),
            Err(SecretError::FileTooLong(_))
        ));
        assert!(matches!(
            load_secret(None, Some(&dir.join("missing"))),
            Err(SecretError::Read { .. })
        ));
        assert!(matches!(
            load_secret(None, None),
            Err(SecretError::NotExactlyOne)
        ));
        assert!(matches!(
            load_secret(Some("0123456789abcdef"), Some(&short)),
            Err(SecretError::NotExactlyOne)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proof_verifies_only_with_the_right_secret_and_nonce() {
        let n = new_nonce();
        assert_eq!(n.len(), NONCE_BYTES * 2);
        let p = proof(b"s3cret", &n);
        assert!(verify(b"s3cret", &n, &p));
        assert!(!verify(b"other", &n, &p));
        assert!(!verify(b"s3cret", &new_nonce(), &p));
        assert!(!verify(b"s3cret", &n, "zz"));
        assert!(!verify(b"s3cret", &n, ""));
    }
}
