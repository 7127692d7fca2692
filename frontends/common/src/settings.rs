//! Configuration pieces every frontend has in the same form: the TLS
//! certificate, the userbase cache, and [`FrontendSettings`], the block of
//! keys both daemons' files share (PROXY sources, userbase, secret, backends;
//! the admin-port keys are [`powermail_admin::AdminSettings`], flattened beside it).
//! One definition, so `powersmtp.toml` and `powerpop.toml` cannot drift apart.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::config::{validate_backends, BackendListError, BackendSpec, PoolConfig};

/// A certificate and key (STARTTLS / STLS / implicit TLS).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl TlsSettings {
    /// Loads the certificate and key into a rustls server configuration.
    pub fn load(&self) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
        let open = |p: &PathBuf| {
            std::fs::File::open(p)
                .map(std::io::BufReader::new)
                .with_context(|| format!("opening {}", p.display()))
        };
        let certs = rustls_pemfile::certs(&mut open(&self.cert_file)?)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {}", self.cert_file.display()))?;
        if certs.is_empty() {
            bail!("no certificate in {}", self.cert_file.display());
        }
        let key = rustls_pemfile::private_key(&mut open(&self.key_file)?)
            .with_context(|| format!("reading {}", self.key_file.display()))?
            .with_context(|| format!("no private key in {}", self.key_file.display()))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(std::sync::Arc::new(cfg))
    }
}

/// How long userbase answers are reused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// A found mailbox is reused this long (a changed password keeps working
    /// for up to this long).
    pub positive_ttl_ms: u64,
    /// "No such mailbox" is reused this long.
    pub negative_ttl_ms: u64,
    /// Most cached answers.
    pub max_entries: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            positive_ttl_ms: 30_000,
            negative_ttl_ms: 5_000,
            max_entries: 10_000,
        }
    }
}

/// The block of keys powersmtp and powerpop share, at the top level of
/// either daemon's TOML file (`#[serde(flatten)]` into the daemon's own
/// `Config`, next to [`powermail_admin::AdminSettings`]; serde cannot nest
/// one flatten inside another under `deny_unknown_fields`): the
/// PROXY-protocol sources, the userbase, the
/// backend secret, the pool and the backends. One set of defaults, one
/// [`check`](Self::check), one [`public_json`](Self::public_json).
///
/// It is not `deny_unknown_fields` itself (serde does not combine that with
/// `flatten`): the daemon's outer struct is, and refuses every key that
/// neither it nor this block takes.
#[derive(Debug, Clone, Deserialize)]
pub struct FrontendSettings {
    /// Load balancers trusted to send a PROXY protocol header (v1 or v2),
    /// as CIDR blocks or addresses. Connections from them must start with
    /// one; its client address is then what the daemon sees (logs, Received
    /// headers, throttling, virtual servers). From anyone else a PROXY header
    /// is refused. Default: none.
    #[serde(default)]
    pub proxy_from: Vec<String>,
    /// Time a trusted balancer has to send its PROXY header, in ms.
    #[serde(default = "crate::proxy::default_timeout_ms")]
    pub proxy_timeout_ms: u64,
    /// Userbase URL: `sqlite:///path.db` or `mysql://user:pass@host/db`.
    pub userbase: String,
    /// MySQL: bring the userbase schema up to date at the first connection. Default
    /// false: migrations are run by `ppadmin userbase migrate`, and an older schema
    /// is answered with a temporary error until then. (SQLite is always migrated at
    /// start: an embedded file, as `powermail up` uses it.)
    #[serde(default)]
    pub userbase_migrate: bool,
    /// The userbase look-up cache.
    #[serde(default)]
    pub userbase_cache: CacheSettings,
    /// Shared backend secret; either this or `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    /// File holding the backend secret (trailing whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Backend health checks and connection pools.
    #[serde(default)]
    pub backend_pool: PoolConfig,
    /// The backends (`[[backend]]` tables).
    #[serde(rename = "backend")]
    pub backends: Vec<BackendSpec>,
}

/// Why a [`FrontendSettings`] block is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The `[[backend]]` list (empty, an empty name, a name used twice).
    #[error(transparent)]
    Backends(#[from] BackendListError),
    /// Neither or both of `secret` and `secret_file`.
    #[error("set exactly one of secret and secret_file")]
    Secret,
}

impl FrontendSettings {
    /// The checks every frontend makes of this block: a valid backend list
    /// ([`validate_backends`]) and exactly one of `secret` and `secret_file`.
    pub fn check(&self) -> Result<(), SettingsError> {
        validate_backends(&self.backends)?;
        if self.secret.is_none() == self.secret_file.is_none() {
            return Err(SettingsError::Secret);
        }
        Ok(())
    }

    /// The backend secret, by the rule all PowerMail processes share
    /// ([`powermail_proto::auth::load_secret`]); fails when the file cannot
    /// be read or the secret is too short.
    pub fn secret(&self) -> Result<Vec<u8>, powermail_proto::auth::SecretError> {
        powermail_proto::auth::load_secret(self.secret.as_deref(), self.secret_file.as_deref())
    }

    /// The userbase URL with its password (and any password-like query
    /// parameter) replaced by `***`, for `/config` and log lines.
    pub fn userbase_redacted(&self) -> String {
        redact_url(&self.userbase)
    }

