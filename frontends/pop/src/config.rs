//! powerpop's configuration: one TOML file (`--config FILE`), every knob
//! named with its unit and a default. `examples/powerpop.toml` documents
//! every key.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
pub use powermail_frontend::settings::{CacheSettings, FrontendSettings, TlsSettings};
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// POP3 listening address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Implicit-TLS POP3 (POP3S) listening address; needs `[tls]`.
    #[serde(default)]
    pub tls_listen: Option<String>,
    /// Certificate for STLS and the implicit-TLS port; none: no TLS.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// Accept USER/PASS and AUTH PLAIN on unencrypted connections from
    /// non-loopback clients. Default false: such logins need STLS or the
    /// implicit-TLS port (loopback clients are always allowed).
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Domain for bare user names when the userbase has no virtual server
    /// for the address the client connected to.
    #[serde(default)]
    pub default_domain: Option<String>,
    /// Where the delete journal and the mailbox lock files live. Shared by
    /// the powerpop processes of one host.
    pub state_dir: PathBuf,
    /// With a MySQL/MariaDB userbase: how long a mailbox lock's lease row
    /// lasts without renewal (renewed every third of it while the session
    /// lives). A POP host that dies keeps its mailboxes locked this long;
    /// a session that loses its lease (the database unreachable this long)
    /// refuses to commit its deletions. 300 to 3,600,000; default 30,000.
    /// SQLite userbases are single-host and lock with `flock` only.
    #[serde(default = "default_lock_lease_ms")]
    pub lock_lease_ms: u64,
    /// On SIGTERM: no new sessions (`-ERR [SYS/TEMP]`); open ones get this
    /// long to finish (their DELEs are committed at their QUIT), then the
    /// process ends and the rest are cut (RFC 1939: nothing deleted for them).
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Limits and time-outs.
    #[serde(default)]
    pub limits: Limits,
    /// Login-failure throttling.
    #[serde(default)]
    pub throttle: ThrottleSettings,
    /// Listing workers and RETR prefetch (read at start).
    #[serde(default)]
    pub serving: Serving,
    /// A legacy POP3 server for users not in the userbase (migration).
    #[serde(default)]
    pub fallback: Option<FallbackSettings>,
    /// The keys powersmtp has too: PROXY sources, admin port, userbase,
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

/// The legacy POP3 server that users not (yet) in the userbase are proxied
/// to, as POPular and Perdition do during a migration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackSettings {
    /// `host:port` of the legacy server (plain POP3).
    pub addr: String,
    /// Time-out of connecting and of each reply during the login.
    #[serde(default = "default_fallback_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_fallback_timeout_ms() -> u64 {
    5_000
}

/// Limits and time-outs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent POP3 connections (one thread each); beyond:
    /// `-ERR [SYS/TEMP] too many connections` and close.
    pub connections_max: usize,
    /// Longest command line in bytes, CRLF included (RFC 2449: 255 for
    /// commands; AUTH responses need more).
    pub line_max_bytes: usize,
    /// Refused commands per session before it is closed.
    pub errors_max: u32,
    /// Waiting for the next command (RFC 1939: at least 10 minutes).
    pub idle_timeout_ms: u64,
    /// The longest time one answer may take to be written, from its first
    /// byte to its last: a whole RETR or TOP included, however slowly the
    /// client reads (a deadline, not a per-write time-out). Size it for the largest
    /// message over the slowest link served: 600 s move ~70 MiB at 1 Mbit/s.
    pub send_timeout_ms: u64,
    /// Waiting for all backends' listings; a slower backend is skipped.
    pub listing_timeout_ms: u64,
    /// Most messages taken from one backend's listing.
    pub listing_max_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 512,
            line_max_bytes: 1024,
            errors_max: 20,
            idle_timeout_ms: 600_000,
            send_timeout_ms: 600_000,
            listing_timeout_ms: 2_000,
            listing_max_messages: 100_000,
        }
    }
}

impl Limits {
    /// The idle time-out.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// The send deadline of one answer (`send_timeout_ms`).
    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.send_timeout_ms)
    }
}

/// How logins list and RETR fetches: the long-lived listing workers and
/// the fetch-ahead window. Read at start (a reload does not change them).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Serving {
    /// Listing worker threads per backend, started once: a login's LIST goes
    /// to them instead of a thread of its own (1 to 256).
    pub listing_workers_per_backend: usize,
    /// Listings queued per backend; a login finding its backend's queue full
    /// skips that backend (soft failure), so a blackholed backend cannot pile
    /// up work. A queued listing older than `listing_timeout_ms` is dropped.
    pub listing_queue_max: usize,
    /// Most messages one RETR fetches ahead from the same backend (`GETM`),
    /// the one asked for included; 1 turns fetch-ahead off (1 to 64).
    pub prefetch_messages_max: usize,
    /// Most bytes held fetched ahead per session; a message larger than this
    /// is streamed straight from its backend as before (at most 64 MiB).
    pub prefetch_bytes_max: u64,
    /// A streamed message (RETR, not TOP) of at least this many bytes goes
    /// from the backend socket to a plain client socket with `splice(2)`,
    /// never through powerpop's memory; TLS sessions always copy. 0 turns
    /// splicing off.
    pub splice_min_bytes: u64,
    /// Entries (one per mailbox plus one per message) of merged listings
    /// kept between logins, least recently used dropped first; a login of a
    /// kept mailbox asks each backend only whether its generation changed.
    /// 0 turns the cache off (at most 100,000,000).
    pub listing_cache_entries_max: usize,
    /// Only mailboxes of at least this many messages are kept: a smaller
    /// listing costs no more than the check.
    pub listing_cache_min_messages: usize,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            listing_workers_per_backend: 8,
            listing_queue_max: 512,
            prefetch_messages_max: 32,
            prefetch_bytes_max: 1 << 20,
            splice_min_bytes: 64 << 10,
            listing_cache_entries_max: 1_000_000,
            listing_cache_min_messages: 1_000,
        }
    }
}

