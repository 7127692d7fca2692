//! pplistener's configuration: one TOML file, every knob named with its unit
//! and a default, so an operator can read the whole behaviour off the file.
//! See `examples/pplistener.toml` for a commented sample.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The shared secret frontends prove they know (see proto/PROTOCOL.md).
    /// Either this or `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the secret (surrounding whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The admin port (`admin_listen`, `admin_token`, its limits).
    #[serde(flatten)]
    pub admin: powermail_admin::AdminSettings,
    /// Log level (`error`, `warn`, `info`, `debug`, `trace`); none: `RUST_LOG`
    /// or `info`. Applied at start and on SIGHUP.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Limits shared by every backend of this process. On SIGHUP,
    /// `connections_per_backend_max` and `free_bytes_min` apply at once; the
    /// others need a restart.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Threads per backend for blocking file-system calls (link in `file`
    /// mode, readdir, sendfile); bounds how many GETs one backend streams at
    /// once.
    #[serde(default = "default_blocking_threads")]
    pub blocking_threads: usize,
    /// The backends. When empty, one per online CPU is made from
    /// `data_root` and `listen_base`.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// With no `[[backend]]` tables: backend N stores under `data_root/disks/N`.
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    /// With no `[[backend]]` tables: backend N listens on this port + N.
    #[serde(default)]
    pub listen_base: Option<SocketAddr>,
    /// With no `[[backend]]` tables: how many backends (default: online CPUs).
    #[serde(default)]
    pub backend_count: Option<usize>,
    /// Durability mode of backends that do not set their own (default `file`).
    #[serde(default)]
    pub durability: Durability,
    /// On SIGTERM or SIGINT, how long (ms) open connections get to finish the
    /// request they are in (a PUT being received completes or is dropped
    /// unseen) before the process ends anyway. Idle connections are closed at
    /// once. Keep systemd's `TimeoutStopSec` above it.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Bodies up to this many bytes are written through the page cache in
    /// one write instead of with `O_DIRECT`, on backends whose flush writes a
    /// body's page-cache tail back before its link anyway (`durability =
    /// "file"`, or `syncfs` on ext4 without a journal); 0: every body with
    /// `O_DIRECT`. At most [`crate::writer::WRITE_UNIT_BYTES`].
    #[serde(default = "default_page_cache_body_max_bytes")]
    pub page_cache_body_max_bytes: usize,
}

fn default_page_cache_body_max_bytes() -> usize {
    32 << 10
}

/// The longest `shutdown_grace_ms` accepted (one hour): a stop must end.
pub const SHUTDOWN_GRACE_MAX_MS: u64 = 3_600_000;

fn default_shutdown_grace_ms() -> u64 {
    10_000
}

/// How a backend makes a PUT durable before it answers `+OK`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Each body gets its own `fdatasync`, and each directory touched by a
    /// batch of links one `fsync`: right on any file system, including one
    /// shared with other data.
    #[default]
    File,
    /// Bodies are written without their own sync; after a batch of
    /// concurrent PUTs is linked, one `syncfs(2)` of the backend's file
    /// system makes bodies, links and directories durable together. Right
    /// when `data_dir` is its own file system (it flushes everything on it).
    Syncfs,
}

impl Durability {
    /// The name used in the configuration and on the admin port.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::File => "file",
            Durability::Syncfs => "syncfs",
        }
    }
}

/// Limits, each answered with a clear protocol error when exceeded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent connections per backend; beyond it `-ERR [LIMIT]` and close.
    pub connections_per_backend_max: usize,
    /// Largest message body, in bytes (`-ERR [TOOBIG]` and close).
    pub message_max_bytes: u64,
    /// Longest command line, in bytes.
    pub line_max_bytes: usize,
    /// Most mailboxes in one PUT.
    pub mailboxes_per_put_max: usize,
    /// Largest PUT body chunk, in bytes.
    pub chunk_max_bytes: usize,
    /// A connection silent for this long is closed.
    pub idle_timeout_ms: u64,
    /// Most entries returned by one LIST.
    pub list_max_entries: usize,
    /// Below this many free bytes the backend turns read-only by itself.
    pub free_bytes_min: u64,
    /// Below this many free inodes the backend turns read-only by itself
    /// (every message and every mailbox directory takes one; a disk can run out
    /// of inodes with bytes to spare).
    pub free_inodes_min: u64,
    /// Entries (one per mailbox plus one per message) each backend keeps in
    /// its in-memory mailbox index; the least recently used mailboxes are
    /// evicted beyond it and walked again on their next touch.
    pub index_entries_max: usize,
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        LimitsConfig {
            connections_per_backend_max: 1024,
            message_max_bytes: 64 << 20,
            line_max_bytes: 1024,
            mailboxes_per_put_max: 10_000,
            chunk_max_bytes: 1 << 20,
            idle_timeout_ms: 300_000,
            list_max_entries: 100_000,
            free_bytes_min: 256 << 20,
            free_inodes_min: 1024,
            index_entries_max: 4_000_000,
        }
    }
}

