//! powersmtp's configuration: one TOML file (`--config FILE`), every knob
//! named with its unit and a default. `examples/powersmtp.toml` documents
//! every key.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
pub use powermail_frontend::settings::{CacheSettings, TlsSettings};
use powermail_frontend::{BackendSpec, PoolConfig};
use serde::{Deserialize, Serialize};

use crate::session::SessionLimits;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// SMTP listening address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// LMTP (RFC 2033) listening address, served by the same process with
    /// the same delivery path; none: no LMTP. For an MX in front (Postfix
    /// `lmtp:inet:HOST:PORT`); keep it on a trusted network.
    #[serde(default)]
    pub lmtp_listen: Option<String>,
    /// The name this server gives itself (greeting, EHLO, Received).
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Part of every message id; must be unique among the frontends that
    /// share backends. Default: `hostname`.
    #[serde(default)]
    pub frontend_id: Option<String>,
    /// Load balancers trusted to send a PROXY protocol header (v1 or v2),
    /// as CIDR blocks or addresses. Connections from them must start with
    /// one; its client address is then what the Received header and the logs
    /// see. From anyone else a PROXY header is refused. Default: none.
    #[serde(default)]
    pub proxy_from: Vec<String>,
    /// Time a trusted balancer has to send its PROXY header, in ms.
    #[serde(default = "powermail_frontend::proxy::default_timeout_ms")]
    pub proxy_timeout_ms: u64,
    /// Admin HTTP port; none: no admin port.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Bearer token for the admin port (default: the backend secret).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Admin connections served at once (one thread each); beyond: `503` and close.
    #[serde(default = "powermail_admin::default_connections_max")]
    pub admin_connections_max: usize,
    /// The longest one admin connection may take, in ms, to send its request
    /// and read the answer; then it is closed (slow or silent clients).
    #[serde(default = "powermail_admin::default_request_timeout_ms")]
    pub admin_request_timeout_ms: u64,
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
    /// Copies of each message (K): 250 only when K backends hold it durably.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Shared backend secret; either this or `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    /// File holding the backend secret (trailing whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Where the undo journal lives (`undo.journal`: deletions owed for
    /// copies of refused messages, replayed until acknowledged). None: the
    /// journal is kept in memory only and lost on a restart.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// How often deletions still owed in the undo journal are sent again.
    #[serde(default = "default_undo_replay_interval_ms")]
    pub undo_replay_interval_ms: u64,
    /// Limits and time-outs.
    #[serde(default)]
    pub limits: Limits,
    /// Backend health checks and connection pools.
    #[serde(default)]
    pub backend_pool: PoolConfig,
    /// Forwarding through an outgoing relay.
    #[serde(default)]
    pub forward: ForwardSettings,
    /// STARTTLS; none: not offered.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// On SIGTERM: no new sessions; open transactions get this long to
    /// finish (idle sessions get `421` at once), then the process ends.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// The backends.
    #[serde(rename = "backend")]
    pub backends: Vec<BackendSpec>,
}

/// Where forwarded mail goes. The relay is spoken to during the incoming
/// transaction (no queue): its answers decide the replies.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardSettings {
    /// `host:port` of the outgoing SMTP relay. None: mailboxes with
    /// forwards get their mail stored locally (and a warning is logged).
    pub relay: Option<String>,
    /// Time-out of every step with the relay.
    pub timeout_ms: u64,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        ForwardSettings {
            relay: None,
            timeout_ms: 60_000,
        }
    }
}

/// Limits and time-outs (RFC 5321 §4.5.3).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent SMTP connections (one thread each); beyond: `421 4.3.2`.
    pub connections_max: usize,
    /// Longest command line in bytes, CRLF included.
    pub line_max_bytes: usize,
    /// Largest message in bytes (advertised as SIZE).
    pub message_max_bytes: u64,
    /// Most recipients per message.
    pub recipients_max: usize,
    /// Most refused commands per session before `421` and close.
    pub errors_max: u32,
    /// Waiting for the next command (RFC 5321: at least 5 minutes); also the
    /// deadline for writing the replies to one read of input, from their start
    /// to their last byte, however slowly the client reads.
    pub command_timeout_ms: u64,
    /// Waiting for the next block of message data (RFC 5321: 3 minutes).
    pub data_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        let s = SessionLimits::default();
        Limits {
            connections_max: 512,
            line_max_bytes: s.line_max_bytes,
            message_max_bytes: s.message_max_bytes,
            recipients_max: s.recipients_max,
            errors_max: s.errors_max,
            command_timeout_ms: 300_000,
            data_timeout_ms: 180_000,
        }
    }
}

