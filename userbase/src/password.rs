//! Password hashes in Dovecot's `{SCHEME}hash` form.
//!
//! Mailboxes migrate in from Dovecot, Postfix+Courier and hand-written SQL with whatever
//! scheme they had, so [`verify`] accepts the schemes Dovecot writes; new passwords are
//! always hashed with a modern scheme by [`hash`]. Every comparison of a computed hash with
//! a stored one is constant-time (the crates below do that for their schemes; `{PLAIN}` uses
//! `subtle`).
//!
//! | scheme                     | stored after the prefix          | implementation         |
//! |----------------------------|----------------------------------|------------------------|
//! | `{ARGON2ID}`, `{ARGON2I}`  | `$argon2id$v=19$m=..,t=..,p=..$` | `argon2` (RustCrypto)  |
//! | `{SHA512-CRYPT}`           | `$6$[rounds=N$]salt$hash`        | `pwhash`               |
//! | `{SHA256-CRYPT}`           | `$5$[rounds=N$]salt$hash`        | `pwhash`               |
//! | `{BLF-CRYPT}`              | `$2y$`/`$2b$`/`$2a$cost$...`      | `pwhash`               |
//! | `{MD5-CRYPT}`              | `$1$salt$hash`                   | `pwhash`               |
//! | `{CRYPT}`                  | any of the crypt forms above, or traditional 13-character DES | `pwhash` |
//! | `{PLAIN}`, `{CLEARTEXT}`   | the password itself              | `subtle`               |
//!
//! The scheme name is case-insensitive. A stored value without a `{SCHEME}` prefix is
//! treated as `{CRYPT}` (Dovecot's usual `default_pass_scheme` for SQL userdbs). Anything
//! else — an unknown scheme, an empty or malformed hash — never verifies.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use subtle::ConstantTimeEq;

/// The scheme [`hash`] writes.
pub const DEFAULT_SCHEME: &str = "ARGON2ID";

/// A stored value that no password verifies (unknown scheme): what [`hash`] returns in
/// the unreachable case that both hashing crates fail, so that the account is locked
/// rather than open.
pub const LOCKED: &str = "{LOCKED}!";

/// Hashes a new password with the default modern scheme: `{ARGON2ID}` with the `argon2`
/// crate's default (OWASP-recommended) parameters and a random 16-byte salt.
pub fn hash(pw: &str) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    match Argon2::default().hash_password(pw.as_bytes(), &salt) {
        Ok(phc) => format!("{{{DEFAULT_SCHEME}}}{phc}"),
        // Only reachable for a password longer than argon2's 4 GiB input limit; fall back to
        // the other modern scheme rather than fail.
        Err(err) => {
            log::warn!("argon2 hashing failed ({err}); using SHA512-CRYPT");
            sha512_crypt(pw).unwrap_or_else(|| LOCKED.to_string())
        }
    }
}

/// `{SHA512-CRYPT}` with a random salt and the default 5000 rounds (what
/// `doveadm pw -s SHA512-CRYPT` writes), for callers that need crypt(3) compatibility.
/// `None` only if the crate rejects the salt it generated itself.
pub fn sha512_crypt(pw: &str) -> Option<String> {
    match pwhash::sha512_crypt::hash(pw) {
        Ok(crypt) => Some(format!("{{SHA512-CRYPT}}{crypt}")),
        Err(err) => {
            log::error!("sha512_crypt failed: {err}");
            None
        }
    }
}

/// Checks `pw` against a stored `{SCHEME}hash` value. Returns false for a wrong password,
/// an unknown scheme, or a malformed hash.
pub fn verify(stored: &str, pw: &str) -> bool {
    let (scheme, hashed) = split_scheme(stored);
    match scheme.to_ascii_uppercase().as_str() {
        "PLAIN" | "CLEARTEXT" => bool::from(hashed.as_bytes().ct_eq(pw.as_bytes())),
        "ARGON2ID" => verify_argon2(hashed, "argon2id", pw),
        "ARGON2I" => verify_argon2(hashed, "argon2i", pw),
        "SHA512-CRYPT" => hashed.starts_with("$6$") && crypt_verify(hashed, pw),
        "SHA256-CRYPT" => hashed.starts_with("$5$") && crypt_verify(hashed, pw),
        "MD5-CRYPT" => hashed.starts_with("$1$") && crypt_verify(hashed, pw),
        "BLF-CRYPT" => {
            ["$2y$", "$2b$", "$2a$"]
                .iter()
                .any(|p| hashed.starts_with(p))
                && crypt_verify(hashed, pw)
        }
        "CRYPT" => crypt_verify(hashed, pw),
        _ => false,
    }
}

/// Splits `{SCHEME}rest`; no prefix means `CRYPT`.
fn split_scheme(stored: &str) -> (&str, &str) {
    if let Some(rest) = stored.strip_prefix('{') {
        if let Some((scheme, hashed)) = rest.split_once('}') {
            return (scheme, hashed);
        }
    }
    ("CRYPT", stored)
}

/// crypt(3)-family verification; pwhash compares in constant time.
fn crypt_verify(hashed: &str, pw: &str) -> bool {
    // An empty hash would make some crypt variants compare against an empty string.
    !hashed.is_empty() && pwhash::unix::verify(pw, hashed)
}

/// Argon2 verification of a PHC string whose algorithm must be `algorithm`; the crate
/// compares the outputs in constant time.
fn verify_argon2(hashed: &str, algorithm: &str, pw: &str) -> bool {
    let Ok(phc) = PasswordHash::new(hashed) else {
        return false;
    };
    phc.algorithm.as_str() == algorithm
        && Argon2::default()
            .verify_password(pw.as_bytes(), &phc)
            .is_ok()
}