/// One backend: a data directory (ideally its own disk), a port, a CPU.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Name shown in the greeting, logs and stats (default `b<index>`).
    #[serde(default)]
    pub name: Option<String>,
    /// Where messages live.
    pub data_dir: PathBuf,
    /// Address of the backend protocol port.
    pub listen: SocketAddr,
    /// CPU to pin the executor to (default: spread over the online CPUs).
    #[serde(default)]
    pub cpu: Option<usize>,
    /// `file` or `syncfs` (default: the top-level `durability`).
    #[serde(default)]
    pub durability: Option<Durability>,
}

fn default_blocking_threads() -> usize {
    8
}

/// A backend with every default resolved.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Name.
    pub name: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Port.
    pub listen: SocketAddr,
    /// CPU it is pinned to.
    pub cpu: usize,
    /// How PUTs are made durable.
    pub durability: Durability,
    /// Whether a batch's bodies are flushed before they are linked (set at
    /// start-up for a file system that does not order data before metadata:
    /// ext4 without a journal). Never configured.
    pub flush_before_link: bool,
}

impl Config {
    /// Parses a TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let cfg: Config = toml::from_str(text)?;
        cfg.log_filter()?;
        anyhow::ensure!(
            cfg.shutdown_grace_ms <= SHUTDOWN_GRACE_MAX_MS,
            "shutdown_grace_ms {}: at most {SHUTDOWN_GRACE_MAX_MS}",
            cfg.shutdown_grace_ms
        );
        anyhow::ensure!(
            cfg.page_cache_body_max_bytes <= crate::writer::WRITE_UNIT_BYTES,
            "page_cache_body_max_bytes {}: at most {}",
            cfg.page_cache_body_max_bytes,
            crate::writer::WRITE_UNIT_BYTES
        );
        Ok(cfg)
    }

    /// `log_level` as a filter (none when unset).
    pub fn log_filter(&self) -> anyhow::Result<Option<log::LevelFilter>> {
        self.log_level
            .as_deref()
            .map(|l| {
                l.parse::<log::LevelFilter>().map_err(|_| {
                    anyhow::anyhow!("log_level {l:?}: use error, warn, info, debug or trace")
                })
            })
            .transpose()
    }

    /// The secret bytes, from `secret` or `secret_file`, by the rule all
    /// PowerMail processes share ([`powermail_proto::auth::load_secret`]).
    pub fn secret(&self) -> anyhow::Result<Vec<u8>> {
        Ok(powermail_proto::auth::load_secret(
            self.secret.as_deref(),
            self.secret_file.as_deref(),
        )?)
    }

    /// The backends with names, CPUs and (when none are listed) the
    /// one-per-CPU defaults filled in. `online_cpus` must not be empty.
    pub fn resolve_backends(&self, online_cpus: &[usize]) -> anyhow::Result<Vec<Backend>> {
        anyhow::ensure!(!online_cpus.is_empty(), "no online CPU");
        let listed: Vec<BackendConfig> = if self.backends.is_empty() {
            let (Some(root), Some(base)) = (&self.data_root, self.listen_base) else {
                anyhow::bail!("no [[backend]] tables and no data_root + listen_base");
            };
            let n = self.backend_count.unwrap_or(online_cpus.len());
            (0..n)
                .map(|i| BackendConfig {
                    name: None,
                    data_dir: root.join("disks").join(i.to_string()),
                    listen: SocketAddr::new(base.ip(), base.port() + i as u16),
                    cpu: None,
                    durability: None,
                })
                .collect()
        } else {
            self.backends.clone()
        };
        anyhow::ensure!(!listed.is_empty(), "no backends configured");
        let mut out = Vec::with_capacity(listed.len());
        for (index, b) in listed.into_iter().enumerate() {
            let cpu = b.cpu.unwrap_or(online_cpus[index % online_cpus.len()]);
            anyhow::ensure!(
                online_cpus.contains(&cpu),
                "backend {index}: CPU {cpu} is not online"
            );
            let name = b.name.unwrap_or_else(|| format!("b{index}"));
            anyhow::ensure!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "backend name {name:?}: use letters, digits, - and _"
            );
            out.push(Backend {
                name,
                data_dir: b.data_dir,
                listen: b.listen,
                cpu,
                durability: b.durability.unwrap_or(self.durability),
                flush_before_link: false,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_make_one_backend_per_cpu() {
        let c = Config::parse(
            "secret = \"0123456789abcdef\"\ndata_root = \"/d\"\nlisten_base = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        let b = c.resolve_backends(&[0, 1]).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].listen.port(), 7001);
        assert_eq!(b[1].data_dir, PathBuf::from("/d/disks/1"));
        assert_eq!(b[1].cpu, 1);
        assert_eq!(c.limits.message_max_bytes, 64 << 20);
        assert_eq!(b[0].durability, Durability::File);
        assert_eq!(c.shutdown_grace_ms, 10_000);
    }

    #[test]
    fn the_example_parses_and_page_cache_bodies_are_bounded() {
        let c = Config::parse(include_str!("../../examples/pplistener.toml")).unwrap();
        assert_eq!(c.page_cache_body_max_bytes, 32 << 10);
        let base = "secret = \"0123456789abcdef\"\n";
        let c = Config::parse(&format!("{base}page_cache_body_max_bytes = 0\n")).unwrap();
        assert_eq!(
            c.page_cache_body_max_bytes, 0,
            "0: every body with O_DIRECT"
        );
        let over = format!(
            "{base}page_cache_body_max_bytes = {}\n",
            crate::writer::WRITE_UNIT_BYTES + 1
        );
        assert!(
            Config::parse(&over).is_err(),
            "beyond the write unit: refused"
        );
    }

    #[test]
    fn durability_is_per_backend_with_a_default() {
        let c = Config::parse(
            "secret = \"0123456789abcdef\"\ndurability = \"syncfs\"\n\
             [[backend]]\ndata_dir = \"/d0\"\nlisten = \"127.0.0.1:1\"\n\
             [[backend]]\ndata_dir = \"/d1\"\nlisten = \"127.0.0.1:2\"\ndurability = \"file\"\n",
        )
        .unwrap();
        let b = c.resolve_backends(&[0, 1]).unwrap();
        assert_eq!(b[0].durability, Durability::Syncfs);
        assert_eq!(b[1].durability, Durability::File);
        let bad = "secret = \"0123456789abcdef\"\n[[backend]]\ndata_dir = \"/d\"\n\
                   listen = \"127.0.0.1:1\"\ndurability = \"fsync\"\n";
        assert!(Config::parse(bad).is_err(), "unknown modes are refused");
    }

    #[test]
    fn admin_keys_are_read_and_unknown_keys_still_refused() {
        let base =
            "secret = \"0123456789abcdef\"\ndata_root = \"/d\"\nlisten_base = \"127.0.0.1:7000\"\n";
        let c = Config::parse(&format!(
            "{base}admin_listen = \"127.0.0.1:8\"\nadmin_connections_max = 3\n"
        ))
        .unwrap();
        assert_eq!(c.admin.admin_listen.as_deref(), Some("127.0.0.1:8"));
        assert_eq!(c.admin.limits().connections_max, 3);
        for bad in [
            "bogus = 1\n",
            "admin_lsten = \"x\"\n",
            "admin_connections_max = \"x\"\n",
        ] {
            assert!(Config::parse(&format!("{base}{bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn more_backends_than_cpus_share_them() {
        let c = Config::parse(
            "secret = \"0123456789abcdef\"\ndata_root = \"/d\"\nlisten_base = \"127.0.0.1:7000\"\nbackend_count = 3\n",
        )
        .unwrap();
        let b = c.resolve_backends(&[0, 1]).unwrap();
        assert_eq!(b.iter().map(|b| b.cpu).collect::<Vec<_>>(), vec![0, 1, 0]);
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(Config::parse("nonsense = 1").is_err());
        let c = Config::parse("secret = \"short\"").unwrap();
        assert!(c.secret().is_err());
        let c = Config::parse(
            "secret = \"0123456789abcdef\"\n[[backend]]\ndata_dir = \"/d\"\nlisten = \"127.0.0.1:1\"\ncpu = 99\n",
        )
        .unwrap();
        assert!(c.resolve_backends(&[0, 1]).is_err());
        let forever = "secret = \"0123456789abcdef\"\nshutdown_grace_ms = 3600001\n";
        assert!(Config::parse(forever).is_err(), "the grace is bounded");
    }
}