    /// This block for the admin port's `/config`, as top-level keys the
    /// daemon adds its own to. Never holds the secret, the admin token or the
    /// userbase password; the secret file's path is shown.
    /// `admin` is the daemon's admin block, shown beside it (token hidden).
    pub fn public_json(
        &self,
        admin: &powermail_admin::AdminSettings,
    ) -> serde_json::Map<String, serde_json::Value> {
        let backends: Vec<serde_json::Value> = self
            .backends
            .iter()
            .map(|b| {
                serde_json::json!({
                    "name": b.name, "addr": b.addr, "group": b.group_name(), "priority": b.priority,
                })
            })
            .collect();
        let value = serde_json::json!({
            "proxy_from": self.proxy_from,
            "proxy_timeout_ms": self.proxy_timeout_ms,
            "userbase": self.userbase_redacted(),
            "userbase_migrate": self.userbase_migrate,
            "userbase_cache": self.userbase_cache,
            "secret_file": self.secret_file,
            "backend_pool": self.backend_pool,
            "backends": backends,
        });
        let mut map = match value {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        if let serde_json::Value::Object(admin) = admin.public_json() {
            map.extend(admin);
        }
        map
    }
}

/// Reads a daemon's configuration `T` that embeds [`FrontendSettings`] with
/// `#[serde(flatten)]`. serde hands the flattened keys over as buffered
/// values without their place in the file, so a wrong value of a shared key
/// would be reported at line 1; when `T` fails and the shared block alone
/// fails too, that error (which has the line) is returned instead.
pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, toml::de::Error> {
    toml::from_str::<T>(text).map_err(|e| {
        if let Err(shared) = toml::from_str::<FrontendSettings>(text) {
            shared
        } else if let Err(admin) = toml::from_str::<powermail_admin::AdminSettings>(text) {
            admin
        } else {
            e
        }
    })
}

/// `mysql://user:pass@host/db` → `mysql://user:***@host/db`, and the value of
/// every query parameter whose name holds `pass` or `secret` → `***`. The
/// user part ends at the last `@`, so a password holding `@`, `/` or `?` is
/// hidden whole (at worst, more than the password is hidden, never less).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|s| s + 3) else {
        return url.to_string();
    };
    let mut out = match url.rfind('@') {
        Some(at) if at >= scheme_end => match url[scheme_end..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    };
    if let Some((base, query)) = out.split_once('?') {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _))
                    if k.to_ascii_lowercase().contains("pass")
                        || k.to_ascii_lowercase().contains("secret") =>
                {
                    format!("{k}=***")
                }
                _ => p.to_string(),
            })
            .collect();
        out = format!("{base}?{}", params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("mysql://u:pw@h/db"), "mysql://u:***@h/db");
        assert_eq!(redact_url("mysql://u@h/db"), "mysql://u@h/db");
        assert_eq!(redact_url("mysql://:pw@h/db"), "mysql://:***@h/db");
        // A password holding `@` or `/` is hidden whole.
        assert_eq!(redact_url("mysql://u:p@s/s@h/db"), "mysql://u:***@h/db");
        assert_eq!(
            redact_url("mysql://u:pw@h/db?pool_max=4&password=x&db_secret=y"),
            "mysql://u:***@h/db?pool_max=4&password=***&db_secret=***"
        );
        assert_eq!(redact_url("sqlite:///a@b.db"), "sqlite:///a@b.db");
        assert_eq!(redact_url("no scheme:pw@x"), "no scheme:pw@x");
    }

    /// Reads a block the way a daemon does: flattened into a struct that
    /// refuses unknown keys.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Daemon {
        #[serde(default)]
        own: u32,
        #[serde(flatten)]
        shared: FrontendSettings,
        #[serde(flatten)]
        admin: powermail_admin::AdminSettings,
    }

    const MINIMAL: &str = "userbase = \"sqlite:///x.db\"\nsecret = \"0123456789abcdef\"\n\
                           [[backend]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n";

    #[test]
    fn flattened_block_keeps_unknown_keys_refused() {
        let d: Daemon = toml::from_str(&format!("own = 7\n{MINIMAL}")).expect("parses");
        assert_eq!(d.own, 7);
        assert_eq!(d.shared.backends.len(), 1);
        assert_eq!(d.admin.admin_connections_max, 128);
        assert_eq!(d.shared.check(), Ok(()));
        let err = toml::from_str::<Daemon>(&format!("bogus = 1\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        assert!(
            toml::from_str::<Daemon>("own = 1\n").is_err(),
            "userbase missing"
        );
    }

    #[test]
    fn a_wrong_shared_value_is_reported_at_its_line() {
        // Line 2, before the `[[backend]]` table starts.
        let text = format!("own = 1\nadmin_connections_max = \"x\"\n{MINIMAL}");
        let err = from_toml::<Daemon>(&text).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("expected usize"), "{err}");
        let own = format!("own = \"x\"\n{MINIMAL}");
        let err = from_toml::<Daemon>(&own).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("u32"), "{err}");
    }

    #[test]
    fn check_refuses_duplicates_and_secret_mistakes() {
        let d: Daemon = toml::from_str(&format!(
            "{MINIMAL}[[backend]]\nname = \"a\"\naddr = \"127.0.0.1:2\"\n"
        ))
        .expect("parses");
        assert_eq!(
            d.shared.check(),
            Err(SettingsError::Backends(BackendListError::DuplicateName(
                "a".into()
            )))
        );
        let both: Daemon =
            toml::from_str(&format!("secret_file = \"/s\"\n{MINIMAL}")).expect("parses");
        assert_eq!(both.shared.check(), Err(SettingsError::Secret));
    }
}
