//! powersmtp's configuration: one TOML file (`--config FILE`), every knob
//! named with its unit and a default. `examples/powersmtp.toml` documents
//! every key.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
pub use powermail_frontend::settings::{CacheSettings, FrontendSettings, TlsSettings};
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
    /// Copies of each message (K): 250 only when K backends hold it durably.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
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
    /// Forwarding through an outgoing relay.
    #[serde(default)]
    pub forward: ForwardSettings,
    /// How quota checks read a mailbox's usage.
    #[serde(default)]
    pub quota: QuotaSettings,
    /// STARTTLS; none: not offered.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// On SIGTERM: no new sessions; open transactions get this long to
    /// finish (idle sessions get `421` at once), then the process ends.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// The keys powerpop has too: PROXY sources, admin port, userbase,
    /// secret, `[backend_pool]` and the `[[backend]]` tables (top level in
    /// the file; read through `Deref`, so `cfg.backends` works).
    #[serde(flatten)]
    pub frontend: FrontendSettings,
    /// The admin port: `admin_listen`, `admin_token` and its limits (top level
    /// in the file, as in every daemon's).
    #[serde(flatten)]
    pub admin: powermail_admin::AdminSettings,
}

impl std::ops::Deref for Config {
    type Target = FrontendSettings;

    fn deref(&self) -> &FrontendSettings {
        &self.frontend
    }
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

/// How quota checks read a mailbox's usage (`usage_cache.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaSettings {
    /// A mailbox's usage read from the backends is reused this long, plus what
    /// this process stored there since, to accept a recipient or a message
    /// without a round trip; a refusal is always checked on a fresh reading.
    /// 0: every check asks the backends.
    pub usage_cache_ms: u64,
    /// Most mailboxes whose usage is kept.
    pub usage_cache_entries_max: usize,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        QuotaSettings {
            usage_cache_ms: 1_000,
            usage_cache_entries_max: 100_000,
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
    /// Parses and checks a configuration text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let cfg: Config = powermail_frontend::settings::from_toml(text)?;
        cfg.frontend.check()?;
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
        if cfg.undo_replay_interval_ms == 0 {
            bail!("undo_replay_interval_ms must be at least 1");
        }
        Ok(cfg)
    }

    /// The message-id component naming this frontend.
    pub fn frontend_id(&self) -> &str {
        self.frontend_id.as_deref().unwrap_or(&self.hostname)
    }

    /// The effective configuration for the admin port: the shared block's
    /// ([`FrontendSettings::public_json`], no secret, token or userbase
    /// password) and powersmtp's own keys.
    pub fn public_json(&self) -> serde_json::Value {
        let mut map = self.frontend.public_json(&self.admin);
        let own = serde_json::json!({
            "listen": self.listen,
            "lmtp_listen": self.lmtp_listen,
            "hostname": self.hostname,
            "frontend_id": self.frontend_id(),
            "replicas": self.replicas,
            "state_dir": self.state_dir,
            "undo_replay_interval_ms": self.undo_replay_interval_ms,
            "shutdown_grace_ms": self.shutdown_grace_ms,
            "limits": self.limits,
            "forward": self.forward,
            "quota": self.quota,
            "tls": self.tls,
        });
        if let serde_json::Value::Object(own) = own {
            map.extend(own);
        }
        serde_json::Value::Object(map)
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

    powermail_testkit::frontend_config_tests!(
        include_str!("../../../examples/powersmtp.toml"),
        Config
    );
}