/// Login-failure throttling, per client IP and per account.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleSettings {
    /// Every failed login is answered after this delay.
    pub failure_delay_ms: u64,
    /// This many failures within `window_ms` (from one IP, or for one
    /// account) lock that IP or account out.
    pub failures_max: u32,
    /// The window failures are counted in.
    pub window_ms: u64,
    /// How long a lock-out lasts; every login attempt is refused meanwhile.
    pub lockout_ms: u64,
    /// Most IPs and accounts tracked at once (memory bound).
    pub tracked_max: usize,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            failure_delay_ms: 1_000,
            failures_max: 10,
            window_ms: 300_000,
            lockout_ms: 300_000,
            tracked_max: 100_000,
        }
    }
}

fn default_lock_lease_ms() -> u64 {
    30_000
}

fn default_shutdown_grace_ms() -> u64 {
    25_000
}

fn default_listen() -> String {
    "127.0.0.1:1110".into()
}

impl Config {
    /// Parses and checks a configuration text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let cfg: Config = powermail_frontend::settings::from_toml(text)?;
        // The delete journal is keyed by backend name: names are unique.
        cfg.frontend.check()?;
        if cfg.limits.line_max_bytes < 255 {
            bail!("limits.line_max_bytes must be at least 255 (RFC 2449)");
        }
        if cfg.tls_listen.is_some() && cfg.tls.is_none() {
            bail!("tls_listen needs a [tls] certificate");
        }
        let lease_ms =
            powermail_frontend::lock::LOCK_LEASE_MIN_MS..=powermail_userbase::LEASE_MAX_MS;
        if !lease_ms.contains(&cfg.lock_lease_ms) {
            bail!(
                "lock_lease_ms must be {} to {}",
                lease_ms.start(),
                lease_ms.end()
            );
        }
        if cfg.limits.connections_max == 0 {
            bail!("limits.connections_max must be at least 1");
        }
        if cfg.limits.errors_max == 0 {
            bail!("limits.errors_max must be at least 1");
        }
        if cfg.limits.send_timeout_ms == 0 || cfg.limits.idle_timeout_ms == 0 {
            bail!("limits.send_timeout_ms and limits.idle_timeout_ms must be at least 1");
        }
        if cfg.throttle.failures_max == 0 {
            bail!("throttle.failures_max must be at least 1");
        }
        let sv = &cfg.serving;
        if !(1..=256).contains(&sv.listing_workers_per_backend) {
            bail!("serving.listing_workers_per_backend must be 1 to 256");
        }
        if sv.listing_cache_entries_max > 100_000_000 {
            bail!("serving.listing_cache_entries_max must be at most 100000000");
        }
        if sv.listing_queue_max == 0 {
            bail!("serving.listing_queue_max must be at least 1");
        }
        if !(1..=powermail_proto::GET_MANY_MAX).contains(&sv.prefetch_messages_max) {
            bail!("serving.prefetch_messages_max must be 1 to 64");
        }
        if sv.prefetch_bytes_max > 64 << 20 {
            bail!("serving.prefetch_bytes_max must be at most 64 MiB");
        }
        Ok(cfg)
    }

    /// The effective configuration for the admin port: the shared block's
    /// ([`FrontendSettings::public_json`], no secret, token or userbase
    /// password) and powerpop's own keys.
    pub fn public_json(&self) -> serde_json::Value {
        let mut map = self.frontend.public_json(&self.admin);
        let own = serde_json::json!({
            "listen": self.listen,
            "tls_listen": self.tls_listen,
            "tls": self.tls,
            "allow_plaintext_auth": self.allow_plaintext_auth,
            "default_domain": self.default_domain,
            "state_dir": self.state_dir,
            "shutdown_grace_ms": self.shutdown_grace_ms,
            "lock_lease_ms": self.lock_lease_ms,
            "limits": self.limits,
            "throttle": self.throttle,
            "serving": self.serving,
            "fallback": self.fallback,
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
        let text = include_str!("../../../examples/powerpop.toml");
        let cfg = Config::parse(text).expect("examples/powerpop.toml is valid");
        assert_eq!(cfg.listen, "127.0.0.1:1110");
        assert_eq!(cfg.backends.len(), 2);
    }

    #[test]
    fn minimal_config_and_refusals() {
        let base = "userbase = \"sqlite:///x.db\"\nstate_dir = \"/tmp/x\"\nsecret = \"s\"\n";
        let one = "[[backend]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n";
        let cfg = Config::parse(&format!("{base}{one}")).unwrap();
        assert_eq!(cfg.limits.listing_timeout_ms, 2000);
        assert!(Config::parse(base).is_err(), "no backends");
        assert!(
            Config::parse(&format!("{base}{one}{one}")).is_err(),
            "duplicate names"
        );
        assert!(Config::parse(&format!("{base}bogus = 1\n{one}")).is_err());
        assert_eq!(cfg.lock_lease_ms, 30_000);
        for bad in ["lock_lease_ms = 0\n", "lock_lease_ms = 3600001\n"] {
            assert!(
                Config::parse(&format!("{base}{bad}{one}")).is_err(),
                "{bad}"
            );
        }
    }

    powermail_testkit::frontend_config_tests!(
        include_str!("../../../examples/powerpop.toml"),
        Config
    );
}