#[cfg(test)]
mod tests {
    //! Fixed vectors from known implementations, so a regression in a crate or in our
    //! scheme parsing shows up: glibc crypt(3) via Python's `crypt` module, argon2-cffi and
    //! pyca/bcrypt.
    use super::*;

    /// The password behind every vector below except the DES ones.
    const PW: &str = "s3cr3t-Pässwörd";

    /// (stored value, password) pairs that must verify.
    const VECTORS: &[(&str, &str)] = &[
        ("{PLAIN}s3cr3t-Pässwörd", PW),
        ("{CLEARTEXT}s3cr3t-Pässwörd", PW),
        // python3: crypt.crypt('secret', 'ab')
        ("{CRYPT}abNANd1rDfiNc", "secret"),
        // python3: crypt.crypt('secret', '$1$abcdefgh')
        ("{CRYPT}$1$abcdefgh$cHJi5PXp/ki/ktXzqlk6I1", "secret"),
        ("{MD5-CRYPT}$1$saltsalt$7dS.0Sqj8FEHko7GAVTIq1", PW),
        ("{SHA256-CRYPT}$5$saltsalt$IzI7gXSCdXDa9qm3uGjs9L.Anjkvxj.pAm8vRrYBEz6", PW),
        (
            "{SHA512-CRYPT}$6$saltsalt$F9k9l2mQJsDf1uGl0cVIB6kU2W/Diy/bu04..X.a0a1u1J4qLHxPyZy1qQ5No.WVjze6t1To1ewPGAwX3P0wJ/",
            PW,
        ),
        (
            "{SHA512-CRYPT}$6$rounds=5000$usesomesillystri$TlTQnEbjsMwTVvhjjUdxkyNN7fwT77l4qSCIjUbLtSbLuXZXjZyIcpPIYdbSbewOeU5OCbhxvK8tK3BOQBBAb.",
            "secret",
        ),
        ("{BLF-CRYPT}$2b$05$abcdefghijklmnopqrstuue3k8Vzi3iWtq.6anUhFxHYvKWFGXxRG", PW),
        ("{BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuue3k8Vzi3iWtq.6anUhFxHYvKWFGXxRG", PW),
        // pyca/bcrypt: bcrypt.hashpw(pw, bcrypt.gensalt(rounds=5))
        ("{BLF-CRYPT}$2b$05$5oi0z9n.DlBdps98R1Om5.Qn1mVyyJ0w48aMDs4RAqTmb0AaNO/G6", PW),
        // argon2-cffi: PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1, type=ID)
        (
            "{ARGON2ID}$argon2id$v=19$m=1024,t=2,p=1$vTiz979gP7xcJQm8TImFww$foyvMIUdmQgFwC5SOP3qZO4xxO1gx9JDmnKAjWclFLk",
            PW,
        ),
        (
            "{ARGON2I}$argon2i$v=19$m=1024,t=2,p=1$mhGPCEZzuYKE38UBHIKDGA$wAnxN9V+tDENHAnjRwB0Gl7rnZWV3h3ZqSBuG2OYPQ0",
            PW,
        ),
        // No prefix: treated as {CRYPT}.
        ("$1$saltsalt$7dS.0Sqj8FEHko7GAVTIq1", PW),
        // Scheme names are case-insensitive.
        ("{md5-crypt}$1$saltsalt$7dS.0Sqj8FEHko7GAVTIq1", PW),
    ];

    #[test]
    fn known_vectors_verify() {
        for (stored, pw) in VECTORS {
            assert!(verify(stored, pw), "{stored} should verify");
        }
    }

    #[test]
    fn known_vectors_reject_wrong_password() {
        for (stored, pw) in VECTORS {
            assert!(
                !verify(stored, &format!("{pw}x")),
                "{stored} must reject a wrong password"
            );
            assert!(
                !verify(stored, ""),
                "{stored} must reject the empty password"
            );
        }
    }

    #[test]
    fn scheme_must_match_hash() {
        // A $1$ hash labelled as SHA512 and an argon2i hash labelled ARGON2ID are refused.
        assert!(!verify(
            "{SHA512-CRYPT}$1$saltsalt$7dS.0Sqj8FEHko7GAVTIq1",
            PW
        ));
        assert!(!verify(
            "{ARGON2ID}$argon2i$v=19$m=1024,t=2,p=1$mhGPCEZzuYKE38UBHIKDGA$wAnxN9V+tDENHAnjRwB0Gl7rnZWV3h3ZqSBuG2OYPQ0",
            PW
        ));
    }

    #[test]
    fn garbage_never_verifies() {
        for stored in [
            LOCKED,
            "",
            "{PLAIN",
            "{UNKNOWN}x",
            "{CRYPT}",
            "{ARGON2ID}",
            "{ARGON2ID}$argon2id$",
            "{SHA512-CRYPT}$6$",
        ] {
            assert!(!verify(stored, ""), "{stored:?}");
            assert!(!verify(stored, "x"), "{stored:?}");
        }
    }

    #[test]
    fn default_hash_is_modern_and_salted() {
        let a = hash(PW);
        let b = hash(PW);
        assert!(a.starts_with("{ARGON2ID}$argon2id$"), "{a}");
        assert_ne!(a, b, "salts differ");
        assert!(verify(&a, PW));
        assert!(!verify(&a, "wrong"));
    }

    #[test]
    fn sha512_crypt_round_trip() {
        let stored = sha512_crypt(PW).expect("hashes");
        assert!(stored.starts_with("{SHA512-CRYPT}$6$"), "{stored}");
        assert!(verify(&stored, PW));
    }
}