impl Limits {
    /// The part a [`Session`](crate::session::Session) enforces.
    pub fn session(&self) -> SessionLimits {
        SessionLimits {
            line_max_bytes: self.line_max_bytes,
            message_max_bytes: self.message_max_bytes,
            recipients_max: self.recipients_max,
            errors_max: self.errors_max,
        }
    }

    /// The command time-out.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }

    /// The DATA block time-out.
    pub fn data_timeout(&self) -> Duration {
        Duration::from_millis(self.data_timeout_ms)
    }
}

fn default_listen() -> String {
    "127.0.0.1:2525".into()
}

fn default_hostname() -> String {
    "localhost".into()
}

fn default_undo_replay_interval_ms() -> u64 {
    1000
}

fn default_replicas() -> usize {
    1
}

fn default_shutdown_grace_ms() -> u64 {
    25_000
}

impl Config {
    /// The admin port's limits (`admin_connections_max`, `admin_request_timeout_ms`).
    pub fn admin_limits(&self) -> powermail_admin::AdminLimits {
        powermail_admin::AdminLimits {
            connections_max: self.admin_connections_max,
            request_timeout_ms: self.admin_request_timeout_ms,
        }
    }

    /// Parses and checks a configuration text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let cfg: Config = toml::from_str(text)?;
        powermail_frontend::validate_backends(&cfg.backends)?;
        if cfg.replicas == 0 || cfg.replicas > cfg.backends.len() {
            bail!(
                "replicas = {} must be between 1 and the number of backends ({})",
                cfg.replicas,
                cfg.backends.len()
            );
        }
        if cfg.limits.line_max_bytes < 512 {
            bail!("limits.line_max_bytes must be at least 512 (RFC 5321)");
        }
        if cfg.limits.connections_max == 0 {
            bail!("limits.connections_max must be at least 1");
        }
        if cfg.secret.is_none() == cfg.secret_file.is_none() {
            bail!("set exactly one of secret and secret_file");
        }
        if cfg.undo_replay_interval_ms == 0 {
            bail!("undo_replay_interval_ms must be at least 1");
        }
        Ok(cfg)
    }

    /// The backend secret, by the rule all PowerMail processes share
    /// ([`powermail_proto::auth::load_secret`]).
    pub fn secret(&self) -> anyhow::Result<Vec<u8>> {
        Ok(powermail_proto::auth::load_secret(
            self.secret.as_deref(),
            self.secret_file.as_deref(),
        )?)
    }

    /// The message-id component naming this frontend.
    pub fn frontend_id(&self) -> &str {
        self.frontend_id.as_deref().unwrap_or(&self.hostname)
    }

    /// The effective configuration for the admin port, secrets removed.
    pub fn public_json(&self) -> serde_json::Value {
        serde_json::json!({
            "listen": self.listen,
            "lmtp_listen": self.lmtp_listen,
            "hostname": self.hostname,
            "frontend_id": self.frontend_id(),
            "admin_listen": self.admin_listen,
            "userbase": redact_url(&self.userbase),
            "userbase_cache": self.userbase_cache,
            "replicas": self.replicas,
            "state_dir": self.state_dir,
            "undo_replay_interval_ms": self.undo_replay_interval_ms,
            "shutdown_grace_ms": self.shutdown_grace_ms,
            "limits": self.limits,
            "backend_pool": self.backend_pool,
            "forward": self.forward,
            "tls": self.tls,
            "backends": self.backends.iter().map(|b| serde_json::json!({
                "name": b.name, "addr": b.addr, "group": b.group_name(), "priority": b.priority,
            })).collect::<Vec<_>>(),
        })
    }
}

/// `mysql://user:pass@host/db` → `mysql://user:***@host/db`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../examples/powersmtp.toml");
        let cfg = Config::parse(text).expect("example parses");
        assert_eq!(cfg.listen, "127.0.0.1:2525");
        assert!(cfg.backends.len() >= 2);
    }

    #[test]
    fn checks() {
        let base = "userbase = \"sqlite:///x.db\"\nsecret = \"s\"\n";
        let one = "[[backend]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n";
        assert!(Config::parse(&format!("{base}{one}")).is_ok());
        assert!(Config::parse(base).is_err(), "no backends");
        assert!(Config::parse(&format!("{base}replicas = 2\n{one}")).is_err());
        let other = "[[backend]]\nname = \"a\"\naddr = \"127.0.0.1:2\"\n";
        let err = Config::parse(&format!("{base}{one}{other}")).unwrap_err();
        assert!(err.to_string().contains("used more than once"), "{err}");
        assert!(Config::parse(&format!("{base}bogus = 1\n{one}")).is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("mysql://u:pw@h/db"), "mysql://u:***@h/db");
        assert_eq!(redact_url("sqlite:///a@b.db"), "sqlite:///a@b.db");
    }
}
