//! The checks every frontend's configuration must pass (powersmtp and
//! powerpop share the `FrontendSettings` block, so they share these tests):
//! each daemon's unit tests call them with its example file and its parser.

use std::fmt::Display;

/// The example file with a MySQL userbase whose password, the backend
/// secret and the admin token are all distinctive strings.
pub fn with_secrets(example: &str) -> String {
    let text = example
        .replace(
            "userbase = \"sqlite:///var/lib/powermail/userbase.db\"",
            "userbase = \"mysql://pm:Pw-7f3a@db.example:3306/mail?password=Qp-91c2&pool_max=4\"",
        )
        .replace(
            "secret = \"0123456789abcdef0123\"",
            "secret = \"Sx-backend-5e1d-secret\"",
        )
        .replace(
            "admin_token = \"change-me-admin\"",
            "admin_token = \"Tk-admin-88b0\"",
        );
    assert!(text.contains("Pw-7f3a") && text.contains("Sx-backend") && text.contains("Tk-admin"));
    text
}

/// `/config` (`public_json`, as text) shows no password, secret or token,
/// while the secret itself still loads (`secret`).
pub fn config_json_hides_every_secret<C, E: Display>(
    example: &str,
    parse: impl Fn(&str) -> Result<C, E>,
    secret: impl Fn(&C) -> Vec<u8>,
    public_json: impl Fn(&C) -> String,
) {
    let text = with_secrets(example);
    let cfg = match parse(&text) {
        Ok(c) => c,
        Err(e) => panic!("example with secrets does not parse: {e}"),
    };
    assert_eq!(secret(&cfg), b"Sx-backend-5e1d-secret");
    let json = public_json(&cfg);
    for secret in ["Pw-7f3a", "Qp-91c2", "Sx-backend", "Tk-admin"] {
        assert!(!json.contains(secret), "{secret} in /config: {json}");
    }
    assert!(
        json.contains("mysql://pm:***@db.example:3306/mail"),
        "{json}"
    );
    assert!(json.contains("\"backend_pool\"") && json.contains("\"admin_listen\""));
}

/// Two backends with one name are refused.
pub fn duplicate_backend_name_refused<C, E: Display>(
    example: &str,
    parse: impl Fn(&str) -> Result<C, E>,
) {
    let dup = format!("{example}\n[[backend]]\nname = \"b0\"\naddr = \"127.0.0.1:7999\"\n");
    match parse(&dup) {
        Ok(_) => panic!("two backends named b0 accepted"),
        Err(err) => assert!(err.to_string().contains("used more than once"), "{err}"),
    }
}

/// Unknown keys are refused at the top (neither the daemon's nor the shared
/// block's) and in the shared tables, and a value of the wrong type too.
pub fn unknown_keys_refused_at_top_and_in_tables<C, E: Display>(
    example: &str,
    parse: impl Fn(&str) -> Result<C, E>,
) {
    let top = format!("bogus_key = 1\n{example}");
    match parse(&top) {
        Ok(_) => panic!("unknown top-level key accepted"),
        Err(err) => assert!(err.to_string().contains("bogus_key"), "{err}"),
    }
    let cache = example.replace("[userbase_cache]\n", "[userbase_cache]\nbogus_ttl = 1\n");
    assert_ne!(cache, example);
    assert!(parse(&cache).is_err(), "unknown key in [userbase_cache]");
    let pool = example.replace("[backend_pool]\n", "[backend_pool]\nbogus_ms = 1\n");
    assert_ne!(pool, example);
    assert!(parse(&pool).is_err(), "unknown key in [backend_pool]");
    let typed = example.replace(
        "admin_connections_max = 128",
        "admin_connections_max = \"x\"",
    );
    assert_ne!(typed, example);
    assert!(parse(&typed).is_err(), "a string for a count");
}

/// The three checks above as `#[test]` functions, for a frontend's `config.rs`
/// test module: `frontend_config_tests!(EXAMPLE_TEXT, Config)`, where `Config`
/// has `parse(&str)`, `secret()` and `public_json()`.
#[macro_export]
macro_rules! frontend_config_tests {
    ($example:expr, $config:ty) => {
        #[test]
        fn config_json_hides_every_secret() {
            $crate::frontend_config::config_json_hides_every_secret(
                $example,
                <$config>::parse,
                |c| c.secret().expect("secret loads"),
                |c| c.public_json().to_string(),
            );
        }

        #[test]
        fn duplicate_backend_name_refused() {
            $crate::frontend_config::duplicate_backend_name_refused($example, <$config>::parse);
        }

        #[test]
        fn unknown_keys_refused_at_top_and_in_tables() {
            $crate::frontend_config::unknown_keys_refused_at_top_and_in_tables(
                $example,
                <$config>::parse,
            );
        }
    };
}
