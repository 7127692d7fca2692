//! Shared-secret authentication of a backend connection.
//!
//! A backend must never be an open file server, and the secret must never
//! cross the wire: the greeting carries a fresh random nonce, and the client
//! proves it knows the secret with HMAC-SHA256(secret, "PPL/1 " + nonce).
//! The backend checks the proof in constant time.

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

#[cfg(test)]
mod tests {
    use super::*;

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
